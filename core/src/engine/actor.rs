//! The shard actor: the driver of one [`Shard`]. It orders what arrives in
//! its mailbox into commands stamped with the engine clock's time, applies
//! them in batches, hands each batch to the journal, and only then releases
//! the batch's answers. It wakes the shard at its next deadline with a
//! [`Input::Tick`] command, so expiries are ordered inputs like any other.

use std::sync::Arc;

use hashbrown::HashMap;
use tokio::sync::oneshot;

use super::mailbox::Inbox;
use super::{Clock, InvariantAlarm, Journal};
use crate::proto::{Okay, Outcome};
use crate::shard::hasher::KeyHasher;
use crate::shard::{Answer, Caller, Command, ConnId, Handle, Input, Shard, ShardOp};
use crate::shard::{Counters, Snapshot};
use crate::time::Tick;

/// What a shard actor is asked.
#[derive(Debug)]
pub(crate) enum ShardMsg {
    /// Carry out `op` and answer on `reply`.
    Op {
        handle: Handle,
        caller: Caller,
        op: ShardOp,
        reply: oneshot::Sender<Outcome>,
    },
    /// Cancel a waiting `lock` (the `cancel` op).
    Cancel { handle: Handle, key: String },
    /// A request's future was dropped before its answer.
    Gone { handle: Handle, key: String },
    /// A connection closed.
    Closed { conn: ConnId },
    /// Report counters, and the top `top` of each list.
    Stats {
        top: usize,
        reply: oneshot::Sender<(Counters, Snapshot)>,
    },
    /// Report the shard's state digest.
    Digest { reply: oneshot::Sender<u64> },
    /// Answer every waiter `shutting_down` and stop.
    Shutdown,
}

/// Most messages applied as one batch before the answers go out and the
/// clock is read again; bounds how late a deadline can be applied under a
/// flood of messages.
const BATCH_MAX: usize = 256;

/// What one actor needs besides its mailbox.
pub(crate) struct ActorSetup {
    pub shard_index: usize,
    pub shard: Shard,
    pub clock: Clock,
    pub journal: Option<Arc<dyn Journal>>,
    pub invariant_alarm: Option<InvariantAlarm>,
}

/// A request waiting for its answer: where the answer goes, and for a
/// `lock`, its key, so that an undeliverable grant can be undone.
struct Pending {
    reply: oneshot::Sender<Outcome>,
    lock_key: Option<String>,
}

struct Actor {
    index: usize,
    shard: Shard,
    clock: Clock,
    journal: Option<Arc<dyn Journal>>,
    invariant_alarm: Option<InvariantAlarm>,
    /// Handles are the engine's own sequence, not a peer's choice, so a
    /// fixed hash seed is safe here.
    pending: HashMap<Handle, Pending, KeyHasher>,
    /// The batch being applied, kept only for the journal.
    batch: Vec<Command>,
    answers: Vec<Answer>,
}

/// Runs one shard until its mailbox closes or it is told to shut down.
pub(crate) async fn run(setup: ActorSetup, mut mailbox: Inbox) {
    let mut actor = Actor {
        index: setup.shard_index,
        shard: setup.shard,
        clock: setup.clock,
        journal: setup.journal,
        invariant_alarm: setup.invariant_alarm,
        pending: HashMap::with_hasher(KeyHasher::with_seed(0)),
        batch: Vec::new(),
        answers: Vec::new(),
    };
    let sleep = tokio::time::sleep_until(actor.clock.instant_of(Tick::ZERO));
    tokio::pin!(sleep);
    let mut armed_for = None;
    loop {
        let next = actor.shard.next_deadline();
        if next != armed_for {
            if let Some(deadline) = next {
                sleep.as_mut().reset(actor.clock.instant_of(deadline));
            }
            armed_for = next;
        }
        tokio::select! {
            // Messages first: a command applies the deadlines due before
            // it anyway.
            biased;
            message = mailbox.recv() => {
                let Some(message) = message else { break };
                if !actor.take_batch(message, &mut mailbox) {
                    break;
                }
            }
            () = &mut sleep, if armed_for.is_some() => {
                let at = actor.clock.now();
                actor.apply(Command { at, input: Input::Tick });
                actor.finish_batch();
                armed_for = None;
            }
        }
    }
    if let Some(journal) = &actor.journal {
        journal.stopped(actor.index, actor.shard.digest());
    }
    actor.shard.shutdown();
    actor.deliver();
}

impl Actor {
    /// Applies `first` and whatever else is already waiting, up to a batch;
    /// `false` means stop.
    fn take_batch(&mut self, first: ShardMsg, mailbox: &mut Inbox) -> bool {
        let at = self.clock.now();
        let mut go_on = self.receive(at, first);
        for _ in 1..BATCH_MAX {
            if !go_on {
                break;
            }
            // Without a journal nothing waits for the batch to be kept, so
            // answers go out at once rather than behind the whole batch (a
            // hand-off to the next waiter is not delayed by the requests
            // queued after the unlock).
            if self.journal.is_none() {
                self.finish_batch();
            }
            let Some(message) = mailbox.try_recv() else {
                break;
            };
            go_on = self.receive(at, message);
        }
        self.finish_batch();
        go_on
    }

    /// Turns one message into a command (or answers it, if it only reads
    /// counters); `false` means stop.
    fn receive(&mut self, at: Tick, message: ShardMsg) -> bool {
        let input = match message {
            ShardMsg::Op {
                handle,
                caller,
                op,
                reply,
            } => {
                let lock_key = match &op {
                    ShardOp::Lock(crate::proto::LockOp::Acquire(a)) => Some(a.key.clone()),
                    _ => None,
                };
                self.pending.insert(handle, Pending { reply, lock_key });
                Input::Op { handle, caller, op }
            }
            ShardMsg::Cancel { handle, key } => Input::Cancel { handle, key },
            ShardMsg::Gone { handle, key } => Input::RequesterGone { handle, key },
            ShardMsg::Closed { conn } => Input::ConnectionClosed { conn },
            ShardMsg::Stats { top, reply } => {
                // The asker may have given up; nothing to do then.
                let _ = reply.send((self.shard.counters(), self.shard.snapshot(top)));
                return true;
            }
            ShardMsg::Digest { reply } => {
                let _ = reply.send(self.shard.digest());
                return true;
            }
            ShardMsg::Shutdown => return false,
        };
        self.apply(Command { at, input });
        true
    }

    fn apply(&mut self, command: Command) {
        if self.journal.is_some() {
            self.batch.push(command.clone());
        }
        self.shard.apply(command);
    }

    /// Ends a batch: checks the invariants if asked, journals the batch,
    /// then releases its answers. An answer that cannot be delivered is
    /// reported to the shard as a command of its own, whose answers go out
    /// in turn.
    fn finish_batch(&mut self) {
        loop {
            if let Some(alarm) = &self.invariant_alarm
                && let Err(broken) = self.shard.check_invariants()
            {
                alarm(self.index, broken);
            }
            if let Some(journal) = &self.journal
                && !self.batch.is_empty()
            {
                journal.record(self.index, &self.batch);
                self.batch.clear();
            }
            let gone = self.deliver();
            if gone.is_empty() {
                return;
            }
            let at = self.shard.now();
            for (handle, key) in gone {
                self.apply(Command {
                    at,
                    input: Input::RequesterGone { handle, key },
                });
            }
        }
    }

    /// Sends every answer to its requester. Returns the grants nobody
    /// received, by handle and key.
    fn deliver(&mut self) -> Vec<(Handle, String)> {
        self.shard.drain_answers_into(&mut self.answers);
        let mut gone = Vec::new();
        for Answer { handle, outcome } in self.answers.drain(..) {
            let Some(pending) = self.pending.remove(&handle) else {
                debug_assert!(false, "answer to unknown handle {handle:?}");
                continue;
            };
            let granted = matches!(outcome, Ok(Okay::Granted(_)));
            if pending.reply.send(outcome).is_err()
                && granted
                && let Some(key) = pending.lock_key
            {
                gone.push((handle, key));
            }
        }
        gone
    }
}
