//! What the tests of the `deadbolt` binary share.

use std::io::{BufRead, BufReader};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A spawned server, killed (SIGKILL) and reaped when dropped: a test that
/// fails an assertion unwinds past it, and the server must not outlive the
/// test, or it holds the test's inherited output open and a piped
/// `cargo test` waits for it forever instead of reporting the failure.
/// Derefs to its [`Child`], so a test still signals, kills and waits for
/// it itself where that is what it tests; a kill after the test reaped it
/// does nothing (std knows it exited).
pub struct KillOnDrop(Child);

impl Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// [`Command::spawn`] into a [`KillOnDrop`].
pub trait SpawnKillOnDrop {
    /// Spawns the command; its process is killed when the guard drops.
    fn spawn_kill_on_drop(&mut self) -> std::io::Result<KillOnDrop>;
}

impl SpawnKillOnDrop for Command {
    fn spawn_kill_on_drop(&mut self) -> std::io::Result<KillOnDrop> {
        self.spawn().map(KillOnDrop)
    }
}

/// `deadbolt serve` on a free WebSocket port of loopback, without QUIC, on
/// `data_dir`, with `extra` flags; and its WebSocket URL once it listens.
#[allow(dead_code)] // not every test crate starts its servers this way
pub fn serve_ws(data_dir: &Path, extra: &[&str]) -> (KillOnDrop, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_deadbolt"))
        .args([
            "serve",
            "--ws",
            "127.0.0.1:0",
            "--quic",
            "off",
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra)
        .stderr(Stdio::piped())
        .spawn_kill_on_drop()
        .expect("spawn server");
    let (url, _) = read_urls(&mut child);
    (child, url)
}

/// Reads the server's log until it says where it listens: the WebSocket
/// URL (`ws://` or `wss://`), and the QUIC one if it said that first.
pub fn read_urls(child: &mut Child) -> (String, Option<String>) {
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut quic = None;
    for line in lines.by_ref() {
        let line = line.expect("log line");
        let url_at = |at: usize| {
            line[at..]
                .split_whitespace()
                .next()
                .expect("url")
                .to_owned()
        };
        if let Some(at) = line.find("quic://") {
            quic = Some(url_at(at));
        } else if let Some(at) = line.find("wss://").or_else(|| line.find("ws://")) {
            let url = url_at(at);
            // Keep draining the log so the server never blocks on it.
            std::thread::spawn(move || for _ in lines {});
            return (url, quic);
        }
    }
    panic!("the server exited before listening");
}

/// A loopback port for a server that must be told its port before it
/// starts (a cluster's peer addresses), free when asked.
///
/// Taken below the kernel's ephemeral range (32768 and up here): a port
/// from there, probed and let go, can be handed by the kernel to another
/// server's `127.0.0.1:0` or to an outgoing connection before our node
/// binds it, and a node that finds its peer port taken exits. Each test
/// process starts at its own place in 20,000..32,000 (from its process
/// id) and counts up, skipping ports something already holds.
#[allow(dead_code)] // not every test crate needs fixed ports
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(2_654_435_761) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    loop {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
}
