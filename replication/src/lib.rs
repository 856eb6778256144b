//! deadbolt's replicated cluster (SPEC section 9) on openraft.
//!
//! Three or five nodes keep one Raft log of shard batches. Every node runs
//! the same engine as a replica ([`deadbolt_core::engine::replica`]): its
//! shards apply the committed batches in log order, the leader's shards
//! stamp and propose them and answer only once a majority has them. The
//! log and the snapshots are durable on each node ([`log_store`],
//! [`state_machine`]), behind the storage's disk seam so the simulation
//! can cut power under them. Nodes talk over their peer ports
//! ([`network`]); a follower forwards its clients' requests to the leader
//! over the leader's WebSocket port ([`forward`]).
//!
//! Why openraft rather than TiKV's raft-rs: it is async on tokio (the
//! runtime deadbolt and turmoil already use), it drives its own timers,
//! replication and snapshot streaming, and leaves us the three seams we
//! want (log storage, state machine, network); raft-rs is a synchronous
//! core that needs a hand-written driver loop around it, and brings
//! protobuf. See docs/design.md.

pub mod forward;
pub mod identity;
pub mod log_store;
pub mod network;
mod node;
pub mod state_machine;
pub mod status;
pub mod types;

pub use node::{ClusterConfig, Node, Refusal, StartError, Timings, readmit, start};
pub use status::ClusterStatus;
