//! `deadbolt verify`: the offline check a protected resource makes of a
//! grant's proof (SPEC section 10), from the command line.

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use deadbolt_core::proof::{self, PublicKey, Statement};
use serde_json::json;

use crate::EXIT_NO;
use crate::cli::{ServerArgs, VerifyArgs};

/// Checks the proof; prints its statement as JSON (exit 0) or why it was
/// refused (exit 1).
pub async fn run(server: &ServerArgs, args: VerifyArgs) -> anyhow::Result<u8> {
    let keys = trusted_keys(server, args.pubkey.as_deref()).await?;
    let proof = read_proof(&args.proof)?;
    let now_ms = now_ms();
    let checked = proof::verify(&proof, &keys, now_ms).and_then(|statement| {
        statement.check_grant(args.key.as_deref(), args.token)?;
        Ok(statement)
    });
    match checked {
        Ok(statement) => {
            println!("{}", describe(&statement, now_ms));
            Ok(0)
        }
        Err(refusal) => {
            eprintln!("deadbolt: proof refused: {refusal}");
            Ok(EXIT_NO)
        }
    }
}

/// The statement as JSON, with when the lease ends and how much is left.
fn describe(statement: &Statement, now_ms: u64) -> String {
    let expires_at_ms = statement.expires_at_ms();
    json!({
        "valid": true,
        "key": statement.key,
        "token": statement.token,
        "client": statement.client,
        "mode": statement.mode,
        "granted_at_ms": statement.granted_at_ms,
        "ttl_ms": statement.ttl_ms,
        "expires_at_ms": expires_at_ms,
        "remaining_ms": expires_at_ms.saturating_sub(now_ms),
    })
    .to_string()
}

/// The keys from `--pubkey` (a key, or a file holding one), else from the
/// first server URL's `GET /pubkey`.
async fn trusted_keys(server: &ServerArgs, pubkey: Option<&str>) -> anyhow::Result<Vec<PublicKey>> {
    let text = match pubkey {
        Some(path) if std::path::Path::new(path).is_file() => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the public key file {path}"))?,
        Some(key) => key.to_owned(),
        None => fetch_keys(server).await?,
    };
    let keys = proof::parse_public_keys(&text).context("--pubkey")?;
    if keys.is_empty() {
        bail!("no Ed25519 key among the keys given");
    }
    Ok(keys)
}

/// `GET /pubkey` from the first node of `--server` that answers.
async fn fetch_keys(server: &ServerArgs) -> anyhow::Result<String> {
    let mut failures = Vec::new();
    for url in server.server.split(',').map(str::trim) {
        match crate::cluster::http(url, "GET", "/pubkey", server).await {
            Ok(body) => return Ok(body),
            Err(error) => failures.push(format!("{url}: {error:#}")),
        }
    }
    bail!(
        "no public key (give --pubkey KEY to check offline): {}",
        failures.join("; ")
    )
}

fn read_proof(proof: &str) -> anyhow::Result<String> {
    if proof != "-" {
        return Ok(proof.to_owned());
    }
    let mut text = String::new();
    std::io::stdin()
        .take(proof::PROOF_BYTES_MAX as u64 + 1)
        .read_to_string(&mut text)
        .context("cannot read the proof from stdin")?;
    Ok(text.trim().to_owned())
}

fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}
