//! `deadbolt-bench loss`: WebSocket (TCP) and QUIC side by side under real
//! kernel packet loss.
//!
//! The benchmark re-executes itself under `unshare -n` (it must run as
//! root), so that the server, the harness and the loss live in a private
//! network namespace: its own loopback, brought up, and an `nft` table
//! whose one rule drops a random share of every packet sent on it (both
//! directions of every connection, as each packet passes the output hook
//! once). Nothing outside the namespace sees a dropped packet.
//!
//! Each row connects its clients while nothing is lost (a handshake is not
//! what is measured), then turns the loss on and runs lock+unlock cycles:
//! `--depth` lanes per connection, each one request in flight at a time,
//! so a connection has several in flight (where TCP's head-of-line
//! blocking shows). A benchmark, not a test: it prints a table and the
//! ratios issue 16 sets targets for, and asserts nothing.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use deadbolt_core::client::{Client, ClientOptions, HedgeOptions, HedgeStats};
use deadbolt_core::proto::{Acquire, ErrorCode, LockOp, Okay, Op, Wait};
use deadbolt_transport_quic::{QuicConfig, QuicConnector, QuicTuning, Trust};
use deadbolt_transport_ws::WsConnector;
use hdrhistogram::Histogram;

use crate::scenarios::lane_key;
use crate::systems::deadbolt::{Deadbolt, Frontend};
use crate::systems::{Durability, System};

/// Set in the re-executed benchmark, inside its namespace.
const IN_NAMESPACE: &str = "DEADBOLT_BENCH_IN_NETNS";
/// The `nft` table the benchmark owns (in its own namespace).
const TABLE: &str = "deadbolt_bench_loss";

/// Lock+unlock cycles over WebSocket and QUIC at several packet-loss rates.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// A smoke run: 0 and 5 % loss, 1 s per row.
    #[arg(long)]
    quick: bool,
    /// Packet loss, in percent, one set of rows each.
    #[arg(long, value_delimiter = ',', default_value = "0,1,5,10")]
    loss: Vec<f64>,
    /// Connections, one row each per transport and loss.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    connections: Vec<usize>,
    /// Requests in flight per connection (lanes, each one cycle at a time).
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// How long each row runs.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Which transports: ws, quic.
    #[arg(long, value_delimiter = ',', default_value = "ws,quic")]
    transports: Vec<Transport>,
    /// QUIC transport settings, for the server and the clients alike
    /// (`deadbolt serve --quic-tuning`): `rpc` (the default) or `quinn`
    /// (quinn's own), either followed by `,name=value` overrides.
    #[arg(long, default_value = "rpc")]
    quic_tuning: String,
    /// Hedged requests in the QUIC client (`true`, the default, or `false`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    hedge: bool,
    /// The hedging delay's quantile of recent round trips.
    #[arg(long, default_value_t = HedgeOptions::default().quantile)]
    hedge_quantile: f64,
    /// The shortest hedging delay (`500us`, `1ms`).
    #[arg(long, default_value = "500us", value_parser = humantime::parse_duration)]
    hedge_floor: std::time::Duration,
}

/// A transport to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// WebSocket over TCP.
    Ws,
    /// QUIC over UDP.
    Quic,
}

/// Runs the benchmark, in a private network namespace.
pub fn run(args: Args, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    if std::env::var_os(IN_NAMESPACE).is_none() {
        return reexec_in_namespace();
    }
    let args = args.quick_if_asked();
    let tuning =
        QuicTuning::parse(&args.quic_tuning).map_err(|e| anyhow::anyhow!("--quic-tuning: {e}"))?;
    Loss::set_up()?;
    runtime.block_on(measure(args, tuning))
}

/// Runs this very command again under `unshare -n`, and exits as it does.
fn reexec_in_namespace() -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("this benchmark's path")?;
    let status = Command::new("unshare")
        .arg("-n")
        .arg("--")
        .arg(&exe)
        .args(std::env::args_os().skip(1))
        .env(IN_NAMESPACE, "1")
        .status()
        .context("running unshare (util-linux)")?;
    if !status.success() {
        bail!(
            "the benchmark in its network namespace failed ({status}); it needs root \
             (unshare -n) and nft (Debian's nftables)"
        );
    }
    Ok(())
}

impl Args {
    fn quick_if_asked(mut self) -> Args {
        if self.quick {
            self.loss = vec![0.0, 5.0];
            self.duration = Duration::from_secs(1);
        }
        self
    }
}

/// The namespace's loss rule.
struct Loss;

impl Loss {
    /// Brings the loopback up and makes the (empty) table and chain.
    fn set_up() -> anyhow::Result<()> {
        run_tool("ip", &["link", "set", "lo", "up"])?;
        run_tool("nft", &["add", "table", "inet", TABLE])?;
        run_tool(
            "nft",
            &[
                "add",
                "chain",
                "inet",
                TABLE,
                "out",
                "{ type filter hook output priority 0; }",
            ],
        )
    }

    /// Drops `percent` % of packets from now on (to 0.01 %), and counts
    /// packets sent anew.
    fn set(percent: f64) -> anyhow::Result<()> {
        run_tool("nft", &["flush", "chain", "inet", TABLE, "out"])?;
        run_tool("nft", &["add", "rule", "inet", TABLE, "out", "counter"])?;
        let per_10k = (percent * 100.0).round() as u32;
        if per_10k > 0 {
            let rule = format!("numgen random mod 10000 < {per_10k} drop");
            let mut words = vec!["add", "rule", "inet", TABLE, "out"];
            words.extend(rule.split(' '));
            run_tool("nft", &words)?;
        }
        Ok(())
    }
}

impl Loss {
    /// Packets sent (dropped or not) since the last [`Loss::set`].
    fn packets() -> anyhow::Result<u64> {
        let out = Command::new("nft")
            .args(["list", "chain", "inet", TABLE, "out"])
            .output()
            .context("running nft")?;
        let listing = String::from_utf8_lossy(&out.stdout);
        let count = listing
            .split_whitespace()
            .skip_while(|word| *word != "packets")
            .nth(1)
            .context("no packet counter in the loss chain")?;
        count.parse().context("the packet counter")
    }
}

fn run_tool(tool: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .with_context(|| format!("running {tool} (Debian: iproute2, nftables)"))?;
    if !out.status.success() {
        bail!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One measurement.
struct Row {
    loss: f64,
    transport: Transport,
    connections: usize,
    cycles_per_second: f64,
    latency: Histogram<u64>,
    server_cpu_per_cycle: Duration,
    /// Packets on the loopback (both directions, with acknowledgements).
    packets_per_cycle: f64,
    hedges: HedgeStats,
}

async fn measure(args: Args, tuning: QuicTuning) -> anyhow::Result<()> {
    // The server's default is `rpc`: said only otherwise, so that the
    // benchmark also drives a server from before the flag.
    let flags = match args.quic_tuning.as_str() {
        "rpc" => Vec::new(),
        tuning => vec!["--quic-tuning".to_owned(), tuning.to_owned()],
    };
    let server = Deadbolt::start_with(Frontend::Ws, Durability::Memory, &flags).await?;
    let (ws, quic, ca) = server.urls();
    let target = Target {
        ws,
        quic,
        ca,
        tuning,
        hedge: args.hedge.then(|| HedgeOptions {
            quantile: args.hedge_quantile,
            floor: args.hedge_floor,
            ..HedgeOptions::default()
        }),
    };
    println!(
        "lock+unlock cycles under packet loss: {} lanes per connection, {} per row, \
         QUIC tuning `{}`, hedging {}, load average {}",
        args.depth,
        humantime::format_duration(args.duration),
        args.quic_tuning,
        match &target.hedge {
            Some(hedge) => format!(
                "at the {} quantile (at least {})",
                hedge.quantile,
                humantime::format_duration(hedge.floor)
            ),
            None => "off".to_owned(),
        },
        load_average(),
    );
    println!();
    println!(
        "| loss | transport | connections | cycles/s | p50 | p99 | p99.9 | server CPU/cycle | packets/cycle | copies sent (won) |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for &loss in &args.loss {
        for &transport in &args.transports {
            for &connections in &args.connections {
                let row = cycles(&server, &target, transport, connections, loss, &args).await?;
                print_row(&row);
                rows.push(row);
            }
        }
    }
    print_ratios(&rows);
    println!("load average after: {}", load_average());
    Ok(())
}

/// Where the server is and how to reach it.
struct Target {
    ws: String,
    quic: String,
    ca: PathBuf,
    tuning: QuicTuning,
    hedge: Option<HedgeOptions>,
}

async fn connect(target: &Target, transport: Transport) -> anyhow::Result<Client> {
    let options = ClientOptions::default();
    Ok(match transport {
        Transport::Ws => Client::connect(WsConnector::new(&target.ws)?, options).await?,
        Transport::Quic => {
            let config = QuicConfig {
                tuning: target.tuning.clone(),
                ..QuicConfig::default()
            };
            let trust = Trust::CaFile(target.ca.clone());
            let connector = QuicConnector::from_url(&target.quic, &trust, &config).await?;
            let options = ClientOptions {
                hedging: target.hedge.clone(),
                ..options
            };
            Client::connect(connector, options).await?
        }
    })
}

async fn cycles(
    server: &Deadbolt,
    target: &Target,
    transport: Transport,
    connections: usize,
    loss: f64,
    args: &Args,
) -> anyhow::Result<Row> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(connect(target, transport).await?);
    }
    Loss::set(loss)?;
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = server.cpu();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        for lane in 0..args.depth {
            let (client, stop) = (client.clone(), stop.clone());
            let lanes = (connections * args.depth) as u64;
            let lane = (c * args.depth + lane) as u64;
            tasks.push(tokio::spawn(async move {
                let mut histogram = Histogram::<u64>::new(3).expect("3 digits is valid");
                let mut state = lane.wrapping_mul(0x9E37_79B9);
                while !stop.load(Ordering::Relaxed) {
                    let begun = Instant::now();
                    one_cycle(&client, lane_key(&mut state, lane, lanes)).await?;
                    histogram.record(begun.elapsed().as_micros() as u64).ok();
                }
                anyhow::Ok(histogram)
            }));
        }
    }
    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new(3)?;
    for task in tasks {
        latency.add(task.await??)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = server.cpu().saturating_sub(cpu_before);
    let packets = Loss::packets()?;
    Loss::set(0.0)?;
    let hedges = clients
        .iter()
        .map(Client::hedge_stats)
        .fold(HedgeStats::default(), |a, b| a + b);
    drop(clients);
    let done = latency.len().max(1);
    Ok(Row {
        loss,
        transport,
        connections,
        cycles_per_second: latency.len() as f64 / elapsed,
        latency,
        server_cpu_per_cycle: cpu / u32::try_from(done).unwrap_or(u32::MAX),
        packets_per_cycle: packets as f64 / done as f64,
        hedges,
    })
}

async fn one_cycle(client: &Client, key: String) -> anyhow::Result<()> {
    let lock = Op::Lock(LockOp::Acquire(Acquire::mutex(
        key.clone(),
        30_000,
        Wait::Never,
    )));
    let token = match client.call(lock).await {
        Ok(Okay::Granted(granted)) => granted.token,
        Err(e) if e.code() == Some(ErrorCode::Busy) => bail!("lanes never share a key: {e}"),
        other => bail!("lock: {other:?}"),
    };
    client.unlock(&key, token).await.context("unlock")
}

fn micros(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

fn name(transport: Transport) -> &'static str {
    match transport {
        Transport::Ws => "WebSocket",
        Transport::Quic => "QUIC",
    }
}

fn print_row(row: &Row) {
    let l = &row.latency;
    println!(
        "| {}% | {} | {} | {:.0} | {} | {} | {} | {:.1} µs | {:.1} | {} ({}) |",
        row.loss,
        name(row.transport),
        row.connections,
        row.cycles_per_second,
        micros(l.value_at_quantile(0.5)),
        micros(l.value_at_quantile(0.99)),
        micros(l.value_at_quantile(0.999)),
        row.server_cpu_per_cycle.as_secs_f64() * 1e6,
        row.packets_per_cycle,
        row.hedges.sent,
        row.hedges.won,
    );
}

/// The ratios issue 16's targets are stated in, for every loss and
/// connection count that has the rows they need.
fn print_ratios(rows: &[Row]) {
    let find = |loss: f64, transport: Transport, connections: usize| {
        rows.iter()
            .find(|r| r.loss == loss && r.transport == transport && r.connections == connections)
    };
    println!();
    println!(
        "| loss | connections | QUIC p99 / lossless QUIC p99 | QUIC p99 / WebSocket p99 | QUIC cycles/s / lossless | QUIC cycles/s / WebSocket |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for row in rows.iter().filter(|r| r.transport == Transport::Quic) {
        let p99 = |r: &Row| r.latency.value_at_quantile(0.99).max(1) as f64;
        let lossless = find(0.0, Transport::Quic, row.connections);
        let ws = find(row.loss, Transport::Ws, row.connections);
        let ratio = |other: Option<&Row>, f: &dyn Fn(&Row) -> f64| {
            other.map_or("–".to_owned(), |o| format!("{:.3}", f(row) / f(o)))
        };
        println!(
            "| {}% | {} | {} | {} | {} | {} |",
            row.loss,
            row.connections,
            ratio(lossless, &p99),
            ratio(ws, &p99),
            ratio(lossless, &|r| r.cycles_per_second),
            ratio(ws, &|r| r.cycles_per_second),
        );
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}
