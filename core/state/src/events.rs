//! What a shard reports about the changes it makes, for pushed events
//! (SPEC section 7): a grant made, a lease restarted, a grant ended and
//! why, a set created, expired or torn down.
//!
//! These are outputs, like answers: they come out of applying commands, so
//! every replica that applies the same log reports the same events in the
//! same order, and nothing in the state depends on them. A shard reports
//! them only once its driver asks ([`Outbox::enable`]), because until
//! someone listens they would cost a key's copy per change for nothing;
//! turning them on changes no state.

use crate::time::Tick;

/// One change a shard made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A grant of a lock key changed.
    Lock {
        /// The key.
        key: String,
        /// The grant's fencing token.
        token: u64,
        /// When it happened, on the shard's clock.
        at: Tick,
        /// What happened to the grant.
        change: LockChange,
    },
    /// A distinct set changed.
    Set {
        /// The set's name.
        set: String,
        /// What happened to it.
        change: SetChange,
    },
}

/// What happened to a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockChange {
    /// It was made, with a lease of `ttl_ms` from `at`.
    Granted {
        /// The lease.
        ttl_ms: u64,
    },
    /// Its lease was restarted at `ttl_ms` from `at` (an `extend`, or a
    /// `lock` by its holder again).
    Leased {
        /// The new lease.
        ttl_ms: u64,
    },
    /// It ended.
    Ended(Ending),
}

/// Why a grant ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `unlock` with its token: by its holder's own client id
    /// (`by_holder`), or by another client that had the token.
    Unlocked {
        /// Whether the holder's own client id asked.
        by_holder: bool,
    },
    /// Its lease ran out.
    Expired,
    /// Something else ended it, not asked for by its holder: its
    /// ephemeral connection closed, nobody received its grant, or a
    /// restart released it.
    Dropped,
}

/// Where a grant named by its key and token stands in a shard's state:
/// what a node that learns of a grant from elsewhere (a follower, from the
/// leader's reply) needs to follow it from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantStatus {
    /// Held, its lease ending at this time.
    Held(Tick),
    /// Made and ended already.
    Ended,
    /// Not made yet: the command that makes it is still to be applied.
    NotYet,
}

/// What happened to a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetChange {
    /// `set_up` made it.
    Created,
    /// Its time to live ran out.
    Expired,
    /// `tear_down` removed it.
    TornDown,
}

/// Where a shard's parts put their events until the driver takes them.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    enabled: bool,
    events: Vec<Event>,
}

impl Outbox {
    /// Reports events from now on.
    pub fn enable(&mut self) {
        self.enabled = true;
    }

    /// Whether events are reported: what only an event needs is worked
    /// out only then.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// A grant of `key` changed.
    pub fn lock(&mut self, key: &str, token: u64, at: Tick, change: LockChange) {
        if self.enabled {
            self.events.push(Event::Lock {
                key: key.to_owned(),
                token,
                at,
                change,
            });
        }
    }

    /// The set `set` changed.
    pub fn set(&mut self, set: &str, change: SetChange) {
        if self.enabled {
            self.events.push(Event::Set {
                set: set.to_owned(),
                change,
            });
        }
    }

    /// Moves the events reported so far into `into`.
    pub fn drain_into(&mut self, into: &mut Vec<Event>) {
        into.append(&mut self.events);
    }
}
