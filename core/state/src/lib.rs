//! deadbolt-state: the shard state machine, deterministic, synchronous,
//! sans-IO. This crate depends on no async runtime and reads no clock, so
//! the compiler keeps it pure; the engine (in `deadbolt-core`) drives it.
//!
//! A [`Shard`] owns the locks, wait queues and distinct sets of the keys
//! placed on it. Its only input is a [`Command`]: an [`Input`] stamped with
//! the time at which it was ordered (by the engine's actor on one node; by
//! a log's leader later). Its outputs are [`Answer`]s to request handles,
//! which its driver drains after each batch with [`Shard::take_answers`],
//! and the next deadline ([`Shard::next_deadline`]), at which the driver
//! submits [`Input::Tick`]. It never reads a clock, a channel or randomness,
//! and never learns whether an answer was delivered: a driver that finds a
//! requester gone says so with [`Input::RequesterGone`]. So its state is a
//! pure function of its commands: replaying them into a fresh shard gives
//! the same state, whatever the hash seed ([`Shard::digest`] checks it).
//! That is what makes a write-ahead log and replication possible.
//!
//! Waiters are data, not blocked tasks: a queued `lock` is a [`Handle`]
//! that is answered exactly once, when it is granted, times out, is
//! cancelled or its requester goes away.
//!
//! Durability rests on the same property: a storage layer logs commands,
//! now and then writes a snapshot of the whole state ([`Shard::image`], a
//! [`image::ShardImage`] that does not depend on the hash seed) and
//! recovers with [`Shard::from_image`] and the log's tail, then applies
//! [`Input::Restart`], which ends what did not survive the old process.
//!
//! Layout: [`locks`] (SPEC section 2: the rules, beside their containers),
//! [`sets`] (SPEC section 3), the deadline heap in `timers`, [`image`]
//! (snapshots: the image types, taking and restoring one), and
//! [`hasher`] (the seeded table hash and the stable placement hash),
//! [`time`] (ticks, the shard's notion of time), and [`planted`] (bugs
//! the simulation plants to prove its checker, compiled only with the
//! `planted-bugs` feature).

pub mod claims;
pub mod events;
pub mod hasher;
pub mod image;
pub mod locks;
pub mod planted;
pub mod sets;
pub mod time;
mod timers;
mod top;

use std::sync::Arc;

use hasher::{KeyHasher, StableHasher};

use crate::time::Tick;
use claims::Claims;
use deadbolt_proto::limits::Limits;
use deadbolt_proto::{HeldLock, LockCounters, LockOp, Outcome, SetCounters, SetOp, SetSummary};
use locks::{KeyView, Locks};
use planted::PlantedBug;
use sets::Sets;

/// A client id (SPEC section 1), shared by every grant and waiter of the
/// connection that carries it.
pub type ClientId = Arc<str>;

/// Names one connection for the life of the engine.
pub type ConnId = u64;

/// Names one request for as long as it may be answered. The driver picks
/// it (unique among the requests it has in flight) and it travels in the
/// command, so a replay answers the same handles.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Handle(pub u64);

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The client id bound to the connection.
    pub client: ClientId,
    /// The connection the request came on.
    pub conn: ConnId,
}

/// The operations a shard carries out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardOp {
    /// An operation on a lock key.
    Lock(LockOp),
    /// An operation on a distinct set.
    Set(SetOp),
    /// With authentication on, `principal` says `hello` with `client`:
    /// the first principal to claim a client id owns it (see [`claims`]).
    /// Not a wire op: the session makes it from a `hello`.
    Claim {
        /// The client id claimed.
        client: String,
        /// The name of the principal that claims it.
        principal: String,
    },
}

impl ShardOp {
    /// The key (or set name) that places this operation on a shard.
    pub fn routing_key(&self) -> &str {
        match self {
            ShardOp::Lock(op) => op.key(),
            ShardOp::Set(op) => op.set(),
            ShardOp::Claim { client, .. } => client,
        }
    }
}

/// One input to a shard, ordered and stamped with its time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// When it was ordered. Deadlines up to this time are applied first,
    /// each at its own tick.
    pub at: Tick,
    /// What happened.
    pub input: Input,
}

/// What a shard is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Carry out `op` for `caller`; the answer goes to `handle`.
    Op {
        /// Where the answer goes.
        handle: Handle,
        /// Who asked.
        caller: Caller,
        /// What was asked.
        op: ShardOp,
    },
    /// The `cancel` op: the waiting `lock` `handle` on `key`, if it still
    /// waits, is answered `cancelled`.
    Cancel {
        /// The waiting request.
        handle: Handle,
        /// Its key.
        key: String,
    },
    /// Nobody listens for request `handle` on `key` any more (its future
    /// was dropped, or its answer could not be delivered). A waiter leaves
    /// its queue; a grant whose answer was all its holder heard of it is
    /// undone.
    RequesterGone {
        /// The request.
        handle: Handle,
        /// Its key.
        key: String,
    },
    /// Connection `conn` closed: its waiters leave their queues and its
    /// ephemeral locks are released.
    ConnectionClosed {
        /// The connection.
        conn: ConnId,
    },
    /// Only time passed: apply the deadlines due by the command's time.
    Tick,
    /// The process restarted, and this shard was recovered (from a
    /// snapshot and the log): applied once, before anything else the new
    /// process does. What lived only in the old process ends, unanswered
    /// (SPEC section 8: ephemeral locks and waiters do not survive a
    /// restart):
    /// - every waiter leaves its queue without an answer: its requester
    ///   died with the old process, and the new driver has no handle for
    ///   it;
    /// - every ephemeral lock is released (its connection is gone); the
    ///   others keep their tokens and deadlines;
    /// - every grant forgets the request that made it, so that an
    ///   undelivered answer no longer undoes it: handles restart with the
    ///   process;
    /// - the next token becomes at least `token_floor`.
    ///
    /// Deadlines due by the command's time are applied first, as for every
    /// command; the restart itself gives no answers. Stamped with the
    /// recovered shard's own time ([`Shard::now`]), it finds nothing due:
    /// stamped later, a lease that ends first could hand its key to a
    /// waiter of the old process, a grant nobody hears of that then lasts
    /// its lease.
    Restart {
        /// The lowest token the new process may grant: above every token
        /// the old one may have granted (the storage reserves token ranges
        /// durably), so that tokens never repeat or go down across a
        /// restart, even when the log's tail was lost.
        token_floor: u64,
    },
}

/// An answer to a request handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The request answered.
    pub handle: Handle,
    /// Its outcome.
    pub outcome: Outcome,
}

/// How to build a shard.
#[derive(Debug, Clone, Copy)]
pub struct ShardConfig {
    /// Seeds the shard's hash tables against crafted collisions. The state
    /// a shard reaches does not depend on it.
    pub hash_seed: u64,
    /// The token of the shard's first grant. Starting each run above the
    /// last run's tokens keeps tokens rising across restarts. Ignored by
    /// [`Shard::from_image`]: the image has its next token.
    pub first_token: u64,
    /// The capacity bounds this shard enforces.
    pub limits: Limits,
}

/// Counters since the start and sizes now, of a shard or of all shards:
/// what `stats` and `/metrics` report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Lock counters and sizes.
    pub locks: LockCounters,
    /// Set counters and sizes.
    pub sets: SetCounters,
}

impl Counters {
    /// Adds another shard's counters to these.
    pub fn merge(&mut self, other: &Counters) {
        self.locks.merge(&other.locks);
        self.sets.merge(&other.sets);
    }
}

/// A shard's part of a `stats` reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Held locks, most waited-for first.
    pub held: Vec<HeldLock>,
    /// Keys with waiters, most waiters first.
    pub contended: Vec<HeldLock>,
    /// Sets, largest first.
    pub largest_sets: Vec<SetSummary>,
}

/// The state of one shard. See the module docs.
#[derive(Debug)]
pub struct Shard {
    locks: Locks,
    sets: Sets,
    /// The owners of the client ids placed on this shard.
    claims: Claims,
    /// Answers not yet taken by the driver.
    answers: Vec<Answer>,
    /// Events not yet taken by the driver (see [`events`]).
    events: Vec<events::Event>,
    /// The latest command time seen; time never runs backwards inside the
    /// shard.
    now: Tick,
}

impl Shard {
    /// An empty shard.
    pub fn new(config: ShardConfig) -> Self {
        let hasher = KeyHasher::with_seed(config.hash_seed);
        Shard {
            locks: Locks::new(hasher, config.first_token, config.limits),
            sets: Sets::new(hasher, config.limits),
            claims: Claims::default(),
            answers: Vec::new(),
            events: Vec::new(),
            now: Tick::ZERO,
        }
    }

    /// Applies the deadlines due by `command.at`, each at its own tick,
    /// then the command's input. Answers wait in the shard until
    /// [`Shard::take_answers`].
    pub fn apply(&mut self, command: Command) {
        let now = self.advance(command.at);
        match command.input {
            Input::Op {
                handle,
                caller,
                op: ShardOp::Lock(op),
            } => self.locks.handle(now, handle, caller, op),
            Input::Op {
                handle,
                caller,
                op: ShardOp::Set(op),
            } => {
                let outcome = self.sets.handle(now, &caller.client, op);
                self.answers.push(Answer { handle, outcome });
            }
            Input::Op {
                handle,
                op: ShardOp::Claim { client, principal },
                ..
            } => {
                let outcome = self.claims.claim(&client, &principal);
                self.answers.push(Answer { handle, outcome });
            }
            Input::Cancel { handle, key } => self.locks.cancel(now, handle, &key),
            Input::RequesterGone { handle, key } => self.locks.requester_gone(now, handle, &key),
            Input::ConnectionClosed { conn } => self.locks.close_connection(now, conn),
            Input::Restart { token_floor } => self.locks.restart(token_floor),
            Input::Tick => {}
        }
        self.answers.append(self.locks.answers());
        self.locks.drain_events_into(&mut self.events);
        self.sets.drain_events_into(&mut self.events);
    }

    /// From now on, reports the changes it makes as [`events::Event`]s,
    /// taken with [`Shard::drain_events_into`]. Changes no state: a driver
    /// turns this on when its first listener arrives.
    pub fn enable_events(&mut self) {
        self.locks.enable_events();
        self.sets.enable_events();
    }

    /// Where the grant `token` of the lock `key` stands in this shard.
    pub fn grant_status(&self, key: &str, token: u64) -> events::GrantStatus {
        self.locks.grant_status(key, token)
    }

    /// Moves the events reported since the last call into `into`, in the
    /// order they happened (lock events of a command before its set
    /// events: they never concern the same name).
    pub fn drain_events_into(&mut self, into: &mut Vec<events::Event>) {
        into.append(&mut self.events);
    }

    /// Applies every deadline due at or before `at`, each at its own tick:
    /// leases end and pass to the next waiter, waits time out, sets expire.
    /// Returns the shard's time, which never runs backwards.
    fn advance(&mut self, at: Tick) -> Tick {
        self.now = self.now.max(at);
        self.locks.advance(self.now);
        self.sets.advance(self.now);
        self.now
    }

    /// The answers given since the last call, in the order given.
    pub fn take_answers(&mut self) -> Vec<Answer> {
        std::mem::take(&mut self.answers)
    }

    /// Moves the answers given since the last call into `into`, keeping
    /// the shard's buffer for the next batch.
    pub fn drain_answers_into(&mut self, into: &mut Vec<Answer>) {
        into.append(&mut self.answers);
    }

    /// When an [`Input::Tick`] should next be applied (possibly early: a
    /// deadline that has since moved leaves a stale wake-up behind).
    pub fn next_deadline(&self) -> Option<Tick> {
        if planted::active(PlantedBug::DeafWakeup) && self.sets.next_deadline().is_some() {
            return self.sets.next_deadline();
        }
        match (self.locks.next_deadline(), self.sets.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// From now on, enforces `limits` (this shard's share). A replay sets
    /// the limits each run of the server had, so that it refuses exactly
    /// what that run refused.
    pub fn set_limits(&mut self, limits: Limits) {
        self.locks.set_limits(limits);
        self.sets.set_limits(limits);
    }

    /// The shard's time: the latest command time it has seen.
    pub fn now(&self) -> Tick {
        self.now
    }

    /// The token the next grant gets: what a storage layer reserves token
    /// ranges above (see [`Input::Restart`]).
    pub fn next_token(&self) -> u64 {
        self.locks.next_token()
    }

    /// Answers every waiter `shutting_down` and drops all lock state. Not a
    /// command: it ends this process's copy of the state, not the state.
    pub fn shutdown(&mut self) {
        self.locks.shutdown();
        self.answers.append(self.locks.answers());
    }

    /// Counters and sizes.
    pub fn counters(&self) -> Counters {
        Counters {
            locks: self.locks.counters(),
            sets: self.sets.counters(),
        }
    }

    /// The `top` most waited-for held locks, the `top` most contended keys
    /// and the `top` largest sets, for `stats`, as of the shard's time.
    pub fn snapshot(&self, top: usize) -> Snapshot {
        let (held, contended) = self.locks.top(self.now, top);
        Snapshot {
            held,
            contended,
            largest_sets: self.sets.top(self.now, top),
        }
    }

    /// A number that sums up the whole state (locks, waiters, sets, token
    /// and id counters, the shard's time), the same for the same state
    /// whatever the hash seed; for replay checks.
    pub fn digest(&self) -> u64 {
        let mut digest = StableHasher::default();
        digest.u64(self.now.0);
        self.locks.digest(&mut digest);
        self.sets.digest(&mut digest);
        self.claims.digest(&mut digest);
        digest.finish()
    }

    /// The principal that owns `client`, if it is placed on this shard and
    /// owned.
    pub fn owner(&self, client: &str) -> Option<&str> {
        self.claims.owner(client)
    }

    /// Every key with lock state, in key order, as a checker outside the
    /// rules sees it (holders with their deadlines, waiters in queue
    /// order). Read-only, and a full scan: for tests and the simulation,
    /// which replays a log and compares the views around each command.
    pub fn lock_views(&self) -> Vec<KeyView> {
        self.locks.views()
    }

    /// Every set, in name order, with when it ends: read-only and a full
    /// scan, for tests and the simulation, as [`Shard::lock_views`].
    pub fn set_views(&self) -> Vec<sets::SetView> {
        self.sets.views()
    }

    /// Checks the shard's internal invariants; for tests and the simulation.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.locks.check_invariants()?;
        self.sets.check_invariants()
    }
}
