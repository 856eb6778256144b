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
