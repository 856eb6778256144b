//! A worker host: the real Rust client running a plan of lock-guarded
//! counter steps (some with a re-lock, some cancelled while waiting),
//! distinct dedup steps (some retried) and abandoned ephemeral locks,
//! recording everything it does and believes. A crashed worker restarts at the step it was in, with the
//! same client id, as a queue consumer whose message is redelivered would.
//! A request the server refuses (`unavailable`: its disk is full) changed
//! nothing: a counter step that is refused its lock ends, an insert is
//! asked again. A request in flight when the server crashes is retried by
//! the client on a new connection, with the same client id. In a cluster a
//! worker is given every node, its own first, and the client fails over
//! between them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadbolt_core::client::{
    Client, ClientOptions, Connector, Error, FailoverConnector, LockGuard, LockOptions,
};
use deadbolt_core::proto::{Acquire, LockOp, Op, Wait as WaitFor};
use deadbolt_transport_quic::QuicConnector;
use deadbolt_transport_ws::{WsClientConfig, WsConnector};

use crate::history::{Actor, History, What, micros, now_us};
use crate::net::{SimDialer, quic_client_config, quic_endpoint};
use crate::resource;
use crate::scenario::{
    CounterStep, Guard, LOCK_KEYS, SET, Scenario, Step, Transport, Wait, watched_key,
};
use crate::tap::TapConnector;

/// The WebSocket port of the server (and of the planted-bug proxy).
pub const WS_PORT: u16 = 7420;
/// The QUIC port of the server.
pub const QUIC_PORT: u16 = 7421;

/// What every host of a run shares.
#[derive(Clone)]
pub struct Shared {
    /// The history.
    pub history: History,
    /// The run's scenario.
    pub scenario: Arc<Scenario>,
    /// Per worker, the step it is in (the next one, once a step is done).
    pub progress: Arc<Mutex<Vec<usize>>>,
    /// The server certificate, for QUIC clients.
    pub ca_pem: Arc<Vec<u8>>,
    /// The hosts workers connect to: the server, or a cluster's nodes;
    /// worker `me` tries the `me % len`-th first (workers are spread over
    /// the nodes) and fails over to the next.
    pub servers: Arc<Vec<String>>,
    /// Whether WebSocket workers connect to the planted-bug proxy instead.
    pub proxied: bool,
    /// Whether the Rust-client workers' connections are tapped
    /// ([`crate::tap`]): in a cluster, for its lease rules.
    pub tap: bool,
}

impl Shared {
    /// The hosts worker `me` may send its requests to, in the order it
    /// tries them: its home first, then (in a cluster) each other node.
    pub fn hosts(&self, me: usize) -> Vec<&str> {
        let n = self.servers.len();
        (0..n)
            .map(|i| self.servers[(me + i) % n].as_str())
            .collect()
    }

    /// The hosts worker `me` opens WebSocket connections to: as
    /// [`Shared::hosts`], or the proxy.
    pub fn ws_hosts(&self, me: usize) -> Vec<&str> {
        if self.proxied {
            vec!["proxy"]
        } else {
            self.hosts(me)
        }
    }

    /// Whether every worker has finished its plan.
    pub fn all_done(&self) -> bool {
        let progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        self.scenario
            .workers
            .iter()
            .zip(progress.iter())
            .all(|(plan, &at)| at >= plan.steps.len())
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The name of a result key.
pub fn result_key(index: usize) -> String {
    format!("r{index:02}")
}

/// Runs worker `me` until its plan is done.
pub async fn run(shared: Shared, me: usize) -> turmoil::Result {
    if shared.scenario.workers[me].transport == Transport::Raw {
        return crate::raw::run(shared, me).await;
    }
    let record = |what| shared.history.record(Actor::Worker(me), what);
    record(What::Started);
    let client = connect(&shared, me, format!("worker-{me}"), 10).await;
    // Once the set refused a key (a run with small limits), later result
    // keys are left out: each refusal costs the client's few seconds of
    // retries, and the limit has been reached and judged.
    let mut set_full = false;
    loop {
        let at = shared.progress.lock().unwrap_or_else(|p| p.into_inner())[me];
        let Some(step) = shared.scenario.workers[me].steps.get(at) else {
            break;
        };
        match step {
            Step::Counter(plan) => {
                let counter = Counter {
                    client: &client,
                    history: &shared.history,
                    me,
                    key: plan.key_name(),
                };
                counter.run(*plan).await;
            }
            Step::Dedup {
                keys,
                work_ms,
                retry,
            } if !set_full => {
                let set_ttl = ms(shared.scenario.set_ttl_ms);
                let plan = DedupPlan {
                    keys,
                    work_ms: *work_ms,
                    retry: *retry,
                    set_ttl,
                };
                set_full = !dedup(&client, &shared.history, me, plan).await;
            }
            Step::Dedup { .. } => {}
            Step::Abandon { key, ttl_ms } => {
                abandon(&shared, me, at, LOCK_KEYS[*key], *ttl_ms).await;
            }
            Step::Scratch {
                ttl_ms,
                pause_ms,
                tear_down,
            } => {
                let plan = ScratchPlan {
                    ttl: ms(*ttl_ms),
                    pause: ms(*pause_ms),
                    tear_down: *tear_down,
                };
                scratch(&client, me, at, plan).await;
            }
            Step::Watch { key, for_ms } => {
                watch(&client, &shared.history, me, watched_key(*key), ms(*for_ms)).await;
            }
        }
        shared.progress.lock().unwrap_or_else(|p| p.into_inner())[me] = at + 1;
    }
    record(What::Done);
    Ok(())
}

/// Connects worker `me` as `client_id`, retrying until a server answers
/// (in a cluster, failing over from its home node to the others). A QUIC
/// endpoint's connection ids are drawn from `quic_host + me`, so each
/// endpoint of a worker needs a `quic_host` of its own.
async fn connect(shared: &Shared, me: usize, client_id: String, quic_host: u8) -> Client {
    let options = ClientOptions {
        client_id: Some(client_id),
        retry_for: Duration::from_secs(3),
        retry_delay: ms(50),
        retry_delay_max: ms(500),
        ..ClientOptions::default()
    };
    loop {
        let connected = match shared.scenario.workers[me].transport {
            Transport::Ws | Transport::Raw => match ws_connectors(shared, me) {
                Ok(connectors) => connect_over(shared, me, connectors, options.clone()).await,
                Err(e) => Err(e.into()),
            },
            Transport::Quic => connect_quic(shared, me, quic_host, options.clone()).await,
        };
        match connected {
            Ok(client) => return client,
            Err(_) => tokio::time::sleep(ms(200)).await,
        }
    }
}

/// A WebSocket connector per host worker `me` may use, in its order.
fn ws_connectors(
    shared: &Shared,
    me: usize,
) -> Result<Vec<Arc<dyn Connector>>, deadbolt_core::client::TransportError> {
    let config = WsClientConfig {
        connect_timeout: ms(1000),
        ping_interval: ms(250),
        silence_timeout: ms(1000),
        ..WsClientConfig::default()
    };
    let mut connectors: Vec<Arc<dyn Connector>> = Vec::new();
    for host in shared.ws_hosts(me) {
        let url = format!("ws://{host}:{WS_PORT}/ws");
        let connector = WsConnector::with_dialer(&url, SimDialer)?.config(config.clone());
        connectors.push(Arc::new(connector));
    }
    Ok(connectors)
}

/// A client on `connectors`, failing over between the nodes of a cluster
/// in their order (over the one server, a failover connector is that
/// server's connector).
async fn connect_over(
    shared: &Shared,
    me: usize,
    connectors: Vec<Arc<dyn Connector>>,
    options: ClientOptions,
) -> Result<Client, Error> {
    match FailoverConnector::new(connectors) {
        Some(failover) => connect_tapped(shared, me, failover, options).await,
        None => unreachable!("there is a server"),
    }
}

async fn connect_quic(
    shared: &Shared,
    me: usize,
    quic_host: u8,
    options: ClientOptions,
) -> Result<Client, Error> {
    let lost = |e: String| {
        Error::Transport(deadbolt_core::client::TransportError::Connect {
            server: "server".into(),
            reason: e,
        })
    };
    let host = quic_host + me as u8;
    let endpoint = quic_endpoint(0, shared.scenario.seed, host, None)
        .await
        .map_err(|e| lost(e.to_string()))?;
    let config = quic_client_config(&shared.ca_pem, host).map_err(|e| lost(e.to_string()))?;
    let connectors = shared
        .hosts(me)
        .into_iter()
        .map(|host| {
            let server = SocketAddr::new(turmoil::lookup(host), QUIC_PORT);
            let connector =
                QuicConnector::new(endpoint.clone(), config.clone(), server, "localhost");
            Arc::new(connector) as Arc<dyn Connector>
        })
        .collect();
    connect_over(shared, me, connectors, options).await
}

/// A client on `connector`, tapped if the run taps its workers.
async fn connect_tapped(
    shared: &Shared,
    me: usize,
    connector: impl Connector,
    options: ClientOptions,
) -> Result<Client, Error> {
    if shared.tap {
        let tapped = TapConnector::new(connector, shared.history.clone(), me);
        return Client::connect(tapped, options).await;
    }
    Client::connect(connector, options).await
}

/// One lock-guarded counter step.
struct Counter<'a> {
    client: &'a Client,
    history: &'a History,
    me: usize,
    key: &'static str,
}

impl Counter<'_> {
    fn record(&self, what: What) {
        self.history.record(Actor::Worker(self.me), what);
    }

    fn valid_until_us(guard: &LockGuard) -> u64 {
        now_us() + micros(guard.valid_for())
    }

    async fn run(&self, plan: CounterStep) {
        let CounterStep {
            key: _,
            ttl_ms,
            wait,
            hold_ms,
            extend,
            ephemeral,
            relock,
            cancel_after_ms,
            guard: kind,
            lock_delay_ms,
            notify,
        } = plan;
        let key = self.key.to_owned();
        let wait_ms = match wait {
            Wait::Forever => None,
            Wait::Try => Some(0),
            Wait::UpTo(ms) => Some(ms),
        };
        self.record(What::LockAsked {
            key: key.clone(),
            ttl_ms,
            wait_ms,
            ephemeral,
        });
        let mut options = LockOptions::new(ms(ttl_ms))
            .ephemeral(ephemeral)
            .lock_delay(ms(lock_delay_ms))
            .notify(notify);
        options.mode = plan.mode();
        if let Some(wait_ms) = wait_ms {
            options = options.wait(ms(wait_ms));
        }
        let locking = self.client.lock_with(self.key, options);
        let locked = match cancel_after_ms {
            // Dropping the request cancels it on the server.
            Some(after) => match tokio::time::timeout(ms(after), locking).await {
                Ok(locked) => locked,
                Err(_) => return self.record(What::NotGranted { key }),
            },
            None => locking.await,
        };
        let guard = match locked {
            Ok(Some(guard)) => guard,
            Ok(None) => return self.record(What::NotGranted { key }),
            Err(e) => {
                return self.record(What::LockFailed {
                    key,
                    error: e.to_string(),
                });
            }
        };
        let token = guard.token();
        self.record(What::Granted {
            key: key.clone(),
            token,
            valid_until_us: Self::valid_until_us(&guard),
            shared: kind == Guard::Reader,
        });
        // The worker may be stuck in a call to the resource when its guard
        // is lost (an ephemeral lock whose connection closed): its belief
        // ends when the client knows, not when the worker next looks.
        let watcher = {
            let (lost, history, me) = (guard.lost_signal(), self.history.clone(), self.me);
            let key = key.clone();
            tokio::spawn(async move {
                lost.await;
                history.record(Actor::Worker(me), What::Lost { key, token });
            })
        };
        // A permit's holders are many at once: they touch no counter.
        let value = match kind {
            Guard::Permit => None,
            _ => self.fenced_read(&guard).await,
        };
        if relock {
            self.relock(plan, ephemeral).await;
        }
        tokio::time::sleep(ms(hold_ms / 2)).await;
        let mut believed = true;
        if extend {
            match guard.extend(ms(ttl_ms)).await {
                Ok(()) => self.record(What::Extended {
                    key: key.clone(),
                    token,
                    valid_until_us: Self::valid_until_us(&guard),
                }),
                Err(e) => {
                    believed = false;
                    self.record(What::ExtendFailed {
                        key: key.clone(),
                        token,
                        error: e.to_string(),
                    });
                }
            }
        }
        tokio::time::sleep(ms(hold_ms - hold_ms / 2)).await;
        let writes = matches!(kind, Guard::Mutex | Guard::Writer);
        if let Some(value) = value.filter(|_| writes && believed && guard.is_held()) {
            self.fenced_write(token, value + 1).await;
        }
        watcher.abort();
        self.record(What::Released {
            key: key.clone(),
            token,
        });
        let ok = guard.unlock().await.is_ok();
        self.record(What::Unlocked { key, token, ok });
    }

    /// Asks for the held lock again, as a retry after a lost reply would:
    /// the server answers the same token and restarts the lease (the
    /// guard's own, shorter view of the lease stays what the worker
    /// believes). If the lease has run out meanwhile, this may be a new
    /// grant nobody uses; it runs out in its turn.
    async fn relock(&self, plan: CounterStep, ephemeral: bool) {
        let op = Op::Lock(LockOp::Acquire(Acquire {
            key: self.key.to_owned(),
            ttl_ms: plan.ttl_ms,
            wait: WaitFor::Never,
            ephemeral,
            mode: plan.mode(),
            lock_delay_ms: plan.lock_delay_ms,
            notify: false,
        }));
        let _ = self.client.call(op).await;
    }

    async fn fenced_read(&self, guard: &LockGuard) -> Option<u64> {
        if !guard.is_held() {
            return None;
        }
        resource::recorded_read(self.history, self.me, self.key, guard.token()).await
    }

    async fn fenced_write(&self, token: u64, value: u64) {
        resource::recorded_write(self.history, self.me, self.key, token, value).await;
    }
}

/// What a dedup step does.
struct DedupPlan<'a> {
    keys: &'a [usize],
    work_ms: u64,
    retry: bool,
    set_ttl: Duration,
}

/// One dedup step: insert the keys (retrying until the server answers),
/// maybe insert them again (a retry whose first reply was lost), and
/// process every key this worker owns. Whether every key was inserted
/// (none refused `overloaded`).
async fn dedup(client: &Client, history: &History, me: usize, plan: DedupPlan<'_>) -> bool {
    let record = |what| history.record(Actor::Worker(me), what);
    let names: Vec<String> = plan.keys.iter().map(|&k| result_key(k)).collect();
    let results = insert(client, history, me, &names, plan.set_ttl).await;
    let all_in = results.iter().all(Option::is_some);
    if plan.retry && all_in {
        // The checker compares both answers: same index, and `first` only
        // ever to one worker.
        insert(client, history, me, &names, plan.set_ttl).await;
    }
    for (key, result) in names.iter().zip(&results) {
        if result.is_some_and(|r| r.first) {
            // Processing takes time: a crash here leaves the key to the
            // restarted worker.
            tokio::time::sleep(ms(plan.work_ms)).await;
            record(What::Processed {
                set: SET.into(),
                key: key.clone(),
            });
        }
    }
    all_in
}

/// A scratch set (see [`Step::Scratch`]), named for the worker and the
/// step. Nothing here is recorded: the server-side checker judges when the
/// set ends. Each request has a bounded time, so that a fault cannot keep
/// the worker on a set nobody else needs.
async fn scratch(client: &Client, me: usize, step: usize, plan: ScratchPlan) {
    let ScratchPlan {
        ttl,
        pause,
        tear_down,
    } = plan;
    let set = client.set(&format!("scratch-{me}-{step}"));
    let set_up_and_insert = |key: &'static str| {
        let set = &set;
        async move {
            set.set_up(ttl).await?;
            set.insert(key).await
        }
    };
    let bound = ms(2_000);
    let _ = tokio::time::timeout(bound, set_up_and_insert("a")).await;
    tokio::time::sleep(pause).await;
    let again = tokio::time::timeout(bound, set.insert("b")).await;
    if let Ok(Err(error)) = again
        && error.code() == Some(deadbolt_core::proto::ErrorCode::NoSuchSet)
    {
        let _ = tokio::time::timeout(bound, set_up_and_insert("b")).await;
    }
    if tear_down {
        let _ = tokio::time::timeout(bound, set.tear_down()).await;
    }
}

/// A [`Step::Watch`]: watches `key` for `span`, recording each event it
/// hears, then drops the watch (a `cancel`). A watch that cannot be set up
/// (a fault) is given up: the step is for the events checker, which judges
/// only what was heard.
async fn watch(client: &Client, history: &History, me: usize, key: &str, span: Duration) {
    let record = |what| history.record(Actor::Worker(me), what);
    let until = tokio::time::Instant::now() + span;
    let Ok(Ok(mut watch)) = tokio::time::timeout_at(until, client.watch_key(key)).await else {
        return;
    };
    record(What::Watching {
        key: key.to_owned(),
    });
    while let Ok(Some(event)) = tokio::time::timeout_at(until, watch.next()).await {
        record(What::Pushed {
            key: key.to_owned(),
            token: event.token.unwrap_or(0),
            event: event_name(event.event).to_owned(),
            reason: None,
            remaining_ms: None,
            watch: true,
        });
    }
    record(What::Unwatched {
        key: key.to_owned(),
    });
}

/// The protocol's name of an event.
pub fn event_name(name: deadbolt_core::proto::EventName) -> &'static str {
    use deadbolt_core::proto::EventName;
    match name {
        EventName::Expiring => "expiring",
        EventName::Lost => "lost",
        EventName::Granted => "granted",
        EventName::Released => "released",
        EventName::Expired => "expired",
        EventName::Created => "created",
        EventName::TornDown => "torn_down",
    }
}

/// A [`Step::Scratch`] as the worker runs it.
struct ScratchPlan {
    ttl: Duration,
    pause: Duration,
    tear_down: bool,
}

/// Sets the set up (restarting its time to live) and inserts `names`,
/// retrying until the server answers; records and returns the answers.
/// A batch refused `overloaded` (a set or the server at a limit, in a run
/// with small limits) may have kept its keys before the refusal, unanswered:
/// each key is then inserted on its own, until one is refused; the refused
/// key and those after it are not inserted (`None`).
async fn insert(
    client: &Client,
    history: &History,
    me: usize,
    names: &[String],
    set_ttl: Duration,
) -> Vec<Option<deadbolt_core::proto::Inserted>> {
    let results = match insert_with_retries(client, history, me, names, set_ttl).await {
        Some(results) => results.into_iter().map(Some).collect(),
        None => {
            // The client retries `overloaded` for a while before it gives
            // up: once a key is refused, the set (or the shard) is full and
            // the rest of the batch is left out.
            let mut results = Vec::new();
            for name in names {
                let one =
                    insert_with_retries(client, history, me, std::slice::from_ref(name), set_ttl);
                match one.await.and_then(|mut one| one.pop()) {
                    Some(inserted) => results.push(Some(inserted)),
                    None => break,
                }
            }
            results.resize(names.len(), None);
            results
        }
    };
    for (key, result) in names.iter().zip(&results) {
        if let Some(result) = result {
            history.record(
                Actor::Worker(me),
                What::Inserted {
                    set: SET.into(),
                    key: key.clone(),
                    index: result.index,
                    first: result.first,
                },
            );
        }
    }
    results
}

/// One batch, retried until the server answers; `None` if it answered
/// `overloaded`.
async fn insert_with_retries(
    client: &Client,
    history: &History,
    me: usize,
    names: &[String],
    set_ttl: Duration,
) -> Option<Vec<deadbolt_core::proto::Inserted>> {
    let record = |what| history.record(Actor::Worker(me), what);
    let set = client.set(SET);
    loop {
        record(What::InsertAsked {
            set: SET.into(),
            keys: names.to_vec(),
        });
        let attempt = async {
            set.set_up(set_ttl).await?;
            set.insert_many(names.to_vec()).await
        };
        match attempt.await {
            Ok(results) => return Some(results),
            Err(e) => {
                record(What::InsertFailed {
                    set: SET.into(),
                    error: e.to_string(),
                });
                if e.code() == Some(deadbolt_core::proto::ErrorCode::Overloaded) {
                    return None;
                }
                tokio::time::sleep(ms(100)).await;
            }
        }
    }
}

/// Takes an ephemeral lock on a connection of its own (a client id of
/// this step's own, so no other step's request is a re-lock of it), then
/// closes the connection without an unlock: the server must free the key
/// when the close arrives. The worker stops believing it holds the key
/// before it closes.
async fn abandon(shared: &Shared, me: usize, step: usize, key: &str, ttl_ms: u64) {
    let record = |what| shared.history.record(Actor::Worker(me), what);
    let wait_ms = 2_000;
    record(What::LockAsked {
        key: key.to_owned(),
        ttl_ms,
        wait_ms: Some(wait_ms),
        ephemeral: true,
    });
    let client = connect(shared, me, format!("worker-{me}-abandon-{step}"), 100).await;
    let options = LockOptions::new(ms(ttl_ms))
        .wait(ms(wait_ms))
        .ephemeral(true);
    match client.lock_with(key, options).await {
        Ok(Some(guard)) => {
            let token = guard.token();
            record(What::Granted {
                key: key.to_owned(),
                token,
                valid_until_us: Counter::valid_until_us(&guard),
                shared: false,
            });
            record(What::Abandoned {
                key: key.to_owned(),
                token,
            });
            guard.detach();
            drop(client);
        }
        Ok(None) => record(What::NotGranted {
            key: key.to_owned(),
        }),
        Err(e) => record(What::LockFailed {
            key: key.to_owned(),
            error: e.to_string(),
        }),
    }
}
