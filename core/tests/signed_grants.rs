//! Signed grants (SPEC section 10) through the engine and the client:
//! with a signer, every grant a session answers carries a proof that the
//! server's public key checks offline; without one, none does.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadbolt_core::client::{Client, ClientOptions, LocalConnector};
use deadbolt_core::proof::{self, GrantSigner, MODE_EXCLUSIVE, ProofError};
use deadbolt_core::{Engine, EngineConfig};

fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970");
    u64::try_from(since.as_millis()).expect("fits")
}

async fn client_of(signer: Option<Arc<GrantSigner>>) -> Client {
    let engine = Engine::start(EngineConfig {
        shards: 2,
        grant_signer: signer,
        ..EngineConfig::new()
    });
    Client::connect(LocalConnector::new(engine), ClientOptions::default())
        .await
        .expect("connect")
}

fn signer() -> Arc<GrantSigner> {
    let pem = GrantSigner::generate_pem().expect("key");
    Arc::new(GrantSigner::from_pem(&pem).expect("pem"))
}

#[tokio::test]
async fn each_grant_carries_a_proof_of_its_key_token_client_and_lease() {
    let signer = signer();
    let client = client_of(Some(Arc::clone(&signer))).await;
    let keys = [signer.public_key().clone()];
    let before = now_ms();
    let guard = client
        .lock("job/42", Duration::from_secs(30))
        .await
        .expect("lock");
    let after = now_ms();
    let proof = guard.proof().expect("a signed grant");
    let statement = proof::verify(proof, &keys, now_ms()).expect("valid");
    assert_eq!(statement.key, "job/42");
    assert_eq!(statement.token, guard.token());
    assert_eq!(statement.client, client.client_id());
    assert_eq!(statement.mode, MODE_EXCLUSIVE);
    assert_eq!(statement.ttl_ms, 30_000);
    assert!((before..=after).contains(&statement.granted_at_ms));
    assert_eq!(
        statement.check_grant(Some("job/42"), Some(guard.token())),
        Ok(())
    );
    // The same proof, checked after the lease, or by another server's key,
    // or for another lock, is refused.
    assert!(matches!(
        proof::verify(proof, &keys, statement.expires_at_ms()),
        Err(ProofError::Expired { .. })
    ));
    let stranger = [signer_key_of_another_server()];
    assert!(matches!(
        proof::verify(proof, &stranger, now_ms()),
        Err(ProofError::UnknownKey { .. })
    ));
    assert!(statement.check_grant(Some("job/43"), None).is_err());
    // A second grant of the key has its own, higher, token in its proof.
    guard.unlock().await.expect("unlock");
    let next = client
        .lock("job/42", Duration::from_secs(5))
        .await
        .expect("lock");
    let second = proof::verify(next.proof().expect("proof"), &keys, now_ms()).expect("valid");
    assert!(second.token > statement.token);
    assert_eq!(second.ttl_ms, 5_000);
}

fn signer_key_of_another_server() -> proof::PublicKey {
    signer().public_key().clone()
}

#[tokio::test]
async fn without_a_signer_grants_carry_no_proof() {
    let client = client_of(None).await;
    let guard = client
        .lock("k", Duration::from_secs(5))
        .await
        .expect("lock");
    assert_eq!(guard.proof(), None);
}
