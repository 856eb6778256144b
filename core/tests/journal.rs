//! The engine's shards are functions of their command logs: a journal that
//! records every batch, replayed into fresh shards with another hash seed,
//! reaches the very state each live shard had when it stopped. The workload
//! exercises every kind of command the driver makes: ops, cancels,
//! requesters that give up mid-wait, undeliverable grants, closed
//! connections and expiries.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadbolt_core::engine::{Append, InvariantAlarm, Journal};
use deadbolt_core::proto::{
    Acquire, Granted, Keys, LockOp, Mode, Okay, Op, Request, ServerError, SetOp, Wait,
};
use deadbolt_core::shard::{Command, Input, Shard, ShardConfig};
use deadbolt_core::{Engine, EngineConfig, Session};

/// Every batch each shard applied, and the digest each reported at stop.
#[derive(Default)]
struct Recorder {
    commands: Mutex<Vec<Vec<Command>>>,
    stopped: Mutex<Vec<Option<u64>>>,
}

#[async_trait::async_trait]
impl Journal for Recorder {
    fn append(&self, shard: usize, _number: u64, commands: &[Command]) -> Append {
        let mut all = self.commands.lock().expect("recorder");
        if all.len() <= shard {
            all.resize_with(shard + 1, Vec::new);
        }
        all[shard].extend_from_slice(commands);
        Box::pin(std::future::ready(Ok(())))
    }

    fn stopped(&self, shard: usize, digest: u64) {
        let mut stopped = self.stopped.lock().expect("recorder");
        if stopped.len() <= shard {
            stopped.resize(shard + 1, None);
        }
        stopped[shard] = Some(digest);
    }
}

/// A tiny deterministic generator, so the workload is the same every run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

const KEYS: [&str; 4] = ["a", "b", "c", "d"];
const SETS: [&str; 2] = ["s", "t"];

fn random_op(rng: &mut Lcg) -> Op {
    let key = KEYS[rng.below(4) as usize].to_owned();
    let set = SETS[rng.below(2) as usize].to_owned();
    match rng.below(10) {
        0..=4 => Op::Lock(LockOp::Acquire(Acquire {
            key,
            ttl_ms: 1 + rng.below(60),
            wait: Wait::from_wait_ms(
                [None, Some(0), Some(1 + rng.below(40))][rng.below(3) as usize],
            ),
            ephemeral: rng.below(3) == 0,
            mode: Mode::MUTEX,
            lock_delay_ms: 0,
            notify: false,
        })),
        5 => Op::Lock(LockOp::Release {
            key,
            // Tokens start at 1: small numbers name real grants often.
            token: 1 + rng.below(40),
        }),
        6 => Op::Lock(LockOp::Extend {
            key,
            token: 1 + rng.below(40),
            ttl_ms: 1 + rng.below(60),
        }),
        7 => Op::Set(SetOp::SetUp {
            set,
            ttl_ms: 1 + rng.below(200),
        }),
        _ => Op::Set(SetOp::Insert {
            set,
            keys: Keys::One(format!("m{}", rng.below(6))),
        }),
    }
}

/// Sends one request from a task of its own; some give up after a random
/// wait (their future is dropped: the driver must say "requester gone").
fn spawn_request(session: Session, id: u64, op: Op, give_up_ms: Option<u64>) {
    tokio::spawn(async move {
        let request = session.execute(Request { id, op });
        match give_up_ms {
            Some(ms) => {
                let _ = tokio::time::timeout(Duration::from_millis(ms), request).await;
            }
            None => {
                request.await;
            }
        }
    });
}

#[tokio::test(start_paused = true)]
async fn replaying_the_journal_reaches_each_shards_final_state() {
    let recorder = Arc::new(Recorder::default());
    let broken: Arc<Mutex<Vec<String>>> = Arc::default();
    let alarm_sink = Arc::clone(&broken);
    let alarm: InvariantAlarm = Arc::new(move |shard, what| {
        alarm_sink
            .lock()
            .expect("alarm")
            .push(format!("shard {shard}: {what}"));
    });
    let config = EngineConfig {
        shards: 3,
        journal: Some(recorder.clone()),
        invariant_alarm: Some(alarm),
        ..EngineConfig::new()
    };
    let engine = Engine::start(config.clone());
    let mut rng = Lcg(42);
    let mut sessions: Vec<Session> = (0..6).map(|_| engine.session()).collect();
    let mut next_id = 1;
    for _ in 0..2_000 {
        match rng.below(20) {
            0 => {
                // A connection closes (its pending requests stay with their
                // tasks until answered) and a new one takes its place.
                let victim = rng.below(sessions.len() as u64) as usize;
                sessions[victim] = engine.session();
            }
            1..=2 => tokio::time::sleep(Duration::from_millis(rng.below(30))).await,
            _ => {
                let session = sessions[rng.below(sessions.len() as u64) as usize].clone();
                let give_up = (rng.below(4) == 0).then(|| rng.below(20));
                next_id += 1;
                spawn_request(session, next_id, random_op(&mut rng), give_up);
                tokio::task::yield_now().await;
            }
        }
    }
    drop(sessions);
    tokio::time::sleep(Duration::from_secs(1)).await;
    engine.shutdown().await;

    assert_eq!(broken.lock().expect("alarm").as_slice(), &[] as &[String]);
    let commands = recorder.commands.lock().expect("recorder");
    let stopped = recorder.stopped.lock().expect("recorder");
    assert_eq!(stopped.len(), 3, "every shard reported its final digest");
    let kinds = count_kinds(&commands);
    assert!(
        kinds.iter().all(|&n| n > 0),
        "the workload made every kind of command (op, cancel-free gone, closed, tick): {kinds:?}"
    );
    for (shard, log) in commands.iter().enumerate() {
        let mut replica = Shard::new(ShardConfig {
            hash_seed: 0xfeed,
            first_token: config.first_token,
            limits: config.limits.share_of(config.shards),
        });
        for command in log {
            replica.apply(command.clone());
        }
        assert_eq!(
            Some(replica.digest()),
            stopped[shard],
            "shard {shard}: a replay of {} commands reached another state",
            log.len()
        );
    }
}

/// How many ops, requester-gone notices, connection closes and ticks the
/// logs hold.
fn count_kinds(logs: &[Vec<Command>]) -> [usize; 4] {
    let mut kinds = [0; 4];
    for command in logs.iter().flatten() {
        let kind = match command.input {
            Input::Op { .. } => 0,
            Input::RequesterGone { .. } => 1,
            Input::ConnectionClosed { .. } => 2,
            Input::Tick => 3,
            Input::Cancel { .. } | Input::Restart { .. } => continue,
        };
        kinds[kind] += 1;
    }
    kinds
}

/// A journal on a disk that may be full: while it is, every batch is
/// refused (kept nowhere); otherwise batches are kept in order.
#[derive(Default)]
struct FillingDisk {
    full: AtomicBool,
    kept: Mutex<Vec<Command>>,
}

impl Journal for FillingDisk {
    fn append(&self, _shard: usize, _number: u64, commands: &[Command]) -> Append {
        if self.full.load(Ordering::SeqCst) {
            let refused = Err(ServerError::unavailable("the disk is full"));
            return Box::pin(std::future::ready(refused));
        }
        self.kept.lock().expect("disk").extend_from_slice(commands);
        Box::pin(std::future::ready(Ok(())))
    }
}

fn lock_k(ttl_ms: u64) -> Op {
    Op::Lock(LockOp::Acquire(Acquire::mutex("k", ttl_ms, Wait::Forever)))
}

async fn granted_token(session: &Session, id: u64, op: Op) -> u64 {
    match session.execute(Request { id, op }).await.outcome {
        Ok(Okay::Granted(Granted { token, .. })) => token,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// SPEC section 2: a waiter whose requester has gone leaves the queue and is
/// never granted; section 8: a full disk changes nothing. The notice that
/// the requester left reaches the shard while the disk is full, so its
/// batch is refused and the notice is logged again later. It must still
/// take effect at the time it came, ahead of the lease that ran out after
/// it and of every command that came after it (simulation seed 4753 of
/// 10,000: such a waiter was granted by the first command after the disk
/// had room again, then released by the notice logged behind it).
#[tokio::test(start_paused = true)]
async fn a_requester_that_left_while_the_disk_was_full_is_never_granted_after() {
    let disk = Arc::new(FillingDisk::default());
    let engine = Engine::start(EngineConfig {
        shards: 1,
        journal: Some(disk.clone()),
        ..EngineConfig::new()
    });
    let holder = engine.session();
    let first = granted_token(&holder, 1, lock_k(300)).await;
    let waiter = engine.session();
    let waiting = tokio::spawn(async move {
        let _ = waiter
            .execute(Request {
                id: 1,
                op: lock_k(1_000),
            })
            .await;
    });
    tokio::time::sleep(Duration::from_millis(50)).await;

    disk.full.store(true, Ordering::SeqCst);
    // The waiter gives up at 50 ms; the holder's lease runs out at 300 ms.
    waiting.abort();
    tokio::time::sleep(Duration::from_millis(450)).await;
    disk.full.store(false, Ordering::SeqCst);

    let next = engine.session();
    let token = granted_token(&next, 1, lock_k(1_000)).await;
    assert_eq!(
        token,
        first + 1,
        "the key's next grant is the new request's: the waiter that left was never granted"
    );
    engine.shutdown().await;
    let kept = disk.kept.lock().expect("disk");
    let gone = kept
        .iter()
        .position(|c| matches!(c.input, Input::RequesterGone { .. }))
        .expect("the notice was logged once the disk had room");
    assert_eq!(
        kept[gone].at.0, 50_000,
        "stamped when it came, not when it was logged"
    );
}
