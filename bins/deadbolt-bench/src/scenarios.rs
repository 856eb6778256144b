//! The scenarios. Each runs against any [`System`] and returns rows
//! of plain numbers; `report` turns them into tables.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// A random key of scenario 1's million, drawn from `state`.
pub fn cycle_key(state: &mut u64) -> String {
    format!("cycle/{}", mix(state) % 1_000_000)
}

/// A random key of the same million for lane `lane` of `lanes` that share
/// one client: no two lanes draw the same key, since a client that asks
/// again for a key it holds gets its own grant back (a retry), which the
/// other lane's unlock would then end under it.
pub fn lane_key(state: &mut u64, lane: u64, lanes: u64) -> String {
    let lanes = lanes.max(1);
    format!("cycle/{}", mix(state) % (1_000_000 / lanes) * lanes + lane)
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
                    let key = cycle_key(&mut state);
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

// ---------------------------------------------------------------- 1b

/// Requests in flight per connection in the pipelined scenario.
pub const DEPTH: usize = 16;

/// Scenario 1, pipelined: each connection keeps [`DEPTH`] requests in flight.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pipelined {
    /// Connections.
    pub connections: usize,
    /// Requests in flight per connection.
    pub depth: usize,
    /// Lock+unlock cycles per second.
    pub cycles_per_second: f64,
    /// Server CPU time per cycle, µs.
    pub server_cpu_us_per_cycle: f64,
    /// Harness (client) CPU time per cycle, µs.
    pub client_cpu_us_per_cycle: f64,
}

/// Lock and unlock random keys from a million on `connections`
/// connections, [`DEPTH`] requests in flight on each, the way each
/// system's client pipelines ([`Conn::pipelined`]). `Ok(None)`: the
/// harness has no pipelining client for this system.
pub async fn pipelined(
    system: &dyn System,
    connections: usize,
    size: Size,
) -> anyhow::Result<Option<Pipelined>> {
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
            tokio::spawn(async move { conn.pipelined(DEPTH, i as u64 * 7919, stop).await })
        })
        .collect();
    tokio::time::sleep(size.duration()).await;
    stop.store(true, Ordering::Relaxed);
    let mut cycles = 0;
    for task in tasks {
        match task.await?? {
            Some(done) => cycles += done,
            None => return Ok(None),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = system.cpu().saturating_sub(cpu_before);
    let own = crate::procs::own_cpu().saturating_sub(own_before);
    let per_cycle = |d: Duration| d.as_secs_f64() * 1e6 / cycles.max(1) as f64;
    Ok(Some(Pipelined {
        connections,
        depth: DEPTH,
        cycles_per_second: cycles as f64 / elapsed,
        server_cpu_us_per_cycle: per_cycle(cpu),
        client_cpu_us_per_cycle: per_cycle(own),
    }))
}

// ---------------------------------------------------------------- 2

/// How scenario 2 contends: `workers` each loop lock → hold → unlock →
/// think on one key.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Contention {
    /// Workers (one connection each).
    pub workers: usize,
    /// How long a worker holds the lock, µs.
    pub hold_us: u64,
    /// How long a worker works between unlocking and asking again, µs.
    pub think_us: u64,
}

impl Contention {
    /// The settings every system runs: a critical section as long as the
    /// work between them (8 and 32 workers), and an empty one with a short
    /// pause, where a waiter of a polling system races the releaser.
    pub const ALL: [Contention; 3] = [
        Contention::new(8, 1000, 1000),
        Contention::new(32, 1000, 1000),
        Contention::new(8, 0, 200),
    ];

    const fn new(workers: usize, hold_us: u64, think_us: u64) -> Contention {
        Contention {
            workers,
            hold_us,
            think_us,
        }
    }

    /// As the tables and the chart name it.
    pub fn label(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        format!(
            "{} workers, hold {} ms, think {} ms",
            self.workers,
            ms(self.hold_us),
            ms(self.think_us)
        )
    }
}

/// Scenario 2: contended hand-off.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Contended {
    /// The setting.
    pub contention: Contention,
    /// Grants in all.
    pub acquisitions: u64,
    /// Grants to a worker that asked before another worker's unlock: the
    /// lock passed from one client to another.
    pub handoffs: u64,
    /// Grants to the worker that released last (it took the lock back).
    pub self_reacquisitions: u64,
    /// Grants to a worker that asked after the last unlock (the lock was
    /// free when asked).
    pub free_acquisitions: u64,
    /// A releaser's unlock sent → another worker's grant received, µs.
    pub handoff_p50_us: u64,
    /// See `handoff_p50_us`.
    pub handoff_p99_us: u64,
    /// See `handoff_p50_us`.
    pub handoff_p999_us: u64,
    /// Grants per second.
    pub acquisitions_per_second: f64,
    /// What a lock always held would allow: 1 / the mean hold (as paused,
    /// measured); `None` for a hold of 0.
    pub ideal_per_second: Option<f64>,
    /// Lock asked → granted, µs: 99th percentile.
    pub wait_p99_us: u64,
    /// The same, the longest.
    pub wait_max_us: u64,
    /// Lock requests that did not grant, per grant (polling waste).
    pub wasted_per_acquisition: f64,
    /// Jain's fairness index of grants per worker (1 = perfectly even).
    pub fairness: f64,
    /// Fewest grants a worker had.
    pub min_per_worker: u64,
    /// Most grants a worker had.
    pub max_per_worker: u64,
}

/// The last unlock: which worker and when, µs since the run's epoch, packed
/// into one word so that it is read whole (0: none yet).
#[derive(Default)]
struct LastRelease(AtomicU64);

/// What one grant was, seen from the last unlock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    /// Another worker released it while this one waited: after this many µs.
    Handoff(u64),
    /// This worker released it last.
    Reacquired,
    /// Nobody had it when this worker asked.
    Free,
}

impl LastRelease {
    fn store(&self, worker: usize, at_us: u64) {
        self.0
            .store(((at_us + 1) << 8) | worker as u64 & 0xff, Ordering::Release);
    }

    /// Classifies a grant to `worker`, asked at `asked_us` and received at
    /// `granted_us`.
    fn classify(&self, worker: usize, asked_us: u64, granted_us: u64) -> Grant {
        let last = self.0.load(Ordering::Acquire);
        if last == 0 {
            return Grant::Free;
        }
        let (by, at_us) = ((last & 0xff) as usize, (last >> 8) - 1);
        if by == worker & 0xff {
            Grant::Reacquired
        } else if asked_us <= at_us {
            Grant::Handoff(granted_us.saturating_sub(at_us).max(1))
        } else {
            Grant::Free
        }
    }
}

/// What one worker saw.
struct WorkerTally {
    grants: u64,
    reacquired: u64,
    free: u64,
    handoffs: Histogram<u64>,
    waits: Histogram<u64>,
    held: Duration,
    requests: u64,
}

/// Waits `d` precisely: tokio's timer has a millisecond's grain, which
/// would make a 0.2 ms pause 1 ms and a 1 ms hold up to 2 ms, so the pause
/// is a thread's sleep on the blocking pool (a spinning task would instead
/// hold up the harness's one worker thread, and the replies it reads).
/// Every system is driven with the same pauses.
pub async fn pause(d: Duration) -> anyhow::Result<()> {
    if !d.is_zero() {
        tokio::task::spawn_blocking(move || std::thread::sleep(d)).await?;
    }
    Ok(())
}

/// `contention.workers` connections loop lock → hold → unlock → think on
/// one key.
pub async fn contended(
    system: &dyn System,
    contention: Contention,
    size: Size,
) -> anyhow::Result<Contended> {
    let conns = connect_all(system, contention.workers).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(LastRelease::default());
    let epoch = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(worker, conn)| {
            let (stop, last) = (stop.clone(), last.clone());
            tokio::spawn(work(conn, worker, contention, epoch, stop, last))
        })
        .collect();
    tokio::time::sleep(size.duration()).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = epoch.elapsed().as_secs_f64();
    let mut tallies = Vec::with_capacity(tasks.len());
    for task in tasks {
        tallies.push(task.await??);
    }
    Ok(summarize(contention, &tallies, elapsed))
}

/// One worker's loop, until `stop`.
async fn work(
    mut conn: Box<dyn Conn>,
    worker: usize,
    contention: Contention,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    last: Arc<LastRelease>,
) -> anyhow::Result<WorkerTally> {
    let (hold, think) = (
        Duration::from_micros(contention.hold_us),
        Duration::from_micros(contention.think_us),
    );
    let ttl = Duration::from_secs(10);
    let requests_before = conn.lock_requests();
    let mut tally = WorkerTally {
        grants: 0,
        reacquired: 0,
        free: 0,
        handoffs: histogram(),
        waits: histogram(),
        held: Duration::ZERO,
        requests: 0,
    };
    // Workers start apart, as real ones do.
    pause(think.mul_f64(worker as f64 / contention.workers as f64)).await?;
    while !stop.load(Ordering::Relaxed) {
        let asked = Instant::now();
        let held = conn.lock("handoff", ttl).await?;
        let granted = Instant::now();
        tally.grants += 1;
        tally.waits.record(micros(granted - asked).max(1)).ok();
        match last.classify(worker, micros(asked - epoch), micros(granted - epoch)) {
            Grant::Handoff(us) => {
                tally.handoffs.record(us).ok();
            }
            Grant::Reacquired => tally.reacquired += 1,
            Grant::Free => tally.free += 1,
        }
        pause(hold).await?;
        let released = Instant::now();
        tally.held += released - granted;
        last.store(worker, micros(released - epoch));
        conn.unlock("handoff", held).await?;
        pause(think).await?;
    }
    tally.requests = conn.lock_requests() - requests_before;
    Ok(tally)
}

/// The row: every worker's tally together.
fn summarize(contention: Contention, tallies: &[WorkerTally], elapsed: f64) -> Contended {
    let mut handoffs = histogram();
    let mut waits = histogram();
    for tally in tallies {
        handoffs.add(&tally.handoffs).ok();
        waits.add(&tally.waits).ok();
    }
    let sum = |f: fn(&WorkerTally) -> u64| tallies.iter().map(f).sum::<u64>();
    let grants = sum(|t| t.grants);
    let held: Duration = tallies.iter().map(|t| t.held).sum();
    let per_worker: Vec<f64> = tallies.iter().map(|t| t.grants as f64).collect();
    let total: f64 = per_worker.iter().sum();
    let squares: f64 = per_worker.iter().map(|g| g * g).sum();
    Contended {
        contention,
        acquisitions: grants,
        handoffs: handoffs.len(),
        self_reacquisitions: sum(|t| t.reacquired),
        free_acquisitions: sum(|t| t.free),
        handoff_p50_us: handoffs.value_at_quantile(0.5),
        handoff_p99_us: handoffs.value_at_quantile(0.99),
        handoff_p999_us: handoffs.value_at_quantile(0.999),
        acquisitions_per_second: grants as f64 / elapsed,
        ideal_per_second: (contention.hold_us > 0 && grants > 0)
            .then(|| grants as f64 / held.as_secs_f64()),
        wait_p99_us: waits.value_at_quantile(0.99),
        wait_max_us: waits.max(),
        wasted_per_acquisition: sum(|t| t.requests).saturating_sub(grants) as f64
            / grants.max(1) as f64,
        fairness: if squares > 0.0 {
            total * total / (per_worker.len() as f64 * squares)
        } else {
            0.0
        },
        min_per_worker: tallies.iter().map(|t| t.grants).min().unwrap_or(0),
        max_per_worker: tallies.iter().map(|t| t.grants).max().unwrap_or(0),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_of_one_client_never_draw_the_same_key() {
        let mut seen = std::collections::HashMap::new();
        for lane in 0..16 {
            let mut state = 7;
            for _ in 0..1000 {
                let key = lane_key(&mut state, lane, 16);
                assert_eq!(*seen.entry(key).or_insert(lane), lane);
            }
        }
    }

    #[test]
    fn a_grant_is_a_handoff_only_if_another_worker_released_while_it_waited() {
        let last = LastRelease::default();
        assert_eq!(last.classify(1, 0, 10), Grant::Free, "nobody released yet");
        last.store(1, 100);
        assert_eq!(last.classify(1, 50, 180), Grant::Reacquired);
        assert_eq!(last.classify(2, 50, 180), Grant::Handoff(80));
        assert_eq!(
            last.classify(2, 100, 100),
            Grant::Handoff(1),
            "at least 1 µs"
        );
        assert_eq!(
            last.classify(2, 120, 180),
            Grant::Free,
            "asked after the unlock"
        );
    }

    #[test]
    fn fairness_and_rates_come_from_every_workers_tally() {
        let tally = |grants: u64, handoff_us: &[u64], requests: u64| {
            let mut handoffs = histogram();
            for &us in handoff_us {
                handoffs.record(us).ok();
            }
            WorkerTally {
                grants,
                reacquired: 0,
                free: grants - handoff_us.len() as u64,
                handoffs,
                waits: histogram(),
                held: Duration::from_millis(grants),
                requests,
            }
        };
        let setting = Contention::new(2, 1000, 1000);
        let even = summarize(setting, &[tally(2, &[50, 70], 2), tally(2, &[60], 6)], 2.0);
        assert_eq!(
            (even.acquisitions, even.handoffs, even.free_acquisitions),
            (4, 3, 1)
        );
        assert!((even.fairness - 1.0).abs() < 1e-9);
        assert!((even.acquisitions_per_second - 2.0).abs() < 1e-9);
        assert_eq!(even.ideal_per_second, Some(1000.0));
        assert!((even.wasted_per_acquisition - 1.0).abs() < 1e-9);
        let uneven = summarize(setting, &[tally(3, &[], 3), tally(1, &[], 1)], 1.0);
        assert!((uneven.fairness - 0.8).abs() < 1e-9);
        assert_eq!((uneven.min_per_worker, uneven.max_per_worker), (1, 3));
    }
}
