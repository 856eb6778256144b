//! The checker: judges a recorded history against the contract, from the
//! outside, knowing nothing of how the server works.
//!
//! 1. Mutual exclusion on what workers believe: no two workers hold a key
//!    at the same simulated instant, judged by each worker's own
//!    conservative lease view (from the grant until it releases, crashes,
//!    or its view runs out). On the read-write key no exclusive holder
//!    overlaps any other holder (shared ones may overlap each other); on
//!    the semaphore's key never more than its limit hold at once (SPEC
//!    section 7).
//! 2. Fencing: tokens per key strictly increase in grant order (on the
//!    keys with several holders at once, between beliefs that do not
//!    overlap: holders that overlap learn of their grants in any order); the
//!    resource's accepted writes never go below an accepted token, and
//!    form an unbroken counter (no lost update).
//! 3. Distinct sets: one owner (`first`) per key, one index per key, every
//!    acknowledged insert in the final export, every owned key processed by
//!    its owner and by nobody else.
//! 4. Liveness: after the heal, every operation completes within
//!    [`OPERATION_BOUND_US`], and every worker finishes its plan.
//!
//! The rules hold over the whole history, across crashes and restarts of
//! the server: a held lock survives a server crash (its holder's view goes
//! on), so does every acknowledged insert (a later insert of the key by
//! anyone is told the same index, and never `first` again but by its
//! owner), and a token granted after a restart is above every token
//! before it. A server that refuses to start on its data directory (but
//! for a full disk, which it waits out) breaks a rule too.
//!
//! The server's own order, timing and liveness are judged from its command
//! log by [`crate::server_checker`], and its log against its state by
//! [`crate::trace`]; their violations are listed here too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::history::{Actor, Event, What};
use crate::scenario::limit_of;

/// After the heal, an operation must complete within this long: three
/// other workers ahead in the queue, each holding at most a lease of 1.2 s
/// extended once, plus a reconnect (1 s of silence and the client's
/// backoff), with room to spare.
pub const OPERATION_BOUND_US: u64 = 15_000_000;

/// A worker's belief that it holds a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Belief {
    /// The worker.
    pub worker: usize,
    /// The grant's token.
    pub token: u64,
    /// When the grant reached it.
    pub from_us: u64,
    /// When it stopped believing.
    pub until_us: u64,
    /// Whether it holds the key shared.
    pub shared: bool,
}

impl fmt::Display for Belief {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "worker{} token {} from {:.3} ms to {:.3} ms",
            self.worker,
            self.token,
            self.from_us as f64 / 1000.0,
            self.until_us as f64 / 1000.0
        )
    }
}

/// A broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // each variant's doc says what its fields are
pub enum Violation {
    /// Two workers believed they held `key` at once.
    MutualExclusion {
        key: String,
        first: Belief,
        second: Belief,
    },
    /// More workers than the semaphore's `limit` believed they held a
    /// permit of `key` at once: these `holders`, at `at_us`.
    OverLimit {
        key: String,
        limit: u32,
        holders: Vec<Belief>,
        at_us: u64,
    },
    /// A later grant of `key` carried a token no greater than an earlier one.
    TokenOrder {
        key: String,
        earlier: Belief,
        later: Belief,
    },
    /// A grant repeated the token of a grant its worker had already ended
    /// with a successful unlock: a token names one grant.
    TokenReused {
        key: String,
        worker: usize,
        token: u64,
    },
    /// The resource accepted a token below one it had accepted.
    FenceBroken { key: String, token: u64, after: u64 },
    /// The resource's counter skipped or repeated a value: an update lost.
    LostUpdate {
        key: String,
        expected: u64,
        written: u64,
        token: u64,
    },
    /// More than one worker was told `first` for a key.
    DoubleFirst { key: String, workers: Vec<usize> },
    /// Acknowledged inserts of a key were told different indexes.
    IndexMismatch { key: String, indexes: Vec<u64> },
    /// Nobody was told `first` for an inserted key.
    Unowned { key: String },
    /// An acknowledged insert is not in the final export.
    AckedInsertLost { key: String, index: u64 },
    /// A key was never processed by its owner.
    Unprocessed { key: String, owner: usize },
    /// A key was processed by a worker that does not own it.
    ProcessedByOther { key: String, worker: usize },
    /// An operation did not complete within the bound after the heal.
    Stuck {
        worker: usize,
        op: String,
        since_us: u64,
        until_us: Option<u64>,
    },
    /// A worker did not finish its plan.
    Unfinished { worker: usize },
    /// The auditor could not export the final state.
    AuditFailed { error: String },
    /// A host failed (returned an error or panicked).
    HostFailed { error: String },
    /// A shard's invariant was broken after a batch, inside the server.
    InvariantBroken { shard: usize, what: String },
    /// A shard did not stop with the server's graceful shutdown.
    ShardNotStopped { shard: usize },
    /// A shard's command log, replayed into a fresh shard, reached another
    /// state than the live shard: the shard is not a function of its log,
    /// or the server recovered from its data directory another state than
    /// its log says.
    ReplayDiverged { shard: usize, commands: usize },
    /// A snapshot of `shard` (`usize::MAX`: unreadable) said it covers the
    /// shard's records numbered below `covers_below`, but its state is not
    /// what they replay to: a recovery from it would lose or repeat
    /// changes.
    SnapshotDiverged {
        shard: usize,
        covers_below: u64,
        why: String,
    },
    /// The log kept record `lsn` where record `expected` was due: the
    /// server went on after a restart as if records it had kept (and
    /// acknowledged) were never written, or kept records nobody observed.
    LogRenumbered { expected: u64, lsn: u64 },
    /// The server refused to start on its data directory for another
    /// reason than a full disk (a damaged log or snapshot).
    ServerRefusedToStart { error: String },
    /// Server side: a restart of `shard` kept what does not survive one
    /// (SPEC section 8): on `key`, `what` (a waiter, or an ephemeral grant).
    RestartKept {
        shard: usize,
        key: String,
        what: String,
    },
    /// Server side (times in µs of the engine's clock, handles the
    /// engine's): on `key` of `shard`, request `granted` got a new grant
    /// at `at_us` while request `skipped`, which asked earlier, still
    /// waited.
    QueueJumped {
        shard: usize,
        key: String,
        granted: u64,
        skipped: u64,
        at_us: u64,
    },
    /// Server side: the lease of grant `token` of `key` ran out at
    /// `deadline_us` while someone waited, but the shard handed the key on
    /// only in a command at `at_us`, more than 10 ms later.
    LateHandOff {
        shard: usize,
        key: String,
        token: u64,
        deadline_us: u64,
        at_us: u64,
    },
    /// Server side: the lease of grant `token` of `key` ends at
    /// `deadline_us`, not at `expected_us` (its grant, last re-lock or
    /// extend plus its `ttl_ms`; `u64::MAX` for a grant never answered),
    /// or it is still held after its deadline.
    LeaseLength {
        shard: usize,
        key: String,
        token: u64,
        deadline_us: u64,
        expected_us: u64,
    },
    /// Server side: grant `token` of `key` ended at `at_us`, before its
    /// lease's end at `expected_us`, with no unlock, requester gone or
    /// connection close to end it.
    LeaseEndedEarly {
        shard: usize,
        key: String,
        token: u64,
        expected_us: u64,
        at_us: u64,
    },
    /// Server side: request `handle` on `key` was answered `timeout` at
    /// `at_us`, before its wait ran out at `due_us` or more than 10 ms
    /// after (`due_us` is `u64::MAX` for a request without a wait limit).
    TimeoutOffTime {
        shard: usize,
        key: String,
        handle: u64,
        due_us: u64,
        at_us: u64,
    },
    /// Server side: request `handle` on `key` was answered `cancelled` at
    /// `at_us` by a command that was no cancel, requester gone or close of
    /// its connection.
    UndeservedCancel {
        shard: usize,
        key: String,
        handle: u64,
        at_us: u64,
    },
    /// Server side: the ephemeral grant `token` of `key` was still held
    /// after its connection `conn` closed at `at_us`.
    EphemeralKept {
        shard: usize,
        key: String,
        token: u64,
        conn: u64,
        at_us: u64,
    },
    /// Server side: request `handle` on `key` of `shard` was still waiting,
    /// unanswered, after the command at `at_us` that cancelled it (or said
    /// its requester was gone), which must answer it `cancelled`.
    CancelIgnored {
        shard: usize,
        key: String,
        handle: u64,
        at_us: u64,
    },
    /// Server side: an `unlock` or `extend` of `key` with token `token`,
    /// which its grant still held after the command at `at_us`, was
    /// answered `not_held`.
    TokenOpRefused {
        shard: usize,
        key: String,
        token: u64,
        at_us: u64,
    },
    /// Server side: the counters of `shard` (what `stats` reports) are
    /// not what its answers add up to: `what` names each one.
    CountersDisagree { shard: usize, what: String },
    /// Server side: set `set` of `shard` ends at `ends_us` (`None`: it
    /// was gone) after the command at `at_us`, though its last `set_up`
    /// says it ends at `expected_us`: its time to live was not restarted,
    /// or it ended early or late.
    SetLifetime {
        shard: usize,
        set: String,
        expected_us: u64,
        ends_us: Option<u64>,
        at_us: u64,
    },
    /// Server side: grant `token` of `key` was made at `at_us`, inside the
    /// lock delay from `delay_from_us` to `delay_until_us` that a lease of
    /// the key started when it ran out.
    GrantInLockDelay {
        shard: usize,
        key: String,
        token: u64,
        at_us: u64,
        delay_from_us: u64,
        delay_until_us: u64,
    },
    /// Server side: the command of `shard` at `at_us` left more state than
    /// the shard's share of the configured limits, or was refused
    /// `overloaded` below them (`what` says which).
    Capacity {
        shard: usize,
        at_us: u64,
        what: String,
    },
    /// Server side: a grant of `shard` whose answer nobody received (its
    /// request named by a "requester gone" at `at_us`, and neither
    /// re-locked nor carried past a restart since) was still held after
    /// that command: a lock nobody knows it holds.
    UnheardGrantKept {
        shard: usize,
        key: String,
        token: u64,
        at_us: u64,
    },
    /// Cluster ([`crate::lease`]): grant `token` of `key` was still
    /// running when a request sent at `alive_at_us` found it, though its
    /// lease ends by `ends_by_us` (its last grant, re-lock or extend
    /// answered, plus `ttl_ms`) plus `allowance_us` (the election gaps
    /// since) and a few milliseconds.
    LeaseOutlived {
        key: String,
        token: u64,
        ends_by_us: u64,
        allowance_us: u64,
        alive_at_us: u64,
    },
    /// Cluster: no node ever said it leads.
    NoLeader,
    /// A pushed event broke rule 14 ([`crate::events_checker`]): `kind`
    /// names the part, `detail` the event.
    Events { kind: &'static str, detail: String },
}

impl Violation {
    /// The kind, for the summary table.
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::MutualExclusion { .. } => "mutual exclusion",
            Violation::OverLimit { .. } => "semaphore over its limit",
            Violation::TokenOrder { .. } => "token order",
            Violation::TokenReused { .. } => "token reused",
            Violation::FenceBroken { .. } => "fence broken",
            Violation::LostUpdate { .. } => "lost update",
            Violation::DoubleFirst { .. } => "double first",
            Violation::IndexMismatch { .. } => "index mismatch",
            Violation::Unowned { .. } => "unowned key",
            Violation::AckedInsertLost { .. } => "acked insert lost",
            Violation::Unprocessed { .. } => "unprocessed key",
            Violation::ProcessedByOther { .. } => "processed by non-owner",
            Violation::Stuck { .. } => "liveness: stuck operation",
            Violation::Unfinished { .. } => "liveness: unfinished workload",
            Violation::AuditFailed { .. } => "audit failed",
            Violation::HostFailed { .. } => "host failed",
            Violation::InvariantBroken { .. } => "shard invariant broken",
            Violation::ShardNotStopped { .. } => "shard did not stop",
            Violation::ReplayDiverged { .. } => "replay diverged",
            Violation::LogRenumbered { .. } => "log renumbered",
            Violation::SnapshotDiverged { .. } => "snapshot diverged",
            Violation::ServerRefusedToStart { .. } => "server refused to start",
            Violation::RestartKept { .. } => "server: restart kept waiter or ephemeral",
            Violation::QueueJumped { .. } => "server: queue jumped",
            Violation::LateHandOff { .. } => "server: late hand-off",
            Violation::LeaseLength { .. } => "server: lease length",
            Violation::LeaseEndedEarly { .. } => "server: lease ended early",
            Violation::TimeoutOffTime { .. } => "server: timeout off time",
            Violation::UndeservedCancel { .. } => "server: undeserved cancel",
            Violation::EphemeralKept { .. } => "server: ephemeral kept",
            Violation::SetLifetime { .. } => "server: set lifetime",
            Violation::CancelIgnored { .. } => "server: cancel ignored",
            Violation::TokenOpRefused { .. } => "server: token op refused",
            Violation::CountersDisagree { .. } => "server: counters disagree",
            Violation::GrantInLockDelay { .. } => "server: grant in lock delay",
            Violation::Capacity { .. } => "server: capacity",
            Violation::UnheardGrantKept { .. } => "server: unheard grant kept",
            Violation::LeaseOutlived { .. } => "lease outlived its ttl",
            Violation::NoLeader => "no leader",
            Violation::Events { kind, .. } => kind,
        }
    }
}

/// Checks `events` (in the order they happened); `heal_us` is when the
/// heal phase ended every fault, and `finished` holds, per worker, the
/// steps it completed and the steps in its plan.
pub fn check(events: &[Event], heal_us: u64, finished: &[(usize, usize)]) -> Vec<Violation> {
    let mut violations = Vec::new();
    let beliefs = beliefs(events);
    for (key, beliefs) in &beliefs {
        mutual_exclusion(key, beliefs, &mut violations);
        token_order(key, beliefs, &mut violations);
    }
    reused_tokens(events, &mut violations);
    resource(events, &mut violations);
    sets(events, &mut violations);
    liveness(events, heal_us, &mut violations);
    for (worker, &(done, total)) in finished.iter().enumerate() {
        if done < total {
            violations.push(Violation::Unfinished { worker });
        }
    }
    for event in events {
        match &event.what {
            What::AuditFailed { error } => violations.push(Violation::AuditFailed {
                error: error.clone(),
            }),
            What::ServerStartFailed {
                error,
                disk_full: false,
            } => violations.push(Violation::ServerRefusedToStart {
                error: error.clone(),
            }),
            _ => {}
        }
    }
    violations
}

/// Every belief interval, per key, in order of start.
fn beliefs(events: &[Event]) -> BTreeMap<String, Vec<Belief>> {
    let mut open: BTreeMap<(usize, String), Belief> = BTreeMap::new();
    let mut closed: BTreeMap<String, Vec<Belief>> = BTreeMap::new();
    let close = |closed: &mut BTreeMap<String, Vec<Belief>>,
                 key: String,
                 mut belief: Belief,
                 at_us: u64| {
        belief.until_us = belief.until_us.min(at_us);
        closed.entry(key).or_default().push(belief);
    };
    for event in events {
        let worker = match event.actor {
            Actor::Worker(n) => n,
            Actor::Driver => {
                if let What::Crashed { worker } = event.what {
                    let ended: Vec<_> =
                        open.keys().filter(|(w, _)| *w == worker).cloned().collect();
                    for id in ended {
                        if let Some(belief) = open.remove(&id) {
                            close(&mut closed, id.1, belief, event.at_us);
                        }
                    }
                }
                continue;
            }
            _ => continue,
        };
        match &event.what {
            What::Granted {
                key,
                token,
                valid_until_us,
                ..
            }
            | What::Extended {
                key,
                token,
                valid_until_us,
            } => {
                // A new view of the lease, learnt now. While the old view
                // still holds it replaces it (as the client does); once the
                // old view has run out, the belief had ended, and a late
                // view starts a new one (empty if it has run out too).
                let id = (worker, key.clone());
                let shared = match &event.what {
                    What::Granted { shared, .. } => *shared,
                    _ => open.get(&id).is_some_and(|b| b.shared),
                };
                let fresh = Belief {
                    worker,
                    token: *token,
                    from_us: event.at_us,
                    until_us: *valid_until_us,
                    shared,
                };
                let live = open
                    .get(&id)
                    .is_some_and(|b| b.token == *token && event.at_us < b.until_us);
                let extends_nothing =
                    matches!(event.what, What::Extended { .. }) && !open.contains_key(&id);
                if live {
                    if let Some(belief) = open.get_mut(&id) {
                        belief.until_us = *valid_until_us;
                    }
                } else if !extends_nothing && let Some(previous) = open.insert(id, fresh) {
                    let end = previous.until_us;
                    close(&mut closed, key.clone(), previous, end);
                }
            }
            What::Released { key, .. }
            | What::ExtendFailed { key, .. }
            | What::Lost { key, .. }
            | What::Abandoned { key, .. } => {
                if let Some(belief) = open.remove(&(worker, key.clone())) {
                    close(&mut closed, key.clone(), belief, event.at_us);
                }
            }
            _ => {}
        }
    }
    for ((_, key), belief) in open {
        closed.entry(key).or_default().push(belief);
    }
    for beliefs in closed.values_mut() {
        beliefs.retain(|b| b.until_us > b.from_us);
        beliefs.sort_by_key(|b| (b.from_us, b.worker));
    }
    closed
}

fn mutual_exclusion(key: &str, beliefs: &[Belief], violations: &mut Vec<Violation>) {
    let limit = limit_of(key);
    if limit > 1 {
        return within_limit(key, limit, beliefs, violations);
    }
    for (i, a) in beliefs.iter().enumerate() {
        for b in &beliefs[i + 1..] {
            if b.from_us >= a.until_us {
                continue;
            }
            if a.worker != b.worker && !(a.shared && b.shared) {
                violations.push(Violation::MutualExclusion {
                    key: key.to_owned(),
                    first: *a,
                    second: *b,
                });
            }
        }
    }
}

/// At no instant do more than `limit` workers believe they hold `key`.
fn within_limit(key: &str, limit: u32, beliefs: &[Belief], violations: &mut Vec<Violation>) {
    // The count can only rise where a belief starts: look there.
    for start in beliefs {
        let at_us = start.from_us;
        let holding: Vec<Belief> = beliefs
            .iter()
            .filter(|b| b.from_us <= at_us && at_us < b.until_us)
            .copied()
            .collect();
        let workers: BTreeSet<usize> = holding.iter().map(|b| b.worker).collect();
        if workers.len() > limit as usize {
            violations.push(Violation::OverLimit {
                key: key.to_owned(),
                limit,
                holders: holding,
                at_us,
            });
            return; // once per key is enough to say it
        }
    }
}

fn token_order(key: &str, beliefs: &[Belief], violations: &mut Vec<Violation>) {
    // A semaphore's holders learn of their grants in any order, and may
    // believe one after another in an order their grants were not made
    // in: its tokens are the server checker's to judge.
    if limit_of(key) > 1 {
        return;
    }
    // Shared holders too; but an exclusive grant is made while nobody
    // else holds the key, so it is ordered with every grant whose belief
    // does not overlap it. Each grant is judged by the belief that began
    // it (a worker back from a crash re-locks the grant it still holds,
    // with its old token, after others came and went).
    let several = beliefs.iter().any(|b| b.shared);
    let firsts: Vec<Belief>;
    let beliefs = if several {
        let mut seen = BTreeSet::new();
        firsts = beliefs
            .iter()
            .filter(|b| seen.insert((b.worker, b.token)))
            .copied()
            .collect();
        &firsts[..]
    } else {
        beliefs
    };
    for (i, earlier) in beliefs.iter().enumerate() {
        for later in &beliefs[i + 1..] {
            let unordered = earlier.shared && later.shared;
            if several && (later.from_us < earlier.until_us || unordered) {
                continue;
            }
            let same_grant = later.token == earlier.token && later.worker == earlier.worker;
            if later.token <= earlier.token && !same_grant {
                violations.push(Violation::TokenOrder {
                    key: key.to_owned(),
                    earlier: *earlier,
                    later: *later,
                });
            }
        }
    }
}

fn reused_tokens(events: &[Event], violations: &mut Vec<Violation>) {
    let mut ended: BTreeSet<(usize, &str, u64)> = BTreeSet::new();
    for event in events {
        let Actor::Worker(worker) = event.actor else {
            continue;
        };
        match &event.what {
            What::Unlocked {
                key,
                token,
                ok: true,
            } => {
                ended.insert((worker, key, *token));
            }
            What::Granted { key, token, .. } if ended.contains(&(worker, key.as_str(), *token)) => {
                violations.push(Violation::TokenReused {
                    key: key.clone(),
                    worker,
                    token: *token,
                });
            }
            _ => {}
        }
    }
}

fn resource(events: &[Event], violations: &mut Vec<Violation>) {
    let mut last: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for event in events {
        let What::Accepted { key, token, value } = &event.what else {
            continue;
        };
        let (last_token, last_value) = last.get(key.as_str()).copied().unwrap_or((0, 0));
        if *token < last_token {
            violations.push(Violation::FenceBroken {
                key: key.clone(),
                token: *token,
                after: last_token,
            });
        }
        if *value != last_value + 1 {
            violations.push(Violation::LostUpdate {
                key: key.clone(),
                expected: last_value + 1,
                written: *value,
                token: *token,
            });
        }
        last.insert(key, (*token, *value));
    }
}

fn sets(events: &[Event], violations: &mut Vec<Violation>) {
    let mut owners: BTreeMap<&str, BTreeSet<usize>> = BTreeMap::new();
    let mut indexes: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    let mut processed: BTreeMap<&str, BTreeSet<usize>> = BTreeMap::new();
    let mut exported: Option<BTreeMap<&str, u64>> = None;
    for event in events {
        match (&event.what, event.actor) {
            (
                What::Inserted {
                    key, index, first, ..
                },
                Actor::Worker(worker),
            ) => {
                let owners = owners.entry(key).or_default();
                if *first {
                    owners.insert(worker);
                }
                indexes.entry(key).or_default().insert(*index);
            }
            (What::Processed { key, .. }, Actor::Worker(worker)) => {
                processed.entry(key).or_default().insert(worker);
            }
            (What::Members { members, .. }, _) => {
                exported = Some(
                    members
                        .iter()
                        .map(|(index, key)| (key.as_str(), *index))
                        .collect(),
                );
            }
            _ => {}
        }
    }
    for (key, owners) in &owners {
        let key_string = (*key).to_owned();
        match owners.len() {
            0 => violations.push(Violation::Unowned {
                key: key_string.clone(),
            }),
            1 => {}
            _ => violations.push(Violation::DoubleFirst {
                key: key_string.clone(),
                workers: owners.iter().copied().collect(),
            }),
        }
        let key_indexes = &indexes[key];
        if key_indexes.len() > 1 {
            violations.push(Violation::IndexMismatch {
                key: key_string.clone(),
                indexes: key_indexes.iter().copied().collect(),
            });
        }
        if let Some(exported) = &exported {
            for &index in key_indexes {
                if exported.get(key) != Some(&index) {
                    violations.push(Violation::AckedInsertLost {
                        key: key_string.clone(),
                        index,
                    });
                }
            }
        }
        let processors = processed.get(key).cloned().unwrap_or_default();
        for &owner in owners {
            if !processors.contains(&owner) {
                violations.push(Violation::Unprocessed {
                    key: key_string.clone(),
                    owner,
                });
            }
        }
        for &worker in processors.difference(owners) {
            violations.push(Violation::ProcessedByOther {
                key: key_string.clone(),
                worker,
            });
        }
    }
}

/// What starts an operation, and what ends it.
fn operation(what: &What) -> Option<&'static str> {
    match what {
        What::LockAsked { .. } => Some("lock"),
        What::ReadAsked { .. } => Some("read"),
        What::WriteAsked { .. } => Some("write"),
        What::InsertAsked { .. } => Some("insert"),
        What::Released { .. } => Some("unlock"),
        _ => None,
    }
}

fn ends_operation(what: &What) -> bool {
    matches!(
        what,
        What::Granted { .. }
            | What::NotGranted { .. }
            | What::LockFailed { .. }
            | What::Read { .. }
            | What::Written { .. }
            | What::ResourceFailed { .. }
            | What::Inserted { .. }
            | What::InsertFailed { .. }
            | What::Unlocked { .. }
            | What::Started
    )
}

fn liveness(events: &[Event], heal_us: u64, violations: &mut Vec<Violation>) {
    let mut open: BTreeMap<usize, (&'static str, u64)> = BTreeMap::new();
    let mut stuck = |worker, op: &str, since_us: u64, until_us: Option<u64>| {
        let from = since_us.max(heal_us);
        if until_us.is_none_or(|end| end > from + OPERATION_BOUND_US) {
            violations.push(Violation::Stuck {
                worker,
                op: op.to_owned(),
                since_us,
                until_us,
            });
        }
    };
    for event in events {
        let Actor::Worker(worker) = event.actor else {
            if let (Actor::Driver, What::Crashed { worker }) = (event.actor, &event.what) {
                // The operation died with the process; the restart redoes it.
                open.remove(worker);
            }
            continue;
        };
        if ends_operation(&event.what)
            && let Some((op, since)) = open.remove(&worker)
        {
            stuck(worker, op, since, Some(event.at_us));
        }
        if let Some(op) = operation(&event.what) {
            open.insert(worker, (op, event.at_us));
        }
    }
    for (worker, (op, since)) in open {
        stuck(worker, op, since, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, actor: Actor, what: What) -> Event {
        Event {
            at_us: ms * 1000,
            actor,
            what,
        }
    }

    fn granted(ms: u64, worker: usize, token: u64, until_ms: u64) -> Event {
        at(
            ms,
            Actor::Worker(worker),
            What::Granted {
                key: "k".into(),
                token,
                valid_until_us: until_ms * 1000,
                shared: false,
            },
        )
    }

    fn released(ms: u64, worker: usize, token: u64) -> Event {
        at(
            ms,
            Actor::Worker(worker),
            What::Released {
                key: "k".into(),
                token,
            },
        )
    }

    /// The kinds of violation, leaving out the unlocks these short
    /// histories never complete.
    fn kinds(events: &[Event]) -> Vec<&'static str> {
        check(events, 0, &[])
            .iter()
            .filter(|v| !matches!(v, Violation::Stuck { op, until_us: None, .. } if op == "unlock"))
            .map(Violation::kind)
            .collect()
    }

    fn granted_on(
        key: &str,
        ms: u64,
        worker: usize,
        token: u64,
        until_ms: u64,
        shared: bool,
    ) -> Event {
        at(
            ms,
            Actor::Worker(worker),
            What::Granted {
                key: key.into(),
                token,
                valid_until_us: until_ms * 1000,
                shared,
            },
        )
    }

    #[test]
    fn shared_beliefs_may_overlap_but_not_with_an_exclusive_one() {
        use crate::scenario::RW_KEY;
        let readers = [
            granted_on(RW_KEY, 0, 0, 1, 100, true),
            granted_on(RW_KEY, 10, 1, 2, 100, true),
        ];
        assert!(!kinds(&readers).contains(&"mutual exclusion"));
        let mut with_writer = readers.to_vec();
        with_writer.push(granted_on(RW_KEY, 50, 2, 3, 150, false));
        assert!(kinds(&with_writer).contains(&"mutual exclusion"));
    }

    #[test]
    fn more_permits_than_the_limit_at_once_are_caught() {
        use crate::scenario::{POOL_KEY, POOL_LIMIT};
        let mut events: Vec<Event> = (0..POOL_LIMIT as usize)
            .map(|w| granted_on(POOL_KEY, w as u64, w, w as u64 + 1, 100, false))
            .collect();
        assert!(kinds(&events).is_empty(), "{:?}", kinds(&events));
        let n = POOL_LIMIT as usize;
        events.push(granted_on(POOL_KEY, 100, n, 9, 200, false));
        assert!(kinds(&events).is_empty(), "the first ones' views ran out");
        events.push(granted_on(POOL_KEY, 20, n + 1, 10, 200, false));
        events.sort_by_key(|e| e.at_us);
        assert!(kinds(&events).contains(&"semaphore over its limit"));
    }

    #[test]
    fn overlapping_beliefs_of_two_workers_break_mutual_exclusion() {
        let events = [
            granted(0, 0, 1, 100),
            granted(50, 1, 2, 150),
            released(60, 1, 2),
            released(70, 0, 1),
        ];
        assert!(kinds(&events).contains(&"mutual exclusion"));
    }

    #[test]
    fn a_belief_ends_at_release_or_at_the_end_of_its_lease_view() {
        let handed_on = [
            granted(0, 0, 1, 100),
            released(40, 0, 1),
            granted(50, 1, 2, 150),
        ];
        assert!(kinds(&handed_on).is_empty());
        let ran_out = [
            granted(0, 0, 1, 100),
            granted(100, 1, 2, 200),
            released(150, 0, 1),
        ];
        assert!(kinds(&ran_out).is_empty(), "the view ended at 100");
    }

    #[test]
    fn a_late_extend_does_not_revive_a_lapsed_belief() {
        // Seed 31 once: the reply to an extend arrived after the view had
        // run out, and said the lease was still over.
        let extend_late = at(
            190,
            Actor::Worker(0),
            What::Extended {
                key: "k".into(),
                token: 1,
                valid_until_us: 190_000,
            },
        );
        let events = [
            granted(0, 0, 1, 100),
            granted(150, 1, 2, 300),
            extend_late,
            released(200, 0, 1),
        ];
        assert!(kinds(&events).is_empty(), "{:?}", kinds(&events));
    }

    #[test]
    fn a_later_grant_with_a_lower_token_breaks_fencing() {
        let events = [
            granted(0, 0, 5, 100),
            released(50, 0, 5),
            granted(60, 1, 4, 150),
        ];
        assert!(kinds(&events).contains(&"token order"));
    }

    #[test]
    fn a_token_reused_after_a_successful_unlock_is_caught() {
        let unlocked = at(
            51,
            Actor::Worker(0),
            What::Unlocked {
                key: "k".into(),
                token: 5,
                ok: true,
            },
        );
        let events = [
            granted(0, 0, 5, 100),
            released(50, 0, 5),
            unlocked,
            granted(60, 0, 5, 150),
        ];
        assert!(kinds(&events).contains(&"token reused"));
    }

    #[test]
    fn the_resource_counter_must_not_lose_an_update_or_go_below_its_fence() {
        let accept = |ms, token, value| {
            at(
                ms,
                Actor::Resource,
                What::Accepted {
                    key: "k".into(),
                    token,
                    value,
                },
            )
        };
        assert!(kinds(&[accept(1, 3, 1), accept(2, 4, 2)]).is_empty());
        assert!(kinds(&[accept(1, 3, 1), accept(2, 4, 1)]).contains(&"lost update"));
        assert!(kinds(&[accept(1, 3, 1), accept(2, 2, 2)]).contains(&"fence broken"));
    }

    #[test]
    fn distinct_set_rules() {
        let inserted = |worker, key: &str, index, first| {
            at(
                1,
                Actor::Worker(worker),
                What::Inserted {
                    set: "s".into(),
                    key: key.into(),
                    index,
                    first,
                },
            )
        };
        let processed = |worker, key: &str| {
            at(
                2,
                Actor::Worker(worker),
                What::Processed {
                    set: "s".into(),
                    key: key.into(),
                },
            )
        };
        let export = |members: &[(u64, &str)]| {
            let members = members.iter().map(|(i, k)| (*i, (*k).to_owned())).collect();
            at(
                3,
                Actor::Auditor,
                What::Members {
                    set: "s".into(),
                    members,
                },
            )
        };
        let good = [
            inserted(0, "a", 1, true),
            inserted(1, "a", 1, false),
            processed(0, "a"),
            export(&[(1, "a")]),
        ];
        assert!(kinds(&good).is_empty());
        let two_owners = [
            inserted(0, "a", 1, true),
            inserted(1, "a", 1, true),
            processed(0, "a"),
            processed(1, "a"),
            export(&[(1, "a")]),
        ];
        assert!(kinds(&two_owners).contains(&"double first"));
        let lost = [inserted(0, "a", 1, true), processed(0, "a"), export(&[])];
        assert!(kinds(&lost).contains(&"acked insert lost"));
        let unprocessed = [inserted(0, "a", 1, true), export(&[(1, "a")])];
        assert!(kinds(&unprocessed).contains(&"unprocessed key"));
        let stolen = [
            inserted(0, "a", 1, true),
            processed(0, "a"),
            processed(1, "a"),
            export(&[(1, "a")]),
        ];
        assert!(kinds(&stolen).contains(&"processed by non-owner"));
        let unowned = [inserted(1, "a", 1, false), export(&[(1, "a")])];
        assert!(kinds(&unowned).contains(&"unowned key"));
        let split = [
            inserted(0, "a", 1, true),
            inserted(1, "a", 2, false),
            processed(0, "a"),
            export(&[(1, "a")]),
        ];
        assert!(kinds(&split).contains(&"index mismatch"));
    }

    #[test]
    fn a_server_that_refuses_its_data_directory_is_caught_but_a_full_disk_is_waited_out() {
        let failed = |disk_full| {
            at(
                5,
                Actor::Server,
                What::ServerStartFailed {
                    error: "no".into(),
                    disk_full,
                },
            )
        };
        assert!(kinds(&[failed(true)]).is_empty());
        assert_eq!(kinds(&[failed(false)]), ["server refused to start"]);
    }

    #[test]
    fn a_held_lock_outlives_a_server_crash_and_its_token_still_rises() {
        // Worker 0 holds across the crash; worker 1 is granted only after
        // worker 0's view ends, with a higher token.
        let crash = at(50, Actor::Driver, What::ServerCrashed { mid_sync: true });
        let restart = at(60, Actor::Driver, What::ServerRestarted);
        let events = [
            granted(0, 0, 5, 100),
            crash.clone(),
            restart.clone(),
            released(90, 0, 5),
            granted(120, 1, 65_537, 300),
        ];
        assert!(kinds(&events).is_empty(), "{:?}", kinds(&events));
        let reused = [
            granted(0, 0, 5, 100),
            crash,
            restart,
            released(90, 0, 5),
            granted(120, 1, 5, 300),
        ];
        assert!(kinds(&reused).contains(&"token order"));
    }

    #[test]
    fn an_operation_that_never_completes_after_the_heal_is_stuck() {
        let asked = at(
            10,
            Actor::Worker(0),
            What::LockAsked {
                key: "k".into(),
                ttl_ms: 10,
                wait_ms: None,
                ephemeral: false,
            },
        );
        let events = [asked.clone()];
        assert_eq!(kinds(&events), ["liveness: stuck operation"]);
        let slow = [asked.clone(), granted(20_000, 0, 1, 20_010)];
        assert_eq!(kinds(&slow), ["liveness: stuck operation"]);
        let fine = [asked, granted(5_000, 0, 1, 5_010)];
        assert!(kinds(&fine).is_empty());
        assert_eq!(
            check(&[], 0, &[(2, 3)])
                .iter()
                .map(Violation::kind)
                .collect::<Vec<_>>(),
            ["liveness: unfinished workload"]
        );
    }
}
