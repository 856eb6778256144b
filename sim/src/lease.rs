//! The lease rules of a cluster (SPEC section 9), judged from the history.
//!
//! After a change of leader every lease continues with the time it had
//! left plus at most the election gap: it must neither end earlier than
//! its holder's view (etcd#15247: a new leader that counts a lease from an
//! older point) nor outlive its full TTL by more than the gap (etcd#9395:
//! a new leader that restarts every lease at its full TTL).
//!
//! - **Not earlier**: the checker's mutual exclusion rule already judges
//!   each holder's own conservative view against every other grant of the
//!   key; a lease ended early is a second holder while the first still
//!   believes. Nothing more is needed here.
//! - **Not later**: the tap ([`crate::tap`]) records every attempt the
//!   servers answered `ok`, with when it was sent. An `unlock` or `extend`
//!   of grant T answered `ok`, or a `lock` answered with T after T was
//!   granted (a re-lock), proves that T's lease was still running when the
//!   leader stamped it, which is no earlier than the attempt was sent. The
//!   lease was (re)started at the latest when its grant, re-lock or extend
//!   was answered, so it runs out by that answer plus its `ttl_ms`, on the
//!   clock of the leader of the time. A new leader's clock continues from
//!   the last command it applied, so it runs behind by at most the gap
//!   between that command's stamp and the new leader's first commit. The
//!   history bounds that gap from outside for each change of leader (a
//!   node's `Leading` event at x): it is no longer than from the latest
//!   send of a request answered by x (that request's batch is in the log,
//!   stamped after it was sent) to the first answer to a request sent after
//!   x (only a leader of x's term or later can answer that, and it has
//!   applied everything before). So a lease proven alive at p breaks the
//!   rule if p lies beyond its end plus every such gap since its grant was
//!   asked for, plus [`SLACK_US`].

use std::collections::BTreeMap;

use crate::checker::Violation;
use crate::history::{Actor, Event, What};

/// Rounding: the engine's ticks against the simulated microseconds.
pub const SLACK_US: u64 = 5_000;

/// One `ok` answer the tap heard.
#[derive(Debug, Clone, Copy)]
struct Answer {
    sent_us: u64,
    at_us: u64,
}

/// A lease's (re)start or a proof that it ran, for one grant.
#[derive(Debug, Clone, Copy)]
struct LeaseEvent {
    op: &'static str,
    answer: Answer,
    ttl_ms: Option<u64>,
}

/// Checks the lease rule over `events` (a cluster's history).
pub fn check(events: &[Event]) -> Vec<Violation> {
    let answers: Vec<Answer> = events.iter().filter_map(answer).collect();
    let changes: Vec<u64> = events
        .iter()
        .filter(|e| matches!(e.what, What::Leading { .. }))
        .map(|e| e.at_us)
        .collect();
    let gaps: Vec<(u64, Option<u64>)> = changes.iter().map(|&x| (x, gap(&answers, x))).collect();
    let mut violations = Vec::new();
    for ((key, token), grant) in grants(events) {
        for (index, proof) in grant.iter().enumerate() {
            if !proves_alive(&grant, index) {
                continue;
            }
            let restarts = grant
                .iter()
                .enumerate()
                .filter(|&(other, r)| other != index && is_restart(r))
                .filter(|(_, r)| r.answer.sent_us <= proof.answer.at_us)
                .map(|(_, r)| *r);
            if let Some(violation) = outlived(&key, token, restarts, proof, &gaps) {
                violations.push(violation);
            }
        }
    }
    if changes.is_empty() {
        violations.push(Violation::NoLeader);
    }
    violations
}

/// The answer an event records, if it records one.
fn answer(event: &Event) -> Option<Answer> {
    match (&event.actor, &event.what) {
        (Actor::Worker(_), What::Answered { sent_us, .. }) => Some(Answer {
            sent_us: *sent_us,
            at_us: event.at_us,
        }),
        _ => None,
    }
}

/// The length of the gap around the change of leader at `x` (see the
/// module's docs), or `None` if nobody was answered after it.
fn gap(answers: &[Answer], x: u64) -> Option<u64> {
    let from = answers
        .iter()
        .filter(|a| a.at_us <= x)
        .map(|a| a.sent_us)
        .max()
        .unwrap_or(0);
    let to = answers
        .iter()
        .filter(|a| a.sent_us >= x)
        .map(|a| a.at_us)
        .min()?;
    Some(to.saturating_sub(from))
}

/// Every grant's lease events, by key and token, in the order heard.
fn grants(events: &[Event]) -> BTreeMap<(String, u64), Vec<LeaseEvent>> {
    let mut grants: BTreeMap<(String, u64), Vec<LeaseEvent>> = BTreeMap::new();
    for event in events {
        let What::Answered {
            op,
            key,
            token: Some(token),
            ttl_ms,
            sent_us,
        } = &event.what
        else {
            continue;
        };
        let lease = LeaseEvent {
            op,
            answer: Answer {
                sent_us: *sent_us,
                at_us: event.at_us,
            },
            ttl_ms: *ttl_ms,
        };
        grants.entry((key.clone(), *token)).or_default().push(lease);
    }
    grants
}

/// Whether a lease event (re)starts the lease: a grant, a re-lock, an
/// extend.
fn is_restart(event: &LeaseEvent) -> bool {
    event.ttl_ms.is_some()
}

/// Whether the `index`-th event of a grant proves its lease was running
/// when the leader stamped it: an unlock or an extend answered `ok`, or a
/// lock answered with the grant's token that was sent after another
/// (re)start of it had been answered (a re-lock, not the grant itself).
fn proves_alive(grant: &[LeaseEvent], index: usize) -> bool {
    let event = &grant[index];
    match event.op {
        "unlock" | "extend" => true,
        "lock" => grant
            .iter()
            .enumerate()
            .any(|(other, r)| other != index && r.answer.at_us <= event.answer.sent_us),
        _ => false,
    }
}

/// The violation, if `proof` found grant `token` of `key` running past
/// the latest end its `restarts` allow plus the gaps since they were
/// asked for.
fn outlived(
    key: &str,
    token: u64,
    restarts: impl Iterator<Item = LeaseEvent>,
    proof: &LeaseEvent,
    gaps: &[(u64, Option<u64>)],
) -> Option<Violation> {
    let (mut ends_by_us, mut asked_us) = (None::<u64>, u64::MAX);
    for restart in restarts {
        let end = restart.answer.at_us + restart.ttl_ms.unwrap_or(0) * 1000;
        ends_by_us = Some(ends_by_us.map_or(end, |e| e.max(end)));
        asked_us = asked_us.min(restart.answer.sent_us);
    }
    let ends_by_us = ends_by_us?;
    let mut allowance_us = 0;
    for &(x, gap) in gaps {
        if x > asked_us && x <= proof.answer.at_us {
            // Nobody answered after that change: no bound to hold it to.
            allowance_us += gap?;
        }
    }
    let alive_at_us = proof.answer.sent_us;
    (alive_at_us > ends_by_us + allowance_us + SLACK_US).then(|| Violation::LeaseOutlived {
        key: key.to_owned(),
        token,
        ends_by_us,
        allowance_us,
        alive_at_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, actor: Actor, what: What) -> Event {
        Event {
            at_us: ms * 1000,
            actor,
            what,
        }
    }

    /// Worker 0's attempt of `op` on key `k`, sent at `sent_ms` and
    /// answered `ok` at `at_ms`.
    fn answered(
        op: &'static str,
        sent_ms: u64,
        at_ms: u64,
        token: u64,
        ttl_ms: Option<u64>,
    ) -> Event {
        at(
            at_ms,
            Actor::Worker(0),
            What::Answered {
                op,
                key: "k".into(),
                token: Some(token),
                ttl_ms,
                sent_us: sent_ms * 1000,
            },
        )
    }

    fn leading(ms: u64, node: u64) -> Event {
        at(ms, Actor::Node(node), What::Leading { term: node })
    }

    fn kinds(events: &[Event]) -> Vec<&'static str> {
        check(events).iter().map(Violation::kind).collect()
    }

    #[test]
    fn an_unlock_within_the_lease_is_fine_and_one_after_it_is_caught() {
        let lease = answered("lock", 100, 110, 7, Some(500));
        let within = [
            leading(0, 1),
            lease.clone(),
            answered("unlock", 600, 620, 7, None),
        ];
        assert!(kinds(&within).is_empty(), "{:?}", kinds(&within));
        let after = [leading(0, 1), lease, answered("unlock", 700, 720, 7, None)];
        assert_eq!(kinds(&after), ["lease outlived its ttl"]);
    }

    #[test]
    fn an_election_gap_lengthens_what_a_lease_may_run() {
        // The old leader last answered a request sent at 200; the new one
        // (leading at 900) first answers one sent after that at 1000: a gap
        // of 800 ms, so the lease granted at 110 may run until 1410.
        let events = [
            leading(0, 1),
            answered("lock", 100, 110, 7, Some(500)),
            answered("lock", 200, 220, 8, Some(100)),
            leading(900, 2),
            answered("lock", 950, 1000, 9, Some(100)),
            answered("unlock", 1300, 1320, 7, None),
        ];
        assert!(kinds(&events).is_empty(), "{:?}", kinds(&events));
        let reset = [
            leading(0, 1),
            answered("lock", 100, 110, 7, Some(500)),
            answered("lock", 200, 220, 8, Some(100)),
            leading(900, 2),
            answered("lock", 950, 1000, 9, Some(100)),
            // As if the new leader had restarted the lease at its full TTL.
            answered("unlock", 1450, 1470, 7, None),
        ];
        assert_eq!(kinds(&reset), ["lease outlived its ttl"]);
    }

    #[test]
    fn a_re_lock_or_an_extend_restarts_the_lease_and_proves_it_ran() {
        let events = [
            leading(0, 1),
            answered("lock", 100, 110, 7, Some(500)),
            answered("lock", 400, 410, 7, Some(500)),
            answered("extend", 800, 810, 7, Some(500)),
            answered("unlock", 1200, 1210, 7, None),
        ];
        assert!(kinds(&events).is_empty(), "{:?}", kinds(&events));
        let late_relock = [
            leading(0, 1),
            answered("lock", 100, 110, 7, Some(500)),
            answered("lock", 700, 710, 7, Some(500)),
        ];
        assert_eq!(kinds(&late_relock), ["lease outlived its ttl"]);
    }

    #[test]
    fn a_cluster_in_which_nobody_ever_leads_is_caught() {
        assert_eq!(kinds(&[]), ["no leader"]);
    }
}
