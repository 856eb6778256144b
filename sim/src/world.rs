//! One run: the world of hosts (the server, durable on its simulated
//! disk, or a cluster's three nodes, each on its own; the workers; the
//! resource; the auditor), driven through the scenario's faults by the
//! driver, and the report the checkers make of it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use deadbolt_core::client::{Client, ClientOptions, Connector, FailoverConnector};
use deadbolt_core::shard::planted;
use deadbolt_server::{Listeners, ServerConfig};
use deadbolt_transport_quic::{Identity, QuicConfig};
use deadbolt_transport_ws::WsConnector;
use futures_util::TryStreamExt;
use tokio::sync::watch;

use crate::checker::{self, Violation};
use crate::cluster::{self, ClusterControl};
use crate::disk::{self, DiskControl, DiskStats};
use crate::driver::Driver;
use crate::history::{self, Actor, Event, History, What};
use crate::lease;
use crate::net::{
    SimDialer, SimListener, engine_config, quic_config, quic_endpoint, quic_server_config,
    ws_config,
};
use crate::proxy::{self, Bug};
use crate::resource;
use crate::scenario::{self, LOCK_KEYS, SET, Scenario};
use crate::trace::Trace;
use crate::worker::{self, QUIC_PORT, Shared, WS_PORT};

/// How long after the heal the workers have to finish their plans.
pub const WORKLOAD_BOUND_MS: u64 = 40_000;
/// How long after the heal bound a run may last, in simulated time (the
/// audit and the graceful shutdown).
const WIND_DOWN_MS: u64 = 20_000;
/// How long a server that could not start on a full disk waits before it
/// tries again, as a supervisor restarting it would.
const START_RETRY_MS: u64 = 250;

/// How to run a seed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// A bug to plant: in a proxy between the WebSocket workers and the
    /// server, in the server's state machine or storage, or (in a
    /// cluster) in the replication.
    pub bug: Option<Bug>,
    /// Run three nodes of a cluster instead of the single server.
    pub cluster: bool,
    /// In a cluster, let the seed's schedule lose a node's disk (its peers
    /// refuse it until the operator readmits it). Off by default for now:
    /// readmitting a node whose leader had replicated to its lost disk
    /// makes openraft panic on the leader ("follower log reversion is not
    /// allowed"; seed 18 with `--disk-loss`), which aborts the process.
    pub disk_loss: bool,
    /// Print every event of the history as it happens.
    pub echo: bool,
}

impl Options {
    /// The single server, with `bug` planted.
    pub fn single(bug: Option<Bug>) -> Options {
        Options {
            bug,
            ..Options::default()
        }
    }

    /// A cluster, with `bug` planted. Its nodes keep their disks: a
    /// readmitted node may still make its leader panic (see
    /// [`Options::disk_loss`]).
    pub fn cluster(bug: Option<Bug>) -> Options {
        Options {
            bug,
            cluster: true,
            ..Options::default()
        }
    }
}

/// What a run came to.
#[derive(Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The scenario it ran.
    pub scenario: Scenario,
    /// Everything that happened.
    pub events: Vec<Event>,
    /// The rules it broke.
    pub violations: Vec<Violation>,
    /// The hash of its history: equal for equal runs.
    pub trace_hash: u64,
    /// Operations the workers invoked.
    pub operations: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    /// What the server's disk did.
    pub disk: DiskStats,
    /// Requests the server refused `unavailable` (its disk was full), as
    /// the workers heard them.
    pub refusals: usize,
    /// Log records a recovery found whole though they were never
    /// acknowledged (written as the power failed).
    pub unacknowledged_kept: usize,
}

/// The host name of worker `worker`.
pub(crate) fn worker_name(worker: usize) -> String {
    format!("worker{worker}")
}

thread_local! {
    /// The seed this thread is running, for the panic hook.
    static RUNNING: std::cell::Cell<Option<(u64, Options)>> = const { std::cell::Cell::new(None) };
}

/// Makes a panic while a seed runs say which seed it was and how to
/// replay it, before anything else: a panic inside a simulated host (an
/// assertion of openraft's, say) unwinds through turmoil's runtimes, which
/// then abort the whole process, and the seed's report is never made.
pub fn say_seed_on_panic() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Once: unwinding through the runtimes panics again.
            if let Some((seed, options)) = RUNNING.with(std::cell::Cell::take) {
                let replay = crate::summary::replay_command(seed, options);
                eprintln!("seed {seed} panicked\n  replay: {replay}");
            }
            previous(info);
        }));
    });
}

/// Forgets the running seed when its run ends.
struct Running;

impl Running {
    fn start(seed: u64, options: Options) -> Running {
        RUNNING.with(|running| running.set(Some((seed, options))));
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.with(|running| running.set(None));
    }
}

/// Runs `seed` and checks it.
pub fn run(seed: u64, options: Options) -> Report {
    let _running = Running::start(seed, options);
    let mut scenario = scenario::scenario(seed);
    if options.cluster {
        let plan = cluster::plan::plan(seed, scenario.faults.len(), options.disk_loss);
        scenario = scenario.into_cluster(plan);
    }
    let history = if options.echo {
        History::echoing()
    } else {
        History::default()
    };
    if let Some(error) = unfit(options) {
        return failed(seed, scenario, &history, error.to_owned());
    }
    // The whole run (every server's shards, and the replays that check
    // them) is on this thread, so the planted bugs are planted here.
    let Some(_planted) = planted::plant(options.bug.and_then(Bug::planted)) else {
        let error = "the state machine's planted bugs need `--features planted-bugs`".to_owned();
        return failed(seed, scenario, &history, error);
    };
    let Some(_planted_storage) =
        deadbolt_storage::planted::plant(options.bug.and_then(Bug::storage))
    else {
        let error = "the storage's planted bugs need `--features planted-bugs`".to_owned();
        return failed(seed, scenario, &history, error);
    };
    let Some(_planted_replica) =
        deadbolt_core::engine::planted::plant(options.bug.and_then(Bug::replica))
    else {
        let error = "the replication's planted bugs need `--features planted-bugs`".to_owned();
        return failed(seed, scenario, &history, error);
    };
    let Some(_planted_events) =
        deadbolt_core::engine::planted::plant_events(options.bug.and_then(Bug::events))
    else {
        let error = "the pushed events' planted bugs need `--features planted-bugs`".to_owned();
        return failed(seed, scenario, &history, error);
    };
    let Ok((_, cert, key)) = Identity::self_signed() else {
        return failed(seed, scenario, &history, "no certificate".to_owned());
    };
    let servers = Servers::new(seed, &scenario, &history);
    // A cluster's nodes say when they lead on this thread's log.
    let _listening = servers.cluster().map(|c| c.leaders.listen(&history));
    let shared = Shared {
        history: history.clone(),
        scenario: Arc::new(scenario.clone()),
        progress: Arc::new(Mutex::new(vec![0; scenario.workers.len()])),
        ca_pem: Arc::new(cert.clone().into_bytes()),
        servers: Arc::new(servers.hosts()),
        proxied: options.bug.is_some_and(Bug::needs_proxy),
        tap: options.cluster,
    };
    let mut sim = builder(seed, &scenario).build();
    add_hosts(&mut sim, &servers, &shared, options, (cert, key));
    let mut driver = Driver::new(&scenario, &history, options, &servers);
    let outcome = driver.drive(&mut sim);
    let faults = driver.take_faults();
    drop(driver);
    drop(sim);
    let mut report = judge(&shared, &servers, outcome);
    report.faults = faults;
    report
}

/// Why `options` cannot run, if they cannot: the proxy and the storage
/// plant their bugs in the single server, the replication in a cluster.
fn unfit(options: Options) -> Option<&'static str> {
    let bug = options.bug?;
    if options.cluster && (bug.needs_proxy() || bug.storage().is_some()) {
        return Some("the proxy's and the storage's planted bugs need the single server");
    }
    if !options.cluster && bug.replica().is_some() {
        return Some("the replication's planted bugs need a cluster (`--cluster`)");
    }
    None
}

/// Adds every host of the run to `sim`: the server (or the nodes), the
/// resource, the proxy if a bug needs it, the workers and the auditor.
fn add_hosts(
    sim: &mut turmoil::Sim<'_>,
    servers: &Servers,
    shared: &Shared,
    options: Options,
    identity_pem: (String, String),
) {
    let seed = shared.scenario.seed;
    match servers {
        Servers::Single(control) => add_server(sim, seed, identity_pem, control),
        Servers::Cluster(control) => cluster::add_nodes(sim, &identity_pem, control),
    }
    let resource_history = shared.history.clone();
    sim.host("resource", move || {
        resource::serve(resource_history.clone())
    });
    if let Some(bug) = options.bug.filter(|bug| bug.needs_proxy()) {
        let bug_history = shared.history.clone();
        sim.host("proxy", move || proxy::serve(bug, bug_history.clone()));
    }
    for worker in 0..shared.scenario.workers.len() {
        let shared = shared.clone();
        sim.host(worker_name(worker), move || {
            worker::run(shared.clone(), worker)
        });
    }
    sim.client("auditor", audit(shared.clone(), servers.clone()));
}

/// The report of a run that has ended (`outcome`: why a host failed, if
/// one did), with every rule checked: the history's, and the single
/// server's log's or the cluster's own.
fn judge(shared: &Shared, servers: &Servers, outcome: Result<(), String>) -> Report {
    let scenario = &shared.scenario;
    let events = shared.history.events();
    let finished: Vec<(usize, usize)> = {
        let progress = shared.progress.lock().unwrap_or_else(|p| p.into_inner());
        scenario
            .workers
            .iter()
            .zip(progress.iter())
            .map(|(plan, &done)| (done, plan.steps.len()))
            .collect()
    };
    let heal_us = scenario.heal_at_ms() * 1000;
    let mut violations = checker::check(&events, heal_us, &finished);
    violations.extend(crate::events_checker::check(
        &events,
        &scenario.raw_workers(),
    ));
    if let Err(error) = outcome {
        violations.push(Violation::HostFailed { error });
    }
    let (disk, unacknowledged_kept) = match servers {
        Servers::Single(control) => {
            violations.extend(control.trace.check(&control.config.engine));
            violations.extend(control.trace.check_server(&control.config.engine));
            (control.disk.stats(), control.trace.unobserved())
        }
        Servers::Cluster(control) => {
            violations.extend(control.violations());
            violations.extend(lease::check(&events));
            (control.disk_stats(), 0)
        }
    };
    let scenario = Scenario::clone(scenario);
    let mut report = report(scenario.seed, scenario, events, violations, BTreeMap::new());
    report.disk = disk;
    report.unacknowledged_kept = unacknowledged_kept;
    report
}

/// The servers of a run: the single server, or a cluster's nodes.
#[derive(Clone)]
pub(crate) enum Servers {
    /// One server, durable on its disk (boxed: its configuration is large).
    Single(Box<ServerControl>),
    /// Three nodes of a cluster.
    Cluster(ClusterControl),
}

impl Servers {
    /// The servers of `scenario`: a cluster if it has a cluster plan.
    fn new(seed: u64, scenario: &Scenario, history: &History) -> Servers {
        match &scenario.cluster {
            Some(plan) => {
                Servers::Cluster(ClusterControl::new(seed, scenario, plan.clone(), history))
            }
            None => Servers::Single(Box::new(ServerControl::new(seed, scenario, history))),
        }
    }

    /// The cluster, if this is one.
    fn cluster(&self) -> Option<&ClusterControl> {
        match self {
            Servers::Cluster(cluster) => Some(cluster),
            Servers::Single(_) => None,
        }
    }

    /// The hosts clients connect to.
    fn hosts(&self) -> Vec<String> {
        match self {
            Servers::Single(_) => vec!["server".to_owned()],
            Servers::Cluster(_) => cluster::node_names(),
        }
    }

    /// Shuts every server down gracefully and waits (a bounded while)
    /// until they have stopped.
    async fn stop(&self) {
        match self {
            Servers::Single(control) => stop_server(control).await,
            Servers::Cluster(control) => control.stop().await,
        }
    }
}

/// The world of `scenario`: its links, and its server's disk (torn writes
/// and capacity as drawn).
fn builder(seed: u64, scenario: &Scenario) -> turmoil::Builder {
    let simulation_ms = scenario.heal_at_ms() + WORKLOAD_BOUND_MS + WIND_DOWN_MS;
    let mut builder = turmoil::Builder::new();
    builder
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        .simulation_duration(Duration::from_millis(simulation_ms))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(scenario.latency_ms))
        .udp_capacity(4096)
        .tcp_capacity(1024);
    if let Some(block) = scenario.disk.block_bytes {
        builder.fs().block_size(block);
    }
    if let Some(capacity) = scenario.disk.capacity_bytes {
        builder.fs().capacity(capacity);
    }
    builder
}

fn failed(seed: u64, scenario: Scenario, history: &History, error: String) -> Report {
    report(
        seed,
        scenario,
        history.events(),
        vec![Violation::HostFailed { error }],
        BTreeMap::new(),
    )
}

fn report(
    seed: u64,
    scenario: Scenario,
    events: Vec<Event>,
    violations: Vec<Violation>,
    faults: BTreeMap<&'static str, usize>,
) -> Report {
    let refusals = events.iter().filter(|e| refused(&e.what)).count();
    let operations = events
        .iter()
        .filter(|e| {
            matches!(
                e.what,
                What::LockAsked { .. }
                    | What::ReadAsked { .. }
                    | What::WriteAsked { .. }
                    | What::InsertAsked { .. }
                    | What::Released { .. }
            )
        })
        .count();
    Report {
        seed,
        trace_hash: history::trace_hash(&events),
        scenario,
        events,
        violations,
        operations,
        faults,
        disk: DiskStats::default(),
        refusals,
        unacknowledged_kept: 0,
    }
}

/// Whether `what` is a request the server refused `unavailable`.
fn refused(what: &What) -> bool {
    let error = match what {
        What::LockFailed { error, .. }
        | What::ExtendFailed { error, .. }
        | What::InsertFailed { error, .. } => error,
        _ => return false,
    };
    error.contains("unavailable")
}

/// The simulated server's configuration and the handles a run keeps on
/// it: the trace its log feeds, its disk, the history its starts go to,
/// and the switch that shuts it down.
#[derive(Clone)]
pub(crate) struct ServerControl {
    config: ServerConfig,
    trace: Arc<Trace>,
    /// The server's disk, which the driver fills.
    pub(crate) disk: Arc<DiskControl>,
    history: History,
    stop: Arc<watch::Sender<bool>>,
    stopped: Arc<AtomicBool>,
}

impl ServerControl {
    /// The scenario's shard count seeded by the run; invariants checked
    /// after every batch; a data directory on the simulated disk as the
    /// scenario draws it, whose every kept record goes to the trace; and
    /// short idle limits, so that a silent peer is noticed within the run.
    fn new(seed: u64, scenario: &Scenario, history: &History) -> ServerControl {
        let latency = Duration::from_millis(scenario.disk.sync_latency_ms);
        let trace = Arc::new(Trace::with_sync_latency(latency));
        let latency = (!latency.is_zero()).then_some(latency);
        let disk = DiskControl::new(scenario.disk.capacity_bytes, latency, &trace);
        let storage = disk::storage(
            &disk,
            &trace,
            scenario.disk.segment_bytes,
            scenario.disk.snapshot_after_bytes,
        );
        let config = ServerConfig {
            engine: deadbolt_core::EngineConfig {
                limits: scenario
                    .room
                    .map_or_else(deadbolt_core::Limits::default, |room| {
                        room.limits(scenario.shards)
                    }),
                ..engine_config(scenario.shards, seed, &trace)
            },
            ws: ws_config(),
            quic: QuicConfig {
                retry_above: if scenario.quic_retry { 0 } else { usize::MAX },
                ..quic_config()
            },
            storage: Some(storage),
        };
        ServerControl {
            config,
            trace,
            disk,
            history: history.clone(),
            stop: Arc::new(watch::Sender::new(false)),
            stopped: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// The server host: `deadbolt_server::run`, as `deadbolt serve` runs it, on
/// simulated sockets and the simulated disk, until the run's end (or a
/// graceful shutdown of the schedule, after which it starts again when the
/// driver says) shuts it down gracefully.
///
/// The host's future is `run`'s: crashing the host drops it, which ends
/// the server as a killed process ends (no goodbye to anyone, unsynced
/// writes lost), and a bounce starts a fresh one on the same disk, which
/// recovers the data directory. A server that cannot start because its
/// disk is full tries again a while later, as a supervisor would restart
/// it; any other refusal to start ends the host with the error.
fn add_server(
    sim: &mut turmoil::Sim<'_>,
    seed: u64,
    (cert, key): (String, String),
    control: &ServerControl,
) {
    let control = control.clone();
    sim.host("server", move || {
        let (cert, key) = (cert.clone(), key.clone());
        let control = control.clone();
        async move {
            loop {
                while !serve(&control, seed, &cert, &key).await? {
                    tokio::time::sleep(Duration::from_millis(START_RETRY_MS)).await;
                }
                control.stopped.store(true, Ordering::Release);
                // A graceful shutdown of the schedule is followed by a
                // start on the same disk; the one at the run's end is not.
                let mut stop = control.stop.subscribe();
                let _ = stop.wait_for(|stop| !*stop).await;
                control.stopped.store(false, Ordering::Release);
            }
        }
    });
}

impl ServerControl {
    /// Shuts the server down gracefully, as a signal to `deadbolt serve`
    /// does (a fault of the schedule).
    pub(crate) fn shut_down(&self) {
        self.stop.send_replace(true);
    }

    /// Starts the server again after [`ServerControl::shut_down`]: at once
    /// if it has stopped, else as soon as its drain ends (which can take
    /// its whole shutdown grace, longer than the fault).
    pub(crate) fn start_again(&self) {
        self.stop.send_replace(false);
    }
}

/// Serves until the run's end shuts the server down (`true`), or until it
/// could not start because its disk is full (`false`).
async fn serve(control: &ServerControl, seed: u64, cert: &str, key: &str) -> turmoil::Result<bool> {
    let identity = Identity::from_pem(cert.as_bytes(), key.as_bytes())?;
    let quic = quic_endpoint(
        QUIC_PORT,
        seed,
        1,
        Some(quic_server_config(identity, seed)?),
    )
    .await?;
    let ws = turmoil::net::TcpListener::bind(("0.0.0.0", WS_PORT)).await?;
    let listeners = Listeners {
        ws: SimListener(ws),
        quic: Some(quic),
    };
    if let Some(storage) = &control.config.storage {
        control.trace.catch_up(&*storage.disk, &storage.store.dir);
    }
    let mut stop = control.stop.subscribe();
    let shutdown = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    match deadbolt_server::run(control.config.clone(), listeners, shutdown).await {
        Ok(()) => Ok(true),
        Err(deadbolt_server::Error::Storage(error)) => {
            let disk_full = disk::is_full(&error);
            control.history.record(
                Actor::Server,
                What::ServerStartFailed {
                    error: error.to_string(),
                    disk_full,
                },
            );
            if disk_full {
                Ok(false)
            } else {
                Err(error.into())
            }
        }
        Err(error) => Err(error.into()),
    }
}

/// The auditor: keeps a short-lived set alive, waits for the workers (up
/// to the bound), then exports the set (a page of the drawn size at a
/// time) and reads the resource, straight from the server (from any node
/// of a cluster).
async fn audit(shared: Shared, servers: Servers) -> turmoil::Result {
    let hosts = Arc::clone(&shared.servers);
    let renewer = (shared.scenario.set_ttl_ms < scenario::SET_TTL_LONG_MS)
        .then(|| tokio::spawn(renew_set(hosts, shared.scenario.set_ttl_ms)));
    let deadline = Duration::from_millis(shared.scenario.heal_at_ms() + WORKLOAD_BOUND_MS);
    // The workers may be done before the server's last crash or full disk.
    let server_faults_end = Duration::from_millis(shared.scenario.server_faults_end_ms());
    let elapsed = || turmoil::sim_elapsed().unwrap_or_default();
    let busy = || !shared.all_done() || elapsed() < server_faults_end;
    while busy() && elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let record = |what| shared.history.record(Actor::Auditor, what);
    match export_when_available(&shared.servers, shared.scenario.page_limit).await {
        Ok(members) => record(What::Members {
            set: SET.into(),
            members,
        }),
        // No set at all: nobody inserted anything.
        Err(e) if e.code() == Some(deadbolt_core::proto::ErrorCode::NoSuchSet) => {
            record(What::Members {
                set: SET.into(),
                members: Vec::new(),
            })
        }
        Err(e) => record(What::AuditFailed {
            error: e.to_string(),
        }),
    }
    if let Some(renewer) = renewer {
        renewer.abort();
    }
    for key in &LOCK_KEYS[..shared.scenario.lock_keys] {
        match resource::peek(key).await {
            Ok(value) => record(What::FinalValue {
                key: (*key).to_owned(),
                value,
            }),
            Err(error) => record(What::AuditFailed { error }),
        }
    }
    servers.stop().await;
    Ok(())
}

/// A client of the auditor's, straight to a server (failing over between
/// the nodes of a cluster, from the `first`-th of `hosts`), which it tries
/// for a while: a server restarted at the heal may still be starting
/// (waiting for its disk). Its id is `client_id`, not a random one: the
/// client's retry delays are drawn from its id, and the run must repeat
/// exactly.
async fn auditor_client(
    hosts: &[String],
    first: usize,
    client_id: &str,
) -> Result<Client, deadbolt_core::client::Error> {
    let mut connectors: Vec<Arc<dyn Connector>> = Vec::new();
    for at in 0..hosts.len() {
        let url = format!("ws://{}:{WS_PORT}/ws", hosts[(first + at) % hosts.len()]);
        connectors.push(Arc::new(WsConnector::with_dialer(&url, SimDialer)?));
    }
    let mut options = ClientOptions {
        client_id: Some(client_id.to_owned()),
        ..ClientOptions::default()
    };
    if hosts.len() > 1 {
        // A request a cluster cannot serve now is retried on the next
        // node, for a while; then the auditor asks again itself.
        options.retry_for = Duration::from_secs(5);
    }
    let mut attempts = 0;
    loop {
        let Some(connector) = FailoverConnector::new(connectors.clone()) else {
            unreachable!("there is a server");
        };
        match Client::connect(connector, options.clone()).await {
            Err(_) if attempts < AUDITOR_CONNECT_ATTEMPTS => attempts += 1,
            connected => return connected,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many times the auditor tries to connect, 100 ms apart.
const AUDITOR_CONNECT_ATTEMPTS: u32 = 50;

/// How many times the auditor asks for the export while the servers
/// answer `unavailable`, 200 ms apart: a cluster may be electing a leader
/// when the workers are done (the client gives up on `unavailable` at
/// once, for now).
const AUDITOR_EXPORT_ATTEMPTS: u32 = 50;

/// [`export`], asked again (of the next server) while the servers answer
/// `unavailable`.
async fn export_when_available(
    hosts: &[String],
    page_limit: Option<u32>,
) -> Result<Vec<(u64, String)>, deadbolt_core::client::Error> {
    let mut attempts = 1;
    loop {
        let first = (attempts - 1) as usize;
        match export(hosts, first, page_limit).await {
            Err(e) if unavailable(&e) && attempts < AUDITOR_EXPORT_ATTEMPTS => attempts += 1,
            exported => return exported,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn unavailable(error: &deadbolt_core::client::Error) -> bool {
    error.code() == Some(deadbolt_core::proto::ErrorCode::Unavailable)
}

/// Every member of the set, in index order, a page of `page_limit` (or
/// the default) at a time.
async fn export(
    hosts: &[String],
    first: usize,
    page_limit: Option<u32>,
) -> Result<Vec<(u64, String)>, deadbolt_core::client::Error> {
    let client = auditor_client(hosts, first, "auditor-export").await?;
    let set = client.set(SET);
    let Some(limit) = page_limit else {
        let members = set.members().try_collect::<Vec<_>>().await?;
        return Ok(members.into_iter().map(|m| (m.index, m.key)).collect());
    };
    let mut members = Vec::new();
    let mut after = Some(0);
    while let Some(from) = after {
        let page = set.members_page(from, limit).await?;
        members.extend(page.members.into_iter().map(|m| (m.index, m.key)));
        after = page.next;
    }
    Ok(members)
}

/// Restarts the set's short time to live with `set_up` four times per
/// lifetime, from a host no fault touches, until aborted: the workers'
/// own `set_up`s renew it too, but a faulty worker may not in time. In a
/// cluster, a node that cannot renew it (down, cut off, fenced) is left
/// for the next.
///
/// Each attempt gets at most a quarter of the lifetime, then is dropped
/// and made again. The client retries a request by itself, but one of its
/// retries can be a connect to a server that is down, which waits out the
/// connector's whole connect timeout (5 s) even when the server is back
/// long before: in seed 5850 (as the tree stood at dff7fa4) a renewal
/// refused by a full
/// disk retried into the server's crash, its connect hung from 0.8 s to
/// 5.8 s, the set (2.7 s to live) ran out at 5.8 s as the server rightly
/// counted from its last `set_up`, and the late renewal made a new, empty
/// set: 14 "acked insert lost" that were the renewer's fault, not the
/// server's. A fresh attempt dials the restarted server at once.
pub async fn renew_set(hosts: Arc<Vec<String>>, ttl_ms: u64) {
    let period = Duration::from_millis(ttl_ms / 4);
    let mut first = 0;
    loop {
        let client = loop {
            if let Ok(client) = auditor_client(&hosts, first, "auditor-renewer").await {
                break client;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let set = client.set(SET);
        loop {
            let ttl = Duration::from_millis(ttl_ms);
            match tokio::time::timeout(period, set.set_up(ttl)).await {
                Ok(Ok(_)) => tokio::time::sleep(period).await,
                Ok(Err(_)) | Err(_) if hosts.len() > 1 => {
                    first += 1;
                    break;
                }
                Ok(Err(_)) => tokio::time::sleep(period).await,
                // The attempt already took a period: again at once.
                Err(_) => {}
            }
        }
    }
}

/// Shuts the server down gracefully and waits (a bounded while) until it
/// has stopped, so that each shard reports the state it ends in.
async fn stop_server(control: &ServerControl) {
    control.stop.send_replace(true);
    for _ in 0..100 {
        if control.stopped.load(Ordering::Acquire) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
