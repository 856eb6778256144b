//! The QUIC accept loop and per-stream request handling.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use deadbolt_core::engine::Frontend;
use deadbolt_core::engine::events::{Events, Pushed};
use deadbolt_core::engine::session::{Answers, Unheard};
use deadbolt_core::proto::{Reply, Request, RequestId, ServerError, decode_request};
use deadbolt_core::{Engine, Limits, Session};
use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use quinn::{Endpoint, Incoming, RecvStream, SendStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::config::QuicConfig;
use crate::stream::{
    Arrived, Execute, Finished, ReadEnd, Reading, Unwritten, Work, Written, has_events, reply_now,
};
use crate::tls::{self, Identity, TlsError};

/// The QUIC error code of a connection closed by a shutting-down server.
const CLOSE_SHUTDOWN: u32 = 1;
/// The QUIC close code when a cluster's leader changed under a
/// connection's ephemeral lock.
const CLOSE_LEADER_CHANGED: u32 = 2;
/// The QUIC close code when a connection let its pushed events pile up
/// past its bound (it reads too slowly for them).
const CLOSE_EVENTS_NOT_READ: u32 = 3;
/// Streams a connection accepts before it lets other tasks run: as many
/// requests as `FuturesUnordered` polls in one turn.
const ACCEPTS_PER_TURN: u64 = 32;

/// The server configuration for `identity` and `config`: ALPN `deadbolt/1`,
/// the stream, window, idle and incoming-queue limits.
pub fn server_config(
    identity: Identity,
    config: &QuicConfig,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut server = quinn::ServerConfig::with_crypto(tls::server_crypto(identity)?);
    config.apply_to_server(&mut server);
    Ok(server)
}

/// Serves QUIC clients on `endpoint` until `shutdown` completes.
///
/// Then it stops accepting, answers every request still in flight
/// `shutting_down`, closes every connection and waits (up to
/// [`QuicConfig::shutdown_grace`]) for the peers to hear of it.
pub async fn serve(
    endpoint: Endpoint,
    engine: Engine,
    config: QuicConfig,
    shutdown: impl Future<Output = ()> + Send,
) {
    let (stop, stopped) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                if let Some(incoming) = admit(incoming, connections.len(), &config) {
                    let (engine, stopped) = (engine.clone(), stopped.clone());
                    let allowance = StreamAllowance::new(&config);
                    connections.spawn(connection(incoming, engine, stopped, allowance));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    let _ = stop.send(true);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(config.shutdown_grace, drained)
        .await
        .is_err()
    {
        connections.shutdown().await;
    }
    endpoint.close(CLOSE_SHUTDOWN.into(), b"server shutting down");
    let _ = tokio::time::timeout(config.shutdown_grace, endpoint.wait_idle()).await;
}

/// Lets a connection attempt in, or turns it away: refused past the
/// connection limit, asked to prove its address first under load.
fn admit(incoming: Incoming, open: usize, config: &QuicConfig) -> Option<Incoming> {
    if open >= config.max_connections {
        tracing::warn!(peer = %incoming.remote_address(), "QUIC connection limit reached; refusing");
        incoming.refuse();
        return None;
    }
    if open >= config.retry_above && !incoming.remote_address_validated() {
        match incoming.retry() {
            Ok(()) => return None,
            Err(error) => return Some(error.into_incoming()),
        }
    }
    Some(incoming)
}

/// One QUIC connection: one engine session; its streams' requests run
/// inside this one task, as a WebSocket connection's do.
///
/// Not a task per stream: a task per request costs a spawn, and a burst
/// of streams (an expiry storm's thousands of waiting `lock`s) would be
/// thousands of tasks that each put their request into a shard's mailbox
/// before any shard runs, overflowing it into `overloaded`. Here a
/// connection hands its shards at most a few dozen requests per turn, and
/// the shards run between turns. A request that needs nothing but its
/// shard (see [`Requests`]) costs no future at all.
async fn connection(
    incoming: Incoming,
    engine: Engine,
    mut stopped: watch::Receiver<bool>,
    mut allowance: StreamAllowance,
) {
    let peer = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(error) => {
            tracing::info!(%peer, %error, "QUIC handshake failed");
            return;
        }
    };
    tracing::debug!(%peer, "QUIC connected");
    let session = engine.session_on(Frontend::Quic);
    // Each request's copy, to answer `shutting_down` itself; cloned from
    // this one, which has not seen a shutdown begun since.
    let mut requests = Requests::new(&session, *engine.limits(), stopped.clone());
    let mut streams = FuturesUnordered::new();
    let mut accepted = 0u64;
    // Made once and polled on every turn: made anew on each turn they cost
    // a subscription and its registration per request.
    let shutdown = stopped.changed();
    tokio::pin!(shutdown);
    let ended = session.ended();
    tokio::pin!(ended);
    let mut events = session.take_events();
    let shutting_down = loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break true,
            // In a cluster, the leader that granted this connection an
            // ephemeral lock stopped leading: the lock is gone, and the
            // client learns it from the close, as after a restart.
            () = &mut ended => {
                conn.close(CLOSE_LEADER_CHANGED.into(), b"leader changed");
                break false;
            }
            answer = requests.next_answer(), if requests.submitted() > 0 => {
                streams.extend(requests.answered_all(answer).map(Work::run));
            }
            Some(finished) = streams.next(), if !streams.is_empty() => {
                streams.extend(finished.and_then(|f| requests.finished(f)).map(Work::run));
            }
            // Only a connection that asked for events can have any: one
            // that never did does not look at its (empty) queue each turn.
            pushed = next_event(&mut events), if events.is_some() && requests.asked_for_events => match pushed {
                Some(Pushed::Overflow) => {
                    conn.close(CLOSE_EVENTS_NOT_READ.into(), b"events not read");
                    break false;
                }
                Some(pushed) => requests.routes.route(pushed),
                None => events = None,
            },
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    streams.extend(requests.accepted(send, recv).map(Work::run));
                    if let Some(raised) = allowance.raise(streams.len() + requests.submitted()) {
                        conn.set_max_concurrent_bi_streams(raised.into());
                    }
                    accepted += 1;
                    if accepted.is_multiple_of(ACCEPTS_PER_TURN) {
                        // quinn has thousands of streams ready in a burst,
                        // and accepting them spends no tokio budget: let
                        // the shards (and other connections) run.
                        tokio::task::yield_now().await;
                    }
                }
                Err(error) => {
                    log_end(peer, &error);
                    break false;
                }
            },
        }
    };
    if shutting_down {
        // Each request still arriving is answered `shutting_down` once it
        // has; one running as a future answers so itself; one submitted to
        // its shard gets the shard's answer (prompt: a stopping shard
        // answers `shutting_down`), so that no grant goes unheard.
        requests.shutting_down = true;
        while !streams.is_empty() || requests.submitted() > 0 {
            tokio::select! {
                answer = requests.next_answer(), if requests.submitted() > 0 => {
                    streams.extend(requests.answered_all(answer).map(Work::run));
                }
                Some(finished) = streams.next(), if !streams.is_empty() => {
                    streams.extend(finished.and_then(|f| requests.finished(f)).map(Work::run));
                }
            }
        }
        conn.close(CLOSE_SHUTDOWN.into(), b"server shutting down");
    }
    // Gone: dropping the requests cancels their waiting locks. (The
    // session itself goes at the end of this function.)
    drop(streams);
    tracing::debug!(%peer, "QUIC closed");
}

/// Answers taken from a connection's queue in one turn, before it looks
/// at its streams, events and shutdown again.
const ANSWERS_PER_TURN: usize = 64;

/// How a connection carries out its streams' requests.
///
/// A request that needs nothing but its shard (a `lock` that does not
/// wait and has no `notify`, `unlock`, `extend`, `inspect`, a set op; see
/// [`Answers::submit`]) is submitted to its shard through the session's
/// queue of answers, and its stream's send half is kept here by request
/// id (unique among the connection's requests in flight, which `submit`
/// checks) until the answer comes: no future, no channel and no wake-up
/// of its own, and many answers wake the connection once. Every other
/// request runs as a future of its own ([`Work::Execute`]), which its
/// stream's reset drops, cancelling a waiting `lock`.
struct Requests {
    session: Session,
    limits: Limits,
    /// The connection's queue of answers (`None` if it was taken before,
    /// which no connection does: then every request runs as a future).
    answers: Option<Answers>,
    /// The send halves of the streams whose request went to `answers`.
    awaiting: HashMap<RequestId, SendStream>,
    /// Changes when the server begins to shut down, for each request's
    /// future.
    stopped: watch::Receiver<bool>,
    routes: Routes,
    /// The server is shutting down: a request that arrives now is
    /// answered `shutting_down`.
    shutting_down: bool,
    /// Whether a request of the connection asked for events (a `watch`,
    /// a `lock` with `notify`): none come before one has.
    asked_for_events: bool,
}

impl Requests {
    fn new(session: &Session, limits: Limits, stopped: watch::Receiver<bool>) -> Requests {
        Requests {
            session: session.clone(),
            limits,
            answers: session.take_answers(),
            awaiting: HashMap::new(),
            stopped,
            routes: Routes::default(),
            shutting_down: false,
            asked_for_events: false,
        }
    }

    /// Requests submitted to their shard and not yet answered.
    fn submitted(&self) -> usize {
        self.awaiting.len()
    }

    /// A stream the client opened: its request, read and started at once
    /// if it has arrived whole; else the work of reading it.
    fn accepted(&mut self, send: SendStream, recv: RecvStream) -> Option<Work> {
        let mut reading = Reading::new(recv, self.limits.message_bytes_max);
        match reading.now() {
            Poll::Ready(read) => self.arrived(Arrived { send, read }),
            Poll::Pending => Some(Work::Read { reading, send }),
        }
    }

    /// A stream whose request has been read: it is refused (too large,
    /// not a request), or started.
    fn arrived(&mut self, arrived: Arrived) -> Option<Work> {
        let Arrived { send, read } = arrived;
        let refusal = match read {
            Ok(body) => match decode_request(body.as_slice(), &self.limits) {
                Ok(request) => return self.start(send, request),
                Err(error) => error.into_reply(),
            },
            Err(ReadEnd::TooLong) => Reply {
                id: None,
                outcome: Err(ServerError::too_large(format!(
                    "message over the limit of {} bytes",
                    self.limits.message_bytes_max
                ))),
            },
            // Reset by the client, or the connection went away.
            Err(ReadEnd::Gone) => return None,
        };
        match reply_now(send, &refusal, None) {
            Written::Later(unwritten) => Some(Work::Write(unwritten)),
            Written::Done | Written::Refused(_) => None,
        }
    }

    /// Starts `request`: through the queue of answers if its shard alone
    /// can answer it, else as a future of its own.
    fn start(&mut self, send: SendStream, request: Request) -> Option<Work> {
        let id = request.id;
        if self.shutting_down {
            return Some(Work::ShuttingDown { send, id });
        }
        self.asked_for_events |= has_events(&request.op);
        let request = match &self.answers {
            // QUIC reads one stream per turn of the loop: one clock
            // reading per request, as the future path takes.
            Some(answers) => match answers.submit(request, tokio::time::Instant::now()) {
                Ok(()) => {
                    let replaced = self.awaiting.insert(id, send);
                    debug_assert!(replaced.is_none(), "`submit` refuses an id in flight");
                    return None;
                }
                Err(request) => request,
            },
            None => request,
        };
        Some(Work::Execute(Execute {
            send,
            request,
            session: self.session.clone(),
            stopped: self.stopped.clone(),
            routes: self.routes.clone(),
        }))
    }

    /// The next answer to a submitted request, once there is one.
    async fn next_answer(&mut self) -> Answer {
        let Some(answers) = self.answers.as_mut() else {
            return std::future::pending().await;
        };
        match std::future::poll_fn(|cx| answers.poll_answer(cx)).await {
            Some(answer) => answer,
            // Never: the session holds a sender.
            None => std::future::pending().await,
        }
    }

    /// Writes `first` and every other answer the shards have given, in
    /// this one turn (up to a bound); the work of writing those quinn
    /// could not take at once.
    fn answered_all(&mut self, first: Answer) -> impl Iterator<Item = Work> + use<> {
        let mut later = Vec::new();
        let mut answer = Some(first);
        let mut taken = 0;
        while let Some((reply, unheard)) = answer.take() {
            later.extend(self.answered(reply, unheard).map(Work::Write));
            taken += 1;
            if taken < ANSWERS_PER_TURN {
                answer = self.next_answer().now_or_never();
            }
        }
        later.into_iter()
    }

    /// Writes an answer on its stream; the work of writing the rest, if
    /// quinn could not take it at once. An answer whose stream the client
    /// stopped (it gave up, or its copy won) is dropped, and its grant
    /// undone: nobody heard of it.
    fn answered(&mut self, reply: Reply, unheard: Option<Unheard>) -> Option<Unwritten> {
        let send = reply.id.and_then(|id| self.awaiting.remove(&id));
        let written = match send {
            Some(send) => reply_now(send, &reply, unheard),
            None => {
                debug_assert!(false, "an answer without its stream: {reply:?}");
                return None;
            }
        };
        match written {
            Written::Done => None,
            Written::Refused(unheard) => {
                self.finished(Finished::Unheard(unheard?));
                None
            }
            Written::Later(unwritten) => Some(unwritten),
        }
    }

    /// What a stream's future handed back: its request, which starts; or
    /// a grant nobody heard of, which is undone.
    fn finished(&mut self, finished: Finished) -> Option<Work> {
        match finished {
            Finished::Arrived(arrived) => self.arrived(arrived),
            Finished::Unheard(unheard) => {
                if let Some(answers) = &self.answers {
                    answers.unheard(unheard);
                }
                None
            }
        }
    }
}

/// An answer to a submitted request, and what undoes its grant if nobody
/// hears of it.
type Answer = (Reply, Option<Unheard>);

/// The streams a connection's client may have open at once: a few at
/// first, and all of `streams_per_connection` once half of those are
/// requests in flight. quinn keeps an entry per stream the peer may open,
/// in the maps it looks up for every packet, so a connection that never
/// has many requests in flight keeps them small. Raised in one step, not
/// doubling: each step costs the client a round trip, and quinn wakes
/// every request waiting for a stream at each (an expiry storm's
/// thousands of waiting `lock`s on one connection).
#[derive(Debug, Clone, Copy)]
struct StreamAllowance {
    first: u32,
    most: u32,
    raised: bool,
}

impl StreamAllowance {
    fn new(config: &QuicConfig) -> StreamAllowance {
        let first = config.first_streams();
        StreamAllowance {
            first,
            most: config.streams_per_connection.max(first),
            raised: false,
        }
    }

    /// The raised allowance, the first time `in_flight` requests call for it.
    fn raise(&mut self, in_flight: usize) -> Option<u32> {
        let half = usize::try_from(self.first / 2).unwrap_or(usize::MAX);
        if self.raised || self.first >= self.most || in_flight < half {
            return None;
        }
        self.raised = true;
        Some(self.most)
    }
}

/// Logs how a connection ended: once, and at `info` if on an error.
fn log_end(peer: std::net::SocketAddr, error: &quinn::ConnectionError) {
    use quinn::ConnectionError::{ApplicationClosed, LocallyClosed};
    match error {
        ApplicationClosed(_) | LocallyClosed => tracing::debug!(%peer, %error, "QUIC closing"),
        _ => tracing::info!(%peer, %error, "QUIC connection ended on an error"),
    }
}

/// The next event of the connection's queue; never, without one.
async fn next_event(events: &mut Option<Events>) -> Option<Pushed> {
    match events {
        Some(events) => events.next().await,
        None => std::future::pending().await,
    }
}

/// Where each request with events coming gets them: its stream's
/// channel, by request id. The streams run in the connection's task, so
/// the lock is never contended.
#[derive(Clone, Default)]
pub(crate) struct Routes(Arc<Mutex<HashMap<RequestId, mpsc::UnboundedSender<Pushed>>>>);

impl Routes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, mpsc::UnboundedSender<Pushed>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `pushed` to its request's stream (an event whose stream has
    /// gone is dropped, and stops counting against the bound).
    fn route(&self, pushed: Pushed) {
        let id = match &pushed {
            Pushed::Event { id, .. } | Pushed::Done { id } => *id,
            Pushed::Overflow => return,
        };
        if let Some(route) = self.lock().get(&id) {
            let _ = route.send(pushed);
        }
    }

    /// Opens the route of request `id`: its events wait in the receiver
    /// until its reply is written.
    pub(crate) fn open(&self, id: RequestId) -> mpsc::UnboundedReceiver<Pushed> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().insert(id, tx);
        rx
    }

    pub(crate) fn close(&self, id: RequestId) {
        self.lock().remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_allowance_is_raised_to_the_most_once_at_half_use() {
        let config = QuicConfig {
            streams_per_connection: 100,
            initial_streams: 16,
            ..QuicConfig::default()
        };
        let mut allowance = StreamAllowance::new(&config);
        assert_eq!(allowance.raise(7), None, "under half of 16");
        assert_eq!(allowance.raise(8), Some(100));
        assert_eq!(allowance.raise(60), None, "raised once");
        assert_eq!(allowance.raise(100), None);
    }

    #[test]
    fn the_first_allowance_is_within_the_most() {
        let config = QuicConfig {
            streams_per_connection: 10,
            initial_streams: 128,
            ..QuicConfig::default()
        };
        let mut allowance = StreamAllowance::new(&config);
        assert_eq!(config.first_streams(), 10);
        assert_eq!(allowance.raise(10), None);
    }
}
