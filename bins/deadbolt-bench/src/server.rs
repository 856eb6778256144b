//! Starts the `deadbolt` binary next to this one as the server under test.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A `deadbolt serve` child process, killed when dropped.
pub struct Spawned {
    /// Its WebSocket URL.
    pub ws_url: String,
    /// Its QUIC URL.
    pub quic_url: String,
    /// The certificate it generated, for QUIC clients to trust.
    pub ca: PathBuf,
    _child: Child,
    data: PathBuf,
}

impl Spawned {
    /// Starts the server on free ports and waits until it listens.
    pub async fn start() -> anyhow::Result<Spawned> {
        let me = std::env::current_exe()?;
        let bin = me.with_file_name("deadbolt");
        anyhow::ensure!(
            bin.exists(),
            "no server binary at {}; run `cargo build --release` first",
            bin.display()
        );
        let data = std::env::temp_dir().join(format!("deadbolt-bench-{}", std::process::id()));
        let mut child = Command::new(&bin)
            .args([
                "serve",
                "--ws",
                "127.0.0.1:0",
                "--quic",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(&data)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("server stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut quic_url = None;
        while let Some(line) = lines.next_line().await? {
            let url_at = |scheme: &str| {
                line.find(scheme).map(|at| {
                    line[at..]
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                })
            };
            if let Some(url) = url_at("quic://") {
                quic_url = Some(url);
            } else if let Some(ws_url) = url_at("ws://") {
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                return Ok(Spawned {
                    ws_url,
                    quic_url: quic_url.context("the server did not start QUIC")?,
                    ca: data.join("cert.pem"),
                    _child: child,
                    data,
                });
            }
        }
        anyhow::bail!("the server exited before it listened")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
