//! The durable Raft log: entries, the vote and the purge point, as framed
//! records (length, CRC) appended to segment files `raft/log-N.seg`
//! through the storage's [`Disk`] seam, so the simulation can cut power
//! under it. Entries are also kept in memory between the last purge and
//! the end of the log (snapshots bound how many).
//!
//! One writer applies every change in order: it takes all that is queued,
//! appends it, syncs once (group commit) and only then reports the entries
//! flushed (openraft counts a follower's entries towards a commit only
//! after that) or the vote saved.

use std::collections::BTreeMap;
use std::io;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use deadbolt_storage::frame;
use deadbolt_storage::{AppendFile, Disk};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// A segment grows to about this size before the next one starts.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// A record of the Raft log.
#[derive(Debug, Serialize, Deserialize)]
enum Record {
    /// Entries appended, in index order.
    Entries(Vec<Entry>),
    /// Every entry from this index on is gone (a new leader overwrote
    /// them).
    Truncate { since: u64 },
    /// Every entry up to this log id is in a snapshot and gone.
    Purge(LogId),
    /// The vote.
    Vote(Vote),
}

/// What the store knows, in memory.
#[derive(Debug, Default)]
struct State {
    entries: BTreeMap<u64, Entry>,
    vote: Option<Vote>,
    purged: Option<LogId>,
}

impl State {
    fn apply(&mut self, record: Record) {
        match record {
            Record::Entries(entries) => {
                for entry in entries {
                    self.entries.insert(entry.log_id.index, entry);
                }
            }
            Record::Truncate { since } => {
                self.entries.split_off(&since);
            }
            Record::Purge(log_id) => self.purge(log_id),
            Record::Vote(vote) => self.vote = Some(vote),
        }
    }

    fn purge(&mut self, log_id: LogId) {
        self.entries = self.entries.split_off(&(log_id.index + 1));
        if self.purged.is_none_or(|p| p < log_id) {
            self.purged = Some(log_id);
        }
    }
}

/// The Raft log. Cheap to clone: clones share the state and the writer.
#[derive(Clone)]
pub struct LogStore {
    state: Arc<Mutex<State>>,
    writes: mpsc::UnboundedSender<Write>,
}

/// A change for the writer, and whom to tell when it is durable.
struct Write {
    record: Record,
    done: Done,
}

enum Done {
    Nothing,
    Flushed(LogFlushed<TypeConfig>),
    Saved(oneshot::Sender<io::Result<()>>),
}

impl Done {
    fn complete(self, result: &io::Result<()>) {
        let copy = || match result {
            Ok(()) => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        };
        match self {
            Done::Nothing => {}
            Done::Flushed(callback) => callback.log_io_completed(copy()),
            Done::Saved(reply) => {
                let _ = reply.send(copy());
            }
        }
    }
}

/// What opening the log found.
#[derive(Debug, Default, Clone)]
pub struct Opened {
    /// Segments read.
    pub segments: usize,
    /// Records read.
    pub records: usize,
    /// A torn last record that was cut off: the file and the offset.
    pub torn_tail: Option<(PathBuf, u64)>,
}

/// Why the log cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Reading or writing failed.
    #[error("raft log: {0}")]
    Io(#[from] io::Error),
    /// A record before the end is damaged.
    #[error("raft log {path}: damaged record at byte {offset}: {why}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where.
        offset: usize,
        /// What is wrong.
        why: String,
    },
}

impl LogStore {
    /// Opens (or creates) the log in `dir`; returns it and the writer to
    /// run (see [`LogWriter::run`]).
    pub fn open(
        disk: Arc<dyn Disk>,
        dir: &Path,
    ) -> Result<(LogStore, LogWriter, Opened), OpenError> {
        disk.create_dir_all(dir)?;
        let segments = segment_numbers(disk.as_ref(), dir)?;
        let mut state = State::default();
        let mut opened = Opened::default();
        let mut last_len = 0;
        let mut held = Vec::with_capacity(segments.len());
        for &number in &segments {
            let path = dir.join(segment_name(number));
            let bytes = disk.read(&path)?;
            let (len, last_index) = read_segment(&path, &bytes, &mut state, &mut opened)?;
            last_len = len;
            held.push((number, last_index));
        }
        opened.segments = segments.len();
        let current = match segments.last() {
            Some(&last) => last,
            None => {
                held.push((1, 0));
                1
            }
        };
        let mut file = disk.open_append(&dir.join(segment_name(current)))?;
        if let Some((_, offset)) = &opened.torn_tail {
            file.truncate(*offset)?;
            file.sync()?;
            last_len = *offset;
        }
        let (writes, queue) = mpsc::unbounded_channel();
        let writer = LogWriter {
            disk,
            dir: dir.to_owned(),
            queue,
            file,
            current,
            current_len: last_len,
            vote: state.vote,
            purged: state.purged,
            segments: held,
        };
        let store = LogStore {
            state: Arc::new(Mutex::new(state)),
            writes,
        };
        Ok((store, writer, opened))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    // openraft's error type, which the trait methods return as is.
    #[allow(clippy::result_large_err)]
    fn send(&self, record: Record, done: Done) -> Result<(), StorageError> {
        self.writes
            .send(Write { record, done })
            .map_err(|_| write_error(ErrorSubject::Logs, "the log writer has stopped"))
    }
}

fn write_error(subject: ErrorSubject<u64>, why: &str) -> StorageError {
    StorageError::from_io_error(subject, ErrorVerb::Write, io::Error::other(why.to_owned()))
}

/// Reads one segment's records into `state`; returns the length of its
/// intact part and the highest entry index in it. A damaged last record is a torn write (cut off); a damaged
/// record before an intact one is corruption.
fn read_segment(
    path: &Path,
    bytes: &[u8],
    state: &mut State,
    opened: &mut Opened,
) -> Result<(u64, u64), OpenError> {
    let (records, end) = frame::scan(bytes);
    let mut last_index = 0;
    for (offset, payload) in records {
        let record: Record = postcard::from_bytes(payload).map_err(|e| OpenError::Corrupt {
            path: path.to_owned(),
            offset,
            why: e.to_string(),
        })?;
        if let Record::Entries(entries) = &record {
            let last = entries.iter().map(|e| e.log_id.index).max().unwrap_or(0);
            last_index = last_index.max(last);
        }
        state.apply(record);
        opened.records += 1;
    }
    match end {
        frame::End::Clean => Ok((bytes.len() as u64, last_index)),
        frame::End::Torn { offset } => {
            opened.torn_tail = Some((path.to_owned(), offset as u64));
            Ok((offset as u64, last_index))
        }
        frame::End::Corrupt { offset } => Err(OpenError::Corrupt {
            path: path.to_owned(),
            offset,
            why: "a damaged record before intact ones".into(),
        }),
    }
}

fn segment_name(number: u64) -> String {
    format!("log-{number:08}.seg")
}

fn segment_numbers(disk: &dyn Disk, dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers: Vec<u64> = disk
        .list(dir)?
        .iter()
        .filter_map(|name| {
            name.strip_prefix("log-")?
                .strip_suffix(".seg")?
                .parse()
                .ok()
        })
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}

/// Writes what the [`LogStore`] queues, in order; run it on a thread of
/// its own in a real server (its file calls block) or as a task in the
/// simulation.
pub struct LogWriter {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    queue: mpsc::UnboundedReceiver<Write>,
    file: Box<dyn AppendFile>,
    current: u64,
    current_len: u64,
    vote: Option<Vote>,
    purged: Option<LogId>,
    /// Every segment and the highest entry index written to it.
    segments: Vec<(u64, u64)>,
}

impl LogWriter {
    /// Runs until every [`LogStore`] clone is gone.
    pub async fn run(mut self) {
        let mut group = Vec::new();
        while let Some(first) = self.queue.recv().await {
            group.push(first);
            while let Ok(more) = self.queue.try_recv() {
                group.push(more);
            }
            let result = self.write_group(&group).await;
            if let Err(error) = &result {
                tracing::error!(%error, "cannot write the raft log");
            }
            for write in group.drain(..) {
                write.done.complete(&result);
            }
        }
    }

    /// Appends every record of `group`, then syncs once.
    async fn write_group(&mut self, group: &[Write]) -> io::Result<()> {
        let mut bytes = Vec::new();
        let mut purge_to = None;
        for write in group {
            self.note(&write.record, &mut purge_to);
            let payload = postcard::to_stdvec(&write.record).map_err(io::Error::other)?;
            frame::put(&mut bytes, &payload);
        }
        self.file.append(&bytes)?;
        self.current_len += bytes.len() as u64;
        if let Some(latency) = self.disk.sync_latency() {
            tokio::time::sleep(latency).await;
        }
        self.file.sync()?;
        if self.current_len >= SEGMENT_BYTES {
            self.rotate()?;
        }
        if let Some(index) = purge_to {
            self.delete_purged(index)?;
        }
        Ok(())
    }

    /// Keeps what a new segment must repeat and what segments hold.
    fn note(&mut self, record: &Record, purge_to: &mut Option<u64>) {
        match record {
            Record::Entries(entries) => {
                if let (Some(last), Some(segment)) = (entries.last(), self.segments.last_mut()) {
                    segment.1 = segment.1.max(last.log_id.index);
                }
            }
            Record::Vote(vote) => self.vote = Some(*vote),
            Record::Purge(log_id) => {
                self.purged = Some(*log_id);
                *purge_to = Some(log_id.index);
            }
            Record::Truncate { .. } => {}
        }
    }

    /// Starts the next segment, repeating the vote and the purge point at
    /// its head so that older segments can go.
    fn rotate(&mut self) -> io::Result<()> {
        self.current += 1;
        let path = self.dir.join(segment_name(self.current));
        self.file = self.disk.open_append(&path)?;
        self.disk.sync_dir(&self.dir)?;
        let mut bytes = Vec::new();
        let head = [self.vote.map(Record::Vote), self.purged.map(Record::Purge)];
        for record in head.into_iter().flatten() {
            let payload = postcard::to_stdvec(&record).map_err(io::Error::other)?;
            frame::put(&mut bytes, &payload);
        }
        self.file.append(&bytes)?;
        self.file.sync()?;
        self.current_len = bytes.len() as u64;
        self.segments.push((self.current, 0));
        Ok(())
    }

    /// Deletes the segments, other than the current one, whose entries are
    /// all purged.
    fn delete_purged(&mut self, purged: u64) -> io::Result<()> {
        let current = self.current;
        let (gone, kept): (Vec<_>, Vec<_>) = self
            .segments
            .iter()
            .partition(|&&(number, last)| number != current && last <= purged);
        for (number, _) in &gone {
            self.disk.remove(&self.dir.join(segment_name(*number)))?;
        }
        self.segments = kept;
        if !gone.is_empty() {
            self.disk.sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(self
            .state()
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let state = self.state();
        let last = state.entries.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: state.purged,
            last_log_id: last.or(state.purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let (reply, saved) = oneshot::channel();
        self.send(Record::Vote(*vote), Done::Saved(reply))?;
        let subject = || ErrorSubject::Vote;
        match saved.await {
            Ok(Ok(())) => {
                self.state().vote = Some(*vote);
                Ok(())
            }
            Ok(Err(e)) => Err(StorageError::from_io_error(subject(), ErrorVerb::Write, e)),
            Err(_) => Err(write_error(subject(), "the log writer has stopped")),
        }
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.state().vote)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        {
            let mut state = self.state();
            for entry in &entries {
                state.entries.insert(entry.log_id.index, entry.clone());
            }
        }
        self.send(Record::Entries(entries), Done::Flushed(callback))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.state().entries.split_off(&log_id.index);
        self.send(
            Record::Truncate {
                since: log_id.index,
            },
            Done::Nothing,
        )
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.state().purge(log_id);
        self.send(Record::Purge(log_id), Done::Nothing)
    }
}
