//! What an operator meets: the config file and `--print-config`, JSON
//! logs, backup and restore, the systemd unit, and the command line's
//! answers to mistakes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

mod support;
use support::{KillOnDrop, SpawnKillOnDrop, serve_ws as serve};

const BIN: &str = env!("CARGO_BIN_EXE_deadbolt");

fn deadbolt(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("DEADBOLT_SERVER")
        .env_remove("DEADBOLT_CLIENT_ID")
        .output()
        .expect("run deadbolt")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn path(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

fn stop(mut child: KillOnDrop) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("signal");
    assert!(child.wait().expect("wait").success());
}

/// The value of `key` in `--print-config` output.
fn setting<'a>(config: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key} = ");
    config
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key} in:\n{config}"))
}

#[test]
fn the_config_file_sets_every_flag_flags_override_it_and_print_config_reads_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("deadbolt.toml");
    std::fs::write(
        &file,
        "shards = 2\ndata_dir = \"/srv/deadbolt\"\nin-memory = true\nquic = \"off\"\n\
         idle-ping = \"5s\"\nlog-format = \"json\"\n",
    )
    .expect("write config");
    let printed = deadbolt(&[
        "serve",
        "--config",
        path(&file),
        "--shards",
        "3",
        "--print-config",
    ]);
    assert!(printed.status.success(), "{}", stderr(&printed));
    let config = stdout(&printed);
    assert_eq!(setting(&config, "shards"), "3", "the flag wins");
    assert_eq!(setting(&config, "data-dir"), "\"/srv/deadbolt\"");
    assert_eq!(setting(&config, "in-memory"), "true");
    assert_eq!(setting(&config, "quic"), "\"off\"");
    assert_eq!(setting(&config, "idle-ping"), "\"5s\"");
    assert_eq!(setting(&config, "log-format"), "\"json\"");
    assert_eq!(setting(&config, "handshakes-max"), "1024", "a default");
    assert!(
        config.contains("# max-connections = (not set)"),
        "derived from --memory-max at start:\n{config}"
    );
    assert!(config.contains("# tls-cert = (not set)"), "{config}");
    for not_a_setting in ["server", "client-id", "config", "print-config", "help"] {
        assert!(
            !config
                .lines()
                .any(|l| l.starts_with(&format!("{not_a_setting} ="))),
            "only serve settings:\n{config}"
        );
    }
    assert!(
        !dir.path().join("deadbolt-data").exists() && !Path::new("/srv/deadbolt").exists(),
        "printing starts nothing"
    );

    // What it printed is a config file that gives the same configuration.
    let again = dir.path().join("printed.toml");
    std::fs::write(&again, &config).expect("write");
    let reread = deadbolt(&["serve", "--config", path(&again), "--print-config"]);
    assert!(reread.status.success(), "{}", stderr(&reread));
    assert_eq!(stdout(&reread), config);
}

#[test]
fn a_bad_config_file_is_refused_naming_the_key_and_starts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let cases = [
        ("shardz = 2\n", "unknown key `shardz`"),
        ("config = \"other.toml\"\n", "unknown key `config`"),
        ("server = \"ws://x/ws\"\n", "unknown key `server`"),
        ("shards = \"many\"\n", "--shards"),
        ("in-memory = \"yes\"\n", "`in-memory` is true or false"),
        (
            "ws = [\"127.0.0.1:1\"]\n",
            "`ws` takes a string or an integer",
        ),
        ("shards = \n", "not valid TOML"),
        ("data-dir = \"a\"\ndata_dir = \"b\"\n", "are one key"),
    ];
    for (text, expected) in cases {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).expect("write");
        let output = deadbolt(&[
            "serve",
            "--config",
            path(&file),
            "--data-dir",
            path(&data_dir),
        ]);
        assert_eq!(output.status.code(), Some(4), "{text}");
        let message = stderr(&output);
        assert!(message.contains(expected), "{text}: {message}");
        assert!(!data_dir.exists(), "{text}: nothing started");
    }
    let missing = deadbolt(&["serve", "--config", "/nonexistent/deadbolt.toml"]);
    assert!(stderr(&missing).contains("cannot read the config file /nonexistent/deadbolt.toml"));
}

/// A WebSocket upgrade on `addr`, then a frame the client must mask sent
/// unmasked: a protocol violation.
fn violate_the_protocol(addr: &str) {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(addr).expect("connect");
    socket
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .expect("upgrade");
    let mut head = [0u8; 12];
    socket.read_exact(&mut head).expect("response");
    assert_eq!(&head, b"HTTP/1.1 101");
    socket
        .write_all(&[0x81, 0x02, b'h', b'i'])
        .expect("unmasked frame");
    // Read until the server closes.
    let _ = socket.read_to_end(&mut Vec::new());
}

/// A request head that is not HTTP.
fn send_garbage(addr: &str) {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(addr).expect("connect");
    socket.write_all(b"garbage\r\n\r\n").expect("write");
    let mut answer = String::new();
    let _ = socket.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

#[test]
fn the_server_logs_json_lines_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--ws",
            "127.0.0.1:0",
            "--quic",
            "off",
            "--log-format",
        ])
        .arg("json")
        .arg("--data-dir")
        .arg(dir.path())
        .stderr(Stdio::piped())
        .spawn_kill_on_drop()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("a log line");
        let event: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(event["timestamp"].is_string(), "{line}");
        assert!(event["level"].is_string(), "{line}");
        let message = event["message"].as_str().expect("a message").to_owned();
        seen.push(message.clone());
        if message.contains("listening on ws://") {
            break;
        }
    }
    let listening = seen.last().expect("a listening line");
    let addr = listening[listening.find("ws://").expect("url") + 5..]
        .trim_end_matches("/ws")
        .to_owned();
    violate_the_protocol(&addr);
    send_garbage(&addr);
    stop(child);
    let rest: Vec<serde_json::Value> = lines
        .map(|l| l.expect("line"))
        .map(|line| {
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect();
    let with_message = |text: &str| -> Vec<&serde_json::Value> {
        rest.iter()
            .filter(|event| event["message"].as_str().is_some_and(|m| m.contains(text)))
            .collect()
    };
    // Each connection's error once, with the peer and the reason.
    let violation = with_message("websocket connection ended on an error");
    assert_eq!(violation.len(), 1, "{rest:?}");
    assert!(
        violation[0]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:"))
    );
    let reason = violation[0]["reason"].as_str().expect("a reason");
    assert!(reason.starts_with("closed with 1002"), "{reason}");
    assert_eq!(violation[0]["level"], "INFO");
    let garbage = with_message("bad request head");
    assert_eq!(garbage.len(), 1, "{rest:?}");
    assert!(garbage[0]["peer"].is_string() && garbage[0]["error"].is_string());
    let stopped = rest.iter().filter(|event| event["message"] == "stopped");
    assert_eq!(stopped.count(), 1, "{rest:?}");
}

#[test]
fn backup_copies_a_stopped_servers_data_and_a_restored_copy_serves_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let copy = dir.path().join("backup");
    let restored = dir.path().join("restored");
    let (server, url) = serve(&data, &[]);
    let client = |args: &[&str]| {
        let mut all = vec!["--server", url.as_str()];
        all.extend(args);
        deadbolt(&all)
    };
    let token = stdout(&client(&["try-lock", "report", "--ttl", "1h"]));
    let token = token.trim().to_owned();
    assert!(
        client(&["set-up", "results", "--ttl", "1h"])
            .status
            .success()
    );
    let mut distinct = Command::new(BIN)
        .args(["--server", &url, "distinct", "results"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("distinct");
    {
        use std::io::Write;
        let mut stdin = distinct.stdin.take().expect("stdin");
        stdin.write_all(b"a\nb\na\nc\n").expect("write");
    }
    assert!(distinct.wait().expect("distinct").success());

    // Refused while the server runs: a live directory is no backup.
    let busy = deadbolt(&["backup", "--data-dir", path(&data), path(&copy)]);
    assert_eq!(busy.status.code(), Some(4));
    assert!(
        stderr(&busy).contains("in use by another deadbolt server"),
        "{}",
        stderr(&busy)
    );
    assert!(!copy.exists());

    stop(server);
    let backed_up = deadbolt(&["backup", "--data-dir", path(&data), path(&copy)]);
    assert!(backed_up.status.success(), "{}", stderr(&backed_up));
    let again = deadbolt(&["backup", "--data-dir", path(&data), path(&copy)]);
    assert!(
        stderr(&again).contains("exists"),
        "never over an earlier copy"
    );

    let restore = deadbolt(&["restore", path(&copy), "--data-dir", path(&restored)]);
    assert!(restore.status.success(), "{}", stderr(&restore));
    let over = deadbolt(&["restore", path(&copy), "--data-dir", path(&data)]);
    assert!(stderr(&over).contains("not empty"), "{}", stderr(&over));
    let not_a_copy = deadbolt(&["restore", path(dir.path()), "--data-dir", path(&copy)]);
    assert!(
        stderr(&not_a_copy).contains("not a copy"),
        "{}",
        stderr(&not_a_copy)
    );

    let (server, url) = serve(&restored, &[]);
    let client = |args: &[&str]| {
        let mut all = vec!["--server", url.as_str()];
        all.extend(args);
        deadbolt(&all)
    };
    let inspect = stdout(&client(&["inspect", "report"]));
    assert!(
        inspect.contains(&token),
        "the lock and its token: {inspect}"
    );
    assert_eq!(
        stdout(&client(&["members", "results", "--index"])),
        "1\ta\n2\tb\n3\tc\n"
    );
    stop(server);
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify_and_its_command_line_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging");
    let unit = std::fs::read_to_string(root.join("deadbolt.service")).expect("the unit file");
    let config = root.join("deadbolt.toml");
    // Verify it with this build's binary where the unit names the installed one.
    let dir = tempfile::tempdir().expect("tempdir");
    let installed = unit.replace("/usr/bin/deadbolt", BIN);
    let copy = dir.path().join("deadbolt.service");
    std::fs::write(&copy, &installed).expect("write the unit");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap_or_else(|error| {
            panic!("systemd-analyze (Debian: apt-get install systemd) cannot run: {error}")
        });
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        stdout(&verify),
        stderr(&verify)
    );
    for wanted in [
        "User=deadbolt",
        "StateDirectory=deadbolt",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(wanted), "the unit has {wanted}");
    }

    // Its ExecStart, with the example config, is a valid serve command.
    let exec = installed
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let mut words = exec
        .split_whitespace()
        .map(|w| w.replace("/etc/deadbolt/deadbolt.toml", path(&config)));
    let program = words.next().expect("a program");
    let output = Command::new(program)
        .args(words)
        .arg("--print-config")
        .output()
        .expect("run ExecStart");
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = stdout(&output);
    assert_eq!(setting(&printed, "data-dir"), "\"/var/lib/deadbolt\"");
    assert_eq!(setting(&printed, "log-format"), "\"json\"");
}

#[test]
fn command_line_mistakes_get_one_clear_message() {
    // A zero lease is refused before anything is asked of a server.
    for args in [
        ["lock", "k", "--ttl", "0s", "--", "true"].as_slice(),
        &["try-lock", "k", "--ttl", "0ms"],
        &["set-up", "s", "--ttl", "0s"],
    ] {
        let output = deadbolt(&[&["--server", "ws://127.0.0.1:1/ws"], args].concat());
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let message = stderr(&output);
        assert!(message.contains("must be at least 1ms"), "{message}");
        assert!(!message.contains("cannot reach"), "{message}");
    }

    // Client flags are neither shown nor taken by `deadbolt serve`.
    let help = stdout(&deadbolt(&["serve", "--help"]));
    for flag in [
        "--server",
        "--client-id",
        "--ca ",
        // A switch ends its line (serve's own --insecure-no-auth does not).
        "--insecure\n",
        "--auth-file",
        "--retry-for",
    ] {
        assert!(!help.contains(flag), "{flag} in serve --help:\n{help}");
    }
    assert!(help.contains("--config") && help.contains("--data-dir"));
    let refused = deadbolt(&["serve", "--server", "ws://127.0.0.1:1/ws"]);
    assert_eq!(refused.status.code(), Some(4));
    assert!(stderr(&refused).contains("--server is a flag of the client commands"));
    assert!(stdout(&deadbolt(&["inspect", "--help"])).contains("--server"));

    // A server's error is said once.
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, url) = serve(dir.path(), &["--in-memory"]);
    let output = deadbolt(&["--server", &url, "inspect", ""]);
    assert_eq!(output.status.code(), Some(4));
    let message = stderr(&output);
    assert_eq!(
        message.matches("must be 1..=1024 bytes").count(),
        1,
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");
    stop(server);
}

#[test]
fn an_online_backup_holds_every_change_acknowledged_before_it_and_the_server_goes_on() {
    use std::io::Write;
    const KEYS: usize = 20_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, backups) = (dir.path().join("data"), dir.path().join("backups"));
    let (server, url) = serve(&data, &["--backup-dir", path(&backups)]);
    let run = |args: &[&str]| deadbolt(&[&["--server", url.as_str()], args].concat());
    let token = stdout(&run(&["try-lock", "report", "--ttl", "1h"]));
    assert!(run(&["set-up", "results", "--ttl", "1h"]).status.success());

    // A worker inserts keys while the backup is made: `distinct` prints
    // each key once its insert is acknowledged, in input order.
    let mut worker = Command::new(BIN)
        .args(["--server", &url, "distinct", "results"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("distinct");
    let mut stdin = worker.stdin.take().expect("stdin");
    let feeding = std::thread::spawn(move || {
        for i in 0..KEYS {
            writeln!(stdin, "key-{i}").expect("write a key");
        }
    });
    let mut acknowledged = BufReader::new(worker.stdout.take().expect("stdout")).lines();
    let mut before = 0;
    while before < 1000 {
        acknowledged.next().expect("a key").expect("a line");
        before += 1;
    }
    let made = run(&["backup", "--online"]);
    assert!(made.status.success(), "{}", stderr(&made));
    let answer = stdout(&made);
    let copy = answer
        .trim()
        .strip_prefix("backed up to ")
        .unwrap_or_else(|| panic!("{answer}"))
        .to_owned();
    assert!(copy.starts_with(path(&backups)), "{copy}");
    // The server goes on serving (the count drains the worker's output,
    // so that it never stops for a full pipe).
    assert_eq!(acknowledged.count() + before, KEYS);
    feeding.join().expect("feeding");
    assert!(worker.wait().expect("distinct").success());
    let second = stdout(&run(&["backup", "--online"]));
    assert_ne!(second.trim(), answer.trim(), "each backup a new directory");
    stop(server);

    let restored = dir.path().join("restored");
    let restore = deadbolt(&["restore", &copy, "--data-dir", path(&restored)]);
    assert!(restore.status.success(), "{}", stderr(&restore));
    let (server, url) = serve(&restored, &[]);
    let run = |args: &[&str]| deadbolt(&[&["--server", url.as_str()], args].concat());
    assert!(stdout(&run(&["inspect", "report"])).contains(token.trim()));
    // Every key acknowledged before the backup, with its index: the copy is
    // the set as it was at one moment, a prefix of the worker's keys.
    let members = stdout(&run(&["members", "results", "--index"]));
    let members: Vec<&str> = members.lines().collect();
    assert!(members.len() >= before, "{} < {before}", members.len());
    eprintln!(
        "{before} keys acknowledged before the backup, {} in it",
        members.len()
    );
    for (i, member) in members.iter().enumerate() {
        assert_eq!(*member, format!("{}\tkey-{i}", i + 1));
    }
    stop(server);
}

#[test]
fn an_online_backup_says_why_it_cannot_be_made() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, url) = serve(&dir.path().join("data"), &[]);
    let off = deadbolt(&["--server", &url, "backup", "--online"]);
    assert_eq!(off.status.code(), Some(4));
    assert!(
        stderr(&off).contains("start the server with --backup-dir"),
        "{}",
        stderr(&off)
    );
    stop(server);
    let (server, url) = serve(&dir.path().join("memory"), &["--in-memory"]);
    let nothing = deadbolt(&["--server", &url, "backup", "--online"]);
    assert!(
        stderr(&nothing).contains("no data directory to back up"),
        "{}",
        stderr(&nothing)
    );
    stop(server);
    let both = deadbolt(&["backup", "--online", "somewhere"]);
    assert_eq!(both.status.code(), Some(2), "--online takes no directory");
}

#[test]
fn a_graceful_stop_keeps_the_time_locks_and_sets_had_left_while_it_drained() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (server, url) = serve(&data, &[]);
    let run = |url: &str, args: &[&str]| deadbolt(&[&["--server", url], args].concat());
    let token = stdout(&run(&url, &["try-lock", "report", "--ttl", "3s"]));
    let mut distinct = Command::new(BIN)
        .args(["--server", &url, "distinct", "results", "--ttl", "3s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("distinct");
    writeln!(distinct.stdin.take().expect("stdin"), "x").expect("a key");
    assert_eq!(
        stdout(&distinct.wait_with_output().expect("distinct")),
        "x\n"
    );

    // A client that connected and says nothing keeps the drain going for
    // the whole shutdown grace (5 s): past the 3 s the lock and the set
    // had to live, and nobody can renew them meanwhile.
    let address = url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .to_owned();
    let silent = std::net::TcpStream::connect(&address).expect("connect");
    let asked = std::time::Instant::now();
    while handshakes(&address) == 0 {
        // Not accepted yet: a stop now would have nothing to drain.
        assert!(
            asked.elapsed().as_secs() < 10,
            "the server never took the connection"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let began = std::time::Instant::now();
    stop(server);
    let drained = began.elapsed();
    drop(silent);
    assert!(
        drained > std::time::Duration::from_secs(3),
        "the drain must outlast the lease for this test to mean anything: {drained:?}"
    );

    let (server, url) = serve(&data, &[]);
    let inspected = stdout(&run(&url, &["inspect", "report"]));
    assert!(inspected.contains(token.trim()), "{inspected}");
    assert_eq!(
        stdout(&run(&url, &["members", "results", "--index"])),
        "1\tx\n"
    );
    stop(server);
}

/// The server's `deadbolt_ws_handshakes` gauge: connections accepted whose
/// request head has not come yet (this request's own is read by then).
fn handshakes(address: &str) -> u64 {
    use std::io::{Read, Write};
    let mut http = std::net::TcpStream::connect(address).expect("connect");
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: deadbolt\r\nConnection: close\r\n\r\n")
        .expect("ask for the metrics");
    let mut answer = String::new();
    http.read_to_string(&mut answer).expect("the metrics");
    answer
        .lines()
        .find_map(|line| line.strip_prefix("deadbolt_ws_handshakes "))
        .map_or(0, |value| {
            value.trim().parse::<f64>().expect("a number") as u64
        })
}
