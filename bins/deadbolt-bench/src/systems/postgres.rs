//! PostgreSQL: advisory locks (`pg_try_advisory_lock`, blocking
//! `pg_advisory_lock` with server-side push wake-up, `pg_advisory_unlock`)
//! and a table for the distinct set (`INSERT … ON CONFLICT DO NOTHING
//! RETURNING`): UNLOGGED with fsync off in memory, logged with synchronous
//! commit when durable. Advisory locks have no lease: they last until
//! unlocked or until the session ends, and are never logged, so durability
//! changes only the set.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use tokio_postgres::{Client, NoTls, Statement};

use super::{Conn, Durability, Held, System};
use crate::procs::{self, Scratch, Server};

/// Where Debian keeps the server binaries.
fn pg_bin(name: &str) -> anyhow::Result<String> {
    let root = std::path::Path::new("/usr/lib/postgresql");
    let mut versions: Vec<_> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    versions.sort();
    let bin = versions
        .last()
        .context("no PostgreSQL under /usr/lib/postgresql")?
        .join("bin")
        .join(name);
    Ok(bin.to_string_lossy().into_owned())
}

/// A running `postgres`: with durability off (fsync, synchronous_commit
/// and full_page_writes off; the set's table UNLOGGED), or on (all three
/// on; the table logged).
pub struct Postgres {
    server: Server,
    port: u16,
    durability: Durability,
    /// The cluster's files, removed when dropped (after the server, which
    /// is declared first).
    _data: Scratch,
}

impl Postgres {
    /// Initialises a cluster in a scratch directory and starts it.
    pub async fn start(durability: Durability) -> anyhow::Result<Postgres> {
        let switch = match durability {
            Durability::Memory => "off",
            Durability::Always => "on",
            Durability::Periodic { .. } => {
                anyhow::bail!("PostgreSQL is measured in memory or with synchronous commit")
            }
        };
        let port = procs::free_port()?;
        // Removed however the start ends.
        let scratch = Scratch::new("postgres-data")?;
        let dir = scratch.path();
        let data = dir.join("data");
        let status = tokio::process::Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                &pg_bin("initdb")?,
                "--auth=trust",
                "-U",
                "postgres",
                "-D",
            ])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "initdb failed");
        let settings = [
            "-p",
            &port.to_string(),
            "-k",
            &dir.to_string_lossy(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            &format!("fsync={switch}"),
            "-c",
            &format!("synchronous_commit={switch}"),
            "-c",
            &format!("full_page_writes={switch}"),
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=256MB",
            "-c",
            "max_locks_per_transaction=256",
        ]
        .map(String::from);
        let mut args = vec!["-D".to_owned(), data.to_string_lossy().into_owned()];
        args.extend(settings);
        let server = Server::start("postgres", &pg_bin("postgres")?, &args, Some("postgres"))?;
        procs::wait_for_port(port, Duration::from_secs(30)).await?;
        let postgres = Postgres {
            server,
            port,
            durability,
            _data: scratch,
        };
        // Listening is not ready: wait until a session starts.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while let Err(error) = postgres.session().await {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "PostgreSQL did not become ready: {error}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(postgres)
    }
}

impl Postgres {
    /// A new session.
    async fn session(&self) -> anyhow::Result<Client> {
        let config = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        );
        let (client, connection) = tokio_postgres::connect(&config, NoTls).await?;
        tokio::spawn(async move {
            // Ends when the client is dropped.
            let _ = connection.await;
        });
        Ok(client)
    }
}

#[async_trait]
impl System for Postgres {
    fn name(&self) -> String {
        match self.durability {
            Durability::Memory => "PostgreSQL 15 (advisory locks)".to_owned(),
            _ => "PostgreSQL 15 (synchronous_commit=on, logged table)".to_owned(),
        }
    }

    fn tier(&self) -> String {
        match self.durability {
            Durability::Memory => "fsync=off, synchronous_commit=off, UNLOGGED table".to_owned(),
            _ => "fsync=on, synchronous_commit=on, full_page_writes=on, logged table \
                  (advisory locks are never logged)"
                .to_owned(),
        }
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Conn>> {
        let client = self.session().await?;
        let statements = Statements {
            try_lock: client.prepare("SELECT pg_try_advisory_lock($1)").await?,
            lock: client.prepare("SELECT pg_advisory_lock($1)").await?,
            unlock: client.prepare("SELECT pg_advisory_unlock($1)").await?,
        };
        Ok(Box::new(PostgresConn {
            client,
            statements,
            logged: self.durability != Durability::Memory,
            insert: None,
            lock_requests: 0,
        }))
    }

    fn cpu(&self) -> Duration {
        self.server.cpu()
    }

    fn rss(&self) -> u64 {
        self.server.rss()
    }

    async fn own_memory(&self) -> Option<u64> {
        let client = self.session().await.ok()?;
        let row = client
            .query_one("SELECT pg_total_relation_size('members')", &[])
            .await
            .ok()?;
        u64::try_from(row.get::<_, i64>(0)).ok()
    }

    fn has_leases(&self) -> bool {
        false
    }

    fn locks_in_memory(&self) -> bool {
        false
    }
}

struct Statements {
    try_lock: Statement,
    lock: Statement,
    unlock: Statement,
}

struct PostgresConn {
    client: Client,
    statements: Statements,
    /// Whether the set's table is written to the WAL.
    logged: bool,
    insert: Option<Statement>,
    lock_requests: u64,
}

/// Advisory locks take a 64-bit key.
fn lock_id(key: &str) -> i64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish() as i64
}

#[async_trait]
impl Conn for PostgresConn {
    async fn try_lock(&mut self, key: &str, _ttl: Duration) -> anyhow::Result<Option<Held>> {
        self.lock_requests += 1;
        let row = self
            .client
            .query_one(&self.statements.try_lock, &[&lock_id(key)])
            .await?;
        Ok(row.get::<_, bool>(0).then_some(Held(0)))
    }

    async fn lock(&mut self, key: &str, _ttl: Duration) -> anyhow::Result<Held> {
        self.lock_requests += 1;
        self.client
            .query_one(&self.statements.lock, &[&lock_id(key)])
            .await?;
        Ok(Held(0))
    }

    async fn unlock(&mut self, key: &str, _held: Held) -> anyhow::Result<()> {
        self.client
            .query_one(&self.statements.unlock, &[&lock_id(key)])
            .await?;
        Ok(())
    }

    async fn set_up(&mut self, _set: &str) -> anyhow::Result<()> {
        let table = if self.logged {
            "TABLE"
        } else {
            "UNLOGGED TABLE"
        };
        self.client
            .batch_execute(&format!(
                "CREATE {table} IF NOT EXISTS members (set text, key text, PRIMARY KEY (set, key))"
            ))
            .await?;
        Ok(())
    }

    async fn insert(&mut self, set: &str, keys: &[String]) -> anyhow::Result<Vec<bool>> {
        if self.insert.is_none() {
            // Rows are locked in key order, the same in every batch, so
            // that concurrent batches cannot deadlock.
            let sql = "INSERT INTO members (set, key) SELECT $1, k FROM unnest($2::text[]) AS k ORDER BY k \
                       ON CONFLICT DO NOTHING RETURNING key";
            self.insert = Some(self.client.prepare(sql).await?);
        }
        let statement = self.insert.as_ref().context("prepared")?;
        let rows = self.client.query(statement, &[&set, &keys]).await?;
        let mut new: HashSet<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        // A key twice in one batch is inserted once: the first is new.
        Ok(keys.iter().map(|k| new.remove(k)).collect())
    }

    fn lock_requests(&self) -> u64 {
        self.lock_requests
    }
}
