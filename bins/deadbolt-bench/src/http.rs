//! A small HTTP/1.1 client: `POST` with a body over one kept-alive TCP
//! connection, for etcd's JSON gateway. Only what that server sends is
//! understood: a response framed by `Content-Length` or chunked.
//!
//! Hand-written because the workspace has no HTTP client in its dependency
//! tree (no hyper, no reqwest) and one benchmark peer is not worth adding
//! one; `httparse` is already there (the WebSocket frontend's upgrade).

use std::net::SocketAddr;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Response headers we read; the gateway sends about ten.
const MAX_HEADERS: usize = 32;

/// One connection to one server, reopened if the server closes it.
pub struct Http {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    /// Bytes read and not yet consumed by a response.
    buf: Vec<u8>,
}

/// A response: its status and its whole body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Http {
    /// Connects to `addr` (with `TCP_NODELAY`, as every client of the
    /// harness).
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Http> {
        let mut http = Http {
            addr,
            stream: None,
            buf: Vec::with_capacity(4096),
        };
        http.open().await?;
        Ok(http)
    }

    async fn open(&mut self) -> anyhow::Result<&mut TcpStream> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("connecting to {}", self.addr))?;
            stream.set_nodelay(true)?;
            self.buf.clear();
            self.stream = Some(stream);
        }
        self.stream.as_mut().context("just opened")
    }

    /// Sends `POST path` with a JSON `body` and reads the whole response.
    pub async fn post(&mut self, path: &str, body: &[u8]) -> anyhow::Result<Response> {
        let request = request(path, &self.addr.to_string(), body);
        let stream = self.open().await?;
        // One write for head and body: one segment for a small request.
        if let Err(error) = stream.write_all(&request).await {
            self.stream = None;
            return Err(error).context("sending the request");
        }
        match self.read_response().await {
            Ok((response, keep)) => {
                if !keep {
                    self.stream = None;
                }
                Ok(response)
            }
            Err(error) => {
                // The connection is in an unknown state: start afresh.
                self.stream = None;
                Err(error)
            }
        }
    }

    /// Reads until a whole response is buffered: it, and whether the
    /// connection stays open.
    async fn read_response(&mut self) -> anyhow::Result<(Response, bool)> {
        loop {
            if let Some(head) = parse_head(&self.buf)?
                && let Some((body, used)) = body(&head, &self.buf[head.len..])?
            {
                self.buf.drain(..head.len + used);
                let response = Response {
                    status: head.status,
                    body,
                };
                return Ok((response, !head.close));
            }
            let stream = self.stream.as_mut().context("no connection")?;
            if stream.read_buf(&mut self.buf).await? == 0 {
                bail!("the server closed the connection mid-response");
            }
        }
    }
}

/// The bytes of `POST path` with a JSON body.
fn request(path: &str, host: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// How the body of a response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
}

/// A parsed response head.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    /// Its length in bytes, blank line included.
    len: usize,
    framing: Framing,
    /// `Connection: close`.
    close: bool,
}

/// The response head at the start of `buf`, or `None` if it is not all
/// there yet.
fn parse_head(buf: &[u8]) -> anyhow::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf).context("a malformed response head")? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let status = response.code.context("a response without a status")?;
    let (mut framing, mut close) = (None, false);
    for header in response.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or_default().trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            framing = Some(Framing::Length(
                value.parse().context("a bad Content-Length")?,
            ));
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            anyhow::ensure!(
                value.eq_ignore_ascii_case("chunked"),
                "transfer encoding {value:?}"
            );
            framing = Some(Framing::Chunked);
        } else if header.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    // A body that runs to the close would need the close to find its end;
    // the gateway never sends one.
    let framing = framing.context("a response with neither Content-Length nor chunks")?;
    Ok(Some(Head {
        status,
        len,
        framing,
        close,
    }))
}

/// The body after `head`, and the bytes of `rest` it took, or `None` if it
/// is not all there yet.
fn body(head: &Head, rest: &[u8]) -> anyhow::Result<Option<(Vec<u8>, usize)>> {
    match head.framing {
        Framing::Length(n) if rest.len() >= n => Ok(Some((rest[..n].to_vec(), n))),
        Framing::Length(_) => Ok(None),
        Framing::Chunked => dechunk(rest),
    }
}

/// A chunked body at the start of `buf`: the data and the bytes taken
/// (through the last chunk and the trailer's blank line), or `None` if it
/// is not all there yet.
fn dechunk(buf: &[u8]) -> anyhow::Result<Option<(Vec<u8>, usize)>> {
    let mut data = Vec::new();
    let mut at = 0;
    loop {
        let (size_len, size) = match httparse::parse_chunk_size(&buf[at..])
            .map_err(|_| anyhow::anyhow!("a bad chunk size"))?
        {
            httparse::Status::Complete(found) => found,
            httparse::Status::Partial => return Ok(None),
        };
        at += size_len;
        let size = usize::try_from(size).context("a chunk too large")?;
        if size == 0 {
            // The last chunk, then trailer lines (the gateway sends one with
            // an error) up to a blank line.
            return Ok(trailers_end(&buf[at..]).map(|end| (data, at + end)));
        }
        match buf.get(at..at + size + 2) {
            Some(chunk) if chunk.ends_with(b"\r\n") => data.extend_from_slice(&chunk[..size]),
            Some(_) => bail!("a chunk without its CRLF"),
            None => return Ok(None),
        }
        at += size + 2;
    }
}

/// The length of the trailer section at the start of `buf`, its blank line
/// included, or `None` if it is not all there yet.
fn trailers_end(buf: &[u8]) -> Option<usize> {
    if buf.starts_with(b"\r\n") {
        return Some(2);
    }
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unary answer as etcd 3.4's gateway sends it (a lease grant, its
    /// headers cut short), then the start of the next response.
    const GRANT: &[u8] = b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: *\r\nContent-Type: application/json\r\nGrpc-Metadata-Content-Type: application/grpc\r\nDate: Mon, 30 Nov 2026 12:20:54 GMT\r\nContent-Length: 21\r\n\r\n{\"ID\":\"7\",\"TTL\":\"30\"}HTTP/1.1";

    #[test]
    fn a_request_carries_its_length_and_body() {
        let bytes = request("/v3/kv/txn", "127.0.0.1:2379", b"{}");
        assert_eq!(
            bytes,
            b"POST /v3/kv/txn HTTP/1.1\r\nHost: 127.0.0.1:2379\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        );
    }

    #[test]
    fn a_length_framed_response_is_read_once_complete() {
        let head = parse_head(GRANT).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.framing, Framing::Length(21));
        assert!(!head.close);
        let rest = &GRANT[head.len..];
        assert_eq!(
            body(&head, rest).unwrap(),
            Some((b"{\"ID\":\"7\",\"TTL\":\"30\"}".to_vec(), 21))
        );
        assert_eq!(body(&head, &rest[..10]).unwrap(), None);
        // The head alone, cut anywhere, is not yet a head.
        assert_eq!(parse_head(&GRANT[..head.len - 1]).unwrap(), None);
    }

    #[test]
    fn a_chunked_body_is_joined_and_its_end_found() {
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        let parsed = parse_head(head).unwrap().unwrap();
        assert_eq!(parsed.framing, Framing::Chunked);
        assert!(parsed.close);
        let chunks = b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\nHTTP/1.1 next";
        let (data, used) = dechunk(chunks).unwrap().unwrap();
        assert_eq!(data, b"hello, world");
        assert_eq!(&chunks[used..], b"HTTP/1.1 next");
        for cut in 0..used {
            assert_eq!(dechunk(&chunks[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn an_error_answer_ends_after_its_trailer() {
        // Verbatim from etcd 3.4.23's gateway, refusing a transaction.
        let answer = b"HTTP/1.1 400 Bad Request\r\nAccess-Control-Allow-Headers: accept, content-type, authorization\r\nAccess-Control-Allow-Methods: POST, GET, OPTIONS, PUT, DELETE\r\nAccess-Control-Allow-Origin: *\r\nContent-Type: application/json\r\nTrailer: Grpc-Trailer-Content-Type\r\nDate: Mon, 30 Nov 2026 12:32:54 GMT\r\nTransfer-Encoding: chunked\r\n\r\n7e\r\n{\"error\":\"etcdserver: too many operations in txn request\",\"message\":\"etcdserver: too many operations in txn request\",\"code\":3}\r\n0\r\nGrpc-Trailer-Content-Type: application/grpc\r\n\r\n";
        let head = parse_head(answer).unwrap().unwrap();
        assert_eq!(head.status, 400);
        let rest = &answer[head.len..];
        let (data, used) = body(&head, rest).unwrap().unwrap();
        assert!(data.starts_with(b"{\"error\":\"etcdserver: too many operations"));
        assert!(data.ends_with(b"\"code\":3}"));
        assert_eq!(used, rest.len());
        for cut in 0..used {
            assert_eq!(body(&head, &rest[..cut]).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn broken_framing_is_an_error_not_a_wait() {
        assert!(dechunk(b"5\r\nhelloXX0\r\n\r\n").is_err());
        assert!(dechunk(b"zz\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").is_err());
    }
}
