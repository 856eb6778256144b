//! A data directory keeps what the engine acknowledged: restart an engine
//! on it and every set member keeps its index and first inserter, every
//! non-ephemeral lock its holder, token and remaining lease; waiters and
//! ephemeral locks are gone, and new tokens are larger than every old one.
//! Damaged files: a torn tail is cut and reported, damage before it refuses
//! to start, a full disk answers `unavailable` and changes nothing.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadbolt_core::proto::{
    Acquire, ErrorCode, Inserted, Keys, LockInfo, LockOp, Mode, Okay, Op, Outcome, Request, SetOp,
    Wait,
};
use deadbolt_core::{Engine, EngineConfig, Session};
use deadbolt_storage::{
    AppendFile, Disk, RecoveryReport, StdDisk, StorageError, StoreConfig, open,
};
use tokio::task::JoinHandle;

/// An engine on a data directory, with its log writer.
struct Server {
    engine: Engine,
    writer: JoinHandle<()>,
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        shards: 3,
        ..EngineConfig::new()
    }
}

fn start_on(
    disk: Arc<dyn Disk>,
    config: StoreConfig,
) -> Result<(Server, RecoveryReport), StorageError> {
    let mut engine = engine_config();
    let opened = open(disk, config, &engine)?;
    engine.start_at = opened.start_at;
    engine.journal = Some(opened.store);
    let writer = tokio::spawn(opened.writer.run());
    let server = Server {
        engine: Engine::start_with(engine, opened.shards),
        writer,
    };
    Ok((server, opened.report))
}

fn start(dir: &Path) -> (Server, RecoveryReport) {
    start_on(Arc::new(StdDisk), StoreConfig::new(dir)).expect("the data directory opens")
}

impl Server {
    async fn stop(self) {
        self.engine.shutdown().await;
        drop(self.engine);
        self.writer.await.expect("the writer ends");
    }

    async fn client(&self, name: &str) -> Session {
        let session = self.engine.session();
        let hello = Op::Hello {
            client: name.to_owned(),
            auth: None,
        };
        assert!(call(&session, hello).await.is_ok());
        session
    }
}

/// Request ids are unique per connection; unique per test process will do.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

async fn call(session: &Session, op: Op) -> Outcome {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    session.execute(Request { id, op }).await.outcome
}

fn lock(key: &str, ttl_ms: u64, wait_ms: Option<u64>, ephemeral: bool) -> Op {
    Op::Lock(LockOp::Acquire(Acquire {
        key: key.to_owned(),
        ttl_ms,
        wait: Wait::from_wait_ms(wait_ms),
        ephemeral,
        mode: Mode::MUTEX,
        lock_delay_ms: 0,
        notify: false,
    }))
}

fn token_of(outcome: Outcome) -> u64 {
    match outcome {
        Ok(Okay::Granted(granted)) => granted.token,
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn inspect(key: &str) -> Op {
    Op::Lock(LockOp::Inspect {
        key: key.to_owned(),
    })
}

fn lock_info(outcome: Outcome) -> LockInfo {
    match outcome {
        Ok(Okay::LockInfo(info)) => info,
        other => panic!("expected lock info, got {other:?}"),
    }
}

fn insert(set: &str, keys: &[&str]) -> Op {
    Op::Set(SetOp::Insert {
        set: set.to_owned(),
        keys: Keys::Many(keys.iter().map(|k| (*k).to_owned()).collect()),
    })
}

fn inserted(outcome: Outcome) -> Vec<Inserted> {
    match outcome {
        Ok(Okay::InsertedMany(many)) => many.results,
        other => panic!("expected insert results, got {other:?}"),
    }
}

fn set_up(set: &str) -> Op {
    Op::Set(SetOp::SetUp {
        set: set.to_owned(),
        ttl_ms: 3_600_000,
    })
}

#[tokio::test]
async fn acknowledged_changes_survive_a_restart_and_the_rest_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, report) = start(dir.path());
    assert_eq!(
        report,
        RecoveryReport::default(),
        "a new directory is empty"
    );
    let alice = server.client("alice").await;
    let bob = server.client("bob").await;
    assert!(call(&alice, set_up("results")).await.is_ok());
    let first = inserted(call(&alice, insert("results", &["r1", "r2", "r3"])).await);
    let _ = inserted(call(&bob, insert("results", &["r2", "r4"])).await);
    let held = token_of(call(&alice, lock("job", 60_000, None, false)).await);
    let ephemeral = token_of(call(&alice, lock("tab", 60_000, None, true)).await);
    // Bob waits for the job; his wait dies with the process.
    let waiting = tokio::spawn({
        let bob = bob.clone();
        async move { call(&bob, lock("job", 1_000, None, false)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(lock_info(call(&bob, inspect("job")).await).waiters, 1);
    drop((alice, bob));
    waiting.abort();
    server.stop().await;

    let (server, report) = start(dir.path());
    assert!(report.records > 0, "{report:?}");
    let carol = server.client("carol").await;
    let again = inserted(call(&carol, insert("results", &["r3", "r2", "r1", "r4", "r5"])).await);
    let indices: Vec<u64> = again.iter().map(|r| r.index).collect();
    assert_eq!(indices, [3, 2, 1, 4, 5], "every index is kept");
    assert_eq!(first.iter().map(|r| r.index).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(
        again[..4].iter().all(|r| !r.first),
        "the first inserters are kept"
    );
    let alice = server.client("alice").await;
    let mine = inserted(call(&alice, insert("results", &["r1"])).await);
    assert!(mine[0].first, "alice still owns r1");

    let job = lock_info(call(&carol, inspect("job")).await);
    let holder = job.holder.expect("the held lock survived");
    assert_eq!((holder.client.as_str(), holder.token), ("alice", held));
    assert!(
        holder.remaining_ms > 55_000,
        "the lease continues: {holder:?}"
    );
    assert_eq!(job.waiters, 0, "waiters do not survive");
    assert!(
        lock_info(call(&carol, inspect("tab")).await)
            .holder
            .is_none(),
        "ephemeral locks do not survive"
    );
    let fresh = token_of(call(&carol, lock("tab", 1_000, None, false)).await);
    assert!(
        fresh > ephemeral && fresh > held,
        "tokens rise across the restart: {fresh}"
    );
    assert_eq!(
        token_of(call(&alice, lock("job", 60_000, Some(0), false)).await),
        held,
        "the holder re-locks with its token"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, _) = start(dir.path());
    let alice = server.client("alice").await;
    assert!(call(&alice, set_up("s")).await.is_ok());
    assert_eq!(
        inserted(call(&alice, insert("s", &["a"])).await)[0].index,
        1
    );
    drop(alice);
    server.stop().await;
    let segment = only_segment(dir.path());
    let intact = std::fs::metadata(&segment).expect("segment").len();
    // Half a record: a length promising more than follows.
    append_raw(&segment, &[200, 0, 0, 0, 1, 2, 3, 4, 5]);

    let (server, report) = start(dir.path());
    assert_eq!(report.torn_tail, Some((segment.clone(), intact, 9)));
    let alice = server.client("alice").await;
    assert_eq!(
        inserted(call(&alice, insert("s", &["a", "b"])).await)[1].index,
        2
    );
    drop(alice);
    server.stop().await;
    let (server, report) = start(dir.path());
    assert_eq!(
        report.torn_tail, None,
        "the cut was kept and the log goes on"
    );
    server.stop().await;
}

#[tokio::test]
async fn damage_before_the_tail_refuses_to_start_naming_file_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, _) = start(dir.path());
    let alice = server.client("alice").await;
    assert!(call(&alice, set_up("s")).await.is_ok());
    drop(alice);
    server.stop().await;
    let segment = only_segment(dir.path());
    let mut bytes = std::fs::read(&segment).expect("segment");
    bytes[12] ^= 0x20;
    std::fs::write(&segment, &bytes).expect("damage");
    match start_on(Arc::new(StdDisk), StoreConfig::new(dir.path())) {
        Err(StorageError::Corrupt { path, offset, .. }) => {
            assert_eq!((path, offset), (segment, 0));
        }
        Err(other) => panic!("expected corruption, got {other}"),
        Ok(_) => panic!("a damaged log must not start"),
    }
}

#[tokio::test]
async fn another_shard_count_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, _) = start(dir.path());
    server.stop().await;
    let engine = EngineConfig {
        shards: 5,
        ..EngineConfig::new()
    };
    match open(Arc::new(StdDisk), StoreConfig::new(dir.path()), &engine) {
        Err(error @ StorageError::ShardsChanged { .. }) => {
            assert!(error.to_string().contains("--shards 3"), "{error}");
        }
        Err(other) => panic!("expected a shard count error, got {other}"),
        Ok(_) => panic!("another shard count must be refused"),
    }
}

#[tokio::test]
async fn snapshots_compact_the_log_and_recovery_uses_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = StoreConfig::new(dir.path());
    config.snapshot_after_bytes = 4 << 10;
    config.segment_bytes = 2 << 10;
    let (server, _) = start_on(Arc::new(StdDisk), config.clone()).expect("opens");
    let alice = server.client("alice").await;
    assert!(call(&alice, set_up("s")).await.is_ok());
    for round in 0..200 {
        let key = format!("key-{round}");
        let results = inserted(call(&alice, insert("s", &[&key])).await);
        assert_eq!(results[0].index, round + 1);
    }
    // Idle shards take their snapshots when woken; give them a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(alice);
    server.stop().await;
    let segments = std::fs::read_dir(dir.path().join("wal"))
        .expect("wal")
        .count();
    let snapshots = std::fs::read_dir(dir.path().join("snapshots"))
        .expect("snaps")
        .count();
    assert_eq!(snapshots, 3, "every shard wrote a snapshot");
    assert!(segments <= 3, "old segments were deleted: {segments} left");

    let (server, report) = start_on(Arc::new(StdDisk), config).expect("opens");
    assert_eq!(report.snapshots, 3);
    let bob = server.client("bob").await;
    let keys: Vec<String> = (0..200).map(|i| format!("key-{i}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let results = inserted(call(&bob, insert("s", &keys)).await);
    assert!(
        results
            .iter()
            .enumerate()
            .all(|(i, r)| r.index == i as u64 + 1 && !r.first)
    );
    drop(bob);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_taken_under_load_keep_every_acknowledged_insert() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = StoreConfig::new(dir.path());
    config.snapshot_after_bytes = 8 << 10;
    config.segment_bytes = 4 << 10;
    let (server, _) = start_on(Arc::new(StdDisk), config.clone()).expect("opens");
    let setup = server.client("setup").await;
    for set in ["a", "b", "c", "d"] {
        assert!(call(&setup, set_up(set)).await.is_ok());
    }
    // Sixteen clients insert at once, so each shard has batches in flight
    // while it takes its snapshots.
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let session = server.client(&format!("w{worker}")).await;
        tasks.push(tokio::spawn(async move {
            let mut kept = Vec::new();
            for round in 0..60 {
                let set = ["a", "b", "c", "d"][(worker + round) % 4];
                let key = format!("{worker}-{round}");
                let results = inserted(call(&session, insert(set, &[&key])).await);
                kept.push((set, key, results[0].index));
            }
            kept
        }));
    }
    let mut kept = Vec::new();
    for task in tasks {
        kept.extend(task.await.expect("worker"));
    }
    drop(setup);
    server.stop().await;

    let (server, report) = start_on(Arc::new(StdDisk), config).expect("opens");
    assert_eq!(report.snapshots, 3, "{report:?}");
    let checker = server.client("checker").await;
    for (set, key, index) in kept {
        let again = inserted(call(&checker, insert(set, &[&key])).await);
        assert_eq!(
            (again[0].index, again[0].first),
            (index, false),
            "{set}/{key}"
        );
    }
    drop(checker);
    server.stop().await;
}

#[tokio::test]
async fn a_full_disk_answers_unavailable_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Arc::new(FillingDisk::default());
    let (server, _) = start_on(disk.clone(), StoreConfig::new(dir.path())).expect("opens");
    let alice = server.client("alice").await;
    assert!(call(&alice, set_up("s")).await.is_ok());
    assert_eq!(
        inserted(call(&alice, insert("s", &["a"])).await)[0].index,
        1
    );
    disk.fill();
    let refused = call(&alice, insert("s", &["b"])).await;
    assert_eq!(
        refused.as_ref().map_err(|e| e.code),
        Err(ErrorCode::Unavailable),
        "{refused:?}"
    );
    let refused = call(&alice, lock("job", 10_000, None, false)).await;
    assert_eq!(refused.map_err(|e| e.code), Err(ErrorCode::Unavailable));
    disk.make_room();
    let results = inserted(call(&alice, insert("s", &["b", "a"])).await);
    assert_eq!(
        (results[0].index, results[1].index),
        (2, 1),
        "the refused insert changed nothing"
    );
    let token = token_of(call(&alice, lock("job", 10_000, None, false)).await);
    drop(alice);
    server.stop().await;

    let (server, report) = start(dir.path());
    assert_eq!(report.torn_tail, None, "the failed writes were cut back");
    let bob = server.client("bob").await;
    let results = inserted(call(&bob, insert("s", &["a", "b", "c"])).await);
    assert_eq!(
        results.iter().map(|r| r.index).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let job = lock_info(call(&bob, inspect("job")).await);
    assert_eq!(job.holder.map(|h| h.token), Some(token));
    drop(bob);
    server.stop().await;
}

/// The real disk, except that appends can be made to fail as a full disk
/// does: part of the bytes written, then `ENOSPC`.
#[derive(Default)]
struct FillingDisk {
    full: Arc<Mutex<bool>>,
    partial_writes: Arc<AtomicU64>,
}

impl FillingDisk {
    fn fill(&self) {
        *self.full.lock().expect("full") = true;
    }

    fn make_room(&self) {
        *self.full.lock().expect("full") = false;
    }
}

impl Disk for FillingDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdDisk.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdDisk.list(dir)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        StdDisk.read(path)
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        Ok(Box::new(FillingFile {
            inner: StdDisk.open_append(path)?,
            full: Arc::clone(&self.full),
            partial_writes: Arc::clone(&self.partial_writes),
        }))
    }
    fn write_synced(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        StdDisk.write_synced(path, bytes)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdDisk.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        StdDisk.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        StdDisk.sync_dir(dir)
    }
}

struct FillingFile {
    inner: Box<dyn AppendFile>,
    full: Arc<Mutex<bool>>,
    partial_writes: Arc<AtomicU64>,
}

impl AppendFile for FillingFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if *self.full.lock().expect("full") {
            self.inner.append(&bytes[..bytes.len() / 2])?;
            self.partial_writes.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::from_raw_os_error(28));
        }
        self.inner.append(bytes)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.inner.sync()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
}

fn only_segment(dir: &Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(dir.join("wal"))
        .expect("wal")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(segments.len(), 1, "{segments:?}");
    segments.remove(0)
}

fn append_raw(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open");
    file.write_all(bytes).expect("append");
}
