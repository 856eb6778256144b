//! Distinct sets (SPEC section 3): named sets of keys, each key with the
//! 1-based index of its first arrival and the client that owns it.
//!
//! A set stores its keys packed end to end in one string, with the end
//! offset, the owner and a 4-byte hash-table slot per key; that is about 16
//! bytes per member beyond the key itself, so a million-member set fits in
//! a few tens of megabytes.
//!
//! The sets' part of a snapshot is in `image`.

mod image;

use std::hash::BuildHasher;
use std::sync::Arc;

use super::hasher::KeyHasher;
use hashbrown::{HashMap, HashTable};

use super::ClientId;
use super::hasher::StableHasher;
use super::timers::{Timer, Timers};
use crate::image::Deadline;
use crate::planted::{self, PlantedBug};
use crate::time::Tick;
use deadbolt_proto::limits::Limits;
use deadbolt_proto::{
    Inserted, InsertedMany, Keys, Member, MembersPage, Okay, Outcome, ServerError, SetCounters,
    SetInfo, SetOp, SetSummary, SetUpReply, TornDown,
};

/// The most key bytes one `members` page carries, counted as the reply
/// encodes them ([`json_escaped_len`]); a page stops early (with `next`
/// set) rather than exceed it.
pub const MEMBERS_PAGE_BYTES: usize = 256 * 1024;

/// The bytes `key` takes inside a JSON string once escaped, as the reply
/// encoder (serde_json) writes it: `"`, `\` and the control characters
/// with a short escape (`\n`) take two bytes, the other control
/// characters six (`\u001f`), every other byte one. A key of control
/// characters is six times its length on the wire, so the page cut counts
/// this rather than the raw length, or a page of 1 KiB keys could be a
/// 1.5 MiB reply, over the message limit.
pub fn json_escaped_len(key: &str) -> usize {
    key.bytes()
        .map(|byte| match byte {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0x00..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// A set's deadline: set number `set` reaches the end of its time to live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct SetDue {
    hash: u64,
    set: u64,
}

/// A set as a checker outside the rules sees it (the simulation replays a
/// log and compares the views around each command).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetView {
    /// Its name.
    pub set: String,
    /// When its time to live ends.
    pub ends: Tick,
    /// Its number of keys.
    pub size: u64,
}

/// One distinct set.
#[derive(Debug)]
struct DistinctSet {
    name: Box<str>,
    /// Unique within the shard, so a timer of a torn-down set never touches
    /// a new set of the same name.
    id: u64,
    /// When its time to live ends, with the number of the timer that ends it.
    deadline: Deadline,
    /// Every key, end to end, in index order.
    packed: String,
    /// `ends[i]` is where key `i` (0-based) ends in `packed`.
    ends: Vec<u32>,
    /// `owners[i]` is the slot in `clients` of key `i`'s owner.
    owners: Vec<u32>,
    clients: Vec<ClientId>,
    client_slots: HashMap<ClientId, u32, KeyHasher>,
    /// The client that set it up, if known (a set restored from an image
    /// taken before creators were kept has none), for quotas.
    creator: Option<ClientId>,
    /// Positions of the keys, hashed by key.
    positions: HashTable<u32>,
}

fn key_at<'a>(packed: &'a str, ends: &[u32], position: u32) -> &'a str {
    let position = position as usize;
    let start = if position == 0 {
        0
    } else {
        ends[position - 1] as usize
    };
    &packed[start..ends[position] as usize]
}

impl DistinctSet {
    fn new(name: Box<str>, id: u64, deadline: Deadline, hasher: KeyHasher) -> Self {
        DistinctSet {
            name,
            id,
            deadline,
            packed: String::new(),
            ends: Vec::new(),
            owners: Vec::new(),
            clients: Vec::new(),
            client_slots: HashMap::with_hasher(hasher),
            creator: None,
            positions: HashTable::new(),
        }
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    /// The position of `key`, if the set has it.
    fn find(&self, hash: u64, key: &str) -> Option<u32> {
        let (packed, ends) = (&self.packed, &self.ends);
        self.positions
            .find(hash, |&p| key_at(packed, ends, p) == key)
            .copied()
    }

    /// The owner slot of `client`, made if it has none yet.
    fn slot_of(&mut self, client: &ClientId) -> u32 {
        if let Some(&slot) = self.client_slots.get(client) {
            return slot;
        }
        let slot = self.clients.len() as u32;
        self.clients.push(Arc::clone(client));
        self.client_slots.insert(Arc::clone(client), slot);
        slot
    }

    /// Whether `client` owns the key at `position`.
    fn is_owner(&self, position: u32, client: &ClientId) -> bool {
        let owner = self.owners[position as usize];
        self.client_slots.get(client) == Some(&owner)
    }

    /// Adds a key known to be new; returns its position.
    fn push(&mut self, hasher: KeyHasher, hash: u64, key: &str, client: &ClientId) -> u32 {
        let position = self.ends.len() as u32;
        self.packed.push_str(key);
        self.ends.push(self.packed.len() as u32);
        let owner = self.slot_of(client);
        self.owners.push(owner);
        let (packed, ends) = (&self.packed, &self.ends);
        self.positions.insert_unique(hash, position, |&p| {
            hasher.hash_one(key_at(packed, ends, p))
        });
        position
    }
}

/// The distinct sets of one shard.
#[derive(Debug)]
pub(crate) struct Sets {
    table: HashTable<DistinctSet>,
    hasher: KeyHasher,
    timers: Timers<SetDue>,
    next_set: u64,
    /// Members over all of this shard's sets.
    members: usize,
    /// Bytes of members' keys over all of this shard's sets.
    member_bytes: usize,
    limits: Limits,
    counters: SetCounters,
    /// Sets created, expired and torn down, for pushed events.
    events: crate::events::Outbox,
}

impl Sets {
    /// No sets.
    /// Enforces `limits` from now on.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    pub fn new(hasher: KeyHasher, limits: Limits) -> Self {
        Sets {
            table: HashTable::new(),
            hasher,
            timers: Timers::default(),
            next_set: 0,
            members: 0,
            member_bytes: 0,
            limits,
            counters: SetCounters::default(),
            events: crate::events::Outbox::default(),
        }
    }

    /// Reports sets created, expired and torn down from now on.
    pub fn enable_events(&mut self) {
        self.events.enable();
    }

    /// Moves the events reported since the last call into `into`.
    pub fn drain_events_into(&mut self, into: &mut Vec<crate::events::Event>) {
        self.events.drain_into(into);
    }

    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Carries out `op` for `client` at `now`.
    pub fn handle(&mut self, now: Tick, client: &ClientId, op: SetOp) -> Outcome {
        let outcome = match op {
            SetOp::SetUp { set, ttl_ms } => self.set_up(now, client, set, ttl_ms),
            SetOp::Insert { set, keys } => self.insert(client, &set, keys),
            SetOp::Members { set, after, limit } => self.members(&set, after, limit),
            SetOp::Inspect { set } => self.inspect(now, &set),
            SetOp::TearDown { set } => self.tear_down(&set),
        };
        self.compact_timers();
        outcome
    }

    fn set_up(&mut self, now: Tick, client: &ClientId, name: String, ttl_ms: u64) -> Outcome {
        let hash = self.hash(&name);
        let deadline = now.plus_millis(ttl_ms);
        if let Some(set) = self.table.find_mut(hash, |s| *s.name == *name) {
            let due = SetDue { hash, set: set.id };
            let size = set.len() as u64;
            if !planted::active(PlantedBug::SetRenewalIgnored) {
                set.deadline = self.timers.push(deadline, due);
            }
            return Ok(Okay::SetUp(SetUpReply {
                created: false,
                size,
            }));
        }
        if self.table.len() >= self.limits.sets_max {
            return Err(ServerError::overloaded("too many sets (sets_max reached)"));
        }
        let id = self.next_set;
        self.next_set += 1;
        let deadline = self.timers.push(deadline, SetDue { hash, set: id });
        self.events.set(&name, crate::events::SetChange::Created);
        let mut set = DistinctSet::new(name.into_boxed_str(), id, deadline, self.hasher);
        set.creator = Some(Arc::clone(client));
        let hasher = self.hasher;
        self.table
            .insert_unique(hash, set, |s| hasher.hash_one(&*s.name));
        self.counters.created += 1;
        Ok(Okay::SetUp(SetUpReply {
            created: true,
            size: 0,
        }))
    }

    fn insert(&mut self, client: &ClientId, name: &str, keys: Keys) -> Outcome {
        let hash = self.hash(name);
        let Some(set) = self.table.find_mut(hash, |s| *s.name == *name) else {
            return Err(ServerError::no_such_set());
        };
        let mut room = Room {
            hasher: self.hasher,
            members: &mut self.members,
            member_bytes: &mut self.member_bytes,
            limits: &self.limits,
            counters: &mut self.counters,
        };
        match keys {
            Keys::One(key) => room.insert(set, client, &key).map(Okay::Inserted),
            Keys::Many(keys) => {
                // Applied in order; if a limit stops the batch part way, the
                // keys before it stay inserted, and a retry of the whole
                // batch answers them exactly as before.
                let results = keys
                    .iter()
                    .map(|key| room.insert(set, client, key))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Okay::InsertedMany(InsertedMany { results }))
            }
        }
    }

    fn members(&self, name: &str, after: u64, limit: u32) -> Outcome {
        let set = self.find(name)?;
        let size = set.len() as u64;
        let start = after.min(size);
        let end = start.saturating_add(u64::from(limit)).min(size);
        // A page of 10,000 keys of 1 KiB each would be a 10 MiB reply that one
        // slow reader could make the server hold; the byte budget, counted as
        // the keys are encoded, keeps every page well under the message
        // limit, and `next` resumes where it stopped.
        let mut bytes = 0;
        let members: Vec<Member> = (start..end)
            .map_while(|position| {
                let key = key_at(&set.packed, &set.ends, position as u32);
                let encoded = json_escaped_len(key);
                if bytes > 0 && bytes + encoded > MEMBERS_PAGE_BYTES {
                    return None;
                }
                bytes += encoded;
                Some(Member {
                    index: position + 1,
                    key: key.to_owned(),
                })
            })
            .collect();
        let end = start + members.len() as u64;
        let next = (end < size).then_some(end);
        Ok(Okay::Members(MembersPage { members, next }))
    }

    fn inspect(&self, now: Tick, name: &str) -> Outcome {
        let set = self.find(name)?;
        Ok(Okay::SetInfo(SetInfo {
            size: set.len() as u64,
            remaining_ms: now.millis_until(set.deadline.at),
        }))
    }

    fn tear_down(&mut self, name: &str) -> Outcome {
        let hash = self.hash(name);
        let Ok(occupied) = self.table.find_entry(hash, |s| *s.name == *name) else {
            return Err(ServerError::no_such_set());
        };
        let (set, _) = occupied.remove();
        self.members -= set.len();
        self.member_bytes -= set.packed.len();
        self.counters.torn_down += 1;
        self.events
            .set(&set.name, crate::events::SetChange::TornDown);
        Ok(Okay::TornDown(TornDown {
            size: set.len() as u64,
        }))
    }

    fn find(&self, name: &str) -> Result<&DistinctSet, ServerError> {
        self.table
            .find(self.hash(name), |s| *s.name == *name)
            .ok_or_else(ServerError::no_such_set)
    }

    /// Removes every set whose time to live ended at or before `now`.
    pub fn advance(&mut self, now: Tick) {
        while let Some(Timer { seq, due, .. }) = self.timers.pop_due(now) {
            // Only the last timer set for it ends a set (see `timers`).
            let is_it = |s: &DistinctSet| s.id == due.set && s.deadline.seq == seq;
            if let Ok(occupied) = self.table.find_entry(due.hash, is_it) {
                let (set, _) = occupied.remove();
                self.members -= set.len();
                self.member_bytes -= set.packed.len();
                self.counters.expired += 1;
                self.events
                    .set(&set.name, crate::events::SetChange::Expired);
            }
        }
        self.compact_timers();
    }

    fn compact_timers(&mut self) {
        let table = &self.table;
        let is_live = |timer: &Timer<SetDue>| {
            table
                .find(timer.due.hash, |s| {
                    s.id == timer.due.set && s.deadline.seq == timer.seq
                })
                .is_some()
        };
        self.timers.compact_if_stale(table.len(), is_live);
    }

    /// Every set, in name order, as a checker outside the rules sees it:
    /// see [`SetView`].
    pub fn views(&self) -> Vec<SetView> {
        let mut views: Vec<SetView> = self
            .table
            .iter()
            .map(|set| SetView {
                set: set.name.to_string(),
                ends: set.deadline.at,
                size: set.len() as u64,
            })
            .collect();
        views.sort_unstable_by(|a, b| a.set.cmp(&b.set));
        views
    }

    /// The earliest deadline (possibly a stale one).
    pub fn next_deadline(&self) -> Option<Tick> {
        self.timers.next_at()
    }

    /// Counters since the start, and sizes now.
    pub fn counters(&self) -> SetCounters {
        SetCounters {
            count: self.table.len() as u64,
            members: self.members as u64,
            ..self.counters
        }
    }

    /// Sums up the state in a number that does not depend on the hash seed
    /// (see `Locks::digest`).
    pub fn digest(&self, into: &mut StableHasher) {
        into.u64(self.next_set);
        let mut sets: Vec<&DistinctSet> = self.table.iter().collect();
        sets.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        for set in sets {
            into.str(&set.name).u64(set.id);
            into.u64(set.deadline.at.0).u64(set.deadline.seq);
            for position in 0..set.len() as u32 {
                let owner = &set.clients[set.owners[position as usize] as usize];
                into.str(key_at(&set.packed, &set.ends, position))
                    .str(owner);
            }
        }
    }

    /// The `top` largest sets (ties by name).
    pub fn top(&self, now: Tick, top: usize) -> Vec<SetSummary> {
        super::top::top(self.table.iter(), top, set_rank)
            .into_iter()
            .map(|s| SetSummary {
                set: s.name.to_string(),
                size: s.len() as u64,
                remaining_ms: now.millis_until(s.deadline.at),
            })
            .collect()
    }

    /// Checks that every set's index agrees with its keys, and that every
    /// set has a live timer (or it would never expire).
    pub fn check_invariants(&self) -> Result<(), String> {
        let (mut members, mut bytes) = (0, 0);
        let timers = self.timers.index();
        for set in &self.table {
            let due = SetDue {
                hash: self.hash(&set.name),
                set: set.id,
            };
            if !timers.has(due, set.deadline) {
                return Err(format!("set {:?} has no timer", set.name));
            }
            members += set.len();
            bytes += set.packed.len();
            if set.positions.len() != set.len() || set.owners.len() != set.len() {
                return Err(format!("set {:?}: index and keys disagree", set.name));
            }
            for position in 0..set.len() as u32 {
                let key = key_at(&set.packed, &set.ends, position);
                if set.find(self.hash(key), key) != Some(position) {
                    return Err(format!("set {:?}: key {key:?} misplaced", set.name));
                }
            }
        }
        if !self.timers.is_compact(self.table.len()) {
            return Err(format!(
                "{} timers for {} sets",
                self.timers.len(),
                self.table.len()
            ));
        }
        if bytes != self.member_bytes {
            return Err(format!(
                "{bytes} bytes of members, {} counted",
                self.member_bytes
            ));
        }
        if members != self.members {
            return Err(format!(
                "{members} members in sets, {} counted",
                self.members
            ));
        }
        Ok(())
    }
}

/// Ranks sets for `stats`: largest first, then by name.
fn set_rank<'a>(set: &&'a DistinctSet) -> (usize, std::cmp::Reverse<&'a str>) {
    (set.len(), std::cmp::Reverse(&set.name))
}

/// What an insert may change besides the set: the shard-wide member count
/// and statistics, and the limits it checks.
struct Room<'a> {
    hasher: KeyHasher,
    members: &'a mut usize,
    member_bytes: &'a mut usize,
    limits: &'a Limits,
    counters: &'a mut SetCounters,
}

impl Room<'_> {
    fn insert(
        &mut self,
        set: &mut DistinctSet,
        client: &ClientId,
        key: &str,
    ) -> Result<Inserted, ServerError> {
        let hash = self.hasher.hash_one(key);
        if let Some(position) = set.find(hash, key) {
            self.counters.inserts_duplicate += 1;
            return Ok(Inserted {
                index: u64::from(position) + 1,
                first: set.is_owner(position, client),
            });
        }
        self.check_room(set, key)?;
        let position = set.push(self.hasher, hash, key, client);
        *self.members += 1;
        *self.member_bytes += key.len();
        self.counters.inserts_new += 1;
        Ok(Inserted {
            index: u64::from(position) + 1,
            first: true,
        })
    }

    fn check_room(&self, set: &DistinctSet, key: &str) -> Result<(), ServerError> {
        // Positions and offsets are 32-bit to keep members small.
        let set_max = planted::set_members_max(self.limits.set_members_max).min(u32::MAX as usize);
        if set.len() >= set_max {
            return Err(ServerError::overloaded(
                "set is full (set_members_max reached)",
            ));
        }
        if set.packed.len() + key.len() > u32::MAX as usize {
            return Err(ServerError::overloaded("set is full (4 GiB of keys)"));
        }
        if *self.members >= self.limits.members_max {
            return Err(ServerError::overloaded(
                "too many members (members_max reached)",
            ));
        }
        if *self.member_bytes + key.len() > self.limits.member_bytes_max {
            return Err(ServerError::overloaded(
                "too many bytes of members (member_bytes_max reached)",
            ));
        }
        Ok(())
    }
}
