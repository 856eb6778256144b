//! The five scenarios. Each runs against any [`System`] and returns rows
//! of plain numbers; `report` turns them into tables.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::systems::{Conn, System};

/// How big a run is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Size {
    /// Length of each timed measurement.
    pub seconds: f64,
    /// Inserts in the distinct scenario.
    pub inserts: usize,
    /// Entries in the memory scenario.
    pub memory_entries: usize,
    /// Locks in the expiry storm.
    pub storm_locks: usize,
}

impl Size {
    /// About a minute in all.
    pub const QUICK: Size = Size {
        seconds: 1.0,
        inserts: 100_000,
        memory_entries: 100_000,
        storm_locks: 10_000,
    };
    /// The numbers the README publishes.
    pub const FULL: Size = Size {
        seconds: 5.0,
        inserts: 1_000_000,
        memory_entries: 1_000_000,
        storm_locks: 100_000,
    };

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }
}

/// A cheap, seeded key sequence (SplitMix64), so runs repeat.
fn mix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn histogram() -> Histogram<u64> {
    // Three significant digits from 1 µs up: the bounds are fixed and valid.
    Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant figures is a valid precision"))
}

async fn connect_all(system: &dyn System, n: usize) -> anyhow::Result<Vec<Box<dyn Conn>>> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(system.connect().await?);
    }
    Ok(conns)
}

// ---------------------------------------------------------------- 1

/// Scenario 1: uncontended lock+unlock cycles.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cycles {
    /// Connections, each at depth 1.
    pub connections: usize,
    /// Lock+unlock cycles per second.
    pub cycles_per_second: f64,
    /// Cycle latency percentiles, µs.
    pub p50_us: u64,
    /// See `p50_us`.
    pub p99_us: u64,
    /// See `p50_us`.
    pub p999_us: u64,
    /// Server CPU time per cycle, µs.
    pub server_cpu_us_per_cycle: f64,
    /// Harness (client) CPU time per cycle, µs: the same harness drives
    /// every system, so this shows what each client library costs.
    pub client_cpu_us_per_cycle: f64,
}

/// Lock and unlock random keys from a million on `connections`
/// connections, each one cycle at a time.
pub async fn cycles(system: &dyn System, connections: usize, size: Size) -> anyhow::Result<Cycles> {
    let conns = connect_all(system, connections).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = system.cpu();
    let own_before = crate::procs::own_cpu();
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut latency = histogram();
                let mut state = i as u64 * 7919;
                let ttl = Duration::from_secs(30);
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("cycle/{}", mix(&mut state) % 1_000_000);
                    let begun = Instant::now();
                    // Two connections drawing the same key at once is rare;
                    // such a cycle simply does not count.
                    if let Some(held) = conn.try_lock(&key, ttl).await? {
                        conn.unlock(&key, held).await?;
                        latency.record(micros(begun.elapsed()).max(1)).ok();
                    }
                }
                anyhow::Ok(latency)
            })
        })
        .collect();
    tokio::time::sleep(size.duration()).await;
    stop.store(true, Ordering::Relaxed);
    let mut latency = histogram();
    for task in tasks {
        latency.add(task.await??)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = system.cpu().saturating_sub(cpu_before);
    let own = crate::procs::own_cpu().saturating_sub(own_before);
    let cycles = latency.len().max(1);
    Ok(Cycles {
        connections,
        cycles_per_second: latency.len() as f64 / elapsed,
        p50_us: latency.value_at_quantile(0.5),
        p99_us: latency.value_at_quantile(0.99),
        p999_us: latency.value_at_quantile(0.999),
        server_cpu_us_per_cycle: cpu.as_secs_f64() * 1e6 / cycles as f64,
        client_cpu_us_per_cycle: own.as_secs_f64() * 1e6 / cycles as f64,
    })
}

// ---------------------------------------------------------------- 2

/// Scenario 2: one key, many waiters, hold time zero.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handoff {
    /// Waiters (connections) contending.
    pub waiters: usize,
    /// Releaser's unlock sent → next holder's grant received, µs.
    pub handoff_p50_us: u64,
    /// See `handoff_p50_us`.
    pub handoff_p99_us: u64,
    /// Grants per second.
    pub acquisitions_per_second: f64,
    /// Lock requests that did not grant, per grant (polling waste).
    pub wasted_per_acquisition: f64,
    /// Longest a waiter waited for one grant, ms.
    pub max_wait_ms: f64,
    /// Jain's fairness index of grants per waiter (1 = perfectly even).
    pub fairness: f64,
}

/// `waiters` connections take and release one key as fast as they can.
pub async fn handoff(system: &dyn System, waiters: usize, size: Size) -> anyhow::Result<Handoff> {
    let conns = connect_all(system, waiters).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    // When the last unlock was sent, µs since `epoch` (0: none yet).
    let last_unlock = Arc::new(AtomicU64::new(0));
    let handoffs = Arc::new(Mutex::new(histogram()));
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (stop, last_unlock, handoffs) =
                (stop.clone(), last_unlock.clone(), handoffs.clone());
            tokio::spawn(async move {
                let (mut grants, mut max_wait) = (0u64, Duration::ZERO);
                let ttl = Duration::from_secs(10);
                while !stop.load(Ordering::Relaxed) {
                    let asked = Instant::now();
                    let held = conn.lock("handoff", ttl).await?;
                    let granted = Instant::now();
                    max_wait = max_wait.max(granted - asked);
                    let released_at = last_unlock.load(Ordering::Acquire);
                    let now_us = micros(granted - epoch);
                    if released_at > 0 && now_us >= released_at {
                        handoffs
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .record((now_us - released_at).max(1))
                            .ok();
                    }
                    grants += 1;
                    last_unlock.store(micros(Instant::now() - epoch), Ordering::Release);
                    conn.unlock("handoff", held).await?;
                }
                anyhow::Ok((grants, max_wait, conn.lock_requests()))
            })
        })
        .collect();
    tokio::time::sleep(size.duration()).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = epoch.elapsed().as_secs_f64();
    let (mut grants, mut requests, mut max_wait, mut per_waiter) =
        (0u64, 0u64, Duration::ZERO, Vec::new());
    for task in tasks {
        let (g, w, r) = task.await??;
        grants += g;
        requests += r;
        max_wait = max_wait.max(w);
        per_waiter.push(g as f64);
    }
    let handoffs = handoffs.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let sum: f64 = per_waiter.iter().sum();
    let squares: f64 = per_waiter.iter().map(|g| g * g).sum();
    Ok(Handoff {
        waiters,
        handoff_p50_us: handoffs.value_at_quantile(0.5),
        handoff_p99_us: handoffs.value_at_quantile(0.99),
        acquisitions_per_second: grants as f64 / elapsed,
        wasted_per_acquisition: requests.saturating_sub(grants) as f64 / grants.max(1) as f64,
        max_wait_ms: max_wait.as_secs_f64() * 1000.0,
        fairness: if squares > 0.0 {
            sum * sum / (per_waiter.len() as f64 * squares)
        } else {
            0.0
        },
    })
}

// ---------------------------------------------------------------- 3

/// Scenario 3: inserts with half of them duplicates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Distinct {
    /// `single` (one key per request) or `batched` (1000).
    pub mode: String,
    /// Inserts made.
    pub inserts: usize,
    /// Inserts per second.
    pub inserts_per_second: f64,
    /// How many the system said were new.
    pub classified_new: usize,
    /// How many were new.
    pub distinct: usize,
    /// Whether the two agree.
    pub correct: bool,
}

/// `size.inserts` keys, each distinct key twice, in a seeded shuffle.
fn distinct_keys(size: Size) -> Vec<String> {
    let distinct = size.inserts / 2;
    let mut keys: Vec<String> = (0..size.inserts)
        .map(|i| format!("result-{}", i % distinct))
        .collect();
    let mut state = 42;
    for i in (1..keys.len()).rev() {
        let j = (mix(&mut state) % (i as u64 + 1)) as usize;
        keys.swap(i, j);
    }
    keys
}

/// Inserts every key into a fresh set, `batch` keys per request over
/// `connections` connections.
pub async fn distinct(
    system: &dyn System,
    mode: &'static str,
    batch: usize,
    connections: usize,
    size: Size,
) -> anyhow::Result<Distinct> {
    let set = format!("set-{mode}");
    let keys = Arc::new(distinct_keys(size));
    let mut conns = connect_all(system, connections).await?;
    conns[0].set_up(&set).await?;
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            let (keys, set) = (keys.clone(), set.clone());
            tokio::spawn(async move {
                // deadbolt says `first` on every insert of a key this client
                // owns (so that a retry keeps it), where the others say
                // "new" only once: count each key a connection was told it
                // owns once, as `deadbolt distinct` prints it once.
                let mut counted = std::collections::HashSet::new();
                // Connection i takes batches i, i + n, i + 2n, ...
                for chunk in keys.chunks(batch).skip(i).step_by(connections) {
                    let answers = conn.insert(&set, chunk).await?;
                    for (key, new) in chunk.iter().zip(answers) {
                        if new {
                            counted.insert(key.clone());
                        }
                    }
                }
                anyhow::Ok(counted.len())
            })
        })
        .collect();
    let mut classified_new = 0;
    for task in tasks {
        classified_new += task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let distinct = size.inserts / 2;
    Ok(Distinct {
        mode: mode.to_owned(),
        inserts: size.inserts,
        inserts_per_second: size.inserts as f64 / elapsed,
        classified_new,
        distinct,
        correct: classified_new == distinct,
    })
}

// ---------------------------------------------------------------- 4

/// Scenario 4: memory per entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Memory {
    /// Entries of each kind.
    pub entries: usize,
    /// Resident-set growth per held lock, bytes (None: not server state).
    pub per_lock: Option<f64>,
    /// Resident-set growth per set member, bytes.
    pub per_member: Option<f64>,
    /// The system's own count per member, bytes (Redis `used_memory`,
    /// PostgreSQL table size).
    pub own_per_member: Option<f64>,
    /// The system's own count per held lock, bytes.
    pub own_per_lock: Option<f64>,
}

/// Fills the server with `n` held locks, then an `n`-member set, and reads
/// its memory around each.
pub async fn memory(system: &dyn System, size: Size) -> anyhow::Result<Memory> {
    let n = size.memory_entries;
    let connections = 32;
    let mut per_lock = None;
    let mut own_per_lock = None;
    if system.locks_in_memory() {
        let (rss, own) = (system.rss(), system.own_memory().await);
        fill(system, connections, n, |conn, key| {
            Box::pin(async move {
                conn.try_lock(&key, Duration::from_secs(3600))
                    .await
                    .map(|_| ())
            })
        })
        .await?;
        per_lock = Some((system.rss().saturating_sub(rss)) as f64 / n as f64);
        own_per_lock = own
            .zip(system.own_memory().await)
            .map(|(a, b)| b.saturating_sub(a) as f64 / n as f64);
    }
    let (rss, own) = (system.rss(), system.own_memory().await);
    let mut setter = system.connect().await?;
    setter.set_up("memory").await?;
    fill(system, connections, n / 1000, |conn, batch| {
        Box::pin(async move {
            let keys: Vec<String> = (0..1000).map(|i| format!("m{batch}-{i:06}")).collect();
            conn.insert("memory", &keys).await.map(|_| ())
        })
    })
    .await?;
    let own_after = system.own_memory().await;
    Ok(Memory {
        entries: n,
        per_lock,
        per_member: Some(system.rss().saturating_sub(rss) as f64 / n as f64),
        own_per_member: match (own, own_after) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / n as f64),
            (None, Some(b)) => Some(b as f64 / n as f64),
            _ => None,
        },
        own_per_lock,
    })
}

type Job = for<'a> fn(
    &'a mut Box<dyn Conn>,
    String,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send + 'a>,
>;

/// Runs `job(conn, item)` for items 0..n (as strings: 16-byte lock keys, or
/// batch numbers) over `connections` connections.
async fn fill(system: &dyn System, connections: usize, n: usize, job: Job) -> anyhow::Result<()> {
    let conns = connect_all(system, connections).await?;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            tokio::spawn(async move {
                for item in (i..n).step_by(connections) {
                    job(&mut conn, format!("{item:016}")).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

// ---------------------------------------------------------------- 5

/// Scenario 5: many locks with the same short lease, each with a waiter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Storm {
    /// Locks.
    pub locks: usize,
    /// The lease.
    pub lease_ms: u64,
    /// Time from the last lease's end until every waiter held its lock, ms.
    pub last_deadline_to_all_granted_ms: f64,
    /// Per lock, from its lease's end to its waiter's grant: median, ms.
    pub lag_p50_ms: f64,
    /// The same, worst, ms.
    pub lag_max_ms: f64,
    /// Waiters granted before the holder's lease had run out: a lock held
    /// twice at once, as far as the holder could tell.
    pub granted_early: usize,
}

/// Takes `size.storm_locks` locks with one lease, then has a waiter ask for
/// each; measures how soon after the leases end every waiter holds its lock.
pub async fn storm(system: &dyn System, size: Size) -> anyhow::Result<Storm> {
    let n = size.storm_locks;
    let connections = 32;
    let lease = Duration::from_millis(if n > 20_000 { 6_000 } else { 2_000 });
    let keys: Vec<String> = (0..n).map(|i| format!("storm/{i:08}")).collect();
    let chunks: Vec<Vec<String>> = (0..connections)
        .map(|c| keys.iter().skip(c).step_by(connections).cloned().collect())
        .collect();
    // Holders, all connections at once: every lock's lease ends no earlier
    // than `asked + lease`.
    let holders = connect_all(system, connections).await?;
    let tasks: Vec<_> = holders
        .into_iter()
        .zip(chunks.clone())
        .map(|(mut conn, chunk)| {
            tokio::spawn(async move {
                let mut ends = Vec::with_capacity(chunk.len());
                for key in &chunk {
                    let asked = Instant::now();
                    conn.try_lock(key, lease)
                        .await?
                        .context("a storm key was already held")?;
                    ends.push(asked + lease);
                }
                anyhow::Ok(ends)
            })
        })
        .collect();
    let mut deadlines = Vec::with_capacity(connections);
    for task in tasks {
        deadlines.push(task.await??);
    }
    let last_deadline = deadlines
        .iter()
        .flatten()
        .max()
        .copied()
        .context("no locks")?;
    anyhow::ensure!(
        Instant::now() < last_deadline,
        "taking the locks took longer than their lease"
    );
    let waiters = connect_all(system, connections).await?;
    let tasks: Vec<_> = waiters
        .into_iter()
        .zip(chunks)
        .map(|(mut conn, chunk)| {
            tokio::spawn(async move {
                conn.lock_all(&chunk, Duration::from_secs(60), Duration::from_millis(1))
                    .await
            })
        })
        .collect();
    let mut lags = Vec::with_capacity(n);
    let mut last_grant = last_deadline;
    for (task, ends) in tasks.into_iter().zip(deadlines) {
        for (granted, end) in task.await??.into_iter().zip(ends) {
            last_grant = last_grant.max(granted);
            let lag = if granted >= end {
                (granted - end).as_secs_f64()
            } else {
                -(end - granted).as_secs_f64()
            };
            lags.push(lag * 1000.0);
        }
    }
    lags.sort_by(|a, b| a.total_cmp(b));
    Ok(Storm {
        locks: n,
        lease_ms: lease.as_millis() as u64,
        last_deadline_to_all_granted_ms: last_grant
            .saturating_duration_since(last_deadline)
            .as_secs_f64()
            * 1000.0,
        lag_p50_ms: lags.get(lags.len() / 2).copied().unwrap_or(0.0),
        lag_max_ms: lags.last().copied().unwrap_or(0.0),
        granted_early: lags.iter().filter(|&&lag| lag < 0.0).count(),
    })
}
