//! The simulation as a test: many seeds keep every rule, a seed repeats
//! exactly, and every planted bug is caught.

use deadbolt_sim::summary::{Summary, replay_command};
use deadbolt_sim::{Bug, Options, Report, run};

/// Seeds per `cargo test` (at least 200), or `DEADBOLT_SIM_SEEDS`.
fn seed_count() -> u64 {
    std::env::var("DEADBOLT_SIM_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200)
}

/// Runs `seeds` on two threads (each simulation is single-threaded and
/// independent), returning the reports in seed order.
fn run_all(seeds: std::ops::Range<u64>, options: Options) -> Vec<Report> {
    let all: Vec<u64> = seeds.collect();
    let halves: Vec<Vec<u64>> = vec![
        all.iter().copied().step_by(2).collect(),
        all.iter().copied().skip(1).step_by(2).collect(),
    ];
    let mut reports: Vec<Report> = std::thread::scope(|scope| {
        let handles: Vec<_> = halves
            .into_iter()
            .map(|seeds| {
                scope.spawn(move || {
                    seeds
                        .into_iter()
                        .map(|seed| run(seed, options))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a simulation thread panicked"))
            .collect()
    });
    reports.sort_by_key(|r| r.seed);
    reports
}

#[test]
fn every_seed_keeps_every_rule_through_every_fault() {
    let reports = run_all(0..seed_count(), Options::default());
    let mut summary = Summary::default();
    let mut failures = Vec::new();
    for report in &reports {
        summary.add(report);
        for violation in &report.violations {
            failures.push(format!(
                "seed {}: {violation:?}\n  replay: {}",
                report.seed,
                replay_command(report.seed, None)
            ));
        }
    }
    println!("{}", summary.table());
    assert!(
        summary.faults.values().sum::<usize>() > summary.seeds,
        "faults were injected"
    );
    assert!(
        failures.is_empty(),
        "{} violations:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_same_seed_gives_a_byte_identical_trace() {
    for seed in [3, 17, 42] {
        let (first, second) = (run(seed, Options::default()), run(seed, Options::default()));
        assert_eq!(
            first.trace_hash,
            second.trace_hash,
            "seed {seed} ran differently twice\n  replay: {}",
            replay_command(seed, None)
        );
        assert_eq!(first.events, second.events);
        assert!(first.operations > 20, "seed {seed} did work");
    }
    assert_ne!(
        run(1, Options::default()).trace_hash,
        run(2, Options::default()).trace_hash
    );
}

/// Planted bugs are caught within this many seeds.
const DETECTION_SEEDS: u64 = 5;

fn caught_within(bug: Bug, kinds: &[&str]) {
    let reports = run_all(0..DETECTION_SEEDS, Options { bug: Some(bug) });
    let caught: Vec<_> = reports
        .iter()
        .filter(|r| r.violations.iter().any(|v| kinds.contains(&v.kind())))
        .collect();
    for report in &caught {
        println!(
            "{bug:?} caught in seed {}: {:?}\n  replay: {}",
            report.seed,
            report.violations[0],
            replay_command(report.seed, Some(bug))
        );
    }
    assert!(
        !caught.is_empty(),
        "{bug:?} was not caught as {kinds:?} in {DETECTION_SEEDS} seeds"
    );
}

#[test]
fn a_second_grant_to_a_waiter_while_the_first_holds_is_caught() {
    caught_within(Bug::DoubleGrant, &["mutual exclusion"]);
}

#[test]
fn a_repeated_or_lower_token_is_caught() {
    caught_within(Bug::LowerToken, &["token order", "token reused"]);
}

#[test]
fn first_told_to_two_inserters_is_caught() {
    caught_within(Bug::DoubleFirst, &["double first"]);
}

#[test]
fn a_lease_that_runs_past_its_deadline_is_caught() {
    caught_within(Bug::StretchLease, &["mutual exclusion"]);
}

#[test]
fn a_dropped_acknowledged_insert_is_caught() {
    caught_within(Bug::DropInsert, &["acked insert lost"]);
}
