//! Snapshot files: one per shard, `snapshots/shard-N.snap`, replaced
//! atomically (written beside, synced, renamed over, directory synced). A
//! snapshot is the shard's whole state ([`ShardImage`]) and the log number
//! below which it covers that shard's records, so recovery is the latest
//! snapshot plus the records after it.

use deadbolt_core::limits::Limits;
use deadbolt_core::shard::image::ShardImage;

use crate::codec::{CodecError, Reader, put_limits, put_u64};
use crate::frame;

/// The format of snapshot files this code writes and reads.
const VERSION: u64 = 1;

/// What a snapshot says besides the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// The shard.
    pub shard: u32,
    /// Shards of the engine that wrote it.
    pub shards: u32,
    /// Every record of this shard numbered below this is in the image.
    pub covers_below: u64,
    /// The shard's token reservation when the image was taken.
    pub token_reserved: u64,
    /// The engine-wide limits in force then.
    pub limits: Limits,
}

/// The file name of shard `shard`'s snapshot.
pub fn file_name(shard: usize) -> String {
    format!("shard-{shard}.snap")
}

/// The shard a snapshot file name names, if it names one.
pub fn shard_of_file(name: &str) -> Option<usize> {
    name.strip_prefix("shard-")?
        .strip_suffix(".snap")?
        .parse()
        .ok()
}

/// A snapshot's file content.
pub fn encode(header: &SnapshotHeader, image: &ShardImage) -> Result<Vec<u8>, CodecError> {
    let mut payload = Vec::new();
    put_u64(&mut payload, VERSION);
    put_u64(&mut payload, u64::from(header.shard));
    put_u64(&mut payload, u64::from(header.shards));
    put_u64(&mut payload, header.covers_below);
    put_u64(&mut payload, header.token_reserved);
    put_limits(&mut payload, &header.limits);
    let payload = postcard::to_extend(image, payload)
        .map_err(|e| CodecError(format!("snapshot image: {e}")))?;
    let mut file = Vec::with_capacity(payload.len() + frame::HEADER_BYTES);
    frame::put(&mut file, &payload);
    Ok(file)
}

/// A snapshot file's header and image; any damage is an error.
pub fn decode(bytes: &[u8]) -> Result<(SnapshotHeader, ShardImage), CodecError> {
    let (records, end) = frame::scan(bytes);
    let [(_, payload)] = records[..] else {
        return Err(CodecError(format!("not one intact record ({end:?})")));
    };
    if end != frame::End::Clean {
        return Err(CodecError(format!("damaged ({end:?})")));
    }
    let mut reader = Reader(payload);
    let version = reader.u64()?;
    if version != VERSION {
        return Err(CodecError(format!(
            "snapshot format {version}, expected {VERSION}"
        )));
    }
    let small = |n: u64| u32::try_from(n).map_err(|_| CodecError("number too large".into()));
    let header = SnapshotHeader {
        shard: small(reader.u64()?)?,
        shards: small(reader.u64()?)?,
        covers_below: reader.u64()?,
        token_reserved: reader.u64()?,
        limits: reader.limits()?,
    };
    let image =
        postcard::from_bytes(reader.0).map_err(|e| CodecError(format!("snapshot image: {e}")))?;
    Ok((header, image))
}
