//! deadbolt over WebSocket (SPEC section 4): the server frontend and the
//! client transport.
//!
//! The server speaks HTTP/1.1 just far enough to upgrade `GET /ws` to a
//! WebSocket and to answer `GET /` (the dashboard), `/deadbolt.js` (the
//! browser client), `/metrics` and `/healthz`; after that every text frame is
//! one JSON request and every reply one text frame. Requests on a
//! connection run concurrently and are answered as they complete, so a
//! waiting `lock` never holds up the requests behind it.
//!
//! Everything here is generic over the byte stream: the server takes a
//! [`Listener`] and a shutdown future, the client a [`Dialer`], so the
//! deterministic simulation runs this exact code over simulated TCP.
//!
//! Layout:
//! - [`config`]: every limit of the frontend;
//! - [`listener`]: where connections come from (tokio TCP here);
//! - `http`: the HTTP request head, routing and the upgrade;
//! - [`server`]: the accept loop, connection limit and graceful shutdown;
//! - [`metrics`]: `GET /metrics` in Prometheus text;
//! - `connection`: one WebSocket connection's request loop;
//! - [`client`]: the client transport behind `deadbolt_core::client::Client`.

pub mod client;
pub mod config;
mod connection;
mod http;
pub mod listener;
pub mod metrics;
pub mod server;

pub use client::{Dialer, TcpDialer, WsClientConfig, WsConnector};
pub use config::WsConfig;
pub use listener::Listener;
pub use server::serve;
