//! A TCP relay between client and server that a test can break: swallow
//! what the server sends (replies lost on the way), and cut every
//! connection (the network drops them).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Proxy {
    pub url: String,
    swallow: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    pumps: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Relays connections to `server`.
    pub async fn start(server: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
        let swallow = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let pumps = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let (swallow, accepted, pumps) = (swallow.clone(), accepted.clone(), pumps.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let Ok(upstream) = TcpStream::connect(server).await else {
                        continue;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = upstream.into_split();
                    let up = tokio::spawn(pump(client_read, server_write, None));
                    let down = tokio::spawn(pump(server_read, client_write, Some(swallow.clone())));
                    pumps.lock().expect("pumps").extend([up, down]);
                }
            }
        });
        Proxy {
            url,
            swallow,
            accepted,
            pumps,
            accept,
        }
    }

    /// From now on, bytes from the server are dropped (or, with `false`,
    /// relayed again).
    pub fn swallow_replies(&self, on: bool) {
        self.swallow.store(on, Ordering::SeqCst);
    }

    /// How many connections clients have opened through the proxy so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Breaks every connection open now.
    pub fn cut_all(&self) {
        for pump in self.pumps.lock().expect("pumps").drain(..) {
            pump.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut_all();
        self.accept.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    swallow: Option<Arc<AtomicBool>>,
) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if swallow.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
            continue;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
