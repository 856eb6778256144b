//! Bytes of memory per distinct-set member and per held lock, measured as
//! the growth of this process's resident set while the engine holds a
//! million of them. Each measurement runs in a fresh child process so that
//! one does not inherit the other's heap.
//!
//! `cargo run --release -p deadbolt-core --example memory -- [count]`

use std::process::Command;

use deadbolt_core::proto::{Acquire, Keys, LockOp, Mode, Op, Request, SetOp, Wait};
use deadbolt_core::{Engine, EngineConfig, Session};

const KEY_BYTES: usize = 16;

/// A 16-byte key, unique per `i`.
fn key(i: u64) -> String {
    format!("{i:016x}")
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("resident pages");
    pages * 4096
}

async fn execute(session: &Session, op: Op) {
    let reply = session.execute(Request { id: 1, op }).await;
    assert!(reply.outcome.is_ok(), "{:?}", reply.outcome);
}

async fn fill_set(session: &Session, count: u64) {
    let set = "memory".to_owned();
    execute(
        session,
        Op::Set(SetOp::SetUp {
            set: set.clone(),
            ttl_ms: 86_400_000,
        }),
    )
    .await;
    for batch in (0..count).collect::<Vec<_>>().chunks(10_000) {
        let keys = Keys::Many(batch.iter().map(|&i| key(i)).collect());
        execute(
            session,
            Op::Set(SetOp::Insert {
                set: set.clone(),
                keys,
            }),
        )
        .await;
    }
}

async fn hold_locks(session: &Session, count: u64) {
    for i in 0..count {
        let acquire = Acquire {
            key: key(i),
            ttl_ms: 86_400_000,
            wait: Wait::Never,
            ephemeral: false,
            mode: Mode::MUTEX,
            lock_delay_ms: 0,
            notify: false,
        };
        execute(session, Op::Lock(LockOp::Acquire(acquire))).await;
    }
}

fn measure(what: &str, count: u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let engine = Engine::start(EngineConfig {
            shards: 1,
            ..EngineConfig::new()
        });
        let session = engine.session();
        execute(&session, Op::Ping).await;
        let before = resident_bytes();
        match what {
            "set" => fill_set(&session, count).await,
            _ => hold_locks(&session, count).await,
        }
        let stats = engine.stats().await;
        let after = resident_bytes();
        let per = (after - before) as f64 / count as f64;
        println!(
            "| {what} | {count} | {:.1} MiB | {per:.1} | {:.1} |",
            (after - before) as f64 / (1 << 20) as f64,
            per - KEY_BYTES as f64
        );
        assert!(stats.sets.members == count || stats.locks.held == count);
    });
}

fn main() {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if let Some(what @ ("set" | "locks")) = first.as_deref() {
        let count = args
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1_000_000);
        measure(what, count);
        return;
    }
    let count = first.unwrap_or_else(|| "1000000".to_owned());
    println!("resident-set growth with {KEY_BYTES}-byte keys (system allocator)");
    println!("| what | entries | RSS growth | bytes/entry | bytes/entry beyond the key |");
    println!("|---|---:|---:|---:|---:|");
    let me = std::env::current_exe().expect("own path");
    for what in ["set", "locks"] {
        let status = Command::new(&me)
            .args([what, &count])
            .status()
            .expect("child");
        assert!(status.success());
    }
}
