//! Recovery: the latest snapshot of each shard plus the log records after
//! it, replayed into the shards; then every shard is told it restarted
//! (waiters and ephemeral locks dropped, tokens raised to the reservation).

use std::path::{Path, PathBuf};

use deadbolt_core::EngineConfig;
use deadbolt_core::limits::Limits;
use deadbolt_core::shard::{Command, Input, Shard, ShardConfig};
use deadbolt_core::time::Tick;

use crate::codec::{self, Record};
use crate::disk::Disk;
use crate::frame::{self, End};
use crate::planted::{self, StorageBug};
use crate::{StorageError, snapshot};

/// A log segment: `wal/<number of its first record, 20 digits>.log`.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub first_lsn: u64,
    pub path: PathBuf,
}

/// The file name of the segment whose first record is `lsn`.
pub(crate) fn segment_name(lsn: u64) -> String {
    format!("{lsn:020}.log")
}

/// What recovery found and did, for the server's log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Shards restored from a snapshot.
    pub snapshots: usize,
    /// Log records replayed after the snapshots.
    pub records: u64,
    /// A torn tail that was cut off: the file, the offset and the bytes cut.
    pub torn_tail: Option<(PathBuf, u64, u64)>,
}

/// The state recovery rebuilt, and where the log continues.
pub(crate) struct Recovered {
    pub shards: Vec<Shard>,
    pub start_at: Tick,
    pub token_reserved: Vec<u64>,
    pub segments: Vec<Segment>,
    /// The number the next record gets.
    pub next_lsn: u64,
    /// Bytes in the log's segments.
    pub log_bytes: u64,
    pub report: RecoveryReport,
}

/// Per shard, while replaying.
struct Replaying {
    shard: Shard,
    /// Records of this shard below this are in its snapshot.
    covers_below: u64,
    token_reserved: u64,
    has_snapshot: bool,
}

/// Rebuilds every shard from the data directory `dir`.
pub(crate) fn recover(
    disk: &dyn Disk,
    dir: &Path,
    engine: &EngineConfig,
) -> Result<Recovered, StorageError> {
    let shards = engine.shards.max(1);
    let mut replaying = load_snapshots(disk, dir, engine, shards)?;
    let mut report = RecoveryReport {
        snapshots: replaying.iter().filter(|r| r.has_snapshot).count(),
        ..RecoveryReport::default()
    };
    let segments = list_segments(disk, &dir.join("wal"))?;
    let mut next_lsn = replaying
        .iter()
        .map(|r| r.covers_below)
        .max()
        .unwrap_or(1)
        .max(1);
    if let Some(first) = segments.first() {
        next_lsn = first.first_lsn;
        check_nothing_missing(&replaying, first)?;
    }
    let mut log_bytes = 0;
    for (position, segment) in segments.iter().enumerate() {
        let is_last = position + 1 == segments.len();
        let bytes = disk
            .read(&segment.path)
            .map_err(|e| io_error(&segment.path, e))?;
        log_bytes += bytes.len() as u64;
        let (records, end) = frame::scan(&bytes);
        let count = records.len();
        for (position, (offset, payload)) in records.into_iter().enumerate() {
            let corrupt = |why: String| corrupt(&segment.path, offset, why);
            let (lsn, record) = codec::decode(payload).map_err(|e| corrupt(e.0))?;
            if lsn != next_lsn {
                return Err(corrupt(format!(
                    "record {lsn} where {next_lsn} was expected"
                )));
            }
            next_lsn += 1;
            if is_last && position + 1 == count && forget_planted(&record) {
                continue;
            }
            report.records += u64::from(replay(&mut replaying, lsn, record, shards)?);
        }
        match end {
            End::Clean => {}
            End::Torn { offset } if is_last => {
                let cut = (bytes.len() - offset) as u64;
                report.torn_tail = Some((segment.path.clone(), offset as u64, cut));
            }
            End::Torn { offset } | End::Corrupt { offset } => {
                return Err(corrupt(&segment.path, offset, "damaged record".into()));
            }
        }
    }
    let mut recovered = restart(replaying, segments, next_lsn, report);
    recovered.log_bytes = log_bytes;
    Ok(recovered)
}

/// Whether the planted bug [`StorageBug::ForgetLastBatch`] skips `record`,
/// the last of the log.
fn forget_planted(record: &Record) -> bool {
    planted::active(StorageBug::ForgetLastBatch) && matches!(record, Record::Batch { .. })
}

/// Applies one record to the shards it concerns; whether it was replayed.
fn replay(
    replaying: &mut [Replaying],
    lsn: u64,
    record: Record,
    shards: usize,
) -> Result<bool, StorageError> {
    match record {
        Record::Run {
            shards: ran,
            limits,
        } => {
            check_shards(ran as usize, shards)?;
            for r in replaying.iter_mut().filter(|r| lsn >= r.covers_below) {
                r.shard.set_limits(limits.share_of(shards));
            }
            Ok(true)
        }
        Record::Batch { shard, commands } => {
            let r = shard_at(replaying, shard)?;
            if lsn < r.covers_below {
                return Ok(false);
            }
            for command in commands {
                r.shard.apply(command);
            }
            // Their requesters are gone with the process that heard them.
            r.shard.take_answers();
            Ok(true)
        }
        Record::Reserve { shard, upto } => {
            let r = shard_at(replaying, shard)?;
            r.token_reserved = r.token_reserved.max(upto);
            Ok(true)
        }
    }
}

fn shard_at(replaying: &mut [Replaying], shard: u32) -> Result<&mut Replaying, StorageError> {
    let count = replaying.len();
    replaying
        .get_mut(shard as usize)
        .ok_or(StorageError::ShardsChanged {
            found: shard as usize + 1,
            configured: count,
        })
}

fn check_shards(found: usize, configured: usize) -> Result<(), StorageError> {
    if found == configured {
        Ok(())
    } else {
        Err(StorageError::ShardsChanged { found, configured })
    }
}

/// Tells every shard it restarted, at the latest time any of them reached,
/// so that a lease continues with the time it had left.
fn restart(
    replaying: Vec<Replaying>,
    segments: Vec<Segment>,
    next_lsn: u64,
    report: RecoveryReport,
) -> Recovered {
    let start_at = replaying
        .iter()
        .map(|r| r.shard.now())
        .max()
        .unwrap_or(Tick::ZERO);
    let mut shards = Vec::with_capacity(replaying.len());
    let mut token_reserved = Vec::with_capacity(replaying.len());
    for mut r in replaying {
        let token_floor = r.token_reserved;
        r.shard.apply(Command {
            at: start_at,
            input: Input::Restart { token_floor },
        });
        r.shard.take_answers();
        shards.push(r.shard);
        token_reserved.push(token_floor);
    }
    Recovered {
        shards,
        start_at,
        token_reserved,
        segments,
        next_lsn,
        log_bytes: 0,
        report,
    }
}

/// Each shard from its snapshot, or empty.
fn load_snapshots(
    disk: &dyn Disk,
    dir: &Path,
    engine: &EngineConfig,
    shards: usize,
) -> Result<Vec<Replaying>, StorageError> {
    let fresh_config = ShardConfig {
        hash_seed: engine.seed,
        first_token: 1,
        limits: engine.limits.share_of(shards),
    };
    let mut replaying: Vec<Replaying> = (0..shards)
        .map(|_| Replaying {
            shard: Shard::new(fresh_config),
            covers_below: 0,
            token_reserved: 1,
            has_snapshot: false,
        })
        .collect();
    let snapshots = dir.join("snapshots");
    for name in disk.list(&snapshots).map_err(|e| io_error(&snapshots, e))? {
        let path = snapshots.join(&name);
        if name.ends_with(".tmp") {
            // A snapshot that never got renamed into place: never used.
            disk.remove(&path).map_err(|e| io_error(&path, e))?;
            continue;
        }
        let Some(index) = snapshot::shard_of_file(&name) else {
            continue;
        };
        let bytes = disk.read(&path).map_err(|e| io_error(&path, e))?;
        let (header, image) = snapshot::decode(&bytes).map_err(|e| corrupt(&path, 0, e.0))?;
        check_shards(header.shards as usize, shards)?;
        let config = ShardConfig {
            limits: header.limits.share_of(shards),
            ..fresh_config
        };
        let shard = Shard::from_image(config, image)
            .map_err(|e| corrupt(&path, 0, format!("inconsistent snapshot: {e}")))?;
        let slot = replaying
            .get_mut(index)
            .ok_or(StorageError::ShardsChanged {
                found: index + 1,
                configured: shards,
            })?;
        *slot = Replaying {
            shard,
            covers_below: header.covers_below,
            token_reserved: header.token_reserved,
            has_snapshot: true,
        };
    }
    Ok(replaying)
}

/// The log segments in `wal`, in order.
fn list_segments(disk: &dyn Disk, wal: &Path) -> Result<Vec<Segment>, StorageError> {
    let mut segments: Vec<Segment> = disk
        .list(wal)
        .map_err(|e| io_error(wal, e))?
        .into_iter()
        .filter_map(|name| {
            let first_lsn = name.strip_suffix(".log")?.parse().ok()?;
            Some(Segment {
                first_lsn,
                path: wal.join(name),
            })
        })
        .collect();
    segments.sort_by_key(|s| s.first_lsn);
    Ok(segments)
}

/// A shard whose snapshot does not reach the oldest record left in the log
/// would lose what was between: refuse.
fn check_nothing_missing(replaying: &[Replaying], first: &Segment) -> Result<(), StorageError> {
    if first.first_lsn <= 1 {
        return Ok(());
    }
    match replaying
        .iter()
        .position(|r| r.covers_below < first.first_lsn)
    {
        None => Ok(()),
        Some(shard) => Err(corrupt(
            &first.path,
            0,
            format!(
                "the log starts at record {} but shard {shard}'s snapshot covers only \
                 the records below {}",
                first.first_lsn, replaying[shard].covers_below
            ),
        )),
    }
}

fn corrupt(path: &Path, offset: usize, why: String) -> StorageError {
    StorageError::Corrupt {
        path: path.to_owned(),
        offset: offset as u64,
        why,
    }
}

fn io_error(path: &Path, source: std::io::Error) -> StorageError {
    StorageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The limits a fresh run records for its shards to replay with.
pub(crate) fn run_record(engine: &EngineConfig) -> Record {
    Record::Run {
        shards: engine.shards.max(1) as u32,
        limits: Limits { ..engine.limits },
    }
}
