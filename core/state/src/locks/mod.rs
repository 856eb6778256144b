//! Leased mutexes (SPEC section 2): the rules. Who is granted a key and
//! when, what a token authorises, how leases and waits end.
//!
//! The containers these rules work on live beside them: [`holders`] (a
//! key's grants, a set), [`queue`] (its waiters, first come first), and
//! [`conns`] (which keys each connection touches); [`audit`] holds the
//! invariants, the state digest and the `stats` top lists, and `image`
//! the locks' part of a snapshot.
//!
//! A key has an entry only while it is held or waited on; a free key costs
//! nothing, and the shard-wide token counter (not the entry) is what keeps
//! a key's tokens rising after its entry is dropped. Every request handle
//! is answered exactly once, through [`Books::answer`].

mod audit;
mod conns;
mod contention;
mod holders;
mod image;
mod queue;

use std::hash::BuildHasher;

use hashbrown::HashTable;

use super::hasher::KeyHasher;
use super::timers::{Timer, Timers};
use super::{Answer, Caller, ClientId, ConnId, Handle};
use crate::events::{Ending, LockChange, Outbox};
use crate::image::Deadline;
use crate::planted::{self, PlantedBug};
use crate::time::Tick;
use conns::ConnIndex;
use contention::Contention;
use deadbolt_proto::limits::Limits;
use deadbolt_proto::{
    Acquire, Extended, Granted, HolderInfo, LockCounters, LockInfo, LockOp, Mode, ModeName, Okay,
    Outcome, ServerError, Wait,
};
use holders::{Holder, Holders};
use queue::{WaitQueue, Waiter};

/// One key's lock state as a checker outside the rules sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyView {
    /// The key.
    pub key: String,
    /// How many exclusive holders it admits.
    pub limit: u32,
    /// Until when nobody is granted it (a lock delay), if that is now.
    pub delayed_until: Option<Tick>,
    /// Its grants.
    pub holders: Vec<HolderView>,
    /// Its waiters, first come first.
    pub waiters: Vec<WaiterView>,
}

/// One grant of a key, seen from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderView {
    /// The holder's client id.
    pub client: ClientId,
    /// The connection that took (or last re-took) it.
    pub conn: ConnId,
    /// Its fencing token.
    pub token: u64,
    /// When its lease ends.
    pub deadline: Tick,
    /// Whether it ends with its connection.
    pub ephemeral: bool,
    /// Whether it is held shared.
    pub shared: bool,
    /// How long nobody is granted the key after its lease runs out.
    pub lock_delay_ms: u64,
}

/// One queued `lock` request, seen from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaiterView {
    /// Where its answer goes.
    pub handle: Handle,
    /// The connection it came on.
    pub conn: ConnId,
    /// When its wait runs out, if it has a limit.
    pub deadline: Option<Tick>,
    /// Whether it asks to hold the key shared.
    pub shared: bool,
}

/// A key's deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum LockDue {
    /// The lease of the grant with `token` ends.
    Lease { hash: u64, token: u64 },
    /// Waiter number `waiter` has waited its `wait_ms`.
    Wait { hash: u64, waiter: u64 },
    /// The lock delay of the key with `hash` ends.
    Delay { hash: u64 },
}

/// A key with lock state: held, waited on, or in a lock delay.
#[derive(Debug)]
struct LockEntry {
    key: Box<str>,
    holders: Holders,
    queue: WaitQueue,
    /// How many exclusive holders the key admits: set by the request that
    /// made the entry; every later one must agree while it has holders or
    /// waiters.
    limit: u32,
    /// While a lock delay runs: when it ends, with its timer's number.
    /// Boxed: 8 bytes on every key for what few keys ever have.
    delay: Option<Box<Deadline>>,
}

impl LockEntry {
    fn new(key: Box<str>, limit: u32) -> LockEntry {
        LockEntry {
            key,
            holders: Holders::default(),
            queue: WaitQueue::default(),
            limit,
            delay: None,
        }
    }

    /// Whether this entry's key has `hash`. A look-up by hash compares
    /// only 7 of its bits before calling its match, so a match that names
    /// no key, nor a token, waiter or timer number unique in the shard,
    /// must check the rest: else it may take another key, and which one
    /// depends on the seed.
    fn has_hash(&self, hasher: KeyHasher, hash: u64) -> bool {
        hasher.hash_one(&*self.key) == hash
    }

    fn is_vacant(&self) -> bool {
        self.holders.is_empty() && self.queue.is_empty() && self.delay.is_none()
    }

    /// Whether a request of this mode could be granted now, waiters aside:
    /// no lock delay runs, and the holders (who all hold in one mode) are
    /// all shared for a shared request, or all exclusive and fewer than
    /// the limit for an exclusive one.
    fn admits(&self, shared: bool) -> bool {
        if self.delay.is_some() {
            return false;
        }
        let Some(first) = self.holders.first() else {
            return true;
        };
        if planted::active(PlantedBug::SharedBesideExclusive) && shared {
            return true;
        }
        match (shared, first.shared) {
            (true, true) => true,
            (false, false) if self.limit > 1 && planted::active(PlantedBug::SemaphoreOverLimit) => {
                self.holders.len() <= self.limit as usize
            }
            (false, false) => self.holders.len() < self.limit as usize,
            _ => false,
        }
    }

    /// Why a request of `mode` may not join this key, if it may not: a
    /// key with holders or waiters keeps its limit.
    fn conflict(&self, mode: Mode) -> Option<ServerError> {
        if self.holders.is_empty() && self.queue.is_empty() {
            return None;
        }
        let (asked, limit) = (mode.limit(), self.limit);
        (asked != limit).then(|| {
            ServerError::conflict(format!(
                "the key is held or waited on with limit {limit}, not {asked} \
                 (a shared lock's limit is 1)"
            ))
        })
    }
}

/// `conflict`: the client holds the key in the other mode.
fn other_mode(held_shared: bool) -> ServerError {
    let held = if held_shared { "shared" } else { "exclusive" };
    ServerError::conflict(format!(
        "this client holds the key {held}; unlock it before asking for the other mode"
    ))
}

/// Everything but the table: split out so that an entry borrowed from the
/// table and this bookkeeping can be changed together.
#[derive(Debug)]
struct Books {
    timers: Timers<LockDue>,
    next_token: u64,
    next_waiter: u64,
    waiters: usize,
    /// Bytes of the keys in the table.
    key_bytes: usize,
    /// Grants held, over every key.
    held: usize,
    /// Keys in a lock delay.
    delays: usize,
    conns: ConnIndex,
    /// Waiters per key, ranked: the `stats` lists without a scan.
    contention: Contention,
    counters: LockCounters,
    limits: Limits,
    answers: Vec<Answer>,
    /// Grants made, leases restarted and grants ended, for pushed events.
    events: Outbox,
}

impl Books {
    fn answer(&mut self, handle: Handle, outcome: Outcome) {
        self.answers.push(Answer { handle, outcome });
    }

    fn take_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token = self.next_token.saturating_add(1);
        token
    }

    /// Starts tracking a holder's lease, whose end is at `ends`, and its
    /// connection, if ephemeral.
    fn bind(&mut self, holder: &mut Holder, ends: Tick, hash: u64) {
        let due = LockDue::Lease {
            hash,
            token: holder.token,
        };
        holder.deadline = self.timers.push(ends, due);
        if holder.ephemeral {
            self.conns.add(holder.conn, hash);
        }
    }

    /// Stops tracking a holder's connection.
    fn unbind(&mut self, holder: &Holder, hash: u64) {
        if holder.ephemeral {
            self.conns.remove(holder.conn, hash);
        }
    }

    /// A grant ended.
    fn holder_left(&mut self, holder: &Holder, hash: u64) {
        self.unbind(holder, hash);
        self.held -= 1;
    }

    fn waiter_left(&mut self, waiter: &Waiter, hash: u64) {
        self.waiters -= 1;
        self.conns.remove(waiter.conn, hash);
        self.contention.left(hash);
    }

    /// A waiter of `conn` joined the key with `hash`.
    fn waiter_joined(&mut self, conn: ConnId, hash: u64) {
        self.waiters += 1;
        self.conns.add(conn, hash);
        self.contention.joined(hash);
    }

    /// A new grant of a free place of `hash`'s key, `key`, answered to
    /// `handle`.
    fn grant(&mut self, handle: Handle, hash: u64, key: &str, request: GrantRequest) -> Holder {
        let mut holder = Holder {
            client: request.client,
            conn: request.conn,
            token: self.take_token(),
            deadline: Deadline::default(),
            ephemeral: request.ephemeral,
            shared: request.shared,
            lock_delay_ms: request.lock_delay_ms,
            granted_by: Some(handle),
        };
        self.counters.grants += 1;
        self.held += 1;
        self.bind(&mut holder, request.at.plus_millis(request.ttl_ms), hash);
        let change = LockChange::Granted {
            ttl_ms: request.ttl_ms,
        };
        self.events.lock(key, holder.token, request.at, change);
        let granted = Granted::new(holder.token, request.ttl_ms);
        self.answer(handle, Ok(Okay::Granted(granted)));
        holder
    }
}

/// What a grant is made of, from a fresh request or a waiter.
struct GrantRequest {
    client: super::ClientId,
    conn: ConnId,
    at: Tick,
    ttl_ms: u64,
    ephemeral: bool,
    shared: bool,
    lock_delay_ms: u64,
}

impl GrantRequest {
    /// The grant a waiter asked for, with its lease from `at`.
    fn of_waiter(waiter: Waiter, at: Tick) -> GrantRequest {
        GrantRequest {
            client: waiter.client,
            conn: waiter.conn,
            at,
            ttl_ms: waiter.ttl_ms,
            ephemeral: waiter.ephemeral,
            shared: waiter.shared,
            lock_delay_ms: waiter.lock_delay_ms,
        }
    }
}

/// The locks of one shard.
#[derive(Debug)]
pub(crate) struct Locks {
    table: HashTable<LockEntry>,
    hasher: KeyHasher,
    books: Books,
}

/// Gives free places of the key to waiters, first come first, at `at`,
/// for as long as the next waiter fits: a waiting exclusive request stops
/// the shared ones behind it (no writer starvation). A waiter whose wait
/// ran out at this very tick is answered `timeout`.
fn grant_next(entry: &mut LockEntry, hash: u64, at: Tick, books: &mut Books) {
    loop {
        let out_of_order = planted::active(PlantedBug::GrantOutOfOrder);
        let next = if out_of_order {
            entry.queue.back()
        } else {
            entry.queue.front()
        };
        let Some(next) = next else {
            return;
        };
        let timed_out = next.deadline.is_some_and(|deadline| deadline.at <= at);
        if !timed_out && !entry.admits(next.shared) {
            return;
        }
        let next = if out_of_order {
            entry.queue.pop_back()
        } else {
            entry.queue.pop_front()
        };
        let Some(waiter) = next else {
            return;
        };
        books.waiter_left(&waiter, hash);
        if timed_out {
            books.counters.timeouts += 1;
            books.answer(waiter.handle, Err(ServerError::timeout(waiter.wait_ms)));
            continue;
        }
        let client = waiter.client.clone();
        let handle = waiter.handle;
        let lease_from = lease_start(&waiter, at);
        let request = GrantRequest::of_waiter(waiter, lease_from);
        let holder = books.grant(handle, hash, &entry.key, request);
        entry.holders.insert(holder);
        answer_queued_relocks(entry, &client, hash, at, books);
    }
}

/// When a waiter's lease starts: at its grant (but see
/// [`PlantedBug::LeaseFromRequest`]).
fn lease_start(waiter: &Waiter, granted_at: Tick) -> Tick {
    match waiter.deadline {
        Some(deadline) if planted::active(PlantedBug::LeaseFromRequest) => Tick(
            deadline
                .at
                .0
                .saturating_sub(waiter.wait_ms.saturating_mul(1000)),
        ),
        _ => granted_at,
    }
}

/// After a grant to `client`, answers its other queued requests for the
/// same key as the re-locks they now are: same token, lease restarted.
/// (This is how a retry that was queued before the original got its grant
/// stops waiting behind its own lock.)
fn answer_queued_relocks(
    entry: &mut LockEntry,
    client: &super::ClientId,
    hash: u64,
    at: Tick,
    books: &mut Books,
) {
    if !entry
        .queue
        .iter()
        .any(|w| holders::same_client(&w.client, client))
    {
        return;
    }
    let relocks = entry
        .queue
        .take_where(|w| holders::same_client(&w.client, client));
    for waiter in relocks {
        books.waiter_left(&waiter, hash);
        let Some(holder) = entry.holders.by_client_mut(client) else {
            return;
        };
        if waiter.deadline.is_some_and(|deadline| deadline.at <= at) {
            books.counters.timeouts += 1;
            books.answer(waiter.handle, Err(ServerError::timeout(waiter.wait_ms)));
            continue;
        }
        if holder.shared != waiter.shared {
            books.answer(waiter.handle, Err(other_mode(holder.shared)));
            continue;
        }
        holder.lock_delay_ms = waiter.lock_delay_ms;
        relock(
            holder,
            &entry.key,
            waiter.conn,
            waiter.ttl_ms,
            waiter.ephemeral,
            at,
            hash,
            books,
        );
        let granted = Granted::new(holder.token, waiter.ttl_ms);
        books.answer(waiter.handle, Ok(Okay::Granted(granted)));
    }
}

/// The holder asks again (or extends): same token, lease restarted at
/// `ttl_ms`, bound to the connection that asked. It has now shown that it
/// knows of its grant, so an undelivered first answer no longer undoes it.
#[allow(clippy::too_many_arguments)] // the parts of a re-lock, each needed
fn relock(
    holder: &mut Holder,
    key: &str,
    conn: ConnId,
    ttl_ms: u64,
    ephemeral: bool,
    now: Tick,
    hash: u64,
    books: &mut Books,
) {
    books.unbind(holder, hash);
    holder.conn = conn;
    holder.ephemeral = ephemeral;
    holder.granted_by = None;
    books.bind(holder, now.plus_millis(ttl_ms), hash);
    books
        .events
        .lock(key, holder.token, now, LockChange::Leased { ttl_ms });
}

/// Ends the grant with `token` (for the reason `ending`) and hands the
/// key on, at `at`.
fn end_grant(
    entry: &mut LockEntry,
    token: u64,
    ending: Ending,
    hash: u64,
    at: Tick,
    books: &mut Books,
) {
    if let Some(holder) = entry.holders.remove_token(token) {
        books.holder_left(&holder, hash);
        books
            .events
            .lock(&entry.key, token, at, LockChange::Ended(ending));
    }
    grant_next(entry, hash, at, books);
}

/// A key that a deadline freed: `Some(hash)` if it has waiters to hand it
/// on to; else removed, if nothing is left of it.
fn freed_or_removed(
    occupied: hashbrown::hash_table::OccupiedEntry<'_, LockEntry>,
    hash: u64,
    books: &mut Books,
) -> Option<u64> {
    let entry = occupied.get();
    if !entry.queue.is_empty() {
        return Some(hash);
    }
    if entry.is_vacant() {
        books.key_bytes -= occupied.remove().0.key.len();
    }
    None
}

/// Starts (or lengthens) the key's lock delay: nobody is granted it
/// until `until`.
fn start_delay(entry: &mut LockEntry, hash: u64, until: Tick, books: &mut Books) {
    if entry.delay.as_ref().is_some_and(|d| d.at >= until) {
        return;
    }
    if entry.delay.is_none() {
        books.delays += 1;
    }
    let deadline = books.timers.push(until, LockDue::Delay { hash });
    entry.delay = Some(Box::new(deadline));
}

impl Locks {
    /// Enforces `limits` from now on.
    pub fn set_limits(&mut self, limits: Limits) {
        self.books.limits = limits;
    }

    /// An empty lock table whose first grant gets `first_token`.
    pub fn new(hasher: KeyHasher, first_token: u64, limits: Limits) -> Self {
        Locks {
            table: HashTable::new(),
            hasher,
            books: Books {
                timers: Timers::default(),
                next_token: first_token,
                next_waiter: 0,
                waiters: 0,
                key_bytes: 0,
                held: 0,
                delays: 0,
                conns: ConnIndex::new(hasher),
                contention: Contention::new(hasher),
                counters: LockCounters::default(),
                limits,
                answers: Vec::new(),
                events: Outbox::default(),
            },
        }
    }

    /// Reports grants, lease restarts and grant ends from now on.
    pub fn enable_events(&mut self) {
        self.books.events.enable();
    }

    /// Moves the events reported since the last call into `into`.
    pub fn drain_events_into(&mut self, into: &mut Vec<crate::events::Event>) {
        self.books.events.drain_into(into);
    }

    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The answers given since the last call.
    pub fn answers(&mut self) -> &mut Vec<Answer> {
        &mut self.books.answers
    }

    /// Carries out `op` for `caller` at `now`; the answer goes to `handle`,
    /// at once or, for a queued `lock`, when it is granted or gives up.
    pub fn handle(&mut self, now: Tick, handle: Handle, caller: Caller, op: LockOp) {
        let outcome = match op {
            LockOp::Acquire(acquire) => {
                self.acquire(now, handle, caller, acquire);
                None
            }
            LockOp::Release { key, token } => Some(self.release(now, &key, token, &caller.client)),
            LockOp::Extend { key, token, ttl_ms } => Some(self.extend(now, &key, token, ttl_ms)),
            LockOp::Inspect { key } => Some(Ok(Okay::LockInfo(self.inspect(now, &key)))),
        };
        if let Some(outcome) = outcome {
            self.books.answer(handle, outcome);
        }
        self.compact_timers();
    }

    fn acquire(&mut self, now: Tick, handle: Handle, caller: Caller, acquire: Acquire) {
        let hash = self.hash(&acquire.key);
        let hasher = self.hasher;
        let books = &mut self.books;
        let request = GrantRequest {
            client: caller.client,
            conn: caller.conn,
            at: now,
            ttl_ms: acquire.ttl_ms,
            ephemeral: acquire.ephemeral,
            shared: acquire.mode.is_shared(),
            lock_delay_ms: acquire.lock_delay_ms,
        };
        let absent = match self.table.find_entry(hash, |e| *e.key == *acquire.key) {
            Ok(mut occupied) => {
                let entry = occupied.get_mut();
                if let Some(conflict) = entry.conflict(acquire.mode) {
                    books.answer(handle, Err(conflict));
                    return;
                }
                if entry.holders.is_empty() && entry.queue.is_empty() {
                    // Only a lock delay keeps the entry: the key is free
                    // to take another limit.
                    entry.limit = acquire.mode.limit();
                }
                if let Some(holder) = entry.holders.by_client_mut(&request.client) {
                    if holder.shared != request.shared {
                        books.answer(handle, Err(other_mode(holder.shared)));
                        return;
                    }
                    let (ttl_ms, ephemeral) = (request.ttl_ms, request.ephemeral);
                    holder.lock_delay_ms = request.lock_delay_ms;
                    let kept = holder.deadline;
                    let key = &acquire.key;
                    relock(
                        holder,
                        key,
                        request.conn,
                        ttl_ms,
                        ephemeral,
                        now,
                        hash,
                        books,
                    );
                    if planted::active(PlantedBug::RelockKeepsLease) {
                        // The timer at the kept deadline is still queued.
                        holder.deadline = kept;
                    }
                    let granted = Granted::new(holder.token, ttl_ms);
                    books.answer(handle, Ok(Okay::Granted(granted)));
                } else if entry.admits(request.shared) && entry.queue.is_empty() {
                    let holder = books.grant(handle, hash, &entry.key, request);
                    entry.holders.insert(holder);
                } else {
                    enqueue(entry, hash, handle, request, acquire.wait, books);
                }
                return;
            }
            Err(absent) => absent,
        };
        if let Err(full) = check_room(absent.into_table().len(), &acquire.key, books) {
            books.answer(handle, Err(full));
            return;
        }
        books.key_bytes += acquire.key.len();
        let mut entry = LockEntry::new(acquire.key.into_boxed_str(), acquire.mode.limit());
        let holder = books.grant(handle, hash, &entry.key, request);
        entry.holders.insert(holder);
        self.table
            .insert_unique(hash, entry, |e| hasher.hash_one(&*e.key));
    }

    fn release(&mut self, now: Tick, key: &str, token: u64, asker: &ClientId) -> Outcome {
        let hash = self.hash(key);
        let books = &mut self.books;
        let Ok(mut occupied) = self.table.find_entry(hash, |e| *e.key == *key) else {
            return Err(ServerError::not_held());
        };
        let entry = occupied.get_mut();
        if !entry.holders.has_token(token) {
            return Err(ServerError::not_held());
        }
        books.counters.releases += 1;
        // Only an event tells who unlocked it.
        let by_holder = books.events.enabled()
            && entry
                .holders
                .iter()
                .any(|h| h.token == token && holders::same_client(&h.client, asker));
        end_grant(
            entry,
            token,
            Ending::Unlocked { by_holder },
            hash,
            now,
            books,
        );
        if entry.is_vacant() {
            books.key_bytes -= occupied.remove().0.key.len();
        }
        Ok(Okay::EMPTY)
    }

    fn extend(&mut self, now: Tick, key: &str, token: u64, ttl_ms: u64) -> Outcome {
        if planted::active(PlantedBug::ExtendRefused) {
            return Err(ServerError::not_held());
        }
        let hash = self.hash(key);
        let holder = self
            .table
            .find_mut(hash, |e| *e.key == *key)
            .and_then(|e| e.holders.by_token_mut(token))
            .ok_or_else(ServerError::not_held)?;
        let (conn, ephemeral) = (holder.conn, holder.ephemeral);
        relock(
            holder,
            key,
            conn,
            ttl_ms,
            ephemeral,
            now,
            hash,
            &mut self.books,
        );
        Ok(Okay::Extended(Extended { ttl_ms }))
    }

    /// Who holds `key` (every holder, and the first again for version 1
    /// clients), how many wait, and the key's limit.
    fn inspect(&self, now: Tick, key: &str) -> LockInfo {
        let Some(entry) = self.table.find(self.hash(key), |e| *e.key == *key) else {
            return LockInfo::free();
        };
        let holders: Vec<HolderInfo> = entry
            .holders
            .iter()
            .map(|h| HolderInfo {
                client: h.client.to_string(),
                token: h.token,
                remaining_ms: now.millis_until(h.deadline.at),
                mode: if h.shared {
                    ModeName::Shared
                } else {
                    ModeName::Exclusive
                },
            })
            .collect();
        LockInfo {
            holder: holders.first().cloned(),
            waiters: entry.queue.len() as u64,
            holders,
            limit: entry.limit,
        }
    }

    /// Answers `cancelled` to the waiting request `handle` on `key`, if it
    /// is still queued.
    pub fn cancel(&mut self, now: Tick, handle: Handle, key: &str) {
        if planted::active(PlantedBug::CancelIgnored) {
            return;
        }
        self.take_waiter(now, handle, key, |counters| counters.cancellations += 1);
        self.compact_timers();
    }

    /// Nobody listens for request `handle` on `key` any more. If it still
    /// waits, it leaves the queue (answered `cancelled`, to nobody). If it
    /// was granted and its answer is all the holder ever heard of the grant,
    /// the grant is undone: nobody knows they hold it.
    pub fn requester_gone(&mut self, now: Tick, handle: Handle, key: &str) {
        if self.take_waiter(now, handle, key, |counters| counters.abandoned += 1) {
            self.compact_timers();
            return;
        }
        let hash = self.hash(key);
        let books = &mut self.books;
        let Ok(mut occupied) = self.table.find_entry(hash, |e| *e.key == *key) else {
            return;
        };
        let entry = occupied.get_mut();
        let unheard = planted::unheard_grant(
            entry
                .holders
                .iter()
                .find(|h| h.granted_by == Some(handle))
                .map(|h| h.token),
        );
        if let Some(token) = unheard {
            books.counters.abandoned += 1;
            end_grant(entry, token, Ending::Dropped, hash, now, books);
            if entry.is_vacant() {
                books.key_bytes -= occupied.remove().0.key.len();
            }
        }
        self.compact_timers();
    }

    /// Takes the waiter answering to `handle` out of `key`'s queue.
    /// Takes the waiter answering to `handle` out of `key`'s queue,
    /// counts it with `count` and answers it `cancelled` (before any grant
    /// its leaving makes: it left first); whether it was there.
    fn take_waiter(
        &mut self,
        now: Tick,
        handle: Handle,
        key: &str,
        count: impl FnOnce(&mut LockCounters),
    ) -> bool {
        let hash = self.hash(key);
        let books = &mut self.books;
        let Ok(mut occupied) = self.table.find_entry(hash, |e| *e.key == *key) else {
            return false;
        };
        let entry = occupied.get_mut();
        let Some(waiter) = entry
            .queue
            .position_of_handle(handle)
            .and_then(|position| entry.queue.remove(position))
        else {
            return false;
        };
        books.waiter_left(&waiter, hash);
        count(&mut books.counters);
        books.answer(waiter.handle, Err(ServerError::cancelled()));
        // Not needed for a mutex (a waiter implies a holder), but the
        // shared requests behind an exclusive one may fit now.
        grant_next(entry, hash, now, books);
        if entry.is_vacant() {
            books.key_bytes -= occupied.remove().0.key.len();
        }
        true
    }

    /// Forgets the waiters of a closed connection (each answered
    /// `cancelled`, to nobody) and releases its ephemeral locks, handing
    /// each key on.
    pub fn close_connection(&mut self, now: Tick, conn: ConnId) {
        if !self.books.conns.touches(conn) {
            return;
        }
        // Keys in order of their bytes, not of a seeded hash: the order
        // decides which waiter gets which token, and a replay with another
        // seed must hand out the same ones.
        let mut keys = self.keys_touched_by(conn);
        keys.sort_unstable();
        for key in keys {
            self.close_connection_on(now, conn, &key);
        }
        debug_assert!(!self.books.conns.touches(conn));
        self.compact_timers();
    }

    /// The keys `conn` waits on or holds ephemerally.
    fn keys_touched_by(&self, conn: ConnId) -> Vec<Box<str>> {
        let mut keys = Vec::new();
        for hash in self.books.conns.hashes_of(conn) {
            // Distinct keys may share a hash: take every involved one.
            let involved = self.table.iter_hash(hash).filter(|e| {
                e.has_hash(self.hasher, hash)
                    && (e.holders.iter().any(|h| h.ephemeral && h.conn == conn)
                        || e.queue.iter().any(|w| w.conn == conn))
            });
            keys.extend(involved.map(|e| e.key.clone()));
        }
        keys
    }

    /// [`Locks::close_connection`] for one key.
    fn close_connection_on(&mut self, now: Tick, conn: ConnId, key: &str) {
        let hash = self.hash(key);
        let books = &mut self.books;
        let Ok(mut found) = self.table.find_entry(hash, |e| *e.key == *key) else {
            return;
        };
        let entry = found.get_mut();
        for waiter in entry.queue.take_where(|w| w.conn == conn) {
            books.waiter_left(&waiter, hash);
            books.counters.abandoned += 1;
            books.answer(waiter.handle, Err(ServerError::cancelled()));
        }
        for mut holder in entry.holders.take_where(|h| h.ephemeral && h.conn == conn) {
            books.holder_left(&holder, hash);
            let ended = LockChange::Ended(Ending::Dropped);
            books.events.lock(&entry.key, holder.token, now, ended);
            books.counters.disconnects += 1;
            if planted::active(PlantedBug::EphemeralOutlivesConnection) {
                holder.ephemeral = false;
                entry.holders.insert(holder);
                books.held += 1;
            }
        }
        grant_next(entry, hash, now, books);
        if entry.is_vacant() {
            books.key_bytes -= found.remove().0.key.len();
        }
    }

    /// Applies every deadline due at or before `now`, each at its own tick.
    ///
    /// Keys freed by a tick's deadlines are handed on once all of that
    /// tick's deadlines are applied, not as each one fires: so a lease that
    /// runs out at the tick with a lock delay holds back a key that another
    /// lease freed at the same tick, and what happens at one tick never
    /// depends on the order in which its timers were set.
    pub fn advance(&mut self, now: Tick) {
        let mut freed: Vec<u64> = Vec::new();
        let mut tick = Tick::ZERO;
        loop {
            let next = self.books.timers.next_at().filter(|&at| at <= now);
            if !freed.is_empty() && next != Some(tick) {
                // The tick is over. Its grants set lease timers that may
                // fall before the next one due: look again after them.
                self.hand_on(&mut freed, tick);
                continue;
            }
            let Some(Timer { at, seq, due }) = self.books.timers.pop_due(now) else {
                break;
            };
            tick = at;
            let deadline = Deadline { at, seq };
            let freed_key = match due {
                LockDue::Lease { hash, token } => self.lease_ran_out(hash, token, deadline),
                LockDue::Wait { hash, waiter } => self.wait_ran_out(hash, waiter, deadline),
                LockDue::Delay { hash } => self.delay_ran_out(hash, deadline),
            };
            freed.extend(freed_key.filter(|hash| !freed.contains(hash)));
        }
        self.compact_timers();
    }

    /// Hands the keys with these hashes on to their waiters, at `at`, in
    /// the order they were freed.
    fn hand_on(&mut self, freed: &mut Vec<u64>, at: Tick) {
        let hasher = self.hasher;
        for hash in freed.drain(..) {
            let books = &mut self.books;
            let of_key = |e: &LockEntry| e.has_hash(hasher, hash);
            // The waiters may all have timed out since at this tick,
            // leaving nothing of the key.
            if let Ok(vacant) = self.table.find_entry(hash, |e| of_key(e) && e.is_vacant()) {
                books.key_bytes -= vacant.remove().0.key.len();
            }
            // Another key that shares the whole hash (rarely) has nothing
            // to hand on, which `grant_next` finds at once.
            let waited_on = |e: &LockEntry| of_key(e) && !e.queue.is_empty();
            let Ok(mut occupied) = self.table.find_entry(hash, waited_on) else {
                continue;
            };
            let entry = occupied.get_mut();
            grant_next(entry, hash, at, books);
            if entry.is_vacant() {
                books.key_bytes -= occupied.remove().0.key.len();
            }
        }
    }

    /// Ends a lease that ran out, starting its lock delay; the hash of its
    /// key if the key has waiters to hand it on to.
    fn lease_ran_out(&mut self, hash: u64, token: u64, deadline: Deadline) -> Option<u64> {
        let books = &mut self.books;
        let is_it = |e: &LockEntry| e.holders.has_token(token);
        let Ok(mut occupied) = self.table.find_entry(hash, is_it) else {
            return None; // released or handed on already
        };
        let entry = occupied.get_mut();
        if entry
            .holders
            .by_token_mut(token)
            .is_some_and(|h| h.deadline != deadline)
        {
            return None; // extended since (even if back to the same tick)
        }
        books.counters.expiries += 1;
        if let Some(holder) = entry.holders.remove_token(token) {
            books.holder_left(&holder, hash);
            let expired = LockChange::Ended(Ending::Expired);
            books.events.lock(&entry.key, token, deadline.at, expired);
            if holder.lock_delay_ms > 0 && !planted::active(PlantedBug::LockDelayIgnored) {
                let until = deadline.at.plus_millis(holder.lock_delay_ms);
                start_delay(entry, hash, until, books);
            }
        }
        freed_or_removed(occupied, hash, books)
    }

    /// Ends a key's lock delay; its hash if it has waiters to hand it on to.
    fn delay_ran_out(&mut self, hash: u64, deadline: Deadline) -> Option<u64> {
        let books = &mut self.books;
        let is_it = |e: &LockEntry| e.delay.as_deref() == Some(&deadline);
        let Ok(mut occupied) = self.table.find_entry(hash, is_it) else {
            return None; // lengthened since
        };
        occupied.get_mut().delay = None;
        books.delays -= 1;
        freed_or_removed(occupied, hash, books)
    }

    /// Answers `timeout` to a waiter whose wait ran out; the hash of its
    /// key if others still wait (an exclusive waiter that leaves may let
    /// the shared ones behind it in).
    fn wait_ran_out(&mut self, hash: u64, waiter_id: u64, deadline: Deadline) -> Option<u64> {
        let waits_here = |e: &LockEntry| e.queue.position_of(waiter_id).is_some();
        // None: granted, cancelled or gone already.
        let entry = self.table.find_mut(hash, waits_here)?;
        let position = entry.queue.position_of(waiter_id)?;
        if let Some(waiter) = entry.queue.remove(position) {
            debug_assert!(waiter.deadline == Some(deadline));
            self.books.waiter_left(&waiter, hash);
            self.books.counters.timeouts += 1;
            let timeout = Err(ServerError::timeout(waiter.wait_ms));
            self.books.answer(waiter.handle, timeout);
        }
        (!entry.queue.is_empty()).then_some(hash)
    }

    fn compact_timers(&mut self) {
        let live = self.live_timers();
        let table = &self.table;
        self.books
            .timers
            .compact_if_stale(live, |timer| match timer.due {
                LockDue::Lease { hash, token } => table
                    .find(hash, |e| e.holders.has_token(token))
                    .is_some_and(|e| {
                        e.holders
                            .iter()
                            .any(|h| h.token == token && h.deadline.seq == timer.seq)
                    }),
                LockDue::Wait { hash, waiter } => table
                    .find(hash, |e| e.queue.position_of(waiter).is_some())
                    .is_some(),
                LockDue::Delay { hash } => table
                    .find(hash, |e| {
                        e.delay.as_ref().is_some_and(|d| d.seq == timer.seq)
                    })
                    .is_some(),
            });
    }

    /// How many timers act when they fire: one per lease, bounded wait
    /// (or wait: an upper bound is enough) and lock delay.
    fn live_timers(&self) -> usize {
        self.books.held + self.books.waiters + self.books.delays
    }

    /// The earliest deadline this table has (possibly a stale one).
    pub fn next_deadline(&self) -> Option<Tick> {
        self.books.timers.next_at()
    }

    /// The process restarted (see [`crate::Input::Restart`]): waiters are
    /// dropped unanswered, ephemeral grants released, every grant's
    /// `granted_by` forgotten, and the next token raised to `token_floor`.
    /// Nobody waits any more, so no key is handed on and nothing is
    /// answered.
    pub fn restart(&mut self, token_floor: u64) {
        let books = &mut self.books;
        let keep_ephemeral = planted::active(PlantedBug::RestartKeepsEphemeral);
        self.table.retain(|entry| {
            // Counted as if each requester and connection had gone, which
            // they have, with the old process.
            books.counters.abandoned += entry.queue.len() as u64;
            entry.queue = WaitQueue::default();
            let released = entry.holders.take_where(|h| h.ephemeral && !keep_ephemeral);
            books.counters.disconnects += released.len() as u64;
            books.held -= released.len();
            entry.holders.forget_requests();
            let vacant = entry.is_vacant();
            if vacant {
                books.key_bytes -= entry.key.len();
            }
            !vacant
        });
        books.waiters = 0;
        books.contention.clear();
        // It indexed only waiters and ephemeral grants, and none are left
        // (but for the planted bug's grants, which keep their entries).
        books.conns.clear();
        if keep_ephemeral {
            for entry in &self.table {
                let hash = self.hasher.hash_one(&*entry.key);
                for holder in entry.holders.iter().filter(|h| h.ephemeral) {
                    books.conns.add(holder.conn, hash);
                }
            }
        }
        books.next_token = books.next_token.max(token_floor);
        self.compact_timers();
    }

    /// Where the grant `token` of `key` stands (see
    /// [`GrantStatus`](crate::events::GrantStatus)): tokens of a shard
    /// rise with every grant, so one below the next token was made.
    pub fn grant_status(&self, key: &str, token: u64) -> crate::events::GrantStatus {
        use crate::events::GrantStatus;
        let held = self
            .table
            .find(self.hash(key), |e| *e.key == *key)
            .and_then(|e| e.holders.iter().find(|h| h.token == token));
        match held {
            Some(holder) => GrantStatus::Held(holder.deadline.at),
            None if token < self.books.next_token => GrantStatus::Ended,
            None => GrantStatus::NotYet,
        }
    }

    /// The token the next grant gets.
    pub fn next_token(&self) -> u64 {
        self.books.next_token
    }

    /// Answers every waiter `shutting_down` and forgets all locks.
    pub fn shutdown(&mut self) {
        for entry in self.table.drain() {
            for waiter in entry.queue {
                let shutting_down = Err(ServerError::shutting_down());
                self.books.answer(waiter.handle, shutting_down);
            }
        }
        self.books.waiters = 0;
        self.books.held = 0;
        self.books.delays = 0;
        self.books.contention.clear();
        self.books.key_bytes = 0;
        self.books.conns.clear();
    }

    /// Every key with lock state, in key order: see [`KeyView`].
    pub fn views(&self) -> Vec<KeyView> {
        let mut views: Vec<KeyView> = self
            .table
            .iter()
            .map(|entry| KeyView {
                key: entry.key.to_string(),
                limit: entry.limit,
                delayed_until: entry.delay.as_ref().map(|d| d.at),
                holders: entry
                    .holders
                    .iter()
                    .map(|h| HolderView {
                        client: h.client.clone(),
                        conn: h.conn,
                        token: h.token,
                        deadline: h.deadline.at,
                        ephemeral: h.ephemeral,
                        shared: h.shared,
                        lock_delay_ms: h.lock_delay_ms,
                    })
                    .collect(),
                waiters: entry
                    .queue
                    .iter()
                    .map(|w| WaiterView {
                        handle: w.handle,
                        conn: w.conn,
                        deadline: w.deadline.map(|d| d.at),
                        shared: w.shared,
                    })
                    .collect(),
            })
            .collect();
        views.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        views
    }

    /// Counters since the start, and sizes now (`held`: grants held, each
    /// shared holder and semaphore permit counted).
    pub fn counters(&self) -> LockCounters {
        LockCounters {
            held: self.books.held as u64,
            waiters: self.books.waiters as u64,
            ..self.books.counters
        }
    }
}

/// `overloaded` if a new key with lock state would pass a limit.
fn check_room(keys: usize, key: &str, books: &Books) -> Result<(), ServerError> {
    if keys >= books.limits.locks_max {
        return Err(ServerError::overloaded(
            "lock table full (locks_max reached)",
        ));
    }
    if books.key_bytes + key.len() > books.limits.lock_key_bytes_max {
        return Err(ServerError::overloaded(
            "lock table full (lock_key_bytes_max reached)",
        ));
    }
    Ok(())
}

/// Queues the request behind the holders, or answers `busy` if it would
/// not wait, or `overloaded` if the queue is full.
fn enqueue(
    entry: &mut LockEntry,
    hash: u64,
    handle: Handle,
    request: GrantRequest,
    wait: Wait,
    books: &mut Books,
) {
    let (wait_ms, deadline) = match wait {
        Wait::Never => {
            if !planted::active(PlantedBug::BusyUncounted) {
                books.counters.busy += 1;
            }
            books.answer(handle, Err(ServerError::busy()));
            return;
        }
        Wait::Forever => (0, None),
        Wait::UpTo(ms) if planted::active(PlantedBug::EarlyTimeout) => {
            (ms, Some(request.at.plus_millis(ms / 2)))
        }
        Wait::UpTo(ms) => (ms, Some(request.at.plus_millis(ms))),
    };
    if entry.queue.len() >= books.limits.waiters_per_key_max {
        let full = "too many waiters on this key (waiters_per_key_max reached)";
        books.answer(handle, Err(ServerError::overloaded(full)));
        return;
    }
    if books.waiters >= books.limits.waiters_max {
        let full = "too many waiters (waiters_max reached)";
        books.answer(handle, Err(ServerError::overloaded(full)));
        return;
    }
    let id = books.next_waiter;
    books.next_waiter += 1;
    let deadline = deadline.map(|at| books.timers.push(at, LockDue::Wait { hash, waiter: id }));
    books.waiter_joined(request.conn, hash);
    entry.queue.push_back(Waiter {
        id,
        handle,
        client: request.client,
        conn: request.conn,
        ttl_ms: request.ttl_ms,
        wait_ms,
        deadline,
        ephemeral: request.ephemeral,
        shared: request.shared,
        lock_delay_ms: request.lock_delay_ms,
    });
}
