//! Admission of new connections before their handshake. Connections still
//! sending their HTTP request head are bounded apart from the WebSocket
//! connection limit ([`WsConfig::handshakes_max`](crate::WsConfig)), so
//! that sockets which never complete a request cannot hold the slots of
//! clients that do, nor keep `/healthz` from being answered.
//!
//! At the bound, a new connection evicts the oldest one still in its head:
//! the one that has had longest to send a few hundred bytes. That is a
//! handshake timeout that shortens itself under pressure: with no flood a
//! connection has the whole `handshake_timeout`; during a flood of silent
//! sockets it has as long as the flood takes to open `handshakes_max` more,
//! while a well-behaved client sends its head within one round trip and is
//! through. One address may hold at most
//! [`WsConfig::handshakes_per_address_max`](crate::WsConfig) places; past
//! it, a new connection from that address evicts that address's oldest, so
//! a flood from one address never evicts anyone else.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use crate::gauges::WsGauges;

/// The connections in their handshake.
#[derive(Debug)]
pub(crate) struct Handshakes {
    max: usize,
    per_address_max: usize,
    open: Mutex<Open>,
    gauges: WsGauges,
}

#[derive(Debug, Default)]
struct Open {
    /// Every place, by order of arrival.
    by_age: BTreeMap<u64, Place>,
    /// Each address's places, oldest first.
    by_address: BTreeMap<IpAddr, VecDeque<u64>>,
    next: u64,
}

#[derive(Debug)]
struct Place {
    address: IpAddr,
    /// Dropped to tell the connection to give up.
    _tell: oneshot::Sender<()>,
}

/// One connection's place among the handshakes, given up when dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    id: u64,
    evicted: oneshot::Receiver<()>,
    handshakes: Arc<Handshakes>,
}

impl Handshakes {
    /// Room for `max` connections in their handshake, `per_address_max`
    /// of them from one address (each at least one).
    pub(crate) fn new(max: usize, per_address_max: usize, gauges: WsGauges) -> Handshakes {
        Handshakes {
            max: max.max(1),
            per_address_max: per_address_max.max(1),
            open: Mutex::default(),
            gauges,
        }
    }

    /// Admits a new connection from `address`, evicting first that
    /// address's oldest place if it holds its share, else the oldest of
    /// all if there is no room.
    pub(crate) fn enter(self: &Arc<Self>, address: IpAddr) -> Ticket {
        let address = source(address);
        let (tell, evicted) = oneshot::channel();
        let mut open = self.lock();
        let own = open
            .by_address
            .get(&address)
            .filter(|ids| ids.len() >= self.per_address_max)
            .and_then(|ids| ids.front().copied());
        let oldest = open.by_age.keys().next().copied();
        let full = open.by_age.len() >= self.max;
        if let Some(id) = own.or(oldest.filter(|_| full)) {
            open.remove(id);
            self.gauges.evicted();
        }
        let id = open.next;
        open.next += 1;
        let place = Place {
            address,
            _tell: tell,
        };
        open.by_age.insert(id, place);
        open.by_address.entry(address).or_default().push_back(id);
        self.gauges.set_handshakes(open.by_age.len());
        Ticket {
            id,
            evicted,
            handshakes: self.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Open> {
        // Nothing in the critical sections can panic halfway; the maps are
        // consistent even if a holder did.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The source a per-address share is counted for: the IPv4 address, or
/// the /64 of an IPv6 one (a single host is commonly given a whole /64).
fn source(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

impl Open {
    /// Gives up place `id`, if it is still held; dropping it tells its
    /// connection.
    fn remove(&mut self, id: u64) {
        let Some(place) = self.by_age.remove(&id) else {
            return;
        };
        if let Some(ids) = self.by_address.get_mut(&place.address) {
            ids.retain(|&other| other != id);
            if ids.is_empty() {
                self.by_address.remove(&place.address);
            }
        }
    }
}

impl Ticket {
    /// Resolves once a newer connection took this one's place.
    pub(crate) async fn evicted(&mut self) {
        // Either way (a value, or the sender dropped), the place is gone.
        let _ = (&mut self.evicted).await;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.handshakes.lock();
        open.remove(self.id);
        self.handshakes.gauges.set_handshakes(open.by_age.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_host_counts_as_its_64_and_a_mapped_ipv4_as_itself() {
        let host = |text: &str| source(text.parse().expect("address"));
        assert_eq!(host("2001:db8:1:2:aaaa::1"), host("2001:db8:1:2:bbbb::2"));
        assert_ne!(host("2001:db8:1:2::1"), host("2001:db8:1:3::1"));
        assert_eq!(host("::ffff:10.0.0.1"), host("10.0.0.1"));
    }

    #[test]
    fn an_address_at_its_share_evicts_its_own_oldest_and_the_bound_the_oldest_of_all() {
        let handshakes = Arc::new(Handshakes::new(4, 2, WsGauges::default()));
        let (a, b): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("a"),
            "10.0.0.2".parse().expect("b"),
        );
        let mut b1 = handshakes.enter(b);
        let mut a1 = handshakes.enter(a);
        let _a2 = handshakes.enter(a);
        let _a3 = handshakes.enter(a);
        assert!(
            a1.evicted
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed)
        );
        assert!(
            b1.evicted
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Empty)
        );
        let _b2 = handshakes.enter(b);
        let _c = handshakes.enter("10.0.0.3".parse().expect("c"));
        assert!(
            b1.evicted
                .try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(handshakes.gauges.handshakes(), 4);
        assert_eq!(handshakes.gauges.handshakes_evicted(), 2);
    }
}
