//! A shard's mailbox: one ordered channel in which requests are admitted up
//! to a bound, and notices are never refused.
//!
//! Requests (ops) beyond the bound are refused at once, so a flood is
//! answered `overloaded` instead of queued without end. Notices (a
//! connection closed, a requester gone, a cancel) must never be refused: an
//! ephemeral lock would outlive its connection, and a mass disconnect would
//! fill the mailbox and turn a bystander's request into `overloaded`. They
//! are bounded by construction instead: one `closed` per connection and
//! shard, at most one `gone` or `cancel` per request in flight, and
//! connections and requests in flight are bounded by the frontends. Both
//! kinds share one channel so that a notice never overtakes the request it
//! is about (a `gone` before its `lock` would leave the waiter queued for
//! nobody; a `closed` before an ephemeral `lock` would leave that lock held
//! for a closed connection).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use super::actor::ShardMsg;

/// The sending side, held by the engine.
#[derive(Debug)]
pub(crate) struct Mailbox {
    tx: mpsc::UnboundedSender<ShardMsg>,
    /// Requests sent and not yet received.
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

/// The receiving side, held by the shard's actor.
#[derive(Debug)]
pub(crate) struct Inbox {
    rx: mpsc::UnboundedReceiver<ShardMsg>,
    queued: Arc<AtomicUsize>,
}

/// Why a request was not admitted.
#[derive(Debug)]
pub(crate) enum Refused {
    /// `capacity` requests wait already.
    Full,
    /// The shard has stopped.
    Closed,
}

/// A mailbox that admits up to `capacity` waiting requests.
pub(crate) fn mailbox(capacity: usize) -> (Mailbox, Inbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let mailbox = Mailbox {
        tx,
        queued: Arc::clone(&queued),
        capacity: capacity.max(1),
    };
    (mailbox, Inbox { rx, queued })
}

impl Mailbox {
    /// Sends a request, unless `capacity` requests wait already.
    pub fn try_request(&self, message: ShardMsg) -> Result<(), Refused> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Full);
        }
        self.tx.send(message).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            Refused::Closed
        })
    }

    /// Sends a notice, or an internal message (stats, digest, shutdown):
    /// never refused. Returns `false` only if the shard has stopped, which
    /// needs no notice any more.
    pub fn notify(&self, message: ShardMsg) -> bool {
        self.tx.send(message).is_ok()
    }
}

impl Inbox {
    /// The next message, once there is one; `None` once every sender is
    /// gone.
    pub async fn recv(&mut self) -> Option<ShardMsg> {
        let message = self.rx.recv().await?;
        Some(self.received(message))
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<ShardMsg> {
        let message = self.rx.try_recv().ok()?;
        Some(self.received(message))
    }

    fn received(&self, message: ShardMsg) -> ShardMsg {
        if matches!(message, ShardMsg::Op { .. }) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        message
    }
}
