//! `deadbolt-bench transports`: deadbolt over WebSocket beside QUIC, and
//! QUIC through a relay that loses datagrams.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use deadbolt_core::client::{Client, ClientOptions};
use deadbolt_core::proto::{Acquire, ErrorCode, LockOp, Mode, Okay, Op, Wait};
use deadbolt_transport_quic::{LossyRelay, QuicConfig, QuicConnector, Trust};
use deadbolt_transport_ws::WsConnector;
use hdrhistogram::Histogram;

use crate::systems::Durability;
use crate::systems::deadbolt::{Deadbolt, Frontend};

/// Lock+unlock cycles against a deadbolt server, over WebSocket and QUIC,
/// and over QUIC through a lossy relay.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A WebSocket server to measure (default: start one).
    #[arg(long, requires_all = ["quic", "ca"])]
    ws: Option<String>,
    /// A QUIC server to measure (default: start one).
    #[arg(long, requires_all = ["ws", "ca"])]
    quic: Option<String>,
    /// The QUIC server's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Connections to run, one measurement each per transport.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    connections: Vec<usize>,
    /// Datagram loss, in percent, for the QUIC-through-a-relay rows.
    #[arg(long, value_delimiter = ',', default_value = "0,1,5")]
    loss: Vec<f64>,
    /// Connections for the lossy rows (each through its own relay).
    #[arg(long, default_value_t = 4)]
    loss_connections: usize,
    /// How long each measurement runs.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Keys are drawn from this many, so cycles rarely contend.
    #[arg(long, default_value_t = 1_000_000)]
    keyspace: u64,
}

/// Where the server is.
struct Target {
    ws: String,
    quic: String,
    trust: Trust,
}

/// How a measurement connects.
#[derive(Debug, Clone, Copy)]
enum Via {
    Ws,
    Quic,
    /// QUIC through a relay that drops this share of datagrams.
    LossyQuic(f64),
}

/// Runs the transport comparison.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut spawned = None;
    let target = match (&args.ws, &args.quic, &args.ca) {
        (Some(ws), Some(quic), Some(ca)) => Target {
            ws: ws.clone(),
            quic: quic.clone(),
            trust: Trust::CaFile(ca.clone()),
        },
        _ => {
            let server = Deadbolt::start(Frontend::Ws, Durability::Memory).await?;
            let (ws, quic, ca) = server.urls();
            let target = Target {
                ws,
                quic,
                trust: Trust::CaFile(ca),
            };
            spawned = Some(server);
            target
        }
    };
    println!(
        "lock+unlock cycles (depth 1 per connection), {} per row, keys from {}",
        humantime::format_duration(args.duration),
        args.keyspace
    );
    println!();
    println!("| transport | connections | cycles/s | p50 | p99 | p99.9 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for via in [Via::Ws, Via::Quic] {
        for &connections in &args.connections {
            let row = cycles(&target, via, connections, &args).await?;
            print_row(&row);
        }
    }
    for &loss in &args.loss {
        let row = cycles(
            &target,
            Via::LossyQuic(loss / 100.0),
            args.loss_connections,
            &args,
        )
        .await?;
        print_row(&row);
    }
    drop(spawned);
    Ok(())
}

/// One measurement.
struct Row {
    via: Via,
    connections: usize,
    cycles_per_second: f64,
    latency: Histogram<u64>,
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
    let via = match row.via {
        Via::Ws => "WebSocket".to_owned(),
        Via::Quic => "QUIC".to_owned(),
        Via::LossyQuic(loss) => format!("QUIC, {}% loss", loss * 100.0),
    };
    println!(
        "| {via} | {} | {:.0} | {} | {} | {} |",
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

/// A client, and the relay it goes through if any. Direct QUIC clients
/// share `quic`'s endpoint (one UDP socket), as a process's QUIC
/// connections share theirs.
async fn connect(
    target: &Target,
    via: Via,
    seed: u64,
    quic: Option<&QuicConnector>,
) -> anyhow::Result<(Client, Option<LossyRelay>)> {
    let options = ClientOptions::default();
    match (via, quic) {
        (Via::Ws, _) => Ok((
            Client::connect(WsConnector::new(&target.ws)?, options).await?,
            None,
        )),
        (Via::Quic, Some(connector)) => {
            Ok((Client::connect(connector.clone(), options).await?, None))
        }
        (Via::Quic, None) => {
            let connector =
                QuicConnector::from_url(&target.quic, &target.trust, &QuicConfig::default())
                    .await?;
            Ok((Client::connect(connector, options).await?, None))
        }
        (Via::LossyQuic(loss), _) => {
            let server: SocketAddr = target
                .quic
                .trim_start_matches("quic://")
                .parse()
                .context("QUIC address")?;
            let relay = LossyRelay::start(server, loss, seed).await?;
            let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
            let config =
                deadbolt_transport_quic::client_config(&target.trust, &QuicConfig::default())?;
            let connector = QuicConnector::new(endpoint, config, relay.addr(), "localhost");
            Ok((Client::connect(connector, options).await?, Some(relay)))
        }
    }
}

async fn one_cycle(client: &Client, key: String) -> anyhow::Result<()> {
    let lock = Op::Lock(LockOp::Acquire(Acquire {
        key: key.clone(),
        ttl_ms: 30_000,
        wait: Wait::Never,
        ephemeral: false,
        mode: Mode::MUTEX,
        lock_delay_ms: 0,
        notify: false,
    }));
    let token = match client.call(lock).await {
        Ok(Okay::Granted(granted)) => granted.token,
        // Two connections drew the same key at once: a rare collision.
        Err(e) if e.code() == Some(ErrorCode::Busy) => return Ok(()),
        other => anyhow::bail!("lock: {other:?}"),
    };
    client.unlock(&key, token).await.context("unlock")
}

async fn cycles(target: &Target, via: Via, connections: usize, args: &Args) -> anyhow::Result<Row> {
    let quic = match via {
        Via::Quic => Some(
            QuicConnector::from_url(&target.quic, &target.trust, &QuicConfig::default()).await?,
        ),
        _ => None,
    };
    let mut clients = Vec::with_capacity(connections);
    for i in 0..connections {
        clients.push(connect(target, via, i as u64, quic.as_ref()).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let keyspace = args.keyspace;
    for (i, (client, relay)) in clients.into_iter().enumerate() {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let _relay = relay;
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
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new(3)?;
    for task in tasks {
        latency.add(task.await??)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Row {
        via,
        connections,
        cycles_per_second: latency.len() as f64 / elapsed,
        latency,
    })
}
