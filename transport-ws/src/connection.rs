//! One WebSocket connection: read requests, run them concurrently, write
//! replies as they complete.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use deadbolt_core::proto::{
    DecodeError, Reply, Request, ServerError, decode_request, encode_reply,
};
use deadbolt_core::{Limits, Session};
use futures_util::stream::{FuturesUnordered, SplitSink};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::config::WsConfig;

type Sink<S> = SplitSink<WebSocketStream<S>, Message>;

/// Why the loop ended, and how to say goodbye.
enum End {
    /// The client closed or the connection broke: nothing more to send.
    Gone,
    /// Close with this code and reason.
    Close(CloseCode, &'static str),
    /// The server is shutting down: answer what is in flight first.
    Shutdown,
}

/// The future of one request, boxed so that all of them share one type.
type ExecuteFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// The requests in flight on this connection.
struct InFlight {
    futures: FuturesUnordered<ExecuteFuture>,
    /// How many futures carry each id, to answer them all `shutting_down`
    /// at shutdown. (More than one only for a duplicate id, which the
    /// engine refuses at once.)
    ids: BTreeMap<u64, usize>,
    max: usize,
}

/// Runs the connection until it closes or the server stops.
pub(crate) async fn run<S>(
    ws: WebSocketStream<S>,
    session: Session,
    limits: &Limits,
    config: &WsConfig,
    mut stopped: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let mut in_flight = InFlight {
        futures: FuturesUnordered::new(),
        ids: BTreeMap::new(),
        max: config.max_in_flight,
    };
    let mut heard = Instant::now();
    // `interval` panics on zero.
    let tick = (config.idle_ping / 2).max(Duration::from_millis(1));
    let mut idle = tokio::time::interval(tick);
    idle.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let end = loop {
        tokio::select! {
            biased;
            _ = stopped.changed() => break End::Shutdown,
            Some(reply) = in_flight.futures.next(), if !in_flight.futures.is_empty() => {
                in_flight.finished(&reply);
                if send_replies(&mut sink, reply, &mut in_flight, config).await.is_err() {
                    break End::Gone;
                }
            }
            frame = stream.next() => {
                heard = Instant::now();
                let step = match frame {
                    Some(Ok(message)) => on_message(message, &session, limits, &mut in_flight),
                    Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
                        Err(End::Close(CloseCode::Size, "message too large"))
                    }
                    Some(Err(_)) | None => Err(End::Gone),
                };
                match step {
                    Ok(Some(reply)) => {
                        if send_replies(&mut sink, reply, &mut in_flight, config).await.is_err() {
                            break End::Gone;
                        }
                    }
                    Ok(None) => {}
                    Err(end) => break end,
                }
            }
            _ = idle.tick() => {
                let silence = heard.elapsed();
                if silence >= config.idle_close {
                    break End::Close(CloseCode::Away, "idle");
                }
                if silence >= config.idle_ping
                    && within(config, sink.send(Message::Ping(Vec::new().into()))).await.is_err()
                {
                    break End::Gone;
                }
            }
        }
    };
    say_goodbye(&mut sink, end, &mut in_flight, config).await;
}

/// Handles one incoming message; a reply to send at once, if any.
fn on_message(
    message: Message,
    session: &Session,
    limits: &Limits,
    in_flight: &mut InFlight,
) -> Result<Option<Reply>, End> {
    match message {
        Message::Text(text) => {
            let decoded = decode_request(text.as_bytes(), limits);
            Ok(in_flight.start(session, decoded))
        }
        Message::Binary(_) => Ok(Some(Reply {
            id: None,
            outcome: Err(ServerError::bad_request(
                "binary frames are not accepted; send one JSON request per text frame",
            )),
        })),
        Message::Close(_) => Err(End::Gone),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(None),
    }
}

impl InFlight {
    /// Starts a decoded request, or returns the reply that refuses it.
    fn start(&mut self, session: &Session, decoded: Result<Request, DecodeError>) -> Option<Reply> {
        let request = match decoded {
            Ok(request) => request,
            Err(error) => return Some(error.into_reply()),
        };
        if self.futures.len() >= self.max {
            return Some(Reply {
                id: Some(request.id),
                outcome: Err(ServerError::overloaded(
                    "too many requests in flight on this connection",
                )),
            });
        }
        *self.ids.entry(request.id).or_insert(0) += 1;
        let session = session.clone();
        self.futures
            .push(Box::pin(async move { session.execute(request).await }));
        None
    }

    /// Forgets one future with the id of a reply that is ready.
    fn finished(&mut self, reply: &Reply) {
        let Some(id) = reply.id else { return };
        if let Some(count) = self.ids.get_mut(&id) {
            *count -= 1;
            if *count == 0 {
                self.ids.remove(&id);
            }
        }
    }
}

/// Why a write to the peer did not happen.
struct WriteFailed;

/// Runs one batch of writes to the peer, giving up after `idle_close`: a
/// peer that cannot take it in that long (it stopped reading) is treated as
/// gone, so that it cannot pin its connection (and its ephemeral locks).
async fn within(
    config: &WsConfig,
    write: impl Future<Output = Result<(), WsError>>,
) -> Result<(), WriteFailed> {
    match tokio::time::timeout(config.idle_close, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(WriteFailed),
    }
}

fn text(reply: &Reply) -> Message {
    Message::Text(encode_reply(reply).into())
}

/// Writes `first` and every other reply already complete, then flushes
/// once: as few writes as the load allows.
async fn send_replies<S>(
    sink: &mut Sink<S>,
    first: Reply,
    in_flight: &mut InFlight,
    config: &WsConfig,
) -> Result<(), WriteFailed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // One deadline for the whole batch: a timer per reply would cost the
    // hot path for nothing.
    let write = async {
        let mut reply = first;
        loop {
            sink.feed(text(&reply)).await?;
            match in_flight.futures.next().now_or_never() {
                Some(Some(next)) => {
                    in_flight.finished(&next);
                    reply = next;
                }
                _ => break,
            }
        }
        sink.flush().await
    };
    within(config, write).await
}

async fn say_goodbye<S>(sink: &mut Sink<S>, end: End, in_flight: &mut InFlight, config: &WsConfig)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (code, reason) = match end {
        End::Gone => return,
        End::Close(code, reason) => (code, reason),
        End::Shutdown => {
            for id in std::mem::take(&mut in_flight.ids).into_keys() {
                let reply = Reply {
                    id: Some(id),
                    outcome: Err(ServerError::shutting_down()),
                };
                if within(config, sink.feed(text(&reply))).await.is_err() {
                    return;
                }
            }
            (CloseCode::Away, "server shutting down")
        }
    };
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    // The peer may be gone already; closing is best effort.
    let _ = within(config, sink.send(Message::Close(Some(frame)))).await;
    let _ = within(config, sink.close()).await;
}
