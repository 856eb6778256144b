//! `deadbolt-bench`: deadbolt against Redis, memcached and PostgreSQL on one
//! machine, in one run, every system through every scenario. A benchmark,
//! not a test: it prints tables and asserts nothing about speed.
//!
//! Each peer is started from its Debian package on loopback, one at a
//! time, pinned to its own core, with the harness on the other(s):
//! build first (`cargo build --release`), then run `deadbolt-bench` (full)
//! or `deadbolt-bench --quick` (about a minute). `deadbolt-bench
//! transports` compares deadbolt's two transports and QUIC under loss.
//!
//! Layout: `systems` (one module per peer, behind one trait), `scenarios`
//! (the five measurements), `report` (tables, JSON, SVG), `procs` (server
//! processes, CPU and memory from /proc), `transports`.

mod procs;
mod report;
mod scenarios;
mod systems;
mod transports;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use report::{Run, SystemRun};
use scenarios::Size;
use systems::System;
use systems::deadbolt::{Deadbolt, Frontend};
use systems::memcached::Memcached;
use systems::postgres::Postgres;
use systems::redis::Redis;

/// deadbolt against Redis, memcached and PostgreSQL.
#[derive(Debug, Parser)]
#[command(args_conflicts_with_subcommands = true)]
struct Args {
    /// Something other than the comparison.
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    compare: CompareArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// deadbolt over WebSocket beside QUIC, and QUIC through datagram loss.
    Transports(transports::Args),
}

#[derive(Debug, clap::Args)]
struct CompareArgs {
    /// About a minute in all, instead of the full sizes.
    #[arg(long)]
    quick: bool,
    /// Only these systems: deadbolt-ws, deadbolt-quic, redis, memcached,
    /// postgres.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Print the tables and draw the chart of an earlier run's JSON,
    /// instead of running.
    #[arg(long)]
    from_json: Option<PathBuf>,
    /// Where to write the raw JSON (default: target/bench/results-<mode>.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where to write the SVG chart (default: docs/bench.svg for a full run
    /// of every system, else target/bench/bench.svg).
    #[arg(long)]
    svg: Option<PathBuf>,
}

const CONNECTIONS: [usize; 3] = [1, 16, 64];
const WAITERS: [usize; 3] = [2, 8, 32];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let harness_cores = procs::pin_harness();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(cores) = harness_cores {
        runtime.worker_threads(cores);
    }
    let runtime = runtime.build()?;
    match args.command {
        Some(Command::Transports(args)) => runtime.block_on(transports::run(args)),
        None => runtime.block_on(compare(args.compare, harness_cores)),
    }
}

/// The systems, in table order, each a way to start a fresh instance.
fn wanted(only: &[String]) -> Vec<&'static str> {
    let all = [
        "deadbolt-ws",
        "deadbolt-quic",
        "redis",
        "redis-1ms",
        "memcached",
        "postgres",
    ];
    all.into_iter()
        .filter(|name| only.is_empty() || only.iter().any(|o| name.starts_with(o.as_str())))
        .collect()
}

async fn start(name: &str) -> anyhow::Result<Box<dyn System>> {
    let needs = match name {
        "redis" | "redis-1ms" => Some(("redis-server", "redis-server")),
        "memcached" => Some(("memcached", "memcached")),
        "postgres" => Some(("runuser", "postgresql")),
        _ => None,
    };
    if let Some((program, package)) = needs {
        anyhow::ensure!(
            procs::have(program),
            "{program} is not installed (apt-get install {package})"
        );
    }
    Ok(match name {
        "deadbolt-ws" => Box::new(Deadbolt::start(Frontend::Ws).await?),
        "deadbolt-quic" => Box::new(Deadbolt::start(Frontend::Quic).await?),
        "redis" => Box::new(Redis::start(Duration::ZERO).await?),
        "redis-1ms" => Box::new(Redis::start(Duration::from_millis(1)).await?),
        "memcached" => Box::new(Memcached::start().await?),
        _ => Box::new(Postgres::start().await?),
    })
}

async fn compare(args: CompareArgs, harness_cores: Option<usize>) -> anyhow::Result<()> {
    if let Some(path) = &args.from_json {
        let run: Run = serde_json::from_slice(&std::fs::read(path)?)?;
        println!("{}", report::tables(&run));
        let svg = args
            .svg
            .clone()
            .unwrap_or_else(|| PathBuf::from("target/bench/bench.svg"));
        report::write_svg(&run, &svg)?;
        eprintln!("chart: {}", svg.display());
        return Ok(());
    }
    let (mode, size) = if args.quick {
        ("quick", Size::QUICK)
    } else {
        ("full", Size::FULL)
    };
    let placement = match harness_cores {
        Some(cores) => format!(
            "servers pinned to core {}, harness to the other {cores}",
            procs::SERVER_CORE
        ),
        None => "one core: servers and harness share it".to_owned(),
    };
    let mut run = Run {
        mode: mode.to_owned(),
        size,
        machine: machine(),
        placement,
        systems: Vec::new(),
    };
    for name in wanted(&args.only) {
        eprintln!("== {name}");
        match measure(name, size).await {
            Ok(system) => run.systems.push(system),
            Err(error) => eprintln!("{name}: could not start: {error:#}"),
        }
    }
    println!("{}", report::tables(&run));
    let json = args
        .json
        .unwrap_or_else(|| PathBuf::from(format!("target/bench/results-{mode}.json")));
    report::write_json(&run, &json)?;
    // Only a full run of every system replaces the published chart.
    let published = !args.quick && args.only.is_empty();
    let svg = args.svg.unwrap_or_else(|| {
        PathBuf::from(if published {
            "docs/bench.svg"
        } else {
            "target/bench/bench.svg"
        })
    });
    report::write_svg(&run, &svg)?;
    eprintln!("raw results: {}; chart: {}", json.display(), svg.display());
    Ok(())
}

/// Every scenario against one system: 1 to 3 on one instance, 4 and 5 each
/// on a fresh one, so that earlier state does not blur the numbers.
async fn measure(name: &str, size: Size) -> anyhow::Result<SystemRun> {
    let system = start(name).await?;
    let mut run = SystemRun {
        name: system.name(),
        tier: system.tier().to_owned(),
        cycles: Vec::new(),
        handoff: Vec::new(),
        distinct: Vec::new(),
        memory: None,
        storm: None,
        errors: Vec::new(),
    };
    // Polling every millisecond only changes how waiters wait.
    let waits_only = name == "redis-1ms";
    let mut errors = Vec::new();
    if !waits_only {
        for connections in CONNECTIONS {
            match scenarios::cycles(system.as_ref(), connections, size).await {
                Ok(row) => run.cycles.push(row),
                Err(e) => errors.push(format!("cycles with {connections} connections: {e:#}")),
            }
        }
    }
    for waiters in WAITERS {
        match scenarios::handoff(system.as_ref(), waiters, size).await {
            Ok(row) => run.handoff.push(row),
            Err(e) => errors.push(format!("hand-off with {waiters} waiters: {e:#}")),
        }
    }
    if !waits_only {
        for (mode, batch, connections) in [("single", 1, 16), ("batched", 1000, 4)] {
            match scenarios::distinct(system.as_ref(), mode, batch, connections, size).await {
                Ok(row) => run.distinct.push(row),
                Err(e) => errors.push(format!("distinct {mode}: {e:#}")),
            }
        }
    }
    drop(system);
    if !waits_only {
        let fresh = start(name).await?;
        match scenarios::memory(fresh.as_ref(), size).await {
            Ok(row) => run.memory = Some(row),
            Err(e) => errors.push(format!("memory: {e:#}")),
        }
    }
    let fresh = start(name).await?;
    if fresh.has_leases() {
        match scenarios::storm(fresh.as_ref(), size).await {
            Ok(row) => run.storm = Some(row),
            Err(e) => errors.push(format!("expiry storm: {e:#}")),
        }
    }
    run.errors = errors;
    Ok(run)
}

/// The CPU model, cores and memory of this machine.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|kb| kb.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{model}, {cores} cores (as the harness sees them), {memory_gib:.0} GiB")
}
