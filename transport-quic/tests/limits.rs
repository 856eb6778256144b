//! The QUIC frontend's limits and connection lifecycle: address-validation
//! retry, the connection limit, the streams a connection may have open,
//! oversize messages, and a client that goes silent until its connection
//! idles out.

use std::net::SocketAddr;
use std::time::Duration;

use deadbolt_core::client::{Client, ClientOptions, LockOptions};
use deadbolt_core::proto::{Acquire, LockOp, Okay, Op, Wait};
use deadbolt_core::{Engine, EngineConfig, Limits};
use deadbolt_transport_quic::{LossyRelay, QuicConfig, QuicConnector, Trust};

mod support;

use support::Server;

async fn start(config: QuicConfig, limits: Limits) -> Server {
    let engine = Engine::start(EngineConfig {
        shards: 1,
        limits,
        ..EngineConfig::new()
    });
    support::serve(engine, config)
}

fn connector(server: &Server, to: SocketAddr, config: &QuicConfig) -> QuicConnector {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let client_config =
        deadbolt_transport_quic::client_config(&Trust::CaPem(server.ca.clone()), config)
            .expect("client config");
    QuicConnector::new(endpoint, client_config, to, "localhost")
}

async fn client(server: &Server) -> Result<Client, deadbolt_core::client::Error> {
    client_to(server, server.addr, &QuicConfig::default()).await
}

/// A client of `server` that sends to `to` (the server, or a relay to it),
/// with the transport settings of `config`.
async fn client_to(
    server: &Server,
    to: SocketAddr,
    config: &QuicConfig,
) -> Result<Client, deadbolt_core::client::Error> {
    let options = ClientOptions {
        retry_for: Duration::ZERO,
        ..ClientOptions::default()
    };
    let connect = Client::connect(connector(server, to, config), options);
    tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .expect("connected or refused within 10 s")
}

/// A client connected through its own relay, which counts the Retry
/// packets the server sends it.
async fn client_through_relay(server: &Server) -> (Client, LossyRelay) {
    let relay = LossyRelay::start(server.addr, 0.0, 1).await.expect("relay");
    let client = client_to(server, relay.addr(), &QuicConfig::default())
        .await
        .expect("connect");
    (client, relay)
}

#[tokio::test]
async fn clients_still_connect_when_the_server_asks_them_to_prove_their_address() {
    let config = QuicConfig {
        retry_above: 0,
        ..QuicConfig::default()
    };
    let server = start(config, Limits::default()).await;
    let (client, relay) = client_through_relay(&server).await;
    // Normally exactly one; an Initial that the client sent again on a slow
    // machine (before the first Retry arrived) is answered with another.
    let retries = relay.retries();
    assert!(retries >= 1, "the server asked for a Retry");
    client.ping().await.expect("ping");
    assert_eq!(relay.retries(), retries, "none once connected");
}

#[tokio::test]
async fn a_retry_is_asked_only_with_retry_above_connections_open() {
    let config = QuicConfig {
        retry_above: 1,
        ..QuicConfig::default()
    };
    let server = start(config, Limits::default()).await;
    let (first, first_relay) = client_through_relay(&server).await;
    assert_eq!(first_relay.retries(), 0, "no connection open: no Retry");
    let (second, second_relay) = client_through_relay(&server).await;
    // At least one (see the test above for why not exactly one).
    let retries = second_relay.retries();
    assert!(retries >= 1, "one connection open: a Retry");
    first.ping().await.expect("the first works");
    second
        .ping()
        .await
        .expect("the second works, once validated");
    assert_eq!(first_relay.retries(), 0);
    assert_eq!(second_relay.retries(), retries, "none once connected");
}

#[tokio::test]
async fn connections_past_the_limit_are_refused() {
    let config = QuicConfig {
        max_connections: 1,
        ..QuicConfig::default()
    };
    let server = start(config, Limits::default()).await;
    let first = client(&server).await.expect("first");
    let refused = client(&server).await.expect_err("second is refused");
    assert!(refused.to_string().contains("cannot connect"), "{refused}");
    first.ping().await.expect("the first still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_stream_allowance_grows_with_its_requests_up_to_the_limit() {
    let config = QuicConfig {
        streams_per_connection: 48,
        initial_streams: 4,
        ..QuicConfig::default()
    };
    let server = start(config, Limits::default()).await;
    let holder = client(&server).await.expect("holder");
    let no_copies = ClientOptions {
        hedging: None,
        ..ClientOptions::default()
    };
    let connect = Client::connect(
        connector(&server, server.addr, &QuicConfig::default()),
        no_copies,
    );
    let waiter = connect.await.expect("waiter");
    let lock = |i: usize, wait: Wait| {
        Op::Lock(LockOp::Acquire(Acquire::mutex(
            format!("k/{i}"),
            30_000,
            wait,
        )))
    };
    let mut tokens = Vec::new();
    for i in 0..60 {
        match holder.call(lock(i, Wait::Never)).await.expect("lock") {
            Okay::Granted(granted) => tokens.push(granted.token),
            other => panic!("not a grant: {other:?}"),
        }
    }
    let waiting: Vec<_> = (0..60)
        .map(|i| {
            let (waiter, op) = (waiter.clone(), lock(i, Wait::Forever));
            tokio::spawn(async move { waiter.call(op).await })
        })
        .collect();
    // Far past the first 4 streams, and never past the 48 allowed.
    let queued = async || holder.stats(1).await.expect("stats").locks.waiters;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while queued().await < 48 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} waiting",
            queued().await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(queued().await, 48, "one stream per request, 48 at most");
    for (i, token) in tokens.into_iter().enumerate() {
        holder
            .unlock(&format!("k/{i}"), token)
            .await
            .expect("unlock");
    }
    for waiting in waiting {
        let granted = waiting.await.expect("task").expect("granted");
        assert!(matches!(granted, Okay::Granted(_)), "{granted:?}");
    }
}

#[tokio::test]
async fn an_oversize_message_gets_too_large_and_the_connection_stays_usable() {
    let limits = Limits {
        message_bytes_max: 1000,
        ..Limits::default()
    };
    let server = start(QuicConfig::default(), limits).await;
    let (_endpoint, conn) = support::bare_connection(&server).await;
    let exchange = async |text: String| {
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        send.write_all(text.as_bytes()).await.expect("write");
        send.finish().expect("finish");
        let reply = recv.read_to_end(1 << 20).await.expect("reply");
        serde_json::from_slice::<serde_json::Value>(&reply).expect("JSON")
    };
    let big = format!(r#"{{"id":1,"op":"ping","pad":"{}"}}"#, "x".repeat(2000));
    let reply = exchange(big).await;
    assert_eq!(reply["err"]["code"], "too_large", "{reply}");
    assert_eq!(reply["id"], serde_json::Value::Null);
    let reply = exchange(r#"{"id":2,"op":"ping"}"#.to_owned()).await;
    assert_eq!(reply, serde_json::json!({"id": 2, "ok": {}}));
}

#[tokio::test]
async fn a_client_that_goes_silent_loses_its_ephemeral_locks_when_its_connection_idles_out() {
    // The idle timeout both ends agree on is the shorter of theirs, so the
    // observer, which waits in silence, keeps its own connection alive.
    let config = QuicConfig {
        idle_timeout: Duration::from_millis(800),
        keep_alive: Duration::from_millis(200),
        ..QuicConfig::default()
    };
    let server = start(config.clone(), Limits::default()).await;
    let relay = LossyRelay::start(server.addr, 0.0, 1).await.expect("relay");
    let silent = client_to(&server, relay.addr(), &config)
        .await
        .expect("connect");
    // The server's idle clock restarts with each packet it gets from the
    // silent client, the last of which comes after the lock request: so
    // the release comes at least idle_timeout after this.
    let started = tokio::time::Instant::now();
    let ephemeral = LockOptions::new(Duration::from_secs(60)).ephemeral(true);
    silent
        .lock_with("e", ephemeral)
        .await
        .expect("lock")
        .expect("granted")
        .detach();
    relay.set_loss(1.0); // the link dies without a word
    let observer = client_to(&server, server.addr, &config)
        .await
        .expect("observer");
    let guard = observer
        .lock_timeout("e", Duration::from_secs(1), Duration::from_secs(10))
        .await
        .expect("wait");
    assert!(
        guard.is_some(),
        "released once the silent connection idled out"
    );
    let waited = started.elapsed();
    assert!(
        waited >= config.idle_timeout,
        "not before the idle timeout: {waited:?}"
    );
}
