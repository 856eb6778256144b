//! One node of the cluster: its durable log and snapshot, its engine as a
//! replica, openraft, the peer port, and the watcher that tells the engine
//! when it leads.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use deadbolt_core::auth::Auth;
use deadbolt_core::auth::quota::Census;
use deadbolt_core::engine::replica::{Consensus, Proposal, Proposed, ReplicaConfig, ReplicaHandle};
use deadbolt_core::proto::ServerError;
use deadbolt_core::shard::Shard;
use deadbolt_core::time::Tick;
use deadbolt_core::{Engine, EngineConfig};
use deadbolt_storage::Disk;
use deadbolt_transport_ws::{Dialer, Listener};
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::network::RaftNetworkFactory;
use openraft::{BasicNode, ChangeMembers, Config, ServerState, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot, watch};

use crate::forward::LeaderForwarder;
use crate::identity::Identities;
use crate::log_store::{LogStore, LogWriter, OpenError};
use crate::network::{Directory, Hello, Peers, serve_peers};
use crate::state_machine::{StateMachine, load_snapshot};
use crate::status::ClusterStatus;
use crate::types::{Batch, Batches, NodeId, Raft};

/// Raft's timers.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// How often the leader sends heartbeats.
    pub heartbeat: Duration,
    /// A follower that hears nothing for a random time between these two
    /// starts an election.
    pub election_min: Duration,
    /// See `election_min`.
    pub election_max: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        // A follower notices a dead leader within 250-500 ms: five to ten
        // missed heartbeats, which a busy two-core machine does not miss
        // by accident.
        Timings {
            heartbeat: Duration::from_millis(50),
            election_min: Duration::from_millis(250),
            election_max: Duration::from_millis(500),
        }
    }
}

impl Timings {
    /// Fixed, distinct election timeouts per node for the simulation:
    /// openraft draws its random timeouts from the thread's generator,
    /// which a simulation cannot seed; distinct fixed ones still keep two
    /// nodes from splitting the vote forever.
    pub fn fixed_for(node: NodeId) -> Timings {
        let min = Duration::from_millis(250 + 75 * (node % 8));
        Timings {
            election_min: min,
            election_max: min + Duration::from_millis(1),
            ..Timings::default()
        }
    }
}

/// How to run one node.
#[derive(Clone)]
pub struct ClusterConfig {
    /// This node's id.
    pub node: NodeId,
    /// Every member's id and peer address (`host:port`), this one's too.
    pub members: BTreeMap<NodeId, String>,
    /// The base URL of this node's WebSocket port (`ws://host:port`), for
    /// followers to forward to.
    pub client_url: String,
    /// The node's data directory (the log and snapshot go to `raft/` in
    /// it).
    pub dir: PathBuf,
    /// The disk: the real one, or the simulation's.
    pub disk: Arc<dyn Disk>,
    /// Whether the log writer gets a thread of its own (a real server) or
    /// is a task (the simulation).
    pub writer_thread: bool,
    /// Raft's timers.
    pub timings: Timings,
    /// Entries between snapshots.
    pub snapshot_every: u64,
    /// The incarnation this node takes if its Raft directory is new
    /// (random in a real server; drawn from the seed in the simulation).
    pub fresh_incarnation: u64,
    /// TLS on the peer port, requiring a client certificate of the
    /// cluster (see [`crate::network`]); `None` serves it in the clear.
    /// The dialer given to [`start`] must then speak TLS with this node's
    /// certificate, or the other nodes refuse it.
    pub peer_tls: Option<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("node", &self.node)
            .field("members", &self.members)
            .field("client_url", &self.client_url)
            .field("dir", &self.dir)
            .field("timings", &self.timings)
            .field("peer_tls", &self.peer_tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The Raft log cannot be opened.
    #[error(transparent)]
    Log(#[from] OpenError),
    /// The snapshot cannot be read.
    #[error("raft snapshot: {0}")]
    Snapshot(String),
    /// The configuration is wrong.
    #[error("cluster configuration: {0}")]
    Config(String),
    /// openraft refused to start.
    #[error("raft: {0}")]
    Raft(String),
}

/// A running node.
pub struct Node {
    /// The engine the frontends serve.
    pub engine: Engine,
    /// openraft's handle.
    pub raft: Raft,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    log_writer: oneshot::Receiver<()>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").finish_non_exhaustive()
    }
}

/// Leading shards propose through openraft, by way of one combiner task
/// ([`combine`]) that puts the batches proposed while it was busy into one
/// entry.
struct RaftConsensus {
    raft: Arc<OnceLock<Raft>>,
    /// To the combiner. Unbounded, but each leading shard has at most a
    /// few proposals uncommitted, so it holds at most that many per shard.
    proposals: mpsc::UnboundedSender<Pending>,
}

/// A batch waiting for the combiner, and who to tell when it commits.
struct Pending {
    batch: Batch,
    committed: oneshot::Sender<Result<(), ServerError>>,
}

impl Consensus for RaftConsensus {
    fn propose(&self, proposal: Proposal) -> Proposed {
        if self.raft.get().is_none() {
            return Box::pin(async { Err(ServerError::unavailable("raft is starting")) });
        }
        // Queued now, not when the returned future is first polled: a
        // shard's proposals must reach the log in the order it made them,
        // and the shard may not poll for a while.
        let (committed, outcome) = oneshot::channel();
        let batch = Batch::of(&proposal);
        if self.proposals.send(Pending { batch, committed }).is_err() {
            return Box::pin(async { Err(ServerError::unavailable("raft stopped")) });
        }
        Box::pin(async move {
            outcome
                .await
                .unwrap_or_else(|_| Err(ServerError::unavailable("raft stopped")))
        })
    }
}

/// The most batches one entry carries (one per shard is the usual case).
const BATCHES_PER_ENTRY_MAX: usize = 256;

/// Submits the proposed batches to `raft`, as few entries as it can: each
/// entry carries every batch queued by the time the previous one was
/// handed over. The shards woken by one commit propose at about the same
/// time, so after the first entry they fall into step and share entries.
async fn combine(raft: Raft, mut proposals: mpsc::UnboundedReceiver<Pending>) {
    while let Some(first) = proposals.recv().await {
        // Let the other shards woken by the same commit propose too.
        tokio::task::yield_now().await;
        let mut pending = vec![first];
        while pending.len() < BATCHES_PER_ENTRY_MAX {
            let Ok(next) = proposals.try_recv() else {
                break;
            };
            pending.push(next);
        }
        let (batches, waiting): (Vec<Batch>, Vec<_>) =
            pending.into_iter().map(|p| (p.batch, p.committed)).unzip();
        let submitted = raft.client_write_ff(Batches(batches)).await;
        tokio::spawn(async move {
            let outcome = match submitted {
                Ok(answer) => match answer.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(ClientWriteError::ForwardToLeader(_))) => Err(ServerError::unavailable(
                        "this node stopped leading before the write committed",
                    )),
                    Ok(Err(error)) => Err(ServerError::unavailable(error.to_string())),
                    Err(_) => Err(ServerError::unavailable("raft stopped")),
                },
                Err(fatal) => Err(ServerError::unavailable(fatal.to_string())),
            };
            for waiter in waiting {
                let _ = waiter.send(outcome.clone());
            }
        });
    }
}

/// Starts node `cluster.node` with `engine`'s shards and limits, serving
/// peers on `peers` and dialing them (and the leader, to forward) with
/// `dialer`.
pub async fn start<L: Listener, D: Dialer + Clone>(
    cluster: ClusterConfig,
    mut engine: EngineConfig,
    peers: L,
    dialer: D,
) -> Result<Node, StartError> {
    // Every node's shards must start alike, or they would apply the same
    // log to different states: tokens start from 1 (they rise with the
    // replicated state, so they need no clock to stay above a restart's).
    engine.first_token = 1;
    let auth = engine.auth.clone();
    if !cluster.members.contains_key(&cluster.node) {
        let why = format!("node {} is not among the members", cluster.node);
        return Err(StartError::Config(why));
    }
    let dir = cluster.dir.join("raft");
    let (store, writer, opened) = LogStore::open(Arc::clone(&cluster.disk), &dir)?;
    if let Some((path, offset)) = &opened.torn_tail {
        tracing::warn!(
            "the raft log ended in a torn record: cut at byte {offset} of {}",
            path.display()
        );
    }
    let raft_cell: Arc<OnceLock<Raft>> = Arc::new(OnceLock::new());
    let voter = {
        let raft = Arc::clone(&raft_cell);
        // Until Raft runs, every member counts as a voter: refuse strangers.
        Box::new(move |node| raft.get().is_none_or(|raft| votes(raft, node)))
    };
    let identities = Identities::open(
        Arc::clone(&cluster.disk),
        &dir,
        cluster.fresh_incarnation,
        voter,
    )
    .map_err(OpenError::Io)?;
    let identities = Arc::new(identities);
    let log_writer = spawn_log_writer(writer, cluster.writer_thread);
    let loaded = load_snapshot(cluster.disk.as_ref(), &dir).map_err(StartError::Snapshot)?;
    let shard_config = engine.shard_config();
    let (shards, through, loaded) = restored_shards(loaded, &engine)?;
    let directory: Directory = Arc::new(Mutex::new(HashMap::new()));
    directory
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(cluster.node, cluster.client_url.clone());
    let (proposals, to_combine) = mpsc::unbounded_channel();
    let replica = ReplicaConfig {
        node: cluster.node,
        consensus: Arc::new(RaftConsensus {
            raft: Arc::clone(&raft_cell),
            proposals,
        }),
        forwarder: Arc::new(LeaderForwarder {
            raft: Arc::clone(&raft_cell),
            directory: Arc::clone(&directory),
            dialer: dialer.clone(),
        }),
    };
    let shard_count = shards.len();
    let (engine, handle) = Engine::start_replicated(engine, shards, replica, through);
    let machine = StateMachine::new(
        handle.clone(),
        shard_config,
        shard_count,
        Arc::clone(&cluster.disk),
        dir,
        loaded.as_ref().map(|(file, bytes)| (file, bytes.clone())),
    );
    let hello = Hello {
        from: cluster.node,
        incarnation: identities.own(),
        client_url: cluster.client_url.clone(),
    };
    let network = Peers::new(Arc::new(dialer), hello, Arc::clone(&identities));
    let probes = network.clone();
    let config = raft_config(&cluster)?;
    let raft = Raft::new(cluster.node, config, network, store, machine)
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
    let _ = raft_cell.set(raft.clone());
    let (stop, stopped) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(combine(raft.clone(), to_combine)),
        tokio::spawn(bootstrap(raft.clone(), cluster.clone(), probes)),
        tokio::spawn(watch_role(raft.clone(), handle, cluster.node, auth)),
        tokio::spawn(serve_peers(
            peers,
            raft.clone(),
            directory,
            identities,
            cluster.peer_tls.clone(),
            stopped,
        )),
    ];
    Ok(Node {
        engine,
        raft,
        stop,
        tasks,
        log_writer,
    })
}

type Loaded = Option<(crate::state_machine::SnapshotFile, Vec<u8>)>;

/// The shards the snapshot holds (or fresh ones), the time it ends at, and
/// the snapshot with its bytes.
fn restored_shards(
    loaded: Option<crate::state_machine::SnapshotFile>,
    engine: &EngineConfig,
) -> Result<(Vec<Shard>, Tick, Loaded), StartError> {
    let shard_config = engine.shard_config();
    let Some(file) = loaded else {
        let fresh = (0..engine.shards.max(1))
            .map(|_| Shard::new(shard_config))
            .collect();
        return Ok((fresh, Tick::ZERO, None));
    };
    let bytes = file.encode().map_err(StartError::Snapshot)?;
    let through = file.applied_through;
    let meta = file.meta.clone();
    let images = file.images.clone();
    let shards = crate::state_machine::SnapshotFile {
        meta: meta.clone(),
        applied_through: through,
        images,
    }
    .shards(shard_config)
    .map_err(StartError::Snapshot)?;
    if shards.len() != engine.shards.max(1) {
        let why = format!(
            "the snapshot has {} shards, the configuration says {}",
            shards.len(),
            engine.shards
        );
        return Err(StartError::Config(why));
    }
    Ok((shards, through, Some((file, bytes))))
}

fn raft_config(cluster: &ClusterConfig) -> Result<Arc<Config>, StartError> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let config = Config {
        cluster_name: "deadbolt".into(),
        heartbeat_interval: ms(cluster.timings.heartbeat),
        election_timeout_min: ms(cluster.timings.election_min),
        election_timeout_max: ms(cluster.timings.election_max),
        install_snapshot_timeout: 10_000,
        max_payload_entries: 64,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cluster.snapshot_every),
        max_in_snapshot_log_to_keep: 1_000,
        ..Config::default()
    };
    config
        .validate()
        .map(Arc::new)
        .map_err(|e| StartError::Config(e.to_string()))
}

/// How often a node that has never been in a cluster asks its peers
/// whether they have.
const PROBE_EVERY: Duration = Duration::from_millis(100);

/// Makes the members a new cluster, if this node has never been in one
/// and neither has any other member (every node does this with the same
/// members, which openraft allows: they all write the same first entry).
///
/// A node that comes back without its disk must not do it: with another
/// such node it would make a majority with an empty state (tokens from 1
/// again, every set gone). So a node with an empty log waits until every
/// member has answered that it is new too; if one answers that it is not,
/// or refuses it (it remembers another incarnation of this node), this
/// node waits to be readmitted (`deadbolt cluster readmit`), which sends it
/// the cluster's log.
async fn bootstrap<D: Dialer>(raft: Raft, cluster: ClusterConfig, mut peers: Peers<D>) {
    let mut clients = Vec::new();
    for (&id, addr) in cluster
        .members
        .iter()
        .filter(|(id, _)| **id != cluster.node)
    {
        clients.push((id, peers.new_client(id, &BasicNode::new(addr)).await));
    }
    let mut said = false;
    loop {
        if raft.metrics().borrow().last_log_index.is_some() {
            return;
        }
        let mut all_fresh = true;
        for (id, client) in &mut clients {
            match client.probe(PROBE_EVERY * 5).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        node = id,
                        "this node's Raft log is empty but node {id}'s is not: waiting to be readmitted (deadbolt cluster readmit {})",
                        cluster.node
                    );
                    return;
                }
                Err(why) => {
                    if !said {
                        tracing::info!(%why, "a new cluster starts when every member is up");
                        said = true;
                    }
                    all_fresh = false;
                }
            }
        }
        if all_fresh {
            let members: BTreeMap<NodeId, BasicNode> = cluster
                .members
                .iter()
                .map(|(id, addr)| (*id, BasicNode::new(addr)))
                .collect();
            match raft.initialize(members).await {
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(error) => tracing::error!(%error, "cannot make the cluster"),
            }
            return;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Tells the engine when this node starts or stops leading.
async fn watch_role(raft: Raft, handle: ReplicaHandle, node: NodeId, auth: Option<Arc<Auth>>) {
    let mut metrics = raft.metrics();
    let mut leading_in = None;
    // The recount of the latest term: one at a time, or two censuses
    // would be added to one ledger.
    let mut recounting: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let (leads, term) = {
            let now = metrics.borrow_and_update();
            let leads = now.state == ServerState::Leader && now.current_leader == Some(node);
            (leads, now.current_term)
        };
        if leads && leading_in != Some(term) {
            tracing::info!(node, term, "leading");
            handle.lead(term);
            leading_in = Some(term);
            if let Some(auth) = &auth {
                if let Some(previous) = recounting.take() {
                    previous.abort();
                }
                let recount = recount_quotas(raft.clone(), handle.clone(), Arc::clone(auth));
                recounting = Some(tokio::spawn(recount));
            }
        } else if !leads && leading_in.is_some() {
            tracing::info!(node, term, "no longer leading");
            handle.follow();
            leading_in = None;
        }
        if metrics.changed().await.is_err() {
            handle.follow();
            return;
        }
    }
}

/// How long a new leader waits to have applied the log before it counts
/// quotas from its shards; past it, it counts from what it has.
const RECOUNT_PATIENCE: Duration = Duration::from_secs(10);

/// On a new leader: counts what the shards hold against the quotas of
/// the principals that own its client ids (see
/// [`deadbolt_core::auth::quota`]), once it has applied every entry it
/// had when it was elected (everything committed before its term is among
/// them): the grants and sets made through the old leader count here too.
async fn recount_quotas(raft: Raft, handle: ReplicaHandle, auth: Arc<Auth>) {
    auth.usage().forget();
    let last = raft.metrics().borrow().last_log_index;
    let applied = raft
        .wait(Some(RECOUNT_PATIENCE))
        .applied_index_at_least(last, "the log applied before counting quotas")
        .await;
    if let Err(error) = applied {
        tracing::warn!(%error, "counting quotas from the state applied so far");
    }
    // Asked after every batch applied so far: the images hold them all.
    let Some(images) = handle.images().wait().await else {
        return;
    };
    let mut census = Census::default();
    for image in &images {
        census.add(image);
    }
    auth.usage().rebuild(&census, tokio::time::Instant::now());
    tracing::info!("quotas count the locks, sets and members of the replicated state");
}

/// Whether `node` is a voter in `raft`'s current membership.
fn votes(raft: &Raft, node: NodeId) -> bool {
    let metrics = raft.metrics();
    metrics
        .borrow()
        .membership_config
        .voter_ids()
        .any(|v| v == node)
}

/// Readmits `node`, which came back without its disk (its peers refuse
/// it: see [`crate::identity`]): on the leader, takes it out of the
/// membership, adds it back as a learner and waits until it has caught up
/// (from nothing: the log or a snapshot), and makes it a voter again.
/// Safe: once it is no voter, nobody counts its vote or its
/// acknowledgements, and it votes again only with the whole log.
pub async fn readmit(raft: &Raft, node: NodeId) -> Result<(), Refusal> {
    let (me, leader, member) = {
        let metrics = raft.metrics();
        let now = metrics.borrow();
        let member = now
            .membership_config
            .nodes()
            .find(|(id, _)| **id == node)
            .map(|(_, n)| n.clone());
        (now.id, now.current_leader, member)
    };
    if leader != Some(me) {
        return Err(Refusal::NotLeader(leader));
    }
    let failed = |what: &str, e: &dyn std::fmt::Display| Refusal::Failed(format!("{what}: {e}"));
    // Taken out of the membership altogether, not kept as a learner: the
    // leader's replication progress for it predates the lost disk (nothing
    // answered since), and counting that stale progress would promote a
    // node with an empty log. Added back as a new learner, it is caught up
    // from nothing before it votes again.
    let member = match member {
        Some(member) => member,
        None => return Err(Refusal::Failed(format!("node {node} is not a member"))),
    };
    let out = ChangeMembers::RemoveNodes(BTreeSet::from([node]));
    if votes(raft, node) {
        let voters = ChangeMembers::RemoveVoters(BTreeSet::from([node]));
        raft.change_membership(voters, false)
            .await
            .map_err(|e| failed(&format!("taking node {node} out of the voters"), &e))?;
    }
    raft.change_membership(out, false)
        .await
        .map_err(|e| failed(&format!("removing node {node}"), &e))?;
    raft.add_learner(node, member, true)
        .await
        .map_err(|e| failed(&format!("catching node {node} up as a learner"), &e))?;
    let back = ChangeMembers::AddVoterIds(BTreeSet::from([node]));
    raft.change_membership(back, true)
        .await
        .map_err(|e| failed(&format!("making node {node} a voter again"), &e))?;
    tracing::info!(node, "readmitted");
    Ok(())
}

/// Why a readmission did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Only the leader readmits; this is the one it knows of.
    #[error("this node does not lead; the leader is {0:?}")]
    NotLeader(Option<NodeId>),
    /// A step failed (the node may be a learner now: run it again).
    #[error("{0}")]
    Failed(String),
}

impl Node {
    /// What this node sees of the cluster.
    pub fn status(&self) -> ClusterStatus {
        ClusterStatus::of(&self.raft.metrics().borrow())
    }

    /// Stops Raft, the peer port and the engine, in that order, and waits
    /// for the log writer to finish what it was given.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "raft did not stop cleanly");
        }
        self.engine.shutdown().await;
        for task in self.tasks {
            task.abort();
        }
        drop(self.raft);
        drop(self.engine);
        let _ = self.log_writer.await;
    }
}

/// Runs the log writer on its own thread or as a task; the receiver hears
/// when it has ended.
fn spawn_log_writer(writer: LogWriter, own_thread: bool) -> oneshot::Receiver<()> {
    let (ended, on_end) = oneshot::channel();
    let run = async move {
        writer.run().await;
        let _ = ended.send(());
    };
    if !own_thread {
        tokio::spawn(run);
        return on_end;
    }
    let spawned = std::thread::Builder::new()
        .name("deadbolt-raft-log".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(runtime) => runtime.block_on(run),
                Err(error) => tracing::error!("cannot start the raft log writer: {error}"),
            }
        });
    if let Err(error) = spawned {
        tracing::error!("cannot start the raft log writer's thread: {error}");
    }
    on_end
}
