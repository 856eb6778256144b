//! Just enough HTTP/1.1 for the WebSocket port: read one request head
//! (bounded in size and time), upgrade `GET /ws`, and write the answer to
//! any other request, which the [`HttpRoutes`](crate::routes::HttpRoutes)
//! give.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use deadbolt_core::proto::Secret;

use crate::routes::{HttpRequest, HttpResponse};

/// Most headers a request head may carry.
const HEADERS_MAX: usize = 64;

/// What a connection asked for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// `GET /ws` (or [`FORWARDED_PATH`]) with a valid WebSocket upgrade:
    /// the `Sec-WebSocket-Key`, whether another node forwards through
    /// it, and the `Origin` and `Host` headers, if any (a browser's
    /// upgrade carries its page's origin).
    WebSocket {
        key: String,
        forwarded: bool,
        origin: Option<String>,
        host: Option<String>,
    },
    /// `/ws` without a valid upgrade, answered with this status and reason.
    Refuse { status: u16, reason: &'static str },
    /// Any other path: for the [`HttpRoutes`](crate::routes::HttpRoutes).
    Plain(HttpRequest),
}

/// Why no request head could be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeadError {
    /// The head is larger than allowed.
    #[error("request head over {0} bytes")]
    TooLarge(usize),
    /// The connection closed before the head was complete.
    #[error("connection closed before the request head ended")]
    Closed,
    /// The bytes are not HTTP.
    #[error("malformed request head: {0}")]
    Malformed(#[from] httparse::Error),
    /// Reading failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A request head and whatever bytes came after it.
pub(crate) struct Head {
    pub route: Route,
    /// Bytes read past the end of the head.
    pub rest: Vec<u8>,
}

/// Reads one request head of at most `max` bytes.
pub(crate) async fn read_head<S>(stream: &mut S, max: usize) -> Result<Head, HeadError>
where
    S: AsyncRead + Unpin,
{
    let mut buffer = Vec::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        let mut request = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(end) = request.parse(&buffer)? {
            let route = route(&request);
            return Ok(Head {
                route,
                rest: buffer[end..].to_vec(),
            });
        }
        if buffer.len() >= max {
            return Err(HeadError::TooLarge(max));
        }
        let mut chunk = [0u8; 1024];
        let room = (max - buffer.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(request: &'a httparse::Request<'_, '_>, name: &str) -> Option<&'a str> {
    request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// The path a cluster node's followers forward their clients' requests
/// through: the protocol of `/ws`, never forwarded again.
pub const FORWARDED_PATH: &str = "/ws/forwarded";

fn route(request: &httparse::Request<'_, '_>) -> Route {
    let method = request.method.unwrap_or("");
    let mut plain = HttpRequest::new(method, request.path.unwrap_or(""));
    plain.bearer = header(request, "authorization")
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(|token| Secret::new(token.trim()));
    let forwarded = plain.path == FORWARDED_PATH;
    if plain.path != "/ws" && !forwarded {
        return Route::Plain(plain);
    }
    if method != "GET" {
        return Route::Refuse {
            status: 405,
            reason: "Method Not Allowed",
        };
    }
    upgrade(request, forwarded)
}

fn upgrade(request: &httparse::Request<'_, '_>, forwarded: bool) -> Route {
    let upgrade = has_token(header(request, "upgrade"), "websocket");
    let connection = has_token(header(request, "connection"), "upgrade");
    let version = header(request, "sec-websocket-version") == Some("13");
    match header(request, "sec-websocket-key") {
        Some(key) if upgrade && connection && version => Route::WebSocket {
            key: key.trim().to_owned(),
            forwarded,
            origin: header(request, "origin").map(str::to_owned),
            host: header(request, "host").map(str::to_owned),
        },
        _ => Route::Refuse {
            status: 426,
            reason: "Upgrade Required",
        },
    }
}

/// Writes the `101 Switching Protocols` answer to a WebSocket upgrade.
pub(crate) async fn accept_upgrade<S>(stream: &mut S, key: &str) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    stream.write_all(response.as_bytes()).await?;
    stream.flush().await
}

/// Writes a complete plain response and leaves the connection to be closed.
pub(crate) async fn respond<S>(stream: &mut S, response: &HttpResponse) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let HttpResponse {
        status,
        reason,
        content_type,
        body,
    } = response;
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(text: &str) -> Result<Head, HeadError> {
        read_head(&mut text.as_bytes(), 4096).await
    }

    #[tokio::test]
    async fn a_websocket_upgrade_on_ws_is_routed_with_its_key() {
        let head = parse(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nrest",
        )
        .await
        .unwrap();
        assert_eq!(
            head.route,
            Route::WebSocket {
                key: "dGhlIHNhbXBsZSBub25jZQ==".into(),
                forwarded: false,
                origin: None,
                host: Some("x".into()),
            }
        );
        assert_eq!(head.rest, b"rest");
    }

    #[tokio::test]
    async fn other_paths_go_to_the_routes_and_ws_without_an_upgrade_is_refused() {
        let health = parse("GET /healthz?full HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(
            health.route,
            Route::Plain(HttpRequest {
                method: "GET".into(),
                path: "/healthz".into(),
                query: Some("full".into()),
                bearer: None,
            })
        );
        let post_root = parse("POST / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(post_root.route, Route::Plain(HttpRequest::new("POST", "/")));
        let no_upgrade = parse("GET /ws HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(matches!(
            no_upgrade.route,
            Route::Refuse { status: 426, .. }
        ));
        let post_ws = parse("POST /ws HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(matches!(post_ws.route, Route::Refuse { status: 405, .. }));
    }

    #[tokio::test]
    async fn oversize_truncated_and_garbage_heads_are_errors() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(5000));
        assert!(matches!(parse(&big).await, Err(HeadError::TooLarge(4096))));
        assert!(matches!(
            parse("GET / HTTP/1.1\r\n").await,
            Err(HeadError::Closed)
        ));
        assert!(matches!(
            parse("\u{1}\u{2}\r\n\r\n").await,
            Err(HeadError::Malformed(_))
        ));
    }
}
