//! deadbolt-sim: the deterministic network simulation, our Jepsen.
//!
//! A turmoil simulation runs the real production code, unchanged: the
//! server host calls `deadbolt_server::run`, the very assembly `deadbolt
//! serve` runs (the engine, the WebSocket frontend over simulated TCP with
//! its HTTP routes, the QUIC frontend over simulated UDP, the write-ahead
//! log and its snapshots on a data directory), with only its sockets and
//! its disk simulated; worker hosts run the real Rust client; a protected
//! resource accepts writes fenced by token. A seed draws, through
//! proptest, each worker's plan, the server's disk (torn-write blocks, sync
//! latency, snapshot thresholds) and a schedule of faults (partitions both
//! and one way, link holds as process pauses, worker crashes with restart,
//! connection drops, latency spikes, datagram loss for QUIC workers;
//! server crashes as power cuts, some in the middle of a sync, with
//! recovery; graceful shutdowns with a start again; a full disk), which
//! ends in a heal. Some seeds give the server small capacity limits,
//! which the workload reaches. The recorded history is
//! then judged by the checker, and the server's log by the trace's and the
//! server checker's rules. The same seed gives the same run, byte for
//! byte: the history's hash proves it.
//!
//! In cluster mode ([`cluster`], `deadbolt-sim --cluster`) three node
//! hosts run `deadbolt_server::run_node` instead, each on its own simulated
//! disk, with the same workers (spread over the nodes), resource and
//! auditor; the seed's schedule crashes the leader or a follower (some in
//! the middle of a sync, some losing the disk, after which a simulated
//! operator readmits the node), cuts nodes off from each other both ways
//! and one way, and cuts workers off from their node or from the whole
//! cluster, one node down at a time, and heals. The same checker judges the history, and the lease rule
//! ([`lease`]) judges every lease across changes of leader. The store-level
//! rules of the single server (the trace's record numbers, snapshots and
//! replay, and the server checker's order and timing) need the storage's
//! log, which a node does not keep, and are not applied to a cluster; the
//! nodes' shards still check their invariants after every batch.
//!
//! Layout:
//! - [`scenario`]: what a seed draws;
//! - [`world`]: the hosts and one run;
//! - `driver`: the fault driver, which applies the schedule and heals;
//! - [`cluster`]: the cluster mode: its nodes, what a cluster seed draws
//!   beside the scenario ([`cluster::plan`]), the nodes' faults
//!   (`cluster::driver`), and who leads ([`cluster::leaders`]);
//! - [`disk`]: the server's simulated disk (turmoil's file system), which
//!   the schedule fills up;
//! - [`worker`]: the worker hosts' workloads;
//! - [`raw`]: a worker that speaks the protocol itself and trusts the
//!   server's `ttl_ms`;
//! - [`tap`]: a tap on the workers' connections that records what the
//!   servers answered, attempt by attempt (in a cluster);
//! - [`resource`]: the protected resource;
//! - [`history`]: the recorded history and its hash;
//! - [`checker`]: the rules a history must keep;
//! - [`events_checker`]: rule 14, the pushed events (`notify`, `watch`);
//! - [`lease`]: the lease rule across changes of leader, in a cluster;
//! - [`trace`]: the server's log as its store kept it, across restarts,
//!   checked against the state the server ends in and every snapshot;
//! - [`server_checker`]: the rules the server's own order and timing must
//!   keep, judged from its command log;
//! - [`proxy`]: planted bugs (a corrupting proxy, and the state machine's,
//!   the storage's and the replication's own under the `planted-bugs`
//!   feature), to prove the checkers catch them;
//! - [`script`]: the world of the scripted scenarios;
//! - [`net`]: simulated sockets under the real transports;
//! - [`summary`]: many seeds, and the table of what they did.

mod admission;
mod capacity;
pub mod checker;
pub mod cluster;
pub mod disk;
mod driver;
pub mod events_checker;
pub mod history;
pub mod lease;
pub mod net;
pub mod proxy;
pub mod raw;
pub mod resource;
pub mod scenario;
pub mod script;
pub mod server_checker;
pub mod summary;
pub mod tap;
mod top_lists;
pub mod trace;
pub mod worker;
pub mod world;

pub use proxy::Bug;
pub use world::{Options, Report, run};
