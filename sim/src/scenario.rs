//! What a run does, drawn by proptest from its seed: each worker's plan and
//! the fault schedule.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// The lock keys workers contend for: each run uses the first 1 to all of
/// them (one key makes long wait queues, four spread the load).
pub const LOCK_KEYS: &[&str] = &["counter-a", "counter-b", "counter-c", "counter-d"];
/// The distinct set workers share.
pub const SET: &str = "results";
/// How many distinct result keys there are; workers' inserts overlap.
pub const RESULT_KEYS: usize = 24;
/// The set's time to live when a run does not draw a short one: longer
/// than any run.
pub const SET_TTL_LONG_MS: u64 = 600_000;
/// Workers per transport: each run draws 1 to this many of each.
pub const WORKERS_PER_TRANSPORT_MAX: usize = 3;
/// The server's shard count is drawn from 1 to this.
pub const SHARDS_MAX: usize = 4;
/// Faults start in `[FAULTS_FROM_MS, FAULTS_UNTIL_MS)`.
pub const FAULTS_FROM_MS: u64 = 200;
/// See [`FAULTS_FROM_MS`].
pub const FAULTS_UNTIL_MS: u64 = 4_000;
/// The longest fault.
pub const FAULT_MAX_MS: u64 = 1_500;
/// When the heal phase ends every fault: after the last one could end.
pub const HEAL_AT_MS: u64 = FAULTS_UNTIL_MS + FAULT_MAX_MS;

/// How a worker reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket over simulated TCP (sees partitions and holds).
    Ws,
    /// QUIC over simulated UDP (also sees datagram loss).
    Quic,
    /// Raw JSON over WebSocket, without the Rust client ([`crate::raw`]).
    Raw,
}

/// How long a `lock` waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// As long as it takes.
    Forever,
    /// Not at all (try-lock).
    Try,
    /// At most this many milliseconds.
    UpTo(u64),
}

/// A counter step of a worker's plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterStep {
    /// Index into [`LOCK_KEYS`].
    pub key: usize,
    /// The lease.
    pub ttl_ms: u64,
    /// How long to wait for the lock.
    pub wait: Wait,
    /// How long the critical section takes.
    pub hold_ms: u64,
    /// Whether to extend the lease in the middle of it.
    pub extend: bool,
    /// Whether the lock is ephemeral.
    pub ephemeral: bool,
    /// Whether to ask for the lock again once granted, as a client
    /// whose reply was lost retries (a re-lock: same token, lease
    /// restarted).
    pub relock: bool,
    /// Whether to give up waiting after this long (dropping the
    /// request, which cancels it on the server).
    pub cancel_after_ms: Option<u64>,
}

/// One step of a worker's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Lock-guarded counter: lock, fenced read, hold, maybe extend, fenced
    /// write of the value plus one, unlock.
    Counter(CounterStep),
    /// An ephemeral lock taken on a connection of its own, which is then
    /// closed without an unlock: the server must free the key at once.
    Abandon {
        /// Index into [`LOCK_KEYS`].
        key: usize,
        /// The lease.
        ttl_ms: u64,
    },
    /// Distinct dedup: insert keys, process the ones this worker owns.
    Dedup {
        /// Indices of result keys.
        keys: Vec<usize>,
        /// How long processing one key takes.
        work_ms: u64,
        /// Whether to insert the keys again once answered, as a client
        /// whose reply was lost retries: every answer must be the same.
        retry: bool,
    },
}

/// One worker's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPlan {
    /// Its transport.
    pub transport: Transport,
    /// Its steps, in order; a restarted worker resumes at the step it was in.
    pub steps: Vec<Step>,
}

/// A fault.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FaultKind {
    /// The worker's links are cut (both ways, or only one way).
    Partition {
        /// `None`: both ways; `Some(true)`: worker → others only;
        /// `Some(false)`: others → worker only.
        oneway: Option<bool>,
    },
    /// The worker's links hold every message until the fault ends: a
    /// process pause, as far as everyone else can tell.
    Pause,
    /// The worker crashes, and restarts when the fault ends.
    Crash,
    /// A blip on the worker's links that loses whatever is in flight,
    /// breaking connections mid-request.
    DropConnections,
    /// Messages on the worker's links take up to this long.
    LatencySpike {
        /// The largest latency.
        max_ms: u64,
    },
    /// Datagrams between a QUIC worker and the server are lost.
    Loss {
        /// turmoil's per-send failure rate.
        rate: f64,
    },
}

impl FaultKind {
    /// A short name, for the summary table.
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Partition { oneway: None } => "partition",
            FaultKind::Partition { oneway: Some(_) } => "partition one way",
            FaultKind::Pause => "pause (hold)",
            FaultKind::Crash => "crash + restart",
            FaultKind::DropConnections => "connection drop",
            FaultKind::LatencySpike { .. } => "latency spike",
            FaultKind::Loss { .. } => "datagram loss",
        }
    }

    /// Whether it acts on the worker's network links.
    pub fn is_link_fault(&self) -> bool {
        !matches!(self, FaultKind::Crash)
    }
}

/// A fault, when it starts and how long it lasts.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledFault {
    /// Start, in simulated milliseconds.
    pub at_ms: u64,
    /// Length.
    pub duration_ms: u64,
    /// The worker it hits.
    pub worker: usize,
    /// What it is.
    pub kind: FaultKind,
}

/// Everything a run does.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// The seed it was drawn from.
    pub seed: u64,
    /// How many shards the server runs (keys land on other shards, and
    /// sets share shards with locks, differently per run).
    pub shards: usize,
    /// The largest latency of a healthy link, in milliseconds.
    pub latency_ms: u64,
    /// Whether the QUIC frontend makes every new connection prove its
    /// address with a Retry first (the path a server under load takes).
    pub quic_retry: bool,
    /// How many of [`LOCK_KEYS`] the workers use.
    pub lock_keys: usize,
    /// The set's time to live, which every `set_up` restarts (short ones
    /// are kept alive by a renewer beside the workers).
    pub set_ttl_ms: u64,
    /// The page size of the final export, if not the default.
    pub page_limit: Option<u32>,
    /// One plan per worker.
    pub workers: Vec<WorkerPlan>,
    /// The faults, by start time.
    pub faults: Vec<ScheduledFault>,
}

fn wait() -> impl Strategy<Value = Wait> {
    prop_oneof![
        3 => Just(Wait::Forever),
        3 => Just(Wait::Try),
        4 => (100u64..1500).prop_map(Wait::UpTo),
    ]
}

fn step(lock_keys: usize) -> BoxedStrategy<Step> {
    let cancel = prop_oneof![5 => Just(None), 1 => (50u64..600).prop_map(Some)];
    let counter = (
        0..lock_keys,
        150u64..1200,
        wait(),
        0u64..900,
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.25),
        cancel,
    )
        .prop_map(
            |(key, ttl_ms, wait, hold_ms, extend, ephemeral, relock, cancel_after_ms)| {
                Step::Counter(CounterStep {
                    key,
                    ttl_ms,
                    wait,
                    hold_ms,
                    extend,
                    ephemeral,
                    relock,
                    // Only a request that waits can be cancelled waiting.
                    cancel_after_ms: cancel_after_ms.filter(|_| wait != Wait::Try),
                })
            },
        );
    let dedup = (
        prop::collection::vec(0..RESULT_KEYS, 2..6),
        0u64..60,
        prop::bool::weighted(0.3),
    )
        .prop_map(|(keys, work_ms, retry)| Step::Dedup {
            keys,
            work_ms,
            retry,
        });
    let abandon =
        (0..lock_keys, 150u64..1200).prop_map(|(key, ttl_ms)| Step::Abandon { key, ttl_ms });
    prop_oneof![6 => counter, 4 => dedup, 1 => abandon].boxed()
}

fn fault_kind(transport: Transport) -> BoxedStrategy<FaultKind> {
    let common = prop_oneof![
        3 => Just(FaultKind::Partition { oneway: None }),
        2 => any::<bool>().prop_map(|to_others| FaultKind::Partition { oneway: Some(to_others) }),
        3 => Just(FaultKind::Pause),
        3 => Just(FaultKind::Crash),
        3 => Just(FaultKind::DropConnections),
        2 => (100u64..600).prop_map(|max_ms| FaultKind::LatencySpike { max_ms }),
    ];
    match transport {
        Transport::Ws | Transport::Raw => common.boxed(),
        Transport::Quic => {
            prop_oneof![6 => common, 4 => (0.02f64..0.2).prop_map(|rate| FaultKind::Loss { rate })]
                .boxed()
        }
    }
}

fn fault(transports: Vec<Transport>) -> impl Strategy<Value = ScheduledFault> {
    (0..transports.len()).prop_flat_map(move |worker| {
        let duration = 50u64..FAULT_MAX_MS;
        (
            FAULTS_FROM_MS..FAULTS_UNTIL_MS,
            duration,
            fault_kind(transports[worker]),
        )
            .prop_map(move |(at_ms, duration_ms, kind)| {
                // A connection drop is a blip, not an outage.
                let duration_ms = if kind == FaultKind::DropConnections {
                    duration_ms % 30 + 5
                } else {
                    duration_ms
                };
                ScheduledFault {
                    at_ms,
                    duration_ms,
                    worker,
                    kind,
                }
            })
    })
}

/// The transports of a run's workers: 1 to [`WORKERS_PER_TRANSPORT_MAX`]
/// Rust-client workers over each transport, WebSocket workers first, then
/// none or one raw-protocol worker.
fn transports() -> impl Strategy<Value = Vec<Transport>> {
    let count = 1..=WORKERS_PER_TRANSPORT_MAX;
    (count.clone(), count, 0..=1usize).prop_map(|(ws, quic, raw)| {
        let mut transports = vec![Transport::Ws; ws];
        transports.extend(vec![Transport::Quic; quic]);
        transports.extend(vec![Transport::Raw; raw]);
        transports
    })
}

/// The workload's shape: lock keys, the set's time to live, the export's
/// page size.
fn workload() -> impl Strategy<Value = (usize, u64, Option<u32>)> {
    let set_ttl = prop_oneof![1 => Just(SET_TTL_LONG_MS), 1 => 1_500u64..6_000];
    let page = prop_oneof![1 => Just(None), 1 => (1u32..=5).prop_map(Some)];
    (1..=LOCK_KEYS.len(), set_ttl, page)
}

fn scenario_strategy(seed: u64) -> impl Strategy<Value = Scenario> {
    let world = (
        transports(),
        1..=SHARDS_MAX,
        5u64..=40,
        any::<bool>(),
        workload(),
    );
    world.prop_flat_map(
        move |(transports, shards, latency_ms, quic_retry, workload)| {
            let (lock_keys, set_ttl_ms, page_limit) = workload;
            let plans: Vec<BoxedStrategy<WorkerPlan>> = transports
                .iter()
                .map(|&transport| {
                    prop::collection::vec(step(lock_keys), 5..10)
                        .prop_map(move |steps| WorkerPlan { transport, steps })
                        .boxed()
                })
                .collect();
            let faults = prop::collection::vec(fault(transports), 0..7);
            (plans, faults).prop_map(move |(workers, mut faults)| {
                faults.sort_by_key(|f| (f.at_ms, f.worker));
                Scenario {
                    seed,
                    shards,
                    latency_ms,
                    quic_retry,
                    lock_keys,
                    set_ttl_ms,
                    page_limit,
                    workers,
                    faults,
                }
            })
        },
    )
}

/// The scenario of `seed`: the same seed always gives the same scenario.
pub fn scenario(seed: u64) -> Scenario {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    match scenario_strategy(seed).new_tree(&mut runner) {
        Ok(tree) => tree.current(),
        // These strategies have no filters, so drawing cannot be rejected.
        Err(reason) => unreachable!("drawing a scenario failed: {reason}"),
    }
}
