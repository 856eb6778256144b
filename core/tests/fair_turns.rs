//! Fair turns in a shard (issue 18): one connection's flood of `members`
//! pages does not hold up another connection's requests, while what must
//! keep its order does (a connection's own requests on a set, waiters on a
//! key across connections).
//!
//! Each test runs on one thread, so every request of a `join` is in the
//! shard's mailbox before the shard runs, in the order written: what the
//! shard answers shows the order in which it took them.

use deadbolt_core::proto::{
    Acquire, Granted, Keys, LockOp, MembersPage, Mode, Okay, Op, Outcome, Request, SetOp, Wait,
};
use deadbolt_core::{Engine, EngineConfig, Session};

/// Pages the flood sends, each of a whole page's cost (limit 10,000), so
/// that the shard serves one per turn.
const PAGES: usize = 64;

fn one_shard() -> Engine {
    Engine::start(EngineConfig {
        shards: 1,
        ..EngineConfig::new()
    })
}

async fn call(session: &Session, id: u64, op: Op) -> Outcome {
    session.execute(Request { id, op }).await.outcome
}

fn set_op(op: SetOp) -> Op {
    Op::Set(op)
}

fn whole_page(set: &str) -> Op {
    set_op(SetOp::Members {
        set: set.into(),
        after: 0,
        limit: 10_000,
    })
}

fn insert(set: &str, key: &str) -> Op {
    set_op(SetOp::Insert {
        set: set.into(),
        keys: Keys::One(key.into()),
    })
}

fn lock(key: &str) -> Op {
    Op::Lock(LockOp::Acquire(Acquire {
        key: key.into(),
        ttl_ms: 60_000,
        wait: Wait::Forever,
        ephemeral: false,
        mode: Mode::MUTEX,
        lock_delay_ms: 0,
        notify: false,
    }))
}

fn page(outcome: Outcome) -> MembersPage {
    match outcome {
        Ok(Okay::Members(page)) => page,
        other => panic!("expected a page, got {other:?}"),
    }
}

fn token(outcome: Outcome) -> u64 {
    match outcome {
        Ok(Okay::Granted(Granted { token, .. })) => token,
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn has(page: &MembersPage, key: &str) -> bool {
    page.members.iter().any(|m| m.key == key)
}

/// A set of 100 members.
async fn filled(session: &Session, set: &str) {
    let set_up = set_op(SetOp::SetUp {
        set: set.into(),
        ttl_ms: 60_000,
    });
    call(session, 1, set_up).await.expect("set_up");
    let keys = Keys::Many((0..100).map(|i| format!("k{i}")).collect());
    let fill = set_op(SetOp::Insert {
        set: set.into(),
        keys,
    });
    call(session, 2, fill).await.expect("insert");
}

#[tokio::test(flavor = "current_thread")]
async fn a_bystanders_insert_goes_ahead_of_another_connections_queued_pages() {
    let engine = one_shard();
    let (flood, bystander) = (engine.session(), engine.session());
    filled(&flood, "s").await;
    let pages = (0..PAGES as u64).map(|i| call(&flood, 100 + i, whole_page("s")));
    let late = call(&bystander, 1, insert("s", "late"));
    let (pages, late) = tokio::join!(futures_util::future::join_all(pages), late);
    assert!(late.is_ok(), "{late:?}");
    // In arrival order no page would hold the bystander's key: it came
    // after all of them. Taken first, at most the page already taken
    // misses it.
    let seen = pages.into_iter().filter(|p| has(&page(p.clone()), "late"));
    assert!(seen.count() >= PAGES - 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_connections_own_insert_waits_behind_its_pages_of_that_set() {
    let engine = one_shard();
    let flood = engine.session();
    filled(&flood, "s").await;
    let pages = (0..PAGES as u64).map(|i| call(&flood, 100 + i, whole_page("s")));
    let own = call(&flood, 1, insert("s", "own"));
    let (pages, own) = tokio::join!(futures_util::future::join_all(pages), own);
    assert!(own.is_ok(), "{own:?}");
    // Sent after every page, so no page may see it.
    assert!(pages.into_iter().all(|p| !has(&page(p), "own")));
    let after = call(&flood, 2, whole_page("s")).await;
    assert!(has(&page(after), "own"));
}

#[tokio::test(flavor = "current_thread")]
async fn waiters_on_a_key_keep_arrival_order_behind_a_flood_of_pages() {
    let engine = one_shard();
    let (holder, flood, bystander) = (engine.session(), engine.session(), engine.session());
    filled(&flood, "s").await;
    let held = token(call(&holder, 1, lock("k")).await);
    // The flooding connection waits for "k" after its pages, the bystander
    // after that: the flood's lock arrived first, so it is granted first.
    let pages = (0..PAGES as u64).map(|i| call(&flood, 100 + i, whole_page("s")));
    let flood_lock = async {
        let granted = token(call(&flood, 1, lock("k")).await);
        let unlock = Op::Lock(LockOp::Release {
            key: "k".into(),
            token: granted,
        });
        call(&flood, 2, unlock).await.expect("unlock");
        granted
    };
    let bystander_lock = async { token(call(&bystander, 1, lock("k")).await) };
    let release = async {
        // Both are queued once the holder's unlock is taken: it arrives
        // after them.
        let unlock = Op::Lock(LockOp::Release {
            key: "k".into(),
            token: held,
        });
        call(&holder, 2, unlock).await
    };
    let (_, first, second, released) = tokio::join!(
        futures_util::future::join_all(pages),
        flood_lock,
        bystander_lock,
        release
    );
    assert!(released.is_ok(), "{released:?}");
    assert!(
        first < second,
        "granted out of arrival order: {first} {second}"
    );
    // The bystander was granted only after the flood's holder let go.
    assert!(second > held && first > held);
}
