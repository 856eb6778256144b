//! The Raft log and state machine against openraft's own storage suite,
//! and the log's durability across a reopen (entries, vote, truncation,
//! purge, a torn last record).

use std::path::Path;
use std::sync::Arc;

use deadbolt_core::Engine;
use deadbolt_core::EngineConfig;
use deadbolt_core::client::Connection;
use deadbolt_core::engine::replica::{Consensus, Forwarder, Proposal, Proposed, ReplicaConfig};
use deadbolt_core::proto::ServerError;
use deadbolt_core::shard::Shard;
use deadbolt_core::time::Tick;
use deadbolt_replication::log_store::LogStore;
use deadbolt_replication::state_machine::StateMachine;
use deadbolt_replication::types::{Entry, TypeConfig};
use deadbolt_storage::{Disk, StdDisk};
use openraft::RaftLogReader;
use openraft::storage::{RaftLogReaderExt, RaftLogStorage, RaftLogStorageExt};
use openraft::testing::{StoreBuilder, Suite, blank_ent, log_id};
use openraft::{StorageError, Vote};

/// The engine behind the state machine never leads in these tests, so
/// nothing is ever proposed or forwarded.
struct NeverLeads;

impl Consensus for NeverLeads {
    fn propose(&self, _: Proposal) -> Proposed {
        Box::pin(async { Err(ServerError::unavailable("a follower")) })
    }
}

#[async_trait::async_trait]
impl Forwarder for NeverLeads {
    fn leader(&self) -> Option<u64> {
        None
    }

    async fn open(
        &self,
        _: &str,
        _: Option<&deadbolt_core::proto::Secret>,
    ) -> Result<(u64, Arc<dyn Connection>), ServerError> {
        Err(ServerError::unavailable("no leader"))
    }
}

fn open(dir: &Path) -> LogStore {
    let disk: Arc<dyn Disk> = Arc::new(StdDisk);
    let (store, writer, _) = LogStore::open(disk, dir).expect("open the log");
    tokio::spawn(writer.run());
    store
}

/// A state machine, and the engine it feeds (which stops when dropped).
fn state_machine(dir: &Path) -> (Engine, StateMachine) {
    let config = EngineConfig::new();
    let shards: Vec<Shard> = (0..config.shards)
        .map(|_| Shard::new(config.shard_config()))
        .collect();
    let replica = ReplicaConfig {
        node: 1,
        consensus: Arc::new(NeverLeads),
        forwarder: Arc::new(NeverLeads),
    };
    let shard_config = config.shard_config();
    let count = shards.len();
    let (engine, handle) = Engine::start_replicated(config, shards, replica, Tick::ZERO);
    let machine = StateMachine::new(
        handle,
        shard_config,
        count,
        Arc::new(StdDisk),
        dir.to_owned(),
        None,
    );
    (engine, machine)
}

struct Builder;

/// What a suite test keeps alive: the directory and the engine.
type Kept = (tempfile::TempDir, Engine);

impl StoreBuilder<TypeConfig, LogStore, StateMachine, Kept> for Builder {
    async fn build(&self) -> Result<(Kept, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let (engine, machine) = state_machine(dir.path());
        Ok(((dir, engine), store, machine))
    }
}

#[test]
fn the_log_and_state_machine_pass_openraft_s_storage_suite() {
    Suite::test_all(Builder).expect("openraft's storage suite");
}

fn blanks(term: u64, indices: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    indices
        .map(|i| blank_ent::<TypeConfig>(term, 1, i))
        .collect()
}

#[tokio::test]
async fn what_was_flushed_is_there_after_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut store = open(dir.path());
        store
            .blocking_append(blanks(1, 0..=9))
            .await
            .expect("append");
        store
            .save_vote(&Vote::new_committed(2, 3))
            .await
            .expect("vote");
        store.truncate(log_id(1, 1, 7)).await.expect("truncate");
        store
            .blocking_append(blanks(2, 7..=8))
            .await
            .expect("append");
        store.purge(log_id(1, 1, 2)).await.expect("purge");
        // Everything before this flush is durable once it returns.
        store
            .blocking_append(blanks(2, 9..=9))
            .await
            .expect("append");
    }
    let mut store = open(dir.path());
    assert_eq!(
        store.read_vote().await.expect("vote"),
        Some(Vote::new_committed(2, 3))
    );
    let state = store.get_log_state().await.expect("state");
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 2)));
    assert_eq!(state.last_log_id, Some(log_id(2, 1, 9)));
    let entries = store.try_get_log_entries(0..100).await.expect("entries");
    let ids: Vec<_> = entries.iter().map(|e| e.log_id).collect();
    let mut want: Vec<_> = (3..=6).map(|i| log_id(1, 1, i)).collect();
    want.extend((7..=9).map(|i| log_id(2, 1, i)));
    assert_eq!(ids, want);
}

#[tokio::test]
async fn a_torn_last_record_is_cut_off_and_the_rest_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut store = open(dir.path());
        store
            .blocking_append(blanks(1, 0..=4))
            .await
            .expect("append");
    }
    let segment = dir.path().join("log-00000001.seg");
    let mut bytes = std::fs::read(&segment).expect("segment");
    let intact = bytes.len();
    // Half a record: a length and a checksum, and a few bytes of payload.
    bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 9, 9]);
    std::fs::write(&segment, &bytes).expect("tear");
    let mut store = open(dir.path());
    let last = store.get_log_state().await.expect("state").last_log_id;
    assert_eq!(last, Some(log_id(1, 1, 4)));
    store
        .blocking_append(blanks(1, 5..=5))
        .await
        .expect("append after");
    drop(store);
    let len = std::fs::metadata(&segment).expect("segment").len() as usize;
    assert!(len > intact, "appended after the cut");
    let mut store = open(dir.path());
    let entries = store.get_log_entries(0..=5).await.expect("entries");
    assert_eq!(entries.len(), 6);
}
