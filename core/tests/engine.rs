//! The actor runtime: sessions, routing, deadlines on tokio's clock,
//! cancellation, connection close, back-pressure and shutdown.

use std::time::Duration;

use deadbolt_core::proto::{
    Acquire, ErrorCode, Granted, Keys, LockInfo, LockOp, Mode, Okay, Op, Outcome, Request, SetOp,
    Wait,
};
use deadbolt_core::{Engine, EngineConfig, Limits, Session};
use tokio::time::Instant;

fn engine(shards: usize) -> Engine {
    Engine::start(EngineConfig {
        shards,
        ..EngineConfig::new()
    })
}

/// One shard whose mailbox admits `mailbox_len` waiting requests.
fn one_shard_with_mailbox(mailbox_len: usize) -> Engine {
    Engine::start(EngineConfig {
        shards: 1,
        limits: Limits {
            mailbox_len,
            ..Limits::default()
        },
        ..EngineConfig::new()
    })
}

async fn call(session: &Session, id: u64, op: Op) -> Outcome {
    let reply = session.execute(Request { id, op }).await;
    assert_eq!(reply.id, Some(id));
    reply.outcome
}

fn lock_op(key: &str, ttl_ms: u64, wait_ms: Option<u64>, ephemeral: bool) -> Op {
    Op::Lock(LockOp::Acquire(Acquire {
        key: key.into(),
        ttl_ms,
        wait: Wait::from_wait_ms(wait_ms),
        ephemeral,
        mode: Mode::MUTEX,
        lock_delay_ms: 0,
        notify: false,
    }))
}

async fn token(session: &Session, key: &str, ttl_ms: u64) -> u64 {
    match call(session, 1, lock_op(key, ttl_ms, None, false)).await {
        Ok(Okay::Granted(Granted { token, .. })) => token,
        other => panic!("expected a grant, got {other:?}"),
    }
}

async fn inspect(session: &Session, key: &str) -> LockInfo {
    match call(session, 99, Op::Lock(LockOp::Inspect { key: key.into() })).await {
        Ok(Okay::LockInfo(info)) => info,
        other => panic!("{other:?}"),
    }
}

fn code(outcome: Outcome) -> ErrorCode {
    outcome.expect_err("expected an error").code
}

/// What the engine says its name is: `deadbolt/<version>` (SPEC section 4).
const SERVER: &str = concat!("deadbolt/", env!("CARGO_PKG_VERSION"));

/// Asks `condition` again until it holds, so that a regression fails with
/// `what` instead of hanging the suite.
async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let settled = async {
        while !condition().await {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), settled)
        .await
        .unwrap_or_else(|_| panic!("not within 10 s: {what}"));
}

#[tokio::test]
async fn a_session_locks_and_unlocks_through_the_engine() {
    let engine = engine(2);
    let session = engine.session();
    let token = token(&session, "k", 1000).await;
    let unlock = Op::Lock(LockOp::Release {
        key: "k".into(),
        token,
    });
    assert_eq!(call(&session, 2, unlock).await, Ok(Okay::EMPTY));
    assert_eq!(inspect(&session, "k").await.holder, None);
}

#[tokio::test]
async fn ping_answers_empty() {
    let engine = engine(1);
    assert_eq!(call(&engine.session(), 5, Op::Ping).await, Ok(Okay::EMPTY));
}

#[tokio::test]
async fn hello_binds_the_client_id_so_a_reconnected_client_keeps_its_lock() {
    let engine = engine(2);
    let first = engine.session();
    let hello = Op::Hello {
        client: "worker-7".into(),
        auth: None,
    };
    match call(&first, 1, hello.clone()).await {
        Ok(Okay::Hello(reply)) => {
            assert_eq!(reply.client, "worker-7");
            assert_eq!(reply.server, SERVER);
        }
        other => panic!("{other:?}"),
    }
    let granted = token(&first, "k", 10_000).await;
    drop(first);
    let second = engine.session();
    call(&second, 1, hello).await.unwrap();
    assert_eq!(token(&second, "k", 10_000).await, granted);
    assert_eq!(
        inspect(&second, "k").await.holder.map(|h| h.client),
        Some("worker-7".into())
    );
}

#[tokio::test]
async fn sessions_without_hello_get_distinct_anonymous_ids() {
    let engine = engine(1);
    let (a, b) = (engine.session(), engine.session());
    assert_ne!(a.client(), b.client());
    for id in [a.client(), b.client()] {
        let random = id.strip_prefix("anon-").unwrap_or_else(|| panic!("{id}"));
        assert_eq!(random.len(), 32, "128 random bits in hex: {id}");
        assert!(
            random.bytes().all(|b| b.is_ascii_hexdigit()),
            "128 random bits in hex: {id}"
        );
    }
    token(&a, "k", 10_000).await;
    assert_eq!(
        code(call(&b, 1, lock_op("k", 10, Some(0), false)).await),
        ErrorCode::Busy
    );
}

#[tokio::test]
async fn keys_and_sets_spread_over_shards_and_each_keeps_its_rules() {
    let engine = engine(4);
    let session = engine.session();
    for i in 0..200 {
        token(&session, &format!("key-{i}"), 10_000).await;
    }
    for i in 0..20 {
        let set = format!("set-{i}");
        call(
            &session,
            1,
            Op::Set(SetOp::SetUp {
                set: set.clone(),
                ttl_ms: 10_000,
            }),
        )
        .await
        .unwrap();
        let insert = Op::Set(SetOp::Insert {
            set,
            keys: Keys::One("x".into()),
        });
        call(&session, 2, insert).await.unwrap();
    }
    let stats = engine.stats().await;
    assert_eq!(
        (stats.locks.held, stats.sets.count, stats.sets.members),
        (200, 20, 20)
    );
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_passes_to_the_waiter_within_ten_milliseconds() {
    let engine = engine(2);
    let (holder, waiter) = (engine.session(), engine.session());
    let held = token(&holder, "k", 100).await;
    let started = Instant::now();
    let granted = token(&waiter, "k", 100).await;
    let waited = started.elapsed();
    // The clock is paused: it moves only when every task waits, and then
    // straight to the next timer, here the lease's end. So the wait is
    // exactly the lease (SPEC: within 10 ms of it, never before).
    assert_eq!(waited, Duration::from_millis(100), "granted at {waited:?}");
    assert!(granted > held, "a later grant, {granted}, above {held}");
    let holder_now = inspect(&holder, "k").await.holder.expect("held");
    assert_eq!(
        (holder_now.client, holder_now.token),
        (waiter.client().to_string(), granted),
        "the waiter holds it now"
    );
    let stale = Op::Lock(LockOp::Release {
        key: "k".into(),
        token: held,
    });
    assert_eq!(
        code(call(&holder, 2, stale).await),
        ErrorCode::NotHeld,
        "the expired grant is over"
    );
}

#[tokio::test(start_paused = true)]
async fn once_the_clocks_stop_no_lease_set_or_wait_runs_out() {
    let engine = engine(2);
    let (holder, waiter) = (engine.session(), engine.session());
    let held = token(&holder, "k", 100).await;
    let set_up = Op::Set(SetOp::SetUp {
        set: "s".into(),
        ttl_ms: 100,
    });
    call(&holder, 2, set_up).await.expect("set up");
    let insert = || {
        Op::Set(SetOp::Insert {
            set: "s".into(),
            keys: Keys::One("x".into()),
        })
    };
    call(&holder, 3, insert()).await.expect("inserted");
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move { call(&waiter, 4, lock_op("k", 100, Some(150), false)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // What a graceful shutdown does first: while the frontends drain, no
    // client can renew what it holds, so nothing may run out.
    engine.stop_clocks();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        !waiting.is_finished(),
        "the wait neither timed out nor was granted"
    );
    let info = inspect(&holder, "k").await;
    let still = info.holder.expect("still held");
    assert_eq!((still.token, info.waiters), (held, 1));
    assert_eq!(
        call(&holder, 5, insert()).await,
        Ok(Okay::Inserted(deadbolt_core::proto::Inserted {
            index: 1,
            first: true
        })),
        "the set and its member are still there"
    );
    let stats = engine.stats().await;
    assert_eq!((stats.sets.count, stats.sets.members), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_bounded_wait_times_out_on_the_engine_clock() {
    let engine = engine(1);
    let (holder, waiter) = (engine.session(), engine.session());
    token(&holder, "k", 10_000).await;
    let started = Instant::now();
    let outcome = call(&waiter, 1, lock_op("k", 100, Some(250), false)).await;
    assert_eq!(code(outcome), ErrorCode::Timeout);
    // The clock is paused, so it jumps straight to the wait's deadline.
    assert_eq!(started.elapsed(), Duration::from_millis(250));
    assert_eq!(inspect(&holder, "k").await.waiters, 0, "out of the queue");
}

#[tokio::test]
async fn cancel_answers_the_waiting_request_cancelled() {
    let engine = engine(2);
    let (holder, waiter) = (engine.session(), engine.session());
    token(&holder, "k", 10_000).await;
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move { call(&waiter, 41, lock_op("k", 100, None, false)).await }
    });
    eventually("the lock is waiting", async || {
        inspect(&holder, "k").await.waiters > 0
    })
    .await;
    assert_eq!(
        call(&waiter, 42, Op::Cancel { target: 41 }).await,
        Ok(Okay::EMPTY)
    );
    assert_eq!(code(waiting.await.unwrap()), ErrorCode::Cancelled);
    assert_eq!(inspect(&holder, "k").await.waiters, 0);
    // Cancelling what is not waiting is harmless.
    assert_eq!(
        call(&waiter, 43, Op::Cancel { target: 41 }).await,
        Ok(Okay::EMPTY)
    );
}

#[tokio::test]
async fn dropping_a_waiting_request_takes_it_out_of_the_queue() {
    let engine = engine(2);
    let (holder, waiter) = (engine.session(), engine.session());
    let held = token(&holder, "k", 10_000).await;
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move { call(&waiter, 1, lock_op("k", 100, None, false)).await }
    });
    eventually("the lock is waiting", async || {
        inspect(&holder, "k").await.waiters > 0
    })
    .await;
    waiting.abort();
    let _ = waiting.await;
    // The cancel is a message behind the abort; wait for it to land.
    eventually("the aborted waiter leaves the queue", async || {
        inspect(&holder, "k").await.waiters == 0
    })
    .await;
    let unlock = Op::Lock(LockOp::Release {
        key: "k".into(),
        token: held,
    });
    call(&holder, 2, unlock).await.unwrap();
    assert_eq!(
        inspect(&holder, "k").await.holder,
        None,
        "nobody was granted"
    );
}

#[tokio::test]
async fn dropping_the_last_session_clone_releases_ephemeral_locks_and_waiters() {
    let engine = engine(2);
    let (gone, other) = (engine.session(), engine.session());
    let gone_client = gone.client().to_string();
    call(&gone, 1, lock_op("eph", 10_000, None, true))
        .await
        .unwrap();
    call(&gone, 2, lock_op("kept", 10_000, None, false))
        .await
        .unwrap();
    let other_token = token(&other, "busy", 10_000).await;
    let queued = tokio::spawn({
        let gone = gone.clone();
        async move { call(&gone, 3, lock_op("busy", 100, None, false)).await }
    });
    eventually("the lock is waiting", async || {
        inspect(&other, "busy").await.waiters > 0
    })
    .await;
    queued.abort();
    let _ = queued.await;
    let clone = gone.clone();
    drop(gone);
    assert_eq!(
        inspect(&other, "eph").await.holder.map(|h| h.client),
        Some(gone_client.clone()),
        "a clone keeps it open"
    );
    drop(clone);
    eventually("the ephemeral lock is released", async || {
        inspect(&other, "eph").await.holder.is_none()
    })
    .await;
    let kept = inspect(&other, "kept").await.holder.expect("kept is held");
    assert_eq!(kept.client, gone_client, "still by the gone session");
    assert_eq!(inspect(&other, "busy").await.waiters, 0);
    call(
        &other,
        9,
        Op::Lock(LockOp::Release {
            key: "busy".into(),
            token: other_token,
        }),
    )
    .await
    .unwrap();
    assert_eq!(inspect(&other, "busy").await.holder, None);
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_mailbox_answers_overloaded_at_once() {
    let engine = one_shard_with_mailbox(2);
    let session = engine.session();
    // On one thread the actor cannot run until we yield, so these fill its
    // mailbox; `join_all` polls each once before anything else runs.
    let calls = (0..10).map(|i| call(&session, i, Op::Lock(LockOp::Inspect { key: "k".into() })));
    let outcomes = futures_util::future::join_all(calls).await;
    let overloaded = outcomes
        .iter()
        .filter(|o| matches!(o, Err(e) if e.code == ErrorCode::Overloaded))
        .count();
    assert_eq!(overloaded, 8, "{outcomes:?}");
    assert!(outcomes[..2].iter().all(Result::is_ok));
}

#[tokio::test]
async fn request_ids_are_per_connection_so_a_cancel_touches_only_its_own() {
    let engine = engine(2);
    let (holder, a, b) = (engine.session(), engine.session(), engine.session());
    let held = token(&holder, "k", 60_000).await;
    // Both connections wait on the key under the same request id, 7.
    let spawn_wait = |session: &Session| {
        let session = session.clone();
        tokio::spawn(async move { call(&session, 7, lock_op("k", 1_000, None, false)).await })
    };
    let (waiting_a, waiting_b) = (spawn_wait(&a), spawn_wait(&b));
    eventually("both wait", async || {
        inspect(&holder, "k").await.waiters == 2
    })
    .await;
    // `a` cancels its request 7: only `a`'s waiter leaves the queue.
    call(&a, 8, Op::Cancel { target: 7 }).await.unwrap();
    assert_eq!(code(waiting_a.await.unwrap()), ErrorCode::Cancelled);
    assert_eq!(inspect(&holder, "k").await.waiters, 1);
    let unlock = Op::Lock(LockOp::Release {
        key: "k".into(),
        token: held,
    });
    call(&holder, 2, unlock).await.unwrap();
    match waiting_b.await.unwrap() {
        Ok(Okay::Granted(Granted { token, .. })) => assert!(token > held),
        other => panic!("b's request 7 was not granted: {other:?}"),
    }
}

#[tokio::test]
async fn a_mass_disconnect_fills_no_mailbox_and_still_frees_ephemeral_locks() {
    let engine = one_shard_with_mailbox(2);
    let holder = engine.session();
    match call(&holder, 1, lock_op("eph", 60_000, None, true)).await {
        Ok(Okay::Granted(_)) => {}
        other => panic!("{other:?}"),
    }
    // A hundred connections close at once (the holder's among them): a
    // hundred notices for a mailbox that admits two requests. On one thread
    // the actor cannot run until we yield, so they are all queued before a
    // bystander asks.
    let closing: Vec<Session> = (0..99).map(|_| engine.session()).collect();
    drop(closing);
    drop(holder);
    let bystander = engine.session();
    let info = inspect(&bystander, "eph").await;
    assert_eq!(info.holder, None, "the ephemeral lock was freed");
    let outcome = call(&bystander, 2, lock_op("other", 1_000, Some(0), false)).await;
    assert!(matches!(outcome, Ok(Okay::Granted(_))), "{outcome:?}");
}

#[tokio::test]
async fn shutdown_answers_waiters_and_later_requests_shutting_down() {
    let engine = engine(2);
    let (holder, waiter) = (engine.session(), engine.session());
    token(&holder, "k", 10_000).await;
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move { call(&waiter, 1, lock_op("k", 100, None, false)).await }
    });
    eventually("the lock is waiting", async || {
        inspect(&holder, "k").await.waiters > 0
    })
    .await;
    engine.shutdown().await;
    assert_eq!(code(waiting.await.unwrap()), ErrorCode::ShuttingDown);
    assert_eq!(
        code(call(&holder, 2, lock_op("x", 10, None, false)).await),
        ErrorCode::ShuttingDown
    );
    assert_eq!(
        call(&holder, 3, Op::Ping).await,
        Ok(Okay::EMPTY),
        "the session still answers ping"
    );
}

#[test]
fn tokens_from_the_clock_rise_with_it_and_stay_exact_in_javascript() {
    use std::time::{Duration, UNIX_EPOCH};
    let at = |secs: u64| {
        deadbolt_core::engine::first_token_from_clock(UNIX_EPOCH + Duration::from_secs(secs))
    };
    // 4096 tokens per millisecond since 2026-01-01 (1_767_225_600 s), plus 1.
    assert_eq!(at(0), 1, "before the token epoch: the first token");
    assert_eq!(at(1_767_225_600), 1, "at the token epoch");
    let now_ish = at(1_795_000_000); // late 2026
    // (1_795_000_000_000 - 1_767_225_600_000) ms * 4096 + 1
    assert_eq!(now_ish, 113_763_942_400_001);
    assert_eq!(
        at(1_795_000_001),
        now_ish + 4096 * 1000,
        "a second later starts 4096 tokens per ms higher"
    );
    // The last second whose tokens a JavaScript number holds exactly:
    // 2095-09-07T15:47:35Z, as the docs say ("below 2^53 until 2095").
    let last_exact = at(3_966_248_855);
    assert!(last_exact < 1 << 53, "{last_exact}");
    assert_eq!(at(3_966_248_856), last_exact + 4096 * 1000);
    assert!(at(3_966_248_856) > 1 << 53);
    // Past 2^53 tokens keep rising at the same rate: no wrap, no clamp.
    let late = at(4_000_000_000); // 2096
    assert_eq!(late, 9_145_443_942_400_001);
    assert!(late > 1 << 53);
}

#[tokio::test]
async fn stats_report_counters_connections_and_bounded_top_lists() {
    use deadbolt_core::engine::Frontend;
    let engine = engine(2);
    let (a, b) = (
        engine.session_on(Frontend::WebSocket),
        engine.session_on(Frontend::Quic),
    );
    for i in 0..30 {
        token(&a, &format!("k{i}"), 10_000).await;
    }
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { call(&b, 7, lock_op("k3", 100, None, false)).await }
    });
    eventually("the lock is waiting", async || {
        inspect(&a, "k3").await.waiters > 0
    })
    .await;
    call(
        &a,
        1,
        Op::Set(SetOp::SetUp {
            set: "big".into(),
            ttl_ms: 60_000,
        }),
    )
    .await
    .unwrap();
    call(
        &a,
        2,
        Op::Set(SetOp::Insert {
            set: "big".into(),
            keys: Keys::Many(vec!["x".into(), "y".into()]),
        }),
    )
    .await
    .unwrap();
    call(
        &a,
        3,
        Op::Set(SetOp::SetUp {
            set: "small".into(),
            ttl_ms: 60_000,
        }),
    )
    .await
    .unwrap();
    let stats = match call(&a, 9, Op::Stats { top: 5 }).await {
        Ok(Okay::Stats(stats)) => *stats,
        other => panic!("{other:?}"),
    };
    assert_eq!(stats.connections.get("websocket"), Some(&1));
    assert_eq!(stats.connections.get("quic"), Some(&1));
    assert_eq!(
        (stats.locks.held, stats.locks.waiters, stats.locks.grants),
        (30, 1, 30)
    );
    assert_eq!(stats.held.len(), 5, "bounded by top");
    assert_eq!(stats.held[0].key, "k3", "most waited-for first");
    assert_eq!(
        stats
            .contended
            .iter()
            .map(|h| (h.key.as_str(), h.waiters))
            .collect::<Vec<_>>(),
        [("k3", 1)]
    );
    assert_eq!(
        stats
            .largest_sets
            .iter()
            .map(|s| (s.set.as_str(), s.size))
            .collect::<Vec<_>>(),
        [("big", 2), ("small", 0)]
    );
    assert_eq!(
        (stats.sets.count, stats.sets.members, stats.sets.inserts_new),
        (2, 2, 2)
    );
    assert_eq!(stats.server, SERVER);
    waiting.abort();
    drop(b);
    let after = match call(&a, 10, Op::Stats { top: 1 }).await {
        Ok(Okay::Stats(stats)) => *stats,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        after.connections.get("quic"),
        Some(&0),
        "closed sessions are not counted"
    );
}

#[tokio::test(start_paused = true)]
async fn top_lists_are_shared_for_a_moment_while_counters_stay_current() {
    use deadbolt_core::engine::TOP_LISTS_MAX_AGE;
    let engine = engine(2);
    let session = engine.session();
    let first = token(&session, "first", 60_000).await;
    let before = engine.snapshot(10).await;
    assert_eq!(before.held.len(), 1);
    token(&session, "second", 60_000).await;
    let soon = engine.snapshot(5).await;
    assert_eq!(soon.locks.held, 2, "counters are current");
    assert_eq!(soon.held.len(), 1, "the lists gathered a moment ago");
    let unlock = Op::Lock(LockOp::Release {
        key: "first".into(),
        token: first,
    });
    call(&session, 2, unlock).await.unwrap();
    tokio::time::sleep(TOP_LISTS_MAX_AGE).await;
    let later = engine.snapshot(5).await;
    let keys: Vec<&str> = later.held.iter().map(|h| h.key.as_str()).collect();
    assert_eq!(keys, ["second"], "gathered again once they were old");
    token(&session, "third", 60_000).await;
    let wider = engine.snapshot(50).await;
    assert_eq!(
        wider.held.len(),
        1,
        "a longer list comes from the same recent gather: asking for another `top` does not bypass it"
    );
    tokio::time::sleep(TOP_LISTS_MAX_AGE).await;
    assert_eq!(engine.snapshot(50).await.held.len(), 2);
}

#[tokio::test]
async fn a_request_id_already_in_flight_is_refused_and_the_original_goes_on() {
    let engine = engine(2);
    let (holder, session) = (engine.session(), engine.session());
    let held = token(&holder, "k", 60_000).await;
    let waiting = tokio::spawn({
        let session = session.clone();
        async move { call(&session, 5, lock_op("k", 1000, None, false)).await }
    });
    eventually("the lock is waiting", async || {
        inspect(&holder, "k").await.waiters > 0
    })
    .await;
    for _ in 0..2 {
        assert_eq!(
            code(call(&session, 5, Op::Ping).await),
            ErrorCode::BadRequest
        );
    }
    let unlock = Op::Lock(LockOp::Release {
        key: "k".into(),
        token: held,
    });
    call(&holder, 2, unlock).await.unwrap();
    match waiting.await.unwrap() {
        Ok(Okay::Granted(Granted { token, .. })) => {
            assert!(token > held, "a later grant, {token}, above {held}");
        }
        other => panic!("the original request is granted, not {other:?}"),
    }
    assert_eq!(
        call(&session, 5, Op::Ping).await,
        Ok(Okay::EMPTY),
        "free again"
    );
}
