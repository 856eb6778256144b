//! `deadbolt-bench`: measures deadbolt and prints markdown tables. A
//! benchmark, not a test: it asserts nothing about speed.
//!
//! Without `--server` it starts the `deadbolt` binary that sits next to it
//! (build both with `cargo build --release`) on a free port, as a separate
//! process, so that server and harness do not share a runtime.

mod server;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use deadbolt_core::client::{Client, ClientOptions};
use deadbolt_core::proto::{Acquire, LockOp, Okay, Op, Wait};
use deadbolt_transport_ws::WsConnector;
use hdrhistogram::Histogram;

/// Lock+unlock cycles against a deadbolt server.
#[derive(Debug, Parser)]
struct Args {
    /// The server to measure (default: start `deadbolt serve` on a free port).
    #[arg(long)]
    server: Option<String>,
    /// Connections to run, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    connections: Vec<usize>,
    /// How long each measurement runs.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Keys are drawn from this many, so cycles rarely contend.
    #[arg(long, default_value_t = 1_000_000)]
    keyspace: u64,
}

/// One measurement.
struct Row {
    connections: usize,
    cycles_per_second: f64,
    latency: Histogram<u64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut spawned = None;
        let url = match &args.server {
            Some(url) => url.clone(),
            None => {
                let server = server::Spawned::start().await?;
                let url = server.url.clone();
                spawned = Some(server);
                url
            }
        };
        println!(
            "lock+unlock cycles against {url}, {} per row, keys from {}",
            humantime::format_duration(args.duration),
            args.keyspace
        );
        println!();
        println!("| connections | cycles/s | p50 | p99 | p99.9 |");
        println!("|---:|---:|---:|---:|---:|");
        for &connections in &args.connections {
            let row = cycles(&url, connections, args.duration, args.keyspace).await?;
            print_row(&row);
        }
        drop(spawned);
        Ok(())
    })
}

fn micros(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

fn print_row(row: &Row) {
    let l = &row.latency;
    println!(
        "| {} | {:.0} | {} | {} | {} |",
        row.connections,
        row.cycles_per_second,
        micros(l.value_at_quantile(0.5)),
        micros(l.value_at_quantile(0.99)),
        micros(l.value_at_quantile(0.999)),
    );
}

/// A cheap, seeded key sequence (SplitMix64), so runs are repeatable.
fn next_key(state: &mut u64, keyspace: u64) -> String {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    format!("bench/{}", (z ^ (z >> 31)) % keyspace)
}

async fn one_cycle(client: &Client, key: String) -> anyhow::Result<()> {
    let lock = Op::Lock(LockOp::Acquire(Acquire {
        key: key.clone(),
        ttl_ms: 30_000,
        wait: Wait::Never,
        ephemeral: false,
    }));
    let token = match client.call(lock).await {
        Ok(Okay::Granted(granted)) => granted.token,
        // Two connections drew the same key at once: a rare collision.
        Err(e) if e.code() == Some(deadbolt_core::proto::ErrorCode::Busy) => return Ok(()),
        other => anyhow::bail!("lock: {other:?}"),
    };
    client.unlock(&key, token).await.context("unlock")
}

async fn cycles(
    url: &str,
    connections: usize,
    duration: Duration,
    keyspace: u64,
) -> anyhow::Result<Row> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(Client::connect(WsConnector::new(url)?, ClientOptions::default()).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3).expect("histogram");
            let mut state = i as u64;
            while !stop.load(Ordering::Relaxed) {
                let begun = Instant::now();
                one_cycle(&client, next_key(&mut state, keyspace)).await?;
                histogram.record(begun.elapsed().as_micros() as u64).ok();
            }
            Ok::<_, anyhow::Error>(histogram)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new(3)?;
    for task in tasks {
        latency.add(task.await??)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Row {
        connections,
        cycles_per_second: latency.len() as f64 / elapsed,
        latency,
    })
}
