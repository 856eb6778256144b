//! Clients given several servers (SPEC section 9), against real servers on
//! real sockets: the first URL a closed port and the second a live server
//! (over WebSocket and QUIC, from the Rust client and the command line); a
//! server killed mid-run, with the client (and a lock's auto-renewal)
//! moving to the next one; and `unavailable` from a real server whose disk
//! is full, retried on that server or left for the next. Last, a real
//! three-node cluster whose leader is killed under a client given every
//! node.
//!
//! Elsewhere the servers are separate processes or engines, not a
//! cluster: where a test needs the second server to know what the first
//! acknowledged, it starts it on the first one's data directory after the
//! first was killed.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use deadbolt_core::client::{
    Client, ClientOptions, Connector, FailoverConnector, LockOptions, TransportError,
};
use deadbolt_core::proto::ErrorCode;
use deadbolt_transport_ws::WsConnector;
use tokio::time::Instant;

mod support;
use support::{KillOnDrop, SpawnKillOnDrop, free_port, read_urls};
#[path = "support/inprocess.rs"]
mod inprocess;
use inprocess::{FillingDisk, InProcess};

const BIN: &str = env!("CARGO_BIN_EXE_deadbolt");

/// A URL where nobody listens: a port that was free a moment ago.
fn closed_ws_url() -> String {
    format!("ws://127.0.0.1:{}/ws", free_port())
}

fn ws(url: &str) -> Arc<dyn Connector> {
    Arc::new(WsConnector::new(url).expect("url"))
}

fn failover(servers: Vec<Arc<dyn Connector>>) -> FailoverConnector {
    FailoverConnector::new(servers).expect("servers")
}

fn options(client_id: &str) -> ClientOptions {
    ClientOptions {
        client_id: Some(client_id.to_owned()),
        retry_for: Duration::from_secs(20),
        ..ClientOptions::default()
    }
}

/// Who holds `key` on the server `observer` talks to, and with what token.
async fn holder(observer: &Client, key: &str) -> Option<(String, u64)> {
    let info = observer.inspect(key).await.expect("inspect");
    info.holder.map(|h| (h.client, h.token))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_first_is_skipped_for_a_live_server_over_websocket_and_quic() {
    let server = InProcess::start(None).await;
    let observer = server.observer().await;
    for (n, live) in [ws(&server.ws_url), Arc::new(server.quic().await)]
        .into_iter()
        .enumerate()
    {
        let connector = failover(vec![ws(&closed_ws_url()), live]);
        let id = format!("skipper-{n}");
        let client = Client::connect(connector, options(&id))
            .await
            .expect("connects to the second URL");
        let key = format!("skip/{n}");
        let guard = client
            .lock(&key, Duration::from_secs(10))
            .await
            .expect("lock");
        assert_eq!(holder(&observer, &key).await, Some((id, guard.token())));
        guard.unlock().await.expect("unlock");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_server_down_the_connect_fails_naming_each() {
    let (a, b) = (closed_ws_url(), closed_ws_url());
    let error = Client::connect(failover(vec![ws(&a), ws(&b)]), options("nobody"))
        .await
        .expect_err("nobody listens");
    let message = error.to_string();
    assert!(
        message.contains(&format!("{a}: ")) && message.contains(&format!("{b}: ")),
        "{message}"
    );
    assert!(
        matches!(
            error,
            deadbolt_core::client::Error::Transport(TransportError::Connect { .. })
        ),
        "{error:?}"
    );
}

/// `deadbolt serve` as a process of its own, killed when dropped.
struct Process {
    child: KillOnDrop,
    url: String,
    /// The data directory, if the process has one of its own.
    _own_dir: Option<tempfile::TempDir>,
}

impl Process {
    /// Serves WebSocket only, on `port` (0: any), keeping its data in
    /// `dir` (`None`: a fresh directory of its own).
    fn start(port: u16, dir: Option<&Path>) -> Process {
        let own_dir = match dir {
            Some(_) => None,
            None => Some(tempfile::tempdir().expect("tempdir")),
        };
        let data_dir = dir.or(own_dir.as_ref().map(|d| d.path()));
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--ws",
                &format!("127.0.0.1:{port}"),
                "--quic",
                "off",
            ])
            .arg("--data-dir")
            .args(data_dir)
            .stderr(Stdio::piped())
            .spawn_kill_on_drop()
            .expect("spawn server");
        let (url, _) = read_urls(&mut child);
        Process {
            child,
            url,
            _own_dir: own_dir,
        }
    }

    /// SIGKILL: a crash, every connection cut without a goodbye.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client of one server alone.
async fn observe(url: &str) -> Client {
    Client::connect(
        WsConnector::new(url).expect("url"),
        ClientOptions::default(),
    )
    .await
    .expect("observer connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_run_is_left_for_the_next_live_one() {
    let mut first = Process::start(0, None);
    let second = Process::start(0, None);
    let connector = failover(vec![ws(&first.url), ws(&second.url)]);
    let client = Client::connect(connector, options("survivor"))
        .await
        .expect("connect");
    let guard = client
        .lock("k", Duration::from_secs(30))
        .await
        .expect("lock");
    assert_eq!(
        holder(&observe(&first.url).await, "k").await,
        Some(("survivor".to_owned(), guard.token()))
    );
    guard.detach();
    first.kill();
    // The next request finds its connection gone, reconnects, finds the
    // first server gone too, and goes to the second, as the same client.
    let guard = client
        .lock("k", Duration::from_secs(30))
        .await
        .expect("lock on the second server");
    let seen = holder(&observe(&second.url).await, "k").await;
    assert_eq!(seen, Some(("survivor".to_owned(), guard.token())));
    guard.unlock().await.expect("unlock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_renewal_survives_its_server_being_killed_and_another_taking_over() {
    // The second server comes up on the first one's data directory once
    // the first is dead, at a URL the client was given from the start: as
    // a cluster's next leader would, it knows the lock and its lease.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut first = Process::start(0, Some(dir.path()));
    let second_port = free_port();
    let second_url = format!("ws://127.0.0.1:{second_port}/ws");
    let connector = failover(vec![ws(&first.url), ws(&second_url)]);
    let client = Client::connect(connector, options("renewer"))
        .await
        .expect("connect");
    // Long enough for a debug build's restart on a busy machine.
    let ttl = Duration::from_secs(5);
    let lock = LockOptions::new(ttl).auto_renew(true);
    let guard = client
        .lock_with("leader", lock)
        .await
        .expect("lock")
        .expect("granted");
    let inserted = client.set("s").set_up(Duration::from_secs(60)).await;
    assert!(inserted.is_ok(), "{inserted:?}");
    assert!(client.set("s").insert("x").await.expect("insert").first);

    first.kill();
    let _second = Process::start(second_port, Some(dir.path()));
    // Past the lease view it had at the kill, the guard still holds:
    // renewed on the second server.
    let lost = tokio::time::timeout(ttl * 3 / 2, guard.lost()).await;
    assert!(lost.is_err(), "the lock was reported lost");
    assert!(guard.is_held());
    let seen = holder(&observe(&second_url).await, "leader").await;
    assert_eq!(seen, Some(("renewer".to_owned(), guard.token())));
    let again = client.set("s").insert("x").await.expect("insert again");
    assert_eq!((again.index, again.first), (1, true), "the same client id");
    guard.unlock().await.expect("unlock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_unavailable_which_is_retried_until_there_is_room() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = FillingDisk::default();
    let server = InProcess::durable(Arc::new(disk.clone()), dir.path()).await;
    let connector = WsConnector::new(&server.ws_url).expect("url");
    let client = Client::connect(connector, options("patient"))
        .await
        .expect("connect");
    let set = client.set("s");
    set.set_up(Duration::from_secs(60)).await.expect("set up");
    disk.fill();
    disk.make_room_after(Duration::from_millis(600));
    let started = Instant::now();
    let inserted = set.insert("x").await.expect("insert, once there is room");
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert!(disk.refused() >= 2, "refused {} appends", disk.refused());
    assert_eq!((inserted.index, inserted.first), (1, true));
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_past_the_retry_budget_answers_unavailable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = FillingDisk::default();
    let server = InProcess::durable(Arc::new(disk.clone()), dir.path()).await;
    let connector = WsConnector::new(&server.ws_url).expect("url");
    let options = ClientOptions {
        retry_for: Duration::from_secs(1),
        ..options("impatient")
    };
    let client = Client::connect(connector, options).await.expect("connect");
    disk.fill();
    let refused = client.set("s").set_up(Duration::from_secs(60)).await;
    assert_eq!(
        refused.map_err(|e| e.code()),
        Err(Some(ErrorCode::Unavailable))
    );
    disk.make_room();
    drop(client);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_answering_unavailable_is_left_for_the_next() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = FillingDisk::default();
    let full = InProcess::durable(Arc::new(disk.clone()), dir.path()).await;
    let serving = InProcess::start(None).await;
    let connector = failover(vec![ws(&full.ws_url), Arc::new(serving.quic().await)]);
    let client = Client::connect(connector, options("mover"))
        .await
        .expect("connects to the first server");
    disk.fill();
    let set = client.set("s");
    set.set_up(Duration::from_secs(60))
        .await
        .expect("set up, on the second server");
    assert!(disk.refused() >= 1, "the first server was asked");
    let guard = client
        .lock("k", Duration::from_secs(10))
        .await
        .expect("lock");
    let seen = holder(&serving.observer().await, "k").await;
    assert_eq!(seen, Some(("mover".to_owned(), guard.token())));
    guard.unlock().await.expect("unlock");
    // The refused set_up changed nothing on the first server.
    disk.make_room();
    let unchanged = full.observer().await.set("s").inspect().await;
    assert_eq!(
        unchanged.map_err(|e| e.code()),
        Err(Some(ErrorCode::NoSuchSet))
    );
    drop(client);
    full.stop().await;
    serving.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_renewal_rides_out_a_full_disk_shorter_than_the_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = FillingDisk::default();
    let server = InProcess::durable(Arc::new(disk.clone()), dir.path()).await;
    let connector = WsConnector::new(&server.ws_url).expect("url");
    let client = Client::connect(connector, options("steady"))
        .await
        .expect("connect");
    let ttl = Duration::from_secs(6);
    let lock = LockOptions::new(ttl).auto_renew(true);
    let guard = client
        .lock_with("leader", lock)
        .await
        .expect("lock")
        .expect("granted");
    // Renewal is due 2 s in; the disk is full from 1.5 s to 3.5 s. The
    // refused renewal is retried with a backoff of at most 1 s, well within
    // the lease view (5.9 s).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    disk.fill();
    disk.make_room_after(Duration::from_secs(2));
    // Past the first lease view: renewed once there was room.
    let lost = tokio::time::timeout(Duration::from_millis(5_500), guard.lost()).await;
    assert!(lost.is_err(), "the lock was reported lost");
    assert!(disk.refused() >= 1, "a renewal was refused");
    assert!(guard.is_held());
    let seen = holder(&server.observer().await, "leader").await;
    assert_eq!(seen, Some(("steady".to_owned(), guard.token())));
    guard.unlock().await.expect("unlock");
    drop(client);
    server.stop().await;
}

fn run_cli(server: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("DEADBOLT_SERVER", server)
        .env_remove("DEADBOLT_CLIENT_ID")
        .output()
        .expect("run deadbolt")
}

#[test]
fn the_command_line_takes_several_urls_and_uses_the_live_one() {
    let live = Process::start(0, None);
    let list = format!("{},{}", closed_ws_url(), live.url);
    let taken = run_cli(&list, &["try-lock", "cli/k", "--ttl", "30s"]);
    let stderr = String::from_utf8_lossy(&taken.stderr);
    assert!(taken.status.success(), "{stderr}");
    let token = String::from_utf8_lossy(&taken.stdout).trim().to_owned();
    assert!(token.parse::<u64>().is_ok(), "a token: {token:?}");
    // The --server flag takes the list too, spaces and all.
    let spaced = format!("{} , {}", closed_ws_url(), live.url);
    let info = run_cli(
        "ws://unused.invalid/ws",
        &["--server", &spaced, "inspect", "cli/k"],
    );
    let shown = String::from_utf8_lossy(&info.stdout);
    assert!(info.status.success() && shown.contains(&token), "{shown}");
}

#[test]
fn the_command_line_names_every_server_it_could_not_reach() {
    let (a, b) = (closed_ws_url(), closed_ws_url());
    let out = run_cli(&format!("{a},{b}"), &["inspect", "k"]);
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach any of the servers")
            && stderr.contains(&a)
            && stderr.contains(&b),
        "{stderr}"
    );
    let out = run_cli(&format!("{a},,{b}"), &["inspect", "k"]);
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("empty URL"), "{stderr}");
}

/// The members of a three-node cluster on free peer ports (`--cluster`).
fn cluster_members() -> String {
    let members: Vec<String> = (1..=3)
        .map(|id| format!("{id}=127.0.0.1:{}", free_port()))
        .collect();
    members.join(",")
}

/// Node `id` of the cluster `members`, its data in `dir`/node`id`.
fn start_cluster_node(dir: &Path, members: &str, id: usize) -> Process {
    let mut child = Command::new(BIN)
        .args(["serve", "--ws", "127.0.0.1:0", "--quic", "off"])
        .args(["--node-id", &id.to_string(), "--cluster", members])
        .arg("--data-dir")
        .arg(dir.join(format!("node{id}")))
        .stderr(Stdio::piped())
        .spawn_kill_on_drop()
        .expect("spawn node");
    let (url, _) = read_urls(&mut child);
    Process {
        child,
        url,
        _own_dir: None,
    }
}

/// Whether the node at `url` says it leads (`GET /cluster`).
fn leads(url: &str) -> bool {
    use std::io::{Read, Write};
    let Some(authority) = url.strip_prefix("ws://").and_then(|r| r.split('/').next()) else {
        return false;
    };
    let Ok(mut stream) = std::net::TcpStream::connect(authority) else {
        return false;
    };
    let request = "GET /cluster HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut answer = String::new();
    if stream.write_all(request.as_bytes()).is_err() || stream.read_to_string(&mut answer).is_err()
    {
        return false;
    }
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    serde_json::from_str::<serde_json::Value>(body).is_ok_and(|s| s["state"] == "leader")
}

/// The index of the node that leads, once one does (30 s at most).
fn wait_for_leader(nodes: &[Process]) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Some(leader) = nodes.iter().position(|node| leads(&node.url)) {
            return leader;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no leader within 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_given_every_node_of_a_cluster_rides_out_the_leaders_death() {
    let dir = tempfile::tempdir().expect("tempdir");
    let members = cluster_members();
    let mut nodes: Vec<Process> = (1..=3)
        .map(|id| start_cluster_node(dir.path(), &members, id))
        .collect();
    let leader = tokio::task::block_in_place(|| wait_for_leader(&nodes));
    // The leader first, so that the client is connected to it when it dies.
    let mut urls = vec![nodes[leader].url.clone()];
    urls.extend(
        (0..3)
            .filter(|&i| i != leader)
            .map(|i| nodes[i].url.clone()),
    );
    let connector = failover(urls.iter().map(|url| ws(url)).collect());
    let client = Client::connect(connector, options("clustered"))
        .await
        .expect("connect");
    let ttl = Duration::from_secs(5);
    let lock = LockOptions::new(ttl).auto_renew(true);
    let guard = client
        .lock_with("leader-key", lock)
        .await
        .expect("lock")
        .expect("granted");
    let set = client.set("s");
    set.set_up(Duration::from_secs(600)).await.expect("set up");
    assert!(set.insert("before").await.expect("insert").first);

    nodes[leader].kill();
    let killed = Instant::now();
    // The next request (and the renewals) go to the other nodes, which
    // answer `unavailable` until they have elected a leader.
    let after = set.insert("after").await.expect("insert after the kill");
    eprintln!(
        "leader killed → first insert acknowledged: {} ms",
        killed.elapsed().as_millis()
    );
    assert_eq!((after.index, after.first), (2, true));
    let again = set.insert("before").await.expect("insert again");
    assert_eq!((again.index, again.first), (1, true), "the same client id");
    let lost = tokio::time::timeout(ttl * 3 / 2, guard.lost()).await;
    assert!(lost.is_err(), "the lock was reported lost");
    let survivor = &urls[1];
    let seen = holder(&observe(survivor).await, "leader-key").await;
    assert_eq!(seen, Some(("clustered".to_owned(), guard.token())));
    guard.unlock().await.expect("unlock");

    // The command line, given every node with the dead one first, too.
    let shown = run_cli(&urls.join(","), &["inspect", "leader-key"]);
    let stdout = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.status.success() && stdout.contains("free"),
        "{stdout}{}",
        String::from_utf8_lossy(&shown.stderr)
    );
}
