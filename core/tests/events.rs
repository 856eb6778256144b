//! Pushed events in the engine (SPEC section 7), below the transports: a
//! session's queue, what it carries, and its bounds.

use std::time::Duration;

use deadbolt_core::engine::events::Pushed;
use deadbolt_core::proto::{ErrorCode, LockOp, Okay, Op, Outcome, Request, Watched};
use deadbolt_core::{Engine, EngineConfig, Limits, Session};

fn engine(limits: Limits) -> Engine {
    Engine::start(EngineConfig {
        limits,
        ..EngineConfig::new()
    })
}

async fn call(session: &Session, id: u64, op: Op) -> Outcome {
    session.execute(Request { id, op }).await.outcome
}

fn lock(key: &str, ttl_ms: u64) -> Op {
    Op::Lock(LockOp::Acquire(deadbolt_core::proto::Acquire::mutex(
        key,
        ttl_ms,
        deadbolt_core::proto::Wait::Never,
    )))
}

fn watch_key(key: &str) -> Op {
    Op::Watch {
        target: Watched::Key(key.to_owned()),
    }
}

fn token(outcome: Outcome) -> u64 {
    match outcome {
        Ok(Okay::Granted(granted)) => granted.token,
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[tokio::test]
async fn a_connection_whose_transport_reads_no_events_cannot_subscribe() {
    let engine = engine(Limits::default());
    let session = engine.session();
    let refused = call(&session, 1, watch_key("k")).await;
    assert_eq!(refused.expect_err("refused").code, ErrorCode::BadRequest);
    let mut notify = lock("k", 30_000);
    if let Op::Lock(LockOp::Acquire(acquire)) = &mut notify {
        acquire.notify = true;
    }
    let refused = call(&session, 2, notify).await;
    assert_eq!(refused.expect_err("refused").code, ErrorCode::BadRequest);
    let other = engine.session();
    let info = call(&other, 1, Op::Lock(LockOp::Inspect { key: "k".into() })).await;
    match info {
        Ok(Okay::LockInfo(info)) => assert!(info.holder.is_none(), "nothing was granted"),
        other => panic!("{other:?}"),
    }
    engine.shutdown().await;
}

#[tokio::test]
async fn a_queue_not_read_past_its_bound_says_overflow() {
    let engine = engine(Limits {
        event_bytes_max: 1024,
        ..Limits::default()
    });
    let watcher = engine.session();
    let mut events = watcher.take_events().expect("the queue");
    assert!(watcher.take_events().is_none(), "taken once");
    assert_eq!(call(&watcher, 1, watch_key("k")).await, Ok(Okay::EMPTY));
    let worker = engine.session();
    // Each grant and release is an event of about 70 bytes: 20 of them
    // pass 1 KiB while nobody reads.
    for id in 0..20 {
        let token = token(call(&worker, id * 2, lock("k", 30_000)).await);
        let unlock = Op::Lock(LockOp::Release {
            key: "k".into(),
            token,
        });
        assert_eq!(call(&worker, id * 2 + 1, unlock).await, Ok(Okay::EMPTY));
    }
    let pushed = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("in time");
    assert!(
        matches!(pushed, Some(Pushed::Overflow)),
        "the transport is told to drop the connection: {pushed:?}"
    );
    engine.shutdown().await;
}

#[tokio::test]
async fn events_come_in_order_and_a_cancel_ends_them() {
    let engine = engine(Limits::default());
    let watcher = engine.session();
    let mut events = watcher.take_events().expect("the queue");
    assert_eq!(call(&watcher, 7, watch_key("k")).await, Ok(Okay::EMPTY));
    let worker = engine.session();
    let token = token(call(&worker, 1, lock("k", 30_000)).await);
    let unlock = Op::Lock(LockOp::Release {
        key: "k".into(),
        token,
    });
    call(&worker, 2, unlock).await.expect("unlocked");
    let mut texts = Vec::new();
    for _ in 0..2 {
        match events.next().await {
            Some(Pushed::Event { id, text, .. }) => {
                assert_eq!(id, 7);
                texts.push(text);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        texts,
        [
            format!(r#"{{"id":7,"event":"granted","key":"k","token":{token}}}"#),
            format!(r#"{{"id":7,"event":"released","key":"k","token":{token}}}"#),
        ]
    );
    let cancel = Op::Cancel { target: 7 };
    assert_eq!(call(&watcher, 8, cancel).await, Ok(Okay::EMPTY));
    assert!(matches!(events.next().await, Some(Pushed::Done { id: 7 })));
    // The id is free again, and the cancelled watch hears nothing more.
    assert_eq!(call(&watcher, 7, Op::Ping).await, Ok(Okay::EMPTY));
    token_of_next_grant(&worker).await;
    let quiet = tokio::time::timeout(Duration::from_millis(200), events.next()).await;
    assert!(quiet.is_err(), "nothing after the cancel: {quiet:?}");
    engine.shutdown().await;
}

async fn token_of_next_grant(worker: &Session) -> u64 {
    token(call(worker, 3, lock("k", 30_000)).await)
}

#[tokio::test]
async fn a_cancel_of_a_waiting_lock_with_notify_cancels_the_lock() {
    let engine = engine(Limits::default());
    let holder = engine.session();
    token(call(&holder, 1, lock("k", 30_000)).await);
    let waiter = engine.session();
    let mut events = waiter.take_events().expect("the queue");
    let mut wait = Op::Lock(LockOp::Acquire(deadbolt_core::proto::Acquire::mutex(
        "k",
        30_000,
        deadbolt_core::proto::Wait::Forever,
    )));
    if let Op::Lock(LockOp::Acquire(acquire)) = &mut wait {
        acquire.notify = true;
    }
    let waiting = {
        let waiter = waiter.clone();
        tokio::spawn(async move { call(&waiter, 5, wait).await })
    };
    // Queued once inspect counts it.
    let observer = engine.session();
    let inspect = || Op::Lock(LockOp::Inspect { key: "k".into() });
    loop {
        match call(&observer, 1, inspect()).await {
            Ok(Okay::LockInfo(info)) if info.waiters == 1 => break,
            _ => tokio::task::yield_now().await,
        }
    }
    assert_eq!(
        call(&waiter, 6, Op::Cancel { target: 5 }).await,
        Ok(Okay::EMPTY)
    );
    let answer = waiting.await.expect("task");
    assert_eq!(answer.expect_err("cancelled").code, ErrorCode::Cancelled);
    assert!(matches!(events.next().await, Some(Pushed::Done { id: 5 })));
    match call(&observer, 2, inspect()).await {
        Ok(Okay::LockInfo(info)) => assert_eq!(info.waiters, 0, "it left the queue"),
        other => panic!("{other:?}"),
    }
    engine.shutdown().await;
}
