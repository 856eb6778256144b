//! Signed grants from the command line (SPEC section 10): `deadbolt serve
//! --sign-grants`, `try-lock --proof`, `lock -- CMD` with `DEADBOLT_PROOF`,
//! and `deadbolt verify`, online (the key from `GET /pubkey`) and offline.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output};

mod support;
use support::{KillOnDrop, SpawnKillOnDrop, free_port, serve_ws};

const BIN: &str = env!("CARGO_BIN_EXE_deadbolt");

/// A running server, killed when dropped.
struct Server {
    /// Killed when the server is dropped.
    _child: KillOnDrop,
    url: String,
}

impl Server {
    fn start(data_dir: &Path, extra: &[&str]) -> Server {
        let mut flags = vec!["--sign-grants"];
        flags.extend_from_slice(extra);
        let (child, url) = serve_ws(data_dir, &flags);
        Server { _child: child, url }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("DEADBOLT_SERVER", &self.url)
            .env_remove("DEADBOLT_CLIENT_ID")
            .output()
            .expect("run deadbolt")
    }

    /// `try-lock KEY --proof`: the token and the proof.
    fn try_lock(&self, key: &str, ttl: &str) -> (u64, String) {
        let out = self.run(&["try-lock", key, "--ttl", ttl, "--proof"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let mut lines = stdout.lines();
        let token = lines.next().and_then(|t| t.parse().ok()).expect("a token");
        (token, lines.next().expect("a proof").to_owned())
    }

    /// `GET /pubkey`, the body.
    fn pubkey(&self) -> String {
        let authority = self.url.trim_start_matches("ws://").trim_end_matches("/ws");
        let mut stream = std::net::TcpStream::connect(authority).expect("connect");
        write!(stream, "GET /pubkey HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        answer.split_once("\r\n\r\n").expect("body").1.to_owned()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn verified(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "refused: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the statement as JSON")
}

fn assert_refused(out: &Output, why: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("proof refused") && stderr.contains(why),
        "{stderr}"
    );
}

#[test]
fn verify_accepts_a_real_grant_and_refuses_tampered_other_and_expired_proofs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let (token, proof) = server.try_lock("jobs/1", "30s");
    let token_text = token.to_string();
    let statement =
        verified(&server.run(&["verify", &proof, "--key", "jobs/1", "--token", &token_text]));
    assert_eq!(statement["key"], "jobs/1");
    assert_eq!(statement["token"], token);
    assert_eq!(statement["ttl_ms"], 30_000);
    assert!(statement["remaining_ms"].as_u64().expect("remaining") <= 30_000);
    // Another lock, another token.
    assert_refused(
        &server.run(&["verify", &proof, "--key", "jobs/2"]),
        "not \"jobs/2\"",
    );
    let other_token = (token + 1).to_string();
    assert_refused(
        &server.run(&["verify", &proof, "--token", &other_token]),
        "token",
    );
    // Tampered: one character of the payload changed.
    let mut tampered = proof.clone().into_bytes();
    let middle = proof.find('.').expect("parts") + 10;
    tampered[middle] = if tampered[middle] == b'a' { b'b' } else { b'a' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    let out = server.run(&["verify", &tampered]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    // Signed by another server's key.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = Server::start(other_dir.path(), &[]);
    assert_refused(
        &other.run(&["verify", &proof]),
        "not among the trusted keys",
    );
    // Expired.
    let (_, short) = server.try_lock("jobs/short", "50ms");
    std::thread::sleep(std::time::Duration::from_millis(120));
    assert_refused(&server.run(&["verify", &short]), "expired");
}

#[test]
fn the_key_is_kept_in_the_data_directory_so_proofs_verify_after_a_restart_and_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (proof, jwks) = {
        let server = Server::start(dir.path(), &[]);
        let (_, proof) = server.try_lock("jobs/restart", "1h");
        (proof, server.pubkey())
    };
    let key_file = dir.path().join("signing-key.pem");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_file)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the private key is readable by its owner only"
    );
    // Offline: no server at all, the key set saved from /pubkey.
    let saved = dir.path().join("pubkey.json");
    std::fs::write(&saved, &jwks).expect("save");
    let out = Command::new(BIN)
        .args(["verify", &proof, "--pubkey"])
        .arg(&saved)
        .env("DEADBOLT_SERVER", "ws://127.0.0.1:1/ws")
        .output()
        .expect("run");
    assert_eq!(verified(&out)["key"], "jobs/restart");
    // Restarted on the same directory: the same key.
    let server = Server::start(dir.path(), &[]);
    assert_eq!(server.pubkey(), jwks);
    verified(&server.run(&["verify", &proof]));
    drop(server);
    // Another server given the key file (as every node of a cluster
    // would be) serves the same public key.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let key_flag = format!("--signing-key={}", key_file.display());
    let sharing = Server::start(elsewhere.path(), &["--in-memory", &key_flag]);
    assert_eq!(sharing.pubkey(), jwks);
}

#[test]
fn a_locked_command_gets_its_proof_in_deadbolt_proof() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let check = format!(
        "{BIN} verify \"$DEADBOLT_PROOF\" --key \"$DEADBOLT_KEY\" --token \"$DEADBOLT_TOKEN\""
    );
    let out = server.run(&[
        "lock",
        "reports/nightly",
        "--ttl",
        "10s",
        "--",
        "sh",
        "-c",
        &check,
    ]);
    let statement = verified(&out);
    assert_eq!(statement["key"], "reports/nightly");
}

#[test]
fn without_sign_grants_try_lock_proof_says_why_there_is_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, url) = serve_ws(dir.path(), &[]);
    let server = Server { _child: child, url };
    let out = server.run(&["try-lock", "k", "--ttl", "5s", "--proof"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        text(&out.stderr).contains("--sign-grants"),
        "{}",
        text(&out.stderr)
    );
    assert!(!dir.path().join("signing-key.pem").exists());
}

/// Node `id` of a cluster of three (`members`), signing grants with its
/// own key, in `dir`/node`id`.
fn cluster_node(dir: &Path, members: &str, id: usize) -> Server {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--ws",
            "127.0.0.1:0",
            "--quic",
            "off",
            "--sign-grants",
        ])
        .args(["--node-id", &id.to_string(), "--cluster", members])
        .arg("--data-dir")
        .arg(dir.join(format!("node{id}")))
        .stderr(std::process::Stdio::piped())
        .spawn_kill_on_drop()
        .expect("spawn node");
    let (url, _) = support::read_urls(&mut child);
    Server { _child: child, url }
}

/// Whether the node says it leads (`GET /cluster`).
fn leads(node: &Server) -> bool {
    let authority = node.url.trim_start_matches("ws://").trim_end_matches("/ws");
    let Ok(mut stream) = std::net::TcpStream::connect(authority) else {
        return false;
    };
    let _ = write!(stream, "GET /cluster HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"state\": \"leader\"") || answer.contains("\"state\":\"leader\"")
}

#[test]
fn in_a_cluster_the_leader_signs_and_a_follower_passes_its_proof_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let members: Vec<String> = (1..=3)
        .map(|id| format!("{id}=127.0.0.1:{}", free_port()))
        .collect();
    let members = members.join(",");
    let nodes: Vec<Server> = (1..=3)
        .map(|id| cluster_node(dir.path(), &members, id))
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let leader = loop {
        if let Some(leader) = nodes.iter().position(leads) {
            break leader;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no leader within 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let follower = (leader + 1) % nodes.len();
    // Each node has a key of its own (no --signing-key).
    let (leader_key, follower_key) = (nodes[leader].pubkey(), nodes[follower].pubkey());
    assert_ne!(leader_key, follower_key);
    // Taken through the follower, which forwards to the leader.
    let (token, proof) = nodes[follower].try_lock("cluster/job", "30s");
    let token_text = token.to_string();
    let by_leader = nodes[follower].run(&[
        "verify",
        &proof,
        "--pubkey",
        &leader_key,
        "--token",
        &token_text,
    ]);
    assert_eq!(verified(&by_leader)["key"], "cluster/job");
    let by_follower = nodes[follower].run(&["verify", &proof, "--pubkey", &follower_key]);
    assert_refused(&by_follower, "not among the trusted keys");
}
