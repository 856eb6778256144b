//! The client transport: QUIC connections for
//! [`deadbolt_core::client::Client`], a stream per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use deadbolt_core::client::{Connection, Connector, TransportError};
use deadbolt_core::proto::{Outcome, Request, decode_reply, encode_request};
use quinn::{Endpoint, RecvStream, SendStream};

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

#[async_trait]
impl Connection for QuicConnection {
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
