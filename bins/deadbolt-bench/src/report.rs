//! The results: markdown tables with deadbolt's ratio to each peer at the
//! same durability, the raw JSON, and an SVG chart of scenarios 1 and 2.

use std::fmt::Write;
use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::scenarios::{Contended, Contention, Cycles, Distinct, Memory, Pipelined, Size, Storm};
use crate::systems::Durability;

/// Everything one system did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SystemRun {
    /// Its name.
    pub name: String,
    /// Its storage tier.
    pub tier: String,
    /// What its acknowledgements promise (runs from before durable rows
    /// were all in memory).
    #[serde(default)]
    pub durability: Durability,
    /// Server processes holding a copy of the data (runs from before the
    /// replicated rows had one).
    #[serde(default = "one")]
    pub nodes: usize,
    /// The scenarios this row leaves out, each with why.
    #[serde(default)]
    pub not_run: Vec<String>,
    /// Scenario 1.
    pub cycles: Vec<Cycles>,
    /// Scenario 1, pipelined (runs from before it have none).
    #[serde(default)]
    pub pipelined: Vec<Pipelined>,
    /// Scenario 2 (runs from before workers held and thought have none:
    /// their `handoff` rows are not read).
    #[serde(default)]
    pub contended: Vec<Contended>,
    /// Scenario 3.
    pub distinct: Vec<Distinct>,
    /// Scenario 4.
    pub memory: Option<Memory>,
    /// Scenario 5 (None: no leases).
    pub storm: Option<Storm>,
    /// What failed, if anything.
    pub errors: Vec<String>,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    /// `quick` or `full`.
    pub mode: String,
    /// Its sizes.
    pub size: Size,
    /// The machine.
    pub machine: String,
    /// How the harness and servers were placed.
    pub placement: String,
    /// Every system.
    pub systems: Vec<SystemRun>,
}

fn one() -> usize {
    1
}

/// The reference for `row`: deadbolt making the same kind of promise (a
/// durable peer is compared with durable deadbolt, never with deadbolt in
/// memory) with as many nodes: over WebSocket for one, the first (clients
/// on every node) of its rows for a cluster.
fn reference<'a>(run: &'a Run, row: &SystemRun) -> Option<&'a SystemRun> {
    run.systems.iter().find(|s| {
        let deadbolt = match s.nodes {
            1 => s.name.starts_with("deadbolt") && s.name.contains("WebSocket"),
            _ => s.name.starts_with("deadbolt"),
        };
        deadbolt && s.nodes == row.nodes && s.durability.same_promise(row.durability)
    })
}

fn ratio(ours: Option<f64>, theirs: f64) -> String {
    match ours {
        Some(ours) if theirs > 0.0 && ours > 0.0 => format!("{:.2}×", ours / theirs),
        _ => "–".to_owned(),
    }
}

fn us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1} ms", v as f64 / 1000.0)
    } else {
        format!("{v} µs")
    }
}

/// Markdown tables, one per scenario.
pub fn tables(run: &Run) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Machine: {}. {}. Mode: {}.\n",
        run.machine, run.placement, run.mode
    );
    let _ = writeln!(
        out,
        "Tiers: {}\n",
        run.systems
            .iter()
            .map(|s| format!("{}: {}", s.name, s.tier))
            .collect::<Vec<_>>()
            .join("; ")
    );
    if run
        .systems
        .iter()
        .any(|s| s.durability != Durability::Memory || s.nodes > 1)
    {
        let _ = writeln!(
            out,
            "Ratios compare each row with deadbolt over WebSocket at the same durability \
             (in memory; fsync before each reply; fsync on a timer, whatever its interval), \
             a replicated row with deadbolt with as many nodes; – where that row is missing.\n"
        );
    }

    targets(&mut out, run);
    cycles_table(&mut out, run);
    pipelined_table(&mut out, run);
    contended_table(&mut out, run);
    // A scenario no row ran (left out by `--scenarios`) has no table.
    if run.systems.iter().any(|s| !s.distinct.is_empty()) {
        distinct_table(&mut out, run);
    }
    if run.systems.iter().any(|s| s.memory.is_some()) {
        memory_table(&mut out, run);
    }
    if run.systems.iter().any(|s| s.storm.is_some()) {
        storm_table(&mut out, run);
    }
    for system in run.systems.iter().filter(|s| !s.not_run.is_empty()) {
        let _ = writeln!(
            out,
            "\nNot run for {}: {}.",
            system.name,
            system.not_run.join("; ")
        );
    }
    for system in run.systems.iter().filter(|s| !s.errors.is_empty()) {
        let _ = writeln!(
            out,
            "\nErrors from {}: {}",
            system.name,
            system.errors.join("; ")
        );
    }
    out
}

fn distinct_table(out: &mut String, run: &Run) {
    let _ = writeln!(out, "\n### 3. Distinct insert (half duplicates)\n");
    let _ = writeln!(
        out,
        "| system | mode | inserts | inserts/s | classified new | correct | deadbolt ÷ this (inserts/s) |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---|---:|");
    for system in &run.systems {
        let base = reference(run, system);
        for row in &system.distinct {
            let ours = base
                .and_then(|b| b.distinct.iter().find(|d| d.mode == row.mode))
                .map(|d| d.inserts_per_second);
            let correct = if row.correct {
                "yes".to_owned()
            } else {
                format!("**WRONG** (expected {})", row.distinct)
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {} | {} | {} |",
                system.name,
                row.mode,
                row.inserts,
                row.inserts_per_second,
                row.classified_new,
                correct,
                ratio(ours, row.inserts_per_second)
            );
        }
    }
}

fn memory_table(out: &mut String, run: &Run) {
    let _ = writeln!(
        out,
        "\n### 4. Memory per entry (server RSS growth; the system's own count where it has one)\n"
    );
    if run
        .systems
        .iter()
        .any(|s| s.durability != Durability::Memory)
    {
        let _ = writeln!(
            out,
            "Durable rows skip this: durability does not change resident memory \
             (`deadbolt-bench restart` measures the disk).\n"
        );
    }
    let _ = writeln!(
        out,
        "| system | entries | bytes/held lock | bytes/set member | own count bytes/lock | own count bytes/member | this ÷ deadbolt (bytes/member) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    let bytes = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.0}"));
    for system in &run.systems {
        let base_member = reference(run, system)
            .and_then(|b| b.memory.as_ref())
            .and_then(|m| m.per_member);
        if let Some(m) = &system.memory {
            let theirs = m.own_per_member.or(m.per_member);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                system.name,
                m.entries,
                bytes(m.per_lock),
                bytes(m.per_member),
                bytes(m.own_per_lock),
                bytes(m.own_per_member),
                theirs.map_or("–".to_owned(), |t| ratio(
                    Some(t),
                    base_member.unwrap_or(0.0)
                ))
            );
        }
    }
}

fn storm_table(out: &mut String, run: &Run) {
    let _ = writeln!(
        out,
        "\n### 5. Expiry storm (every lock with the same short lease, each with a waiter)\n"
    );
    let _ = writeln!(
        out,
        "| system | locks | lease | last lease end → all waiters granted | lag p50 | lag max | granted before the lease ended | this ÷ deadbolt (all granted) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for system in &run.systems {
        let base_storm = reference(run, system)
            .and_then(|b| b.storm.as_ref())
            .map(|s| s.last_deadline_to_all_granted_ms);
        match &system.storm {
            Some(s) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} ms | {:.1} ms | {:.1} ms | {:.1} ms | {} | {} |",
                    system.name,
                    s.locks,
                    s.lease_ms,
                    s.last_deadline_to_all_granted_ms,
                    s.lag_p50_ms,
                    s.lag_max_ms,
                    s.granted_early,
                    ratio(
                        Some(s.last_deadline_to_all_granted_ms),
                        base_storm.unwrap_or(0.0)
                    )
                );
            }
            None => {
                let skipped = system
                    .not_run
                    .iter()
                    .any(|why| why.starts_with("expiry storm"));
                let _ = writeln!(
                    out,
                    "| {} | – | – | {} | – | – | – | – |",
                    system.name,
                    if skipped {
                        "not run (below)"
                    } else {
                        "n/a (no leases)"
                    }
                );
            }
        }
    }
}

/// The in-memory row whose name starts with `prefix`.
fn row<'a>(run: &'a Run, prefix: &str) -> Option<&'a SystemRun> {
    run.systems
        .iter()
        .find(|s| s.name.starts_with(prefix) && s.durability == Durability::Memory && s.nodes == 1)
}

/// One target's line: what was measured against the goal, and whether it
/// is met (`None`: a row it needs is missing from the run).
fn target(out: &mut String, what: &str, value: Option<f64>, goal: &str, met: fn(f64) -> bool) {
    let (value, verdict) = match value {
        Some(v) => (
            format!("{v:.2}"),
            if met(v) { "met" } else { "**not met**" },
        ),
        None => ("–".to_owned(), "not measured in this run"),
    };
    let _ = writeln!(out, "| {what} | {value} | {goal} | {verdict} |");
}

/// The targets of issue 15, each computed from this run's rows.
fn targets(out: &mut String, run: &Run) {
    let deadbolt = row(run, "deadbolt (WebSocket)");
    let redis = row(run, "Redis 7 (poll 0 ms)");
    let polling = row(run, "Redis 7 (poll 1 ms)");
    let etcd = row(run, "etcd");
    let setting = Contention::ALL[0];
    let handoff = |s: Option<&SystemRun>| {
        s?.contended
            .iter()
            .find(|c| c.contention == setting && c.handoffs > 0)
            .cloned()
    };
    let cycles64 = |s: Option<&SystemRun>| s?.cycles.iter().find(|c| c.connections == 64).cloned();
    let piped16 = |s: Option<&SystemRun>| {
        s?.pipelined
            .iter()
            .find(|p| p.connections == 16)
            .map(|p| p.cycles_per_second)
    };
    let over = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let p50 = |s| handoff(s).map(|h| h.handoff_p50_us as f64);
    let _ = writeln!(out, "### Targets (this run)\n");
    let _ = writeln!(out, "| target | measured | goal | |");
    let _ = writeln!(out, "|---|---:|---|---|");
    let label = setting.label();
    target(
        out,
        &format!("hand-off p50, Redis polling 1 ms ÷ deadbolt ({label})"),
        over(p50(polling), p50(deadbolt)),
        "≥ 10",
        |v| v >= 10.0,
    );
    target(
        out,
        &format!("hand-off p50, etcd ÷ deadbolt ({label})"),
        over(p50(etcd), p50(deadbolt)),
        "≥ 5",
        |v| v >= 5.0,
    );
    let ours = handoff(deadbolt);
    target(
        out,
        "deadbolt wasted requests per acquisition",
        ours.as_ref().map(|h| h.wasted_per_acquisition),
        "0",
        |v| v == 0.0,
    );
    target(
        out,
        "deadbolt fairness (Jain)",
        ours.as_ref().map(|h| h.fairness),
        "1.0 (≥ 0.995)",
        |v| v >= 0.995,
    );
    let rate = |c: Option<Cycles>| c.map(|c| c.cycles_per_second);
    let cpu = |c: Option<Cycles>| c.map(|c| c.server_cpu_us_per_cycle);
    target(
        out,
        "cycles/s at 64 connections, deadbolt ÷ limit",
        over(rate(cycles64(deadbolt)), rate(cycles64(limit(run)))),
        "≥ 0.9",
        |v| v >= 0.9,
    );
    target(
        out,
        "server CPU µs/cycle at 64 connections, deadbolt ÷ Redis",
        over(cpu(cycles64(deadbolt)), cpu(cycles64(redis))),
        "≤ 0.8",
        |v| v <= 0.8,
    );
    target(
        out,
        "pipelined cycles/s (16 connections × 16), deadbolt ÷ Redis",
        over(piped16(deadbolt), piped16(redis)),
        "≥ 1.5",
        |v| v >= 1.5,
    );
    let _ = writeln!(out);
}

/// The limit row, if the run has one.
fn limit(run: &Run) -> Option<&SystemRun> {
    run.systems.iter().find(|s| s.name.starts_with("limit"))
}

fn cycles_table(out: &mut String, run: &Run) {
    let _ = writeln!(
        out,
        "### 1. Uncontended lock+unlock cycles (random keys of 1M, depth 1)\n"
    );
    let _ = writeln!(
        out,
        "| system | connections | cycles/s | p50 | p99 | p99.9 | server CPU µs/cycle | client CPU µs/cycle | deadbolt ÷ this (cycles/s) | this ÷ limit (cycles/s) | this ÷ limit (server CPU/cycle) |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let limit = limit(run);
    for system in &run.systems {
        let base = reference(run, system);
        for row in &system.cycles {
            let same = |s: &SystemRun| {
                s.cycles
                    .iter()
                    .find(|c| c.connections == row.connections)
                    .cloned()
            };
            let ours = base.and_then(same).map(|c| c.cycles_per_second);
            let limit = limit.and_then(same);
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {} | {} | {} | {:.1} | {:.1} | {} | {} | {} |",
                system.name,
                row.connections,
                row.cycles_per_second,
                us(row.p50_us),
                us(row.p99_us),
                us(row.p999_us),
                row.server_cpu_us_per_cycle,
                row.client_cpu_us_per_cycle,
                ratio(ours, row.cycles_per_second),
                ratio(
                    Some(row.cycles_per_second),
                    limit.as_ref().map_or(0.0, |l| l.cycles_per_second)
                ),
                ratio(
                    Some(row.server_cpu_us_per_cycle),
                    limit.as_ref().map_or(0.0, |l| l.server_cpu_us_per_cycle)
                ),
            );
        }
    }
}

fn pipelined_table(out: &mut String, run: &Run) {
    let _ = writeln!(
        out,
        "\n### 1b. Pipelined lock+unlock cycles ({} requests in flight per connection)\n",
        crate::scenarios::DEPTH
    );
    let _ = writeln!(
        out,
        "deadbolt: {} concurrent try-lock → unlock loops on one client (one connection); Redis: \
         pipelines of {} `SET NX PX` + compare-and-delete (`EVALSHA`) pairs.\n",
        crate::scenarios::DEPTH,
        crate::scenarios::DEPTH / 2
    );
    let _ = writeln!(
        out,
        "| system | connections | cycles/s | server CPU µs/cycle | client CPU µs/cycle | deadbolt ÷ this (cycles/s) | this ÷ limit (cycles/s) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    let limit = limit(run);
    for system in &run.systems {
        let base = reference(run, system);
        for row in &system.pipelined {
            let same = |s: &SystemRun| {
                s.pipelined
                    .iter()
                    .find(|p| p.connections == row.connections)
                    .map(|p| p.cycles_per_second)
            };
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.1} | {:.1} | {} | {} |",
                system.name,
                row.connections,
                row.cycles_per_second,
                row.server_cpu_us_per_cycle,
                row.client_cpu_us_per_cycle,
                ratio(base.and_then(same), row.cycles_per_second),
                ratio(
                    Some(row.cycles_per_second),
                    limit.and_then(same).unwrap_or(0.0)
                ),
            );
        }
    }
}

fn contended_table(out: &mut String, run: &Run) {
    let _ = writeln!(
        out,
        "\n### 2. Contended hand-off (one key; each worker loops lock → hold → unlock → think)\n"
    );
    let _ = writeln!(
        out,
        "A hand-off is one worker's unlock (sent) to another worker's grant (received), \
         counted only when that worker asked before the unlock; a worker taking back the lock \
         it released, and a grant to one that asked while the lock was free, are counted \
         apart. Ideal/s is 1 ÷ the mean hold as measured (the harness pauses with a \
         thread's sleep, not tokio's 1 ms timer).\n"
    );
    let _ = writeln!(
        out,
        "| system | setting | hand-off p50 | p99 | p99.9 | hand-offs / took back / free | acquisitions/s | ideal/s | wait p99 | wait max | wasted requests/acquisition | fairness (Jain; min–max per worker) | this p50 ÷ deadbolt p50 |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for system in &run.systems {
        let base = reference(run, system);
        for row in &system.contended {
            let ours = base
                .and_then(|b| b.contended.iter().find(|c| c.contention == row.contention))
                .filter(|c| c.handoffs > 0)
                .map(|c| c.handoff_p50_us as f64);
            let theirs = row.handoff_p50_us as f64;
            let handoff = |v: u64| {
                if row.handoffs == 0 {
                    "–".to_owned()
                } else {
                    us(v)
                }
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} / {} / {} | {:.0} | {} | {} | {} | {:.2} | {:.3}; {}–{} | {} |",
                system.name,
                row.contention.label(),
                handoff(row.handoff_p50_us),
                handoff(row.handoff_p99_us),
                handoff(row.handoff_p999_us),
                row.handoffs,
                row.self_reacquisitions,
                row.free_acquisitions,
                row.acquisitions_per_second,
                row.ideal_per_second
                    .map_or("–".to_owned(), |i| format!("{i:.0}")),
                us(row.wait_p99_us),
                us(row.wait_max_us),
                row.wasted_per_acquisition,
                row.fairness,
                row.min_per_worker,
                row.max_per_worker,
                match ours {
                    Some(ours) if row.handoffs > 0 => ratio(Some(theirs), ours),
                    _ => "–".to_owned(),
                }
            );
        }
    }
}

/// Writes the raw results as JSON.
pub fn write_json(run: &Run, path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(run)?)?;
    Ok(())
}

/// One colour per row of a run with every row (Tableau 10, then repeating).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Bars for one scenario: groups (x labels) × systems.
struct Bars<'a> {
    title: &'a str,
    y_label: &'a str,
    groups: Vec<String>,
    /// Per system: its name, its colour (its place in the run, the same in
    /// every chart) and one value per group (None: no bar).
    series: Vec<(String, usize, Vec<Option<f64>>)>,
}

fn draw_bars(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    bars: &Bars<'_>,
) -> anyhow::Result<()> {
    let top = bars
        .series
        .iter()
        .flat_map(|(_, _, v)| v.iter().flatten())
        .fold(0.0f64, |a, &b| a.max(b))
        * 1.15;
    let groups = bars.groups.len();
    let width = bars.series.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(bars.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups as f64, 0.0..top.max(1.0))?;
    let labels = bars.groups.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups * 2 + 1)
        .x_label_formatter(&move |x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 {
                labels.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(bars.y_label)
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(WHITE)
        .draw()?;
    for (s, (name, color, values)) in bars.series.iter().enumerate() {
        let color = COLORS[color % COLORS.len()];
        let rects = values.iter().enumerate().filter_map(|(g, v)| {
            let x0 = g as f64 + 0.1 + 0.8 * s as f64 / width;
            v.map(|v| Rectangle::new([(x0, 0.0), (x0 + 0.8 / width, v)], color.filled()))
        });
        chart
            .draw_series(rects)?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

/// An SVG chart of scenario 1 (cycles/s) and 2 (hand-off p50).
pub fn write_svg(run: &Run, path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Every connection and waiter count any system ran, in order (a run
    // without deadbolt in memory still has groups).
    let connections: Vec<usize> = run
        .systems
        .iter()
        .flat_map(|s| s.cycles.iter().map(|c| c.connections))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // Every contention setting any system ran, in the order first seen.
    let mut settings: Vec<Contention> = Vec::new();
    for c in run.systems.iter().flat_map(|s| &s.contended) {
        if !settings.contains(&c.contention) {
            settings.push(c.contention);
        }
    }
    let cycles = Bars {
        title: "Uncontended lock+unlock cycles/s (higher is better)",
        y_label: "cycles/s",
        groups: connections
            .iter()
            .map(|c| format!("{c} connections"))
            .collect(),
        series: run
            .systems
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.cycles.is_empty())
            .map(|(i, s)| {
                (
                    s.name.clone(),
                    i,
                    connections
                        .iter()
                        .map(|&c| {
                            s.cycles
                                .iter()
                                .find(|r| r.connections == c)
                                .map(|r| r.cycles_per_second)
                        })
                        .collect(),
                )
            })
            .collect(),
    };
    let handoff = Bars {
        title: "Contended hand-off p50 in µs, unlock to another client's grant (lower is better)",
        y_label: "µs",
        groups: settings.iter().map(Contention::label).collect(),
        series: run
            .systems
            .iter()
            .enumerate()
            .filter(|(_, s)| s.contended.iter().any(|c| c.handoffs > 0))
            .map(|(i, s)| {
                (
                    s.name.clone(),
                    i,
                    settings
                        .iter()
                        .map(|&setting| {
                            s.contended
                                .iter()
                                .find(|r| r.contention == setting && r.handoffs > 0)
                                .map(|r| r.handoff_p50_us as f64)
                        })
                        .collect(),
                )
            })
            .collect(),
    };
    let root = SVGBackend::new(path, (1100, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(450);
    draw_bars(&upper, &cycles)?;
    draw_bars(&lower, &handoff)?;
    root.present()?;
    Ok(())
}
