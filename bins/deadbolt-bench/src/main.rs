//! `deadbolt-bench`: deadbolt against Redis, memcached, PostgreSQL and etcd
//! on one machine, in one run, every system through every scenario it
//! supports. A benchmark, not a test: it prints tables and asserts nothing
//! about speed.
//!
//! Each peer is started from its Debian package on loopback, one at a
//! time, pinned to its own core, with the harness on the other(s):
//! build first (`cargo build --release`), then run `deadbolt-bench` (full)
//! or `deadbolt-bench --quick` (about a minute). Every system runs in
//! memory unless `--durability durable` (or `all`) asks for the rows that
//! write to disk: deadbolt `--fsync always` and `every=10ms`, Redis
//! `appendfsync always` and `everysec`, PostgreSQL with synchronous commit,
//! etcd as shipped. Replicated rows: etcd with three members, and deadbolt
//! with three nodes once `deadbolt serve` has `--cluster` (skipped until
//! then), all processes of a cluster on the one server core.
//! `deadbolt-bench shared` puts readers and one writer on one key, deadbolt's
//! shared locks beside a Redisson-style Redis read-write lock.
//! `deadbolt-bench transports` compares deadbolt's two transports and QUIC
//! through a lossy relay; `deadbolt-bench loss` compares them under real
//! kernel packet loss in a private network namespace; `deadbolt-bench
//! restart` measures a durable deadbolt's restart time and data directory
//! size.
//!
//! Layout: `systems` (one module per peer, behind one trait, each started
//! with a `Durability`), `scenarios` (the measurements), `limit` (the
//! limit row's server: no work per request), `report`
//! (tables, JSON, SVG), `procs` (server processes, CPU and memory from
//! /proc), `http` (the HTTP/1.1 client etcd's JSON gateway needs),
//! `transports`, `loss`, `restart`.

mod abuse;
mod http;
mod limit;
mod loss;
mod procs;
mod report;
mod restart;
mod scenarios;
mod shared;
mod systems;
mod transports;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use report::{Run, SystemRun};
use scenarios::{Contention, Size};
use systems::cluster::DeadboltCluster;
use systems::deadbolt::{Deadbolt, Frontend, NoDurability};
use systems::etcd::{Clients, Etcd};
use systems::memcached::Memcached;
use systems::postgres::Postgres;
use systems::redis::Redis;
use systems::{Durability, Skipped, System};

/// deadbolt against Redis, memcached, PostgreSQL and etcd.
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
    /// WebSocket and QUIC under real kernel packet loss (0, 1, 5, 10 %), in
    /// a private network namespace (as root: it re-runs itself under
    /// `unshare -n`, with `nft` dropping packets on its loopback).
    Loss(loss::Args),
    /// A durable deadbolt: restart time with 1M set members (after SIGTERM
    /// and after SIGKILL) and its data directory's size.
    Restart(restart::Args),
    /// Issue 18's attacks, each beside a canary client: its latency and
    /// the server's peak memory.
    Abuse(abuse::Args),
    /// Readers and one writer on one key: deadbolt's shared locks over
    /// WebSocket and QUIC beside a Redisson-style Redis read-write lock.
    Shared(shared::Args),
    /// The limit row's server: answers deadbolt's lock and unlock over
    /// WebSocket with no work per request (the comparison starts it).
    LimitServer(limit::Args),
}

#[derive(Debug, clap::Args)]
struct CompareArgs {
    /// About a minute in all, instead of the full sizes.
    #[arg(long)]
    quick: bool,
    /// Only these systems (or every row whose name starts so): deadbolt-ws,
    /// deadbolt-quic, redis, memcached, postgres, etcd (one member),
    /// etcd-3 and etcd-3-leader (three members; clients on all, or on the
    /// leader), deadbolt-3 and deadbolt-3-leader (three nodes).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Which rows by durability: in memory (as published; etcd and the
    /// clusters with their data on tmpfs), the durable ones (deadbolt-ws
    /// --fsync always and every=10ms, redis with appendfsync always and
    /// everysec, postgres with synchronous commit, etcd as shipped, the
    /// clusters on disk), or all.
    #[arg(long, value_enum, default_value_t = Rows::Memory)]
    durability: Rows,
    /// Only these scenarios (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    scenarios: Vec<Scenario>,
    /// Print the tables and draw the chart of an earlier run's JSON,
    /// instead of running.
    #[arg(long)]
    from_json: Option<PathBuf>,
    /// Where to write the raw JSON (default: target/bench/results-<mode>.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where to write the SVG chart (default: docs/bench.svg for a full run
    /// of every system in memory, else target/bench/bench.svg).
    #[arg(long)]
    svg: Option<PathBuf>,
}

/// Which rows `--durability` picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Rows {
    /// Every system in memory.
    Memory,
    /// The systems that write to disk before, or soon after, they reply.
    Durable,
    /// Both.
    All,
}

/// One row of the comparison: a system (its name for `--only`) and what
/// its acknowledgement promises.
#[derive(Debug, Clone, Copy)]
struct Row {
    system: &'static str,
    durability: Durability,
}

/// Every row, in table order: in memory, then fsync before each reply, then
/// fsync on a timer; single servers, then the replicated ones. Durable
/// deadbolt is measured over WebSocket only: the log is behind the engine,
/// the same for both frontends.
const ROWS: [Row; 20] = [
    Row::new("limit", Durability::Memory),
    Row::new("deadbolt-ws", Durability::Memory),
    Row::new("deadbolt-quic", Durability::Memory),
    Row::new("redis", Durability::Memory),
    Row::new("redis-1ms", Durability::Memory),
    Row::new("memcached", Durability::Memory),
    Row::new("postgres", Durability::Memory),
    Row::new("etcd", Durability::Memory),
    Row::new("deadbolt-3", Durability::Memory),
    Row::new("deadbolt-3-leader", Durability::Memory),
    Row::new("etcd-3", Durability::Memory),
    Row::new("etcd-3-leader", Durability::Memory),
    Row::new("deadbolt-ws", Durability::Always),
    Row::new("redis", Durability::Always),
    Row::new("postgres", Durability::Always),
    Row::new("etcd", Durability::Always),
    Row::new("deadbolt-3", Durability::Always),
    Row::new("etcd-3", Durability::Always),
    Row::new("deadbolt-ws", Durability::Periodic { every_ms: 10 }),
    Row::new("redis", Durability::Periodic { every_ms: 1000 }),
];

/// The measurements, to say which a row runs (and for `--scenarios`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// 1: uncontended lock+unlock cycles, one request in flight.
    Cycles,
    /// 1b: the same with 16 requests in flight per connection.
    Pipelined,
    /// 2: contended hand-off.
    Handoff,
    /// 3: distinct inserts.
    Distinct,
    /// 4: memory per entry.
    Memory,
    /// 5: expiry storm.
    Storm,
}

impl Scenario {
    const ALL: [Scenario; 6] = [
        Scenario::Cycles,
        Scenario::Pipelined,
        Scenario::Handoff,
        Scenario::Distinct,
        Scenario::Memory,
        Scenario::Storm,
    ];

    /// As the tables name it.
    fn label(self) -> &'static str {
        match self {
            Scenario::Cycles => "lock+unlock cycles",
            Scenario::Pipelined => "pipelined cycles",
            Scenario::Handoff => "hand-off",
            Scenario::Distinct => "distinct insert",
            Scenario::Memory => "memory per entry",
            Scenario::Storm => "expiry storm",
        }
    }
}

/// Why etcd has no expiry storm.
const ETCD_STORM: &str = "an etcd lease belongs to a session (one per connection here), not to \
    a lock: a lease per lock costs two raft writes per lock, more than the rates above allow \
    for 100,000 locks within the storm's 6 s lease, and etcd revokes at most 1,000 expired \
    leases a second (its lessor's leaseRevokeRate)";

/// Why the limit row runs only the cycles.
const LIMIT_ONLY_CYCLES: &str = "the limit server keeps no state: it grants every lock";

impl Row {
    const fn new(system: &'static str, durability: Durability) -> Row {
        Row { system, durability }
    }

    /// Whether this row runs `scenario`.
    fn runs(self, scenario: Scenario) -> bool {
        self.skips(scenario).is_none()
    }

    /// Why this row does not run `scenario`, if it does not.
    fn skips(self, scenario: Scenario) -> Option<&'static str> {
        let durable = self.durability != Durability::Memory;
        let replicated = self.system.starts_with("etcd-3") || self.system.starts_with("deadbolt-3");
        match (self.system, scenario) {
            ("limit", Scenario::Cycles | Scenario::Pipelined) => None,
            ("limit", _) => Some(LIMIT_ONLY_CYCLES),
            (
                "redis-1ms",
                Scenario::Cycles | Scenario::Pipelined | Scenario::Distinct | Scenario::Memory,
            ) => Some("polling every millisecond only changes how waiters wait"),
            ("postgres", s) if durable && s != Scenario::Distinct => Some(
                "advisory locks are never logged: the lock rows would repeat the in-memory ones",
            ),
            (_, Scenario::Memory) if durable => Some(
                "durability does not change resident memory (`deadbolt-bench restart` measures \
                 the disk)",
            ),
            (_, Scenario::Memory) if replicated => {
                Some("every node keeps a whole copy: the one-node row measures it")
            }
            (system, Scenario::Pipelined) if system.starts_with("etcd") => {
                Some("its JSON gateway speaks HTTP/1.1, one request at a time per connection")
            }
            ("memcached" | "postgres", Scenario::Pipelined) => {
                Some("the harness's client for it runs one request at a time")
            }
            (system, Scenario::Storm) if system.starts_with("etcd") => Some(ETCD_STORM),
            (system, Scenario::Storm) if system.ends_with("-leader") => {
                Some("the row with clients on every node measures it")
            }
            _ => None,
        }
    }

    /// Whether `rows` picks this row.
    fn picked(self, rows: Rows) -> bool {
        match rows {
            Rows::Memory => self.durability == Durability::Memory,
            Rows::Durable => self.durability != Durability::Memory,
            Rows::All => true,
        }
    }
}

impl std::fmt::Display for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.system, self.durability)
    }
}

const CONNECTIONS: [usize; 3] = [1, 16, 64];
/// Connections of the pipelined scenario, each with `scenarios::DEPTH`
/// requests in flight.
const PIPELINED_CONNECTIONS: [usize; 2] = [1, 16];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The limit server runs as `deadbolt serve` does: where it was started
    // (pinned to the server core), with tokio's default worker count.
    let harness_cores = match args.command {
        Some(Command::LimitServer(_)) => None,
        _ => procs::pin_harness(),
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(cores) = harness_cores {
        runtime.worker_threads(cores);
    }
    let runtime = runtime.build()?;
    match args.command {
        Some(Command::Transports(args)) => runtime.block_on(transports::run(args)),
        Some(Command::Loss(args)) => loss::run(args, &runtime),
        Some(Command::Restart(args)) => runtime.block_on(restart::run(args)),
        Some(Command::Abuse(args)) => runtime.block_on(abuse::run(args)),
        Some(Command::Shared(args)) => runtime.block_on(shared::run(args)),
        Some(Command::LimitServer(args)) => runtime.block_on(limit::serve(args)),
        None => runtime.block_on(compare(args.compare, harness_cores)),
    }
}

/// The rows to run, in table order, each a way to start a fresh instance.
fn wanted(only: &[String], rows: Rows) -> Vec<Row> {
    ROWS.into_iter()
        .filter(|row| row.picked(rows))
        .filter(|row| only.is_empty() || only.iter().any(|o| row.system.starts_with(o.as_str())))
        .collect()
}

async fn start(row: Row) -> anyhow::Result<Box<dyn System>> {
    let needs = match row.system {
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
    let durability = row.durability;
    Ok(match row.system {
        "limit" => Box::new(limit::LimitServer::start().await?),
        "deadbolt-ws" => Box::new(Deadbolt::start(Frontend::Ws, durability).await?),
        "deadbolt-quic" => Box::new(Deadbolt::start(Frontend::Quic, durability).await?),
        "deadbolt-3" => Box::new(DeadboltCluster::start(Clients::All, durability).await?),
        "deadbolt-3-leader" => Box::new(DeadboltCluster::start(Clients::Leader, durability).await?),
        "etcd" => Box::new(Etcd::start(1, Clients::All, durability).await?),
        "etcd-3" => Box::new(Etcd::start(3, Clients::All, durability).await?),
        "etcd-3-leader" => Box::new(Etcd::start(3, Clients::Leader, durability).await?),
        "redis" => Box::new(Redis::start(Duration::ZERO, durability).await?),
        "redis-1ms" => Box::new(Redis::start(Duration::from_millis(1), durability).await?),
        // memcached keeps nothing: it has no durable row.
        "memcached" => Box::new(Memcached::start().await?),
        _ => Box::new(Postgres::start(durability).await?),
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
    let scenarios = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenarios.clone()
    };
    for row in wanted(&args.only, args.durability) {
        eprintln!("== {row}");
        match measure(row, &scenarios, size).await {
            Ok(system) => run.systems.push(system),
            Err(error) if error.is::<NoDurability>() || error.is::<Skipped>() => {
                eprintln!("{row}: skipped: {error}");
            }
            Err(error) => eprintln!("{row}: could not start: {error:#}"),
        }
    }
    println!("{}", report::tables(&run));
    let json = args
        .json
        .unwrap_or_else(|| PathBuf::from(format!("target/bench/results-{mode}.json")));
    report::write_json(&run, &json)?;
    // Only a full run of every system in memory replaces the published
    // chart.
    let published = !args.quick
        && args.only.is_empty()
        && args.scenarios.is_empty()
        && args.durability == Rows::Memory;
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

/// The scenarios a row runs: 1 to 3 on one instance, 4 and 5 each on a
/// fresh one, so that earlier state does not blur the numbers.
async fn measure(row: Row, scenarios: &[Scenario], size: Size) -> anyhow::Result<SystemRun> {
    let runs = |s: Scenario| row.runs(s) && scenarios.contains(&s);
    let system = start(row).await?;
    let mut run = SystemRun {
        name: system.name(),
        tier: system.tier(),
        durability: row.durability,
        nodes: system.nodes(),
        not_run: Scenario::ALL
            .into_iter()
            .filter_map(|s| Some(format!("{}: {}", s.label(), row.skips(s)?)))
            .collect(),
        cycles: Vec::new(),
        pipelined: Vec::new(),
        contended: Vec::new(),
        distinct: Vec::new(),
        memory: None,
        storm: None,
        errors: Vec::new(),
    };
    let mut errors = Vec::new();
    if runs(Scenario::Cycles) {
        for connections in CONNECTIONS {
            match scenarios::cycles(system.as_ref(), connections, size).await {
                Ok(measured) => run.cycles.push(measured),
                Err(e) => errors.push(format!("cycles with {connections} connections: {e:#}")),
            }
        }
    }
    if runs(Scenario::Pipelined) {
        for connections in PIPELINED_CONNECTIONS {
            match scenarios::pipelined(system.as_ref(), connections, size).await {
                Ok(Some(measured)) => run.pipelined.push(measured),
                Ok(None) => {}
                Err(e) => errors.push(format!("pipelined, {connections} connections: {e:#}")),
            }
        }
    }
    if runs(Scenario::Handoff) {
        for contention in Contention::ALL {
            match scenarios::contended(system.as_ref(), contention, size).await {
                Ok(measured) => run.contended.push(measured),
                Err(e) => errors.push(format!("hand-off, {}: {e:#}", contention.label())),
            }
        }
    }
    if runs(Scenario::Distinct) {
        for (mode, batch, connections) in [("single", 1, 16), ("batched", 1000, 4)] {
            match scenarios::distinct(system.as_ref(), mode, batch, connections, size).await {
                Ok(measured) => run.distinct.push(measured),
                Err(e) => errors.push(format!("distinct {mode}: {e:#}")),
            }
        }
    }
    drop(system);
    if runs(Scenario::Memory) {
        let fresh = start(row).await?;
        match scenarios::memory(fresh.as_ref(), size).await {
            Ok(measured) => run.memory = Some(measured),
            Err(e) => errors.push(format!("memory: {e:#}")),
        }
    }
    if runs(Scenario::Storm) {
        let fresh = start(row).await?;
        if fresh.has_leases() {
            match scenarios::storm(fresh.as_ref(), size).await {
                Ok(measured) => run.storm = Some(measured),
                Err(e) => errors.push(format!("expiry storm: {e:#}")),
            }
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
    // The machine's, not what the pinned harness may use
    // (available_parallelism says 1 once the harness is pinned).
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|kb| kb.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{model}, {cores} cores, {memory_gib:.0} GiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(rows: &[Row]) -> Vec<String> {
        rows.iter().map(Row::to_string).collect()
    }

    #[test]
    fn the_default_run_is_every_system_in_memory() {
        let rows = wanted(&[], Rows::Memory);
        assert_eq!(
            names(&rows),
            [
                "limit (memory)",
                "deadbolt-ws (memory)",
                "deadbolt-quic (memory)",
                "redis (memory)",
                "redis-1ms (memory)",
                "memcached (memory)",
                "postgres (memory)",
                "etcd (memory)",
                "deadbolt-3 (memory)",
                "deadbolt-3-leader (memory)",
                "etcd-3 (memory)",
                "etcd-3-leader (memory)",
            ]
        );
    }

    #[test]
    fn only_etcd_picks_every_etcd_row_and_no_other() {
        assert_eq!(
            names(&wanted(&["etcd".to_owned()], Rows::All)),
            [
                "etcd (memory)",
                "etcd-3 (memory)",
                "etcd-3-leader (memory)",
                "etcd (always)",
                "etcd-3 (always)",
            ]
        );
    }

    #[test]
    fn every_scenario_a_row_leaves_out_says_why() {
        let etcd = Row::new("etcd", Durability::Memory);
        assert!(etcd.runs(Scenario::Cycles) && etcd.runs(Scenario::Memory));
        assert_eq!(etcd.skips(Scenario::Storm), Some(ETCD_STORM));
        let cluster = Row::new("deadbolt-3", Durability::Memory);
        assert!(cluster.runs(Scenario::Storm));
        assert!(cluster.skips(Scenario::Memory).is_some());
        let leader = Row::new("deadbolt-3-leader", Durability::Memory);
        assert!(leader.runs(Scenario::Handoff) && leader.skips(Scenario::Storm).is_some());
    }

    #[test]
    fn durable_rows_are_asked_for_and_filtered_by_only() {
        let only = ["redis".to_owned(), "postgres".to_owned()];
        assert_eq!(
            names(&wanted(&only, Rows::Durable)),
            ["redis (always)", "postgres (always)", "redis (every=1s)"]
        );
        assert_eq!(wanted(&[], Rows::All).len(), ROWS.len());
    }

    #[test]
    fn durable_postgres_runs_only_the_set() {
        let durable = Row::new("postgres", Durability::Always);
        assert!(durable.runs(Scenario::Distinct));
        assert!(!durable.runs(Scenario::Cycles));
        assert!(Row::new("postgres", Durability::Memory).runs(Scenario::Cycles));
        assert!(!Row::new("redis", Durability::Always).runs(Scenario::Memory));
    }
}
