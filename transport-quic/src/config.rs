//! The QUIC frontend's limits, each configurable.

use std::time::Duration;

/// Limits of QUIC connections, for both ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicConfig {
    /// Requests (streams) in flight at once on one connection; a client
    /// past it waits for a stream, which is QUIC's own back-pressure.
    pub streams_per_connection: u32,
    /// A connection with no traffic for this long is closed (its waiters
    /// and ephemeral locks are then released).
    pub idle_timeout: Duration,
    /// The client sends keep-alives this often, so that a long lock wait is
    /// not taken for idleness.
    pub keep_alive: Duration,
    /// Bytes a peer may send on one stream before it is read: one message.
    pub stream_receive_window: u32,
    /// Bytes a peer may send on one connection before it is read.
    pub receive_window: u32,
    /// Connection attempts queued before the server refuses more.
    pub max_incoming: usize,
    /// Most open connections; past it, new ones are refused.
    pub max_connections: usize,
    /// With more connections open than this, a client must first prove its
    /// address with a Retry round trip (a defence against spoofed floods).
    pub retry_above: usize,
    /// How long shutdown waits for connections to close cleanly.
    pub shutdown_grace: Duration,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            streams_per_connection: 1024,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            stream_receive_window: (1 << 20) + (64 << 10),
            receive_window: 16 << 20,
            max_incoming: 1024,
            max_connections: 10_000,
            retry_above: 1_000,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl QuicConfig {
    /// Sets the server-side limits on `server`: transport parameters, the
    /// incoming-connection queue, no migration.
    pub fn apply_to_server(&self, server: &mut quinn::ServerConfig) {
        server
            .transport_config(std::sync::Arc::new(self.transport()))
            .max_incoming(self.max_incoming)
            .migration(false);
    }

    /// The transport parameters both ends use.
    pub fn transport(&self) -> quinn::TransportConfig {
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(self.streams_per_connection.into())
            .max_concurrent_uni_streams(0u32.into())
            .stream_receive_window(self.stream_receive_window.into())
            .receive_window(self.receive_window.into())
            .max_idle_timeout(quinn::IdleTimeout::try_from(self.idle_timeout).ok());
        transport
    }
}
