//! Leased mutexes (SPEC section 2): holders, FIFO wait queues, fencing
//! tokens and leases, for the keys of one shard.
//!
//! A key has an entry only while it is held; a free key costs nothing, and
//! the shard-wide token counter (not the entry) is what keeps a key's tokens
//! rising after its entry is dropped. Invariants, checked by
//! [`Locks::check_invariants`]:
//! - every entry has a holder (a free key with waiters is granted at once);
//! - `waiters` is the number of queued waiters;
//! - `conn_refs` counts, per connection and key hash, its queued waiters
//!   and ephemeral holds, so closing a connection visits only the keys it
//!   touched (and costs nothing if none).

use std::collections::VecDeque;
use std::hash::BuildHasher;

use super::hasher::KeyHasher;
use hashbrown::{HashMap, HashTable};

use super::timers::{Timer, Timers};
use super::{Caller, ClientId, ConnId, Responder};
use crate::limits::ShardLimits;
use crate::proto::{
    Acquire, Extended, Granted, HeldLock, HolderInfo, LockInfo, LockOp, Okay, Outcome, RequestId,
    ServerError, Wait,
};
use crate::time::Tick;

/// Counters of what happened to this shard's locks, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockStats {
    /// Fresh grants (re-locks by the holder not counted).
    pub grants: u64,
    /// Grants ended by `unlock`.
    pub releases: u64,
    /// Grants ended because their lease ran out.
    pub expiries: u64,
    /// Ephemeral grants ended because their connection closed.
    pub disconnects: u64,
    /// Waiters answered `timeout`.
    pub timeouts: u64,
    /// Waiters answered `cancelled`.
    pub cancellations: u64,
    /// Requests answered `busy`.
    pub busy: u64,
    /// Waiters skipped because nobody was left to tell.
    pub abandoned: u64,
}

/// A key's deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum LockDue {
    /// The lease of the grant with `token` ends.
    Lease { hash: u64, token: u64 },
    /// Waiter number `waiter` has waited its `wait_ms`.
    Wait { hash: u64, waiter: u64 },
}

/// The current grant of a key.
#[derive(Debug)]
struct Holder {
    client: ClientId,
    /// The connection that took (or last re-took) the lock; for ephemeral
    /// release.
    conn: ConnId,
    token: u64,
    deadline: Tick,
    ephemeral: bool,
}

/// A queued `lock` request: data, not a blocked task.
#[derive(Debug)]
struct Waiter<R> {
    /// Unique within the shard, so its wait timer can find it.
    id: u64,
    client: ClientId,
    conn: ConnId,
    request: RequestId,
    ttl_ms: u64,
    /// For the `timeout` message; 0 when waiting forever.
    wait_ms: u64,
    deadline: Option<Tick>,
    ephemeral: bool,
    reply: R,
}

#[derive(Debug)]
struct LockEntry<R> {
    key: Box<str>,
    holder: Option<Holder>,
    queue: WaitQueue<R>,
}

/// A key's waiters, first come first. Most held keys have none, so the
/// queue lives behind a pointer that is null when empty: 8 bytes per key
/// instead of a `VecDeque`'s 32.
#[derive(Debug)]
#[allow(clippy::box_collection)] // the box is the point: see above
struct WaitQueue<R>(Option<Box<VecDeque<Waiter<R>>>>);

impl<R> Default for WaitQueue<R> {
    fn default() -> Self {
        WaitQueue(None)
    }
}

impl<R> WaitQueue<R> {
    fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    fn iter(&self) -> impl Iterator<Item = &Waiter<R>> {
        self.0.iter().flat_map(|q| q.iter())
    }

    /// Where waiter `id` is. Waiters join at the back with ever larger ids
    /// and leave without reordering, so the queue is sorted by id and a
    /// key with thousands of waiters is searched, not scanned.
    fn position_of(&self, id: u64) -> Option<usize> {
        self.0.as_ref()?.binary_search_by_key(&id, |w| w.id).ok()
    }

    fn push_back(&mut self, waiter: Waiter<R>) {
        self.0.get_or_insert_with(Box::default).push_back(waiter);
    }

    fn pop_front(&mut self) -> Option<Waiter<R>> {
        let waiter = self.0.as_mut()?.pop_front();
        self.free_if_empty();
        waiter
    }

    fn remove(&mut self, position: usize) -> Option<Waiter<R>> {
        let waiter = self.0.as_mut()?.remove(position);
        self.free_if_empty();
        waiter
    }

    fn retain(&mut self, keep: impl FnMut(&Waiter<R>) -> bool) {
        if let Some(queue) = self.0.as_mut() {
            queue.retain(keep);
        }
        self.free_if_empty();
    }

    fn free_if_empty(&mut self) {
        if self.0.as_ref().is_some_and(|q| q.is_empty()) {
            self.0 = None;
        }
    }
}

impl<R> IntoIterator for WaitQueue<R> {
    type Item = Waiter<R>;
    type IntoIter = std::iter::Flatten<std::option::IntoIter<VecDeque<Waiter<R>>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.map(|q| *q).into_iter().flatten()
    }
}

impl<R> LockEntry<R> {
    fn is_vacant(&self) -> bool {
        self.holder.is_none() && self.queue.is_empty()
    }
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
    conn_refs: HashMap<ConnId, ConnRefs, KeyHasher>,
    stats: LockStats,
    limits: ShardLimits,
}

/// How many waiters and ephemeral holds one connection has, per key hash.
type ConnRefs = HashMap<u64, u32, KeyHasher>;

/// The locks of one shard.
#[derive(Debug)]
pub(crate) struct Locks<R> {
    table: HashTable<LockEntry<R>>,
    hasher: KeyHasher,
    books: Books,
}

fn same_client(a: &ClientId, b: &ClientId) -> bool {
    std::sync::Arc::ptr_eq(a, b) || **a == **b
}

impl Books {
    fn take_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token = self.next_token.saturating_add(1);
        token
    }

    fn ref_conn(&mut self, conn: ConnId, hash: u64) {
        let hasher = *self.conn_refs.hasher();
        let refs = self
            .conn_refs
            .entry(conn)
            .or_insert_with(|| HashMap::with_hasher(hasher));
        *refs.entry(hash).or_insert(0) += 1;
    }

    fn unref_conn(&mut self, conn: ConnId, hash: u64) {
        let Some(refs) = self.conn_refs.get_mut(&conn) else {
            return;
        };
        if let Some(count) = refs.get_mut(&hash) {
            *count -= 1;
            if *count == 0 {
                refs.remove(&hash);
            }
        }
        if refs.is_empty() {
            self.conn_refs.remove(&conn);
        }
    }

    /// Starts tracking a holder's lease (and its connection, if ephemeral).
    fn bind(&mut self, holder: &Holder, hash: u64) {
        let due = LockDue::Lease {
            hash,
            token: holder.token,
        };
        self.timers.push(holder.deadline, due);
        if holder.ephemeral {
            self.ref_conn(holder.conn, hash);
        }
    }

    /// Stops tracking a holder's connection.
    fn unbind(&mut self, holder: &Holder, hash: u64) {
        if holder.ephemeral {
            self.unref_conn(holder.conn, hash);
        }
    }

    fn waiter_left<R>(&mut self, waiter: &Waiter<R>, hash: u64) {
        self.waiters -= 1;
        self.unref_conn(waiter.conn, hash);
    }
}

/// A waiter that has just left its queue, if it can still be answered with
/// a grant at `at`: not if nobody listens for it any more (skipped), nor if
/// its wait ran out at this very tick (answered `timeout`).
fn still_waiting<R: Responder>(
    waiter: Waiter<R>,
    hash: u64,
    at: Tick,
    books: &mut Books,
) -> Option<Waiter<R>> {
    books.waiter_left(&waiter, hash);
    if waiter.reply.is_closed() {
        books.stats.abandoned += 1;
        return None;
    }
    if waiter.deadline.is_some_and(|deadline| deadline <= at) {
        books.stats.timeouts += 1;
        waiter
            .reply
            .respond(Err(ServerError::timeout(waiter.wait_ms)));
        return None;
    }
    Some(waiter)
}

/// Gives the key to the first waiter still there, at `at`.
///
/// Waiters nobody listens to any more are skipped, and so are waiters whose
/// wait ran out at this very tick. A grant the waiter could not be told of
/// is undone at once, as if it had never been made.
fn grant_next<R: Responder>(entry: &mut LockEntry<R>, hash: u64, at: Tick, books: &mut Books) {
    debug_assert!(entry.holder.is_none());
    while let Some(waiter) = entry.queue.pop_front() {
        let Some(waiter) = still_waiting(waiter, hash, at, books) else {
            continue;
        };
        let holder = Holder {
            client: waiter.client,
            conn: waiter.conn,
            token: books.take_token(),
            deadline: at.plus_millis(waiter.ttl_ms),
            ephemeral: waiter.ephemeral,
        };
        let granted = Granted {
            token: holder.token,
            ttl_ms: waiter.ttl_ms,
        };
        if !waiter.reply.respond(Ok(Okay::Granted(granted))) {
            books.stats.abandoned += 1;
            continue;
        }
        books.stats.grants += 1;
        books.bind(&holder, hash);
        entry.holder = Some(holder);
        answer_queued_relocks(entry, hash, at, books);
        return;
    }
}

/// After a grant, answers the new holder's other queued requests for the
/// same key as the re-locks they now are: same token, lease restarted.
/// (This is how a retry that was queued before the original got its grant
/// stops waiting behind its own lock.)
fn answer_queued_relocks<R: Responder>(
    entry: &mut LockEntry<R>,
    hash: u64,
    at: Tick,
    books: &mut Books,
) {
    let Some(holder) = entry.holder.as_mut() else {
        return;
    };
    if !entry
        .queue
        .iter()
        .any(|w| same_client(&w.client, &holder.client))
    {
        return;
    }
    for waiter in std::mem::take(&mut entry.queue) {
        if !same_client(&waiter.client, &holder.client) {
            entry.queue.push_back(waiter);
            continue;
        }
        let Some(waiter) = still_waiting(waiter, hash, at, books) else {
            continue;
        };
        let granted = Granted {
            token: holder.token,
            ttl_ms: waiter.ttl_ms,
        };
        // Restart the lease only for a requester that got the answer: one
        // that vanished meanwhile must not stretch the grant.
        if !waiter.reply.respond(Ok(Okay::Granted(granted))) {
            books.stats.abandoned += 1;
        } else {
            relock(
                holder,
                &waiter.conn,
                waiter.ttl_ms,
                waiter.ephemeral,
                at,
                hash,
                books,
            );
        }
    }
}

/// The holder asks again: same token, lease restarted at `ttl_ms`, bound to
/// the connection that asked.
fn relock(
    holder: &mut Holder,
    conn: &ConnId,
    ttl_ms: u64,
    ephemeral: bool,
    now: Tick,
    hash: u64,
    books: &mut Books,
) {
    books.unbind(holder, hash);
    holder.conn = *conn;
    holder.ephemeral = ephemeral;
    holder.deadline = now.plus_millis(ttl_ms);
    books.bind(holder, hash);
}

/// Ends the current grant at `at` and hands the key on.
fn end_grant<R: Responder>(entry: &mut LockEntry<R>, hash: u64, at: Tick, books: &mut Books) {
    if let Some(holder) = entry.holder.take() {
        books.unbind(&holder, hash);
    }
    grant_next(entry, hash, at, books);
}

impl<R: Responder> Locks<R> {
    /// An empty lock table whose first grant gets `first_token`.
    pub fn new(hasher: KeyHasher, first_token: u64, limits: ShardLimits) -> Self {
        Locks {
            table: HashTable::new(),
            hasher,
            books: Books {
                timers: Timers::default(),
                next_token: first_token,
                next_waiter: 0,
                waiters: 0,
                key_bytes: 0,
                conn_refs: HashMap::with_hasher(hasher),
                stats: LockStats::default(),
                limits,
            },
        }
    }

    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Carries out `op` for `caller` at `now`; the reply goes to `reply`, at
    /// once or, for a queued `lock`, when it is granted or gives up.
    pub fn handle(&mut self, now: Tick, caller: Caller, op: LockOp, reply: R) {
        match op {
            LockOp::Acquire(acquire) => self.acquire(now, caller, acquire, reply),
            LockOp::Release { key, token } => {
                reply.respond(self.release(now, &key, token));
            }
            LockOp::Extend { key, token, ttl_ms } => {
                reply.respond(self.extend(now, &key, token, ttl_ms));
            }
            LockOp::Inspect { key } => {
                reply.respond(Ok(Okay::LockInfo(self.inspect(now, &key))));
            }
        }
        self.compact_timers();
    }

    fn acquire(&mut self, now: Tick, caller: Caller, acquire: Acquire, reply: R) {
        let hash = self.hash(&acquire.key);
        let hasher = self.hasher;
        let books = &mut self.books;
        let found = self.table.find_entry(hash, |e| *e.key == *acquire.key);
        let absent = match found {
            Ok(mut occupied) => {
                let entry = occupied.get_mut();
                match entry.holder.as_mut() {
                    Some(holder) if same_client(&holder.client, &caller.client) => {
                        let ttl_ms = acquire.ttl_ms;
                        relock(
                            holder,
                            &caller.conn,
                            ttl_ms,
                            acquire.ephemeral,
                            now,
                            hash,
                            books,
                        );
                        let token = holder.token;
                        reply.respond(Ok(Okay::Granted(Granted { token, ttl_ms })));
                    }
                    Some(_) => enqueue(entry, hash, now, caller, acquire, reply, books),
                    None => {
                        // Unreachable while the invariants hold; answer as
                        // for a free key rather than strand the request.
                        debug_assert!(false, "lock entry without a holder");
                        entry.holder = grant_fresh(hash, now, caller, &acquire, reply, books);
                    }
                }
                return;
            }
            Err(absent) => absent,
        };
        if absent.into_table().len() >= books.limits.locks_max {
            reply.respond(Err(ServerError::overloaded(
                "lock table full (locks_max reached)",
            )));
            return;
        }
        if books.key_bytes + acquire.key.len() > books.limits.lock_key_bytes_max {
            reply.respond(Err(ServerError::overloaded(
                "lock table full (lock_key_bytes_max reached)",
            )));
            return;
        }
        if let Some(holder) = grant_fresh(hash, now, caller, &acquire, reply, books) {
            books.key_bytes += acquire.key.len();
            let entry = LockEntry {
                key: acquire.key.into_boxed_str(),
                holder: Some(holder),
                queue: WaitQueue::default(),
            };
            self.table
                .insert_unique(hash, entry, |e| hasher.hash_one(&*e.key));
        }
    }

    fn release(&mut self, now: Tick, key: &str, token: u64) -> Outcome {
        let hash = self.hash(key);
        let books = &mut self.books;
        let Ok(mut occupied) = self.table.find_entry(hash, |e| *e.key == *key) else {
            return Err(ServerError::not_held());
        };
        let entry = occupied.get_mut();
        if entry.holder.as_ref().is_none_or(|h| h.token != token) {
            return Err(ServerError::not_held());
        }
        books.stats.releases += 1;
        end_grant(entry, hash, now, books);
        if entry.is_vacant() {
            books.key_bytes -= occupied.remove().0.key.len();
        }
        Ok(Okay::EMPTY)
    }

    fn extend(&mut self, now: Tick, key: &str, token: u64, ttl_ms: u64) -> Outcome {
        let hash = self.hash(key);
        let holder = self
            .table
            .find_mut(hash, |e| *e.key == *key)
            .and_then(|e| e.holder.as_mut())
            .filter(|h| h.token == token)
            .ok_or_else(ServerError::not_held)?;
        let conn = holder.conn;
        let ephemeral = holder.ephemeral;
        relock(holder, &conn, ttl_ms, ephemeral, now, hash, &mut self.books);
        Ok(Okay::Extended(Extended { ttl_ms }))
    }

    fn inspect(&self, now: Tick, key: &str) -> LockInfo {
        let Some(entry) = self.table.find(self.hash(key), |e| *e.key == *key) else {
            return LockInfo {
                holder: None,
                waiters: 0,
            };
        };
        LockInfo {
            holder: entry.holder.as_ref().map(|h| HolderInfo {
                client: h.client.to_string(),
                token: h.token,
                remaining_ms: now.millis_until(h.deadline),
            }),
            waiters: entry.queue.iter().filter(|w| !w.reply.is_closed()).count() as u64,
        }
    }

    /// Answers `cancelled` to the waiting request `request` of `conn` on
    /// `key`, if it is still queued. Returns whether it was.
    pub fn cancel(&mut self, conn: ConnId, request: RequestId, key: &str) -> bool {
        let hash = self.hash(key);
        let is_it = |w: &Waiter<R>| w.conn == conn && w.request == request;
        let Some(entry) = self.table.find_mut(hash, |e| *e.key == *key) else {
            return false;
        };
        let Some(position) = entry.queue.iter().position(is_it) else {
            return false;
        };
        if let Some(waiter) = entry.queue.remove(position) {
            self.books.waiter_left(&waiter, hash);
            self.books.stats.cancellations += 1;
            waiter.reply.respond(Err(ServerError::cancelled()));
        }
        true
    }

    /// Forgets the waiters of a closed connection and releases its
    /// ephemeral locks, handing each key on.
    pub fn close_connection(&mut self, now: Tick, conn: ConnId) {
        let Some(refs) = self.books.conn_refs.get(&conn) else {
            return;
        };
        // Only the keys this connection waits on or holds ephemerally: a
        // shard of millions of locks is not scanned for one closed tab.
        let hashes: Vec<u64> = refs.keys().copied().collect();
        for hash in hashes {
            self.close_connection_at(now, conn, hash);
        }
        debug_assert!(!self.books.conn_refs.contains_key(&conn));
        self.compact_timers();
    }

    /// [`Locks::close_connection`] for the keys with hash `hash`.
    fn close_connection_at(&mut self, now: Tick, conn: ConnId, hash: u64) {
        let hasher = self.hasher;
        // Distinct keys may share a hash: match the full hash, not just
        // the table's bucket, and take each involved key in turn.
        let involved = |e: &LockEntry<R>| {
            let holds = e
                .holder
                .as_ref()
                .is_some_and(|h| h.ephemeral && h.conn == conn);
            hasher.hash_one(&*e.key) == hash && (holds || e.queue.iter().any(|w| w.conn == conn))
        };
        while let Ok(mut found) = self.table.find_entry(hash, involved) {
            let entry = found.get_mut();
            let books = &mut self.books;
            entry.queue.retain(|w| {
                let stays = w.conn != conn;
                if !stays {
                    books.waiter_left(w, hash);
                }
                stays
            });
            if entry
                .holder
                .as_ref()
                .is_some_and(|h| h.ephemeral && h.conn == conn)
            {
                books.stats.disconnects += 1;
                end_grant(entry, hash, now, books);
            }
            if entry.is_vacant() {
                books.key_bytes -= found.remove().0.key.len();
            }
        }
    }

    /// Applies every deadline due at or before `now`, each at its own tick.
    pub fn advance(&mut self, now: Tick) {
        while let Some(Timer { at, due }) = self.books.timers.pop_due(now) {
            match due {
                LockDue::Lease { hash, token } => self.lease_ran_out(hash, token, at),
                LockDue::Wait { hash, waiter } => self.wait_ran_out(hash, waiter, at),
            }
        }
        self.compact_timers();
    }

    fn lease_ran_out(&mut self, hash: u64, token: u64, at: Tick) {
        let books = &mut self.books;
        let is_it = |e: &LockEntry<R>| e.holder.as_ref().is_some_and(|h| h.token == token);
        let Ok(mut occupied) = self.table.find_entry(hash, is_it) else {
            return; // released or handed on already
        };
        let entry = occupied.get_mut();
        if entry.holder.as_ref().is_some_and(|h| h.deadline != at) {
            return; // extended since
        }
        books.stats.expiries += 1;
        end_grant(entry, hash, at, books);
        if entry.is_vacant() {
            books.key_bytes -= occupied.remove().0.key.len();
        }
    }

    fn wait_ran_out(&mut self, hash: u64, waiter_id: u64, at: Tick) {
        let waits_here = |e: &LockEntry<R>| e.queue.position_of(waiter_id).is_some();
        let Some(entry) = self.table.find_mut(hash, waits_here) else {
            return; // granted, cancelled or gone already
        };
        let Some(position) = entry.queue.position_of(waiter_id) else {
            return;
        };
        if let Some(waiter) = entry.queue.remove(position) {
            debug_assert!(waiter.deadline == Some(at));
            self.books.waiter_left(&waiter, hash);
            self.books.stats.timeouts += 1;
            waiter
                .reply
                .respond(Err(ServerError::timeout(waiter.wait_ms)));
        }
    }

    fn compact_timers(&mut self) {
        let live = self.table.len() + self.books.waiters;
        let table = &self.table;
        self.books
            .timers
            .compact_if_stale(live, |timer| match timer.due {
                LockDue::Lease { hash, token } => table
                    .find(hash, |e| {
                        e.holder.as_ref().is_some_and(|h| h.token == token)
                    })
                    .and_then(|e| e.holder.as_ref())
                    .is_some_and(|h| h.deadline == timer.at),
                LockDue::Wait { hash, waiter } => table
                    .find(hash, |e| e.queue.position_of(waiter).is_some())
                    .is_some(),
            });
    }

    /// The earliest deadline this table has (possibly a stale one).
    pub fn next_deadline(&self) -> Option<Tick> {
        self.books.timers.next_at()
    }

    /// Answers every waiter `shutting_down` and forgets all locks.
    pub fn shutdown(&mut self) {
        for entry in self.table.drain() {
            for waiter in entry.queue {
                waiter.reply.respond(Err(ServerError::shutting_down()));
            }
        }
        self.books.waiters = 0;
        self.books.key_bytes = 0;
        self.books.conn_refs.clear();
    }

    /// What has happened so far.
    pub fn stats(&self) -> LockStats {
        self.books.stats
    }

    /// Keys held now.
    pub fn held(&self) -> usize {
        self.table.len()
    }

    /// Waiters queued now.
    pub fn waiters(&self) -> usize {
        self.books.waiters
    }

    /// The `top` most waited-for held locks (ties by key), and the `top`
    /// keys with the most waiters.
    pub fn top(&self, now: Tick, top: usize) -> (Vec<HeldLock>, Vec<HeldLock>) {
        let describe = |e: &LockEntry<R>| {
            e.holder.as_ref().map(|h| HeldLock {
                key: e.key.to_string(),
                client: h.client.to_string(),
                token: h.token,
                remaining_ms: now.millis_until(h.deadline),
                waiters: e.queue.iter().filter(|w| !w.reply.is_closed()).count() as u64,
            })
        };
        let held = super::top::top(self.table.iter(), top, lock_rank);
        let contended = super::top::top(
            self.table.iter().filter(|e| !e.queue.is_empty()),
            top,
            lock_rank,
        );
        (
            held.into_iter().filter_map(describe).collect(),
            contended.into_iter().filter_map(describe).collect(),
        )
    }

    /// Checks the invariants listed in the module docs.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut refs: HashMap<ConnId, ConnRefs, KeyHasher> = HashMap::with_hasher(self.hasher);
        let mut count = |conn: ConnId, hash: u64| {
            *refs
                .entry(conn)
                .or_insert_with(|| HashMap::with_hasher(self.hasher))
                .entry(hash)
                .or_insert(0) += 1;
        };
        let mut waiters = 0;
        for entry in &self.table {
            let hash = self.hash(&entry.key);
            let Some(holder) = &entry.holder else {
                return Err(format!("key {:?} has an entry but no holder", entry.key));
            };
            if holder.token >= self.books.next_token {
                return Err(format!("key {:?} holds a token not yet issued", entry.key));
            }
            if holder.ephemeral {
                count(holder.conn, hash);
            }
            let mut last_id = None;
            for waiter in entry.queue.iter() {
                if last_id.is_some_and(|last| last >= waiter.id) {
                    return Err(format!("key {:?}: waiters out of id order", entry.key));
                }
                last_id = Some(waiter.id);
                waiters += 1;
                count(waiter.conn, hash);
            }
        }
        let key_bytes: usize = self.table.iter().map(|e| e.key.len()).sum();
        if key_bytes != self.books.key_bytes {
            return Err(format!(
                "{key_bytes} bytes of keys, {} counted",
                self.books.key_bytes
            ));
        }
        if waiters != self.books.waiters {
            return Err(format!(
                "{waiters} waiters queued, {} counted",
                self.books.waiters
            ));
        }
        if !self.books.timers.is_compact(self.table.len() + waiters) {
            return Err(format!(
                "{} timers for {} live objects",
                self.books.timers.len(),
                self.table.len() + waiters
            ));
        }
        if refs != self.books.conn_refs {
            return Err("connection reference counts disagree with the table".to_owned());
        }
        Ok(())
    }
}

/// Ranks locks for `stats`: most waiters first, then by key.
fn lock_rank<'a, R>(entry: &&'a LockEntry<R>) -> (usize, std::cmp::Reverse<&'a str>) {
    (entry.queue.len(), std::cmp::Reverse(&entry.key))
}

/// Grants a free key to `caller` with a new token; `None` if the caller
/// could not be told (then nothing was granted).
fn grant_fresh<R: Responder>(
    hash: u64,
    now: Tick,
    caller: Caller,
    acquire: &Acquire,
    reply: R,
    books: &mut Books,
) -> Option<Holder> {
    let holder = Holder {
        client: caller.client,
        conn: caller.conn,
        token: books.take_token(),
        deadline: now.plus_millis(acquire.ttl_ms),
        ephemeral: acquire.ephemeral,
    };
    let granted = Granted {
        token: holder.token,
        ttl_ms: acquire.ttl_ms,
    };
    if !reply.respond(Ok(Okay::Granted(granted))) {
        books.stats.abandoned += 1;
        return None;
    }
    books.stats.grants += 1;
    books.bind(&holder, hash);
    Some(holder)
}

/// Queues `caller` behind the holder, or answers `busy` if it would not
/// wait, or `overloaded` if the queue is full.
fn enqueue<R: Responder>(
    entry: &mut LockEntry<R>,
    hash: u64,
    now: Tick,
    caller: Caller,
    acquire: Acquire,
    reply: R,
    books: &mut Books,
) {
    let (wait_ms, deadline) = match acquire.wait {
        Wait::Never => {
            books.stats.busy += 1;
            reply.respond(Err(ServerError::busy()));
            return;
        }
        Wait::Forever => (0, None),
        Wait::UpTo(ms) => (ms, Some(now.plus_millis(ms))),
    };
    if entry.queue.len() >= books.limits.waiters_per_key_max {
        reply.respond(Err(ServerError::overloaded(
            "too many waiters on this key (waiters_per_key_max reached)",
        )));
        return;
    }
    if books.waiters >= books.limits.waiters_max {
        reply.respond(Err(ServerError::overloaded(
            "too many waiters (waiters_max reached)",
        )));
        return;
    }
    let id = books.next_waiter;
    books.next_waiter += 1;
    if let Some(at) = deadline {
        books.timers.push(at, LockDue::Wait { hash, waiter: id });
    }
    books.waiters += 1;
    books.ref_conn(caller.conn, hash);
    entry.queue.push_back(Waiter {
        id,
        client: caller.client,
        conn: caller.conn,
        request: caller.request,
        ttl_ms: acquire.ttl_ms,
        wait_ms,
        deadline,
        ephemeral: acquire.ephemeral,
        reply,
    });
}
