//! The shard state machine: pure, synchronous, sans-IO.
//!
//! A [`Shard`] owns the locks, wait queues and distinct sets of the keys
//! hashed to it. It never reads a clock (every call takes `now`), never does
//! I/O and draws no randomness; it reports its next deadline so that its
//! driver knows when to call [`Shard::advance`]. Replies go through a
//! [`Responder`], which a queued `lock` keeps until it is granted, times
//! out or is cancelled: waiters are data, not blocked tasks.
//!
//! Layout: [`locks`] (SPEC section 2), [`sets`] (SPEC section 3) and the
//! deadline heap in `timers`.

pub mod hasher;
pub mod locks;
pub mod sets;
mod timers;
mod top;

use std::sync::Arc;

use hasher::KeyHasher;

use crate::limits::ShardLimits;
use crate::proto::{HeldLock, LockOp, Outcome, RequestId, SetOp, SetSummary};
use crate::time::Tick;
use locks::{LockStats, Locks};
use sets::{SetStats, Sets};

/// A client id (SPEC section 1), shared by every grant and waiter of the
/// connection that carries it.
pub type ClientId = Arc<str>;

/// Names one connection for the life of the engine.
pub type ConnId = u64;

/// Where a reply goes.
pub trait Responder {
    /// Whether the requester has gone away, so that answering is pointless
    /// (and a waiter must be skipped, never granted).
    fn is_closed(&self) -> bool;

    /// Delivers the outcome. Returns `false` if the requester was gone, in
    /// which case a grant it carried is undone.
    fn respond(self, outcome: Outcome) -> bool;
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The client id bound to the connection.
    pub client: ClientId,
    /// The connection the request came on.
    pub conn: ConnId,
    /// The request's id on that connection.
    pub request: RequestId,
}

/// The operations a shard carries out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardOp {
    /// An operation on a lock key.
    Lock(LockOp),
    /// An operation on a distinct set.
    Set(SetOp),
}

/// How to build a shard.
#[derive(Debug, Clone, Copy)]
pub struct ShardConfig {
    /// Seeds the shard's hash tables. Iteration order (and so the order of
    /// some replies) depends on it: the same seed gives the same run.
    pub hash_seed: u64,
    /// The token of the shard's first grant. Starting each run above the
    /// last run's tokens keeps tokens rising across restarts.
    pub first_token: u64,
    /// The capacity bounds this shard enforces.
    pub limits: ShardLimits,
}

/// A shard's counters and current sizes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Lock counters.
    pub locks: LockStats,
    /// Set counters.
    pub sets: SetStats,
    /// Keys held now.
    pub held: usize,
    /// Waiters queued now.
    pub waiters: usize,
    /// Sets alive now.
    pub set_count: usize,
    /// Members over all sets now.
    pub members: usize,
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
pub struct Shard<R> {
    locks: Locks<R>,
    sets: Sets,
    /// The latest `now` seen; time never runs backwards inside the shard.
    now: Tick,
}

impl<R: Responder> Shard<R> {
    /// An empty shard.
    pub fn new(config: ShardConfig) -> Self {
        let hasher = KeyHasher::with_seed(config.hash_seed);
        Shard {
            locks: Locks::new(hasher, config.first_token, config.limits),
            sets: Sets::new(hasher, config.limits),
            now: Tick::ZERO,
        }
    }

    /// Applies due deadlines, then carries out `op` for `caller` at `now`.
    pub fn handle(&mut self, now: Tick, caller: Caller, op: ShardOp, reply: R) {
        let now = self.advance(now);
        match op {
            ShardOp::Lock(op) => self.locks.handle(now, caller, op, reply),
            ShardOp::Set(op) => {
                reply.respond(self.sets.handle(now, &caller.client, op));
            }
        }
    }

    /// Cancels `conn`'s request `request`, a `lock` on `key`, if it is still
    /// waiting: it is answered `cancelled`. Returns whether it was waiting.
    pub fn cancel(&mut self, now: Tick, conn: ConnId, request: RequestId, key: &str) -> bool {
        self.advance(now);
        self.locks.cancel(conn, request, key)
    }

    /// The connection `conn` closed: its waiters leave their queues and its
    /// ephemeral locks are released.
    pub fn close_connection(&mut self, now: Tick, conn: ConnId) {
        let now = self.advance(now);
        self.locks.close_connection(now, conn);
    }

    /// Applies every deadline due at or before `now`, each at its own tick:
    /// leases end and pass to the next waiter, waits time out, sets expire.
    /// Returns the shard's time, which never runs backwards.
    pub fn advance(&mut self, now: Tick) -> Tick {
        self.now = self.now.max(now);
        self.locks.advance(self.now);
        self.sets.advance(self.now);
        self.now
    }

    /// When [`Shard::advance`] should next be called.
    pub fn next_deadline(&self) -> Option<Tick> {
        match (self.locks.next_deadline(), self.sets.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Answers every waiter `shutting_down` and drops all state.
    pub fn shutdown(&mut self) {
        self.locks.shutdown();
    }

    /// Counters and sizes.
    pub fn stats(&self) -> ShardStats {
        ShardStats {
            locks: self.locks.stats(),
            sets: self.sets.stats(),
            held: self.locks.held(),
            waiters: self.locks.waiters(),
            set_count: self.sets.count(),
            members: self.sets.members_total(),
        }
    }

    /// The `top` most waited-for held locks, the `top` most contended keys
    /// and the `top` largest sets, for `stats`.
    pub fn snapshot(&self, now: Tick, top: usize) -> Snapshot {
        let now = now.max(self.now);
        let (held, contended) = self.locks.top(now, top);
        Snapshot {
            held,
            contended,
            largest_sets: self.sets.top(now, top),
        }
    }

    /// Checks the shard's internal invariants; for tests and the simulation.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.locks.check_invariants()?;
        self.sets.check_invariants()
    }
}
