//! Hedged requests over QUIC, against a real server through a relay that
//! drops datagrams: a copy that races its original yields exactly one
//! outcome (one grant per lock, one owner per key, no `not_held` for an
//! unlock its copy already did), and copies stay within the budget.

use std::net::SocketAddr;
use std::time::Duration;

use deadbolt_core::client::{Client, ClientOptions, HedgeOptions};
use deadbolt_core::proto::{Acquire, LockOp, Okay, Op, Wait};
use deadbolt_core::{Engine, EngineConfig};
use deadbolt_transport_quic::{LossyRelay, QuicConfig, QuicConnector, Trust};

mod support;

use support::Server;

async fn start() -> Server {
    let engine = Engine::start(EngineConfig {
        shards: 2,
        ..EngineConfig::new()
    });
    support::serve(engine, QuicConfig::default())
}

/// A client of `server` sending to `to` (the server, or a relay to it).
async fn client(server: &Server, to: SocketAddr, hedging: Option<HedgeOptions>) -> Client {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let client_config = deadbolt_transport_quic::client_config(
        &Trust::CaPem(server.ca.clone()),
        &QuicConfig::default(),
    )
    .expect("client config");
    let connector = QuicConnector::new(endpoint, client_config, to, "localhost");
    let options = ClientOptions {
        hedging,
        ..ClientOptions::default()
    };
    tokio::time::timeout(Duration::from_secs(10), Client::connect(connector, options))
        .await
        .expect("connected within 10 s")
        .expect("connected")
}

/// A hedging client through a relay that drops `loss` of the datagrams
/// (connected before the loss starts).
async fn lossy_client(
    server: &Server,
    loss: f64,
    seed: u64,
    hedging: HedgeOptions,
) -> (Client, LossyRelay) {
    let relay = LossyRelay::start(server.addr, 0.0, seed)
        .await
        .expect("relay");
    let client = client(server, relay.addr(), Some(hedging)).await;
    relay.set_loss(loss);
    (client, relay)
}

fn lock(key: &str, wait: Wait) -> Op {
    Op::Lock(LockOp::Acquire(Acquire::mutex(key, 30_000, wait)))
}

fn token(reply: Okay) -> u64 {
    match reply {
        Okay::Granted(granted) => granted.token,
        other => panic!("not a grant: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_racing_its_original_yields_exactly_one_outcome() {
    let server = start().await;
    let observer = client(&server, server.addr, None).await;
    let (hedged, _relay) = lossy_client(&server, 0.2, 7, HedgeOptions::default()).await;
    let cycles = 150u64;
    for i in 0..cycles {
        let key = format!("cycle/{i}");
        let token = token(hedged.call(lock(&key, Wait::Never)).await.expect("lock"));
        let held = observer.inspect(&key).await.expect("inspect");
        assert_eq!(held.holder.map(|h| h.token), Some(token), "{key}");
        // An unlock done by one copy is `not_held` for the other: the
        // client must still answer that it unlocked.
        hedged.unlock(&key, token).await.expect("unlock");
    }
    let set = hedged.set("results");
    set.set_up(Duration::from_secs(60)).await.expect("set_up");
    for i in 0..cycles {
        let inserted = set.insert(&format!("key/{i}")).await.expect("insert");
        assert!(inserted.first, "the only inserter owns every key");
        assert_eq!(inserted.index, i + 1, "each key inserted once, in order");
    }
    let stats = observer.stats(1).await.expect("stats");
    assert_eq!(
        stats.locks.grants, cycles,
        "one grant per lock, copies or not"
    );
    assert_eq!(stats.locks.releases, cycles);
    assert_eq!((stats.locks.held, stats.locks.waiters), (0, 0));
    assert_eq!(stats.sets.members, cycles);
    let hedges = hedged.hedge_stats();
    assert!(hedges.sent > 0, "20 % loss and no copy sent: {hedges:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_lock_and_its_copy_are_granted_once() {
    let server = start().await;
    let holder = client(&server, server.addr, None).await;
    let (waiter, _relay) = lossy_client(&server, 0.2, 11, HedgeOptions::default()).await;
    let rounds = 30;
    for i in 0..rounds {
        let key = format!("turn/{i}");
        let first = token(holder.call(lock(&key, Wait::Never)).await.expect("lock"));
        let waiting = {
            let (waiter, key) = (waiter.clone(), key.clone());
            tokio::spawn(async move { waiter.call(lock(&key, Wait::Forever)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        holder.unlock(&key, first).await.expect("unlock");
        let second = token(waiting.await.expect("task").expect("granted"));
        assert!(second > first, "a new grant after the unlock");
        let info = holder.inspect(&key).await.expect("inspect");
        assert_eq!(info.holder.map(|h| h.token), Some(second));
        assert_eq!(info.waiters, 0, "no copy left waiting behind its own grant");
        waiter.unlock(&key, second).await.expect("unlock");
    }
    let stats = holder.stats(1).await.expect("stats");
    assert_eq!(stats.locks.grants, 2 * rounds);
    assert_eq!((stats.locks.held, stats.locks.waiters), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_stay_within_the_budget() {
    let server = start().await;
    let options = HedgeOptions {
        floor: Duration::from_millis(1),
        quantile: 0.5,
        budget: 0.05,
        burst: 2,
        ..HedgeOptions::default()
    };
    let (hedged, _relay) = lossy_client(&server, 0.3, 3, options).await;
    let requests = 200u64;
    for _ in 0..requests {
        hedged.ping().await.expect("ping");
    }
    let hedges = hedged.hedge_stats();
    // The budget starts full (2 copies) and each request adds 0.05.
    assert!(hedges.sent <= 2 + requests / 20, "{hedges:?}");
    assert!(
        hedges.over_budget > 0,
        "30 % loss never hit the budget: {hedges:?}"
    );
    assert!(hedges.won <= hedges.sent);
}
