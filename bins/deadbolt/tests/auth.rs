//! `deadbolt serve --auth` as the binary runs it (SPEC section 10): it
//! refuses to expose itself without authentication or TLS, the command-line
//! client takes its secret from `--auth-file` or `DEADBOLT_AUTH`, SIGHUP
//! reloads the auth file under open connections, and the new flags are
//! keys of the config file.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

mod support;
use support::{KillOnDrop, SpawnKillOnDrop, read_urls, serve_ws};

const BIN: &str = env!("CARGO_BIN_EXE_deadbolt");

const POLICY: &str = r#"
[[principal]]
name = "workers"
secret = "workers-secret"
locks = ["jobs/"]
read = [""]
"#;

/// Two principals, both allowed every `jobs/` key.
const TWO_PRINCIPALS: &str = r#"
[[principal]]
name = "workers"
secret = "workers-secret"
locks = ["jobs/"]
read = [""]

[[principal]]
name = "intruders"
secret = "intruders-secret"
locks = ["jobs/"]
read = [""]
"#;

/// Runs `deadbolt serve` with `args` on a fresh data directory, expecting
/// it to exit on its own (a refusal) within 30 s.
fn serve_refused(dir: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server started instead of refusing: {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn a_non_loopback_address_is_refused_without_auth_or_without_tls_and_says_how_to_fix_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = dir.path().join("auth.toml");
    std::fs::write(&auth, POLICY).expect("write the auth file");
    let auth = auth.to_str().expect("utf-8 path");

    let no_auth = serve_refused(dir.path(), &["--ws", "0.0.0.0:0", "--quic", "off"]);
    assert!(!no_auth.status.success());
    let message = String::from_utf8_lossy(&no_auth.stderr);
    assert!(
        message.contains("0.0.0.0:0")
            && message.contains("--auth FILE")
            && message.contains("--insecure-no-auth"),
        "{message}"
    );
    // QUIC alone on a public address is refused too.
    let quic = serve_refused(dir.path(), &["--quic", "0.0.0.0:0"]);
    assert!(String::from_utf8_lossy(&quic.stderr).contains("--insecure-no-auth"));

    let no_tls = serve_refused(
        dir.path(),
        &["--ws", "0.0.0.0:0", "--quic", "off", "--auth", auth],
    );
    assert!(!no_tls.status.success());
    let message = String::from_utf8_lossy(&no_tls.stderr);
    assert!(
        message.contains("--tls-cert FILE --tls-key FILE")
            && message.contains("--insecure-plaintext"),
        "{message}"
    );

    // Both waived: it listens.
    let mut child = Command::new(BIN)
        .args(["serve", "--ws", "0.0.0.0:0", "--quic", "off"])
        .args(["--insecure-no-auth", "--insecure-plaintext", "--in-memory"])
        .arg("--data-dir")
        .arg(dir.path().join("open"))
        .stderr(Stdio::piped())
        .spawn_kill_on_drop()
        .expect("spawn");
    let (url, _) = read_urls(&mut child);
    assert!(url.starts_with("ws://0.0.0.0:"), "{url}");
    stop(&mut child);
}

/// A cluster node whose peer address is not on loopback is refused
/// without TLS (`--tls-cert`), with a message that says how to fix it;
/// `--insecure-peers` lets it start, and so does a loopback peer address.
#[test]
fn a_non_loopback_peer_address_is_refused_without_tls_and_says_how_to_fix_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = dir.path().join("auth.toml");
    std::fs::write(&auth, POLICY).expect("write the auth file");
    let auth = auth.to_str().expect("utf-8 path");
    let port = support::free_port;
    let exposed = format!(
        "1=0.0.0.0:{},2=127.0.0.1:{},3=127.0.0.1:{}",
        port(),
        port(),
        port()
    );
    let node = ["--ws", "127.0.0.1:0", "--quic", "off", "--auth", auth];
    let cluster = ["--node-id", "1", "--cluster", &exposed];
    let args: Vec<&str> = node.iter().chain(&cluster).copied().collect();
    let refused = serve_refused(dir.path(), &args);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("refusing to listen for cluster peers on 0.0.0.0:")
            && message.contains("--tls-cert FILE --tls-key FILE")
            && message.contains("--cluster-ca FILE")
            && message.contains("--insecure-peers"),
        "{message}"
    );

    // Waived: it starts (and listens, waiting for its peers).
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(&args)
        .arg("--insecure-peers")
        .arg("--data-dir")
        .arg(dir.path().join("waived"))
        .stderr(Stdio::piped())
        .spawn_kill_on_drop()
        .expect("spawn");
    let (url, _) = read_urls(&mut child);
    assert!(url.starts_with("ws://127.0.0.1:"), "{url}");
    stop(&mut child);
}

fn stop(child: &mut KillOnDrop) {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let _ = child.wait();
}

/// `deadbolt serve --auth FILE` on loopback, logging everything down to
/// `trace` into a file; stopped when dropped.
struct Server {
    child: KillOnDrop,
    url: String,
    auth: std::path::PathBuf,
    log: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = dir.path().join("auth.toml");
        std::fs::write(&auth, POLICY).expect("write the auth file");
        let log = dir.path().join("server.log");
        let child = Command::new(BIN)
            .args([
                "serve",
                "--ws",
                "127.0.0.1:0",
                "--quic",
                "off",
                "--in-memory",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--auth")
            .arg(&auth)
            .env("RUST_LOG", "trace")
            .stderr(std::fs::File::create(&log).expect("the log file"))
            .spawn_kill_on_drop()
            .expect("spawn");
        let url = listening(&log);
        Server {
            child,
            url,
            auth,
            log,
            dir,
        }
    }

    /// Asserts that nothing the server logged holds a secret.
    fn assert_no_secret_logged(&self) {
        let log = std::fs::read_to_string(&self.log).expect("the log");
        assert!(log.contains("listening on"), "{log}");
        for secret in ["workers-secret", "wrong-secret"] {
            assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
        }
    }

    fn client(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(["--server", &self.url, "--retry-for", "2s"])
            .args(args)
            .env_remove("DEADBOLT_AUTH");
        command
    }
}

/// Waits for the server logging to `log` to say where it listens.
fn listening(log: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(at) = text.find("ws://") {
            let url = text[at..].split_whitespace().next().expect("a URL");
            return url.to_owned();
        }
        assert!(Instant::now() < deadline, "not listening:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

#[test]
fn the_command_line_client_says_its_secret_from_a_file_or_the_environment() {
    let server = Server::start();
    let refused = server
        .client(&["try-lock", "jobs/1", "--ttl", "30s"])
        .output()
        .expect("run");
    assert_eq!(refused.status.code(), Some(4));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("unauthorized"), "{message}");

    let secret = server.dir.path().join("secret");
    std::fs::write(&secret, "workers-secret\n").expect("write");
    let from_file = server
        .client(&["try-lock", "jobs/1", "--ttl", "30s", "--auth-file"])
        .arg(&secret)
        .output()
        .expect("run");
    assert!(from_file.status.success(), "{from_file:?}");
    let token = String::from_utf8_lossy(&from_file.stdout).trim().to_owned();
    assert!(token.parse::<u64>().is_ok(), "{token}");

    let from_env = server
        .client(&["inspect", "jobs/1"])
        .env("DEADBOLT_AUTH", "workers-secret")
        .output()
        .expect("run");
    assert!(from_env.status.success(), "{from_env:?}");
    let shown = String::from_utf8_lossy(&from_env.stdout);
    // Another client id of the same principal: the token is not shown.
    assert!(shown.contains("with token hidden"), "{shown}");

    let outside = server
        .client(&["try-lock", "other", "--ttl", "30s"])
        .env("DEADBOLT_AUTH", "workers-secret")
        .output()
        .expect("run");
    assert_eq!(outside.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&outside.stderr).contains("unauthorized"));

    let wrong = server
        .client(&["inspect", "jobs/1"])
        .env("DEADBOLT_AUTH", "wrong-secret")
        .output()
        .expect("run");
    assert_eq!(wrong.status.code(), Some(4));
    let message = String::from_utf8_lossy(&wrong.stderr);
    assert!(!message.contains("wrong-secret"), "{message}");
    server.assert_no_secret_logged();
}

/// One WebSocket connection, driven by hand.
struct Raw {
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
}

impl Raw {
    async fn open(url: &str) -> Raw {
        let authority = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .expect("a ws:// URL");
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .expect("tcp");
        let (ws, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("handshake");
        Raw { ws }
    }

    async fn call(&mut self, request: Value) -> Value {
        self.ws
            .send(Message::Text(request.to_string().into()))
            .await
            .expect("send");
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(5), self.ws.next())
                .await
                .expect("an answer within 5 s")
                .expect("the connection stays open")
                .expect("a frame");
            if let Message::Text(text) = frame {
                return serde_json::from_str(&text).expect("JSON");
            }
        }
    }
}

#[tokio::test]
async fn sighup_reloads_the_auth_file_under_open_connections() {
    let server = Server::start();
    let mut raw = Raw::open(&server.url).await;
    let hello = json!({"id": 1, "op": "hello", "client": "w", "auth": "workers-secret"});
    assert!(raw.call(hello).await["ok"].is_object());
    let lock = |id: u64, key: &str| json!({"id": id, "op": "lock", "key": key, "ttl_ms": 30000, "wait_ms": 0});
    assert!(raw.call(lock(2, "jobs/1")).await["ok"]["token"].is_u64());
    assert_eq!(
        raw.call(lock(3, "moved/1")).await["err"]["code"],
        "unauthorized"
    );

    // A broken file is refused, and the old grants stay.
    std::fs::write(&server.auth, "[[principal]]\nname = \"x\"\n").expect("write");
    kill(Pid::from_raw(server.child.id() as i32), Signal::SIGHUP).expect("SIGHUP");
    std::fs::write(&server.auth, POLICY.replace("jobs/", "moved/")).expect("write");
    kill(Pid::from_raw(server.child.id() as i32), Signal::SIGHUP).expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut id = 10;
    loop {
        id += 1;
        let reply = raw.call(lock(id, "moved/1")).await;
        if reply["ok"]["token"].is_u64() {
            break;
        }
        assert!(Instant::now() < deadline, "not reloaded: {reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The same connection, with the new grants.
    assert_eq!(
        raw.call(lock(100, "jobs/2")).await["err"]["code"],
        "unauthorized"
    );
    server.assert_no_secret_logged();
}

#[test]
fn the_new_flags_are_keys_of_the_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let printed = Command::new(BIN)
        .args([
            "serve",
            "--auth",
            "/etc/deadbolt/auth.toml",
            "--insecure-plaintext",
        ])
        .args([
            "--allow-origin",
            "https://a.example,https://b.example",
            "--print-config",
        ])
        .output()
        .expect("run");
    assert!(printed.status.success(), "{printed:?}");
    let text = String::from_utf8_lossy(&printed.stdout).into_owned();
    for line in [
        "auth = \"/etc/deadbolt/auth.toml\"",
        "insecure-plaintext = true",
        "insecure-no-auth = false",
        "allow-origin = \"https://a.example,https://b.example\"",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
    let file = dir.path().join("deadbolt.toml");
    std::fs::write(&file, &text).expect("write");
    let again = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&file)
        .arg("--print-config")
        .output()
        .expect("run");
    assert!(again.status.success(), "{again:?}");
    assert_eq!(String::from_utf8_lossy(&again.stdout), text);
}

/// `deadbolt serve --auth` (durable) on `dir`: its process and URL.
fn serve_durable(dir: &Path) -> (KillOnDrop, String) {
    let auth = dir.join("auth.toml");
    let auth = auth.to_str().expect("utf-8 path");
    serve_ws(&dir.join("data"), &["--auth", auth])
}

/// Says `hello` as `client` with `secret` on a new connection; the reply.
async fn hello(url: &str, client: &str, secret: &str) -> (Raw, Value) {
    let mut raw = Raw::open(url).await;
    let hello = json!({"id": 1, "op": "hello", "client": client, "auth": secret});
    let reply = raw.call(hello).await;
    (raw, reply)
}

#[tokio::test]
async fn a_client_id_stays_its_first_principals_across_a_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("auth.toml"), TWO_PRINCIPALS).expect("write the auth file");
    let (mut child, url) = serve_durable(dir.path());
    let (mut workers, reply) = hello(&url, "worker-1", "workers-secret").await;
    assert!(reply["ok"].is_object(), "{reply}");
    let lock = json!({"id": 2, "op": "lock", "key": "jobs/1", "ttl_ms": 600_000, "wait_ms": 0});
    let token = workers.call(lock).await["ok"]["token"].clone();
    assert!(token.is_u64(), "{token}");
    let (_, before) = hello(&url, "worker-1", "intruders-secret").await;
    assert_eq!(before["err"]["code"], "unauthorized", "{before}");

    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let (mut child, url) = serve_durable(dir.path());

    let (_, intruder) = hello(&url, "worker-1", "intruders-secret").await;
    assert_eq!(intruder["err"]["code"], "unauthorized", "{intruder}");
    let (mut owner, reply) = hello(&url, "worker-1", "workers-secret").await;
    assert!(reply["ok"].is_object(), "{reply}");
    let inspect = json!({"id": 2, "op": "inspect", "key": "jobs/1"});
    let info = owner.call(inspect).await;
    assert_eq!(info["ok"]["holder"]["client"], "worker-1", "{info}");
    assert_eq!(info["ok"]["holder"]["token"], token, "{info}");
    // Another id is anyone's to claim.
    let (_, other) = hello(&url, "intruder-1", "intruders-secret").await;
    assert!(other["ok"].is_object(), "{other}");
    stop(&mut child);
}

/// Workers with small quotas: two locks, one set, three members; and
/// tallies with one set.
const SMALL_QUOTAS: &str = r#"
[[principal]]
name = "workers"
secret = "workers-secret"
locks = ["jobs/"]
sets = ["results/"]
read = [""]
locks_max = 2
sets_max = 1
members_max = 3

[[principal]]
name = "tallies"
secret = "tallies-secret"
locks = []
sets = ["tallies/"]
read = [""]
sets_max = 1
"#;

/// What the principal held before a SIGKILL still counts against its
/// quotas after the restart: the quota ledger starts from the recovered
/// locks, sets and members (by the owners of their client ids), not from
/// nothing. Its locks are two shared grants of one key, by two clients:
/// each counts, before and after. A set counts against the principal that
/// set it up even while it has no member (the shards keep its creator).
#[tokio::test]
async fn a_principals_quotas_count_what_it_held_before_a_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("auth.toml"), SMALL_QUOTAS).expect("write the auth file");
    let (mut child, url) = serve_durable(dir.path());
    let (mut workers, reply) = hello(&url, "worker-1", "workers-secret").await;
    assert!(reply["ok"].is_object(), "{reply}");
    let lock = |id: u64, key: &str| json!({"id": id, "op": "lock", "key": key, "ttl_ms": 600_000, "wait_ms": 0});
    let shared = |id: u64, key: &str| json!({"id": id, "op": "lock", "key": key, "mode": "shared", "ttl_ms": 600_000, "wait_ms": 0});
    let first = workers.call(shared(2, "jobs/1")).await["ok"]["token"].clone();
    assert!(first.is_u64(), "{first}");
    let (mut second_worker, reply) = hello(&url, "worker-2", "workers-secret").await;
    assert!(reply["ok"].is_object(), "{reply}");
    let second = second_worker.call(shared(3, "jobs/1")).await;
    assert!(second["ok"]["token"].is_u64(), "{second}");
    let set_up =
        |id: u64, set: &str| json!({"id": id, "op": "set_up", "set": set, "ttl_ms": 600_000});
    assert!(workers.call(set_up(4, "results/a")).await["ok"].is_object());
    let insert = |id: u64, keys: &[&str]| json!({"id": id, "op": "insert", "set": "results/a", "keys": keys});
    let inserted = workers.call(insert(5, &["m1", "m2", "m3"])).await;
    assert!(inserted["ok"].is_object(), "{inserted}");
    // At every quota now, for another key or a third share of the same.
    let over = workers.call(lock(6, "jobs/3")).await;
    assert_eq!(over["err"]["code"], "overloaded", "{over}");
    let (mut third_worker, _) = hello(&url, "worker-3", "workers-secret").await;
    let over = third_worker.call(shared(2, "jobs/1")).await;
    assert_eq!(over["err"]["code"], "overloaded", "{over}");
    let (mut tallies, reply) = hello(&url, "tally-1", "tallies-secret").await;
    assert!(reply["ok"].is_object(), "{reply}");
    let empty = tallies.call(set_up(2, "tallies/empty")).await;
    assert_eq!(empty["ok"]["created"], true, "{empty}");
    let over = tallies.call(set_up(3, "tallies/other")).await;
    assert_eq!(over["err"]["code"], "overloaded", "{over}");

    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let (mut child, url) = serve_durable(dir.path());

    let (mut workers, reply) = hello(&url, "worker-1", "workers-secret").await;
    assert!(reply["ok"].is_object(), "{reply}");
    let (mut third_worker, _) = hello(&url, "worker-3", "workers-secret").await;
    let over = third_worker.call(shared(2, "jobs/1")).await;
    assert_eq!(over["err"]["code"], "overloaded", "a third share: {over}");
    for (request, what) in [
        (lock(2, "jobs/3"), "a third lock"),
        (set_up(3, "results/b"), "a second set"),
        (insert(4, &["m4"]), "a fourth member"),
    ] {
        let answer = workers.call(request).await;
        assert_eq!(answer["err"]["code"], "overloaded", "{what}: {answer}");
    }
    // Counted, not refused for everything: freeing one grant frees exactly
    // its place (the other share of the key stays counted).
    let unlock = json!({"id": 5, "op": "unlock", "key": "jobs/1", "token": first});
    assert!(workers.call(unlock).await["ok"].is_object());
    let granted = workers.call(lock(6, "jobs/3")).await;
    assert!(granted["ok"]["token"].is_u64(), "{granted}");
    let over = workers.call(lock(7, "jobs/4")).await;
    assert_eq!(over["err"]["code"], "overloaded", "one place only: {over}");
    // The empty set still counts against the principal that set it up,
    // asked on a client id other than the one that did; torn down, it
    // frees its place.
    let (mut tallies, reply) = hello(&url, "tally-2", "tallies-secret").await;
    assert!(reply["ok"].is_object(), "{reply}");
    let over = tallies.call(set_up(2, "tallies/other")).await;
    assert_eq!(over["err"]["code"], "overloaded", "a second set: {over}");
    let tear_down = json!({"id": 3, "op": "tear_down", "set": "tallies/empty"});
    let torn = tallies.call(tear_down).await;
    assert!(torn["ok"].is_object(), "{torn}");
    let created = tallies.call(set_up(4, "tallies/other")).await;
    assert_eq!(created["ok"]["created"], true, "{created}");
    stop(&mut child);
}
