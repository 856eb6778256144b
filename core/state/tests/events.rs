//! The shard's events (SPEC section 7): what it reports as it applies
//! commands, and that two replicas of one log report the same.

mod common;

use common::Driver;
use deadbolt_proto::{LockOp, SetOp};
use deadbolt_state::events::{Ending, Event, LockChange, SetChange};
use deadbolt_state::time::Tick;
use deadbolt_state::{Input, ShardOp};

fn drained(d: &mut Driver) -> Vec<Event> {
    let mut events = Vec::new();
    d.shard.drain_events_into(&mut events);
    events
}

fn lock_event(key: &str, token: u64, at_ms: u64, change: LockChange) -> Event {
    Event::Lock {
        key: key.to_owned(),
        token,
        at: Tick::from_millis(at_ms),
        change,
    }
}

fn unlock(d: &mut Driver, client: &str, key: &str, token: u64) {
    let op = ShardOp::Lock(LockOp::Release {
        key: key.to_owned(),
        token,
    });
    d.op(client, 9, op);
}

#[test]
fn nothing_is_reported_until_the_driver_asks() {
    let mut d = Driver::new(1);
    d.lock("alice", 1, "k", 100).granted();
    assert_eq!(drained(&mut d), vec![]);
}

#[test]
fn each_way_a_grant_ends_is_told_apart() {
    let mut d = Driver::new(1);
    d.shard.enable_events();
    let own = d.lock("alice", 1, "a", 100).granted();
    unlock(&mut d, "alice", "a", own);
    let theirs = d.lock("alice", 1, "b", 100).granted();
    unlock(&mut d, "mallory", "b", theirs);
    let ephemeral = d.lock("alice", 2, "c", 100).ephemeral().granted();
    d.apply(Input::ConnectionClosed { conn: 2 });
    let expiring = d.lock("alice", 1, "d", 100).granted();
    d.tick_at(100);
    let granted = LockChange::Granted { ttl_ms: 100 };
    let ended = |ending| LockChange::Ended(ending);
    assert_eq!(
        drained(&mut d),
        vec![
            lock_event("a", own, 0, granted),
            lock_event("a", own, 0, ended(Ending::Unlocked { by_holder: true })),
            lock_event("b", theirs, 0, granted),
            lock_event("b", theirs, 0, ended(Ending::Unlocked { by_holder: false })),
            lock_event("c", ephemeral, 0, granted),
            lock_event("c", ephemeral, 0, ended(Ending::Dropped)),
            lock_event("d", expiring, 0, granted),
            lock_event("d", expiring, 100, ended(Ending::Expired)),
        ]
    );
}

#[test]
fn an_extend_and_a_relock_restart_the_lease_and_a_waiter_is_granted_at_the_hand_off() {
    let mut d = Driver::new(1);
    d.shard.enable_events();
    let first = d.lock("alice", 1, "k", 100).granted();
    d.now_ms = 30;
    let extend = ShardOp::Lock(LockOp::Extend {
        key: "k".into(),
        token: first,
        ttl_ms: 200,
    });
    d.op("alice", 1, extend);
    d.now_ms = 40;
    d.lock("alice", 1, "k", 300).granted();
    let (_bob, _) = d.lock("bob", 2, "k", 50).send();
    d.tick_at(340);
    let events = drained(&mut d);
    assert_eq!(
        events[..3],
        [
            lock_event("k", first, 0, LockChange::Granted { ttl_ms: 100 }),
            lock_event("k", first, 30, LockChange::Leased { ttl_ms: 200 }),
            lock_event("k", first, 40, LockChange::Leased { ttl_ms: 300 }),
        ]
    );
    assert_eq!(
        events[3..5],
        [
            lock_event("k", first, 340, LockChange::Ended(Ending::Expired)),
            lock_event("k", first + 1, 340, LockChange::Granted { ttl_ms: 50 }),
        ]
    );
}

#[test]
fn sets_report_creation_expiry_and_tear_down() {
    let mut d = Driver::new(1);
    d.shard.enable_events();
    d.set_up("s", 100).expect("set up");
    d.set_up("s", 100).expect("renewed: not created again");
    d.tick_at(100);
    d.set_up("s", 100).expect("set up");
    d.op("x", 1, ShardOp::Set(SetOp::TearDown { set: "s".into() }));
    let set = |change| Event::Set {
        set: "s".to_owned(),
        change,
    };
    assert_eq!(
        drained(&mut d),
        vec![
            set(SetChange::Created),
            set(SetChange::Expired),
            set(SetChange::Created),
            set(SetChange::TornDown),
        ]
    );
}

#[test]
fn two_shards_fed_the_same_commands_report_the_same_events_whatever_their_hash_seed() {
    let run = |seed: u64| {
        let mut d = Driver::new(seed);
        d.shard.enable_events();
        for (i, key) in ["a", "b", "c", "d"].iter().enumerate() {
            d.lock("alice", 1, key, 50 + i as u64 * 10).granted();
            d.lock("bob", 2, key, 70).send();
        }
        d.apply(Input::ConnectionClosed { conn: 2 });
        d.tick_at(500);
        drained(&mut d)
    };
    let first = run(1);
    assert!(first.len() >= 8, "{first:?}");
    assert_eq!(first, run(0xdead_beef));
}
