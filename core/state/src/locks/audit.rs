//! Looking at the locks from outside the rules: the invariants, a digest
//! of the state for replay checks, and the top lists of `stats`.

use std::collections::BTreeMap;
use std::hash::BuildHasher;

use super::conns::ConnIndex;
use super::contention::Contention;
use super::{LockDue, LockEntry, Locks};
use crate::hasher::StableHasher;
use crate::time::Tick;
use crate::timers::TimerIndex;
use deadbolt_proto::HeldLock;

impl Locks {
    /// Checks the invariants:
    /// - every entry has a holder or a lock delay, and no entry has a first
    ///   waiter it could grant (a free place with waiters is granted at
    ///   once);
    /// - a key's holders all hold in one mode: any number shared (with
    ///   limit 1), or at most `limit` exclusive;
    /// - tokens were issued (below the next token) and are distinct;
    /// - waiters are in id order, and counted right;
    /// - key bytes are counted right, the timer heap is compact, and the
    ///   connection index agrees with the table;
    /// - every lease and bounded wait has a live timer (one that will act
    ///   when it fires), or it would never end.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut conns = ConnIndex::new(self.hasher);
        let mut contention = Contention::new(self.hasher);
        let mut waiters = 0;
        let (mut held, mut delays) = (0, 0);
        let timers = self.books.timers.index();
        for entry in &self.table {
            check_entry(entry, self.books.next_token)?;
            held += entry.holders.len();
            delays += usize::from(entry.delay.is_some());
            let hash = self.hasher.hash_one(&*entry.key);
            check_timers(entry, hash, &timers)?;
            for holder in entry.holders.iter().filter(|h| h.ephemeral) {
                conns.add(holder.conn, hash);
            }
            for waiter in entry.queue.iter() {
                waiters += 1;
                conns.add(waiter.conn, hash);
                contention.joined(hash);
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
        if (held, delays) != (self.books.held, self.books.delays) {
            return Err(format!(
                "{held} grants and {delays} lock delays, {} and {} counted",
                self.books.held, self.books.delays
            ));
        }
        let live = self.live_timers();
        if !self.books.timers.is_compact(live) {
            return Err(format!(
                "{} timers for {live} live objects",
                self.books.timers.len()
            ));
        }
        if contention != self.books.contention {
            return Err("contention index disagrees with the table".to_owned());
        }
        if conns != self.books.conns {
            return Err("connection index disagrees with the table".to_owned());
        }
        Ok(())
    }

    /// Sums up the state (not the counters) in a number that is the same
    /// for the same state whatever the hash seed: two shards fed the same
    /// commands must agree on it.
    pub fn digest(&self, into: &mut StableHasher) {
        into.u64(self.books.next_token).u64(self.books.next_waiter);
        let sorted: BTreeMap<&str, &LockEntry> = self.table.iter().map(|e| (&*e.key, e)).collect();
        for (key, entry) in sorted {
            into.str(key).u64(u64::from(entry.limit));
            let delay = entry.delay.as_deref();
            into.u64(delay.map_or(0, |d| d.at.0 + 1));
            into.u64(delay.map_or(0, |d| d.seq));
            for h in entry.holders.iter() {
                into.str(&h.client).u64(h.conn).u64(h.token);
                into.u64(h.deadline.at.0).u64(h.deadline.seq);
                into.u64(u64::from(h.ephemeral));
                into.u64(u64::from(h.shared)).u64(h.lock_delay_ms);
                into.u64(h.granted_by.map_or(0, |handle| handle.0 + 1));
            }
            for w in entry.queue.iter() {
                into.u64(w.id).u64(w.handle.0).str(&w.client).u64(w.conn);
                into.u64(w.ttl_ms).u64(w.wait_ms);
                into.u64(w.deadline.map_or(0, |d| d.at.0 + 1));
                into.u64(w.deadline.map_or(0, |d| d.seq));
                into.u64(u64::from(w.ephemeral));
                into.u64(u64::from(w.shared)).u64(w.lock_delay_ms);
            }
        }
    }

    /// The `top` most waited-for held locks, and the `top` keys with the
    /// most waiters, each list most waiters first, then by key. Costs
    /// O(`top`), not O(keys): the contended keys come ranked from the
    /// contention index, and where fewer than `top` keys have waiters the
    /// held list is filled with other held locks, whichever the table
    /// yields first (so among locks that nobody waits for, which are
    /// listed is arbitrary).
    pub fn top(&self, now: Tick, top: usize) -> (Vec<HeldLock>, Vec<HeldLock>) {
        let describe = |e: &LockEntry| {
            e.holders.iter().next().map(|h| HeldLock {
                key: e.key.to_string(),
                client: h.client.to_string(),
                token: h.token,
                remaining_ms: now.millis_until(h.deadline.at),
                waiters: e.queue.len() as u64,
            })
        };
        let mut contended: Vec<&LockEntry> = self
            .books
            .contention
            .most(top)
            .filter_map(|hash| self.entry_with_hash(hash))
            .collect();
        contended.sort_by(|a, b| lock_rank(b).cmp(&lock_rank(a)));
        let mut held = contended.clone();
        if held.len() < top {
            // Every key with waiters is listed already, so at most that
            // many (fewer than `top`) are skipped here.
            let idle = self.table.iter().filter(|e| e.queue.is_empty());
            let mut idle: Vec<&LockEntry> = idle.take(top - held.len()).collect();
            idle.sort_by(|a, b| lock_rank(b).cmp(&lock_rank(a)));
            held.extend(idle);
        }
        (
            held.into_iter().filter_map(describe).collect(),
            contended.into_iter().filter_map(describe).collect(),
        )
    }

    /// The entry whose key has `hash` (the first, in the unlikely case of
    /// two).
    fn entry_with_hash(&self, hash: u64) -> Option<&LockEntry> {
        self.table.find(hash, |e| e.has_hash(self.hasher, hash))
    }
}

fn check_entry(entry: &LockEntry, next_token: u64) -> Result<(), String> {
    let key = &entry.key;
    if entry.holders.is_empty() && entry.delay.is_none() {
        return Err(format!(
            "key {key:?} has an entry but no holder or lock delay"
        ));
    }
    if entry.queue.front().is_some_and(|w| entry.admits(w.shared)) {
        return Err(format!("key {key:?} has room and waiters"));
    }
    check_modes(entry)?;
    let mut tokens: Vec<u64> = entry.holders.iter().map(|h| h.token).collect();
    if tokens.iter().any(|&t| t >= next_token) {
        return Err(format!("key {key:?} holds a token not yet issued"));
    }
    tokens.sort_unstable();
    tokens.dedup();
    if tokens.len() != entry.holders.len() {
        return Err(format!("key {key:?} has two grants with one token"));
    }
    let ids: Vec<u64> = entry.queue.iter().map(|w| w.id).collect();
    if ids.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("key {key:?}: waiters out of id order"));
    }
    Ok(())
}

/// Whether a key's holders and waiters agree with its limit, and its
/// holders hold in one mode, no more of them than it admits.
pub(super) fn check_modes(entry: &LockEntry) -> Result<(), String> {
    let key = &entry.key;
    if !(1..=deadbolt_proto::limits::LOCK_LIMIT_MAX).contains(&entry.limit) {
        return Err(format!("key {key:?} has limit {}", entry.limit));
    }
    let shared_anywhere =
        entry.holders.iter().any(|h| h.shared) || entry.queue.iter().any(|w| w.shared);
    if shared_anywhere && entry.limit != 1 {
        return Err(format!(
            "key {key:?} with limit {} is held or waited on shared",
            entry.limit
        ));
    }
    let shared = entry.holders.iter().filter(|h| h.shared).count();
    let exclusive = entry.holders.len() - shared;
    if shared > 0 && exclusive > 0 {
        return Err(format!(
            "key {key:?} has {shared} shared and {exclusive} exclusive holders"
        ));
    }
    if exclusive > entry.limit as usize {
        return Err(format!(
            "key {key:?} has {exclusive} exclusive holders, over its limit {}",
            entry.limit
        ));
    }
    Ok(())
}

/// Whether each deadline of `entry` has its timer.
fn check_timers(entry: &LockEntry, hash: u64, timers: &TimerIndex<LockDue>) -> Result<(), String> {
    for holder in entry.holders.iter() {
        let token = holder.token;
        if !timers.has(LockDue::Lease { hash, token }, holder.deadline) {
            return Err(format!("key {:?}: lease {token} has no timer", entry.key));
        }
    }
    if let Some(&delay) = entry.delay.as_deref()
        && !timers.has(LockDue::Delay { hash }, delay)
    {
        return Err(format!("key {:?}: lock delay has no timer", entry.key));
    }
    for waiter in entry.queue.iter() {
        let due = LockDue::Wait {
            hash,
            waiter: waiter.id,
        };
        if let Some(at) = waiter.deadline
            && !timers.has(due, at)
        {
            return Err(format!(
                "key {:?}: waiter {} has no timer",
                entry.key, waiter.id
            ));
        }
    }
    Ok(())
}

/// Ranks locks for `stats`: most waiters first, then by key.
fn lock_rank<'a>(entry: &&'a LockEntry) -> (usize, std::cmp::Reverse<&'a str>) {
    (entry.queue.len(), std::cmp::Reverse(&entry.key))
}
