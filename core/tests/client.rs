//! The transport-agnostic client, over the in-process transport: guards,
//! lease views, renewal and distinct-set handles. (The same client runs over
//! WebSocket and QUIC in those crates' tests.)

use std::time::Duration;

use deadbolt_core::client::{Client, ClientOptions, LocalConnector, LockOptions};
use deadbolt_core::proto::{ErrorCode, Inserted};
use deadbolt_core::{Engine, EngineConfig};
use futures_util::TryStreamExt;
use tokio::time::Instant;

async fn setup() -> (Engine, Client, Client) {
    let engine = Engine::start(EngineConfig {
        shards: 2,
        ..EngineConfig::new()
    });
    let a = Client::connect(
        LocalConnector::new(engine.clone()),
        ClientOptions::default(),
    )
    .await
    .expect("connect");
    let b = Client::connect(
        LocalConnector::new(engine.clone()),
        ClientOptions::default(),
    )
    .await
    .expect("connect");
    (engine, a, b)
}

#[tokio::test(start_paused = true)]
async fn a_guard_carries_its_token_and_a_lease_view_no_longer_than_the_lease() {
    let (_engine, a, _) = setup().await;
    let guard = a.lock("k", Duration::from_secs(10)).await.unwrap();
    assert!(guard.token() > 0);
    let valid = guard.valid_for();
    assert!(
        valid <= Duration::from_secs(10) - Duration::from_millis(100),
        "{valid:?}"
    );
    assert!(valid >= Duration::from_millis(9_800), "{valid:?}");
    guard.unlock().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn try_lock_gives_none_when_held_and_lock_timeout_gives_none_after_the_wait() {
    let (_engine, a, b) = setup().await;
    let _held = a.lock("k", Duration::from_secs(10)).await.unwrap();
    assert!(
        b.try_lock("k", Duration::from_secs(1))
            .await
            .unwrap()
            .is_none()
    );
    let started = Instant::now();
    assert!(
        b.lock_timeout("k", Duration::from_secs(1), Duration::from_millis(300))
            .await
            .unwrap()
            .is_none()
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn a_grant_after_a_long_wait_is_re_anchored_so_the_view_covers_the_lease() {
    let (_engine, a, b) = setup().await;
    a.lock("k", Duration::from_secs(5)).await.unwrap();
    // Never unlocked: b is granted when a's lease ends, 5 s after b asked
    // for a 6 s lease. Anchored at the send, b would see 1 s; re-anchored
    // with an extend, it sees nearly 6.
    let guard = b.lock("k", Duration::from_secs(6)).await.unwrap();
    assert!(
        guard.valid_for() > Duration::from_millis(5_800),
        "{:?}",
        guard.valid_for()
    );
}

#[tokio::test(start_paused = true)]
async fn a_grant_that_expired_before_it_could_be_re_anchored_is_asked_for_again() {
    let (_engine, a, b) = setup().await;
    a.lock("k", Duration::from_secs(5)).await.unwrap().detach(); // a never unlocks
    let guard = b.lock("k", Duration::from_millis(1)).await.unwrap();
    assert!(guard.token() > 0);
}

#[tokio::test(start_paused = true)]
async fn without_renewal_the_guard_reports_the_lock_lost_when_the_lease_view_ends() {
    let (_engine, a, _) = setup().await;
    let guard = a.lock("k", Duration::from_secs(1)).await.unwrap();
    let started = Instant::now();
    guard.lost().await;
    assert!(started.elapsed() <= Duration::from_secs(1));
    assert!(!guard.is_held());
}

#[tokio::test(start_paused = true)]
async fn auto_renewal_keeps_the_lock_past_its_lease_until_the_guard_is_released() {
    let (_engine, a, b) = setup().await;
    let options = LockOptions::new(Duration::from_secs(1)).auto_renew(true);
    let guard = a.lock_with("k", options).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(guard.is_held());
    assert_eq!(
        b.inspect("k").await.unwrap().holder.map(|h| h.token),
        Some(guard.token())
    );
    guard.unlock().await.unwrap();
    assert_eq!(b.inspect("k").await.unwrap().holder, None);
    // Renewal stopped with the guard: nothing holds the key a lease later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(b.inspect("k").await.unwrap().holder, None);
}

#[tokio::test(start_paused = true)]
async fn renewal_stops_the_moment_the_guard_is_dropped() {
    let (_engine, a, b) = setup().await;
    let options = LockOptions::new(Duration::from_secs(1)).auto_renew(true);
    let guard = a.lock_with("k", options).await.unwrap().unwrap();
    let token = guard.token();
    drop(guard);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        b.inspect("k").await.unwrap().holder,
        None,
        "dropped guards unlock"
    );
    let next = b.lock("k", Duration::from_secs(1)).await.unwrap();
    assert!(next.token() > token);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        a.inspect("k").await.unwrap().holder,
        None,
        "no stale renewal of a new grant"
    );
}

#[tokio::test(start_paused = true)]
async fn locking_again_right_after_dropping_a_guard_is_not_undone_by_its_late_release() {
    let (_engine, a, b) = setup().await;
    let dropped = a.lock("k", Duration::from_secs(10)).await.unwrap();
    let first = dropped.token();
    drop(dropped); // releases in the background
    let again = a.lock("k", Duration::from_secs(10)).await.unwrap();
    assert!(
        again.token() > first,
        "a new grant, not a re-lock of the old"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        b.inspect("k").await.unwrap().holder.map(|h| h.token),
        Some(again.token()),
        "the late release of the dropped guard left the new grant alone"
    );
}

#[tokio::test(start_paused = true)]
async fn renewal_that_finds_the_grant_gone_reports_the_lock_lost() {
    let (_engine, a, b) = setup().await;
    let options = LockOptions::new(Duration::from_secs(3)).auto_renew(true);
    let guard = a.lock_with("k", options).await.unwrap().unwrap();
    b.unlock("k", guard.token()).await.unwrap(); // someone else ends it
    tokio::time::timeout(Duration::from_secs(3), guard.lost())
        .await
        .expect("lost in time");
    assert!(!guard.is_held());
}

#[tokio::test(start_paused = true)]
async fn unlock_after_the_lease_ran_out_reports_not_held() {
    let (_engine, a, _) = setup().await;
    let guard = a.lock("k", Duration::from_millis(100)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        guard.unlock().await.unwrap_err().code(),
        Some(ErrorCode::NotHeld)
    );
}

#[tokio::test(start_paused = true)]
async fn guard_extend_restarts_the_lease_and_the_view() {
    let (_engine, a, b) = setup().await;
    let guard = a.lock("k", Duration::from_millis(500)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    guard.extend(Duration::from_secs(2)).await.unwrap();
    assert!(guard.valid_for() > Duration::from_millis(1_900));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(b.inspect("k").await.unwrap().holder.is_some());
}

#[tokio::test(start_paused = true)]
async fn an_explicit_extend_sets_the_period_the_renewer_keeps_from_then_on() {
    let (_engine, a, b) = setup().await;
    let options = LockOptions::new(Duration::from_secs(30)).auto_renew(true);
    let guard = a.lock_with("k", options).await.unwrap().unwrap();
    guard.extend(Duration::from_secs(1)).await.unwrap();
    assert!(
        guard.valid_for() <= Duration::from_secs(1),
        "the view follows the shorter lease: {:?}",
        guard.valid_for()
    );
    // Renewed every third of the new, 1 s lease: held long past it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(guard.is_held());
    let holder = b.inspect("k").await.unwrap().holder.expect("still held");
    assert!(holder.remaining_ms <= 1_000, "{holder:?}");
    drop(guard);
}

#[tokio::test]
async fn a_distinct_set_tells_first_to_one_client_and_the_same_index_to_all() {
    let (_engine, a, b) = setup().await;
    let (sa, sb) = (a.set("results"), b.set("results"));
    assert!(sa.set_up(Duration::from_secs(60)).await.unwrap().created);
    assert!(!sb.set_up(Duration::from_secs(60)).await.unwrap().created);
    assert_eq!(
        sa.insert("r1").await.unwrap(),
        Inserted {
            index: 1,
            first: true
        }
    );
    assert_eq!(
        sb.insert("r1").await.unwrap(),
        Inserted {
            index: 1,
            first: false
        }
    );
    assert_eq!(
        sa.insert("r1").await.unwrap(),
        Inserted {
            index: 1,
            first: true
        },
        "a retry"
    );
    assert_eq!(sa.inspect().await.unwrap().size, 1);
    assert_eq!(sa.tear_down().await.unwrap(), Some(1));
    assert_eq!(sa.tear_down().await.unwrap(), None);
    assert_eq!(
        sa.insert("r1").await.unwrap_err().code(),
        Some(ErrorCode::NoSuchSet)
    );
}

#[tokio::test]
async fn insert_many_batches_in_order_and_members_streams_every_page() {
    let (_engine, a, b) = setup().await;
    let set = a.set("big");
    set.set_up(Duration::from_secs(60)).await.unwrap();
    b.set("big").insert("key-1500").await.unwrap();
    let keys: Vec<String> = (0..2500).map(|i| format!("key-{i}")).collect();
    let results = set.insert_many(keys.clone()).await.unwrap();
    assert_eq!(results.len(), 2500);
    assert_eq!(
        results[0],
        Inserted {
            index: 2,
            first: true
        }
    );
    assert_eq!(
        results[1500],
        Inserted {
            index: 1,
            first: false
        }
    );
    let members: Vec<_> = set.members().try_collect().await.unwrap();
    assert_eq!(members.len(), 2500);
    assert!(members.windows(2).all(|w| w[0].index + 1 == w[1].index));
    assert_eq!(members[0].key, "key-1500");
}
