//! The client transport: QUIC connections for
//! [`deadbolt_core::client::Client`], a stream per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use deadbolt_core::client::events::opens_feed;
use deadbolt_core::client::{Connection, Connector, EventFeed, TransportError};
use deadbolt_core::proto::event::decode_event;
use deadbolt_core::proto::{Event, Outcome, Request, decode_reply, encode_request};
use quinn::{Endpoint, RecvStream, SendStream};
use tokio::sync::mpsc;

use crate::config::QuicConfig;
use crate::tls::{self, TlsError, Trust};

/// The application error code of a stream the client gave up on.
const CANCEL: u32 = 1;
/// Largest reply accepted, in bytes.
const REPLY_BYTES_MAX: usize = 16 << 20;

/// The client configuration: whom to trust, and the transport limits
/// (with keep-alives, so a long lock wait is never idle).
pub fn client_config(trust: &Trust, config: &QuicConfig) -> Result<quinn::ClientConfig, TlsError> {
    let mut client = quinn::ClientConfig::new(tls::client_crypto(trust)?);
    let mut transport = config.transport();
    transport.keep_alive_interval(Some(config.keep_alive));
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// Opens QUIC connections to one server.
#[derive(Debug, Clone)]
pub struct QuicConnector {
    endpoint: Endpoint,
    client_config: quinn::ClientConfig,
    server: SocketAddr,
    server_name: String,
    url: String,
}

impl QuicConnector {
    /// Connections to `server` (presenting a certificate for
    /// `server_name`) through an endpoint the caller built.
    pub fn new(
        endpoint: Endpoint,
        client_config: quinn::ClientConfig,
        server: SocketAddr,
        server_name: &str,
    ) -> QuicConnector {
        QuicConnector {
            endpoint,
            client_config,
            server,
            server_name: server_name.to_owned(),
            url: format!("quic://{server_name}:{}", server.port()),
        }
    }

    /// Connections to `quic://host:port` over a new UDP socket.
    pub async fn from_url(
        url: &str,
        trust: &Trust,
        config: &QuicConfig,
    ) -> Result<QuicConnector, TransportError> {
        let bad = |reason: String| TransportError::Connect {
            server: url.to_owned(),
            reason,
        };
        let authority = url
            .strip_prefix("quic://")
            .ok_or_else(|| bad("a QUIC URL starts with quic://".to_owned()))?
            .trim_end_matches('/');
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => (
                host,
                port.parse::<u16>()
                    .map_err(|_| bad("the port is not a number".to_owned()))?,
            ),
            _ => (authority, 7421),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| bad(e.to_string()))?
            .next()
            .ok_or_else(|| bad(format!("{host} has no address")))?;
        let local: SocketAddr = if server.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .map_err(|_| bad("bad local address".to_owned()))?;
        let endpoint = Endpoint::client(local).map_err(|e| bad(e.to_string()))?;
        let client_config = client_config(trust, config).map_err(|e| bad(e.to_string()))?;
        let mut connector = QuicConnector::new(endpoint, client_config, server, host);
        connector.url = url.to_owned();
        Ok(connector)
    }
}

#[async_trait]
impl Connector for QuicConnector {
    async fn connect(&self) -> Result<Arc<dyn Connection>, TransportError> {
        let failed = |reason: String| TransportError::Connect {
            server: self.url.clone(),
            reason,
        };
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), self.server, &self.server_name)
            .map_err(|e| failed(e.to_string()))?;
        let conn = connecting.await.map_err(|e| failed(e.to_string()))?;
        Ok(Arc::new(QuicConnection { conn }))
    }

    fn server(&self) -> String {
        self.url.clone()
    }
}

/// One QUIC connection.
#[derive(Debug)]
struct QuicConnection {
    conn: quinn::Connection,
}

/// A request's two streams; if dropped before the reply is read, both are
/// abandoned, which tells the server to cancel a waiting `lock`.
struct Exchange {
    send: SendStream,
    recv: RecvStream,
    done: bool,
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if !self.done {
            // Either may be closed already; nothing more to do then.
            let _ = self.send.reset(CANCEL.into());
            let _ = self.recv.stop(CANCEL.into());
        }
    }
}

fn lost(error: impl std::fmt::Display) -> TransportError {
    TransportError::Lost(error.to_string())
}

impl QuicConnection {
    /// One request on its own stream; sets `delivered` (if given) once the
    /// server has acknowledged the whole request.
    async fn exchange(
        &self,
        request: Request,
        delivered: Option<&AtomicBool>,
    ) -> Result<Outcome, TransportError> {
        let kind = request.op.kind();
        let (send, recv) = self.conn.open_bi().await.map_err(lost)?;
        let mut exchange = Exchange {
            send,
            recv,
            done: false,
        };
        let text = encode_request(&request);
        exchange
            .send
            .write_all(text.as_bytes())
            .await
            .map_err(lost)?;
        exchange.send.finish().map_err(lost)?;
        let reading = exchange.recv.read_to_end(REPLY_BYTES_MAX);
        let read = match delivered {
            None => reading.await,
            Some(delivered) => {
                tokio::pin!(reading);
                let acknowledged = exchange.send.stopped();
                tokio::select! {
                    biased;
                    read = &mut reading => read,
                    acked = acknowledged => {
                        if matches!(acked, Ok(None)) {
                            delivered.store(true, Ordering::Relaxed);
                        }
                        reading.await
                    }
                }
            }
        };
        let bytes = read.map_err(|e| match e {
            quinn::ReadToEndError::TooLong => {
                TransportError::Protocol("reply too large".to_owned())
            }
            quinn::ReadToEndError::Read(e) => lost(e),
        })?;
        exchange.done = true;
        let raw = decode_reply(&bytes).map_err(|e| TransportError::Protocol(e.to_string()))?;
        raw.into_outcome(kind)
            .map_err(|e| TransportError::Protocol(e.to_string()))
    }
}

/// Reads a stream one newline-ended line at a time (the last line may
/// end with the stream instead).
struct Lines {
    recv: RecvStream,
    buffer: Vec<u8>,
}

impl Lines {
    /// The next line; `Ok(None)` at the end of the stream.
    async fn next(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
                line.pop();
                return Ok(Some(line));
            }
            if self.buffer.len() > REPLY_BYTES_MAX {
                return Err(TransportError::Protocol("message too large".to_owned()));
            }
            let mut chunk = [0u8; 4096];
            match self.recv.read(&mut chunk).await.map_err(lost)? {
                Some(n) => self.buffer.extend_from_slice(&chunk[..n]),
                None if self.buffer.is_empty() => return Ok(None),
                None => return Ok(Some(std::mem::take(&mut self.buffer))),
            }
        }
    }
}

impl QuicConnection {
    /// A request that asks for events, on its own stream: the reply is its
    /// first line, each event a line after it, until the server finishes
    /// the stream. Dropping the feed stops the stream, which ends the
    /// events on the server.
    async fn subscribe_on_stream(
        &self,
        request: Request,
    ) -> Result<(Outcome, Option<EventFeed>), TransportError> {
        let kind = request.op.kind();
        let (mut send, recv) = self.conn.open_bi().await.map_err(lost)?;
        let mut waiting = Waiting(Some(Lines {
            recv,
            buffer: Vec::new(),
        }));
        let text = encode_request(&request);
        send.write_all(text.as_bytes()).await.map_err(lost)?;
        send.finish().map_err(lost)?;
        let first = match waiting.0.as_mut() {
            Some(lines) => lines.next().await?,
            None => None,
        };
        let lines = waiting.0.take();
        let first = first.ok_or_else(|| lost("the stream ended without a reply"))?;
        let raw = decode_reply(&first).map_err(|e| TransportError::Protocol(e.to_string()))?;
        let outcome = raw
            .into_outcome(kind)
            .map_err(|e| TransportError::Protocol(e.to_string()))?;
        if !matches!(&outcome, Ok(okay) if opens_feed(okay)) {
            return Ok((outcome, None));
        }
        let Some(lines) = lines else {
            return Err(lost("the stream went away"));
        };
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(read_events(lines, tx));
        Ok((outcome, Some(EventFeed::new(events, None))))
    }
}

/// A request that asks for events, waiting for its reply: if dropped
/// before the reply is read, its stream is stopped, which cancels a
/// waiting `lock` on the server.
struct Waiting(Option<Lines>);

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(lines) = self.0.as_mut() {
            // It may be closed already; nothing more to do then.
            let _ = lines.recv.stop(CANCEL.into());
        }
    }
}

/// Hands each event line of a stream to its feed, until the stream ends or
/// the feed is dropped (then it stops the stream: the server ends the
/// events).
async fn read_events(mut lines: Lines, tx: mpsc::UnboundedSender<Event>) {
    loop {
        let line = tokio::select! {
            biased;
            () = tx.closed() => break,
            line = lines.next() => line,
        };
        let Ok(Some(line)) = line else { return };
        match decode_event(&line) {
            Ok(event) => {
                if tx.send(event).is_err() {
                    break;
                }
            }
            Err(error) => tracing::warn!(%error, "unreadable event from the server"),
        }
    }
    let _ = lines.recv.stop(CANCEL.into());
}

#[async_trait]
impl Connection for QuicConnection {
    async fn subscribe(
        &self,
        request: Request,
    ) -> Result<(Outcome, Option<EventFeed>), TransportError> {
        self.subscribe_on_stream(request).await
    }

    async fn call(&self, request: Request) -> Result<Outcome, TransportError> {
        self.exchange(request, None).await
    }

    async fn call_noting_delivery(
        &self,
        request: Request,
        delivered: Option<&AtomicBool>,
    ) -> Result<Outcome, TransportError> {
        self.exchange(request, delivered).await
    }

    /// A stream per request: a copy overtakes a lost packet of the original.
    fn hedges(&self) -> bool {
        true
    }

    fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    async fn closed(&self) {
        self.conn.closed().await;
    }
}
