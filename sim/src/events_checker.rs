//! Rule 14: pushed events (SPEC section 7), judged from what the workers
//! heard against what the history proves about the server's grants.
//!
//! The issue asks that "a `lost` event always arrives before (or at) the
//! end of the lease the client believed in". Literally that cannot hold:
//! the Rust client's lease view is deliberately shorter than the server's
//! lease (it counts from its own send, less a margin), so a lease that
//! runs out on the server runs out *after* the client's view ended, and
//! the `lost` for it comes later still. What the contract can promise,
//! and what is judged here, is:
//!
//! - **14a, the guard is never late.** A Rust-client guard's `lost()`
//!   resolves no later than the end of the client's own lease view (its
//!   `Granted`/`Extended` belief): the pushed `lost` or the local
//!   fallback, whichever is first. A worker still busy with its grant
//!   past that end without having recorded `Lost` is a violation. (Within
//!   [`TIMER_SLACK_US`]: the simulated timer's granularity.)
//! - **14b, an `expired` is never early.** A `lost` with reason `expired`
//!   (to a raw worker's `lock` with `notify`), and a watch's `expired`,
//!   arrive no earlier than the latest end of lease the history proves
//!   the server granted: a raw worker's belief (its send plus the
//!   answered `ttl_ms`; a re-lock answered with the same token moves it)
//!   and any Rust client's belief (shorter than the server's lease) are
//!   lower bounds of the server's lease end, and an event is received
//!   after it is pushed. A push before the lease ended is an early one.
//!   Only a belief with time left proves anything: a grant whose reply
//!   comes after the client's view already ran out is recorded as ending
//!   "now" (its view is empty, and ended at some earlier moment), which
//!   bounds nothing (seed 6075 of the first 10,000-seed run: a waiter's
//!   grant answered after its lease had run out on the server).
//! - **14c, nothing for the holder's own unlock.** A grant whose raw
//!   worker's `unlock` was answered `ok` ended by that unlock (an unlock
//!   of a grant already ended answers `not_held`): no `lost` is ever heard
//!   for it, and no watch hears it `expired`. Only the raw worker's
//!   unlocks prove it: the Rust client's `unlock` also says `Ok` when a
//!   retry, after an attempt that may have run, hears `not_held` (seed 18
//!   of the first run of this rule: a lease that ran out while the
//!   unlock's first attempt was lost to a server crash).
//! - **14d, a watch hears the server's order.** In one watch stream the
//!   `granted` tokens of the key rise strictly (tokens are handed out in
//!   increasing order, so the server's order of grants is the order of
//!   tokens), a grant is heard to end at most once, and never heard
//!   granted after it was heard to end.
//! - **14e, `expiring` is in its place.** An `expiring` for a grant never
//!   comes after its `lost` on the same request, its `remaining_ms` is at
//!   most a third of the lease's `ttl_ms` (the warning fires when a third
//!   or less is left), and it is never early: not before the first
//!   proven lease end less a third of the lease.
//!
//! What is not judged, and why. Lateness of delivery (beyond 14a, which
//! is the client's own timer): partitions, link holds and latency spikes
//! may delay any event arbitrarily, and a connection that drops loses its
//! events for good (the fallback timer covers that), so every rule here
//! is about order and "never early, never spurious", which no fault can
//! excuse. `revoked` is not judged against the server's ends: the history
//! has no server-side record of a drop, and 14c already rules out the one
//! end a holder can tell apart. Events after a watch's cancel: the Rust
//! client's dropped watch no longer reads its stream, so nothing pushed
//! after the cancel can be observed here (the engine's own tests cover
//! it). An `expiring` that never comes is not a violation: a writer busy
//! when both the warning and the `lost` are due writes the `lost` only.

use std::collections::{BTreeMap, BTreeSet};

use crate::checker::Violation;
use crate::history::{Actor, Event, What};

/// How late a simulated timer may fire after its deadline.
pub const TIMER_SLACK_US: u64 = 2_000;

/// A grant: its key and token.
type Grant = (String, u64);

/// Checks rule 14 over `events`; `raw` holds the raw-protocol workers
/// (whose beliefs are the server's minimum, with no guard of their own).
pub fn check(events: &[Event], raw: &BTreeSet<usize>) -> Vec<Violation> {
    let facts = Facts::of(events, raw);
    let mut violations = Vec::new();
    guard_never_late(events, raw, &mut violations);
    for event in events {
        if matches!(event.what, What::Pushed { .. }) {
            facts.judge_pushed(event, &mut violations);
        }
    }
    watch_order(events, &mut violations);
    violations
}

fn violation(kind: &'static str, event: &Event, why: String) -> Violation {
    Violation::Events {
        kind,
        detail: format!("{why}: {event}"),
    }
}

/// What the history proves about grants.
#[derive(Default)]
struct Facts {
    /// The latest lease end a belief proves the server granted.
    proven_end_us: BTreeMap<Grant, u64>,
    /// The first such end (the first lease's).
    first_end_us: BTreeMap<Grant, u64>,
    /// Each grant's `ttl_ms` as its worker asked for it, with when it was
    /// granted: a holder's re-lock in a later step can get the same token
    /// with another `ttl_ms`, and a warning belongs to the lease in force
    /// when it is heard.
    ttl_ms: BTreeMap<Grant, Vec<(u64, u64)>>,
    /// Grants ended by their raw holder's own `unlock`, answered `ok`.
    unlocked: BTreeSet<Grant>,
}

impl Facts {
    fn of(events: &[Event], raw: &BTreeSet<usize>) -> Facts {
        let mut facts = Facts::default();
        let mut asked_ttl: BTreeMap<usize, u64> = BTreeMap::new();
        for event in events {
            let Actor::Worker(worker) = event.actor else {
                continue;
            };
            match &event.what {
                What::LockAsked { ttl_ms, .. } => {
                    asked_ttl.insert(worker, *ttl_ms);
                }
                What::Granted {
                    key,
                    token,
                    valid_until_us,
                    ..
                } => {
                    let grant = (key.clone(), *token);
                    if *valid_until_us > event.at_us {
                        facts.prove(&grant, *valid_until_us);
                        let first = facts.first_end_us.entry(grant.clone());
                        first.or_insert(*valid_until_us);
                    }
                    if let Some(&ttl) = asked_ttl.get(&worker) {
                        let ttls = facts.ttl_ms.entry(grant).or_default();
                        ttls.push((event.at_us, ttl));
                    }
                }
                What::Extended {
                    key,
                    token,
                    valid_until_us,
                } if *valid_until_us > event.at_us => {
                    facts.prove(&(key.clone(), *token), *valid_until_us);
                }
                What::Unlocked {
                    key,
                    token,
                    ok: true,
                } if raw.contains(&worker) => {
                    facts.unlocked.insert((key.clone(), *token));
                }
                _ => {}
            }
        }
        facts
    }

    fn prove(&mut self, grant: &Grant, end_us: u64) {
        let end = self.proven_end_us.entry(grant.clone()).or_default();
        *end = (*end).max(end_us);
    }

    /// Rules 14b, 14c and 14e for one pushed event.
    fn judge_pushed(&self, event: &Event, violations: &mut Vec<Violation>) {
        let What::Pushed {
            key,
            token,
            event: name,
            reason,
            remaining_ms,
            watch,
        } = &event.what
        else {
            return;
        };
        let grant = (key.clone(), *token);
        let expiry = matches!(
            (name.as_str(), reason.as_deref(), watch),
            ("lost", Some("expired"), false) | ("expired", _, true)
        );
        if expiry
            && let Some(&end) = self.proven_end_us.get(&grant)
            && event.at_us < end
        {
            let why = format!("heard {} us before the proven lease end", end - event.at_us);
            violations.push(violation("events: expiry heard early", event, why));
        }
        let ended_by_holder = self.unlocked.contains(&grant);
        if ended_by_holder && (expiry || name == "lost") {
            let why = "the holder's own unlock ended this grant".to_owned();
            violations.push(violation("events: lost for own unlock", event, why));
        }
        if name == "expiring" && !watch {
            self.judge_expiring(&grant, event, *remaining_ms, violations);
        }
    }

    /// Rule 14e's bounds on one `expiring` (the order is judged per
    /// stream in [`watch_order`]).
    fn judge_expiring(
        &self,
        grant: &Grant,
        event: &Event,
        remaining_ms: Option<u64>,
        violations: &mut Vec<Violation>,
    ) {
        let in_force = self.ttl_ms.get(grant).and_then(|ttls| {
            let granted = ttls.iter().take_while(|(at_us, _)| *at_us <= event.at_us);
            granted.last().map(|&(_, ttl_ms)| ttl_ms)
        });
        let Some(ttl_ms) = in_force else {
            return;
        };
        if remaining_ms.is_none_or(|left| left > ttl_ms / 3 + 1) {
            let why = format!("remaining_ms {remaining_ms:?} of a {ttl_ms} ms lease");
            violations.push(violation("events: expiring out of place", event, why));
        }
        if let Some(&first_end) = self.first_end_us.get(grant) {
            let due = first_end.saturating_sub(ttl_ms / 3 * 1000 + 1000);
            if event.at_us < due {
                let why = format!("heard {} us before a third was left", due - event.at_us);
                violations.push(violation("events: expiring out of place", event, why));
            }
        }
    }
}

/// Rule 14a: a Rust-client worker's guard says `lost` by the end of its
/// own lease view, if the worker still has the grant then.
fn guard_never_late(events: &[Event], raw: &BTreeSet<usize>, violations: &mut Vec<Violation>) {
    // Per worker, the grant it is busy with and the end of its view.
    let mut open: BTreeMap<usize, (Grant, u64)> = BTreeMap::new();
    for event in events {
        let worker = match (event.actor, &event.what) {
            (Actor::Worker(w), _) => w,
            // A crashed worker's guard died with it.
            (Actor::Driver, What::Crashed { worker }) => {
                open.remove(worker);
                continue;
            }
            _ => continue,
        };
        if raw.contains(&worker) {
            continue;
        }
        match &event.what {
            What::Granted {
                key,
                token,
                valid_until_us,
                ..
            } => {
                open.insert(worker, ((key.clone(), *token), *valid_until_us));
            }
            What::Extended { valid_until_us, .. } => {
                if let Some((_, end)) = open.get_mut(&worker) {
                    *end = *valid_until_us;
                }
            }
            What::Lost { .. } | What::Started => {
                open.remove(&worker);
            }
            What::Released { .. } | What::ExtendFailed { .. } | What::Abandoned { .. } => {
                if let Some((_, end)) = open.remove(&worker)
                    && event.at_us > end + TIMER_SLACK_US
                {
                    let why = format!("still held {} us past the lease view", event.at_us - end);
                    violations.push(violation(
                        "events: lost() later than the lease view",
                        event,
                        why,
                    ));
                }
            }
            _ => {}
        }
    }
}

/// Rules 14d and 14e's order, per stream: a watch (from `Watching` to
/// `Unwatched`) and a raw worker's `notify` grant.
fn watch_order(events: &[Event], violations: &mut Vec<Violation>) {
    #[derive(Default)]
    struct Stream {
        last_granted: Option<u64>,
        ended: BTreeSet<u64>,
    }
    let mut watches: BTreeMap<(usize, String), Stream> = BTreeMap::new();
    let mut lost: BTreeSet<(usize, Grant)> = BTreeSet::new();
    for event in events {
        let Actor::Worker(worker) = event.actor else {
            continue;
        };
        match &event.what {
            What::Watching { key } => {
                watches.insert((worker, key.clone()), Stream::default());
            }
            What::Unwatched { key } => {
                watches.remove(&(worker, key.clone()));
            }
            What::Pushed {
                key,
                token,
                event: name,
                watch: false,
                ..
            } => {
                let heard = (worker, (key.clone(), *token));
                if name == "lost" {
                    lost.insert(heard);
                } else if name == "expiring" && lost.contains(&heard) {
                    let why = "an expiring after the grant's lost".to_owned();
                    violations.push(violation("events: expiring out of place", event, why));
                }
            }
            What::Pushed {
                key,
                token,
                event: name,
                watch: true,
                ..
            } => {
                let Some(stream) = watches.get_mut(&(worker, key.clone())) else {
                    continue;
                };
                let why = match name.as_str() {
                    "granted" if stream.ended.contains(token) => Some("granted after it ended"),
                    "granted" if stream.last_granted.is_some_and(|t| t >= *token) => {
                        Some("granted after a later token")
                    }
                    "granted" => {
                        stream.last_granted = Some(*token);
                        None
                    }
                    _ if !stream.ended.insert(*token) => Some("ended twice"),
                    _ => None,
                };
                if let Some(why) = why {
                    violations.push(violation(
                        "events: watch out of order",
                        event,
                        why.to_owned(),
                    ));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, worker: usize, what: What) -> Event {
        Event {
            at_us: ms * 1000,
            actor: Actor::Worker(worker),
            what,
        }
    }

    fn granted(ms: u64, worker: usize, token: u64, until_ms: u64) -> Event {
        let what = What::Granted {
            key: "k".into(),
            token,
            valid_until_us: until_ms * 1000,
            shared: false,
        };
        at(ms, worker, what)
    }

    fn pushed(ms: u64, worker: usize, token: u64, event: &str, reason: Option<&str>) -> Event {
        let what = What::Pushed {
            key: "k".into(),
            token,
            event: event.into(),
            reason: reason.map(str::to_owned),
            remaining_ms: None,
            watch: !matches!(event, "lost" | "expiring"),
        };
        at(ms, worker, what)
    }

    fn kinds(events: &[Event], raw: &[usize]) -> Vec<&'static str> {
        let raw = raw.iter().copied().collect();
        check(events, &raw).iter().map(Violation::kind).collect()
    }

    #[test]
    fn an_expiring_is_judged_by_the_lease_in_force_when_it_was_heard() {
        // Seed 636: a 900 ms lease warned with 290 ms left; the same
        // holder's later re-lock got the same token with a 150 ms lease.
        let lock = |ms, ttl_ms| {
            let what = What::LockAsked {
                key: "k".into(),
                ttl_ms,
                wait_ms: Some(0),
                ephemeral: false,
            };
            at(ms, 0, what)
        };
        let expiring = |ms, remaining_ms| {
            let mut event = pushed(ms, 0, 1, "expiring", None);
            if let What::Pushed {
                remaining_ms: r, ..
            } = &mut event.what
            {
                *r = Some(remaining_ms);
            }
            event
        };
        let events = [
            lock(0, 900),
            granted(10, 0, 1, 910),
            expiring(620, 290),
            lock(2_000, 150),
            granted(2_010, 0, 1, 2_160),
            expiring(2_110, 50),
        ];
        assert!(
            kinds(&events, &[0]).is_empty(),
            "{:?}",
            kinds(&events, &[0])
        );
        // A warning with more than a third of its own lease left is still
        // out of place.
        let early = [lock(0, 900), granted(10, 0, 1, 910), expiring(400, 500)];
        assert!(kinds(&early, &[0]).contains(&"events: expiring out of place"));
    }

    #[test]
    fn an_expired_lost_is_judged_against_the_proven_lease_end() {
        let lock = |ms| {
            at(
                ms,
                0,
                What::LockAsked {
                    key: "k".into(),
                    ttl_ms: 300,
                    wait_ms: Some(0),
                    ephemeral: false,
                },
            )
        };
        let on_time = [
            lock(0),
            granted(10, 0, 1, 300),
            pushed(300, 0, 1, "lost", Some("expired")),
        ];
        assert!(kinds(&on_time, &[0]).is_empty());
        let early = [
            lock(0),
            granted(10, 0, 1, 300),
            pushed(210, 0, 1, "lost", Some("expired")),
        ];
        assert_eq!(kinds(&early, &[0]), ["events: expiry heard early"]);
        // A grant heard after its view ran out proves no lease end.
        let late_grant = [
            lock(0),
            pushed(200, 0, 1, "lost", Some("expired")),
            granted(400, 0, 1, 400),
        ];
        assert!(kinds(&late_grant, &[0]).is_empty());
    }

    #[test]
    fn a_lost_after_an_unlock_answered_ok_counts_only_for_a_raw_holder() {
        let unlocked = at(
            100,
            0,
            What::Unlocked {
                key: "k".into(),
                token: 1,
                ok: true,
            },
        );
        let events = [
            granted(10, 0, 1, 300),
            unlocked,
            pushed(101, 0, 1, "lost", Some("revoked")),
        ];
        assert_eq!(kinds(&events, &[0]), ["events: lost for own unlock"]);
        // The Rust client's unlock also says ok after a retry hears `not_held`.
        assert!(kinds(&events, &[]).is_empty());
    }

    #[test]
    fn a_guard_busy_past_its_lease_view_without_lost_is_late() {
        let released = |ms| {
            at(
                ms,
                0,
                What::Released {
                    key: "k".into(),
                    token: 1,
                },
            )
        };
        let lost = at(
            300,
            0,
            What::Lost {
                key: "k".into(),
                token: 1,
            },
        );
        assert!(kinds(&[granted(0, 0, 1, 300), lost, released(400)], &[]).is_empty());
        assert_eq!(
            kinds(&[granted(0, 0, 1, 300), released(400)], &[]),
            ["events: lost() later than the lease view"]
        );
    }

    #[test]
    fn a_watch_hears_grants_in_token_order_and_ends_after_grants() {
        let watching = at(0, 1, What::Watching { key: "k".into() });
        let in_order = [
            watching.clone(),
            pushed(1, 1, 1, "granted", None),
            pushed(2, 1, 1, "released", None),
            pushed(3, 1, 2, "granted", None),
        ];
        assert!(kinds(&in_order, &[]).is_empty());
        let swapped = [
            watching,
            pushed(2, 1, 1, "released", None),
            pushed(2, 1, 1, "granted", None),
        ];
        assert_eq!(kinds(&swapped, &[]), ["events: watch out of order"]);
    }
}
