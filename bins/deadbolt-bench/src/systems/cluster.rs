//! deadbolt as one replicated group of three nodes (SPEC section 9):
//! three `deadbolt serve --node-id N --cluster 1=127.0.0.1:P1,2=…,3=…`
//! processes on loopback, pinned to the server core as every server here,
//! each serving WebSocket clients on its own port (QUIC off). Any node
//! takes clients (a follower forwards to the leader), so the harness's
//! connections are spread over the three, or all go to the leader.
//!
//! Written against the interface announced for the cluster before the
//! binary had it: skipped, with a message, while `deadbolt serve --help`
//! has no `--cluster`. Until a run says otherwise, untested.
//!
//! Durability as for etcd's rows: `memory` keeps the data directories on
//! tmpfs (the nodes still log and sync; the syncs cost nothing), `always`
//! on disk with `--fsync always`.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use deadbolt_core::client::{Client, ClientOptions};
use deadbolt_core::proto::{Acquire, ErrorCode, LockOp, Mode, Okay, Op, Wait};
use deadbolt_transport_ws::WsConnector;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

use super::deadbolt::{binary, conn, serve_help};
use super::etcd::Clients;
use super::{Conn, Durability, Skipped, System};
use crate::procs::{self, Scratch, Server, Tail};

/// Nodes in the group.
const NODES: usize = 3;

/// How long a node may take to listen, and the group to take a write.
const START_WITHIN: Duration = Duration::from_secs(60);

/// One `deadbolt serve` of the group.
struct Node {
    id: usize,
    server: Server,
    /// Its raft (peer) address, as `--cluster` names it.
    peer: String,
    /// Where its WebSocket clients connect.
    ws_url: String,
    /// The end of its log, to say why it stopped answering.
    log: Tail,
}

/// A running three-node deadbolt.
pub struct DeadboltCluster {
    nodes: Vec<Node>,
    /// The WebSocket URLs the harness's connections go to, in turn.
    urls: Vec<String>,
    next: AtomicUsize,
    clients: Clients,
    durability: Durability,
    /// Data directories on tmpfs, removed after the nodes (declared after
    /// them) have stopped.
    _data: Vec<Scratch>,
}

impl DeadboltCluster {
    /// Starts the three nodes, waits until each listens and the group takes
    /// a write through every node, then finds the leader if `clients` asks
    /// for it.
    pub async fn start(
        clients: Clients,
        durability: Durability,
    ) -> anyhow::Result<DeadboltCluster> {
        let bin = binary()?;
        let help = serve_help(&bin).await?;
        if !has_flag(&help, "--cluster") {
            return Err(Skipped(
                "`deadbolt serve --help` has no --cluster flag: this build has no 3-node cluster"
                    .into(),
            )
            .into());
        }
        let (mut nodes, data) = launch(&bin, &help, durability)?;
        for node in &mut nodes {
            (node.ws_url, node.log) = listening(&mut node.server)
                .await
                .with_context(|| format!("node {}", node.id))?;
        }
        for node in &nodes {
            takes_writes(&node.ws_url)
                .await
                .with_context(|| format!("node {} ({})", node.id, node.ws_url))?;
        }
        let urls = match clients {
            Clients::All => nodes.iter().map(|n| n.ws_url.clone()).collect(),
            Clients::Leader => vec![leader(&bin, &nodes).await?],
        };
        Ok(DeadboltCluster {
            nodes,
            urls,
            next: AtomicUsize::new(0),
            clients,
            durability,
            _data: data,
        })
    }
}

/// Starts the three processes (not yet listening): they, and their data
/// directories on tmpfs if in memory.
fn launch(
    bin: &Path,
    help: &str,
    durability: Durability,
) -> anyhow::Result<(Vec<Node>, Vec<Scratch>)> {
    let peers = (0..NODES)
        .map(|_| Ok(format!("127.0.0.1:{}", procs::free_port()?)))
        .collect::<anyhow::Result<Vec<String>>>()?;
    let cluster = peers
        .iter()
        .enumerate()
        .map(|(i, peer)| format!("{}={peer}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let fsync = fsync_args(help, durability)?;
    // The WebSocket flag was announced as `--listen`; the server calls it
    // `--ws`.
    let listen = if has_flag(help, "--listen") {
        "--listen"
    } else {
        "--ws"
    };
    let (mut nodes, mut data) = (Vec::new(), Vec::new());
    for (i, peer) in peers.into_iter().enumerate() {
        let id = i + 1;
        let dir = match durability {
            Durability::Memory => {
                let scratch = Scratch::in_memory(&format!("deadbolt-node{id}-data"))?;
                let dir = scratch.path().to_string_lossy().into_owned();
                data.push(scratch);
                dir
            }
            _ => "data".to_owned(),
        };
        let ws = format!("127.0.0.1:{}", procs::free_port()?);
        let mut args: Vec<String> = [
            "serve",
            "--node-id",
            &id.to_string(),
            "--cluster",
            &cluster,
            listen,
            &ws,
            "--quic",
            "off",
            "--data-dir",
            &dir,
        ]
        .map(String::from)
        .to_vec();
        args.extend(fsync.iter().cloned());
        let server = Server::start(
            &format!("deadbolt-node{id}"),
            &bin.to_string_lossy(),
            &args,
            None,
        )?;
        nodes.push(Node {
            id,
            server,
            peer,
            ws_url: String::new(),
            log: Tail::default(),
        });
    }
    Ok((nodes, data))
}

/// The `--fsync` flags for `durability`. On tmpfs the default (`always`)
/// is kept: a sync there costs nothing.
fn fsync_args(help: &str, durability: Durability) -> anyhow::Result<Vec<String>> {
    match durability {
        Durability::Memory => Ok(Vec::new()),
        _ if !has_flag(help, "--fsync") => {
            Err(Skipped("`deadbolt serve --help` has no --fsync".into()).into())
        }
        durable => Ok(vec!["--fsync".to_owned(), durable.to_string()]),
    }
}

/// Whether `deadbolt serve --help` lists `flag` (as a flag, not inside
/// another's name or text).
fn has_flag(help: &str, flag: &str) -> bool {
    help.lines().any(|line| {
        line.split_whitespace()
            .take(2)
            .any(|word| word.trim_end_matches(',') == flag)
    })
}

/// Waits until the node says where it listens (`… listening on
/// ws://ADDR/ws` on stderr, as a single server does): its URL, and the rest
/// of its log, read as it comes so that it never blocks writing it.
async fn listening(server: &mut Server) -> anyhow::Result<(String, Tail)> {
    let stderr = server.stderr().context("server stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let mut said = Vec::new();
    let found = tokio::time::timeout(START_WITHIN, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(at) = line.find("ws://") {
                let url = line[at..].split_whitespace().next().unwrap_or_default();
                return anyhow::Ok(Some(url.to_owned()));
            }
            if said.len() < 20 {
                said.push(line);
            }
        }
        Ok(None)
    })
    .await;
    match found {
        Ok(Ok(Some(url))) => Ok((url, Tail::follow_lines(lines))),
        Ok(Ok(None)) => bail!("exited before it listened: {}", said.join(" / ")),
        Ok(Err(error)) => Err(error),
        Err(_) => bail!(
            "did not listen within {START_WITHIN:?}: {}",
            said.join(" / ")
        ),
    }
}

/// Waits until a try-lock through the node at `url` is answered with
/// something other than `unavailable` (no leader or no quorum yet).
async fn takes_writes(url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_WITHIN;
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = async {
            let client = Client::connect(WsConnector::new(url)?, ClientOptions::default()).await?;
            let op = Op::Lock(LockOp::Acquire(Acquire {
                key: "deadbolt-bench/ready".to_owned(),
                ttl_ms: 1000,
                wait: Wait::Never,
                ephemeral: true,
                mode: Mode::MUTEX,
                lock_delay_ms: 0,
                notify: false,
            }));
            anyhow::Ok(client.call(op).await)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            // Granted, or held by an earlier check: either way it answered.
            Ok(Ok(Ok(Okay::Granted(_)))) => return Ok(()),
            Ok(Ok(Err(e))) if e.code() == Some(ErrorCode::Busy) => return Ok(()),
            Ok(Ok(other)) => last = format!("{other:?}"),
            Ok(Err(error)) => last = format!("{error:#}"),
            Err(_) => last = "no answer within 5 s".to_owned(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no write taken within {START_WITHIN:?}; last: {last}")
}

/// The leader's WebSocket URL, from `deadbolt cluster status`.
async fn leader(bin: &Path, nodes: &[Node]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(bin)
        .args(["cluster", "status", "--server", &nodes[0].ws_url])
        .output()
        .await
        .context("running deadbolt cluster status")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let known: Vec<(usize, &str, &str)> = nodes
        .iter()
        .map(|n| (n.id, n.peer.as_str(), n.ws_url.as_str()))
        .collect();
    match leader_in(&text, &known) {
        Some(id) if out.status.success() => Ok(nodes[id - 1].ws_url.clone()),
        _ => Err(Skipped(format!(
            "cannot tell the leader from `deadbolt cluster status`: {} {}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
        .into()),
    }
}

/// The leader's node id in what `deadbolt cluster status` prints: its
/// `leader` field if that is JSON, else, on the first line that says
/// "leader", the node whose peer or WebSocket address it names, or the
/// first node id after the word.
fn leader_in(status: &str, nodes: &[(usize, &str, &str)]) -> Option<usize> {
    let known = |id: usize| nodes.iter().any(|(n, _, _)| *n == id);
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(status) {
        let id = usize::try_from(json.get("leader")?.as_u64()?).ok()?;
        return known(id).then_some(id);
    }
    let line = status
        .lines()
        .find(|l| l.to_ascii_lowercase().contains("leader"))?;
    let named = nodes.iter().find(|(_, peer, ws)| {
        let ws = ws.trim_start_matches("ws://").trim_end_matches("/ws");
        line.contains(peer) || line.contains(ws)
    });
    if let Some((id, _, _)) = named {
        return Some(*id);
    }
    let after = &line[line.to_ascii_lowercase().find("leader")? + "leader".len()..];
    after
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter_map(|word| word.parse::<usize>().ok())
        .find(|&id| known(id))
}

#[async_trait]
impl System for DeadboltCluster {
    fn name(&self) -> String {
        let storage = match self.durability {
            Durability::Memory => "data on tmpfs".to_owned(),
            durable => format!("--fsync {durable}"),
        };
        let clients = match self.clients {
            Clients::Leader => ", clients on the leader",
            Clients::All => "",
        };
        format!("deadbolt, {NODES} nodes ({storage}{clients})")
    }

    fn tier(&self) -> String {
        let storage = match self.durability {
            Durability::Memory => "data directories on tmpfs (syncs cost nothing)".to_owned(),
            durable => format!("replicated log, --fsync {durable}"),
        };
        format!("{NODES} nodes on the server core, WebSocket, {storage}")
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Conn>> {
        let url = &self.urls[self.next.fetch_add(1, Ordering::Relaxed) % self.urls.len()];
        match Client::connect(WsConnector::new(url)?, ClientOptions::default()).await {
            Ok(client) => Ok(conn(client)),
            Err(error) => {
                // Say what the node said last: it may have died.
                let node = self.nodes.iter().find(|n| &n.ws_url == url);
                let said = node.map(|n| n.log.text()).unwrap_or_default();
                Err(anyhow::Error::new(error).context(format!("{url}; its log ends: {said}")))
            }
        }
    }

    fn cpu(&self) -> Duration {
        self.nodes.iter().map(|n| n.server.cpu()).sum()
    }

    fn rss(&self) -> u64 {
        self.nodes.iter().map(|n| n.server.rss()).sum()
    }

    fn nodes(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: [(usize, &str, &str); 3] = [
        (1, "127.0.0.1:4001", "ws://127.0.0.1:5001/ws"),
        (2, "127.0.0.1:4002", "ws://127.0.0.1:5002/ws"),
        (3, "127.0.0.1:4003", "ws://127.0.0.1:5003/ws"),
    ];

    #[test]
    fn the_leader_is_read_from_cluster_status() {
        // Verbatim from a pre-release `deadbolt cluster status`, asked of a
        // follower.
        let status = r#"{
  "node": 1,
  "state": "follower",
  "term": 2,
  "leader": 2,
  "last_log_index": 3872,
  "applied_index": 3872,
  "snapshot_index": null,
  "members": {
    "1": "127.0.0.1:7531",
    "2": "127.0.0.1:7532",
    "3": "127.0.0.1:7533"
  },
  "lag": null,
  "millis_since_quorum_ack": null
}"#;
        assert_eq!(leader_in(status, &NODES), Some(2));
        assert_eq!(leader_in(r#"{"leader": null, "term": 3}"#, &NODES), None);
    }

    #[test]
    fn flags_are_told_from_text_that_mentions_them() {
        let help = "      --ws <WS>\n      --cluster <CLUSTER>\n          clients: give `--ws` an address\n  -l, --listen-peer <P>\n";
        assert!(has_flag(help, "--ws") && has_flag(help, "--cluster"));
        assert!(!has_flag(help, "--listen"));
        assert!(!has_flag(help, "--fsync"));
    }

    #[test]
    fn the_leader_is_found_by_id_or_by_address() {
        assert_eq!(leader_in("term 4\nleader: 2\ncommit 17", &NODES), Some(2));
        assert_eq!(leader_in("Leader node 3 (term 5)", &NODES), Some(3));
        assert_eq!(
            leader_in("node 1 follower\nnode 127.0.0.1:4002 leader lag 0", &NODES),
            Some(2)
        );
        assert_eq!(leader_in("leader at 127.0.0.1:5001", &NODES), Some(1));
    }

    #[test]
    fn no_leader_is_made_up() {
        assert_eq!(
            leader_in("leader: none (election in progress)", &NODES),
            None
        );
        assert_eq!(leader_in("leader: 7", &NODES), None);
        assert_eq!(leader_in("no quorum", &NODES), None);
    }
}
