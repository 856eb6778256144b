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
//! through.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use crate::gauges::WsGauges;

/// The connections in their handshake.
#[derive(Debug)]
pub(crate) struct Handshakes {
    max: usize,
    open: Mutex<Open>,
    gauges: WsGauges,
}

#[derive(Debug, Default)]
struct Open {
    /// By order of arrival; dropping a sender tells its connection to give
    /// up.
    by_age: BTreeMap<u64, oneshot::Sender<()>>,
    next: u64,
}

/// One connection's place among the handshakes, given up when dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    id: u64,
    evicted: oneshot::Receiver<()>,
    handshakes: Arc<Handshakes>,
}

impl Handshakes {
    /// Room for `max` connections in their handshake (at least one).
    pub(crate) fn new(max: usize, gauges: WsGauges) -> Handshakes {
        Handshakes {
            max: max.max(1),
            open: Mutex::default(),
            gauges,
        }
    }

    /// Admits a new connection, evicting the oldest one still in its
    /// handshake if there is no room.
    pub(crate) fn enter(self: &Arc<Self>) -> Ticket {
        let (tell, evicted) = oneshot::channel();
        let mut open = self.lock();
        if open.by_age.len() >= self.max && open.by_age.pop_first().is_some() {
            self.gauges.evicted();
        }
        let id = open.next;
        open.next += 1;
        open.by_age.insert(id, tell);
        self.gauges.set_handshakes(open.by_age.len());
        Ticket {
            id,
            evicted,
            handshakes: self.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Open> {
        // Nothing in the critical sections can panic halfway; the map is
        // consistent even if a holder did.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
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
        open.by_age.remove(&self.id);
        self.handshakes.gauges.set_handshakes(open.by_age.len());
    }
}
