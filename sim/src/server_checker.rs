//! The server's side of the history: rules over what each shard did, when.
//!
//! A shard is a deterministic function of its command log, so replaying the
//! log that the simulated server recorded ([`crate::trace`]) into a fresh
//! shard shows every answer the live shard gave, in the command (and at the
//! command time) it gave it, and the shard's lock state between any two
//! commands ([`Shard::lock_views`]). The workers' view hides much of this:
//! the Rust client counts a lease from its own send and re-anchors after a
//! long wait, which absorbs lease arithmetic errors on the server. These
//! rules judge the server directly, knowing the contract and not the code:
//!
//! 1. First come, first served: a new grant of a key goes to the request
//!    that has waited longest (by the order of the commands that asked),
//!    never past an earlier request still waiting. (A re-lock answered to
//!    the holder's own client names the holder's token: not a grant.)
//! 2. Hand-off on time: a lease that runs out while someone waits on its
//!    key is handed on by a command stamped within [`HAND_OFF_BOUND_US`] of
//!    its deadline (the shard must wake up for it).
//! 3. Lease lengths: every live grant's lease ends exactly `ttl_ms` after
//!    its grant, its last re-lock or its last extend (a waiter granted when
//!    places free up is granted when its own place freed: a late command
//!    lets each waiter in at its moment, `admission.rs`), and no lease
//!    ends before that without an unlock, its requester gone, or (for an
//!    ephemeral lock) its connection closed.
//! 4. `timeout` is answered at or after the request's `wait_ms`, and within
//!    [`HAND_OFF_BOUND_US`] after it.
//! 5. `cancelled` is answered only to a request that a `cancel`, a
//!    "requester gone" or its connection's close named; and a request
//!    still waiting when a `cancel` or "requester gone" names it is
//!    answered by that very command.
//! 9. An `unlock` or `extend` with a token whose grant is still held after
//!    the command is never answered `not_held`.
//! 10. The shard's counters (what `stats` and `/metrics` report) agree with
//!     its answers: grants, unlocks, timeouts, cancellations, `busy`, leases
//!     run out, ephemeral locks ended with their connection, sets created,
//!     torn down and expired; and after every command, the sizes it
//!     reports (held locks, waiters, sets, members) are the state's, and
//!     so are its lists (held locks, keys with waiters, largest sets:
//!     [`crate::top_lists`]).
//! 11. No grant of a key falls inside a lock delay (SPEC section 7): from
//!     the end of a lease that ran out with `lock_delay_ms` D, for D ms.
//!     (A waiter handed the key when a delay ends is granted at its end,
//!     for rule 3.)
//! 12. Capacity (SPEC section 5): no command leaves more state than the
//!     shard's share of the configured limits, and none is answered
//!     `overloaded` while every limit had room ([`crate::capacity`]).
//! 13. A grant whose answer nobody received ends with the "requester
//!     gone" that names its request, unless a re-lock answered its holder
//!     since or a restart came between.
//! 6. An ephemeral lock ends with the command that closes its connection.
//! 7. A restart (SPEC section 8) ends every waiter, unanswered, and every
//!    ephemeral grant; every other grant survives it with its token and
//!    its deadline (its lease goes on with the time it had left). Handles
//!    and connection ids start again with the new process, so nothing of
//!    the old one's requests is carried past it.
//! 8. A set ends exactly `ttl_ms` after its last `set_up` (the shard
//!    applies the deadline at its own tick, so no command stamped at or
//!    after it still finds the set, and none before it finds it gone),
//!    unless it is torn down; a restart keeps it with its deadline.
//!
//! The timing rules (2 and 4) allow what the server cannot help: the
//! deadlines a restart applies (the shard's clock goes on from the last
//! time its log reached, across the downtime), and those a shard applies
//! in its first command after its log refused a batch (a full disk: the
//! shard cannot log the tick that would have applied them in time). A
//! shard waits for its log before it stamps its next command, so with a
//! disk whose syncs take a while, the bound of rules 2 and 4 grows by two
//! syncs ([`Timing::for_sync_latency`]): the batch in flight when the
//! deadline came, and the group ahead of it in the log writer.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use deadbolt_core::proto::{ErrorCode, LockOp, Okay, SetOp, Wait};
use deadbolt_core::shard::locks::{HolderView, KeyView};
use deadbolt_core::shard::sets::SetView;
use deadbolt_core::shard::{Answer, Command, ConnId, Handle, Input, Shard, ShardConfig, ShardOp};
use deadbolt_core::time::Tick;

use crate::admission::{Admission, NewGrant};
use crate::capacity::{Capacity, State};
use crate::checker::Violation;
use crate::top_lists;

/// The contract's bound on a hand-off after a lease's end (SPEC section
/// 2), used for wait limits too.
pub const HAND_OFF_BOUND_US: u64 = 10_000;

/// How late a shard may apply a deadline.
#[derive(Debug, Clone, Copy)]
pub struct Timing<'a> {
    /// After the deadline, at most this long.
    pub bound_us: u64,
    /// The positions in the log of the commands that may apply deadlines
    /// later still (the first after a refused batch).
    pub late_ok: &'a BTreeSet<usize>,
}

impl<'a> Timing<'a> {
    /// The bound for a server whose log syncs take `sync_latency`, with
    /// the commands at `late_ok` excused.
    pub fn for_sync_latency(sync_latency: Duration, late_ok: &'a BTreeSet<usize>) -> Timing<'a> {
        let sync_us = u64::try_from(sync_latency.as_micros()).unwrap_or(u64::MAX);
        Timing {
            bound_us: HAND_OFF_BOUND_US.saturating_add(sync_us.saturating_mul(2)),
            late_ok,
        }
    }
}

/// A `lock` request not answered yet.
#[derive(Debug)]
struct Request {
    key: String,
    conn: ConnId,
    asked: Tick,
    wait: Wait,
    ephemeral: bool,
    lock_delay_ms: u64,
}

/// A grant, from its answer on.
#[derive(Debug)]
struct Grant {
    key: String,
    /// The connection it was granted on, and whether it ends with it.
    conn: ConnId,
    ephemeral: bool,
    /// The request whose answer made it, until a restart forgets it.
    handle: Option<Handle>,
    /// When its lease should end.
    expected: Tick,
}

/// What a command said that can end a grant or a wait.
#[derive(Debug, Default)]
struct Enders {
    cancelled: Option<Handle>,
    gone: Option<Handle>,
    closed: Option<ConnId>,
    /// Tokens unlocked by this command (answered `{}`).
    released: BTreeSet<u64>,
    /// The command is a restart: it ends waiters and ephemeral grants.
    restart: bool,
}

/// The checker's memory of one shard, carried from command to command.
struct ShardHistory {
    shard: usize,
    requests: BTreeMap<Handle, Request>,
    /// Per key, the requests queued, in the order they asked.
    queued: BTreeMap<String, Vec<Handle>>,
    grants: BTreeMap<u64, Grant>,
    /// Per key, the lock delays its leases started: from, until.
    delays: BTreeMap<String, Vec<(Tick, Tick)>>,
    /// How late after a deadline a command may apply it.
    bound_us: u64,
    /// Grants whose leases ran out, and ephemeral grants ended with their
    /// connection (or a restart): rule 10's expiries and disconnects.
    expired: u64,
    disconnected: u64,
    violations: Vec<Violation>,
}

/// Replays `log` (shard `shard`'s commands, in order) into a fresh shard
/// built with `config`, and checks the rules above over what it does, with
/// the deadlines' lateness bounded by `timing`.
pub fn check(
    shard: usize,
    log: &[Command],
    config: ShardConfig,
    timing: Timing<'_>,
) -> Vec<Violation> {
    let mut replica = Shard::new(config);
    let mut history = ShardHistory {
        shard,
        requests: BTreeMap::new(),
        queued: BTreeMap::new(),
        grants: BTreeMap::new(),
        delays: BTreeMap::new(),
        bound_us: timing.bound_us,
        expired: 0,
        disconnected: 0,
        violations: Vec::new(),
    };
    let mut sets = SetLifetimes::default();
    let mut tally = Tally::default();
    let mut capacity = Capacity::new(config.limits);
    let mut before = views_by_key(replica.lock_views());
    let mut sets_before = replica.set_views();
    for (position, command) in log.iter().enumerate() {
        replica.apply(command.clone());
        let now = replica.now();
        let answers = replica.take_answers();
        tally.command(&command.input, &answers);
        let set_views = replica.set_views();
        let broken = sets.command(&command.input, now, &answers, &set_views);
        history
            .violations
            .extend(broken.into_iter().map(|broken| broken.violation(shard)));
        let after = views_by_key(replica.lock_views());
        let (was, is) = (
            State {
                locks: &before,
                sets: &sets_before,
            },
            State {
                locks: &after,
                sets: &set_views,
            },
        );
        if let Some(what) = sizes_disagree(&replica.counters(), &is) {
            history
                .violations
                .push(Violation::CountersDisagree { shard, what });
        }
        let reported = replica.snapshot(top_lists::EVERYTHING);
        if let Some(what) = top_lists::disagreement(&reported, &after, &set_views, now) {
            history
                .violations
                .push(Violation::CountersDisagree { shard, what });
        }
        let full = capacity.command(&command.input, &answers, &was, &is);
        history
            .violations
            .extend(full.into_iter().map(|what| Violation::Capacity {
                shard,
                at_us: us(now),
                what,
            }));
        let late_ok =
            timing.late_ok.contains(&position) || matches!(command.input, Input::Restart { .. });
        history.command(command, now, &answers, (&before, &after), late_ok);
        before = after;
        sets_before = set_views;
    }
    tally.sets_expired = sets.expired;
    tally.expiries = history.expired;
    tally.disconnects = history.disconnected;
    let disagree = tally.disagreements(&replica.counters());
    if !disagree.is_empty() {
        history.violations.push(Violation::CountersDisagree {
            shard,
            what: disagree.join(", "),
        });
    }
    history.violations
}

/// Rule 10's sizes, after every command: held locks, waiters, sets and
/// members as `stats` reports them, against the shard's state.
fn sizes_disagree(counters: &deadbolt_core::shard::Counters, state: &State<'_>) -> Option<String> {
    let held: usize = state.locks.values().map(|v| v.holders.len()).sum();
    let waiters: usize = state.locks.values().map(|v| v.waiters.len()).sum();
    let members: u64 = state.sets.iter().map(|s| s.size).sum();
    let pairs = [
        ("held locks", held as u64, counters.locks.held),
        ("waiters", waiters as u64, counters.locks.waiters),
        ("sets", state.sets.len() as u64, counters.sets.count),
        ("members", members, counters.sets.members),
    ];
    let wrong: Vec<String> = pairs
        .into_iter()
        .filter(|(_, there, counted)| there != counted)
        .map(|(what, there, counted)| format!("{what}: {there} in the state, counted {counted}"))
        .collect();
    (!wrong.is_empty()).then(|| wrong.join(", "))
}

/// Rule 10: what a shard's answers say its counters must be.
#[derive(Debug, Default)]
struct Tally {
    /// Tokens answered `Granted` so far: a new one is a grant, a known one
    /// a re-lock.
    tokens: BTreeSet<u64>,
    releases: u64,
    timeouts: u64,
    cancellations: u64,
    busy: u64,
    sets_created: u64,
    sets_torn_down: u64,
    sets_expired: u64,
    expiries: u64,
    disconnects: u64,
}

impl Tally {
    /// Counts what one command answered.
    fn command(&mut self, input: &Input, answers: &[Answer]) {
        for answer in answers {
            match &answer.outcome {
                Ok(Okay::Granted(granted)) => {
                    self.tokens.insert(granted.token);
                }
                Err(error) if error.code == ErrorCode::Timeout => self.timeouts += 1,
                Err(error) if error.code == ErrorCode::Busy => self.busy += 1,
                Err(error) if error.code == ErrorCode::Cancelled => {
                    if matches!(input, Input::Cancel { handle, .. } if *handle == answer.handle) {
                        self.cancellations += 1;
                    }
                }
                _ => {}
            }
        }
        let Input::Op { handle, op, .. } = input else {
            return;
        };
        let own = answers.iter().find(|a| a.handle == *handle);
        match (op, own.map(|a| &a.outcome)) {
            (ShardOp::Lock(LockOp::Release { .. }), Some(Ok(_))) => self.releases += 1,
            (ShardOp::Set(SetOp::SetUp { .. }), Some(Ok(Okay::SetUp(set_up)))) => {
                self.sets_created += u64::from(set_up.created);
            }
            (ShardOp::Set(SetOp::TearDown { .. }), Some(Ok(_))) => self.sets_torn_down += 1,
            _ => {}
        }
    }

    /// The counters of `counters` that disagree, each with both values.
    fn disagreements(&self, counters: &deadbolt_core::shard::Counters) -> Vec<String> {
        let (locks, sets) = (&counters.locks, &counters.sets);
        let pairs = [
            ("grants", self.tokens.len() as u64, locks.grants),
            ("releases", self.releases, locks.releases),
            ("timeouts", self.timeouts, locks.timeouts),
            ("cancellations", self.cancellations, locks.cancellations),
            ("busy", self.busy, locks.busy),
            ("leases run out", self.expiries, locks.expiries),
            (
                "ephemeral locks ended with their connection",
                self.disconnects,
                locks.disconnects,
            ),
            ("sets created", self.sets_created, sets.created),
            ("sets torn down", self.sets_torn_down, sets.torn_down),
            ("sets expired", self.sets_expired, sets.expired),
        ];
        pairs
            .into_iter()
            .filter(|(_, answered, counted)| answered != counted)
            .map(|(what, answered, counted)| {
                format!("{what}: answers say {answered}, counted {counted}")
            })
            .collect()
    }
}

/// Rule 8: when each set should end, by its last `set_up`.
#[derive(Debug, Default)]
struct SetLifetimes {
    ends: BTreeMap<String, Tick>,
    /// Sets that ended by their time to live so far.
    expired: u64,
}

/// A set found ending at another time than its last `set_up` says.
struct SetOffTime {
    set: String,
    expected: Tick,
    ends: Option<Tick>,
    at: Tick,
}

impl SetOffTime {
    fn violation(self, shard: usize) -> Violation {
        Violation::SetLifetime {
            shard,
            set: self.set,
            expected_us: us(self.expected),
            ends_us: self.ends.map(us),
            at_us: us(self.at),
        }
    }
}

impl SetLifetimes {
    /// Learns from a `set_up` or `tear_down` the command made (and was
    /// answered "ok"), then compares every set the shard has with `views`.
    fn command(
        &mut self,
        input: &Input,
        now: Tick,
        answers: &[Answer],
        views: &[SetView],
    ) -> Vec<SetOffTime> {
        if let Input::Op {
            handle,
            op: ShardOp::Set(op),
            ..
        } = input
            && let Some(Ok(okay)) = answers
                .iter()
                .find(|a| a.handle == *handle)
                .map(|a| &a.outcome)
        {
            match op {
                SetOp::SetUp { set, ttl_ms } => {
                    // Made anew over a set this checker still knew: the old
                    // one ran out at this very tick, just before.
                    let created = matches!(okay, Okay::SetUp(reply) if reply.created);
                    if created && self.ends.contains_key(set) {
                        self.expired += 1;
                    }
                    self.ends.insert(set.clone(), now.plus_millis(*ttl_ms));
                }
                SetOp::TearDown { set } => {
                    self.ends.remove(set);
                }
                _ => {}
            }
        }
        let mut broken = Vec::new();
        for view in views {
            let expected = self.ends.get(&view.set).copied();
            if let Some(expected) = expected
                && (view.ends != expected || view.ends <= now)
            {
                broken.push(SetOffTime {
                    set: view.set.clone(),
                    expected,
                    ends: Some(view.ends),
                    at: now,
                });
            }
        }
        let gone = |set: &String| views.binary_search_by(|v| v.set.cmp(set)).is_err();
        let ended: Vec<(String, Tick)> = self
            .ends
            .iter()
            .filter(|(set, _)| gone(set))
            .map(|(set, &end)| (set.clone(), end))
            .collect();
        for (set, expected) in ended {
            self.ends.remove(&set);
            self.expired += 1;
            if expected > now {
                broken.push(SetOffTime {
                    set,
                    expected,
                    ends: None,
                    at: now,
                });
            }
        }
        broken
    }
}

fn views_by_key(views: Vec<KeyView>) -> BTreeMap<String, KeyView> {
    views.into_iter().map(|v| (v.key.clone(), v)).collect()
}

fn us(tick: Tick) -> u64 {
    tick.0
}

impl ShardHistory {
    /// Judges one command: `answers` are what it answered, `before` and
    /// `after` the lock state around it, `now` the shard's time after it;
    /// `late_ok` if it may apply deadlines late.
    fn command(
        &mut self,
        command: &Command,
        now: Tick,
        answers: &[Answer],
        (before, after): (&BTreeMap<String, KeyView>, &BTreeMap<String, KeyView>),
        late_ok: bool,
    ) {
        let (asked, enders) = self.read_input(&command.input, now);
        // Per key, when the command let each waiter in: a late command
        // applies the deadlines that passed, in order, before its own work.
        let admissions = before
            .iter()
            .map(|(key, view)| (key.clone(), Admission::new(view, after.get(key), now)))
            .collect();
        let mut step = Step {
            input: &command.input,
            asked,
            now,
            enders,
            late_ok,
            admissions,
            granted_now: BTreeMap::new(),
            new_grants: Vec::new(),
        };
        for answer in answers {
            self.answer(answer, &mut step, after);
        }
        if let Some(request) = asked.and_then(|handle| self.requests.get(&handle)) {
            let key = request.key.clone();
            self.queued.entry(key).or_default().extend(asked);
        }
        self.cancels_answered(&step);
        self.unheard_grant_undone(&step, after);
        self.holders(&step, before, after);
        self.not_in_a_lock_delay(&step, after);
        if step.enders.restart {
            self.restarted(after, now);
        }
    }

    /// Rule 13: a grant whose answer nobody received ends with the
    /// "requester gone" that names its request (unless a re-lock answered
    /// its holder since, or a restart made its request's handle
    /// meaningless): else the key stays held by a client that does not
    /// know it holds it, for a whole lease.
    fn unheard_grant_undone(&mut self, step: &Step<'_>, after: &BTreeMap<String, KeyView>) {
        let Some(gone) = step.enders.gone else {
            return;
        };
        let kept = self
            .grants
            .iter()
            .filter(|(_, grant)| grant.handle == Some(gone))
            .find(|(token, grant)| holds(after, &grant.key, **token));
        if let Some((&token, grant)) = kept {
            self.violations.push(Violation::UnheardGrantKept {
                shard: self.shard,
                key: grant.key.clone(),
                token,
                at_us: us(step.now),
            });
        }
    }

    /// Rule 5's other half: a waiting request named by this command's
    /// `cancel` or "requester gone" is answered by it, not left waiting.
    fn cancels_answered(&mut self, step: &Step<'_>) {
        let named = [step.enders.cancelled, step.enders.gone];
        for handle in named.into_iter().flatten() {
            if let Some(request) = self.requests.get(&handle)
                && step.asked != Some(handle)
            {
                self.violations.push(Violation::CancelIgnored {
                    shard: self.shard,
                    key: request.key.clone(),
                    handle: handle.0,
                    at_us: us(step.now),
                });
            }
        }
    }

    /// After a restart: nothing of the old process's waiters and
    /// ephemeral grants is left, and its requests are forgotten (their
    /// handles are reused by the new process).
    fn restarted(&mut self, after: &BTreeMap<String, KeyView>, now: Tick) {
        for (key, view) in after {
            let kept = view
                .waiters
                .iter()
                .map(|w| format!("waiter {:?}", w.handle));
            let ephemeral = view.holders.iter().filter(|h| h.ephemeral);
            let kept = kept.chain(ephemeral.map(|h| format!("ephemeral grant {}", h.token)));
            for what in kept {
                self.violations.push(Violation::RestartKept {
                    shard: self.shard,
                    key: key.clone(),
                    what: format!("{what} at {} us", us(now)),
                });
            }
        }
        self.requests.clear();
        self.queued.clear();
        for grant in self.grants.values_mut() {
            grant.handle = None;
        }
    }

    /// Remembers a `lock` request, and what the command may end. Returns
    /// the handle of the `lock` it asks, if it asks one.
    fn read_input(&mut self, input: &Input, now: Tick) -> (Option<Handle>, Enders) {
        let mut enders = Enders::default();
        let mut asked = None;
        match input {
            Input::Op {
                handle,
                caller,
                op: ShardOp::Lock(LockOp::Acquire(acquire)),
            } => {
                self.requests.insert(
                    *handle,
                    Request {
                        key: acquire.key.clone(),
                        conn: caller.conn,
                        asked: now,
                        wait: acquire.wait,
                        ephemeral: acquire.ephemeral,
                        lock_delay_ms: acquire.lock_delay_ms,
                    },
                );
                asked = Some(*handle);
            }
            Input::Cancel { handle, .. } => enders.cancelled = Some(*handle),
            Input::RequesterGone { handle, .. } => enders.gone = Some(*handle),
            Input::ConnectionClosed { conn } => enders.closed = Some(*conn),
            Input::Op { .. } | Input::Tick => {}
            Input::Restart { .. } => enders.restart = true,
        }
        (asked, enders)
    }

    /// Judges one answer of the command.
    fn answer(&mut self, answer: &Answer, step: &mut Step<'_>, after: &BTreeMap<String, KeyView>) {
        let Some(request) = self.requests.remove(&answer.handle) else {
            self.token_op_answered(answer, step, after);
            return;
        };
        let new_grant = matches!(&answer.outcome,
            Ok(Okay::Granted(g)) if !self.grants.contains_key(&g.token));
        if new_grant {
            self.first_come_first_served(answer.handle, &request, step.now);
        }
        if let Some(queue) = self.queued.get_mut(&request.key) {
            queue.retain(|&h| h != answer.handle);
        }
        match &answer.outcome {
            Ok(Okay::Granted(granted)) => {
                let re_lock = self.grants.contains_key(&granted.token);
                if re_lock {
                    // A re-lock asked by this very command restarts the
                    // lease now, even when the holder's grant was handed on
                    // earlier in the command (at a lease's end the command
                    // applied late: seed 9860, a waiter of a client's old
                    // connection granted at the deadline, then the same
                    // client's new request). A queued re-lock answered with
                    // the grant restarts it at that grant's tick.
                    let queued_with_grant = step.granted_now.get(&granted.token).copied();
                    let at = if step.asked == Some(answer.handle) {
                        step.now
                    } else {
                        queued_with_grant.unwrap_or(step.now)
                    };
                    if let Some(grant) = self.grants.get_mut(&granted.token) {
                        grant.expected = at.plus_millis(granted.ttl_ms);
                        // The holder has heard of its grant now.
                        grant.handle = None;
                    }
                    if let Some(admission) = step.admissions.get_mut(&request.key) {
                        admission.answered(answer.handle, at);
                    }
                    return;
                }
                let grant = NewGrant {
                    handle: answer.handle,
                    ttl_ms: granted.ttl_ms,
                    lock_delay_ms: request.lock_delay_ms,
                    held_after: holds(after, &request.key, granted.token),
                };
                let let_in = step
                    .admissions
                    .get_mut(&request.key)
                    .and_then(|admission| admission.let_in(grant));
                let at = if step.asked == Some(answer.handle) {
                    step.now
                } else {
                    let_in.unwrap_or(step.now)
                };
                let expected = at.plus_millis(granted.ttl_ms);
                step.granted_now.insert(granted.token, at);
                step.new_grants
                    .push((request.key.clone(), granted.token, granted.ttl_ms));
                self.grants.insert(
                    granted.token,
                    Grant {
                        key: request.key.clone(),
                        conn: request.conn,
                        ephemeral: request.ephemeral,
                        handle: Some(answer.handle),
                        expected,
                    },
                );
            }
            Err(error) if error.code == ErrorCode::Timeout => {
                self.timeout(answer.handle, &request, step.now, step.late_ok);
            }
            Err(error) if error.code == ErrorCode::Cancelled => {
                let deserved = step.enders.cancelled == Some(answer.handle)
                    || step.enders.gone == Some(answer.handle)
                    || step.enders.closed == Some(request.conn);
                if !deserved {
                    self.violations.push(Violation::UndeservedCancel {
                        shard: self.shard,
                        key: request.key,
                        handle: answer.handle.0,
                        at_us: us(step.now),
                    });
                }
            }
            Ok(_) | Err(_) => {}
        }
    }

    /// An answer to `unlock` or `extend`: what it ends or restarts.
    fn token_op_answered(
        &mut self,
        answer: &Answer,
        step: &mut Step<'_>,
        after: &BTreeMap<String, KeyView>,
    ) {
        let Input::Op {
            handle,
            op: ShardOp::Lock(op),
            ..
        } = step.input
        else {
            return;
        };
        if *handle != answer.handle {
            return;
        }
        match (op, &answer.outcome) {
            (LockOp::Release { token, .. }, Ok(_)) => {
                step.enders.released.insert(*token);
            }
            (LockOp::Extend { token, .. }, Ok(Okay::Extended(extended))) => {
                if let Some(grant) = self.grants.get_mut(token) {
                    grant.expected = step.now.plus_millis(extended.ttl_ms);
                }
            }
            (LockOp::Extend { key, token, .. } | LockOp::Release { key, token }, Err(error))
                if error.code == ErrorCode::NotHeld && holds(after, key, *token) =>
            {
                self.violations.push(Violation::TokenOpRefused {
                    shard: self.shard,
                    key: key.clone(),
                    token: *token,
                    at_us: us(step.now),
                });
            }
            _ => {}
        }
    }

    /// A new grant to `handle` must not pass a request that asked earlier
    /// and still waits.
    fn first_come_first_served(&mut self, handle: Handle, request: &Request, now: Tick) {
        let Some(queue) = self.queued.get(&request.key) else {
            return;
        };
        let earlier = queue.iter().take_while(|&&h| h != handle).next();
        if let Some(&skipped) = earlier {
            self.violations.push(Violation::QueueJumped {
                shard: self.shard,
                key: request.key.clone(),
                granted: handle.0,
                skipped: skipped.0,
                at_us: us(now),
            });
        }
    }

    /// `timeout` is deserved once the wait ran out, and due soon after
    /// (unless the command may be late).
    fn timeout(&mut self, handle: Handle, request: &Request, now: Tick, late_ok: bool) {
        let Wait::UpTo(wait_ms) = request.wait else {
            self.violations.push(Violation::TimeoutOffTime {
                shard: self.shard,
                key: request.key.clone(),
                handle: handle.0,
                due_us: u64::MAX,
                at_us: us(now),
            });
            return;
        };
        let due = request.asked.plus_millis(wait_ms);
        let late = now.0 > due.0.saturating_add(self.bound_us) && !late_ok;
        if now < due || late {
            self.violations.push(Violation::TimeoutOffTime {
                shard: self.shard,
                key: request.key.clone(),
                handle: handle.0,
                due_us: us(due),
                at_us: us(now),
            });
        }
    }

    /// Judges how the holders of each key changed over the command.
    fn holders(
        &mut self,
        step: &Step<'_>,
        before: &BTreeMap<String, KeyView>,
        after: &BTreeMap<String, KeyView>,
    ) {
        for (key, view) in before {
            for holder in &view.holders {
                if holds(after, key, holder.token) {
                    self.still_held(key, holder, step);
                } else {
                    self.ended(key, holder, view, step);
                }
            }
        }
        // Grants made in this command that did not outlive it.
        for &token in step.granted_now.keys() {
            let Some(grant) = self.grants.get(&token) else {
                continue;
            };
            let held = holds(after, &grant.key, token);
            let disconnected =
                grant.ephemeral && (step.enders.closed == Some(grant.conn) || step.enders.restart);
            let undone =
                (grant.handle.is_some() && step.enders.gone == grant.handle) || disconnected;
            if !held {
                // Ran out, or ended with its connection, inside the command
                // that made it.
                self.expired += u64::from(grant.expected <= step.now);
                self.disconnected += u64::from(disconnected && grant.expected > step.now);
            }
            if !held && grant.expected > step.now && !undone {
                self.violations.push(Violation::LeaseEndedEarly {
                    shard: self.shard,
                    key: grant.key.clone(),
                    token,
                    expected_us: us(grant.expected),
                    at_us: us(step.now),
                });
            }
        }
        for (key, view) in after {
            for holder in &view.holders {
                self.lease_length(key, holder, step.now);
            }
        }
    }

    /// A holder from before the command that is still there: an
    /// ephemeral one must not outlive its connection's close.
    fn still_held(&mut self, key: &str, holder: &HolderView, step: &Step<'_>) {
        if holder.ephemeral && step.enders.closed == Some(holder.conn) {
            self.violations.push(Violation::EphemeralKept {
                shard: self.shard,
                key: key.to_owned(),
                token: holder.token,
                conn: holder.conn,
                at_us: us(step.now),
            });
        }
    }

    /// Rule 11: each grant this command made (and that is still held,
    /// its lease telling when it was made) falls outside every lock delay
    /// of its key.
    fn not_in_a_lock_delay(&mut self, step: &Step<'_>, after: &BTreeMap<String, KeyView>) {
        for (key, token, ttl_ms) in &step.new_grants {
            let Some(holder) = after
                .get(key)
                .and_then(|v| v.holders.iter().find(|h| h.token == *token))
            else {
                continue;
            };
            let at = Tick(
                holder
                    .deadline
                    .0
                    .saturating_sub(ttl_ms.saturating_mul(1000)),
            );
            let windows = self.delays.get(key).into_iter().flatten();
            if let Some(&(from, until)) = windows.into_iter().find(|(f, u)| *f <= at && at < *u) {
                self.violations.push(Violation::GrantInLockDelay {
                    shard: self.shard,
                    key: key.clone(),
                    token: *token,
                    at_us: us(at),
                    delay_from_us: us(from),
                    delay_until_us: us(until),
                });
            }
        }
    }

    /// A holder from before the command that is gone: it ran out (and was
    /// handed on in time; a lock delay starts), or something ended it.
    fn ended(&mut self, key: &str, holder: &HolderView, view: &KeyView, step: &Step<'_>) {
        if holder.deadline <= step.now {
            self.expired += 1;
            if holder.lock_delay_ms > 0 {
                let until = holder.deadline.plus_millis(holder.lock_delay_ms);
                let windows = self.delays.entry(key.to_owned()).or_default();
                windows.push((holder.deadline, until));
            }
            let someone_waited = view
                .waiters
                .iter()
                .any(|w| w.deadline.is_none_or(|d| d > holder.deadline));
            let late = step.now.0 > holder.deadline.0.saturating_add(self.bound_us);
            if someone_waited && late && !step.late_ok {
                self.violations.push(Violation::LateHandOff {
                    shard: self.shard,
                    key: key.to_owned(),
                    token: holder.token,
                    deadline_us: us(holder.deadline),
                    at_us: us(step.now),
                });
            }
            return;
        }
        let enders = &step.enders;
        let granted_by = self.grants.get(&holder.token).and_then(|g| g.handle);
        let disconnected = holder.ephemeral
            && (enders.closed == Some(holder.conn) || enders.restart)
            && !enders.released.contains(&holder.token);
        self.disconnected += u64::from(disconnected);
        let ended_by_command = enders.released.contains(&holder.token)
            || disconnected
            || (granted_by.is_some() && enders.gone == granted_by);
        if !ended_by_command {
            self.violations.push(Violation::LeaseEndedEarly {
                shard: self.shard,
                key: key.to_owned(),
                token: holder.token,
                expected_us: us(holder.deadline),
                at_us: us(step.now),
            });
        }
    }

    /// A live holder's lease ends `ttl_ms` after its grant, re-lock or
    /// extend, and not before now.
    fn lease_length(&mut self, key: &str, holder: &HolderView, now: Tick) {
        let expected = self.grants.get(&holder.token).map(|g| g.expected);
        if expected != Some(holder.deadline) || holder.deadline <= now {
            self.violations.push(Violation::LeaseLength {
                shard: self.shard,
                key: key.to_owned(),
                token: holder.token,
                deadline_us: us(holder.deadline),
                expected_us: expected.map_or(u64::MAX, us),
            });
        }
    }
}

/// One command being judged.
struct Step<'a> {
    input: &'a Input,
    /// The `lock` this command asks, if any.
    asked: Option<Handle>,
    /// The shard's time after it.
    now: Tick,
    enders: Enders,
    /// Whether it may apply deadlines late (a restart, or the first
    /// command after a refused batch).
    late_ok: bool,
    /// Per key, the waiters this command let in, and when.
    admissions: BTreeMap<String, Admission>,
    /// Tokens granted in this command, with the tick of their grant.
    granted_now: BTreeMap<u64, Tick>,
    /// The new grants of this command: key, token and lease.
    new_grants: Vec<(String, u64, u64)>,
}

/// Whether `key` is held with `token` in `views`.
fn holds(views: &BTreeMap<String, KeyView>, key: &str, token: u64) -> bool {
    views
        .get(key)
        .is_some_and(|v| v.holders.iter().any(|h| h.token == token))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use deadbolt_core::Limits;
    use deadbolt_core::proto::{Acquire, Mode};
    use deadbolt_core::shard::Caller;
    use deadbolt_core::shard::planted::{self, PlantedBug};

    use super::*;

    fn config() -> ShardConfig {
        ShardConfig {
            hash_seed: 7,
            first_token: 1,
            limits: Limits::default(),
        }
    }

    fn at_ms(ms: u64, input: Input) -> Command {
        Command {
            at: Tick::from_millis(ms),
            input,
        }
    }

    /// Client `n`, on connection `n`, asks for "k" with request handle `n`.
    fn lock(ms: u64, n: u64, ttl_ms: u64) -> Command {
        let caller = Caller {
            client: Arc::from(format!("c{n}")),
            conn: n,
        };
        let op = ShardOp::Lock(LockOp::Acquire(Acquire {
            key: "k".into(),
            ttl_ms,
            wait: Wait::Forever,
            ephemeral: false,
            mode: Mode::MUTEX,
            lock_delay_ms: 0,
            notify: false,
        }));
        at_ms(
            ms,
            Input::Op {
                handle: Handle(n),
                caller,
                op,
            },
        )
    }

    /// Like [`lock`], ephemeral, on key `key`.
    fn lock_ephemeral(ms: u64, n: u64, key: &str, ttl_ms: u64) -> Command {
        let mut command = lock(ms, n, ttl_ms);
        if let Input::Op {
            op: ShardOp::Lock(LockOp::Acquire(acquire)),
            ..
        } = &mut command.input
        {
            acquire.key = key.into();
            acquire.ephemeral = true;
        }
        command
    }

    /// `set_up` of set "s" for `ttl_ms`, with request handle `n`.
    fn set_up(ms: u64, n: u64, ttl_ms: u64) -> Command {
        let caller = Caller {
            client: Arc::from("setter"),
            conn: 99,
        };
        let set = "s".to_owned();
        let op = ShardOp::Set(SetOp::SetUp { set, ttl_ms });
        at_ms(
            ms,
            Input::Op {
                handle: Handle(n),
                caller,
                op,
            },
        )
    }

    fn restart(ms: u64) -> Command {
        at_ms(ms, Input::Restart { token_floor: 1 })
    }

    fn kinds(log: &[Command]) -> Vec<&'static str> {
        kinds_excusing(log, &BTreeSet::new())
    }

    /// The kinds of violation of `log`, whose commands at `late_ok` may
    /// apply deadlines late.
    fn kinds_excusing(log: &[Command], late_ok: &BTreeSet<usize>) -> Vec<&'static str> {
        let timing = Timing::for_sync_latency(Duration::ZERO, late_ok);
        check(0, log, config(), timing)
            .iter()
            .map(Violation::kind)
            .collect()
    }

    #[test]
    fn a_re_lock_asked_in_a_late_command_restarts_the_lease_at_the_command() {
        // Seed 9860: 1 holds "k" until 10 ms; client c2 waits on its first
        // connection. A command late at 50 ms (a full disk held the log)
        // hands "k" to that waiter at 10 ms, then applies c2's new request
        // from another connection: a re-lock, same token, lease from 50 ms.
        let mut relock = lock(50, 3, 100);
        if let Input::Op { caller, .. } = &mut relock.input {
            caller.client = Arc::from("c2");
        }
        let log = [lock(0, 1, 10), lock(1, 2, 100), relock];
        let mut shard = Shard::new(config());
        for command in &log {
            shard.apply(command.clone());
        }
        let holders = &views_by_key(shard.lock_views())["k"].holders;
        assert_eq!(
            holders[0].deadline,
            Tick::from_millis(150),
            "restarted at 50 ms"
        );
        let late = BTreeSet::from([2]);
        assert_eq!(kinds_excusing(&log, &late), Vec::<&str>::new());
    }

    #[test]
    fn a_restart_ends_waiters_and_ephemeral_grants_and_keeps_the_rest() {
        // Client 1 holds "k" for 500 ms, 2 waits for it, 3 holds "e"
        // ephemerally; the server restarts at 100 ms. The waiter and the
        // ephemeral grant are gone, unanswered; the lease of 1 runs on and
        // ends at 500 ms with nobody to hand the key to; a new request,
        // whose handle 2 the new process reuses, is served in its turn.
        let log = [
            lock(0, 1, 500),
            lock(1, 2, 100),
            lock_ephemeral(2, 3, "e", 500),
            restart(100),
            lock(200, 2, 100),
            at_ms(500, Input::Tick),
            at_ms(600, Input::Tick),
        ];
        assert_eq!(kinds(&log), Vec::<&str>::new());
    }

    /// Like [`lock`], in `mode` with a lock delay of `delay_ms`.
    fn lock_as(ms: u64, n: u64, ttl_ms: u64, mode: Mode, delay_ms: u64) -> Command {
        let mut command = lock(ms, n, ttl_ms);
        if let Input::Op {
            op: ShardOp::Lock(LockOp::Acquire(acquire)),
            ..
        } = &mut command.input
        {
            acquire.mode = mode;
            acquire.lock_delay_ms = delay_ms;
        }
        command
    }

    #[test]
    fn a_lock_delay_holds_the_key_back_and_a_grant_inside_one_is_caught() {
        // 1 holds "k" for 100 ms with a delay of 50 ms; 2 waits, and is
        // granted at 150 ms, its lease measured from then.
        let log = [
            lock_as(0, 1, 100, Mode::MUTEX, 50),
            lock(1, 2, 100),
            at_ms(100, Input::Tick),
            at_ms(150, Input::Tick),
            at_ms(250, Input::Tick),
        ];
        assert_eq!(kinds(&log), Vec::<&str>::new());
        let _planted = planted::plant(Some(PlantedBug::LockDelayIgnored));
        assert!(kinds(&log).contains(&"server: grant in lock delay"));
    }

    #[test]
    fn a_semaphores_free_places_go_out_together_at_the_delays_end() {
        let two = Mode::Exclusive { limit: 2 };
        let log = [
            lock_as(0, 1, 100, two, 30),
            lock_as(0, 2, 100, two, 0),
            lock_as(1, 3, 100, two, 0),
            lock_as(2, 4, 100, two, 0),
            // Both leases end at 100 ms; the key waits out 1's delay and
            // hands both places on at 130 ms, in a command 5 ms late.
            at_ms(100, Input::Tick),
            at_ms(135, Input::Tick),
            at_ms(300, Input::Tick),
        ];
        assert_eq!(kinds(&log), Vec::<&str>::new());
    }

    /// `unlock` of `token` on "k", with request handle `n`.
    fn unlock(ms: u64, n: u64, token: u64) -> Command {
        let caller = Caller {
            client: Arc::from(format!("c{n}")),
            conn: n,
        };
        let op = ShardOp::Lock(LockOp::Release {
            key: "k".into(),
            token,
        });
        at_ms(
            ms,
            Input::Op {
                handle: Handle(n),
                caller,
                op,
            },
        )
    }

    /// `command`, a lock request, waiting at most `wait_ms`.
    fn waiting_up_to(mut command: Command, wait_ms: u64) -> Command {
        if let Input::Op {
            op: ShardOp::Lock(LockOp::Acquire(acquire)),
            ..
        } = &mut command.input
        {
            acquire.wait = Wait::UpTo(wait_ms);
        }
        command
    }

    #[test]
    fn a_late_command_lets_each_waiter_of_a_semaphore_in_when_its_own_place_frees() {
        // Seed 5742 of 10,000: two places, whose leases end at 100 and 150
        // ms; two waiters. A command late at 300 ms (after a full disk)
        // lets the first in at 100 ms and the second at 150 ms, each lease
        // measured from there (not both from the first place's end).
        let two = Mode::Exclusive { limit: 2 };
        let log = [
            lock_as(0, 1, 100, two, 0),
            lock_as(0, 2, 150, two, 0),
            waiting_up_to(lock_as(1, 3, 500, two, 0), 1_000),
            waiting_up_to(lock_as(2, 4, 500, two, 0), 1_000),
            at_ms(300, Input::Tick),
            at_ms(700, Input::Tick),
        ];
        let late = BTreeSet::from([4]);
        assert_eq!(kinds_excusing(&log, &late), Vec::<&str>::new());
        let _planted = planted::plant(Some(PlantedBug::LeaseFromRequest));
        assert!(kinds_excusing(&log, &late).contains(&"server: lease length"));
    }

    #[test]
    fn a_late_command_lets_a_place_freed_by_its_own_unlock_go_at_its_own_time() {
        // Seed 4753: of two places, one runs out at 100 ms and the other is
        // unlocked by the command late at 300 ms: the first waiter is let
        // in at 100 ms, the second at 300 ms.
        let two = Mode::Exclusive { limit: 2 };
        let log = [
            lock_as(0, 1, 100, two, 0),
            lock_as(0, 2, 1_000, two, 0),
            lock_as(1, 3, 500, two, 0),
            lock_as(2, 4, 500, two, 0),
            unlock(300, 5, 2),
            at_ms(900, Input::Tick),
        ];
        assert_eq!(
            kinds_excusing(&log, &BTreeSet::from([4])),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn a_late_command_lets_a_writer_in_only_when_the_last_reader_leaves() {
        // Seed 6065: two readers whose leases end at 100 and 150 ms, and a
        // writer waiting; a command late at 300 ms lets the writer in at
        // 150 ms, when the last reader's lease ran out.
        let log = [
            lock_as(0, 1, 100, Mode::Shared, 0),
            lock_as(0, 2, 150, Mode::Shared, 0),
            lock_as(1, 3, 500, Mode::MUTEX, 0),
            at_ms(300, Input::Tick),
            at_ms(700, Input::Tick),
        ];
        assert_eq!(
            kinds_excusing(&log, &BTreeSet::from([3])),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn a_restart_does_not_make_a_hand_off_late() {
        // The lease of 1 ran out at 100 ms, before the process died; the
        // restarted shard's clock goes on from 130 ms, and the restart
        // applies it: late, as the server could not help.
        let log = [lock(0, 1, 100), lock(1, 2, 100), restart(130)];
        assert_eq!(kinds(&log), Vec::<&str>::new());
    }

    #[test]
    fn the_first_command_after_a_refused_batch_may_hand_off_late() {
        let log = [lock(0, 1, 100), lock(1, 2, 100), at_ms(150, Input::Tick)];
        assert_eq!(
            kinds_excusing(&log, &BTreeSet::from([2])),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn a_set_renewed_and_left_to_expire_keeps_rule_8_across_a_restart() {
        // Set up for 100 ms, renewed at 50 ms for 100 ms more, a restart
        // at 120 ms, gone at 150 ms; set up again at 160 ms.
        let log = [
            set_up(0, 1, 100),
            set_up(50, 2, 100),
            at_ms(100, Input::Tick),
            restart(120),
            at_ms(149, Input::Tick),
            at_ms(150, Input::Tick),
            set_up(160, 3, 10),
            at_ms(200, Input::Tick),
        ];
        assert_eq!(kinds(&log), Vec::<&str>::new());
    }

    #[test]
    fn a_cancel_answers_the_waiting_request_and_an_ignored_one_is_caught() {
        let cancel = Input::Cancel {
            handle: Handle(2),
            key: "k".into(),
        };
        let log = [lock(0, 1, 500), lock(1, 2, 100), at_ms(2, cancel)];
        assert_eq!(kinds(&log), Vec::<&str>::new());
        let _planted = planted::plant(Some(PlantedBug::CancelIgnored));
        assert!(kinds(&log).contains(&"server: cancel ignored"));
    }

    #[test]
    fn counters_agree_with_the_answers_and_a_busy_left_uncounted_is_caught() {
        let mut try_lock = lock(1, 2, 100);
        if let Input::Op {
            op: ShardOp::Lock(LockOp::Acquire(acquire)),
            ..
        } = &mut try_lock.input
        {
            acquire.wait = Wait::Never;
        }
        let log = [
            lock(0, 1, 500),
            try_lock,
            set_up(2, 3, 10),
            at_ms(20, Input::Tick),
            // A lease that runs out, and an ephemeral lock whose
            // connection closes: an expiry and a disconnect.
            at_ms(600, Input::Tick),
            lock_ephemeral(601, 4, "e", 1_000),
            at_ms(602, Input::ConnectionClosed { conn: 4 }),
        ];
        assert_eq!(kinds(&log), Vec::<&str>::new());
        let mut counters = Shard::new(config());
        for command in &log {
            counters.apply(command.clone());
        }
        let counted = counters.counters().locks;
        assert_eq!((counted.expiries, counted.disconnects), (1, 1));
        let _planted = planted::plant(Some(PlantedBug::BusyUncounted));
        assert_eq!(kinds(&log), vec!["server: counters disagree"]);
    }

    /// Inserts `key` into set "s" for client `n`, with request handle `n`.
    fn insert(ms: u64, n: u64, key: &str) -> Command {
        let caller = Caller {
            client: Arc::from(format!("c{n}")),
            conn: n,
        };
        let op = ShardOp::Set(SetOp::Insert {
            set: "s".into(),
            keys: deadbolt_core::proto::Keys::One(key.into()),
        });
        at_ms(
            ms,
            Input::Op {
                handle: Handle(n),
                caller,
                op,
            },
        )
    }

    fn kinds_with(log: &[Command], limits: Limits) -> Vec<&'static str> {
        let late_ok = BTreeSet::new();
        let timing = Timing::for_sync_latency(Duration::ZERO, &late_ok);
        let config = ShardConfig { limits, ..config() };
        check(0, log, config, timing)
            .iter()
            .map(Violation::kind)
            .collect()
    }

    #[test]
    fn refusals_at_the_limits_keep_rule_12_and_an_overfilled_set_is_caught() {
        let limits = Limits {
            set_members_max: 2,
            waiters_per_key_max: 1,
            ..Limits::default()
        };
        let log = [
            set_up(0, 1, 10_000),
            insert(1, 2, "a"),
            insert(2, 3, "b"),
            // Refused: the set is full.
            insert(3, 4, "c"),
            lock(4, 5, 1_000),
            lock(5, 6, 1_000),
            // Refused: the one place in the queue is taken.
            lock(6, 7, 1_000),
        ];
        assert_eq!(kinds_with(&log, limits), Vec::<&str>::new());
        let _planted = planted::plant(Some(PlantedBug::SetOverfilled));
        assert!(kinds_with(&log, limits).contains(&"server: capacity"));
    }

    #[test]
    fn an_overloaded_answer_below_every_limit_is_caught() {
        // A shard that refuses the second member of a set allowed two: one
        // that runs with a lower limit than the one it was configured with.
        let limits = |set_members_max| Limits {
            set_members_max,
            ..Limits::default()
        };
        let mut shard = Shard::new(ShardConfig {
            limits: limits(1),
            ..config()
        });
        let mut capacity = Capacity::new(limits(2));
        let mut broken = Vec::new();
        for command in [set_up(0, 1, 10_000), insert(1, 2, "a"), insert(2, 3, "b")] {
            let (locks_before, sets_before) = (views_by_key(shard.lock_views()), shard.set_views());
            shard.apply(command.clone());
            let answers = shard.take_answers();
            let (locks_after, sets_after) = (views_by_key(shard.lock_views()), shard.set_views());
            let before = State {
                locks: &locks_before,
                sets: &sets_before,
            };
            let after = State {
                locks: &locks_after,
                sets: &sets_after,
            };
            broken.extend(capacity.command(&command.input, &answers, &before, &after));
        }
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert!(broken[0].contains("below every limit"), "{broken:?}");
    }

    #[test]
    fn an_unheard_grant_ends_with_its_requester_gone_and_one_kept_is_caught() {
        let log = [
            lock(0, 1, 1_000),
            lock(1, 2, 1_000),
            // The holder unlocks: request 2 is granted token 2...
            unlock(2, 3, 1),
            // ...and nobody hears of it.
            at_ms(
                3,
                Input::RequesterGone {
                    handle: Handle(2),
                    key: "k".into(),
                },
            ),
        ];
        assert_eq!(kinds(&log), Vec::<&str>::new());
        let _planted = planted::plant(Some(PlantedBug::UnheardGrantKept));
        assert!(kinds(&log).contains(&"server: unheard grant kept"));
    }

    #[test]
    fn a_set_that_ignores_its_renewal_is_caught() {
        let _planted = planted::plant(Some(PlantedBug::SetRenewalIgnored));
        let log = [
            set_up(0, 1, 100),
            set_up(50, 2, 100),
            at_ms(120, Input::Tick),
        ];
        assert!(kinds(&log).contains(&"server: set lifetime"));
    }

    #[test]
    fn a_restart_that_keeps_an_ephemeral_lock_is_caught() {
        let _planted = planted::plant(Some(PlantedBug::RestartKeepsEphemeral));
        let log = [lock_ephemeral(0, 1, "e", 500), restart(100)];
        assert_eq!(kinds(&log), ["server: restart kept waiter or ephemeral"]);
    }

    #[test]
    fn waiters_granted_in_order_and_on_time_keep_every_rule() {
        // Client 1 holds for 100 ms; 2 and 3 wait; the shard wakes at each
        // deadline.
        let log = [
            lock(0, 1, 100),
            lock(1, 2, 100),
            lock(2, 3, 100),
            at_ms(100, Input::Tick),
            at_ms(200, Input::Tick),
            at_ms(300, Input::Tick),
        ];
        assert_eq!(kinds(&log), Vec::<&str>::new());
    }

    #[test]
    fn a_hand_off_late_after_the_deadline_is_caught() {
        let log = [lock(0, 1, 100), lock(1, 2, 100), at_ms(150, Input::Tick)];
        assert_eq!(kinds(&log), ["server: late hand-off"]);
    }

    #[test]
    fn a_waiter_granted_out_of_turn_is_caught() {
        let _planted = planted::plant(Some(PlantedBug::GrantOutOfOrder));
        let log = [
            lock(0, 1, 100),
            lock(1, 2, 100),
            lock(2, 3, 100),
            at_ms(100, Input::Tick),
        ];
        assert_eq!(kinds(&log), ["server: queue jumped"]);
    }
}
