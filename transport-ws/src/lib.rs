//! deadbolt over WebSocket (SPEC section 4): the server frontend and the
//! client transport. Only a transport: what else its port serves is the
//! embedding server's choice (see [`routes`]).
//!
//! The server speaks HTTP/1.1 just far enough to read one request head,
//! upgrade `GET /ws` to a WebSocket, and hand any other request to the
//! [`HttpRoutes`] of its [`WsConfig`] (by default: `404`). After the
//! upgrade every text frame is one JSON request and every reply one text
//! frame. Requests on a connection run concurrently and are answered as
//! they complete, so a waiting `lock` never holds up the requests behind
//! it.
//!
//! Everything here is generic over the byte stream: the server takes a
//! [`Listener`] and a shutdown future, the client a [`Dialer`], so the
//! deterministic simulation runs this exact code over simulated TCP.
//!
//! Layout:
//! - [`config`]: every limit of the frontend, and its routes;
//! - [`gauges`]: live figures of its load (reply bytes held, handshakes);
//! - [`listener`]: where connections come from (tokio TCP here);
//! - `http`: the HTTP request head, the upgrade, plain answers;
//! - [`routes`]: the hook that answers requests other than `/ws`;
//! - [`server`]: the accept loop, connection limit and graceful shutdown;
//! - `admission`: the bound on connections still in their handshake;
//! - `connection`: one WebSocket connection's request loop;
//! - [`client`]: the client transport behind `deadbolt_core::client::Client`.

mod admission;
pub mod client;
pub mod config;
mod connection;
pub mod gauges;
mod http;
pub mod listener;
pub mod routes;
pub mod server;

pub use client::{Dialer, TcpDialer, TlsDialer, WsClientConfig, WsConnector};
pub use config::WsConfig;
pub use gauges::WsGauges;
pub use http::FORWARDED_PATH;
pub use listener::Listener;
pub use routes::{HttpRequest, HttpResponse, HttpRoutes, NotFound};
pub use server::serve;
