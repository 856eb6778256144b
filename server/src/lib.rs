//! deadbolt-server: the server, assembled once. `deadbolt serve` and the
//! simulation's server host both call [`run`], so the simulation runs
//! exactly what ships: the engine, both frontends and graceful shutdown.
//!
//! [`run`] takes its sockets from the caller (a [`Listener`] for WebSocket,
//! an optional `quinn::Endpoint` for QUIC) and a shutdown future, as
//! mini-redis's `server::run` does: the binary binds real sockets and waits
//! for a signal, the simulation binds turmoil's. The caller also builds the
//! QUIC endpoint's TLS identity, since building the endpoint needs it; see
//! `bins/deadbolt/src/serve.rs`.
//!
//! Layout:
//! - [`config`]: [`ServerConfig`] (the engine and each frontend) and
//!   [`Listeners`] (the injected sockets);
//! - [`server`]: [`run`], the order things start and stop in.
//!
//! [`Listener`]: deadbolt_transport_ws::Listener

pub mod config;
pub mod server;

pub use config::{Listeners, ServerConfig};
pub use server::{Error, run};
