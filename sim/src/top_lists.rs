//! Rule 10's lists: what `stats` reports beside its counters (the held
//! locks most waited for, the keys with waiters, the largest sets) against
//! the shard's state, after every command.
//!
//! The lists are asked for long enough to hold everything, so that each
//! has one right answer: every key with waiters and a holder, most waiters
//! first (then by key); every held key, those with waiters first as listed
//! there, then the others by key; every set, largest first (then by name).
//! Each entry describes the key's first holder (its client, token and the
//! lease it has left) or the set (its size and the time it has left) as
//! the state has them at the command's time. A shorter list, with a cut-off
//! among ties, is the same code with `take`: the unit tests of `stats`
//! judge that.

use std::collections::BTreeMap;

use deadbolt_core::proto::{HeldLock, SetSummary};
use deadbolt_core::shard::Snapshot;
use deadbolt_core::shard::locks::KeyView;
use deadbolt_core::shard::sets::SetView;
use deadbolt_core::time::Tick;

/// How long a list the checker asks for: more than a simulated shard ever
/// holds, so that no list is cut.
pub(crate) const EVERYTHING: usize = 1 << 20;

/// Where the lists `stats` reports at `now` differ from what the state
/// (`locks`, `sets`) says they must be, if anywhere.
pub(crate) fn disagreement(
    reported: &Snapshot,
    locks: &BTreeMap<String, KeyView>,
    sets: &[SetView],
    now: Tick,
) -> Option<String> {
    let contended = contended(locks, now);
    let mut held = contended.clone();
    held.extend(idle_held(locks, now));
    let largest = largest_sets(sets, now);
    let wrong: Vec<String> = [
        ("held", format!("{held:?}"), format!("{:?}", reported.held)),
        (
            "contended",
            format!("{contended:?}"),
            format!("{:?}", reported.contended),
        ),
        (
            "largest sets",
            format!("{largest:?}"),
            format!("{:?}", reported.largest_sets),
        ),
    ]
    .into_iter()
    .filter(|(_, expected, listed)| expected != listed)
    .map(|(list, expected, listed)| format!("{list}: listed {listed}, the state has {expected}"))
    .collect();
    (!wrong.is_empty()).then(|| wrong.join("; "))
}

/// A key's entry: its first holder, if it has one.
fn described(view: &KeyView, now: Tick) -> Option<HeldLock> {
    view.holders.first().map(|holder| HeldLock {
        key: view.key.clone(),
        client: holder.client.to_string(),
        token: holder.token,
        remaining_ms: now.millis_until(holder.deadline),
        waiters: view.waiters.len() as u64,
    })
}

/// Every held key with waiters: most waiters first, then by key.
fn contended(locks: &BTreeMap<String, KeyView>, now: Tick) -> Vec<HeldLock> {
    let mut listed: Vec<HeldLock> = locks
        .values()
        .filter(|view| !view.waiters.is_empty())
        .filter_map(|view| described(view, now))
        .collect();
    listed.sort_by(|a, b| b.waiters.cmp(&a.waiters).then_with(|| a.key.cmp(&b.key)));
    listed
}

/// Every held key without waiters, by key.
fn idle_held(locks: &BTreeMap<String, KeyView>, now: Tick) -> Vec<HeldLock> {
    // The map is in key order already.
    locks
        .values()
        .filter(|view| view.waiters.is_empty())
        .filter_map(|view| described(view, now))
        .collect()
}

/// Every set: largest first, then by name.
fn largest_sets(sets: &[SetView], now: Tick) -> Vec<SetSummary> {
    let mut listed: Vec<SetSummary> = sets
        .iter()
        .map(|set| SetSummary {
            set: set.set.clone(),
            size: set.size,
            remaining_ms: now.millis_until(set.ends),
        })
        .collect();
    listed.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.set.cmp(&b.set)));
    listed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, size: u64, ends_ms: u64) -> SetView {
        SetView {
            set: name.into(),
            ends: Tick(ends_ms * 1000),
            size,
        }
    }

    fn summary(name: &str, size: u64, remaining_ms: u64) -> SetSummary {
        SetSummary {
            set: name.into(),
            size,
            remaining_ms,
        }
    }

    fn reported(largest_sets: Vec<SetSummary>) -> Snapshot {
        Snapshot {
            held: Vec::new(),
            contended: Vec::new(),
            largest_sets,
        }
    }

    #[test]
    fn sets_are_listed_largest_first_then_by_name_with_their_time_left() {
        let sets = [set("b", 2, 50), set("a", 2, 40), set("c", 5, 30)];
        let now = Tick(10_000);
        let right = reported(vec![
            summary("c", 5, 20),
            summary("a", 2, 30),
            summary("b", 2, 40),
        ]);
        let locks = BTreeMap::new();
        assert_eq!(disagreement(&right, &locks, &sets, now), None);
        let by_name = reported(vec![
            summary("a", 2, 30),
            summary("b", 2, 40),
            summary("c", 5, 20),
        ]);
        assert!(disagreement(&by_name, &locks, &sets, now).is_some());
        assert!(disagreement(&reported(Vec::new()), &locks, &sets, now).is_some());
    }
}
