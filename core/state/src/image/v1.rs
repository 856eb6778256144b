//! The image as it was before SPEC section 7: no limits, modes or lock
//! delays. Snapshots are written in a format that does not describe
//! itself (postcard), so a field cannot just default: a storage layer
//! reads an old snapshot as this shape and converts it ([`From`]), each key
//! a mutex, each grant and waiter exclusive with no lock delay.

use serde::{Deserialize, Serialize};

use super::Deadline;
use super::v3::SetsImage;
use crate::time::Tick;
use crate::{ConnId, Handle};
use deadbolt_proto::LockCounters;

/// [`super::ShardImage`] before SPEC section 7.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)] // each field is that of the current image
pub struct ShardImage {
    pub now: Tick,
    pub locks: LocksImage,
    pub sets: SetsImage,
}

/// [`super::LocksImage`] before SPEC section 7.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct LocksImage {
    pub next_token: u64,
    pub next_waiter: u64,
    pub timers_pushed: u64,
    pub counters: LockCounters,
    pub keys: Vec<KeyImage>,
}

/// [`super::KeyImage`] before SPEC section 7.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct KeyImage {
    pub key: String,
    pub holders: Vec<HolderImage>,
    pub waiters: Vec<WaiterImage>,
}

/// [`super::HolderImage`] before SPEC section 7.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct HolderImage {
    pub client: String,
    pub conn: ConnId,
    pub token: u64,
    pub deadline: Deadline,
    pub ephemeral: bool,
    pub granted_by: Option<Handle>,
}

/// [`super::WaiterImage`] before SPEC section 7.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct WaiterImage {
    pub id: u64,
    pub handle: Handle,
    pub client: String,
    pub conn: ConnId,
    pub ttl_ms: u64,
    pub wait_ms: u64,
    pub deadline: Option<Deadline>,
    pub ephemeral: bool,
}

impl From<ShardImage> for super::ShardImage {
    fn from(old: ShardImage) -> Self {
        super::ShardImage {
            now: old.now,
            locks: old.locks.into(),
            sets: old.sets.into(),
            claims: Default::default(),
        }
    }
}

impl From<LocksImage> for super::LocksImage {
    fn from(old: LocksImage) -> Self {
        super::LocksImage {
            next_token: old.next_token,
            next_waiter: old.next_waiter,
            timers_pushed: old.timers_pushed,
            counters: old.counters,
            keys: old.keys.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<KeyImage> for super::KeyImage {
    fn from(old: KeyImage) -> Self {
        super::KeyImage {
            key: old.key,
            limit: 1,
            delay: None,
            holders: old.holders.into_iter().map(Into::into).collect(),
            waiters: old.waiters.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<HolderImage> for super::HolderImage {
    fn from(old: HolderImage) -> Self {
        super::HolderImage {
            client: old.client,
            conn: old.conn,
            token: old.token,
            deadline: old.deadline,
            ephemeral: old.ephemeral,
            shared: false,
            lock_delay_ms: 0,
            granted_by: old.granted_by,
        }
    }
}

impl From<WaiterImage> for super::WaiterImage {
    fn from(old: WaiterImage) -> Self {
        super::WaiterImage {
            id: old.id,
            handle: old.handle,
            client: old.client,
            conn: old.conn,
            ttl_ms: old.ttl_ms,
            wait_ms: old.wait_ms,
            deadline: old.deadline,
            ephemeral: old.ephemeral,
            shared: false,
            lock_delay_ms: 0,
        }
    }
}

impl ShardImage {
    /// A small image of this format: at tick 5,000, key `k` held by client
    /// `c` with token 3 until tick 9,000, no sets. The crates that store
    /// images (storage, replication) use it to test that their old files
    /// still read, so each of them does not keep its own copy.
    pub fn sample_with_one_holder() -> ShardImage {
        let holder = HolderImage {
            client: "c".into(),
            conn: 1,
            token: 3,
            deadline: Deadline {
                at: Tick(9_000),
                seq: 0,
            },
            ephemeral: false,
            granted_by: None,
        };
        ShardImage {
            now: Tick(5_000),
            locks: LocksImage {
                next_token: 10,
                next_waiter: 0,
                timers_pushed: 1,
                counters: Default::default(),
                keys: vec![KeyImage {
                    key: "k".into(),
                    holders: vec![holder],
                    waiters: Vec::new(),
                }],
            },
            sets: SetsImage {
                next_set: 0,
                timers_pushed: 0,
                counters: Default::default(),
                sets: Vec::new(),
            },
        }
    }
}
