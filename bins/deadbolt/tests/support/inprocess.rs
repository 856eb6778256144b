//! Servers run in this process, as `deadbolt serve` runs them
//! (`deadbolt_server::run` on sockets bound here), and a real disk that can
//! be made full, so that a real server answers `unavailable`. Included by
//! the tests that need them (`#[path]`), not by every test binary.

#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use deadbolt_core::client::{Client, ClientOptions};
use deadbolt_server::{Durable, Listeners, ServerConfig};
use deadbolt_storage::{AppendFile, Disk, StdDisk, StoreConfig};
use deadbolt_transport_quic::{Identity, QuicConfig, QuicConnector, Trust};
use deadbolt_transport_ws::WsConnector;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A server run in this process by `deadbolt_server::run`, as `deadbolt
/// serve` runs it, on sockets bound here.
pub struct InProcess {
    pub ws_url: String,
    pub quic_url: String,
    ca_pem: Vec<u8>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl InProcess {
    pub async fn start(storage: Option<Durable>) -> InProcess {
        InProcess::start_with(ServerConfig {
            storage,
            ..ServerConfig::default()
        })
        .await
    }

    /// A server run with `config` (its storage, engine limits, frontends'
    /// limits).
    pub async fn start_with(config: ServerConfig) -> InProcess {
        let ws = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ws");
        let ws_url = format!("ws://{}/ws", ws.local_addr().expect("addr"));
        let (identity, cert_pem, _) = Identity::self_signed().expect("certificate");
        let quic_config = deadbolt_transport_quic::server_config(identity, &QuicConfig::default())
            .expect("quic config");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let endpoint = quinn::Endpoint::server(quic_config, any).expect("bind quic");
        let quic_url = format!(
            "quic://localhost:{}",
            endpoint.local_addr().expect("addr").port()
        );
        let listeners = Listeners {
            ws,
            quic: Some(endpoint),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            deadbolt_server::run(config, listeners, stopped)
                .await
                .expect("the server runs");
        });
        let server = InProcess {
            ws_url,
            quic_url,
            ca_pem: cert_pem.into_bytes(),
            stop: Some(stop),
            task,
        };
        // Answered once the data directory is open and the frontends
        // serve: a test may fill the disk after this, not before.
        server
            .observer()
            .await
            .ping()
            .await
            .expect("the server serves");
        server
    }

    /// A server whose data directory is on `disk`.
    pub async fn durable(disk: Arc<dyn Disk>, dir: &Path) -> InProcess {
        InProcess::start(Some(Durable {
            disk,
            store: StoreConfig::new(dir),
            writer_thread: true,
        }))
        .await
    }

    pub async fn quic(&self) -> QuicConnector {
        let trust = Trust::CaPem(self.ca_pem.clone());
        QuicConnector::from_url(&self.quic_url, &trust, &QuicConfig::default())
            .await
            .expect("quic connector")
    }

    /// The PEM of the server's self-signed certificate, for QUIC clients.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// A client of this server alone, to look at what it holds.
    pub async fn observer(&self) -> Client {
        let connector = WsConnector::new(&self.ws_url).expect("url");
        Client::connect(connector, ClientOptions::default())
            .await
            .expect("observer connects")
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("the server stops");
    }
}

/// A real disk that can be made full: appends fail with ENOSPC (having
/// written half, as a real full disk may) while it is.
#[derive(Clone, Default)]
pub struct FillingDisk {
    full: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
}

impl FillingDisk {
    pub fn fill(&self) {
        self.full.store(true, Ordering::SeqCst);
    }

    pub fn make_room(&self) {
        self.full.store(false, Ordering::SeqCst);
    }

    /// Makes room `after` from now, in the background.
    pub fn make_room_after(&self, after: Duration) {
        let disk = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            disk.make_room();
        });
    }

    /// Appends refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Disk for FillingDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdDisk.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdDisk.list(dir)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        StdDisk.read(path)
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        Ok(Box::new(FillingFile {
            inner: StdDisk.open_append(path)?,
            disk: self.clone(),
        }))
    }
    fn write_synced(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        StdDisk.write_synced(path, bytes)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdDisk.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        StdDisk.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        StdDisk.sync_dir(dir)
    }
}

struct FillingFile {
    inner: Box<dyn AppendFile>,
    disk: FillingDisk,
}

impl AppendFile for FillingFile {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.disk.full.load(Ordering::SeqCst) {
            self.inner.append(&bytes[..bytes.len() / 2])?;
            self.disk.refused.fetch_add(1, Ordering::SeqCst);
            const ENOSPC: i32 = 28;
            return Err(io::Error::from_raw_os_error(ENOSPC));
        }
        self.inner.append(bytes)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.inner.sync()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
}
