//! The Rust client's reconnect-and-retry over real WebSocket connections,
//! through a relay that loses replies and drops connections. (The client's
//! behaviour over both transports is the suite in
//! `bins/deadbolt/tests/transports.rs`.)

mod support;

use std::time::Duration;

use deadbolt_core::client::{Client, ClientOptions};
use deadbolt_core::proto::Inserted;
use deadbolt_transport_ws::WsConnector;
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
async fn a_wait_longer_than_the_retry_budget_is_still_retried_after_a_cut() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let holder = server.client().await;
    let guard = holder
        .lock("k", Duration::from_secs(30))
        .await
        .expect("lock");
    let options = ClientOptions {
        retry_for: Duration::from_millis(300),
        ..ClientOptions::default()
    };
    let connector = WsConnector::new(&proxy.url).expect("url");
    let waiter = Client::connect(connector, options).await.expect("connect");
    let waiting = tokio::spawn(async move {
        waiter
            .lock("k", Duration::from_secs(30))
            .await
            .map(|g| g.token())
    });
    // The wait outlasts the retry budget; then its connection is cut.
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.cut_all();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held = guard.token();
    guard.unlock().await.expect("unlock");
    let token = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("granted in time")
        .expect("task")
        .expect("the lock was retried on a new connection");
    assert!(token > held);
}
