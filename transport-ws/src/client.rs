//! The client transport: WebSocket connections for
//! [`deadbolt_core::client::Client`].
//!
//! One task per connection owns the socket. Callers hand it encoded
//! requests through a bounded channel and wait on a oneshot for the reply
//! with their request id, so any number of requests share the connection
//! and replies may come in any order. A request whose future is dropped
//! while its `lock` waits sends a `cancel`, so the server takes it out of
//! the queue. The task pings the server when the line is quiet and gives
//! the connection up (failing every pending request as lost, which the
//! client retries on a new connection) when the server stays silent.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deadbolt_core::client::events::opens_feed;
use deadbolt_core::client::{Connection, Connector, EventFeed, TransportError};
use deadbolt_core::proto::event::{decode_event, is_event};
use deadbolt_core::proto::{
    Event, LockOp, Op, OpKind, Outcome, Request, RequestId, Wait, decode_reply, encode_request,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Bytes read from the socket at a time.
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// Opens byte streams to a host and port.
#[async_trait]
pub trait Dialer: Send + Sync + 'static {
    /// The stream of one connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Connects to `host:port`.
    async fn dial(&self, host: &str, port: u16) -> io::Result<Self::Stream>;
}

/// Dials with tokio's TCP, with `TCP_NODELAY` set.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpDialer;

#[async_trait]
impl Dialer for TcpDialer {
    type Stream = tokio::net::TcpStream;

    async fn dial(&self, host: &str, port: u16) -> io::Result<Self::Stream> {
        let stream = tokio::net::TcpStream::connect((host, port)).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Dials TLS over tokio's TCP, for `wss://` servers: the server's
/// certificate is checked against the name in the URL by `config`'s
/// verifier.
#[derive(Clone)]
pub struct TlsDialer {
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for TlsDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsDialer").finish_non_exhaustive()
    }
}

impl TlsDialer {
    /// Dials with `config` (its ALPN is replaced by `http/1.1`).
    pub fn new(mut config: rustls::ClientConfig) -> TlsDialer {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsDialer {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        }
    }
}

#[async_trait]
impl Dialer for TlsDialer {
    type Stream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

    async fn dial(&self, host: &str, port: u16) -> io::Result<Self::Stream> {
        let tcp = TcpDialer.dial(host, port).await?;
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.connector.connect(name, tcp).await
    }
}

/// Timing and size limits of client connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsClientConfig {
    /// How long opening a connection (TCP and WebSocket handshake) may take.
    pub connect_timeout: Duration,
    /// How often to ping the server when nothing else is heard.
    pub ping_interval: Duration,
    /// After this much silence from the server the connection is given up.
    pub silence_timeout: Duration,
    /// Largest reply accepted, in bytes.
    pub message_bytes_max: usize,
    /// Requests queued for the socket before callers wait.
    pub queue_len: usize,
}

impl Default for WsClientConfig {
    fn default() -> Self {
        WsClientConfig {
            connect_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(2),
            silence_timeout: Duration::from_secs(6),
            message_bytes_max: 16 << 20,
            queue_len: 1024,
        }
    }
}

/// Opens WebSocket connections to one server URL (`ws://host:port/ws`).
#[derive(Debug)]
pub struct WsConnector<D: Dialer = TcpDialer> {
    url: String,
    host: String,
    port: u16,
    dialer: D,
    config: WsClientConfig,
}

impl WsConnector<TcpDialer> {
    /// Connections to `url` over TCP. A `wss://` URL needs a
    /// [`TlsDialer`] ([`WsConnector::with_dialer`]).
    pub fn new(url: &str) -> Result<Self, TransportError> {
        if url.starts_with("wss://") {
            return Err(TransportError::Connect {
                server: url.to_owned(),
                reason: "a wss:// URL needs TLS: connect through a TlsDialer".to_owned(),
            });
        }
        WsConnector::with_dialer(url, TcpDialer)
    }
}

impl<D: Dialer> WsConnector<D> {
    /// Connections to `url` through `dialer`.
    pub fn with_dialer(url: &str, dialer: D) -> Result<Self, TransportError> {
        let (host, port) = host_and_port(url)?;
        Ok(WsConnector {
            url: url.to_owned(),
            host,
            port,
            dialer,
            config: WsClientConfig::default(),
        })
    }

    /// Replaces the connection settings.
    pub fn config(mut self, config: WsClientConfig) -> Self {
        self.config = config;
        self
    }
}

/// Splits `ws://host:port/path` (or `wss://`) into host and port (port 7420
/// by default).
fn host_and_port(url: &str) -> Result<(String, u16), TransportError> {
    let bad = |reason: &str| TransportError::Connect {
        server: url.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .ok_or_else(|| bad("a WebSocket URL starts with ws:// or wss://"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    if authority.is_empty() {
        return Err(bad("the URL has no host"));
    }
    // `[::1]:7420` or `host:7420` or `host`.
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            let port = port.parse().map_err(|_| bad("the port is not a number"))?;
            (host, port)
        }
        _ => (authority, 7420),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((host.to_owned(), port))
}

#[async_trait]
impl<D: Dialer> Connector for WsConnector<D> {
    async fn connect(&self) -> Result<Arc<dyn Connection>, TransportError> {
        let failed = |reason: String| TransportError::Connect {
            server: self.url.clone(),
            reason,
        };
        let open = async {
            let stream = self
                .dialer
                .dial(&self.host, self.port)
                .await
                .map_err(|e| failed(e.to_string()))?;
            let max = self.config.message_bytes_max;
            let ws_config = WebSocketConfig::default()
                // tungstenite zero-fills this much before every read: keep it
                // small, or small messages pay for zeroing 128 KiB each.
                .read_buffer_size(READ_BUFFER_BYTES)
                .max_message_size(Some(max))
                .max_frame_size(Some(max));
            let (ws, _) = tokio_tungstenite::client_async_with_config(
                self.url.as_str(),
                stream,
                Some(ws_config),
            )
            .await
            .map_err(|e| failed(e.to_string()))?;
            Ok::<_, TransportError>(ws)
        };
        let ws = tokio::time::timeout(self.config.connect_timeout, open)
            .await
            .map_err(|_| failed("timed out".to_owned()))??;
        Ok(Arc::new(WsConnection::start(ws, self.config.clone())))
    }

    fn server(&self) -> String {
        self.url.clone()
    }
}

/// A request waiting for its reply.
struct Pending {
    kind: OpKind,
    reply: oneshot::Sender<Result<Outcome, TransportError>>,
}

/// What the connection's caller side and its task share. Pending requests
/// are kept in id order, so that a broken connection fails them in the same
/// order every run.
#[derive(Default)]
struct Shared {
    pending: Mutex<BTreeMap<RequestId, Pending>>,
    /// Where the pushed events of each request that asked for them go.
    routes: Mutex<BTreeMap<RequestId, mpsc::UnboundedSender<Event>>>,
    open: AtomicBool,
    /// The id of the next `cancel` this connection sends on its own.
    next_cancel: AtomicU64,
}

impl Shared {
    fn take(&self, id: RequestId) -> Option<Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
    }

    fn routes(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<RequestId, mpsc::UnboundedSender<Event>>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request id for a `cancel` of the connection's own: from 2^63 up,
    /// apart from the client's ids.
    fn cancel_of(&self, target: RequestId) -> Message {
        let request = Request {
            id: self.next_cancel.fetch_add(1, Ordering::Relaxed),
            op: Op::Cancel { target },
        };
        Message::Text(encode_request(&request).into())
    }
}

/// One WebSocket connection.
struct WsConnection {
    outbox: mpsc::Sender<Message>,
    shared: Arc<Shared>,
}

impl WsConnection {
    fn start<S>(ws: WebSocketStream<S>, config: WsClientConfig) -> WsConnection
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (outbox, queued) = mpsc::channel(config.queue_len.max(1));
        let shared = Arc::new(Shared {
            next_cancel: AtomicU64::new(1 << 63),
            ..Shared::default()
        });
        shared.open.store(true, Ordering::Release);
        tokio::spawn(drive(ws, queued, Arc::clone(&shared), config));
        WsConnection { outbox, shared }
    }
}

fn may_wait(op: &Op) -> bool {
    matches!(op, Op::Lock(LockOp::Acquire(a)) if a.wait != Wait::Never)
}

#[async_trait]
impl Connection for WsConnection {
    async fn call(&self, request: Request) -> Result<Outcome, TransportError> {
        let lost = || TransportError::Lost("the connection closed".to_owned());
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            kind: request.op.kind(),
            reply,
        };
        {
            // Checked under the same lock the driver holds while it closes
            // the connection and fails what is pending: a request is either
            // failed by the driver or refused here, never left waiting.
            let mut map = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !self.is_open() {
                return Err(lost());
            }
            map.insert(request.id, pending);
        }
        let mut guard = CancelOnDrop {
            connection: self,
            id: request.id,
            cancel: may_wait(&request.op),
            done: false,
        };
        let text = encode_request(&request);
        if self.outbox.send(Message::Text(text.into())).await.is_err() {
            return Err(lost());
        }
        let outcome = answer.await.unwrap_or_else(|_| Err(lost()));
        guard.done = true;
        outcome
    }

    fn is_open(&self) -> bool {
        self.shared.open.load(Ordering::Acquire)
    }

    /// Events come on the connection, each under its request's id; the
    /// route is opened before the request is sent, so none is missed.
    /// Dropping the feed cancels the request on the server.
    async fn subscribe(
        &self,
        request: Request,
    ) -> Result<(Outcome, Option<EventFeed>), TransportError> {
        let id = request.id;
        let (route, events) = mpsc::unbounded_channel();
        self.shared.routes().insert(id, route);
        let outcome = self.call(request).await;
        if !matches!(&outcome, Ok(Ok(okay)) if opens_feed(okay)) {
            self.shared.routes().remove(&id);
            return outcome.map(|outcome| (outcome, None));
        }
        let (shared, outbox) = (Arc::clone(&self.shared), self.outbox.clone());
        let stop = move || {
            shared.routes().remove(&id);
            // As for any cancel: if it cannot be queued, the connection
            // is busy or dying, and its close ends the events anyway.
            let _ = outbox.try_send(shared.cancel_of(id));
        };
        Ok((outcome?, Some(EventFeed::new(events, Some(Box::new(stop))))))
    }

    async fn closed(&self) {
        // The driver drops its end of the queue as soon as it gives the
        // connection up.
        self.outbox.closed().await;
    }
}

/// Forgets a request whose future was dropped, and cancels it on the server
/// if it may be a waiting `lock`.
struct CancelOnDrop<'a> {
    connection: &'a WsConnection,
    id: RequestId,
    cancel: bool,
    done: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.done || self.connection.shared.take(self.id).is_none() || !self.cancel {
            return;
        }
        let cancel = self.connection.shared.cancel_of(self.id);
        // A full queue means a busy or dying connection; if the cancel
        // cannot be queued the server still skips the waiter once this
        // connection closes.
        let _ = self.connection.outbox.try_send(cancel);
    }
}

/// Owns the socket: writes what callers queue, hands replies to their
/// callers, pings, and fails everything pending when the connection ends.
async fn drive<S>(
    ws: WebSocketStream<S>,
    mut queued: mpsc::Receiver<Message>,
    shared: Arc<Shared>,
    config: WsClientConfig,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let mut heard = Instant::now();
    let mut ping = tokio::time::interval(config.ping_interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let reason = loop {
        tokio::select! {
            biased;
            message = queued.recv() => {
                let Some(message) = message else { break "the client closed it" };
                let write = async {
                    sink.feed(message).await?;
                    while let Ok(more) = queued.try_recv() {
                        sink.feed(more).await?;
                    }
                    sink.flush().await
                };
                match tokio::time::timeout(config.silence_timeout, write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break "writing failed",
                    Err(_) => break "writing stalled",
                }
            }
            frame = stream.next() => {
                heard = Instant::now();
                match frame {
                    Some(Ok(Message::Text(text))) => deliver(&shared, text.as_bytes()),
                    Some(Ok(Message::Close(_))) | None => break "the server closed it",
                    Some(Err(_)) => break "reading failed",
                    Some(Ok(_)) => {}
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() >= config.silence_timeout {
                    break "the server went silent";
                }
                let send = sink.send(Message::Ping(Vec::new().into()));
                if !matches!(tokio::time::timeout(config.silence_timeout, send).await, Ok(Ok(()))) {
                    break "pinging failed";
                }
            }
        }
    };
    let pending: Vec<Pending> = {
        let mut map = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
        shared.open.store(false, Ordering::Release);
        std::mem::take(&mut *map).into_values().collect()
    };
    // Every feed ends with the connection.
    shared.routes().clear();
    // Wakes whoever waits for the connection to close.
    drop(queued);
    for p in pending {
        // The caller may have given up already.
        let _ = p.reply.send(Err(TransportError::Lost(reason.to_owned())));
    }
    tracing::debug!(reason, "websocket connection ended");
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}

/// Hands one reply to the request waiting for it, or one pushed event to
/// its request's feed.
fn deliver(shared: &Shared, bytes: &[u8]) {
    if is_event(bytes) {
        match decode_event(bytes) {
            Ok(event) => {
                if let Some(route) = shared.routes().get(&event.id) {
                    // A feed dropped meanwhile has nobody to tell.
                    let _ = route.send(event);
                }
            }
            Err(error) => tracing::warn!(%error, "unreadable event from the server"),
        }
        return;
    }
    let raw = match decode_reply(bytes) {
        Ok(raw) => raw,
        Err(error) => {
            tracing::warn!(%error, "unreadable reply from the server");
            return;
        }
    };
    let Some(id) = raw.id else {
        tracing::warn!(err = ?raw.err, "the server could not read one of our requests");
        return;
    };
    // Replies to our own cancels, and to requests given up, find nobody.
    let Some(pending) = shared.take(id) else {
        return;
    };
    let outcome = raw
        .into_outcome(pending.kind)
        .map_err(|e| TransportError::Protocol(e.to_string()));
    let _ = pending.reply.send(outcome);
}

#[cfg(test)]
mod tests {
    use super::host_and_port;

    #[test]
    fn urls_split_into_host_and_port() {
        assert_eq!(
            host_and_port("ws://127.0.0.1:7420/ws").unwrap(),
            ("127.0.0.1".into(), 7420)
        );
        assert_eq!(
            host_and_port("ws://example.org/ws").unwrap(),
            ("example.org".into(), 7420)
        );
        assert_eq!(
            host_and_port("ws://[::1]:9000/ws").unwrap(),
            ("::1".into(), 9000)
        );
        assert!(host_and_port("http://x/ws").is_err());
        assert!(host_and_port("ws://x:port/ws").is_err());
        assert!(host_and_port("ws:///ws").is_err());
    }
}
