//! The actor runtime: one tokio task per shard, and the [`Engine`] handle.
//!
//! Each shard actor drives one [`Shard`](crate::shard::Shard): it turns its
//! mailbox into commands stamped by the engine's [`Clock`], applies them in
//! batches, hands each batch to the [`Journal`] (if any), then releases the
//! answers; it wakes the shard at its next deadline. A key (or set name) is
//! placed on shard `stable_hash(key) % shards`, the same in every run for
//! the same shard count. A full mailbox is answered `overloaded` at once
//! rather than queued without bound.
//!
//! Transports call [`Engine::session`] once per connection and then
//! [`Session::execute`] for each request; dropping the last clone of the
//! session announces that the connection closed.
//!
//! Layout: `actor` (the driver of one shard), [`session`] (one
//! connection's view), [`events`] (pushed events, from the shards'
//! reports to a connection's queue).

mod actor;
pub mod events;
mod mailbox;
pub mod planted;
pub mod replica;
pub mod session;

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::limits::Limits;
use crate::proto::proof::GrantSigner;
use crate::proto::{SERVER_NAME, ServerError, StatsReply};
pub use crate::shard::Snapshot as ShardSnapshot;
use crate::shard::hasher::{KeyHasher, stable_hash};
use crate::shard::{Command, Counters, Handle, Shard, ShardConfig, Snapshot};
use crate::time::Tick;
use actor::{ActorSetup, ShardMsg};
use mailbox::Mailbox;
use replica::{ActorReplica, Forwarding, ReplicaConfig, ReplicaHandle};
pub use session::Session;

/// Shards when the configuration names no number. Fixed rather than one per
/// core, because a key's shard depends on it and must not move when the
/// server restarts on another machine.
pub const DEFAULT_SHARDS: usize = 4;

/// Where every batch of commands goes before a shard applies it: the seam
/// for a write-ahead log, a replicated log, or a simulation's trace.
///
/// With a journal, a shard logs first and applies after: it stamps a batch
/// of commands, hands it to [`Journal::append`], and only once the journal
/// has kept it does it apply the commands and release their answers. So a
/// refused batch (a full disk) changes nothing, and everything a client
/// heard of is in the journal. A shard may hand over a few batches before
/// the first is kept (while one is being synced, the next gathers); it
/// applies them in the order it handed them over.
#[async_trait::async_trait]
pub trait Journal: Send + Sync + 'static {
    /// Starts keeping `commands`, batch number `number` (1, 2, 3… per
    /// shard, in the order handed over) of shard `shard`, and returns at
    /// once. The future resolves `Ok` once they are kept as the journal
    /// promises (written; synced if its policy says so), or `Err` if none
    /// of them was kept: the shard then answers the batch's requests with
    /// that error and applies nothing. A shard's batches must be kept in
    /// the order they were handed over.
    fn append(&self, shard: usize, number: u64, commands: &[Command]) -> Append;

    /// Shard `shard` has applied (or had refused) every batch up to number
    /// `settled`, and is about to release the answers (or was woken by
    /// [`Journal::attention`]): the moment to take a snapshot of `state`
    /// (which holds exactly the kept batches up to `settled`) or to
    /// reserve fencing tokens ahead of the ones it hands out.
    async fn applied(&self, shard: usize, state: &Shard, settled: u64) {
        let _ = (shard, state, settled);
    }

    /// Notified when the journal wants shard `shard` to call
    /// [`Journal::applied`] without waiting for traffic (a snapshot of an
    /// idle shard).
    fn attention(&self, shard: usize) -> Option<Arc<tokio::sync::Notify>> {
        let _ = shard;
        None
    }

    /// Shard `shard` stopped, with the state that `digest` sums up (taken
    /// before shutting down drops its locks), so that a replay of what was
    /// recorded can be checked against it.
    fn stopped(&self, shard: usize, digest: u64) {
        let _ = (shard, digest);
    }
}

/// A batch being kept by a [`Journal`]: resolves once it is kept (`Ok`) or
/// refused (`Err`, with the error its requests are answered).
pub type Append = std::pin::Pin<Box<dyn Future<Output = Result<(), ServerError>> + Send>>;

/// Told when a shard's invariant is found broken: the shard and what broke.
pub type InvariantAlarm = Arc<dyn Fn(usize, String) + Send + Sync>;

/// How to start an engine.
#[derive(Clone)]
pub struct EngineConfig {
    /// Number of shards (at least 1). Keys are placed by it, so it must not
    /// change under existing state.
    pub shards: usize,
    /// Every bound the engine enforces.
    pub limits: Limits,
    /// Seeds the shards' hash tables and the ids given to clients that
    /// never say `hello`. The state the shards reach does not depend on it.
    pub seed: u64,
    /// The token of each shard's first grant. See [`EngineConfig::with_entropy`].
    pub first_token: u64,
    /// The time the engine's clock reads when it starts: zero for a fresh
    /// engine, the last recorded time for one that continues a log.
    pub start_at: Tick,
    /// Receives every batch of commands before its answers go out.
    pub journal: Option<Arc<dyn Journal>>,
    /// If set, every shard's invariants are checked after every batch (a
    /// full scan: for tests and the simulation), and a broken one is
    /// reported here.
    pub invariant_alarm: Option<InvariantAlarm>,
    /// With `--sign-grants`: signs every grant a session of this engine
    /// answers (SPEC section 10). Wall-clock time goes into each proof, so
    /// signing happens in the session, never in the state machine.
    pub grant_signer: Option<Arc<GrantSigner>>,
    /// With an auth file (SPEC section 10): who may connect and what each
    /// principal may do. `None`: everyone may do everything.
    pub auth: Option<Arc<crate::auth::Auth>>,
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("shards", &self.shards)
            .field("limits", &self.limits)
            .field("seed", &self.seed)
            .field("first_token", &self.first_token)
            .field("start_at", &self.start_at)
            .field("journal", &self.journal.is_some())
            .field("invariant_alarm", &self.invariant_alarm.is_some())
            .field("grant_signer", &self.grant_signer)
            .field("auth", &self.auth.is_some())
            .finish()
    }
}

impl EngineConfig {
    /// A deterministic configuration: seed 0, tokens from 1,
    /// [`DEFAULT_SHARDS`] shards. Tests and the simulation start here.
    pub fn new() -> EngineConfig {
        EngineConfig {
            shards: DEFAULT_SHARDS,
            limits: Limits::default(),
            seed: 0,
            first_token: 1,
            start_at: Tick::ZERO,
            journal: None,
            invariant_alarm: None,
            grant_signer: None,
            auth: None,
        }
    }

    /// The configuration of each of its shards.
    pub fn shard_config(&self) -> ShardConfig {
        ShardConfig {
            hash_seed: self.seed,
            first_token: self.first_token,
            limits: self.limits.share_of(self.shards.max(1)),
        }
    }

    /// For a real server: a random seed, and tokens that start from the wall
    /// clock, so that tokens keep rising across restarts as long as the
    /// clock does (see [`first_token_from_clock`]).
    pub fn with_entropy(mut self) -> EngineConfig {
        let mut seed = [0u8; 8];
        // Without OS randomness the seed stays fixed: hash tables are then
        // predictable, which costs collision resistance, not correctness.
        if getrandom::fill(&mut seed).is_ok() {
            self.seed = u64::from_le_bytes(seed);
        }
        self.first_token = first_token_from_clock(SystemTime::now());
        self
    }
}

/// The engine's monotonic clock: the time every command is stamped with.
/// It reads `start_at` when the engine starts and runs with tokio's clock
/// (so a paused test clock or a simulation's clock drives it), until it is
/// stopped.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
    start_at: Tick,
    /// Set once the clock has stopped: it reads this from then on.
    stopped_at: Option<Tick>,
}

/// How far away a stopped clock puts a time it will never reach: far
/// enough that no timer armed for it fires while the process lives.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Clock {
    /// A clock that reads `start_at` now.
    pub fn starting_at(start_at: Tick) -> Clock {
        Clock {
            epoch: Instant::now(),
            start_at,
            stopped_at: None,
        }
    }

    /// This clock, stopped at the time it reads now: it reads that time
    /// from then on, and a later time never comes.
    pub fn stopped(self) -> Clock {
        Clock {
            stopped_at: Some(self.now()),
            ..self
        }
    }

    /// The time now.
    pub fn now(&self) -> Tick {
        if let Some(stopped_at) = self.stopped_at {
            return stopped_at;
        }
        let elapsed = Tick::from_duration(self.epoch.elapsed());
        Tick(self.start_at.0.saturating_add(elapsed.0))
    }

    /// The instant at which the clock reads `tick` (now, if it has; in a
    /// century, if it is stopped before `tick`).
    pub fn instant_of(&self, tick: Tick) -> Instant {
        if self.stopped_at.is_some_and(|stopped_at| tick > stopped_at) {
            return Instant::now() + NEVER;
        }
        self.epoch + Duration::from_micros(tick.0.saturating_sub(self.start_at.0))
    }
}

/// Milliseconds from the Unix epoch to 2026-01-01, deadbolt's token epoch.
const TOKEN_EPOCH_UNIX_MS: u128 = 1_767_225_600_000;

/// Grants a shard may make per millisecond, on average since it started,
/// before its tokens could overtake those of a restart.
const TOKENS_PER_MS: u128 = 1 << 12;

/// The first token for a server started at `now`: milliseconds since
/// 2026-01-01 times 4096. A restarted server starts above every token the
/// previous run issued, unless a shard granted more than 4096 locks per
/// millisecond on average. Tokens stay below 2^53 until 2095, so JavaScript
/// numbers hold them exactly.
pub fn first_token_from_clock(now: SystemTime) -> u64 {
    let unix_ms = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis();
    let since_epoch = unix_ms.saturating_sub(TOKEN_EPOCH_UNIX_MS);
    u64::try_from(since_epoch * TOKENS_PER_MS + 1).unwrap_or(u64::MAX / 2)
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig::new()
    }
}

/// The single entry point that transports call: a cheap `Clone` handle to
/// the shard actors.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

/// Which frontend a connection came through, for connection counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Frontend {
    /// The WebSocket frontend.
    WebSocket,
    /// The QUIC frontend.
    Quic,
    /// In-process (the local client transport, tests, benchmarks).
    Local,
    /// Another node of the cluster, forwarding its clients' requests to
    /// this one (the leader); never forwarded again.
    Forwarded,
}

impl Frontend {
    const ALL: [Frontend; 4] = [
        Frontend::WebSocket,
        Frontend::Quic,
        Frontend::Local,
        Frontend::Forwarded,
    ];

    /// Its name in `stats` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Frontend::WebSocket => "websocket",
            Frontend::Quic => "quic",
            Frontend::Local => "local",
            Frontend::Forwarded => "forwarded",
        }
    }
}

#[derive(Debug)]
struct EngineInner {
    mailboxes: Box<[Mailbox]>,
    started: Instant,
    /// The next request handle; handles are unique engine-wide.
    next_handle: AtomicU64,
    /// Open sessions per frontend, indexed like [`Frontend::ALL`].
    connections: [AtomicU64; 4],
    limits: Limits,
    seed: u64,
    next_conn: AtomicU64,
    /// Read on every request, so a plain atomic rather than `shut_down`'s
    /// lock.
    shutting_down: AtomicBool,
    /// Turns true with `shutting_down`, for those who wait for it.
    shut_down: tokio::sync::watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// The last top lists gathered; held while gathering, so that
    /// concurrent `stats` calls share one scan.
    top_lists: tokio::sync::Mutex<Option<TopLists>>,
    /// In a replicated engine: the role, and the way to the leader.
    forwarding: Option<Forwarding>,
    /// Signs grants, if the server was asked to.
    grant_signer: Option<Arc<GrantSigner>>,
    /// Who may do what, if authentication is on.
    auth: Option<Arc<crate::auth::Auth>>,
}

/// How long top lists are reused. Gathering them scans every lock and set
/// of every shard, which with millions of keys takes each shard away from
/// its work for a while; a room of dashboards refreshing every second must
/// not multiply that.
pub const TOP_LISTS_MAX_AGE: Duration = Duration::from_millis(500);

/// Top lists merged from every shard, sorted and cut to `top`.
#[derive(Debug)]
struct TopLists {
    gathered: Instant,
    top: usize,
    lists: Snapshot,
}

impl Engine {
    /// Starts the shard actors on the current tokio runtime, each with an
    /// empty shard.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(config: EngineConfig) -> Engine {
        let shards = config.shards.max(1);
        let shard_config = config.shard_config();
        let fresh = (0..shards).map(|_| Shard::new(shard_config)).collect();
        Engine::start_with(config, fresh)
    }

    /// Starts the shard actors on the current tokio runtime with `shards`,
    /// shard `i` at index `i` (a recovered state, say). Their number wins
    /// over `config.shards`.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start_with(config: EngineConfig, shards: Vec<Shard>) -> Engine {
        Engine::spawn(config, shards, None)
    }

    /// Starts a replicated engine (SPEC section 9): `shards` as the last
    /// snapshot left them, having applied commands up to `applied_through`.
    /// It follows until the returned handle says it leads; the replication
    /// layer delivers committed batches through the handle.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start_replicated(
        config: EngineConfig,
        shards: Vec<Shard>,
        replica: ReplicaConfig,
        applied_through: Tick,
    ) -> (Engine, ReplicaHandle) {
        let (handle, inboxes) = ReplicaHandle::new(replica.node, shards.len(), applied_through);
        let forwarding = Forwarding {
            role: handle.watch_role(),
            forwarder: replica.forwarder.clone(),
        };
        let actors = inboxes.into_iter().map(|inbox| ActorReplica {
            consensus: replica.consensus.clone(),
            inbox,
        });
        let engine = Engine::spawn(config, shards, Some((actors.collect(), forwarding)));
        (engine, handle)
    }

    fn spawn(
        config: EngineConfig,
        shards: Vec<Shard>,
        replicated: Option<(Vec<ActorReplica>, Forwarding)>,
    ) -> Engine {
        let clock = Clock::starting_at(config.start_at);
        let mut mailboxes = Vec::with_capacity(shards.len());
        let mut tasks = Vec::with_capacity(shards.len());
        let (mut replicas, forwarding) = match replicated {
            Some((actors, forwarding)) => {
                (actors.into_iter().map(Some).collect(), Some(forwarding))
            }
            None => (Vec::new(), None),
        };
        for (shard_index, shard) in shards.into_iter().enumerate() {
            let (tx, rx) = mailbox::mailbox(config.limits.mailbox_len);
            mailboxes.push(tx);
            let setup = ActorSetup {
                shard_index,
                shard,
                clock,
                journal: config.journal.clone(),
                invariant_alarm: config.invariant_alarm.clone(),
                replica: replicas.get_mut(shard_index).and_then(Option::take),
            };
            tasks.push(tokio::spawn(actor::run(setup, rx)));
        }
        Engine {
            inner: Arc::new(EngineInner {
                mailboxes: mailboxes.into_boxed_slice(),
                started: Instant::now(),
                next_handle: AtomicU64::new(1),
                connections: Default::default(),
                limits: config.limits,
                seed: config.seed,
                next_conn: AtomicU64::new(1),
                shutting_down: AtomicBool::new(false),
                shut_down: tokio::sync::watch::Sender::new(false),
                tasks: std::sync::Mutex::new(tasks),
                top_lists: tokio::sync::Mutex::new(None),
                forwarding,
                grant_signer: config.grant_signer,
                auth: config.auth,
            }),
        }
    }

    /// In a replicated engine whose node does not lead: how to reach the
    /// leader.
    fn forwarding(&self) -> Option<&Forwarding> {
        self.inner.forwarding.as_ref().filter(|f| f.follows())
    }

    /// The key grants are signed with, if they are (`--sign-grants`).
    pub fn grant_signer(&self) -> Option<&Arc<GrantSigner>> {
        self.inner.grant_signer.as_ref()
    }

    /// Who may do what, if the server authenticates its clients (SPEC
    /// section 10); `None`: everyone may do everything.
    pub fn auth(&self) -> Option<&Arc<crate::auth::Auth>> {
        self.inner.auth.as_ref()
    }

    /// The bounds this engine enforces; transports decode with them.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// A new in-process connection's session; see [`Engine::session_on`].
    pub fn session(&self) -> Session {
        self.session_on(Frontend::Local)
    }

    /// A new connection's session, counted under `frontend`. Until it says
    /// `hello`, its client id is a fresh one made up by the server.
    pub fn session_on(&self, frontend: Frontend) -> Session {
        let conn = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        self.inner.connections[frontend as usize].fetch_add(1, Ordering::Relaxed);
        Session::new(self.clone(), conn, self.anonymous_client_id(conn), frontend)
    }

    /// A session on `frontend` ended.
    fn session_closed(&self, frontend: Frontend) {
        self.inner.connections[frontend as usize].fetch_sub(1, Ordering::Relaxed);
    }

    /// Open connections per frontend.
    pub fn connections(&self) -> Vec<(Frontend, u64)> {
        Frontend::ALL
            .iter()
            .map(|&f| {
                (
                    f,
                    self.inner.connections[f as usize].load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// A 128-bit id that no other connection of this engine gets, and that
    /// cannot be guessed without the engine's seed.
    fn anonymous_client_id(&self, conn: u64) -> String {
        let a = KeyHasher::with_seed(self.inner.seed ^ 0x6964_2d61).hash_one(conn);
        let b = KeyHasher::with_seed(self.inner.seed ^ 0x6964_2d62).hash_one(conn);
        format!("anon-{a:016x}{b:016x}")
    }

    /// Which shard owns `key` (a lock key or a set name).
    pub fn shard_of(&self, key: &str) -> usize {
        shard_of(key, self.inner.mailboxes.len())
    }

    /// A handle no other request of this engine has.
    fn new_handle(&self) -> Handle {
        Handle(self.inner.next_handle.fetch_add(1, Ordering::Relaxed))
    }

    fn mailbox(&self, shard: usize) -> &Mailbox {
        &self.inner.mailboxes[shard]
    }

    fn mailboxes(&self) -> &[Mailbox] {
        &self.inner.mailboxes
    }

    /// Whether [`Engine::shutdown`] has been called.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Acquire)
    }

    /// Counters and sizes summed over all shards.
    pub async fn stats(&self) -> Counters {
        self.gather(0).await.0
    }

    /// Each shard's state digest, in shard order (see
    /// [`Shard::digest`](crate::shard::Shard::digest)); a shard that has
    /// stopped is left out.
    pub async fn digests(&self) -> Vec<u64> {
        let mut digests = Vec::with_capacity(self.mailboxes().len());
        for mailbox in self.mailboxes() {
            let (reply, digest) = oneshot::channel();
            if mailbox.notify(ShardMsg::Digest { reply }) {
                digests.extend(digest.await.ok());
            }
        }
        digests
    }

    /// Counters, sizes and the shards' top lists merged, from every shard.
    async fn gather(&self, top: usize) -> (Counters, Snapshot) {
        let mut total = Counters::default();
        let mut merged = Snapshot::default();
        for mailbox in self.mailboxes() {
            let (tx, rx) = oneshot::channel();
            if !mailbox.notify(ShardMsg::Stats { top, reply: tx }) {
                continue;
            }
            if let Ok((counters, snapshot)) = rx.await {
                total.merge(&counters);
                merged.held.extend(snapshot.held);
                merged.contended.extend(snapshot.contended);
                merged.largest_sets.extend(snapshot.largest_sets);
            }
        }
        (total, merged)
    }

    /// The `stats` reply: counters, sizes, connections, and the `top` held
    /// locks, contended keys and largest sets over all shards. Counters are
    /// always current; the lists may be up to [`TOP_LISTS_MAX_AGE`] old.
    pub async fn snapshot(&self, top: usize) -> StatsReply {
        let (stats, merged) = if top == 0 {
            (self.stats().await, Snapshot::default())
        } else {
            self.top_lists(top).await
        };
        StatsReply {
            server: SERVER_NAME.to_owned(),
            uptime_ms: u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            connections: self
                .connections()
                .into_iter()
                .map(|(f, n)| (f.name().to_owned(), n))
                .collect(),
            locks: stats.locks,
            sets: stats.sets,
            held: merged.held,
            contended: merged.contended,
            largest_sets: merged.largest_sets,
        }
    }

    /// Counters and the top lists, the lists reused if recent enough.
    async fn top_lists(&self, top: usize) -> (Counters, Snapshot) {
        // Always gathered at the longest length a reply may ask for, so that
        // asking for a different `top` each time cannot bypass the cache.
        let gathered_top = top.max(self.inner.limits.stats_top_max as usize);
        let mut cached = self.inner.top_lists.lock().await;
        if let Some(recent) = cached
            .as_ref()
            .filter(|c| c.top >= top && c.gathered.elapsed() < TOP_LISTS_MAX_AGE)
        {
            let lists = cut(recent.lists.clone(), top);
            drop(cached);
            return (self.stats().await, lists);
        }
        let (stats, merged) = self.gather(gathered_top).await;
        let lists = cut(merged, gathered_top);
        *cached = Some(TopLists {
            gathered: Instant::now(),
            top: gathered_top,
            lists: lists.clone(),
        });
        (stats, cut(lists, top))
    }

    /// Resolves once [`Engine::shutdown`] has been called.
    pub async fn shutting_down(&self) {
        let mut shut_down = self.inner.shut_down.subscribe();
        // The sender lives as long as the engine, so this cannot fail.
        let _ = shut_down.wait_for(|shut| *shut).await;
    }

    /// Stops the shards' clocks, as a graceful shutdown begins: from now
    /// on every command is stamped with the time it was stopped at, and no
    /// lease or set runs out. While the frontends drain, clients can no
    /// longer renew what they hold, so letting it run out then would make a
    /// graceful stop cost what a crash does not: after a restart, every
    /// lease and set continues with the time it had left when the server
    /// stopped listening (SPEC section 8). A replicated shard's time is the
    /// cluster's and goes on with the other nodes: it ignores this.
    pub fn stop_clocks(&self) {
        for mailbox in self.mailboxes() {
            // An actor that is already gone has no clock left to stop.
            mailbox.notify(ShardMsg::StopClock);
        }
    }

    /// Stops the engine: every waiting request is answered `shutting_down`,
    /// later requests too, and the shard actors end. Returns when they have.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        self.inner.shut_down.send_replace(true);
        for mailbox in self.mailboxes() {
            // An actor that is already gone needs no telling.
            mailbox.notify(ShardMsg::Shutdown);
        }
        let tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            // A shard that panicked has nothing more to clean up.
            let _ = task.await;
        }
    }
}

/// Sorts merged top lists and keeps the first `top` of each.
fn cut(mut merged: Snapshot, top: usize) -> Snapshot {
    let by_waiters = |a: &crate::proto::HeldLock, b: &crate::proto::HeldLock| {
        b.waiters.cmp(&a.waiters).then_with(|| a.key.cmp(&b.key))
    };
    merged.held.sort_by(by_waiters);
    merged.held.truncate(top);
    merged.contended.sort_by(by_waiters);
    merged.contended.truncate(top);
    merged
        .largest_sets
        .sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.set.cmp(&b.set)));
    merged.largest_sets.truncate(top);
    merged
}

/// The shard that owns `key` among `shards`: the same in every run.
pub fn shard_of(key: &str, shards: usize) -> usize {
    (stable_hash(key) % shards.max(1) as u64) as usize
}
