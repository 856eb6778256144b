//! The QUIC accept loop and per-stream request handling.

use std::future::Future;

use deadbolt_core::engine::Frontend;
use deadbolt_core::proto::{Reply, ServerError, decode_request, encode_reply};
use deadbolt_core::{Engine, Limits, Session};
use futures_util::stream::{FuturesUnordered, StreamExt};
use quinn::{Endpoint, Incoming, ReadToEndError, RecvStream, SendStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::QuicConfig;
use crate::tls::{self, Identity, TlsError};

/// The QUIC error code of a connection closed by a shutting-down server.
const CLOSE_SHUTDOWN: u32 = 1;
/// The QUIC close code when a cluster's leader changed under a
/// connection's ephemeral lock.
const CLOSE_LEADER_CHANGED: u32 = 2;
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
                    connections.spawn(connection(incoming, engine, stopped));
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
async fn connection(incoming: Incoming, engine: Engine, mut stopped: watch::Receiver<bool>) {
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
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    streams.push(request(send, recv, session.clone(), limits, for_requests.clone()));
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

/// Logs how a connection ended: once, and at `info` if on an error.
fn log_end(peer: std::net::SocketAddr, error: &quinn::ConnectionError) {
    use quinn::ConnectionError::{ApplicationClosed, LocallyClosed};
    match error {
        ApplicationClosed(_) | LocallyClosed => tracing::debug!(%peer, %error, "QUIC closing"),
        _ => tracing::info!(%peer, %error, "QUIC connection ended on an error"),
    }
}

/// One stream: read one request, answer it, finish.
async fn request(
    mut send: SendStream,
    mut recv: RecvStream,
    session: Session,
    limits: Limits,
    mut stopped: watch::Receiver<bool>,
) {
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
    answer(&mut send, &reply).await;
}

async fn answer(send: &mut SendStream, reply: &Reply) {
    // The client may be gone; then there is nobody to answer.
    if send.write_all(encode_reply(reply).as_bytes()).await.is_ok() {
        let _ = send.finish();
    }
}
