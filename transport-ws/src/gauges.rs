//! Live figures of the frontend's load: how many bytes of replies its
//! connections hold and how many connections are still in their handshake.
//! A cheap handle in [`WsConfig`](crate::WsConfig): keep a clone to read
//! them (tests do; so could a metrics page).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The load of one WebSocket frontend. Clones share the same figures.
#[derive(Debug, Clone, Default)]
pub struct WsGauges(Arc<Figures>);

#[derive(Debug, Default)]
struct Figures {
    pending_reply_bytes: AtomicUsize,
    pending_reply_bytes_peak: AtomicUsize,
    handshakes: AtomicUsize,
    handshakes_evicted: AtomicU64,
}

impl WsGauges {
    /// Bytes of replies the connections hold now, over all connections:
    /// replies finished and not yet written, and, for requests in flight
    /// whose reply may be large (`members`, `stats`, insert batches), the
    /// most their reply may take. Each connection keeps its share under
    /// [`WsConfig::pending_reply_bytes_max`](crate::WsConfig) plus one
    /// reply.
    pub fn pending_reply_bytes(&self) -> usize {
        self.0.pending_reply_bytes.load(Ordering::Relaxed)
    }

    /// The most [`pending_reply_bytes`](Self::pending_reply_bytes) has
    /// been since the frontend started.
    pub fn pending_reply_bytes_peak(&self) -> usize {
        self.0.pending_reply_bytes_peak.load(Ordering::Relaxed)
    }

    /// Connections still sending their HTTP request head.
    pub fn handshakes(&self) -> usize {
        self.0.handshakes.load(Ordering::Relaxed)
    }

    /// Connections dropped before their request head was complete to make
    /// room for newer ones, at [`WsConfig::handshakes_max`](crate::WsConfig).
    pub fn handshakes_evicted(&self) -> u64 {
        self.0.handshakes_evicted.load(Ordering::Relaxed)
    }

    pub(crate) fn add_pending(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let now = self
            .0
            .pending_reply_bytes
            .fetch_add(bytes, Ordering::Relaxed)
            + bytes;
        self.0
            .pending_reply_bytes_peak
            .fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn sub_pending(&self, bytes: usize) {
        self.0
            .pending_reply_bytes
            .fetch_sub(bytes, Ordering::Relaxed);
    }

    pub(crate) fn set_handshakes(&self, open: usize) {
        self.0.handshakes.store(open, Ordering::Relaxed);
    }

    pub(crate) fn evicted(&self) {
        self.0.handshakes_evicted.fetch_add(1, Ordering::Relaxed);
    }
}
