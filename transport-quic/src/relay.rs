//! A lossy UDP relay: put it between a QUIC client and the server to see
//! how deadbolt behaves on a bad network. Each datagram, in each direction,
//! is dropped with a fixed probability drawn from a seeded generator, so a
//! run can be repeated. The integration tests and the benchmark use it.
//!
//! It also counts the QUIC Retry packets it passes to the client, so that a
//! test can see whether the server asked for address validation (quinn
//! keeps no statistic of it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// Relays datagrams between one client and a server, dropping a share.
#[derive(Debug)]
pub struct LossyRelay {
    addr: SocketAddr,
    loss: Arc<Loss>,
    counts: Arc<Counts>,
    pumps: [JoinHandle<()>; 2],
}

#[derive(Debug, Default)]
struct Counts {
    relayed: AtomicU64,
    dropped: AtomicU64,
    /// QUIC version 1 Retry packets relayed to the client.
    retries: AtomicU64,
}

/// Decides, datagram by datagram, what to drop.
#[derive(Debug)]
struct Loss {
    /// The drop probability, as the bits of an `f64`, so it can change
    /// while the relay runs.
    probability: AtomicU64,
    state: Mutex<u64>,
}

impl Loss {
    fn drops_next(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // SplitMix64: small, seedable, good enough for coin flips.
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let probability = f64::from_bits(self.probability.load(Ordering::Relaxed));
        ((z >> 11) as f64 / (1u64 << 53) as f64) < probability
    }
}

impl LossyRelay {
    /// Relays to `server`, dropping each datagram with probability `loss`
    /// (0.0 to 1.0), the coin flips seeded by `seed`.
    pub async fn start(server: SocketAddr, loss: f64, seed: u64) -> std::io::Result<LossyRelay> {
        let outer = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let inner = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = outer.local_addr()?;
        let counts = Arc::new(Counts::default());
        let loss = Arc::new(Loss {
            probability: AtomicU64::new(loss.to_bits()),
            state: Mutex::new(seed),
        });
        let client = Arc::new(Mutex::new(None::<SocketAddr>));
        let up = tokio::spawn(pump(
            outer.clone(),
            inner.clone(),
            Route::ToServer(server, client.clone()),
            loss.clone(),
            counts.clone(),
        ));
        let down = tokio::spawn(pump(
            inner,
            outer,
            Route::ToClient(client),
            loss.clone(),
            counts.clone(),
        ));
        Ok(LossyRelay {
            addr,
            loss,
            counts,
            pumps: [up, down],
        })
    }

    /// Where clients send: the relay's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the drop probability; 1.0 cuts the link silently.
    pub fn set_loss(&self, loss: f64) {
        self.loss
            .probability
            .store(loss.to_bits(), Ordering::Relaxed);
    }

    /// Datagrams relayed and dropped so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.counts.relayed.load(Ordering::Relaxed),
            self.counts.dropped.load(Ordering::Relaxed),
        )
    }

    /// QUIC version 1 Retry packets relayed to the client so far: how often
    /// the server asked it to prove its address before accepting it. A
    /// Retry is counted before it is sent on, so once the client has its
    /// connection, every Retry of that handshake is in the count.
    pub fn retries(&self) -> u64 {
        self.counts.retries.load(Ordering::Relaxed)
    }
}

/// Whether `datagram` is a QUIC version 1 Retry packet (RFC 9000, 17.2.5):
/// a long header (form bit set), version 1, long packet type 3. A Retry has
/// no length field, so it is never coalesced: it is the whole datagram.
fn is_retry(datagram: &[u8]) -> bool {
    const LONG_HEADER: u8 = 0x80;
    const RETRY: u8 = 0x3;
    match datagram {
        // The first byte, then the version: 0x00000001.
        [first, 0, 0, 0, 1, ..] => first & LONG_HEADER != 0 && (first >> 4) & 0x3 == RETRY,
        _ => false,
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        for pump in &self.pumps {
            pump.abort();
        }
    }
}

/// Where a pump sends what it reads.
enum Route {
    /// To the server, remembering who the client is.
    ToServer(SocketAddr, Arc<Mutex<Option<SocketAddr>>>),
    /// Back to the client last heard from.
    ToClient(Arc<Mutex<Option<SocketAddr>>>),
}

async fn pump(
    from: Arc<UdpSocket>,
    to: Arc<UdpSocket>,
    route: Route,
    loss: Arc<Loss>,
    counts: Arc<Counts>,
) {
    let mut buffer = vec![0u8; 65_536];
    loop {
        let Ok((n, sender)) = from.recv_from(&mut buffer).await else {
            return;
        };
        let destination = match &route {
            Route::ToServer(server, client) => {
                *client.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
                Some(*server)
            }
            Route::ToClient(client) => *client.lock().unwrap_or_else(|p| p.into_inner()),
        };
        let Some(destination) = destination else {
            continue;
        };
        if loss.drops_next() {
            counts.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        counts.relayed.fetch_add(1, Ordering::Relaxed);
        if matches!(route, Route::ToClient(_)) && is_retry(&buffer[..n]) {
            counts.retries.fetch_add(1, Ordering::Relaxed);
        }
        // A send that fails is one more lost datagram.
        let _ = to.send_to(&buffer[..n], destination).await;
    }
}

#[cfg(test)]
mod tests {
    use super::is_retry;

    #[test]
    fn only_a_version_1_long_header_of_type_3_is_a_retry() {
        let retry = [0xf0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8];
        assert!(is_retry(&retry));
        // The four low bits are unused in a Retry: any value will do.
        assert!(is_retry(&[0xff, 0, 0, 0, 1, 0]));
        let initial = [0xc3, 0, 0, 0, 1, 8];
        assert!(!is_retry(&initial), "type 0: Initial");
        let handshake = [0xe0, 0, 0, 0, 1, 8];
        assert!(!is_retry(&handshake), "type 2: Handshake");
        assert!(!is_retry(&[0x70, 0, 0, 0, 1, 8]), "short header");
        assert!(!is_retry(&[0xf0, 0, 0, 0, 0, 8]), "version negotiation");
        assert!(!is_retry(&[0xf0, 0x6b, 0x33, 0x43, 0xcf, 8]), "QUIC v2");
        assert!(!is_retry(&[0xf0, 0, 0, 0]), "truncated");
        assert!(!is_retry(&[]));
    }
}
