//! `deadbolt_server::run` on loopback sockets (WebSocket and QUIC), as
//! `deadbolt serve` runs it, and small clients to talk to it.

#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use deadbolt_core::EngineConfig;
use deadbolt_core::client::{Client, ClientOptions};
use deadbolt_server::{Error, Listeners, ServerConfig};
use deadbolt_transport_quic::{Identity, QuicConfig, QuicConnector, Trust};
use deadbolt_transport_ws::WsConnector;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

pub struct TestServer {
    pub ws_addr: SocketAddr,
    pub quic_addr: SocketAddr,
    pub ca_pem: Vec<u8>,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<(), Error>>,
}

/// A small deterministic configuration: two shards.
pub fn config() -> ServerConfig {
    ServerConfig {
        engine: EngineConfig {
            shards: 2,
            ..EngineConfig::new()
        },
        ..ServerConfig::default()
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::with(config()).await
    }

    pub async fn with(config: ServerConfig) -> TestServer {
        let ws = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ws");
        let ws_addr = ws.local_addr().expect("addr");
        let (identity, cert_pem, _) = Identity::self_signed().expect("certificate");
        let server_config =
            deadbolt_transport_quic::server_config(identity, &config.quic).expect("quic config");
        let endpoint = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().expect("addr"))
            .expect("bind quic");
        let quic_addr = endpoint.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = Listeners {
            ws,
            quic: Some(endpoint),
        };
        let task = tokio::spawn(deadbolt_server::run(config, listeners, stopped));
        TestServer {
            ws_addr,
            quic_addr,
            ca_pem: cert_pem.into_bytes(),
            stop: Some(stop),
            task,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.ws_addr)
    }

    pub async fn ws_client(&self) -> Client {
        let connector = WsConnector::new(&self.ws_url()).expect("url");
        Client::connect(connector, ClientOptions::default())
            .await
            .expect("connect over ws")
    }

    pub async fn quic_client(&self) -> Client {
        let url = format!("quic://localhost:{}", self.quic_addr.port());
        let trust = Trust::CaPem(self.ca_pem.clone());
        let connector = QuicConnector::from_url(&url, &trust, &QuicConfig::default())
            .await
            .expect("quic connector");
        Client::connect(connector, ClientOptions::default())
            .await
            .expect("connect over quic")
    }

    pub async fn raw(&self) -> Raw {
        let stream = TcpStream::connect(self.ws_addr).await.expect("tcp");
        let (ws, _) = tokio_tungstenite::client_async(self.ws_url(), stream)
            .await
            .expect("handshake");
        Raw { ws }
    }

    /// Asks the server to stop and waits for `run` to return.
    pub async fn shutdown(&mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .expect("run returns within its shutdown grace")
            .expect("run did not panic")
    }
}

/// A hand-driven WebSocket connection.
pub struct Raw {
    pub ws: WebSocketStream<TcpStream>,
}

impl Raw {
    pub async fn send(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_owned().into()))
            .await
            .expect("send");
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send(&value.to_string()).await;
    }

    /// The next frame that is not a ping or pong, within 5 s.
    pub async fn next(&mut self) -> Option<Message> {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(5), self.ws.next())
                .await
                .expect("a frame within 5 s");
            match frame {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(message)) => return Some(message),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next text frame as JSON.
    pub async fn recv(&mut self) -> Value {
        match self.next().await {
            Some(Message::Text(text)) => serde_json::from_str(&text).expect("JSON"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    pub async fn call(&mut self, request: Value) -> Value {
        self.send_json(request).await;
        self.recv().await
    }
}

/// One plain HTTP request on its own connection; the whole answer.
pub async fn http(addr: SocketAddr, head: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("tcp");
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    answer
}

/// `GET path`, answered.
pub async fn get(addr: SocketAddr, path: &str) -> String {
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await
}

pub fn code(reply: &Value) -> &str {
    reply["err"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {reply}"))
}
