//! Many seeds, and the table of what they did.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::history::What;
use crate::scenario::SERVER_CRASH;
use crate::world::{Options, Report};

/// The command line that replays `seed` as `options` say (a cluster, a
/// bug planted) and prints its readable trace.
pub fn replay_command(seed: u64, options: Options) -> String {
    let features = match options.bug {
        Some(bug) if bug.needs_feature() => " --features planted-bugs",
        _ => "",
    };
    let bug = options
        .bug
        .map(|b| format!(" --bug {}", b.name()))
        .unwrap_or_default();
    let cluster = match (options.cluster, options.disk_loss) {
        (true, true) => " --cluster --disk-loss",
        (true, false) => " --cluster",
        (false, _) => "",
    };
    format!("cargo run --release -p deadbolt-sim{features} -- --seed {seed}{cluster}{bug} --trace")
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
    /// The server's storage, over all seeds of the single server.
    pub storage: StorageTotals,
    /// The clusters, over all cluster seeds.
    pub cluster: ClusterTotals,
}

/// What the clusters went through, over many seeds: per line, the seeds in
/// which it happened and how often in all.
#[derive(Debug, Default)]
pub struct ClusterTotals {
    /// Cluster seeds run.
    pub seeds: usize,
    /// Nodes that started to lead (the first election included).
    pub leaders: (usize, usize),
    /// Node crashes (each followed by a restart).
    pub crashes: (usize, usize),
    /// Of which in the middle of a sync of the node's disk.
    pub crashes_mid_sync: (usize, usize),
    /// Of which lost the node's disk.
    pub disks_lost: (usize, usize),
    /// Requests answered `unavailable` (no quorum, no leader, a leader
    /// change), as the workers heard them.
    pub unavailable: (usize, usize),
    /// Attempts that proved a lease still ran (an unlock, extend or
    /// re-lock answered `ok`), each judged by the lease rule.
    pub lease_proofs: (usize, usize),
    /// Raft snapshots written by the nodes.
    pub snapshots: (usize, usize),
    /// Torn tails of a node's Raft log cut by its recovery.
    pub torn_tails_cut: (usize, usize),
}

impl ClusterTotals {
    fn add(&mut self, report: &Report) {
        self.seeds += 1;
        let count = |line: &mut (usize, usize), n: usize| {
            line.0 += usize::from(n > 0);
            line.1 += n;
        };
        let events =
            |what: &dyn Fn(&What) -> bool| report.events.iter().filter(|e| what(&e.what)).count();
        count(
            &mut self.leaders,
            events(&|w| matches!(w, What::Leading { .. })),
        );
        count(
            &mut self.crashes,
            events(&|w| matches!(w, What::NodeCrashed { .. })),
        );
        let mid_sync = events(&|w| matches!(w, What::NodeCrashed { mid_sync: true, .. }));
        count(&mut self.crashes_mid_sync, mid_sync);
        let lost = events(&|w| {
            matches!(
                w,
                What::NodeCrashed {
                    disk_lost: true,
                    ..
                }
            )
        });
        count(&mut self.disks_lost, lost);
        count(&mut self.unavailable, report.refusals);
        let proofs = events(&|w| {
            matches!(
                w,
                What::Answered {
                    op: "unlock" | "extend",
                    refused: None,
                    ..
                }
            )
        });
        count(&mut self.lease_proofs, proofs);
        count(&mut self.snapshots, report.disk.snapshots);
        count(&mut self.torn_tails_cut, report.disk.torn_tails_cut);
    }

    fn table(&self, out: &mut String) {
        if self.seeds == 0 {
            return;
        }
        let _ = writeln!(out, "\n| cluster | seeds | count |\n|---|---:|---:|");
        let lines = [
            ("nodes that started to lead", self.leaders),
            ("node crashes (restarted)", self.crashes),
            (
                "... of which in the middle of a sync",
                self.crashes_mid_sync,
            ),
            ("... of which lost the disk", self.disks_lost),
            ("requests answered `unavailable`", self.unavailable),
            (
                "unlocks and extends judged by the lease rule",
                self.lease_proofs,
            ),
            ("raft snapshots written", self.snapshots),
            ("torn raft log tails cut", self.torn_tails_cut),
        ];
        for (what, (seeds, count)) in lines {
            let _ = writeln!(out, "| {what} | {seeds} | {count} |");
        }
    }
}

/// What the server's storage went through, over many seeds: per line, the
/// seeds in which it happened and how often in all.
#[derive(Debug, Default)]
pub struct StorageTotals {
    /// Server crashes (each followed by a recovery).
    pub crashes: (usize, usize),
    /// Of which in the middle of a sync of the log.
    pub crashes_mid_sync: (usize, usize),
    /// Requests refused `unavailable` because the disk was full, as the
    /// workers heard them.
    pub refusals: (usize, usize),
    /// Log appends the full disk refused.
    pub full_refusals: (usize, usize),
    /// Snapshots written.
    pub snapshots: (usize, usize),
    /// Log segments deleted after snapshots.
    pub segments_deleted: (usize, usize),
    /// Torn log tails cut off by a recovery.
    pub torn_tails_cut: (usize, usize),
    /// Records a recovery found whole though never acknowledged.
    pub unacknowledged_kept: (usize, usize),
    /// KiB appended to the log.
    pub log_kib: (usize, usize),
}

impl StorageTotals {
    fn add(&mut self, report: &Report) {
        let count = |line: &mut (usize, usize), n: usize| {
            line.0 += usize::from(n > 0);
            line.1 += n;
        };
        let crashes = report.faults.get(SERVER_CRASH);
        count(&mut self.crashes, crashes.copied().unwrap_or(0));
        let mid_sync = report
            .events
            .iter()
            .filter(|e| matches!(e.what, What::ServerCrashed { mid_sync: true }))
            .count();
        count(&mut self.crashes_mid_sync, mid_sync);
        count(&mut self.refusals, report.refusals);
        count(&mut self.full_refusals, report.disk.full_refusals);
        count(&mut self.snapshots, report.disk.snapshots);
        count(&mut self.segments_deleted, report.disk.segments_deleted);
        count(&mut self.torn_tails_cut, report.disk.torn_tails_cut);
        count(&mut self.unacknowledged_kept, report.unacknowledged_kept);
        count(&mut self.log_kib, (report.disk.log_bytes >> 10) as usize);
    }

    fn table(&self, out: &mut String) {
        let _ = writeln!(out, "\n| storage | seeds | count |\n|---|---:|---:|");
        let lines = [
            ("server crashes (recovered)", self.crashes),
            (
                "... of which in the middle of a sync",
                self.crashes_mid_sync,
            ),
            ("requests refused `unavailable`", self.refusals),
            ("log appends refused (disk full)", self.full_refusals),
            ("snapshots written", self.snapshots),
            ("log segments deleted", self.segments_deleted),
            ("torn log tails cut", self.torn_tails_cut),
            ("unacknowledged records recovered", self.unacknowledged_kept),
            ("KiB of log written", self.log_kib),
        ];
        for (what, (seeds, count)) in lines {
            let _ = writeln!(out, "| {what} | {seeds} | {count} |");
        }
    }
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
        if report.scenario.cluster.is_some() {
            self.cluster.add(report);
        } else {
            self.storage.add(report);
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
        if self.cluster.seeds < self.seeds {
            self.storage.table(&mut out);
        }
        self.cluster.table(&mut out);
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
