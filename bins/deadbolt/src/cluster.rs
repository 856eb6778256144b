//! `deadbolt cluster status` (a node's view of its cluster, from its
//! WebSocket port's `GET /cluster`) and `deadbolt cluster readmit N`
//! (`POST /cluster/readmit/N` on the leader).

use anyhow::{Context, bail};
use deadbolt_transport_ws::{Dialer, TlsDialer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::cli::{ClusterArgs, ClusterCommand, ServerArgs};

/// Most bytes of a `/cluster` answer read.
const ANSWER_BYTES_MAX: u64 = 1 << 20;

/// Runs a `deadbolt cluster` subcommand.
pub async fn run(server: &ServerArgs, args: ClusterArgs) -> anyhow::Result<u8> {
    match args.command {
        ClusterCommand::Status => status(server).await,
        ClusterCommand::Readmit { node_id } => readmit(server, node_id).await,
    }
}

/// Asks each node of `--server` in turn, the rounds again for up to
/// `--retry-for`: the leader does it, and the readmitted node's first
/// votes may move the leadership while it does (it is safe to ask again).
async fn readmit(server: &ServerArgs, node: u64) -> anyhow::Result<u8> {
    let deadline = tokio::time::Instant::now() + server.retry_for;
    let path = format!("/cluster/readmit/{node}");
    loop {
        let mut failures = Vec::new();
        for url in server.server.split(',').map(str::trim) {
            match http(url, "POST", &path, server).await {
                Ok(body) => {
                    println!("{}", body.trim_end());
                    return Ok(0);
                }
                Err(error) => failures.push(format!("{url}: {error:#}")),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("no node readmitted {node}: {}", failures.join("; "));
        }
        tokio::time::sleep(READMIT_RETRY_AFTER).await;
    }
}

/// How long `readmit` waits before asking every node again.
const READMIT_RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// Prints the status from the first server URL that answers.
async fn status(server: &ServerArgs) -> anyhow::Result<u8> {
    let mut failures = Vec::new();
    for url in server.server.split(',').map(str::trim) {
        match http(url, "GET", "/cluster", server).await {
            Ok(json) => {
                println!("{}", json.trim_end());
                return Ok(0);
            }
            Err(error) => failures.push(format!("{url}: {error:#}")),
        }
    }
    bail!("no node answered: {}", failures.join("; "))
}

/// `METHOD PATH` on the WebSocket port of `url` (`ws://HOST:PORT/...`, or
/// `wss://`, checked against `--ca` as a client does), with the secret of
/// `--auth-file`/`DEADBOLT_AUTH` as a bearer token if there is one (an
/// authenticating server keeps these routes for admins): the body of a
/// `200`, or an error with the status and the body.
pub(crate) async fn http(
    url: &str,
    method: &str,
    path: &str,
    server: &ServerArgs,
) -> anyhow::Result<String> {
    let bearer = match crate::connect::secret(server)? {
        Some(secret) => format!("Authorization: Bearer {}\r\n", secret.expose()),
        None => String::new(),
    };
    let (tls, rest) = match url.strip_prefix("wss://") {
        Some(rest) => (true, rest),
        None => (
            false,
            url.strip_prefix("ws://")
                .context("this needs a ws:// or wss:// URL (the server's WebSocket port)")?,
        ),
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\n{bearer}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let answer = if tls {
        let (host, port) = deadbolt_replication::network::split_addr(authority)?;
        let trust = crate::connect::trust(server)?;
        let dialer = TlsDialer::new(deadbolt_transport_quic::tls::client_tls(&trust)?);
        let stream = dialer
            .dial(host, port)
            .await
            .with_context(|| format!("cannot connect to {authority} over TLS"))?;
        exchange(stream, &request).await?
    } else {
        let stream = tokio::net::TcpStream::connect(authority)
            .await
            .with_context(|| format!("cannot connect to {authority}"))?;
        exchange(stream, &request).await?
    };
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

/// Sends `request` on `stream` and reads the answer to its end (at most
/// [`ANSWER_BYTES_MAX`]).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &str,
) -> anyhow::Result<Vec<u8>> {
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    let mut answer = Vec::new();
    match stream.take(ANSWER_BYTES_MAX).read_to_end(&mut answer).await {
        Ok(_) => Ok(answer),
        // A TLS peer that closes without `close_notify`: the answer
        // (`Connection: close`) is whole all the same.
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {
            Ok(answer)
        }
        Err(error) => Err(error.into()),
    }
}
