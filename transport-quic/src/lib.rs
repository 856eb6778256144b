//! deadbolt over QUIC (SPEC section 4): a stream per request, so that a
//! lost packet stalls only its own request.
//!
//! Each request opens a bidirectional stream, writes one JSON message and
//! finishes its side; the server writes one reply and finishes. A client
//! that resets or stops a stream (its request future was dropped) cancels a
//! waiting `lock`. `hello` on any stream binds the client id to the whole
//! QUIC connection, whose close (or idle timeout) releases its waiters and
//! ephemeral locks, exactly as a closed WebSocket does.
//!
//! The endpoint is injected: the binary builds it on a real UDP socket, the
//! simulation on simulated UDP through quinn's `AsyncUdpSocket`.
//!
//! Layout:
//! - [`config`]: the frontend's limits;
//! - [`tls`]: the one crypto provider (ring), certificates, rustls configs;
//! - [`server`]: the accept loop and each connection's requests;
//! - `stream`: one request's stream: its request read, its reply written;
//! - [`client`]: the client transport behind `deadbolt_core::client::Client`;
//! - [`relay`]: a lossy UDP relay, to test and measure on a bad network.

pub mod client;
pub mod config;
pub mod relay;
pub mod server;
mod stream;
pub mod tls;

pub use client::{QuicConnector, client_config};
pub use config::{Congestion, QuicConfig, QuicTuning};
pub use relay::LossyRelay;
pub use server::{serve, server_config};
pub use tls::{ALPN, Identity, TlsError, Trust};
