//! A replicated cluster loses nothing when its leader dies (SPEC section
//! 9), tried on the real binary: three `deadbolt serve --cluster`
//! processes, workers taking locks and inserting results through the two
//! followers (which forward to the leader), and the leader killed with
//! SIGKILL under that load. Afterwards: every acknowledged insert is in the
//! set, no two workers ever held a key at once (by the times they held it),
//! every key's tokens rose in the order they were granted, and the test
//! prints how long the cluster took from the kill to its first new grant.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadbolt_core::client::{Client, ClientOptions, Error};
use deadbolt_core::proto::ErrorCode;
use deadbolt_transport_quic::Trust;
use deadbolt_transport_ws::{TlsDialer, WsConnector};
use tokio::time::Instant;

mod support;
use support::{KillOnDrop, SpawnKillOnDrop, free_port, read_urls};

const BIN: &str = env!("CARGO_BIN_EXE_deadbolt");
const LOCK_WORKERS: usize = 4;
const INSERT_WORKERS: usize = 2;
const KEYS: usize = 2;
const SET: &str = "results";
const HOLD: Duration = Duration::from_millis(15);
const TTL: Duration = Duration::from_secs(10);

/// One node: its process and its WebSocket URL.
struct Node {
    child: KillOnDrop,
    url: String,
}

/// Three members on free peer ports: the `--cluster` value.
fn members() -> String {
    let members: Vec<String> = (1..=3)
        .map(|id| format!("{id}=127.0.0.1:{}", free_port()))
        .collect();
    members.join(",")
}

/// Node `id` of `cluster`, its data in `dir`/node`id`.
fn start_node(dir: &std::path::Path, cluster: &str, id: usize) -> Node {
    start_node_with(dir, cluster, id, &[])
}

/// Node `id` of `cluster`, with `extra` flags.
fn start_node_with(dir: &std::path::Path, cluster: &str, id: usize, extra: &[&str]) -> Node {
    let mut child = Command::new(BIN)
        .args(["serve", "--ws", "127.0.0.1:0", "--quic", "off"])
        .args(["--node-id", &id.to_string(), "--cluster", cluster])
        .args(extra)
        .arg("--data-dir")
        .arg(dir.join(format!("node{id}")))
        .stderr(Stdio::piped())
        .spawn_kill_on_drop()
        .expect("spawn node");
    let (url, _) = read_urls(&mut child);
    Node { child, url }
}

fn start_cluster(dir: &std::path::Path) -> Vec<Node> {
    let cluster = members();
    (1..=3).map(|id| start_node(dir, &cluster, id)).collect()
}

/// `METHOD PATH` on the WebSocket port of the node at `url`: the status
/// line and the body.
fn http(url: &str, method: &str, path: &str) -> Option<(String, String)> {
    http_as(url, method, path, None)
}

/// [`http`] with an admin's secret as the bearer token. A `wss://` node
/// is asked over TLS, trusting [`TLS_CLUSTER_CA`].
fn http_as(url: &str, method: &str, path: &str, bearer: Option<&str>) -> Option<(String, String)> {
    let (tls, rest) = match url.strip_prefix("wss://") {
        Some(rest) => (true, rest),
        None => (false, url.strip_prefix("ws://")?),
    };
    let authority = rest.split('/').next()?;
    let stream = TcpStream::connect(authority).ok()?;
    let bearer = bearer
        .map(|secret| format!("Authorization: Bearer {secret}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{bearer}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let answer = if tls {
        let ca = TLS_CLUSTER_CA.get()?;
        let config = deadbolt_transport_quic::tls::client_tls(&Trust::CaPem(ca.clone())).ok()?;
        let (host, _) = authority.rsplit_once(':')?;
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).ok()?;
        let connection = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
        exchange(rustls::StreamOwned::new(connection, stream), &request)?
    } else {
        exchange(stream, &request)?
    };
    let (head, body) = answer.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_owned(), body.to_owned()))
}

/// Sends `request` and reads the answer to the end of the stream (a TLS
/// server may end it without `close_notify`).
fn exchange(mut stream: impl Read + Write, request: &str) -> Option<String> {
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    if read.is_err() && answer.is_empty() {
        return None;
    }
    String::from_utf8(answer).ok()
}

/// The certificate the nodes of the TLS cluster share, which the test's
/// `/cluster` requests trust.
static TLS_CLUSTER_CA: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// `GET /cluster` on the node at `url`, as JSON.
fn status(url: &str) -> Option<serde_json::Value> {
    status_as(url, None)
}

/// [`status`] from a node that keeps `/cluster` for admins.
fn status_as(url: &str, bearer: Option<&str>) -> Option<serde_json::Value> {
    serde_json::from_str(&http_as(url, "GET", "/cluster", bearer)?.1).ok()
}

/// Waits until the nodes agree on a leader; its index among `nodes`.
fn wait_for_leader(nodes: &[Node], except: Option<usize>) -> usize {
    wait_for_leader_as(nodes, except, None)
}

/// [`wait_for_leader`], asking `/cluster` with `bearer`.
fn wait_for_leader_as(nodes: &[Node], except: Option<usize>, bearer: Option<&str>) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        for (index, node) in nodes.iter().enumerate() {
            if Some(index) == except {
                continue;
            }
            let leads = status_as(&node.url, bearer).is_some_and(|s| s["state"] == "leader");
            if leads {
                return index;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no leader within 30 s");
}

async fn connect(url: &str, client_id: &str) -> Client {
    let options = ClientOptions {
        client_id: Some(client_id.to_owned()),
        retry_for: Duration::from_secs(20),
        ..ClientOptions::default()
    };
    let connector = WsConnector::new(url).expect("url");
    Client::connect(connector, options).await.expect("connect")
}

/// Whether `error` says "not now, retry" (no leader, a forwarded request
/// cut off by the leader's death).
fn retryable(error: &Error) -> bool {
    matches!(error, Error::Transport(_))
        || matches!(
            error.code(),
            Some(ErrorCode::Unavailable | ErrorCode::Overloaded)
        )
}

/// What the workers heard.
#[derive(Default)]
struct Heard {
    /// Key → (granted at, released at, token), per grant.
    holds: BTreeMap<String, Vec<(Instant, Instant, u64)>>,
    /// Results the server acknowledged.
    inserted: HashSet<String>,
    /// The first grant after the kill.
    first_grant_after_kill: Option<Instant>,
}

struct Run {
    heard: Mutex<Heard>,
    killed_at: Mutex<Option<Instant>>,
    stop_at: Mutex<Option<Instant>>,
}

impl Run {
    fn stopped(&self) -> bool {
        let stop = *self.stop_at.lock().expect("lock");
        stop.is_some_and(|at| Instant::now() >= at)
    }
}

async fn lock_worker(url: String, worker: usize, run: Arc<Run>) {
    let client = connect(&url, &format!("locker-{worker}")).await;
    let mut round = 0usize;
    while !run.stopped() {
        round += 1;
        let key = format!("key-{}", (worker + round) % KEYS);
        let guard = match client.lock(&key, TTL).await {
            Ok(guard) => guard,
            Err(error) if retryable(&error) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(error) => panic!("worker {worker}: lock {key}: {error}"),
        };
        let granted = Instant::now();
        tokio::time::sleep(HOLD).await;
        let released = Instant::now();
        let token = guard.token();
        {
            let mut heard = run.heard.lock().expect("lock");
            heard
                .holds
                .entry(key.clone())
                .or_default()
                .push((granted, released, token));
            let killed = *run.killed_at.lock().expect("lock");
            if killed.is_some_and(|k| granted > k) && heard.first_grant_after_kill.is_none() {
                heard.first_grant_after_kill = Some(granted);
            }
        }
        if guard.unlock().await.is_err() {
            unlock(&client, &key, token, &run).await;
        }
    }
}

/// Releases a grant, retrying while the cluster has no leader. A release
/// whose reply was lost and that answers `not_held` on retry is done.
async fn unlock(client: &Client, key: &str, token: u64, run: &Run) {
    loop {
        match client.unlock(key, token).await {
            Ok(_) => return,
            Err(error) if error.code() == Some(ErrorCode::NotHeld) => return,
            Err(error) if retryable(&error) && !run.stopped() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Left to its lease: the test ends.
            Err(_) => return,
        }
    }
}

async fn insert_worker(url: String, worker: usize, run: Arc<Run>) {
    let client = connect(&url, &format!("inserter-{worker}")).await;
    let set = client.set(SET);
    let mut n = 0usize;
    while !run.stopped() {
        let result = format!("w{worker}-r{n}");
        match set.insert(&result).await {
            Ok(_) => {
                run.heard.lock().expect("lock").inserted.insert(result);
                n += 1;
            }
            Err(error) if retryable(&error) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("inserter {worker}: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_load_loses_no_acknowledged_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = start_cluster(dir.path());
    let leader = tokio::task::block_in_place(|| wait_for_leader(&nodes, None));
    let followers: Vec<String> = (0..3)
        .filter(|&i| i != leader)
        .map(|i| nodes[i].url.clone())
        .collect();
    set_up(&followers[0]).await;
    let run = Arc::new(Run {
        heard: Mutex::new(Heard::default()),
        killed_at: Mutex::new(None),
        stop_at: Mutex::new(None),
    });
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..LOCK_WORKERS {
        let url = followers[worker % 2].clone();
        workers.spawn(lock_worker(url, worker, Arc::clone(&run)));
    }
    for worker in 0..INSERT_WORKERS {
        let url = followers[worker % 2].clone();
        workers.spawn(insert_worker(url, worker, Arc::clone(&run)));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    nodes[leader].child.kill().expect("SIGKILL the leader");
    let killed = Instant::now();
    *run.killed_at.lock().expect("lock") = Some(killed);
    tokio::time::sleep(Duration::from_secs(6)).await;
    *run.stop_at.lock().expect("lock") = Some(Instant::now());
    while let Some(ended) = workers.join_next().await {
        ended.expect("worker");
    }
    let new_leader = tokio::task::block_in_place(|| wait_for_leader(&nodes, Some(leader)));
    assert_ne!(new_leader, leader);

    let heard = std::mem::take(&mut *run.heard.lock().expect("lock"));
    let first = heard
        .first_grant_after_kill
        .expect("a grant after the leader was killed");
    eprintln!(
        "leader killed → first grant by the new leader: {} ms",
        (first - killed).as_millis()
    );
    check_holds(&heard.holds);
    assert!(
        heard.inserted.len() > 20,
        "only {} inserts",
        heard.inserted.len()
    );
    check_inserts(&followers[0], &heard.inserted).await;
    drop(nodes.remove(leader));
}

/// No two grants of a key overlap, and tokens rise in grant order.
fn check_holds(holds: &BTreeMap<String, Vec<(Instant, Instant, u64)>>) {
    let mut total = 0;
    for (key, grants) in holds {
        let mut grants = grants.clone();
        grants.sort();
        total += grants.len();
        for pair in grants.windows(2) {
            let ((_, released, token), (granted, _, next)) = (pair[0], pair[1]);
            assert!(
                granted >= released,
                "{key}: token {next} granted while token {token} was still held"
            );
            assert!(next > token, "{key}: token {next} after {token}");
        }
    }
    assert!(total > 20, "only {total} grants: the workers did not work");
}

/// Every acknowledged insert is a member.
async fn check_inserts(url: &str, inserted: &HashSet<String>) {
    use futures_util::TryStreamExt;
    let client = connect(url, "checker").await;
    let members: Vec<_> = client
        .set(SET)
        .members()
        .try_collect()
        .await
        .expect("members");
    let present: HashSet<String> = members.into_iter().map(|m| m.key).collect();
    let lost: Vec<_> = inserted.difference(&present).collect();
    assert!(lost.is_empty(), "acknowledged inserts lost: {lost:?}");
}

/// Readmits `node`, asking every node in turn (the leader does it, and
/// the readmitted node's first votes may move the leadership meanwhile).
fn readmit(urls: &[String], node: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let path = format!("/cluster/readmit/{node}");
    let mut last = None;
    while std::time::Instant::now() < deadline {
        for url in urls {
            match http(url, "POST", &path) {
                Some((line, _)) if line.contains(" 200 ") => return,
                answer => last = answer,
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("node {node} not readmitted in 30 s: {last:?}");
}

/// Sets up the results set through the node at `url`, retrying while that
/// node has not heard from the leader yet.
async fn set_up(url: &str) {
    let client = connect(url, "setup").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.set(SET).set_up(Duration::from_secs(3600)).await {
            Ok(_) => return,
            Err(error) if retryable(&error) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("set up: {error}"),
        }
    }
}

/// Inserts `results` through the node at `url`, retrying while there is no
/// leader (for 30 s at most).
async fn insert_all(url: &str, results: &[String]) {
    let client = connect(url, "disk-loss").await;
    let set = client.set(SET);
    let deadline = Instant::now() + Duration::from_secs(30);
    for result in results {
        loop {
            assert!(Instant::now() < deadline, "no quorum for 30 s");
            match set.insert(result).await {
                Ok(_) => break,
                Err(error) if retryable(&error) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("insert {result}: {error}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_disk_is_refused_until_readmitted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = members();
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| start_node(dir.path(), &cluster, id))
        .collect();
    let leader = tokio::task::block_in_place(|| wait_for_leader(&nodes, None));
    let lost = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let leader_url = nodes[leader].url.clone();
    let before: Vec<String> = (0..50).map(|i| format!("before-{i}")).collect();
    set_up(&leader_url).await;
    insert_all(&leader_url, &before).await;

    // The node loses its data directory and comes back empty.
    nodes[lost].child.kill().expect("kill");
    let _ = nodes[lost].child.wait();
    std::fs::remove_dir_all(dir.path().join(format!("node{}", lost + 1))).expect("wipe");
    nodes[lost] = start_node(dir.path(), &cluster, lost + 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused = status(&nodes[lost].url).expect("status of the wiped node");
    assert_eq!(
        refused["leader"],
        serde_json::Value::Null,
        "refused by its peers: {refused}"
    );

    // Readmitted through the leader (a follower says who leads).
    let (line, body) = http(
        &nodes[other].url,
        "POST",
        &format!("/cluster/readmit/{}", lost + 1),
    )
    .expect("ask a follower");
    // A follower refers to the leader (unless the leadership moved to it).
    assert!(
        line.contains(" 421 ") || line.contains(" 200 "),
        "a follower refers to the leader: {line} {body}"
    );
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    tokio::task::block_in_place(|| readmit(&urls, lost + 1));

    // Now the readmitted node and the leader are a majority without the
    // third: everything acknowledged before is there, and more goes in.
    nodes[other].child.kill().expect("kill the third node");
    let after: Vec<String> = (0..20).map(|i| format!("after-{i}")).collect();
    insert_all(&nodes[lost].url, &after).await;
    let acknowledged: HashSet<String> = before.into_iter().chain(after).collect();
    check_inserts(&nodes[lost].url, &acknowledged).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ephemeral_lock_taken_through_a_follower_ends_with_its_leader() {
    use deadbolt_core::client::LockOptions;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = start_cluster(dir.path());
    let leader = tokio::task::block_in_place(|| wait_for_leader(&nodes, None));
    let a = (leader + 1) % 3;
    let holder = connect(&nodes[a].url, "ephemeral-holder").await;
    let options = LockOptions::new(Duration::from_secs(60)).ephemeral(true);
    let guard = loop {
        // The follower may not have heard from the new leader yet.
        match holder.lock_with("session-lock", options.clone()).await {
            Ok(granted) => break granted.expect("granted"),
            Err(error) if retryable(&error) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(error) => panic!("lock: {error}"),
        }
    };

    // Whoever leads now (it may have moved since): killing it ends the
    // lock either way, through the follower's link or with the holder's own
    // connection.
    let leader = tokio::task::block_in_place(|| wait_for_leader(&nodes, None));
    let b = (0..3)
        .find(|&i| i != leader && i != a)
        .expect("a third node");
    nodes[leader].child.kill().expect("SIGKILL the leader");
    // The new leader released the lock (its connection was to the old
    // one), so the holder must hear that it is lost, long before its 60 s
    // lease would have told it.
    tokio::time::timeout(Duration::from_secs(10), guard.lost())
        .await
        .expect("the holder learns that its ephemeral lock is gone");
    let other = connect(&nodes[b].url, "next-holder").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match other.try_lock("session-lock", Duration::from_secs(5)).await {
            Ok(Some(_)) => break,
            Ok(None) => panic!("the ephemeral lock outlived its leader"),
            Err(error) if retryable(&error) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("try_lock: {error}"),
        }
    }
}

/// With `--auth` on every node, a follower checks its client's grants and
/// forwards what they allow to the leader with the client's own secret,
/// where the leader checks them again (SPEC section 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_with_its_clients_secret_and_refuses_outside_the_grants() {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = dir.path().join("auth.toml");
    std::fs::write(
        &auth,
        "[[principal]]\nname = \"workers\"\nsecret = \"workers-secret\"\nlocks = [\"jobs/\"]\nread = [\"\"]\n\
         [[principal]]\nname = \"ops\"\nsecret = \"ops-secret\"\nadmin = true\n",
    )
    .expect("write the auth file");
    let auth = auth.to_str().expect("utf-8 path");
    let cluster = members();
    let nodes: Vec<Node> = (1..=3)
        .map(|id| start_node_with(dir.path(), &cluster, id, &["--auth", auth]))
        .collect();
    // `/cluster` is for admins now.
    assert!(status(&nodes[0].url).is_none());
    let leader = wait_for_leader_as(&nodes, None, Some("ops-secret"));
    let follower = &nodes[(leader + 1) % nodes.len()];
    let options = ClientOptions {
        client_id: Some("worker-f".to_owned()),
        retry_for: Duration::from_secs(20),
        auth: Some(deadbolt_core::proto::Secret::new("workers-secret")),
        ..ClientOptions::default()
    };
    // A follower claims the client id through the leader: `unavailable`
    // while an election is under way (a loaded machine can start one).
    let connect = || {
        let connector = WsConnector::new(&follower.url).expect("url");
        Client::connect(connector, options.clone())
    };
    let client = until_settled(connect).await.expect("hello");
    let guard = loop {
        match client.try_lock("jobs/1", TTL).await {
            Ok(Some(guard)) => break guard,
            Err(error) if retryable(&error) => tokio::time::sleep(HOLD).await,
            other => panic!("a forwarded lock in the grants: {other:?}"),
        }
    };
    let refused = client
        .try_lock("other", TTL)
        .await
        .expect_err("outside the grants");
    assert_eq!(refused.code(), Some(ErrorCode::Unauthorized), "{refused}");
    // The leader saw the client's own id: it holds the lock there.
    let info = client.inspect("jobs/1").await.expect("inspect");
    let holder = info.holder.expect("held");
    assert_eq!(
        (holder.client.as_str(), holder.token),
        ("worker-f", guard.token())
    );
    // The id is the workers' on every node: the claim went through the log.
    for node in &nodes {
        let options = ClientOptions {
            client_id: Some("worker-f".to_owned()),
            retry_for: Duration::from_secs(20),
            auth: Some(deadbolt_core::proto::Secret::new("ops-secret")),
            ..ClientOptions::default()
        };
        let connector = WsConnector::new(&node.url).expect("url");
        let refused = Client::connect(connector, options)
            .await
            .expect_err("another principal's id");
        assert!(refused.to_string().contains("unauthorized"), "{refused}");
    }
    guard.unlock().await.expect("unlock");
}

/// One JSON message per frame over a plain WebSocket: the frames that
/// follow a request (its reply, then its pushed events), as they come.
struct RawWs(tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>);

impl RawWs {
    async fn open(url: &str) -> RawWs {
        let authority = url.trim_start_matches("ws://").trim_end_matches("/ws");
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .expect("tcp");
        let (ws, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("handshake");
        RawWs(ws)
    }

    async fn send(&mut self, request: serde_json::Value) {
        use futures_util::SinkExt;
        let text = request.to_string();
        self.0
            .send(tokio_tungstenite::tungstenite::Message::Text(text.into()))
            .await
            .expect("send");
    }

    /// The next message, within 10 s.
    async fn next(&mut self) -> serde_json::Value {
        use futures_util::StreamExt;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), self.0.next())
                .await
                .expect("a message within 10 s");
            match frame {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                    return serde_json::from_str(&text).expect("JSON");
                }
                Some(Ok(_)) => continue,
                other => panic!("connection ended: {other:?}"),
            }
        }
    }
}

/// Pushed events through any node (SPEC section 7): a follower serves a
/// `watch` from the log it applies, and follows the grant of a `lock` with
/// `notify` that it forwarded to the leader, so its client hears
/// `expiring` and `lost` as it would from the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_pushes_the_events_of_watches_and_of_forwarded_grants() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = start_cluster(dir.path());
    let leader = tokio::task::block_in_place(|| wait_for_leader(&nodes, None));
    let follower = &nodes[(leader + 1) % 3].url;
    let mut watcher = RawWs::open(follower).await;
    watcher
        .send(serde_json::json!({"id": 1, "op": "watch", "key": "k"}))
        .await;
    assert_eq!(watcher.next().await["ok"], serde_json::json!({}));
    let mut holder = RawWs::open(follower).await;
    let mut id = 10;
    let token = loop {
        // The follower may not have heard from the leader yet.
        id += 1;
        let lock =
            serde_json::json!({"id": id, "op": "lock", "key": "k", "ttl_ms": 1500, "notify": true});
        holder.send(lock).await;
        let reply = holder.next().await;
        if let Some(token) = reply["ok"]["token"].as_u64() {
            break token;
        }
        assert_eq!(reply["err"]["code"], "unavailable", "{reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let sent = Instant::now();
    let expiring = holder.next().await;
    assert_eq!(
        (&expiring["id"], &expiring["event"], &expiring["token"]),
        (
            &serde_json::json!(id),
            &serde_json::json!("expiring"),
            &serde_json::json!(token)
        ),
        "{expiring}"
    );
    let lost = holder.next().await;
    assert_eq!(
        lost,
        serde_json::json!({"id": id, "event": "lost", "token": token, "reason": "expired"})
    );
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "lost with the lease"
    );
    let event =
        |name: &str| serde_json::json!({"id": 1, "event": name, "key": "k", "token": token});
    assert_eq!(watcher.next().await, event("granted"));
    assert_eq!(watcher.next().await, event("expired"));
}

/// The auth file of the TLS cluster: workers may lock `jobs/` and use
/// `results/` sets; guests may read, and lock only `guest/`.
const TLS_POLICY: &str = "[[principal]]\nname = \"workers\"\nsecret = \"workers-secret\"\n\
    locks = [\"jobs/\"]\nsets = [\"results/\"]\nread = [\"\"]\n\
    [[principal]]\nname = \"guests\"\nsecret = \"guests-secret\"\nlocks = [\"guest/\"]\nread = [\"\"]\n\
    [[principal]]\nname = \"ops\"\nsecret = \"ops-secret\"\nadmin = true\n";

/// A client of the `wss://` node at `url` as `client_id` with `secret`,
/// trusting the cluster's certificate `ca`.
async fn connect_tls(url: &str, ca: &[u8], client_id: &str, secret: &str) -> Client {
    let tls = deadbolt_transport_quic::tls::client_tls(&Trust::CaPem(ca.to_vec())).expect("tls");
    let dialer = TlsDialer::new(tls);
    let options = ClientOptions {
        client_id: Some(client_id.to_owned()),
        retry_for: Duration::from_secs(20),
        auth: Some(deadbolt_core::proto::Secret::new(secret)),
        ..ClientOptions::default()
    };
    // A follower claims the client id through the leader: `unavailable`
    // until it has heard from one.
    let connect = || {
        let connector = WsConnector::with_dialer(url, dialer.clone()).expect("url");
        Client::connect(connector, options.clone())
    };
    until_settled(connect).await.expect("hello over wss")
}

/// Retries `call` while the cluster is between leaders (30 s at most):
/// on `unavailable` and lost connections, not on `overloaded`, which the
/// quota tests expect.
async fn until_settled<T, F: Future<Output = Result<T, Error>>>(
    mut call: impl FnMut() -> F,
) -> Result<T, Error> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let settling = |error: &Error| {
        matches!(error, Error::Transport(_)) || error.code() == Some(ErrorCode::Unavailable)
    };
    loop {
        match call().await {
            Err(error) if settling(&error) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// Sends a peer `Hello` (as a node 99) to the peer port at `addr` over
/// TLS with `client`, and says whether a peer frame came back: the peer
/// protocol spoke to it.
fn peer_port_answers(addr: &str, client: rustls::ClientConfig) -> bool {
    let tcp = TcpStream::connect(addr).expect("connect to the peer port");
    tcp.set_read_timeout(Some(Duration::from_secs(4)))
        .expect("timeout");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let connection = rustls::ClientConnection::new(Arc::new(client), name).expect("tls");
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    if tls.write_all(&hello_frame()).is_err() {
        return false;
    }
    let mut length = [0u8; 4];
    tls.read_exact(&mut length).is_ok()
}

/// A peer `Hello` frame: length, then the postcard encoding.
fn hello_frame() -> Vec<u8> {
    let hello = deadbolt_replication::network::Hello {
        from: 99,
        incarnation: 1,
        client_url: "wss://127.0.0.1:1".to_owned(),
    };
    let payload = postcard::to_stdvec(&hello).expect("encode");
    let mut frame = u32::try_from(payload.len())
        .expect("small")
        .to_le_bytes()
        .to_vec();
    frame.extend(payload);
    frame
}

/// With `--tls-cert` and `--auth` on every node (SPEC sections 9 and 10):
/// clients speak `wss://` to a follower, which forwards to the leader's
/// `wss://` port as the client's own principal, so a principal without
/// the grant is refused through a follower too; and the peer port serves
/// mutual TLS: a connection without the cluster's certificate (none, or
/// another) is refused before any Raft is read, plain TCP too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_forwards_as_the_clients_principal_and_its_peer_port_wants_its_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, cert_pem, key_pem) = deadbolt_transport_quic::Identity::self_signed().expect("cert");
    let (cert, key, auth) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("auth.toml"),
    );
    std::fs::write(&cert, &cert_pem).expect("write cert");
    std::fs::write(&key, &key_pem).expect("write key");
    std::fs::write(&auth, TLS_POLICY).expect("write the auth file");
    let ca = cert_pem.into_bytes();
    let _ = TLS_CLUSTER_CA.set(ca.clone());
    let path = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_owned();
    let (cert_arg, key_arg, auth_arg) = (path(&cert), path(&key), path(&auth));
    let flags = [
        "--auth",
        &auth_arg,
        "--tls-cert",
        &cert_arg,
        "--tls-key",
        &key_arg,
    ];
    let cluster = members();
    let nodes: Vec<Node> = (1..=3)
        .map(|id| start_node_with(dir.path(), &cluster, id, &flags))
        .collect();
    assert!(nodes.iter().all(|n| n.url.starts_with("wss://")));
    let leader = wait_for_leader_as(&nodes, None, Some("ops-secret"));
    let follower = &nodes[(leader + 1) % nodes.len()];

    // A worker through the follower: lock and insert, held on the leader
    // under its own client id.
    let worker = connect_tls(&follower.url, &ca, "worker-tls", "workers-secret").await;
    let guard = until_settled(|| worker.try_lock("jobs/tls", TTL))
        .await
        .expect("a forwarded lock in the grants")
        .expect("free");
    let set = worker.set("results/tls");
    until_settled(|| set.set_up(Duration::from_secs(600)))
        .await
        .expect("set up");
    let inserted = until_settled(|| set.insert("r1")).await.expect("insert");
    assert!(inserted.first);

    // A guest through the same follower: refused, and nothing changed.
    let guest = connect_tls(&follower.url, &ca, "guest-tls", "guests-secret").await;
    let refused = until_settled(|| guest.try_lock("jobs/tls", TTL))
        .await
        .expect_err("the guests may not lock jobs/");
    assert_eq!(refused.code(), Some(ErrorCode::Unauthorized), "{refused}");
    let guests_set = guest.set("results/tls");
    let refused = until_settled(|| guests_set.insert("r2"))
        .await
        .expect_err("the guests may not insert");
    assert_eq!(refused.code(), Some(ErrorCode::Unauthorized), "{refused}");
    // The guest may read: the worker still holds the lock, the set has one member.
    let info = until_settled(|| guest.inspect("jobs/tls"))
        .await
        .expect("inspect");
    let holder = info.holder.expect("still held");
    assert_eq!(holder.client, "worker-tls");
    let size = until_settled(|| guests_set.inspect())
        .await
        .expect("inspect_set");
    assert_eq!(size.size, 1);
    // The leader's port for forwarded connections lends no authority
    // either: a guest that dials it directly is still a guest.
    let forwarded = format!("{}/forwarded", nodes[leader].url);
    let direct = connect_tls(&forwarded, &ca, "guest-direct", "guests-secret").await;
    let refused = until_settled(|| direct.try_lock("jobs/direct", TTL))
        .await
        .expect_err("the guests may not lock jobs/, forwarded or not");
    assert_eq!(refused.code(), Some(ErrorCode::Unauthorized), "{refused}");

    // The peer port: the cluster's certificate gets an answer; no
    // certificate, another certificate, or plain TCP get none.
    let peer = cluster
        .split(',')
        .find_map(|m| m.strip_prefix(&format!("{}=", leader + 1)))
        .expect("the leader's peer address")
        .to_owned();
    let identity =
        deadbolt_transport_quic::Identity::from_pem(&ca, key_pem.as_bytes()).expect("identity");
    let cluster_client =
        deadbolt_transport_quic::tls::peer_client_tls(identity, &ca, &cert).expect("tls");
    let (foreign, _, _) = deadbolt_transport_quic::Identity::self_signed().expect("cert");
    let foreign_client =
        deadbolt_transport_quic::tls::peer_client_tls(foreign, &ca, &cert).expect("tls");
    let no_certificate =
        deadbolt_transport_quic::tls::client_tls(&Trust::CaPem(ca.clone())).expect("tls");
    let peer_for_probe = peer.clone();
    let (known, stranger, anonymous, plain) = tokio::task::spawn_blocking(move || {
        let peer = peer_for_probe;
        (
            peer_port_answers(&peer, cluster_client),
            peer_port_answers(&peer, foreign_client),
            peer_port_answers(&peer, no_certificate),
            plain_peer_reply(&peer),
        )
    })
    .await
    .expect("probes");
    assert!(known, "the cluster's certificate must be let in");
    assert!(!stranger, "another certificate must be refused");
    assert!(!anonymous, "no certificate must be refused");
    assert!(
        plain.is_empty() || plain[0] == 0x15,
        "plain TCP got something other than a TLS alert: {plain:?}"
    );
    guard.unlock().await.expect("unlock");
}

/// What the peer port at `addr` says to a plain-TCP peer `Hello`: every
/// byte until it closes.
fn plain_peer_reply(addr: &str) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).expect("connect to the peer port");
    tcp.set_read_timeout(Some(Duration::from_secs(4)))
        .expect("timeout");
    let _ = tcp.write_all(&hello_frame());
    let mut reply = Vec::new();
    let _ = tcp.read_to_end(&mut reply);
    reply
}

/// Workers with a quota of one held lock.
const ONE_LOCK_POLICY: &str = "[[principal]]\nname = \"workers\"\nsecret = \"workers-secret\"\n\
    locks = [\"jobs/\"]\nread = [\"\"]\nlocks_max = 1\n\
    [[principal]]\nname = \"ops\"\nsecret = \"ops-secret\"\nadmin = true\n";

/// A lock held through the old leader counts against its principal's
/// quota on the new one: the new leader counts quotas from the replicated
/// state, not from nothing (SIGKILL of the leader).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_counts_what_was_held_through_the_leader_before_it_died() {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = dir.path().join("auth.toml");
    std::fs::write(&auth, ONE_LOCK_POLICY).expect("write the auth file");
    let auth = auth.to_str().expect("utf-8 path");
    let cluster = members();
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| start_node_with(dir.path(), &cluster, id, &["--auth", auth]))
        .collect();
    let leader = wait_for_leader_as(&nodes, None, Some("ops-secret"));
    // A short retry budget: the client retries `overloaded` within it,
    // and the test wants to hear it (`until_settled` waits out elections).
    let worker_on = |node: &Node| {
        let url = node.url.clone();
        async move {
            let options = ClientOptions {
                client_id: Some("quota-worker".to_owned()),
                retry_for: Duration::from_millis(500),
                auth: Some(deadbolt_core::proto::Secret::new("workers-secret")),
                ..ClientOptions::default()
            };
            let connect = || Client::connect(WsConnector::new(&url).expect("url"), options.clone());
            until_settled(connect).await.expect("hello")
        }
    };
    let worker = worker_on(&nodes[leader]).await;
    let held = until_settled(|| worker.try_lock("jobs/1", Duration::from_secs(600)))
        .await
        .expect("the first lock")
        .expect("free");
    let token = held.token();
    held.detach();
    let over = until_settled(|| worker.try_lock("jobs/2", TTL))
        .await
        .expect_err("at the quota");
    assert_eq!(over.code(), Some(ErrorCode::Overloaded), "{over}");

    nodes[leader].child.kill().expect("SIGKILL the leader");
    let _ = nodes[leader].child.wait();
    let next = wait_for_leader_as(&nodes, Some(leader), Some("ops-secret"));
    let worker = worker_on(&nodes[next]).await;
    let over = until_settled(|| worker.try_lock("jobs/2", TTL))
        .await
        .expect_err("still at the quota on the new leader");
    assert_eq!(over.code(), Some(ErrorCode::Overloaded), "{over}");
    // Counted, not refused for everything: freeing the lock frees its place.
    until_settled(|| worker.call(unlock_op("jobs/1", token)))
        .await
        .expect("unlock the lock held through the old leader");
    let granted = until_settled(|| worker.try_lock("jobs/2", TTL))
        .await
        .expect("a lock within the quota");
    assert!(granted.is_some());
}

fn unlock_op(key: &str, token: u64) -> deadbolt_core::proto::Op {
    deadbolt_core::proto::Op::Lock(deadbolt_core::proto::LockOp::Release {
        key: key.to_owned(),
        token,
    })
}
