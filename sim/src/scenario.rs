//! What a run does, drawn by proptest from its seed: each worker's plan,
//! the fault schedule of the workers' links and processes, and the
//! server's disk with the server's own faults (crashes, a full disk).

use proptest::prelude::*;

use crate::cluster::plan::ClusterPlan;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// The lock keys workers contend for: each run uses the first 1 to all of
/// them (one key makes long wait queues, four spread the load).
pub const LOCK_KEYS: &[&str] = &["counter-a", "counter-b", "counter-c", "counter-d"];
/// The read-write lock's key (SPEC section 7): readers hold it shared and
/// read the resource's counter of the same name, writers exclusive and
/// increment it.
pub const RW_KEY: &str = "shared-counter";
/// The counting semaphore's key: at most [`POOL_LIMIT`] permits at once.
pub const POOL_KEY: &str = "pool";
/// How many permits the semaphore has.
pub const POOL_LIMIT: u32 = 2;

/// How many holders `key` admits at once, as the workers use it: the
/// semaphore's limit, else 1 (a mutex, or a read-write lock whose shared
/// holders the checker tells apart by their mode).
pub fn limit_of(key: &str) -> u32 {
    if key == POOL_KEY { POOL_LIMIT } else { 1 }
}
/// The distinct set workers share.
pub const SET: &str = "results";
/// How many distinct result keys there are; workers' inserts overlap.
pub const RESULT_KEYS: usize = 24;
/// The set's time to live when a run does not draw a short one: longer
/// than any run.
pub const SET_TTL_LONG_MS: u64 = 600_000;
/// A short set time to live is drawn from this up to
/// [`SET_TTL_SHORT_MAX_MS`].
pub const SET_TTL_SHORT_MIN_MS: u64 = 1_500;
/// See [`SET_TTL_SHORT_MIN_MS`].
pub const SET_TTL_SHORT_MAX_MS: u64 = 6_000;
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
/// When the heal phase ends every fault: after the last one could end
/// (later in a run whose server crashes end later: [`Scenario::heal_at_ms`]).
pub const HEAL_AT_MS: u64 = FAULTS_UNTIL_MS + FAULT_MAX_MS;
/// The shortest time a crashed server stays down: longer than any client
/// takes to notice that its connection died (1 s of silence for
/// WebSocket, a 1.5 s idle timeout for QUIC). An ephemeral lock does not
/// survive a restart, and its holder can only learn that from its
/// connection: a server back sooner could grant the key to another client
/// while the holder still believes it holds it.
pub const SERVER_DOWN_MIN_MS: u64 = 1_600;
/// The longest a crashed server stays down.
pub const SERVER_DOWN_MAX_MS: u64 = 2_200;
/// How long a crash meant for the middle of a sync waits for one before
/// it comes anyway.
pub const MID_SYNC_WAIT_MAX_MS: u64 = 300;
/// The server runs at least this long between two crashes.
pub const SERVER_UP_MIN_MS: u64 = 200;
/// Most server crashes in a run.
pub const SERVER_CRASHES_MAX: usize = 3;
/// The slowest sync of the log, in milliseconds (a quarter of the runs
/// sync in no time).
pub const SYNC_LATENCY_MAX_MS: u64 = 10;
/// The longest the disk stays full: short enough that a short-lived set,
/// whose renewals the full disk refuses, outlives it.
pub const DISK_FULL_MAX_MS: u64 = 700;
/// What a cluster adds to a short set time to live. Nothing renews the set
/// while the cluster has no leader (a partition of the leader up to 3 s,
/// a crash with a partition, an election, a request's 2 s of patience):
/// the set must outlive that, as it outlives a full disk.
pub const CLUSTER_SET_TTL_EXTRA_MS: u64 = 8_000;

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
    /// What kind of lock it takes, and so which key.
    pub guard: Guard,
    /// The lock delay the grant asks for (SPEC section 7): after its lease
    /// runs out, nobody is granted the key for this long.
    pub lock_delay_ms: u64,
    /// Whether the lock asks for pushed events (`notify`, SPEC section 7):
    /// the Rust client's guard heeds them, a raw worker records them.
    pub notify: bool,
}

/// What kind of lock a counter step takes (SPEC section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// A mutex on [`LOCK_KEYS`]`[key]`: read the counter, write it plus one.
    Mutex,
    /// A shared lock on [`RW_KEY`]: read the counter only.
    Reader,
    /// An exclusive lock on [`RW_KEY`]: read the counter, write it plus one.
    Writer,
    /// A permit of the semaphore [`POOL_KEY`]: use the pool, touch no
    /// counter (its holders are many at once).
    Permit,
}

impl CounterStep {
    /// The key the step locks.
    pub fn key_name(&self) -> &'static str {
        match self.guard {
            Guard::Mutex => LOCK_KEYS[self.key],
            Guard::Reader | Guard::Writer => RW_KEY,
            Guard::Permit => POOL_KEY,
        }
    }

    /// The `lock` mode of the step.
    pub fn mode(&self) -> deadbolt_core::proto::Mode {
        use deadbolt_core::proto::Mode;
        match self.guard {
            Guard::Mutex | Guard::Writer => Mode::MUTEX,
            Guard::Reader => Mode::Shared,
            Guard::Permit => Mode::Exclusive { limit: POOL_LIMIT },
        }
    }
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
    /// A scratch set of the worker's own with a short time to live: set
    /// up, insert, pause (often past the time to live, so that the set
    /// expires), insert again, set it up again if it was gone, and
    /// perhaps tear it down. The server-side checker judges when it ends.
    Scratch {
        /// Its time to live.
        ttl_ms: u64,
        /// The pause between the two inserts.
        pause_ms: u64,
        /// Whether the worker tears the set down at the end.
        tear_down: bool,
    },
    /// A `watch` on a lock key (SPEC section 7) for a while, recording
    /// every event it hears, then dropped (which cancels it).
    Watch {
        /// The key: an index into [`LOCK_KEYS`], or past them [`RW_KEY`]
        /// and then [`POOL_KEY`] ([`watched_key`]).
        key: usize,
        /// How long it watches.
        for_ms: u64,
    },
}

impl Scenario {
    /// The raw-protocol workers ([`crate::raw`]).
    pub fn raw_workers(&self) -> std::collections::BTreeSet<usize> {
        let workers = self.workers.iter().enumerate();
        let raw = workers.filter(|(_, plan)| plan.transport == Transport::Raw);
        raw.map(|(n, _)| n).collect()
    }
}

/// The lock key a [`Step::Watch`] watches.
pub fn watched_key(key: usize) -> &'static str {
    match key.checked_sub(LOCK_KEYS.len()) {
        None => LOCK_KEYS[key],
        Some(0) => RW_KEY,
        Some(_) => POOL_KEY,
    }
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

/// A fault of the server host itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerFaultKind {
    /// The host crashes (a power cut: what was not synced is lost, the
    /// last writes may be torn) and restarts when the fault ends.
    Crash {
        /// Whether the crash waits (up to [`MID_SYNC_WAIT_MAX_MS`]) for a
        /// moment when the log has written a group and not yet synced it:
        /// the worst moment, which tears the group's write.
        mid_sync: bool,
    },
    /// The server shuts down gracefully (answering what it had in flight,
    /// syncing its log) and starts again on its disk when the fault ends.
    Shutdown,
    /// The disk is full until the fault ends.
    DiskFull,
}

impl ServerFaultKind {
    /// A short name, for the summary table.
    pub fn name(&self) -> &'static str {
        match self {
            ServerFaultKind::Crash { .. } => SERVER_CRASH,
            ServerFaultKind::Shutdown => "server shutdown + restart",
            ServerFaultKind::DiskFull => "disk full",
        }
    }
}

/// The summary's name of a server crash.
pub const SERVER_CRASH: &str = "server crash + restart";

/// A fault of the server host, when it starts and how long it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerFault {
    /// Start, in simulated milliseconds (for a crash in the middle of a
    /// sync, when it begins to wait for one).
    pub at_ms: u64,
    /// Length (for a crash, from the moment it comes).
    pub duration_ms: u64,
    /// What it is.
    pub kind: ServerFaultKind,
}

impl ServerFault {
    /// When the fault has ended at the latest.
    pub fn end_ms(&self) -> u64 {
        let waits = match self.kind {
            ServerFaultKind::Crash { mid_sync: true } => MID_SYNC_WAIT_MAX_MS,
            _ => 0,
        };
        self.at_ms + waits + self.duration_ms
    }
}

/// The server's disk and how its data directory is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskPlan {
    /// turmoil's block size for torn writes (what was not synced at a
    /// crash survives as a random number of whole blocks), or `None`:
    /// unsynced writes are lost whole.
    pub block_bytes: Option<u64>,
    /// The disk's capacity, in runs whose schedule fills it.
    pub capacity_bytes: Option<u64>,
    /// A log segment is closed beyond this many bytes.
    pub segment_bytes: u64,
    /// Log bytes after which every shard takes a snapshot.
    pub snapshot_after_bytes: u64,
    /// How long a sync of the log takes, in milliseconds (0: no time).
    pub sync_latency_ms: u64,
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
    /// The server's disk.
    pub disk: DiskPlan,
    /// The faults of the server host, by start time (crashes never
    /// overlap; a full disk may come while the server is down). None in a
    /// cluster.
    pub server_faults: Vec<ServerFault>,
    /// In a cluster, its plan (the nodes' faults); `None` for the single
    /// server.
    pub cluster: Option<ClusterPlan>,
    /// Small capacity limits for the server, in some runs (`None`: the
    /// defaults, which the workload never reaches).
    pub room: Option<Room>,
}

/// Capacity limits small enough for the workload to reach (SPEC section
/// 5: the server refuses what it cannot hold with `overloaded`; all
/// limits are configurable), so that the server checker's rule 12 judges
/// each refusal and each admission against them. The engine-wide ones
/// are drawn per shard and multiplied by the shard count, so that every
/// shard's share is what was drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// Keys with lock state, per shard.
    pub locks_per_shard: usize,
    /// Bytes of those keys, per shard.
    pub lock_key_bytes_per_shard: usize,
    /// Waiters on one key.
    pub waiters_per_key: usize,
    /// Waiters, per shard.
    pub waiters_per_shard: usize,
    /// Members of one set.
    pub set_members: usize,
    /// Members of all sets, per shard.
    pub members_per_shard: usize,
    /// Bytes of members' keys, per shard.
    pub member_bytes_per_shard: usize,
}

impl Room {
    /// The server's limits for an engine of `shards` shards.
    pub fn limits(&self, shards: usize) -> deadbolt_core::Limits {
        deadbolt_core::Limits {
            locks_max: self.locks_per_shard * shards,
            lock_key_bytes_max: self.lock_key_bytes_per_shard * shards,
            waiters_per_key_max: self.waiters_per_key,
            waiters_max: self.waiters_per_shard * shards,
            set_members_max: self.set_members,
            members_max: self.members_per_shard * shards,
            member_bytes_max: self.member_bytes_per_shard * shards,
            ..deadbolt_core::Limits::default()
        }
    }
}

/// In a third of the runs, small limits: one to three keys with lock
/// state a shard (a key takes 4 to 14 bytes: a budget of 10 to 40), one
/// to three waiters a key, two to six a shard; 10 to 22 members a set
/// (results are 24 keys of 3 bytes), 12 to 30 a shard, 36 to 90 bytes.
fn room() -> impl Strategy<Value = Option<Room>> {
    let small = (
        (1usize..=3, 10usize..=40, 1usize..=3, 2usize..=6),
        (10usize..=22, 12usize..=30, 36usize..=90),
    )
        .prop_map(
            |((locks, key_bytes, per_key, waiters), (set, members, bytes))| Room {
                locks_per_shard: locks,
                lock_key_bytes_per_shard: key_bytes,
                waiters_per_key: per_key,
                waiters_per_shard: waiters,
                set_members: set,
                members_per_shard: members,
                member_bytes_per_shard: bytes,
            },
        );
    prop_oneof![2 => Just(None), 1 => small.prop_map(Some)]
}

impl Scenario {
    /// When every fault has ended and the heal phase begins: the server
    /// is up and every worker's links are whole.
    pub fn heal_at_ms(&self) -> u64 {
        self.server_faults_end_ms().max(HEAL_AT_MS)
    }

    /// When the server's (or the nodes') last fault ends (0 if it has
    /// none).
    pub fn server_faults_end_ms(&self) -> u64 {
        let single = self.server_faults.iter().map(ServerFault::end_ms).max();
        let nodes = self.cluster.as_ref().map(ClusterPlan::faults_end_ms);
        single.unwrap_or(0).max(nodes.unwrap_or(0))
    }

    /// The cluster version of this scenario: the same workload and workers'
    /// faults, the nodes' faults of `plan` instead of the single server's,
    /// a disk that never fills, and a short set time to live made
    /// [`CLUSTER_SET_TTL_EXTRA_MS`] longer.
    pub fn into_cluster(self, plan: ClusterPlan) -> Scenario {
        let set_ttl_ms = if self.set_ttl_ms < SET_TTL_LONG_MS {
            self.set_ttl_ms + CLUSTER_SET_TTL_EXTRA_MS
        } else {
            self.set_ttl_ms
        };
        Scenario {
            set_ttl_ms,
            server_faults: Vec::new(),
            disk: DiskPlan {
                capacity_bytes: None,
                ..self.disk
            },
            cluster: Some(plan),
            // A node's limits are its own business here.
            room: None,
            ..self
        }
    }

    /// How many times the server crashes.
    pub fn server_crashes(&self) -> usize {
        self.server_faults
            .iter()
            .filter(|f| matches!(f.kind, ServerFaultKind::Crash { .. }))
            .count()
    }
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
    let guard = prop_oneof![
        6 => Just(Guard::Mutex),
        3 => Just(Guard::Reader),
        2 => Just(Guard::Writer),
        5 => Just(Guard::Permit),
    ];
    let lock_delay_ms = prop_oneof![2 => Just(0u64), 1 => 50u64..600];
    let counter = (
        (0..lock_keys, 150u64..1200, wait(), 0u64..900),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.25),
        cancel,
        (guard, lock_delay_ms, prop::bool::weighted(0.4)),
    )
        .prop_map(
            |(
                (key, ttl_ms, wait, hold_ms),
                extend,
                ephemeral,
                relock,
                cancel_after_ms,
                (guard, lock_delay_ms, notify),
            )| {
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
                    guard,
                    // Mutex steps keep the plain contract: a lease that
                    // runs out passes the key on at once.
                    lock_delay_ms: if guard == Guard::Mutex {
                        0
                    } else {
                        lock_delay_ms
                    },
                    notify,
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
    let scratch =
        (50u64..400, 0u64..800, prop::bool::ANY).prop_map(|(ttl_ms, pause_ms, tear_down)| {
            Step::Scratch {
                ttl_ms,
                pause_ms,
                tear_down,
            }
        });
    // One of the run's mutex keys, or the shared key, or the pool.
    let watch = (0..lock_keys + 2, 300u64..3000).prop_map(move |(key, for_ms)| {
        let key = if key < lock_keys {
            key
        } else {
            LOCK_KEYS.len() + key - lock_keys
        };
        Step::Watch { key, for_ms }
    });
    prop_oneof![6 => counter, 4 => dedup, 1 => abandon, 1 => scratch, 1 => watch].boxed()
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
    let set_ttl = prop_oneof![
        1 => Just(SET_TTL_LONG_MS),
        1 => SET_TTL_SHORT_MIN_MS..SET_TTL_SHORT_MAX_MS,
    ];
    let page = prop_oneof![1 => Just(None), 1 => (1u32..=5).prop_map(Some)];
    (1..=LOCK_KEYS.len(), set_ttl, page)
}

/// Small segments and snapshot thresholds in three runs of four (a run
/// logs about 8 KiB), so that snapshots are taken and segments deleted
/// several times within a run; the defaults' 64 MiB in the others; torn writes
/// of 512 B or 4 KiB blocks, or none; a sync of up to
/// [`SYNC_LATENCY_MAX_MS`].
fn disk(fills: bool) -> impl Strategy<Value = DiskPlan> {
    let block = prop_oneof![
        2 => Just(None),
        1 => Just(Some(32)),
        1 => Just(Some(128)),
        1 => Just(Some(512)),
        1 => Just(Some(4096)),
    ];
    let small = (1u64..=8, 1u64..=4).prop_map(|(s, n)| (s << 10, n << 10));
    let thresholds = prop_oneof![3 => small, 1 => Just((64 << 20, 64 << 20))];
    let capacity = (1u64..=8).prop_map(move |mib| fills.then_some(mib << 20));
    let latency = prop_oneof![1 => Just(0), 3 => 1u64..=SYNC_LATENCY_MAX_MS];
    (block, thresholds, capacity, latency).prop_map(
        |(block_bytes, (segment, snapshot), capacity, sync_latency_ms)| DiskPlan {
            block_bytes,
            capacity_bytes: capacity,
            segment_bytes: segment,
            snapshot_after_bytes: snapshot,
            sync_latency_ms,
        },
    )
}

/// None, or one to [`SERVER_CRASHES_MAX`] crashes of the server at random
/// moments, each down for a random while; a later crash waits until the
/// server has been up for a while.
fn server_crashes() -> impl Strategy<Value = Vec<ServerFault>> {
    let crash = (
        FAULTS_FROM_MS..FAULTS_UNTIL_MS,
        SERVER_DOWN_MIN_MS..SERVER_DOWN_MAX_MS,
        any::<bool>(),
    );
    // One crash most often, three least (each makes the run seconds longer).
    let crashes = prop_oneof![
        3 => prop::collection::vec(crash.clone(), 1),
        2 => prop::collection::vec(crash.clone(), 2),
        1 => prop::collection::vec(crash, SERVER_CRASHES_MAX),
    ];
    prop_oneof![1 => Just(Vec::new()), 1 => crashes].prop_map(|mut crashes| {
        crashes.sort_unstable();
        let mut up_from = 0;
        crashes
            .into_iter()
            .map(|(at_ms, duration_ms, mid_sync)| {
                let crash = ServerFault {
                    at_ms: at_ms.max(up_from),
                    duration_ms,
                    kind: ServerFaultKind::Crash { mid_sync },
                };
                up_from = crash.end_ms() + SERVER_UP_MIN_MS;
                crash
            })
            .collect()
    })
}

/// One or two times the disk fills up, each time for at most
/// [`DISK_FULL_MAX_MS`] and at most half the set's time to live (whose
/// renewals it refuses), the second a whole time to live after the first.
fn disk_fills(set_ttl_ms: u64) -> impl Strategy<Value = Vec<ServerFault>> {
    let longest = DISK_FULL_MAX_MS.min(set_ttl_ms / 2);
    let fill = (FAULTS_FROM_MS..FAULTS_UNTIL_MS, 50..longest);
    prop::collection::vec(fill, 1..=2).prop_map(move |mut fills| {
        fills.sort_unstable();
        let mut free_from = 0;
        fills
            .into_iter()
            .map(|(at_ms, duration_ms)| {
                let at_ms = at_ms.max(free_from);
                free_from = at_ms + duration_ms + set_ttl_ms.min(SET_TTL_SHORT_MAX_MS);
                ServerFault {
                    at_ms,
                    duration_ms,
                    kind: ServerFaultKind::DiskFull,
                }
            })
            .collect()
    })
}

/// The server's disk and its faults: a quarter of the runs fill the disk.
fn server(set_ttl_ms: u64) -> impl Strategy<Value = (DiskPlan, Vec<ServerFault>)> {
    prop::bool::weighted(0.25).prop_flat_map(move |fills| {
        let fills_at = if fills {
            disk_fills(set_ttl_ms).boxed()
        } else {
            Just(Vec::new()).boxed()
        };
        (disk(fills), server_crashes(), fills_at).prop_map(|(disk, crashes, fills)| {
            let mut faults = [crashes, fills].concat();
            faults.sort_by_key(|f| (f.at_ms, f.kind.name()));
            (disk, faults)
        })
    })
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
            (plans, faults, server(set_ttl_ms)).prop_map(move |(workers, mut faults, server)| {
                faults.sort_by_key(|f| (f.at_ms, f.worker));
                let (disk, server_faults) = server;
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
                    disk,
                    server_faults,
                    cluster: None,
                    room: None,
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
    let mut scenario = draw(scenario_strategy(seed), &mut runner);
    // Drawn after the rest, so that the rest of a seed's scenario is what
    // it was before runs had limits and graceful shutdowns: the limits,
    // and which of the server's crashes (three in ten) are graceful
    // shutdowns instead.
    scenario.room = draw(room(), &mut runner);
    let graceful = draw(
        prop::collection::vec(prop::bool::weighted(0.3), SERVER_CRASHES_MAX),
        &mut runner,
    );
    let crashes = scenario
        .server_faults
        .iter_mut()
        .filter(|f| matches!(f.kind, ServerFaultKind::Crash { .. }));
    for (fault, graceful) in crashes.zip(graceful) {
        if graceful {
            fault.kind = ServerFaultKind::Shutdown;
        }
    }
    scenario
}

fn draw<T: std::fmt::Debug>(strategy: impl Strategy<Value = T>, runner: &mut TestRunner) -> T {
    match strategy.new_tree(runner) {
        Ok(tree) => tree.current(),
        // These strategies have no filters, so drawing cannot be rejected.
        Err(reason) => unreachable!("drawing a scenario failed: {reason}"),
    }
}
