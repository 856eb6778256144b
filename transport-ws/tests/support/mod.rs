//! A real server on a loopback port, and a raw WebSocket client that speaks
//! JSON by hand.

#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use deadbolt_core::client::{Client, ClientOptions};
use deadbolt_core::{Engine, EngineConfig, Limits};
use deadbolt_transport_ws::{WsConfig, WsConnector, serve};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;

pub mod proxy;
use tokio_tungstenite::tungstenite::Message;

pub struct TestServer {
    pub addr: SocketAddr,
    pub url: String,
    pub engine: Engine,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::with(Limits::default(), WsConfig::default()).await
    }

    pub async fn with(limits: Limits, config: WsConfig) -> TestServer {
        let engine = Engine::start(EngineConfig {
            shards: 2,
            limits,
            ..EngineConfig::new()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(serve(listener, engine.clone(), config, shutdown));
        TestServer {
            addr,
            url: format!("ws://{addr}/ws"),
            engine,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn client(&self) -> Client {
        self.client_with(ClientOptions::default()).await
    }

    pub async fn client_with(&self, options: ClientOptions) -> Client {
        let connector = WsConnector::new(&self.url).expect("url");
        Client::connect(connector, options).await.expect("connect")
    }

    pub async fn raw(&self) -> Raw {
        Raw::connect(&self.url).await
    }

    /// Stops the server and waits for it to finish.
    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server result");
        }
    }
}

pub type Ws = WebSocketStream<TcpStream>;

/// A hand-driven WebSocket client.
pub struct Raw {
    pub ws: Ws,
}

impl Raw {
    pub async fn connect(url: &str) -> Raw {
        let stream = TcpStream::connect(url.trim_start_matches("ws://").trim_end_matches("/ws"))
            .await
            .expect("tcp");
        let (ws, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("handshake");
        Raw { ws }
    }

    pub async fn send(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_owned().into()))
            .await
            .expect("send");
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send(&value.to_string()).await;
    }

    /// The next text frame as JSON (skipping pings), within 5 s.
    pub async fn recv(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(5), self.ws.next())
                .await
                .expect("a reply within 5 s")
                .expect("connection open")
                .expect("frame");
            match frame {
                Message::Text(text) => return serde_json::from_str(&text).expect("JSON reply"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Sends a request and waits for the reply with its id.
    pub async fn call(&mut self, request: Value) -> Value {
        let id = request["id"].clone();
        self.send_json(request).await;
        let reply = self.recv().await;
        assert_eq!(reply["id"], id, "reply {reply}");
        reply
    }

    pub async fn hello(&mut self, client: &str) {
        let reply = self
            .call(json!({"id": 0, "op": "hello", "client": client}))
            .await;
        assert_eq!(reply["ok"]["client"], client);
    }

    pub async fn lock(&mut self, id: u64, key: &str, ttl_ms: u64) -> u64 {
        let reply = self
            .call(json!({"id": id, "op": "lock", "key": key, "ttl_ms": ttl_ms}))
            .await;
        reply["ok"]["token"]
            .as_u64()
            .unwrap_or_else(|| panic!("no grant: {reply}"))
    }

    /// Nothing arrives within `ms`.
    pub async fn silent_for(&mut self, ms: u64) -> bool {
        match tokio::time::timeout(Duration::from_millis(ms), self.ws.next()).await {
            Err(_) => true,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => true,
            Ok(_) => false,
        }
    }
}

pub fn code(reply: &Value) -> &str {
    reply["err"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {reply}"))
}
