//! Per-principal quotas (SPEC section 10): how many locks a principal may
//! hold, how many of its `lock` requests may wait, how many sets it may
//! have created, and how many members it may have put in sets. A request
//! past a quota is answered `overloaded` before it reaches a shard, so one
//! principal cannot use up the server's capacity for the others.
//!
//! The [`Ledger`] counts from the answers this server gave, in this
//! process, grant by grant (a key held shared, or by several holders of a
//! semaphore, counts once per grant): a grant counts until its unlock,
//! until later grants of its key show it gone (a grant of the other mode,
//! or more exclusive grants than the key's `limit`), until its ephemeral
//! connection closes, or until its lease ends as this front measures it
//! (from the answer, so a little after the shard does: the count errs on
//! the high side). A set counts from its `set_up`
//! until its `tear_down` or the end of its time to live, and with it the
//! members each principal inserted first.
//!
//! **Recovered state counts too.** What a principal held before a restart
//! or before this node became a cluster's leader is not in this process's
//! answers, so the ledger is rebuilt from the shards themselves
//! ([`Ledger::rebuild`] from a [`Census`] of the shards' images): when a
//! durable server starts (after recovery) and when a cluster node starts to
//! lead (once it has applied everything committed before its term). The
//! shards name holders and inserters by client id, and the owners of
//! client ids are shard state too (claims, SPEC section 10), so each is
//! counted against the principal that owns its client id:
//! - every non-ephemeral grant of a held key (each of a key's shared or
//!   semaphore holders), with the lease it has left;
//! - every live set, against the principal of the client that set it up
//!   (the shards keep it, and log it with the `set_up`), with the time to
//!   live it has left; a set restored from a snapshot written before the
//!   shards kept it (snapshot format 3 and older) counts against the
//!   principal of its first inserter, and, while it has no member, against
//!   nobody;
//! - every member, against the principal of the client that inserted it
//!   first.
//!
//! A client id nobody owns (claimed before authentication was on, or
//! forgotten past the claims' bound) counts against nobody. What a new
//! leader answers between the two steps is kept, and the census is added
//! for the keys it did not grant since; meanwhile (until its images are
//! in, a few milliseconds after the election) the requests a quota limits
//! are answered `unavailable`, as during the election itself, so none
//! slips past a quota, and a change answered then (an `unlock`, a
//! `tear_down`) that the images still hold is counted until its lease or
//! set ends.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::proto::{Keys, LockOp, Mode, Okay, Op, Outcome, ServerError, SetOp, Wait};
use crate::shard::image::ShardImage;

use super::Principal;

/// How much one principal may hold. In the auth file these are the
/// optional keys `locks_max`, `waiters_max`, `sets_max` and
/// `members_max` of a `[[principal]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Locks held at once.
    pub locks_max: u64,
    /// `lock` requests that may wait, in flight at once.
    pub waiters_max: u64,
    /// Live sets created by the principal.
    pub sets_max: u64,
    /// Members the principal inserted first, over live sets.
    pub members_max: u64,
}

impl Default for Quotas {
    /// 10,000 locks, 10,000 waiters, 1,000 sets, 10,000,000 members: a
    /// tenth of the server's default capacity for sets and members, a
    /// thousandth for locks.
    fn default() -> Quotas {
        Quotas {
            locks_max: 10_000,
            waiters_max: 10_000,
            sets_max: 1_000,
            members_max: 10_000_000,
        }
    }
}

/// One principal's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Locks it holds.
    pub locks: u64,
    /// Its `lock` requests that may wait, in flight.
    pub waiters: u64,
    /// Live sets it created.
    pub sets: u64,
    /// Members it inserted first, in live sets.
    pub members: u64,
}

/// Every principal's usage, and what it is made of.
#[derive(Debug, Default)]
pub struct Ledger {
    inner: Mutex<Book>,
}

#[derive(Debug, Default)]
struct Book {
    /// Between [`Ledger::forget`] and [`Ledger::rebuild`]: the counts miss
    /// the census, so requests they limit wait (`unavailable`) rather
    /// than slip past a quota.
    recounting: bool,
    usage: HashMap<Arc<str>, Usage>,
    /// Held locks by key, each key's grants by token.
    held: HashMap<String, BTreeMap<u64, Held>>,
    /// Lease ends, to drop ended grants: (end, key, token), one per grant.
    lease_ends: BTreeSet<(Instant, String, u64)>,
    /// Live sets by name.
    sets: HashMap<String, SetEntry>,
    /// Ends of time to live: (end, set), one per live set.
    set_ends: BTreeSet<(Instant, String)>,
}

/// One grant of a key.
#[derive(Debug)]
struct Held {
    principal: Arc<str>,
    /// The client it was granted to: its retries are the same grant.
    client: Arc<str>,
    ends: Instant,
    /// Held shared, not exclusive.
    shared: bool,
    /// How many exclusive grants the key admits at once.
    limit: u32,
}

#[derive(Debug)]
struct SetEntry {
    /// Who created it, if this process saw it created (or, rebuilt from a
    /// census, the owner of the client the shard names as its creator, or
    /// of its first inserter in a set from an old snapshot).
    creator: Option<Arc<str>>,
    ends: Instant,
    /// Members inserted first, per principal.
    members: HashMap<Arc<str>, u64>,
}

/// What the shards hold that counts against quotas, by client id: built
/// from shard images with [`Census::add`], read by [`Ledger::rebuild`].
#[derive(Debug, Default)]
pub struct Census {
    /// Each held key's non-ephemeral grants.
    held: HashMap<String, Vec<CensusGrant>>,
    /// Each live set.
    sets: HashMap<String, CensusSet>,
    /// The owner of each claimed client id.
    owners: HashMap<String, String>,
}

#[derive(Debug)]
struct CensusGrant {
    client: String,
    token: u64,
    /// The lease left, by the shard's own time.
    left_ms: u64,
    shared: bool,
    /// The key's limit of exclusive grants.
    limit: u32,
}

#[derive(Debug)]
struct CensusSet {
    /// Its time to live left, by the shard's own time.
    left_ms: u64,
    /// The client that counts for it: the one that set it up, or, for a
    /// set restored from a snapshot taken before shards kept that, the one
    /// that inserted its first member, if any.
    counted_client: Option<String>,
    /// Members inserted first, per client.
    members: HashMap<String, u64>,
}

/// Milliseconds from `now` to `at` (microsecond ticks), rounded up.
fn left_ms(at: crate::time::Tick, now: crate::time::Tick) -> u64 {
    at.0.saturating_sub(now.0).div_ceil(1000)
}

impl Census {
    /// Adds what the shard of `image` holds.
    pub fn add(&mut self, image: &ShardImage) {
        for key in &image.locks.keys {
            let grants = key.holders.iter().filter(|h| !h.ephemeral);
            let grants: Vec<CensusGrant> = grants
                .map(|holder| CensusGrant {
                    client: holder.client.clone(),
                    token: holder.token,
                    left_ms: left_ms(holder.deadline.at, image.now),
                    shared: holder.shared,
                    limit: key.limit,
                })
                .collect();
            if !grants.is_empty() {
                self.held.insert(key.key.clone(), grants);
            }
        }
        for set in &image.sets.sets {
            let mut members: HashMap<String, u64> = HashMap::new();
            for member in &set.members {
                if let Some(client) = set.clients.get(member.owner as usize) {
                    *members.entry(client.clone()).or_default() += 1;
                }
            }
            let entry = CensusSet {
                left_ms: left_ms(set.deadline.at, image.now),
                counted_client: set.creator.clone().or_else(|| set.clients.first().cloned()),
                members,
            };
            self.sets.insert(set.name.clone(), entry);
        }
        for claim in &image.claims.claims {
            self.owners
                .insert(claim.client.clone(), claim.principal.clone());
        }
    }

    /// The principal that owns `client`, if one does.
    fn owner(&self, client: &str) -> Option<Arc<str>> {
        self.owners.get(client).map(|p| Arc::from(p.as_str()))
    }
}

/// What a request may change that the ledger counts, or that its answer
/// may need (an `inspect`'s token): taken from the op before it runs, so
/// that the op itself (an insert batch of thousands of keys) need not be
/// kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// `lock`: a grant of `key`.
    Grant {
        /// The key.
        key: String,
        /// Whether it ends with its connection.
        ephemeral: bool,
        /// Shared or exclusive, and the key's limit.
        mode: Mode,
    },
    /// `extend` of grant `token` of `key`.
    Extend {
        /// The key.
        key: String,
        /// The grant's token.
        token: u64,
    },
    /// `unlock` of grant `token` of `key`.
    Release {
        /// The key.
        key: String,
        /// The grant's token.
        token: u64,
    },
    /// `set_up` of `set`.
    SetUp {
        /// The set.
        set: String,
        /// Its time to live.
        ttl_ms: u64,
    },
    /// `insert` into `set`.
    Insert {
        /// The set.
        set: String,
    },
    /// `tear_down` of `set`.
    TearDown {
        /// The set.
        set: String,
    },
    /// `inspect`: the holder's token may have to be hidden.
    Inspect,
}

impl Effect {
    /// The effect of `op`, if it has one.
    pub fn of(op: &Op) -> Option<Effect> {
        Some(match op {
            Op::Lock(LockOp::Acquire(a)) => Effect::Grant {
                key: a.key.clone(),
                ephemeral: a.ephemeral,
                mode: a.mode,
            },
            Op::Lock(LockOp::Extend { key, token, .. }) => Effect::Extend {
                key: key.clone(),
                token: *token,
            },
            Op::Lock(LockOp::Release { key, token }) => Effect::Release {
                key: key.clone(),
                token: *token,
            },
            Op::Lock(LockOp::Inspect { .. }) => Effect::Inspect,
            Op::Set(SetOp::SetUp { set, ttl_ms }) => Effect::SetUp {
                set: set.clone(),
                ttl_ms: *ttl_ms,
            },
            Op::Set(SetOp::Insert { set, .. }) => Effect::Insert { set: set.clone() },
            Op::Set(SetOp::TearDown { set }) => Effect::TearDown { set: set.clone() },
            _ => return None,
        })
    }
}

/// Counts a waiting `lock` request until it is answered (dropped).
#[derive(Debug)]
pub struct Waiting<'a> {
    ledger: &'a Ledger,
    principal: Arc<str>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut book = self.ledger.book();
        book.entry(&self.principal).waiters -= 1;
    }
}

impl Ledger {
    fn book(&self) -> MutexGuard<'_, Book> {
        // Every change below leaves the book whole between statements
        // that could panic (none do), so a poisoned lock is still good.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `principal`'s usage now.
    pub fn usage(&self, principal: &str, now: Instant) -> Usage {
        let mut book = self.book();
        book.expire(now);
        book.usage.get(principal).copied().unwrap_or_default()
    }

    /// Admits `op` for `principal`, asked by `client`, against its
    /// quotas, or answers `overloaded` naming the quota. A `lock` that may
    /// wait is counted among the principal's waiters until the returned
    /// guard is dropped.
    pub fn admit(
        &self,
        principal: &Principal,
        client: &str,
        op: &Op,
        now: Instant,
    ) -> Result<Option<Waiting<'_>>, ServerError> {
        let mut book = self.book();
        book.expire(now);
        let name = principal.name.as_str();
        let quotas = principal.quotas;
        let limited = matches!(
            op,
            Op::Lock(LockOp::Acquire(_)) | Op::Set(SetOp::SetUp { .. } | SetOp::Insert { .. })
        );
        if limited && book.recounting {
            return Err(ServerError::unavailable(
                "counting quotas from the state after a change of leader: retry",
            ));
        }
        let usage = book.usage.get(name).copied().unwrap_or_default();
        let over = |what: &str, max: u64| {
            Err(ServerError::overloaded(format!(
                "principal `{name}` is at its quota of {max} {what}"
            )))
        };
        match op {
            Op::Lock(LockOp::Acquire(acquire)) => {
                // A retry by a holder is its grant again, not another.
                let holds_it = book
                    .held
                    .get(&acquire.key)
                    .is_some_and(|grants| grants.values().any(|h| &*h.client == client));
                if !holds_it && usage.locks >= quotas.locks_max {
                    return over("held locks", quotas.locks_max);
                }
                if acquire.wait != Wait::Never {
                    if usage.waiters >= quotas.waiters_max {
                        return over("waiting lock requests", quotas.waiters_max);
                    }
                    let key: Arc<str> = Arc::from(name);
                    book.entry(&key).waiters += 1;
                    return Ok(Some(Waiting {
                        ledger: self,
                        principal: key,
                    }));
                }
            }
            Op::Set(SetOp::SetUp { set, .. })
                if !book.sets.contains_key(set) && usage.sets >= quotas.sets_max =>
            {
                return over("sets", quotas.sets_max);
            }
            Op::Set(SetOp::Insert { keys, .. }) => {
                let n = match keys {
                    Keys::One(_) => 1,
                    Keys::Many(keys) => keys.len() as u64,
                };
                if usage.members.saturating_add(n) > quotas.members_max {
                    return over("set members", quotas.members_max);
                }
            }
            _ => {}
        }
        Ok(None)
    }

    /// Counts what `outcome`, the answer to the request of `principal`'s
    /// `client` whose [`Effect`] is `effect`, changed. `ttl_ms_max` stands
    /// in for the time to live of a set this process did not see set up.
    pub fn record(
        &self,
        principal: &str,
        client: &str,
        effect: &Effect,
        outcome: &Outcome,
        now: Instant,
        ttl_ms_max: u64,
    ) {
        let Ok(okay) = outcome else { return };
        let mut book = self.book();
        let after = |ms: u64| now + Duration::from_millis(ms);
        match (effect, okay) {
            (Effect::Grant { key, mode, .. }, Okay::Granted(g)) => {
                let held = Held {
                    principal: Arc::from(principal),
                    client: Arc::from(client),
                    ends: after(g.ttl_ms),
                    shared: mode.is_shared(),
                    limit: mode.limit(),
                };
                book.grant(key, g.token, held);
            }
            (Effect::Extend { key, token }, Okay::Extended(e)) => {
                book.extend(key, *token, after(e.ttl_ms));
            }
            (Effect::Release { key, token }, Okay::Empty(_)) => book.release(key, *token),
            (Effect::SetUp { set, ttl_ms }, Okay::SetUp(reply)) => {
                let creator = reply.created.then(|| Arc::from(principal));
                book.set_up(set, creator, after(*ttl_ms));
            }
            (Effect::Insert { set }, Okay::Inserted(one)) => {
                book.add_members(principal, set, u64::from(one.first), after(ttl_ms_max));
            }
            (Effect::Insert { set }, Okay::InsertedMany(many)) => {
                let firsts = many.results.iter().filter(|r| r.first).count() as u64;
                book.add_members(principal, set, firsts, after(ttl_ms_max));
            }
            (Effect::TearDown { set }, Okay::TornDown(_)) => book.tear_down(set),
            _ => {}
        }
    }

    /// An ephemeral grant ended with its connection.
    pub fn release(&self, key: &str, token: u64) {
        self.book().release(key, token);
    }

    /// Starts a rebuild: forgets every grant and set counted so far (the
    /// census, taken after this, has those that still exist) and counts
    /// what is answered from now on. Until [`Ledger::rebuild`] adds the
    /// census, a request a quota limits (`lock`, `set_up`, `insert`) is
    /// answered `unavailable`, which clients retry.
    pub fn forget(&self) {
        let mut book = self.book();
        book.recounting = true;
        book.held.clear();
        book.sets.clear();
        book.recount();
    }

    /// Adds `census` (the shards' state, taken after [`Ledger::forget`]):
    /// its grants and sets for the keys and sets not answered since, each
    /// against the principal that owns its client id (see the module's
    /// docs), and its members to every set. Waiters in flight stay
    /// counted.
    pub fn rebuild(&self, census: &Census, now: Instant) {
        let mut book = self.book();
        let after = |ms: u64| now + Duration::from_millis(ms);
        for (key, grants) in &census.held {
            let held = book.held.entry(key.clone()).or_default();
            for grant in grants {
                let Some(principal) = census.owner(&grant.client) else {
                    continue;
                };
                // A grant answered since is the same grant, counted.
                held.entry(grant.token).or_insert_with(|| Held {
                    principal,
                    client: Arc::from(grant.client.as_str()),
                    ends: after(grant.left_ms),
                    shared: grant.shared,
                    limit: grant.limit,
                });
            }
            // Grants answered since may show some of the census's gone.
            for token in book.superseded(key) {
                book.held.get_mut(key).map(|held| held.remove(&token));
            }
            if book.held.get(key).is_some_and(BTreeMap::is_empty) {
                book.held.remove(key);
            }
        }
        for (name, set) in &census.sets {
            let entry = book.sets.entry(name.clone()).or_insert_with(|| SetEntry {
                creator: None,
                ends: after(set.left_ms),
                members: HashMap::new(),
            });
            if entry.creator.is_none() {
                entry.creator = set.counted_client.as_deref().and_then(|c| census.owner(c));
            }
            for (client, &members) in &set.members {
                if let Some(principal) = census.owner(client) {
                    *entry.members.entry(principal).or_default() += members;
                }
            }
        }
        book.recounting = false;
        book.recount();
    }
}

impl Book {
    fn entry(&mut self, principal: &Arc<str>) -> &mut Usage {
        self.usage.entry(Arc::clone(principal)).or_default()
    }

    /// Rebuilds the deadline indexes and every principal's counts of
    /// locks, sets and members from `held` and `sets` (waiters are
    /// counted by their guards, and stay).
    fn recount(&mut self) {
        self.lease_ends = self
            .held
            .iter()
            .flat_map(|(key, grants)| {
                let grants = grants.iter();
                grants.map(|(&token, held)| (held.ends, key.clone(), token))
            })
            .collect();
        self.set_ends = self
            .sets
            .iter()
            .map(|(set, entry)| (entry.ends, set.clone()))
            .collect();
        for usage in self.usage.values_mut() {
            *usage = Usage {
                waiters: usage.waiters,
                ..Usage::default()
            };
        }
        let mut counts: Vec<(Arc<str>, Usage)> = Vec::new();
        for held in self.held.values().flat_map(BTreeMap::values) {
            let one = Usage {
                locks: 1,
                ..Usage::default()
            };
            counts.push((Arc::clone(&held.principal), one));
        }
        for entry in self.sets.values() {
            if let Some(creator) = &entry.creator {
                let one = Usage {
                    sets: 1,
                    ..Usage::default()
                };
                counts.push((Arc::clone(creator), one));
            }
            for (principal, &members) in &entry.members {
                let some = Usage {
                    members,
                    ..Usage::default()
                };
                counts.push((Arc::clone(principal), some));
            }
        }
        for (principal, add) in counts {
            let usage = self.entry(&principal);
            usage.locks += add.locks;
            usage.sets += add.sets;
            usage.members += add.members;
        }
    }

    /// Drops grants and sets whose time ended by `now`.
    fn expire(&mut self, now: Instant) {
        while let Some((ends, key, token)) = self.lease_ends.first().cloned() {
            if ends > now {
                break;
            }
            self.drop_grant(&key, token);
        }
        while let Some((ends, set)) = self.set_ends.first().cloned() {
            if ends > now {
                break;
            }
            self.set_ends.pop_first();
            self.tear_down(&set);
        }
    }

    fn grant(&mut self, key: &str, token: u64, held: Held) {
        let grants = self.held.get(key);
        if grants.is_some_and(|grants| grants.contains_key(&token)) {
            // A retried lock: the same grant.
            return self.extend(key, token, held.ends);
        }
        let principal = Arc::clone(&held.principal);
        self.entry(&principal).locks += 1;
        self.lease_ends.insert((held.ends, key.to_owned(), token));
        self.held
            .entry(key.to_owned())
            .or_default()
            .insert(token, held);
        for token in self.superseded(key) {
            self.drop_grant(key, token);
        }
    }

    /// The grants of `key` that its latest grant shows gone: those of the
    /// other mode (shared and exclusive grants never overlap), and the
    /// oldest exclusive ones past the key's limit.
    fn superseded(&self, key: &str) -> Vec<u64> {
        let Some(grants) = self.held.get(key) else {
            return Vec::new();
        };
        let Some(latest) = grants.values().next_back() else {
            return Vec::new();
        };
        let (shared, limit) = (latest.shared, latest.limit as usize);
        let newest_first = grants.iter().rev();
        let mut same_mode = 0;
        newest_first
            .filter(|(_, held)| {
                if held.shared != shared {
                    return true;
                }
                same_mode += 1;
                !shared && same_mode > limit
            })
            .map(|(&token, _)| token)
            .collect()
    }

    fn extend(&mut self, key: &str, token: u64, ends: Instant) {
        let grants = self.held.get_mut(key);
        if let Some(held) = grants.and_then(|grants| grants.get_mut(&token)) {
            // One entry per grant: the index stays the size of `held`.
            let before = std::mem::replace(&mut held.ends, ends);
            self.lease_ends.remove(&(before, key.to_owned(), token));
            self.lease_ends.insert((ends, key.to_owned(), token));
        }
    }

    fn release(&mut self, key: &str, token: u64) {
        self.drop_grant(key, token);
    }

    fn drop_grant(&mut self, key: &str, token: u64) {
        let Some(grants) = self.held.get_mut(key) else {
            return;
        };
        let Some(held) = grants.remove(&token) else {
            return;
        };
        if grants.is_empty() {
            self.held.remove(key);
        }
        self.lease_ends.remove(&(held.ends, key.to_owned(), token));
        self.entry(&held.principal).locks -= 1;
    }

    fn set_up(&mut self, set: &str, creator: Option<Arc<str>>, ends: Instant) {
        let entry = self.sets.entry(set.to_owned()).or_insert_with(|| SetEntry {
            creator: None,
            ends,
            members: HashMap::new(),
        });
        let before = std::mem::replace(&mut entry.ends, ends);
        self.set_ends.remove(&(before, set.to_owned()));
        let newly_created = creator.is_some() && entry.creator.is_none();
        if newly_created {
            entry.creator.clone_from(&creator);
        }
        self.set_ends.insert((ends, set.to_owned()));
        if let (true, Some(creator)) = (newly_created, creator) {
            self.entry(&creator).sets += 1;
        }
    }

    fn add_members(&mut self, principal: &str, set: &str, firsts: u64, unknown_ends: Instant) {
        if firsts == 0 {
            return;
        }
        if !self.sets.contains_key(set) {
            self.set_up(set, None, unknown_ends);
        }
        let principal: Arc<str> = Arc::from(principal);
        if let Some(entry) = self.sets.get_mut(set) {
            *entry.members.entry(Arc::clone(&principal)).or_default() += firsts;
        }
        self.entry(&principal).members += firsts;
    }

    fn tear_down(&mut self, set: &str) {
        let Some(entry) = self.sets.remove(set) else {
            return;
        };
        self.set_ends.remove(&(entry.ends, set.to_owned()));
        if let Some(creator) = &entry.creator {
            self.entry(creator).sets -= 1;
        }
        for (principal, members) in entry.members {
            self.entry(&principal).members -= members;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Acquire, Granted, Inserted, SetUpReply, TornDown};

    fn principal(quotas: Quotas) -> Principal {
        Principal {
            name: "p".into(),
            secret: crate::proto::Secret::new("s"),
            locks: vec![String::new()],
            sets: vec![String::new()],
            read: vec![String::new()],
            admin: false,
            quotas,
        }
    }

    fn effect(op: &Op) -> Effect {
        Effect::of(op).expect("an op with an effect")
    }

    fn lock(key: &str, wait: Wait) -> Op {
        Op::Lock(LockOp::Acquire(Acquire::mutex(key, 1000, wait)))
    }

    #[tokio::test(start_paused = true)]
    async fn held_locks_count_until_unlock_or_lease_end() {
        let ledger = Ledger::default();
        let p = principal(Quotas {
            locks_max: 1,
            ..Quotas::default()
        });
        let now = Instant::now();
        let a = lock("a", Wait::Never);
        assert!(ledger.admit(&p, "c1", &a, now).is_ok());
        let granted = Ok(Okay::Granted(Granted::new(7, 1000)));
        ledger.record("p", "c1", &effect(&a), &granted, now, 0);
        // The same key again (a retry) is admitted; another is not.
        assert!(ledger.admit(&p, "c1", &a, now).is_ok());
        let b = lock("b", Wait::Never);
        let refused = ledger.admit(&p, "c1", &b, now).unwrap_err();
        assert_eq!(refused.code, crate::proto::ErrorCode::Overloaded);
        // Released grants leave nothing behind.
        let c = lock("c", Wait::Never);
        let other = principal(Quotas::default());
        let granted_c = Ok(Okay::Granted(Granted::new(8, 1000)));
        assert!(ledger.admit(&other, "c1", &c, now).is_ok());
        ledger.record("p", "c1", &effect(&c), &granted_c, now, 0);
        let unlock = Op::Lock(LockOp::Release {
            key: "c".into(),
            token: 8,
        });
        ledger.record("p", "c1", &effect(&unlock), &Ok(Okay::EMPTY), now, 0);
        assert_eq!(ledger.book().lease_ends.len(), 1);
        // The lease ends: counted no more.
        let later = now + Duration::from_millis(1001);
        assert!(ledger.admit(&p, "c1", &b, later).is_ok());
        assert_eq!(ledger.usage("p", later).locks, 0);
    }

    /// A key held shared by several clients of one principal counts once
    /// per grant, an unlock frees exactly its grant, and a later exclusive
    /// grant of the key shows the shared ones gone.
    #[tokio::test(start_paused = true)]
    async fn each_grant_of_a_shared_key_counts() {
        let ledger = Ledger::default();
        let p = principal(Quotas {
            locks_max: 2,
            ..Quotas::default()
        });
        let now = Instant::now();
        let mut acquire = Acquire::mutex("k", 1000, Wait::Never);
        acquire.mode = Mode::Shared;
        let share = Op::Lock(LockOp::Acquire(acquire));
        for (client, token) in [("c1", 1), ("c2", 2)] {
            assert!(ledger.admit(&p, client, &share, now).is_ok());
            let granted = Ok(Okay::Granted(Granted::new(token, 1000)));
            ledger.record("p", client, &effect(&share), &granted, now, 0);
        }
        assert_eq!(ledger.usage("p", now).locks, 2);
        let refused = ledger.admit(&p, "c3", &share, now).unwrap_err();
        assert_eq!(refused.code, crate::proto::ErrorCode::Overloaded);
        // A holder's retry is its grant again.
        assert!(ledger.admit(&p, "c1", &share, now).is_ok());
        let unlock = Op::Lock(LockOp::Release {
            key: "k".into(),
            token: 1,
        });
        ledger.record("p", "c1", &effect(&unlock), &Ok(Okay::EMPTY), now, 0);
        assert_eq!(ledger.usage("p", now).locks, 1);
        assert!(ledger.admit(&p, "c3", &share, now).is_ok());
        // An exclusive grant: the share of c2 has ended.
        let exclusive = lock("k", Wait::Never);
        let granted = Ok(Okay::Granted(Granted::new(3, 1000)));
        ledger.record("p", "c3", &effect(&exclusive), &granted, now, 0);
        assert_eq!(ledger.usage("p", now).locks, 1);
        assert_eq!(ledger.book().lease_ends.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_counted_while_their_request_runs() {
        let ledger = Ledger::default();
        let p = principal(Quotas {
            waiters_max: 1,
            ..Quotas::default()
        });
        let now = Instant::now();
        let op = lock("a", Wait::Forever);
        let first = ledger.admit(&p, "c1", &op, now).unwrap();
        assert!(first.is_some());
        assert!(ledger.admit(&p, "c1", &op, now).is_err());
        drop(first);
        assert!(ledger.admit(&p, "c1", &op, now).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn sets_and_members_count_until_tear_down() {
        let ledger = Ledger::default();
        let p = principal(Quotas {
            sets_max: 1,
            members_max: 2,
            ..Quotas::default()
        });
        let now = Instant::now();
        let set_up = |set: &str| {
            Op::Set(SetOp::SetUp {
                set: set.into(),
                ttl_ms: 60_000,
            })
        };
        let created = Ok(Okay::SetUp(SetUpReply {
            created: true,
            size: 0,
        }));
        ledger.record("p", "c1", &effect(&set_up("s")), &created, now, 0);
        assert!(ledger.admit(&p, "c1", &set_up("s"), now).is_ok());
        assert!(ledger.admit(&p, "c1", &set_up("t"), now).is_err());
        let insert = Op::Set(SetOp::Insert {
            set: "s".into(),
            keys: Keys::One("k".into()),
        });
        let first = Ok(Okay::Inserted(Inserted {
            index: 1,
            first: true,
        }));
        ledger.record("p", "c1", &effect(&insert), &first, now, 0);
        ledger.record("p", "c1", &effect(&insert), &first, now, 0);
        assert!(ledger.admit(&p, "c1", &insert, now).is_err());
        let tear_down = Op::Set(SetOp::TearDown { set: "s".into() });
        let torn = Ok(Okay::TornDown(TornDown { size: 2 }));
        ledger.record("p", "c1", &effect(&tear_down), &torn, now, 0);
        assert_eq!(ledger.usage("p", now), Usage::default());
    }

    /// A shard that has `c1` (owned by `p`) holding `held`, an ephemeral
    /// lock `eph`, `c1` and `c3` (owned by `p`) sharing `shared`, a set `s`
    /// set up by `c2` (owned by `q`) with two members (`c2` inserted first)
    /// and one (`c1`), and an empty set `empty` set up by `c1`: its census.
    fn census_of_a_shard() -> Census {
        let mut census = Census::default();
        census.add(&image_of_a_shard());
        census
    }

    /// The image behind [`census_of_a_shard`].
    fn image_of_a_shard() -> ShardImage {
        use crate::shard::{Caller, Command, Handle, Input, Shard, ShardConfig, ShardOp};
        use crate::time::Tick;
        let mut shard = Shard::new(ShardConfig {
            hash_seed: 1,
            first_token: 1,
            limits: crate::Limits::default(),
        });
        let caller = |client: &str| Caller {
            client: Arc::from(client),
            conn: 1,
        };
        let mut handle = 0;
        let mut apply = |client: &str, op: ShardOp| {
            handle += 1;
            let input = Input::Op {
                handle: Handle(handle),
                caller: caller(client),
                op,
            };
            shard.apply(Command {
                at: Tick(1_000_000),
                input,
            });
        };
        let claim = |client: &str, principal: &str| ShardOp::Claim {
            client: client.into(),
            principal: principal.into(),
        };
        apply("c1", claim("c1", "p"));
        apply("c2", claim("c2", "q"));
        let acquire = |key: &str, ephemeral: bool| {
            let mut acquire = crate::proto::Acquire::mutex(key, 60_000, Wait::Never);
            acquire.ephemeral = ephemeral;
            ShardOp::Lock(LockOp::Acquire(acquire))
        };
        apply("c1", acquire("held", false));
        apply("c1", acquire("eph", true));
        // Two shares of one key, by c1 (p) and c3 (p).
        apply("c3", claim("c3", "p"));
        let share = || {
            let mut acquire = crate::proto::Acquire::mutex("shared", 60_000, Wait::Never);
            acquire.mode = crate::proto::Mode::Shared;
            ShardOp::Lock(LockOp::Acquire(acquire))
        };
        apply("c1", share());
        apply("c3", share());
        let set_up = SetOp::SetUp {
            set: "s".into(),
            ttl_ms: 60_000,
        };
        apply("c2", ShardOp::Set(set_up));
        // An empty set, set up by c1 (p): it counts against its creator.
        let empty = SetOp::SetUp {
            set: "empty".into(),
            ttl_ms: 60_000,
        };
        apply("c1", ShardOp::Set(empty));
        let insert = |keys: Vec<&str>| SetOp::Insert {
            set: "s".into(),
            keys: Keys::Many(keys.into_iter().map(String::from).collect()),
        };
        apply("c2", ShardOp::Set(insert(vec!["a", "b"])));
        apply("c1", ShardOp::Set(insert(vec!["a", "c"])));
        let _ = shard.take_answers();
        shard.image()
    }

    /// Sets from a snapshot written before the shards kept their creators
    /// count as before: against their first inserter, an empty one
    /// against nobody.
    #[tokio::test(start_paused = true)]
    async fn a_set_with_no_creator_counts_against_its_first_inserter() {
        let mut image = image_of_a_shard();
        for set in &mut image.sets.sets {
            set.creator = None;
        }
        let mut census = Census::default();
        census.add(&image);
        let ledger = Ledger::default();
        let now = Instant::now();
        ledger.forget();
        ledger.rebuild(&census, now);
        assert_eq!(ledger.usage("p", now).sets, 0);
        assert_eq!(ledger.usage("q", now).sets, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rebuild_counts_the_shards_state_against_the_owners_of_its_client_ids() {
        let ledger = Ledger::default();
        let now = Instant::now();
        // Counted before, and gone since: forgotten.
        let stale = lock("stale", Wait::Never);
        let granted = Ok(Okay::Granted(Granted::new(9, 60_000)));
        ledger.record("p", "c1", &effect(&stale), &granted, now, 0);
        ledger.forget();
        // Answered after the forget: kept.
        let fresh = lock("fresh", Wait::Never);
        let granted = Ok(Okay::Granted(Granted::new(10, 60_000)));
        ledger.record("q", "c2", &effect(&fresh), &granted, now, 0);
        // Until the census is in, what a quota limits waits.
        let early = ledger.admit(&principal(Quotas::default()), "c1", &fresh, now);
        assert_eq!(
            early.unwrap_err().code,
            crate::proto::ErrorCode::Unavailable
        );
        ledger.rebuild(&census_of_a_shard(), now);
        // p: the non-ephemeral lock, both shares, the empty set it set up,
        // one member (c); q: the lock granted since, the set it set up and
        // two members (a, b).
        let p = ledger.usage("p", now);
        assert_eq!((p.locks, p.sets, p.members), (3, 1, 1));
        let q = ledger.usage("q", now);
        assert_eq!((q.locks, q.sets, q.members), (1, 1, 2));
        // Enforced: p is at a quota of three locks, and an unlock of one
        // share frees exactly one place.
        let three_locks = principal(Quotas {
            locks_max: 3,
            ..Quotas::default()
        });
        let other = lock("other", Wait::Never);
        let refused = ledger.admit(&three_locks, "c1", &other, now);
        assert_eq!(
            refused.unwrap_err().code,
            crate::proto::ErrorCode::Overloaded
        );
        let shares = ledger.book().held["shared"].len();
        assert_eq!(shares, 2);
        let token = *ledger.book().held["shared"].keys().next().unwrap();
        let unlock = Op::Lock(LockOp::Release {
            key: "shared".into(),
            token,
        });
        ledger.record("p", "c1", &effect(&unlock), &Ok(Okay::EMPTY), now, 0);
        assert_eq!(ledger.usage("p", now).locks, 2);
        assert!(ledger.admit(&three_locks, "c1", &other, now).is_ok());
        // The recovered lease still ends: 60 s after the shard's time.
        let later = now + Duration::from_millis(60_001);
        assert_eq!(ledger.usage("p", later).locks, 0);
    }
}
