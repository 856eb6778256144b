//! The locks' part of a shard image: taken from the table, and the table
//! rebuilt from it (see `crate::image` for what an image holds and why).

use std::hash::BuildHasher;

use hashbrown::hash_table::Entry;

use super::holders::Holder;
use super::queue::Waiter;
use super::{LockDue, LockEntry, Locks};
use crate::hasher::KeyHasher;
use crate::image::Deadline;
use crate::image::{
    HolderImage, ImageError, Interner, KeyImage, LocksImage, WaiterImage, check_distinct,
    check_issued,
};
use crate::timers::{Timer, Timers};
use deadbolt_proto::LockCounters;
use deadbolt_proto::limits::Limits;

impl Locks {
    /// The locks' part of a shard image, keys in byte order.
    pub fn image(&self) -> LocksImage {
        let mut keys: Vec<KeyImage> = self.table.iter().map(key_image).collect();
        keys.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        LocksImage {
            next_token: self.books.next_token,
            next_waiter: self.books.next_waiter,
            timers_pushed: self.books.timers.pushed(),
            counters: self.counters(),
            keys,
        }
    }

    /// The lock table `image` describes, or why it describes none.
    pub fn from_image(
        hasher: KeyHasher,
        limits: Limits,
        image: LocksImage,
        clients: &mut Interner,
    ) -> Result<Locks, ImageError> {
        let mut locks = Locks::new(hasher, image.next_token, limits);
        locks
            .table
            .reserve(image.keys.len(), |e| hasher.hash_one(&*e.key));
        locks.books.next_waiter = image.next_waiter;
        locks.books.counters = LockCounters {
            // Sizes, not counters: `counters()` reads them off the tables.
            held: 0,
            waiters: 0,
            ..image.counters
        };
        let mut numbers = Numbers::new(image.timers_pushed);
        for key in image.keys {
            locks.restore_key(key, clients, &mut numbers)?;
        }
        locks.books.timers = numbers.into_timers()?;
        Ok(locks)
    }

    /// Rebuilds one key's entry, with its holders' and waiters' timers and
    /// connections.
    fn restore_key(
        &mut self,
        image: KeyImage,
        clients: &mut Interner,
        numbers: &mut Numbers,
    ) -> Result<(), ImageError> {
        check_shape(&image)?;
        let hash = self.hasher.hash_one(&*image.key);
        let mut entry = LockEntry::new(image.key.into_boxed_str(), image.limit);
        if let Some(delay) = image.delay {
            numbers.timer(delay, LockDue::Delay { hash })?;
            entry.delay = Some(Box::new(delay));
            self.books.delays += 1;
        }
        for holder in image.holders {
            let holder = self.restore_holder(holder, hash, clients, numbers)?;
            entry.holders.insert(holder);
        }
        for waiter in image.waiters {
            let waiter = self.restore_waiter(waiter, hash, clients, numbers)?;
            entry.queue.push_back(waiter);
        }
        super::audit::check_modes(&entry).map_err(|reason| ImageError::BadHolders {
            key: entry.key.to_string(),
            reason,
        })?;
        let hasher = self.hasher;
        let key = &entry.key;
        match self
            .table
            .entry(hash, |e| e.key == *key, |e| hasher.hash_one(&*e.key))
        {
            Entry::Occupied(_) => Err(ImageError::Duplicate {
                what: "keys",
                name: format!("{key:?}"),
            }),
            Entry::Vacant(vacant) => {
                self.books.key_bytes += key.len();
                vacant.insert(entry);
                Ok(())
            }
        }
    }

    fn restore_holder(
        &mut self,
        image: HolderImage,
        hash: u64,
        clients: &mut Interner,
        numbers: &mut Numbers,
    ) -> Result<Holder, ImageError> {
        check_issued("token", image.token, self.books.next_token)?;
        numbers.tokens.push(image.token);
        let due = LockDue::Lease {
            hash,
            token: image.token,
        };
        numbers.timer(image.deadline, due)?;
        if image.ephemeral {
            self.books.conns.add(image.conn, hash);
        }
        self.books.held += 1;
        Ok(Holder {
            client: clients.intern(image.client),
            conn: image.conn,
            token: image.token,
            deadline: image.deadline,
            ephemeral: image.ephemeral,
            shared: image.shared,
            lock_delay_ms: image.lock_delay_ms,
            granted_by: image.granted_by,
        })
    }

    fn restore_waiter(
        &mut self,
        image: WaiterImage,
        hash: u64,
        clients: &mut Interner,
        numbers: &mut Numbers,
    ) -> Result<Waiter, ImageError> {
        check_issued("waiter", image.id, self.books.next_waiter)?;
        numbers.waiters.push(image.id);
        if let Some(deadline) = image.deadline {
            let due = LockDue::Wait {
                hash,
                waiter: image.id,
            };
            numbers.timer(deadline, due)?;
        }
        self.books.waiter_joined(image.conn, hash);
        Ok(Waiter {
            id: image.id,
            handle: image.handle,
            client: clients.intern(image.client),
            conn: image.conn,
            ttl_ms: image.ttl_ms,
            wait_ms: image.wait_ms,
            deadline: image.deadline,
            ephemeral: image.ephemeral,
            shared: image.shared,
            lock_delay_ms: image.lock_delay_ms,
        })
    }
}

/// One key of the image.
fn key_image(entry: &LockEntry) -> KeyImage {
    let holders = entry.holders.iter().map(|h| HolderImage {
        client: h.client.to_string(),
        conn: h.conn,
        token: h.token,
        deadline: h.deadline,
        ephemeral: h.ephemeral,
        shared: h.shared,
        lock_delay_ms: h.lock_delay_ms,
        granted_by: h.granted_by,
    });
    let holders = holders.collect();
    let waiters = entry.queue.iter().map(|w| WaiterImage {
        id: w.id,
        handle: w.handle,
        client: w.client.to_string(),
        conn: w.conn,
        ttl_ms: w.ttl_ms,
        wait_ms: w.wait_ms,
        deadline: w.deadline,
        ephemeral: w.ephemeral,
        shared: w.shared,
        lock_delay_ms: w.lock_delay_ms,
    });
    KeyImage {
        key: entry.key.to_string(),
        limit: entry.limit,
        delay: entry.delay.as_deref().copied(),
        holders,
        waiters: waiters.collect(),
    }
}

/// What the rules assume of every entry: a holder or a lock delay,
/// waiters in the order they came (and, checked once the entry is built,
/// holders the key admits).
fn check_shape(image: &KeyImage) -> Result<(), ImageError> {
    if image.holders.is_empty() && image.delay.is_none() {
        return Err(ImageError::NoHolder {
            key: image.key.clone(),
        });
    }
    if image.waiters.windows(2).any(|w| w[0].id >= w[1].id) {
        return Err(ImageError::WaitersOutOfOrder {
            key: image.key.clone(),
        });
    }
    Ok(())
}

/// The numbers a restore has seen, which must be unique shard-wide: a
/// lease timer finds its grant by token, a wait timer its waiter by number,
/// and timers at one tick fire in the order of theirs.
struct Numbers {
    tokens: Vec<u64>,
    waiters: Vec<u64>,
    timers: Vec<Timer<LockDue>>,
    timers_pushed: u64,
}

impl Numbers {
    fn new(timers_pushed: u64) -> Self {
        Numbers {
            tokens: Vec::new(),
            waiters: Vec::new(),
            timers: Vec::new(),
            timers_pushed,
        }
    }

    /// Queues the timer of a deadline.
    fn timer(&mut self, deadline: Deadline, due: LockDue) -> Result<(), ImageError> {
        let Deadline { at, seq } = deadline;
        check_issued("lock timer", seq, self.timers_pushed)?;
        self.timers.push(Timer { at, seq, due });
        Ok(())
    }

    /// The timer heap, once every number has proved unique.
    fn into_timers(mut self) -> Result<Timers<LockDue>, ImageError> {
        check_distinct("tokens", &mut self.tokens)?;
        check_distinct("waiters", &mut self.waiters)?;
        let mut seqs: Vec<u64> = self.timers.iter().map(|t| t.seq).collect();
        check_distinct("lock timers", &mut seqs)?;
        Ok(Timers::restore(self.timers, self.timers_pushed))
    }
}
