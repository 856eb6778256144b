//! The limit row: `deadbolt-bench limit-server`, a WebSocket server that
//! does no work per request, run on the same core and driven by the same
//! harness and client as deadbolt. It shows what one server core can do on
//! this loopback with one receive and one send per request, so that every
//! system's cycles/s and server CPU per cycle can also be read as a
//! fraction of it.
//!
//! Same as deadbolt: tokio's multi-threaded runtime (one worker on the
//! pinned core), TCP_NODELAY, tokio-tungstenite with deadbolt's read buffer,
//! one task per connection, JSON text frames of the same size (a `lock` is
//! answered `{"id":N,"ok":{"token":T,"ttl_ms":L}}`, an `unlock` `{}`), and
//! the replies to every request already read written with one flush. Not
//! done: parsing the request beyond its `id` and `op`, keeping any state,
//! timers, limits, metrics.

use std::fmt::Write;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use deadbolt_core::client::{Client, ClientOptions};
use deadbolt_core::proto::{Okay, Outcome, Reply, decode_request, encode_reply};
use deadbolt_core::{Limits, proto::HelloReply};
use deadbolt_transport_ws::WsConnector;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::procs::Server;
use crate::systems::{Conn, System, deadbolt};

/// Bytes read from the socket at a time: deadbolt's server's setting.
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// `deadbolt-bench limit-server`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to listen for WebSocket connections.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
}

/// Runs the limit server until killed; says `listening on ws://ADDR` on
/// stderr once it accepts connections.
pub async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!("listening on ws://{}", listener.local_addr()?);
    accept(listener).await
}

/// Serves every connection `listener` accepts, each on its own task.
async fn accept(listener: TcpListener) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            // A client that goes away ends its task; nothing to report.
            let _ = connection(stream).await;
        });
    }
}

/// One connection: every message read is answered; the answers to the
/// messages that arrived together are flushed once.
async fn connection(stream: TcpStream) -> anyhow::Result<()> {
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
    let ws = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await?;
    let (mut sink, mut stream) = ws.split();
    let mut answers = Answers::default();
    while let Some(message) = stream.next().await {
        let mut message = message?;
        loop {
            if let Some(answer) = answers.answer(&message) {
                sink.feed(Message::Text(answer.into())).await?;
            }
            match stream.next().now_or_never() {
                Some(Some(next)) => message = next?,
                Some(None) => return Ok(()),
                None => break,
            }
        }
        sink.flush().await?;
    }
    Ok(())
}

/// What the limit server answers; it counts tokens as deadbolt would, so
/// that a grant's reply has a grant's size.
#[derive(Default)]
struct Answers {
    token: u64,
}

impl Answers {
    /// The reply to one message: `None` for control frames (tungstenite
    /// answers pings itself).
    fn answer(&mut self, message: &Message) -> Option<String> {
        let Message::Text(text) = message else {
            return None;
        };
        let text = text.as_str();
        let id = field(text, "\"id\":").and_then(|n| n.parse::<u64>().ok());
        let mut reply = String::with_capacity(64);
        match field(text, "\"op\":\"") {
            Some("lock") => {
                self.token += 1;
                let ttl = field(text, "\"ttl_ms\":").unwrap_or("0");
                let _ = write!(
                    reply,
                    r#"{{"id":{},"ok":{{"token":{},"ttl_ms":{ttl}}}}}"#,
                    id.unwrap_or(0),
                    self.token
                );
            }
            Some("unlock" | "ping" | "cancel") => {
                let _ = write!(reply, r#"{{"id":{},"ok":{{}}}}"#, id.unwrap_or(0));
            }
            // Once per connection: read the client id to echo it.
            Some("hello") => return Some(hello(text)),
            _ => {
                let _ = write!(
                    reply,
                    r#"{{"id":{},"err":{{"code":"bad_request","message":"the limit server answers lock, unlock, ping and hello only"}}}}"#,
                    id.map_or("null".to_owned(), |id| id.to_string())
                );
            }
        }
        Some(reply)
    }
}

/// The answer to `hello`, as deadbolt writes it (through the real codec).
fn hello(text: &str) -> String {
    let outcome: Outcome = match decode_request(text.as_bytes(), &Limits::default()) {
        Ok(request) => match request.op {
            deadbolt_core::proto::Op::Hello { client, .. } => Ok(Okay::Hello(HelloReply {
                client,
                server: "deadbolt-bench-limit".to_owned(),
            })),
            _ => Ok(Okay::Empty(Default::default())),
        },
        Err(error) => return encode_reply(&error.into_reply()),
    };
    let id = field(text, "\"id\":").and_then(|n| n.parse().ok());
    encode_reply(&Reply { id, outcome })
}

/// The value after `name` in a flat JSON object as clients write it: the
/// digits of a number or the text of a string, up to its end.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let start = text.find(name)? + name.len();
    let rest = &text[start..];
    let end = rest.find(['"', ',', '}']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The limit server, started pinned to the server core.
pub struct LimitServer {
    server: Server,
    url: String,
}

impl LimitServer {
    /// Starts `deadbolt-bench limit-server` (this binary) on a free port.
    pub async fn start() -> anyhow::Result<LimitServer> {
        let bin = std::env::current_exe()?;
        let args = ["limit-server".to_owned()];
        let mut server = Server::start("limit", &bin.to_string_lossy(), &args, None)?;
        let stderr = server
            .stderr()
            .ok_or_else(|| anyhow::anyhow!("limit server stderr"))?;
        let mut lines = BufReader::new(stderr).lines();
        let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await??;
        let url = first
            .as_deref()
            .and_then(|line| line.strip_prefix("listening on "))
            .ok_or_else(|| anyhow::anyhow!("the limit server said {first:?}"))?
            .to_owned();
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(LimitServer { server, url })
    }
}

#[async_trait]
impl System for LimitServer {
    fn name(&self) -> String {
        "limit (no work per request)".to_owned()
    }

    fn tier(&self) -> String {
        "no state: answers every lock granted".to_owned()
    }

    async fn connect(&self) -> anyhow::Result<Box<dyn Conn>> {
        let client =
            Client::connect(WsConnector::new(&self.url)?, ClientOptions::default()).await?;
        Ok(deadbolt::conn(client))
    }

    fn cpu(&self) -> Duration {
        self.server.cpu()
    }

    fn rss(&self) -> u64 {
        self.server.rss()
    }

    fn has_leases(&self) -> bool {
        false
    }

    fn locks_in_memory(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Message {
        Message::Text(s.into())
    }

    #[test]
    fn a_lock_is_granted_with_a_new_token_and_its_own_lease() {
        let mut answers = Answers::default();
        let lock = r#"{"id":7,"op":"lock","key":"k","ttl_ms":30000,"wait_ms":0}"#;
        assert_eq!(
            answers.answer(&text(lock)).as_deref(),
            Some(r#"{"id":7,"ok":{"token":1,"ttl_ms":30000}}"#)
        );
        assert_eq!(
            answers.answer(&text(lock)).as_deref(),
            Some(r#"{"id":7,"ok":{"token":2,"ttl_ms":30000}}"#)
        );
    }

    #[test]
    fn an_unlock_is_answered_empty_and_anything_else_refused() {
        let mut answers = Answers::default();
        let unlock = r#"{"id":12,"op":"unlock","key":"k","token":3}"#;
        assert_eq!(
            answers.answer(&text(unlock)).as_deref(),
            Some(r#"{"id":12,"ok":{}}"#)
        );
        let insert = r#"{"id":13,"op":"insert","set":"s","key":"k"}"#;
        let refused = answers.answer(&text(insert)).unwrap_or_default();
        assert!(refused.starts_with(r#"{"id":13,"err":{"code":"bad_request""#));
        assert_eq!(answers.answer(&Message::Ping(Vec::new().into())), None);
    }

    /// The real client takes and releases locks on it, pipelined too.
    #[tokio::test]
    async fn the_deadbolt_client_runs_lock_cycles_against_it() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("ws://{}", listener.local_addr()?);
        tokio::spawn(accept(listener));
        let client = Client::connect(WsConnector::new(&url)?, ClientOptions::default()).await?;
        let mut conn = deadbolt::conn(client);
        let held = conn.try_lock("k", Duration::from_secs(5)).await?;
        let held = held.ok_or_else(|| anyhow::anyhow!("the limit server refused a lock"))?;
        conn.unlock("k", held).await?;
        let next = conn.try_lock("k", Duration::from_secs(5)).await?;
        assert!(next.is_some_and(|next| next.0 > held.0), "tokens go up");
        Ok(())
    }

    #[test]
    fn hello_echoes_the_client_id() {
        let reply = hello(r#"{"id":1,"op":"hello","client":"c-1"}"#);
        assert_eq!(
            reply,
            r#"{"id":1,"ok":{"client":"c-1","server":"deadbolt-bench-limit"}}"#
        );
    }
}
