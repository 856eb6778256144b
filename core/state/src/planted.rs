//! Planted bugs: small, plausible mistakes in the rules (the kind a
//! refactor introduces), which the simulation plants one at a time to
//! prove that its checker catches each.
//!
//! The names always exist, so that the simulation can name them; the bugs
//! themselves exist only with the `planted-bugs` feature, which only the
//! simulation's tests (and its binary, when asked) turn on. Without it
//! [`active`] is a constant `false` and the compiler drops the code behind
//! it, so a production build does not contain them.
//!
//! A bug is planted for the current thread ([`plant`]): the simulation runs
//! each seed's whole world (the engine's shard actors included) and the
//! replay of its logs on one thread, so concurrent seeds on other threads
//! each see their own bug, or none.

/// A bug the state machine can be made to have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PlantedBug {
    /// A freed key goes to its newest waiter instead of its oldest.
    GrantOutOfOrder,
    /// A queued waiter's lease is measured from its request (for a waiter
    /// with a wait limit), not from its grant.
    LeaseFromRequest,
    /// The shard's wake-up ignores lock deadlines while a set deadline is
    /// pending: leases and waits end only when some other command comes.
    DeafWakeup,
    /// A re-lock by the holder answers the same token but does not
    /// restart the lease.
    RelockKeepsLease,
    /// A wait limit of `wait_ms` runs out after half of it.
    EarlyTimeout,
    /// A closed connection's ephemeral locks are kept (as ordinary ones)
    /// until their leases run out.
    EphemeralOutlivesConnection,
    /// A restart keeps the ephemeral locks (whose connections died with
    /// the old process) as if their connections were still open: they
    /// last until their leases run out, or until a new connection that
    /// happens to reuse the old one's number closes.
    RestartKeepsEphemeral,
    /// A `set_up` of an existing set answers as usual but does not restart
    /// its time to live: the set ends at its first deadline.
    SetRenewalIgnored,
    /// A `cancel` of a waiting request does nothing: the request waits on,
    /// unanswered, and is granted in its turn.
    CancelIgnored,
    /// An `extend` by the holder, with its live token, is answered
    /// `not_held`.
    ExtendRefused,
    /// A `busy` answer is not counted in the shard's counters (what
    /// `stats` and `/metrics` report).
    BusyUncounted,
    /// A shared request is granted even while an exclusive holder holds
    /// the key.
    SharedBesideExclusive,
    /// A counting semaphore (a limit above 1) admits one holder more than
    /// its limit.
    SemaphoreOverLimit,
    /// A lease that runs out starts no lock delay: the key passes on at
    /// once.
    LockDelayIgnored,
    /// A distinct set admits one member more than `set_members_max`.
    SetOverfilled,
    /// A "requester gone" for a grant whose answer nobody received leaves
    /// the grant held: the key stays taken by a client that does not know
    /// it holds it.
    UnheardGrantKept,
}

impl PlantedBug {
    /// Every planted bug.
    pub const ALL: [PlantedBug; 16] = [
        PlantedBug::GrantOutOfOrder,
        PlantedBug::LeaseFromRequest,
        PlantedBug::DeafWakeup,
        PlantedBug::RelockKeepsLease,
        PlantedBug::EarlyTimeout,
        PlantedBug::EphemeralOutlivesConnection,
        PlantedBug::RestartKeepsEphemeral,
        PlantedBug::SetRenewalIgnored,
        PlantedBug::CancelIgnored,
        PlantedBug::ExtendRefused,
        PlantedBug::BusyUncounted,
        PlantedBug::SharedBesideExclusive,
        PlantedBug::SemaphoreOverLimit,
        PlantedBug::LockDelayIgnored,
        PlantedBug::SetOverfilled,
        PlantedBug::UnheardGrantKept,
    ];

    /// Its name on the simulation's command line.
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::GrantOutOfOrder => "grant-out-of-order",
            PlantedBug::LeaseFromRequest => "lease-from-request",
            PlantedBug::DeafWakeup => "deaf-wakeup",
            PlantedBug::RelockKeepsLease => "relock-keeps-lease",
            PlantedBug::EarlyTimeout => "early-timeout",
            PlantedBug::EphemeralOutlivesConnection => "ephemeral-outlives-connection",
            PlantedBug::RestartKeepsEphemeral => "restart-keeps-ephemeral",
            PlantedBug::SetRenewalIgnored => "set-renewal-ignored",
            PlantedBug::CancelIgnored => "cancel-ignored",
            PlantedBug::ExtendRefused => "extend-refused",
            PlantedBug::BusyUncounted => "busy-uncounted",
            PlantedBug::SharedBesideExclusive => "shared-beside-exclusive",
            PlantedBug::SemaphoreOverLimit => "semaphore-over-limit",
            PlantedBug::LockDelayIgnored => "lock-delay-ignored",
            PlantedBug::SetOverfilled => "set-overfilled",
            PlantedBug::UnheardGrantKept => "unheard-grant-kept",
        }
    }
}

/// Whether this build can plant bugs at all (the `planted-bugs` feature).
pub const COMPILED_IN: bool = cfg!(feature = "planted-bugs");

/// Keeps a bug planted on this thread until dropped.
#[derive(Debug)]
#[must_use = "the bug is planted only while the guard lives"]
pub struct Planted {
    previous: Option<PlantedBug>,
}

impl Drop for Planted {
    fn drop(&mut self) {
        set(self.previous);
    }
}

/// Plants `bug` (or none) in every shard this thread builds or drives,
/// until the guard is dropped. `None` if this build has no planted bugs
/// ([`COMPILED_IN`] is false) and `bug` is one.
pub fn plant(bug: Option<PlantedBug>) -> Option<Planted> {
    if bug.is_some() && !COMPILED_IN {
        return None;
    }
    let previous = current();
    set(bug);
    Some(Planted { previous })
}

#[cfg(feature = "planted-bugs")]
thread_local! {
    static PLANTED: std::cell::Cell<Option<PlantedBug>> = const { std::cell::Cell::new(None) };
}

#[cfg(feature = "planted-bugs")]
fn set(bug: Option<PlantedBug>) {
    PLANTED.with(|planted| planted.set(bug));
}

#[cfg(feature = "planted-bugs")]
fn current() -> Option<PlantedBug> {
    PLANTED.with(std::cell::Cell::get)
}

#[cfg(not(feature = "planted-bugs"))]
fn set(_: Option<PlantedBug>) {}

#[cfg(not(feature = "planted-bugs"))]
fn current() -> Option<PlantedBug> {
    None
}

/// Whether `bug` is planted on this thread: always false without the
/// feature.
#[cfg(feature = "planted-bugs")]
#[inline]
pub(crate) fn active(bug: PlantedBug) -> bool {
    current() == Some(bug)
}

/// Whether `bug` is planted on this thread: always false without the
/// feature.
#[cfg(not(feature = "planted-bugs"))]
#[inline(always)]
pub(crate) const fn active(_: PlantedBug) -> bool {
    false
}

/// A set's member limit: one more under [`PlantedBug::SetOverfilled`].
/// (A function of its own, so that the rule files keep their mutants.)
pub(crate) fn set_members_max(limit: usize) -> usize {
    if active(PlantedBug::SetOverfilled) {
        limit.saturating_add(1)
    } else {
        limit
    }
}

/// The grant a "requester gone" undoes: none under
/// [`PlantedBug::UnheardGrantKept`].
pub(crate) fn unheard_grant(token: Option<u64>) -> Option<u64> {
    token.filter(|_| !active(PlantedBug::UnheardGrantKept))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "planted-bugs"))]
    #[test]
    fn without_the_feature_no_bug_can_be_planted() {
        assert!(plant(Some(PlantedBug::DeafWakeup)).is_none());
        assert!(!active(PlantedBug::DeafWakeup));
        assert!(plant(None).is_some(), "planting nothing always works");
    }

    #[cfg(feature = "planted-bugs")]
    #[test]
    fn a_bug_is_planted_on_this_thread_until_its_guard_drops() {
        let planted = plant(Some(PlantedBug::DeafWakeup));
        assert!(active(PlantedBug::DeafWakeup));
        let elsewhere = std::thread::spawn(|| active(PlantedBug::DeafWakeup)).join();
        assert_eq!(elsewhere.ok(), Some(false), "other threads are not touched");
        drop(planted);
        assert!(!active(PlantedBug::DeafWakeup));
    }

    #[test]
    fn names_are_distinct() {
        let mut names: Vec<_> = PlantedBug::ALL.iter().map(|b| b.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PlantedBug::ALL.len());
    }
}
