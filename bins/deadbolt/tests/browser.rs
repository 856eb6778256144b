//! The browser client, the dashboard (both in `server/web/`, served by
//! the binary) and the JavaScript client's Node tests, run by `cargo test`
//! so that the workspace's one test command covers them: `node --test` in
//! `e2e/`, against this crate's `deadbolt` binary, in Chromium
//! (`/usr/bin/chromium`) through playwright-core.
//!
//! The JavaScript client is also run against a server this process hosts
//! whose disk is full, so that a real server answers `unavailable`
//! (`e2e/unavailable.mjs` drives the client).
//!
//! Nothing here is skipped: without Node the test fails and says how to
//! get it; without Chromium it installs Debian's package with apt-get
//! (which needs root, as in CI), and fails saying how if it cannot.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

#[path = "support/inprocess.rs"]
mod inprocess;
use inprocess::{FillingDisk, InProcess};

/// The Chromium the tests drive (Debian's package).
const CHROMIUM: &str = "/usr/bin/chromium";
const SETUP: &str = "run .ci/run, or install them: apt-get install -y chromium nodejs npm \
                     (Node 20 or newer)";

fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../e2e")
}

/// Runs `command` with its output going straight to ours, so that a long
/// browser run shows its progress; panics with `what` if it fails.
fn run(mut command: Command, what: &str) {
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}; {SETUP}"));
    assert!(
        status.success(),
        "{what} failed ({status}); see its output above"
    );
}

/// Node is there and `e2e/node_modules` installed, once per test process
/// (both tests below need them).
fn node_ready() {
    static READY: std::sync::Once = std::sync::Once::new();
    READY.call_once(|| {
        let node = Command::new("node").arg("--version").output();
        match node {
            Ok(out) if out.status.success() => {
                eprintln!("node {}", String::from_utf8_lossy(&out.stdout).trim());
            }
            Ok(out) => panic!("`node --version` failed ({}); {SETUP}", out.status),
            Err(e) => panic!("node is missing ({e}); {SETUP}"),
        }
        let dir = e2e_dir();
        if !dir.join("node_modules").is_dir() {
            // Exactly the locked versions; playwright-core downloads no
            // browser, and the variable makes sure of it.
            let mut npm = Command::new("npm");
            npm.args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir)
                .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1");
            run(npm, "npm ci in e2e/");
        }
    });
}

/// Installs Debian's Chromium if it is missing, so that the README's one
/// test command works on a machine that has only the toolchains.
fn chromium_ready() {
    if Path::new(CHROMIUM).exists() {
        return;
    }
    eprintln!("{CHROMIUM} is missing: installing Debian's chromium with apt-get");
    let apt = |args: &[&str]| {
        let mut apt = Command::new("apt-get");
        apt.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        run(apt, &format!("apt-get {}", args.join(" ")));
    };
    apt(&["update", "-q"]);
    apt(&["install", "-y", "-q", "--no-install-recommends", "chromium"]);
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is still missing; {SETUP}"
    );
}

#[test]
fn browser_and_javascript_client_end_to_end() {
    node_ready();
    chromium_ready();
    let mut tests = Command::new("node");
    tests
        .arg("--test")
        .current_dir(e2e_dir())
        .env("DEADBOLT_BIN", env!("CARGO_BIN_EXE_deadbolt"));
    run(tests, "node --test in e2e/");
}

/// Runs `e2e/unavailable.mjs MODE URLS` (the JavaScript client) and reads
/// the JSON line it prints.
async fn drive_javascript(mode: &str, urls: &str) -> serde_json::Value {
    let script = tokio::process::Command::new("node")
        .args(["unavailable.mjs", mode, urls])
        .current_dir(e2e_dir())
        .stdin(Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), script)
        .await
        .expect("the script ends within 30 s")
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node unavailable.mjs {mode} failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The JavaScript client against a real server that answers `unavailable`
/// (durable, on a disk made full; see `support/inprocess.rs`): retried
/// until there is room again, given up after `retryFor`, and left for the
/// next server, with the same client id. Node only runs the client; the
/// disk and the checks of the servers are here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_client_retries_unavailable_and_fails_over() {
    tokio::task::spawn_blocking(node_ready)
        .await
        .expect("node is ready");
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = FillingDisk::default();
    let full = InProcess::durable(Arc::new(disk.clone()), dir.path()).await;

    disk.fill();
    disk.make_room_after(Duration::from_millis(1_500));
    let seen = drive_javascript("retry", &full.ws_url).await;
    assert_eq!(seen["refused"], "unavailable", "{seen}");
    assert_eq!(seen["created"], true, "{seen}");
    assert!(disk.refused() >= 3, "refused {} appends", disk.refused());
    let patient = full.observer().await.set("js/patient").inspect().await;
    assert!(patient.is_ok(), "{patient:?}");

    let serving = InProcess::start(None).await;
    disk.fill();
    let refused_before = disk.refused();
    let urls = format!("{},{}", full.ws_url, serving.ws_url);
    let seen = drive_javascript("failover", &urls).await;
    assert!(
        disk.refused() > refused_before,
        "the first server was asked"
    );
    assert_eq!(
        seen["connectedTo"],
        serde_json::json!([full.ws_url, serving.ws_url]),
        "{seen}"
    );
    let held = serving.observer().await.inspect("js/failover").await;
    let holder = held.expect("inspect").holder.expect("held");
    assert_eq!(
        (
            serde_json::json!(holder.client),
            serde_json::json!(holder.token)
        ),
        (seen["clientId"].clone(), seen["token"].clone())
    );
    disk.make_room();
    let untouched = full.observer().await.inspect("js/failover").await;
    assert_eq!(
        untouched.expect("inspect").holder,
        None,
        "refused, unchanged"
    );
    full.stop().await;
    serving.stop().await;
}
