//! The HTTP side of the WebSocket port, as `run` serves it: the dashboard,
//! the browser client and its types, `/healthz`, `/metrics`, and what is
//! refused.

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadbolt_transport_ws::{HttpRequest, HttpResponse, HttpRoutes};
use serde_json::json;
use support::{TestServer, config, get, http};
use tokio::net::TcpStream;

#[tokio::test]
async fn the_port_serves_the_dashboard_the_browser_client_and_its_types() {
    let server = TestServer::start().await;
    let page = get(server.ws_addr, "/").await;
    assert!(
        page.starts_with("HTTP/1.1 200 OK") && page.contains("text/html"),
        "{page}"
    );
    assert_eq!(get(server.ws_addr, "/index.html").await, page);
    let script = get(server.ws_addr, "/deadbolt.js?v=1").await;
    assert!(
        script.contains("text/javascript") && script.contains("export"),
        "{script}"
    );
    let types = get(server.ws_addr, "/deadbolt.d.ts").await;
    assert!(
        types.starts_with("HTTP/1.1 200 OK") && types.contains("application/typescript"),
        "{types}"
    );
    let nope = get(server.ws_addr, "/nope").await;
    assert!(nope.starts_with("HTTP/1.1 404 Not Found"), "{nope}");
}

#[tokio::test]
async fn healthz_answers_ok_and_only_get_is_served() {
    let server = TestServer::start().await;
    let health = get(server.ws_addr, "/healthz").await;
    assert!(
        health.starts_with("HTTP/1.1 200 OK") && health.ends_with("\r\n\r\nok\n"),
        "{health}"
    );
    for head in [
        "POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        "DELETE / HTTP/1.1\r\n\r\n",
        "POST /ws HTTP/1.1\r\n\r\n",
    ] {
        let answer = http(server.ws_addr, head).await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{head}: {answer}");
    }
    let garbage = http(server.ws_addr, "\u{1}\u{2}\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_counters_sizes_latencies_and_errors() {
    let server = TestServer::start().await;
    let mut raw = server.raw().await;
    let granted = raw
        .call(json!({"id": 1, "op": "lock", "key": "k", "ttl_ms": 10_000}))
        .await;
    assert!(granted["ok"]["token"].is_u64(), "{granted}");
    raw.send("not json").await;
    raw.recv().await;
    // What the server does every few seconds: it must keep the samples.
    deadbolt_server::metrics::upkeep();
    let metrics = get(server.ws_addr, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    assert!(metrics.contains("text/plain; version=0.0.4"), "{metrics}");
    for name in [
        "deadbolt_grants_total",
        "deadbolt_locks_held",
        "deadbolt_waiters",
        "deadbolt_set_members",
        "deadbolt_inserts_total",
        "deadbolt_connections{frontend=\"websocket\"}",
        "deadbolt_ws_pending_reply_bytes",
        "deadbolt_ws_handshakes_evicted_total",
        "deadbolt_request_duration_seconds_bucket{op=\"lock\"",
        "deadbolt_errors_total{code=\"bad_request\"}",
    ] {
        assert!(metrics.contains(name), "no {name} in\n{metrics}");
    }
}

/// Answers `/extra`, to stand for what an embedder adds.
#[derive(Debug)]
struct Extra;

#[async_trait]
impl HttpRoutes for Extra {
    async fn respond(&self, request: &HttpRequest) -> HttpResponse {
        match request.path.as_str() {
            "/extra" => HttpResponse::ok("text/plain", &b"extra\n"[..]),
            _ => HttpResponse::status(410, "Gone"),
        }
    }
}

#[tokio::test]
async fn paths_the_server_does_not_serve_go_to_the_configured_routes() {
    let mut config = config();
    config.ws.routes = Arc::new(Extra);
    let server = TestServer::with(config).await;
    let extra = get(server.ws_addr, "/extra").await;
    assert!(extra.ends_with("\r\n\r\nextra\n"), "{extra}");
    let gone = get(server.ws_addr, "/nope").await;
    assert!(gone.starts_with("HTTP/1.1 410 Gone"), "{gone}");
    let health = get(server.ws_addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200 OK"), "{health}");
}

#[tokio::test]
async fn past_the_connection_limit_healthz_still_answers_and_upgrades_get_503() {
    let mut config = config();
    config.ws.max_connections = 1;
    let server = TestServer::with(config).await;
    let _held = server.raw().await;
    let health = get(server.ws_addr, "/healthz").await;
    assert!(health.ends_with("\r\n\r\nok\n"), "{health}");
    let upgrade = http(
        server.ws_addr,
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(
        upgrade.starts_with("HTTP/1.1 503 Service Unavailable"),
        "{upgrade}"
    );
}

#[tokio::test]
async fn healthz_and_a_new_client_get_through_a_flood_of_silent_sockets() {
    let mut config = config();
    config.ws.handshakes_max = 16;
    let gauges = config.ws.gauges.clone();
    let server = TestServer::with(config).await;
    // Four times the handshake bound, each socket silent for as long as the
    // 10 s handshake timeout lets it.
    let mut silent = Vec::new();
    for _ in 0..64 {
        silent.push(TcpStream::connect(server.ws_addr).await.expect("tcp"));
    }
    let evicted = async {
        while gauges.handshakes_evicted() < 48 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), evicted)
        .await
        .expect("the oldest silent sockets make room");
    let health = tokio::time::timeout(Duration::from_secs(2), get(server.ws_addr, "/healthz"))
        .await
        .expect("answered at once, not after the silent sockets time out");
    assert!(health.ends_with("\r\n\r\nok\n"), "{health}");
    let client = tokio::time::timeout(Duration::from_secs(2), server.ws_client())
        .await
        .expect("connects at once");
    let guard = client
        .lock("k", Duration::from_secs(10))
        .await
        .expect("lock");
    assert!(guard.token() > 0);
    assert!(gauges.handshakes() <= 16);
}
