//! The recorded history of a run: every operation's invocation and
//! completion, with its simulated time, in the order it happened. The
//! checker judges it; its hash proves a run repeats exactly.

use std::fmt;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Who did something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Actor {
    /// Worker number `n`.
    Worker(usize),
    /// The protected resource.
    Resource,
    /// The simulation driver (faults, crashes).
    Driver,
    /// The server host (its starts).
    Server,
    /// A node of the cluster (its starts, and when it leads).
    Node(u64),
    /// The cluster's operator (readmitting nodes that lost their disk).
    Operator,
    /// The auditor that exports the final state.
    Auditor,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // each variant's doc says what its fields are
pub enum What {
    /// A worker (re)started.
    Started,
    /// A worker finished its whole plan.
    Done,
    /// A worker asked for a lock.
    LockAsked {
        key: String,
        ttl_ms: u64,
        wait_ms: Option<u64>,
        ephemeral: bool,
    },
    /// A worker was granted a lock (shared, or not); it believes it holds
    /// it until `valid_until_us` (simulated microseconds).
    Granted {
        key: String,
        token: u64,
        valid_until_us: u64,
        shared: bool,
    },
    /// The lock was busy or the wait ran out.
    NotGranted { key: String },
    /// The lock request failed (connection, server error).
    LockFailed { key: String, error: String },
    /// A server-pushed event (SPEC section 7) a worker received: about its
    /// own grant `token` of `key` (a raw worker's `lock` with `notify`:
    /// `expiring` with `remaining_ms`, `lost` with `reason`), or, with
    /// `watch`, one of its watch on `key` (`granted`, `released`,
    /// `expired`). See [`crate::events_checker`].
    Pushed {
        key: String,
        token: u64,
        event: String,
        reason: Option<String>,
        remaining_ms: Option<u64>,
        watch: bool,
    },
    /// A worker's `watch` on `key` was answered: its events follow.
    Watching { key: String },
    /// The worker dropped its watch on `key` (which cancels it).
    Unwatched { key: String },
    /// An extend succeeded: the belief now lasts until `valid_until_us`.
    Extended {
        key: String,
        token: u64,
        valid_until_us: u64,
    },
    /// An extend failed; the worker stops believing it holds the lock.
    ExtendFailed {
        key: String,
        token: u64,
        error: String,
    },
    /// The worker stops believing it holds the lock (before it unlocks).
    Released { key: String, token: u64 },
    /// The client's guard says the lock may no longer be held (its lease
    /// view ran out, or the connection an ephemeral lock lives with
    /// closed), while the worker was still busy with it.
    Lost { key: String, token: u64 },
    /// The worker let go of an ephemeral lock by closing its connection,
    /// without an unlock; it stops believing it holds it.
    Abandoned { key: String, token: u64 },
    /// The unlock request came back.
    Unlocked { key: String, token: u64, ok: bool },
    /// A fenced read of the resource.
    ReadAsked { key: String, token: u64 },
    /// The read returned `value`.
    Read { key: String, value: u64 },
    /// A fenced write to the resource.
    WriteAsked { key: String, token: u64, value: u64 },
    /// The write came back.
    Written {
        key: String,
        token: u64,
        accepted: bool,
    },
    /// A resource request failed (timeout, connection).
    ResourceFailed { key: String, error: String },
    /// The resource accepted a write (recorded by the resource).
    Accepted { key: String, token: u64, value: u64 },
    /// The resource refused a write or read with a token below the highest.
    Refused {
        key: String,
        token: u64,
        highest: u64,
    },
    /// A worker inserted keys into a set.
    InsertAsked { set: String, keys: Vec<String> },
    /// One key's insert result.
    Inserted {
        set: String,
        key: String,
        index: u64,
        first: bool,
    },
    /// The insert failed.
    InsertFailed { set: String, error: String },
    /// The worker processed a key it owns.
    Processed { set: String, key: String },
    /// The driver crashed and restarted worker `worker`.
    Crashed { worker: usize },
    /// The driver crashed the server host (a power cut), in the middle of
    /// a sync of its log or not.
    ServerCrashed { mid_sync: bool },
    /// The driver shut the server down gracefully (as `deadbolt serve`
    /// does on a signal), to restart it later.
    ServerShutDown,
    /// The driver restarted the server host.
    ServerRestarted,
    /// The driver crashed node `node` of the cluster (a power cut), in the
    /// middle of a sync of its disk or not, losing its disk or not.
    NodeCrashed {
        node: u64,
        mid_sync: bool,
        disk_lost: bool,
    },
    /// The driver restarted node `node`.
    NodeRestarted { node: u64 },
    /// The node (re)started, its data directory wiped first or not, and
    /// found `kept_files` files in it.
    NodeStarted { wiped: bool, kept_files: usize },
    /// The node started to lead, in `term`: its shards stamp, propose and
    /// answer from now on.
    Leading { term: u64 },
    /// The node stopped leading.
    NotLeading,
    /// Node `by` (the leader) readmitted node `node`, which had lost its
    /// disk.
    Readmitted { node: u64, by: u64 },
    /// Node `by` answered a request to readmit `node` with HTTP `status`,
    /// or not at all (0); the operator asks again until it is done.
    ReadmitRefused { node: u64, by: u64, status: u16 },
    /// A worker's connection sent one attempt of a `lock` or an `extend`
    /// (in a cluster, as [`crate::tap`] sees it): `op` on `key`, of grant
    /// `token` for an extend.
    Sent {
        op: &'static str,
        key: String,
        token: Option<u64>,
    },
    /// A server answered one attempt of a worker's request, `ok` or with an
    /// error (`refused`: its code), as the worker's connection heard it
    /// (in a cluster, before the client makes anything of it): `op` on
    /// `key` (a lock key, or a set) with the grant's `token` and the
    /// lease's `ttl_ms` where they apply (as answered, or as asked for an
    /// error), for the attempt sent at `sent_us`.
    Answered {
        op: &'static str,
        key: String,
        token: Option<u64>,
        ttl_ms: Option<u64>,
        sent_us: u64,
        refused: Option<String>,
    },
    /// The server could not start on its data directory (it is restarted
    /// a while later, as a supervisor would).
    ServerStartFailed { error: String, disk_full: bool },
    /// The server's disk filled up (`full`) or was freed again.
    DiskFull { full: bool },
    /// The driver injected a fault.
    Fault { kind: &'static str, detail: String },
    /// The driver ended every fault.
    Healed,
    /// The auditor's export of a set after the run.
    Members {
        set: String,
        members: Vec<(u64, String)>,
    },
    /// The auditor's view of the resource after the run.
    FinalValue { key: String, value: u64 },
    /// The auditor could not export the final state.
    AuditFailed { error: String },
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Simulated time since the start, in microseconds.
    pub at_us: u64,
    /// Who.
    pub actor: Actor,
    /// What.
    pub what: What,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let actor = match self.actor {
            Actor::Worker(n) => format!("worker{n}"),
            Actor::Resource => "resource".to_owned(),
            Actor::Driver => "driver".to_owned(),
            Actor::Server => "server".to_owned(),
            Actor::Node(n) => format!("node{n}"),
            Actor::Operator => "operator".to_owned(),
            Actor::Auditor => "auditor".to_owned(),
        };
        write!(
            f,
            "{:>10.3} ms {actor:>8}  {:?}",
            self.at_us as f64 / 1000.0,
            self.what
        )
    }
}

/// The history, shared by every host of a run (they all run on one thread,
/// one after another, so the order of events is the order of the run).
#[derive(Debug, Clone, Default)]
pub struct History {
    events: Arc<Mutex<Vec<Event>>>,
    /// Whether every event is also printed as it is recorded: the trace of
    /// a run that panics (openraft asserts, for one) ends with what led to
    /// it.
    echo: bool,
}

/// Simulated time now, inside a host.
pub fn now_us() -> u64 {
    micros(turmoil::sim_elapsed().unwrap_or_default())
}

/// A duration in whole microseconds.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl History {
    /// A history that prints every event as it is recorded.
    pub fn echoing() -> History {
        History {
            echo: true,
            ..History::default()
        }
    }

    /// Records `what` by `actor` now (inside a host).
    pub fn record(&self, actor: Actor, what: What) {
        self.record_at(now_us(), actor, what);
    }

    /// Records `what` by `actor` at `at_us`.
    pub fn record_at(&self, at_us: u64, actor: Actor, what: What) {
        let event = Event { at_us, actor, what };
        if self.echo {
            // Flushed at once: a panic may abort the process next.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{event}").and_then(|()| out.flush());
        }
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A hash of the whole history (FNV-1a over its text): equal for equal runs.
pub fn trace_hash(events: &[Event]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for event in events {
        for byte in format!("{event}\n").bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}
