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
/// version of deadbolt: FxHash's multiply-rotate over little-endian 8-byte
/// words, then murmur3's finaliser to spread the bits. It places keys on
/// shards (placement must survive a restart and agree between replicas)
/// and sums up shard state in digests. It is not flood-resistant; the
/// seeded [`KeyHasher`] is what the hash tables use.
#[derive(Debug, Clone, Copy)]
pub struct StableHasher(u64);

impl Default for StableHasher {
    fn default() -> Self {
        StableHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl StableHasher {
    fn word(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    /// Adds bytes (their number too, so that a run of zero bytes counts).
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.word(u64::from_le_bytes(word));
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.word(u64::from_le_bytes(tail) ^ ((bytes.len() as u64) << 56));
        self
    }

    /// Adds a string, length first, so that ("ab","c") and ("a","bc")
    /// differ.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }

    /// Adds a number, little-endian whatever the machine.
    pub fn u64(&mut self, n: u64) -> &mut Self {
        self.word(n);
        self
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

    const PINNED_JOB_42: u64 = 0x600d_6f29_336f_7eeb;

    #[test]
    fn stable_hash_never_changes() {
        // Shard placement depends on these values: changing them moves
        // every key of an existing data directory to another shard.
        assert_eq!(stable_hash(""), 0x8c32_3f58_1a10_6ab4);
        assert_ne!(stable_hash("job/42"), stable_hash("job/43"));
        assert_ne!(stable_hash("\0"), stable_hash(""), "zero bytes count");
        assert_eq!(stable_hash("job/42"), PINNED_JOB_42);
    }
}
