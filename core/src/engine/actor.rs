//! The shard actor: a task that owns one shard, reads its mailbox and wakes
//! at the shard's next deadline.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::proto::{Outcome, RequestId};
use crate::shard::{Caller, ConnId, Responder, Shard, ShardConfig, ShardOp, ShardStats, Snapshot};
use crate::time::Tick;

/// What a shard actor is asked.
#[derive(Debug)]
pub(crate) enum ShardMsg {
    /// Carry out `op` and answer on `reply`.
    Op {
        caller: Caller,
        op: ShardOp,
        reply: oneshot::Sender<Outcome>,
    },
    /// Cancel a waiting `lock`.
    Cancel {
        conn: ConnId,
        request: RequestId,
        key: String,
    },
    /// A connection closed.
    Closed { conn: ConnId },
    /// Report counters, and the top `top` of each list.
    Stats {
        top: usize,
        reply: oneshot::Sender<(ShardStats, Snapshot)>,
    },
    /// Answer every waiter `shutting_down` and stop.
    Shutdown,
}

impl Responder for oneshot::Sender<Outcome> {
    fn is_closed(&self) -> bool {
        oneshot::Sender::is_closed(self)
    }

    fn respond(self, outcome: Outcome) -> bool {
        self.send(outcome).is_ok()
    }
}

/// Most messages handled before the actor looks at its clock again; bounds
/// how late a deadline can be applied under a flood of messages.
const BATCH_MAX: usize = 256;

/// Runs one shard until its mailbox closes or it is told to shut down.
pub(crate) async fn run(
    config: ShardConfig,
    mut mailbox: mpsc::Receiver<ShardMsg>,
    epoch: Instant,
) {
    let mut shard = Shard::new(config);
    let now = || Tick::from_duration(epoch.elapsed());
    let at = |tick: Tick| epoch + Duration::from_micros(tick.0);
    let sleep = tokio::time::sleep_until(at(Tick::ZERO));
    tokio::pin!(sleep);
    let mut armed_for = None;
    loop {
        let next = shard.next_deadline();
        if next != armed_for {
            if let Some(deadline) = next {
                sleep.as_mut().reset(at(deadline));
            }
            armed_for = next;
        }
        tokio::select! {
            // Messages first: a deadline is applied by `handle` anyway
            // before any message that comes after it.
            biased;
            message = mailbox.recv() => {
                let Some(message) = message else { break };
                let tick = now();
                if !apply(&mut shard, tick, message) {
                    break;
                }
                for _ in 1..BATCH_MAX {
                    let Ok(message) = mailbox.try_recv() else { break };
                    if !apply(&mut shard, tick, message) {
                        shard.shutdown();
                        return;
                    }
                }
            }
            () = &mut sleep, if armed_for.is_some() => {
                shard.advance(now());
                armed_for = None;
            }
        }
    }
    shard.shutdown();
}

/// Applies one message; `false` means stop.
fn apply(shard: &mut Shard<oneshot::Sender<Outcome>>, now: Tick, message: ShardMsg) -> bool {
    match message {
        ShardMsg::Op { caller, op, reply } => shard.handle(now, caller, op, reply),
        ShardMsg::Cancel { conn, request, key } => {
            shard.cancel(now, conn, request, &key);
        }
        ShardMsg::Closed { conn } => shard.close_connection(now, conn),
        ShardMsg::Stats { top, reply } => {
            // The asker may have given up; nothing to do then.
            let _ = reply.send((shard.stats(), shard.snapshot(now, top)));
        }
        ShardMsg::Shutdown => return false,
    }
    true
}
