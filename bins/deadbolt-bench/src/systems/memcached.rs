//! memcached, over its text protocol: lock = `add key 0 exptime` (fails if
//! present), unlock = `delete`; distinct = `add` per key. Its expiry has
//! one-second granularity, so leases round up to whole seconds. Waiters
//! poll every millisecond.

use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{Conn, Held, Rounds, System};
use crate::procs::{self, Server};

/// How often a waiter tries again.
const RETRY: Duration = Duration::from_millis(1);

/// A running `memcached`, one worker thread, 4 GiB of cache.
pub struct Memcached {
    server: Server,
    port: u16,
}

impl Memcached {
    /// Starts `memcached` on a free port.
    pub async fn start() -> anyhow::Result<Memcached> {
        let port = procs::free_port()?;
        let args = [
            "-l",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "0",
            "-m",
            "4096",
            "-t",
            "1",
            "-u",
            "root",
        ]
        .map(String::from);
        let server = Server::start("memcached", "memcached", &args, None)?;
        procs::wait_for_port(port, Duration::from_secs(10)).await?;
        Ok(Memcached { server, port })
    }
}

#[async_trait]
impl System for Memcached {
    fn name(&self) -> String {
        "memcached 1.6 (poll 1 ms)".to_owned()
    }

    fn tier(&self) -> String {
        "in-memory".to_owned()
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Conn>> {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).await?;
        stream.set_nodelay(true)?;
        Ok(Box::new(MemcachedConn {
            stream: BufReader::new(stream),
            lock_requests: 0,
            line: String::new(),
        }))
    }

    fn cpu(&self) -> Duration {
        self.server.cpu()
    }

    fn rss(&self) -> u64 {
        self.server.rss()
    }
}

struct MemcachedConn {
    stream: BufReader<TcpStream>,
    lock_requests: u64,
    line: String,
}

impl MemcachedConn {
    /// Sends `adds` (key, exptime) pipelined; whether each was stored.
    async fn add_all(&mut self, adds: &[(String, u64)]) -> anyhow::Result<Vec<bool>> {
        let mut request = String::new();
        for (key, exptime) in adds {
            request.push_str(&format!("add {key} 0 {exptime} 1\r\n1\r\n"));
        }
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let mut stored = Vec::with_capacity(adds.len());
        for _ in adds {
            match self.read_line().await?.as_str() {
                "STORED" => stored.push(true),
                "NOT_STORED" => stored.push(false),
                other => bail!("memcached add: {other}"),
            }
        }
        Ok(stored)
    }

    async fn read_line(&mut self) -> anyhow::Result<String> {
        self.line.clear();
        let n = self.stream.read_line(&mut self.line).await?;
        anyhow::ensure!(n > 0, "memcached closed the connection");
        Ok(self.line.trim_end().to_owned())
    }
}

fn exptime(ttl: Duration) -> u64 {
    ttl.as_millis().div_ceil(1000).max(1) as u64
}

#[async_trait]
impl Conn for MemcachedConn {
    async fn try_lock(&mut self, key: &str, ttl: Duration) -> anyhow::Result<Option<Held>> {
        self.lock_requests += 1;
        let stored = self.add_all(&[(key.to_owned(), exptime(ttl))]).await?;
        Ok(stored.first().copied().unwrap_or(false).then_some(Held(0)))
    }

    async fn lock(&mut self, key: &str, ttl: Duration) -> anyhow::Result<Held> {
        loop {
            if let Some(held) = self.try_lock(key, ttl).await? {
                return Ok(held);
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn unlock(&mut self, key: &str, _held: Held) -> anyhow::Result<()> {
        self.stream
            .get_mut()
            .write_all(format!("delete {key}\r\n").as_bytes())
            .await?;
        let answer = self.read_line().await?;
        anyhow::ensure!(
            answer == "DELETED" || answer == "NOT_FOUND",
            "memcached delete: {answer}"
        );
        Ok(())
    }

    async fn set_up(&mut self, _set: &str) -> anyhow::Result<()> {
        Ok(())
    }

    async fn insert(&mut self, set: &str, keys: &[String]) -> anyhow::Result<Vec<bool>> {
        let adds: Vec<(String, u64)> = keys.iter().map(|k| (format!("{set}:{k}"), 0)).collect();
        self.add_all(&adds).await.context("add")
    }

    fn lock_requests(&self) -> u64 {
        self.lock_requests
    }

    /// Rounds of pipelined `add` over the keys still to take.
    async fn lock_all(
        &mut self,
        keys: &[String],
        ttl: Duration,
        retry: Duration,
    ) -> anyhow::Result<Vec<Instant>> {
        let mut rounds = Rounds::new(keys.len());
        while let Some(open) = rounds.open() {
            self.lock_requests += open.len() as u64;
            let adds: Vec<(String, u64)> = open
                .iter()
                .map(|&i| (keys[i].clone(), exptime(ttl)))
                .collect();
            let stored = self.add_all(&adds).await?;
            rounds.record(&open, stored);
            tokio::time::sleep(retry).await;
        }
        Ok(rounds.finish())
    }
}
