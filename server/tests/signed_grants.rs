//! Signed grants on a real server (SPEC section 10): `--sign-grants`
//! puts a `proof` on every grant, over WebSocket and QUIC alike, that the
//! key from `GET /pubkey` checks offline.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadbolt_core::EngineConfig;
use deadbolt_core::proof::{self, GrantSigner, ProofError};
use deadbolt_server::ServerConfig;
use serde_json::json;
use support::{TestServer, get};

fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970");
    u64::try_from(since.as_millis()).expect("fits")
}

async fn signing_server() -> TestServer {
    let pem = GrantSigner::generate_pem().expect("key");
    let signer = Arc::new(GrantSigner::from_pem(&pem).expect("pem"));
    TestServer::with(ServerConfig {
        engine: EngineConfig {
            shards: 2,
            grant_signer: Some(signer),
            ..EngineConfig::new()
        },
        ..ServerConfig::default()
    })
    .await
}

/// The keys `GET /pubkey` serves.
async fn served_keys(server: &TestServer) -> Vec<proof::PublicKey> {
    let answer = get(server.ws_addr, "/pubkey").await;
    assert!(
        answer.starts_with("HTTP/1.1 200 OK") && answer.contains("application/json"),
        "{answer}"
    );
    let (_, body) = answer.split_once("\r\n\r\n").expect("a body");
    proof::parse_public_keys(body).expect("a key set")
}

#[tokio::test]
async fn a_grant_on_the_wire_carries_a_proof_that_the_served_key_checks() {
    let server = signing_server().await;
    let keys = served_keys(&server).await;
    let mut raw = server.raw().await;
    let hello = raw
        .call(json!({"id": 1, "op": "hello", "client": "w-1"}))
        .await;
    assert_eq!(hello["ok"]["client"], "w-1", "{hello}");
    let granted = raw
        .call(json!({"id": 2, "op": "lock", "key": "jobs/7", "ttl_ms": 20_000}))
        .await;
    let token = granted["ok"]["token"].as_u64().expect("a token");
    let proof = granted["ok"]["proof"].as_str().expect("a proof");
    let statement = proof::verify(proof, &keys, now_ms()).expect("valid");
    assert_eq!(
        (
            statement.key.as_str(),
            statement.token,
            statement.client.as_str()
        ),
        ("jobs/7", token, "w-1")
    );
    assert_eq!(
        (statement.mode.as_str(), statement.ttl_ms),
        ("exclusive", 20_000)
    );
    // Refused: expired, tampered (the token raised), another lock.
    assert!(matches!(
        proof::verify(proof, &keys, statement.expires_at_ms() + 1),
        Err(ProofError::Expired { .. })
    ));
    let tampered = tamper_token(proof);
    assert_eq!(
        proof::verify(&tampered, &keys, now_ms()),
        Err(ProofError::BadSignature)
    );
    assert!(statement.check_grant(Some("jobs/8"), None).is_err());
    // Non-grants carry none.
    let inspected = raw
        .call(json!({"id": 3, "op": "inspect", "key": "jobs/7"}))
        .await;
    assert!(inspected["ok"].get("proof").is_none(), "{inspected}");
}

/// `proof` with its payload's token raised by one, signature kept.
fn tamper_token(proof: &str) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = proof.split('.').collect();
    let payload = URL_SAFE_NO_PAD.decode(parts[1]).expect("base64url");
    let mut value: serde_json::Value = serde_json::from_slice(&payload).expect("json");
    value["token"] = json!(value["token"].as_u64().expect("token") + 1);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&value).expect("json"));
    format!("{}.{payload}.{}", parts[0], parts[2])
}

#[tokio::test]
async fn quic_and_websocket_clients_get_proofs_in_their_guards() {
    let server = signing_server().await;
    let keys = served_keys(&server).await;
    for client in [server.ws_client().await, server.quic_client().await] {
        let guard = client
            .lock("shared/report", Duration::from_secs(10))
            .await
            .expect("lock");
        let statement =
            proof::verify(guard.proof().expect("proof"), &keys, now_ms()).expect("valid");
        assert_eq!(statement.token, guard.token());
        assert_eq!(statement.client, client.client_id());
        guard.unlock().await.expect("unlock");
    }
}

#[tokio::test]
async fn a_server_that_does_not_sign_serves_no_key_and_no_proofs() {
    let server = TestServer::start().await;
    let answer = get(server.ws_addr, "/pubkey").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let mut raw = server.raw().await;
    let granted = raw
        .call(json!({"id": 1, "op": "lock", "key": "k", "ttl_ms": 1_000}))
        .await;
    assert!(granted["ok"]["token"].is_u64() && granted["ok"].get("proof").is_none());
}
