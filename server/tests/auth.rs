//! Authentication and authorisation (SPEC section 10), as `run` serves
//! them: `hello` with `auth`, every op refused outside its principal's
//! grants with nothing changed (over WebSocket, and over QUIC), client ids
//! owned by principals, tokens hidden from other clients, quotas, the
//! operator routes kept for admins, a reloaded policy applied to open
//! connections, `Origin` checked on upgrades, and `wss://`.

mod support;

use std::sync::Arc;

use deadbolt_core::auth::Auth;
use deadbolt_core::client::{Client, ClientOptions};
use deadbolt_core::proto::{ErrorCode, Secret};
use deadbolt_server::ServerConfig;
use deadbolt_server::auth_file;
use deadbolt_transport_quic::{QuicConfig, QuicConnector, Trust};
use serde_json::{Value, json};
use support::{Raw, TestServer, code, config, get, http};

/// Three principals: an admin; workers, who may lock `jobs/`, change sets
/// under `results/` and read both; and one with no grants at all.
const POLICY: &str = r#"
    [[principal]]
    name = "ops"
    secret = "ops-secret"
    locks = [""]
    sets = [""]
    read = [""]
    admin = true

    [[principal]]
    name = "workers"
    secret = "workers-secret"
    locks = ["jobs/"]
    sets = ["results/"]
    read = ["jobs/", "results/"]
    locks_max = 2
    waiters_max = 1
    sets_max = 1
    members_max = 3

    [[principal]]
    name = "nobody"
    secret = "nobody-secret"
"#;

fn auth(text: &str) -> Arc<Auth> {
    Arc::new(Auth::new(auth_file::parse(text).expect("a valid policy")))
}

fn with_auth(auth: &Arc<Auth>) -> ServerConfig {
    let mut config = config();
    config.engine.auth = Some(Arc::clone(auth));
    config
}

async fn start() -> TestServer {
    TestServer::with(with_auth(&auth(POLICY))).await
}

/// A raw connection that said `hello` as `client` with `secret`.
async fn as_principal(server: &TestServer, client: &str, secret: &str) -> Raw {
    let mut raw = server.raw().await;
    let hello = raw
        .call(json!({"id": 1, "op": "hello", "client": client, "auth": secret}))
        .await;
    assert_eq!(hello["ok"]["client"], client, "{hello}");
    raw
}

#[tokio::test]
async fn nothing_but_hello_with_a_known_secret_is_answered_before_it() {
    let server = start().await;
    let mut raw = server.raw().await;
    let ping = raw.call(json!({"id": 1, "op": "ping"})).await;
    assert_eq!(code(&ping), "unauthorized", "{ping}");
    let lock = json!({"id": 2, "op": "lock", "key": "jobs/1", "ttl_ms": 1000, "wait_ms": 0});
    assert_eq!(code(&raw.call(lock.clone()).await), "unauthorized");
    let bare = raw
        .call(json!({"id": 3, "op": "hello", "client": "c"}))
        .await;
    assert_eq!(code(&bare), "unauthorized", "{bare}");
    let wrong = json!({"id": 4, "op": "hello", "client": "c", "auth": "guess"});
    let wrong = raw.call(wrong).await;
    assert_eq!(code(&wrong), "unauthorized");
    assert!(!wrong.to_string().contains("guess"), "{wrong}");
    let right = json!({"id": 5, "op": "hello", "client": "c", "auth": "workers-secret"});
    assert!(raw.call(right).await["ok"].is_object());
    assert!(raw.call(json!({"id": 6, "op": "ping"})).await["ok"].is_object());
    assert!(raw.call(lock).await["ok"]["token"].is_u64());
}

/// Every op of the protocol, as a principal without the grant sends it,
/// about the key `jobs/a` (held by `ops` with `token`) and the set
/// `results/s` (holding `x`).
fn every_op(token: u64) -> Vec<Value> {
    vec![
        json!({"op": "lock", "key": "jobs/a", "ttl_ms": 60000, "wait_ms": 0}),
        json!({"op": "lock", "key": "jobs/fresh", "ttl_ms": 60000}),
        json!({"op": "unlock", "key": "jobs/a", "token": token}),
        json!({"op": "extend", "key": "jobs/a", "token": token, "ttl_ms": 1}),
        json!({"op": "inspect", "key": "jobs/a"}),
        json!({"op": "set_up", "set": "results/s", "ttl_ms": 1}),
        json!({"op": "set_up", "set": "results/fresh", "ttl_ms": 60000}),
        json!({"op": "insert", "set": "results/s", "key": "y"}),
        json!({"op": "insert", "set": "results/s", "keys": ["y", "z"]}),
        json!({"op": "members", "set": "results/s"}),
        json!({"op": "inspect_set", "set": "results/s"}),
        json!({"op": "tear_down", "set": "results/s"}),
        json!({"op": "stats"}),
        json!({"op": "watch", "key": "jobs/a"}),
        json!({"op": "watch", "set": "results/s"}),
        json!({"op": "lock", "key": "jobs/b", "ttl_ms": 60000, "notify": true}),
    ]
}

/// What the admin sees of `jobs/a`, `jobs/fresh`, `results/s` and
/// `results/fresh`.
async fn state(admin: &mut Raw) -> Vec<Value> {
    let mut seen = Vec::new();
    for (id, op) in [
        json!({"op": "inspect", "key": "jobs/a"}),
        json!({"op": "inspect", "key": "jobs/fresh"}),
        json!({"op": "members", "set": "results/s"}),
        json!({"op": "inspect_set", "set": "results/fresh"}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut request = op;
        request["id"] = json!(100 + id);
        let mut reply = admin.call(request).await;
        // The lease runs down between two looks: not a change.
        if let Some(holder) = reply["ok"]["holder"].as_object_mut() {
            holder.remove("remaining_ms");
        }
        if let Some(holders) = reply["ok"]["holders"].as_array_mut() {
            for holder in holders.iter_mut().filter_map(Value::as_object_mut) {
                holder.remove("remaining_ms");
            }
        }
        seen.push(reply);
    }
    seen
}

/// `ops` takes `jobs/a` and fills `results/s` with `x`; the token.
async fn prepare(admin: &mut Raw) -> u64 {
    let lock = json!({"id": 10, "op": "lock", "key": "jobs/a", "ttl_ms": 60000});
    let token = admin.call(lock).await["ok"]["token"]
        .as_u64()
        .expect("granted");
    let set_up = json!({"id": 11, "op": "set_up", "set": "results/s", "ttl_ms": 60000});
    assert!(admin.call(set_up).await["ok"]["created"] == true);
    let insert = json!({"id": 12, "op": "insert", "set": "results/s", "key": "x"});
    assert!(admin.call(insert).await["ok"]["first"] == true);
    token
}

#[tokio::test]
async fn every_op_without_its_grant_is_unauthorized_over_websocket_and_changes_nothing() {
    let server = start().await;
    let mut admin = as_principal(&server, "admin-1", "ops-secret").await;
    let token = prepare(&mut admin).await;
    let before = state(&mut admin).await;
    let mut nobody = as_principal(&server, "nobody-1", "nobody-secret").await;
    for (id, mut op) in every_op(token).into_iter().enumerate() {
        op["id"] = json!(id);
        let reply = nobody.call(op.clone()).await;
        assert_eq!(code(&reply), "unauthorized", "{op} → {reply}");
        assert_eq!(reply["id"], json!(id));
    }
    assert_eq!(state(&mut admin).await, before);
}

#[tokio::test]
async fn grants_are_by_prefix_and_kind_of_op() {
    let server = start().await;
    let mut admin = as_principal(&server, "admin-1", "ops-secret").await;
    let before = state(&mut admin).await;
    let mut workers = as_principal(&server, "worker-1", "workers-secret").await;
    // Outside the prefixes: a lock, a set, reads; and `stats`.
    for (id, op) in [
        json!({"op": "lock", "key": "other", "ttl_ms": 1000, "wait_ms": 0}),
        json!({"op": "set_up", "set": "jobs/fresh", "ttl_ms": 1000}),
        json!({"op": "inspect", "key": "other"}),
        json!({"op": "members", "set": "other"}),
        json!({"op": "stats"}),
        json!({"op": "watch", "key": "other"}),
        json!({"op": "watch", "set": "other"}),
    ]
    .into_iter()
    .enumerate()
    {
        let mut request = op.clone();
        request["id"] = json!(id);
        assert_eq!(code(&workers.call(request).await), "unauthorized", "{op}");
    }
    assert_eq!(state(&mut admin).await, before);
    // Inside them: granted.
    let lock = json!({"id": 20, "op": "lock", "key": "jobs/1", "ttl_ms": 1000, "wait_ms": 0});
    assert!(workers.call(lock).await["ok"]["token"].is_u64());
    let set_up = json!({"id": 21, "op": "set_up", "set": "results/1", "ttl_ms": 1000});
    assert!(workers.call(set_up).await["ok"].is_object());
    let members = json!({"id": 22, "op": "members", "set": "results/1"});
    assert!(workers.call(members).await["ok"].is_object());
    // A watch needs the `read` grant of its key or set.
    let watch = json!({"id": 23, "op": "watch", "key": "jobs/1"});
    assert_eq!(workers.call(watch).await["ok"], json!({}));
}

#[tokio::test]
async fn over_quic_an_op_without_its_grant_is_unauthorized_and_changes_nothing() {
    let server = start().await;
    let mut admin = as_principal(&server, "admin-1", "ops-secret").await;
    let before = state(&mut admin).await;
    let trust = Trust::CaPem(server.ca_pem.clone());
    let url = format!("quic://localhost:{}", server.quic_addr.port());
    let connector = QuicConnector::from_url(&url, &trust, &QuicConfig::default())
        .await
        .expect("quic connector");
    let options = ClientOptions {
        auth: Some(Secret::new("nobody-secret")),
        ..ClientOptions::default()
    };
    let nobody = Client::connect(connector, options).await.expect("hello");
    let refused = nobody
        .try_lock("jobs/fresh", std::time::Duration::from_secs(60))
        .await
        .expect_err("no grant");
    assert_eq!(refused.code(), Some(ErrorCode::Unauthorized), "{refused}");
    let refused = nobody
        .set("results/fresh")
        .set_up(std::time::Duration::from_secs(60))
        .await;
    assert_eq!(
        refused.expect_err("no grant").code(),
        Some(ErrorCode::Unauthorized)
    );
    assert_eq!(state(&mut admin).await, before);
}

#[tokio::test]
async fn a_client_id_belongs_to_the_principal_that_first_used_it() {
    let server = start().await;
    let mut worker = as_principal(&server, "worker-7", "workers-secret").await;
    let lock = json!({"id": 2, "op": "lock", "key": "jobs/7", "ttl_ms": 60000});
    let token = worker.call(lock).await["ok"]["token"]
        .as_u64()
        .expect("granted");
    for secret in ["nobody-secret", "ops-secret"] {
        let mut thief = server.raw().await;
        let hello = json!({"id": 1, "op": "hello", "client": "worker-7", "auth": secret});
        let reply = thief.call(hello).await;
        assert_eq!(code(&reply), "unauthorized", "{reply}");
        // Still nobody on that connection: it cannot use the lock.
        let unlock = json!({"id": 2, "op": "unlock", "key": "jobs/7", "token": token});
        assert_eq!(code(&thief.call(unlock).await), "unauthorized");
    }
    // The same principal, on another connection, is the same client.
    let mut again = as_principal(&server, "worker-7", "workers-secret").await;
    let unlock = json!({"id": 2, "op": "unlock", "key": "jobs/7", "token": token});
    assert!(again.call(unlock).await["ok"].is_object());
}

#[tokio::test]
async fn inspect_shows_the_token_to_its_holder_and_admins_only() {
    let server = start().await;
    let mut holder = as_principal(&server, "w1", "workers-secret").await;
    let lock = json!({"id": 2, "op": "lock", "key": "jobs/t", "ttl_ms": 60000});
    let token = holder.call(lock).await["ok"]["token"]
        .as_u64()
        .expect("granted");
    let inspect = json!({"id": 3, "op": "inspect", "key": "jobs/t"});
    let mine = holder.call(inspect.clone()).await;
    assert_eq!(mine["ok"]["holder"]["token"], json!(token), "{mine}");
    let mut colleague = as_principal(&server, "w2", "workers-secret").await;
    let theirs = colleague.call(inspect.clone()).await;
    assert_eq!(theirs["ok"]["holder"]["client"], "w1", "{theirs}");
    assert!(theirs["ok"]["holder"].get("token").is_none(), "{theirs}");
    assert!(
        theirs["ok"]["holders"][0].get("token").is_none(),
        "{theirs}"
    );
    let mut admin = as_principal(&server, "a", "ops-secret").await;
    let seen = admin.call(inspect).await;
    assert_eq!(seen["ok"]["holder"]["token"], json!(token), "{seen}");
    assert_eq!(seen["ok"]["holders"][0]["token"], json!(token), "{seen}");
}

#[tokio::test]
async fn inspect_of_a_shared_lock_shows_each_holder_only_its_own_token() {
    let server = start().await;
    let mut first = as_principal(&server, "w1", "workers-secret").await;
    let mut second = as_principal(&server, "w2", "workers-secret").await;
    let lock = json!({"id": 2, "op": "lock", "key": "jobs/r", "ttl_ms": 60000, "mode": "shared"});
    let first_token = first.call(lock.clone()).await["ok"]["token"].clone();
    let second_token = second.call(lock).await["ok"]["token"].clone();
    assert!(first_token.is_u64() && second_token.is_u64());
    let inspect = json!({"id": 3, "op": "inspect", "key": "jobs/r"});
    let seen = second.call(inspect).await;
    let holders = seen["ok"]["holders"].as_array().expect("holders");
    assert_eq!(holders.len(), 2, "{seen}");
    for holder in holders {
        match holder["client"].as_str() {
            Some("w1") => assert!(holder.get("token").is_none(), "{seen}"),
            Some("w2") => assert_eq!(holder["token"], second_token, "{seen}"),
            other => panic!("unexpected holder {other:?}: {seen}"),
        }
    }
}

#[tokio::test]
async fn quotas_answer_overloaded_to_their_principal_only() {
    let server = start().await;
    let mut worker = as_principal(&server, "w1", "workers-secret").await;
    let lock = |id: u64, key: &str| json!({"id": id, "op": "lock", "key": key, "ttl_ms": 60000, "wait_ms": 0});
    assert!(worker.call(lock(2, "jobs/1")).await["ok"].is_object());
    assert!(worker.call(lock(3, "jobs/2")).await["ok"].is_object());
    let third = worker.call(lock(4, "jobs/3")).await;
    assert_eq!(code(&third), "overloaded", "{third}");
    assert!(
        third["err"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("workers")
    );
    // Another principal is not held back, and the refused key is free.
    let mut admin = as_principal(&server, "a", "ops-secret").await;
    assert!(admin.call(lock(2, "jobs/4")).await["ok"].is_object());
    let free = admin
        .call(json!({"id": 3, "op": "inspect", "key": "jobs/3"}))
        .await;
    assert_eq!(free["ok"]["holder"], Value::Null);
    // An unlock makes room again.
    let token = admin
        .call(json!({"id": 4, "op": "inspect", "key": "jobs/1"}))
        .await["ok"]["holder"]["token"]
        .clone();
    let unlock = json!({"id": 5, "op": "unlock", "key": "jobs/1", "token": token});
    assert!(worker.call(unlock).await["ok"].is_object());
    assert!(worker.call(lock(6, "jobs/3")).await["ok"].is_object());
    // Sets and members.
    let set_up =
        |id: u64, set: &str| json!({"id": id, "op": "set_up", "set": set, "ttl_ms": 60000});
    assert!(worker.call(set_up(7, "results/a")).await["ok"].is_object());
    assert_eq!(
        code(&worker.call(set_up(8, "results/b")).await),
        "overloaded"
    );
    let insert = json!({"id": 9, "op": "insert", "set": "results/a", "keys": ["1", "2", "3"]});
    assert!(worker.call(insert).await["ok"].is_object());
    let more = json!({"id": 10, "op": "insert", "set": "results/a", "key": "4"});
    assert_eq!(code(&worker.call(more).await), "overloaded");
}

#[tokio::test]
async fn a_reloaded_policy_applies_to_open_connections() {
    let policy = auth(POLICY);
    let server = TestServer::with(with_auth(&policy)).await;
    let mut worker = as_principal(&server, "w1", "workers-secret").await;
    let lock = |id: u64, key: &str| json!({"id": id, "op": "lock", "key": key, "ttl_ms": 1000, "wait_ms": 0});
    assert!(worker.call(lock(2, "jobs/1")).await["ok"].is_object());
    let moved = POLICY.replace(r#"locks = ["jobs/"]"#, r#"locks = ["moved/"]"#);
    policy.reload(auth_file::parse(&moved).expect("valid"));
    assert_eq!(code(&worker.call(lock(3, "jobs/2")).await), "unauthorized");
    assert!(worker.call(lock(4, "moved/1")).await["ok"].is_object());
    // A principal taken out of the file keeps its connection but may do
    // nothing more.
    let gone = POLICY.replace("name = \"workers\"", "name = \"renamed\"");
    policy.reload(auth_file::parse(&gone).expect("valid"));
    let refused = worker.call(json!({"id": 5, "op": "ping"})).await;
    assert_eq!(code(&refused), "unauthorized", "{refused}");
}

#[tokio::test]
async fn operator_routes_need_an_admins_bearer_token() {
    let server = start().await;
    let with = |token: &str| {
        format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n")
    };
    let anonymous = get(server.ws_addr, "/metrics").await;
    assert!(anonymous.starts_with("HTTP/1.1 401"), "{anonymous}");
    let worker = http(server.ws_addr, &with("workers-secret")).await;
    assert!(worker.starts_with("HTTP/1.1 403"), "{worker}");
    let guess = http(server.ws_addr, &with("ops-secre")).await;
    assert!(guess.starts_with("HTTP/1.1 401"), "{guess}");
    let admin = http(server.ws_addr, &with("ops-secret")).await;
    assert!(admin.starts_with("HTTP/1.1 200"), "{admin}");
    let backup = http(
        server.ws_addr,
        "POST /backup HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(backup.starts_with("HTTP/1.1 401"), "{backup}");
    // What carries no data stays open: health, the page, the client.
    for path in ["/healthz", "/", "/deadbolt.js"] {
        let answer = get(server.ws_addr, path).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
    }
}

fn upgrade(origin: Option<&str>, host: &str) -> String {
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\n{origin}Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// The status line of the answer to an upgrade (read until the head ends:
/// an accepted upgrade stays open).
async fn upgrade_status(addr: std::net::SocketAddr, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n") && stream.read(&mut byte).await.expect("read") == 1 {
        answer.push(byte[0]);
    }
    String::from_utf8_lossy(&answer).trim_end().to_owned()
}

#[tokio::test]
async fn websocket_upgrades_from_foreign_origins_are_forbidden() {
    let mut config = config();
    config.ws.allowed_origins = vec!["https://app.example.com".into()];
    let server = TestServer::with(config).await;
    let host = server.ws_addr.to_string();
    let own = format!("http://{host}");
    for (origin, status) in [
        (None, "HTTP/1.1 101 Switching Protocols"),
        (Some(own.as_str()), "HTTP/1.1 101 Switching Protocols"),
        (
            Some("https://app.example.com"),
            "HTTP/1.1 101 Switching Protocols",
        ),
        (Some("http://evil.example"), "HTTP/1.1 403 Forbidden"),
        (Some("null"), "HTTP/1.1 403 Forbidden"),
    ] {
        let answer = upgrade_status(server.ws_addr, &upgrade(origin, &host)).await;
        assert_eq!(answer, status, "Origin {origin:?}");
    }
}

#[tokio::test]
async fn the_websocket_port_serves_wss_with_the_quic_certificate() {
    let (identity, cert_pem, _) =
        deadbolt_transport_quic::Identity::self_signed().expect("certificate");
    let mut tls = deadbolt_transport_quic::tls::server_tls(identity).expect("tls");
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut config = with_auth(&auth(POLICY));
    config.ws.tls = Some(Arc::new(tls));
    let server = TestServer::with(config).await;
    let url = format!("wss://localhost:{}/ws", server.ws_addr.port());
    let trust = Trust::CaPem(cert_pem.into_bytes());
    let client_tls = deadbolt_transport_quic::tls::client_tls(&trust).expect("client tls");
    let dialer = deadbolt_transport_ws::TlsDialer::new(client_tls);
    let connector = deadbolt_transport_ws::WsConnector::with_dialer(&url, dialer).expect("url");
    let options = ClientOptions {
        auth: Some(Secret::new("workers-secret")),
        ..ClientOptions::default()
    };
    let client = Client::connect(connector, options)
        .await
        .expect("wss hello");
    let guard = client
        .try_lock("jobs/tls", std::time::Duration::from_secs(10))
        .await
        .expect("granted")
        .expect("free");
    guard.unlock().await.expect("unlocked");
    // Plain HTTP on the TLS port gets no answer.
    let plain = get(server.ws_addr, "/healthz").await;
    assert!(!plain.contains("200 OK"), "{plain}");
}

#[tokio::test]
async fn a_principal_may_have_only_its_quota_of_lock_requests_waiting() {
    let server = start().await;
    let mut admin = as_principal(&server, "a", "ops-secret").await;
    let held = json!({"id": 2, "op": "lock", "key": "jobs/w", "ttl_ms": 60000});
    assert!(admin.call(held).await["ok"]["token"].is_u64());
    let mut worker = as_principal(&server, "w1", "workers-secret").await;
    // The first waits (no answer yet); the second is past the quota.
    let wait = |id: u64| json!({"id": id, "op": "lock", "key": "jobs/w", "ttl_ms": 1000});
    worker.send_json(wait(2)).await;
    let second = worker.call(wait(3)).await;
    assert_eq!(second["id"], 3, "{second}");
    assert_eq!(code(&second), "overloaded", "{second}");
    // Cancelling the first frees its place.
    worker
        .send_json(json!({"id": 4, "op": "cancel", "target": 2}))
        .await;
    let mut answered = Vec::new();
    for _ in 0..2 {
        let reply = worker.recv().await;
        answered.push((
            reply["id"].clone(),
            reply.get("err").map(|e| e["code"].clone()),
        ));
    }
    answered.sort_by_key(|(id, _)| id.as_u64());
    assert_eq!(
        answered,
        [(json!(2), Some(json!("cancelled"))), (json!(4), None)]
    );
    let again = worker
        .call(json!({"id": 5, "op": "lock", "key": "jobs/w", "ttl_ms": 1000, "wait_ms": 10}))
        .await;
    assert_eq!(code(&again), "timeout", "{again}");
}
