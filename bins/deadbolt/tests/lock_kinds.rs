//! SPEC section 7 end to end, each rule over WebSocket and over QUIC
//! against a server run as `deadbolt serve` runs it: shared locks,
//! counting semaphores, `conflict`, lock delay, `inspect` with every
//! holder; and (SPEC section 5) an unknown field refused by name.

#[path = "support/inprocess.rs"]
mod inprocess;

use std::time::Duration;

use deadbolt_core::client::{Client, ClientOptions, LockOptions};
use deadbolt_core::proto::ErrorCode;
use deadbolt_transport_quic::{QuicConfig, Trust};
use deadbolt_transport_ws::WsConnector;
use futures_util::{SinkExt, StreamExt};
use inprocess::InProcess;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, Copy)]
enum Transport {
    Ws,
    Quic,
}

async fn client(server: &InProcess, t: Transport) -> Client {
    match t {
        Transport::Ws => {
            let connector = WsConnector::new(&server.ws_url).expect("url");
            Client::connect(connector, ClientOptions::default()).await
        }
        Transport::Quic => Client::connect(server.quic().await, ClientOptions::default()).await,
    }
    .expect("connects")
}

/// A hand-driven connection: one JSON message per frame, or per stream.
enum Raw {
    Ws(Box<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>>),
    Quic(quinn::Connection),
}

impl Raw {
    async fn open(server: &InProcess, t: Transport) -> Raw {
        match t {
            Transport::Ws => {
                let addr = server
                    .ws_url
                    .trim_start_matches("ws://")
                    .trim_end_matches("/ws");
                let stream = tokio::net::TcpStream::connect(addr).await.expect("tcp");
                let (ws, _) = tokio_tungstenite::client_async(server.ws_url.as_str(), stream)
                    .await
                    .expect("handshake");
                Raw::Ws(Box::new(ws))
            }
            Transport::Quic => {
                let trust = Trust::CaPem(server.ca_pem().to_vec());
                let config = deadbolt_transport_quic::client_config(&trust, &QuicConfig::default())
                    .expect("client config");
                let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr"))
                    .expect("endpoint");
                let port = server.quic_url.rsplit(':').next().expect("port");
                let addr = format!("127.0.0.1:{port}").parse().expect("addr");
                let conn = endpoint
                    .connect_with(config, addr, "localhost")
                    .expect("connect")
                    .await
                    .expect("handshake");
                Raw::Quic(conn)
            }
        }
    }

    async fn call(&mut self, request: Value) -> Value {
        let text = request.to_string();
        let reply = match self {
            Raw::Ws(ws) => {
                ws.send(Message::Text(text.into())).await.expect("send");
                loop {
                    match tokio::time::timeout(Duration::from_secs(5), ws.next())
                        .await
                        .expect("reply in time")
                    {
                        Some(Ok(Message::Text(reply))) => break reply.to_string(),
                        Some(Ok(_)) => continue,
                        other => panic!("connection ended: {other:?}"),
                    }
                }
            }
            Raw::Quic(conn) => {
                let (mut send, mut recv) = conn.open_bi().await.expect("stream");
                send.write_all(text.as_bytes()).await.expect("write");
                send.finish().expect("finish");
                let bytes = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20))
                    .await
                    .expect("reply in time")
                    .expect("read");
                String::from_utf8(bytes).expect("utf-8")
            }
        };
        serde_json::from_str(&reply).expect("a JSON reply")
    }
}

async fn eventually(mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "condition not met within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs each named test body once per transport.
macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        mod over_websocket {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Transport::Ws).await
                }
            )*
        }
        mod over_quic {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Transport::Quic).await
                }
            )*
        }
    };
}

suite!(
    shared_holders_coexist_and_an_exclusive_one_excludes_them,
    a_waiting_writer_blocks_later_readers,
    a_semaphore_admits_its_limit_and_then_the_next_in_turn,
    a_request_with_another_limit_gets_conflict,
    a_lease_that_runs_out_holds_the_key_back_for_its_lock_delay,
    an_unlock_starts_no_lock_delay,
    inspect_lists_every_holder,
    an_unknown_field_gets_bad_request_naming_it_and_changes_nothing,
);

const TTL: Duration = Duration::from_secs(30);

async fn shared_holders_coexist_and_an_exclusive_one_excludes_them(t: Transport) {
    let server = InProcess::start(None).await;
    let (a, b, c) = (
        client(&server, t).await,
        client(&server, t).await,
        client(&server, t).await,
    );
    let read_a = a.lock_shared("doc", TTL).await.expect("reader a");
    let read_b = b.lock_shared("doc", TTL).await.expect("reader b");
    assert!(
        read_b.token() > read_a.token(),
        "each grant has its own token"
    );
    let write = c.try_lock("doc", TTL).await.expect("try-lock");
    assert!(write.is_none(), "a writer is kept out while readers hold");
    read_a.unlock().await.expect("unlock a");
    assert!(c.try_lock("doc", TTL).await.expect("try-lock").is_none());
    read_b.unlock().await.expect("unlock b");
    let write = c
        .try_lock("doc", TTL)
        .await
        .expect("try-lock")
        .expect("free now");
    let read = a.lock_with("doc", LockOptions::new(TTL).shared().wait(Duration::ZERO));
    assert!(
        read.await.expect("lock").is_none(),
        "a reader is kept out by the writer"
    );
    write.unlock().await.expect("unlock");
    server.stop().await;
}

async fn a_waiting_writer_blocks_later_readers(t: Transport) {
    let server = InProcess::start(None).await;
    let (a, b, c) = (
        client(&server, t).await,
        client(&server, t).await,
        client(&server, t).await,
    );
    let observer = server.observer().await;
    let first = a.lock_shared("doc", TTL).await.expect("reader a");
    let writer = tokio::spawn(async move { b.lock("doc", TTL).await.map(|g| (b, g)) });
    eventually(async || observer.inspect("doc").await.expect("inspect").waiters == 1).await;
    let reader = tokio::spawn(async move { c.lock_shared("doc", TTL).await.map(|g| (c, g)) });
    eventually(async || observer.inspect("doc").await.expect("inspect").waiters == 2).await;
    first.unlock().await.expect("unlock a");
    let (_b, written) = writer.await.expect("task").expect("the writer is next");
    assert!(
        !reader.is_finished(),
        "the later reader waits behind the writer"
    );
    written.unlock().await.expect("unlock b");
    let (_c, read) = reader.await.expect("task").expect("then the reader");
    read.unlock().await.expect("unlock c");
    server.stop().await;
}

async fn a_semaphore_admits_its_limit_and_then_the_next_in_turn(t: Transport) {
    let server = InProcess::start(None).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(client(&server, t).await);
    }
    let mut permits = Vec::new();
    for c in &clients[..3] {
        permits.push(c.semaphore("api", 3).acquire(TTL).await.expect("a permit"));
    }
    let fourth = clients[3].semaphore("api", 3);
    assert!(
        fourth.try_acquire(TTL).await.expect("try").is_none(),
        "three are out"
    );
    let info = server
        .observer()
        .await
        .inspect("api")
        .await
        .expect("inspect");
    assert_eq!((info.holders.len(), info.limit), (3, 3));
    drop(permits.remove(1)); // released in the background
    let permit = tokio::time::timeout(Duration::from_secs(10), fourth.acquire(TTL))
        .await
        .expect("granted once a permit is back")
        .expect("a permit");
    assert!(permit.token() > permits[1].token());
    permit.release().await.expect("release");
    server.stop().await;
}

async fn a_request_with_another_limit_gets_conflict(t: Transport) {
    let server = InProcess::start(None).await;
    let (a, b) = (client(&server, t).await, client(&server, t).await);
    let permit = a.semaphore("api", 3).acquire(TTL).await.expect("a permit");
    for conflicting in [
        b.semaphore("api", 2).try_acquire(TTL).await.map(|_| ()),
        b.lock_shared("api", TTL).await.map(|_| ()),
    ] {
        let error = conflicting.expect_err("refused");
        assert_eq!(error.code(), Some(ErrorCode::Conflict), "{error}");
    }
    let info = server
        .observer()
        .await
        .inspect("api")
        .await
        .expect("inspect");
    assert_eq!(
        (info.holders.len(), info.waiters),
        (1, 0),
        "nothing changed"
    );
    permit.release().await.expect("release");
    server.stop().await;
}

async fn a_lease_that_runs_out_holds_the_key_back_for_its_lock_delay(t: Transport) {
    let server = InProcess::start(None).await;
    let (a, b) = (client(&server, t).await, client(&server, t).await);
    let (ttl, delay) = (Duration::from_millis(200), Duration::from_millis(1500));
    let sent = Instant::now();
    let options = LockOptions::new(ttl).lock_delay(delay).wait(Duration::ZERO);
    let guard = a
        .lock_with("k", options)
        .await
        .expect("lock")
        .expect("free");
    guard.detach(); // the holder "pauses": its lease runs out
    let observer = server.observer().await;
    eventually(async || {
        observer
            .inspect("k")
            .await
            .expect("inspect")
            .holder
            .is_none()
    })
    .await;
    assert!(
        b.try_lock("k", TTL).await.expect("try-lock").is_none(),
        "inside the delay"
    );
    let granted = b
        .lock_timeout("k", TTL, Duration::from_secs(10))
        .await
        .expect("lock");
    assert!(granted.is_some(), "granted once the delay is over");
    // The old lease began after `sent`, and the delay after the lease.
    assert!(
        sent.elapsed() >= ttl + delay,
        "granted {:?} after",
        sent.elapsed()
    );
    server.stop().await;
}

async fn an_unlock_starts_no_lock_delay(t: Transport) {
    let server = InProcess::start(None).await;
    let (a, b) = (client(&server, t).await, client(&server, t).await);
    let options = LockOptions::new(TTL).lock_delay(Duration::from_secs(60));
    let guard = a
        .lock_with("k", options)
        .await
        .expect("lock")
        .expect("free");
    guard.unlock().await.expect("unlock");
    let next = b.try_lock("k", TTL).await.expect("try-lock");
    assert!(next.is_some(), "free at once after an unlock");
    server.stop().await;
}

async fn inspect_lists_every_holder(t: Transport) {
    let server = InProcess::start(None).await;
    let (a, b) = (client(&server, t).await, client(&server, t).await);
    let first = a.lock_shared("doc", TTL).await.expect("reader a");
    let second = b.lock_shared("doc", TTL).await.expect("reader b");
    let mut raw = Raw::open(&server, t).await;
    let info = raw
        .call(json!({"id": 1, "op": "inspect", "key": "doc"}))
        .await;
    let holders = info["ok"]["holders"].as_array().expect("holders");
    let tokens: Vec<u64> = holders.iter().filter_map(|h| h["token"].as_u64()).collect();
    assert_eq!(tokens, [first.token(), second.token()], "{info}");
    assert!(holders.iter().all(|h| h["mode"] == "shared"), "{info}");
    assert_eq!(
        info["ok"]["holder"], holders[0],
        "the first, for version 1 clients"
    );
    server.stop().await;
}

async fn an_unknown_field_gets_bad_request_naming_it_and_changes_nothing(t: Transport) {
    let server = InProcess::start(None).await;
    let mut raw = Raw::open(&server, t).await;
    let misspelt = json!({"id": 3, "op": "lock", "key": "k", "ttl_ms": 5000, "ephemral": true});
    let reply = raw.call(misspelt).await;
    assert_eq!(reply["id"], 3, "{reply}");
    assert_eq!(reply["err"]["code"], "bad_request", "{reply}");
    let message = reply["err"]["message"].as_str().expect("message");
    assert!(message.contains("`ephemral`"), "{message}");
    let info = raw
        .call(json!({"id": 4, "op": "inspect", "key": "k"}))
        .await;
    assert_eq!(info["ok"]["holder"], Value::Null, "nothing was granted");
    server.stop().await;
}
