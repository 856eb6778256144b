//! The replicated state machine: the engine's shards. Applying an entry
//! hands its batch to its shard's actor through the
//! [`ReplicaHandle`](deadbolt_core::engine::replica::ReplicaHandle), in
//! log order; a snapshot is every shard's image at one log index, kept in
//! `raft/snapshot` (written beside, synced, renamed over).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use deadbolt_core::engine::replica::{ImagesAsked, ReplicaHandle};
use deadbolt_core::shard::image::ShardImage;
use deadbolt_core::shard::{Shard, ShardConfig};
use deadbolt_core::time::Tick;
use deadbolt_storage::{Disk, frame};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, SnapshotMeta, StoredMembership,
};
use serde::{Deserialize, Serialize};

use crate::types::{Batch, Entry, LogId, NodeId, StorageError, TypeConfig};

/// The snapshot file's name in the raft directory.
const SNAPSHOT_FILE: &str = "snapshot";

/// A snapshot's contents: where in the log it is, the latest time stamped
/// before it, and every shard.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotFile {
    /// The last entry it holds, and the membership then.
    pub meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    /// The latest time stamped on a command it holds.
    pub applied_through: Tick,
    /// Every shard, in shard order.
    pub images: Vec<ShardImage>,
}

/// The first of the two framed records of a snapshot written since each
/// set keeps the client that set it up (for quotas, SPEC section 10).
const FORMAT_WITH_CREATORS: &[u8] = b"deadbolt-raft-snapshot/4";

/// The first record of a snapshot written since the owners of client ids
/// (SPEC section 10) are in the image, before set creators: its images in
/// the [`v3`](deadbolt_core::shard::image::v3) shape.
const FORMAT_WITH_CLAIMS: &[u8] = b"deadbolt-raft-snapshot/3";

/// The first record of a snapshot written since shared locks, semaphores
/// and lock delays (SPEC section 7) are in the image, before claims: its
/// images in the [`v2`](deadbolt_core::shard::image::v2) shape. A snapshot
/// from before is one record, its images in the
/// [`v1`](deadbolt_core::shard::image::v1) shape.
const FORMAT_WITH_MODES: &[u8] = b"deadbolt-raft-snapshot/2";

/// [`SnapshotFile`] as it was before set creators.
#[derive(Deserialize)]
struct SnapshotFileV3 {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    applied_through: Tick,
    images: Vec<deadbolt_core::shard::image::v3::ShardImage>,
}

/// [`SnapshotFile`] as it was before claims.
#[derive(Deserialize)]
struct SnapshotFileV2 {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    applied_through: Tick,
    images: Vec<deadbolt_core::shard::image::v2::ShardImage>,
}

/// [`SnapshotFile`] as it was before SPEC section 7.
#[derive(Deserialize)]
struct SnapshotFileV1 {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    applied_through: Tick,
    images: Vec<deadbolt_core::shard::image::v1::ShardImage>,
}

impl SnapshotFile {
    /// Its bytes: two framed records, the format and the contents.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let payload = postcard::to_stdvec(self).map_err(|e| e.to_string())?;
        let capacity = FORMAT_WITH_CREATORS.len() + payload.len() + 2 * frame::HEADER_BYTES;
        let mut bytes = Vec::with_capacity(capacity);
        frame::put(&mut bytes, FORMAT_WITH_CREATORS);
        frame::put(&mut bytes, &payload);
        Ok(bytes)
    }

    /// Reads [`SnapshotFile::encode`]'s bytes back, or those of a snapshot
    /// written before set creators, before claims or before SPEC section 7.
    pub fn decode(bytes: &[u8]) -> Result<SnapshotFile, String> {
        let (records, end) = frame::scan(bytes);
        match (&records[..], end) {
            ([(_, format), (_, payload)], frame::End::Clean) if *format == FORMAT_WITH_CREATORS => {
                postcard::from_bytes(payload).map_err(|e| e.to_string())
            }
            ([(_, format), (_, payload)], frame::End::Clean) if *format == FORMAT_WITH_CLAIMS => {
                let old: SnapshotFileV3 =
                    postcard::from_bytes(payload).map_err(|e| e.to_string())?;
                Ok(SnapshotFile {
                    meta: old.meta,
                    applied_through: old.applied_through,
                    images: old.images.into_iter().map(Into::into).collect(),
                })
            }
            ([(_, format), (_, payload)], frame::End::Clean) if *format == FORMAT_WITH_MODES => {
                let old: SnapshotFileV2 =
                    postcard::from_bytes(payload).map_err(|e| e.to_string())?;
                Ok(SnapshotFile {
                    meta: old.meta,
                    applied_through: old.applied_through,
                    images: old.images.into_iter().map(Into::into).collect(),
                })
            }
            ([(_, payload)], frame::End::Clean) => {
                let old: SnapshotFileV1 =
                    postcard::from_bytes(payload).map_err(|e| e.to_string())?;
                Ok(SnapshotFile {
                    meta: old.meta,
                    applied_through: old.applied_through,
                    images: old.images.into_iter().map(Into::into).collect(),
                })
            }
            _ => Err(format!("not a snapshot's intact records ({end:?})")),
        }
    }

    /// Its shards, built with `config`.
    pub fn shards(self, config: ShardConfig) -> Result<Vec<Shard>, String> {
        self.images
            .into_iter()
            .map(|image| Shard::from_image(config, image).map_err(|e| e.to_string()))
            .collect()
    }
}

/// The current snapshot: its meta and its bytes.
type KeptSnapshot = (SnapshotMeta<NodeId, openraft::BasicNode>, Arc<Vec<u8>>);

/// What survives between calls: the last applied entry, the membership,
/// and the current snapshot.
struct Applied {
    last: Option<LogId>,
    membership: StoredMembership<NodeId, openraft::BasicNode>,
    snapshot: Option<KeptSnapshot>,
    /// The latest time stamped on an applied command.
    through: Tick,
}

/// The state machine. Cheap to clone.
#[derive(Clone)]
pub struct StateMachine {
    replica: ReplicaHandle,
    shard_config: ShardConfig,
    shards: usize,
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    applied: Arc<Mutex<Applied>>,
}

/// A snapshot read at start-up, if there is one.
pub fn load_snapshot(disk: &dyn Disk, dir: &Path) -> Result<Option<SnapshotFile>, String> {
    let path = dir.join(SNAPSHOT_FILE);
    match disk.read(&path) {
        Ok(bytes) => SnapshotFile::decode(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

impl StateMachine {
    /// The state machine of `replica`'s engine, whose shards hold what
    /// `loaded` (its bytes beside it) holds, or nothing.
    pub fn new(
        replica: ReplicaHandle,
        shard_config: ShardConfig,
        shards: usize,
        disk: Arc<dyn Disk>,
        dir: PathBuf,
        loaded: Option<(&SnapshotFile, Vec<u8>)>,
    ) -> StateMachine {
        let applied = match loaded {
            Some((file, bytes)) => Applied {
                last: file.meta.last_log_id,
                membership: file.meta.last_membership.clone(),
                snapshot: Some((file.meta.clone(), Arc::new(bytes))),
                through: file.applied_through,
            },
            None => Applied {
                last: None,
                membership: StoredMembership::default(),
                snapshot: None,
                through: Tick::ZERO,
            },
        };
        StateMachine {
            replica,
            shard_config,
            shards,
            disk,
            dir,
            applied: Arc::new(Mutex::new(applied)),
        }
    }

    fn applied(&self) -> MutexGuard<'_, Applied> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    // openraft's error type, which `apply` returns as is.
    #[allow(clippy::result_large_err)]
    fn apply_one(&self, entry: Entry) -> Result<(), StorageError> {
        let log_id = entry.log_id;
        match entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Normal(batches) => {
                for batch in batches.0 {
                    self.apply_batch(log_id, batch)?;
                }
            }
            EntryPayload::Membership(membership) => {
                self.applied().membership = StoredMembership::new(Some(log_id), membership);
            }
        }
        self.applied().last = Some(log_id);
        Ok(())
    }

    /// Hands one shard's committed batch (of the entry `log_id`) to it.
    #[allow(clippy::result_large_err)]
    fn apply_batch(&self, log_id: LogId, batch: Batch) -> Result<(), StorageError> {
        let commands = batch.decode_commands().map_err(|e| {
            let error = std::io::Error::other(format!("{batch}: {e}"));
            StorageError::from_io_error(ErrorSubject::Log(log_id), ErrorVerb::Read, error)
        })?;
        if let Some(latest) = commands.iter().map(|c| c.at).max() {
            let mut applied = self.applied();
            applied.through = applied.through.max(latest);
        }
        let shard = batch.shard as usize;
        if shard >= self.shards {
            tracing::error!(%batch, "an entry for a shard this node does not have");
        } else {
            self.replica
                .apply(shard, batch.origin(), batch.number, commands);
        }
        Ok(())
    }

    /// Writes `bytes` as the snapshot file, atomically.
    fn persist(&self, bytes: &[u8]) -> std::io::Result<()> {
        let path = self.dir.join(SNAPSHOT_FILE);
        let beside = self.dir.join(format!("{SNAPSHOT_FILE}.new"));
        self.disk.write_synced(&beside, bytes)?;
        self.disk.rename(&beside, &path)?;
        self.disk.sync_dir(&self.dir)
    }
}

fn snapshot_error(verb: ErrorVerb, why: String) -> StorageError {
    StorageError::from_io_error(
        ErrorSubject::Snapshot(None),
        verb,
        std::io::Error::other(why),
    )
}

/// Builds a snapshot of the shards as they were when it was made.
pub struct Builder {
    machine: StateMachine,
    images: Option<ImagesAsked>,
    last: Option<LogId>,
    membership: StoredMembership<NodeId, openraft::BasicNode>,
    through: Tick,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let asked = self.images.take();
        let images = match asked {
            Some(asked) => asked.wait().await,
            None => None,
        };
        let images = images
            .ok_or_else(|| snapshot_error(ErrorVerb::Read, "the engine has stopped".into()))?;
        let snapshot_id = match self.last {
            Some(last) => format!("{}-{}", last.leader_id, last.index),
            None => "empty".to_owned(),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let file = SnapshotFile {
            meta: meta.clone(),
            applied_through: self.through,
            images,
        };
        let bytes = file
            .encode()
            .map_err(|e| snapshot_error(ErrorVerb::Write, e))?;
        self.machine
            .persist(&bytes)
            .map_err(|e| snapshot_error(ErrorVerb::Write, e.to_string()))?;
        let bytes = Arc::new(bytes);
        self.machine.applied().snapshot = Some((meta.clone(), Arc::clone(&bytes)));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes.to_vec())),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Builder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, openraft::BasicNode>), StorageError> {
        let applied = self.applied();
        Ok((applied.last, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        for entry in entries {
            self.apply_one(entry)?;
            replies.push(());
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Asked now, so that each image holds exactly the entries applied
        // so far, whatever is applied while the builder runs.
        let images = Some(self.replica.images());
        let applied = self.applied();
        Builder {
            machine: self.clone(),
            images,
            last: applied.last,
            membership: applied.membership.clone(),
            through: applied.through,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let file = SnapshotFile::decode(&bytes).map_err(|e| snapshot_error(ErrorVerb::Read, e))?;
        let through = file.applied_through;
        let shards = file
            .shards(self.shard_config)
            .map_err(|e| snapshot_error(ErrorVerb::Read, e))?;
        if shards.len() != self.shards {
            let why = format!(
                "a snapshot of {} shards; this node has {}",
                shards.len(),
                self.shards
            );
            return Err(snapshot_error(ErrorVerb::Read, why));
        }
        self.persist(&bytes)
            .map_err(|e| snapshot_error(ErrorVerb::Write, e.to_string()))?;
        self.replica.install(shards, through);
        let mut applied = self.applied();
        applied.last = meta.last_log_id;
        applied.membership = meta.last_membership.clone();
        applied.through = through;
        applied.snapshot = Some((meta.clone(), Arc::new(bytes)));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self
            .applied()
            .snapshot
            .as_ref()
            .map(|(meta, bytes)| Snapshot {
                meta: meta.clone(),
                snapshot: Box::new(Cursor::new(bytes.to_vec())),
            }))
    }
}

#[cfg(test)]
mod tests {
    use deadbolt_core::shard::image::{v1, v2, v3};

    use super::*;

    fn old_image() -> v1::ShardImage {
        v1::ShardImage::sample_with_one_holder()
    }

    /// A snapshot file of an older format: its `tag` record (none before
    /// the format had tags) and `images` of that format's shape, which
    /// must read as `expected` and round-trip in the current format.
    fn assert_old_snapshot_reads<I: Serialize>(
        tag: Option<&[u8]>,
        images: Vec<I>,
        expected: Vec<ShardImage>,
    ) -> SnapshotFile {
        #[derive(Serialize)]
        struct Old<I> {
            meta: SnapshotMeta<NodeId, openraft::BasicNode>,
            applied_through: Tick,
            images: Vec<I>,
        }
        let old = Old {
            meta: SnapshotMeta::default(),
            applied_through: Tick(5_000),
            images,
        };
        let payload = postcard::to_stdvec(&old).expect("encodes");
        let mut bytes = Vec::new();
        if let Some(tag) = tag {
            frame::put(&mut bytes, tag);
        }
        frame::put(&mut bytes, &payload);
        let read = SnapshotFile::decode(&bytes).expect("an old snapshot reads");
        assert_eq!(read.images, expected);
        let again = SnapshotFile::decode(&read.encode().expect("encodes")).expect("reads");
        assert_eq!(
            again.images, read.images,
            "and round-trips in the new format"
        );
        read
    }

    #[test]
    fn a_snapshot_from_before_lock_modes_still_reads() {
        let read = assert_old_snapshot_reads(None, vec![old_image()], vec![old_image().into()]);
        assert_eq!(read.images[0].locks.keys[0].limit, 1);
    }

    #[test]
    fn a_snapshot_from_before_claims_still_reads() {
        let current = ShardImage::from(old_image());
        let image = v2::ShardImage {
            now: current.now,
            locks: current.locks,
            sets: old_image().sets,
        };
        let read = assert_old_snapshot_reads(
            Some(FORMAT_WITH_MODES),
            vec![image.clone()],
            vec![image.into()],
        );
        assert!(read.images[0].claims.claims.is_empty());
    }

    #[test]
    fn a_snapshot_from_before_set_creators_still_reads() {
        let current = ShardImage::from(old_image());
        let set = v3::SetImage {
            name: "s".into(),
            id: 0,
            deadline: deadbolt_core::shard::image::Deadline {
                at: Tick(60_000_000),
                seq: 0,
            },
            clients: Vec::new(),
            members: Vec::new(),
        };
        let image = v3::ShardImage {
            now: current.now,
            locks: current.locks,
            sets: v3::SetsImage {
                next_set: 1,
                timers_pushed: 1,
                counters: Default::default(),
                sets: vec![set],
            },
            claims: current.claims,
        };
        let read = assert_old_snapshot_reads(
            Some(FORMAT_WITH_CLAIMS),
            vec![image.clone()],
            vec![image.into()],
        );
        assert_eq!(read.images[0].sets.sets[0].name, "s");
        assert_eq!(read.images[0].sets.sets[0].creator, None);
    }
}
