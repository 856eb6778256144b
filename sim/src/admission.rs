//! When, inside one command, a waiter could first be let in: the server
//! checker's reference for rule 3 (a waiter granted when places free up is
//! granted at that moment, and its lease is measured from it).
//!
//! A command stamped late (the first after a full disk, or a restart)
//! applies every deadline that passed since the last command, in time
//! order, before what it does itself; so one command may hand out several
//! places at several times. This replays a key through the command from
//! the contract alone (SPEC sections 2 and 7), not from the shard's code:
//! the key's occupants (its holders from before, until their leases ran
//! out or the command ended them; the grants made so far in the command,
//! for as long as they lasted), its lock delays, and its waiters in order.
//! A waiter is let in at the first moment when every waiter ahead of it
//! has been let in or has left, no lock delay covers the key, and the
//! occupants then admit its mode: any number of shared holders, or up to
//! `limit` exclusive ones.

use std::collections::BTreeMap;

use deadbolt_core::shard::Handle;
use deadbolt_core::shard::locks::KeyView;
use deadbolt_core::time::Tick;

/// A stretch of time in which a grant held the key.
#[derive(Debug, Clone, Copy)]
struct Occupant {
    from: Tick,
    until: Tick,
    shared: bool,
}

/// A waiter of the key from before the command, in queue order.
#[derive(Debug, Clone, Copy)]
struct Queued {
    handle: Handle,
    shared: bool,
    /// When it stopped waiting without a grant, if it did in the command.
    left: Option<Tick>,
}

/// One key, replayed through one command.
#[derive(Debug)]
pub(crate) struct Admission {
    now: Tick,
    limit: u32,
    occupants: Vec<Occupant>,
    /// Lock delays: nobody is granted the key in `[from, until)`.
    delays: Vec<(Tick, Tick)>,
    queue: Vec<Queued>,
    /// The waiters let in so far in the command, and when.
    let_in: BTreeMap<Handle, Tick>,
}

/// A grant of the command, as the replay needs it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewGrant {
    pub handle: Handle,
    pub ttl_ms: u64,
    pub lock_delay_ms: u64,
    /// Whether it is still held after the command.
    pub held_after: bool,
}

impl Admission {
    /// The key as `before` shows it, going through a command that took the
    /// shard to `now` and left it as `after` (if it still has any state).
    pub(crate) fn new(before: &KeyView, after: Option<&KeyView>, now: Tick) -> Admission {
        let held_after = |token| after.is_some_and(|v| v.holders.iter().any(|h| h.token == token));
        let waiting_after =
            |handle| after.is_some_and(|v| v.waiters.iter().any(|w| w.handle == handle));
        let mut occupants = Vec::new();
        let mut delays: Vec<(Tick, Tick)> = before
            .delayed_until
            .map(|until| (Tick::ZERO, until))
            .into_iter()
            .collect();
        for holder in &before.holders {
            let until = if held_after(holder.token) {
                Tick(u64::MAX)
            } else if holder.deadline <= now {
                if holder.lock_delay_ms > 0 {
                    let end = holder.deadline.plus_millis(holder.lock_delay_ms);
                    delays.push((holder.deadline, end));
                }
                holder.deadline
            } else {
                // Ended by the command itself (an unlock, a close).
                now
            };
            occupants.push(Occupant {
                from: Tick::ZERO,
                until,
                shared: holder.shared,
            });
        }
        let queue = before
            .waiters
            .iter()
            .map(|w| Queued {
                handle: w.handle,
                shared: w.shared,
                left: if waiting_after(w.handle) {
                    None
                } else {
                    // Its wait ran out, or the command ended it; a grant
                    // overrides this when it comes.
                    Some(w.deadline.filter(|&d| d <= now).unwrap_or(now))
                },
            })
            .collect();
        Admission {
            now,
            limit: before.limit.max(1),
            occupants,
            delays,
            queue,
            let_in: BTreeMap::new(),
        }
    }

    /// When the waiter `grant.handle` was let in, by the contract; records
    /// its grant for the waiters behind it. `None` if it was not a waiter
    /// of the key before the command.
    pub(crate) fn let_in(&mut self, grant: NewGrant) -> Option<Tick> {
        let place = self.queue.iter().position(|q| q.handle == grant.handle)?;
        let shared = self.queue[place].shared;
        let ahead: Vec<Tick> = self.queue[..place]
            .iter()
            .map(|q| self.let_in.get(&q.handle).copied().or(q.left))
            // One still waiting after the command was passed over: rule 1
            // reports that; it does not hold this grant back in time.
            .map(|gone| gone.unwrap_or(Tick::ZERO))
            .collect();
        let at = self
            .moments()
            .into_iter()
            .find(|&t| ahead.iter().all(|&gone| gone <= t) && self.admits(t, shared))
            .unwrap_or(self.now);
        self.let_in.insert(grant.handle, at);
        let ends = at.plus_millis(grant.ttl_ms);
        let until = if grant.held_after {
            Tick(u64::MAX)
        } else if ends <= self.now {
            if grant.lock_delay_ms > 0 {
                self.delays
                    .push((ends, ends.plus_millis(grant.lock_delay_ms)));
            }
            ends
        } else {
            self.now
        };
        self.occupants.push(Occupant {
            from: at,
            until,
            shared,
        });
        Some(at)
    }

    /// The waiter `handle` was answered at `at` without taking a place of
    /// its own (a queued re-lock answered with its client's grant).
    pub(crate) fn answered(&mut self, handle: Handle, at: Tick) {
        self.let_in.insert(handle, at);
    }

    /// Every moment of the command at which the key's state changes, in
    /// order, ending with the command's own time.
    fn moments(&self) -> Vec<Tick> {
        let mut moments: Vec<Tick> = self
            .occupants
            .iter()
            .flat_map(|o| [o.from, o.until])
            .chain(self.delays.iter().map(|&(_, until)| until))
            .chain(self.queue.iter().filter_map(|q| q.left))
            .chain(self.let_in.values().copied())
            .filter(|&t| t <= self.now)
            .collect();
        moments.push(self.now);
        moments.sort_unstable();
        moments.dedup();
        moments
    }

    /// Whether the key admits a grant of this mode at `t`.
    fn admits(&self, t: Tick, shared: bool) -> bool {
        if self
            .delays
            .iter()
            .any(|&(from, until)| from <= t && t < until)
        {
            return false;
        }
        let mut holding = self.occupants.iter().filter(|o| o.from <= t && t < o.until);
        if shared {
            holding.all(|o| o.shared)
        } else {
            let holding: Vec<&Occupant> = holding.collect();
            holding.iter().all(|o| !o.shared) && holding.len() < self.limit as usize
        }
    }
}
