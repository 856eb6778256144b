//! What a cluster seed draws beside the workload ([`crate::scenario`]):
//! the nodes' own faults, the reach of the workers' link faults, and how
//! often the nodes snapshot. It is drawn from its own stream of the seed,
//! so the workload of seed N is the same in both modes.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// How many nodes the cluster has.
pub const NODES: u64 = 3;
/// Node faults start in `[NODE_FAULTS_FROM_MS, NODE_FAULTS_UNTIL_MS)`:
/// after the first election (node 1's timeout is 650 ms), so that "the
/// leader" names a node.
pub const NODE_FAULTS_FROM_MS: u64 = 1_000;
/// See [`NODE_FAULTS_FROM_MS`].
pub const NODE_FAULTS_UNTIL_MS: u64 = 5_000;
/// The shortest time a crashed node stays down: longer than a client takes
/// to notice its connection died (see
/// [`crate::scenario::SERVER_DOWN_MIN_MS`]).
pub const NODE_DOWN_MIN_MS: u64 = 1_600;
/// The longest a crashed node stays down.
pub const NODE_DOWN_MAX_MS: u64 = 2_200;
/// A node runs at least this long between two crashes (of any node): at
/// most one node is down at a time, a minority of three.
pub const NODE_UP_MIN_MS: u64 = 300;
/// Most crashes (and disk losses) in a run.
pub const NODE_CRASHES_MAX: usize = 2;
/// The shortest partition between nodes: shorter ones rarely outlast an
/// election timeout.
pub const PARTITION_MIN_MS: u64 = 300;
/// The longest partition between nodes.
pub const PARTITION_MAX_MS: u64 = 3_000;
/// Most partitions between nodes in a run (one at a time).
pub const PARTITIONS_MAX: usize = 3;

/// Which node a fault hits, chosen when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// The node that leads in the highest term (node 1 if none is known).
    Leader,
    /// One of the nodes that do not lead: the `pick`-th of them (modulo
    /// how many there are), in id order.
    Follower {
        /// Which one.
        pick: usize,
    },
}

/// A fault of a node or of the links between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NodeFaultKind {
    /// The node crashes (a power cut: unsynced writes lost, the last torn)
    /// and restarts on its disk when the fault ends.
    Crash {
        /// Whether the crash waits (up to
        /// [`crate::scenario::MID_SYNC_WAIT_MAX_MS`]) for a moment when the
        /// node's disk has written and not yet synced.
        mid_sync: bool,
    },
    /// The node crashes, its data directory is wiped (a lost disk), and it
    /// restarts empty when the fault ends.
    DiskLoss,
    /// The node's links to every other node are cut: both ways, or only
    /// one way (`Some(true)`: what it sends; `Some(false)`: what it
    /// receives). Its clients still reach it.
    Isolate {
        /// See above.
        oneway: Option<bool>,
    },
    /// The link between the node and one other node (the `other`-th of
    /// the rest, in id order) is cut, both ways or one way as for
    /// `Isolate`: the two others still see both.
    CutLink {
        /// Which other node.
        other: usize,
        /// See `Isolate`.
        oneway: Option<bool>,
    },
}

impl NodeFaultKind {
    /// A short name, for the summary table.
    pub fn name(&self) -> &'static str {
        match self {
            NodeFaultKind::Crash { .. } => "node crash + restart",
            NodeFaultKind::DiskLoss => "node disk lost + restart",
            NodeFaultKind::Isolate { oneway: None } => "node isolated",
            NodeFaultKind::Isolate { oneway: Some(_) } => "node isolated one way",
            NodeFaultKind::CutLink { oneway: None, .. } => "node link cut",
            NodeFaultKind::CutLink {
                oneway: Some(_), ..
            } => "node link cut one way",
        }
    }

    /// Whether the node is down while it lasts.
    pub fn is_down(&self) -> bool {
        matches!(self, NodeFaultKind::Crash { .. } | NodeFaultKind::DiskLoss)
    }
}

/// A node fault, when it starts, how long it lasts, and whom it hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeFault {
    /// Start, in simulated milliseconds (for a crash in the middle of a
    /// sync, when it begins to wait for one).
    pub at_ms: u64,
    /// Length (for a crash, from the moment it comes).
    pub duration_ms: u64,
    /// The node.
    pub target: Target,
    /// What it is.
    pub kind: NodeFaultKind,
}

impl NodeFault {
    /// When the fault has ended at the latest.
    pub fn end_ms(&self) -> u64 {
        let waits = match self.kind {
            NodeFaultKind::Crash { mid_sync: true } => crate::scenario::MID_SYNC_WAIT_MAX_MS,
            _ => 0,
        };
        self.at_ms + waits + self.duration_ms
    }
}

/// What a cluster run draws beside its scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPlan {
    /// The nodes' faults, by start time: crashes one at a time, partitions
    /// one at a time (a partition may come while a node is down: a while
    /// without a quorum).
    pub faults: Vec<NodeFault>,
    /// Per fault of the scenario's workers (same order): whether a link
    /// fault cuts the worker off from every node, or only from the node
    /// it connects to first (a client cut off from one node).
    pub whole_cluster: Vec<bool>,
    /// Raft entries between a node's snapshots.
    pub snapshot_every: u64,
}

impl ClusterPlan {
    /// When the last node fault has ended (0 if none).
    pub fn faults_end_ms(&self) -> u64 {
        self.faults.iter().map(NodeFault::end_ms).max().unwrap_or(0)
    }
}

/// The leader (`leader` in `leader + 1` faults) or a follower.
fn target(leader: u32) -> impl Strategy<Value = Target> {
    prop_oneof![
        leader => Just(Target::Leader),
        1 => (0usize..2).prop_map(|pick| Target::Follower { pick }),
    ]
}

fn oneway() -> impl Strategy<Value = Option<bool>> {
    prop_oneof![2 => Just(None), 1 => any::<bool>().prop_map(Some)]
}

/// Runs of faults that never overlap: each starts after the one before has
/// ended and `gap_ms` more.
fn one_at_a_time(mut faults: Vec<NodeFault>, gap_ms: u64) -> Vec<NodeFault> {
    faults.sort_unstable();
    let mut free_from = 0;
    for fault in &mut faults {
        fault.at_ms = fault.at_ms.max(free_from);
        free_from = fault.end_ms() + gap_ms;
    }
    faults
}

/// None, one or two crashes of a node (a third of them leave it without
/// its disk, if `disk_loss`, but never two: see [`one_disk_lost`]), one at
/// a time.
fn crashes(disk_loss: bool) -> impl Strategy<Value = Vec<NodeFault>> {
    let kind = prop_oneof![
        2 => any::<bool>().prop_map(|mid_sync| NodeFaultKind::Crash { mid_sync }),
        1 => Just(if disk_loss { NodeFaultKind::DiskLoss } else { NodeFaultKind::Crash { mid_sync: false } }),
    ];
    let crash = (
        NODE_FAULTS_FROM_MS..NODE_FAULTS_UNTIL_MS,
        NODE_DOWN_MIN_MS..NODE_DOWN_MAX_MS,
        target(1),
        kind,
    )
        .prop_map(|(at_ms, duration_ms, target, kind)| NodeFault {
            at_ms,
            duration_ms,
            target,
            kind,
        });
    prop::collection::vec(crash, 0..=NODE_CRASHES_MAX)
        .prop_map(|crashes| one_disk_lost(one_at_a_time(crashes, NODE_UP_MIN_MS)))
}

/// `crashes` with every disk loss after the first a plain crash. A node
/// that lost its disk is lost until it is readmitted, which may take a
/// while (and faults may come meanwhile): a second loss could make two of
/// three nodes empty, a majority that forgot everything, which no
/// replication survives (SPEC section 9 promises a minority).
fn one_disk_lost(mut crashes: Vec<NodeFault>) -> Vec<NodeFault> {
    let mut lost = false;
    for crash in &mut crashes {
        if crash.kind == NodeFaultKind::DiskLoss {
            if lost {
                crash.kind = NodeFaultKind::Crash { mid_sync: false };
            }
            lost = true;
        }
    }
    crashes
}

/// Up to [`PARTITIONS_MAX`] partitions between nodes, one at a time, two
/// in three around the leader: a leader cut off from its followers, which
/// its own clients still reach, is where a deposed leader could answer
/// what it can no longer commit.
fn partitions() -> impl Strategy<Value = Vec<NodeFault>> {
    let kind = prop_oneof![
        2 => oneway().prop_map(|oneway| NodeFaultKind::Isolate { oneway }),
        1 => (0usize..2, oneway()).prop_map(|(other, oneway)| NodeFaultKind::CutLink { other, oneway }),
    ];
    let partition = (
        NODE_FAULTS_FROM_MS..NODE_FAULTS_UNTIL_MS,
        PARTITION_MIN_MS..PARTITION_MAX_MS,
        target(2),
        kind,
    )
        .prop_map(|(at_ms, duration_ms, target, kind)| NodeFault {
            at_ms,
            duration_ms,
            target,
            kind,
        });
    prop::collection::vec(partition, 0..=PARTITIONS_MAX).prop_map(|p| one_at_a_time(p, 100))
}

fn plan_strategy(worker_faults: usize, disk_loss: bool) -> impl Strategy<Value = ClusterPlan> {
    let snapshot_every = prop_oneof![3 => 20u64..200, 1 => Just(20_000)];
    (
        crashes(disk_loss),
        partitions(),
        prop::collection::vec(any::<bool>(), worker_faults),
        snapshot_every,
    )
        .prop_map(|(crashes, partitions, whole_cluster, snapshot_every)| {
            let mut faults = [crashes, partitions].concat();
            faults.sort_by_key(|f| (f.at_ms, f.kind.name()));
            ClusterPlan {
                faults,
                whole_cluster,
                snapshot_every,
            }
        })
}

/// The cluster plan of `seed`, for a scenario with `worker_faults` faults
/// of its workers; disk losses only if `disk_loss` (else those crashes
/// keep their disk). The same arguments always give the same plan.
pub fn plan(seed: u64, worker_faults: usize, disk_loss: bool) -> ClusterPlan {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    // Another stream than the scenario's own (which has zeros here).
    bytes[8] = 0xC1;
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    match plan_strategy(worker_faults, disk_loss).new_tree(&mut runner) {
        Ok(tree) => tree.current(),
        // These strategies have no filters, so drawing cannot be rejected.
        Err(reason) => unreachable!("drawing a cluster plan failed: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_one_node_is_down_at_a_time_and_partitions_do_not_overlap() {
        for seed in 0..300 {
            let plan = plan(seed, 4, true);
            assert_eq!(plan.whole_cluster.len(), 4);
            for down in [true, false] {
                let faults: Vec<_> = plan
                    .faults
                    .iter()
                    .filter(|f| f.kind.is_down() == down)
                    .collect();
                for pair in faults.windows(2) {
                    assert!(pair[0].end_ms() <= pair[1].at_ms, "seed {seed}: {pair:?}");
                }
            }
            let lost = plan
                .faults
                .iter()
                .filter(|f| f.kind == NodeFaultKind::DiskLoss);
            assert!(lost.count() <= 1, "seed {seed}: one disk lost at most");
        }
        assert_eq!(plan(7, 2, true), plan(7, 2, true));
    }

    #[test]
    fn without_disk_loss_no_disk_is_lost() {
        let lost = |disk_loss| {
            (0..300)
                .flat_map(|seed| plan(seed, 0, disk_loss).faults)
                .filter(|f| f.kind == NodeFaultKind::DiskLoss)
                .count()
        };
        assert_eq!(lost(false), 0);
        assert!(lost(true) > 10);
    }
}
