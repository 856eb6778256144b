//! Which keys each connection waits on or holds ephemerally, so that
//! closing a connection visits only the keys it touched (and costs nothing
//! if none), even in a shard of millions of locks.

use hashbrown::HashMap;

use crate::ConnId;
use crate::hasher::KeyHasher;

/// Per connection, per key hash: how many waiters and ephemeral holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ConnIndex {
    refs: HashMap<ConnId, HashMap<u64, u32, KeyHasher>, KeyHasher>,
}

impl ConnIndex {
    pub fn new(hasher: KeyHasher) -> Self {
        ConnIndex {
            refs: HashMap::with_hasher(hasher),
        }
    }

    /// `conn` now waits on, or holds ephemerally, a key with `hash`.
    pub fn add(&mut self, conn: ConnId, hash: u64) {
        let hasher = *self.refs.hasher();
        let refs = self
            .refs
            .entry(conn)
            .or_insert_with(|| HashMap::with_hasher(hasher));
        *refs.entry(hash).or_insert(0) += 1;
    }

    /// Undoes one [`ConnIndex::add`].
    pub fn remove(&mut self, conn: ConnId, hash: u64) {
        let Some(refs) = self.refs.get_mut(&conn) else {
            return;
        };
        if let Some(count) = refs.get_mut(&hash) {
            *count -= 1;
            if *count == 0 {
                refs.remove(&hash);
            }
        }
        if refs.is_empty() {
            self.refs.remove(&conn);
        }
    }

    /// The key hashes `conn` touches (in no particular order).
    pub fn hashes_of(&self, conn: ConnId) -> Vec<u64> {
        self.refs
            .get(&conn)
            .map(|refs| refs.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Whether `conn` touches any key.
    pub fn touches(&self, conn: ConnId) -> bool {
        self.refs.contains_key(&conn)
    }

    pub fn clear(&mut self) {
        self.refs.clear();
    }
}
