//! `deadbolt cluster status`: a node's view of its cluster, from its
//! WebSocket port's `GET /cluster`.

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cli::{ClusterArgs, ClusterCommand, ServerArgs};

/// Most bytes of a `/cluster` answer read.
const ANSWER_BYTES_MAX: u64 = 1 << 20;

/// Runs a `deadbolt cluster` subcommand.
pub async fn run(server: &ServerArgs, args: ClusterArgs) -> anyhow::Result<u8> {
    match args.command {
        ClusterCommand::Status => status(server).await,
    }
}

/// Prints the status from the first server URL that answers.
async fn status(server: &ServerArgs) -> anyhow::Result<u8> {
    let mut failures = Vec::new();
    for url in server.server.split(',').map(str::trim) {
        match fetch_status(url).await {
            Ok(json) => {
                println!("{}", json.trim_end());
                return Ok(0);
            }
            Err(error) => failures.push(format!("{url}: {error:#}")),
        }
    }
    bail!("no node answered: {}", failures.join("; "))
}

/// `GET /cluster` on the WebSocket port of `url` (`ws://HOST:PORT/...`).
async fn fetch_status(url: &str) -> anyhow::Result<String> {
    let authority = url
        .strip_prefix("ws://")
        .context("cluster status needs a ws:// URL (the node's WebSocket port)")?
        .split('/')
        .next()
        .unwrap_or_default();
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
    let request =
        format!("GET /cluster HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream
        .take(ANSWER_BYTES_MAX)
        .read_to_end(&mut answer)
        .await?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("a malformed answer")?;
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.contains(" 200 ") {
        bail!("{status_line}: {}", body.trim());
    }
    Ok(body.to_owned())
}
