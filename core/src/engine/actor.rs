//! The shard actor: the driver of one [`Shard`]. It orders what arrives in
//! its mailbox into commands stamped with the engine clock's time and wakes
//! the shard at its next deadline with an [`Input::Tick`] command, so
//! expiries are ordered inputs like any other.
//!
//! Without a journal it applies each command at once and answers at once.
//! With one it logs first: a batch of stamped commands goes to the journal,
//! and only once the journal has kept it does the shard apply it and
//! release its answers (a refused batch changes nothing).

use std::sync::Arc;

use hashbrown::HashMap;
use tokio::sync::oneshot;

use super::mailbox::Inbox;
use super::{Clock, InvariantAlarm, Journal};
use crate::proto::ServerError;
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

/// Most messages taken as one batch before the answers go out and the
/// clock is read again; bounds how late a deadline can be applied under a
/// flood of messages (and, with a journal, the size of one log append).
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
    /// Notices that a journal refused, to be logged again with the next
    /// batch: a closed connection or a gone requester must not be lost.
    retry: Vec<Input>,
    /// After the journal refused a batch, the time before which a deadline
    /// does not wake the shard (a full disk must not spin it).
    quiet_until: Option<tokio::time::Instant>,
    shard: Shard,
    clock: Clock,
    journal: Option<Arc<dyn Journal>>,
    invariant_alarm: Option<InvariantAlarm>,
    /// Handles are the engine's own sequence, not a peer's choice, so a
    /// fixed hash seed is safe here.
    pending: HashMap<Handle, Pending, KeyHasher>,
    /// With a journal, the commands stamped but not yet kept and applied.
    batch: Vec<Command>,
    answers: Vec<Answer>,
}

/// How long a shard whose journal refused a batch lets its deadlines wait
/// before trying again.
const RETRY_AFTER_REFUSAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs one shard until its mailbox closes or it is told to shut down.
pub(crate) async fn run(setup: ActorSetup, mut mailbox: Inbox) {
    let attention = setup
        .journal
        .as_ref()
        .and_then(|j| j.attention(setup.shard_index));
    let mut actor = Actor {
        index: setup.shard_index,
        retry: Vec::new(),
        quiet_until: None,
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
                sleep.as_mut().reset(actor.wake_at(deadline));
            }
            armed_for = next;
        }
        let go_on = tokio::select! {
            // Messages first: a command applies the deadlines due before
            // it anyway.
            biased;
            message = mailbox.recv() => match message {
                Some(message) => actor.take_batch(message, &mut mailbox),
                None => false,
            },
            () = &mut sleep, if armed_for.is_some() => {
                let at = actor.clock.now();
                actor.stamp(Command { at, input: Input::Tick });
                armed_for = None;
                true
            }
            () = wait_for(attention.as_deref()) => true,
        };
        actor.finish_batch().await;
        if !go_on {
            break;
        }
    }
    if let Some(journal) = &actor.journal {
        journal.stopped(actor.index, actor.shard.digest());
    }
    actor.shard.shutdown();
    actor.deliver();
}

/// Resolves when `notify` is notified; never, without one.
async fn wait_for(notify: Option<&tokio::sync::Notify>) {
    match notify {
        Some(notify) => notify.notified().await,
        None => std::future::pending().await,
    }
}

impl Actor {
    /// When to wake for `deadline`: then, unless the journal asked for
    /// quiet.
    fn wake_at(&self, deadline: Tick) -> tokio::time::Instant {
        let at = self.clock.instant_of(deadline);
        self.quiet_until.map_or(at, |quiet| at.max(quiet))
    }

    /// Takes `first` and whatever else is already waiting, up to a batch;
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
                self.release_unjournaled();
            }
            let Some(message) = mailbox.try_recv() else {
                break;
            };
            go_on = self.receive(at, message);
        }
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
        self.stamp(Command { at, input });
        true
    }

    /// Orders a command: applied at once without a journal, kept for the
    /// next append with one.
    fn stamp(&mut self, command: Command) {
        if self.journal.is_some() {
            self.batch.push(command);
        } else {
            self.shard.apply(command);
        }
    }

    /// Ends a batch: with a journal, keeps the batch and then applies it;
    /// either way, checks the invariants if asked and releases the answers.
    /// An answer that cannot be delivered is reported to the shard as a
    /// command of its own, whose answers go out in turn.
    async fn finish_batch(&mut self) {
        let Some(journal) = self.journal.clone() else {
            self.release_unjournaled();
            return;
        };
        loop {
            self.restamp_retries();
            if !self.batch.is_empty() {
                let batch = std::mem::take(&mut self.batch);
                if let Err(error) = journal.append(self.index, &batch).await {
                    self.refuse(batch, error);
                    return;
                }
                self.quiet_until = None;
                for command in batch {
                    self.shard.apply(command);
                }
            }
            self.check_invariants();
            journal.applied(self.index, &self.shard).await;
            let gone = self.deliver();
            if gone.is_empty() {
                return;
            }
            self.stamp_gone(gone);
        }
    }

    /// Without a journal: checks the invariants if asked, then releases the
    /// answers, and reports undeliverable grants until none is left.
    fn release_unjournaled(&mut self) {
        loop {
            self.check_invariants();
            let gone = self.deliver();
            if gone.is_empty() {
                return;
            }
            self.stamp_gone(gone);
        }
    }

    fn check_invariants(&self) {
        if let Some(alarm) = &self.invariant_alarm
            && let Err(broken) = self.shard.check_invariants()
        {
            alarm(self.index, broken);
        }
    }

    /// Reports grants nobody received as commands of their own.
    fn stamp_gone(&mut self, gone: Vec<(Handle, String)>) {
        let at = self.shard.now().max(self.clock.now());
        for (handle, key) in gone {
            self.stamp(Command {
                at,
                input: Input::RequesterGone { handle, key },
            });
        }
    }

    /// The journal kept nothing of `batch`: its requests are answered
    /// `error`, its notices wait for the next batch, and its ticks are
    /// dropped (the next command applies the deadlines anyway).
    fn refuse(&mut self, batch: Vec<Command>, error: ServerError) {
        for command in batch {
            match command.input {
                Input::Op { handle, .. } => {
                    if let Some(pending) = self.pending.remove(&handle) {
                        // Nobody changed anything for a requester who left.
                        let _ = pending.reply.send(Err(error.clone()));
                    }
                }
                Input::Tick => {}
                notice => self.retry.push(notice),
            }
        }
        self.quiet_until = Some(tokio::time::Instant::now() + RETRY_AFTER_REFUSAL);
    }

    /// Puts the notices a journal refused before the new batch, stamped
    /// now.
    fn restamp_retries(&mut self) {
        if self.retry.is_empty() {
            return;
        }
        let at = self.clock.now();
        let notices = self.retry.drain(..).map(|input| Command { at, input });
        let fresh = std::mem::take(&mut self.batch);
        self.batch = notices.chain(fresh).collect();
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
