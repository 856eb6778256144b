//! deadbolt itself, over WebSocket or QUIC: the `deadbolt` binary next to
//! this one, started pinned to the server core, in memory or with its
//! write-ahead log (`--fsync always`, `--fsync every=10ms`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use deadbolt_core::client::{Client, ClientOptions};
use deadbolt_core::proto::{Acquire, ErrorCode, Keys, LockOp, Mode, Okay, Op, SetOp, Wait};
use deadbolt_transport_quic::{QuicConfig, QuicConnector, Trust};
use deadbolt_transport_ws::WsConnector;
use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

use super::{Conn, Durability, Held, System};
use crate::procs::Server;
use crate::scenarios::lane_key;

/// Which frontend the harness uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    /// WebSocket.
    Ws,
    /// QUIC.
    Quic,
}

/// The server has no durability flags (`--fsync`, `--in-memory`): it was
/// built before the write-ahead log.
#[derive(Debug)]
pub struct NoDurability;

impl fmt::Display for NoDurability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "server does not support --data-dir durability \
             (`deadbolt serve --help` has no --fsync)",
        )
    }
}

impl std::error::Error for NoDurability {}

/// A running deadbolt server.
pub struct Deadbolt {
    server: Server,
    frontend: Frontend,
    durability: Durability,
    ws_url: String,
    quic_url: String,
    ca: PathBuf,
    /// The harness's one QUIC endpoint (UDP socket) for all its
    /// connections to this server, as a process's QUIC connections share
    /// theirs: made at the first QUIC client.
    quic: Box<tokio::sync::OnceCell<QuicConnector>>,
    /// When the process was spawned, and when it said it listened: a
    /// restart's recovery lies between them.
    spawned_at: Instant,
    listening_at: Instant,
}

impl Deadbolt {
    /// Starts `deadbolt serve` on free ports with a fresh data directory
    /// (in its scratch directory, removed with it).
    pub async fn start(frontend: Frontend, durability: Durability) -> anyhow::Result<Deadbolt> {
        Deadbolt::launch(frontend, durability, None, &[]).await
    }

    /// [`Deadbolt::start`] with more `deadbolt serve` flags.
    pub async fn start_with(
        frontend: Frontend,
        durability: Durability,
        flags: &[String],
    ) -> anyhow::Result<Deadbolt> {
        Deadbolt::launch(frontend, durability, None, flags).await
    }

    /// Starts `deadbolt serve` on free ports on the data directory `dir`,
    /// which outlives it: to restart a server on its data.
    pub async fn start_on(
        frontend: Frontend,
        durability: Durability,
        dir: &Path,
    ) -> anyhow::Result<Deadbolt> {
        Deadbolt::launch(frontend, durability, Some(dir), &[]).await
    }

    async fn launch(
        frontend: Frontend,
        durability: Durability,
        dir: Option<&Path>,
        extra: &[String],
    ) -> anyhow::Result<Deadbolt> {
        let bin = binary()?;
        let flags = ServeFlags::probe(&bin).await?;
        let data_dir = dir.map_or_else(|| PathBuf::from("data"), Path::to_path_buf);
        let mut args = vec![
            "serve".to_owned(),
            "--ws".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--quic".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--data-dir".to_owned(),
            data_dir.to_string_lossy().into_owned(),
        ];
        args.extend(flags.durability_args(durability)?);
        args.extend_from_slice(extra);
        let spawned_at = Instant::now();
        let mut server = Server::start("deadbolt", &bin.to_string_lossy(), &args, None)?;
        // A relative data directory is in the server's scratch directory.
        let ca = server.dir.join(&data_dir).join("cert.pem");
        let stderr = server.stderr().context("server stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut quic_url = None;
        // The last lines before a failure, to say why it failed.
        let mut said = Vec::new();
        while let Some(line) = lines.next_line().await? {
            let url = |scheme: &str| {
                line.find(scheme).map(|at| {
                    line[at..]
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                })
            };
            if let Some(url) = url("quic://") {
                quic_url = Some(url);
            } else if let Some(ws_url) = url("ws://") {
                let listening_at = Instant::now();
                // Drain the log so the server never blocks writing it.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                let quic_url = quic_url.context("the server did not start QUIC")?;
                return Ok(Deadbolt {
                    server,
                    frontend,
                    durability,
                    ws_url,
                    quic_url,
                    ca,
                    quic: Box::default(),
                    spawned_at,
                    listening_at,
                });
            } else if said.len() < 20 {
                said.push(line);
            }
        }
        bail!(
            "the deadbolt server exited before it listened: {}",
            said.join(" / ")
        )
    }

    /// Its WebSocket URL, QUIC URL and certificate.
    pub fn urls(&self) -> (String, String, PathBuf) {
        (self.ws_url.clone(), self.quic_url.clone(), self.ca.clone())
    }

    /// A client of this server over its frontend.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let options = ClientOptions::default();
        Ok(match self.frontend {
            Frontend::Ws => Client::connect(WsConnector::new(&self.ws_url)?, options).await?,
            Frontend::Quic => {
                let connector = self
                    .quic
                    .get_or_try_init(|| async {
                        let trust = Trust::CaFile(self.ca.clone());
                        QuicConnector::from_url(&self.quic_url, &trust, &QuicConfig::default())
                            .await
                    })
                    .await?;
                Client::connect(connector.clone(), options).await?
            }
        })
    }

    /// When the process was spawned.
    pub fn spawned_at(&self) -> Instant {
        self.spawned_at
    }

    /// When it said it listened (its WebSocket URL on stderr).
    pub fn listening_at(&self) -> Instant {
        self.listening_at
    }

    /// Sends the server `signal` and waits for it to exit (at most
    /// `within`): how long it took.
    pub async fn stop(self, signal: Signal, within: Duration) -> anyhow::Result<Duration> {
        self.server.stop(signal, within).await
    }
}

/// The `deadbolt` binary next to this one.
pub fn binary() -> anyhow::Result<PathBuf> {
    let bin = std::env::current_exe()?.with_file_name("deadbolt");
    anyhow::ensure!(
        bin.exists(),
        "no server binary at {}; run `cargo build --release` first",
        bin.display()
    );
    Ok(bin)
}

/// What `deadbolt serve --help` says: which flags this build takes.
pub async fn serve_help(bin: &Path) -> anyhow::Result<String> {
    let help = tokio::process::Command::new(bin)
        .args(["serve", "--help"])
        .output()
        .await
        .context("running deadbolt serve --help")?;
    anyhow::ensure!(help.status.success(), "deadbolt serve --help failed");
    Ok(String::from_utf8_lossy(&help.stdout).into_owned())
}

/// Which durability flags this `deadbolt serve` takes, read from its
/// `--help`: the harness also runs against servers from before them.
struct ServeFlags {
    fsync: bool,
    in_memory: bool,
}

impl ServeFlags {
    async fn probe(bin: &Path) -> anyhow::Result<ServeFlags> {
        let help = serve_help(bin).await?;
        Ok(ServeFlags {
            fsync: help.contains("--fsync"),
            in_memory: help.contains("--in-memory"),
        })
    }

    /// The flags that ask for `durability`. A server without durability
    /// keeps nothing anyway, so in memory needs no flag there.
    fn durability_args(&self, durability: Durability) -> Result<Vec<String>, NoDurability> {
        match durability {
            Durability::Memory if self.in_memory => Ok(vec!["--in-memory".to_owned()]),
            Durability::Memory => Ok(Vec::new()),
            _ if !self.fsync => Err(NoDurability),
            durable => Ok(vec!["--fsync".to_owned(), durable.to_string()]),
        }
    }
}

#[async_trait]
impl System for Deadbolt {
    fn name(&self) -> String {
        let frontend = match self.frontend {
            Frontend::Ws => "WebSocket",
            Frontend::Quic => "QUIC",
        };
        match self.durability {
            Durability::Memory => format!("deadbolt ({frontend})"),
            durable => format!("deadbolt ({frontend}, --fsync {durable})"),
        }
    }

    fn tier(&self) -> String {
        match self.durability {
            Durability::Memory => "in-memory".to_owned(),
            durable => format!("write-ahead log, --fsync {durable} (group commit)"),
        }
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Conn>> {
        Ok(conn(self.client().await?))
    }

    fn cpu(&self) -> Duration {
        self.server.cpu()
    }

    fn rss(&self) -> u64 {
        self.server.rss()
    }
}

/// The harness's connection over `client` (also a cluster node's).
pub fn conn(client: Client) -> Box<dyn Conn> {
    Box::new(DeadboltConn {
        client,
        lock_requests: 0,
    })
}

/// One client connection.
struct DeadboltConn {
    client: Client,
    lock_requests: u64,
}

impl DeadboltConn {
    async fn acquire(
        &mut self,
        key: &str,
        ttl: Duration,
        wait: Wait,
    ) -> anyhow::Result<Option<Held>> {
        self.lock_requests += 1;
        let op = Op::Lock(LockOp::Acquire(Acquire {
            key: key.to_owned(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1),
            wait,
            ephemeral: false,
            mode: Mode::MUTEX,
            lock_delay_ms: 0,
            notify: false,
        }));
        match self.client.call(op).await {
            Ok(Okay::Granted(granted)) => Ok(Some(Held(granted.token))),
            Err(e) if e.code() == Some(ErrorCode::Busy) => Ok(None),
            other => bail!("lock: {other:?}"),
        }
    }
}

/// A try-lock with a 30 s lease: its token, or `None` if the key is held.
async fn try_acquire(client: &Client, key: &str) -> anyhow::Result<Option<u64>> {
    let op = Op::Lock(LockOp::Acquire(Acquire {
        key: key.to_owned(),
        ttl_ms: 30_000,
        wait: Wait::Never,
        ephemeral: false,
        mode: Mode::MUTEX,
        lock_delay_ms: 0,
        notify: false,
    }));
    match client.call(op).await {
        Ok(Okay::Granted(granted)) => Ok(Some(granted.token)),
        Err(e) if e.code() == Some(ErrorCode::Busy) => Ok(None),
        other => bail!("lock: {other:?}"),
    }
}

#[async_trait]
impl Conn for DeadboltConn {
    async fn try_lock(&mut self, key: &str, ttl: Duration) -> anyhow::Result<Option<Held>> {
        self.acquire(key, ttl, Wait::Never).await
    }

    async fn lock(&mut self, key: &str, ttl: Duration) -> anyhow::Result<Held> {
        self.acquire(key, ttl, Wait::Forever)
            .await?
            .context("a lock that waits was answered busy")
    }

    async fn unlock(&mut self, key: &str, held: Held) -> anyhow::Result<()> {
        Ok(self.client.unlock(key, held.0).await?)
    }

    async fn set_up(&mut self, set: &str) -> anyhow::Result<()> {
        self.client
            .set(set)
            .set_up(Duration::from_secs(3600))
            .await?;
        Ok(())
    }

    async fn insert(&mut self, set: &str, keys: &[String]) -> anyhow::Result<Vec<bool>> {
        let keys = match keys {
            [one] => Keys::One(one.clone()),
            many => Keys::Many(many.to_vec()),
        };
        let single = matches!(keys, Keys::One(_));
        match self
            .client
            .call(Op::Set(SetOp::Insert {
                set: set.to_owned(),
                keys,
            }))
            .await?
        {
            Okay::Inserted(inserted) if single => Ok(vec![inserted.first]),
            Okay::InsertedMany(many) => Ok(many.results.iter().map(|r| r.first).collect()),
            other => bail!("insert: {other:?}"),
        }
    }

    fn lock_requests(&self) -> u64 {
        self.lock_requests
    }

    /// `depth` lanes on the one client, each one request in flight at a
    /// time (try-lock, then its unlock): the client pipelines them on its
    /// connection.
    async fn pipelined(
        &mut self,
        depth: usize,
        seed: u64,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Option<u64>> {
        let client = &self.client;
        let lanes = (0..depth as u64).map(|lane| {
            let stop = stop.clone();
            async move {
                let mut state = seed.wrapping_mul(31).wrapping_add(lane);
                let mut cycles = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = lane_key(&mut state, lane, depth as u64);
                    if let Some(token) = try_acquire(client, &key).await? {
                        client.unlock(&key, token).await?;
                        cycles += 1;
                    }
                }
                anyhow::Ok(cycles)
            }
        });
        let done = futures_util::future::try_join_all(lanes).await?;
        Ok(Some(done.into_iter().sum()))
    }

    /// Every key waits on the server at once, on this one connection.
    async fn lock_all(
        &mut self,
        keys: &[String],
        ttl: Duration,
        _retry: Duration,
    ) -> anyhow::Result<Vec<Instant>> {
        self.lock_requests += keys.len() as u64;
        let client = &self.client;
        let waits = keys.iter().map(|key| async move {
            let op = Op::Lock(LockOp::Acquire(Acquire {
                key: key.clone(),
                ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1),
                wait: Wait::Forever,
                ephemeral: false,
                mode: Mode::MUTEX,
                lock_delay_ms: 0,
                notify: false,
            }));
            match client.call(op).await {
                Ok(Okay::Granted(_)) => Ok(Instant::now()),
                other => bail!("lock: {other:?}"),
            }
        });
        futures_util::future::try_join_all(waits).await
    }
}
