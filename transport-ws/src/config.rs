//! The WebSocket frontend's limits, each configurable, and what else its
//! port serves.

use std::sync::Arc;
use std::time::Duration;

use crate::gauges::WsGauges;
use crate::routes::{HttpRoutes, NotFound};

/// Limits of the WebSocket frontend, and the routes of its other HTTP
/// requests. The message size limit comes from the engine's
/// [`Limits`](deadbolt_core::Limits).
#[derive(Clone)]
pub struct WsConfig {
    /// Most WebSocket connections open at once; past it, new upgrades get
    /// HTTP 503. A connection takes its slot once its upgrade request is
    /// read, and plain HTTP requests (`/healthz`) take none.
    pub max_connections: usize,
    /// Most connections still sending their HTTP request head; past it, a
    /// new connection evicts the oldest of them (see `admission`), so that
    /// silent sockets cannot lock out clients that complete a request.
    pub handshakes_max: usize,
    /// Most of those from one IP address; past it, a new connection from
    /// that address evicts that address's oldest, so that a flood from one
    /// address cannot evict anyone else's.
    pub handshakes_per_address_max: usize,
    /// How long a new connection may take to send its HTTP request head
    /// (slowloris guard); shorter in effect under a flood, through
    /// `handshakes_max`.
    pub handshake_timeout: Duration,
    /// Longest HTTP request head, in bytes.
    pub head_bytes_max: usize,
    /// Most requests in flight on one connection; past it, requests are
    /// answered `overloaded`.
    pub max_in_flight: usize,
    /// Most bytes of replies one connection may hold: replies finished and
    /// not yet written, and room reserved for the large replies of its
    /// requests in flight (`members`, `stats`: up to the message limit
    /// each). A request that would pass it waits, and the connection reads
    /// nothing more until it fits, so a connection holds at most this plus
    /// one reply however many requests it pipelines without reading.
    pub pending_reply_bytes_max: usize,
    /// After this much silence from the client, the server pings it.
    pub idle_ping: Duration,
    /// After this much silence from the client, the server closes the
    /// connection. Also the longest one batch of replies (those ready
    /// together) may take to write: a client that stopped reading, or
    /// reads so slowly that a batch cannot drain in this time, is dropped.
    pub idle_close: Duration,
    /// Most bytes of replies buffered for a client that reads slowly; past
    /// it the connection's writes wait for the client (at most
    /// `idle_close`), and meanwhile it reads no more requests from it.
    pub write_buffer_max: usize,
    /// How long shutdown waits for connections to close cleanly.
    pub shutdown_grace: Duration,
    /// Answers every plain HTTP request, that is every request but
    /// `/ws`; by default [`NotFound`].
    pub routes: Arc<dyn HttpRoutes>,
    /// Where the frontend reports its load; keep a clone to read it.
    pub gauges: WsGauges,
    /// With a TLS configuration, the port serves `https://` and `wss://`
    /// only: each connection's TLS handshake comes first, within
    /// `handshake_timeout`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Origins besides the server's own from which a browser may open a
    /// WebSocket (`https://app.example.com`; `*`: any). An upgrade that
    /// carries another `Origin` is answered 403 (cross-site WebSocket
    /// hijacking); one without `Origin` (not from a browser) is let in.
    pub allowed_origins: Vec<String>,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_connections: 10_000,
            handshakes_max: 1024,
            handshakes_per_address_max: 64,
            handshake_timeout: Duration::from_secs(10),
            head_bytes_max: 16 * 1024,
            max_in_flight: 4096,
            pending_reply_bytes_max: 4 << 20,
            idle_ping: Duration::from_secs(20),
            idle_close: Duration::from_secs(60),
            write_buffer_max: 8 << 20,
            shutdown_grace: Duration::from_secs(5),
            routes: Arc::new(NotFound),
            gauges: WsGauges::default(),
            tls: None,
            allowed_origins: Vec::new(),
        }
    }
}

impl std::fmt::Debug for WsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsConfig")
            .field("max_connections", &self.max_connections)
            .field("handshakes_max", &self.handshakes_max)
            .field(
                "handshakes_per_address_max",
                &self.handshakes_per_address_max,
            )
            .field("handshake_timeout", &self.handshake_timeout)
            .field("head_bytes_max", &self.head_bytes_max)
            .field("max_in_flight", &self.max_in_flight)
            .field("pending_reply_bytes_max", &self.pending_reply_bytes_max)
            .field("idle_ping", &self.idle_ping)
            .field("idle_close", &self.idle_close)
            .field("write_buffer_max", &self.write_buffer_max)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("routes", &self.routes)
            .field("tls", &self.tls.is_some())
            .field("allowed_origins", &self.allowed_origins)
            .finish_non_exhaustive()
    }
}

impl WsConfig {
    /// Whether a WebSocket upgrade from a page of `origin` may proceed: no
    /// `Origin` (not a browser), the server's own origin (the scheme this
    /// port serves and the request's `Host`), or one allowed.
    pub fn origin_allowed(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin.map(|o| o.trim().trim_end_matches('/')) else {
            return true;
        };
        let listed = self
            .allowed_origins
            .iter()
            .map(|a| a.trim().trim_end_matches('/'))
            .any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(origin));
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let own = host.is_some_and(|host| {
            origin
                .strip_prefix(scheme)
                .and_then(|rest| rest.strip_prefix("://"))
                .is_some_and(|rest| rest.eq_ignore_ascii_case(host.trim()))
        });
        listed || own
    }
}

#[cfg(test)]
mod tests {
    use super::WsConfig;

    #[test]
    fn only_the_own_origin_and_listed_ones_may_upgrade() {
        let config = WsConfig {
            allowed_origins: vec!["https://app.example.com/".into()],
            ..WsConfig::default()
        };
        let host = Some("127.0.0.1:7420");
        assert!(config.origin_allowed(None, host));
        assert!(config.origin_allowed(Some("http://127.0.0.1:7420"), host));
        assert!(config.origin_allowed(Some("https://APP.example.com"), host));
        assert!(!config.origin_allowed(Some("https://127.0.0.1:7420"), host));
        assert!(!config.origin_allowed(Some("http://evil.example"), host));
        assert!(!config.origin_allowed(Some("null"), host));
        assert!(!config.origin_allowed(Some("http://127.0.0.1:7420"), None));
        let any = WsConfig {
            allowed_origins: vec!["*".into()],
            ..WsConfig::default()
        };
        assert!(any.origin_allowed(Some("http://evil.example"), host));
    }
}
