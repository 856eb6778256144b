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
//! recovery; a full disk), which ends in a heal. The recorded history is
//! then judged by the checker, and the server's log by the trace's and the
//! server checker's rules. The same seed gives the same run, byte for
//! byte: the history's hash proves it.
//!
//! Layout:
//! - [`scenario`]: what a seed draws;
//! - [`world`]: the hosts and one run;
//! - `driver`: the fault driver, which applies the schedule and heals;
//! - [`disk`]: the server's simulated disk (turmoil's file system), which
//!   the schedule fills up;
//! - [`worker`]: the worker hosts' workloads;
//! - [`raw`]: a worker that speaks the protocol itself and trusts the
//!   server's `ttl_ms`;
//! - [`resource`]: the protected resource;
//! - [`history`]: the recorded history and its hash;
//! - [`checker`]: the rules a history must keep;
//! - [`trace`]: the server's log as its store kept it, across restarts,
//!   checked against the state the server ends in and every snapshot;
//! - [`server_checker`]: the rules the server's own order and timing must
//!   keep, judged from its command log;
//! - [`proxy`]: planted bugs (a corrupting proxy, and the state machine's
//!   and the storage's own under the `planted-bugs` feature), to prove the
//!   checkers catch them;
//! - [`script`]: the world of the scripted scenarios;
//! - [`net`]: simulated sockets under the real transports;
//! - [`summary`]: many seeds, and the table of what they did.

pub mod checker;
pub mod cluster;
pub mod disk;
mod driver;
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
pub mod trace;
pub mod worker;
pub mod world;

pub use proxy::Bug;
pub use world::{Options, Report, run};
