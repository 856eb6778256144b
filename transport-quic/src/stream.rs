//! One request's stream on the server: its request read, and its reply
//! written, at once when quinn has them ready (as it nearly always does:
//! a request arrives whole in one packet, and a reply is far smaller than
//! a stream's window). What cannot be done at once is a [`Work`], a future
//! the connection polls beside its other streams.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use deadbolt_core::Session;
use deadbolt_core::engine::events::Pushed;
use deadbolt_core::engine::session::Unheard;
use deadbolt_core::proto::{
    LockOp, Okay, Op, Reply, Request, RequestId, ServerError, encode_reply,
};
use quinn::{RecvStream, SendStream};
use tokio::sync::{mpsc, watch};

use crate::server::Routes;

/// How long a `shutting_down` answer may take to be acknowledged.
const SHUTDOWN_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A stream's request as it arrives.
pub(crate) struct Reading {
    recv: RecvStream,
    body: Body,
    /// `message_bytes_max`: a longer request is refused `too_large`.
    limit: usize,
}

/// The bytes of a request: nearly always one chunk, quinn's own (no copy).
#[derive(Default)]
pub(crate) enum Body {
    #[default]
    Empty,
    One(Bytes),
    Many(Vec<u8>),
}

/// How reading a stream ended without a request.
pub(crate) enum ReadEnd {
    /// Longer than `message_bytes_max`; the stream's reading is stopped.
    TooLong,
    /// Reset by the client, or the connection went away.
    Gone,
}

impl Body {
    fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// The request's bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Body::Empty => &[],
            Body::One(bytes) => bytes,
            Body::Many(bytes) => bytes,
        }
    }

    /// Adds the next chunk (in order), unless the request would then be
    /// longer than `limit`.
    fn push(&mut self, chunk: Bytes, limit: usize) -> Result<(), ReadEnd> {
        let len = self.len() + chunk.len();
        if len > limit {
            return Err(ReadEnd::TooLong);
        }
        *self = match std::mem::take(self) {
            Body::Empty => Body::One(chunk),
            Body::One(first) => {
                let mut all = Vec::with_capacity(len);
                all.extend_from_slice(&first);
                all.extend_from_slice(&chunk);
                Body::Many(all)
            }
            Body::Many(mut all) => {
                all.extend_from_slice(&chunk);
                Body::Many(all)
            }
        };
        Ok(())
    }
}

impl Reading {
    pub(crate) fn new(recv: RecvStream, limit: usize) -> Reading {
        Reading {
            recv,
            body: Body::Empty,
            limit,
        }
    }

    /// The request, if the client has sent all of it (finished its side).
    /// Pending otherwise: then [`Work::Read`] waits for the rest.
    pub(crate) fn now(&mut self) -> Poll<Result<Body, ReadEnd>> {
        self.poll_read(&mut Context::from_waker(Waker::noop()))
    }

    /// Takes what has arrived; ready with the request once the client has
    /// finished its side. (Unlike quinn's `read_to_end`, a request in one
    /// chunk is not copied, and its end is seen without a second look at
    /// the connection's state.)
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Body, ReadEnd>> {
        loop {
            let mut chunks: [Bytes; 4] = Default::default();
            // Cancel-safe: a read that is pending has taken nothing.
            let read = ready!(pin!(self.recv.read_chunks(&mut chunks)).poll(cx));
            match read {
                Ok(Some(taken)) => {
                    for chunk in chunks.into_iter().take(taken) {
                        if let Err(end) = self.body.push(chunk, self.limit) {
                            // Nothing more of it is wanted.
                            let _ = self.recv.stop(0u32.into());
                            return Poll::Ready(Err(end));
                        }
                    }
                }
                Ok(None) => return Poll::Ready(Ok(std::mem::take(&mut self.body))),
                Err(_) => return Poll::Ready(Err(ReadEnd::Gone)),
            }
        }
    }
}

/// What a stream's [`Work`] hands back to its connection.
pub(crate) enum Finished {
    /// Its request, read (or not).
    Arrived(Arrived),
    /// A grant whose answer could not be written: its client stopped the
    /// stream, so the grant is to be undone.
    Unheard(Unheard),
}

/// A stream's request, read (or not), and where its reply goes.
pub(crate) struct Arrived {
    pub(crate) send: SendStream,
    pub(crate) read: Result<Body, ReadEnd>,
}

/// What is left to do on a stream that needs a future of its own.
pub(crate) enum Work {
    /// Its request is still arriving.
    Read { reading: Reading, send: SendStream },
    /// Its request runs as a future of its own: it may wait, has events,
    /// or needs more than its shard.
    Execute(Execute),
    /// Its reply, which quinn could not take at once.
    Write(Unwritten),
    /// The server is shutting down: answer `shutting_down`, and let the
    /// client have the answer before the connection closes.
    ShuttingDown { send: SendStream, id: RequestId },
}

impl Work {
    /// Does the work; a stream whose request has arrived, or a grant
    /// nobody heard of, is handed back to the connection.
    pub(crate) async fn run(self) -> Option<Finished> {
        match self {
            Work::Read { mut reading, send } => {
                let read = std::future::poll_fn(|cx| reading.poll_read(cx)).await;
                Some(Finished::Arrived(Arrived { send, read }))
            }
            Work::Execute(execute) => {
                execute.run().await;
                None
            }
            Work::Write(unwritten) => unwritten.write().await.map(Finished::Unheard),
            Work::ShuttingDown { send, id } => {
                shutting_down(send, id).await;
                None
            }
        }
    }
}

/// A reply that quinn could not take at once (its stream's or its
/// connection's window is full): the stream, the bytes left to write, and
/// what undoes the reply's grant if they cannot be written.
pub(crate) struct Unwritten {
    send: SendStream,
    rest: Bytes,
    unheard: Option<Unheard>,
}

impl Unwritten {
    /// Writes the rest; the stream is finished when dropped. If the
    /// client stopped the stream (or is gone), nobody hears the reply:
    /// its grant, if any, is given back to be undone.
    async fn write(mut self) -> Option<Unheard> {
        match self.send.write_chunk(self.rest).await {
            Ok(()) => None,
            Err(_) => self.unheard,
        }
    }
}

/// How [`reply_now`] went.
pub(crate) enum Written {
    /// All of it, and the stream finished.
    Done,
    /// Nobody reads it: the client stopped the stream, or is gone. (With
    /// what undoes its grant.)
    Refused(Option<Unheard>),
    /// Not all of it yet.
    Later(Unwritten),
}

/// Answers `shutting_down`, and lets the client have the answer before
/// the connection closes.
async fn shutting_down(mut send: SendStream, id: RequestId) {
    let reply = Reply {
        id: Some(id),
        outcome: Err(ServerError::shutting_down()),
    };
    let bytes = Bytes::from(encode_reply(&reply).into_bytes());
    if send.write_chunk(bytes).await.is_ok() {
        let _ = send.finish();
    }
    // Closing the connection discards unacknowledged stream data: wait
    // (briefly) for the client to have this answer first.
    let _ = tokio::time::timeout(SHUTDOWN_ANSWER_WAIT, send.stopped()).await;
}

/// Writes `reply` on `send` and finishes the stream, if quinn takes all
/// of it now; else the work of writing the rest (`unheard` goes with it).
/// A stream the client stopped takes nothing: nobody reads the reply.
pub(crate) fn reply_now(mut send: SendStream, reply: &Reply, unheard: Option<Unheard>) -> Written {
    let mut bytes = Bytes::from(encode_reply(reply).into_bytes());
    let mut cx = Context::from_waker(Waker::noop());
    while !bytes.is_empty() {
        // Cancel-safe: a write that is pending has written nothing.
        let written = pin!(send.write_chunks(std::slice::from_mut(&mut bytes))).poll(&mut cx);
        match written {
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(_)) => return Written::Refused(unheard),
            Poll::Pending => {
                let rest = bytes;
                return Written::Later(Unwritten {
                    send,
                    rest,
                    unheard,
                });
            }
        }
    }
    // Dropping a send stream finishes it: one look at the connection's
    // state fewer than `finish` and then the drop.
    Written::Done
}

/// A request that runs as a future of its own (see [`Work::Execute`]).
pub(crate) struct Execute {
    pub(crate) send: SendStream,
    pub(crate) request: Request,
    pub(crate) session: Session,
    /// Changes when the server begins to shut down.
    pub(crate) stopped: watch::Receiver<bool>,
    pub(crate) routes: Routes,
}

impl Execute {
    /// Answers the request, and finishes; or, for a request with events
    /// that succeeded, keeps the stream open and writes each event as a
    /// line of its own until the request's events end (then finishes) or
    /// the client stops the stream (then the events stop).
    async fn run(self) {
        let Execute {
            mut send,
            request,
            session,
            mut stopped,
            routes,
        } = self;
        let id = request.id;
        let mut events = has_events(&request.op).then(|| routes.open(id));
        let cancelled = send.stopped();
        let reply = tokio::select! {
            biased;
            // The client stopped waiting: dropping `execute` cancels a queued lock.
            _ = cancelled => return,
            _ = stopped.changed() => return shutting_down(send, id).await,
            reply = session.execute(request) => reply,
        };
        let events = events
            .take()
            .filter(|_| matches!(reply.outcome, Ok(ref ok) if subscribed(ok)));
        let Some(events) = events else {
            routes.close(id);
            // Its answer came through its own future: a grant nobody
            // hears of now is as it always was (the client gave up after
            // the shard answered).
            if let Written::Later(unwritten) = reply_now(send, &reply, None) {
                unwritten.write().await;
            }
            return;
        };
        let mut line = encode_reply(&reply);
        line.push('\n');
        if send.write_all(line.as_bytes()).await.is_ok() {
            write_events(&mut send, events, &mut stopped).await;
        }
        routes.close(id);
        if !session.stop_events(id) {
            // Its events ended on their own: say so by finishing.
            let _ = send.finish();
        }
    }
}

/// Whether `op` asks for pushed events: a `watch`, or a `lock` with
/// `notify`.
pub(crate) fn has_events(op: &Op) -> bool {
    match op {
        Op::Watch { .. } => true,
        Op::Lock(LockOp::Acquire(acquire)) => acquire.notify,
        _ => false,
    }
}

/// Whether a successful reply leaves events coming: a grant (of a `lock`
/// with `notify`) or a watch in place.
fn subscribed(ok: &Okay) -> bool {
    matches!(ok, Okay::Granted(_) | Okay::Empty(_))
}

/// Writes each event as a line until the request's events are done, the
/// client stops the stream, or the server shuts down.
async fn write_events(
    send: &mut SendStream,
    mut events: mpsc::UnboundedReceiver<Pushed>,
    stopped: &mut watch::Receiver<bool>,
) {
    loop {
        let pushed = tokio::select! {
            biased;
            _ = send.stopped() => return,
            _ = stopped.changed() => return,
            pushed = events.recv() => pushed,
        };
        match pushed {
            Some(Pushed::Event { text, charge, .. }) => {
                let mut line = text;
                line.push('\n');
                if send.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
                drop(charge);
            }
            Some(Pushed::Done { .. } | Pushed::Overflow) | None => return,
        }
    }
}
