//! The WebSocket frontend's limits, each configurable, and what else its
//! port serves.

use std::sync::Arc;
use std::time::Duration;

use crate::gauges::WsGauges;
use crate::routes::{HttpRoutes, NotFound};

/// Limits of the WebSocket frontend, and the routes of its other HTTP
/// requests. The message size limit comes from the engine's
/// [`Limits`](deadbolt_core::Limits).
#[derive(Debug, Clone)]
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
        }
    }
}
