//! The image as it was before each set kept the client that set it up
//! (for quotas, SPEC section 10): the current shape without
//! [`super::SetImage::creator`]. A storage layer reads a snapshot of that
//! format as this shape and converts it ([`From`]): no set has a creator,
//! so a quota counts such a set against its first inserter, as it did.

use serde::{Deserialize, Serialize};

use super::{Deadline, LocksImage, MemberImage};
use crate::claims::ClaimsImage;
use crate::time::Tick;
use deadbolt_proto::SetCounters;

/// [`super::ShardImage`] before set creators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)] // each field is that of the current image
pub struct ShardImage {
    pub now: Tick,
    pub locks: LocksImage,
    pub sets: SetsImage,
    pub claims: ClaimsImage,
}

/// [`super::SetsImage`] before set creators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SetsImage {
    pub next_set: u64,
    pub timers_pushed: u64,
    pub counters: SetCounters,
    pub sets: Vec<SetImage>,
}

/// [`super::SetImage`] before set creators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SetImage {
    pub name: String,
    pub id: u64,
    pub deadline: Deadline,
    pub clients: Vec<String>,
    pub members: Vec<MemberImage>,
}

impl From<ShardImage> for super::ShardImage {
    fn from(old: ShardImage) -> Self {
        super::ShardImage {
            now: old.now,
            locks: old.locks,
            sets: old.sets.into(),
            claims: old.claims,
        }
    }
}

impl From<SetsImage> for super::SetsImage {
    fn from(old: SetsImage) -> Self {
        super::SetsImage {
            next_set: old.next_set,
            timers_pushed: old.timers_pushed,
            counters: old.counters,
            sets: old.sets.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<SetImage> for super::SetImage {
    fn from(old: SetImage) -> Self {
        super::SetImage {
            name: old.name,
            id: old.id,
            deadline: old.deadline,
            clients: old.clients,
            creator: None,
            members: old.members,
        }
    }
}
