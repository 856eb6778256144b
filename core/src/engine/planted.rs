//! Bugs the simulation plants in a replicated engine to prove its checker
//! catches them (compiled in only with the `planted-bugs` feature; without
//! it [`plant`] refuses and nothing changes). A bug is planted on the
//! current thread, where the simulation runs every node.

/// A replication bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReplicaBug {
    /// A follower carries out its clients' requests on its own state
    /// instead of forwarding them to the leader.
    FollowerGrantsLocally,
    /// A leader applies and answers a batch as soon as it proposes it,
    /// before a majority has it.
    AckBeforeCommit,
}

impl ReplicaBug {
    /// Every replication bug.
    pub const ALL: [ReplicaBug; 2] = [
        ReplicaBug::FollowerGrantsLocally,
        ReplicaBug::AckBeforeCommit,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ReplicaBug::FollowerGrantsLocally => "follower-grants-locally",
            ReplicaBug::AckBeforeCommit => "ack-before-commit",
        }
    }
}

/// A bug in pushed events (SPEC section 7): in the listeners of a shard
/// actor, or in a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventBug {
    /// A grant its holder unlocked is `lost` (`revoked`) to its `notify`
    /// listeners, as if someone else had ended it.
    LostOnOwnUnlock,
    /// The warning at a third of the lease left says `lost` (`expired`)
    /// instead of `expiring`: the lease is reported gone while it lasts.
    LostAtWarning,
    /// A key's `granted` reaches its watches only after the key's next
    /// change: out of the server's order.
    WatchOutOfOrder,
}

impl EventBug {
    /// Every events bug.
    pub const ALL: [EventBug; 3] = [
        EventBug::LostOnOwnUnlock,
        EventBug::LostAtWarning,
        EventBug::WatchOutOfOrder,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            EventBug::LostOnOwnUnlock => "lost-on-own-unlock",
            EventBug::LostAtWarning => "lost-at-warning",
            EventBug::WatchOutOfOrder => "watch-out-of-order",
        }
    }
}

/// Keeps an events bug planted until dropped (then the previous one is
/// back).
#[derive(Debug)]
#[must_use = "the bug is planted only while the guard lives"]
pub struct PlantedEvents {
    previous: Option<EventBug>,
}

impl Drop for PlantedEvents {
    fn drop(&mut self) {
        set_event(self.previous);
    }
}

/// Plants the events bug `bug` on this thread; `None` (nothing planted)
/// if a bug is asked for without the feature.
pub fn plant_events(bug: Option<EventBug>) -> Option<PlantedEvents> {
    if bug.is_some() && !COMPILED_IN {
        return None;
    }
    let previous = current_event();
    set_event(bug);
    Some(PlantedEvents { previous })
}

#[cfg(feature = "planted-bugs")]
thread_local! {
    static PLANTED_EVENT: std::cell::Cell<Option<EventBug>> = const { std::cell::Cell::new(None) };
}

#[cfg(feature = "planted-bugs")]
fn set_event(bug: Option<EventBug>) {
    PLANTED_EVENT.with(|planted| planted.set(bug));
}

#[cfg(feature = "planted-bugs")]
fn current_event() -> Option<EventBug> {
    PLANTED_EVENT.with(std::cell::Cell::get)
}

#[cfg(not(feature = "planted-bugs"))]
fn set_event(_: Option<EventBug>) {}

#[cfg(not(feature = "planted-bugs"))]
fn current_event() -> Option<EventBug> {
    None
}

/// Whether the events bug `bug` is planted on this thread: always false
/// without the feature.
#[cfg(feature = "planted-bugs")]
#[inline]
pub(crate) fn event_active(bug: EventBug) -> bool {
    current_event() == Some(bug)
}

/// Whether the events bug `bug` is planted on this thread: always false
/// without the feature.
#[cfg(not(feature = "planted-bugs"))]
#[inline(always)]
pub(crate) const fn event_active(_: EventBug) -> bool {
    false
}

/// Whether the bugs are compiled in.
pub const COMPILED_IN: bool = cfg!(feature = "planted-bugs");

/// Keeps a bug planted until dropped (then the previous one is back).
#[derive(Debug)]
#[must_use = "the bug is planted only while the guard lives"]
pub struct Planted {
    previous: Option<ReplicaBug>,
}

impl Drop for Planted {
    fn drop(&mut self) {
        set(self.previous);
    }
}

/// Plants `bug` on this thread; `None` (nothing planted) if a bug is asked
/// for without the feature.
pub fn plant(bug: Option<ReplicaBug>) -> Option<Planted> {
    if bug.is_some() && !COMPILED_IN {
        return None;
    }
    let previous = current();
    set(bug);
    Some(Planted { previous })
}

#[cfg(feature = "planted-bugs")]
thread_local! {
    static PLANTED: std::cell::Cell<Option<ReplicaBug>> = const { std::cell::Cell::new(None) };
}

#[cfg(feature = "planted-bugs")]
fn set(bug: Option<ReplicaBug>) {
    PLANTED.with(|planted| planted.set(bug));
}

#[cfg(feature = "planted-bugs")]
fn current() -> Option<ReplicaBug> {
    PLANTED.with(std::cell::Cell::get)
}

#[cfg(not(feature = "planted-bugs"))]
fn set(_: Option<ReplicaBug>) {}

#[cfg(not(feature = "planted-bugs"))]
fn current() -> Option<ReplicaBug> {
    None
}

/// Whether `bug` is planted on this thread: always false without the
/// feature.
#[cfg(feature = "planted-bugs")]
#[inline]
pub(crate) fn active(bug: ReplicaBug) -> bool {
    current() == Some(bug)
}

/// Whether `bug` is planted on this thread: always false without the
/// feature.
#[cfg(not(feature = "planted-bugs"))]
#[inline(always)]
pub(crate) const fn active(_: ReplicaBug) -> bool {
    false
}
