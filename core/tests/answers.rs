//! Requests submitted through a connection's queue of answers
//! (`Answers::submit`): each reply carries its own request's id across
//! shards, a full mailbox refuses exactly the requests past its bound, and
//! a request that needs more than its shard is given back for `execute`.

use std::collections::BTreeMap;

use deadbolt_core::engine::session::Answers;
use deadbolt_core::proto::{
    Acquire, ErrorCode, Granted, LockOp, Mode, Okay, Op, Outcome, Reply, Request, Wait,
};
use deadbolt_core::{Engine, EngineConfig, Limits};
use tokio::time::Instant;

fn engine(shards: usize, mailbox_len: usize) -> Engine {
    Engine::start(EngineConfig {
        shards,
        limits: Limits {
            mailbox_len,
            ..Limits::default()
        },
        ..EngineConfig::new()
    })
}

fn try_lock(key: &str, ttl_ms: u64) -> Op {
    Op::Lock(LockOp::Acquire(Acquire {
        key: key.into(),
        ttl_ms,
        wait: Wait::Never,
        ephemeral: false,
        mode: Mode::MUTEX,
        lock_delay_ms: 0,
        notify: false,
    }))
}

fn submit(answers: &Answers, id: u64, op: Op) {
    if let Err(request) = answers.submit(Request { id, op }, Instant::now()) {
        panic!("request {id} was given back: {request:?}");
    }
}

/// The next `n` replies, by id; every reply has an id, and none twice.
async fn replies(answers: &mut Answers, n: usize) -> BTreeMap<u64, Outcome> {
    let mut by_id = BTreeMap::new();
    for _ in 0..n {
        let Reply { id, outcome } = answers.next().await.expect("the queue never ends");
        let id = id.expect("every answer names its request");
        assert!(by_id.insert(id, outcome).is_none(), "two replies to {id}");
    }
    by_id
}

#[tokio::test]
async fn replies_from_many_shards_each_answer_their_own_request() {
    let engine = engine(4, 1024);
    let session = engine.session();
    let mut answers = session.take_answers().expect("first take");
    assert!(session.take_answers().is_none(), "taken once only");
    // 64 keys over 4 shards; each lease length names its request.
    for id in 1..=64 {
        submit(&answers, id, try_lock(&format!("key-{id}"), 60_000 + id));
    }
    let grants = replies(&mut answers, 64).await;
    let mut tokens = BTreeMap::new();
    for (id, outcome) in grants {
        match outcome {
            Ok(Okay::Granted(Granted { token, ttl_ms, .. })) => {
                assert_eq!(ttl_ms, 60_000 + id, "reply {id} is another request's");
                tokens.insert(id, token);
            }
            other => panic!("lock {id}: {other:?}"),
        }
    }
    // Each unlock names its grant's token: all succeed only if every
    // token went back under its own request's id.
    for (&id, &token) in &tokens {
        let release = LockOp::Release {
            key: format!("key-{id}"),
            token,
        };
        submit(&answers, 100 + id, Op::Lock(release));
    }
    for (id, outcome) in replies(&mut answers, 64).await {
        assert!(outcome.is_ok(), "unlock {id}: {outcome:?}");
    }
    let free = session
        .execute(Request {
            id: 1,
            op: Op::Lock(LockOp::Inspect {
                key: "key-7".into(),
            }),
        })
        .await;
    match free.outcome {
        Ok(Okay::LockInfo(info)) => assert_eq!(info.holder, None),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_mailbox_refuses_exactly_the_requests_past_its_bound() {
    let engine = engine(1, 2);
    let session = engine.session();
    let mut answers = session.take_answers().expect("first take");
    // On one thread the shard cannot run before we wait: the first two
    // fill its mailbox, the other eight find it full.
    for id in 0..10 {
        submit(&answers, id, Op::Lock(LockOp::Inspect { key: "k".into() }));
    }
    let outcomes = replies(&mut answers, 10).await;
    for (id, outcome) in outcomes {
        if id < 2 {
            assert!(outcome.is_ok(), "{id}: {outcome:?}");
        } else {
            let code = outcome.expect_err("past the bound").code;
            assert_eq!(code, ErrorCode::Overloaded, "{id}");
        }
    }
    // The refused ids are free again, and the mailbox has room.
    submit(&answers, 5, Op::Lock(LockOp::Inspect { key: "k".into() }));
    assert!(replies(&mut answers, 1).await[&5].is_ok());
}

#[tokio::test]
async fn a_request_that_needs_more_than_its_shard_is_given_back() {
    let engine = engine(2, 1024);
    let session = engine.session();
    let answers = session.take_answers().expect("first take");
    let waits = Op::Lock(LockOp::Acquire(Acquire {
        wait: Wait::from_wait_ms(Some(1_000)),
        ..acquire("k")
    }));
    let notifies = Op::Lock(LockOp::Acquire(Acquire {
        notify: true,
        ..acquire("k")
    }));
    for op in [waits, notifies, Op::Ping] {
        let request = Request { id: 1, op };
        let given_back = answers.submit(request.clone(), Instant::now());
        assert_eq!(given_back.map_err(|r| r.op), Err(request.op));
    }
    // An id in flight is given back, and `execute` refuses it as ever.
    submit(&answers, 3, try_lock("k", 1_000));
    let again = Request {
        id: 3,
        op: try_lock("other", 1_000),
    };
    let again = answers
        .submit(again, Instant::now())
        .expect_err("id 3 is in flight");
    let reply = session.execute(again).await;
    let code = reply.outcome.expect_err("a duplicate id").code;
    assert_eq!(code, ErrorCode::BadRequest);
    // Once shutting down, every request goes to `execute`, which says so.
    engine.shutdown().await;
    let late = Request {
        id: 4,
        op: try_lock("late", 1_000),
    };
    let late = answers
        .submit(late, Instant::now())
        .expect_err("the engine stopped");
    let code = session
        .execute(late)
        .await
        .outcome
        .expect_err("stopped")
        .code;
    assert_eq!(code, ErrorCode::ShuttingDown);
}

fn acquire(key: &str) -> Acquire {
    Acquire {
        key: key.into(),
        ttl_ms: 1_000,
        wait: Wait::Never,
        ephemeral: false,
        mode: Mode::MUTEX,
        lock_delay_ms: 0,
        notify: false,
    }
}

/// Every value recorded into any histogram, in order.
#[derive(Debug, Default, Clone)]
struct Recorded(std::sync::Arc<std::sync::Mutex<Vec<f64>>>);

impl metrics::HistogramFn for Recorded {
    fn record(&self, value: f64) {
        self.0.lock().expect("not poisoned").push(value);
    }
}

impl metrics::Recorder for Recorded {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::from_arc(std::sync::Arc::new(self.clone()))
    }
}

/// A submitted request's duration runs from when it was read to when its
/// answer is taken, for each batch of answers anew: the clock is read once
/// per batch, and a later batch must not reuse an earlier one's time.
#[test]
fn a_duration_runs_from_the_read_to_the_answer_taken_in_each_batch() {
    let recorded = Recorded::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorded, || {
        runtime.block_on(async {
            let engine = engine(1, 1024);
            let session = engine.session();
            let mut answers = session.take_answers().expect("first take");
            let read_at = Instant::now();
            tokio::time::advance(std::time::Duration::from_millis(50)).await;
            answers
                .submit(
                    Request {
                        id: 1,
                        op: try_lock("a", 1_000),
                    },
                    read_at,
                )
                .unwrap();
            answers
                .submit(
                    Request {
                        id: 2,
                        op: try_lock("b", 1_000),
                    },
                    read_at,
                )
                .unwrap();
            replies(&mut answers, 2).await;
            let read_at = Instant::now();
            tokio::time::advance(std::time::Duration::from_millis(30)).await;
            answers
                .submit(
                    Request {
                        id: 3,
                        op: try_lock("c", 1_000),
                    },
                    read_at,
                )
                .unwrap();
            replies(&mut answers, 1).await;
        });
    });
    let durations = recorded.0.lock().expect("not poisoned").clone();
    assert_eq!(durations.len(), 3, "{durations:?}");
    assert!(durations[..2].iter().all(|&d| d >= 0.050), "{durations:?}");
    assert!((0.030..0.050).contains(&durations[2]), "{durations:?}");
}
