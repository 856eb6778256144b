//! What [`run`](crate::run) is given: the configuration of every part, and
//! the sockets, which the caller binds.

use std::sync::Arc;

use deadbolt_core::EngineConfig;
use deadbolt_storage::{Disk, StoreConfig};
use deadbolt_transport_quic::QuicConfig;
use deadbolt_transport_ws::WsConfig;

/// How to run the server: the engine and each frontend.
///
/// The default is deterministic (the engine's seed 0, tokens from 1), as
/// tests and the simulation want; a real server starts from
/// [`EngineConfig::with_entropy`].
#[derive(Clone, Default)]
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
    /// Where acknowledged changes are kept, or `None` to keep nothing (the
    /// `--in-memory` server: everything dies with the process).
    pub storage: Option<Durable>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("engine", &self.engine)
            .field("ws", &self.ws)
            .field("quic", &self.quic)
            .field("storage", &self.storage.as_ref().map(|d| &d.store))
            .finish()
    }
}

/// A durable server's storage (SPEC section 8).
#[derive(Clone)]
pub struct Durable {
    /// The disk: the real one, or the simulation's.
    pub disk: Arc<dyn Disk>,
    /// The data directory and the sync policy.
    pub store: StoreConfig,
    /// Whether the log writer gets a thread of its own (a real server: its
    /// file calls block) or is a task of the server's runtime (the
    /// simulation, whose disk never blocks and whose runs must not depend
    /// on a thread's timing).
    pub writer_thread: bool,
}

/// What a cluster node needs besides a single server's configuration
/// (SPEC section 9): its place in the cluster, its peer port, and a way to
/// dial the other nodes.
pub struct Peering<L, D> {
    /// The node, its members, and where its Raft log goes.
    pub cluster: deadbolt_replication::ClusterConfig,
    /// The peer port, bound by the caller.
    pub listener: L,
    /// Dials peers (and the leader, to forward).
    pub dialer: D,
}

impl<L, D> std::fmt::Debug for Peering<L, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peering")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
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
