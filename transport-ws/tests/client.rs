//! The Rust client's reconnect-and-retry over real WebSocket connections,
//! through a relay that loses replies and drops connections. (The client's
//! behaviour over both transports is the suite in
//! `bins/deadbolt/tests/transports.rs`.)

mod support;

use std::future::Future;
use std::time::Duration;

use deadbolt_core::client::{Client, ClientOptions};
use deadbolt_core::proto::{Acquire, Granted, Inserted, LockOp, Mode, Okay, Op, Wait};
use deadbolt_transport_ws::WsConnector;
use serde_json::json;
use support::TestServer;
use support::proxy::Proxy;

/// How long any one step may take before the test fails instead of
/// hanging: far above what a loaded machine needs.
const STEP: Duration = Duration::from_secs(10);

/// `step`, or a failure naming `what` if it takes longer than [`STEP`].
async fn within<T>(what: &str, step: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, step)
        .await
        .unwrap_or_else(|_| panic!("not within {STEP:?}: {what}"))
}

/// Asks `condition` again until it holds, for at most [`STEP`].
async fn until(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    within(what, async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

async fn through(proxy: &Proxy) -> Client {
    let connector = WsConnector::new(&proxy.url).expect("url");
    within(
        "connect through the proxy",
        Client::connect(connector, ClientOptions::default()),
    )
    .await
    .expect("connect")
}

/// The key's holder as another client sees it: (client id, token).
async fn holder(observer: &Client, key: &str) -> Option<(String, u64)> {
    let info = within("inspect", observer.inspect(key))
        .await
        .expect("inspect");
    info.holder.map(|h| (h.client, h.token))
}

#[tokio::test]
async fn a_lost_insert_reply_is_retried_on_a_new_connection_and_keeps_first() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let worker = through(&proxy).await;
    let rival = server.client().await;
    let set = worker.set("results");
    set.set_up(Duration::from_secs(60)).await.expect("set_up");
    proxy.swallow_replies(true);
    let insert = tokio::spawn({
        let set = set.clone();
        async move { set.insert("r").await }
    });
    let mut watcher = server.raw().await;
    until("the worker's insert reaches the server", async || {
        let reply = watcher
            .call(json!({"id": 1, "op": "inspect_set", "set": "results"}))
            .await;
        reply["ok"]["size"] == 1
    })
    .await;
    // The worker's insert was applied; its reply is lost. The rival comes
    // second, and is told so.
    assert_eq!(
        rival.set("results").insert("r").await.expect("rival"),
        Inserted {
            index: 1,
            first: false
        }
    );
    proxy.swallow_replies(false);
    proxy.cut_all();
    let retried = within("the insert is retried", insert)
        .await
        .expect("task")
        .expect("retried insert");
    assert_eq!(
        retried,
        Inserted {
            index: 1,
            first: true
        },
        "the key is never left unowned"
    );
}

#[tokio::test]
async fn a_lost_lock_reply_is_retried_and_keeps_its_grant() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let worker = through(&proxy).await;
    proxy.swallow_replies(true);
    let lock = tokio::spawn({
        let worker = worker.clone();
        async move {
            worker.lock("k", Duration::from_secs(30)).await.map(|g| {
                let token = g.token();
                std::mem::forget(g);
                token
            })
        }
    });
    let observer = server.client().await;
    let mut granted = None;
    until("the worker's lock is granted", async || {
        granted = holder(&observer, "k").await;
        granted.is_some()
    })
    .await;
    let (client, token) = granted.expect("granted");
    assert_eq!(client, worker.client_id(), "granted to the worker");
    proxy.swallow_replies(false);
    proxy.cut_all();
    let retried = within("the lock is retried", lock)
        .await
        .expect("task")
        .expect("retried lock");
    assert_eq!(retried, token, "the retry returns the grant it had");
    assert_eq!(
        holder(&observer, "k").await,
        Some((worker.client_id().to_owned(), token)),
        "still the worker's one grant"
    );
}

#[tokio::test]
async fn the_client_reconnects_after_its_connection_is_cut() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let observer = server.client().await;
    let client = through(&proxy).await;
    let me = client.client_id().to_owned();
    let ttl = Duration::from_secs(30);
    let first = within("lock", client.lock("k", ttl)).await.expect("lock");
    assert_eq!(proxy.accepted(), 1);
    proxy.cut_all();
    tokio::time::sleep(Duration::from_millis(50)).await;
    within("ping after the cut", client.ping())
        .await
        .expect("ping after reconnect");
    assert_eq!(proxy.accepted(), 2, "the ping went over a new connection");
    // The new connection says the same client id, so the grant made on the
    // old one is still this client's, and a retried lock returns it.
    assert_eq!(
        holder(&observer, "k").await,
        Some((me.clone(), first.token())),
        "still this client's grant after the reconnect"
    );
    let retry = Op::Lock(LockOp::Acquire(Acquire {
        key: "k".into(),
        ttl_ms: 30_000,
        wait: Wait::from_wait_ms(Some(0)),
        ephemeral: false,
        mode: Mode::MUTEX,
        lock_delay_ms: 0,
        notify: false,
    }));
    match within("retried lock", client.call(retry)).await {
        Ok(Okay::Granted(Granted { token, .. })) => {
            assert_eq!(token, first.token(), "a retried lock: the same grant");
        }
        other => panic!("the holder's retry is granted, not {other:?}"),
    }
    let held = first.token();
    within("unlock", first.unlock()).await.expect("unlock");
    assert_eq!(holder(&observer, "k").await, None);
    let later = within("lock again", client.lock("k", ttl))
        .await
        .expect("lock again");
    assert!(
        later.token() > held,
        "a later grant, {}, above {held}",
        later.token()
    );
    assert_eq!(holder(&observer, "k").await, Some((me, later.token())));
}

#[tokio::test]
async fn a_server_that_is_not_there_is_a_connect_error_not_a_hang() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let connector = WsConnector::new(&format!("ws://{addr}/ws")).expect("url");
    let options = ClientOptions {
        retry_for: Duration::from_millis(200),
        ..ClientOptions::default()
    };
    let error = within("a refused connect", Client::connect(connector, options))
        .await
        .expect_err("nothing listens");
    assert!(error.to_string().contains("cannot connect"), "{error}");
}

#[tokio::test]
async fn a_wait_longer_than_the_retry_budget_is_still_retried_after_a_cut() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let observer = server.client().await;
    let guard = within("lock", observer.lock("k", Duration::from_secs(30)))
        .await
        .expect("lock");
    let retry_for = Duration::from_millis(300);
    let options = ClientOptions {
        retry_for,
        ..ClientOptions::default()
    };
    let connector = WsConnector::new(&proxy.url).expect("url");
    let waiter = within("connect", Client::connect(connector, options))
        .await
        .expect("connect");
    let waiter_id = waiter.client_id().to_owned();
    let waiting = tokio::spawn(async move { waiter.lock("k", Duration::from_secs(30)).await });
    let waiters = async || {
        within("inspect", observer.inspect("k"))
            .await
            .expect("inspect")
            .waiters
    };
    until("the waiter queues", async || waiters().await == 1).await;
    // The wait outlasts the retry budget (a sleep can only be longer than
    // asked); then its connection is cut.
    tokio::time::sleep(2 * retry_for).await;
    proxy.cut_all();
    until("the waiter reconnects", async || proxy.accepted() == 2).await;
    until("the waiter queues again", async || waiters().await == 1).await;
    let held = guard.token();
    within("unlock", guard.unlock()).await.expect("unlock");
    let granted = within("the retried lock is granted", waiting)
        .await
        .expect("task")
        .expect("the lock was retried on a new connection");
    assert!(
        granted.token() > held,
        "a later grant, {}, above {held}",
        granted.token()
    );
    assert_eq!(
        holder(&observer, "k").await,
        Some((waiter_id, granted.token())),
        "the waiter holds it"
    );
}
