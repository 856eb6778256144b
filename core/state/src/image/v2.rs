//! The image as it was before claims of client ids were logged (SPEC
//! section 10): the current shape without [`super::ShardImage::claims`].
//! A storage layer reads a snapshot of that format as this shape and
//! converts it ([`From`]): no client id is owned yet.

use serde::{Deserialize, Serialize};

use super::LocksImage;
use super::v3::SetsImage;
use crate::time::Tick;

/// [`super::ShardImage`] before claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)] // each field is that of the current image
pub struct ShardImage {
    pub now: Tick,
    pub locks: LocksImage,
    pub sets: SetsImage,
}

impl From<ShardImage> for super::ShardImage {
    fn from(old: ShardImage) -> Self {
        super::ShardImage {
            now: old.now,
            locks: old.locks,
            sets: old.sets.into(),
            claims: Default::default(),
        }
    }
}
