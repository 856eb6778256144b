//! Time to close connections that hold an ephemeral lock, in a shard that
//! also holds a million plain locks: closing must cost what the connection
//! touched, not what the shard holds.
//!
//! `cargo run --release -p deadbolt-core --example close_cost`
use std::time::Instant;

use deadbolt_core::proto::{Acquire, LockOp, Mode, Op, Request, Wait};
use deadbolt_core::{Engine, EngineConfig, Session};

async fn lock(session: &Session, key: String, ephemeral: bool) {
    let acquire = Acquire {
        key,
        ttl_ms: 86_400_000,
        wait: Wait::Never,
        ephemeral,
        mode: Mode::MUTEX,
        lock_delay_ms: 0,
        notify: false,
    };
    let reply = session
        .execute(Request {
            id: 1,
            op: Op::Lock(LockOp::Acquire(acquire)),
        })
        .await;
    assert!(reply.outcome.is_ok());
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let engine = Engine::start(EngineConfig {
        shards: 1,
        ..EngineConfig::new()
    });
    let plain = engine.session();
    for i in 0..1_000_000u64 {
        lock(&plain, format!("{i:016x}"), false).await;
    }
    let started = Instant::now();
    let rounds = 200;
    for i in 0..rounds {
        let session = engine.session();
        lock(&session, format!("eph-{i}"), true).await;
        drop(session);
    }
    // A request after the closes waits for them all in the shard's mailbox.
    lock(&plain, "last".into(), false).await;
    let per = started.elapsed() / rounds;
    println!("connect + ephemeral lock + close, 1M locks held: {per:?} per connection");
}
