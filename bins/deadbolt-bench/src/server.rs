//! Starts the `deadbolt` binary next to this one as the server under test.

use std::process::Stdio;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A `deadbolt serve` child process, killed when dropped.
pub struct Spawned {
    pub url: String,
    _child: Child,
    _data: std::path::PathBuf,
}

impl Spawned {
    /// Starts the server on a free port and waits until it listens.
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
            .args(["serve", "--ws", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("server stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        while let Some(line) = lines.next_line().await? {
            if let Some(at) = line.find("ws://") {
                let url = line[at..]
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                return Ok(Spawned {
                    url,
                    _child: child,
                    _data: data,
                });
            }
        }
        anyhow::bail!("the server exited before it listened")
    }
}
