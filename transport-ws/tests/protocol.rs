//! SPEC sections 2 to 5 over real loopback WebSocket connections, spoken as
//! raw JSON so that the wire format itself is under test.

mod support;

use std::sync::Arc;
use std::time::Duration;

use deadbolt_core::Limits;
use deadbolt_transport_ws::{HttpRequest, HttpResponse, HttpRoutes, WsConfig};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::{Raw, TestServer, code};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn lock_unlock_and_inspect_speak_the_spec_json() {
    let server = TestServer::start().await;
    let mut a = server.raw().await;
    a.hello("alice").await;
    let reply = a
        .call(json!({"id": 17, "op": "lock", "key": "job/42", "ttl_ms": 30000, "wait_ms": 5000}))
        .await;
    let token = reply["ok"]["token"].as_u64().expect("token");
    assert_eq!(reply["ok"]["ttl_ms"], 30000);
    let info = a
        .call(json!({"id": 18, "op": "inspect", "key": "job/42"}))
        .await;
    assert_eq!(info["ok"]["holder"]["client"], "alice");
    assert_eq!(info["ok"]["holder"]["token"], token);
    assert_eq!(info["ok"]["waiters"], 0);
    assert_eq!(
        a.call(json!({"id": 19, "op": "unlock", "key": "job/42", "token": token}))
            .await,
        json!({"id": 19, "ok": {}})
    );
    let again = a
        .call(json!({"id": 20, "op": "unlock", "key": "job/42", "token": token}))
        .await;
    assert_eq!(code(&again), "not_held");
    assert!(
        again["err"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

#[tokio::test]
async fn waiters_on_several_connections_are_granted_first_come_first_served() {
    let server = TestServer::start().await;
    let mut holder = server.raw().await;
    let token = holder.lock(1, "k", 10_000).await;
    let mut waiters = Vec::new();
    for i in 0..4 {
        let mut w = server.raw().await;
        w.hello(&format!("w{i}")).await;
        w.send_json(json!({"id": 1, "op": "lock", "key": "k", "ttl_ms": 10_000}))
            .await;
        // Each waiter is queued before the next asks.
        let expected = i + 1;
        while holder
            .call(json!({"id": 2, "op": "inspect", "key": "k"}))
            .await["ok"]["waiters"]
            != expected
        {}
        waiters.push(w);
    }
    let mut token = token;
    holder
        .call(json!({"id": 3, "op": "unlock", "key": "k", "token": token}))
        .await;
    for (i, w) in waiters.iter_mut().enumerate() {
        let reply = w.recv().await;
        let next = reply["ok"]["token"].as_u64().expect("granted");
        assert!(next > token, "tokens rise");
        token = next;
        let info = holder
            .call(json!({"id": 4, "op": "inspect", "key": "k"}))
            .await;
        assert_eq!(info["ok"]["holder"]["client"], format!("w{i}"));
        w.call(json!({"id": 5, "op": "unlock", "key": "k", "token": token}))
            .await;
    }
}

#[tokio::test]
async fn an_expired_lease_is_handed_to_the_waiter_at_its_deadline() {
    let server = TestServer::start().await;
    let mut holder = server.raw().await;
    holder.lock(1, "k", 300).await;
    let mut waiter = server.raw().await;
    let started = Instant::now();
    waiter.lock(1, "k", 1000).await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(290), "{waited:?}");
    assert!(waited < Duration::from_millis(400), "{waited:?}");
}

#[tokio::test]
async fn a_waiter_that_disconnects_leaves_the_queue_and_is_never_granted() {
    let server = TestServer::start().await;
    let mut holder = server.raw().await;
    let token = holder.lock(1, "k", 10_000).await;
    let mut gone = server.raw().await;
    gone.send_json(json!({"id": 1, "op": "lock", "key": "k", "ttl_ms": 10_000}))
        .await;
    let mut next = server.raw().await;
    next.hello("next").await;
    next.send_json(json!({"id": 1, "op": "lock", "key": "k", "ttl_ms": 10_000}))
        .await;
    while holder
        .call(json!({"id": 2, "op": "inspect", "key": "k"}))
        .await["ok"]["waiters"]
        != 2
    {}
    drop(gone);
    while holder
        .call(json!({"id": 2, "op": "inspect", "key": "k"}))
        .await["ok"]["waiters"]
        != 1
    {}
    holder
        .call(json!({"id": 3, "op": "unlock", "key": "k", "token": token}))
        .await;
    assert!(next.recv().await["ok"]["token"].is_u64());
    let info = holder
        .call(json!({"id": 4, "op": "inspect", "key": "k"}))
        .await;
    assert_eq!(info["ok"]["holder"]["client"], "next");
}

#[tokio::test]
async fn cancel_answers_the_waiting_lock_cancelled_and_then_itself() {
    let server = TestServer::start().await;
    let mut holder = server.raw().await;
    holder.lock(1, "k", 10_000).await;
    let mut waiter = server.raw().await;
    waiter
        .send_json(json!({"id": 7, "op": "lock", "key": "k", "ttl_ms": 1000}))
        .await;
    while holder
        .call(json!({"id": 2, "op": "inspect", "key": "k"}))
        .await["ok"]["waiters"]
        != 1
    {}
    waiter
        .send_json(json!({"id": 8, "op": "cancel", "target": 7}))
        .await;
    let mut replies = [waiter.recv().await, waiter.recv().await];
    replies.sort_by_key(|r| r["id"].as_u64());
    assert_eq!(code(&replies[0]), "cancelled");
    assert_eq!(replies[1], json!({"id": 8, "ok": {}}));
    assert_eq!(
        holder
            .call(json!({"id": 3, "op": "inspect", "key": "k"}))
            .await["ok"]["waiters"],
        0
    );
}

#[tokio::test]
async fn an_ephemeral_lock_is_released_when_its_connection_closes() {
    let server = TestServer::start().await;
    let mut taker = server.raw().await;
    taker
        .call(json!({"id": 1, "op": "lock", "key": "e", "ttl_ms": 60_000, "ephemeral": true}))
        .await;
    taker
        .call(json!({"id": 2, "op": "lock", "key": "d", "ttl_ms": 60_000}))
        .await;
    let mut other = server.raw().await;
    other
        .send_json(json!({"id": 1, "op": "lock", "key": "e", "ttl_ms": 1000}))
        .await;
    taker.ws.close(None).await.expect("close");
    drop(taker);
    assert!(
        other.recv().await["ok"]["token"].is_u64(),
        "granted after the close"
    );
    let durable = other
        .call(json!({"id": 2, "op": "inspect", "key": "d"}))
        .await;
    assert!(
        durable["ok"]["holder"].is_object(),
        "a plain lock outlives its connection"
    );
}

#[tokio::test]
async fn a_client_that_reconnects_with_its_id_keeps_its_lock_and_its_first() {
    let server = TestServer::start().await;
    let mut first = server.raw().await;
    first.hello("worker-1").await;
    first
        .call(json!({"id": 1, "op": "set_up", "set": "s", "ttl_ms": 60_000}))
        .await;
    let token = first.lock(2, "k", 60_000).await;
    // The reply to this insert is "lost": the worker never reads it.
    first
        .send_json(json!({"id": 3, "op": "insert", "set": "s", "key": "r"}))
        .await;
    let mut rival = server.raw().await;
    rival.hello("worker-2").await;
    let rivals = rival
        .call(json!({"id": 1, "op": "insert", "set": "s", "key": "r"}))
        .await;
    assert_eq!(rivals["ok"], json!({"index": 1, "first": false}));
    drop(first);
    let mut again = server.raw().await;
    again.hello("worker-1").await;
    let retry = again
        .call(json!({"id": 1, "op": "insert", "set": "s", "key": "r"}))
        .await;
    assert_eq!(retry["ok"], json!({"index": 1, "first": true}));
    assert_eq!(
        again.lock(2, "k", 60_000).await,
        token,
        "a retried lock keeps its token"
    );
}

#[tokio::test]
async fn three_hundred_pipelined_requests_are_all_answered_by_id() {
    let server = TestServer::start().await;
    let mut raw = server.raw().await;
    raw.call(json!({"id": 0, "op": "set_up", "set": "s", "ttl_ms": 60_000}))
        .await;
    for id in 1..=300u64 {
        let request = match id % 3 {
            0 => json!({"id": id, "op": "insert", "set": "s", "key": format!("k{id}")}),
            1 => {
                json!({"id": id, "op": "lock", "key": format!("l{id}"), "ttl_ms": 60_000, "wait_ms": 0})
            }
            _ => json!({"id": id, "op": "ping"}),
        };
        raw.ws
            .feed(Message::Text(request.to_string().into()))
            .await
            .expect("feed");
    }
    raw.ws.flush().await.expect("flush");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..300 {
        let reply = raw.recv().await;
        assert!(reply.get("ok").is_some(), "{reply}");
        assert!(seen.insert(reply["id"].as_u64().expect("id")));
    }
    assert_eq!(seen.len(), 300);
}

#[tokio::test]
async fn pipelined_replies_from_every_shard_each_answer_their_own_request() {
    let server = TestServer::start().await;
    let mut holder = server.raw().await;
    holder.lock(1, "held", 60_000).await;
    let mut raw = server.raw().await;
    // Try-locks over many keys (every shard), each lease naming its id,
    // between pings and a lock that waits: the replies come back in any
    // order, through the connection's queue and through futures.
    raw.send_json(
        json!({"id": 1000, "op": "lock", "key": "held", "ttl_ms": 1000, "wait_ms": 60_000}),
    )
    .await;
    for id in 1..=200u64 {
        let request = if id % 5 == 0 {
            json!({"id": id, "op": "ping"})
        } else {
            json!({"id": id, "op": "lock", "key": format!("k{id}"), "ttl_ms": 60_000 + id, "wait_ms": 0})
        };
        raw.ws
            .feed(Message::Text(request.to_string().into()))
            .await
            .expect("feed");
    }
    raw.ws.flush().await.expect("flush");
    let mut tokens = std::collections::BTreeMap::new();
    for _ in 0..200 {
        let reply = raw.recv().await;
        let id = reply["id"].as_u64().expect("id");
        if id % 5 == 0 {
            assert_eq!(reply, json!({"id": id, "ok": {}}));
            continue;
        }
        assert_eq!(reply["ok"]["ttl_ms"], 60_000 + id, "{reply}");
        assert!(tokens.insert(id, reply["ok"]["token"].clone()).is_none());
    }
    assert_eq!(tokens.len(), 160);
    // Every unlock names its grant's token: each is accepted only if the
    // token came back under its own request's id.
    for (id, token) in &tokens {
        let unlock =
            json!({"id": 10_000 + id, "op": "unlock", "key": format!("k{id}"), "token": token});
        raw.ws
            .feed(Message::Text(unlock.to_string().into()))
            .await
            .expect("feed");
    }
    raw.ws.flush().await.expect("flush");
    for _ in 0..tokens.len() {
        let reply = raw.recv().await;
        assert!(reply.get("ok").is_some(), "{reply}");
    }
    let info = raw
        .call(json!({"id": 1, "op": "inspect", "key": "k7"}))
        .await;
    assert_eq!(info["ok"]["holder"], serde_json::Value::Null);
}

#[tokio::test]
async fn a_waiting_lock_does_not_hold_up_later_requests_on_its_connection() {
    let server = TestServer::start().await;
    let mut holder = server.raw().await;
    holder.lock(1, "k", 10_000).await;
    let mut raw = server.raw().await;
    raw.send_json(json!({"id": 1, "op": "lock", "key": "k", "ttl_ms": 1000}))
        .await;
    let started = Instant::now();
    assert_eq!(
        raw.call(json!({"id": 2, "op": "ping"})).await,
        json!({"id": 2, "ok": {}})
    );
    let other = raw
        .call(json!({"id": 3, "op": "lock", "key": "free", "ttl_ms": 1000}))
        .await;
    assert!(other["ok"]["token"].is_u64());
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn a_binary_frame_gets_bad_request_and_the_connection_stays_usable() {
    // Bad JSON of every kind is the transport suite's (bins/deadbolt/tests/
    // transports.rs), run over both transports; binary frames are the
    // WebSocket's own.
    let server = TestServer::start().await;
    let mut raw = server.raw().await;
    raw.ws
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .expect("binary");
    let reply = raw.recv().await;
    assert_eq!(
        (code(&reply), reply["id"].clone()),
        ("bad_request", serde_json::Value::Null)
    );
    // Nothing changed: the key is still free.
    let info = raw
        .call(json!({"id": 9, "op": "inspect", "key": "k"}))
        .await;
    assert_eq!(info["ok"]["holder"], serde_json::Value::Null);
    assert_eq!(
        raw.call(json!({"id": 10, "op": "ping"})).await,
        json!({"id": 10, "ok": {}})
    );
}

#[tokio::test]
async fn a_request_id_already_in_flight_is_refused() {
    let server = TestServer::start().await;
    let mut holder = server.raw().await;
    holder.lock(1, "k", 10_000).await;
    let mut raw = server.raw().await;
    raw.send_json(json!({"id": 5, "op": "lock", "key": "k", "ttl_ms": 1000}))
        .await;
    let reply = raw.call(json!({"id": 5, "op": "ping"})).await;
    assert_eq!(code(&reply), "bad_request");
    let again = raw.call(json!({"id": 5, "op": "ping"})).await;
    assert_eq!(
        code(&again),
        "bad_request",
        "a refusal does not forget the original: {again}"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_its_ephemeral_lock_freed() {
    let config = WsConfig {
        idle_ping: Duration::from_millis(500),
        idle_close: Duration::from_secs(1),
        ..WsConfig::default()
    };
    let server = TestServer::with(Limits::default(), config).await;
    let filler = server.client().await;
    let set = filler.set("big");
    set.set_up(Duration::from_secs(600)).await.expect("set up");
    let keys: Vec<String> = (0..1000)
        .map(|i| format!("{i:04}{}", "k".repeat(996)))
        .collect();
    set.insert_many(keys).await.expect("insert");
    let mut stalled = server.raw().await;
    stalled.hello("stalled").await;
    let reply = stalled
        .call(json!({"id": 1, "op": "lock", "key": "e", "ttl_ms": 600_000, "ephemeral": true}))
        .await;
    assert!(reply["ok"]["token"].is_u64(), "{reply}");
    // Ask for 256 KiB pages, over and over, and never read one: the
    // socket buffers fill and the server's writes stall.
    let asking = tokio::spawn(async move {
        for id in 2..400u64 {
            let page = json!({"id": id, "op": "members", "set": "big", "limit": 10_000});
            if stalled
                .ws
                .send(Message::Text(page.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        stalled
    });
    let started = Instant::now();
    let other = server.client().await;
    other.ping().await.expect("others are served meanwhile");
    let guard = other
        .lock_timeout("e", Duration::from_secs(1), Duration::from_secs(10))
        .await
        .expect("lock");
    assert!(
        guard.is_some(),
        "the stalled connection was dropped and its ephemeral lock freed"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    asking.abort();
}

#[tokio::test]
async fn an_oversize_message_closes_with_1009_while_other_connections_keep_working() {
    let limits = Limits {
        message_bytes_max: 4096,
        ..Limits::default()
    };
    let server = TestServer::with(limits, WsConfig::default()).await;
    let mut other = server.raw().await;
    let mut big = server.raw().await;
    big.send(&format!(
        "{{\"id\":1,\"op\":\"ping\",\"pad\":\"{}\"}}",
        "x".repeat(5000)
    ))
    .await;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), big.ws.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.expect("close frame").code, CloseCode::Size);
    assert_eq!(
        other.call(json!({"id": 1, "op": "ping"})).await,
        json!({"id": 1, "ok": {}})
    );
}

#[tokio::test]
async fn requests_past_the_in_flight_limit_are_overloaded() {
    let config = WsConfig {
        max_in_flight: 2,
        ..WsConfig::default()
    };
    let server = TestServer::with(Limits::default(), config).await;
    let mut holder = server.raw().await;
    holder.lock(1, "k", 10_000).await;
    let mut raw = server.raw().await;
    raw.send_json(json!({"id": 1, "op": "lock", "key": "k", "ttl_ms": 1000}))
        .await;
    raw.send_json(json!({"id": 2, "op": "lock", "key": "k", "ttl_ms": 1000}))
        .await;
    let reply = raw.call(json!({"id": 3, "op": "ping"})).await;
    assert_eq!(code(&reply), "overloaded");
}

#[tokio::test]
async fn connections_past_the_limit_get_http_503_and_plain_requests_are_still_answered() {
    let config = WsConfig {
        max_connections: 1,
        routes: Arc::new(Hello::default()),
        ..WsConfig::default()
    };
    let server = TestServer::with(Limits::default(), config).await;
    let mut first = server.raw().await;
    let hello = http_get(server.addr, "/hello").await;
    assert!(hello.starts_with("HTTP/1.1 200 OK"), "{hello}");
    let refused = tokio_tungstenite::client_async(
        server.url.as_str(),
        tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("tcp"),
    )
    .await;
    let error = refused.expect_err("refused").to_string();
    assert!(error.contains("503"), "{error}");
    assert_eq!(
        first.call(json!({"id": 1, "op": "ping"})).await,
        json!({"id": 1, "ok": {}})
    );
}

#[tokio::test]
async fn silent_sockets_past_the_handshake_bound_make_room_for_clients_that_talk() {
    let config = WsConfig {
        handshakes_max: 8,
        routes: Arc::new(Hello::default()),
        ..WsConfig::default()
    };
    let gauges = config.gauges.clone();
    let server = TestServer::with(Limits::default(), config).await;
    let mut silent = Vec::new();
    for _ in 0..32 {
        let socket = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("tcp");
        silent.push(socket);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while gauges.handshakes_evicted() < 24 {
        assert!(
            Instant::now() < deadline,
            "evicted {}",
            gauges.handshakes_evicted()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gauges.handshakes(), 8, "the bound holds");
    // The oldest were dropped without an answer; the newest still wait.
    let mut bytes = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(2), silent[0].read_to_end(&mut bytes)).await;
    assert!(matches!(read, Ok(Ok(0))), "{read:?} {bytes:?}");
    let hello = http_get(server.addr, "/hello").await;
    assert!(hello.starts_with("HTTP/1.1 200 OK"), "{hello}");
    let mut raw = server.raw().await;
    let token = raw.lock(1, "k", 10_000).await;
    assert!(token > 0);
    assert!(gauges.handshakes() <= 8);
}

#[tokio::test]
async fn a_flood_of_silent_sockets_from_one_address_evicts_only_its_own() {
    let config = WsConfig {
        handshakes_max: 64,
        handshakes_per_address_max: 8,
        ..WsConfig::default()
    };
    let gauges = config.gauges.clone();
    let server = TestServer::with(Limits::default(), config).await;
    // Two silent sockets from another loopback address.
    let mut bystanders = Vec::new();
    for _ in 0..2 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.2:0".parse().expect("address"))
            .expect("bind 127.0.0.2");
        bystanders.push(socket.connect(server.addr).await.expect("tcp"));
    }
    let mut flood = Vec::new();
    for _ in 0..40 {
        let socket = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("tcp");
        flood.push(socket);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while gauges.handshakes_evicted() < 32 {
        assert!(
            Instant::now() < deadline,
            "evicted {}",
            gauges.handshakes_evicted()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        gauges.handshakes(),
        10,
        "8 of the flood and both bystanders"
    );
    for bystander in &mut bystanders {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(100), bystander.read(&mut byte));
        assert!(
            read.await.is_err(),
            "the bystander is still in its handshake"
        );
    }
    let mut raw = server.raw().await;
    assert_eq!(
        raw.call(json!({"id": 1, "op": "ping"})).await,
        json!({"id": 1, "ok": {}}),
        "a client from the flooding address still gets through"
    );
}

/// A WebSocket handshake by hand, to send frames no client library would.
async fn handshaken(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("upgrade request");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte).await.expect("upgrade answer");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    tcp
}

/// A short client frame with first byte `first` (FIN, RSV bits, opcode),
/// masked or not.
fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let len = u8::try_from(payload.len()).expect("short");
    assert!(len < 126);
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut bytes = vec![first];
    if masked {
        bytes.push(0x80 | len);
        bytes.extend(mask);
        bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        bytes.push(len);
        bytes.extend(payload);
    }
    bytes
}

/// The code of the close frame the server sends next (skipping any other
/// frame), read from the raw bytes.
async fn close_code(tcp: &mut tokio::net::TcpStream) -> u16 {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut chunk))
            .await
            .expect("the server answers in time");
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
    let mut at = 0;
    while at + 2 <= bytes.len() {
        let (opcode, len) = (bytes[at] & 0x0f, usize::from(bytes[at + 1] & 0x7f));
        if opcode == 0x8 {
            return u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]);
        }
        at += 2 + len;
    }
    panic!("no close frame in {bytes:?}");
}

#[tokio::test]
async fn protocol_violations_close_with_1002_and_invalid_utf8_with_1007() {
    let server = TestServer::start().await;
    let mut other = server.raw().await;
    let cases: [(&str, Vec<u8>, u16); 7] = [
        ("unmasked client frame", frame(0x81, b"{}", false), 1002),
        ("RSV1 set", frame(0xc1, b"{}", true), 1002),
        ("RSV3 set", frame(0x91, b"{}", true), 1002),
        ("reserved data opcode", frame(0x83, b"", true), 1002),
        ("reserved control opcode", frame(0x8b, b"", true), 1002),
        (
            "continuation with nothing to continue",
            frame(0x80, b"x", true),
            1002,
        ),
        (
            "invalid UTF-8 text",
            frame(0x81, &[b'{', 0xff, 0xfe, b'}'], true),
            1007,
        ),
    ];
    for (what, bytes, expected) in cases {
        let mut tcp = handshaken(server.addr).await;
        tcp.write_all(&bytes).await.expect("frame");
        assert_eq!(close_code(&mut tcp).await, expected, "{what}");
    }
    assert_eq!(
        other.call(json!({"id": 1, "op": "ping"})).await,
        json!({"id": 1, "ok": {}}),
        "other connections are unaffected"
    );
}

#[tokio::test]
async fn a_client_that_pipelines_large_requests_and_reads_nothing_holds_at_most_its_budget() {
    let budget = 2 << 20;
    let config = WsConfig {
        pending_reply_bytes_max: budget,
        idle_close: Duration::from_secs(30),
        ..WsConfig::default()
    };
    let gauges = config.gauges.clone();
    let server = TestServer::with(Limits::default(), config).await;
    let filler = server.client().await;
    let set = filler.set("big");
    set.set_up(Duration::from_secs(600)).await.expect("set up");
    let keys: Vec<String> = (0..1000)
        .map(|i| format!("{i:04}{}", "k".repeat(996)))
        .collect();
    set.insert_many(keys).await.expect("insert");
    // 500 pages of 256 KiB asked for, 128 MB of replies, none read.
    let mut flood = server.raw().await;
    for id in 1..=500u64 {
        let page = json!({"id": id, "op": "members", "set": "big", "limit": 10_000});
        flood
            .ws
            .feed(Message::Text(page.to_string().into()))
            .await
            .expect("send");
    }
    flood.ws.flush().await.expect("flush");
    let canary = server.client().await;
    let started = Instant::now();
    for round in 0..20 {
        let guard = canary
            .lock(&format!("canary/{round}"), Duration::from_secs(10))
            .await
            .expect("the canary is served");
        guard.unlock().await.expect("unlock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let (held, peak) = (
        gauges.pending_reply_bytes(),
        gauges.pending_reply_bytes_peak(),
    );
    assert!(
        held > 0,
        "the flood's replies wait for it to read ({held} bytes held)"
    );
    let one_reply = Limits::default().message_bytes_max;
    assert!(
        peak <= budget + one_reply,
        "held at most the budget plus one reply: peak {peak} bytes"
    );
    drop(flood);
}

#[tokio::test]
async fn a_slow_handshake_is_dropped_and_other_requests_still_answer() {
    let config = WsConfig {
        handshake_timeout: Duration::from_millis(200),
        ..WsConfig::default()
    };
    let server = TestServer::with(Limits::default(), config).await;
    let mut slow = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("tcp");
    slow.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("partial head");
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), slow.read_to_end(&mut buffer)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "closed without an answer: {read:?} {buffer:?}"
    );
    let answer = http_get(server.addr, "/healthz").await;
    assert!(answer.starts_with("HTTP/1.1 404 Not Found"), "{answer}");
}

#[tokio::test]
async fn a_silent_client_is_pinged_then_closed() {
    let config = WsConfig {
        idle_ping: Duration::from_millis(100),
        idle_close: Duration::from_millis(300),
        ..WsConfig::default()
    };
    let server = TestServer::with(Limits::default(), config).await;
    let mut raw = server.raw().await;
    // A WebSocket client answers pings as it reads; a silent one never
    // reads. So read the raw bytes under the WebSocket once the server has
    // given up: its pings (0x89 0x00), then its close frame (0x88) with
    // code 1001.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(2),
        raw.ws.get_mut().read_to_end(&mut bytes),
    )
    .await;
    assert!(matches!(read, Ok(Ok(_))), "{read:?}");
    assert!(bytes.starts_with(&[0x89, 0x00]), "a ping first: {bytes:?}");
    let close = bytes
        .iter()
        .position(|&b| b == 0x88)
        .expect("a close frame");
    assert_eq!(
        &bytes[close + 2..close + 4],
        &1001u16.to_be_bytes(),
        "{bytes:?}"
    );
}

#[tokio::test]
async fn shutdown_answers_waiting_requests_and_closes_with_1001() {
    let mut server = TestServer::start().await;
    let mut holder = server.raw().await;
    holder.lock(1, "k", 10_000).await;
    let mut waiter = server.raw().await;
    waiter
        .send_json(json!({"id": 4, "op": "lock", "key": "k", "ttl_ms": 1000}))
        .await;
    while holder
        .call(json!({"id": 2, "op": "inspect", "key": "k"}))
        .await["ok"]["waiters"]
        != 1
    {}
    server.shutdown().await;
    let reply = waiter.recv().await;
    assert_eq!(
        (reply["id"].as_u64(), code(&reply)),
        (Some(4), "shutting_down")
    );
    match waiter.ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected close 1001, got {other:?}"),
    }
    let after = tokio::net::TcpStream::connect(server.addr).await;
    assert!(after.is_err(), "the listener is closed after shutdown");
}

#[tokio::test]
async fn distinct_sets_over_the_wire() {
    let server = TestServer::start().await;
    let mut a = server.raw().await;
    a.hello("a").await;
    let mut b = server.raw().await;
    b.hello("b").await;
    assert_eq!(
        code(
            &a.call(json!({"id": 1, "op": "insert", "set": "s", "key": "x"}))
                .await
        ),
        "no_such_set"
    );
    assert_eq!(
        a.call(json!({"id": 2, "op": "set_up", "set": "s", "ttl_ms": 60000}))
            .await["ok"],
        json!({"created": true, "size": 0})
    );
    assert_eq!(
        b.call(json!({"id": 2, "op": "set_up", "set": "s", "ttl_ms": 60000}))
            .await["ok"],
        json!({"created": false, "size": 0})
    );
    let batch = a
        .call(json!({"id": 3, "op": "insert", "set": "s", "keys": ["x", "y", "x"]}))
        .await;
    assert_eq!(
        batch["ok"]["results"],
        json!([{"index": 1, "first": true}, {"index": 2, "first": true}, {"index": 1, "first": true}])
    );
    assert_eq!(
        b.call(json!({"id": 4, "op": "insert", "set": "s", "key": "y"}))
            .await["ok"],
        json!({"index": 2, "first": false})
    );
    let page = b
        .call(json!({"id": 5, "op": "members", "set": "s", "limit": 1}))
        .await;
    assert_eq!(
        page["ok"],
        json!({"members": [{"index": 1, "key": "x"}], "next": 1})
    );
    let page = b
        .call(json!({"id": 6, "op": "members", "set": "s", "after": 1}))
        .await;
    assert_eq!(
        page["ok"],
        json!({"members": [{"index": 2, "key": "y"}], "next": null})
    );
    let info = b
        .call(json!({"id": 7, "op": "inspect_set", "set": "s"}))
        .await;
    assert_eq!(info["ok"]["size"], 2);
    assert_eq!(
        a.call(json!({"id": 8, "op": "tear_down", "set": "s"}))
            .await["ok"],
        json!({"size": 2})
    );
}

/// Not a raw-protocol test, but the cheapest place for it: a `Raw` client
/// must reach the same server the Rust client does.
#[tokio::test]
async fn the_rust_client_and_raw_json_share_one_server() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let guard = client
        .lock("shared", Duration::from_secs(10))
        .await
        .expect("lock");
    let mut raw: Raw = server.raw().await;
    let info = raw
        .call(json!({"id": 1, "op": "inspect", "key": "shared"}))
        .await;
    assert_eq!(info["ok"]["holder"]["token"], guard.token());
    assert_eq!(info["ok"]["holder"]["client"], client.client_id());
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    answer
}

/// Answers `/hello` and counts what it was asked, to show what reaches it.
#[derive(Debug, Default)]
struct Hello {
    asked: std::sync::Mutex<Vec<HttpRequest>>,
}

#[async_trait::async_trait]
impl HttpRoutes for Hello {
    async fn respond(&self, request: &HttpRequest) -> HttpResponse {
        self.asked
            .lock()
            .expect("not poisoned")
            .push(request.clone());
        match request.path.as_str() {
            "/hello" => HttpResponse::ok("text/plain", &b"hi\n"[..]),
            _ => HttpResponse::not_found(),
        }
    }
}

#[tokio::test]
async fn requests_other_than_ws_go_to_the_routes_and_ws_is_never_one_of_them() {
    let routes = Arc::new(Hello::default());
    let config = WsConfig {
        routes: routes.clone(),
        ..WsConfig::default()
    };
    let server = TestServer::with(Limits::default(), config).await;
    let hello = http_get(server.addr, "/hello?x=1").await;
    assert!(hello.starts_with("HTTP/1.1 200 OK"), "{hello}");
    assert!(
        hello.contains("Content-Type: text/plain\r\nContent-Length: 3\r\n")
            && hello.ends_with("\r\n\r\nhi\n"),
        "{hello}"
    );
    let nope = http_get(server.addr, "/nope").await;
    assert!(nope.starts_with("HTTP/1.1 404 Not Found"), "{nope}");
    let no_upgrade = http_get(server.addr, "/ws").await;
    assert!(no_upgrade.starts_with("HTTP/1.1 426"), "{no_upgrade}");
    let mut raw = server.raw().await;
    let pong = raw.call(json!({"id": 1, "op": "ping"})).await;
    assert_eq!(pong, json!({"id": 1, "ok": {}}));
    let asked = routes.asked.lock().expect("not poisoned").clone();
    assert_eq!(
        asked,
        [
            HttpRequest::new("GET", "/hello?x=1"),
            HttpRequest::new("GET", "/nope")
        ]
    );
}

#[tokio::test]
async fn by_default_the_port_serves_nothing_but_websocket() {
    let server = TestServer::start().await;
    for path in ["/", "/metrics", "/healthz", "/deadbolt.js"] {
        let answer = http_get(server.addr, path).await;
        assert!(
            answer.starts_with("HTTP/1.1 404 Not Found"),
            "{path}: {answer}"
        );
    }
}
