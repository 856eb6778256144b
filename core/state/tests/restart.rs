//! `Input::Restart`: what ends with the old process, and what does not.

mod common;

use common::{Driver, token_for};
use deadbolt_state::Input;
use deadbolt_state::time::Tick;

fn restart(d: &mut Driver, token_floor: u64) {
    let answers = d.apply(Input::Restart { token_floor });
    assert_eq!(answers, vec![], "a restart answers nobody");
}

#[test]
fn restart_drops_every_waiter_without_an_answer() {
    let mut d = Driver::new(1);
    d.lock("alice", 1, "k", 100).granted();
    let (bob, _) = d.lock("bob", 2, "k", 100).send();
    let (carol, _) = d.lock("carol", 3, "k", 100).wait_ms(50).send();
    assert_eq!(d.shard.counters().locks.waiters, 2);

    restart(&mut d, 0);

    let views = d.shard.lock_views();
    assert_eq!(views.len(), 1);
    assert_eq!(views[0].waiters, vec![], "no waiter survives");
    assert_eq!(d.shard.counters().locks.waiters, 0);
    // Neither carol's wait limit nor the end of alice's lease answers
    // them: they are gone, not waiting.
    assert_eq!(d.tick_at(50), vec![]);
    assert_eq!(d.tick_at(100), vec![]);
    assert_eq!(d.shard.lock_views(), vec![], "nobody was handed the key");
    // Nor does a cancel or a requester-gone naming them.
    let key = "k".to_owned();
    let cancel = Input::Cancel { handle: bob, key };
    assert_eq!(d.apply(cancel), vec![]);
    let key = "k".to_owned();
    assert_eq!(d.apply(Input::RequesterGone { handle: carol, key }), vec![]);
}

#[test]
fn restart_releases_ephemeral_locks_and_keeps_the_others_with_their_deadlines() {
    let mut d = Driver::new(2);
    d.lock("alice", 1, "e", 1_000).ephemeral().granted();
    let kept = d.lock("bob", 2, "n", 500).granted();
    d.now_ms = 100;

    restart(&mut d, 0);

    let views = d.shard.lock_views();
    assert_eq!(views.len(), 1, "{views:?}");
    let holder = &views[0].holders[0];
    assert_eq!((views[0].key.as_str(), holder.token), ("n", kept));
    assert_eq!((holder.conn, holder.ephemeral), (2, false));
    assert_eq!(holder.deadline, Tick::from_millis(500), "the lease is kept");
    // The released key is free at once; the kept one until its deadline.
    d.lock("carol", 3, "e", 1_000).granted();
    d.tick_at(499);
    assert_eq!(d.shard.lock_views().len(), 2);
    d.tick_at(500);
    assert_eq!(d.shard.lock_views().len(), 1, "bob's lease ended at 500");
    assert_eq!(d.shard.counters().locks.disconnects, 1);
}

#[test]
fn restart_forgets_which_request_made_each_grant() {
    // Without a restart, an undelivered grant is undone...
    let mut d = Driver::new(3);
    let (handle, _) = d.lock("alice", 1, "k", 100).send();
    let key = "k".to_owned();
    d.apply(Input::RequesterGone { handle, key });
    assert_eq!(d.shard.lock_views(), vec![]);

    // ...but its handle dies with the process: after a restart the same
    // notice names nothing.
    let mut d = Driver::new(3);
    let (handle, _) = d.lock("alice", 1, "k", 100).send();
    let before = d.shard.digest();
    restart(&mut d, 0);
    assert_ne!(d.shard.digest(), before, "granted_by is part of the state");
    let key = "k".to_owned();
    d.apply(Input::RequesterGone { handle, key });
    assert_eq!(d.shard.lock_views().len(), 1, "the grant stands");
}

#[test]
fn restart_raises_the_next_token_to_the_floor_and_never_lowers_it() {
    let mut d = Driver::new(4);
    assert_eq!(d.shard.next_token(), 100);
    assert_eq!(d.lock("alice", 1, "a", 100).granted(), 100);
    assert_eq!(d.shard.next_token(), 101);

    restart(&mut d, 1_000);
    assert_eq!(d.shard.next_token(), 1_000);
    assert_eq!(d.lock("alice", 1, "b", 100).granted(), 1_000);

    restart(&mut d, 5);
    assert_eq!(d.shard.next_token(), 1_001, "a lower floor changes nothing");
    assert_eq!(d.lock("alice", 1, "c", 100).granted(), 1_001);
}

#[test]
fn restart_applies_the_deadlines_due_by_its_time_first() {
    let mut d = Driver::new(5);
    d.lock("alice", 1, "k", 100).granted();
    let (bob, _) = d.lock("bob", 2, "k", 100).send();
    d.now_ms = 100;
    // As for every command, alice's lease ends first and bob is granted
    // (an answer of the deadline, not of the restart), then the restart
    // keeps bob's non-ephemeral grant.
    let answers = d.apply(Input::Restart { token_floor: 0 });
    assert!(token_for(&answers, bob).is_some(), "{answers:?}");
    let views = d.shard.lock_views();
    assert_eq!(views[0].holders[0].conn, 2);
}
