//! deadbolt-storage: what makes an acknowledgement a promise (SPEC section
//! 8). A write-ahead log of every shard's commands, kept before the shard
//! applies them, with group commit (one sync for every batch waiting);
//! snapshots of each shard that let the log be cut short; and recovery,
//! which is the latest snapshot of each shard plus the log after it,
//! followed by a restart command (waiters and ephemeral locks dropped,
//! tokens raised above every token handed out before).
//!
//! [`open`] recovers the state of a data directory and returns the engine's
//! [`Journal`] ([`Store`]), the recovered shards and the [`LogWriter`] to
//! run (on its own thread: its file calls block). Storage sits behind the
//! [`Disk`] seam: [`StdDisk`] here, turmoil's simulated disk (crashes,
//! torn writes, a full disk) in the simulation.
//!
//! Layout of a data directory: `wal/<first record>.log` (segments of
//! checksummed records, [`frame`]; their content, [`codec`]),
//! `snapshots/shard-N.snap` ([`snapshot`]). Layout of the crate: [`disk`],
//! [`frame`], [`codec`], [`snapshot`], `recover`, `writer`, and
//! [`planted`] (bugs the simulation plants to prove its checker, compiled
//! only with the `planted-bugs` feature).

mod backup;
pub mod codec;
pub mod disk;
pub mod frame;
pub mod planted;
mod recover;
pub mod snapshot;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use deadbolt_core::EngineConfig;
use deadbolt_core::engine::{Append, Journal};
use deadbolt_core::limits::Limits;
use deadbolt_core::proto::ServerError;
use deadbolt_core::shard::{Command, Input, Shard};
use deadbolt_core::time::Tick;
use tokio::sync::{Notify, mpsc, oneshot};

pub use disk::{AppendFile, Disk, StdDisk};
pub use planted::StorageBug;
pub use recover::RecoveryReport;
pub use writer::LogWriter;

pub use codec::Record;
use writer::Request;

/// When the log is synced (SPEC section 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Before any reply that depends on a change (the default): an
    /// acknowledged change survives a power cut.
    Always,
    /// At most this long after a change is written; replies go out once it
    /// is written. An acknowledged change survives the process dying, but a
    /// power cut may lose the last interval (Redis `appendfsync everysec`).
    Every(Duration),
}

/// Tokens reserved at a time: a reservation is synced whatever the policy,
/// so this bounds those syncs to one per this many grants.
pub const TOKEN_RESERVATION: u64 = 1 << 16;

/// How to keep a data directory.
#[derive(Clone)]
pub struct StoreConfig {
    /// The data directory.
    pub dir: PathBuf,
    /// When to sync.
    pub fsync: Fsync,
    /// A segment is closed and a new one begun beyond this many bytes.
    pub segment_bytes: u64,
    /// Log bytes after which every shard takes a snapshot (at least; never
    /// less than the snapshots' own size), so the log stays a small factor
    /// of the state.
    pub snapshot_after_bytes: u64,
    /// The engine-wide limits (recorded so a replay refuses what the
    /// server refused). Filled in by [`open`].
    pub limits: Limits,
    /// Whether the writer, on a thread of its own, yields its thread to
    /// the shards before each sync while they keep adding batches (bigger
    /// groups, fewer syncs). Off in the simulation, where the writer is a
    /// task and a thread's scheduling must not matter.
    pub yield_to_shards: bool,
    /// Told of every record once it is kept, in log order: the
    /// simulation's trace, which must hold exactly what the log holds.
    pub observer: Option<RecordObserver>,
    /// Told of each shard's state digest when the shard stops (a graceful
    /// shutdown): the simulation replays the records it observed and
    /// compares.
    pub on_stopped: Option<StoppedObserver>,
    /// Where [`Store::backup`] makes its copies (`None`: backups are off).
    pub backup_dir: Option<PathBuf>,
}

/// Sees each record the log keeps, with its number.
pub type RecordObserver = Arc<dyn Fn(u64, &Record) + Send + Sync>;

/// Sees a shard stop: the shard and the digest of the state it stopped in.
pub type StoppedObserver = Arc<dyn Fn(usize, u64) + Send + Sync>;

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("dir", &self.dir)
            .field("fsync", &self.fsync)
            .field("segment_bytes", &self.segment_bytes)
            .field("snapshot_after_bytes", &self.snapshot_after_bytes)
            .field("observer", &self.observer.is_some())
            .field("on_stopped", &self.on_stopped.is_some())
            .field("backup_dir", &self.backup_dir)
            .finish()
    }
}

impl StoreConfig {
    /// Defaults for `dir`: sync always, 64 MiB segments, snapshots every
    /// 64 MiB of log.
    pub fn new(dir: impl Into<PathBuf>) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            fsync: Fsync::Always,
            segment_bytes: 64 << 20,
            snapshot_after_bytes: 64 << 20,
            limits: Limits::default(),
            yield_to_shards: false,
            observer: None,
            on_stopped: None,
            backup_dir: None,
        }
    }
}

/// Why a data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file is damaged before its tail: refusing to start rather than
    /// lose what is after the damage silently.
    #[error(
        "{} is damaged at byte {offset}: {why}; refusing to start (move the data \
         directory aside to start empty, or restore it from a backup)",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where the damage starts.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// The data directory was written with another shard count; keys would
    /// land on other shards.
    #[error(
        "the data directory was written with {found} shards but the server is \
         configured with {configured}; start it with --shards {found}"
    )]
    ShardsChanged {
        /// Shards the directory says.
        found: usize,
        /// Shards configured.
        configured: usize,
    },
}

/// What the store and the shard actors share.
pub(crate) struct Shared {
    /// Per shard: a snapshot is wanted.
    snapshot_wanted: Vec<AtomicBool>,
    /// Per shard: wakes it to take the snapshot even when idle.
    attention: Vec<Arc<Notify>>,
    /// Per shard: tokens below this are reserved (durably).
    token_reserved: Vec<AtomicU64>,
}

/// The engine's journal on a data directory: hands each batch to the log
/// writer and waits until it is kept.
pub struct Store {
    requests: mpsc::UnboundedSender<Request>,
    shared: Arc<Shared>,
    on_stopped: Option<StoppedObserver>,
}

/// A recovered data directory, ready to serve.
pub struct Opened {
    /// The journal to give the engine.
    pub store: Arc<Store>,
    /// The task that writes the log; run it until the engine has stopped.
    pub writer: LogWriter,
    /// The recovered shards, in shard order, for `Engine::start_with`.
    pub shards: Vec<Shard>,
    /// The time the engine's clock must continue from.
    pub start_at: Tick,
    /// What recovery found.
    pub report: RecoveryReport,
}

/// Opens (creating if needed) the data directory of `config`, recovers
/// its state for an engine configured as `engine`, and records the start of
/// this run. Not async: it does file I/O before anything is served.
pub fn open(
    disk: Arc<dyn Disk>,
    mut config: StoreConfig,
    engine: &EngineConfig,
) -> Result<Opened, StorageError> {
    config.limits = engine.limits;
    let on_stopped = config.on_stopped.clone();
    make_dirs(&*disk, &config.dir)?;
    let recovered = recover::recover(&*disk, &config.dir, engine)?;
    let shards = recovered.shards.len();
    let shared = Arc::new(Shared {
        snapshot_wanted: (0..shards).map(|_| AtomicBool::new(false)).collect(),
        attention: (0..shards).map(|_| Arc::new(Notify::new())).collect(),
        token_reserved: recovered
            .token_reserved
            .iter()
            .map(|&t| AtomicU64::new(t))
            .collect(),
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let mut writer = LogWriter::new(
        Arc::clone(&disk),
        config,
        Arc::clone(&shared),
        rx,
        recovered.segments,
        recovered.next_lsn,
        recovered.log_bytes,
    )?;
    if let Some((_, offset, _)) = &recovered.report.torn_tail {
        writer.cut_to(*offset)?;
    }
    writer.write_now(&start_records(
        engine,
        &recovered.shards,
        recovered.start_at,
        &shared,
    ))?;
    Ok(Opened {
        store: Arc::new(Store {
            requests: tx,
            shared,
            on_stopped,
        }),
        writer,
        shards: recovered.shards,
        start_at: recovered.start_at,
        report: recovered.report,
    })
}

/// The records that begin a run: the run's shard count and limits, then
/// each shard's restart (already applied to the recovered shards), so that
/// a later recovery replays exactly what this run starts from.
fn start_records(
    engine: &EngineConfig,
    shards: &[Shard],
    at: Tick,
    shared: &Shared,
) -> Vec<Record> {
    let mut records = vec![recover::run_record(engine)];
    for (shard, reserved) in (0..shards.len()).zip(&shared.token_reserved) {
        let token_floor = reserved.load(Ordering::Relaxed);
        records.push(Record::Batch {
            shard: shard as u32,
            commands: vec![Command {
                at,
                input: Input::Restart { token_floor },
            }],
        });
    }
    records
}

fn make_dirs(disk: &dyn Disk, dir: &Path) -> Result<(), StorageError> {
    for sub in [dir.join("wal"), dir.join("snapshots")] {
        disk.create_dir_all(&sub)
            .map_err(|source| StorageError::Io {
                path: sub.clone(),
                source,
            })?;
    }
    disk.sync_dir(dir).map_err(|source| StorageError::Io {
        path: dir.to_owned(),
        source,
    })
}

impl Store {
    /// Copies the data directory, as it is at this moment, into a new
    /// directory under the config's `backup_dir`, and returns its path.
    ///
    /// The log writer makes the copy between two groups, after syncing the
    /// log: the copy holds every change acknowledged before it, and is what
    /// a crash at that moment would have left, which recovery reads as it
    /// reads any data directory. Acknowledgements wait while it copies.
    pub async fn backup(&self) -> Result<PathBuf, String> {
        let (done, answer) = oneshot::channel();
        let stopped = || "the log writer has stopped".to_owned();
        self.requests
            .send(Request::Backup { done })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Sends `request` and waits for its answer.
    async fn ask(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<(), ServerError>>) -> Request,
    ) -> Result<(), ServerError> {
        let (done, answer) = oneshot::channel();
        let stopped = || ServerError::unavailable("the log writer has stopped");
        self.requests.send(request(done)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Reserves tokens ahead of shard `shard`'s next one when fewer than
    /// half a reservation are left, so a reservation's sync is rarely
    /// waited for and a batch never hands out a token that is not reserved.
    async fn reserve_tokens(&self, shard: usize, state: &Shard) {
        let next = state.next_token();
        let reserved = &self.shared.token_reserved[shard];
        if next.saturating_add(TOKEN_RESERVATION / 2) <= reserved.load(Ordering::Acquire) {
            return;
        }
        let upto = next.saturating_add(TOKEN_RESERVATION);
        let shard_index = shard as u32;
        let kept = self
            .ask(|done| Request::Reserve {
                shard: shard_index,
                upto,
                done,
            })
            .await;
        match kept {
            Ok(()) => reserved.store(upto, Ordering::Release),
            Err(error) => tracing::error!(shard, "cannot reserve fencing tokens: {error}"),
        }
    }

    /// Sends shard `shard`'s snapshot to the writer if one is wanted;
    /// `state` holds its kept batches up to number `settled`.
    fn snapshot_if_wanted(&self, shard: usize, state: &Shard, settled: u64) {
        if !self.shared.snapshot_wanted[shard].swap(false, Ordering::AcqRel) {
            return;
        }
        let request = Request::Snapshot {
            shard: shard as u32,
            settled,
            image: Box::new(state.image()),
            token_reserved: self.shared.token_reserved[shard].load(Ordering::Acquire),
        };
        // A writer that stopped takes no snapshots; nothing is lost.
        let _ = self.requests.send(request);
    }
}

#[async_trait::async_trait]
impl Journal for Store {
    fn append(&self, shard: usize, number: u64, commands: &[Command]) -> Append {
        let (done, answer) = oneshot::channel();
        let request = Request::Batch {
            shard: shard as u32,
            number,
            commands: codec::encode_commands(commands),
            done,
        };
        let sent = self.requests.send(request).is_ok();
        Box::pin(async move {
            let stopped = || ServerError::unavailable("the log writer has stopped");
            if !sent {
                return Err(stopped());
            }
            answer.await.map_err(|_| stopped())?
        })
    }

    async fn applied(&self, shard: usize, state: &Shard, settled: u64) {
        self.reserve_tokens(shard, state).await;
        self.snapshot_if_wanted(shard, state, settled);
    }

    fn attention(&self, shard: usize) -> Option<Arc<Notify>> {
        self.shared.attention.get(shard).cloned()
    }

    fn stopped(&self, shard: usize, digest: u64) {
        if let Some(on_stopped) = &self.on_stopped {
            on_stopped(shard, digest);
        }
    }
}
