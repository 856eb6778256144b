//! A QUIC connection's requests that need nothing but their shard go to
//! it through the session's queue of answers, without a future of their
//! own; the connection writes each answer on its request's stream. Every
//! answer must reach its own stream, whatever the order the shards answer
//! in, whether other streams were stopped (a grant nobody heard of is
//! undone), and beside requests that take the other path (a waiting
//! `lock`, which a stopped stream cancels).

use std::time::Duration;

use deadbolt_core::{Engine, EngineConfig, Limits};
use deadbolt_transport_quic::QuicConfig;
use quinn::{Connection, RecvStream, SendStream};
use serde_json::{Value, json};

mod support;

use support::Server;

fn start(shards: usize, mailbox_len: usize) -> Server {
    let engine = Engine::start(EngineConfig {
        shards,
        limits: Limits {
            mailbox_len,
            ..Limits::default()
        },
        ..EngineConfig::new()
    });
    support::serve(engine, QuicConfig::default())
}

/// Sends `request` on a stream of its own, and finishes the stream's side
/// of the client: the server may answer from then on.
async fn send(conn: &Connection, request: &Value) -> (SendStream, RecvStream) {
    let (mut send, recv) = conn.open_bi().await.expect("stream");
    let bytes = serde_json::to_vec(request).expect("JSON");
    send.write_all(&bytes).await.expect("write");
    send.finish().expect("finish");
    (send, recv)
}

/// The reply on `recv`.
async fn reply(recv: &mut RecvStream) -> Value {
    let read = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20));
    let bytes = read.await.expect("a reply within 10 s").expect("read");
    serde_json::from_slice(&bytes).expect("a JSON reply")
}

/// Sends one request and reads its reply.
async fn call(conn: &Connection, request: Value) -> Value {
    let (_send, mut recv) = send(conn, &request).await;
    reply(&mut recv).await
}

fn try_lock(id: u64, key: &str, ttl_ms: u64) -> Value {
    json!({"id": id, "op": "lock", "key": key, "ttl_ms": ttl_ms, "wait_ms": 0})
}

fn inspect(id: u64, key: &str) -> Value {
    json!({"id": id, "op": "inspect", "key": key})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_across_shards_on_many_streams_each_get_their_own_answer() {
    let server = start(4, 1024);
    let (_endpoint, conn) = support::bare_connection(&server).await;
    // Every stream is open and its request sent before any answer is read.
    // Each lease length names its request; pings (which go the other way,
    // as a future of their own) are mixed in.
    let mut streams = Vec::new();
    for id in 1..=100u64 {
        let request = match id % 10 {
            0 => json!({"id": id, "op": "ping"}),
            _ => try_lock(id, &format!("key-{id}"), 60_000 + id),
        };
        streams.push((id, send(&conn, &request).await));
    }
    let mut tokens = Vec::new();
    for (id, (_send, mut recv)) in streams {
        let answer = reply(&mut recv).await;
        assert_eq!(answer["id"], id, "stream {id} got {answer}");
        if id % 10 == 0 {
            assert_eq!(answer["ok"], json!({}), "{answer}");
            continue;
        }
        assert_eq!(
            answer["ok"]["ttl_ms"],
            60_000 + id,
            "another's grant: {answer}"
        );
        tokens.push((id, answer["ok"]["token"].clone()));
    }
    // Each unlock names its grant's token: all succeed only if every token
    // came back on its own request's stream.
    let mut unlocks = Vec::new();
    for (id, token) in &tokens {
        let unlock =
            json!({"id": 1000 + id, "op": "unlock", "key": format!("key-{id}"), "token": token});
        unlocks.push((1000 + id, send(&conn, &unlock).await));
    }
    for (id, (_send, mut recv)) in unlocks {
        let answer = reply(&mut recv).await;
        assert_eq!(answer, json!({"id": id, "ok": {}}), "unlock {id}");
    }
    let free = call(&conn, inspect(5000, "key-7")).await;
    assert_eq!(free["ok"]["holder"], Value::Null, "{free}");
}

#[tokio::test(flavor = "current_thread")]
async fn an_answer_to_a_stopped_stream_is_dropped_its_grant_undone_and_every_other_answered() {
    let server = start(2, 1024);
    let (_endpoint, conn) = support::bare_connection(&server).await;
    // On one thread nothing runs between these: the server gets each
    // stopped stream's request together with its stop, and answers it to
    // nobody.
    let mut kept = Vec::new();
    for id in 0..40u64 {
        let (send, mut recv) = send(&conn, &try_lock(id, &format!("k{id}"), 10_000 + id)).await;
        if id % 2 == 0 {
            recv.stop(0u32.into()).expect("stop");
        } else {
            kept.push((id, send, recv));
        }
    }
    for (id, _send, mut recv) in kept {
        let answer = reply(&mut recv).await;
        assert_eq!(answer["id"], id, "{answer}");
        assert_eq!(answer["ok"]["ttl_ms"], 10_000 + id, "{answer}");
    }
    // The stopped requests' grants, which nobody heard of, are undone:
    // else each key would stay held for its lease by a client that does
    // not know it holds it.
    for id in (0..40u64).step_by(2) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let info = call(&conn, inspect(100 + id, &format!("k{id}"))).await;
            if info["ok"]["holder"].is_null() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "k{id}: {info}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // The stopped requests' ids are free again, and their answers did not
    // linger to be written on these streams.
    let mut again = Vec::new();
    for id in (0..40u64).step_by(2) {
        again.push((id, send(&conn, &inspect(id, &format!("other{id}"))).await));
    }
    for (id, (_send, mut recv)) in again {
        let answer = reply(&mut recv).await;
        assert_eq!(answer["id"], id, "{answer}");
        assert_eq!(answer["ok"]["holder"], Value::Null, "{answer}");
    }
    // The connection, and the server, carry on.
    let pong = call(&conn, json!({"id": 99, "op": "ping"})).await;
    assert_eq!(pong, json!({"id": 99, "ok": {}}));
    let (_endpoint, other) = support::bare_connection(&server).await;
    let pong = call(&other, json!({"id": 1, "op": "ping"})).await;
    assert_eq!(pong, json!({"id": 1, "ok": {}}));
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_mailbox_answers_overloaded_to_the_requests_past_its_bound() {
    let server = start(1, 2);
    let (_endpoint, conn) = support::bare_connection(&server).await;
    // On one thread the shard does not run while the server's connection
    // takes a burst of streams: 2 fit in its mailbox, the rest find it full.
    let mut streams = Vec::new();
    for id in 0..64u64 {
        streams.push((
            id,
            send(&conn, &try_lock(id, &format!("k{id}"), 10_000 + id)).await,
        ));
    }
    let mut refused = Vec::new();
    for (id, (_send, mut recv)) in streams {
        let answer = reply(&mut recv).await;
        assert_eq!(answer["id"], id, "{answer}");
        match answer["err"]["code"].as_str() {
            Some("overloaded") => refused.push(id),
            Some(other) => panic!("{id}: {other}"),
            None => assert_eq!(answer["ok"]["ttl_ms"], 10_000 + id, "{answer}"),
        }
    }
    assert!(!refused.is_empty(), "some found the mailbox full");
    assert!(refused.len() < 64, "the first fit");
    // A refused request changed nothing, and goes through once retried.
    for id in refused {
        let answer = call(&conn, try_lock(id, &format!("k{id}"), 10_000 + id)).await;
        assert_eq!(answer["ok"]["ttl_ms"], 10_000 + id, "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_lock_is_cancelled_when_its_stream_is_stopped() {
    let server = start(2, 1024);
    let (_holder_endpoint, holder) = support::bare_connection(&server).await;
    let (_waiter_endpoint, waiter) = support::bare_connection(&server).await;
    let granted = call(&holder, try_lock(1, "w", 30_000)).await;
    let token = granted["ok"]["token"].clone();
    assert!(token.is_u64(), "{granted}");
    let wait = json!({"id": 7, "op": "lock", "key": "w", "ttl_ms": 30_000, "wait_ms": 60_000});
    let (_waiting_send, mut waiting) = send(&waiter, &wait).await;
    let waiters = async |id| call(&holder, inspect(id, "w")).await["ok"]["waiters"].clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while waiters(2).await != 1 {
        assert!(tokio::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Meanwhile the waiter's shard-only requests are answered: they do
    // not wait behind it.
    for id in 10..30u64 {
        let answer = call(&waiter, try_lock(id, &format!("k{id}"), 5_000 + id)).await;
        assert_eq!(answer["ok"]["ttl_ms"], 5_000 + id, "{answer}");
    }
    waiting.stop(0u32.into()).expect("stop");
    while waiters(3).await != 0 {
        assert!(tokio::time::Instant::now() < deadline, "still queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Released, the lock goes to nobody: the waiter left its queue.
    let unlock = json!({"id": 4, "op": "unlock", "key": "w", "token": token});
    assert_eq!(call(&holder, unlock).await, json!({"id": 4, "ok": {}}));
    let info = call(&holder, inspect(5, "w")).await;
    assert_eq!(info["ok"]["holder"], Value::Null, "{info}");
}
