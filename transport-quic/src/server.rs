//! The QUIC accept loop and per-stream request handling.

use std::future::Future;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deadbolt_core::engine::Frontend;
use deadbolt_core::engine::events::{Events, Pushed};
use deadbolt_core::proto::{
    LockOp, Okay, Op, Reply, RequestId, ServerError, decode_request, encode_reply,
};
use deadbolt_core::{Engine, Limits, Session};
use futures_util::stream::{FuturesUnordered, StreamExt};
use quinn::{Endpoint, Incoming, ReadToEndError, RecvStream, SendStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::config::QuicConfig;
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
/// How long a `shutting_down` answer may take to be acknowledged.
const SHUTDOWN_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

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
/// the shards run between turns.
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
    let limits = *engine.limits();
    let mut streams = FuturesUnordered::new();
    let mut accepted = 0u64;
    // Each request's copy, to answer `shutting_down` itself; cloned from
    // this one, which has not seen a shutdown begun since.
    let for_requests = stopped.clone();
    // Made once and polled on every turn: made anew on each turn they cost
    // a subscription and its registration per request.
    let shutdown = stopped.changed();
    tokio::pin!(shutdown);
    let ended = session.ended();
    tokio::pin!(ended);
    let mut events = session.take_events();
    let routes = Routes::default();
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
            Some(()) = streams.next(), if !streams.is_empty() => {}
            pushed = next_event(&mut events), if events.is_some() => match pushed {
                Some(Pushed::Overflow) => {
                    conn.close(CLOSE_EVENTS_NOT_READ.into(), b"events not read");
                    break false;
                }
                Some(pushed) => routes.route(pushed),
                None => events = None,
            },
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    let stream = Stream { send, recv, routes: routes.clone() };
                    streams.push(request(stream, session.clone(), limits, for_requests.clone()));
                    if let Some(raised) = allowance.raise(streams.len()) {
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
        // Each stream answers `shutting_down` on its own; let them.
        while streams.next().await.is_some() {}
        conn.close(CLOSE_SHUTDOWN.into(), b"server shutting down");
    }
    // Gone: dropping the requests cancels their waiting locks. (The
    // session itself goes at the end of this function.)
    drop(streams);
    tracing::debug!(%peer, "QUIC closed");
}

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
struct Routes(Arc<Mutex<HashMap<RequestId, mpsc::UnboundedSender<Pushed>>>>);

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
    fn open(&self, id: RequestId) -> mpsc::UnboundedReceiver<Pushed> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().insert(id, tx);
        rx
    }

    fn close(&self, id: RequestId) {
        self.lock().remove(&id);
    }
}

/// One request's stream.
struct Stream {
    send: SendStream,
    recv: RecvStream,
    routes: Routes,
}

/// Whether `op` asks for pushed events: a `watch`, or a `lock` with
/// `notify`.
fn has_events(op: &Op) -> bool {
    match op {
        Op::Watch { .. } => true,
        Op::Lock(LockOp::Acquire(acquire)) => acquire.notify,
        _ => false,
    }
}

/// One stream: read one request, answer it, finish; or, for a request
/// with events that succeeded, keep the stream open and write each event
/// as a line of its own until the request's events end (then finish) or
/// the client stops the stream (then the events stop).
async fn request(
    stream: Stream,
    session: Session,
    limits: Limits,
    mut stopped: watch::Receiver<bool>,
) {
    let Stream {
        mut send,
        mut recv,
        routes,
    } = stream;
    let bytes = match recv.read_to_end(limits.message_bytes_max).await {
        Ok(bytes) => bytes,
        Err(ReadToEndError::TooLong) => {
            let too_large = ServerError::too_large(format!(
                "message over the limit of {} bytes",
                limits.message_bytes_max
            ));
            let _ = recv.stop(0u32.into());
            answer(
                &mut send,
                &Reply {
                    id: None,
                    outcome: Err(too_large),
                },
            )
            .await;
            return;
        }
        // Reset by the client, or the connection went away.
        Err(ReadToEndError::Read(_)) => return,
    };
    let request = match decode_request(&bytes, &limits) {
        Ok(request) => request,
        Err(error) => {
            answer(&mut send, &error.into_reply()).await;
            return;
        }
    };
    let id = request.id;
    let mut events = has_events(&request.op).then(|| routes.open(id));
    let cancelled = send.stopped();
    let reply = tokio::select! {
        biased;
        // The client stopped waiting: dropping `execute` cancels a queued lock.
        _ = cancelled => return,
        _ = stopped.changed() => {
            let shutting_down = Reply { id: Some(id), outcome: Err(ServerError::shutting_down()) };
            answer(&mut send, &shutting_down).await;
            // Closing the connection discards unacknowledged stream data:
            // wait (briefly) for the client to have this answer first.
            let _ = tokio::time::timeout(SHUTDOWN_ANSWER_WAIT, send.stopped()).await;
            return;
        }
        reply = session.execute(request) => reply,
    };
    let events = events
        .take()
        .filter(|_| matches!(reply.outcome, Ok(ref ok) if subscribed(ok)));
    let Some(events) = events else {
        routes.close(id);
        answer(&mut send, &reply).await;
        return;
    };
    let mut line = encode_reply(&reply);
    line.push('\n');
    if send.write_all(line.as_bytes()).await.is_ok() {
        write_events(&mut send, events, &mut stopped).await;
    }
    routes.close(id);
    if !session.stop_events(id) {
        // Its events ended on their own: say so by finishing.
        let _ = send.finish();
    }
}

/// Whether a successful reply leaves events coming: a grant (of a `lock`
/// with `notify`) or a watch in place.
fn subscribed(ok: &Okay) -> bool {
    matches!(ok, Okay::Granted(_) | Okay::Empty(_))
}

/// Writes each event as a line until the request's events are done, the
/// client stops the stream, or the server shuts down.
async fn write_events(
    send: &mut SendStream,
    mut events: mpsc::UnboundedReceiver<Pushed>,
    stopped: &mut watch::Receiver<bool>,
) {
    loop {
        let pushed = tokio::select! {
            biased;
            _ = send.stopped() => return,
            _ = stopped.changed() => return,
            pushed = events.recv() => pushed,
        };
        match pushed {
            Some(Pushed::Event { text, charge, .. }) => {
                let mut line = text;
                line.push('\n');
                if send.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
                drop(charge);
            }
            Some(Pushed::Done { .. } | Pushed::Overflow) | None => return,
        }
    }
}

async fn answer(send: &mut SendStream, reply: &Reply) {
    // The client may be gone; then there is nobody to answer.
    if send.write_all(encode_reply(reply).as_bytes()).await.is_ok() {
        let _ = send.finish();
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
