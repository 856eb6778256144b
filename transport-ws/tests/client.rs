//! The Rust client over real WebSocket connections: guards, renewal, sets,
//! and reconnect-and-retry through a relay that loses replies and drops
//! connections.

mod support;

use std::time::Duration;

use deadbolt_core::client::{Client, ClientOptions, LockOptions};
use deadbolt_core::proto::{ErrorCode, Inserted};
use deadbolt_transport_ws::WsConnector;
use futures_util::TryStreamExt;
use serde_json::json;
use support::TestServer;
use support::proxy::Proxy;

async fn through(proxy: &Proxy) -> Client {
    let connector = WsConnector::new(&proxy.url).expect("url");
    Client::connect(connector, ClientOptions::default())
        .await
        .expect("connect")
}

#[tokio::test]
async fn lock_try_lock_and_lock_timeout_over_websocket() {
    let server = TestServer::start().await;
    let (a, b) = (server.client().await, server.client().await);
    let guard = a.lock("k", Duration::from_secs(10)).await.expect("lock");
    assert!(
        b.try_lock("k", Duration::from_secs(1))
            .await
            .expect("try")
            .is_none()
    );
    let waited = b
        .lock_timeout("k", Duration::from_secs(1), Duration::from_millis(200))
        .await
        .expect("wait");
    assert!(waited.is_none());
    let token = guard.token();
    guard.unlock().await.expect("unlock");
    let next = b
        .try_lock("k", Duration::from_secs(1))
        .await
        .expect("try")
        .expect("free now");
    assert!(next.token() > token);
}

#[tokio::test]
async fn a_waiting_lock_is_granted_when_the_holder_unlocks() {
    let server = TestServer::start().await;
    let (a, b) = (server.client().await, server.client().await);
    let guard = a.lock("k", Duration::from_secs(10)).await.expect("lock");
    let waiting = tokio::spawn(async move {
        b.lock("k", Duration::from_secs(10))
            .await
            .map(|g| g.token())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let held = guard.token();
    guard.unlock().await.expect("unlock");
    assert!(waiting.await.expect("task").expect("granted") > held);
}

#[tokio::test]
async fn dropping_a_waiting_lock_call_cancels_it_on_the_server() {
    let server = TestServer::start().await;
    let (a, b) = (server.client().await, server.client().await);
    let guard = a.lock("k", Duration::from_secs(10)).await.expect("lock");
    let waiting = b.lock_timeout("k", Duration::from_secs(1), Duration::from_secs(30));
    assert!(
        tokio::time::timeout(Duration::from_millis(200), waiting)
            .await
            .is_err()
    );
    let mut waiters = 1;
    for _ in 0..100 {
        waiters = a.inspect("k").await.expect("inspect").waiters;
        if waiters == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(waiters, 0, "the cancel took the waiter out");
    drop(guard);
}

#[tokio::test]
async fn auto_renewal_over_websocket_keeps_a_short_lease_alive() {
    let server = TestServer::start().await;
    let (a, b) = (server.client().await, server.client().await);
    let options = LockOptions::new(Duration::from_millis(300)).auto_renew(true);
    let guard = a
        .lock_with("k", options)
        .await
        .expect("lock")
        .expect("granted");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(guard.is_held());
    assert!(
        b.try_lock("k", Duration::from_secs(1))
            .await
            .expect("try")
            .is_none()
    );
    guard.unlock().await.expect("unlock");
    assert!(
        b.try_lock("k", Duration::from_secs(1))
            .await
            .expect("try")
            .is_some()
    );
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
    while watcher
        .call(json!({"id": 1, "op": "inspect_set", "set": "results"}))
        .await["ok"]["size"]
        != 1
    {}
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
    let retried = insert.await.expect("task").expect("retried insert");
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
    let token = loop {
        if let Some(holder) = observer.inspect("k").await.expect("inspect").holder {
            break holder.token;
        }
    };
    proxy.swallow_replies(false);
    proxy.cut_all();
    assert_eq!(lock.await.expect("task").expect("retried lock"), token);
    let info = observer.inspect("k").await.expect("inspect");
    assert_eq!(
        info.holder.map(|h| h.client),
        Some(worker.client_id().to_owned())
    );
}

#[tokio::test]
async fn the_client_reconnects_after_its_connection_is_cut() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let client = through(&proxy).await;
    client.ping().await.expect("ping");
    proxy.cut_all();
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.ping().await.expect("ping after reconnect");
    let guard = client
        .lock("k", Duration::from_secs(5))
        .await
        .expect("lock");
    assert!(guard.token() > 0);
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
    let error = Client::connect(connector, options)
        .await
        .expect_err("nothing listens");
    assert!(error.to_string().contains("cannot connect"), "{error}");
}

#[tokio::test]
async fn sets_stream_their_members_over_websocket() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let set = client.set("s");
    set.set_up(Duration::from_secs(60)).await.expect("set_up");
    let keys: Vec<String> = (0..2500).map(|i| format!("k{i}")).collect();
    let results = set.insert_many(keys.clone()).await.expect("insert_many");
    assert!(
        results
            .iter()
            .enumerate()
            .all(|(i, r)| r.index == i as u64 + 1 && r.first)
    );
    let members: Vec<_> = set.members().try_collect().await.expect("members");
    assert_eq!(
        members.iter().map(|m| m.key.clone()).collect::<Vec<_>>(),
        keys
    );
    assert_eq!(set.tear_down().await.expect("tear_down"), Some(2500));
    assert_eq!(
        set.insert("x").await.expect_err("gone").code(),
        Some(ErrorCode::NoSuchSet)
    );
}
