//! A snapshot covers exactly the records its shard had applied when the
//! image was taken, even when the shard's next batch reaches the log
//! writer in the same group as the snapshot.

use std::sync::Arc;

use deadbolt_core::EngineConfig;
use deadbolt_core::engine::Journal;
use deadbolt_core::proto::{Keys, SetOp};
use deadbolt_core::shard::{Caller, Command, Handle, Input, ShardOp};
use deadbolt_core::time::Tick;
use deadbolt_storage::{StdDisk, StoreConfig, open};

fn engine() -> EngineConfig {
    EngineConfig {
        shards: 1,
        ..EngineConfig::new()
    }
}

fn command(n: u64, op: SetOp) -> Command {
    Command {
        at: Tick::from_millis(n),
        input: Input::Op {
            handle: Handle(n),
            caller: Caller {
                client: Arc::from("alice"),
                conn: 1,
            },
            op: ShardOp::Set(op),
        },
    }
}

fn insert(n: u64, key: &str) -> Command {
    let op = SetOp::Insert {
        set: "s".into(),
        keys: Keys::One(key.into()),
    };
    command(n, op)
}

#[tokio::test(flavor = "current_thread")]
async fn a_batch_sent_right_after_a_snapshot_is_not_covered_by_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = StoreConfig::new(dir.path());
    // Every append starts a snapshot round.
    config.snapshot_after_bytes = 1;
    let opened = open(Arc::new(StdDisk), config.clone(), &engine()).expect("opens");
    let (store, mut shard) = (
        opened.store,
        opened.shards.into_iter().next().expect("a shard"),
    );
    let writer = tokio::spawn(opened.writer.run());

    let set_up = command(
        1,
        SetOp::SetUp {
            set: "s".into(),
            ttl_ms: 600_000,
        },
    );
    for (number, batch) in [(1, vec![set_up]), (2, vec![insert(2, "a")])] {
        store.append(0, number, &batch).await.expect("kept");
        for command in batch {
            shard.apply(command);
        }
        drop(shard.take_answers());
    }
    // The shard hands its snapshot (with "a") to the writer, and its next
    // batch right after, before the writer has run: one group.
    store.applied(0, &shard, 2).await;
    let b = vec![insert(3, "b")];
    store.append(0, 3, &b).await.expect("kept");
    drop(store);
    writer.await.expect("the writer ends");

    let opened = open(Arc::new(StdDisk), config, &engine()).expect("reopens");
    let mut shard = opened.shards.into_iter().next().expect("a shard");
    let members = command(
        4,
        SetOp::Members {
            set: "s".into(),
            after: 0,
            limit: 10,
        },
    );
    shard.apply(members);
    let answers = format!("{:?}", shard.take_answers());
    assert!(answers.contains("\"a\""), "a was kept: {answers}");
    assert!(answers.contains("\"b\""), "b was kept: {answers}");
}
