//! SPEC section 7, one test per rule, against the pure shard: shared
//! locks, counting semaphores and lock delay.

mod support;

use deadbolt_core::proto::{ErrorCode, Mode, ModeName};
use deadbolt_core::shard::{Command, Input};
use deadbolt_core::time::Tick;
use support::Harness;

const SHARED: Mode = Mode::Shared;
const MUTEX: Mode = Mode::MUTEX;

fn semaphore(limit: u32) -> Mode {
    Mode::Exclusive { limit }
}

#[test]
fn shared_holders_coexist_and_each_has_its_own_rising_token() {
    let mut h = Harness::new();
    let a = h.lock_as("alice", "k", 500, Some(0), SHARED, 0).token();
    let b = h.lock_as("bob", "k", 500, Some(0), SHARED, 0).token();
    let c = h.lock_as("carol", "k", 500, Some(0), SHARED, 0).token();
    assert!(a < b && b < c);
    let info = h.inspect("k");
    let tokens: Vec<u64> = info.holders.iter().map(|h| h.token).collect();
    assert_eq!(tokens, [a, b, c], "every holder, oldest grant first");
    assert_eq!(info.holder.as_ref(), info.holders.first());
    assert!(info.holders.iter().all(|h| h.mode == ModeName::Shared));
    // `unlock` names one grant: the others hold on.
    h.unlock("bob", "k", b).ok();
    let left: Vec<u64> = h.inspect("k").holders.iter().map(|h| h.token).collect();
    assert_eq!(left, [a, c]);
    h.check();
}

#[test]
fn an_exclusive_holder_excludes_shared_ones_and_the_reverse() {
    let mut h = Harness::new();
    let writer = h.lock_as("alice", "k", 500, None, MUTEX, 0).token();
    assert_eq!(
        h.lock_as("bob", "k", 500, Some(0), SHARED, 0).code(),
        ErrorCode::Busy
    );
    let reader = h.lock_as("bob", "k", 500, None, SHARED, 0);
    assert!(reader.is_pending());
    h.unlock("alice", "k", writer).ok();
    let read = reader.token();
    assert!(read > writer);
    assert_eq!(
        h.lock_as("carol", "k", 500, Some(0), MUTEX, 0).code(),
        ErrorCode::Busy
    );
    h.check();
}

#[test]
fn a_waiting_exclusive_request_blocks_later_shared_ones() {
    let mut h = Harness::new();
    let first = h.lock_as("alice", "k", 500, None, SHARED, 0).token();
    let writer = h.lock_as("bob", "k", 500, None, MUTEX, 0);
    // Shared with alice, but behind bob: it waits (no writer starvation).
    let late_reader = h.lock_as("carol", "k", 500, None, SHARED, 0);
    assert_eq!(
        h.lock_as("dave", "k", 500, Some(0), SHARED, 0).code(),
        ErrorCode::Busy
    );
    assert!(writer.is_pending() && late_reader.is_pending());
    h.unlock("alice", "k", first).ok();
    let written = writer.token();
    assert!(late_reader.is_pending(), "the writer holds the key now");
    h.unlock("bob", "k", written).ok();
    assert!(late_reader.token() > written);
    h.check();
}

#[test]
fn shared_waiters_behind_an_exclusive_one_that_gives_up_are_let_in() {
    let mut h = Harness::new();
    h.lock_as("alice", "k", 10_000, None, SHARED, 0).token();
    let writer = h.lock_as("bob", "k", 500, Some(100), MUTEX, 0);
    let reader = h.lock_as("carol", "k", 500, None, SHARED, 0);
    h.advance(100);
    assert_eq!(writer.code(), ErrorCode::Timeout);
    reader.token();
    assert_eq!(h.inspect("k").holders.len(), 2);
    h.check();
}

#[test]
fn a_semaphore_admits_limit_holders_and_queues_the_next() {
    let mut h = Harness::new();
    let permits: Vec<u64> = ["a", "b", "c"]
        .iter()
        .map(|client| h.lock_as(client, "api", 500, None, semaphore(3), 0).token())
        .collect();
    let fourth = h.lock_as("d", "api", 500, None, semaphore(3), 0);
    assert!(fourth.is_pending());
    assert_eq!(h.inspect("api").limit, 3);
    h.unlock("b", "api", permits[1]).ok();
    assert!(fourth.token() > permits[2]);
    assert_eq!(h.inspect("api").holders.len(), 3);
    h.check();
}

#[test]
fn requests_that_disagree_on_the_limit_get_conflict_and_change_nothing() {
    let mut h = Harness::new();
    h.lock_as("a", "api", 500, None, semaphore(3), 0).token();
    let before = h.inspect("api");
    assert_eq!(
        h.lock_as("b", "api", 500, None, semaphore(4), 0).code(),
        ErrorCode::Conflict
    );
    assert_eq!(
        h.lock_as("b", "api", 500, None, MUTEX, 0).code(),
        ErrorCode::Conflict
    );
    // A shared lock's limit is 1: not a semaphore's.
    assert_eq!(
        h.lock_as("b", "api", 500, None, SHARED, 0).code(),
        ErrorCode::Conflict
    );
    assert_eq!(h.inspect("api"), before);
    // A read-write lock takes both modes (limit 1 each).
    h.lock_as("a", "rw", 500, None, SHARED, 0).token();
    assert!(h.lock_as("b", "rw", 500, None, MUTEX, 0).is_pending());
    h.check();
}

#[test]
fn a_free_key_takes_any_limit() {
    let mut h = Harness::new();
    let t = h.lock_as("a", "k", 500, None, semaphore(2), 0).token();
    h.unlock("a", "k", t).ok();
    h.lock_as("b", "k", 500, None, semaphore(5), 0).token();
    assert_eq!(h.inspect("k").limit, 5);
}

#[test]
fn a_holder_asking_again_in_the_other_mode_gets_conflict() {
    let mut h = Harness::new();
    let token = h.lock_as("alice", "k", 500, None, SHARED, 0).token();
    assert_eq!(
        h.lock_as("alice", "k", 500, None, MUTEX, 0).code(),
        ErrorCode::Conflict
    );
    // The same mode is a retry: same token, lease restarted.
    h.advance(100);
    assert_eq!(h.lock_as("alice", "k", 500, None, SHARED, 0).token(), token);
    assert_eq!(h.inspect("k").holders[0].remaining_ms, 500);
}

#[test]
fn a_lease_that_runs_out_keeps_the_key_from_everyone_for_its_lock_delay() {
    let mut h = Harness::new();
    h.lock_as("alice", "k", 100, None, MUTEX, 250).token();
    let bob = h.lock_as("bob", "k", 500, None, MUTEX, 0);
    h.advance(100); // alice's lease runs out: the delay starts
    assert!(bob.is_pending());
    assert_eq!(h.inspect("k").holder, None);
    assert_eq!(
        h.lock_as("carol", "k", 500, Some(0), MUTEX, 0).code(),
        ErrorCode::Busy
    );
    h.check();
    h.advance(249);
    assert!(bob.is_pending());
    h.advance(1);
    bob.token();
    h.check();
}

#[test]
fn a_lock_delay_with_nobody_waiting_still_refuses_and_then_frees_the_key() {
    let mut h = Harness::new();
    h.lock_as("alice", "k", 100, None, MUTEX, 50).token();
    h.advance(120);
    assert_eq!(
        h.lock_as("bob", "k", 500, Some(0), MUTEX, 0).code(),
        ErrorCode::Busy
    );
    h.advance(30);
    h.lock_as("bob", "k", 500, Some(0), MUTEX, 0).token();
    h.check();
}

#[test]
fn unlock_starts_no_lock_delay() {
    let mut h = Harness::new();
    let token = h.lock_as("alice", "k", 100, None, MUTEX, 10_000).token();
    let bob = h.lock_as("bob", "k", 500, None, MUTEX, 0);
    h.unlock("alice", "k", token).ok();
    bob.token();
}

#[test]
fn a_semaphore_permit_that_runs_out_holds_back_the_free_places_too() {
    let mut h = Harness::new();
    h.lock_as("a", "api", 100, None, semaphore(2), 40).token();
    h.lock_as("b", "api", 1000, None, semaphore(2), 0).token();
    h.advance(100);
    assert_eq!(
        h.lock_as("c", "api", 500, Some(0), semaphore(2), 0).code(),
        ErrorCode::Busy
    );
    h.advance(40);
    h.lock_as("c", "api", 500, Some(0), semaphore(2), 0).token();
    h.check();
}

#[test]
fn a_lease_with_a_delay_holds_back_a_key_another_lease_frees_at_the_same_tick() {
    let mut h = Harness::new();
    // Granted in this order, their timers fire in this order: the key that
    // b's lease frees is handed on only once a's delay has started.
    h.lock_as("a", "api", 100, None, semaphore(2), 0).token();
    h.lock_as("b", "api", 100, None, semaphore(2), 30).token();
    let c = h.lock_as("c", "api", 500, None, semaphore(2), 0);
    h.advance(100);
    assert!(c.is_pending());
    h.advance(30);
    c.token();
    h.check();
}

#[test]
fn a_grant_at_one_tick_whose_lease_ends_before_the_next_deadline_ends_first() {
    // One late command applies three deadlines: alice's lease (10 ms),
    // then bob's, granted at 10 ms for 5 ms (15 ms), then carol's wait
    // (20 ms). Carol is granted at 15 ms, before her wait runs out.
    let mut h = Harness::new();
    h.lock_as("alice", "k", 10, None, MUTEX, 0).token();
    let bob = h.lock_as("bob", "k", 5, None, MUTEX, 0);
    let carol = h.lock_as("carol", "k", 100, Some(20), MUTEX, 0);
    // As a shard behind a slow log does: no tick at each deadline.
    h.apply(Command {
        at: Tick::from_millis(25),
        input: Input::Tick,
    });
    bob.token();
    carol.token();
    assert_eq!(
        h.inspect("k").holders[0].remaining_ms,
        90,
        "carol's lease is from 15 ms"
    );
    h.check();
}
