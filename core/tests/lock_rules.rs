//! SPEC section 2, one test per rule, against the pure shard.

mod support;

use deadbolt_core::limits::Limits;
use deadbolt_core::proto::{ErrorCode, Granted, Okay};
use support::{Harness, conn_of};

#[test]
fn lock_on_a_free_key_is_granted_with_a_token_and_the_requested_ttl() {
    let mut h = Harness::new();
    let slot = h.lock("alice", "k", 500, None);
    match slot.ok() {
        Okay::Granted(Granted { token, ttl_ms, .. }) => {
            assert!(token > 0);
            assert_eq!(ttl_ms, 500);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.holder("k").map(|(c, _)| c), Some("alice".to_owned()));
}

#[test]
fn wait_ms_zero_on_a_held_key_answers_busy_and_queues_nothing() {
    let mut h = Harness::new();
    h.lock("alice", "k", 500, None);
    assert_eq!(h.lock("bob", "k", 500, Some(0)).code(), ErrorCode::Busy);
    assert_eq!(h.inspect("k").waiters, 0);
}

#[test]
fn bounded_wait_answers_timeout_exactly_at_wait_ms() {
    let mut h = Harness::new();
    h.lock("alice", "k", 10_000, None);
    let bob = h.lock("bob", "k", 500, Some(200));
    h.advance(199);
    assert!(bob.is_pending());
    h.advance(1);
    assert_eq!(bob.code(), ErrorCode::Timeout);
    assert_eq!(h.inspect("k").waiters, 0);
}

#[test]
fn absent_wait_ms_waits_as_long_as_it_takes() {
    let mut h = Harness::new();
    h.lock("alice", "k", 86_400_000, None);
    let bob = h.lock("bob", "k", 500, None);
    h.advance(86_399_999);
    assert!(bob.is_pending());
    h.advance(1);
    bob.token();
}

#[test]
fn lease_ends_exactly_at_its_deadline_and_the_next_waiter_is_granted_then() {
    let mut h = Harness::new();
    let alice = h.lock("alice", "k", 300, None);
    let bob = h.lock("bob", "k", 1000, None);
    h.advance(299);
    assert_eq!(h.holder("k"), Some(("alice".to_owned(), alice.token())));
    assert!(bob.is_pending());
    h.advance(1);
    assert_eq!(h.holder("k"), Some(("bob".to_owned(), bob.token())));
}

#[test]
fn lease_is_measured_from_the_grant_not_from_the_request() {
    let mut h = Harness::new();
    h.lock("alice", "k", 300, None);
    h.advance(100);
    let bob = h.lock("bob", "k", 1000, None);
    h.advance(200); // alice's lease ends; bob granted at t=300
    let token = bob.token();
    h.advance(999); // t=1299: bob's lease (from 300) still runs
    assert_eq!(h.holder("k"), Some(("bob".to_owned(), token)));
    assert_eq!(h.inspect("k").holder.map(|h| h.remaining_ms), Some(1));
    h.advance(1);
    assert_eq!(h.holder("k"), None);
}

#[test]
fn a_timer_that_fires_late_applies_each_deadline_at_its_own_tick() {
    let mut h = Harness::new();
    h.lock("alice", "k", 100, None);
    let bob = h.lock("bob", "k", 100, None);
    let carol = h.lock("carol", "k", 100, None);
    h.advance(250); // alice ends at 100, bob holds 100..200, carol from 200
    assert!(bob.token() < carol.token());
    assert_eq!(h.inspect("k").holder.map(|h| h.remaining_ms), Some(50));
}

#[test]
fn unlock_ends_the_lease_early_and_hands_the_key_on() {
    let mut h = Harness::new();
    let alice = h.lock("alice", "k", 10_000, None);
    let bob = h.lock("bob", "k", 1000, None);
    assert!(matches!(
        h.unlock("alice", "k", alice.token()).ok(),
        Okay::Empty(_)
    ));
    assert_eq!(h.holder("k"), Some(("bob".to_owned(), bob.token())));
}

#[test]
fn unlock_of_the_last_holder_leaves_the_key_free() {
    let mut h = Harness::new();
    let alice = h.lock("alice", "k", 10_000, None);
    h.unlock("alice", "k", alice.token()).ok();
    assert_eq!(h.inspect("k").holder, None);
    h.lock("bob", "k", 10, Some(0)).token();
}

#[test]
fn extend_restarts_the_lease_at_the_new_ttl() {
    let mut h = Harness::new();
    let alice = h.lock("alice", "k", 100, None);
    h.advance(90);
    let reply = h.extend("alice", "k", alice.token(), 500).ok();
    assert_eq!(
        reply,
        Okay::Extended(deadbolt_core::proto::Extended { ttl_ms: 500 })
    );
    h.advance(499);
    assert!(h.holder("k").is_some());
    h.advance(1);
    assert!(h.holder("k").is_none());
}

#[test]
fn extend_can_shorten_the_lease() {
    let mut h = Harness::new();
    let alice = h.lock("alice", "k", 10_000, None);
    h.extend("alice", "k", alice.token(), 10).ok();
    h.advance(10);
    assert!(h.holder("k").is_none());
}

#[test]
fn waiters_are_granted_strictly_first_come_first_served() {
    let mut h = Harness::new();
    let first = h.lock("alice", "k", 10, None);
    let waiters: Vec<_> = ["bob", "carol", "dave", "erin"]
        .iter()
        .map(|c| (*c, h.lock(c, "k", 10, None)))
        .collect();
    let mut token = first.token();
    for (client, slot) in &waiters {
        assert!(slot.is_pending());
        h.unlock("x", "k", token).ok();
        assert_eq!(h.holder("k").map(|(c, _)| c).as_deref(), Some(*client));
        token = slot.token();
    }
}

#[test]
fn a_waiter_whose_connection_closes_leaves_the_queue_and_is_never_granted() {
    let mut h = Harness::new();
    let alice = h.lock("alice", "k", 100, None);
    let bob = h.lock("bob", "k", 100, None);
    let carol = h.lock("carol", "k", 100, None);
    h.close_connection(conn_of("bob"));
    assert_eq!(h.inspect("k").waiters, 1);
    assert_eq!(bob.code(), ErrorCode::Cancelled, "answered, to nobody");
    assert_eq!(h.shard.counters().locks.abandoned, 1, "counted once");
    h.unlock("alice", "k", alice.token()).ok();
    assert_eq!(h.holder("k").map(|(c, _)| c).as_deref(), Some("carol"));
    carol.token();
}

#[test]
fn a_cancelled_waiter_answers_cancelled_and_is_never_granted() {
    let mut h = Harness::new();
    let alice = h.lock("alice", "k", 100, None);
    let bob = h.lock("bob", "k", 100, None);
    h.cancel(&bob);
    assert_eq!(bob.code(), ErrorCode::Cancelled);
    h.unlock("alice", "k", alice.token()).ok();
    assert_eq!(h.holder("k"), None);
    assert_eq!(bob.answers(), 1);
}

#[test]
fn cancel_of_a_request_that_is_not_waiting_changes_nothing() {
    let mut h = Harness::new();
    let alice = h.lock("alice", "k", 100, None);
    let bob = h.lock("bob", "k", 100, Some(0));
    let before = h.shard.digest();
    h.cancel(&alice); // granted, not waiting
    h.cancel(&bob); // answered busy, never queued
    assert_eq!(h.shard.digest(), before, "the state did not change");
    assert_eq!(alice.answers(), 1);
    assert_eq!(bob.code(), ErrorCode::Busy);
    assert_eq!(h.holder("k"), Some(("alice".to_owned(), alice.token())));
    assert_eq!(h.shard.counters().locks.cancellations, 0);
}

#[test]
fn a_waiter_whose_requester_is_gone_is_skipped_never_granted() {
    let mut h = Harness::new();
    let alice = h.lock("alice", "k", 100, None);
    let bob = h.lock("bob", "k", 100, None);
    let carol = h.lock("carol", "k", 100, None);
    h.gone(&bob);
    assert_eq!(h.inspect("k").waiters, 1, "a gone waiter leaves the queue");
    assert_eq!(bob.code(), ErrorCode::Cancelled, "answered, to nobody");
    h.advance(100);
    assert_eq!(h.holder("k").map(|(c, _)| c).as_deref(), Some("carol"));
    assert_eq!(carol.token(), alice.token() + 1);
    assert_eq!(h.shard.counters().locks.abandoned, 1);
}

#[test]
fn a_grant_that_cannot_be_delivered_is_undone_and_passed_on() {
    let mut h = Harness::new();
    let alice = h.lock("alice", "k", 100, None);
    let bob = h.lock("bob", "k", 100, None);
    let carol = h.lock("carol", "k", 100, None);
    h.unlock("alice", "k", alice.token()).ok();
    let bob_token = bob.token();
    h.gone(&bob); // the grant reached nobody
    assert_eq!(h.holder("k").map(|(c, _)| c).as_deref(), Some("carol"));
    assert_eq!(carol.token(), bob_token + 1);
    let fresh = h.lock_with("dave", 4, "free", 100, None, false);
    fresh.token();
    h.gone(&fresh);
    assert_eq!(
        h.holder("free"),
        None,
        "a fresh grant nobody heard of is undone"
    );
    assert_eq!(h.shard.counters().locks.abandoned, 2);
}

#[test]
fn an_undelivered_answer_does_not_undo_a_grant_its_holder_knows_of() {
    let mut h = Harness::new();
    let first = h.lock_with("dave", 4, "k", 100, None, false);
    let token = first.token();
    // The same client asks again (a second task, or a retry) and that
    // answer is lost: the first answer was heard, so the grant stands.
    let again = h.lock_with("dave", 4, "k", 100, None, false);
    assert_eq!(again.token(), token);
    h.gone(&again);
    h.gone(&first); // too late: the re-lock showed the holder knows
    assert_eq!(h.holder("k"), Some(("dave".to_owned(), token)));
    // An extend shows it as well.
    let other = h.lock_with("erin", 5, "other", 100, None, false);
    let other_token = other.token();
    h.extend("erin", "other", other_token, 100).ok();
    h.gone(&other);
    assert_eq!(h.holder("other"), Some(("erin".to_owned(), other_token)));
    assert_eq!(h.shard.counters().locks.abandoned, 0);
}

#[test]
fn every_grant_of_a_key_has_a_greater_token_even_after_the_key_was_forgotten() {
    let mut h = Harness::new();
    let mut last = 0;
    for round in 0..5 {
        let slot = h.lock(if round % 2 == 0 { "alice" } else { "bob" }, "k", 10, None);
        let token = slot.token();
        assert!(token > last);
        last = token;
        if round % 2 == 0 {
            h.unlock("x", "k", token).ok();
        } else {
            h.advance(10); // expire; the key's state is dropped
        }
        // Other keys' grants in between must not matter.
        let other = h.lock("carol", "other", 1, None).token();
        h.unlock("carol", "other", other).ok();
    }
}

#[test]
fn unlock_or_extend_with_another_token_is_not_held_and_changes_nothing() {
    let mut h = Harness::new();
    let alice = h.lock("alice", "k", 100, None);
    let token = alice.token();
    assert_eq!(h.unlock("alice", "k", token + 1).code(), ErrorCode::NotHeld);
    assert_eq!(
        h.extend("alice", "k", token - 1, 10_000).code(),
        ErrorCode::NotHeld
    );
    assert_eq!(h.unlock("alice", "free", token).code(), ErrorCode::NotHeld);
    assert_eq!(
        h.extend("alice", "free", token, 10).code(),
        ErrorCode::NotHeld
    );
    assert_eq!(
        h.inspect("k").holder.map(|h| (h.token, h.remaining_ms)),
        Some((token, 100))
    );
    h.advance(100);
    assert_eq!(
        h.unlock("alice", "k", token).code(),
        ErrorCode::NotHeld,
        "expired"
    );
}

#[test]
fn the_token_alone_authorises_unlock_and_extend_from_any_client_or_connection() {
    let mut h = Harness::new();
    let token = h.lock("alice", "k", 100, None).token();
    h.extend("mallory", "k", token, 1000).ok();
    h.unlock("someone-else", "k", token).ok();
    assert_eq!(h.holder("k"), None);
}

#[test]
fn lock_by_the_holder_returns_the_same_token_and_restarts_the_lease() {
    let mut h = Harness::new();
    let first = h.lock("alice", "k", 100, None).token();
    h.advance(80);
    // A retry after a lost reply, from a new connection.
    let retry = h.lock_with("alice", 77, "k", 300, Some(0), false);
    assert_eq!(retry.ok(), Okay::Granted(Granted::new(first, 300)));
    h.advance(299);
    assert_eq!(h.holder("k"), Some(("alice".to_owned(), first)));
    h.advance(1);
    assert_eq!(h.holder("k"), None);
    // No re-entrancy counting: one unlock would have released it.
    let again = h.lock("alice", "k", 100, None).token();
    h.lock("alice", "k", 100, None);
    h.unlock("alice", "k", again).ok();
    assert_eq!(h.holder("k"), None);
}

#[test]
fn a_queued_request_of_the_new_holder_is_answered_with_the_same_token() {
    let mut h = Harness::new();
    let alice = h.lock("alice", "k", 100, None);
    let bob_first = h.lock_with("bob", 1, "k", 100, None, false);
    let carol = h.lock("carol", "k", 100, None);
    let bob_retry = h.lock_with("bob", 2, "k", 400, None, false);
    h.unlock("alice", "k", alice.token()).ok();
    assert_eq!(bob_first.token(), bob_retry.token());
    assert!(carol.is_pending());
    h.advance(399);
    assert!(
        carol.is_pending(),
        "the retry restarted the lease at 400 ms"
    );
    h.advance(1);
    carol.token();
}

#[test]
fn a_held_lock_outlives_its_holders_connection_until_its_lease_ends() {
    let mut h = Harness::new();
    let token = h.lock("alice", "k", 100, None).token();
    h.close_connection(conn_of("alice"));
    assert_eq!(h.holder("k"), Some(("alice".to_owned(), token)));
    // The reconnected worker can still extend and unlock it.
    h.extend("alice", "k", token, 100).ok();
    h.unlock("alice", "k", token).ok();
}

#[test]
fn an_ephemeral_lock_is_released_when_its_connection_closes() {
    let mut h = Harness::new();
    let alice = h.lock_with("alice", 1, "k", 10_000, None, true);
    h.lock_with("alice", 1, "other", 10_000, None, false)
        .token();
    let bob = h.lock("bob", "k", 100, None);
    alice.token();
    h.close_connection(2); // another connection: nothing
    assert!(bob.is_pending());
    h.close_connection(1);
    h.check();
    bob.token();
    assert!(h.holder("other").is_some(), "non-ephemeral locks stay");
    assert_eq!(h.shard.counters().locks.disconnects, 1, "one counted");
}

#[test]
fn a_relock_from_a_new_connection_moves_an_ephemeral_lock_to_it() {
    let mut h = Harness::new();
    let token = h.lock_with("alice", 1, "k", 10_000, None, true).token();
    h.lock_with("alice", 2, "k", 10_000, None, true);
    h.close_connection(1);
    assert_eq!(h.holder("k"), Some(("alice".to_owned(), token)));
    h.close_connection(2);
    assert_eq!(h.holder("k"), None);
}

#[test]
fn inspect_reports_the_holder_its_remaining_lease_and_the_waiters() {
    let mut h = Harness::new();
    let token = h.lock("alice", "k", 1000, None).token();
    h.lock("bob", "k", 1000, None);
    h.lock("carol", "k", 1000, Some(5000));
    h.advance(250);
    let info = h.inspect("k");
    let holder = info.holder.expect("held");
    assert_eq!(
        (holder.client.as_str(), holder.token, holder.remaining_ms),
        ("alice", token, 750)
    );
    assert_eq!(info.waiters, 2);
    assert_eq!(h.inspect("nobody").holder, None);
}

#[test]
fn waiters_beyond_the_per_key_limit_are_refused_as_overloaded() {
    let mut limits = Limits::unbounded_capacity();
    limits.waiters_per_key_max = 2;
    let mut h = Harness::with_limits(limits);
    h.lock("alice", "k", 1000, None);
    h.lock("bob", "k", 1000, None);
    h.lock("carol", "k", 1000, None);
    assert_eq!(
        h.lock("dave", "k", 1000, None).code(),
        ErrorCode::Overloaded
    );
    assert_eq!(h.inspect("k").waiters, 2);
}

#[test]
fn waiters_beyond_the_shard_limit_are_refused_as_overloaded() {
    let mut limits = Limits::unbounded_capacity();
    limits.waiters_max = 1;
    let mut h = Harness::with_limits(limits);
    h.lock("alice", "a", 1000, None);
    h.lock("alice", "b", 1000, None);
    h.lock("bob", "a", 1000, None);
    assert_eq!(h.lock("bob", "b", 1000, None).code(), ErrorCode::Overloaded);
}

#[test]
fn keys_beyond_the_lock_limit_are_refused_as_overloaded() {
    let mut limits = Limits::unbounded_capacity();
    limits.locks_max = 2;
    let mut h = Harness::with_limits(limits);
    h.lock("alice", "a", 1000, None).token();
    h.lock("alice", "b", 1000, None).token();
    assert_eq!(
        h.lock("alice", "c", 1000, None).code(),
        ErrorCode::Overloaded
    );
    h.advance(1000);
    h.lock("alice", "c", 1000, None).token();
}

#[test]
fn key_bytes_beyond_the_lock_budget_are_refused_until_a_key_is_freed() {
    let mut limits = Limits::unbounded_capacity();
    limits.lock_key_bytes_max = 10;
    let mut h = Harness::with_limits(limits);
    h.lock("alice", "12345", 1000, None).token();
    h.lock("alice", "6789", 1000, None).token();
    assert_eq!(
        h.lock("alice", "ab", 1000, None).code(),
        ErrorCode::Overloaded,
        "11 bytes would pass the budget of 10"
    );
    h.lock("bob", "x", 1000, None).token();
    h.advance(1000);
    h.lock("alice", "0123456789", 1000, None).token();
}

#[test]
fn shutdown_answers_every_waiter_shutting_down() {
    let mut h = Harness::new();
    let alice = h.lock("alice", "k", 1000, None);
    let bob = h.lock("bob", "k", 1000, None);
    let carol = h.lock("carol", "other", 1000, None);
    let dave = h.lock("dave", "other", 1000, Some(500));
    h.shutdown();
    assert_eq!(bob.code(), ErrorCode::ShuttingDown);
    assert_eq!(dave.code(), ErrorCode::ShuttingDown);
    assert_eq!(
        (alice.answers(), carol.answers()),
        (1, 1),
        "holders were answered once"
    );
    let locks = h.shard.counters().locks;
    assert_eq!(
        (locks.held, locks.waiters),
        (0, 0),
        "all lock state is dropped"
    );
    h.advance(2000);
    assert_eq!(
        (bob.answers(), dave.answers()),
        (1, 1),
        "nobody is answered twice"
    );
    assert_eq!(
        h.shard.counters().locks.expiries,
        0,
        "no lease of a forgotten lock ends"
    );
}

#[test]
fn stale_timers_are_compacted_away_under_many_extends() {
    let mut h = Harness::new();
    let token = h.lock("alice", "k", 86_400_000, None).token();
    for _ in 0..10_000 {
        h.extend("alice", "k", token, 86_400_000).ok();
    }
    // Nothing observable may change: one holder, same token, full lease.
    assert_eq!(h.inspect("k").holder.map(|h| h.token), Some(token));
    h.advance(86_399_999);
    assert!(h.holder("k").is_some());
    h.advance(1);
    assert!(h.holder("k").is_none());
}

#[test]
fn a_replay_with_another_hash_seed_hands_out_the_same_tokens() {
    let mut h = Harness::new();
    // Twenty keys, each held ephemerally by one connection with a waiter
    // behind it, and twenty leases ending at the same tick: the order in
    // which keys are handed on decides their tokens, and must not depend on
    // how a seeded hash orders them.
    for i in 0..20 {
        let key = format!("key-{i}");
        h.lock_with("alice", 1, &key, 10_000, None, true).token();
        h.lock_with("bob", 2, &key, 10_000, None, false);
        let other = format!("other-{i}");
        h.lock_with("carol", 3, &other, 50, None, false).token();
        h.lock_with("dave", 4, &other, 10_000, None, false);
    }
    h.close_connection(1);
    h.advance(50);
    h.check_replay();
}

#[test]
fn timers_of_cancelled_and_abandoned_waiters_are_compacted_away() {
    let mut h = Harness::new();
    h.lock("alice", "k", 86_400_000, None).token();
    // Each waiter leaves a wait timer behind; thousands leaving by cancel
    // or by going away must not leave the heap full of stale entries (the
    // harness checks the invariants, timer heap size included, after every
    // command).
    for round in 0..3_000 {
        let waiter = h.lock_with("bob", 2, "k", 100, Some(60_000), false);
        if round % 2 == 0 {
            h.cancel(&waiter);
        } else {
            h.gone(&waiter);
        }
    }
    assert_eq!(h.inspect("k").waiters, 0);
}

#[test]
fn stats_lists_rank_waiters_as_they_come_and_go_without_a_scan() {
    let mut h = Harness::new();
    for i in 0..50 {
        h.lock("holder", &format!("k{i:02}"), 60_000, None);
    }
    // Three waiters on k07, two on k03, one on k42.
    let mut waiting = Vec::new();
    for (key, waiters) in [("k07", 3), ("k03", 2), ("k42", 1)] {
        for w in 0..waiters {
            waiting.push(h.lock(&format!("w{w}"), key, 60_000, None));
        }
    }
    let ranked = |h: &Harness, top| {
        let snapshot = h.shard.snapshot(top);
        let names = |list: &[deadbolt_core::proto::HeldLock]| {
            list.iter()
                .map(|l| (l.key.clone(), l.waiters))
                .collect::<Vec<_>>()
        };
        (names(&snapshot.contended), names(&snapshot.held))
    };
    let pairs = |list: &[(&str, u64)]| {
        list.iter()
            .map(|&(k, n)| (k.to_owned(), n))
            .collect::<Vec<_>>()
    };
    let (contended, held) = ranked(&h, 2);
    assert_eq!(contended, pairs(&[("k07", 3), ("k03", 2)]));
    assert_eq!(held, contended, "the most waited-for held locks first");
    let (contended, held) = ranked(&h, 10);
    assert_eq!(contended.len(), 3);
    assert_eq!(held.len(), 10, "filled with locks nobody waits for");
    assert_eq!(held[..3], contended[..]);
    assert!(held[3..].iter().all(|(_, waiters)| *waiters == 0));
    // A waiter leaves k07 (cancelled): now two keys tie at 2, by key.
    h.cancel(&waiting[0]);
    let (contended, _) = ranked(&h, 10);
    assert_eq!(contended, pairs(&[("k03", 2), ("k07", 2), ("k42", 1)]));
    h.check();
}
