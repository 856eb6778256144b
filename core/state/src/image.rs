//! Snapshots of a shard: [`ShardImage`], everything that decides what the
//! shard does next, as plain owned data for a storage layer to write and
//! read back ([`Shard::image`], [`Shard::from_image`]).
//!
//! An image does not depend on the hash seed: keys and sets are named by
//! their bytes (the live tables and timers name them by seeded hashes),
//! keys and sets are listed in byte order, so the same state gives the same
//! image whatever the seed, and it may be restored under another seed.
//!
//! Deadlines carry the sequence number of their timer ([`Deadline::seq`]):
//! deadlines at the same tick fire in that order, which decides which
//! waiter gets which token, so it must survive a restore. A live timer is
//! one that will act when it fires; the shard also queues stale ones (for
//! leases extended or ended, waiters gone, sets torn down), which are
//! no-ops when they fire and are left out. Each object with a deadline
//! keeps the number of the one timer that acts for it (the last one set),
//! so the image writes the deadline as the object holds it, where a timer
//! that names nothing cannot be written.
//!
//! A corrupt image is an [`ImageError`], never a panic.
//!
//! Images written before SPEC section 7 (shared locks, semaphores, lock
//! delay) have the shape kept in [`v1`], those written before claims
//! of client ids were logged the shape kept in [`v2`], and those written
//! before each set kept the client that set it up the shape kept in
//! [`v3`]; each converts to this one.

pub mod v1;
pub mod v2;
pub mod v3;

use std::sync::Arc;

use hashbrown::HashSet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::claims::{Claims, ClaimsImage};
use crate::hasher::KeyHasher;
use crate::locks::Locks;
use crate::sets::Sets;
use crate::time::Tick;
use crate::{ClientId, ConnId, Handle, Shard, ShardConfig};
use deadbolt_proto::{LockCounters, SetCounters};

/// Everything that decides what a shard does next. Answers not yet taken
/// are not part of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardImage {
    /// The shard's time: the latest command time it had seen.
    pub now: Tick,
    /// Its locks.
    pub locks: LocksImage,
    /// Its distinct sets.
    pub sets: SetsImage,
    /// The owners of its client ids.
    pub claims: ClaimsImage,
}

/// A deadline and the order in which its timer was set: deadlines at the
/// same tick fire in `seq` order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadline {
    /// When it falls.
    pub at: Tick,
    /// Its timer's sequence number, unique among the shard's lock timers
    /// (or among its set timers) and below their `timers_pushed`.
    pub seq: u64,
}

/// A shard's locks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocksImage {
    /// The token of the next grant.
    pub next_token: u64,
    /// The number of the next waiter.
    pub next_waiter: u64,
    /// Lock timers set so far: the next one's sequence number.
    pub timers_pushed: u64,
    /// Counters since the start; the sizes (`held`, `waiters`) are those
    /// of the image, and a restore counts them again.
    pub counters: LockCounters,
    /// Every key with lock state, in byte order.
    pub keys: Vec<KeyImage>,
}

/// One key with lock state: held, and perhaps waited on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyImage {
    /// The key.
    pub key: String,
    /// How many exclusive holders it admits (1: a mutex or a read-write
    /// lock).
    pub limit: u32,
    /// When its lock delay ends, if one runs.
    pub delay: Option<Deadline>,
    /// Its grants (one, for a mutex).
    pub holders: Vec<HolderImage>,
    /// Its waiters, first come first.
    pub waiters: Vec<WaiterImage>,
}

/// One grant of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderImage {
    /// The holder's client id.
    pub client: String,
    /// The connection that took (or last re-took) it.
    pub conn: ConnId,
    /// Its fencing token.
    pub token: u64,
    /// When its lease ends.
    pub deadline: Deadline,
    /// Whether it ends with its connection.
    pub ephemeral: bool,
    /// Whether it is held shared.
    pub shared: bool,
    /// How long nobody is granted the key after its lease runs out.
    pub lock_delay_ms: u64,
    /// The request whose answer is all the holder has heard of its grant,
    /// if no later request has shown that it knows.
    pub granted_by: Option<Handle>,
}

/// One queued `lock` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaiterImage {
    /// Its number, unique in the shard and rising along the queue.
    pub id: u64,
    /// Where its answer goes.
    pub handle: Handle,
    /// The client that asked.
    pub client: String,
    /// The connection it came on.
    pub conn: ConnId,
    /// The lease it asks for.
    pub ttl_ms: u64,
    /// The wait it asked for (0 when waiting forever), for the `timeout`
    /// answer.
    pub wait_ms: u64,
    /// When its wait runs out, if it has a limit.
    pub deadline: Option<Deadline>,
    /// Whether its grant is to end with its connection.
    pub ephemeral: bool,
    /// Whether it asks to hold the key shared.
    pub shared: bool,
    /// The lock delay its grant is to have.
    pub lock_delay_ms: u64,
}

/// A shard's distinct sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetsImage {
    /// The number of the next set made.
    pub next_set: u64,
    /// Set timers set so far: the next one's sequence number.
    pub timers_pushed: u64,
    /// Counters since the start; the sizes (`count`, `members`) are those
    /// of the image, and a restore counts them again.
    pub counters: SetCounters,
    /// Every set, in name order.
    pub sets: Vec<SetImage>,
}

/// One distinct set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetImage {
    /// Its name.
    pub name: String,
    /// Its number, unique in the shard (a new set of the same name gets a
    /// new one).
    pub id: u64,
    /// When its time to live ends.
    pub deadline: Deadline,
    /// The clients that first inserted some member, each once, in order
    /// of their first insert.
    pub clients: Vec<String>,
    /// The client that set it up; none in an image from before creators
    /// were kept ([`v3`]).
    pub creator: Option<String>,
    /// Its members in index order (`index` 1 first).
    pub members: Vec<MemberImage>,
}

/// One member of a set. The owner is a place in the set's `clients`
/// rather than a client id, which would repeat the id for each of a
/// million members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberImage {
    /// The member's key.
    pub key: String,
    /// Where its first inserter is in the set's `clients`.
    pub owner: u32,
}

/// Why an image cannot be restored: it describes no state a shard can be
/// in (a corrupt or hand-made snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ImageError {
    /// Two things that must be unique share a name (a key, a set, a member
    /// of one set, a client of one set) or a number (a token, a waiter, a
    /// set, a timer).
    #[error("two {what} are {name}")]
    Duplicate {
        /// What repeats ("keys", "tokens", ...).
        what: &'static str,
        /// The repeated name or number.
        name: String,
    },
    /// A number that must have been issued is not below the next one to
    /// issue, so a later one would repeat it.
    #[error("{what} {number} is not below the next one to issue, {next}")]
    NotIssued {
        /// What it numbers ("token", "waiter", ...).
        what: &'static str,
        /// The number.
        number: u64,
        /// The next to issue, from the image.
        next: u64,
    },
    /// A key has lock state but no holder and no lock delay: a free key
    /// with waiters would have been granted, and a key with neither has
    /// no entry.
    #[error("key {key:?} has no holder")]
    NoHolder {
        /// The key.
        key: String,
    },
    /// A key's holders are more than it admits, or hold in two modes, or
    /// its limit is out of bounds or shared with a limit above 1.
    #[error("key {key:?}: {reason}")]
    BadHolders {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A key's waiters are not in the order of their numbers (they join at
    /// the back with ever larger ones).
    #[error("key {key:?}: waiters out of order")]
    WaitersOutOfOrder {
        /// The key.
        key: String,
    },
    /// A member's owner is not among its set's clients.
    #[error("set {set:?}: member {key:?} has owner {owner}, of {clients} clients")]
    NoSuchOwner {
        /// The set.
        set: String,
        /// The member.
        key: String,
        /// Its owner.
        owner: u32,
        /// How many clients the set has.
        clients: usize,
    },
    /// A set is larger than its 32-bit positions and offsets can address.
    #[error("set {set:?} is too large to address")]
    SetTooLarge {
        /// The set.
        set: String,
    },
}

impl Shard {
    /// A snapshot of the whole state; see [`ShardImage`]. Taken between
    /// batches. Answers not yet taken are not state (they belong to the
    /// requests of the batch just applied) and are not in it.
    pub fn image(&self) -> ShardImage {
        ShardImage {
            now: self.now,
            locks: self.locks.image(),
            sets: self.sets.image(),
            claims: self.claims.image(),
        }
    }

    /// The shard `image` describes, its tables seeded and bounded by
    /// `config` (whose `first_token` is ignored: the image has its next
    /// token). The limits apply to what comes next: state already in the
    /// image is kept even if it is over them. An image that describes no
    /// state a shard can be in is an error.
    pub fn from_image(config: ShardConfig, image: ShardImage) -> Result<Shard, ImageError> {
        let hasher = KeyHasher::with_seed(config.hash_seed);
        let mut clients = Interner::new(hasher);
        Ok(Shard {
            locks: Locks::from_image(hasher, config.limits, image.locks, &mut clients)?,
            sets: Sets::from_image(hasher, config.limits, image.sets, &mut clients)?,
            claims: Claims::from_image(image.claims)?,
            answers: Vec::new(),
            events: Vec::new(),
            now: image.now,
        })
    }
}

/// `Duplicate` if `numbers` repeats one (it sorts them).
pub(crate) fn check_distinct(what: &'static str, numbers: &mut [u64]) -> Result<(), ImageError> {
    numbers.sort_unstable();
    match numbers.windows(2).find(|pair| pair[0] == pair[1]) {
        Some(pair) => Err(ImageError::Duplicate {
            what,
            name: pair[0].to_string(),
        }),
        None => Ok(()),
    }
}

/// `NotIssued` unless `number` is below `next`.
pub(crate) fn check_issued(what: &'static str, number: u64, next: u64) -> Result<(), ImageError> {
    if number < next {
        Ok(())
    } else {
        Err(ImageError::NotIssued { what, number, next })
    }
}

/// Gives each distinct client id of a restore one shared allocation, as
/// the live state shares its connection's: a million locks of one client
/// hold one copy of its id, not a million.
pub(crate) struct Interner(HashSet<ClientId, KeyHasher>);

impl Interner {
    pub fn new(hasher: KeyHasher) -> Self {
        Interner(HashSet::with_hasher(hasher))
    }

    pub fn intern(&mut self, client: String) -> ClientId {
        if let Some(known) = self.0.get(client.as_str()) {
            return Arc::clone(known);
        }
        let client: ClientId = Arc::from(client);
        self.0.insert(Arc::clone(&client));
        client
    }
}
