//! Many seeds, and the table of what they did.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::proxy::Bug;
use crate::world::Report;

/// The command line that replays `seed` (with `bug` planted) and prints its
/// readable trace.
pub fn replay_command(seed: u64, bug: Option<Bug>) -> String {
    let features = match bug {
        Some(bug) if bug.planted().is_some() => " --features planted-bugs",
        _ => "",
    };
    let bug = bug
        .map(|b| format!(" --bug {}", b.name()))
        .unwrap_or_default();
    format!("cargo run --release -p deadbolt-sim{features} -- --seed {seed}{bug} --trace")
}

/// Totals over runs.
#[derive(Debug, Default)]
pub struct Summary {
    /// Seeds run.
    pub seeds: usize,
    /// Operations invoked by workers.
    pub operations: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    /// Violations found, by kind.
    pub violations: BTreeMap<&'static str, usize>,
    /// Seeds with at least one violation, with their first violation.
    pub failing: Vec<(u64, String)>,
}

impl Summary {
    /// Adds one run.
    pub fn add(&mut self, report: &Report) {
        self.seeds += 1;
        self.operations += report.operations;
        for (kind, count) in &report.faults {
            *self.faults.entry(kind).or_insert(0) += count;
        }
        for violation in &report.violations {
            *self.violations.entry(violation.kind()).or_insert(0) += 1;
        }
        if let Some(first) = report.violations.first() {
            self.failing.push((report.seed, format!("{first:?}")));
        }
    }

    /// The summary as markdown tables.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "| seeds run | operations | seeds with violations |");
        let _ = writeln!(out, "|---:|---:|---:|");
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            self.seeds,
            self.operations,
            self.failing.len()
        );
        let _ = writeln!(out, "\n| fault injected | count |\n|---|---:|");
        for (kind, count) in &self.faults {
            let _ = writeln!(out, "| {kind} | {count} |");
        }
        let _ = writeln!(out, "\n| violation | count |\n|---|---:|");
        if self.violations.is_empty() {
            let _ = writeln!(out, "| (none) | 0 |");
        }
        for (kind, count) in &self.violations {
            let _ = writeln!(out, "| {kind} | {count} |");
        }
        out
    }
}
