//! The nodes' fault driver: applies a cluster plan's node faults as the
//! simulation steps (crashes of the leader or of a follower, some in the
//! middle of a sync, some losing the disk; partitions between nodes, both
//! ways and one way), and ends them all at the heal. The workers' faults
//! stay with [`crate::driver::Driver`], which steps this one.

use std::collections::BTreeMap;

use super::operator::READMIT_AFTER_MS;
use super::plan::{ClusterPlan, NODES, NodeFault, NodeFaultKind, Target};
use super::{ClusterControl, node_name};
use crate::driver::power_cut;
use crate::history::{self, Actor, History, What};
use crate::scenario::MID_SYNC_WAIT_MAX_MS;
use crate::world::worker_name;

/// A partition in force.
struct Partition {
    /// When it ends.
    until_ms: u64,
    /// The links it cuts, each one way.
    links: Vec<(String, String)>,
}

/// Applies the node faults of a cluster plan.
pub(crate) struct NodeDriver<'a> {
    control: &'a ClusterControl,
    history: &'a History,
    /// Every host a node talks to besides the other nodes.
    clients: Vec<String>,
    next: usize,
    partitions: Vec<Partition>,
    /// The node that is down, until when, and whether it lost its disk.
    down: Option<(u64, u64, bool)>,
    /// A crash waiting for the middle of a sync on its node, with when it
    /// stops waiting.
    armed: Option<(u64, NodeFault, u64)>,
    /// Faults injected, by kind.
    pub(crate) faults: BTreeMap<&'static str, usize>,
}

impl<'a> NodeDriver<'a> {
    /// A driver of `control`'s plan, for a run with `workers` workers,
    /// recording in `history`.
    pub(crate) fn new(control: &'a ClusterControl, workers: usize, history: &'a History) -> Self {
        let mut clients: Vec<String> = (0..workers).map(worker_name).collect();
        clients.extend(["auditor".to_owned(), super::OPERATOR.to_owned()]);
        NodeDriver {
            control,
            history,
            clients,
            next: 0,
            partitions: Vec::new(),
            down: None,
            armed: None,
            faults: BTreeMap::new(),
        }
    }

    fn record(&self, sim: &turmoil::Sim<'_>, what: What) {
        self.history
            .record_at(history::micros(sim.elapsed()), Actor::Driver, what);
    }

    /// The plan it applies.
    pub(crate) fn plan(&self) -> &ClusterPlan {
        &self.control.plan
    }

    /// Whether a partition in force cuts what `from` sends to `to`.
    pub(crate) fn cuts(&self, from: &str, to: &str) -> bool {
        self.partitions
            .iter()
            .any(|p| p.links.iter().any(|(a, b)| a == from && b == to))
    }

    /// Ends the faults due to end and starts the ones due to start, at
    /// `now_ms`; `worker_cut` says which links the workers' faults hold.
    pub(crate) fn step(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        now_ms: u64,
        worker_cut: &dyn Fn(&str, &str) -> bool,
    ) {
        self.end_partitions(sim, now_ms);
        if let Some((until, node, disk_lost)) = self.down
            && until <= now_ms
        {
            self.restart(sim, now_ms, node, disk_lost);
        }
        while let Some(&fault) = self
            .control
            .plan
            .faults
            .get(self.next)
            .filter(|f| f.at_ms <= now_ms)
        {
            self.next += 1;
            self.start(sim, now_ms, fault, worker_cut);
        }
        let control = self.control;
        let due = |&(until, _, node): &(u64, NodeFault, u64)| {
            now_ms >= until || control.node(node).disk.unsynced()
        };
        if let Some((_, fault, node)) = self.armed.take_if(|armed| due(armed)) {
            self.crash(sim, now_ms, fault, node, worker_cut);
        }
    }

    fn start(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        now_ms: u64,
        fault: NodeFault,
        worker_cut: &dyn Fn(&str, &str) -> bool,
    ) {
        let node = self.resolve(fault.target);
        match fault.kind {
            NodeFaultKind::Crash { mid_sync: true } => {
                self.armed = Some((now_ms + MID_SYNC_WAIT_MAX_MS, fault, node));
            }
            NodeFaultKind::Crash { mid_sync: false } | NodeFaultKind::DiskLoss => {
                self.crash(sim, now_ms, fault, node, worker_cut);
            }
            NodeFaultKind::Isolate { .. } | NodeFaultKind::CutLink { .. } => {
                self.partition(sim, now_ms, fault, node);
            }
        }
    }

    /// The node `target` names now: the leader (or node 1, if nobody is
    /// known to lead), or one of the nodes up that do not lead.
    fn resolve(&self, target: Target) -> u64 {
        let up = |node: &u64| self.down.is_none_or(|(_, down, _)| down != *node);
        let leader = self.control.leaders.current().filter(up);
        match target {
            Target::Leader => leader.unwrap_or(1),
            Target::Follower { pick } => {
                let followers: Vec<u64> = (1..=NODES)
                    .filter(up)
                    .filter(|n| Some(*n) != leader)
                    .collect();
                followers
                    .get(pick % followers.len().max(1))
                    .copied()
                    .unwrap_or(1)
            }
        }
    }

    /// Cuts the links `fault` names around `node`.
    fn partition(&mut self, sim: &mut turmoil::Sim<'_>, now_ms: u64, fault: NodeFault, node: u64) {
        let me = node_name(node);
        let others: Vec<String> = (1..=NODES).filter(|&n| n != node).map(node_name).collect();
        let (peers, oneway) = match fault.kind {
            NodeFaultKind::Isolate { oneway } => (others, oneway),
            NodeFaultKind::CutLink { other, oneway } => {
                (vec![others[other % others.len()].clone()], oneway)
            }
            _ => return,
        };
        let mut links = Vec::new();
        for peer in peers {
            if oneway != Some(false) {
                links.push((me.clone(), peer.clone()));
            }
            if oneway != Some(true) {
                links.push((peer, me.clone()));
            }
        }
        for (from, to) in &links {
            sim.partition_oneway(from.as_str(), to.as_str());
        }
        self.count(fault.kind);
        self.record(
            sim,
            What::Fault {
                kind: fault.kind.name(),
                detail: format!("{me}: {fault:?}, cut {links:?}"),
            },
        );
        self.partitions.push(Partition {
            until_ms: now_ms + fault.duration_ms,
            links,
        });
    }

    fn end_partitions(&mut self, sim: &mut turmoil::Sim<'_>, now_ms: u64) {
        let (ending, staying): (Vec<_>, Vec<_>) = std::mem::take(&mut self.partitions)
            .into_iter()
            .partition(|p| p.until_ms <= now_ms);
        self.partitions = staying;
        for partition in ending {
            repair(sim, &partition);
        }
    }

    /// Crashes `node` now, as a power cut, until `fault`'s length has
    /// passed; with a lost disk, its next start finds no data directory.
    fn crash(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        now_ms: u64,
        fault: NodeFault,
        node: u64,
        worker_cut: &dyn Fn(&str, &str) -> bool,
    ) {
        if self.down.is_some() {
            // A minority at most: the plan keeps crashes apart, so this
            // only guards against a crash that waited for a sync.
            return;
        }
        let host = node_name(node);
        let mut peers = self.clients.clone();
        peers.extend((1..=NODES).filter(|&n| n != node).map(node_name));
        let cut = |from: &str, to: &str| worker_cut(from, to) || self.cuts(from, to);
        power_cut(sim, &host, &peers, cut);
        let control = self.control.node(node);
        let mid_sync = control.disk.unsynced();
        control.disk.crashed();
        let disk_lost = fault.kind == NodeFaultKind::DiskLoss;
        if disk_lost {
            control
                .wipe
                .store(true, std::sync::atomic::Ordering::Release);
        }
        self.control.leaders.crashed(node);
        self.record(
            sim,
            What::NodeCrashed {
                node,
                mid_sync,
                disk_lost,
            },
        );
        self.count(fault.kind);
        self.down = Some((now_ms + fault.duration_ms, node, disk_lost));
    }

    /// Restarts `node`; if it lost its disk, its peers refuse it until the
    /// operator readmits it, which it is asked to do a while later.
    fn restart(&mut self, sim: &mut turmoil::Sim<'_>, now_ms: u64, node: u64, disk_lost: bool) {
        sim.bounce(node_name(node).as_str());
        self.down = None;
        self.record(sim, What::NodeRestarted { node });
        if disk_lost {
            let at_us = (now_ms + READMIT_AFTER_MS) * 1000;
            self.control.readmissions.ask(node, at_us);
        }
    }

    fn count(&mut self, kind: NodeFaultKind) {
        *self.faults.entry(kind.name()).or_insert(0) += 1;
    }

    /// Ends every node fault: partitions repaired, a node down restarted,
    /// a crash still waiting for a sync forgotten.
    pub(crate) fn heal(&mut self, sim: &mut turmoil::Sim<'_>) {
        self.armed = None;
        for partition in std::mem::take(&mut self.partitions) {
            repair(sim, &partition);
        }
        if let Some((_, node, disk_lost)) = self.down {
            let now_ms = history::micros(sim.elapsed()) / 1000;
            self.restart(sim, now_ms, node, disk_lost);
        }
        self.next = self.control.plan.faults.len();
    }
}

fn repair(sim: &mut turmoil::Sim<'_>, partition: &Partition) {
    for (from, to) in &partition.links {
        sim.repair_oneway(from.as_str(), to.as_str());
    }
}
