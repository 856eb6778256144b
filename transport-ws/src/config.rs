//! The WebSocket frontend's limits, each configurable, and what else its
//! port serves.

use std::sync::Arc;
use std::time::Duration;

use crate::routes::{HttpRoutes, NotFound};

/// Limits of the WebSocket frontend, and the routes of its other HTTP
/// requests. The message size limit comes from the engine's
/// [`Limits`](deadbolt_core::Limits).
#[derive(Debug, Clone)]
pub struct WsConfig {
    /// Most connections open at once; past it, new ones get HTTP 503.
    pub max_connections: usize,
    /// How long a new connection may take to send its HTTP request head
    /// (slowloris guard).
    pub handshake_timeout: Duration,
    /// Longest HTTP request head, in bytes.
    pub head_bytes_max: usize,
    /// Most requests in flight on one connection; past it, requests are
    /// answered `overloaded`.
    pub max_in_flight: usize,
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
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            head_bytes_max: 16 * 1024,
            max_in_flight: 4096,
            idle_ping: Duration::from_secs(20),
            idle_close: Duration::from_secs(60),
            write_buffer_max: 8 << 20,
            shutdown_grace: Duration::from_secs(5),
            routes: Arc::new(NotFound),
        }
    }
}
