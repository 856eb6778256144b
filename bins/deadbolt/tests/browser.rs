//! The browser client, the dashboard (both in `server/web/`, served by
//! the binary) and the JavaScript client's Node tests, run by `cargo test`
//! so that the workspace's one test command covers them: `node --test` in
//! `e2e/`, against this crate's `deadbolt` binary, in Chromium
//! (`/usr/bin/chromium`) through playwright-core.
//!
//! Nothing here is skipped: without Node or Chromium the test fails and
//! says how to get them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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

#[test]
fn browser_and_javascript_client_end_to_end() {
    let node = Command::new("node").arg("--version").output();
    match node {
        Ok(out) if out.status.success() => {
            eprintln!("node {}", String::from_utf8_lossy(&out.stdout).trim());
        }
        Ok(out) => panic!("`node --version` failed ({}); {SETUP}", out.status),
        Err(e) => panic!("node is missing ({e}); {SETUP}"),
    }
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing; {SETUP}"
    );

    let dir = e2e_dir();
    if !dir.join("node_modules").is_dir() {
        // Exactly the locked versions; playwright-core downloads no browser,
        // and the variable makes sure of it.
        let mut npm = Command::new("npm");
        npm.args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1");
        run(npm, "npm ci in e2e/");
    }

    let mut tests = Command::new("node");
    tests
        .arg("--test")
        .current_dir(&dir)
        .env("DEADBOLT_BIN", env!("CARGO_BIN_EXE_deadbolt"));
    run(tests, "node --test in e2e/");
}
