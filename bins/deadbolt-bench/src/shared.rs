//! `deadbolt-bench shared`: readers and one writer on one key (SPEC section
//! 7's shared locks), deadbolt over WebSocket and over QUIC (readers
//! `"mode":"shared"`, the writer exclusive) beside a Redisson-style
//! read-write lock on Redis ([`crate::systems::redisson`]). A benchmark,
//! not a test: it prints one markdown table and asserts nothing.
//!
//! Each reader loops: lock shared, hold, unlock, think; the writer loops:
//! lock exclusive, hold, unlock, think (the pauses are the hand-off
//! scenario's, a thread's sleep rather than tokio's 1 ms timer). Every lock waits as long as it
//! takes (deadbolt: on the server, first come first served across modes;
//! Redis: Redisson's pub/sub wait, which lets readers in while a writer
//! waits). A wait still open when the run ends counts with its length so
//! far, so a writer that never gets in shows as the whole run.

use std::time::Duration;

use anyhow::Context;
use deadbolt_core::client::Client;
use deadbolt_core::proto::{Acquire, LockOp, Mode, Okay, Op, Wait};
use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::procs;
use crate::scenarios::pause;
use crate::systems::deadbolt::{Deadbolt, Frontend};
use crate::systems::redis::Redis;
use crate::systems::redisson::{Access, RwClient};
use crate::systems::{Durability, System};

/// The key (or lock name) every client shares.
const KEY: &str = "bench/shared";
/// Every hold's lease: long, so that only unlocks end holds.
const LEASE: Duration = Duration::from_secs(30);

/// Readers and one writer on one key.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Reader connections (the writer has one more of its own).
    #[arg(long, value_delimiter = ',', default_value = "4,16")]
    readers: Vec<usize>,
    /// How long each row runs.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How long a reader or the writer holds the key.
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// A reader's pause between unlock and its next lock.
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    reader_think: Duration,
    /// The writer's pause between unlock and its next lock.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    writer_think: Duration,
    /// Only these systems: deadbolt-ws, deadbolt-quic, redis.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// The systems, by the names `--only` takes.
const SYSTEMS: [&str; 3] = ["deadbolt-ws", "deadbolt-quic", "redis"];

/// Runs every row and prints the table.
pub async fn run(args: Args) -> anyhow::Result<()> {
    println!(
        "one key; each reader: lock shared, hold {}, unlock, think {}; one writer: lock \
         exclusive, hold {}, unlock, think {}; {} per row",
        humantime::format_duration(args.hold),
        humantime::format_duration(args.reader_think),
        humantime::format_duration(args.hold),
        humantime::format_duration(args.writer_think),
        humantime::format_duration(args.duration),
    );
    println!();
    println!(
        "| system | readers | reads/s | writes/s | writer wait p50 | writer wait p99 | \
         writer wait max | read wait p50 | read wait p99 | server CPU per acquisition |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for system in SYSTEMS {
        if !args.only.is_empty() && !args.only.iter().any(|o| system.starts_with(o.as_str())) {
            continue;
        }
        for &readers in &args.readers {
            match row(system, readers, &args).await {
                Ok(row) => println!("{}", row.markdown()),
                Err(error) => eprintln!("{system}, {readers} readers: {error:#}"),
            }
        }
    }
    Ok(())
}

/// A fresh server for `system`, and a way to make its clients.
enum Server {
    Deadbolt(Deadbolt),
    Redis(Redis),
}

impl Server {
    async fn start(system: &str) -> anyhow::Result<Server> {
        Ok(match system {
            "deadbolt-ws" => {
                Server::Deadbolt(Deadbolt::start(Frontend::Ws, Durability::Memory).await?)
            }
            "deadbolt-quic" => {
                Server::Deadbolt(Deadbolt::start(Frontend::Quic, Durability::Memory).await?)
            }
            _ => {
                anyhow::ensure!(
                    procs::have("redis-server"),
                    "redis-server is not installed (apt-get install redis-server)"
                );
                Server::Redis(Redis::start(Duration::ZERO, Durability::Memory).await?)
            }
        })
    }

    fn name(&self, system: &str) -> String {
        match self {
            Server::Deadbolt(_) => system.to_owned(),
            Server::Redis(_) => "Redis 7, Redisson-style read-write lock (pub/sub wait)".to_owned(),
        }
    }

    fn cpu(&self) -> Duration {
        match self {
            Server::Deadbolt(server) => server.cpu(),
            Server::Redis(server) => server.cpu(),
        }
    }

    async fn connect(&self, n: usize) -> anyhow::Result<RwConn> {
        Ok(match self {
            Server::Deadbolt(server) => RwConn::Deadbolt(server.client().await?),
            Server::Redis(server) => {
                let holder = format!("bench-client-{n}:1");
                let client = RwClient::connect(server.client(), KEY, &holder, LEASE).await?;
                RwConn::Redis(Box::new(client))
            }
        })
    }
}

/// One client of a read-write lock.
enum RwConn {
    Deadbolt(Client),
    Redis(Box<RwClient>),
}

impl RwConn {
    /// Takes the key, waiting as long as it takes: what to release it by.
    async fn lock(&mut self, access: Access) -> anyhow::Result<u64> {
        match self {
            RwConn::Deadbolt(client) => {
                let mode = match access {
                    Access::Read => Mode::Shared,
                    Access::Write => Mode::MUTEX,
                };
                let op = Op::Lock(LockOp::Acquire(Acquire {
                    mode,
                    ..Acquire::mutex(KEY, LEASE.as_millis() as u64, Wait::Forever)
                }));
                match client.call(op).await {
                    Ok(Okay::Granted(granted)) => Ok(granted.token),
                    other => anyhow::bail!("lock: {other:?}"),
                }
            }
            RwConn::Redis(client) => client.lock(access).await.map(|()| 0),
        }
    }

    async fn unlock(&mut self, access: Access, token: u64) -> anyhow::Result<()> {
        match self {
            RwConn::Deadbolt(client) => client.unlock(KEY, token).await.context("unlock"),
            RwConn::Redis(client) => client.unlock(access).await,
        }
    }
}

/// One row of the table.
struct Row {
    name: String,
    readers: usize,
    elapsed: Duration,
    reads: Histogram<u64>,
    writes: Histogram<u64>,
    /// Grants (the waits still open at the end are in the histograms, not
    /// here).
    read_grants: u64,
    write_grants: u64,
    server_cpu: Duration,
}

async fn row(system: &str, readers: usize, args: &Args) -> anyhow::Result<Row> {
    let server = Server::start(system).await?;
    let mut conns = Vec::with_capacity(readers + 1);
    for n in 0..=readers {
        conns.push(server.connect(n).await?);
    }
    let cpu_before = server.cpu();
    let started = Instant::now();
    let end = started + args.duration;
    let mut tasks = Vec::new();
    for (n, conn) in conns.into_iter().enumerate() {
        let (access, think) = if n == 0 {
            (Access::Write, args.writer_think)
        } else {
            (Access::Read, args.reader_think)
        };
        let hold = args.hold;
        tasks.push((
            access,
            tokio::spawn(client_loop(conn, access, hold, think, end)),
        ));
    }
    let mut reads = histogram();
    let mut writes = histogram();
    let (mut read_grants, mut write_grants) = (0, 0);
    for (access, task) in tasks {
        let (waits, grants) = task.await??;
        match access {
            Access::Read => {
                reads.add(&waits)?;
                read_grants += grants;
            }
            Access::Write => {
                writes.add(&waits)?;
                write_grants += grants;
            }
        }
    }
    let elapsed = started.elapsed();
    Ok(Row {
        name: server.name(system),
        readers,
        elapsed,
        reads,
        writes,
        read_grants,
        write_grants,
        server_cpu: server.cpu().saturating_sub(cpu_before),
    })
}

fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("three significant figures are valid")
}

/// One client until `end`: lock, hold, unlock, think. Returns every wait
/// (the one open at `end` included, cut there) and the grants.
async fn client_loop(
    mut conn: RwConn,
    access: Access,
    hold: Duration,
    think: Duration,
    end: Instant,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let mut waits = histogram();
    let mut grants = 0;
    while Instant::now() < end {
        let asked = Instant::now();
        let token = tokio::select! {
            token = conn.lock(access) => token?,
            () = tokio::time::sleep_until(end) => {
                waits.record(micros(asked.elapsed()))?;
                break;
            }
        };
        waits.record(micros(asked.elapsed()))?;
        grants += 1;
        pause(hold).await?;
        conn.unlock(access, token).await?;
        pause(think).await?;
    }
    Ok((waits, grants))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A wait as the table shows it.
fn wait(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

impl Row {
    fn markdown(&self) -> String {
        let seconds = self.elapsed.as_secs_f64();
        let acquisitions = self.read_grants + self.write_grants;
        let cpu = if acquisitions == 0 {
            "–".to_owned()
        } else {
            let us = self.server_cpu.as_secs_f64() * 1e6 / acquisitions as f64;
            format!("{us:.1} µs")
        };
        format!(
            "| {} | {} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {cpu} |",
            self.name,
            self.readers,
            self.read_grants as f64 / seconds,
            self.write_grants as f64 / seconds,
            wait(self.writes.value_at_quantile(0.5)),
            wait(self.writes.value_at_quantile(0.99)),
            wait(self.writes.max()),
            wait(self.reads.value_at_quantile(0.5)),
            wait(self.reads.value_at_quantile(0.99)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_that_never_got_in_shows_the_whole_run_as_its_wait() {
        let mut writes = histogram();
        writes.record(5_000_000).expect("in range");
        let mut reads = histogram();
        for us in [100, 200, 300] {
            reads.record(us).expect("in range");
        }
        let row = Row {
            name: "x".to_owned(),
            readers: 3,
            elapsed: Duration::from_secs(5),
            reads,
            writes,
            read_grants: 3,
            write_grants: 0,
            server_cpu: Duration::from_micros(30),
        };
        // The histogram keeps three significant figures: 5 s reads back as
        // the top of its bucket.
        assert_eq!(
            row.markdown(),
            "| x | 3 | 1 | 0.0 | 5001.2 ms | 5001.2 ms | 5001.2 ms | 200 µs | 300 µs | 10.0 µs |"
        );
    }
}
