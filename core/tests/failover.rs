//! Several servers and `unavailable`, over the in-process transport, on
//! virtual time: a client given several servers skips one that cannot be
//! reached, leaves one that answers `unavailable` for the next, and retries
//! `unavailable` on a single server until it serves again or the retry
//! budget runs out; lock renewal rides out a spell of `unavailable`; and a
//! `hello` answered `unavailable` is retried by `Client::connect` as well.
//!
//! The `unavailable` answers are the engine's own: its journal refuses
//! batches (as a full disk does), and the engine answers their requests
//! `unavailable` and changes nothing. (`bins/deadbolt/tests/failover.rs`
//! does the same with real servers, over real sockets and a real disk.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use deadbolt_core::auth::quota::Quotas;
use deadbolt_core::auth::{Auth, Policy, Principal};
use deadbolt_core::client::{
    Client, ClientOptions, Connector, FailoverConnector, LocalConnector, LockOptions,
};
use deadbolt_core::engine::{Append, Journal};
use deadbolt_core::proto::{ErrorCode, Secret, ServerError};
use deadbolt_core::shard::{Command, Input};
use deadbolt_core::{Engine, EngineConfig};
use tokio::time::Instant;

/// A journal that keeps every batch, or refuses every batch while shut.
#[derive(Default)]
struct Gate {
    shut: AtomicBool,
    /// Requests (not notices, such as a connection closing) refused.
    refused: AtomicUsize,
}

impl Gate {
    fn shut(&self) {
        self.shut.store(true, Ordering::SeqCst);
    }

    fn open(&self) {
        self.shut.store(false, Ordering::SeqCst);
    }

    /// Opens the gate `after` from now, in the background.
    fn open_after(self: &Arc<Self>, after: Duration) {
        let gate = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            gate.open();
        });
    }

    fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Journal for Gate {
    fn append(&self, _shard: usize, _number: u64, commands: &[Command]) -> Append {
        if self.shut.load(Ordering::SeqCst) {
            let requests = commands
                .iter()
                .filter(|c| matches!(c.input, Input::Op { .. }))
                .count();
            self.refused.fetch_add(requests, Ordering::SeqCst);
            let refused = ServerError::unavailable("the test's journal is shut");
            return Box::pin(std::future::ready(Err(refused)));
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

/// An engine whose journal is `gate`.
fn engine_behind(gate: &Arc<Gate>) -> Engine {
    Engine::start(EngineConfig {
        shards: 2,
        journal: Some(Arc::clone(gate) as Arc<dyn Journal>),
        ..EngineConfig::new()
    })
}

fn engine() -> Engine {
    Engine::start(EngineConfig {
        shards: 2,
        ..EngineConfig::new()
    })
}

fn local(engine: &Engine) -> Arc<dyn Connector> {
    Arc::new(LocalConnector::new(engine.clone()))
}

fn failover(engines: &[&Engine]) -> FailoverConnector {
    FailoverConnector::new(engines.iter().map(|e| local(e)).collect()).expect("servers")
}

fn options(retry_for: Duration) -> ClientOptions {
    ClientOptions {
        client_id: Some("failing-over".to_owned()),
        retry_for,
        ..ClientOptions::default()
    }
}

/// Another client of `engine`, to look at what it holds.
async fn observer(engine: &Engine) -> Client {
    Client::connect(LocalConnector::new(engine.clone()), options(Duration::ZERO))
        .await
        .expect("observer connects")
}

#[test]
fn an_empty_server_list_is_refused() {
    assert!(FailoverConnector::new(Vec::new()).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_server_that_cannot_be_reached_is_skipped() {
    let (down, up) = (engine(), engine());
    down.shutdown().await;
    let connector = failover(&[&down, &up]);
    let client = Client::connect(connector, options(Duration::from_secs(5)))
        .await
        .expect("the second server answers");
    let guard = client
        .lock("k", Duration::from_secs(10))
        .await
        .expect("lock");
    let holder = observer(&up).await.inspect("k").await.expect("inspect");
    assert_eq!(
        holder.holder.map(|h| (h.client, h.token)),
        Some(("failing-over".to_owned(), guard.token()))
    );
}

#[tokio::test(start_paused = true)]
async fn when_no_server_can_be_reached_the_connect_fails_naming_each() {
    let (a, b) = (engine(), engine());
    a.shutdown().await;
    b.shutdown().await;
    let error = Client::connect(failover(&[&a, &b]), options(Duration::from_secs(5)))
        .await
        .expect_err("nobody answers");
    let message = error.to_string();
    assert_eq!(
        message
            .matches("local engine: the engine is shutting down")
            .count(),
        2,
        "{message}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_server_that_answers_unavailable_is_left_for_the_next_with_the_same_client_id() {
    let gate = Arc::new(Gate::default());
    let (refusing, serving) = (engine_behind(&gate), engine());
    let client = Client::connect(
        failover(&[&refusing, &serving]),
        options(Duration::from_secs(5)),
    )
    .await
    .expect("connects to the first server");
    gate.shut();
    let set = client.set("s");
    set.set_up(Duration::from_secs(60))
        .await
        .expect("set up on the second server");
    let inserted = set.insert("x").await.expect("insert");
    assert!(inserted.first);
    assert_eq!(gate.refused(), 1, "the first server was asked once");
    let guard = client
        .lock("k", Duration::from_secs(10))
        .await
        .expect("lock");
    let seen = observer(&serving)
        .await
        .inspect("k")
        .await
        .expect("inspect");
    assert_eq!(
        seen.holder.map(|h| (h.client, h.token)),
        Some(("failing-over".to_owned(), guard.token())),
        "the second server knows the client by the same id"
    );
    // The refused request changed nothing on the first server.
    gate.open();
    let first = observer(&refusing).await;
    assert_eq!(
        first.set("s").inspect().await.map_err(|e| e.code()),
        Err(Some(ErrorCode::NoSuchSet))
    );
}

#[tokio::test(start_paused = true)]
async fn unavailable_is_retried_on_one_server_until_it_serves_again() {
    let gate = Arc::new(Gate::default());
    let server = engine_behind(&gate);
    let client = Client::connect(
        LocalConnector::new(server.clone()),
        options(Duration::from_secs(5)),
    )
    .await
    .expect("connect");
    gate.shut();
    gate.open_after(Duration::from_millis(700));
    let started = Instant::now();
    let guard = client
        .lock("k", Duration::from_secs(10))
        .await
        .expect("lock");
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert!(gate.refused() >= 2, "refused {} times", gate.refused());
    assert!(guard.is_held());
    guard.unlock().await.expect("unlock");
}

#[tokio::test(start_paused = true)]
async fn unavailable_past_the_retry_budget_is_the_answer() {
    let gate = Arc::new(Gate::default());
    let server = engine_behind(&gate);
    let client = Client::connect(
        LocalConnector::new(server.clone()),
        options(Duration::from_secs(2)),
    )
    .await
    .expect("connect");
    gate.shut();
    let started = Instant::now();
    let refused = client.set("s").set_up(Duration::from_secs(60)).await;
    assert_eq!(
        refused.map_err(|e| e.code()),
        Err(Some(ErrorCode::Unavailable))
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn renewal_rides_out_unavailable_shorter_than_the_lease_view() {
    let gate = Arc::new(Gate::default());
    let server = engine_behind(&gate);
    let client = Client::connect(
        LocalConnector::new(server.clone()),
        options(Duration::from_secs(30)),
    )
    .await
    .expect("connect");
    let options = LockOptions::new(Duration::from_secs(3)).auto_renew(true);
    let guard = client
        .lock_with("k", options)
        .await
        .expect("lock")
        .expect("granted");
    // Renewal is due at 1 s; the server refuses from 0.5 s to 2.4 s, within
    // the lease view (about 2.97 s).
    tokio::time::sleep(Duration::from_millis(500)).await;
    gate.shut();
    gate.open_after(Duration::from_millis(1_900));
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    assert!(guard.is_held(), "refused renewals are not a loss yet");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(gate.refused() >= 2, "refused {} times", gate.refused());
    assert!(guard.is_held(), "renewed once the server served again");
    let seen = observer(&server).await.inspect("k").await.expect("inspect");
    assert_eq!(seen.holder.map(|h| h.token), Some(guard.token()));
    guard.unlock().await.expect("unlock");
}

#[tokio::test(start_paused = true)]
async fn renewal_refused_past_the_lease_view_reports_the_lock_lost_then_and_not_before() {
    let gate = Arc::new(Gate::default());
    let server = engine_behind(&gate);
    let client = Client::connect(
        LocalConnector::new(server.clone()),
        options(Duration::from_secs(30)),
    )
    .await
    .expect("connect");
    let options = LockOptions::new(Duration::from_secs(3)).auto_renew(true);
    let started = Instant::now();
    let guard = client
        .lock_with("k", options)
        .await
        .expect("lock")
        .expect("granted");
    gate.shut();
    guard.lost().await;
    let lost_at = started.elapsed();
    // The view was 3 s less the drift margin (32 ms), from the send.
    assert!(
        lost_at >= Duration::from_millis(2_960) && lost_at <= Duration::from_secs(3),
        "{lost_at:?}"
    );
}

/// An engine whose journal is `gate` and whose one principal, `worker`,
/// says `hello` with the secret `s3cret`: its `hello` claims the client id
/// through a shard, so a shut gate answers it `unavailable`, as a cluster
/// node between leaders does.
fn authenticating_engine_behind(gate: &Arc<Gate>) -> Engine {
    let principal = Principal {
        name: "worker".to_owned(),
        secret: Secret::new("s3cret"),
        locks: vec![String::new()],
        sets: vec![String::new()],
        read: vec![String::new()],
        admin: false,
        quotas: Quotas::default(),
    };
    let policy = Policy::new(vec![principal]).expect("a policy");
    Engine::start(EngineConfig {
        shards: 2,
        journal: Some(Arc::clone(gate) as Arc<dyn Journal>),
        auth: Some(Arc::new(Auth::new(policy))),
        ..EngineConfig::new()
    })
}

fn worker_options(retry_for: Duration) -> ClientOptions {
    ClientOptions {
        auth: Some(Secret::new("s3cret")),
        ..options(retry_for)
    }
}

#[tokio::test(start_paused = true)]
async fn a_hello_answered_unavailable_is_retried_until_the_server_serves() {
    let gate = Arc::new(Gate::default());
    let server = authenticating_engine_behind(&gate);
    gate.shut();
    gate.open_after(Duration::from_millis(700));
    let started = Instant::now();
    let client = Client::connect(
        LocalConnector::new(server),
        worker_options(Duration::from_secs(5)),
    )
    .await
    .expect("connects once the server serves");
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert!(
        gate.refused() >= 2,
        "hello refused {} times",
        gate.refused()
    );
    let guard = client
        .lock("k", Duration::from_secs(10))
        .await
        .expect("lock");
    assert!(guard.is_held());
}

#[tokio::test(start_paused = true)]
async fn a_hello_answered_unavailable_past_the_retry_budget_is_the_answer() {
    let gate = Arc::new(Gate::default());
    let server = authenticating_engine_behind(&gate);
    gate.shut();
    let started = Instant::now();
    let refused = Client::connect(
        LocalConnector::new(server),
        worker_options(Duration::from_secs(2)),
    )
    .await;
    assert_eq!(
        refused.err().and_then(|e| e.code()),
        Some(ErrorCode::Unavailable)
    );
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2), "gave up after {waited:?}");
    assert!(waited < Duration::from_secs(4), "gave up after {waited:?}");
}
