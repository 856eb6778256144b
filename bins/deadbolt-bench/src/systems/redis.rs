//! Redis 7: lock = `SET key owner NX PX ttl`, unlock = compare-and-delete
//! in Lua (EVALSHA); distinct = `SADD` (1 = new), with `EXPIRE` on the set.
//! Waiters must poll, every `retry` (0 ms: at once). In memory, or durable
//! through the append-only file (`appendfsync always` or `everysec`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

use super::{Conn, Durability, Held, Rounds, System};
use crate::procs::{self, Server};
use crate::scenarios::cycle_key;

/// Compare-and-delete: release only the grant this owner holds.
const UNLOCK: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

/// A running `redis-server`: in memory (no RDB, no AOF), or with an
/// append-only file in its scratch directory (still no RDB).
pub struct Redis {
    server: Server,
    client: redis::Client,
    retry: Duration,
    durability: Durability,
    owners: std::sync::atomic::AtomicU64,
}

impl Redis {
    /// Starts `redis-server` on a free port; waiters poll every `retry`.
    pub async fn start(retry: Duration, durability: Durability) -> anyhow::Result<Redis> {
        let port = procs::free_port()?;
        let mut args = vec![
            "--port".to_owned(),
            port.to_string(),
            "--bind".to_owned(),
            "127.0.0.1".to_owned(),
            "--save".to_owned(),
            String::new(),
            "--daemonize".to_owned(),
            "no".to_owned(),
        ];
        args.extend(aof_args(durability)?.into_iter().map(str::to_owned));
        // The AOF goes to `dir`, which defaults to the working directory:
        // the server's scratch directory, removed with it.
        let server = Server::start("redis", "redis-server", &args, None)?;
        procs::wait_for_port(port, Duration::from_secs(10)).await?;
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
        Ok(Redis {
            server,
            client,
            retry,
            durability,
            owners: std::sync::atomic::AtomicU64::new(1),
        })
    }
}

impl Redis {
    /// A client of this server, for what the [`Conn`] interface does not
    /// cover (the shared-lock benchmark's read-write locks).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }
}

/// The append-only file settings for `durability`. Redis fsyncs its AOF on
/// every write (before replying) or once a second, nothing in between.
fn aof_args(durability: Durability) -> anyhow::Result<Vec<&'static str>> {
    Ok(match durability {
        Durability::Memory => vec!["--appendonly", "no"],
        Durability::Always => vec!["--appendonly", "yes", "--appendfsync", "always"],
        Durability::Periodic { every_ms: 1000 } => {
            vec!["--appendonly", "yes", "--appendfsync", "everysec"]
        }
        Durability::Periodic { .. } => bail!("Redis fsyncs its AOF always or every second"),
    })
}

#[async_trait]
impl System for Redis {
    fn name(&self) -> String {
        let poll = self.retry.as_millis();
        match self.durability {
            Durability::Memory => format!("Redis 7 (poll {poll} ms)"),
            Durability::Always => format!("Redis 7 (poll {poll} ms, appendfsync always)"),
            Durability::Periodic { .. } => {
                format!("Redis 7 (poll {poll} ms, appendfsync everysec)")
            }
        }
    }

    fn tier(&self) -> String {
        match self.durability {
            Durability::Memory => "in-memory (appendonly no, save \"\")".to_owned(),
            Durability::Always => "appendonly yes, appendfsync always, save \"\"".to_owned(),
            Durability::Periodic { .. } => {
                "appendonly yes, appendfsync everysec, save \"\"".to_owned()
            }
        }
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Conn>> {
        let connection = self.client.get_multiplexed_async_connection().await?;
        let owner = self
            .owners
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Box::new(RedisConn {
            connection,
            script: redis::Script::new(UNLOCK),
            owner,
            retry: self.retry,
            lock_requests: 0,
            nonce: 0,
        }))
    }

    fn cpu(&self) -> Duration {
        self.server.cpu()
    }

    fn rss(&self) -> u64 {
        self.server.rss()
    }

    async fn own_memory(&self) -> Option<u64> {
        let mut connection = self.client.get_multiplexed_async_connection().await.ok()?;
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut connection)
            .await
            .ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
    }
}

struct RedisConn {
    connection: MultiplexedConnection,
    script: redis::Script,
    /// This connection's owner id; with a per-grant nonce it names a grant.
    owner: u64,
    retry: Duration,
    lock_requests: u64,
    nonce: u64,
}

#[async_trait]
impl Conn for RedisConn {
    async fn try_lock(&mut self, key: &str, ttl: Duration) -> anyhow::Result<Option<Held>> {
        self.lock_requests += 1;
        self.nonce += 1;
        let value = (self.owner << 32) | (self.nonce & 0xffff_ffff);
        let options = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::PX(
                u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1),
            ));
        let set: Option<String> = self.connection.set_options(key, value, options).await?;
        Ok(set.map(|_| Held(value)))
    }

    async fn lock(&mut self, key: &str, ttl: Duration) -> anyhow::Result<Held> {
        loop {
            if let Some(held) = self.try_lock(key, ttl).await? {
                return Ok(held);
            }
            if self.retry.is_zero() {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(self.retry).await;
            }
        }
    }

    async fn unlock(&mut self, key: &str, held: Held) -> anyhow::Result<()> {
        let _: i64 = self
            .script
            .key(key)
            .arg(held.0)
            .invoke_async(&mut self.connection)
            .await?;
        Ok(())
    }

    async fn set_up(&mut self, set: &str) -> anyhow::Result<()> {
        // A set exists in Redis once it has a member; EXPIRE after inserts.
        let _: i64 = self.connection.expire(set, 3600).await?;
        Ok(())
    }

    async fn insert(&mut self, set: &str, keys: &[String]) -> anyhow::Result<Vec<bool>> {
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("SADD").arg(set).arg(key);
        }
        let added: Vec<i64> = pipe
            .query_async(&mut self.connection)
            .await
            .context("SADD")?;
        Ok(added.into_iter().map(|n| n == 1).collect())
    }

    fn lock_requests(&self) -> u64 {
        self.lock_requests
    }

    /// Pipelines of `depth / 2` pairs of `SET key owner NX PX` and the
    /// compare-and-delete (`EVALSHA`) of the same key: `depth` commands in
    /// flight, Redis's best case (the owner value is the client's, so the
    /// unlock need not wait for the lock's answer).
    async fn pipelined(
        &mut self,
        depth: usize,
        seed: u64,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Option<u64>> {
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(UNLOCK)
            .query_async(&mut self.connection)
            .await?;
        let mut state = seed;
        let mut cycles = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let mut pipe = redis::pipe();
            for _ in 0..depth / 2 {
                let key = cycle_key(&mut state);
                self.nonce += 1;
                let value = (self.owner << 32) | (self.nonce & 0xffff_ffff);
                pipe.cmd("SET")
                    .arg(&key)
                    .arg(value)
                    .arg("NX")
                    .arg("PX")
                    .arg(30_000)
                    .cmd("EVALSHA")
                    .arg(&sha)
                    .arg(1)
                    .arg(&key)
                    .arg(value);
            }
            let answers: Vec<redis::Value> = pipe.query_async(&mut self.connection).await?;
            // Every other answer is a SET's: OK when it took the key.
            cycles += answers
                .iter()
                .step_by(2)
                .filter(|a| !matches!(a, redis::Value::Nil))
                .count() as u64;
        }
        Ok(Some(cycles))
    }

    /// Rounds of pipelined `SET NX PX` over the keys still to take.
    async fn lock_all(
        &mut self,
        keys: &[String],
        ttl: Duration,
        retry: Duration,
    ) -> anyhow::Result<Vec<Instant>> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut rounds = Rounds::new(keys.len());
        while let Some(open) = rounds.open() {
            let mut pipe = redis::pipe();
            for &i in &open {
                self.lock_requests += 1;
                pipe.cmd("SET")
                    .arg(&keys[i])
                    .arg(self.owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms);
            }
            let answers: Vec<Option<String>> = pipe.query_async(&mut self.connection).await?;
            rounds.record(&open, answers.into_iter().map(|a| a.is_some()));
            tokio::time::sleep(retry).await;
        }
        Ok(rounds.finish())
    }
}
