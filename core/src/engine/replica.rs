//! The engine as one replica of a replicated state machine (SPEC section
//! 9): the seam between the shard actors and a consensus library.
//!
//! Every node runs the same shards, and every shard applies exactly the
//! batches the consensus log has committed, in log order, whoever proposed
//! them: the [`ReplicaHandle`] is how the replication layer delivers them
//! ([`ReplicaHandle::apply`]), takes and installs snapshots, and tells the
//! engine whether this node leads.
//!
//! Only the leader's shards stamp commands. A leading shard proposes each
//! batch through [`Consensus::propose`] and applies it only when it comes
//! back committed, so an answer always follows a majority's copy; a
//! follower's shards never stamp, grant, expire or answer anything, and its
//! sessions hand their requests to the leader through the
//! [`Forwarder`]. When a node starts to lead, each of its shards first
//! commits an [`Input::Restart`]: the waiters and ephemeral locks of the
//! old leader's connections end, as they would at a restart, and every
//! lease continues on the new leader's clock, which starts where the last
//! applied command left it plus the time since (see
//! [`ReplicaHandle::lead`]).

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::Clock;
use crate::client::Connection;
use crate::proto::ServerError;
use crate::shard::image::ShardImage;
use crate::shard::{Command, Shard};
use crate::time::Tick;

/// Who proposed a batch: a node in one of its terms as leader. A shard
/// answers the requests of a committed batch only if it proposed it in the
/// term it is leading now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The proposing node's id.
    pub node: u64,
    /// The term it led in.
    pub term: u64,
}

/// A batch a leading shard asks the consensus log to commit.
#[derive(Debug, Clone)]
pub struct Proposal {
    /// The shard whose batch it is.
    pub shard: usize,
    /// Who proposes it.
    pub origin: Origin,
    /// Its number among this shard's proposals in this term (1, 2, 3…).
    pub number: u64,
    /// The stamped commands, in order.
    pub commands: Vec<Command>,
}

/// A proposal on its way: resolves `Ok` once the log has committed it and
/// it was delivered back through [`ReplicaHandle::apply`], or `Err` when
/// the consensus library gave up on it (no longer the leader, no quorum).
/// An `Err` does not say that it will never commit: its requests are
/// answered with the error, and if it commits after all it is applied like
/// any other batch.
pub type Proposed = std::pin::Pin<Box<dyn Future<Output = Result<(), ServerError>> + Send>>;

/// The consensus log, as a leading shard sees it.
pub trait Consensus: Send + Sync + 'static {
    /// Starts committing `proposal` and returns at once.
    fn propose(&self, proposal: Proposal) -> Proposed;
}

/// Opens a connection to the current leader on behalf of one client
/// connection of a follower.
#[async_trait::async_trait]
pub trait Forwarder: Send + Sync + 'static {
    /// The node that leads now, as far as this node knows.
    fn leader(&self) -> Option<u64>;

    /// A connection to the leader, and its node id, that has already said
    /// `hello` as `client` (with the secret `auth`, where the servers
    /// authenticate: the leader checks the same principal); or
    /// `unavailable` if there is no leader to reach.
    async fn open(
        &self,
        client: &str,
        auth: Option<&crate::proto::Secret>,
    ) -> Result<(u64, Arc<dyn Connection>), ServerError>;
}

/// How an engine takes part in a replicated group.
#[derive(Clone)]
pub struct ReplicaConfig {
    /// This node's id.
    pub node: u64,
    /// Where leading shards propose.
    pub consensus: Arc<dyn Consensus>,
    /// Where a follower's sessions send their requests.
    pub forwarder: Arc<dyn Forwarder>,
}

impl std::fmt::Debug for ReplicaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaConfig")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Whether this node's shards lead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Apply what is committed; forward requests to the leader.
    Following,
    /// Stamp, propose, and answer, in this term.
    Leading {
        /// The term.
        term: u64,
    },
}

/// What the replication layer tells one shard, in log order.
#[derive(Debug)]
pub(crate) enum ReplicaMsg {
    /// A committed batch.
    Apply {
        origin: Origin,
        number: u64,
        commands: Vec<Command>,
    },
    /// Send the shard's image (a snapshot at this point of the log).
    Image {
        reply: tokio::sync::oneshot::Sender<ShardImage>,
    },
    /// Replace the state with an installed snapshot's.
    Install { shard: Box<Shard> },
    /// Start leading in `origin.term`, stamping with `clock`.
    Lead { origin: Origin, clock: Clock },
    /// Stop leading.
    Follow,
}

/// The replication layer's handle on a replicated engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ReplicaHandle {
    inner: Arc<HandleInner>,
}

#[derive(Debug)]
struct HandleInner {
    node: u64,
    shards: Vec<mpsc::UnboundedSender<ReplicaMsg>>,
    role: watch::Sender<Role>,
    /// The latest time stamped on an applied command, and when it was
    /// applied here: where a new leader's clock starts.
    last_seen: Mutex<(Tick, Instant)>,
}

/// The receiving ends, one per shard, for the actors.
pub(crate) type ReplicaInboxes = Vec<mpsc::UnboundedReceiver<ReplicaMsg>>;

impl ReplicaHandle {
    /// A handle for `shards` shards of node `node`, following, whose last
    /// applied time is `applied_through`; and the actors' receiving ends.
    pub(crate) fn new(
        node: u64,
        shards: usize,
        applied_through: Tick,
    ) -> (ReplicaHandle, ReplicaInboxes) {
        let (senders, receivers) = (0..shards).map(|_| mpsc::unbounded_channel()).unzip();
        let handle = ReplicaHandle {
            inner: Arc::new(HandleInner {
                node,
                shards: senders,
                role: watch::Sender::new(Role::Following),
                last_seen: Mutex::new((applied_through, Instant::now())),
            }),
        };
        (handle, receivers)
    }

    /// Delivers a committed batch of shard `shard` (in log order; each
    /// shard's batches in the order they were committed).
    pub fn apply(&self, shard: usize, origin: Origin, number: u64, commands: Vec<Command>) {
        if let Some(latest) = commands.iter().map(|c| c.at).max() {
            let mut seen = self.last_seen();
            if latest >= seen.0 {
                *seen = (latest, Instant::now());
            }
        }
        self.send(
            shard,
            ReplicaMsg::Apply {
                origin,
                number,
                commands,
            },
        );
    }

    /// Every shard's image at this point of the log (after every batch
    /// delivered so far, before any delivered later): asked now, awaited
    /// later with [`ImagesAsked::wait`].
    pub fn images(&self) -> ImagesAsked {
        let asked = (0..self.inner.shards.len())
            .map(|shard| {
                let (reply, image) = tokio::sync::oneshot::channel();
                self.send(shard, ReplicaMsg::Image { reply });
                image
            })
            .collect();
        ImagesAsked(asked)
    }

    /// Replaces every shard's state with `shards` (an installed snapshot),
    /// which applied commands up to `applied_through`.
    pub fn install(&self, shards: Vec<Shard>, applied_through: Tick) {
        *self.last_seen() = (applied_through, Instant::now());
        for (index, shard) in shards.into_iter().enumerate() {
            let shard = Box::new(shard);
            self.send(index, ReplicaMsg::Install { shard });
        }
    }

    /// This node leads in `term` from now on. Its clock starts at the last
    /// applied command's time plus the time since it was applied here: a
    /// lease keeps the time it had left, plus at most how late that command
    /// reached this node.
    pub fn lead(&self, term: u64) {
        let (tick, seen) = *self.last_seen();
        let start = Tick(tick.0.saturating_add(Tick::from_duration(seen.elapsed()).0));
        let clock = Clock::starting_at(start);
        let origin = Origin {
            node: self.inner.node,
            term,
        };
        for shard in 0..self.inner.shards.len() {
            self.send(shard, ReplicaMsg::Lead { origin, clock });
        }
        self.inner.role.send_replace(Role::Leading { term });
    }

    /// This node no longer leads.
    pub fn follow(&self) {
        if *self.inner.role.borrow() == Role::Following {
            return;
        }
        self.inner.role.send_replace(Role::Following);
        for shard in 0..self.inner.shards.len() {
            self.send(shard, ReplicaMsg::Follow);
        }
    }

    /// This node's role now.
    pub fn role(&self) -> Role {
        *self.inner.role.borrow()
    }

    /// Watches the role.
    pub(crate) fn watch_role(&self) -> watch::Receiver<Role> {
        self.inner.role.subscribe()
    }

    fn send(&self, shard: usize, message: ReplicaMsg) {
        // An actor that has stopped (shutdown) needs nothing more.
        if let Some(sender) = self.inner.shards.get(shard) {
            let _ = sender.send(message);
        }
    }

    fn last_seen(&self) -> std::sync::MutexGuard<'_, (Tick, Instant)> {
        self.inner
            .last_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// Shard images asked for by [`ReplicaHandle::images`].
#[derive(Debug)]
pub struct ImagesAsked(Vec<tokio::sync::oneshot::Receiver<ShardImage>>);

impl ImagesAsked {
    /// The images, in shard order; `None` if the engine has stopped.
    pub async fn wait(self) -> Option<Vec<ShardImage>> {
        let mut images = Vec::with_capacity(self.0.len());
        for image in self.0 {
            images.push(image.await.ok()?);
        }
        Some(images)
    }
}

/// What a replicated engine's sessions need: whether to forward, and how.
#[derive(Clone)]
pub(crate) struct Forwarding {
    pub role: watch::Receiver<Role>,
    pub forwarder: Arc<dyn Forwarder>,
}

impl std::fmt::Debug for Forwarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarding")
            .field("role", &*self.role.borrow())
            .finish_non_exhaustive()
    }
}

impl Forwarding {
    /// Whether this node's sessions must forward now.
    pub fn follows(&self) -> bool {
        *self.role.borrow() == Role::Following
    }
}

/// What a replicated shard actor needs.
pub(crate) struct ActorReplica {
    pub consensus: Arc<dyn Consensus>,
    pub inbox: mpsc::UnboundedReceiver<ReplicaMsg>,
}
