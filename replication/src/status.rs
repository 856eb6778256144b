//! `deadbolt cluster status`: the leader, the term, the commit index, and
//! each node's lag, as a node sees them.

use std::collections::BTreeMap;

use openraft::{RaftMetrics, ServerState};
use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// A node's view of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node.
    pub node: NodeId,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub state: String,
    /// The current term.
    pub term: u64,
    /// The leader, if this node knows one.
    pub leader: Option<NodeId>,
    /// The last entry in this node's log.
    pub last_log_index: Option<u64>,
    /// The last entry this node applied (everything up to it is
    /// committed).
    pub applied_index: Option<u64>,
    /// The last entry in this node's snapshot.
    pub snapshot_index: Option<u64>,
    /// Members and their peer addresses.
    pub members: BTreeMap<NodeId, String>,
    /// On the leader: for each member, how many entries of the leader's
    /// log it does not have yet (`null` if it is unknown: unreachable).
    pub lag: Option<BTreeMap<NodeId, Option<u64>>>,
    /// On the leader: milliseconds since a quorum last acknowledged it.
    pub millis_since_quorum_ack: Option<u64>,
}

impl ClusterStatus {
    /// The status in `metrics`.
    pub fn of(metrics: &RaftMetrics<NodeId, openraft::BasicNode>) -> ClusterStatus {
        let last = metrics.last_log_index;
        let lag = metrics.replication.as_ref().map(|replication| {
            replication
                .iter()
                .map(|(node, matched)| {
                    let behind = matched.map_or(last, |m| last.map(|l| l.saturating_sub(m.index)));
                    (*node, behind)
                })
                .collect()
        });
        ClusterStatus {
            node: metrics.id,
            state: state_name(metrics.state).to_owned(),
            term: metrics.current_term,
            leader: metrics.current_leader,
            last_log_index: last,
            applied_index: metrics.last_applied.map(|l| l.index),
            snapshot_index: metrics.snapshot.map(|l| l.index),
            members: metrics
                .membership_config
                .nodes()
                .map(|(id, node)| (*id, node.addr.clone()))
                .collect(),
            lag,
            millis_since_quorum_ack: metrics.millis_since_quorum_ack,
        }
    }
}

fn state_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}
