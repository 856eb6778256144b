//! The fault driver: applies a scenario's schedule as the simulation
//! steps (the workers' link faults and crashes, the server's crashes and
//! full disk, or in a cluster the nodes' faults through
//! [`NodeDriver`]), then heals everything at the heal time.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::cluster::driver::NodeDriver;
use crate::cluster::node_names;
use crate::history::{self, Actor, History, What};
use crate::proxy::Bug;
use crate::scenario::{
    FaultKind, MID_SYNC_WAIT_MAX_MS, Scenario, ScheduledFault, ServerFault, ServerFaultKind,
    Transport,
};
use crate::world::{Options, ServerControl, Servers, worker_name};

/// Applies the fault schedule as the simulation steps, then heals.
pub(crate) struct Driver<'a> {
    scenario: &'a Scenario,
    history: &'a History,
    options: Options,
    /// The single server, or `None` in a cluster.
    server: Option<&'a ServerControl>,
    /// The cluster's nodes' faults, in a cluster.
    nodes: Option<NodeDriver<'a>>,
    next: usize,
    /// Faults in force, with when they end and whether they cut the
    /// worker off from every node of a cluster (not only its first).
    active: Vec<(u64, ScheduledFault, bool)>,
    /// Per worker, until when a link fault holds its links.
    links_busy_until: Vec<u64>,
    crashed: Vec<bool>,
    /// The next of the server's faults to start.
    next_server: usize,
    /// The server's faults in force, with when they end.
    server_active: Vec<(u64, ServerFault)>,
    /// A crash waiting for the middle of a sync, with when it stops
    /// waiting.
    crash_armed: Option<(u64, ServerFault)>,
    healed: bool,
    /// Faults injected, by kind.
    faults: BTreeMap<&'static str, usize>,
}

impl<'a> Driver<'a> {
    /// A driver of `scenario`'s faults, recording them in `history`, with
    /// `options`' planted bug, on the single server or the cluster.
    pub(crate) fn new(
        scenario: &'a Scenario,
        history: &'a History,
        options: Options,
        servers: &'a Servers,
    ) -> Self {
        let workers = scenario.workers.len();
        let (server, nodes) = match servers {
            Servers::Single(server) => (Some(&**server), None),
            Servers::Cluster(cluster) => (None, Some(NodeDriver::new(cluster, workers, history))),
        };
        Driver {
            scenario,
            history,
            options,
            server,
            nodes,
            next: 0,
            active: Vec::new(),
            links_busy_until: vec![0; workers],
            crashed: vec![false; workers],
            next_server: 0,
            server_active: Vec::new(),
            crash_armed: None,
            healed: false,
            faults: BTreeMap::new(),
        }
    }

    fn record(&self, sim: &turmoil::Sim<'_>, what: What) {
        self.history
            .record_at(history::micros(sim.elapsed()), Actor::Driver, what);
    }

    /// The host a worker's server traffic goes to first: the server, the
    /// proxy, or in a cluster its first node.
    fn server_of(&self, worker: usize) -> String {
        if self.nodes.is_some() {
            let nodes = node_names();
            return nodes[worker % nodes.len()].clone();
        }
        let proxied = self.options.bug.is_some_and(Bug::needs_proxy);
        match (proxied, self.scenario.workers[worker].transport) {
            (true, Transport::Ws) => "proxy".to_owned(),
            _ => "server".to_owned(),
        }
    }

    /// Every host `worker` may send server traffic to, as a fault sees it:
    /// its first server, or every node of a cluster if `whole`.
    fn servers_of(&self, worker: usize, whole: bool) -> Vec<String> {
        match self.nodes {
            Some(_) if whole => node_names(),
            _ => vec![self.server_of(worker)],
        }
    }

    /// Whether the worker fault started as the `index`-th of the schedule
    /// cuts its worker off from every node of a cluster.
    fn whole_cluster(&self, index: usize) -> bool {
        let plan = self.nodes.as_ref().map(NodeDriver::plan);
        plan.and_then(|p| p.whole_cluster.get(index).copied())
            .unwrap_or(false)
    }

    /// Steps `sim` to its end, applying the schedule; why a host failed,
    /// if one did.
    pub(crate) fn drive(&mut self, sim: &mut turmoil::Sim<'_>) -> Result<(), String> {
        loop {
            let now_ms = u64::try_from(sim.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.end_faults(sim, now_ms);
            self.start_faults(sim, now_ms);
            self.end_server_faults(sim, now_ms);
            self.start_server_faults(sim, now_ms);
            self.step_nodes(sim, now_ms);
            if !self.healed && now_ms >= self.scenario.heal_at_ms() {
                self.heal(sim);
            }
            match sim.step() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(error) => return Err(error.to_string()),
            }
        }
    }

    fn start_faults(&mut self, sim: &mut turmoil::Sim<'_>, now_ms: u64) {
        while let Some(fault) = self
            .scenario
            .faults
            .get(self.next)
            .filter(|f| f.at_ms <= now_ms)
        {
            let whole = self.whole_cluster(self.next);
            self.next += 1;
            let fault = fault.clone();
            let worker = fault.worker;
            let end = fault.at_ms + fault.duration_ms;
            // One fault at a time on a worker's links, so that ending one
            // never undoes another; a crashed worker cannot crash again.
            if fault.kind.is_link_fault() && self.links_busy_until[worker] > now_ms {
                continue;
            }
            if fault.kind == FaultKind::Crash && self.crashed[worker] {
                continue;
            }
            self.apply(sim, &fault, whole);
            if fault.kind.is_link_fault() {
                self.links_busy_until[worker] = end;
            }
            *self.faults.entry(fault.kind.name()).or_insert(0) += 1;
            self.record(
                sim,
                What::Fault {
                    kind: fault.kind.name(),
                    detail: format!("{fault:?}"),
                },
            );
            self.active.push((end, fault, whole));
        }
    }

    fn end_faults(&mut self, sim: &mut turmoil::Sim<'_>, now_ms: u64) {
        let (ending, staying): (Vec<_>, Vec<_>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|(end, _, _)| *end <= now_ms);
        self.active = staying;
        for (_, fault, whole) in ending {
            self.revert(sim, &fault, whole);
        }
    }

    /// Whether an active fault already drops (or holds) what `from` sends
    /// to `to`.
    fn cut(&self, from: &str, to: &str) -> bool {
        let by_nodes = self.nodes.as_ref().is_some_and(|n| n.cuts(from, to));
        by_nodes || self.cut_by_workers(from, to)
    }

    /// Whether an active fault of a worker drops (or holds) what `from`
    /// sends to `to`.
    fn cut_by_workers(&self, from: &str, to: &str) -> bool {
        self.active.iter().any(|(_, fault, whole)| {
            let worker = worker_name(fault.worker);
            let on_link = self
                .links(fault.worker, *whole)
                .iter()
                .any(|(a, b)| (a == from && *b == to) || (a == to && *b == from));
            let from_worker = worker == from;
            on_link
                && match fault.kind {
                    FaultKind::Partition { oneway: None }
                    | FaultKind::DropConnections
                    | FaultKind::Pause => true,
                    FaultKind::Partition {
                        oneway: Some(outbound),
                    } => outbound == from_worker,
                    FaultKind::LatencySpike { .. } | FaultKind::Loss { .. } | FaultKind::Crash => {
                        false
                    }
                }
        })
    }

    /// Every host the server may be talking to.
    fn server_peers(&self) -> Vec<String> {
        let mut peers: Vec<String> = (0..self.scenario.workers.len()).map(worker_name).collect();
        peers.push("auditor".to_owned());
        if self.options.bug.is_some_and(Bug::needs_proxy) {
            peers.push("proxy".to_owned());
        }
        peers
    }

    /// The links a fault of `worker` acts on: to its server (or servers,
    /// see [`Driver::servers_of`]) and to the resource.
    fn links(&self, worker: usize, whole: bool) -> Vec<(String, String)> {
        let mut links: Vec<(String, String)> = self
            .servers_of(worker, whole)
            .into_iter()
            .map(|server| (worker_name(worker), server))
            .collect();
        links.push((worker_name(worker), "resource".to_owned()));
        links
    }

    fn apply(&mut self, sim: &mut turmoil::Sim<'_>, fault: &ScheduledFault, whole: bool) {
        let worker = fault.worker;
        let links = self.links(worker, whole);
        match fault.kind {
            FaultKind::Partition { oneway: None } | FaultKind::DropConnections => {
                for (a, b) in links {
                    sim.partition(a.as_str(), b.as_str());
                }
            }
            FaultKind::Partition {
                oneway: Some(outbound),
            } => {
                for (a, b) in links {
                    if outbound {
                        sim.partition_oneway(a.as_str(), b.as_str())
                    } else {
                        sim.partition_oneway(b.as_str(), a.as_str())
                    }
                }
            }
            FaultKind::Pause => {
                for (a, b) in links {
                    sim.hold(a.as_str(), b.as_str());
                }
            }
            FaultKind::LatencySpike { max_ms } => {
                for (a, b) in links {
                    let max = Duration::from_millis(max_ms);
                    sim.set_link_max_message_latency(a.as_str(), b.as_str(), max);
                }
            }
            FaultKind::Loss { rate } => {
                for server in self.servers_of(worker, whole) {
                    sim.set_link_fail_rate(worker_name(worker).as_str(), server.as_str(), rate)
                }
            }
            FaultKind::Crash => {
                // Every host it may be talking to.
                let peers: Vec<String> = self
                    .links(worker, true)
                    .into_iter()
                    .map(|(_, peer)| peer)
                    .collect();
                power_cut(sim, &worker_name(worker), &peers, |a, b| self.cut(a, b));
                self.crashed[worker] = true;
                self.record(sim, What::Crashed { worker });
            }
        }
    }

    fn revert(&mut self, sim: &mut turmoil::Sim<'_>, fault: &ScheduledFault, whole: bool) {
        let worker = fault.worker;
        let links = self.links(worker, whole);
        match fault.kind {
            FaultKind::Partition { .. } | FaultKind::DropConnections | FaultKind::Pause => {
                for (a, b) in links {
                    sim.release(a.as_str(), b.as_str());
                    sim.repair(a.as_str(), b.as_str());
                }
            }
            FaultKind::LatencySpike { .. } => {
                let healthy = Duration::from_millis(self.scenario.latency_ms);
                for (a, b) in links {
                    sim.set_link_max_message_latency(a.as_str(), b.as_str(), healthy);
                }
            }
            FaultKind::Loss { .. } => {
                for server in self.servers_of(worker, whole) {
                    let (a, b) = (worker_name(worker), server);
                    sim.set_link_fail_rate(a.as_str(), b.as_str(), 0.0);
                    sim.repair(a.as_str(), b.as_str());
                }
            }
            FaultKind::Crash => {
                if self.crashed[worker] {
                    sim.bounce(worker_name(worker).as_str());
                    self.crashed[worker] = false;
                }
            }
        }
    }

    /// Steps the cluster's node faults, if this is a cluster.
    fn step_nodes(&mut self, sim: &mut turmoil::Sim<'_>, now_ms: u64) {
        let Some(mut nodes) = self.nodes.take() else {
            return;
        };
        nodes.step(sim, now_ms, &|a, b| self.cut_by_workers(a, b));
        self.nodes = Some(nodes);
    }

    fn start_server_faults(&mut self, sim: &mut turmoil::Sim<'_>, now_ms: u64) {
        let Some(server) = self.server else {
            return;
        };
        while let Some(&fault) = self
            .scenario
            .server_faults
            .get(self.next_server)
            .filter(|f| f.at_ms <= now_ms)
        {
            self.next_server += 1;
            match fault.kind {
                ServerFaultKind::Crash { mid_sync: true } => {
                    self.crash_armed = Some((now_ms + MID_SYNC_WAIT_MAX_MS, fault));
                }
                ServerFaultKind::Crash { mid_sync: false } => {
                    self.crash_server(sim, server, now_ms, fault)
                }
                ServerFaultKind::Shutdown => {
                    server.shut_down();
                    self.record(sim, What::ServerShutDown);
                    self.server_active
                        .push((fault.at_ms + fault.duration_ms, fault));
                    *self.faults.entry(fault.kind.name()).or_insert(0) += 1;
                }
                ServerFaultKind::DiskFull => {
                    server.disk.fill(true);
                    self.record(sim, What::DiskFull { full: true });
                    self.server_active
                        .push((fault.at_ms + fault.duration_ms, fault));
                    *self.faults.entry(fault.kind.name()).or_insert(0) += 1;
                }
            }
        }
        let due = |&(until, _): &(u64, ServerFault)| server.disk.unsynced() || now_ms >= until;
        if let Some((_, fault)) = self.crash_armed.take_if(|armed| due(armed)) {
            self.crash_server(sim, server, now_ms, fault);
        }
    }

    /// Crashes the server now, until `fault`'s length has passed.
    fn crash_server(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        server: &ServerControl,
        now_ms: u64,
        fault: ServerFault,
    ) {
        let mid_sync = server.disk.unsynced();
        power_cut(sim, "server", &self.server_peers(), |a, b| self.cut(a, b));
        server.disk.crashed();
        self.record(sim, What::ServerCrashed { mid_sync });
        self.server_active.push((now_ms + fault.duration_ms, fault));
        *self.faults.entry(fault.kind.name()).or_insert(0) += 1;
    }

    fn end_server_faults(&mut self, sim: &mut turmoil::Sim<'_>, now_ms: u64) {
        let (ending, staying): (Vec<_>, Vec<_>) = std::mem::take(&mut self.server_active)
            .into_iter()
            .partition(|(end, _)| *end <= now_ms);
        self.server_active = staying;
        for (_, fault) in ending {
            self.revert_server(sim, fault);
        }
    }

    fn revert_server(&mut self, sim: &mut turmoil::Sim<'_>, fault: ServerFault) {
        match fault.kind {
            ServerFaultKind::Crash { .. } => {
                sim.bounce("server");
                self.record(sim, What::ServerRestarted);
            }
            ServerFaultKind::Shutdown => {
                if let Some(server) = self.server {
                    server.start_again();
                }
                self.record(sim, What::ServerRestarted);
            }
            ServerFaultKind::DiskFull => {
                if let Some(server) = self.server {
                    server.disk.fill(false);
                }
                self.record(sim, What::DiskFull { full: false });
            }
        }
    }

    /// Ends every fault still in force and restarts every crashed worker
    /// (and node).
    fn heal(&mut self, sim: &mut turmoil::Sim<'_>) {
        for (_, fault) in std::mem::take(&mut self.server_active) {
            self.revert_server(sim, fault);
        }
        if let Some(nodes) = self.nodes.as_mut() {
            nodes.heal(sim);
        }
        for (_, fault, whole) in std::mem::take(&mut self.active) {
            self.revert(sim, &fault, whole);
        }
        for worker in 0..self.scenario.workers.len() {
            for (a, b) in self.links(worker, true) {
                sim.release(a.as_str(), b.as_str());
                sim.repair(a.as_str(), b.as_str());
            }
            if self.crashed[worker] {
                sim.bounce(worker_name(worker).as_str());
                self.crashed[worker] = false;
            }
        }
        self.healed = true;
        self.record(sim, What::Healed);
    }

    /// Faults injected, by kind: the workers' and the server's, and the
    /// nodes'.
    pub(crate) fn take_faults(&mut self) -> BTreeMap<&'static str, usize> {
        let mut faults = std::mem::take(&mut self.faults);
        if let Some(nodes) = self.nodes.as_mut() {
            faults.extend(std::mem::take(&mut nodes.faults));
        }
        faults
    }
}

/// Crashes `host` as a power cut does: nothing it was sending when it
/// died leaves it (no FIN, no reset), so its peers notice by silence.
///
/// This also keeps the run repeatable. Dropping a host's tasks closes
/// their sockets in an order that depends on the process's tokio task
/// ids (the scheduler's task list is sharded by id), and every goodbye
/// sent on a healthy link draws a latency from the simulation's random
/// numbers: a seed would then run differently after other seeds in the
/// same process. So the links from `host` to `peers` that an active
/// fault does not already cut (`cut`) are cut one way for the crash, and
/// mended right after it.
pub(crate) fn power_cut(
    sim: &mut turmoil::Sim<'_>,
    host: &str,
    peers: &[String],
    cut: impl Fn(&str, &str) -> bool,
) {
    let healthy: Vec<&String> = peers.iter().filter(|p| !cut(host, p)).collect();
    for peer in &healthy {
        sim.partition_oneway(host, peer.as_str());
    }
    sim.crash(host);
    for peer in &healthy {
        sim.repair_oneway(host, peer.as_str());
    }
}
