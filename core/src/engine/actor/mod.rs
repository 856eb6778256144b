//! The shard actor: the driver of one [`Shard`]. It orders what arrives in
//! its mailbox into commands stamped with the engine clock's time and wakes
//! the shard at its next deadline with an [`Input::Tick`] command, so
//! expiries are ordered inputs like any other.
//!
//! Without a journal it applies each command at once and answers at once.
//! With one it logs first: a batch of stamped commands goes to the journal,
//! and only once the journal has kept it does the shard apply it and
//! release its answers (a refused batch changes nothing).

use std::collections::VecDeque;
use std::sync::Arc;

use hashbrown::HashMap;
use tokio::sync::oneshot;
use tokio::time::Instant;

mod replicated;

use super::events::{Listener, Listeners};
use super::mailbox::Inbox;
use super::replica::ActorReplica;
use super::session::Queued;
use super::{Append, Clock, InvariantAlarm, Journal};
use crate::proto::ServerError;
use crate::proto::{Okay, Outcome, RequestId, Watched};
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
        reply: Respond,
        /// For a `lock` with `notify`: who hears of the grant's lease and
        /// end (see `events`). Boxed: every request's message carries the
        /// field, and few use it.
        notify: Option<Box<Listener>>,
    },
    /// Start a `watch` (answered on `reply` once it is in place).
    Watch {
        target: Watched,
        listener: Listener,
        reply: oneshot::Sender<()>,
    },
    /// Stop the events of request `id` of connection `conn`.
    Unwatch { conn: ConnId, id: RequestId },
    /// Start reporting events (a follower, before it forwards a `lock`
    /// with `notify`, so that the grant's end is seen however soon).
    EnableEvents,
    /// Follow the grant `token` of `key` (`ttl_ms` long) that another node
    /// made (a follower's forwarded `lock` with `notify`).
    FollowGrant {
        key: String,
        token: u64,
        ttl_ms: u64,
        listener: Listener,
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
    /// Stop the shard's clock (see [`crate::engine::Engine::stop_clocks`]).
    StopClock,
    /// Answer every waiter `shutting_down` and stop.
    Shutdown,
}

/// Where a request's answer goes.
#[derive(Debug)]
pub(crate) enum Respond {
    /// To the request's own future, which waits for it
    /// ([`Session::execute`](super::Session::execute)).
    Once(oneshot::Sender<Outcome>),
    /// Into its connection's queue of answers
    /// ([`Answers::submit`](super::session::Answers::submit)).
    Queue(Queued),
}

impl Respond {
    /// Sends the answer; `Err` gives it back if nobody can receive it (the
    /// request's future, or its connection, is gone).
    pub(crate) fn send(self, outcome: Outcome) -> Result<(), Outcome> {
        match self {
            Respond::Once(reply) => reply.send(outcome),
            Respond::Queue(queued) => queued.send(outcome),
        }
    }
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
    /// In a replicated engine: this node's consensus log and the shard's
    /// inbox from the replication layer.
    pub replica: Option<ActorReplica>,
}

/// A request waiting for its answer: where the answer goes, and for a
/// `lock`, its key, so that an undeliverable grant can be undone.
pub(super) struct Pending {
    /// Taken when the request was answered before its batch was applied
    /// (a replicated shard gave up waiting for a commit): a grant to it is
    /// then undeliverable.
    reply: Option<Respond>,
    lock_key: Option<String>,
    /// A `lock` with `notify`: who listens to its grant.
    notify: Option<Box<Listener>>,
}

/// A batch handed to the journal and not yet applied.
struct InFlight {
    /// Its number among the shard's batches (1, 2, 3… in the order handed
    /// over).
    number: u64,
    commands: Vec<Command>,
    kept: Append,
}

/// Batches a shard may have in the journal's hands at once. One: the next
/// batch gathers in the mailbox while one is being kept, and groups form
/// across shards. The driver supports more (batches are numbered, and a
/// snapshot says which it holds), but with four the simulation found a
/// lost acknowledged insert after three server crashes (seed 6363 of
/// 10,000, not yet explained), and four measured no faster on this
/// machine; so one, until that seed is understood.
const IN_FLIGHT_MAX: usize = 1;

struct Actor {
    index: usize,
    /// Notices that a journal refused, to be logged again with the next
    /// batch: a closed connection or a gone requester must not be lost.
    /// They keep the time they came at, so that they take effect then.
    retry: Vec<Command>,
    /// After the journal refused a batch, the time before which the shard
    /// does not wake for a deadline or a retry (a full disk must not spin
    /// it).
    quiet_until: Option<Instant>,
    shard: Shard,
    clock: Clock,
    journal: Option<Arc<dyn Journal>>,
    invariant_alarm: Option<InvariantAlarm>,
    /// Handles are the engine's own sequence, not a peer's choice, so a
    /// fixed hash seed is safe here.
    pending: HashMap<Handle, Pending, KeyHasher>,
    /// With a journal, the commands stamped but not yet handed to it.
    batch: Vec<Command>,
    /// With a journal, the batches it has, oldest first.
    in_flight: VecDeque<InFlight>,
    /// The number the next batch handed to the journal gets.
    next_batch: u64,
    /// The latest time stamped on a command not yet refused: a deadline up
    /// to it is applied once that command is, so it needs no wake-up.
    stamped_through: Tick,
    /// Every batch up to this number has been applied or refused.
    settled: u64,
    answers: Vec<Answer>,
    /// Who listens to this shard's events (see `events`).
    listeners: Listeners,
    /// The shard's events, drained after each batch.
    changes: Vec<crate::shard::events::Event>,
    /// In a replicated engine: leading or not, and the proposals.
    replication: Option<replicated::Replication>,
}

/// How long a shard whose journal refused a batch waits before it tries
/// again.
const RETRY_AFTER_REFUSAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs one shard until its mailbox closes or it is told to shut down.
pub(crate) async fn run(setup: ActorSetup, mailbox: Inbox) {
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
        in_flight: VecDeque::new(),
        next_batch: 1,
        stamped_through: Tick::ZERO,
        settled: 0,
        answers: Vec::new(),
        listeners: Listeners::default(),
        changes: Vec::new(),
        replication: None,
    };
    if let Some(replica) = setup.replica {
        actor.run_replicated(mailbox, replica).await;
    } else if actor.journal.is_none() {
        actor.run_in_memory(mailbox).await;
    } else {
        actor.run_journaled(mailbox, attention).await;
    }
    if let Some(journal) = &actor.journal {
        journal.stopped(actor.index, actor.shard.digest());
    }
    actor.shard.shutdown();
    actor.deliver();
}

impl Actor {
    /// Without a journal: each command is applied as it is taken and
    /// answered at once.
    async fn run_in_memory(&mut self, mut mailbox: Inbox) {
        let sleep = tokio::time::sleep_until(Instant::now());
        tokio::pin!(sleep);
        let mut armed_for = None;
        loop {
            let next = self.shard.next_deadline();
            if next != armed_for {
                if let Some(deadline) = next {
                    sleep.as_mut().reset(self.clock.instant_of(deadline));
                }
                armed_for = next;
            }
            let go_on = tokio::select! {
                // Messages first: a command applies the deadlines due
                // before it anyway.
                biased;
                message = mailbox.recv() => match message {
                    Some(message) => self.take_batch(message, &mut mailbox),
                    None => false,
                },
                () = &mut sleep, if armed_for.is_some() => {
                    let at = self.clock.now();
                    self.stamp(Command { at, input: Input::Tick });
                    armed_for = None;
                    true
                }
            };
            self.release_unjournaled();
            if !go_on {
                return;
            }
        }
    }

    /// With a journal: batches are handed over, kept, then applied.
    async fn run_journaled(
        &mut self,
        mut mailbox: Inbox,
        attention: Option<Arc<tokio::sync::Notify>>,
    ) {
        let actor = self;
        let sleep = tokio::time::sleep_until(Instant::now());
        tokio::pin!(sleep);
        let mut armed_for = None;
        loop {
            let room = actor.in_flight.len() < IN_FLIGHT_MAX;
            // With no room for another batch, a tick could not be handed
            // over: the next kept batch wakes the shard instead.
            let wake = if room { actor.wake() } else { None };
            if wake != armed_for {
                if let Some(at) = wake {
                    sleep.as_mut().reset(at);
                }
                armed_for = wake;
            }
            let go_on = tokio::select! {
                // Kept batches first (their answers wait), then messages: a
                // command applies the deadlines due before it anyway.
                biased;
                kept = oldest(&mut actor.in_flight) => {
                    actor.settle(kept).await;
                    true
                }
                message = mailbox.recv(), if room => match message {
                    Some(message) => actor.take_batch(message, &mut mailbox),
                    None => false,
                },
                () = &mut sleep, if armed_for.is_some() => {
                    actor.stamp_tick();
                    armed_for = None;
                    true
                }
                () = wait_for(attention.as_deref()) => {
                    actor.tend().await;
                    true
                }
            };
            actor.hand_over_or_release();
            if !go_on {
                break;
            }
        }
        actor.drain().await;
    }
}

/// Resolves with the oldest batch's outcome once the journal has kept or
/// refused it; never, while there is none.
async fn oldest(in_flight: &mut VecDeque<InFlight>) -> Result<(), ServerError> {
    match in_flight.front_mut() {
        Some(oldest) => (&mut oldest.kept).await,
        None => std::future::pending().await,
    }
}

/// Resolves when `notify` is notified; never, without one.
async fn wait_for(notify: Option<&tokio::sync::Notify>) {
    match notify {
        Some(notify) => notify.notified().await,
        None => std::future::pending().await,
    }
}

impl Actor {
    /// When the shard must wake on its own: at its next deadline, or to
    /// retry refused notices; not before a refusal's quiet time is over.
    fn wake(&self) -> Option<Instant> {
        let deadline = self
            .shard
            .next_deadline()
            .filter(|&d| d > self.stamped_through)
            .map(|d| self.clock.instant_of(d));
        let retry = (!self.retry.is_empty()).then(|| self.quiet_until.unwrap_or_else(Instant::now));
        let wake = match (deadline, retry) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(self.quiet_until.map_or(wake, |quiet| wake.max(quiet)))
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
            if !self.logs_first() {
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
        if self.follows() {
            return self.receive_following(message);
        }
        let input = match message {
            ShardMsg::Op {
                handle,
                caller,
                op,
                reply,
                notify,
            } => {
                let lock_key = match &op {
                    ShardOp::Lock(crate::proto::LockOp::Acquire(a)) => Some(a.key.clone()),
                    _ => None,
                };
                if notify.is_some() {
                    self.shard.enable_events();
                }
                let reply = Some(reply);
                let pending = Pending {
                    reply,
                    lock_key,
                    notify,
                };
                self.pending.insert(handle, pending);
                Input::Op { handle, caller, op }
            }
            ShardMsg::Watch { .. }
            | ShardMsg::Unwatch { .. }
            | ShardMsg::EnableEvents
            | ShardMsg::FollowGrant { .. } => {
                self.listen(message);
                return true;
            }
            ShardMsg::Cancel { handle, key } => Input::Cancel { handle, key },
            ShardMsg::Gone { handle, key } => Input::RequesterGone { handle, key },
            ShardMsg::Closed { conn } => {
                self.listeners.remove(conn, None);
                Input::ConnectionClosed { conn }
            }
            ShardMsg::Stats { top, reply } => {
                // The asker may have given up; nothing to do then.
                let _ = reply.send((self.shard.counters(), self.shard.snapshot(top)));
                return true;
            }
            ShardMsg::Digest { reply } => {
                let _ = reply.send(self.shard.digest());
                return true;
            }
            ShardMsg::StopClock => {
                // A replicated shard's time goes on with the cluster.
                if self.replication.is_none() {
                    self.clock = self.clock.stopped();
                }
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
        if self.logs_first() {
            self.stamped_through = self.stamped_through.max(command.at);
            self.batch.push(command);
        } else {
            self.shard.apply(command);
        }
    }

    /// Whether commands wait to be kept (journal) or committed (replica)
    /// before they are applied.
    fn logs_first(&self) -> bool {
        self.journal.is_some() || self.replication.is_some()
    }

    /// After each turn: without a journal, releases the answers; with one,
    /// hands the stamped batch (and any refused notices) over, if it has
    /// room for another batch.
    fn hand_over_or_release(&mut self) {
        let Some(journal) = self.journal.clone() else {
            self.release_unjournaled();
            return;
        };
        if self.in_flight.len() >= IN_FLIGHT_MAX {
            return;
        }
        self.restamp_retries();
        if self.batch.is_empty() {
            return;
        }
        let commands = std::mem::take(&mut self.batch);
        let number = self.next_batch;
        self.next_batch += 1;
        let kept = journal.append(self.index, number, &commands);
        self.in_flight.push_back(InFlight {
            number,
            commands,
            kept,
        });
    }

    /// The oldest batch was kept (apply it and release its answers) or
    /// refused (answer its requests with the error).
    async fn settle(&mut self, kept: Result<(), ServerError>) {
        let Some(batch) = self.in_flight.pop_front() else {
            return;
        };
        self.settled = batch.number;
        match kept {
            Ok(()) => {
                self.quiet_until = None;
                for command in batch.commands {
                    self.shard.apply(command);
                }
                self.check_invariants();
                self.tend().await;
            }
            Err(error) => self.refuse(batch.commands, error),
        }
    }

    /// Lets the journal look at the state (token reservations, snapshots),
    /// then releases the answers; undeliverable grants become commands of
    /// the next batch.
    async fn tend(&mut self) {
        if let Some(journal) = self.journal.clone() {
            journal.applied(self.index, &self.shard, self.settled).await;
        }
        let gone = self.deliver();
        self.stamp_gone(gone);
    }

    /// At shutdown: hands over what is stamped and waits until the journal
    /// has kept or refused every batch, applying them in order.
    async fn drain(&mut self) {
        if self.journal.is_none() {
            return;
        }
        loop {
            self.hand_over_or_release();
            let Some(oldest) = self.in_flight.front_mut() else {
                return;
            };
            let kept = (&mut oldest.kept).await;
            self.settle(kept).await;
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

    /// Stamps a tick for the deadlines due now; a tick already last in the
    /// batch is moved to now instead, so waiting for room never piles
    /// ticks up.
    fn stamp_tick(&mut self) {
        let at = self.clock.now();
        match self.batch.last_mut() {
            Some(last) if last.input == Input::Tick => {
                last.at = at;
                self.stamped_through = self.stamped_through.max(at);
            }
            _ => self.stamp(Command {
                at,
                input: Input::Tick,
            }),
        }
    }

    /// Reports grants nobody received as commands of their own (with a
    /// journal, they go into the next batch).
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
                    if let Some(reply) = self.pending.remove(&handle).and_then(|p| p.reply) {
                        // Nobody changed anything for a requester who left.
                        let _ = reply.send(Err(error.clone()));
                    }
                }
                Input::Tick => {}
                notice => self.retry.push(Command {
                    at: command.at,
                    input: notice,
                }),
            }
        }
        self.quiet_until = Some(Instant::now() + RETRY_AFTER_REFUSAL);
        // Its ticks were not applied: the deadlines they covered need a
        // wake-up again.
        self.stamped_through = self.shard.now();
    }

    /// Puts the notices a journal refused before the new batch, at the
    /// times they came: they came before anything in it, and a waiter
    /// whose requester left while the disk was full must leave the queue
    /// before a lease that ran out after that could be handed to it
    /// (SPEC section 2: never granted). The notices wait out the quiet
    /// time after a refusal only when they would go alone: retrying at
    /// once against a full disk would spin, but a batch that goes anyway
    /// must not pass them.
    fn restamp_retries(&mut self) {
        let quiet = self.quiet_until.is_some_and(|q| Instant::now() < q);
        if self.retry.is_empty() || (quiet && self.batch.is_empty()) {
            return;
        }
        let fresh = std::mem::take(&mut self.batch);
        self.batch = self.retry.drain(..).chain(fresh).collect();
    }

    /// Starts or stops a watch; the messages that change who listens to
    /// this shard's events, not its state.
    fn listen(&mut self, message: ShardMsg) {
        match message {
            ShardMsg::Watch {
                target,
                listener,
                reply,
            } => {
                self.shard.enable_events();
                match target {
                    Watched::Key(key) => self.listeners.watch_key(key, listener),
                    Watched::Set(set) => self.listeners.watch_set(set, listener),
                }
                // The watcher may have gone: its connection's close
                // removes the listener.
                let _ = reply.send(());
            }
            ShardMsg::Unwatch { conn, id } => {
                self.listeners.remove(conn, Some(id));
                // A `lock` with `notify` still waiting: its grant, if it
                // comes, has nobody to tell.
                for pending in self.pending.values_mut() {
                    if pending.notify.as_ref().is_some_and(|l| l.is(conn, id)) {
                        pending.notify = None;
                    }
                }
            }
            ShardMsg::EnableEvents => self.shard.enable_events(),
            ShardMsg::FollowGrant {
                key,
                token,
                ttl_ms,
                listener,
            } => {
                self.shard.enable_events();
                // Events the shard reported before this are told first:
                // the status below is what they left.
                self.dispatch_events();
                let status = self.shard.grant_status(&key, token);
                let instant_of = self.instant_of();
                self.listeners
                    .follow_grant(key, token, ttl_ms, status, listener, instant_of);
            }
            _ => {}
        }
    }

    /// Tells the listeners of the events the shard reported.
    fn dispatch_events(&mut self) {
        self.shard.drain_events_into(&mut self.changes);
        if self.changes.is_empty() {
            return;
        }
        let instant_of = self.instant_of();
        for change in self.changes.drain(..) {
            self.listeners.dispatch(change, &instant_of);
        }
    }

    /// The local instant of a time on the shard's clock, for lease
    /// warnings. A node that stamps the commands maps it with its own
    /// clock; a follower's clock did not stamp them (the leader's did), so
    /// it counts from the shard's latest time as now: late by its lag
    /// behind the leader, as everything it reports is.
    fn instant_of(&self) -> impl Fn(crate::time::Tick) -> Instant + use<> {
        let (clock, follows) = (self.clock, self.follows());
        let (shard_now, now) = (self.shard.now(), Instant::now());
        move |at| {
            if !follows {
                return clock.instant_of(at);
            }
            let ahead = std::time::Duration::from_micros(at.0.saturating_sub(shard_now.0));
            let behind = std::time::Duration::from_micros(shard_now.0.saturating_sub(at.0));
            (now + ahead).checked_sub(behind).unwrap_or(now)
        }
    }

    /// Sends every answer to its requester (a grant with `notify` gets its
    /// listener first), then tells listeners of the batch's events.
    /// Returns the grants nobody received, by handle and key.
    fn deliver(&mut self) -> Vec<(Handle, String)> {
        self.shard.drain_answers_into(&mut self.answers);
        let mut gone = Vec::new();
        for Answer { handle, outcome } in self.answers.drain(..) {
            let Some(pending) = self.pending.remove(&handle) else {
                // A replicated shard forgets its requests when it stops
                // leading; the batches it proposed may still commit.
                debug_assert!(self.replication.is_some(), "answer to unknown {handle:?}");
                continue;
            };
            if let (Ok(Okay::Granted(g)), Some(listener), Some(key)) =
                (&outcome, &pending.notify, &pending.lock_key)
            {
                let listener = Listener::clone(listener);
                self.listeners.watch_grant(key.clone(), g.token, listener);
            }
            let granted = matches!(outcome, Ok(Okay::Granted(_)));
            let delivered = pending
                .reply
                .is_some_and(|reply| reply.send(outcome).is_ok());
            if !delivered
                && granted
                && let Some(key) = pending.lock_key
            {
                gone.push((handle, key));
            }
        }
        self.dispatch_events();
        gone
    }
}
