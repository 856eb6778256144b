//! Pushed events on the client side (SPEC section 7): the feed of one
//! request's events, which a transport hands back with the reply
//! ([`Connection::subscribe`](super::Connection::subscribe)), and
//! [`Watch`], what [`Client::watch_key`] and [`Client::watch_set`] return.
//!
//! A feed lives on the connection that carried its request: it ends when
//! that connection does (the server forgets a closed connection's
//! watches), and dropping it tells the server to stop (a `cancel` over
//! WebSocket, a stopped stream over QUIC).

use tokio::sync::mpsc;

use super::{Client, Error, Timed, TransportError};
use crate::proto::{Empty, Event, Okay, Op, Watched};

/// The events of one request, in the order the server pushed them.
pub struct EventFeed {
    events: mpsc::UnboundedReceiver<Event>,
    /// Run once, when the feed is dropped: tells the server to stop.
    stop: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl std::fmt::Debug for EventFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventFeed").finish_non_exhaustive()
    }
}

impl EventFeed {
    /// A feed reading `events`; `stop` (if any) runs when it is dropped.
    pub fn new(
        events: mpsc::UnboundedReceiver<Event>,
        stop: Option<Box<dyn FnOnce() + Send + Sync>>,
    ) -> EventFeed {
        EventFeed { events, stop }
    }

    /// The next event; `None` once the request's events are over (its
    /// connection closed, or the server ended them).
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

impl Drop for EventFeed {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

/// Whether a successful reply leaves events coming: a grant (of a `lock`
/// with `notify`) or a watch in place (`{}`).
pub fn opens_feed(okay: &Okay) -> bool {
    matches!(okay, Okay::Granted(_) | Okay::Empty(_))
}

/// A `watch` on a lock key or a set: its events until it is dropped (which
/// cancels it) or its connection closes. It does not follow the client to
/// a new connection: once [`Watch::next`] says `None`, watch again (and
/// `inspect` what changed meanwhile).
#[derive(Debug)]
pub struct Watch {
    feed: EventFeed,
}

impl Watch {
    /// The next event: `granted`, `released`, `expired` for a key;
    /// `created`, `expired`, `torn_down` for a set. `None` once the watch
    /// is over (its connection closed).
    pub async fn next(&mut self) -> Option<Event> {
        self.feed.next().await
    }
}

impl Client {
    /// Watches the lock `key`: every grant, release and expiry of it from
    /// now on. Needs the `read` grant of the key with authentication on.
    pub async fn watch_key(&self, key: &str) -> Result<Watch, Error> {
        self.watch(Watched::Key(key.to_owned())).await
    }

    /// Watches the set `set`: its creation, expiry and tear-down from now
    /// on.
    pub async fn watch_set(&self, set: &str) -> Result<Watch, Error> {
        self.watch(Watched::Set(set.to_owned())).await
    }

    async fn watch(&self, target: Watched) -> Result<Watch, Error> {
        let op = Op::Watch { target };
        let timed: Timed<Empty> = self.call_with(|_| op.clone(), true).await?;
        let feed = timed.events.ok_or_else(no_feed)?;
        Ok(Watch { feed })
    }
}

/// A transport answered a request for events without a feed.
pub(crate) fn no_feed() -> Error {
    Error::Transport(TransportError::Protocol(
        "the transport gave no events for a request that asked for them".to_owned(),
    ))
}
