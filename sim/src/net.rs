//! The simulated network under the real transports: turmoil TCP for the
//! WebSocket frontend and client, turmoil UDP (through quinn's
//! `AsyncUdpSocket`) for QUIC, and a quinn runtime on the host's simulated
//! clock. Nothing here changes what the transports do; it only gives them
//! simulated sockets.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use deadbolt_transport_quic::{Identity, QuicConfig, Trust};
use deadbolt_transport_ws::{Dialer, Listener};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{
    AsyncTimer, AsyncUdpSocket, ConnectionId, ConnectionIdGenerator, Runtime, TimeSource, UdpPoller,
};

/// A turmoil TCP listener, for the WebSocket frontend.
pub struct SimListener(pub turmoil::net::TcpListener);

#[async_trait]
impl Listener for SimListener {
    type Stream = turmoil::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)> {
        self.0.accept().await
    }
}

/// Dials turmoil TCP, for the WebSocket client.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimDialer;

#[async_trait]
impl Dialer for SimDialer {
    type Stream = turmoil::net::TcpStream;

    async fn dial(&self, host: &str, port: u16) -> io::Result<Self::Stream> {
        turmoil::net::TcpStream::connect((host, port)).await
    }
}

/// A turmoil UDP socket as quinn sees one.
pub struct SimUdp {
    inner: turmoil::net::UdpSocket,
}

impl SimUdp {
    /// Binds a simulated UDP socket on `port` (0: any).
    pub async fn bind(port: u16) -> io::Result<SimUdp> {
        let inner = turmoil::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, port)).await?;
        Ok(SimUdp { inner })
    }
}

impl fmt::Debug for SimUdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimUdp")
            .field("local", &self.inner.local_addr().ok())
            .finish()
    }
}

/// turmoil never pushes back on sends.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let segment = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for datagram in transmit.contents.chunks(segment) {
            // A failed send is a lost datagram; an error here would stop
            // quinn's connection driver for good.
            let _ = self.inner.try_send_to(datagram, transmit.destination);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut received = 0;
        loop {
            while received < bufs.len().min(meta.len()) {
                match self.inner.try_recv_from(&mut bufs[received]) {
                    Ok((len, addr)) => {
                        meta[received] = RecvMeta {
                            addr,
                            len,
                            stride: len,
                            ecn: None,
                            dst_ip: None,
                        };
                        received += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if received > 0 {
                return Poll::Ready(Ok(received));
            }
            // Polling `readable` once registers this task's waker with the
            // socket's queue; the future itself may then be dropped.
            let readable = self.inner.readable();
            let mut readable = std::pin::pin!(readable);
            match readable.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// quinn's runtime inside a turmoil host: tokio's simulated clock.
#[derive(Debug)]
pub struct SimRuntime;

#[derive(Debug)]
struct SimTimer(Pin<Box<tokio::time::Sleep>>);

impl AsyncTimer for SimTimer {
    fn reset(mut self: Pin<&mut Self>, at: Instant) {
        self.0.as_mut().reset(at.into());
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<()> {
        Future::poll(self.0.as_mut(), cx)
    }
}

impl Runtime for SimRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(SimTimer(Box::pin(tokio::time::sleep_until(at.into()))))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(future);
    }

    fn wrap_udp_socket(&self, _socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        Err(io::Error::other("the simulation has no real sockets"))
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// Connection ids drawn from a counter, not the OS: the same seed gives the
/// same ids.
struct CountingIds {
    salt: u64,
    next: u64,
}

impl ConnectionIdGenerator for CountingIds {
    fn generate_cid(&mut self) -> ConnectionId {
        self.next += 1;
        let id = self.salt ^ self.next.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ConnectionId::new(&id.to_be_bytes())
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The wall clock as the simulation tells it.
struct SimClock;

impl TimeSource for SimClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + turmoil::since_epoch().unwrap_or_default()
    }
}

/// An endpoint configuration with every random choice seeded.
pub fn endpoint_config(seed: u64, host: u8) -> quinn::EndpointConfig {
    let mut key_bytes = [host; 64];
    key_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key_bytes);
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    let mut rng_seed = [host; 32];
    rng_seed[..8].copy_from_slice(&seed.to_le_bytes());
    config.rng_seed(Some(rng_seed));
    let salt = u64::from(host) << 56;
    config.cid_generator(move || Box::new(CountingIds { salt, next: 0 }));
    config
}

/// The simulated server's WebSocket limits: short idle limits, so that a
/// silent peer is noticed within the run.
pub fn ws_config() -> deadbolt_transport_ws::WsConfig {
    deadbolt_transport_ws::WsConfig {
        idle_ping: Duration::from_millis(300),
        idle_close: Duration::from_millis(1200),
        ..deadbolt_transport_ws::WsConfig::default()
    }
}

/// The simulated server's engine: `shards` shards with invariants checked
/// after each batch, broken ones reported to `trace`. Its journal is the
/// store `deadbolt_server::run` opens on the simulated disk.
pub fn engine_config(
    shards: usize,
    seed: u64,
    trace: &Arc<crate::trace::Trace>,
) -> deadbolt_core::EngineConfig {
    deadbolt_core::EngineConfig {
        shards,
        seed,
        invariant_alarm: Some(trace.alarm()),
        ..deadbolt_core::EngineConfig::new()
    }
}

/// The QUIC limits of the simulation: short timeouts, so that a silent peer
/// is noticed within the run.
pub fn quic_config() -> QuicConfig {
    QuicConfig {
        idle_timeout: Duration::from_millis(1500),
        keep_alive: Duration::from_millis(300),
        retry_above: usize::MAX,
        ..QuicConfig::default()
    }
}

/// The server's QUIC configuration, with a seeded token key and the
/// simulated wall clock.
pub fn quic_server_config(identity: Identity, seed: u64) -> anyhow::Result<quinn::ServerConfig> {
    let crypto = deadbolt_transport_quic::tls::server_crypto(identity)?;
    let token_key =
        ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[]).extract(&seed.to_le_bytes());
    let mut server = quinn::ServerConfig::new(crypto, Arc::new(token_key));
    quic_config().apply_to_server(&mut server);
    server.time_source(Arc::new(SimClock));
    Ok(server)
}

/// A client's QUIC configuration, with initial connection ids that are
/// unique to the client and the same every run.
pub fn quic_client_config(ca_pem: &[u8], client: u8) -> anyhow::Result<quinn::ClientConfig> {
    let mut config =
        deadbolt_transport_quic::client_config(&Trust::CaPem(ca_pem.to_vec()), &quic_config())?;
    let next = std::sync::atomic::AtomicU64::new(0);
    config.initial_dst_cid_provider(Arc::new(move || {
        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut bytes = [0u8; 8];
        bytes[0] = client;
        bytes[1..].copy_from_slice(&n.to_be_bytes()[1..]);
        ConnectionId::new(&bytes)
    }));
    Ok(config)
}

/// A QUIC endpoint on a simulated UDP socket.
pub async fn quic_endpoint(
    port: u16,
    seed: u64,
    host: u8,
    server: Option<quinn::ServerConfig>,
) -> io::Result<quinn::Endpoint> {
    let socket = SimUdp::bind(port).await?;
    quinn::Endpoint::new_with_abstract_socket(
        endpoint_config(seed, host),
        server,
        Arc::new(socket),
        Arc::new(SimRuntime),
    )
}
