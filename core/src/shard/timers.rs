//! The shard's deadlines: lease ends, wait limits and set lifetimes.
//!
//! One min-heap holds them all. Entries are never removed in place: a lease
//! that is extended, released or handed on leaves its old entry behind, and
//! the shard checks each popped entry against the live state (a token, a
//! waiter number or a set number, plus the deadline) and drops the ones that
//! no longer match. When stale entries outnumber live ones the heap is
//! rebuilt, so its size stays bounded by the state it describes.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::time::Tick;

/// A deadline and what it is for (`D` names its object by the hash of its
/// key, to find it, and a number unique within the shard, to be sure).
/// Ordered by time first; ties are broken by the content, which is itself
/// deterministic, so the order never depends on anything but the inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Timer<D> {
    pub at: Tick,
    pub due: D,
}

/// A min-heap of timers with lazy deletion.
#[derive(Debug)]
pub(crate) struct Timers<D> {
    heap: BinaryHeap<Reverse<Timer<D>>>,
}

impl<D: Ord> Default for Timers<D> {
    fn default() -> Self {
        Timers {
            heap: BinaryHeap::new(),
        }
    }
}

impl<D: Ord + Copy> Timers<D> {
    /// Schedules `due` at `at`.
    pub fn push(&mut self, at: Tick, due: D) {
        self.heap.push(Reverse(Timer { at, due }));
    }

    /// The earliest deadline, stale or not.
    pub fn next_at(&self) -> Option<Tick> {
        self.heap.peek().map(|Reverse(t)| t.at)
    }

    /// How many timers are queued, stale ones included.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether the heap is as small as [`Timers::compact_if_stale`] keeps it.
    pub fn is_compact(&self, live: usize) -> bool {
        self.heap.len() <= 2 * live + 1024
    }

    /// Removes and returns the earliest timer if it is due at or before
    /// `now`.
    pub fn pop_due(&mut self, now: Tick) -> Option<Timer<D>> {
        if self.next_at()? <= now {
            self.heap.pop().map(|Reverse(t)| t)
        } else {
            None
        }
    }

    /// Drops every timer that `is_live` rejects, if stale timers have come
    /// to outnumber the `live` ones the owner knows of.
    pub fn compact_if_stale(&mut self, live: usize, is_live: impl FnMut(&Timer<D>) -> bool) {
        // The slack keeps small shards from rebuilding all the time.
        if self.heap.len() > 2 * live + 1024 {
            let mut is_live = is_live;
            let mut timers = std::mem::take(&mut self.heap).into_vec();
            timers.retain(|Reverse(t)| is_live(t));
            // A deadline set, moved and set back leaves twin entries that
            // both look live; keep one.
            timers.sort_unstable();
            timers.dedup();
            self.heap = BinaryHeap::from(timers);
        }
    }
}
