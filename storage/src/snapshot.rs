//! Snapshot files: one per shard, `snapshots/shard-N.snap`, replaced
//! atomically (written beside, synced, renamed over, directory synced). A
//! snapshot is the shard's whole state ([`ShardImage`]) and the log number
//! below which it covers that shard's records, so recovery is the latest
//! snapshot plus the records after it.

use deadbolt_core::limits::Limits;
use deadbolt_core::shard::image::{ShardImage, v1, v2, v3};

use crate::codec::{CodecError, Reader, put_limits, put_u64};
use crate::frame;

/// The format of snapshot files this code writes: 4 since each set keeps
/// the client that set it up (for quotas, SPEC section 10).
const VERSION: u64 = 4;

/// The format before it, which this code still reads (no set has a
/// creator): since the owners of client ids are in the image.
const VERSION_BEFORE_CREATORS: u64 = 3;

/// The format before them, which this code still reads (no id owned):
/// since shared locks, semaphores and lock delays (SPEC section 7).
const VERSION_BEFORE_CLAIMS: u64 = 2;

/// The format before them, which this code still reads (each key a mutex).
const VERSION_BEFORE_MODES: u64 = 1;

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
    encode_as(VERSION, header, |payload| {
        postcard::to_extend(image, payload)
    })
}

/// A snapshot's file content in format `version`, its image written after
/// the header by `put_image`.
fn encode_as(
    version: u64,
    header: &SnapshotHeader,
    put_image: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, postcard::Error>,
) -> Result<Vec<u8>, CodecError> {
    let mut payload = Vec::new();
    put_u64(&mut payload, version);
    put_u64(&mut payload, u64::from(header.shard));
    put_u64(&mut payload, u64::from(header.shards));
    put_u64(&mut payload, header.covers_below);
    put_u64(&mut payload, header.token_reserved);
    put_limits(&mut payload, &header.limits);
    let payload = put_image(payload).map_err(|e| CodecError(format!("snapshot image: {e}")))?;
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
    let known = [
        VERSION,
        VERSION_BEFORE_CREATORS,
        VERSION_BEFORE_CLAIMS,
        VERSION_BEFORE_MODES,
    ];
    if !known.contains(&version) {
        return Err(CodecError(format!(
            "snapshot format {version}, expected one of {known:?}"
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
    let unreadable = |e: postcard::Error| CodecError(format!("snapshot image: {e}"));
    let image = match version {
        VERSION_BEFORE_MODES => postcard::from_bytes::<v1::ShardImage>(reader.0)
            .map_err(unreadable)?
            .into(),
        VERSION_BEFORE_CLAIMS => postcard::from_bytes::<v2::ShardImage>(reader.0)
            .map_err(unreadable)?
            .into(),
        VERSION_BEFORE_CREATORS => postcard::from_bytes::<v3::ShardImage>(reader.0)
            .map_err(unreadable)?
            .into(),
        _ => postcard::from_bytes(reader.0).map_err(unreadable)?,
    };
    Ok((header, image))
}

#[cfg(test)]
mod tests {
    use deadbolt_core::shard::{Shard, ShardConfig};
    use deadbolt_core::time::Tick;

    use super::*;

    fn config() -> ShardConfig {
        ShardConfig {
            hash_seed: 1,
            first_token: 0,
            limits: Limits::default(),
        }
    }

    fn header() -> SnapshotHeader {
        SnapshotHeader {
            shard: 0,
            shards: 1,
            covers_below: 7,
            token_reserved: 100,
            limits: Limits::default(),
        }
    }

    /// Writes an image of an older shape (by `put_image`) as snapshot
    /// `version`, reads it back, checks its header, and that the image read
    /// round-trips in the current format: the image read.
    fn read_as_version(
        version: u64,
        put_image: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, postcard::Error>,
    ) -> ShardImage {
        let header = header();
        let bytes = encode_as(version, &header, put_image).expect("encodes");
        let (read, image) = decode(&bytes).expect("an old snapshot still reads");
        assert_eq!(read, header);
        let again = encode(&header, &image).expect("encodes");
        assert_eq!(decode(&again).expect("reads").1, image, "and round-trips");
        image
    }

    #[test]
    fn a_snapshot_from_before_lock_modes_reads_as_mutexes() {
        let old = v1::ShardImage::sample_with_one_holder();
        let image = read_as_version(VERSION_BEFORE_MODES, |payload| {
            postcard::to_extend(&old, payload)
        });
        assert_eq!(image, ShardImage::from(old));
        let key = &image.locks.keys[0];
        assert_eq!((key.limit, key.delay), (1, None));
        assert!(!key.holders[0].shared && key.holders[0].lock_delay_ms == 0);
        let shard = Shard::from_image(config(), image.clone()).expect("restores");
        assert_eq!(shard.image().locks.keys, image.locks.keys, "and restores");
    }

    #[test]
    fn a_snapshot_from_before_claims_reads_with_no_id_owned() {
        let current = Shard::new(config()).image();
        let old = v2::ShardImage {
            now: Tick(5_000),
            locks: current.locks,
            sets: v3::SetsImage {
                next_set: current.sets.next_set,
                timers_pushed: current.sets.timers_pushed,
                counters: current.sets.counters,
                sets: Vec::new(),
            },
        };
        let image = read_as_version(VERSION_BEFORE_CLAIMS, |payload| {
            postcard::to_extend(&old, payload)
        });
        assert_eq!(image, ShardImage::from(old));
        assert!(image.claims.claims.is_empty());
    }

    /// A shard with an empty set `s` that client `c` set up, and the same
    /// as an image from before set creators (v3).
    fn a_shard_with_an_empty_set() -> (ShardImage, v3::ShardImage) {
        use deadbolt_core::proto::SetOp;
        use deadbolt_core::shard::{Caller, Command, Handle, Input, ShardOp};
        let mut shard = Shard::new(config());
        let set_up = SetOp::SetUp {
            set: "s".into(),
            ttl_ms: 60_000,
        };
        shard.apply(Command {
            at: Tick(1_000),
            input: Input::Op {
                handle: Handle(1),
                caller: Caller {
                    client: "c".into(),
                    conn: 1,
                },
                op: ShardOp::Set(set_up),
            },
        });
        let image = shard.image();
        let sets = image.sets.clone();
        let old_sets = sets.sets.into_iter().map(|set| v3::SetImage {
            name: set.name,
            id: set.id,
            deadline: set.deadline,
            clients: set.clients,
            members: set.members,
        });
        let old = v3::ShardImage {
            now: image.now,
            locks: image.locks.clone(),
            sets: v3::SetsImage {
                next_set: sets.next_set,
                timers_pushed: sets.timers_pushed,
                counters: sets.counters,
                sets: old_sets.collect(),
            },
            claims: image.claims.clone(),
        };
        (image, old)
    }

    #[test]
    fn a_snapshot_from_before_set_creators_reads_with_no_creator() {
        let (current, old) = a_shard_with_an_empty_set();
        assert_eq!(current.sets.sets[0].creator.as_deref(), Some("c"));
        let image = read_as_version(VERSION_BEFORE_CREATORS, |payload| {
            postcard::to_extend(&old, payload)
        });
        assert_eq!(image.sets.sets[0].creator, None);
        let mut expected = current.clone();
        expected.sets.sets[0].creator = None;
        assert_eq!(image, expected);
        // The current format keeps the creator.
        let header = header();
        let again = encode(&header, &current).expect("encodes");
        assert_eq!(decode(&again).expect("reads").1, current);
    }
}
