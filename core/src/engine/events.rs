//! Pushed events (SPEC section 7): from the shards' reports to a
//! connection's transport.
//!
//! The path has three parts:
//!
//! - each shard actor keeps its [`Listeners`]: the watches on its keys and
//!   sets, and the `lock`s with `notify` whose grants last. After each
//!   batch it turns the shard's [`events`](crate::shard::events) (outputs
//!   of applying commands, the same on every replica) into [`Note`]s for
//!   the listeners' connections;
//! - each connection has one [`Sink`] (cloned into every listener) and one
//!   [`Events`] queue, which its transport takes from the session and
//!   reads beside its requests;
//! - the `expiring` warning is a timer in the [`Events`] queue, not in the
//!   shard: it is advice about a lease, not a change of state, so it has
//!   no place in the command log (a log entry per warning would cost every
//!   replica a write for something only one connection wants). The shard
//!   reports each lease's start and restart; the queue fires when a third
//!   of it is left.
//!
//! Bounds: a connection holds at most
//! [`watches_per_connection_max`](crate::Limits::watches_per_connection_max)
//! subscriptions (the session refuses more with `overloaded`), and at most
//! [`event_bytes_max`](crate::Limits::event_bytes_max) bytes of events its
//! transport has not taken: past that its queue ends with
//! [`Pushed::Overflow`] and the transport closes the connection, as it
//! drops any reader too slow for its replies.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::planted::{self, EventBug};
use crate::proto::{Event, EventName, LostReason, RequestId};
use crate::shard::ConnId;
use crate::shard::events::{Ending, Event as Change, GrantStatus, LockChange, SetChange};

/// What an actor (or the session) tells a connection's queue.
#[derive(Debug)]
pub(crate) enum Note {
    /// An event to push.
    Push(Event),
    /// The lease of the grant `token` that request `id` (a `lock` with
    /// `notify`) watches ends at `ends` and lasts `ttl_ms`: warn at a
    /// third of it left, unless a later lease comes first.
    Lease {
        id: RequestId,
        token: u64,
        ends: Instant,
        ttl_ms: u64,
    },
    /// Request `id` will have no more events.
    Done(RequestId),
    /// The queue passed its bound: wakes it to report so.
    Overflowed,
}

/// Bytes a note other than an event is counted as.
const NOTE_BYTES: usize = 64;

impl Note {
    fn bytes(&self) -> usize {
        match self {
            Note::Push(event) => event_bytes(event),
            Note::Lease { .. } | Note::Done(_) => NOTE_BYTES,
            Note::Overflowed => 0,
        }
    }
}

/// Bytes an event is counted as: close to its encoded size, without
/// encoding it twice.
fn event_bytes(event: &Event) -> usize {
    NOTE_BYTES
        + event.key.as_ref().map_or(0, String::len)
        + event.set.as_ref().map_or(0, String::len)
}

/// The sending side of one connection's queue; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Sink {
    conn: ConnId,
    tx: mpsc::UnboundedSender<Note>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Bytes of notes sent and not yet taken.
    queued: AtomicUsize,
    max: usize,
    /// Set once `max` was passed: the queue then ends.
    overflowed: AtomicBool,
    /// The requests of this connection that have events coming, shared
    /// with its session (which admits and cancels them).
    subscriptions: Subscriptions,
}

/// The requests of a connection that have events coming. Every request
/// asks whether its id is one of them, so the answer for a connection with
/// none (nearly all) is an atomic load, not a lock.
#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    map: Mutex<HashMap<RequestId, Subscription>>,
    len: AtomicUsize,
}

impl Subscriptions {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, Subscription>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether request `id` has events coming.
    pub fn contains(&self, id: RequestId) -> bool {
        self.len.load(Ordering::Acquire) > 0 && self.map().contains_key(&id)
    }

    /// Adds request `id` unless `max` are there already; whether it did.
    pub fn insert(&self, id: RequestId, subscription: Subscription, max: usize) -> bool {
        let mut map = self.map();
        if map.len() >= max {
            return false;
        }
        map.insert(id, subscription);
        self.len.store(map.len(), Ordering::Release);
        true
    }

    /// Takes request `id` out, if it is there.
    pub fn remove(&self, id: RequestId) -> Option<Subscription> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut map = self.map();
        let removed = map.remove(&id);
        self.len.store(map.len(), Ordering::Release);
        removed
    }
}

/// A request of a connection that has events coming: where to tell that
/// it is cancelled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Subscription {
    /// The shard that holds its listener.
    pub shard: usize,
    /// A `watch` (else a `lock` with `notify`, which a `cancel` may also
    /// find still waiting).
    pub watch: bool,
}

impl Sink {
    /// The connection the notes go to.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Queues `note`, unless the queue has passed its bound (then it ends,
    /// and the transport closes the connection).
    pub fn send(&self, note: Note) {
        if self.shared.overflowed.load(Ordering::Acquire) {
            return;
        }
        let bytes = note.bytes();
        let queued = self.shared.queued.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if queued > self.shared.max {
            self.shared.overflowed.store(true, Ordering::Release);
            let _ = self.tx.send(Note::Overflowed);
            return;
        }
        // A closed queue: the connection is gone, nobody to tell.
        let _ = self.tx.send(note);
    }

    /// The subscriptions of the connection, for the session.
    pub fn subscriptions(&self) -> &Subscriptions {
        &self.shared.subscriptions
    }
}

/// What a connection's transport writes, in order.
#[derive(Debug)]
pub enum Pushed {
    /// An event for request `id`, encoded as one JSON message.
    Event {
        /// The request the event belongs to.
        id: RequestId,
        /// The message.
        text: String,
        /// Keeps the event counted against the connection's bound until
        /// it is dropped: drop it once the message is written.
        charge: Charge,
    },
    /// Request `id` will have no more events (on QUIC its stream is
    /// finished).
    Done {
        /// The request.
        id: RequestId,
    },
    /// The connection let more than its bound of events pile up: close
    /// it, as a reader too slow for its replies.
    Overflow,
}

/// Bytes of a connection's events still counted against its bound,
/// given back when dropped.
#[derive(Debug)]
pub struct Charge {
    shared: Arc<Shared>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.shared.queued.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A connection's queue of events; its transport takes it from the
/// session ([`Session::take_events`](super::Session::take_events)) and
/// writes what [`Events::next`] gives.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::UnboundedReceiver<Note>,
    shared: Arc<Shared>,
    /// `expiring` warnings to give, by when; each request has at most one.
    warnings: BTreeMap<(Instant, RequestId), Warning>,
    /// When each request's warning is due, to replace it.
    warning_of: HashMap<RequestId, Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Warning {
    token: u64,
    ends: Instant,
}

/// A connection's queue and its sending side.
pub(crate) fn queue(conn: ConnId, max: usize) -> (Sink, Events) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        max,
        overflowed: AtomicBool::new(false),
        subscriptions: Subscriptions::default(),
    });
    let sink = Sink {
        conn,
        tx,
        shared: Arc::clone(&shared),
    };
    let events = Events {
        rx,
        shared,
        warnings: BTreeMap::new(),
        warning_of: HashMap::new(),
    };
    (sink, events)
}

impl Events {
    /// The next thing to write; `None` once the connection's session is
    /// gone. Cancel-safe: a call dropped before it returns loses nothing.
    pub async fn next(&mut self) -> Option<Pushed> {
        loop {
            if self.shared.overflowed.load(Ordering::Acquire) {
                return Some(Pushed::Overflow);
            }
            let due = self.warnings.keys().next().map(|&(at, _)| at);
            let note = tokio::select! {
                biased;
                note = self.rx.recv() => note?,
                () = sleep_until(due) => {
                    if let Some(pushed) = self.warn() {
                        return Some(pushed);
                    }
                    continue;
                }
            };
            if !matches!(note, Note::Push(_)) {
                // An event stays counted until written: see `Charge`.
                self.shared.queued.fetch_sub(note.bytes(), Ordering::AcqRel);
            }
            if let Some(pushed) = self.take(note) {
                return Some(pushed);
            }
        }
    }

    /// What a note comes to for the transport.
    fn take(&mut self, note: Note) -> Option<Pushed> {
        match note {
            Note::Push(event) => {
                if event.event == EventName::Lost {
                    self.disarm(event.id);
                }
                let charge = Charge {
                    shared: Arc::clone(&self.shared),
                    bytes: event_bytes(&event),
                };
                Some(Pushed::Event {
                    id: event.id,
                    text: event.encode(),
                    charge,
                })
            }
            Note::Lease {
                id,
                token,
                ends,
                ttl_ms,
            } => {
                self.disarm(id);
                let warn_at = ends - std::time::Duration::from_millis(ttl_ms / 3);
                self.warnings.insert((warn_at, id), Warning { token, ends });
                self.warning_of.insert(id, warn_at);
                None
            }
            Note::Overflowed => Some(Pushed::Overflow),
            Note::Done(id) => {
                self.disarm(id);
                self.shared.subscriptions.remove(id);
                Some(Pushed::Done { id })
            }
        }
    }

    /// The first warning due, if one is.
    fn warn(&mut self) -> Option<Pushed> {
        let (&(at, id), _) = self.warnings.iter().next()?;
        if at > Instant::now() {
            return None;
        }
        let warning = self.warnings.remove(&(at, id))?;
        self.warning_of.remove(&id);
        let left = warning.ends.saturating_duration_since(Instant::now());
        let mut event = Event {
            remaining_ms: Some(u64::try_from(left.as_millis()).unwrap_or(u64::MAX)),
            ..Event::about_grant(id, EventName::Expiring, warning.token)
        };
        if planted::event_active(EventBug::LostAtWarning) {
            event = Event {
                reason: Some(LostReason::Expired),
                ..Event::about_grant(id, EventName::Lost, warning.token)
            };
        }
        // Made here, not sent: counted from now until written.
        let bytes = event_bytes(&event);
        self.shared.queued.fetch_add(bytes, Ordering::AcqRel);
        let charge = Charge {
            shared: Arc::clone(&self.shared),
            bytes,
        };
        Some(Pushed::Event {
            id,
            text: event.encode(),
            charge,
        })
    }

    fn disarm(&mut self, id: RequestId) {
        if let Some(at) = self.warning_of.remove(&id) {
            self.warnings.remove(&(at, id));
        }
    }
}

/// Sleeps until `at`; forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One subscriber: request `id` of the connection behind `sink`.
#[derive(Debug, Clone)]
pub(crate) struct Listener {
    pub id: RequestId,
    pub sink: Sink,
}

impl Listener {
    /// Whether this listens for request `id` of connection `conn`.
    pub fn is(&self, conn: ConnId, id: RequestId) -> bool {
        self.sink.conn() == conn && self.id == id
    }
}

/// Where a listener is kept, to find it again without a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    Key(String),
    Set(String),
    Grant(String, u64),
}

/// One shard's subscribers: watches on its keys and sets, and the
/// `notify` grants it made.
#[derive(Debug, Default)]
pub(crate) struct Listeners {
    keys: HashMap<String, Vec<Listener>>,
    sets: HashMap<String, Vec<Listener>>,
    /// By key and token.
    grants: HashMap<(String, u64), Vec<Listener>>,
    /// Where each connection's listeners are, by request id: a cancel or
    /// a close finds them without a scan.
    places: HashMap<ConnId, HashMap<RequestId, Place>>,
    /// The latest grants that ended, and why, newest last: for a
    /// listener that arrives after its grant ended (see
    /// [`Listeners::follow_grant`]).
    recent_ends: std::collections::VecDeque<(String, u64, Ending)>,
    /// Watch events kept back by the planted
    /// [`EventBug::WatchOutOfOrder`] (empty without it).
    held_back: HashMap<String, Vec<(Sink, Event)>>,
}

/// How many ended grants a shard remembers why they ended.
const RECENT_ENDS_MAX: usize = 4096;

impl Listeners {
    /// Adds a watch on the lock key `key`.
    pub fn watch_key(&mut self, key: String, listener: Listener) {
        self.place(&listener, Place::Key(key.clone()));
        self.keys.entry(key).or_default().push(listener);
    }

    /// Adds a watch on the set `set`.
    pub fn watch_set(&mut self, set: String, listener: Listener) {
        self.place(&listener, Place::Set(set.clone()));
        self.sets.entry(set).or_default().push(listener);
    }

    /// Adds a `notify` listener for the grant `token` of `key`.
    pub fn watch_grant(&mut self, key: String, token: u64, listener: Listener) {
        self.place(&listener, Place::Grant(key.clone(), token));
        self.grants.entry((key, token)).or_default().push(listener);
    }

    /// Notes where `listener` is kept. A request id has one place: one
    /// that had another (an id reused after its events ended here, while
    /// its end was still on its way) leaves the old one.
    fn place(&mut self, listener: &Listener, place: Place) {
        let conn = listener.sink.conn();
        let old = self
            .places
            .entry(conn)
            .or_default()
            .insert(listener.id, place);
        if let Some(old) = old {
            self.unlist(conn, listener.id, &old);
        }
    }

    /// Adds a `notify` listener for a grant this node learnt of from
    /// elsewhere: on a follower, from the leader's reply to a forwarded
    /// `lock`. Its shard may not have applied the grant yet (it is then
    /// followed from its `granted`), may hold it (its lease, ending at
    /// `status`'s time and `ttl_ms` long, is watched from now), or may
    /// have seen it end already (the listener hears `lost` at once, with
    /// the reason if it is among the latest ends, else `revoked`).
    pub fn follow_grant(
        &mut self,
        key: String,
        token: u64,
        ttl_ms: u64,
        status: GrantStatus,
        listener: Listener,
        instant_of: impl Fn(crate::time::Tick) -> Instant,
    ) {
        match status {
            GrantStatus::NotYet => self.watch_grant(key, token, listener),
            GrantStatus::Held(ends) => {
                listener.sink.send(Note::Lease {
                    id: listener.id,
                    token,
                    ends: instant_of(ends),
                    ttl_ms,
                });
                self.watch_grant(key, token, listener);
            }
            GrantStatus::Ended => {
                let ending = self
                    .recent_ends
                    .iter()
                    .rev()
                    .find(|(k, t, _)| *t == token && *k == key)
                    .map_or(Ending::Dropped, |(_, _, ending)| *ending);
                self.watch_grant(key.clone(), token, listener);
                self.grant_ended(key, token, ending);
            }
        }
    }

    /// Removes the listeners of request `id` of connection `conn` (every
    /// one of `conn`'s, for `None`).
    pub fn remove(&mut self, conn: ConnId, id: Option<RequestId>) {
        let Some(places) = self.places.get_mut(&conn) else {
            return;
        };
        let taken: Vec<(RequestId, Place)> = match id {
            Some(id) => places.remove(&id).map(|p| (id, p)).into_iter().collect(),
            None => places.drain().collect(),
        };
        if places.is_empty() {
            self.places.remove(&conn);
        }
        for (id, place) in taken {
            self.unlist(conn, id, &place);
        }
    }

    /// Takes request `id` of `conn` out of the list at `place`.
    fn unlist(&mut self, conn: ConnId, id: RequestId, place: &Place) {
        fn take_out<K: std::hash::Hash + Eq>(
            lists: &mut HashMap<K, Vec<Listener>>,
            at: &K,
            conn: ConnId,
            id: RequestId,
        ) {
            if let Some(list) = lists.get_mut(at) {
                list.retain(|l| !l.is(conn, id));
                if list.is_empty() {
                    lists.remove(at);
                }
            }
        }
        match place {
            Place::Key(key) => take_out(&mut self.keys, key, conn, id),
            Place::Set(set) => take_out(&mut self.sets, set, conn, id),
            Place::Grant(key, token) => {
                // A lookup by (key, token) needs the pair owned.
                let at = (key.clone(), *token);
                take_out(&mut self.grants, &at, conn, id);
            }
        }
    }

    /// Forgets where request `id` of `conn` was kept (its list is gone).
    fn forget(&mut self, conn: ConnId, id: RequestId) {
        if let Some(places) = self.places.get_mut(&conn) {
            places.remove(&id);
            if places.is_empty() {
                self.places.remove(&conn);
            }
        }
    }

    /// Tells every listener of `change`; `instant_of` turns the shard's
    /// time into the local clock's, for lease warnings.
    pub fn dispatch(&mut self, change: Change, instant_of: impl Fn(crate::time::Tick) -> Instant) {
        match change {
            Change::Lock {
                key,
                token,
                at,
                change,
            } => self.lock_changed(key, token, change, instant_of(at)),
            Change::Set { set, change } => {
                let Some(list) = self.sets.get(&set) else {
                    return;
                };
                let name = match change {
                    SetChange::Created => EventName::Created,
                    SetChange::Expired => EventName::Expired,
                    SetChange::TornDown => EventName::TornDown,
                };
                for l in list {
                    l.sink
                        .send(Note::Push(Event::about_set(l.id, name, set.clone())));
                }
            }
        }
    }

    fn lock_changed(&mut self, key: String, token: u64, change: LockChange, at: Instant) {
        let name = match change {
            LockChange::Granted { .. } => Some(EventName::Granted),
            LockChange::Leased { .. } => None,
            LockChange::Ended(Ending::Expired) => Some(EventName::Expired),
            LockChange::Ended(_) => Some(EventName::Released),
        };
        if let (Some(list), Some(name)) = (self.keys.get(&key), name) {
            if planted::event_active(EventBug::WatchOutOfOrder) {
                let events = list
                    .iter()
                    .map(|l| {
                        (
                            l.sink.clone(),
                            Event::about_key(l.id, name, key.clone(), token),
                        )
                    })
                    .collect();
                for (sink, event) in self.reorder(&key, name, events) {
                    sink.send(Note::Push(event));
                }
            } else {
                for l in list {
                    let event = Event::about_key(l.id, name, key.clone(), token);
                    l.sink.send(Note::Push(event));
                }
            }
        }
        match change {
            LockChange::Granted { ttl_ms } | LockChange::Leased { ttl_ms } => {
                let Some(list) = self.grants.get(&(key, token)) else {
                    return;
                };
                let ends = at + std::time::Duration::from_millis(ttl_ms);
                for l in list {
                    let (id, token) = (l.id, token);
                    l.sink.send(Note::Lease {
                        id,
                        token,
                        ends,
                        ttl_ms,
                    });
                }
            }
            LockChange::Ended(ending) => self.grant_ended(key, token, ending),
        }
    }

    /// The planted [`EventBug::WatchOutOfOrder`]: a key's `granted` is
    /// kept back and sent after the key's next event.
    fn reorder(
        &mut self,
        key: &str,
        name: EventName,
        events: Vec<(Sink, Event)>,
    ) -> Vec<(Sink, Event)> {
        if name == EventName::Granted {
            self.held_back.insert(key.to_owned(), events);
            return Vec::new();
        }
        let mut events = events;
        events.extend(self.held_back.remove(key).unwrap_or_default());
        events
    }

    /// A grant that `notify` listeners watch ended: each hears `lost`,
    /// unless its holder unlocked it, then that its events are over.
    fn grant_ended(&mut self, key: String, token: u64, ending: Ending) {
        let list = self.grants.remove(&(key.clone(), token));
        if self.recent_ends.len() >= RECENT_ENDS_MAX {
            self.recent_ends.pop_front();
        }
        self.recent_ends.push_back((key, token, ending));
        let Some(list) = list else {
            return;
        };
        let reason = match ending {
            Ending::Unlocked { by_holder: true }
                if planted::event_active(EventBug::LostOnOwnUnlock) =>
            {
                Some(LostReason::Revoked)
            }
            Ending::Unlocked { by_holder: true } => None,
            Ending::Expired => Some(LostReason::Expired),
            Ending::Unlocked { by_holder: false } | Ending::Dropped => Some(LostReason::Revoked),
        };
        for l in &list {
            if let Some(reason) = reason {
                let lost = Event {
                    reason: Some(reason),
                    ..Event::about_grant(l.id, EventName::Lost, token)
                };
                l.sink.send(Note::Push(lost));
            }
            l.sink.send(Note::Done(l.id));
        }
        for l in list {
            self.forget(l.sink.conn(), l.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Tick;

    fn listener(conn: ConnId, id: RequestId) -> (Listener, Events) {
        let (sink, events) = queue(conn, 1 << 20);
        (Listener { id, sink }, events)
    }

    fn granted(key: &str, token: u64) -> Change {
        Change::Lock {
            key: key.to_owned(),
            token,
            at: Tick::ZERO,
            change: LockChange::Granted { ttl_ms: 1000 },
        }
    }

    async fn next_text(events: &mut Events) -> Option<String> {
        let next = tokio::time::timeout(std::time::Duration::from_millis(50), events.next());
        match next.await {
            Ok(Some(Pushed::Event { text, .. })) => Some(text),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_cancel_or_a_close_takes_out_only_its_own_listeners() {
        let mut listeners = Listeners::default();
        let (a1, mut a_events) = listener(1, 7);
        let a2 = Listener {
            id: 8,
            ..a1.clone()
        };
        let (b, mut b_events) = listener(2, 7);
        listeners.watch_key("k".into(), a1);
        listeners.watch_set("s".into(), a2);
        listeners.watch_key("k".into(), b);
        let now = |_| Instant::now();
        listeners.remove(2, Some(7));
        listeners.dispatch(granted("k", 1), now);
        assert!(next_text(&mut a_events).await.is_some(), "a still watches");
        assert_eq!(next_text(&mut b_events).await, None, "b cancelled");
        listeners.remove(1, None);
        assert!(listeners.keys.is_empty() && listeners.sets.is_empty());
        assert!(listeners.places.is_empty(), "nothing left to find");
    }

    #[tokio::test]
    async fn a_grant_followed_after_it_ended_is_lost_with_its_reason() {
        let mut listeners = Listeners::default();
        let now = |_| Instant::now();
        listeners.dispatch(
            Change::Lock {
                key: "k".into(),
                token: 5,
                at: Tick::ZERO,
                change: LockChange::Ended(Ending::Expired),
            },
            now,
        );
        let (late, mut events) = listener(1, 3);
        listeners.follow_grant("k".into(), 5, 1000, GrantStatus::Ended, late, now);
        assert_eq!(
            next_text(&mut events).await.as_deref(),
            Some(r#"{"id":3,"event":"lost","token":5,"reason":"expired"}"#)
        );
        assert!(matches!(events.next().await, Some(Pushed::Done { id: 3 })));
        assert!(listeners.grants.is_empty() && listeners.places.is_empty());
    }
}
