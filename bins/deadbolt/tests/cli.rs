//! The real `deadbolt` binary against a real server (also the binary).

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

mod support;
use support::{KillOnDrop, SpawnKillOnDrop, read_urls};

const BIN: &str = env!("CARGO_BIN_EXE_deadbolt");

/// `deadbolt serve` on a free port, stopped with SIGTERM when dropped.
struct Server {
    child: KillOnDrop,
    url: String,
    quic_url: String,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--ws",
                "127.0.0.1:0",
                "--quic",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir.path())
            .stderr(Stdio::piped())
            .spawn_kill_on_drop()
            .expect("spawn server");
        let (url, quic_url) = read_urls(&mut child);
        Server {
            child,
            url,
            quic_url: quic_url.expect("QUIC listens"),
            dir,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run deadbolt")
    }

    /// Asserts that `deadbolt inspect KEY` says the key is free.
    fn assert_free(&self, key: &str, why: &str) {
        let info = stdout(&self.run(&["inspect", key]));
        assert!(info.contains("free"), "{why}: {info}");
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("DEADBOLT_SERVER", &self.url)
            .env_remove("DEADBOLT_CLIENT_ID");
        command
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        self.child.wait().expect("wait for server")
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn serve_runs_with_no_flags_is_ready_within_a_second_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .arg("serve")
        .current_dir(dir.path())
        .stderr(Stdio::piped())
        .spawn_kill_on_drop()
        .expect("spawn");
    let (url, quic) = read_urls(&mut child);
    assert_eq!(url, "ws://127.0.0.1:7420/ws");
    assert_eq!(quic.as_deref(), Some("quic://127.0.0.1:7421"));
    assert!(
        dir.path().join("deadbolt-data/cert.pem").exists(),
        "a certificate next to its data"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "ready in {:?}",
        started.elapsed()
    );
    let ping = Command::new(BIN)
        .args(["inspect", "k"])
        .output()
        .expect("inspect");
    assert!(ping.status.success(), "{}", stderr(&ping));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("signal");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_second_server_on_the_same_data_directory_is_refused_with_a_clear_message() {
    let server = Server::start();
    let second = Command::new(BIN)
        .args([
            "serve",
            "--ws",
            "127.0.0.1:0",
            "--quic",
            "off",
            "--data-dir",
        ])
        .arg(server.dir.path())
        .output()
        .expect("run a second server");
    assert!(!second.status.success(), "the second server must not start");
    let message = stderr(&second);
    assert!(
        message.contains("is in use by another deadbolt server")
            && message.contains(&format!("by process {}", server.child.id())),
        "{message}"
    );
    // The first one still serves.
    server.assert_free("k", "the first server still answers");
}

#[test]
fn lock_runs_the_command_with_its_token_and_exits_with_its_status() {
    let server = Server::start();
    let output = server.run(&[
        "lock",
        "job",
        "--ttl",
        "5s",
        "--",
        "sh",
        "-c",
        "echo $DEADBOLT_KEY $DEADBOLT_TOKEN; exit 7",
    ]);
    assert_eq!(output.status.code(), Some(7), "{}", stderr(&output));
    let printed = stdout(&output);
    let mut words = printed.split_whitespace();
    assert_eq!(words.next(), Some("job"));
    assert!(
        words.next().and_then(|t| t.parse::<u64>().ok()).is_some(),
        "{printed}"
    );
    server.assert_free("job", "released after the command");
}

#[test]
fn a_command_that_cannot_start_fails_and_gives_the_lock_back() {
    let server = Server::start();
    let output = server.run(&["lock", "job", "--ttl", "60s", "--", "/nonexistent/command"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("cannot run"),
        "{}",
        stderr(&output)
    );
    server.assert_free("job", "released at once, not after the 60 s lease");
}

#[test]
fn a_second_lock_waits_until_the_first_command_finishes() {
    let server = Server::start();
    let first = server
        .command(&[
            "lock",
            "k",
            "--ttl",
            "10s",
            "--",
            "sh",
            "-c",
            "sleep 0.6; echo first done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("first");
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let second = server.run(&["lock", "k", "--ttl", "10s", "--", "echo", "second ran"]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(stdout(&second), "second ran\n");
    assert!(first.wait_with_output().expect("first").status.success());
}

#[test]
fn lock_with_a_short_wait_gives_up_with_exit_1_and_never_runs_the_command() {
    let server = Server::start();
    let held = server.run(&["try-lock", "k", "--ttl", "10s"]);
    assert!(held.status.success());
    let output = server.run(&[
        "lock", "k", "--ttl", "1s", "--wait", "200ms", "--", "echo", "ran",
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stdout(&output), "");
    assert!(
        stderr(&output).contains("held by someone else"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn the_lease_is_renewed_while_the_command_runs_longer_than_it() {
    let server = Server::start();
    let long = server
        .command(&["lock", "k", "--ttl", "600ms", "--", "sleep", "2"])
        .spawn()
        .expect("lock");
    std::thread::sleep(Duration::from_millis(1500));
    let busy = server.run(&["try-lock", "k", "--ttl", "1s"]);
    assert_eq!(
        busy.status.code(),
        Some(1),
        "still held past its first lease"
    );
    assert!(long.wait_with_output().expect("lock").status.success());
}

#[test]
fn a_lost_lock_terminates_the_command_and_exits_3() {
    let mut server = Server::start();
    let started = Instant::now();
    let locked = server
        .command(&[
            "lock",
            "k",
            "--ttl",
            "1s",
            "--retry-for",
            "200ms",
            "--",
            "sleep",
            "30",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("lock");
    std::thread::sleep(Duration::from_millis(300));
    server.stop(); // renewal can no longer reach anyone
    let output = locked.wait_with_output().expect("lock");
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("lost the lock"),
        "{}",
        stderr(&output)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the command was terminated"
    );
}

#[test]
fn try_lock_inspect_and_unlock_by_token_from_another_process() {
    let server = Server::start();
    let taken = server.run(&["try-lock", "res", "--ttl", "30s"]);
    assert!(taken.status.success());
    let token = stdout(&taken).trim().to_owned();
    let info = stdout(&server.run(&["inspect", "res"]));
    assert!(info.contains(&format!("token {token}")), "{info}");
    let other: u64 = token.parse::<u64>().expect("a token") + 1;
    let wrong = server.run(&["unlock", "res", &other.to_string()]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(server.run(&["unlock", "res", &token]).status.success());
    server.assert_free("res", "unlocked by token");
}

#[test]
fn try_lock_with_a_limit_is_a_semaphore_and_shared_holders_coexist() {
    let server = Server::start();
    let take = |args: &[&str]| server.run(&[&["try-lock"], args, &["--ttl", "30s"]].concat());
    assert!(take(&["api", "--limit", "2"]).status.success());
    assert!(take(&["api", "--limit", "2"]).status.success());
    let third = take(&["api", "--limit", "2"]);
    assert_eq!(third.status.code(), Some(1), "both permits are out");
    let info = stdout(&server.run(&["inspect", "api"]));
    assert!(info.contains("held by 2 of 2"), "{info}");
    let other_limit = take(&["api", "--limit", "3"]);
    assert!(!other_limit.status.success());
    assert!(
        String::from_utf8_lossy(&other_limit.stderr).contains("conflict"),
        "{other_limit:?}"
    );
    assert!(take(&["doc", "--shared"]).status.success());
    assert!(take(&["doc", "--shared"]).status.success());
    assert_eq!(
        take(&["doc"]).status.code(),
        Some(1),
        "readers keep a writer out"
    );
    let info = stdout(&server.run(&["inspect", "doc"]));
    assert_eq!(info.matches("shared").count(), 2, "{info}");
    let bad = server.run(&["try-lock", "x", "--ttl", "1s", "--shared", "--limit", "2"]);
    assert!(
        !bad.status.success(),
        "--shared and --limit do not go together"
    );
    let bad = server.run(&["try-lock", "x", "--ttl", "1s", "--lock-delay", "61s"]);
    assert!(!bad.status.success(), "the lock delay is bounded");
}

#[test]
fn lock_with_a_limit_runs_the_command_holding_a_permit() {
    let server = Server::start();
    let ran = server.run(&[
        "lock",
        "api",
        "--limit",
        "5",
        "--lock-delay",
        "2s",
        "--ttl",
        "30s",
        "--",
        "sh",
        "-c",
        "echo permit $DEADBOLT_TOKEN",
    ]);
    assert!(ran.status.success(), "{ran:?}");
    assert!(stdout(&ran).starts_with("permit "), "{ran:?}");
    server.assert_free("api", "released at the end, with no delay after an unlock");
}

#[test]
fn distinct_prints_only_lines_new_across_runs_in_input_order() {
    let server = Server::start();
    let run = |input: &str| {
        let mut child = server
            .command(&["distinct", "results"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("distinct");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        let output = child.wait_with_output().expect("distinct");
        assert!(output.status.success(), "{}", stderr(&output));
        stdout(&output)
    };
    assert_eq!(run("b\na\nb\nc\n\na\n"), "b\na\nc\n");
    assert_eq!(run("c\nd\na\ne\nd\n"), "d\ne\n");
    let many: String = (0..5000).map(|i| format!("k{}\n", i % 3000)).collect();
    let expected: String = (0..3000).map(|i| format!("k{i}\n")).collect();
    assert_eq!(run(&many), expected);
}

#[test]
fn set_up_members_and_tear_down() {
    let server = Server::start();
    assert!(stdout(&server.run(&["set-up", "s", "--ttl", "1m"])).contains("created"));
    assert!(stdout(&server.run(&["set-up", "s", "--ttl", "1m"])).contains("exists"));
    let mut child = server
        .command(&["distinct", "s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("distinct");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"x\ny\n")
        .expect("write");
    assert!(child.wait().expect("distinct").success());
    assert_eq!(
        stdout(&server.run(&["members", "s", "--index"])),
        "1\tx\n2\ty\n"
    );
    assert!(stdout(&server.run(&["tear-down", "s"])).contains("2 members"));
    let gone = server.run(&["members", "s"]);
    assert_eq!(gone.status.code(), Some(1));
    assert_eq!(server.run(&["tear-down", "s"]).status.code(), Some(1));
}

#[test]
fn an_unreachable_server_is_a_one_line_error_and_exit_4() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let output = Command::new(BIN)
        .args(["inspect", "k", "--server", &format!("ws://{addr}/ws")])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(4));
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(
        message.starts_with("deadbolt: cannot reach the server"),
        "{message}"
    );
    assert!(!message.contains("panicked"));
}

#[test]
fn every_client_command_works_over_quic_too() {
    let server = Server::start();
    let ca = server.dir.path().join("cert.pem");
    let quic = |args: &[&str]| {
        let mut all = vec![
            "--server",
            &server.quic_url,
            "--ca",
            ca.to_str().expect("path"),
        ];
        all.extend_from_slice(args);
        server.run(&all)
    };
    let ran = quic(&[
        "lock",
        "q",
        "--ttl",
        "5s",
        "--",
        "sh",
        "-c",
        "test -n \"$DEADBOLT_TOKEN\"",
    ]);
    assert!(ran.status.success(), "{}", stderr(&ran));
    let token = stdout(&quic(&["try-lock", "q", "--ttl", "30s"]))
        .trim()
        .to_owned();
    // The WebSocket side sees the lock the QUIC side took.
    assert!(stdout(&server.run(&["inspect", "q"])).contains(&token));
    assert!(quic(&["unlock", "q", &token]).status.success());
    let no_ca = server.run(&["--server", &server.quic_url, "inspect", "q"]);
    assert_eq!(no_ca.status.code(), Some(4));
    assert!(stderr(&no_ca).contains("--ca"), "{}", stderr(&no_ca));
    let insecure = server.run(&["--server", &server.quic_url, "--insecure", "inspect", "q"]);
    assert!(insecure.status.success());
    assert!(
        stderr(&insecure).contains("WARNING"),
        "says so loudly: {}",
        stderr(&insecure)
    );
}

#[test]
fn watch_prints_each_event_of_a_key_as_a_json_line() {
    use std::io::{BufRead, BufReader};
    let server = Server::start();
    let mut watcher = server
        .command(&["watch", "res"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let mut said = String::new();
    BufReader::new(watcher.stderr.take().expect("stderr"))
        .read_line(&mut said)
        .expect("read stderr");
    assert!(said.contains("watching"), "the watch is in place: {said}");
    let taken = server.run(&["try-lock", "res", "--ttl", "30s"]);
    assert!(taken.status.success(), "{}", stderr(&taken));
    let token: u64 = stdout(&taken).trim().parse().expect("a token");
    assert!(
        server
            .run(&["unlock", "res", &token.to_string()])
            .status
            .success()
    );
    let mut lines = BufReader::new(watcher.stdout.take().expect("stdout")).lines();
    let mut next = || -> serde_json::Value {
        let line = lines.next().expect("a line").expect("read");
        serde_json::from_str(&line).expect("a JSON line")
    };
    assert_eq!(
        next(),
        serde_json::json!({"event": "granted", "key": "res", "token": token})
    );
    assert_eq!(
        next(),
        serde_json::json!({"event": "released", "key": "res", "token": token})
    );
    let _ = kill(Pid::from_raw(watcher.id() as i32), Signal::SIGTERM);
    let _ = watcher.wait();
}
