//! The one hash function for keys: seeded, so hash tables resist crafted
//! collisions, and explicit, so the same seed gives the same iteration order
//! (and so the same run) every time.

use std::hash::BuildHasher;

use foldhash::fast::{FixedState, FoldHasher};

/// Builds foldhash hashers from a fixed seed. `Copy`, unlike
/// [`FixedState`], so every table of a shard can hold one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHasher {
    seed: u64,
}

impl KeyHasher {
    /// The hasher for `seed`.
    pub const fn with_seed(seed: u64) -> KeyHasher {
        KeyHasher { seed }
    }
}

impl BuildHasher for KeyHasher {
    type Hasher = FoldHasher<'static>;

    #[inline]
    fn build_hasher(&self) -> FoldHasher<'static> {
        FixedState::with_seed(self.seed).build_hasher()
    }
}

/// A hash that is the same in every run, on every machine and in every
/// version of deadbolt: FNV-1a over the bytes, then murmur3's finaliser to
/// spread FNV's weak low bits. It places keys on shards (placement must
/// survive a restart and agree between replicas) and sums up shard state
/// in digests. It is not flood-resistant; the seeded [`KeyHasher`] is what
/// the hash tables use.
#[derive(Debug, Clone, Copy)]
pub struct StableHasher(u64);

impl Default for StableHasher {
    fn default() -> Self {
        StableHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl StableHasher {
    /// Adds bytes.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }

    /// Adds a string, length first, so that ("ab","c") and ("a","bc")
    /// differ.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }

    /// Adds a number, little-endian whatever the machine.
    pub fn u64(&mut self, n: u64) -> &mut Self {
        self.bytes(&n.to_le_bytes())
    }

    /// The hash so far.
    pub fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// [`StableHasher`] of one string.
pub fn stable_hash(s: &str) -> u64 {
    StableHasher::default().bytes(s.as_bytes()).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_hash_never_changes() {
        // Shard placement depends on these values: changing them moves
        // every key of an existing data directory to another shard.
        assert_eq!(stable_hash(""), StableHasher::default().finish());
        assert_eq!(stable_hash("job/42"), stable_hash("job/42"));
        assert_ne!(stable_hash("job/42"), stable_hash("job/43"));
        assert_eq!(stable_hash("a"), 0x82a2_a958_a9be_ce5b);
    }
}
