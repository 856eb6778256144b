//! Every bound deadbolt enforces, in one place, each configurable.
//!
//! The wire-level bounds (sizes, ranges) are checked once, at decode
//! ([`crate::decode_request`]); the capacity bounds (locks, waiters,
//! sets, members) are checked by the shard, which answers `overloaded` when
//! one is reached. Capacity bounds are totals for the whole engine; each of
//! the N shards enforces its `1/N` share (rounded up, [`Limits::share_of`]),
//! so a skewed key distribution can meet a limit a little before the total
//! is reached.

/// The most exclusive holders a key may admit at once: the largest
/// `limit` of a `lock` (SPEC section 7).
pub const LOCK_LIMIT_MAX: u32 = 10_000;

/// The longest lock delay, in milliseconds: the largest `lock_delay_ms` of
/// a `lock` (SPEC section 7).
pub const LOCK_DELAY_MS_MAX: u64 = 60_000;

/// Bounds on what a request may ask and what the server will hold. The
/// engine holds the engine-wide totals; each shard holds its share
/// ([`Limits::share_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message, in bytes, a transport accepts (SPEC: 1 MiB).
    pub message_bytes_max: usize,
    /// Longest key or set name, in bytes (SPEC: 1024).
    pub key_bytes_max: usize,
    /// Longest client id, in bytes (SPEC: 64).
    pub client_id_bytes_max: usize,
    /// Longest lease or set time to live, in milliseconds (SPEC: one day).
    pub ttl_ms_max: u64,
    /// Longest bounded wait, in milliseconds (SPEC: one day).
    pub wait_ms_max: u64,
    /// Most keys in one `insert` batch.
    pub insert_batch_max: usize,
    /// Largest `members` page (SPEC: 10,000).
    pub members_page_max: u32,
    /// Longest top list a `stats` reply may carry.
    pub stats_top_max: u32,
    /// Most keys with lock state (held or waited on), engine-wide.
    pub locks_max: usize,
    /// Most bytes of those keys, engine-wide: with keys of up to 1 KiB,
    /// `locks_max` alone would allow 10 GiB.
    pub lock_key_bytes_max: usize,
    /// Most waiters queued on one key.
    pub waiters_per_key_max: usize,
    /// Most waiters queued, engine-wide.
    pub waiters_max: usize,
    /// Most distinct sets, engine-wide.
    pub sets_max: usize,
    /// Most members in one distinct set.
    pub set_members_max: usize,
    /// Most members over all distinct sets, engine-wide.
    pub members_max: usize,
    /// Most bytes of member keys over all distinct sets, engine-wide: with
    /// keys of up to 1 KiB, `members_max` alone would allow 100 GiB.
    pub member_bytes_max: usize,
    /// Messages queued in one shard's mailbox before requests are refused
    /// with `overloaded`.
    pub mailbox_len: usize,
    /// Most event subscriptions one connection may hold at once: its
    /// `watch`es and its `lock`s with `notify` whose grants last (SPEC
    /// section 7). One more is answered `overloaded`.
    pub watches_per_connection_max: usize,
    /// Most bytes of pushed events queued for one connection and not yet
    /// written; past it the connection is closed, as a reader too slow
    /// for its events.
    pub event_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            message_bytes_max: 1 << 20,
            key_bytes_max: 1024,
            client_id_bytes_max: 64,
            ttl_ms_max: 86_400_000,
            wait_ms_max: 86_400_000,
            insert_batch_max: 10_000,
            members_page_max: 10_000,
            stats_top_max: 100,
            locks_max: 10_000_000,
            lock_key_bytes_max: gib(2),
            waiters_per_key_max: 10_000,
            waiters_max: 1_000_000,
            sets_max: 100_000,
            set_members_max: 100_000_000,
            members_max: 100_000_000,
            member_bytes_max: gib(8),
            mailbox_len: 4096,
            watches_per_connection_max: 1024,
            event_bytes_max: 1 << 20,
        }
    }
}

/// Longest `auth` secret in a `hello`, in bytes (SPEC section 10).
pub const SECRET_BYTES_MAX: usize = 1024;

/// `n` GiB, or as much as a `usize` holds.
pub fn gib(n: u64) -> usize {
    usize::try_from(n << 30).unwrap_or(usize::MAX)
}

impl Limits {
    /// One shard's share of these limits when the engine runs `shards`
    /// shards: every engine-wide capacity bound divided (rounded up); the
    /// per-request and per-key bounds as they are.
    pub fn share_of(&self, shards: usize) -> Limits {
        let share = |total: usize| total.div_ceil(shards.max(1));
        Limits {
            locks_max: share(self.locks_max),
            lock_key_bytes_max: share(self.lock_key_bytes_max),
            waiters_max: share(self.waiters_max),
            sets_max: share(self.sets_max),
            members_max: share(self.members_max),
            member_bytes_max: share(self.member_bytes_max),
            ..*self
        }
    }

    /// The default limits without any capacity bound; for tests of the
    /// pure rules.
    pub fn unbounded_capacity() -> Limits {
        Limits {
            locks_max: usize::MAX,
            lock_key_bytes_max: usize::MAX,
            waiters_per_key_max: usize::MAX,
            waiters_max: usize::MAX,
            sets_max: usize::MAX,
            set_members_max: usize::MAX,
            members_max: usize::MAX,
            member_bytes_max: usize::MAX,
            ..Limits::default()
        }
    }
}
