//! `run`: one engine behind both frontends, graceful shutdown in order, and
//! an abrupt end when its future is dropped.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{TestServer, code};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn both_frontends_serve_one_engine() {
    let mut server = TestServer::start().await;
    let over_ws = server.ws_client().await;
    let guard = over_ws
        .lock("shared", Duration::from_secs(10))
        .await
        .expect("lock over ws");
    let over_quic = server.quic_client().await;
    let info = over_quic
        .inspect("shared")
        .await
        .expect("inspect over quic");
    let holder = info.holder.expect("held");
    assert_eq!(holder.token, guard.token());
    assert_eq!(holder.client, over_ws.client_id());
    guard.detach();
    server.shutdown().await.expect("a clean stop");
}

#[tokio::test]
async fn shutdown_answers_waiters_closes_connections_and_returns() {
    let mut server = TestServer::start().await;
    let mut holder = server.raw().await;
    let granted = holder
        .call(json!({"id": 1, "op": "lock", "key": "k", "ttl_ms": 10_000}))
        .await;
    assert!(granted["ok"]["token"].is_u64(), "{granted}");
    let mut waiter = server.raw().await;
    waiter
        .send_json(json!({"id": 4, "op": "lock", "key": "k", "ttl_ms": 1000}))
        .await;
    while holder
        .call(json!({"id": 2, "op": "inspect", "key": "k"}))
        .await["ok"]["waiters"]
        != 1
    {}
    server.shutdown().await.expect("a clean stop");
    let reply = waiter.recv().await;
    assert_eq!(
        (reply["id"].as_u64(), code(&reply)),
        (Some(4), "shutting_down")
    );
    match waiter.next().await {
        Some(Message::Close(Some(frame))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected close 1001, got {other:?}"),
    }
    let after = tokio::net::TcpStream::connect(server.ws_addr).await;
    assert!(after.is_err(), "the listener is closed after shutdown");
}

#[tokio::test]
async fn dropping_run_ends_the_server_at_once() {
    let server = TestServer::start().await;
    let mut raw = server.raw().await;
    let pong = raw.call(json!({"id": 1, "op": "ping"})).await;
    assert_eq!(pong, json!({"id": 1, "ok": {}}));
    // A crash: no goodbye, no `shutting_down`, just gone.
    server.task.abort();
    let _ = (&mut { server.task }).await;
    assert!(
        raw.next().await.is_none(),
        "the connection ends without a close frame"
    );
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(server.ws_addr)
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the listener is gone with the server");
}
