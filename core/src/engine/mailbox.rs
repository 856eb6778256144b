//! A shard's mailbox: one ordered channel in which requests are admitted up
//! to a bound, and notices are never refused.
//!
//! Requests (ops) beyond the bound are refused at once, so a flood is
//! answered `overloaded` instead of queued without end. Notices (a
//! connection closed, a requester gone, a cancel) must never be refused: an
//! ephemeral lock would outlive its connection, and a mass disconnect would
//! fill the mailbox and turn a bystander's request into `overloaded`. They
//! are bounded by construction instead: one `closed` per connection and
//! shard, at most one `gone` or `cancel` per request in flight, and
//! connections and requests in flight are bounded by the frontends. Both
//! kinds share one channel so that a notice never overtakes the request it
//! is about (a `gone` before its `lock` would leave the waiter queued for
//! nobody; a `closed` before an ephemeral `lock` would leave that lock held
//! for a closed connection).
//!
//! ## Fair turns
//!
//! The inbox also decides the order in which the shard takes its messages,
//! so that one connection's flood of heavy requests cannot hold up
//! everyone else's (issue 18: another client's `inspect_set` waited 4 to 7
//! s behind 4,096 pipelined `members` pages). A heavy request (a `members`
//! page) is put off into its connection's queue; the shard takes every
//! other message first, in arrival order, and the put-off ones in turns,
//! one connection after another, at most [`TURN_COST_MAX`] keys of pages
//! per turn (at least one page) before it looks at new messages again. So
//! a bystander waits behind at most one turn, however many pages are
//! queued, and two flooding connections share the shard evenly.
//!
//! What this reorders, and why that is safe: only reads are put off, and a
//! read answers what the state is when it is taken, as if it had arrived
//! then. A connection's later requests on the same set wait behind its own
//! put-off pages (a page must not see an insert sent after it); its other
//! requests go ahead, since they touch nothing a page reads (lock keys,
//! other sets). Lock requests are never put off, so waiters on a key
//! still queue in arrival order, and writes from different connections
//! keep theirs. All of this happens before a command is stamped: the
//! order of stamping is the order of the log and of every replay.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use super::actor::ShardMsg;
use crate::proto::{Keys, SetOp};
use crate::shard::{ConnId, ShardOp};

/// Most keys of `members` pages a shard serves from put-off queues in one
/// turn (one full page), before it takes new messages again: bounds how
/// long a bystander's request waits behind a flood.
pub(crate) const TURN_COST_MAX: u64 = 10_000;

/// The sending side, held by the engine.
#[derive(Debug)]
pub(crate) struct Mailbox {
    tx: mpsc::UnboundedSender<ShardMsg>,
    /// Requests sent and not yet received.
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

/// The receiving side, held by the shard's actor.
#[derive(Debug)]
pub(crate) struct Inbox {
    rx: mpsc::UnboundedReceiver<ShardMsg>,
    queued: Arc<AtomicUsize>,
    /// Heavy requests put off, by connection.
    put_off: PutOff,
    /// Keys of pages this turn may still serve from `put_off`.
    budget: u64,
    /// A put-off request was served since the shard last yielded.
    served_heavy: bool,
}

/// The requests put off, each connection's in arrival order, and the turn
/// order of the connections that have any.
#[derive(Debug, Default)]
struct PutOff {
    queues: HashMap<ConnId, ConnQueue>,
    turns: VecDeque<ConnId>,
}

/// One connection's put-off requests, and how many of them name each set
/// (a later request on one of these sets waits behind them).
#[derive(Debug, Default)]
struct ConnQueue {
    messages: VecDeque<ShardMsg>,
    sets: HashMap<String, usize>,
}

/// Why a request was not admitted.
#[derive(Debug)]
pub(crate) enum Refused {
    /// `capacity` requests wait already.
    Full,
    /// The shard has stopped.
    Closed,
}

/// A mailbox that admits up to `capacity` waiting requests.
pub(crate) fn mailbox(capacity: usize) -> (Mailbox, Inbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let mailbox = Mailbox {
        tx,
        queued: Arc::clone(&queued),
        capacity: capacity.max(1),
    };
    let inbox = Inbox {
        rx,
        queued,
        put_off: PutOff::default(),
        budget: TURN_COST_MAX,
        served_heavy: false,
    };
    (mailbox, inbox)
}

impl Mailbox {
    /// Sends a request, unless `capacity` requests wait already.
    pub fn try_request(&self, message: ShardMsg) -> Result<(), Refused> {
        self.try_admit(message).map_err(|(refused, _)| refused)
    }

    /// As [`Mailbox::try_request`], giving a refused request back (its
    /// answer then goes where the request said); boxed, as refusals are
    /// rare and the message is large.
    pub fn try_admit(&self, message: ShardMsg) -> Result<(), (Refused, Box<ShardMsg>)> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err((Refused::Full, Box::new(message)));
        }
        self.tx.send(message).map_err(|unsent| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            (Refused::Closed, Box::new(unsent.0))
        })
    }

    /// Sends a notice, or an internal message (stats, digest, shutdown):
    /// never refused. Returns `false` only if the shard has stopped, which
    /// needs no notice any more.
    pub fn notify(&self, message: ShardMsg) -> bool {
        self.tx.send(message).is_ok()
    }
}

impl Inbox {
    /// The next message, once there is one, starting a new turn; `None`
    /// once every sender is gone and nothing is put off. Cancel-safe: a
    /// message taken from the channel is never held across an await.
    pub async fn recv(&mut self) -> Option<ShardMsg> {
        self.budget = TURN_COST_MAX;
        if std::mem::take(&mut self.served_heavy) || !self.put_off.is_empty() {
            // Let the connections' tasks run first, so that requests they
            // read meanwhile reach the channel and go ahead of the next
            // turn. A yield also makes tokio poll for socket readiness
            // before this task runs again: a flood whose connection and
            // shard wake each other in turn would otherwise keep the
            // worker from looking at other sockets for tokio's event
            // interval (61 task polls, 61 pages: ~100 ms under the
            // members flood, measured by `deadbolt-bench abuse`).
            tokio::task::yield_now().await;
        }
        if self.put_off.is_empty() {
            let message = self.rx.recv().await?;
            if let Some(now) = self.admit(message) {
                return Some(now);
            }
        }
        self.try_recv()
    }

    /// The next message if one is waiting: a new one first, else a put-off
    /// one while the turn's budget lasts.
    pub fn try_recv(&mut self) -> Option<ShardMsg> {
        while let Ok(message) = self.rx.try_recv() {
            if let Some(now) = self.admit(message) {
                return Some(now);
            }
        }
        self.next_put_off()
    }

    /// `message` if the shard should take it now; `None` if it was put off
    /// (or, for a closed connection's put-off requests, dropped).
    fn admit(&mut self, message: ShardMsg) -> Option<ShardMsg> {
        match &message {
            ShardMsg::Op { caller, op, .. } => {
                let conn = caller.conn;
                if heavy(op) || self.put_off.waits_behind(conn, op) {
                    self.put_off.push(conn, message);
                    return None;
                }
            }
            ShardMsg::Closed { conn } => {
                // Nobody listens for its pages any more.
                let dropped = self.put_off.forget(*conn);
                self.queued.fetch_sub(dropped, Ordering::AcqRel);
            }
            _ => {}
        }
        Some(self.received(message))
    }

    /// The next put-off request, by turns across connections, if the
    /// turn's budget allows.
    fn next_put_off(&mut self) -> Option<ShardMsg> {
        if self.budget == 0 {
            return None;
        }
        let message = self.put_off.pop_next()?;
        if let ShardMsg::Op { op, .. } = &message {
            self.budget = self.budget.saturating_sub(cost(op));
        }
        self.served_heavy = true;
        Some(self.received(message))
    }

    fn received(&self, message: ShardMsg) -> ShardMsg {
        if matches!(message, ShardMsg::Op { .. }) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        message
    }
}

impl PutOff {
    fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }

    /// Whether `op` from `conn` must wait behind that connection's put-off
    /// requests: it names a set one of them reads.
    fn waits_behind(&self, conn: ConnId, op: &ShardOp) -> bool {
        let (Some(queue), ShardOp::Set(op)) = (self.queues.get(&conn), op) else {
            return false;
        };
        queue.sets.contains_key(op.set())
    }

    fn push(&mut self, conn: ConnId, message: ShardMsg) {
        let queue = self.queues.entry(conn).or_insert_with(|| {
            self.turns.push_back(conn);
            ConnQueue::default()
        });
        if let ShardMsg::Op {
            op: ShardOp::Set(op),
            ..
        } = &message
        {
            *queue.sets.entry(op.set().to_owned()).or_default() += 1;
        }
        queue.messages.push_back(message);
    }

    /// The oldest put-off request of the connection whose turn it is; that
    /// connection goes to the back of the line if it has more.
    fn pop_next(&mut self) -> Option<ShardMsg> {
        let conn = self.turns.pop_front()?;
        let queue = self.queues.get_mut(&conn)?;
        let message = queue.messages.pop_front()?;
        if let ShardMsg::Op {
            op: ShardOp::Set(op),
            ..
        } = &message
            && let Some(count) = queue.sets.get_mut(op.set())
        {
            *count -= 1;
            if *count == 0 {
                queue.sets.remove(op.set());
            }
        }
        if queue.messages.is_empty() {
            self.queues.remove(&conn);
        } else {
            self.turns.push_back(conn);
        }
        Some(message)
    }

    /// Drops a closed connection's put-off requests: how many.
    fn forget(&mut self, conn: ConnId) -> usize {
        let Some(queue) = self.queues.remove(&conn) else {
            return 0;
        };
        self.turns.retain(|&c| c != conn);
        queue.messages.len()
    }
}

/// Whether `op` is put off behind others' requests: a `members` page, the
/// one request whose work grows with what it asks (up to 10,000 keys).
fn heavy(op: &ShardOp) -> bool {
    matches!(op, ShardOp::Set(SetOp::Members { .. }))
}

/// What serving `op` costs a turn, in keys.
fn cost(op: &ShardOp) -> u64 {
    match op {
        ShardOp::Set(SetOp::Members { limit, .. }) => u64::from(*limit).max(1),
        ShardOp::Set(SetOp::Insert {
            keys: Keys::Many(keys),
            ..
        }) => keys.len() as u64,
        _ => 1,
    }
}
