//! The server's simulated disk: [`deadbolt_storage::Disk`] on turmoil's
//! per-host file system (`turmoil::fs`, the `unstable-fs` feature), so the
//! storage code the binary runs is tried against a disk that loses what was
//! not synced when the host crashes, tears the last writes into blocks
//! ([`turmoil::FsConfig::block_size`]) and has a capacity.
//!
//! Its calls return at once, but a sync of the log takes a while of the
//! simulation's time ([`Disk::sync_latency`], drawn per seed): the batches
//! that arrive meanwhile are the log writer's next group, as behind a real
//! disk, so a group can hold a shard's snapshot and its next batch.
//!
//! A full disk is a fault of the schedule, not a property of the whole run:
//! while [`DiskControl::fill`] is on, the disk writes a ballast file (another
//! tenant's data, synced) that takes all of its capacity, and once it is off
//! the ballast is deleted again. So a run sees `ENOSPC` for a while, and the
//! server must answer `unavailable` and change nothing, then serve again.
//! The ballast is written and deleted by the server host itself, on its next
//! disk call, so the run stays on the simulation's one thread and order.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use deadbolt_server::Durable;
use deadbolt_storage::{AppendFile, Disk, Fsync, StoreConfig};
use turmoil::fs::shim::std::fs;

use crate::trace::Trace;

/// The simulated server's data directory.
pub const DATA_DIR: &str = "/data";

/// The simulated server's storage: the data directory on a [`SimDisk`]
/// controlled by `control`, synced before every acknowledgement, with its
/// segments closed beyond `segment_bytes` and snapshots taken after
/// `snapshot_after_bytes` of log; every record it keeps and every shard's
/// final digest go to `trace`. The log writer is a task of the server's
/// runtime, so that the run does not depend on a thread's timing.
pub fn storage(
    control: &Arc<DiskControl>,
    trace: &Arc<Trace>,
    segment_bytes: u64,
    snapshot_after_bytes: u64,
) -> Durable {
    Durable {
        disk: Arc::new(SimDisk::new(Arc::clone(control))),
        store: StoreConfig {
            fsync: Fsync::Always,
            segment_bytes,
            snapshot_after_bytes,
            observer: Some(trace.observer()),
            on_stopped: Some(trace.on_stopped()),
            ..StoreConfig::new(DATA_DIR)
        },
        writer_thread: false,
    }
}

/// The ballast that fills the disk (outside the data directory).
const BALLAST: &str = "/ballast";
/// The smallest piece the ballast is written in: it leaves less room than
/// this, which no log record fits in.
const BALLAST_PIECE_MIN: u64 = 16;
/// `ENOSPC`, as the real disk reports it: turmoil says "No space left on
/// device" without an OS error code, and the log tells a full disk by it.
const ENOSPC: i32 = 28;

/// What the disk did, for the summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Appends refused because the disk was full.
    pub full_refusals: usize,
    /// Snapshots renamed into place.
    pub snapshots: usize,
    /// Log segments deleted (compacted away by snapshots).
    pub segments_deleted: usize,
    /// Torn log tails cut off by a recovery.
    pub torn_tails_cut: usize,
    /// Times the disk filled up (a ballast written).
    pub fills: usize,
    /// Bytes appended to the log.
    pub log_bytes: u64,
}

/// The run's handle on the disk: the switch that fills it and what it did.
#[derive(Debug)]
pub struct DiskControl {
    fill: AtomicBool,
    /// The log has been written since its last sync.
    unsynced: AtomicBool,
    capacity_bytes: Option<u64>,
    /// How long a sync of the log takes.
    sync_latency: Option<Duration>,
    stats: Mutex<DiskStats>,
    /// Told when a log append is refused, so that the server checker
    /// knows which commands came late for want of disk.
    trace: Arc<Trace>,
}

impl DiskControl {
    /// A disk of `capacity_bytes` (or unlimited: it can then not be
    /// filled) whose log syncs take `sync_latency` (or no time), and whose
    /// refused appends are noted in `trace`.
    pub fn new(
        capacity_bytes: Option<u64>,
        sync_latency: Option<Duration>,
        trace: &Arc<Trace>,
    ) -> Arc<DiskControl> {
        Arc::new(DiskControl {
            fill: AtomicBool::new(false),
            unsynced: AtomicBool::new(false),
            capacity_bytes,
            sync_latency,
            stats: Mutex::new(DiskStats::default()),
            trace: Arc::clone(trace),
        })
    }

    /// Fills the disk (`true`) or frees it again, at the server's next
    /// disk call.
    pub fn fill(&self, full: bool) {
        self.fill.store(full, Ordering::Release);
    }

    /// Whether the log has been written since its last sync: a crash now
    /// finds a write that may tear.
    pub fn unsynced(&self) -> bool {
        self.unsynced.load(Ordering::Acquire)
    }

    /// Forgets the unsynced write (lost, or torn, by a crash).
    pub fn crashed(&self) {
        self.unsynced.store(false, Ordering::Release);
    }

    /// What the disk did so far.
    pub fn stats(&self) -> DiskStats {
        *self.lock_stats()
    }

    fn lock_stats(&self) -> MutexGuard<'_, DiskStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, what: impl FnOnce(&mut DiskStats)) {
        what(&mut self.lock_stats());
    }
}

/// [`Disk`] on the simulated file system of the host that calls it.
#[derive(Debug, Clone)]
pub struct SimDisk {
    control: Arc<DiskControl>,
}

impl SimDisk {
    /// A disk controlled by `control`.
    pub fn new(control: Arc<DiskControl>) -> SimDisk {
        SimDisk { control }
    }

    /// Writes or deletes the ballast, as the fill switch says.
    fn settle(&self) -> io::Result<()> {
        let want = self.control.fill.load(Ordering::Acquire);
        let have = fs::exists(BALLAST);
        match (want, have, self.control.capacity_bytes) {
            (true, false, Some(capacity)) => {
                fill_up(capacity)?;
                self.control.count(|s| s.fills += 1);
                Ok(())
            }
            (false, true, _) => {
                fs::remove_file(BALLAST)?;
                fs::sync_dir("/")
            }
            _ => Ok(()),
        }
    }
}

/// Writes a synced ballast that leaves less than [`BALLAST_PIECE_MIN`]
/// bytes of `capacity` free, in pieces that halve until none fits. Each
/// piece is synced before the next is tried: turmoil counts every unsynced
/// write to a file as growing it from its synced length, so unsynced
/// pieces would seem to take more room than they do.
fn fill_up(capacity: u64) -> io::Result<()> {
    let mut ballast = fs::File::create(BALLAST)?;
    ballast.sync_all()?;
    let mut piece = capacity;
    while piece >= BALLAST_PIECE_MIN {
        let bytes = vec![0xBA; usize::try_from(piece).unwrap_or(usize::MAX)];
        match ballast.write_all(&bytes) {
            Ok(()) => ballast.sync_all()?,
            Err(_) => piece /= 2,
        }
    }
    fs::sync_dir("/")
}

/// Wipes `dir` off the calling host's disk, as a lost disk replaced by an
/// empty one: the node comes back with nothing.
///
/// turmoil keeps a directory's synced children when a crash loses the
/// directory's own (unsynced) entry in its parent: `dir` may look absent
/// while files below it are there, so it is made again first. And it
/// replays a directory's pending removals when that directory is synced
/// later, even after it was made anew: so every level is synced as it is
/// emptied, bottom up.
pub fn wipe(dir: &str) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    empty(Path::new(dir))?;
    fs::remove_dir(dir)?;
    fs::sync_dir(Path::new(dir).parent().unwrap_or(Path::new("/")))
}

/// Removes everything below `dir`, syncing each directory once emptied.
fn empty(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if fs::metadata(&path)?.is_dir() {
            empty(&path)?;
            fs::remove_dir(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    fs::sync_dir(dir)
}

/// How many files there are under `dir` on the calling host's disk, in
/// every directory below it (making `dir` if it is absent: see [`wipe`]).
pub fn files_under(dir: &str) -> io::Result<usize> {
    fs::create_dir_all(dir)?;
    let mut files = 0;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        files += if fs::metadata(&path)?.is_dir() {
            files_under(&path.to_string_lossy())?
        } else {
            1
        };
    }
    Ok(files)
}

/// turmoil's "no space" as the `ENOSPC` a real disk gives.
fn os_error(error: io::Error) -> io::Error {
    if error.to_string().contains("No space left") {
        io::Error::from_raw_os_error(ENOSPC)
    } else {
        error
    }
}

fn is_full_error(error: &io::Error) -> bool {
    error.raw_os_error() == Some(ENOSPC)
}

/// Whether the storage could not be used because the disk is full.
pub fn is_full(error: &deadbolt_storage::StorageError) -> bool {
    matches!(error, deadbolt_storage::StorageError::Io { source, .. } if is_full_error(source))
}

impl Disk for SimDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.settle()?;
        fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.settle()?;
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        // turmoil lists in creation order; a real directory in any order.
        names.sort_unstable();
        Ok(names)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.settle()?;
        fs::read(path)
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        self.settle()?;
        let file = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)?;
        Ok(Box::new(SimAppendFile {
            disk: self.clone(),
            path: path.to_owned(),
            file,
        }))
    }

    fn write_synced(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        self.settle()?;
        // The writer writes nothing else this way: a snapshot, beside its
        // place.
        self.control.trace.snapshot_written(bytes);
        let mut file = fs::File::create(path)?;
        file.write_all(bytes).map_err(os_error)?;
        file.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.settle()?;
        fs::rename(from, to)?;
        // The single server's snapshots end in `.snap`; a node's Raft
        // snapshot is `snapshot`.
        let snapshot = to.extension().is_some_and(|e| e == "snap")
            || to.file_name().is_some_and(|n| n == "snapshot");
        if snapshot {
            self.control.count(|s| s.snapshots += 1);
        }
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.settle()?;
        fs::remove_file(path)?;
        if path.extension().is_some_and(|e| e == "log") {
            self.control.count(|s| s.segments_deleted += 1);
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.settle()?;
        fs::sync_dir(dir)
    }

    fn sync_latency(&self) -> Option<Duration> {
        self.control.sync_latency
    }
}

/// A simulated file opened for appending.
struct SimAppendFile {
    disk: SimDisk,
    path: PathBuf,
    file: fs::File,
}

impl AppendFile for SimAppendFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.disk.settle()?;
        let written = self.file.write_all(bytes).map_err(os_error);
        if written.as_ref().is_err_and(is_full_error) {
            self.disk.control.count(|s| s.full_refusals += 1);
        }
        match written {
            Ok(()) => {
                self.disk
                    .control
                    .count(|s| s.log_bytes += bytes.len() as u64);
                self.disk.control.unsynced.store(true, Ordering::Release);
            }
            Err(_) => self.disk.control.trace.refused(),
        }
        written
    }

    fn sync(&mut self) -> io::Result<()> {
        self.disk.settle()?;
        self.file.sync_data()?;
        self.disk.control.unsynced.store(false, Ordering::Release);
        Ok(())
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.disk.settle()?;
        // Cutting bytes that are there is a torn tail's cut; cutting
        // nothing is a refused append's undo (turmoil writes all or none).
        if fs::metadata(&self.path)?.len() > len {
            self.disk.control.count(|s| s.torn_tails_cut += 1);
        }
        self.file.set_len(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPACITY: u64 = 64 << 10;

    fn disk(capacity: Option<u64>) -> (Arc<DiskControl>, SimDisk) {
        let control = DiskControl::new(capacity, None, &Arc::new(Trace::default()));
        let disk = SimDisk::new(Arc::clone(&control));
        (control, disk)
    }

    #[test]
    fn a_full_disk_refuses_appends_with_enospc_until_it_is_freed() -> turmoil::Result {
        let mut builder = turmoil::Builder::new();
        builder.fs().capacity(CAPACITY);
        let mut sim = builder.build();
        sim.client("server", async {
            let (control, disk) = disk(Some(CAPACITY));
            disk.create_dir_all(Path::new("/data/wal"))?;
            let mut log = disk.open_append(Path::new("/data/wal/1.log"))?;
            log.append(&[1; 100])?;
            log.sync()?;
            control.fill(true);
            let refused = log.append(&[2; 100]).expect_err("the disk is full");
            assert_eq!(refused.raw_os_error(), Some(ENOSPC));
            control.fill(false);
            log.append(&[3; 100])?;
            let stats = control.stats();
            assert_eq!((stats.fills, stats.full_refusals), (1, 1));
            assert_eq!(disk.read(Path::new("/data/wal/1.log"))?.len(), 200);
            Ok(())
        });
        sim.run()
    }

    #[test]
    fn a_crash_keeps_what_was_synced_and_loses_what_was_not() -> turmoil::Result {
        let mut sim = turmoil::Builder::new().build();
        let (control, disk) = disk(None);
        let found = Arc::new(Mutex::new(None));
        let (host_disk, host_found) = (disk.clone(), Arc::clone(&found));
        sim.host("server", move || {
            let (disk, found) = (host_disk.clone(), Arc::clone(&host_found));
            async move {
                let path = Path::new("/data/1.log");
                if let Ok(bytes) = disk.read(path) {
                    *found.lock().expect("found") = Some(bytes.len());
                    return Ok(());
                }
                disk.create_dir_all(Path::new("/data"))?;
                let mut log = disk.open_append(path)?;
                disk.sync_dir(Path::new("/data"))?;
                log.append(&[1; 10])?;
                log.sync()?;
                log.append(&[2; 10])?;
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        sim.step()?;
        assert!(control.unsynced(), "the second write is not synced");
        sim.crash("server");
        sim.bounce("server");
        sim.step()?;
        assert_eq!(*found.lock().expect("found"), Some(10));
        Ok(())
    }

    #[test]
    fn a_wiped_disk_comes_back_empty_and_takes_a_new_data_directory() -> turmoil::Result {
        let mut sim = turmoil::Builder::new().build();
        let (_, disk) = disk(None);
        let found = Arc::new(Mutex::new(Vec::new()));
        let (host_disk, host_found) = (disk.clone(), Arc::clone(&found));
        sim.host("node", move || {
            let (disk, found) = (host_disk.clone(), Arc::clone(&host_found));
            async move {
                let restarted = !found.lock().expect("found").is_empty();
                if restarted {
                    wipe(DATA_DIR)?;
                }
                found.lock().expect("found").push(files_under(DATA_DIR)?);
                // As a node makes its Raft directory: a log segment, then
                // a file renamed into place, then another.
                let dir = Path::new("/data/raft");
                disk.create_dir_all(dir)?;
                let _log = disk.open_append(&dir.join("log-1.seg"))?;
                for name in ["incarnation", "peers"] {
                    let beside = dir.join(format!("{name}.new"));
                    disk.write_synced(&beside, b"1")?;
                    disk.rename(&beside, &dir.join(name))?;
                    disk.sync_dir(dir)?;
                }
                found.lock().expect("found").push(files_under(DATA_DIR)?);
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        sim.step()?;
        sim.crash("node");
        sim.bounce("node");
        sim.step()?;
        // At each start, once wiped the second time, and once the files
        // are made: nothing, three; nothing, three.
        assert_eq!(*found.lock().expect("found"), [0, 3, 0, 3]);
        Ok(())
    }
}
