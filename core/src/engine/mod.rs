//! The actor runtime: one tokio task per shard, and the [`Engine`] handle.
//!
//! Each shard actor owns a [`Shard`](crate::shard::Shard) and a bounded
//! mailbox; it sleeps until a message arrives or the shard's next deadline
//! comes. Keys (and set names) are routed to shards by a seeded hash, so the
//! same seed routes the same way every run. A full mailbox is answered
//! `overloaded` at once rather than queued without bound.
//!
//! Transports call [`Engine::session`] once per connection and then
//! [`Session::execute`] for each request; dropping the last clone of the
//! session announces that the connection closed.
//!
//! Layout: `actor` (the shard task), [`session`] (one connection's view).

mod actor;
pub mod session;

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::limits::{Limits, ShardLimits};
use crate::proto::{LockCounters, SERVER_NAME, SetCounters, StatsReply};
pub use crate::shard::Snapshot as ShardSnapshot;
use crate::shard::hasher::KeyHasher;
use crate::shard::{ShardConfig, ShardStats, Snapshot};
use actor::ShardMsg;
pub use session::Session;

/// How to start an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Number of shard actors (at least 1).
    pub shards: usize,
    /// Every bound the engine enforces.
    pub limits: Limits,
    /// Seeds the key hash (routing and tables) and the ids given to clients
    /// that never say `hello`. The same seed gives the same run.
    pub seed: u64,
    /// The token of each shard's first grant. See [`EngineConfig::with_entropy`].
    pub first_token: u64,
}

impl EngineConfig {
    /// A deterministic configuration: seed 0, tokens from 1, one shard per
    /// core. Tests and the simulation start here.
    pub fn new() -> EngineConfig {
        EngineConfig {
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            limits: Limits::default(),
            seed: 0,
            first_token: 1,
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
}

impl Frontend {
    const ALL: [Frontend; 3] = [Frontend::WebSocket, Frontend::Quic, Frontend::Local];

    /// Its name in `stats` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Frontend::WebSocket => "websocket",
            Frontend::Quic => "quic",
            Frontend::Local => "local",
        }
    }
}

#[derive(Debug)]
struct EngineInner {
    mailboxes: Box<[mpsc::Sender<ShardMsg>]>,
    started: Instant,
    /// Open sessions per frontend, indexed like [`Frontend::ALL`].
    connections: [AtomicU64; 3],
    hasher: KeyHasher,
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
    /// Starts the shard actors on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(config: EngineConfig) -> Engine {
        let shards = config.shards.max(1);
        let epoch = Instant::now();
        let shard_config = ShardConfig {
            hash_seed: config.seed,
            first_token: config.first_token,
            limits: ShardLimits::share_of(&config.limits, shards),
        };
        let mut mailboxes = Vec::with_capacity(shards);
        let mut tasks = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (tx, rx) = mpsc::channel(config.limits.mailbox_len.max(1));
            mailboxes.push(tx);
            tasks.push(tokio::spawn(actor::run(shard_config, rx, epoch)));
        }
        Engine {
            inner: Arc::new(EngineInner {
                mailboxes: mailboxes.into_boxed_slice(),
                started: epoch,
                connections: Default::default(),
                hasher: KeyHasher::with_seed(config.seed),
                limits: config.limits,
                seed: config.seed,
                next_conn: AtomicU64::new(1),
                shutting_down: AtomicBool::new(false),
                shut_down: tokio::sync::watch::Sender::new(false),
                tasks: std::sync::Mutex::new(tasks),
                top_lists: tokio::sync::Mutex::new(None),
            }),
        }
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
    fn shard_of(&self, key: &str) -> usize {
        let shards = self.inner.mailboxes.len() as u64;
        (self.inner.hasher.hash_one(key) % shards) as usize
    }

    fn mailbox(&self, shard: usize) -> &mpsc::Sender<ShardMsg> {
        &self.inner.mailboxes[shard]
    }

    fn mailboxes(&self) -> &[mpsc::Sender<ShardMsg>] {
        &self.inner.mailboxes
    }

    /// Whether [`Engine::shutdown`] has been called.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Acquire)
    }

    /// Counters and sizes summed over all shards.
    pub async fn stats(&self) -> ShardStats {
        self.gather(0).await.0
    }

    /// Counters, sizes and the shards' top lists merged, from every shard.
    async fn gather(&self, top: usize) -> (ShardStats, Snapshot) {
        let mut total = ShardStats::default();
        let mut merged = Snapshot::default();
        for mailbox in self.mailboxes() {
            let (tx, rx) = oneshot::channel();
            if mailbox
                .send(ShardMsg::Stats { top, reply: tx })
                .await
                .is_err()
            {
                continue;
            }
            if let Ok((stats, snapshot)) = rx.await {
                add_stats(&mut total, &stats);
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
            locks: lock_counters(&stats),
            sets: set_counters(&stats),
            held: merged.held,
            contended: merged.contended,
            largest_sets: merged.largest_sets,
        }
    }

    /// Counters and the top lists, the lists reused if recent enough.
    async fn top_lists(&self, top: usize) -> (ShardStats, Snapshot) {
        let mut cached = self.inner.top_lists.lock().await;
        if let Some(recent) = cached
            .as_ref()
            .filter(|c| c.top >= top && c.gathered.elapsed() < TOP_LISTS_MAX_AGE)
        {
            let lists = cut(recent.lists.clone(), top);
            drop(cached);
            return (self.stats().await, lists);
        }
        let (stats, merged) = self.gather(top).await;
        let lists = cut(merged, top);
        *cached = Some(TopLists {
            gathered: Instant::now(),
            top,
            lists: lists.clone(),
        });
        (stats, lists)
    }

    /// Resolves once [`Engine::shutdown`] has been called.
    pub async fn shutting_down(&self) {
        let mut shut_down = self.inner.shut_down.subscribe();
        // The sender lives as long as the engine, so this cannot fail.
        let _ = shut_down.wait_for(|shut| *shut).await;
    }

    /// Stops the engine: every waiting request is answered `shutting_down`,
    /// later requests too, and the shard actors end. Returns when they have.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        self.inner.shut_down.send_replace(true);
        for mailbox in self.mailboxes() {
            // An actor that is already gone needs no telling.
            let _ = mailbox.send(ShardMsg::Shutdown).await;
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

fn lock_counters(stats: &ShardStats) -> LockCounters {
    let l = &stats.locks;
    LockCounters {
        held: stats.held as u64,
        waiters: stats.waiters as u64,
        grants: l.grants,
        releases: l.releases,
        expiries: l.expiries,
        disconnects: l.disconnects,
        timeouts: l.timeouts,
        cancellations: l.cancellations,
        busy: l.busy,
    }
}

fn set_counters(stats: &ShardStats) -> SetCounters {
    let s = &stats.sets;
    SetCounters {
        count: stats.set_count as u64,
        members: stats.members as u64,
        created: s.created,
        expired: s.expired,
        torn_down: s.torn_down,
        inserts_new: s.inserts_new,
        inserts_duplicate: s.inserts_duplicate,
    }
}

fn add_stats(total: &mut ShardStats, shard: &ShardStats) {
    let (t, s) = (&mut total.locks, &shard.locks);
    t.grants += s.grants;
    t.releases += s.releases;
    t.expiries += s.expiries;
    t.disconnects += s.disconnects;
    t.timeouts += s.timeouts;
    t.cancellations += s.cancellations;
    t.busy += s.busy;
    t.abandoned += s.abandoned;
    let (t, s) = (&mut total.sets, &shard.sets);
    t.created += s.created;
    t.expired += s.expired;
    t.torn_down += s.torn_down;
    t.inserts_new += s.inserts_new;
    t.inserts_duplicate += s.inserts_duplicate;
    total.held += shard.held;
    total.waiters += shard.waiters;
    total.set_count += shard.set_count;
    total.members += shard.members;
}
