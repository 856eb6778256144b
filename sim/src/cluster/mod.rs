//! The simulation's cluster mode (SPEC section 9): three node hosts,
//! `node1` to `node3`, each running `deadbolt_server::run_node` as
//! `deadbolt serve --node-id N --cluster ...` does, on its own simulated
//! disk, with the same workers, resource and auditor as the single-server
//! mode. Nodes crash as power cuts and recover from their disk, lose their
//! disk, and are cut off from each other (both ways and one way) by the
//! fault driver ([`driver`]), as the seed's [`plan`] says; [`leaders`]
//! tells who leads, as the nodes log it.
//!
//! Every node uses [`Timings::fixed_for`]: openraft draws its election
//! timeouts from the thread's random generator, which the simulation
//! cannot seed; fixed, distinct timeouts keep a seed's run the same.

pub(crate) mod driver;
pub mod leaders;
mod operator;
pub mod plan;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use deadbolt_replication::{ClusterConfig, Timings};
use deadbolt_server::{Listeners, Peering, ServerConfig};
use deadbolt_transport_quic::{Identity, QuicConfig};
use tokio::sync::watch;

use crate::checker::Violation;
use crate::disk::{self, DiskControl, DiskStats, SimDisk};
use crate::history::{Actor, History, What};
use crate::net::{
    SimDialer, SimListener, engine_config, quic_config, quic_endpoint, quic_server_config,
    ws_config,
};
use crate::scenario::Scenario;
use crate::trace::Trace;
use crate::worker::{QUIC_PORT, WS_PORT};
use leaders::Leaders;
use plan::{ClusterPlan, NODES};

/// The port nodes talk Raft on.
pub const PEER_PORT: u16 = 7430;

/// The host name of node `node` (1-based).
pub fn node_name(node: u64) -> String {
    format!("node{node}")
}

/// Every node's host name, in id order.
pub fn node_names() -> Vec<String> {
    (1..=NODES).map(node_name).collect()
}

/// One node's handles: its disk, its invariant alarm, and the switches a
/// run keeps on it.
#[derive(Clone)]
pub(crate) struct NodeControl {
    /// Its id.
    pub(crate) id: u64,
    /// Its disk, which the driver crashes under it.
    pub(crate) disk: Arc<DiskControl>,
    /// Only its invariant alarm is read: the store-level checks of the
    /// single-server mode need the storage's log, which a node does not
    /// keep (its log is the Raft log).
    trace: Arc<Trace>,
    /// Set while the node is down with a lost disk: its next start wipes
    /// the data directory first.
    pub(crate) wipe: Arc<AtomicBool>,
    /// How many times it has started: a start on a new directory takes an
    /// incarnation drawn from the seed, the node and this.
    starts: Arc<AtomicU64>,
    stopped: Arc<AtomicBool>,
}

/// The cluster of a run: its nodes, who leads, and the switch that shuts
/// every node down at the end.
#[derive(Clone)]
pub(crate) struct ClusterControl {
    pub(crate) nodes: Vec<NodeControl>,
    pub(crate) leaders: Leaders,
    /// The nodes that lost their disk, for the operator to readmit.
    pub(crate) readmissions: operator::Readmissions,
    /// The seed's node faults and snapshot interval.
    pub(crate) plan: Arc<ClusterPlan>,
    history: History,
    seed: u64,
    shards: usize,
    quic_retry: bool,
    stop: Arc<watch::Sender<bool>>,
}

impl ClusterControl {
    /// The cluster of `scenario` (whose disk plan every node's disk
    /// follows: torn-write blocks and sync latency) and `plan`.
    pub(crate) fn new(
        seed: u64,
        scenario: &Scenario,
        plan: ClusterPlan,
        history: &History,
    ) -> ClusterControl {
        let latency = Duration::from_millis(scenario.disk.sync_latency_ms);
        let nodes = (1..=NODES)
            .map(|id| {
                let trace = Arc::new(Trace::with_sync_latency(latency));
                let latency = (!latency.is_zero()).then_some(latency);
                NodeControl {
                    id,
                    disk: DiskControl::new(None, latency, &trace),
                    trace,
                    wipe: Arc::new(AtomicBool::new(false)),
                    starts: Arc::new(AtomicU64::new(0)),
                    stopped: Arc::new(AtomicBool::new(false)),
                }
            })
            .collect();
        ClusterControl {
            nodes,
            leaders: Leaders::default(),
            readmissions: operator::Readmissions::default(),
            plan: Arc::new(plan),
            history: history.clone(),
            seed,
            shards: scenario.shards,
            quic_retry: scenario.quic_retry,
            stop: Arc::new(watch::Sender::new(false)),
        }
    }

    /// The node with id `node`.
    pub(crate) fn node(&self, node: u64) -> &NodeControl {
        &self.nodes[usize::try_from(node - 1).unwrap_or(0)]
    }

    /// Every node's peer address, by id.
    fn members() -> BTreeMap<u64, String> {
        (1..=NODES)
            .map(|id| (id, format!("{}:{PEER_PORT}", node_name(id))))
            .collect()
    }

    /// The invariants the nodes' shards found broken.
    pub(crate) fn violations(&self) -> Vec<Violation> {
        let mut violations = Vec::new();
        for node in &self.nodes {
            for (shard, what) in node.trace.broken() {
                violations.push(Violation::InvariantBroken {
                    shard,
                    what: format!("node {}: {what}", node.id),
                });
            }
        }
        violations
    }

    /// What the nodes' disks did, summed.
    pub(crate) fn disk_stats(&self) -> DiskStats {
        let mut sum = DiskStats::default();
        for node in &self.nodes {
            let stats = node.disk.stats();
            sum.snapshots += stats.snapshots;
            sum.torn_tails_cut += stats.torn_tails_cut;
            sum.log_bytes += stats.log_bytes;
            sum.segments_deleted += stats.segments_deleted;
        }
        sum
    }

    /// Shuts every node down gracefully and waits (a bounded while) until
    /// they have stopped.
    pub(crate) async fn stop(&self) {
        self.stop.send_replace(true);
        for _ in 0..100 {
            if self.nodes.iter().all(|n| n.stopped.load(Ordering::Acquire)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Adds the node hosts to `sim`, each serving with the certificate and key
/// `(cert, key)` (the same for all: clients trust one CA), and the
/// operator, which readmits a node that lost its disk.
///
/// A node host's future is `run_node`'s: crashing the host drops it, as a
/// killed process ends, and a bounce starts a fresh node on the same disk,
/// which recovers its Raft log and snapshot (or, after a disk loss, starts
/// empty). A node that refuses to start ends its host with the error.
pub(crate) fn add_nodes(
    sim: &mut turmoil::Sim<'_>,
    (cert, key): &(String, String),
    control: &ClusterControl,
) {
    for node in &control.nodes {
        let (control, node) = (control.clone(), node.clone());
        let (cert, key) = (cert.clone(), key.clone());
        sim.host(node_name(node.id), move || {
            let (control, node) = (control.clone(), node.clone());
            let (cert, key) = (cert.clone(), key.clone());
            async move {
                serve_node(&control, &node, &cert, &key).await?;
                node.stopped.store(true, Ordering::Release);
                Ok(())
            }
        });
    }
    let control = control.clone();
    sim.host(OPERATOR, move || operator::run(control.clone()));
}

/// The host name of the cluster's operator.
pub const OPERATOR: &str = "operator";

/// Runs node `node` until the run's end shuts it down.
async fn serve_node(
    control: &ClusterControl,
    node: &NodeControl,
    cert: &str,
    key: &str,
) -> turmoil::Result {
    let wiped = node.wipe.swap(false, Ordering::AcqRel);
    if wiped {
        disk::wipe(disk::DATA_DIR)?;
    }
    let kept_files = disk::files_under(disk::DATA_DIR)?;
    let started = What::NodeStarted { wiped, kept_files };
    control.history.record(Actor::Node(node.id), started);
    let identity = Identity::from_pem(cert.as_bytes(), key.as_bytes())?;
    let host = u8::try_from(node.id).unwrap_or(u8::MAX);
    let quic_server = quic_server_config(identity, control.seed)?;
    let quic = quic_endpoint(QUIC_PORT, control.seed, host, Some(quic_server)).await?;
    let ws = turmoil::net::TcpListener::bind(("0.0.0.0", WS_PORT)).await?;
    let peers = turmoil::net::TcpListener::bind(("0.0.0.0", PEER_PORT)).await?;
    let listeners = Listeners {
        ws: SimListener(ws),
        quic: Some(quic),
    };
    let peering = Peering {
        cluster: cluster_config(control, node),
        listener: SimListener(peers),
        dialer: SimDialer,
    };
    let mut stop = control.stop.subscribe();
    let shutdown = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    let config = server_config(control, node);
    let served = deadbolt_server::run_node(config, listeners, Some(peering), shutdown).await;
    if let Err(error) = &served {
        let error = format!("{error}: {}", error_chain(error));
        control.history.record(
            Actor::Node(node.id),
            What::ServerStartFailed {
                error,
                disk_full: false,
            },
        );
    }
    Ok(served?)
}

/// The sources of `error`, joined.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut chain = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        chain.push(cause.to_string());
        source = cause.source();
    }
    chain.join(": ")
}

/// A node's server: the engine as in the single-server mode (invariants
/// checked after every batch), no storage of its own (its log is Raft's).
fn server_config(control: &ClusterControl, node: &NodeControl) -> ServerConfig {
    ServerConfig {
        engine: engine_config(control.shards, control.seed ^ node.id, &node.trace),
        ws: ws_config(),
        quic: QuicConfig {
            retry_above: if control.quic_retry { 0 } else { usize::MAX },
            ..quic_config()
        },
        storage: None,
    }
}

/// A node's place in the cluster: its data directory on its simulated
/// disk, the log writer as a task of its runtime, fixed election timeouts.
fn cluster_config(control: &ClusterControl, node: &NodeControl) -> ClusterConfig {
    ClusterConfig {
        node: node.id,
        members: ClusterControl::members(),
        client_url: format!("ws://{}:{WS_PORT}", node_name(node.id)),
        dir: PathBuf::from(disk::DATA_DIR),
        disk: Arc::new(SimDisk::new(Arc::clone(&node.disk))),
        writer_thread: false,
        timings: Timings::fixed_for(node.id),
        snapshot_every: control.plan.snapshot_every,
        fresh_incarnation: incarnation(control.seed, node),
        peer_tls: None,
    }
}

/// The incarnation `node` takes if its start finds a new directory: the
/// same in every run of the seed, another at every start (a node that lost
/// its disk must not come back as the one its peers met).
fn incarnation(seed: u64, node: &NodeControl) -> u64 {
    let start = node.starts.fetch_add(1, Ordering::AcqRel);
    // splitmix64's finalizer: any change of input changes every bit.
    let mut z = seed ^ (node.id << 56) ^ start.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
