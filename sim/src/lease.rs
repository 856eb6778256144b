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

use std::collections::{BTreeMap, BTreeSet};

use crate::checker::Violation;
use crate::history::{Actor, Event, What};

/// Rounding: the engine's ticks against the simulated microseconds.
pub const SLACK_US: u64 = 5_000;

/// How long before a grant's first (re)start an attempt that was never
/// answered may still have been carried out after it: longer than any hold
/// of a link and any wait for a commit.
pub const UNANSWERED_WINDOW_US: u64 = 10_000_000;

/// One answer the tap heard.
#[derive(Debug, Clone, Copy)]
struct Answer {
    sent_us: u64,
    at_us: u64,
}

/// One answered attempt of a worker on a key: a lease's (re)start, a
/// proof that it ran, or (refused) what may have restarted it anyway.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    op: &'static str,
    answer: Answer,
    ttl_ms: Option<u64>,
    token: Option<u64>,
    ok: bool,
}

impl Attempt {
    /// The latest end of the lease it may have (re)started: a grant, a
    /// re-lock or an extend, answered `ok` or refused (an answer
    /// `unavailable` may still commit, stamped before it was given).
    fn restart_end_us(&self) -> Option<u64> {
        matches!(self.op, "lock" | "extend")
            .then(|| self.answer.at_us + self.ttl_ms.unwrap_or(0) * 1000)
    }
}

/// What one worker did on one key, as the tap heard it.
#[derive(Debug, Default)]
struct OnKey {
    answered: Vec<Attempt>,
    /// When each attempt of a lock or an extend was sent.
    sent_us: Vec<u64>,
}

impl OnKey {
    /// Whether an attempt of a lock or an extend sent within `from_us..=to_us`
    /// was never answered: it may have restarted the lease at any time.
    fn unanswered_within(&self, from_us: u64, to_us: u64) -> bool {
        let answered: BTreeSet<u64> = self
            .answered
            .iter()
            .filter(|a| a.restart_end_us().is_some())
            .map(|a| a.answer.sent_us)
            .collect();
        self.sent_us
            .iter()
            .any(|&sent| (from_us..=to_us).contains(&sent) && !answered.contains(&sent))
    }
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
    for ((_, key), on_key) in attempts(events) {
        for proof in on_key.answered.iter().filter(|a| proves_alive(&on_key, a)) {
            if let Some(violation) = outlived(&key, &on_key, proof, &gaps) {
                violations.push(violation);
            }
        }
    }
    if changes.is_empty() {
        violations.push(Violation::NoLeader);
    }
    violations
}

/// The `ok` answer an event records, if it records one.
fn answer(event: &Event) -> Option<Answer> {
    match (&event.actor, &event.what) {
        (
            Actor::Worker(_),
            What::Answered {
                sent_us,
                refused: None,
                ..
            },
        ) => Some(Answer {
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

/// Every worker's attempts on every lock key, in the order heard.
fn attempts(events: &[Event]) -> BTreeMap<(usize, String), OnKey> {
    let mut attempts: BTreeMap<(usize, String), OnKey> = BTreeMap::new();
    for event in events {
        let Actor::Worker(worker) = event.actor else {
            continue;
        };
        match &event.what {
            What::Sent { key, .. } => {
                let on_key = attempts.entry((worker, key.clone())).or_default();
                on_key.sent_us.push(event.at_us);
            }
            What::Answered {
                op,
                key,
                token,
                ttl_ms,
                sent_us,
                refused,
            } if *op != "insert" => {
                let attempt = Attempt {
                    op,
                    answer: Answer {
                        sent_us: *sent_us,
                        at_us: event.at_us,
                    },
                    ttl_ms: *ttl_ms,
                    token: *token,
                    ok: refused.is_none(),
                };
                let on_key = attempts.entry((worker, key.clone())).or_default();
                on_key.answered.push(attempt);
            }
            _ => {}
        }
    }
    attempts
}

/// Whether `attempt` proves its grant's lease was running when the leader
/// stamped it: an unlock or an extend answered `ok`, or a lock answered
/// `ok` with a token of this worker's that another (re)start had been
/// answered with before it was sent (a re-lock, not the grant itself).
fn proves_alive(on_key: &OnKey, attempt: &Attempt) -> bool {
    if !attempt.ok {
        return false;
    }
    match attempt.op {
        "unlock" | "extend" => true,
        "lock" => on_key.answered.iter().any(|other| {
            other.ok && other.token == attempt.token && other.answer.at_us <= attempt.answer.sent_us
        }),
        _ => false,
    }
}

/// The violation, if `proof` found its grant running past the latest end
/// the worker's (re)starts of it allow plus the gaps since they were
/// asked for; none if an attempt that may have restarted it was never
/// answered.
fn outlived(
    key: &str,
    on_key: &OnKey,
    proof: &Attempt,
    gaps: &[(u64, Option<u64>)],
) -> Option<Violation> {
    let token = proof.token?;
    let before_proof =
        |a: &&Attempt| !std::ptr::eq(*a, proof) && a.answer.sent_us <= proof.answer.at_us;
    // Its own (re)starts, and the worker's refused attempts on the key,
    // which may have been carried out.
    let restarts: Vec<&Attempt> = on_key
        .answered
        .iter()
        .filter(before_proof)
        .filter(|a| a.restart_end_us().is_some() && (!a.ok || a.token == Some(token)))
        .collect();
    let ends_by_us = restarts.iter().filter_map(|a| a.restart_end_us()).max()?;
    let asked_us = restarts.iter().map(|a| a.answer.sent_us).min()?;
    let from_us = asked_us.saturating_sub(UNANSWERED_WINDOW_US);
    if on_key.unanswered_within(from_us, proof.answer.at_us) {
        return None;
    }
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
                refused: None,
            },
        )
    }

    /// Worker 0's attempt of `op` on key `k` sent at `ms`.
    fn sent(op: &'static str, ms: u64) -> Event {
        at(
            ms,
            Actor::Worker(0),
            What::Sent {
                op,
                key: "k".into(),
                token: None,
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
    fn an_extend_never_answered_may_have_restarted_the_lease() {
        // Seed 4001 once: an extend sent at 1754 reached the leader, its
        // answer was lost with the connection, and its retry at 2062 found
        // the lease it had restarted.
        let events = [
            leading(0, 1),
            answered("lock", 923, 949, 2, Some(1084)),
            sent("extend", 1754),
            sent("extend", 2062),
            answered("extend", 2062, 2108, 2, Some(1084)),
        ];
        assert!(kinds(&events).is_empty(), "{:?}", kinds(&events));
        let refused = at(
            1800,
            Actor::Worker(0),
            What::Answered {
                op: "extend",
                key: "k".into(),
                token: Some(2),
                ttl_ms: Some(1084),
                sent_us: 1_754_000,
                refused: Some("unavailable".into()),
            },
        );
        let answered_late = [
            leading(0, 1),
            answered("lock", 923, 949, 2, Some(1084)),
            sent("extend", 1754),
            refused,
            sent("extend", 2062),
            answered("extend", 2062, 2108, 2, Some(1084)),
        ];
        assert!(
            kinds(&answered_late).is_empty(),
            "a refused extend may still commit, stamped before its answer"
        );
    }

    #[test]
    fn a_cluster_in_which_nobody_ever_leads_is_caught() {
        assert_eq!(kinds(&[]), ["no leader"]);
    }
}
