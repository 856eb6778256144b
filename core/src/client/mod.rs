//! The client side, shared by every transport.
//!
//! A transport implements two small async traits: [`Connector`] (open a
//! connection to the server) and [`Connection`] (send one request, await
//! its reply). Everything else lives here once, for every transport:
//! the `hello` handshake with a client id kept across reconnects, request
//! ids, reconnecting and retrying after a lost connection, failing over
//! between several servers ([`failover`]), lock guards with a conservative
//! lease view and auto-renewal ([`lock`]; shared locks too), counting
//! semaphores with permit guards ([`semaphore`]), and distinct-set handles
//! ([`set`]). The CLI, the benchmark and the simulation hold a [`Client`]
//! and never know which transport is under it.
//!
//! Every operation of protocol version 1 is safe to retry for the client
//! that sent it (SPEC sections 2 and 3): a retried `lock` returns the same
//! token, a retried `insert` the same `first`. So after a lost connection
//! the client retries the request on a new connection, until the retry
//! budget ([`ClientOptions::retry_for`]) runs out. A server that answers
//! `unavailable` (no quorum or no leader, a full disk) or `shutting_down`
//! is left: the client drops that connection, asks its connector to [fail
//! over](Connector::fail_over), backs off, and retries on a new connection,
//! within the same budget and with the same client id; so is a `hello`
//! answered so, even the first one, in [`Client::connect`]. `overloaded`
//! is retried on the same connection.

pub mod events;
pub mod failover;
pub mod hedge;
pub mod local;
pub mod lock;
pub mod semaphore;
pub mod set;

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::proto::{
    Empty, ErrorCode, FromOkay, Inserted, InsertedMany, LockInfo, Okay, Op, OpKind, Outcome,
    Request, ServerError, SetOp, StatsReply,
};
use crate::shard::hasher::KeyHasher;
pub use events::{EventFeed, Watch};
pub use failover::FailoverConnector;
pub use hedge::{HedgeOptions, HedgeStats};
pub use local::LocalConnector;
pub use lock::{LockGuard, LockOptions};
pub use semaphore::{Permit, Semaphore};
pub use set::DistinctSet;

/// How a transport failed to carry a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No connection could be opened.
    #[error("cannot connect to {server}: {reason}")]
    Connect {
        /// The server's address.
        server: String,
        /// Why not.
        reason: String,
    },
    /// The connection broke while the request was in flight: it may or may
    /// not have been carried out.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The server sent something that is not a valid reply.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// One open connection to a server.
#[async_trait]
pub trait Connection: Send + Sync {
    /// Sends `request` and waits for its reply. If the future is dropped
    /// first, a waiting `lock` is cancelled on the server.
    async fn call(&self, request: Request) -> Result<Outcome, TransportError>;

    /// Whether the connection still works, as far as the transport knows.
    fn is_open(&self) -> bool;

    /// Resolves once the connection has closed (at once if it has). The
    /// server releases a connection's ephemeral locks when it closes, so an
    /// ephemeral [`LockGuard`] watches this.
    async fn closed(&self);

    /// Whether a copy of a request can overtake a lost packet of the
    /// original on this connection, so that hedging helps: true where each
    /// request travels on its own stream (QUIC), false over one ordered
    /// byte stream (the default).
    fn hedges(&self) -> bool {
        false
    }

    /// [`Connection::call`], also setting `delivered` (if given) once the
    /// transport knows that the server has received the whole request
    /// (QUIC: its stream data acknowledged). By default it never knows.
    async fn call_noting_delivery(
        &self,
        request: Request,
        delivered: Option<&std::sync::atomic::AtomicBool>,
    ) -> Result<Outcome, TransportError> {
        let _ = delivered;
        self.call(request).await
    }

    /// Sends `request`, which asks for pushed events (a `watch`, a `lock`
    /// with `notify`), and returns its reply with the feed of its events
    /// if it succeeded (SPEC section 7). By default the transport carries
    /// none, and says so.
    async fn subscribe(
        &self,
        request: Request,
    ) -> Result<(Outcome, Option<EventFeed>), TransportError> {
        let _ = request;
        Err(TransportError::Protocol(
            "this transport does not carry pushed events".to_owned(),
        ))
    }
}

/// Opens connections to one server.
#[async_trait]
pub trait Connector: Send + Sync + 'static {
    /// Opens a new connection.
    async fn connect(&self) -> Result<Arc<dyn Connection>, TransportError>;

    /// The server's address, for messages.
    fn server(&self) -> String;

    /// The server behind the last connection answered that it cannot
    /// serve now (`unavailable`, `shutting_down`), and the client dropped
    /// that connection: the next [`Connector::connect`] should try another
    /// server first, if this connector knows one ([`FailoverConnector`]).
    /// By default, nothing: the next connect goes where the last one did.
    fn fail_over(&self) {}
}

/// What a client call can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The server answered with an error. (Not its `source` as well: a
    /// report of the error chain would say the server's message twice.)
    #[error("server: {0}")]
    Server(ServerError),
    /// The request could not be carried, even after retrying.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The server's reply did not fit the request.
    #[error("unexpected reply to {op}: {reply}")]
    UnexpectedReply {
        /// The op of the request.
        op: &'static str,
        /// The reply.
        reply: String,
    },
}

impl From<ServerError> for Error {
    fn from(error: ServerError) -> Error {
        Error::Server(error)
    }
}

impl Error {
    /// The server's error code, if the server answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server(e) => Some(e.code),
            _ => None,
        }
    }
}

/// How a client behaves.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The client id; by default a random 128-bit hex id, kept for the life
    /// of the client across reconnects.
    pub client_id: Option<String>,
    /// How long to keep retrying a request while no connection works
    /// (counted from the last moment one did).
    pub retry_for: Duration,
    /// The first delay between retries; it doubles up to `retry_delay_max`.
    pub retry_delay: Duration,
    /// The longest delay between retries.
    pub retry_delay_max: Duration,
    /// The principal's secret, said in every `hello`, for a server that
    /// authenticates its clients (SPEC section 10).
    pub auth: Option<crate::proto::Secret>,
    /// Hedged requests, where the transport gains from them (QUIC): see
    /// [`hedge`]. `None`: never.
    pub hedging: Option<HedgeOptions>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            client_id: None,
            retry_for: Duration::from_secs(30),
            retry_delay: Duration::from_millis(20),
            retry_delay_max: Duration::from_secs(1),
            auth: None,
            hedging: Some(HedgeOptions::default()),
        }
    }
}

/// A random 128-bit client id in hex.
pub fn random_client_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: fall back to the clock and the process id,
        // unique enough to tell clients apart, which is all an id must do.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = (nanos ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A deadbolt client over any transport. Cheap to clone; clones share the
/// connection and the client id.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    connector: Box<dyn Connector>,
    client_id: String,
    options: ClientOptions,
    current: Mutex<Option<Arc<dyn Connection>>>,
    /// Held while a new connection is being opened, so that concurrent
    /// callers share one reconnect.
    reconnecting: tokio::sync::Mutex<()>,
    next_request: AtomicU64,
    releases: lock::Releases,
    /// `None` without hedging.
    hedger: Option<hedge::Hedger>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.inner.connector.server())
            .field("client_id", &self.inner.client_id)
            .finish()
    }
}

/// A reply and what the client knows of when and where it was made.
pub(crate) struct Timed<T> {
    /// The reply, of the shape its op's reply has.
    pub reply: T,
    /// When the attempt that got this reply was sent: the reply's effect
    /// (a grant, a lease restart) happened after it.
    pub sent_at: Instant,
    /// The connection that carried the answered attempt: an ephemeral grant
    /// lives only as long as it.
    pub connection: Arc<dyn Connection>,
    /// For a request that asked for events: their feed.
    pub events: Option<EventFeed>,
}

impl Client {
    /// Connects through `connector` and says `hello`.
    pub async fn connect(
        connector: impl Connector,
        options: ClientOptions,
    ) -> Result<Client, Error> {
        let client_id = options.client_id.clone().unwrap_or_else(random_client_id);
        let hedger = options.hedging.clone().map(hedge::Hedger::new);
        let client = Client {
            inner: Arc::new(ClientInner {
                connector: Box::new(connector),
                client_id,
                options,
                current: Mutex::new(None),
                reconnecting: tokio::sync::Mutex::new(()),
                next_request: AtomicU64::new(1),
                releases: lock::Releases::default(),
                hedger,
            }),
        };
        client.first_connection().await?;
        Ok(client)
    }

    /// Opens the first connection. A `hello` answered `unavailable` or
    /// `shutting_down` (a cluster node between leaders, a full disk, a node
    /// stopping) is retried, failing over, within `retry_for`, as any
    /// request is; a server that cannot be reached at all is an error at
    /// once, so that a wrong address does not hang.
    async fn first_connection(&self) -> Result<(), Error> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            match self.connection().await {
                Ok(_) => return Ok(()),
                Err(Error::Server(refused))
                    if cannot_serve(&refused)
                        && started.elapsed() < self.inner.options.retry_for =>
                {
                    tracing::debug!(error = %refused, attempt, "hello refused; retrying");
                    tokio::time::sleep(self.backoff(attempt)).await;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// This client's id.
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// What hedging has done so far (all zero without it, or over a
    /// transport it does not help).
    pub fn hedge_stats(&self) -> HedgeStats {
        self.inner
            .hedger
            .as_ref()
            .map_or_else(HedgeStats::default, hedge::Hedger::stats)
    }

    /// The server's address.
    pub fn server(&self) -> String {
        self.inner.connector.server()
    }

    fn current(&self) -> Option<Arc<dyn Connection>> {
        let current = self.inner.current.lock().unwrap_or_else(|p| p.into_inner());
        current.as_ref().filter(|c| c.is_open()).cloned()
    }

    /// The open connection, opening one (and saying `hello`) if needed.
    async fn connection(&self) -> Result<Arc<dyn Connection>, Error> {
        if let Some(connection) = self.current() {
            return Ok(connection);
        }
        let _reconnecting = self.inner.reconnecting.lock().await;
        if let Some(connection) = self.current() {
            return Ok(connection);
        }
        let connection = self.inner.connector.connect().await?;
        let hello = Request {
            id: self.next_request_id(),
            op: Op::Hello {
                client: self.inner.client_id.clone(),
                auth: self.inner.options.auth.clone(),
            },
        };
        if let Err(error) = connection.call(hello).await? {
            if cannot_serve(&error) {
                self.inner.connector.fail_over();
            }
            return Err(error.into());
        }
        *self.inner.current.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Arc::clone(&connection));
        Ok(connection)
    }

    /// Stops using `broken` for new requests; `true` if it was still the
    /// current connection (so only one caller acts on its failure).
    fn forget(&self, broken: &Arc<dyn Connection>) -> bool {
        let mut current = self.inner.current.lock().unwrap_or_else(|p| p.into_inner());
        let was_current = current.as_ref().is_some_and(|c| Arc::ptr_eq(c, broken));
        if was_current {
            *current = None;
        }
        was_current
    }

    /// Leaves the server behind `connection`, which said it cannot serve
    /// now: new requests go to a new connection, through the connector's
    /// next server. Requests still in flight on it (a waiting `lock`) and
    /// the ephemeral locks it carries keep it open until they are done.
    fn leave(&self, connection: &Arc<dyn Connection>) {
        if self.forget(connection) {
            self.inner.connector.fail_over();
        }
    }

    fn next_request_id(&self) -> u64 {
        self.inner.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends `op` and returns the server's answer, retrying on a new
    /// connection while the connection fails and the retry budget lasts.
    pub async fn call(&self, op: Op) -> Result<Okay, Error> {
        self.request(op).await
    }

    /// [`Client::call`], reading the reply as `T`: the shape of the reply
    /// to `op`.
    pub(crate) async fn request<T: FromOkay>(&self, op: Op) -> Result<T, Error> {
        self.call_timed(op).await.map(|timed| timed.reply)
    }

    /// [`Client::request`], saying when the answered attempt was sent.
    pub(crate) async fn call_timed<T: FromOkay>(&self, op: Op) -> Result<Timed<T>, Error> {
        self.call_adapting(|_| op.clone()).await
    }

    /// [`Client::call_timed`] with the op built anew for each attempt by
    /// `make_op`, which is told which attempt it is.
    pub(crate) async fn call_adapting<T: FromOkay>(
        &self,
        make_op: impl FnMut(Attempt) -> Op,
    ) -> Result<Timed<T>, Error> {
        self.call_with(make_op, false).await
    }

    /// [`Client::call_adapting`]; with `subscribe`, for an op that asks
    /// for pushed events, whose feed comes back in [`Timed::events`].
    pub(crate) async fn call_with<T: FromOkay>(
        &self,
        mut make_op: impl FnMut(Attempt) -> Op,
        subscribe: bool,
    ) -> Result<Timed<T>, Error> {
        // The retry budget counts time without a working connection: it
        // starts at the first failure, and starts again whenever a request
        // had been carried (the connection was up until it broke), so a
        // lock that waited a long time and then lost its connection is
        // still retried.
        let mut offline_since: Option<Instant> = None;
        let mut attempt = Attempt::default();
        loop {
            let op = make_op(attempt);
            let sent_at = Instant::now();
            let error = match self.try_once(op, subscribe).await {
                Ok((reply, connection, events)) => {
                    return Ok(Timed {
                        reply,
                        sent_at,
                        connection,
                        events,
                    });
                }
                Err(error) => error,
            };
            let Some(retry) = Retry::after(&error) else {
                return Err(error);
            };
            let since = match offline_since {
                Some(since) if !retry.restarts_budget => since,
                _ => Instant::now(),
            };
            offline_since = Some(since);
            if since.elapsed() >= self.inner.options.retry_for {
                return Err(error);
            }
            tracing::debug!(%error, attempt = attempt.number, "retrying");
            tokio::time::sleep(self.backoff(attempt.number)).await;
            attempt = attempt.next(retry.may_have_run);
        }
    }

    async fn try_once<T: FromOkay>(
        &self,
        op: Op,
        subscribe: bool,
    ) -> Result<(T, Arc<dyn Connection>, Option<EventFeed>), Error> {
        let connection = self.connection().await?;
        let kind = op.kind();
        let request = Request {
            id: self.next_request_id(),
            op,
        };
        let mut events = None;
        let outcome = match &self.inner.hedger {
            _ if subscribe => connection.subscribe(request).await.map(|(outcome, feed)| {
                events = feed;
                outcome
            }),
            Some(hedger) if hedge::Hedger::applies(connection.as_ref(), &request.op) => {
                let copy_id = self.next_request_id();
                hedger.call(connection.as_ref(), request, copy_id).await
            }
            _ => connection.call(request).await,
        };
        match outcome {
            Ok(Ok(okay)) => {
                if subscribe && events.is_none() {
                    return Err(events::no_feed());
                }
                Ok((reply_as(kind, okay)?, connection, events))
            }
            Ok(Err(refused)) => {
                if cannot_serve(&refused) {
                    self.leave(&connection);
                }
                Err(refused.into())
            }
            Err(error) => {
                self.forget(&connection);
                Err(error.into())
            }
        }
    }

    /// Exponential backoff with a jitter drawn from the client id, so that a
    /// fleet does not retry in step, yet one client's run is reproducible.
    fn backoff(&self, attempt: u32) -> Duration {
        let options = &self.inner.options;
        let base = options
            .retry_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(options.retry_delay_max);
        let jitter = KeyHasher::with_seed(u64::from(attempt)).hash_one(&self.inner.client_id);
        // Between half and all of `base`.
        base / 2 + base.mul_f64((jitter % 1024) as f64 / 2048.0)
    }

    /// `ping`: a round trip to the server.
    pub async fn ping(&self) -> Result<(), Error> {
        self.request::<Empty>(Op::Ping).await.map(|_| ())
    }

    /// `inspect`: who holds `key` and how many wait for it.
    pub async fn inspect(&self, key: &str) -> Result<LockInfo, Error> {
        let op = Op::Lock(crate::proto::LockOp::Inspect {
            key: key.to_owned(),
        });
        self.request(op).await
    }

    /// `stats`: counters, sizes and the `top` held locks, contended keys
    /// and largest sets.
    pub async fn stats(&self, top: u32) -> Result<StatsReply, Error> {
        let stats: Box<StatsReply> = self.request(Op::Stats { top }).await?;
        Ok(*stats)
    }

    /// A handle on the distinct set `name`.
    pub fn set(&self, name: &str) -> DistinctSet {
        DistinctSet::new(self.clone(), name)
    }

    /// Inserts keys into `set`, one request; used by [`DistinctSet`].
    pub(crate) async fn insert_batch(
        &self,
        set: &str,
        keys: Vec<String>,
    ) -> Result<Vec<Inserted>, Error> {
        let op = Op::Set(SetOp::Insert {
            set: set.to_owned(),
            keys: crate::proto::Keys::Many(keys),
        });
        let many: InsertedMany = self.request(op).await?;
        Ok(many.results)
    }
}

/// Which attempt of a request the retry loop is making, for an op that
/// depends on it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Attempt {
    /// 0 for the first.
    pub number: u32,
    /// Whether an earlier attempt may have been carried out: it was sent
    /// and answered by no reply of its own (its connection broke), or by
    /// `unavailable` or `shutting_down`, which do not promise that nothing
    /// changed. (`overloaded` does, and a failed connect sent nothing.)
    pub earlier_may_have_run: bool,
}

impl Attempt {
    fn next(self, this_may_have_run: bool) -> Attempt {
        Attempt {
            number: self.number + 1,
            earlier_may_have_run: self.earlier_may_have_run || this_may_have_run,
        }
    }
}

/// How a failed attempt is retried.
#[derive(Debug, Clone, Copy)]
struct Retry {
    /// A connection worked until the attempt failed, so the outage (and the
    /// retry budget) starts now, rather than going on.
    restarts_budget: bool,
    /// The attempt may have been carried out.
    may_have_run: bool,
}

impl Retry {
    /// How to retry after `error`; `None` if `error` is the answer.
    fn after(error: &Error) -> Option<Retry> {
        let (restarts_budget, may_have_run) = match error {
            // The request was on a connection that then failed: retry on a
            // new connection.
            Error::Transport(TransportError::Lost(_)) => (true, true),
            // The server is going away (answering what it had in flight,
            // which may have been carried out): retry on a new connection,
            // to another server if there is one.
            Error::Server(e) if e.code == ErrorCode::ShuttingDown => (true, true),
            // No connection could be opened, or the server refused the work
            // at the door (`overloaded`): the outage goes on.
            Error::Transport(TransportError::Connect { .. }) => (false, false),
            Error::Server(e) if e.code == ErrorCode::Overloaded => (false, false),
            // No quorum or no leader, a full disk: the outage goes on. In a
            // cluster a follower also answers it when its link to the
            // leader broke with the request on it, which the leader may
            // have carried out (docs/protocol.md).
            Error::Server(e) if e.code == ErrorCode::Unavailable => (false, true),
            _ => return None,
        };
        Some(Retry {
            restarts_budget,
            may_have_run,
        })
    }
}

/// Whether `error` says the server cannot serve now, so that another server
/// (or a new connection) should be tried.
fn cannot_serve(error: &ServerError) -> bool {
    matches!(error.code, ErrorCode::Unavailable | ErrorCode::ShuttingDown)
}

/// Checks that a reply has the shape of the reply to its request (of
/// kind `kind`), and reads it as `T`.
fn reply_as<T: FromOkay>(kind: OpKind, okay: Okay) -> Result<T, Error> {
    if !kind.expects(&okay) {
        return Err(unexpected(kind, &okay));
    }
    // A `T` of another shape than the op's reply would be a bug here.
    T::from_okay(okay).map_err(|other| unexpected(kind, &other))
}

fn unexpected(kind: OpKind, okay: &Okay) -> Error {
    Error::UnexpectedReply {
        op: kind.wire_name(),
        reply: format!("{okay:?}"),
    }
}
