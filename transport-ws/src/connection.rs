//! One WebSocket connection: read requests, run them concurrently, write
//! replies as they complete, and hold no more reply bytes than its budget
//! ([`WsConfig::pending_reply_bytes_max`]): see [`ReplyBudget`].

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use deadbolt_core::engine::events::{Charge, Events, Pushed};
use deadbolt_core::engine::session::Answers;
use deadbolt_core::proto::{Reply, Request, RequestId, ServerError, decode_request, encode_reply};
use deadbolt_core::{Limits, Session};
use futures_util::stream::{FuturesUnordered, SplitSink};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::config::WsConfig;
use crate::gauges::WsGauges;

type Sink<S> = SplitSink<WebSocketStream<S>, Message>;

/// Why the loop ended, and how to say goodbye.
enum End {
    /// The client closed: nothing more to send.
    Gone,
    /// The connection broke (why): nothing more can be sent.
    Broken(String),
    /// Close with this code and reason.
    Close(CloseCode, &'static str),
    /// Close with 1002 for this violation of RFC 6455.
    Violation(String),
    /// The server is shutting down: answer what is in flight first.
    Shutdown,
}

/// A reply ready to write, and the bytes its request had reserved.
struct Finished {
    reply: Reply,
    reserved: usize,
}

impl Finished {
    /// A reply sent at once, without running a request.
    fn now(reply: Reply) -> Finished {
        Finished { reply, reserved: 0 }
    }
}

/// The future of one request, boxed so that all of them share one type.
type ExecuteFuture = Pin<Box<dyn Future<Output = Finished> + Send>>;

/// The requests in flight on this connection: those that run as a future
/// of their own, and those submitted to their shard whose answers come
/// through the connection's queue ([`Answers`]), which costs no future, no
/// task wake-up and no channel per request.
struct InFlight {
    futures: FuturesUnordered<ExecuteFuture>,
    answers: Option<Answers>,
    /// Requests submitted through `answers` and not yet answered.
    submitted: usize,
    /// How many futures carry each id, to answer them all `shutting_down`
    /// at shutdown. (More than one only for a duplicate id, which the
    /// engine refuses at once.)
    ids: BTreeMap<u64, usize>,
    max: usize,
}

/// The bytes of replies this connection holds, against its budget. A
/// reply is counted from the moment it may exist until it is written:
///
/// - a request in flight whose reply may be large ([`Op::reply_bytes_bound`](deadbolt_core::proto::Op::reply_bytes_bound)) is
///   counted at the most its reply may take from the moment it starts,
///   since the shard builds that reply whether or not the connection is
///   ready to write it;
/// - a finished reply is counted at its encoded size until the flush that
///   writes it completes.
///
/// A request is started only if it fits (or if nothing is held), and the
/// connection reads no more requests while one waits to fit or the budget
/// is spent: so it holds at most the budget plus one reply, and a client
/// that pipelines large requests and reads nothing is slowed to the pace
/// at which it reads, then dropped at `idle_close` as any stalled reader.
/// Small replies (a lock's, a ping's) reserve nothing: they are counted
/// when finished, and `max_in_flight` bounds how many there can be.
struct ReplyBudget {
    max: usize,
    reserved: usize,
    pending: usize,
    gauges: WsGauges,
}

impl ReplyBudget {
    fn new(config: &WsConfig) -> ReplyBudget {
        ReplyBudget {
            max: config.pending_reply_bytes_max,
            reserved: 0,
            pending: 0,
            gauges: config.gauges.clone(),
        }
    }

    fn held(&self) -> usize {
        self.reserved + self.pending
    }

    /// Whether a request reserving `bound` may start now.
    fn fits(&self, bound: usize) -> bool {
        self.held() == 0 || self.held() + bound <= self.max
    }

    /// Whether to read more requests.
    fn has_room(&self) -> bool {
        self.held() == 0 || self.held() < self.max
    }

    fn reserve(&mut self, bound: usize) {
        self.reserved += bound;
        self.gauges.add_pending(bound);
    }

    /// A reply of `bytes` is ready to write in place of its reservation.
    fn finished(&mut self, reserved: usize, bytes: usize) {
        self.reserved -= reserved;
        self.pending += bytes;
        self.gauges.sub_pending(reserved);
        self.gauges.add_pending(bytes);
    }

    /// Replies of `bytes` in all are written.
    fn written(&mut self, bytes: usize) {
        self.pending -= bytes;
        self.gauges.sub_pending(bytes);
    }
}

impl Drop for ReplyBudget {
    fn drop(&mut self) {
        self.gauges.sub_pending(self.held());
    }
}

/// A request read while the budget had no room for it; it starts, and
/// reading resumes, once it fits.
struct Parked {
    request: Request,
    bound: usize,
    /// When its frame was read (its duration counts from there).
    received: Instant,
}

impl End {
    /// What went wrong, if the connection ended on an error (its own, or
    /// the peer's), for the one log line about it.
    fn trouble(&self) -> Option<String> {
        match self {
            End::Gone | End::Shutdown => None,
            End::Broken(why) => Some(why.clone()),
            End::Close(code, reason) => Some(format!("closed with {}: {reason}", u16::from(*code))),
            End::Violation(violation) => Some(format!("closed with 1002: {violation}")),
        }
    }
}

/// Why replies could not be written (within `idle_close`).
const CANNOT_WRITE: &str = "cannot write replies: the peer is gone or reads nothing";

/// Runs the connection until it closes or the server stops. Returns what
/// went wrong, if it ended on an error.
pub(crate) async fn run<S>(
    ws: WebSocketStream<S>,
    session: Session,
    limits: &Limits,
    config: &WsConfig,
    mut stopped: watch::Receiver<bool>,
) -> Option<String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let mut in_flight = InFlight {
        futures: FuturesUnordered::new(),
        answers: session.take_answers(),
        submitted: 0,
        ids: BTreeMap::new(),
        max: config.max_in_flight,
    };
    let mut budget = ReplyBudget::new(config);
    let mut parked: Option<Parked> = None;
    let mut heard = Instant::now();
    // `interval` panics on zero.
    let tick = (config.idle_ping / 2).max(Duration::from_millis(1));
    let mut idle = tokio::time::interval(tick);
    idle.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Made once and polled on every turn of the loop: made anew on each
    // turn they cost a watch subscription and its registration per request.
    let shutdown = stopped.changed();
    tokio::pin!(shutdown);
    let ended = session.ended();
    tokio::pin!(ended);
    let mut events = session.take_events();
    // Events of requests whose reply is not written yet: a client hears
    // of a grant before it hears of its lease.
    let mut held_back: Vec<(RequestId, String, Charge)> = Vec::new();
    let end = loop {
        if !held_back.is_empty()
            && write_held_back(&mut sink, &mut held_back, &in_flight.ids, config)
                .await
                .is_err()
        {
            break End::Broken(CANNOT_WRITE.into());
        }
        if let Some(waiting) = parked.take_if(|p| budget.fits(p.bound)) {
            let refused = in_flight.start(&session, waiting, &mut budget);
            if let Some(reply) = refused {
                let sent = send_replies(&mut sink, reply, &mut in_flight, &mut budget, config);
                if sent.await.is_err() {
                    break End::Broken(CANNOT_WRITE.into());
                }
            }
        }
        let reading = parked.is_none() && budget.has_room();
        tokio::select! {
            biased;
            _ = &mut shutdown => break End::Shutdown,
            // In a cluster, the leader that granted this connection an
            // ephemeral lock stopped leading: the lock is gone, and the
            // client learns it from the close, as after a restart.
            () = &mut ended => break End::Close(CloseCode::Restart, "leader changed"),
            done = in_flight.next_done(), if in_flight.len() > 0 => {
                in_flight.finished(&done.reply);
                if in_flight.submitted > 0 {
                    // Others are with their shards: let the shards (already
                    // woken) answer first, so that their replies go out
                    // with this one, in one write. (A waiting lock's future
                    // may wait for long: it is no reason to yield.)
                    tokio::task::yield_now().await;
                }
                // A large reply (a page, a snapshot) takes a while to
                // encode and write.
                let large = done.reserved > 0;
                let sent = send_replies(&mut sink, done, &mut in_flight, &mut budget, config);
                if sent.await.is_err() {
                    break End::Broken(CANNOT_WRITE.into());
                }
                if large {
                    // Let other connections run, and tokio look for their
                    // sockets' readiness, before the next one: a client
                    // whose pages and shard wake each other in turn would
                    // otherwise keep everyone else waiting (issue 18).
                    tokio::task::yield_now().await;
                }
            }
            frame = stream.next(), if reading => {
                heard = Instant::now();
                // The frames already read (or readable now) are taken in
                // this one turn, up to a bound: the loop's other checks,
                // and the first poll of their requests, are then made once
                // for all of them rather than once per frame.
                let mut frame = frame;
                let mut taken = 1;
                let stop = loop {
                    let reply = match on_frame(frame, heard, limits, &session, &mut in_flight, &mut budget, &mut parked) {
                        Ok(reply) => reply,
                        Err(end) => break Some(end),
                    };
                    if let Some(reply) = reply {
                        let sent = send_replies(&mut sink, reply, &mut in_flight, &mut budget, config);
                        if sent.await.is_err() {
                            break Some(End::Broken(CANNOT_WRITE.into()));
                        }
                    }
                    let room = parked.is_none() && budget.has_room();
                    if !room || taken >= READ_BATCH_MAX {
                        break None;
                    }
                    match stream.next().now_or_never() {
                        Some(next) => frame = next,
                        None => break None,
                    }
                    taken += 1;
                };
                if let Some(end) = stop {
                    break end;
                }
            }
            pushed = next_event(&mut events), if events.is_some() => match pushed {
                Some(Pushed::Event { id, text, charge }) => {
                    if in_flight.ids.contains_key(&id) {
                        held_back.push((id, text, charge));
                    } else if within(config, sink.send(Message::Text(text.into()))).await.is_err() {
                        break End::Broken(CANNOT_WRITE.into());
                    } else {
                        drop(charge);
                    }
                }
                Some(Pushed::Done { .. }) => {}
                // The client let its events pile up past the bound: it
                // reads too slowly for them, as a stalled reader would.
                Some(Pushed::Overflow) => break End::Close(CloseCode::Policy, "events not read"),
                None => events = None,
            },
            _ = idle.tick() => {
                let silence = heard.elapsed();
                if silence >= config.idle_close {
                    break End::Close(CloseCode::Away, "idle");
                }
                if silence >= config.idle_ping
                    && within(config, sink.send(Message::Ping(Vec::new().into()))).await.is_err()
                {
                    break End::Broken(CANNOT_WRITE.into());
                }
            }
        }
    };
    if let Some(waiting) = parked {
        // Read, never started: it is answered `shutting_down` as well.
        *in_flight.ids.entry(waiting.request.id).or_insert(0) += 1;
    }
    let trouble = end.trouble();
    say_goodbye(&mut sink, end, &mut in_flight, config).await;
    trouble
}

/// Most frames taken in one turn of the connection's loop, before it
/// looks at its replies, events, timers and shutdown again.
const READ_BATCH_MAX: usize = 64;

/// Takes one frame read from the peer: starts its request (or parks it,
/// if the budget has no room for its reply yet). Returns a reply to send
/// at once (a refusal), or how the connection ends.
fn on_frame(
    frame: Option<Result<Message, WsError>>,
    received: Instant,
    limits: &Limits,
    session: &Session,
    in_flight: &mut InFlight,
    budget: &mut ReplyBudget,
    parked: &mut Option<Parked>,
) -> Result<Option<Finished>, End> {
    let step = match frame {
        Some(Ok(message)) => on_message(message, limits)?,
        Some(Err(error)) => return Err(ending(error)),
        None => return Err(End::Gone),
    };
    Ok(match step {
        Incoming::Request(request) => {
            let bound = request.op.reply_bytes_bound(limits.message_bytes_max);
            let waiting = Parked {
                request,
                bound,
                received,
            };
            if budget.fits(bound) {
                in_flight.start(session, waiting, budget)
            } else {
                *parked = Some(waiting);
                None
            }
        }
        Incoming::Answer(reply) => Some(Finished::now(reply)),
        Incoming::Nothing => None,
    })
}

/// The next event of the connection's queue; never, without one.
async fn next_event(events: &mut Option<Events>) -> Option<Pushed> {
    match events {
        Some(events) => events.next().await,
        None => std::future::pending().await,
    }
}

/// Writes the held-back events whose request's reply has been written,
/// in the order they came.
async fn write_held_back<S>(
    sink: &mut Sink<S>,
    held_back: &mut Vec<(RequestId, String, Charge)>,
    in_flight: &BTreeMap<u64, usize>,
    config: &WsConfig,
) -> Result<(), WriteFailed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(held_back)
        .into_iter()
        .partition(|(id, _, _)| !in_flight.contains_key(id));
    *held_back = waiting;
    for (_, text, charge) in ready {
        within(config, sink.send(Message::Text(text.into()))).await?;
        drop(charge);
    }
    Ok(())
}

/// How to end the connection after a read error: the RFC 6455 close code
/// for what the peer did wrong, or nothing to say if the connection itself
/// failed.
fn ending(error: WsError) -> End {
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            End::Close(CloseCode::Size, "message too large")
        }
        WsError::Utf8(_) => End::Close(CloseCode::Invalid, "text is not valid UTF-8"),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            End::Broken("the peer reset the connection without a close".into())
        }
        WsError::Protocol(violation) => End::Violation(violation.to_string()),
        WsError::ConnectionClosed | WsError::AlreadyClosed => End::Gone,
        error => End::Broken(error.to_string()),
    }
}

/// What one incoming message asks of the connection.
enum Incoming {
    /// A request to run.
    Request(Request),
    /// A reply to send at once (a refusal).
    Answer(Reply),
    /// Nothing (a ping or pong, which tungstenite answers itself).
    Nothing,
}

/// Reads one incoming message.
fn on_message(message: Message, limits: &Limits) -> Result<Incoming, End> {
    match message {
        Message::Text(text) => Ok(match decode_request(text.as_bytes(), limits) {
            Ok(request) => Incoming::Request(request),
            Err(error) => Incoming::Answer(error.into_reply()),
        }),
        Message::Binary(_) => Ok(Incoming::Answer(Reply {
            id: None,
            outcome: Err(ServerError::bad_request(
                "binary frames are not accepted; send one JSON request per text frame",
            )),
        })),
        Message::Close(_) => Err(End::Gone),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(Incoming::Nothing),
    }
}

impl InFlight {
    /// Starts a request with its reservation, or returns the reply that
    /// refuses it.
    fn start(
        &mut self,
        session: &Session,
        waiting: Parked,
        budget: &mut ReplyBudget,
    ) -> Option<Finished> {
        let Parked {
            request,
            bound,
            received,
        } = waiting;
        if self.len() >= self.max {
            return Some(Finished::now(Reply {
                id: Some(request.id),
                outcome: Err(ServerError::overloaded(
                    "too many requests in flight on this connection",
                )),
            }));
        }
        *self.ids.entry(request.id).or_insert(0) += 1;
        // A reply that reserves nothing may go through the queue; one
        // that does must keep its reservation with it.
        let request = match &self.answers {
            Some(answers) if bound == 0 => match answers.submit(request, received) {
                Ok(()) => {
                    self.submitted += 1;
                    return None;
                }
                Err(request) => request,
            },
            _ => request,
        };
        budget.reserve(bound);
        let session = session.clone();
        self.futures.push(Box::pin(async move {
            Finished {
                reply: session.execute(request).await,
                reserved: bound,
            }
        }));
        None
    }

    /// How many requests are in flight.
    fn len(&self) -> usize {
        self.futures.len() + self.submitted
    }

    /// The next request done: a submitted one's answer, or a future's.
    /// Pending while there is none.
    fn poll_done(&mut self, cx: &mut Context<'_>) -> Poll<Finished> {
        if self.submitted > 0
            && let Some(answers) = self.answers.as_mut()
            && let Poll::Ready(Some(reply)) = answers.poll_next(cx)
        {
            self.submitted -= 1;
            return Poll::Ready(Finished::now(reply));
        }
        match self.futures.poll_next_unpin(cx) {
            Poll::Ready(Some(done)) => Poll::Ready(done),
            // Empty: nothing to wait for until a request starts.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    /// The next request done, once there is one.
    async fn next_done(&mut self) -> Finished {
        std::future::poll_fn(|cx| self.poll_done(cx)).await
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
/// once: as few writes as the load allows. The replies count against the
/// budget until the flush is done.
async fn send_replies<S>(
    sink: &mut Sink<S>,
    first: Finished,
    in_flight: &mut InFlight,
    budget: &mut ReplyBudget,
    config: &WsConfig,
) -> Result<(), WriteFailed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut batch_bytes = 0;
    // One deadline for the whole batch: a timer per reply would cost the
    // hot path for nothing.
    let write = async {
        let mut done = first;
        loop {
            let message = text(&done.reply);
            budget.finished(done.reserved, message.len());
            batch_bytes += message.len();
            sink.feed(message).await?;
            match in_flight.next_done().now_or_never() {
                Some(next) => {
                    in_flight.finished(&next.reply);
                    done = next;
                }
                _ => break,
            }
        }
        sink.flush().await
    };
    let written = within(config, write).await;
    budget.written(batch_bytes);
    written
}

async fn say_goodbye<S>(sink: &mut Sink<S>, end: End, in_flight: &mut InFlight, config: &WsConfig)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (code, reason) = match end {
        End::Gone | End::Broken(_) => return,
        End::Close(code, reason) => (code, reason),
        End::Violation(_) => (CloseCode::Protocol, "protocol violation"),
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
