//! How many waiters each key has, kept ranked as they come and go, so that
//! `stats` lists the most contended keys in O(`top`) instead of scanning
//! every held lock (issue 18: with 1M held locks one scan took about half
//! a second and stalled the shard).
//!
//! Keys are named by their hash in the shard's lock table, as in
//! [`super::conns`]: the index is derived data (never part of a digest or
//! an image), rebuilt by the same hooks that count waiters.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use hashbrown::HashMap;

use crate::hasher::KeyHasher;

/// Per key hash, its number of waiters; and the same ranked, most first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Contention {
    waiters: HashMap<u64, u32, KeyHasher>,
    ranked: BTreeSet<(Reverse<u32>, u64)>,
}

impl Contention {
    pub fn new(hasher: KeyHasher) -> Self {
        Contention {
            waiters: HashMap::with_hasher(hasher),
            ranked: BTreeSet::new(),
        }
    }

    /// A waiter joined the key with `hash`.
    pub fn joined(&mut self, hash: u64) {
        let count = self.waiters.entry(hash).or_insert(0);
        if *count > 0 {
            self.ranked.remove(&(Reverse(*count), hash));
        }
        *count += 1;
        self.ranked.insert((Reverse(*count), hash));
    }

    /// A waiter left the key with `hash`.
    pub fn left(&mut self, hash: u64) {
        let Some(count) = self.waiters.get_mut(&hash) else {
            return;
        };
        self.ranked.remove(&(Reverse(*count), hash));
        *count -= 1;
        if *count == 0 {
            self.waiters.remove(&hash);
        } else {
            self.ranked.insert((Reverse(*count), hash));
        }
    }

    /// Every waiter left.
    pub fn clear(&mut self) {
        self.waiters.clear();
        self.ranked.clear();
    }

    /// The hashes of the keys with the most waiters, most first (ties in
    /// hash order).
    pub fn most(&self, top: usize) -> impl Iterator<Item = u64> + '_ {
        self.ranked.iter().take(top).map(|&(_, hash)| hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_keys_by_waiters_as_they_come_and_go() {
        let mut c = Contention::new(KeyHasher::with_seed(0));
        for hash in [7, 7, 7, 3, 3, 9] {
            c.joined(hash);
        }
        assert_eq!(c.most(2).collect::<Vec<_>>(), [7, 3]);
        c.left(7);
        c.left(7);
        assert_eq!(c.most(5).collect::<Vec<_>>(), [3, 7, 9]);
        c.left(3);
        c.left(3);
        assert_eq!(c.most(5).collect::<Vec<_>>(), [7, 9]);
        c.clear();
        assert_eq!(c, Contention::new(KeyHasher::with_seed(0)));
    }
}
