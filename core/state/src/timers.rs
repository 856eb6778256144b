//! The shard's deadlines: lease ends, wait limits and set lifetimes.
//!
//! One min-heap holds them all. Entries are never removed in place: a lease
//! that is extended, released or handed on leaves its old entry behind, and
//! the shard checks each popped entry against the live state (a token, a
//! waiter number or a set number, plus the deadline) and drops the ones that
//! no longer match. When stale entries outnumber live ones the heap is
//! rebuilt, so its size stays bounded by the state it describes.
//!
//! Timers due at the same tick fire in the order they were set (a sequence
//! number breaks ties), never in an order that depends on a hash seed: the
//! order decides which waiter gets the next token, and a replay with another
//! seed must hand out the same tokens.
//!
//! Each object keeps the [`Deadline`] its last timer was set with, number
//! included, and a timer acts only if its number is that one. Matching on
//! the time alone would let a stale timer come back to life when a lease
//! moves away and back to the same tick (a re-lock with a shorter and then
//! a longer lease): it would act in the place of the later timer, ahead of
//! whatever was set in between, and a snapshot, which keeps only the live
//! timers, would restore to a shard that fires them in another order. So a
//! snapshot keeps each object's deadline as it is, and a restore sets its
//! timer again under the same number ([`Timers::restore`]).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::image::Deadline;
use crate::time::Tick;

/// A deadline and what it is for (`D` names its object by the hash of its
/// key, to find it, and a number unique within the shard, to be sure).
/// Ordered by time, then by when it was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Timer<D> {
    pub at: Tick,
    /// Pushes so far when this one was pushed: the tie-breaker.
    pub seq: u64,
    pub due: D,
}

/// A min-heap of timers with lazy deletion.
#[derive(Debug)]
pub(crate) struct Timers<D> {
    heap: BinaryHeap<Reverse<Timer<D>>>,
    pushed: u64,
}

impl<D: Ord> Default for Timers<D> {
    fn default() -> Self {
        Timers {
            heap: BinaryHeap::new(),
            pushed: 0,
        }
    }
}

impl<D: Ord + Copy> Timers<D> {
    /// Schedules `due` at `at`: the deadline its object keeps, so that
    /// only this timer acts for it.
    pub fn push(&mut self, at: Tick, due: D) -> Deadline {
        let seq = self.pushed;
        self.pushed += 1;
        self.heap.push(Reverse(Timer { at, seq, due }));
        Deadline { at, seq }
    }

    /// The earliest deadline, stale or not.
    pub fn next_at(&self) -> Option<Tick> {
        self.heap.peek().map(|Reverse(t)| t.at)
    }

    /// How many timers are queued, stale ones included.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// How many timers were ever pushed: the next one's sequence number.
    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// A heap of `timers`, the next push numbered `pushed`. The caller
    /// has checked that the sequence numbers are distinct and below
    /// `pushed`, so that ties never fall through to `due`, whose hash
    /// depends on the seed.
    pub fn restore(timers: Vec<Timer<D>>, pushed: u64) -> Self {
        let heap = timers.into_iter().map(Reverse).collect::<Vec<_>>();
        Timers {
            heap: BinaryHeap::from(heap),
            pushed,
        }
    }

    /// The queued timers, indexed by what they are for (a scan and a sort:
    /// for snapshots and invariant checks, not for the rules).
    pub fn index(&self) -> TimerIndex<D> {
        let mut timers: Vec<Timer<D>> = self.heap.iter().map(|Reverse(t)| *t).collect();
        timers.sort_unstable_by(|a, b| (&a.due, a.at, a.seq).cmp(&(&b.due, b.at, b.seq)));
        TimerIndex(timers)
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
            self.heap = BinaryHeap::from(timers);
        }
    }
}

/// Queued timers sorted by what they are for, then time, then sequence.
pub(crate) struct TimerIndex<D>(Vec<Timer<D>>);

impl<D: Ord + Copy> TimerIndex<D> {
    /// Whether the timer of `deadline` is queued for `due`.
    pub fn has(&self, due: D, deadline: Deadline) -> bool {
        let key = (&due, deadline.at, deadline.seq);
        self.0
            .binary_search_by(|t| (&t.due, t.at, t.seq).cmp(&key))
            .is_ok()
    }
}
