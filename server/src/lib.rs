//! deadbolt-server: the server, assembled once. `deadbolt serve` and the
//! simulation's server host both call [`run`], so the simulation runs
//! exactly what ships: the engine, both frontends, the HTTP routes of the
//! WebSocket port and graceful shutdown.
//!
//! [`run`] takes its sockets from the caller (a [`Listener`] for WebSocket,
//! an optional `quinn::Endpoint` for QUIC) and a shutdown future, as
//! mini-redis's `server::run` does: the binary binds real sockets and waits
//! for a signal, the simulation binds turmoil's. The caller also builds the
//! QUIC endpoint's TLS identity, since building the endpoint needs it; see
//! `bins/deadbolt/src/serve.rs`.
//!
//! The transports stay transports: the WebSocket frontend upgrades `/ws`
//! and hands every other HTTP request to the [`Routes`] defined here.
//!
//! Layout:
//! - [`auth_file`]: the `--auth` file (SPEC section 10), read into the
//!   engine's [`Policy`](deadbolt_core::auth::Policy);
//! - [`config`]: [`ServerConfig`] (the engine and each frontend) and
//!   [`Listeners`] (the injected sockets);
//! - [`server`]: [`run`], the order things start and stop in;
//! - [`routes`]: the dashboard, the browser client, `/metrics`, `/healthz`;
//! - [`metrics`]: the Prometheus recorder and the metrics page;
//! - `web/` (not Rust): the dashboard and the browser client, built into
//!   the binary by `routes`.
//!
//! [`Listener`]: deadbolt_transport_ws::Listener

pub mod auth_file;
pub mod config;
pub mod metrics;
pub mod routes;
pub mod server;

pub use config::{Durable, Listeners, Peering, ServerConfig};
pub use routes::Routes;
pub use server::{Error, run, run_node};
