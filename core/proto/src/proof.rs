//! Signed grants (SPEC section 10): the `proof` a server started with
//! `--sign-grants` adds to each grant, and the offline check a protected
//! resource makes of it.
//!
//! # Format, version 1
//!
//! A proof is a JWS in compact serialization (RFC 7515) signed with
//! Ed25519 (`alg` `EdDSA`, RFC 8037), so any JOSE library can check its
//! signature:
//!
//! ```text
//! base64url(header) "." base64url(payload) "." base64url(signature)
//! ```
//!
//! - header: `{"alg":"EdDSA","typ":"deadbolt-grant+jwt","kid":KID}`, where
//!   `KID` is base64url of the first 8 bytes of SHA-256 of the 32-byte
//!   public key: it says which key signed, so a resource may trust several
//!   (the nodes of a cluster, a key being rotated);
//! - payload: `{"v":1,"key":K,"token":T,"client":C,"mode":M,
//!   "granted_at_ms":G,"ttl_ms":L,"exp":E}`: the lock's key, the grant's
//!   fencing token, the holder's client id, `"exclusive"` (or `"shared"`),
//!   the server's wall clock at the grant in ms since the Unix epoch, the
//!   lease in ms, and `exp`, the end of the lease in whole seconds rounded
//!   down (so that a generic JWT library that checks `exp` never accepts a
//!   proof later than deadbolt does);
//! - signature: Ed25519 over the ASCII bytes `base64url(header) "."
//!   base64url(payload)`, 64 bytes.
//!
//! base64url is without padding. The signature covers the payload's bytes
//! as sent, so a checker reads the JSON after checking the signature and
//! needs no canonical form. A proof is valid while `now_ms <
//! granted_at_ms + ttl_ms` by the checker's clock ([`verify`]).
//!
//! # Keys
//!
//! A [`GrantSigner`] holds an Ed25519 key pair, read from (or written as) a
//! PKCS#8 PEM file, the format `openssl genpkey -algorithm ed25519` writes.
//! A [`PublicKey`] is 32 bytes, written as base64url or as a JSON Web Key
//! (`{"kty":"OKP","crv":"Ed25519","x":…}`); [`jwks`] writes a key set, as
//! the server's `GET /pubkey` answers, and [`parse_public_keys`] reads any
//! of those forms back.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// The `typ` of a proof's header.
pub const PROOF_TYPE: &str = "deadbolt-grant+jwt";

/// The version of the payload this crate writes and reads.
pub const PROOF_VERSION: u32 = 1;

/// The mode of an exclusive grant, as a statement names it.
pub const MODE_EXCLUSIVE: &str = "exclusive";

/// Longest proof [`verify`] reads: a generous bound over the largest real
/// one (a 1 KiB key and a 1 KiB client id, base64url-encoded).
pub const PROOF_BYTES_MAX: usize = 8 * 1024;

/// What a proof states: one grant of one lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    /// The lock's key.
    pub key: String,
    /// The grant's fencing token.
    pub token: u64,
    /// The holder's client id.
    pub client: String,
    /// `"exclusive"` or `"shared"`.
    pub mode: String,
    /// The server's wall clock at the grant, in ms since the Unix epoch.
    pub granted_at_ms: u64,
    /// The lease, in ms from `granted_at_ms`.
    pub ttl_ms: u64,
}

impl Statement {
    /// When the lease ends, in ms since the Unix epoch.
    pub fn expires_at_ms(&self) -> u64 {
        self.granted_at_ms.saturating_add(self.ttl_ms)
    }

    /// Whether the statement is about the grant `token` of `key`; the
    /// expectations left out are not checked.
    pub fn check_grant(&self, key: Option<&str>, token: Option<u64>) -> Result<(), ProofError> {
        if let Some(key) = key
            && key != self.key
        {
            return Err(ProofError::OtherGrant(format!(
                "the proof is for key {:?}, not {key:?}",
                self.key
            )));
        }
        if let Some(token) = token
            && token != self.token
        {
            return Err(ProofError::OtherGrant(format!(
                "the proof is for token {}, not {token}",
                self.token
            )));
        }
        Ok(())
    }
}

/// Why a proof was refused, or a key could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// Not a proof of this format (or a key not in a form this reads).
    #[error("malformed: {0}")]
    Malformed(String),
    /// Signed by a key that is not among those trusted.
    #[error("signed by key {kid}, which is not among the trusted keys")]
    UnknownKey {
        /// The `kid` of the key that signed.
        kid: String,
    },
    /// The signature does not match: the proof was changed, or forged.
    #[error("the signature does not match (a changed or forged proof)")]
    BadSignature,
    /// The lease it states has ended.
    #[error("expired: the lease ended at {expired_at_ms} ms, {ago_ms} ms ago")]
    Expired {
        /// When the lease ended, in ms since the Unix epoch.
        expired_at_ms: u64,
        /// How long ago, by the checker's clock.
        ago_ms: u64,
    },
    /// A valid proof, but of another grant than the one expected.
    #[error("{0}")]
    OtherGrant(String),
    /// No key could be made.
    #[error("key: {0}")]
    Key(String),
}

/// An Ed25519 public key that checks proofs, with its key id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    bytes: [u8; 32],
    kid: String,
}

impl PublicKey {
    /// The key of these 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> PublicKey {
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let kid = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..8]);
        PublicKey { bytes, kid }
    }

    /// Reads a key written as base64url (or standard base64) of its 32
    /// bytes.
    pub fn from_base64(text: &str) -> Result<PublicKey, ProofError> {
        let text = text.trim().trim_end_matches('=');
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
            .map_err(|e| ProofError::Key(format!("not base64: {e}")))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            ProofError::Key(format!(
                "an Ed25519 public key is 32 bytes, not {}",
                b.len()
            ))
        })?;
        Ok(PublicKey::from_bytes(bytes))
    }

    /// Its key id: base64url of the first 8 bytes of its SHA-256.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Its 32 bytes, base64url without padding.
    pub fn to_base64url(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.bytes)
    }

    /// It as a JSON Web Key (RFC 8037).
    pub fn to_jwk(&self) -> Jwk {
        Jwk {
            kty: "OKP".to_owned(),
            crv: "Ed25519".to_owned(),
            alg: Some("EdDSA".to_owned()),
            key_use: Some("sig".to_owned()),
            kid: Some(self.kid.clone()),
            x: self.to_base64url(),
        }
    }
}

/// An Ed25519 public key as a JSON Web Key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// `OKP`.
    pub kty: String,
    /// `Ed25519`.
    pub crv: String,
    /// `EdDSA`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// `sig`.
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub key_use: Option<String>,
    /// The key id a proof's header names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// The key's 32 bytes, base64url.
    pub x: String,
}

/// A JSON Web Key Set.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

/// `keys` as a JSON Web Key Set, `{"keys":[…]}`: what `GET /pubkey` answers.
pub fn jwks(keys: &[PublicKey]) -> String {
    let set = JwkSet {
        keys: keys.iter().map(PublicKey::to_jwk).collect(),
    };
    serde_json::to_string(&set).unwrap_or_default()
}

/// Reads trusted keys from `text`: a JSON Web Key Set (what `GET /pubkey`
/// answers), one JSON Web Key, or one key as base64url.
pub fn parse_public_keys(text: &str) -> Result<Vec<PublicKey>, ProofError> {
    let text = text.trim();
    if !text.starts_with('{') {
        return Ok(vec![PublicKey::from_base64(text)?]);
    }
    let jwks: Vec<Jwk> = match serde_json::from_str::<JwkSet>(text) {
        Ok(set) => set.keys,
        Err(_) => vec![
            serde_json::from_str::<Jwk>(text)
                .map_err(|e| ProofError::Key(format!("neither a JWK set nor a JWK: {e}")))?,
        ],
    };
    jwks.iter()
        .filter(|jwk| jwk.kty == "OKP" && jwk.crv == "Ed25519")
        .map(|jwk| PublicKey::from_base64(&jwk.x))
        .collect()
}

/// The key a server signs grants with.
pub struct GrantSigner {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl std::fmt::Debug for GrantSigner {
    // Never the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantSigner")
            .field("kid", &self.public.kid)
            .finish_non_exhaustive()
    }
}

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

impl GrantSigner {
    /// A new random key, as PKCS#8 PEM (to keep in a file and read back
    /// with [`GrantSigner::from_pem`]).
    pub fn generate_pem() -> Result<String, ProofError> {
        let rng = ring::rand::SystemRandom::new();
        let der = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| ProofError::Key("no randomness to make a key".to_owned()))?;
        let body = STANDARD.encode(der.as_ref());
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap_or_default())
            .collect();
        Ok(format!("{PEM_BEGIN}\n{}\n{PEM_END}\n", lines.join("\n")))
    }

    /// Reads an Ed25519 private key from PKCS#8 PEM (`BEGIN PRIVATE KEY`).
    pub fn from_pem(pem: &str) -> Result<GrantSigner, ProofError> {
        let start = pem
            .find(PEM_BEGIN)
            .ok_or_else(|| ProofError::Key(format!("no `{PEM_BEGIN}` line")))?;
        let body = &pem[start + PEM_BEGIN.len()..];
        let end = body
            .find(PEM_END)
            .ok_or_else(|| ProofError::Key(format!("no `{PEM_END}` line")))?;
        let base64: String = body[..end].split_whitespace().collect();
        let der = STANDARD
            .decode(base64)
            .map_err(|e| ProofError::Key(format!("PEM body is not base64: {e}")))?;
        GrantSigner::from_pkcs8(&der)
    }

    /// Reads an Ed25519 private key from PKCS#8 DER (version 1, as OpenSSL
    /// writes it, or 2).
    pub fn from_pkcs8(der: &[u8]) -> Result<GrantSigner, ProofError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| ProofError::Key(format!("not an Ed25519 PKCS#8 key: {e}")))?;
        let bytes: [u8; 32] = pair
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| ProofError::Key("public key is not 32 bytes".to_owned()))?;
        Ok(GrantSigner {
            pair,
            public: PublicKey::from_bytes(bytes),
        })
    }

    /// The key that checks this signer's proofs.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The proof of `statement`.
    pub fn sign(&self, statement: &Statement) -> String {
        let header = Header {
            alg: "EdDSA".into(),
            typ: Some(PROOF_TYPE.into()),
            kid: Some(self.public.kid.clone()),
        };
        let payload = Payload {
            v: PROOF_VERSION,
            statement: statement.clone(),
            exp: statement.expires_at_ms() / 1000,
        };
        // Serialising these plain structs cannot fail.
        let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap_or_default());
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&payload).unwrap_or_default());
        let signed = format!("{header}.{payload}");
        let signature = URL_SAFE_NO_PAD.encode(self.pair.sign(signed.as_bytes()));
        format!("{signed}.{signature}")
    }
}

/// A proof's JOSE header.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
}

/// A proof's payload.
#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    v: u32,
    #[serde(flatten)]
    statement: Statement,
    exp: u64,
}

/// Checks `proof` against the trusted `keys` at `now_ms` (the checker's
/// wall clock, ms since the Unix epoch) and returns what it states.
///
/// Refused: anything that is not a version 1 proof, one signed by a key
/// not in `keys`, one whose signature does not match its bytes, and one
/// whose lease has ended (`now_ms >= granted_at_ms + ttl_ms`). Whether it
/// is about the expected lock is [`Statement::check_grant`]'s question.
pub fn verify(proof: &str, keys: &[PublicKey], now_ms: u64) -> Result<Statement, ProofError> {
    let statement = verify_signature(proof, keys)?;
    let expired_at_ms = statement.expires_at_ms();
    if now_ms >= expired_at_ms {
        return Err(ProofError::Expired {
            expired_at_ms,
            ago_ms: now_ms - expired_at_ms,
        });
    }
    Ok(statement)
}

/// Checks `proof`'s signature against `keys`, but not its lease.
pub fn verify_signature(proof: &str, keys: &[PublicKey]) -> Result<Statement, ProofError> {
    let malformed = |why: &str| ProofError::Malformed(why.to_owned());
    if proof.len() > PROOF_BYTES_MAX {
        return Err(malformed("longer than any proof"));
    }
    let proof = proof.trim();
    let (signed, signature) = proof
        .rsplit_once('.')
        .ok_or_else(|| malformed("not three base64url parts joined by `.`"))?;
    let (header, payload) = signed
        .split_once('.')
        .ok_or_else(|| malformed("not three base64url parts joined by `.`"))?;
    let header: Header = decode_part(header, "header")?;
    if header.alg != "EdDSA" {
        return Err(ProofError::Malformed(format!(
            "alg {:?} (only EdDSA is accepted)",
            header.alg
        )));
    }
    let kid = header.kid.unwrap_or_default();
    let key = keys
        .iter()
        .find(|key| key.kid == kid)
        .ok_or(ProofError::UnknownKey { kid })?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| malformed("signature is not base64url"))?;
    UnparsedPublicKey::new(&ED25519, key.bytes)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| ProofError::BadSignature)?;
    let payload: Payload = decode_part(payload, "payload")?;
    if payload.v != PROOF_VERSION {
        return Err(ProofError::Malformed(format!(
            "version {} (this reads version {PROOF_VERSION})",
            payload.v
        )));
    }
    Ok(payload.statement)
}

/// Decodes one base64url JSON part of a proof.
fn decode_part<T: serde::de::DeserializeOwned>(part: &str, name: &str) -> Result<T, ProofError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| ProofError::Malformed(format!("{name} is not base64url")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ProofError::Malformed(format!("{name} is not the expected JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> GrantSigner {
        GrantSigner::from_pem(&GrantSigner::generate_pem().expect("key")).expect("pem")
    }

    fn statement() -> Statement {
        Statement {
            key: "job/42".into(),
            token: 7,
            client: "worker-1".into(),
            mode: MODE_EXCLUSIVE.into(),
            granted_at_ms: 1_800_000_000_000,
            ttl_ms: 30_000,
        }
    }

    #[test]
    fn a_proof_verifies_with_its_key_until_its_lease_ends() {
        let signer = signer();
        let proof = signer.sign(&statement());
        let keys = [signer.public_key().clone()];
        let at = statement().granted_at_ms;
        assert_eq!(verify(&proof, &keys, at), Ok(statement()));
        assert_eq!(verify(&proof, &keys, at + 29_999), Ok(statement()));
        assert_eq!(
            verify(&proof, &keys, at + 30_005),
            Err(ProofError::Expired {
                expired_at_ms: at + 30_000,
                ago_ms: 5
            })
        );
    }

    #[test]
    fn a_changed_proof_is_refused() {
        let signer = signer();
        let proof = signer.sign(&statement());
        let keys = [signer.public_key().clone()];
        let mut other = statement();
        other.token = 8;
        // Another statement's payload under this proof's signature.
        let forged_payload = signer.sign(&other);
        let parts: Vec<&str> = proof.split('.').collect();
        let forged: Vec<&str> = forged_payload.split('.').collect();
        let spliced = format!("{}.{}.{}", parts[0], forged[1], parts[2]);
        let now = statement().granted_at_ms;
        assert_eq!(verify(&spliced, &keys, now), Err(ProofError::BadSignature));
        // One character of the signature changed.
        let mut flipped = proof.clone().into_bytes();
        let last = flipped.len() - 2;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).expect("ascii");
        assert_eq!(verify(&flipped, &keys, now), Err(ProofError::BadSignature));
        assert!(matches!(
            verify("not.a.proof", &keys, now),
            Err(ProofError::Malformed(_))
        ));
    }

    #[test]
    fn a_proof_signed_by_another_key_is_refused_even_under_its_kid() {
        let (ours, theirs) = (signer(), signer());
        let proof = theirs.sign(&statement());
        let now = statement().granted_at_ms;
        let kid = theirs.public_key().kid().to_owned();
        assert_eq!(
            verify(&proof, &[ours.public_key().clone()], now),
            Err(ProofError::UnknownKey { kid })
        );
        // Claims our kid but was signed by theirs.
        let mut header: Header =
            decode_part(proof.split('.').next().expect("header"), "h").expect("header decodes");
        header.kid = Some(ours.public_key().kid().to_owned());
        let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("json"));
        let (_, rest) = proof.split_once('.').expect("parts");
        let relabelled = format!("{header}.{rest}");
        assert_eq!(
            verify(&relabelled, &[ours.public_key().clone()], now),
            Err(ProofError::BadSignature)
        );
    }

    #[test]
    fn a_proof_for_another_lock_or_token_is_refused_by_check_grant() {
        let s = statement();
        assert_eq!(s.check_grant(Some("job/42"), Some(7)), Ok(()));
        assert!(s.check_grant(Some("job/43"), None).is_err());
        assert!(s.check_grant(None, Some(6)).is_err());
    }

    #[test]
    fn keys_read_back_from_base64_a_jwk_and_a_key_set() {
        let signer = signer();
        let key = signer.public_key().clone();
        let set = jwks(std::slice::from_ref(&key));
        assert_eq!(parse_public_keys(&set), Ok(vec![key.clone()]));
        assert_eq!(
            parse_public_keys(&key.to_base64url()),
            Ok(vec![key.clone()])
        );
        let jwk = serde_json::to_string(&key.to_jwk()).expect("json");
        assert_eq!(parse_public_keys(&jwk), Ok(vec![key]));
        assert!(parse_public_keys("AAAA").is_err());
    }

    #[test]
    fn an_openssl_pkcs8_v1_key_is_read() {
        // PKCS#8 v1 (seed only), as `openssl genpkey -algorithm ed25519`
        // writes it, of RFC 8032's first test key.
        let pem = "-----BEGIN PRIVATE KEY-----\n\
                   MC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n\
                   -----END PRIVATE KEY-----\n";
        let signer = GrantSigner::from_pem(pem).expect("openssl key");
        // RFC 8032 test 1's seed gives this public key.
        assert_eq!(
            signer.public_key().to_base64url(),
            "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
        );
    }
}
