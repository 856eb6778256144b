//! What the QUIC frontend's tests share: a real server on a loopback port.

use std::net::SocketAddr;

use deadbolt_core::Engine;
use deadbolt_transport_quic::{Identity, QuicConfig, Trust};
use quinn::{Connection, Endpoint};

/// A QUIC server on a loopback port, stopped when dropped.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its self-signed certificate (PEM), for clients to trust.
    pub ca: Vec<u8>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Serves `engine` over QUIC with `config` on a free loopback port.
pub fn serve(engine: Engine, config: QuicConfig) -> Server {
    let (identity, cert_pem, _) = Identity::self_signed().expect("certificate");
    let server_config = deadbolt_transport_quic::server_config(identity, &config).expect("config");
    let endpoint =
        quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = endpoint.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(deadbolt_transport_quic::serve(
        endpoint,
        engine,
        config,
        async {
            let _ = stopped.await;
        },
    ));
    Server {
        addr,
        ca: cert_pem.into_bytes(),
        _stop: stop,
    }
}

/// A bare QUIC connection to `server` with the default settings (its
/// endpoint must outlive it), for a test that chooses what each stream
/// carries and when it is stopped.
#[allow(dead_code, reason = "not every test file opens bare connections")]
pub async fn bare_connection(server: &Server) -> (Endpoint, Connection) {
    let endpoint = Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let config = deadbolt_transport_quic::client_config(
        &Trust::CaPem(server.ca.clone()),
        &QuicConfig::default(),
    )
    .expect("config");
    let conn = endpoint
        .connect_with(config, server.addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    (endpoint, conn)
}
