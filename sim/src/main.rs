//! `deadbolt-sim`: runs simulation seeds and prints what they did.
//!
//! - `deadbolt-sim --seeds 10000` runs seeds 0..10000 and prints a summary:
//!   seeds, operations, faults by kind, violations by kind (the default
//!   count comes from `DEADBOLT_SIM_SEEDS`, else 100);
//! - `deadbolt-sim --seed 17 --trace` replays one seed with a readable trace;
//! - `--cluster` runs three nodes of a cluster instead of the single server;
//! - `--bug NAME` plants a bug and reports how many seeds caught it.

use std::process::ExitCode;

use clap::Parser;
use deadbolt_sim::summary::{Summary, replay_command};
use deadbolt_sim::{Bug, Options, run};

/// Runs deadbolt's deterministic simulation.
#[derive(Debug, Parser)]
struct Args {
    /// How many seeds to run (default: DEADBOLT_SIM_SEEDS, else 100).
    #[arg(long, env = "DEADBOLT_SIM_SEEDS", default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Run only this seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Print the seed's whole history.
    #[arg(long)]
    trace: bool,
    /// Plant a bug: in the proxy double-grant, lower-token, double-first,
    /// stretch-lease, drop-insert; in the state machine (build with
    /// `--features planted-bugs`) grant-out-of-order, lease-from-request,
    /// deaf-wakeup, relock-keeps-lease, early-timeout,
    /// ephemeral-outlives-connection, restart-keeps-ephemeral,
    /// set-renewal-ignored, cancel-ignored, extend-refused, busy-uncounted,
    /// shared-beside-exclusive, semaphore-over-limit, lock-delay-ignored, set-overfilled, unheard-grant-kept; in the storage
    /// (the same feature) ack-before-sync, forget-last-batch,
    /// snapshot-covers-group; in a cluster's replication (the same feature,
    /// with `--cluster`) follower-grants-locally, ack-before-commit; in the
    /// pushed events (the same feature) lost-on-own-unlock,
    /// lost-at-warning, watch-out-of-order.
    #[arg(long, value_parser = parse_bug)]
    bug: Option<Bug>,
    /// Run a cluster of three nodes instead of the single server.
    #[arg(long)]
    cluster: bool,
    /// With `--cluster`: let the schedule lose a node's disk (its data
    /// directory wiped before it restarts; its peers refuse it until the
    /// simulated operator readmits it). Off by default while readmission
    /// can make the leader's openraft panic (seed 18).
    #[arg(long, requires = "cluster")]
    disk_loss: bool,
}

fn parse_bug(name: &str) -> Result<Bug, String> {
    let bug = Bug::from_name(name).ok_or_else(|| format!("unknown bug {name:?}"))?;
    let compiled_in = match (bug.planted(), bug.storage(), bug.replica()) {
        (Some(_), _, _) => deadbolt_core::shard::planted::COMPILED_IN,
        (_, Some(_), _) => deadbolt_storage::planted::COMPILED_IN,
        (_, _, Some(_)) => deadbolt_core::engine::planted::COMPILED_IN,
        _ if bug.events().is_some() => deadbolt_core::engine::planted::COMPILED_IN,
        (None, None, None) => true,
    };
    if !compiled_in {
        return Err(format!(
            "{name} is a bug of the state machine, the storage, the replication or the events: \
             run with `--features planted-bugs`"
        ));
    }
    Ok(bug)
}

fn main() -> ExitCode {
    let args = Args::parse();
    deadbolt_sim::world::say_seed_on_panic();
    let options = Options {
        bug: args.bug,
        cluster: args.cluster,
        disk_loss: args.disk_loss,
        // A replayed seed's trace is printed as it happens, so that a run
        // that panics still shows what led to it.
        echo: args.trace && args.seed.is_some(),
    };
    if let Some(seed) = args.seed {
        return replay(seed, options, args.trace);
    }
    let mut summary = Summary::default();
    for seed in args.start..args.start + args.seeds {
        let report = run(seed, options);
        if !report.violations.is_empty() && args.bug.is_none() {
            eprintln!(
                "seed {seed}: {:?}\n  replay: {}",
                report.violations[0],
                replay_command(
                    seed,
                    Options {
                        bug: None,
                        ..options
                    }
                )
            );
        }
        summary.add(&report);
    }
    println!("{}", summary.table());
    match args.bug {
        Some(bug) => {
            println!(
                "planted bug {}: caught in {} of {} seeds",
                bug.name(),
                summary.failing.len(),
                summary.seeds
            );
            ExitCode::SUCCESS
        }
        None if summary.failing.is_empty() => ExitCode::SUCCESS,
        None => ExitCode::FAILURE,
    }
}

fn replay(seed: u64, options: Options, trace: bool) -> ExitCode {
    let report = run(seed, options);
    if trace {
        println!();
        for (worker, plan) in report.scenario.workers.iter().enumerate() {
            println!("worker{worker}: {plan:?}");
        }
    }
    println!(
        "seed {seed}: {} operations, trace hash {:016x}",
        report.operations, report.trace_hash
    );
    println!("faults: {:?}", report.faults);
    let transports: Vec<_> = report
        .scenario
        .workers
        .iter()
        .map(|w| w.transport)
        .collect();
    println!(
        "workers: {transports:?}; shards: {}; set ttl: {} ms; disk: {:?}",
        report.scenario.shards, report.scenario.set_ttl_ms, report.scenario.disk
    );
    match &report.scenario.cluster {
        Some(plan) => println!(
            "node faults: {:?}; snapshot every {} entries",
            plan.faults, plan.snapshot_every
        ),
        None => println!("server faults: {:?}", report.scenario.server_faults),
    }
    if report.violations.is_empty() {
        println!("no violations");
        return ExitCode::SUCCESS;
    }
    for violation in &report.violations {
        println!("VIOLATION {}: {violation:?}", violation.kind());
    }
    println!("replay: {}", replay_command(seed, options));
    ExitCode::FAILURE
}
