//! The log writer: one task that owns the log's files. Shards send it
//! their batches; it appends everything that is waiting as one write,
//! syncs once for all of it (group commit), and only then lets the shards
//! apply and answer. What arrives while a sync is under way is the next
//! group. It also writes snapshots and, once every shard has one newer
//! than a segment, deletes the segment.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use deadbolt_core::proto::ServerError;
use deadbolt_core::shard::image::ShardImage;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::backup;
use crate::codec::{self, Record};
use crate::disk::{AppendFile, Disk};
use crate::planted::{self, StorageBug};
use crate::recover::{Segment, segment_name};
use crate::snapshot::{self, SnapshotHeader};
use crate::{Fsync, Shared, StorageError, StoreConfig, frame};

/// Most requests written as one group.
const GROUP_MAX: usize = 1024;

/// Most times the writer yields its thread to let a group grow.
const GATHER_YIELDS: usize = 4;

/// Kept batches remembered per shard: more than a shard can have in
/// flight, so that a snapshot always finds the batches it does not hold.
const RECENT_BATCHES: usize = 16;

/// What the writer is asked.
pub(crate) enum Request {
    /// Append shard `shard`'s encoded commands, its batch number `number`;
    /// answer once kept.
    Batch {
        shard: u32,
        number: u64,
        commands: Vec<u8>,
        done: oneshot::Sender<Result<(), ServerError>>,
    },
    /// Keep a token reservation, synced whatever the policy; answer once
    /// kept.
    Reserve {
        shard: u32,
        upto: u64,
        done: oneshot::Sender<Result<(), ServerError>>,
    },
    /// Write shard `shard`'s snapshot, which holds its kept batches up to
    /// number `settled`.
    Snapshot {
        shard: u32,
        settled: u64,
        image: Box<ShardImage>,
        token_reserved: u64,
    },
    /// Copy the data directory into a new directory under `backup_dir`
    /// once the group is kept; answer where.
    Backup {
        done: oneshot::Sender<Result<PathBuf, String>>,
    },
}

/// A group written, with what is left to do once its sync is over.
struct Written {
    /// Whether the group is yet to be synced.
    sync_later: bool,
    /// What the group's batches are answered.
    outcome: Result<(), ServerError>,
    /// The payloads of its records, for the observer.
    observed: Vec<Vec<u8>>,
    /// Who waits for that answer.
    waiting: Vec<oneshot::Sender<Result<(), ServerError>>>,
    /// Its batches: shard, batch number, record number.
    numbered: Vec<(u32, u64, u64)>,
    /// Snapshots to write: shard, image, token reservation, and the
    /// records of the shard they cover (those numbered below).
    snapshots: Vec<(u32, Box<ShardImage>, u64, u64)>,
}

/// A snapshot round: every shard is asked for a snapshot; once all have
/// written one, the segments whose every record the snapshots hold are
/// deleted.
struct Round {
    /// Per shard, once its snapshot is written: the first record of it the
    /// snapshot does not hold (a batch in flight when it was taken may be
    /// older than the round).
    covers_below: Vec<Option<u64>>,
}

/// Counts for the writer's last log line: how well group commit grouped.
#[derive(Debug, Default)]
struct Tally {
    groups: u64,
    records: u64,
    syncs: u64,
    bytes: u64,
}

/// The log writer's state. Run it with [`LogWriter::run`].
pub struct LogWriter {
    disk: Arc<dyn Disk>,
    config: StoreConfig,
    shared: Arc<Shared>,
    requests: mpsc::UnboundedReceiver<Request>,
    file: Box<dyn AppendFile>,
    /// Bytes in the current segment, all of them intact records.
    file_len: u64,
    segments: Vec<Segment>,
    next_lsn: u64,
    /// When written but unsynced records must be synced (`Fsync::Every`).
    sync_due: Option<Instant>,
    /// Log bytes written since the last snapshot round began.
    bytes_since_round: u64,
    /// Bytes of the last complete set of snapshots.
    snapshot_bytes: Vec<u64>,
    round: Option<Round>,
    /// Per shard, the record numbers of its latest kept batches, by batch
    /// number: a snapshot says which batches it holds, and batches handed
    /// over before it but not yet applied must stay in the log.
    recent: Vec<VecDeque<(u64, u64)>>,
    /// What the writer has done, for its log line at the end.
    tally: Tally,
    /// Why the log can no longer be trusted, once it cannot.
    failed: Option<String>,
    /// Why the last append failed, while appends fail (a full disk): each
    /// failure is answered, but logged only when it starts or changes.
    append_failing: Option<String>,
    /// Backups asked for in the group being written, made once it is kept.
    backups: Vec<oneshot::Sender<Result<PathBuf, String>>>,
}

impl LogWriter {
    pub(crate) fn new(
        disk: Arc<dyn Disk>,
        config: StoreConfig,
        shared: Arc<Shared>,
        requests: mpsc::UnboundedReceiver<Request>,
        segments: Vec<Segment>,
        next_lsn: u64,
        log_bytes: u64,
    ) -> Result<LogWriter, StorageError> {
        let wal = config.dir.join("wal");
        let (segments, path) = match segments.last() {
            Some(last) => (segments.clone(), last.path.clone()),
            None => {
                let path = wal.join(segment_name(next_lsn));
                let first = Segment {
                    first_lsn: next_lsn,
                    path: path.clone(),
                };
                (vec![first], path)
            }
        };
        let file = disk.open_append(&path).map_err(|e| io_error(&path, e))?;
        disk.sync_dir(&wal).map_err(|e| io_error(&wal, e))?;
        let file_len = disk.read(&path).map_err(|e| io_error(&path, e))?.len() as u64;
        let shards = shared.attention.len();
        Ok(LogWriter {
            disk,
            config,
            shared,
            requests,
            file,
            file_len,
            bytes_since_round: log_bytes,
            segments,
            next_lsn,
            sync_due: None,
            snapshot_bytes: vec![0; shards],
            round: None,
            recent: vec![VecDeque::new(); shards],
            tally: Tally::default(),
            failed: None,
            append_failing: None,
            backups: Vec::new(),
        })
    }

    /// Cuts the current segment to `len` (a torn tail) and syncs it.
    pub(crate) fn cut_to(&mut self, len: u64) -> Result<(), StorageError> {
        let path = self.current_path();
        self.file.truncate(len).map_err(|e| io_error(&path, e))?;
        self.file.sync().map_err(|e| io_error(&path, e))?;
        self.file_len = len;
        Ok(())
    }

    /// Appends `records` and syncs them, before the server serves anyone.
    pub(crate) fn write_now(&mut self, records: &[Record]) -> Result<(), StorageError> {
        let mut bytes = Vec::new();
        let mut payloads = Vec::new();
        for record in records {
            let payload = codec::encode(self.next_lsn, record);
            frame::put(&mut bytes, &payload);
            payloads.push(payload);
            self.next_lsn += 1;
        }
        let path = self.current_path();
        self.file.append(&bytes).map_err(|e| io_error(&path, e))?;
        self.file.sync().map_err(|e| io_error(&path, e))?;
        self.file_len += bytes.len() as u64;
        self.observe(&payloads);
        Ok(())
    }

    /// Shows the records just kept to the observer, if there is one.
    fn observe(&self, payloads: &[Vec<u8>]) {
        let Some(observer) = &self.config.observer else {
            return;
        };
        for payload in payloads {
            match codec::decode(payload) {
                Ok((lsn, record)) => observer(lsn, &record),
                Err(error) => tracing::error!("a record just written does not decode: {error}"),
            }
        }
    }

    /// Serves requests until every sender is gone, then syncs what is left.
    pub async fn run(mut self) {
        loop {
            let sync_due = self.sync_due;
            let first = tokio::select! {
                request = self.requests.recv() => request,
                () = sleep_until(sync_due) => {
                    self.sync_unsynced();
                    continue;
                }
            };
            let Some(first) = first else { break };
            let mut group = vec![first];
            self.gather(&mut group);
            let mut written = self.write_group(group);
            if written.sync_later {
                if let Some(latency) = self.disk.sync_latency() {
                    tokio::time::sleep(latency).await;
                }
                self.sync_group(&mut written);
            }
            self.finish_group(written);
            for done in std::mem::take(&mut self.backups) {
                let _ = done.send(self.backup());
            }
        }
        self.sync_unsynced();
        let Tally {
            groups,
            records,
            syncs,
            bytes,
        } = self.tally;
        tracing::info!(groups, records, syncs, bytes, "the log writer stopped");
    }

    /// Takes every request already waiting into `group`. On its own
    /// thread, the writer then yields its thread to the shards while they
    /// keep adding batches: a sync costs this machine's CPU tens of
    /// microseconds, more than a batch's whole work, so one sync should
    /// serve every batch of the moment rather than the first to arrive.
    fn gather(&mut self, group: &mut Vec<Request>) {
        self.take_waiting(group);
        for _ in 0..GATHER_YIELDS {
            let before = group.len();
            if !self.config.yield_to_shards || before >= GROUP_MAX {
                return;
            }
            std::thread::yield_now();
            self.take_waiting(group);
            if group.len() == before {
                return;
            }
        }
    }

    fn take_waiting(&mut self, group: &mut Vec<Request>) {
        while group.len() < GROUP_MAX {
            match self.requests.try_recv() {
                Ok(request) => group.push(request),
                Err(_) => return,
            }
        }
    }

    /// Writes a group's records in one append and at most one sync (left
    /// to [`LogWriter::sync_group`] on a disk whose syncs take a while);
    /// what is left to do is returned.
    fn write_group(&mut self, group: Vec<Request>) -> Written {
        let mut bytes = Vec::new();
        let mut observed = Vec::new();
        let mut waiting = Vec::new();
        let mut snapshots = Vec::new();
        let mut numbered = Vec::new();
        let mut must_sync =
            self.config.fsync == Fsync::Always && !planted::active(StorageBug::AckBeforeSync);
        let first_lsn = self.next_lsn;
        for request in group {
            match request {
                Request::Batch {
                    shard,
                    number,
                    commands,
                    done,
                } => {
                    numbered.push((shard, number, self.next_lsn));
                    let payload = codec::encode_batch(self.next_lsn, shard, &commands);
                    frame::put(&mut bytes, &payload);
                    if self.config.observer.is_some() {
                        observed.push(payload);
                    }
                    self.next_lsn += 1;
                    waiting.push(done);
                }
                Request::Reserve { shard, upto, done } => {
                    let record = Record::Reserve { shard, upto };
                    let payload = codec::encode(self.next_lsn, &record);
                    frame::put(&mut bytes, &payload);
                    if self.config.observer.is_some() {
                        observed.push(payload);
                    }
                    self.next_lsn += 1;
                    must_sync = true;
                    waiting.push(done);
                }
                Request::Snapshot {
                    shard,
                    settled,
                    image,
                    token_reserved,
                } => {
                    // The image holds the batches its shard had applied
                    // when it was taken: not those it handed over before
                    // but had not applied yet (in flight), nor its next
                    // ones, which may follow this request in this very
                    // group.
                    let covers_below = if planted::active(StorageBug::SnapshotCoversGroup) {
                        u64::MAX
                    } else {
                        self.first_unsettled(shard, settled, &numbered)
                    };
                    snapshots.push((shard, image, token_reserved, covers_below));
                }
                Request::Backup { done } => self.backups.push(done),
            }
        }
        // On a disk whose syncs take a while, the sync is what the power
        // may fail during: it is done once that while has passed.
        let slow = self.disk.sync_latency().is_some();
        let outcome = if bytes.is_empty() {
            Ok(())
        } else {
            self.append(&bytes, must_sync && !slow)
        };
        if outcome.is_err() {
            self.next_lsn = first_lsn;
        }
        Written {
            sync_later: must_sync && slow && !bytes.is_empty() && outcome.is_ok(),
            outcome,
            observed,
            waiting,
            numbered,
            snapshots,
        }
    }

    /// The first record of shard `shard` that a snapshot holding its
    /// batches up to `settled` does not hold: its oldest kept batch after
    /// `settled` (among those remembered and those of the group so far,
    /// `numbered`), or the next record if there is none.
    fn first_unsettled(&self, shard: u32, settled: u64, numbered: &[(u32, u64, u64)]) -> u64 {
        let remembered = self.recent[shard as usize].iter().copied();
        let this_group = numbered
            .iter()
            .filter(|(s, _, _)| *s == shard)
            .map(|&(_, number, lsn)| (number, lsn));
        remembered
            .chain(this_group)
            .find(|(number, _)| *number > settled)
            .map_or(self.next_lsn, |(_, lsn)| lsn)
    }

    /// Remembers which record holds each kept batch.
    fn remember(&mut self, numbered: Vec<(u32, u64, u64)>) {
        for (shard, number, lsn) in numbered {
            let recent = &mut self.recent[shard as usize];
            if recent.len() == RECENT_BATCHES {
                recent.pop_front();
            }
            recent.push_back((number, lsn));
        }
    }

    /// Syncs a group written by [`LogWriter::write_group`]. A failed sync
    /// leaves the log untrusted (its pages may be lost or not): the group
    /// is refused, and so is everything after, until a restart recovers
    /// from what is on disk.
    fn sync_group(&mut self, written: &mut Written) {
        if let Err(error) = self.file.sync() {
            let failed = format!("syncing the log failed ({error}); restart the server");
            tracing::error!(path = %self.current_path().display(), "{failed}");
            written.outcome = Err(ServerError::unavailable(failed.clone()));
            self.failed = Some(failed);
        }
    }

    /// Ends a group: shows its records to the observer once they are
    /// kept, answers its batches, then writes its snapshots.
    fn finish_group(&mut self, written: Written) {
        if written.outcome.is_ok() {
            self.tally.records += written.waiting.len() as u64;
            self.observe(&written.observed);
            self.remember(written.numbered);
        }
        for done in written.waiting {
            // A shard that stopped waiting has nothing to be told.
            let _ = done.send(written.outcome.clone());
        }
        for (shard, image, token_reserved, covers_below) in written.snapshots {
            // A refused group kept none of its records.
            let covers_below = covers_below.min(self.next_lsn);
            self.write_snapshot(shard, &image, token_reserved, covers_below);
        }
        self.maybe_rotate();
    }

    /// Appends `bytes` (whole records) and syncs if asked or due. On
    /// failure the segment is cut back to what it was, so nothing of the
    /// group stays: the shards answer `unavailable` and change nothing.
    fn append(&mut self, bytes: &[u8], must_sync: bool) -> Result<(), ServerError> {
        if let Some(why) = &self.failed {
            return Err(ServerError::unavailable(why.clone()));
        }
        let written = self
            .file
            .append(bytes)
            .and_then(|()| if must_sync { self.file.sync() } else { Ok(()) });
        if let Err(error) = written {
            return Err(self.undo_append(error));
        }
        if self.append_failing.take().is_some() {
            tracing::info!(path = %self.current_path().display(), "the log is written again");
        }
        self.tally.groups += 1;
        self.tally.syncs += u64::from(must_sync);
        self.tally.bytes += bytes.len() as u64;
        self.file_len += bytes.len() as u64;
        self.bytes_since_round += bytes.len() as u64;
        if must_sync {
            self.sync_due = None;
        } else if let Fsync::Every(interval) = self.config.fsync {
            self.sync_due
                .get_or_insert_with(|| Instant::now() + interval);
        }
        Ok(())
    }

    /// Cuts off a failed append and says why it failed. If even that
    /// fails, the log is no longer trusted and every later append fails.
    fn undo_append(&mut self, error: std::io::Error) -> ServerError {
        let why = if error.raw_os_error() == Some(28) {
            format!("the disk is full ({error}); nothing was changed")
        } else {
            format!("cannot write the log ({error}); nothing was changed")
        };
        if self.append_failing.as_ref() != Some(&why) {
            tracing::error!(path = %self.current_path().display(), "{why}");
            self.append_failing = Some(why.clone());
        }
        let cut = self
            .file
            .truncate(self.file_len)
            .and_then(|()| self.file.sync());
        if let Err(cut_error) = cut {
            let failed = format!(
                "the log could not be cut back after a failed write ({cut_error}); \
                 restart the server to recover from what is on disk"
            );
            tracing::error!("{failed}");
            self.failed = Some(failed);
        }
        ServerError::unavailable(why)
    }

    /// `Fsync::Every`: syncs what was written since the last sync.
    fn sync_unsynced(&mut self) {
        if self.sync_due.take().is_none() || self.failed.is_some() {
            return;
        }
        if let Err(error) = self.file.sync() {
            // After a failed sync the page cache cannot be trusted either.
            let failed = format!("syncing the log failed ({error}); restart the server");
            tracing::error!(path = %self.current_path().display(), "{failed}");
            self.failed = Some(failed);
        }
    }

    /// Copies the data directory into a new directory under
    /// `backup_dir` (see [`crate::backup`]): the log's segments (synced
    /// first), the snapshots, and the QUIC certificate and key beside them.
    fn backup(&mut self) -> Result<PathBuf, String> {
        let started = std::time::Instant::now();
        let Some(root) = self.config.backup_dir.clone() else {
            return Err("backups are off: start the server with --backup-dir DIR".into());
        };
        if let Some(why) = &self.failed {
            return Err(why.clone());
        }
        if let Err(error) = self.file.sync() {
            let failed = format!("syncing the log failed ({error}); restart the server");
            tracing::error!(path = %self.current_path().display(), "{failed}");
            self.failed = Some(failed.clone());
            return Err(failed);
        }
        self.sync_due = None;
        let dest = backup::new_dir(&*self.disk, &root)
            .map_err(|e| format!("cannot make a backup directory in {}: {e}", root.display()))?;
        let copied = self.copy_into(&dest).map_err(|e| {
            let why = format!("the backup into {} failed: {e}", dest.display());
            tracing::error!("{why}");
            why
        })?;
        tracing::info!(
            dest = %dest.display(),
            files = copied.files,
            bytes = copied.bytes,
            ms = started.elapsed().as_millis() as u64,
            "backed up the data directory"
        );
        Ok(dest)
    }

    fn copy_into(&self, dest: &Path) -> std::io::Result<backup::Copied> {
        let (disk, dir) = (&*self.disk, &self.config.dir);
        let mut copied = backup::Copied::default();
        let segments = self.segments.iter().filter_map(|segment| {
            let name = segment.path.file_name()?;
            Some(name.to_string_lossy().into_owned())
        });
        backup::copy_files(
            disk,
            &dir.join("wal"),
            &dest.join("wal"),
            segments,
            &mut copied,
        )?;
        let snapshots = disk.list(&dir.join("snapshots"))?;
        let snapshots = snapshots
            .into_iter()
            .filter(|name| snapshot::shard_of_file(name).is_some());
        let to = dest.join("snapshots");
        backup::copy_files(disk, &dir.join("snapshots"), &to, snapshots, &mut copied)?;
        let identity = disk.list(dir)?.into_iter().filter(|n| n.ends_with(".pem"));
        backup::copy_files(disk, dir, dest, identity, &mut copied)?;
        Ok(copied)
    }

    fn current_path(&self) -> PathBuf {
        self.segments
            .last()
            .map(|s| s.path.clone())
            .unwrap_or_default()
    }

    /// Starts a new segment when the current one is full, or when a
    /// snapshot round begins (so that the round can delete every segment
    /// before it).
    fn maybe_rotate(&mut self) {
        let round_due = self.round.is_none()
            && self.bytes_since_round >= self.round_threshold()
            && self.failed.is_none();
        if !round_due && self.file_len < self.config.segment_bytes {
            return;
        }
        if let Err(error) = self.rotate() {
            tracing::error!("cannot start a new log segment: {error}");
            return;
        }
        if round_due {
            self.start_round();
        }
    }

    /// Log bytes after which a snapshot round begins: enough that the log
    /// stays within a small factor of the state.
    fn round_threshold(&self) -> u64 {
        let snapshots: u64 = self.snapshot_bytes.iter().sum();
        self.config.snapshot_after_bytes.max(snapshots)
    }

    fn rotate(&mut self) -> Result<(), StorageError> {
        let old = self.current_path();
        self.file.sync().map_err(|e| io_error(&old, e))?;
        self.sync_due = None;
        let wal = self.config.dir.join("wal");
        let path = wal.join(segment_name(self.next_lsn));
        self.file = self
            .disk
            .open_append(&path)
            .map_err(|e| io_error(&path, e))?;
        self.disk.sync_dir(&wal).map_err(|e| io_error(&wal, e))?;
        self.segments.push(Segment {
            first_lsn: self.next_lsn,
            path,
        });
        self.file_len = 0;
        Ok(())
    }

    fn start_round(&mut self) {
        let shards = self.shared.attention.len();
        self.round = Some(Round {
            covers_below: vec![None; shards],
        });
        self.bytes_since_round = 0;
        for (wanted, attention) in self
            .shared
            .snapshot_wanted
            .iter()
            .zip(&self.shared.attention)
        {
            wanted.store(true, Ordering::Release);
            attention.notify_one();
        }
    }

    /// Writes shard `shard`'s snapshot, covering its records numbered
    /// below `covers_below`; ends the round once every shard has one.
    fn write_snapshot(
        &mut self,
        shard: u32,
        image: &ShardImage,
        token_reserved: u64,
        covers_below: u64,
    ) {
        let header = SnapshotHeader {
            shard,
            shards: self.shared.attention.len() as u32,
            covers_below,
            token_reserved,
            limits: self.config.limits,
        };
        match self.put_snapshot(&header, image) {
            Ok(bytes) => {
                self.snapshot_bytes[shard as usize] = bytes;
                if let Some(round) = &mut self.round {
                    round.covers_below[shard as usize] = Some(covers_below);
                }
                self.end_round_if_done();
            }
            Err(error) => {
                tracing::error!(shard, "cannot write a snapshot: {error}");
                // Asked again at the next round.
                self.round = None;
            }
        }
    }

    fn put_snapshot(
        &self,
        header: &SnapshotHeader,
        image: &ShardImage,
    ) -> Result<u64, StorageError> {
        let dir = self.config.dir.join("snapshots");
        let name = snapshot::file_name(header.shard as usize);
        let path = dir.join(&name);
        let tmp = dir.join(format!("{name}.tmp"));
        let bytes = snapshot::encode(header, image).map_err(|e| StorageError::Corrupt {
            path: path.clone(),
            offset: 0,
            why: e.0,
        })?;
        self.disk
            .write_synced(&tmp, &bytes)
            .map_err(|e| io_error(&tmp, e))?;
        self.disk
            .rename(&tmp, &path)
            .map_err(|e| io_error(&path, e))?;
        self.disk.sync_dir(&dir).map_err(|e| io_error(&dir, e))?;
        Ok(bytes.len() as u64)
    }

    /// Deletes the segments every shard's snapshot now covers.
    fn end_round_if_done(&mut self) {
        let Some(round) = &self.round else { return };
        // `None` (a shard still to write its snapshot) is the least.
        let Some(held_below) = round.covers_below.iter().copied().min().flatten() else {
            return;
        };
        self.round = None;
        // A segment goes only if the one after it starts at or below what
        // every snapshot holds: then every record in it is held.
        let next_starts: Vec<u64> = self.segments.iter().skip(1).map(|s| s.first_lsn).collect();
        let deletable = next_starts
            .iter()
            .take_while(|&&next| next <= held_below)
            .count();
        let old: Vec<Segment> = self.segments.drain(..deletable).collect();
        for segment in old {
            if let Err(error) = self.disk.remove(&segment.path) {
                tracing::warn!(path = %segment.path.display(), "cannot delete a log segment: {error}");
            }
        }
        let wal = self.config.dir.join("wal");
        if let Err(error) = self.disk.sync_dir(&wal) {
            tracing::warn!("cannot sync {}: {error}", wal.display());
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn io_error(path: &std::path::Path, source: std::io::Error) -> StorageError {
    StorageError::Io {
        path: path.to_owned(),
        source,
    }
}
