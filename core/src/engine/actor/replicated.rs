//! The shard actor in a replicated engine (see
//! [`replica`](crate::engine::replica)): it applies what the consensus log
//! committed, in log order; while its node leads it also stamps commands,
//! proposes them in batches, and answers a batch's requests once the batch
//! comes back committed.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use super::{Actor, ShardMsg};
use crate::engine::mailbox::Inbox;
use crate::engine::planted::{self, ReplicaBug};
use crate::engine::replica::{ActorReplica, Consensus, Origin, Proposal, Proposed, ReplicaMsg};
use crate::proto::ServerError;
use crate::shard::{Command, Handle, Input};

/// Batches a leading shard may have proposed and not yet seen committed.
/// Two: one being committed while the next is on its way through the log,
/// and a third gathering meanwhile, so batches grow with the load. Each
/// Raft entry carries the batches of every shard that proposed while the
/// previous entry was handed over (the replication layer combines them),
/// so a second proposal in flight costs no extra entry per shard. (With one
/// entry per batch, four in flight made batches of one or two requests and
/// 2.3 times fewer lock cycles at 64 connections; with combined entries,
/// two in flight did about 1.5 times more than one: see the README.)
const PROPOSALS_MAX: usize = 2;

/// How long a request waits for its batch to commit before it is answered
/// `unavailable`: a leader cut off from its followers cannot commit, and
/// its clients should try another node rather than wait for the partition
/// to heal. (The batch may still commit later; the request is safe to
/// retry.)
const COMMIT_PATIENCE: Duration = Duration::from_secs(2);

/// How long a leading shard waits after a proposal failed before it
/// proposes again.
const QUIET_AFTER_FAILURE: Duration = Duration::from_millis(100);

/// A replicated actor's own state.
pub(super) struct Replication {
    consensus: Arc<dyn Consensus>,
    /// Who this shard proposes as, while its node leads.
    leading: Option<Origin>,
    /// The number of the next proposal in this term.
    next_number: u64,
    /// Proposals not yet seen committed, oldest first.
    proposals: VecDeque<Proposing>,
}

/// A proposal on its way.
struct Proposing {
    number: u64,
    /// The requests it carries, until they are answered.
    handles: Vec<Handle>,
    since: Instant,
    /// `None` once the consensus library has answered. Kept until then
    /// even after the batch came back committed (which happens first):
    /// dropping it early would make openraft warn that nobody listens.
    outcome: Option<Proposed>,
    /// Whether the batch came back committed.
    committed: bool,
}

impl Proposing {
    fn done(&self) -> bool {
        self.committed && self.outcome.is_none()
    }
}

impl Actor {
    /// In a replicated engine: applies committed batches; leads when told.
    pub(super) async fn run_replicated(&mut self, mut mailbox: Inbox, replica: ActorReplica) {
        let ActorReplica {
            consensus,
            mut inbox,
        } = replica;
        self.replication = Some(Replication {
            consensus,
            leading: None,
            next_number: 1,
            proposals: VecDeque::new(),
        });
        let sleep = tokio::time::sleep_until(Instant::now());
        tokio::pin!(sleep);
        let mut armed_for = None;
        loop {
            let wake = self.replicated_wake();
            if wake != armed_for {
                if let Some(at) = wake {
                    sleep.as_mut().reset(at);
                }
                armed_for = wake;
            }
            let room = self.has_room();
            let go_on = tokio::select! {
                // Committed batches first: they carry the answers.
                biased;
                message = inbox.recv() => match message {
                    Some(message) => {
                        self.on_replica(message);
                        true
                    }
                    None => false,
                },
                (number, error) = first_failure(self.proposals_mut()) => {
                    self.proposal_failed(number, error);
                    true
                }
                message = mailbox.recv(), if room => match message {
                    Some(message) => self.take_batch(message, &mut mailbox),
                    None => false,
                },
                () = &mut sleep, if armed_for.is_some() => {
                    armed_for = None;
                    self.on_leader_wake();
                    true
                }
            };
            self.forget_settled();
            self.propose_batch();
            if !go_on {
                return;
            }
        }
    }

    fn replication(&self) -> Option<&Replication> {
        self.replication.as_ref()
    }

    fn proposals_mut(&mut self) -> &mut VecDeque<Proposing> {
        match self.replication.as_mut() {
            Some(replication) => &mut replication.proposals,
            None => unreachable!("only a replicated actor has proposals"),
        }
    }

    /// Whether this shard is replicated and its node does not lead.
    pub(super) fn follows(&self) -> bool {
        self.replication().is_some_and(|r| r.leading.is_none())
    }

    /// A follower reads every message (it answers or drops them at once);
    /// a leader only while it has room for another proposal.
    fn has_room(&self) -> bool {
        self.replication().is_none_or(|r| {
            let uncommitted = r.proposals.iter().filter(|p| !p.committed).count();
            r.leading.is_none() || uncommitted < PROPOSALS_MAX
        })
    }

    /// Drops the proposals that are committed and answered for.
    fn forget_settled(&mut self) {
        if let Some(replication) = self.replication.as_mut() {
            replication.proposals.retain(|p| !p.done());
        }
    }

    /// A follower's answer to a message: requests go to the leader (the
    /// session forwards them; one that raced a change of leader is told to
    /// retry), notices concern the leader's state, not this node's.
    pub(super) fn receive_following(&mut self, message: ShardMsg) -> bool {
        match message {
            ShardMsg::Op {
                handle,
                caller,
                op,
                reply,
                ..
            } if planted::active(ReplicaBug::FollowerGrantsLocally) => {
                let reply = Some(reply);
                self.pending.insert(
                    handle,
                    super::Pending {
                        reply,
                        lock_key: None,
                        notify: None,
                    },
                );
                let at = self.clock.now();
                let input = Input::Op { handle, caller, op };
                self.shard.apply(Command { at, input });
                self.deliver();
                true
            }
            ShardMsg::Op { reply, .. } => {
                let _ = reply.send(Err(not_leader()));
                true
            }
            ShardMsg::Stats { top, reply } => {
                let _ = reply.send((self.shard.counters(), self.shard.snapshot(top)));
                true
            }
            ShardMsg::Digest { reply } => {
                let _ = reply.send(self.shard.digest());
                true
            }
            // A follower applies the same log as its leader, so its shard
            // reports the same events: a watch is served here.
            ShardMsg::Watch { .. }
            | ShardMsg::Unwatch { .. }
            | ShardMsg::EnableEvents
            | ShardMsg::FollowGrant { .. } => {
                self.listen(message);
                true
            }
            ShardMsg::Closed { conn } => {
                self.listeners.remove(conn, None);
                true
            }
            ShardMsg::Cancel { .. } | ShardMsg::Gone { .. } | ShardMsg::StopClock => true,
            ShardMsg::Shutdown => false,
        }
    }

    /// When a leading shard must wake: at its next deadline (or a quiet
    /// time's end), or when its oldest proposal runs out of patience.
    fn replicated_wake(&self) -> Option<Instant> {
        let replication = self.replication()?;
        replication.leading?;
        let patience = replication
            .proposals
            .iter()
            .find(|p| !p.handles.is_empty())
            .map(|p| p.since + COMMIT_PATIENCE);
        let deadline = self.has_room().then(|| self.wake()).flatten();
        match (deadline, patience) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A leader's wake-up: answers requests that waited too long for a
    /// commit, and stamps a tick for the deadlines due.
    fn on_leader_wake(&mut self) {
        let now = Instant::now();
        let mut overdue = Vec::new();
        for proposal in self.proposals_mut() {
            if now >= proposal.since + COMMIT_PATIENCE {
                overdue.append(&mut proposal.handles);
            }
        }
        self.answer_unavailable(overdue, "no quorum: the batch was not committed in time");
        if self.has_room() && self.shard.next_deadline().is_some() {
            self.stamp_tick();
        }
    }

    fn on_replica(&mut self, message: ReplicaMsg) {
        match message {
            ReplicaMsg::Apply {
                origin,
                number,
                commands,
            } => self.apply_committed(origin, number, commands),
            ReplicaMsg::Image { reply } => {
                let _ = reply.send(self.shard.image());
            }
            ReplicaMsg::Install { shard } => self.shard = *shard,
            ReplicaMsg::Lead { origin, clock } => self.lead(origin, clock),
            ReplicaMsg::Follow => self.follow(),
        }
    }

    /// Applies a committed batch. Only the batches this shard proposed in
    /// its current term have requesters here; anyone else's answers went
    /// (or will never go) to their own node.
    fn apply_committed(&mut self, origin: Origin, number: u64, commands: Vec<Command>) {
        let leading = self.replication().and_then(|r| r.leading);
        if leading == Some(origin) && planted::active(ReplicaBug::AckBeforeCommit) {
            // Applied when proposed (the bug).
            self.mark_committed(number);
            return;
        }
        for command in commands {
            self.shard.apply(command);
        }
        self.check_invariants();
        // A new leader's clock may start behind commands of the old term it
        // had not applied yet; its own stamps must never lag the shard's
        // time, or a deadline would look due forever.
        if leading.is_some() && self.shard.now() > self.clock.now() {
            self.clock = super::Clock::starting_at(self.shard.now());
        }
        let own = leading == Some(origin);
        if !own {
            self.shard.drain_answers_into(&mut self.answers);
            self.answers.clear();
            self.dispatch_events();
            return;
        }
        self.mark_committed(number);
        let gone = self.deliver();
        self.stamp_gone(gone);
    }

    /// This shard's proposals up to `number` came back committed.
    fn mark_committed(&mut self, number: u64) {
        for proposal in self.proposals_mut() {
            if proposal.number <= number && !proposal.committed {
                let (requests, took) = (proposal.handles.len(), proposal.since.elapsed());
                tracing::debug!(number, requests, ?took, "batch committed");
                proposal.committed = true;
                proposal.handles.clear();
            }
        }
    }

    /// Starts leading: the old leader's waiters and ephemeral locks end
    /// (their connections were to it), and leases run on `clock`.
    fn lead(&mut self, origin: Origin, clock: super::Clock) {
        self.follow();
        self.clock = clock;
        self.stamped_through = self.shard.now();
        self.quiet_until = None;
        if let Some(replication) = self.replication.as_mut() {
            replication.leading = Some(origin);
            replication.next_number = 1;
        }
        let at = self.clock.now();
        let restart = Input::Restart { token_floor: 0 };
        self.stamp(Command { at, input: restart });
    }

    /// Stops leading: every request still waiting here is answered
    /// `unavailable` (the client retries with the new leader), and what was
    /// stamped but not proposed is dropped.
    fn follow(&mut self) {
        let Some(replication) = self.replication.as_mut() else {
            return;
        };
        replication.leading = None;
        replication.proposals.clear();
        self.batch.clear();
        for (_, pending) in self.pending.drain() {
            if let Some(reply) = pending.reply {
                let _ = reply.send(Err(not_leader()));
            }
        }
    }

    /// Proposes what is stamped, if this shard leads and has room.
    fn propose_batch(&mut self) {
        let quiet = self.quiet_until.is_some_and(|q| Instant::now() < q);
        if self.batch.is_empty() || quiet || !self.has_room() {
            return;
        }
        let shard = self.index;
        let Some(replication) = self.replication.as_mut() else {
            return;
        };
        let Some(origin) = replication.leading else {
            return;
        };
        let commands = std::mem::take(&mut self.batch);
        let handles = commands
            .iter()
            .filter_map(|c| match c.input {
                Input::Op { handle, .. } => Some(handle),
                _ => None,
            })
            .collect();
        let number = replication.next_number;
        replication.next_number += 1;
        let early = planted::active(ReplicaBug::AckBeforeCommit).then(|| commands.clone());
        let outcome = replication.consensus.propose(Proposal {
            shard,
            origin,
            number,
            commands,
        });
        replication.proposals.push_back(Proposing {
            number,
            handles,
            since: Instant::now(),
            outcome: Some(outcome),
            committed: false,
        });
        if let Some(commands) = early {
            for command in commands {
                self.shard.apply(command);
            }
            let gone = self.deliver();
            self.stamp_gone(gone);
        }
    }

    /// The consensus library gave up on proposal `number`: its requests
    /// are answered with the error (it may still commit; then it is
    /// applied, and a grant nobody heard of is released).
    fn proposal_failed(&mut self, number: u64, error: ServerError) {
        let proposals = self.proposals_mut();
        let Some(at) = proposals.iter().position(|p| p.number == number) else {
            return;
        };
        let handles = std::mem::take(&mut proposals[at].handles);
        for handle in handles {
            self.answer(handle, Err(error.clone()));
        }
        self.quiet_until = Some(Instant::now() + QUIET_AFTER_FAILURE);
        // Its ticks may never apply: the deadlines they covered need a
        // wake-up again.
        self.stamped_through = self.shard.now();
    }

    fn answer_unavailable(&mut self, handles: Vec<Handle>, why: &'static str) {
        for handle in handles {
            self.answer(handle, Err(ServerError::unavailable(why)));
        }
    }

    /// Answers one request early, keeping what is needed to undo a grant
    /// it may still get.
    fn answer(&mut self, handle: Handle, outcome: crate::proto::Outcome) {
        if let Some(reply) = self.pending.get_mut(&handle).and_then(|p| p.reply.take()) {
            let _ = reply.send(outcome);
        }
    }
}

fn not_leader() -> ServerError {
    ServerError::unavailable("this node is not the leader (or just stopped being it); retry")
}

/// Resolves with the number and error of a proposal the consensus library
/// gave up on; marks the ones it accepted as answered. Never, while none
/// has failed.
async fn first_failure(proposals: &mut VecDeque<Proposing>) -> (u64, ServerError) {
    poll_fn(|cx| {
        for proposal in proposals.iter_mut() {
            let Some(outcome) = proposal.outcome.as_mut() else {
                continue;
            };
            if let Poll::Ready(result) = outcome.as_mut().poll(cx) {
                proposal.outcome = None;
                if let Err(error) = result {
                    return Poll::Ready((proposal.number, error));
                }
            }
        }
        Poll::Pending
    })
    .await
}
