//! Planted bugs: small, plausible mistakes in the storage (the kind a
//! refactor introduces), which the simulation plants one at a time to
//! prove that its checker catches each, as `deadbolt_state::planted` does
//! for the shard's rules.
//!
//! The names always exist, so that the simulation can name them; the bugs
//! themselves exist only with the `planted-bugs` feature, which only the
//! simulation's tests (and its binary, when asked) turn on. Without it
//! [`active`] is a constant `false` and the compiler drops the code behind
//! it, so a production build does not contain them.
//!
//! A bug is planted for the current thread ([`plant`]): the simulation
//! runs each seed's whole world, the log writer's task included, on one
//! thread, so concurrent seeds on other threads each see their own bug, or
//! none.

/// A bug the storage can be made to have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StorageBug {
    /// A group of batches is acknowledged once it is written, before it is
    /// synced (as if `--fsync always` synced only token reservations and
    /// segment ends): a power cut loses acknowledged changes.
    AckBeforeSync,
    /// Recovery skips the last batch of the log, as an off-by-one in the
    /// scan of the tail would: the change acknowledged last before a crash
    /// is forgotten.
    ForgetLastBatch,
    /// A snapshot is taken to cover every record written in the group it
    /// arrived in, even the batches its shard sent after taking it (the
    /// log writer's bug the simulation's work found: a recovery from the
    /// snapshot skips those batches).
    SnapshotCoversGroup,
}

impl StorageBug {
    /// Every planted bug of the storage.
    pub const ALL: [StorageBug; 3] = [
        StorageBug::AckBeforeSync,
        StorageBug::ForgetLastBatch,
        StorageBug::SnapshotCoversGroup,
    ];

    /// Its name on the simulation's command line.
    pub fn name(self) -> &'static str {
        match self {
            StorageBug::AckBeforeSync => "ack-before-sync",
            StorageBug::ForgetLastBatch => "forget-last-batch",
            StorageBug::SnapshotCoversGroup => "snapshot-covers-group",
        }
    }
}

/// Whether this build can plant bugs at all (the `planted-bugs` feature).
pub const COMPILED_IN: bool = cfg!(feature = "planted-bugs");

/// Keeps a bug planted on this thread until dropped.
#[derive(Debug)]
#[must_use = "the bug is planted only while the guard lives"]
pub struct Planted {
    previous: Option<StorageBug>,
}

impl Drop for Planted {
    fn drop(&mut self) {
        set(self.previous);
    }
}

/// Plants `bug` (or none) in every store this thread writes or recovers,
/// until the guard is dropped. `None` if this build has no planted bugs
/// ([`COMPILED_IN`] is false) and `bug` is one.
pub fn plant(bug: Option<StorageBug>) -> Option<Planted> {
    if bug.is_some() && !COMPILED_IN {
        return None;
    }
    let previous = current();
    set(bug);
    Some(Planted { previous })
}

#[cfg(feature = "planted-bugs")]
thread_local! {
    static PLANTED: std::cell::Cell<Option<StorageBug>> = const { std::cell::Cell::new(None) };
}

#[cfg(feature = "planted-bugs")]
fn set(bug: Option<StorageBug>) {
    PLANTED.with(|planted| planted.set(bug));
}

#[cfg(feature = "planted-bugs")]
fn current() -> Option<StorageBug> {
    PLANTED.with(std::cell::Cell::get)
}

#[cfg(not(feature = "planted-bugs"))]
fn set(_: Option<StorageBug>) {}

#[cfg(not(feature = "planted-bugs"))]
fn current() -> Option<StorageBug> {
    None
}

/// Whether `bug` is planted on this thread: always false without the
/// feature.
#[cfg(feature = "planted-bugs")]
#[inline]
pub(crate) fn active(bug: StorageBug) -> bool {
    current() == Some(bug)
}

/// Whether `bug` is planted on this thread: always false without the
/// feature.
#[cfg(not(feature = "planted-bugs"))]
#[inline(always)]
pub(crate) const fn active(_: StorageBug) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "planted-bugs"))]
    #[test]
    fn without_the_feature_no_bug_can_be_planted() {
        assert!(plant(Some(StorageBug::AckBeforeSync)).is_none());
        assert!(!active(StorageBug::AckBeforeSync));
        assert!(plant(None).is_some(), "planting nothing always works");
    }

    #[cfg(feature = "planted-bugs")]
    #[test]
    fn a_bug_is_planted_on_this_thread_until_its_guard_drops() {
        let planted = plant(Some(StorageBug::ForgetLastBatch));
        assert!(active(StorageBug::ForgetLastBatch));
        let elsewhere = std::thread::spawn(|| active(StorageBug::ForgetLastBatch)).join();
        assert_eq!(elsewhere.ok(), Some(false), "other threads are not touched");
        drop(planted);
        assert!(!active(StorageBug::ForgetLastBatch));
    }

    #[test]
    fn names_are_distinct() {
        let mut names: Vec<_> = StorageBug::ALL.iter().map(|b| b.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), StorageBug::ALL.len());
    }
}
