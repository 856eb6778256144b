//! The accept loop: one task per connection, a bound on connections in
//! their handshake (`admission`) and another on WebSocket connections, and
//! graceful shutdown; each connection's request head decides between the
//! WebSocket upgrade and the [`HttpRoutes`](crate::routes::HttpRoutes).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use deadbolt_core::Engine;
use deadbolt_core::engine::Frontend;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::admission::{Handshakes, Ticket};
use crate::config::WsConfig;
use crate::connection;
use crate::http::{self, Route};
use crate::listener::Listener;
use crate::routes::HttpResponse;

/// Bytes read from the socket at a time.
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// Serves WebSocket clients from `listener` until `shutdown` completes.
///
/// Then it stops accepting, answers every request still in flight
/// `shutting_down`, closes every connection with code 1001 and returns once
/// they are closed (or after [`WsConfig::shutdown_grace`]).
pub async fn serve<L: Listener>(
    mut listener: L,
    engine: Engine,
    config: WsConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let shared = Arc::new(Shared {
        engine,
        permits: Arc::new(Semaphore::new(config.max_connections)),
        handshakes: Arc::new(Handshakes::new(
            config.handshakes_max,
            config.handshakes_per_address_max,
            config.gauges.clone(),
        )),
        config,
    });
    let (stop, stopped) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Taken here, in order of arrival, so that eviction
                    // picks the oldest.
                    let ticket = shared.handshakes.enter(peer.ip());
                    let task = serve_connection(stream, peer, ticket, shared.clone(), stopped.clone());
                    connections.spawn(task);
                }
                Err(error) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Receivers may all be gone already; then there is nobody to tell.
    let _ = stop.send(true);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(shared.config.shutdown_grace, drained)
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace; dropping them");
        connections.shutdown().await;
    }
    Ok(())
}

/// What every connection task needs.
struct Shared {
    engine: Engine,
    /// WebSocket connections: one permit each, from the upgrade on.
    permits: Arc<Semaphore>,
    handshakes: Arc<Handshakes>,
    config: WsConfig,
}

/// One connection: its TLS handshake first, if the port serves TLS (within
/// the handshake timeout, and evicted like a slow request head), then
/// [`handle`].
async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    mut ticket: Ticket,
    shared: Arc<Shared>,
    stopped: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(tls) = shared.config.tls.clone() else {
        return handle(stream, peer, ticket, shared, stopped).await;
    };
    let accept = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
    let accepted = tokio::select! {
        accepted = tokio::time::timeout(shared.config.handshake_timeout, accept) => accepted,
        () = ticket.evicted() => {
            tracing::debug!(%peer, "too many handshakes; dropping the oldest");
            return;
        }
    };
    match accepted {
        Ok(Ok(stream)) => handle(stream, peer, ticket, shared, stopped).await,
        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// One connection, from its request head to its close. `ticket` holds its
/// place among the connections in their handshake until the head is read.
async fn handle<S>(
    mut stream: S,
    peer: SocketAddr,
    mut ticket: Ticket,
    shared: Arc<Shared>,
    stopped: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let head = tokio::select! {
        head = read_head(&mut stream, peer, &shared.config) => head,
        () = ticket.evicted() => {
            tracing::debug!(%peer, "too many handshakes; dropping the oldest");
            None
        }
    };
    drop(ticket);
    let Some(head) = head else { return };
    // Plain requests (`/healthz`) are answered whether or not a WebSocket
    // slot is free: a health check must not fail because clients are many.
    let response = match head.route {
        Route::WebSocket { origin, host, .. }
            if !shared
                .config
                .origin_allowed(origin.as_deref(), host.as_deref()) =>
        {
            tracing::info!(%peer, ?origin, "WebSocket upgrade from a foreign origin; answered 403");
            let body = &b"forbidden: this origin may not open a WebSocket here \
                         (the server's --allow-origin lists those that may)\n"[..];
            HttpResponse::text(403, "Forbidden", body)
        }
        Route::WebSocket { key, forwarded, .. } => match shared.permits.clone().try_acquire_owned()
        {
            Ok(permit) => {
                let frontend = if forwarded {
                    Frontend::Forwarded
                } else {
                    Frontend::WebSocket
                };
                let upgrade = Upgrade {
                    key: &key,
                    rest: head.rest,
                    peer,
                    frontend,
                };
                websocket(stream, upgrade, &shared, permit, stopped).await;
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, "connection limit reached; refusing");
                let body = &b"overloaded: too many connections\n"[..];
                HttpResponse::text(503, "Service Unavailable", body)
            }
        },
        Route::Plain(request) => shared.config.routes.respond(&request).await,
        Route::Refuse { status, reason } => HttpResponse::status(status, reason),
    };
    answer(&mut stream, &response, &shared.config).await;
}

/// Writes a plain answer, best effort (the peer may be gone), and within
/// the handshake timeout, so that a peer that reads nothing cannot keep
/// its task.
async fn answer<S>(stream: &mut S, response: &HttpResponse, config: &WsConfig)
where
    S: AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(config.handshake_timeout, http::respond(stream, response)).await;
}

/// Reads the request head within the handshake timeout; answers a bad one
/// `400` and gives up on a slow one.
async fn read_head<S>(stream: &mut S, peer: SocketAddr, config: &WsConfig) -> Option<http::Head>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = tokio::time::timeout(
        config.handshake_timeout,
        http::read_head(stream, config.head_bytes_max),
    )
    .await;
    match head {
        Ok(Ok(head)) => Some(head),
        Ok(Err(error)) => {
            tracing::info!(%peer, %error, "bad request head; answered 400");
            let bad = HttpResponse::text(400, "Bad Request", &b"bad request\n"[..]);
            answer(stream, &bad, config).await;
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "request head timed out");
            None
        }
    }
}

/// A WebSocket upgrade being accepted.
struct Upgrade<'a> {
    key: &'a str,
    /// Bytes read past the request head.
    rest: Vec<u8>,
    peer: SocketAddr,
    frontend: Frontend,
}

/// Upgrades the connection and runs it as a WebSocket until it closes;
/// `_permit` is its slot among the WebSocket connections until then.
async fn websocket<S>(
    mut stream: S,
    upgrade: Upgrade<'_>,
    shared: &Shared,
    _permit: OwnedSemaphorePermit,
    stopped: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Upgrade {
        key,
        rest,
        peer,
        frontend,
    } = upgrade;
    if http::accept_upgrade(&mut stream, key).await.is_err() {
        return;
    }
    let ws =
        WebSocketStream::from_partially_read(stream, rest, Role::Server, Some(ws_config(shared)))
            .await;
    tracing::debug!(%peer, ?frontend, "websocket connected");
    let session = shared.engine.session_on(frontend);
    let (limits, config) = (shared.engine.limits(), &shared.config);
    match connection::run(ws, session, limits, config, stopped).await {
        None => tracing::debug!(%peer, "websocket closed"),
        Some(reason) => tracing::info!(%peer, %reason, "websocket connection ended on an error"),
    }
}

fn ws_config(shared: &Shared) -> WebSocketConfig {
    let max = shared.engine.limits().message_bytes_max;
    WebSocketConfig::default()
        // tungstenite zero-fills this much before every read: keep it
        // small, or small messages pay for zeroing 128 KiB each.
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .max_write_buffer_size(shared.config.write_buffer_max)
}
