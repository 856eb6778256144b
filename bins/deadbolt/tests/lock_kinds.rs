//! SPEC section 7 end to end, each rule over WebSocket and over QUIC
//! against a server run as `deadbolt serve` runs it: shared locks,
//! counting semaphores, `conflict`, lock delay, `inspect` with every
//! holder, pushed events (`notify`, `watch`, their bounds); and (SPEC
//! section 5) an unknown field refused by name.

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
/// Over WebSocket, pushed events read while waiting for a reply are kept
/// for [`Raw::event`].
enum Raw {
    Ws(
        Box<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>>,
        Vec<Value>,
    ),
    Quic(quinn::Connection),
}

/// The events of one request: over QUIC its own stream, read a line at a
/// time; over WebSocket the connection's frames that carry its id.
struct Feed {
    id: u64,
    quic: Option<(quinn::SendStream, quinn::RecvStream)>,
    buffer: Vec<u8>,
}

/// How long a test waits for an event that must come.
const EVENT_WAIT: Duration = Duration::from_secs(10);

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
                Raw::Ws(Box::new(ws), Vec::new())
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
            Raw::Ws(ws, stash) => {
                ws.send(Message::Text(text.into())).await.expect("send");
                loop {
                    let message = ws_message(ws, Duration::from_secs(5))
                        .await
                        .expect("reply in time");
                    if message.get("event").is_some() {
                        stash.push(message);
                        continue;
                    }
                    return message;
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

    /// Sends `request`, which asks for events; returns its reply and the
    /// feed of its events.
    async fn subscribe(&mut self, request: Value) -> (Value, Feed) {
        let id = request["id"].as_u64().expect("id");
        let mut feed = Feed {
            id,
            quic: None,
            buffer: Vec::new(),
        };
        let reply = match self {
            Raw::Ws(..) => self.call(request).await,
            Raw::Quic(conn) => {
                let (mut send, recv) = conn.open_bi().await.expect("stream");
                send.write_all(request.to_string().as_bytes())
                    .await
                    .expect("write");
                send.finish().expect("finish");
                feed.quic = Some((send, recv));
                // The reply is the first line (or, with no events to
                // follow, the whole stream).
                next_line(&mut feed, EVENT_WAIT)
                    .await
                    .expect("reply in time")
                    .expect("a reply")
            }
        };
        (reply, feed)
    }

    /// The feed's next event within `wait`: `Err` if none came in time,
    /// `Ok(None)` if its events ended (over QUIC the server finished the
    /// stream; over WebSocket nothing says so).
    async fn event_within(&mut self, feed: &mut Feed, wait: Duration) -> Result<Option<Value>, ()> {
        match self {
            Raw::Ws(ws, stash) => {
                if let Some(at) = stash.iter().position(|e| e["id"] == feed.id) {
                    return Ok(Some(stash.remove(at)));
                }
                let deadline = Instant::now() + wait;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let message = ws_message(ws, left).await.ok_or(())?;
                    if message["id"] == feed.id && message.get("event").is_some() {
                        return Ok(Some(message));
                    }
                    stash.push(message);
                }
            }
            Raw::Quic(_) => next_line(feed, wait).await.ok_or(()),
        }
    }

    /// The feed's next event, which must come.
    async fn event(&mut self, feed: &mut Feed) -> Value {
        self.event_within(feed, EVENT_WAIT)
            .await
            .expect("an event in time")
            .expect("the events go on")
    }
}

/// The next text message of a WebSocket, as JSON, within `wait`.
async fn ws_message(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    wait: Duration,
) -> Option<Value> {
    loop {
        match tokio::time::timeout(wait, ws.next()).await.ok()? {
            Some(Ok(Message::Text(text))) => {
                return Some(serde_json::from_str(&text).expect("JSON"));
            }
            Some(Ok(_)) => continue,
            other => panic!("connection ended: {other:?}"),
        }
    }
}

/// The next line of a QUIC feed within `wait` (`None` if none came in
/// time); `Some(None)` once the stream has ended.
async fn next_line(feed: &mut Feed, wait: Duration) -> Option<Option<Value>> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(end) = feed.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = feed.buffer.drain(..=end).collect();
            return Some(Some(serde_json::from_slice(&line).expect("a JSON line")));
        }
        let (_, recv) = feed.quic.as_mut().expect("a QUIC feed");
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, recv.read(&mut chunk))
            .await
            .ok()?
        {
            Ok(Some(n)) => feed.buffer.extend_from_slice(&chunk[..n]),
            Ok(None) | Err(_) if feed.buffer.is_empty() => return Some(None),
            Ok(None) | Err(_) => {
                let rest = std::mem::take(&mut feed.buffer);
                return Some(Some(serde_json::from_slice(&rest).expect("JSON")));
            }
        }
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
    notify_warns_at_a_third_of_the_lease_left_then_reports_it_lost,
    notify_works_the_same_on_a_durable_server,
    an_extend_rearms_expiring_and_an_own_unlock_ends_the_events_without_lost,
    an_unlock_by_another_client_is_lost_revoked,
    watch_key_pushes_grants_releases_and_expiries_until_cancelled,
    watch_set_pushes_created_expired_and_torn_down,
    watches_are_bounded_per_connection_and_a_live_id_is_not_reused,
    a_guard_with_notify_hears_expiring_and_then_lost_from_the_server,
    a_guard_with_notify_is_lost_at_once_when_another_client_unlocks_it,
    the_client_watches_a_key_and_a_set,
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

/// The token of a granted `lock` reply.
fn token_of(reply: &Value) -> u64 {
    reply["ok"]["token"]
        .as_u64()
        .unwrap_or_else(|| panic!("a grant: {reply}"))
}

/// After its events end: over QUIC the stream is finished; over
/// WebSocket nothing more comes for the request.
async fn assert_events_over(raw: &mut Raw, feed: &mut Feed, t: Transport) {
    let after = raw.event_within(feed, Duration::from_millis(500)).await;
    match t {
        Transport::Quic => assert_eq!(after, Ok(None), "the stream is finished"),
        Transport::Ws => assert_eq!(after, Err(()), "nothing more comes"),
    }
}

async fn notify_warns_at_a_third_of_the_lease_left_then_reports_it_lost(t: Transport) {
    let server = InProcess::start(None).await;
    expiring_then_lost(&server, t).await;
    server.stop().await;
}

async fn notify_works_the_same_on_a_durable_server(t: Transport) {
    let dir = tempfile::tempdir().expect("temp dir");
    let disk = std::sync::Arc::new(deadbolt_storage::StdDisk);
    let server = InProcess::durable(disk, dir.path()).await;
    expiring_then_lost(&server, t).await;
    server.stop().await;
}

async fn expiring_then_lost(server: &InProcess, t: Transport) {
    let mut raw = Raw::open(server, t).await;
    let ttl = Duration::from_millis(900);
    let sent = Instant::now();
    let lock = json!({"id": 1, "op": "lock", "key": "k", "ttl_ms": 900, "notify": true});
    let (reply, mut feed) = raw.subscribe(lock).await;
    let token = token_of(&reply);
    let expiring = raw.event(&mut feed).await;
    assert_eq!(
        (&expiring["id"], &expiring["event"], &expiring["token"]),
        (&json!(1), &json!("expiring"), &json!(token)),
        "{expiring}"
    );
    let remaining = expiring["remaining_ms"].as_u64().expect("remaining_ms");
    assert!(remaining <= 300, "a third of the lease is left: {expiring}");
    assert!(
        sent.elapsed() >= ttl * 2 / 3,
        "not before: {:?}",
        sent.elapsed()
    );
    let lost = raw.event(&mut feed).await;
    assert_eq!(
        lost,
        json!({"id": 1, "event": "lost", "token": token, "reason": "expired"})
    );
    assert!(sent.elapsed() >= ttl, "not before the lease ran out");
    assert_events_over(&mut raw, &mut feed, t).await;
}

async fn an_extend_rearms_expiring_and_an_own_unlock_ends_the_events_without_lost(t: Transport) {
    let server = InProcess::start(None).await;
    let mut raw = Raw::open(&server, t).await;
    let lock = json!({"id": 1, "op": "lock", "key": "k", "ttl_ms": 1200, "notify": true});
    let (reply, mut feed) = raw.subscribe(lock).await;
    let token = token_of(&reply);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let extend_sent = Instant::now();
    let extend = json!({"id": 2, "op": "extend", "key": "k", "token": token, "ttl_ms": 1200});
    assert_eq!(raw.call(extend).await["ok"]["ttl_ms"], 1200);
    let expiring = raw.event(&mut feed).await;
    assert_eq!(expiring["event"], "expiring", "{expiring}");
    assert!(
        extend_sent.elapsed() >= Duration::from_millis(800),
        "the extend moved the warning to a third of its own lease: {:?}",
        extend_sent.elapsed()
    );
    let unlock = json!({"id": 3, "op": "unlock", "key": "k", "token": token});
    assert_eq!(raw.call(unlock).await["ok"], json!({}));
    assert_events_over(&mut raw, &mut feed, t).await;
    server.stop().await;
}

async fn an_unlock_by_another_client_is_lost_revoked(t: Transport) {
    let server = InProcess::start(None).await;
    let (mut holder, mut other) = (Raw::open(&server, t).await, Raw::open(&server, t).await);
    let lock = json!({"id": 7, "op": "lock", "key": "k", "ttl_ms": 30000, "notify": true});
    let (reply, mut feed) = holder.subscribe(lock).await;
    let token = token_of(&reply);
    let unlock = json!({"id": 1, "op": "unlock", "key": "k", "token": token});
    assert_eq!(other.call(unlock).await["ok"], json!({}));
    let lost = holder.event(&mut feed).await;
    assert_eq!(
        lost,
        json!({"id": 7, "event": "lost", "token": token, "reason": "revoked"})
    );
    assert_events_over(&mut holder, &mut feed, t).await;
    server.stop().await;
}

async fn watch_key_pushes_grants_releases_and_expiries_until_cancelled(t: Transport) {
    let server = InProcess::start(None).await;
    let mut raw = Raw::open(&server, t).await;
    let (reply, mut feed) = raw
        .subscribe(json!({"id": 5, "op": "watch", "key": "k"}))
        .await;
    assert_eq!(reply, json!({"id": 5, "ok": {}}));
    let a = client(&server, t).await;
    let guard = a.lock("k", TTL).await.expect("lock");
    let first = guard.token();
    let event =
        |name: &str, token: u64| json!({"id": 5, "event": name, "key": "k", "token": token});
    assert_eq!(raw.event(&mut feed).await, event("granted", first));
    guard.unlock().await.expect("unlock");
    assert_eq!(raw.event(&mut feed).await, event("released", first));
    let short = a.lock("k", Duration::from_millis(200)).await.expect("lock");
    let second = short.token();
    short.detach(); // its lease runs out
    assert_eq!(raw.event(&mut feed).await, event("granted", second));
    assert_eq!(raw.event(&mut feed).await, event("expired", second));
    let cancel = raw
        .call(json!({"id": 6, "op": "cancel", "target": 5}))
        .await;
    assert_eq!(cancel, json!({"id": 6, "ok": {}}));
    let _again = a.lock("k", TTL).await.expect("lock");
    assert_events_over(&mut raw, &mut feed, t).await;
    server.stop().await;
}

async fn watch_set_pushes_created_expired_and_torn_down(t: Transport) {
    let server = InProcess::start(None).await;
    let (mut raw, mut other) = (Raw::open(&server, t).await, Raw::open(&server, t).await);
    let (reply, mut feed) = raw
        .subscribe(json!({"id": 9, "op": "watch", "set": "s"}))
        .await;
    assert_eq!(reply["ok"], json!({}), "{reply}");
    let event = |name: &str| json!({"id": 9, "event": name, "set": "s"});
    let short = json!({"id": 1, "op": "set_up", "set": "s", "ttl_ms": 200});
    assert_eq!(other.call(short).await["ok"]["created"], true);
    assert_eq!(raw.event(&mut feed).await, event("created"));
    assert_eq!(raw.event(&mut feed).await, event("expired"));
    let long = json!({"id": 2, "op": "set_up", "set": "s", "ttl_ms": 30000});
    assert_eq!(other.call(long).await["ok"]["created"], true);
    assert_eq!(raw.event(&mut feed).await, event("created"));
    let tear_down = json!({"id": 3, "op": "tear_down", "set": "s"});
    assert_eq!(other.call(tear_down).await["ok"]["size"], 0);
    assert_eq!(raw.event(&mut feed).await, event("torn_down"));
    server.stop().await;
}

async fn watches_are_bounded_per_connection_and_a_live_id_is_not_reused(t: Transport) {
    let mut config = deadbolt_server::ServerConfig::default();
    config.engine.limits.watches_per_connection_max = 2;
    let server = InProcess::start_with(config).await;
    let mut raw = Raw::open(&server, t).await;
    let (watch, _feed) = raw
        .subscribe(json!({"id": 1, "op": "watch", "key": "a"}))
        .await;
    assert_eq!(watch["ok"], json!({}), "{watch}");
    let lock = json!({"id": 2, "op": "lock", "key": "b", "ttl_ms": 30000, "notify": true});
    let (granted, _notified) = raw.subscribe(lock).await;
    token_of(&granted);
    let (refused, _) = raw
        .subscribe(json!({"id": 3, "op": "watch", "set": "c"}))
        .await;
    assert_eq!(refused["err"]["code"], "overloaded", "{refused}");
    let reused = raw.call(json!({"id": 1, "op": "ping"})).await;
    assert_eq!(reused["err"]["code"], "bad_request", "{reused}");
    let cancel = raw
        .call(json!({"id": 4, "op": "cancel", "target": 1}))
        .await;
    assert_eq!(cancel["ok"], json!({}));
    let (room, _feed) = raw
        .subscribe(json!({"id": 3, "op": "watch", "set": "c"}))
        .await;
    assert_eq!(room["ok"], json!({}), "room again after the cancel: {room}");
    server.stop().await;
}

async fn a_guard_with_notify_hears_expiring_and_then_lost_from_the_server(t: Transport) {
    let server = InProcess::start(None).await;
    let a = client(&server, t).await;
    let ttl = Duration::from_millis(900);
    let options = LockOptions::new(ttl).notify(true);
    let guard = a
        .lock_with("k", options)
        .await
        .expect("lock")
        .expect("free");
    tokio::time::timeout(EVENT_WAIT, guard.expiring())
        .await
        .expect("a third of the lease left");
    assert!(guard.is_held(), "expiring comes before the lease ends");
    tokio::time::timeout(EVENT_WAIT, guard.lost())
        .await
        .expect("then lost");
    assert!(!guard.is_held());
    guard.detach();
    server.stop().await;
}

async fn a_guard_with_notify_is_lost_at_once_when_another_client_unlocks_it(t: Transport) {
    let server = InProcess::start(None).await;
    let (a, b) = (client(&server, t).await, client(&server, t).await);
    let options = LockOptions::new(TTL).notify(true);
    let guard = a
        .lock_with("k", options)
        .await
        .expect("lock")
        .expect("free");
    assert!(guard.is_held());
    b.unlock("k", guard.token()).await.expect("unlock by token");
    // The lease view alone would say 30 s more: the pushed `lost` ends it.
    tokio::time::timeout(EVENT_WAIT, guard.lost())
        .await
        .expect("lost, from the server's event");
    assert!(!guard.is_held());
    guard.detach();
    server.stop().await;
}

async fn the_client_watches_a_key_and_a_set(t: Transport) {
    use deadbolt_core::proto::EventName;
    let server = InProcess::start(None).await;
    let (a, b) = (client(&server, t).await, client(&server, t).await);
    let mut keys = a.watch_key("k").await.expect("watch key");
    let mut sets = a.watch_set("s").await.expect("watch set");
    let next = async |watch: &mut deadbolt_core::client::Watch| {
        tokio::time::timeout(EVENT_WAIT, watch.next())
            .await
            .expect("an event in time")
            .expect("the watch goes on")
    };
    let guard = b.lock("k", TTL).await.expect("lock");
    let granted = next(&mut keys).await;
    assert_eq!(
        (granted.event, granted.key.as_deref(), granted.token),
        (EventName::Granted, Some("k"), Some(guard.token()))
    );
    guard.unlock().await.expect("unlock");
    assert_eq!(next(&mut keys).await.event, EventName::Released);
    b.set("s").set_up(TTL).await.expect("set up");
    let created = next(&mut sets).await;
    assert_eq!(
        (created.event, created.set.as_deref()),
        (EventName::Created, Some("s"))
    );
    b.set("s").tear_down().await.expect("tear down");
    assert_eq!(next(&mut sets).await.event, EventName::TornDown);
    server.stop().await;
}
