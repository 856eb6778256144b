//! deadbolt itself, over WebSocket or QUIC: the `deadbolt` binary next to
//! this one, started pinned to the server core.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use deadbolt_core::client::{Client, ClientOptions};
use deadbolt_core::proto::{Acquire, ErrorCode, Keys, LockOp, Okay, Op, SetOp, Wait};
use deadbolt_transport_quic::{QuicConfig, QuicConnector, Trust};
use deadbolt_transport_ws::WsConnector;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

use super::{Conn, Held, System};
use crate::procs::Server;

/// Which frontend the harness uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    /// WebSocket.
    Ws,
    /// QUIC.
    Quic,
}

/// A running deadbolt server.
pub struct Deadbolt {
    server: Server,
    frontend: Frontend,
    ws_url: String,
    quic_url: String,
    ca: PathBuf,
}

impl Deadbolt {
    /// Starts `deadbolt serve` on free ports.
    pub async fn start(frontend: Frontend) -> anyhow::Result<Deadbolt> {
        let bin = std::env::current_exe()?.with_file_name("deadbolt");
        anyhow::ensure!(
            bin.exists(),
            "no server binary at {}; run `cargo build --release` first",
            bin.display()
        );
        let args = [
            "serve",
            "--ws",
            "127.0.0.1:0",
            "--quic",
            "127.0.0.1:0",
            "--data-dir",
            "data",
        ]
        .map(String::from);
        let mut server = Server::start("deadbolt", &bin.to_string_lossy(), &args, None)?;
        let ca = server.dir.join("data/cert.pem");
        let stderr = server.stderr().context("server stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut quic_url = None;
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
                // Drain the log so the server never blocks writing it.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                let quic_url = quic_url.context("the server did not start QUIC")?;
                return Ok(Deadbolt {
                    server,
                    frontend,
                    ws_url,
                    quic_url,
                    ca,
                });
            }
        }
        bail!("the deadbolt server exited before it listened")
    }
}

impl Deadbolt {
    /// Its WebSocket URL, QUIC URL and certificate.
    pub fn urls(&self) -> (String, String, PathBuf) {
        (self.ws_url.clone(), self.quic_url.clone(), self.ca.clone())
    }
}

#[async_trait]
impl System for Deadbolt {
    fn name(&self) -> String {
        match self.frontend {
            Frontend::Ws => "deadbolt (WebSocket)".to_owned(),
            Frontend::Quic => "deadbolt (QUIC)".to_owned(),
        }
    }

    fn tier(&self) -> &'static str {
        "in-memory"
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Conn>> {
        let options = ClientOptions::default();
        let client = match self.frontend {
            Frontend::Ws => Client::connect(WsConnector::new(&self.ws_url)?, options).await?,
            Frontend::Quic => {
                let trust = Trust::CaFile(self.ca.clone());
                let connector =
                    QuicConnector::from_url(&self.quic_url, &trust, &QuicConfig::default()).await?;
                Client::connect(connector, options).await?
            }
        };
        Ok(Box::new(DeadboltConn {
            client,
            lock_requests: 0,
        }))
    }

    fn cpu(&self) -> Duration {
        self.server.cpu()
    }

    fn rss(&self) -> u64 {
        self.server.rss()
    }
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
        }));
        match self.client.call(op).await {
            Ok(Okay::Granted(granted)) => Ok(Some(Held(granted.token))),
            Err(e) if e.code() == Some(ErrorCode::Busy) => Ok(None),
            other => bail!("lock: {other:?}"),
        }
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
            }));
            match client.call(op).await {
                Ok(Okay::Granted(_)) => Ok(Instant::now()),
                other => bail!("lock: {other:?}"),
            }
        });
        futures_util::future::try_join_all(waits).await
    }
}
