//! Lock+unlock pairs per second through the `Engine` handle alone: no
//! network, no encoding, just sessions, shard mailboxes and the state
//! machines. Prints a table; asserts nothing.
//!
//! `cargo run --release -p deadbolt-core --example engine_bench -- [seconds] [shards] [auth]`
//!
//! With `auth`, the engine authenticates (SPEC section 10): every session
//! says `hello` with a principal's secret first, and every request is
//! checked against its grants and quotas.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use deadbolt_core::auth::{Auth, Policy, Principal, Quotas};
use deadbolt_core::proto::{Acquire, Granted, LockOp, Mode, Okay, Op, Request, Secret, Wait};

/// The one principal's secret, with `auth`.
const SECRET: &str = "bench-secret";

/// One principal that may lock every key, with room for every task's
/// grants.
fn auth() -> Arc<Auth> {
    let principal = Principal {
        name: "bench".into(),
        secret: Secret::new(SECRET),
        locks: vec![String::new()],
        sets: vec![],
        read: vec![],
        admin: false,
        quotas: Quotas::default(),
    };
    Arc::new(Auth::new(Policy::new(vec![principal]).expect("a policy")))
}
use deadbolt_core::{Engine, EngineConfig, Session};

/// Keys each task cycles through: far more than tasks, so pairs are
/// uncontended, as in the benchmark harness's first scenario.
const KEYS_PER_TASK: u64 = 16_384;

async fn one_pair(session: &Session, key: String) {
    let lock = Op::Lock(LockOp::Acquire(Acquire {
        key: key.clone(),
        ttl_ms: 30_000,
        wait: Wait::Never,
        ephemeral: false,
        mode: Mode::MUTEX,
        lock_delay_ms: 0,
        notify: false,
    }));
    let reply = session.execute(Request { id: 1, op: lock }).await;
    let Ok(Okay::Granted(Granted { token, .. })) = reply.outcome else {
        panic!("lock failed: {:?}", reply.outcome);
    };
    let unlock = Op::Lock(LockOp::Release { key, token });
    let reply = session.execute(Request { id: 2, op: unlock }).await;
    assert!(reply.outcome.is_ok(), "unlock failed: {:?}", reply.outcome);
}

async fn run(engine: &Engine, tasks: u64, seconds: f64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let pairs = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for task in 0..tasks {
        let (session, stop, pairs) = (engine.session(), stop.clone(), pairs.clone());
        handles.push(tokio::spawn(async move {
            let hello = Op::Hello {
                client: format!("bench-{task}"),
                auth: Some(Secret::new(SECRET)),
            };
            let reply = session.execute(Request { id: 1, op: hello }).await;
            assert!(reply.outcome.is_ok(), "hello failed: {:?}", reply.outcome);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                one_pair(&session, format!("bench/{task}/{}", n % KEYS_PER_TASK)).await;
                n += 1;
            }
            pairs.fetch_add(n, Ordering::Relaxed);
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for handle in handles {
        handle.await.expect("bench task");
    }
    pairs.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let shards: Option<usize> = std::env::args().nth(2).and_then(|s| s.parse().ok());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let mut config = EngineConfig::new();
        config.shards = shards.unwrap_or(config.shards);
        if std::env::args().nth(3).as_deref() == Some("auth") {
            config.auth = Some(auth());
        }
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        println!(
            "engine: {} shards, {workers} runtime workers, {seconds} s per row, auth {}",
            config.shards,
            if config.auth.is_some() { "on" } else { "off" }
        );
        let engine = Engine::start(config);
        println!("| concurrent tasks | lock+unlock pairs/s | mean pair latency |");
        println!("|---:|---:|---:|");
        for tasks in [1u64, 64] {
            let rate = run(&engine, tasks, seconds).await;
            let latency_us = tasks as f64 / rate * 1e6;
            println!("| {tasks} | {rate:.0} | {latency_us:.1} µs |");
        }
        engine.shutdown().await;
    });
}
