//! What [`run`](crate::run) is given: the configuration of every part, and
//! the sockets, which the caller binds.

use deadbolt_core::EngineConfig;
use deadbolt_transport_quic::QuicConfig;
use deadbolt_transport_ws::WsConfig;

/// How to run the server: the engine and each frontend.
///
/// The default is deterministic (the engine's seed 0, tokens from 1), as
/// tests and the simulation want; a real server starts from
/// [`EngineConfig::with_entropy`].
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// The engine: shards, limits, seed and first token.
    pub engine: EngineConfig,
    /// The WebSocket frontend's limits. Its `routes` answer only the
    /// requests the server's own [`Routes`](crate::routes::Routes) do not
    /// (by default: `404`).
    pub ws: WsConfig,
    /// The QUIC frontend's limits. Those that are transport parameters
    /// (streams, windows, idle timeout) take effect through the
    /// `quinn::ServerConfig` the endpoint was built with
    /// ([`QuicConfig::apply_to_server`]); the rest (connection limit,
    /// Retry threshold, shutdown grace) through this field.
    pub quic: QuicConfig,
}

/// The sockets the server serves on, bound by the caller: real ones in the
/// binary, turmoil's in the simulation. Only `bins/` and `sim/` bind
/// sockets.
#[derive(Debug)]
pub struct Listeners<L> {
    /// Where WebSocket (and plain HTTP) connections come from.
    pub ws: L,
    /// The QUIC endpoint, already carrying its server configuration
    /// (certificate, ALPN, transport limits), or `None` to serve WebSocket
    /// only.
    pub quic: Option<quinn::Endpoint>,
}
