//! The Raft type configuration, and what a log entry carries: the batches
//! of stamped commands of one or more shards.

use std::io::Cursor;

use deadbolt_core::engine::replica::{Origin, Proposal};
use deadbolt_core::shard::Command;
use deadbolt_storage::codec::{self, CodecError, Reader};
use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// deadbolt's Raft types: node ids are `u64`, a node's address is its
    /// peer address, an entry carries [`Batches`].
    pub TypeConfig:
        D = Batches,
        R = (),
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The node id type.
pub type NodeId = u64;
/// A Raft node of deadbolt.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// A vote.
pub type Vote = openraft::Vote<NodeId>;
/// A storage error.
pub type StorageError = openraft::StorageError<NodeId>;

/// What one log entry carries: the batches that leading shards proposed
/// while the previous entry was on its way, in the order they proposed
/// them. One entry (one append, one fsync, one round trip to the
/// followers) carries them all, where an entry per batch made every shard
/// wait its turn behind the others' ([`crate::node`] combines them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batches(pub Vec<Batch>);

impl std::fmt::Display for Batches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} batches", self.0.len())?;
        for batch in &self.0 {
            write!(f, "; {batch}")?;
        }
        Ok(())
    }
}

/// One shard's batch of commands, as a log entry carries it: who proposed
/// it, and the commands in the storage's log encoding (ops as their wire
/// JSON, the one schema).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The shard.
    pub shard: u32,
    /// The proposing node.
    pub node: u64,
    /// The term it proposed in.
    pub term: u64,
    /// Its number among that shard's proposals in that term.
    pub number: u64,
    /// The encoded commands.
    pub commands: Vec<u8>,
}

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "batch {} of shard {} from node {} in term {} ({} bytes)",
            self.number,
            self.shard,
            self.node,
            self.term,
            self.commands.len()
        )
    }
}

impl Batch {
    /// The entry for `proposal`.
    pub fn of(proposal: &Proposal) -> Batch {
        Batch {
            shard: u32::try_from(proposal.shard).unwrap_or(u32::MAX),
            node: proposal.origin.node,
            term: proposal.origin.term,
            number: proposal.number,
            commands: codec::encode_commands(&proposal.commands),
        }
    }

    /// Who proposed it.
    pub fn origin(&self) -> Origin {
        Origin {
            node: self.node,
            term: self.term,
        }
    }

    /// Its commands, decoded.
    pub fn decode_commands(&self) -> Result<Vec<Command>, CodecError> {
        let mut reader = Reader(&self.commands);
        let commands = reader.commands()?;
        if !reader.0.is_empty() {
            return Err(CodecError("bytes after the commands".into()));
        }
        Ok(commands)
    }
}
