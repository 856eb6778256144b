//! etcd 3.4 (Debian's `etcd-server`), one member or a cluster of three on
//! loopback, spoken to through its v3 JSON gateway over HTTP/1.1 (the
//! gRPC API behind it is the same; no gRPC client enters the build).
//!
//! Each harness connection is an etcd session, as `concurrency.NewSession`
//! makes one: a lease of its own, which every lock it takes is attached to.
//! try-lock = a transaction that writes the lock service's key for that
//! lease only if no key is under the lock's name; lock = the lock service
//! (`/v3/lock/lock`, which waits on the server and hands the lock over in
//! order); unlock = delete that key. Distinct insert = create-if-absent
//! (`create_revision == 0`), one nested transaction per key in a batch, so
//! each key is decided on its own.
//!
//! Durability: `memory` puts the data directories on tmpfs, where etcd's
//! fsyncs cost nothing (etcd 3.4 has no `--unsafe-no-fsync`, which 3.5
//! added); `always` is etcd as it ships, its write-ahead log fsynced before
//! every commit (a batch of proposals shares one). It has no periodic fsync.

mod api;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use tokio::time::Instant;

use self::api::{Api, Txn, lock_key};
use super::{Conn, Durability, Held, Skipped, System};
use crate::procs::{self, Scratch, Server, Tail};

/// Keys per insert transaction: a batch of the harness's (1000 keys) is one
/// transaction, as it is one request for every other system.
const BATCH: usize = 1000;

/// Operations per transaction etcd accepts (`--max-txn-ops`, default 128),
/// raised for [`BATCH`]: a nested transaction may only use what its outer
/// one leaves (`checkTxnRequest`: the limit less the outer count), so 1000
/// nested transactions of one put each need a limit above 1000.
const MAX_TXN_OPS: usize = 2 * BATCH;

/// Which members the harness's connections go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clients {
    /// Spread over every member, in turn.
    All,
    /// All to the leader (a follower forwards every write to it).
    Leader,
}

/// One etcd process.
struct Member {
    server: Server,
    client: SocketAddr,
    log: Tail,
}

/// A running etcd: its members and where clients connect.
pub struct Etcd {
    members: Vec<Member>,
    endpoints: Vec<SocketAddr>,
    next: AtomicUsize,
    clients: Clients,
    durability: Durability,
    version: String,
    /// Each set's lease, granted by `set_up`, which its members die with.
    sets: Arc<Mutex<HashMap<String, i64>>>,
    /// Data directories on tmpfs, removed after the members (declared
    /// after them) have stopped.
    _data: Vec<Scratch>,
}

impl Etcd {
    /// Starts `members` etcd processes as one cluster, pinned to the server
    /// core, and waits until each takes writes.
    pub async fn start(
        members: usize,
        clients: Clients,
        durability: Durability,
    ) -> anyhow::Result<Etcd> {
        if !procs::have("etcd") {
            return Err(Skipped("etcd not installed (apt-get install etcd-server)".into()).into());
        }
        if let Durability::Periodic { .. } = durability {
            return Err(Skipped(
                "etcd fsyncs before every commit; it has no periodic fsync".into(),
            )
            .into());
        }
        let version = version().await?;
        let (started, data) = launch(members, durability)?;
        for (i, member) in started.iter().enumerate() {
            ready(member)
                .await
                .with_context(|| format!("etcd member m{}: {}", i + 1, member.log.text()))?;
        }
        let endpoints = match clients {
            Clients::All => started.iter().map(|m| m.client).collect(),
            Clients::Leader => vec![leader(&started).await?],
        };
        Ok(Etcd {
            members: started,
            endpoints,
            next: AtomicUsize::new(0),
            clients,
            durability,
            version,
            sets: Arc::default(),
            _data: data,
        })
    }
}

/// `3.4` from `etcd --version`'s `etcd Version: 3.4.23`.
async fn version() -> anyhow::Result<String> {
    let out = tokio::process::Command::new("etcd")
        .arg("--version")
        .output()
        .await
        .context("running etcd --version")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let full = text
        .lines()
        .find_map(|l| l.strip_prefix("etcd Version:"))
        .context("etcd --version does not say its version")?
        .trim();
    Ok(full.splitn(3, '.').take(2).collect::<Vec<_>>().join("."))
}

/// Starts the members (not yet ready): they, and their data directories
/// on tmpfs if in memory.
fn launch(n: usize, durability: Durability) -> anyhow::Result<(Vec<Member>, Vec<Scratch>)> {
    let ports = (0..n)
        .map(|_| Ok((procs::free_port()?, procs::free_port()?)))
        .collect::<anyhow::Result<Vec<(u16, u16)>>>()?;
    let cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{}=http://127.0.0.1:{peer}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let (mut members, mut data) = (Vec::new(), Vec::new());
    for (i, &(client, peer)) in ports.iter().enumerate() {
        let name = format!("m{}", i + 1);
        // Durable: `data` in the member's scratch directory, on the disk
        // that every other durable row writes to.
        let dir = match durability {
            Durability::Memory => {
                let scratch = Scratch::in_memory(&format!("etcd-{name}-data"))?;
                let dir = scratch.path().to_string_lossy().into_owned();
                data.push(scratch);
                dir
            }
            _ => "data".to_owned(),
        };
        let args = member_args(&name, &dir, client, peer, &cluster);
        let mut server = Server::start(&format!("etcd-{name}"), "etcd", &args, None)?;
        let log = Tail::follow(server.stderr().context("etcd stderr")?);
        let client = SocketAddr::from(([127, 0, 0, 1], client));
        members.push(Member {
            server,
            client,
            log,
        });
    }
    Ok((members, data))
}

/// The command line of one member.
fn member_args(name: &str, dir: &str, client: u16, peer: u16, cluster: &str) -> Vec<String> {
    let client = format!("http://127.0.0.1:{client}");
    let peer = format!("http://127.0.0.1:{peer}");
    let token = format!("deadbolt-bench-{}", std::process::id());
    [
        ("--name", name),
        ("--data-dir", dir),
        ("--listen-client-urls", &client),
        ("--advertise-client-urls", &client),
        ("--listen-peer-urls", &peer),
        ("--initial-advertise-peer-urls", &peer),
        ("--initial-cluster", cluster),
        ("--initial-cluster-state", "new"),
        ("--initial-cluster-token", &token),
        ("--max-txn-ops", &MAX_TXN_OPS.to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_owned(), value.to_owned()])
    .collect()
}

/// Waits until `member` takes a write: listening is not enough, a write
/// needs a leader and, in a cluster, a quorum.
async fn ready(member: &Member) -> anyhow::Result<()> {
    let within = Duration::from_secs(30);
    procs::wait_for_port(member.client.port(), within).await?;
    let deadline = Instant::now() + within;
    loop {
        let attempt = async {
            let mut api = Api::connect(member.client).await?;
            api.put(b"deadbolt-bench/ready", b"").await
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) if Instant::now() > deadline => {
                return Err(error.context(format!("no write taken within {within:?}")));
            }
            Err(_) if Instant::now() > deadline => bail!("no write taken within {within:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The client address of the member that leads.
async fn leader(members: &[Member]) -> anyhow::Result<SocketAddr> {
    let mut statuses = Vec::with_capacity(members.len());
    for member in members {
        statuses.push((
            Api::connect(member.client).await?.status().await?,
            member.client,
        ));
    }
    let leader = statuses.first().map(|(s, _)| s.leader).unwrap_or(0);
    statuses
        .iter()
        .find(|(s, _)| leader != 0 && s.member == leader)
        .map(|(_, addr)| *addr)
        .with_context(|| format!("no member leads: {statuses:?}"))
}

#[async_trait]
impl System for Etcd {
    fn name(&self) -> String {
        let members = match self.members.len() {
            1 => String::new(),
            n => format!(", {n} members"),
        };
        let storage = match self.durability {
            Durability::Memory => "data on tmpfs",
            _ => "fsync",
        };
        let clients = match self.clients {
            Clients::Leader => ", clients on the leader",
            Clients::All => "",
        };
        format!("etcd {}{members} ({storage}{clients})", self.version)
    }

    fn tier(&self) -> String {
        let storage = match self.durability {
            Durability::Memory => {
                "data directories on tmpfs, so that fsync costs nothing (etcd 3.4 has no \
                 --unsafe-no-fsync)"
            }
            _ => "as shipped: the write-ahead log fsynced before each commit",
        };
        format!(
            "{} member(s) on the server core, {storage}; JSON gateway over HTTP/1.1; \
             --max-txn-ops {MAX_TXN_OPS}",
            self.members.len()
        )
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Conn>> {
        let addr = self.endpoints[self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len()];
        let api = Api::connect(addr).await.with_context(|| {
            // Say what the member said last: it may have died.
            let member = self.members.iter().find(|m| m.client == addr);
            format!(
                "its log ends: {}",
                member.map(|m| m.log.text()).unwrap_or_default()
            )
        })?;
        Ok(Box::new(EtcdConn {
            api,
            sessions: HashMap::new(),
            sets: self.sets.clone(),
            lock_requests: 0,
        }))
    }

    fn cpu(&self) -> Duration {
        self.members.iter().map(|m| m.server.cpu()).sum()
    }

    fn rss(&self) -> u64 {
        self.members.iter().map(|m| m.server.rss()).sum()
    }

    /// The bytes of its backend database in use (keys, their history and
    /// the leases): on disk, as PostgreSQL's table size is.
    async fn own_memory(&self) -> Option<u64> {
        let mut api = Api::connect(self.endpoints[0]).await.ok()?;
        api.status().await.ok().map(|s| s.db_in_use)
    }

    fn nodes(&self) -> usize {
        self.members.len()
    }
}

/// One connection: one member, one session lease per time to live asked.
struct EtcdConn {
    api: Api,
    /// Lease time to live in seconds → the session lease.
    sessions: HashMap<i64, Session>,
    sets: Arc<Mutex<HashMap<String, i64>>>,
    lock_requests: u64,
}

struct Session {
    lease: i64,
    /// When to take a fresh lease rather than attach more locks to this
    /// one: a third of the way through it, so every lock attached lives at
    /// least two thirds of its time to live. (A fresh lease is one unary
    /// request; keeping one alive would need the gateway's keep-alive
    /// stream, for no difference in what is measured.)
    renew_at: Instant,
}

impl EtcdConn {
    /// This connection's session lease for `ttl` (whole seconds: etcd's
    /// unit).
    async fn lease(&mut self, ttl: Duration) -> anyhow::Result<i64> {
        let seconds = i64::try_from(ttl.as_millis().div_ceil(1000))
            .unwrap_or(i64::MAX)
            .max(1);
        let now = Instant::now();
        if let Some(session) = self.sessions.get(&seconds)
            && now < session.renew_at
        {
            return Ok(session.lease);
        }
        let lease = self.api.grant(seconds).await?;
        let renew_at = now + ttl / 3;
        self.sessions.insert(seconds, Session { lease, renew_at });
        Ok(lease)
    }
}

/// The lock service's name for the harness's lock `key`.
fn lock_name(key: &str) -> Vec<u8> {
    format!("lock/{key}").into_bytes()
}

fn member_key(set: &str, key: &str) -> Vec<u8> {
    format!("set/{set}/{key}").into_bytes()
}

/// The first place of each distinct key in `keys`: etcd refuses a
/// transaction that writes one key twice, and a repeat in one batch is not
/// new anyway.
fn firsts(keys: &[String]) -> Vec<usize> {
    let mut seen = HashSet::with_capacity(keys.len());
    (0..keys.len())
        .filter(|&i| seen.insert(keys[i].as_str()))
        .collect()
}

#[async_trait]
impl Conn for EtcdConn {
    async fn try_lock(&mut self, key: &str, ttl: Duration) -> anyhow::Result<Option<Held>> {
        self.lock_requests += 1;
        let lease = self.lease(ttl).await?;
        let answer = self.api.txn(&Txn::try_lock(&lock_name(key), lease)).await?;
        Ok(answer.succeeded.then_some(Held(lease as u64)))
    }

    async fn lock(&mut self, key: &str, ttl: Duration) -> anyhow::Result<Held> {
        self.lock_requests += 1;
        let lease = self.lease(ttl).await?;
        let name = lock_name(key);
        let held = self.api.lock(&name, lease).await?;
        // Unlock rebuilds the key from the lease: check they agree.
        anyhow::ensure!(
            held == lock_key(&name, lease),
            "the lock service holds {:?}, not the key for lease {lease:x}",
            String::from_utf8_lossy(&held)
        );
        Ok(Held(lease as u64))
    }

    async fn unlock(&mut self, key: &str, held: Held) -> anyhow::Result<()> {
        self.api
            .delete(&lock_key(&lock_name(key), held.0 as i64))
            .await
    }

    async fn set_up(&mut self, set: &str) -> anyhow::Result<()> {
        let lease = self.api.grant(3600).await?;
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        sets.insert(set.to_owned(), lease);
        Ok(())
    }

    async fn insert(&mut self, set: &str, keys: &[String]) -> anyhow::Result<Vec<bool>> {
        let lease = {
            let sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
            *sets
                .get(set)
                .with_context(|| format!("set {set} was never set up"))?
        };
        if let [key] = keys {
            let txn = Txn::create(&member_key(set, key), Some(lease));
            return Ok(vec![self.api.txn(&txn).await?.succeeded]);
        }
        let mut new = vec![false; keys.len()];
        for chunk in firsts(keys).chunks(BATCH) {
            let members: Vec<Vec<u8>> = chunk.iter().map(|&i| member_key(set, &keys[i])).collect();
            let txn = Txn::create_each(members.iter().map(Vec::as_slice), Some(lease));
            let answers = self.api.txn(&txn).await?.nested()?;
            anyhow::ensure!(
                answers.len() == chunk.len(),
                "{} answers to {} inserts",
                answers.len(),
                chunk.len()
            );
            for (&i, answer) in chunk.iter().zip(answers) {
                new[i] = answer;
            }
        }
        Ok(new)
    }

    fn lock_requests(&self) -> u64 {
        self.lock_requests
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_writes_each_key_once_at_its_first_place() {
        let keys: Vec<String> = ["a", "b", "a", "c", "b"].map(String::from).to_vec();
        assert_eq!(firsts(&keys), [0, 1, 3]);
    }
}
