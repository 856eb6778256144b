//! `deadbolt-bench restart`: a durable deadbolt holding a million set
//! members. How long it takes to answer again after a SIGTERM and after a
//! SIGKILL, and how its data directory compares with the live state.
//!
//! Each stop gets a fresh data directory: load the members (insert batches
//! over a few connections, every reply acknowledged), stop the server,
//! start it again on the same directory and time from the spawn until it
//! answers `inspect_set`, whose size must still be every member.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use deadbolt_core::proto::ErrorCode;
use nix::sys::signal::Signal;
use serde::Serialize;
use tokio::time::Instant;

use crate::procs::{self, Scratch};
use crate::systems::deadbolt::{Deadbolt, Frontend, NoDurability};
use crate::systems::{Durability, System};

/// Restart time and data directory size of a durable deadbolt.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Set members to load before each stop.
    #[arg(long, default_value_t = 1_000_000)]
    members: usize,
    /// Keys per insert request.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Connections loading at once.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// The durability settings to measure, as `deadbolt serve --fsync`
    /// spells them.
    #[arg(long, value_delimiter = ',', default_value = "always,every=10ms")]
    fsync: Vec<Durability>,
    /// Longest a load, a stop or a restart may take.
    #[arg(long, default_value = "5min", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Where to write the raw JSON.
    #[arg(long, default_value = "target/bench/restart.json")]
    json: PathBuf,
}

/// The set every member goes into.
const SET: &str = "restart";

/// What a member holds beyond its key, in the live state: its end offset in
/// the set's packed keys and the slot of its first inserter, 4 bytes each,
/// as the engine's sets keep them. Its index is its position, and the hash
/// table over the keys is rebuilt from them, so neither needs the disk.
const MEMBER_OVERHEAD_BYTES: u64 = 8;

/// The sizes, for one durability setting.
#[derive(Debug, Serialize)]
struct Sizes {
    fsync: String,
    members: usize,
    /// The members' keys, end to end.
    key_bytes: u64,
    /// `key_bytes` + [`MEMBER_OVERHEAD_BYTES`] per member.
    live_bytes: u64,
    /// Acknowledged inserts per second while loading.
    load_inserts_per_second: f64,
    /// The data directory with the server running, after the last reply.
    after_load_bytes: u64,
    /// After a SIGTERM.
    after_sigterm_bytes: u64,
    /// After a SIGKILL (loaded afresh).
    after_sigkill_bytes: u64,
}

/// One stop and restart.
#[derive(Debug, Serialize)]
struct Restart {
    fsync: String,
    /// How the server was stopped.
    signal: String,
    /// Signal sent → process gone, ms.
    stop_ms: f64,
    /// Spawn → the server says it listens, ms.
    listening_ms: f64,
    /// Spawn → the first answer to `inspect_set`, ms.
    answered_ms: f64,
    /// The set's size in that answer.
    members_after: u64,
}

/// The whole run, as JSON.
#[derive(Debug, Serialize)]
struct Report {
    members: usize,
    batch: usize,
    connections: usize,
    member_overhead_bytes: u64,
    sizes: Vec<Sizes>,
    restarts: Vec<Restart>,
}

/// Measures every durability setting in `args`, or says it is skipped when
/// the server has no durability.
pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.fsync.contains(&Durability::Memory),
        "restart measures durable servers: --fsync always or every=DURATION"
    );
    anyhow::ensure!(
        args.batch > 0 && args.connections > 0,
        "batch and connections must be positive"
    );
    let mut report = Report {
        members: args.members,
        batch: args.batch,
        connections: args.connections,
        member_overhead_bytes: MEMBER_OVERHEAD_BYTES,
        sizes: Vec::new(),
        restarts: Vec::new(),
    };
    for &durability in &args.fsync {
        eprintln!("== --fsync {durability}");
        match measure(durability, &args).await {
            Ok((sizes, restarts)) => {
                report.sizes.push(sizes);
                report.restarts.extend(restarts);
            }
            Err(error) if error.is::<NoDurability>() => {
                println!("skipped: {error}");
                return Ok(());
            }
            Err(error) => eprintln!("--fsync {durability}: {error:#}"),
        }
    }
    println!("{}", tables(&report));
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    eprintln!("raw results: {}", args.json.display());
    Ok(())
}

/// One durability setting: a load stopped by SIGTERM, then another stopped
/// by SIGKILL, each restarted.
async fn measure(durability: Durability, args: &Args) -> anyhow::Result<(Sizes, Vec<Restart>)> {
    let keys = member_keys(args.members);
    let key_bytes: u64 = keys.iter().map(|k| k.len() as u64).sum();
    let fsync = durability.to_string();
    let mut restarts = Vec::new();

    let dir = Scratch::new("restart-sigterm")?;
    let (server, load_inserts_per_second, after_load_bytes) =
        load(durability, &dir, &keys, args).await?;
    let (restart, after_sigterm_bytes) =
        stop_and_restart(server, durability, &dir, Signal::SIGTERM, args).await?;
    restarts.push(restart);
    drop(dir);

    let dir = Scratch::new("restart-sigkill")?;
    let (server, _, _) = load(durability, &dir, &keys, args).await?;
    let (restart, after_sigkill_bytes) =
        stop_and_restart(server, durability, &dir, Signal::SIGKILL, args).await?;
    restarts.push(restart);

    let sizes = Sizes {
        fsync,
        members: args.members,
        key_bytes,
        live_bytes: key_bytes + MEMBER_OVERHEAD_BYTES * args.members as u64,
        load_inserts_per_second,
        after_load_bytes,
        after_sigterm_bytes,
        after_sigkill_bytes,
    };
    Ok((sizes, restarts))
}

/// Starts a server on `dir` and loads every key: the server, still
/// running, inserts per second and the directory's size after the last
/// reply.
async fn load(
    durability: Durability,
    dir: &Scratch,
    keys: &[String],
    args: &Args,
) -> anyhow::Result<(Deadbolt, f64, u64)> {
    let server = Deadbolt::start_on(Frontend::Ws, durability, dir.path()).await?;
    let began = Instant::now();
    tokio::time::timeout(args.timeout, insert_all(&server, keys, args))
        .await
        .context("loading took too long")??;
    let rate = keys.len() as f64 / began.elapsed().as_secs_f64();
    let size = members(&server).await?;
    anyhow::ensure!(
        size == keys.len() as u64,
        "loaded {} members, the set holds {size}",
        keys.len()
    );
    let bytes = procs::dir_bytes(dir.path())?;
    Ok((server, rate, bytes))
}

/// Stops `server` (running on `dir`) by `signal`, and starts another on
/// the same directory: the restart, and the directory's size in between.
async fn stop_and_restart(
    server: Deadbolt,
    durability: Durability,
    dir: &Scratch,
    signal: Signal,
    args: &Args,
) -> anyhow::Result<(Restart, u64)> {
    let stop = server.stop(signal, args.timeout).await?;
    let stopped_bytes = procs::dir_bytes(dir.path())?;
    let server = tokio::time::timeout(
        args.timeout,
        Deadbolt::start_on(Frontend::Ws, durability, dir.path()),
    )
    .await
    .context("the restart took too long")??;
    let listening = server.listening_at() - server.spawned_at();
    let members_after = tokio::time::timeout(args.timeout, first_answer(&server))
        .await
        .context("the restarted server did not answer")??;
    let answered = Instant::now() - server.spawned_at();
    server.stop(Signal::SIGTERM, args.timeout).await?;
    let restart = Restart {
        fsync: durability.to_string(),
        signal: signal.as_str().to_owned(),
        stop_ms: ms(stop),
        listening_ms: ms(listening),
        answered_ms: ms(answered),
        members_after,
    };
    Ok((restart, stopped_bytes))
}

/// Inserts `keys` into [`SET`] in batches over `args.connections`
/// connections; each must be new.
async fn insert_all(server: &Deadbolt, keys: &[String], args: &Args) -> anyhow::Result<()> {
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        conns.push(server.connect().await?);
    }
    conns[0].set_up(SET).await?;
    let loads = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| async move {
            // Connection i takes batches i, i + n, i + 2n, ...
            for batch in keys.chunks(args.batch).skip(i).step_by(args.connections) {
                let firsts = conn.insert(SET, batch).await?;
                anyhow::ensure!(firsts.iter().all(|&first| first), "a fresh key was not new");
            }
            anyhow::Ok(())
        });
    futures_util::future::try_join_all(loads).await?;
    Ok(())
}

/// The set's size, asked of a server that is up.
async fn members(server: &Deadbolt) -> anyhow::Result<u64> {
    let client = server.client().await?;
    Ok(client.set(SET).inspect().await?.size)
}

/// The set's size in the first answer of a server that may still be
/// recovering: errors other than a missing set mean "ask again".
async fn first_answer(server: &Deadbolt) -> anyhow::Result<u64> {
    loop {
        if let Ok(client) = server.client().await {
            match client.set(SET).inspect().await {
                Ok(info) => return Ok(info.size),
                Err(e) if e.code() == Some(ErrorCode::NoSuchSet) => return Ok(0),
                Err(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `n` distinct 16-byte keys.
fn member_keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("member/{i:09}")).collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The two tables.
fn tables(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} members of 16-byte keys in one set, loaded by {} connections in insert batches of {}.\n",
        report.members, report.connections, report.batch
    );
    let _ = writeln!(out, "### Data directory size\n");
    let _ = writeln!(
        out,
        "Live state: the keys plus {} bytes per member (its end offset in the set's packed keys \
         and its first inserter's slot, 4 bytes each; the index is its position, the hash table \
         is rebuilt). Data directory: the sum of its files' sizes.\n",
        report.member_overhead_bytes
    );
    let _ = writeln!(
        out,
        "| --fsync | members | load (inserts/s) | live state | data dir after load | after SIGTERM | after SIGKILL | after load ÷ live | after SIGTERM ÷ live |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &report.sizes {
        let ratio = |bytes: u64| format!("{:.2}×", bytes as f64 / s.live_bytes.max(1) as f64);
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            s.fsync,
            s.members,
            s.load_inserts_per_second,
            mib(s.live_bytes),
            mib(s.after_load_bytes),
            mib(s.after_sigterm_bytes),
            mib(s.after_sigkill_bytes),
            ratio(s.after_load_bytes),
            ratio(s.after_sigterm_bytes),
        );
    }
    let _ = writeln!(out, "\n### Restart on the same data directory\n");
    let _ = writeln!(
        out,
        "| --fsync | stopped by | stop took | spawn → listening | spawn → first answer | members after restart |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
    for r in &report.restarts {
        let kept = if r.members_after == report.members as u64 {
            format!("{} (all)", r.members_after)
        } else {
            format!("**{} of {}**", r.members_after, report.members)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {} |",
            r.fsync, r.signal, r.stop_ms, r.listening_ms, r.answered_ms, kept
        );
    }
    out
}
