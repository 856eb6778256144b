//! The simulated server's command log, seen from inside: every batch each
//! shard applied (the engine's [`Journal`]), the digest each shard reported
//! when it stopped, and any invariant found broken after a batch. After the
//! run, each shard's log is replayed into a fresh shard with another hash
//! seed; it must reach the digest the live shard reported, or the shard is
//! not the deterministic state machine a write-ahead log or a replicated
//! log needs.

use std::sync::{Arc, Mutex, MutexGuard};

use deadbolt_core::engine::{Append, InvariantAlarm, Journal};
use deadbolt_core::shard::{Command, Shard, ShardConfig};
use deadbolt_core::{EngineConfig, Limits};

use crate::checker::Violation;
use crate::server_checker;

/// What the simulated server's shards recorded.
#[derive(Debug, Default)]
pub struct Trace {
    inner: Mutex<Recorded>,
}

#[derive(Debug, Default)]
struct Recorded {
    /// Per shard, every command applied, in order.
    commands: Vec<Vec<Command>>,
    /// Per shard, the digest reported when it stopped.
    stopped: Vec<Option<u64>>,
    /// Invariants found broken, with the shard.
    broken: Vec<(usize, String)>,
}

#[async_trait::async_trait]
impl Journal for Trace {
    fn append(&self, shard: usize, _number: u64, commands: &[Command]) -> Append {
        let mut recorded = self.lock();
        grow(&mut recorded.commands, shard);
        recorded.commands[shard].extend_from_slice(commands);
        Box::pin(std::future::ready(Ok(())))
    }

    fn stopped(&self, shard: usize, digest: u64) {
        let mut recorded = self.lock();
        grow(&mut recorded.stopped, shard);
        recorded.stopped[shard] = Some(digest);
    }
}

fn grow<T: Default>(per_shard: &mut Vec<T>, shard: usize) {
    if per_shard.len() <= shard {
        per_shard.resize_with(shard + 1, T::default);
    }
}

impl Trace {
    fn lock(&self) -> MutexGuard<'_, Recorded> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An alarm that records broken invariants here.
    pub fn alarm(self: &Arc<Self>) -> InvariantAlarm {
        let trace = Arc::clone(self);
        Arc::new(move |shard, what| trace.lock().broken.push((shard, what)))
    }

    /// The invariants found broken so far, with their shard.
    pub fn broken(&self) -> Vec<(usize, String)> {
        self.lock().broken.clone()
    }

    /// How many commands the shards applied in all.
    pub fn commands(&self) -> usize {
        self.lock().commands.iter().map(Vec::len).sum()
    }

    /// Checks what was recorded: no invariant broken, every shard stopped
    /// (the server shut down gracefully), and every shard's log replays to
    /// the state it stopped in.
    pub fn check(&self, config: &EngineConfig) -> Vec<Violation> {
        let recorded = self.lock();
        let mut violations: Vec<Violation> = recorded
            .broken
            .iter()
            .map(|(shard, what)| Violation::InvariantBroken {
                shard: *shard,
                what: what.clone(),
            })
            .collect();
        for shard in 0..config.shards {
            let Some(Some(digest)) = recorded.stopped.get(shard).copied() else {
                violations.push(Violation::ShardNotStopped { shard });
                continue;
            };
            let log = recorded.commands.get(shard).map_or(&[][..], Vec::as_slice);
            let replayed = replay(
                log,
                config.first_token,
                config.limits.share_of(config.shards),
            );
            if replayed != digest {
                violations.push(Violation::ReplayDiverged {
                    shard,
                    commands: log.len(),
                });
            }
        }
        violations
    }
}

impl Trace {
    /// Checks the server-side rules ([`server_checker`]) over every
    /// shard's log, replayed into a shard built as the live one was.
    pub fn check_server(&self, config: &EngineConfig) -> Vec<Violation> {
        let recorded = self.lock();
        let shard_config = ShardConfig {
            hash_seed: config.seed,
            first_token: config.first_token,
            limits: config.limits.share_of(config.shards),
        };
        let mut violations = Vec::new();
        for (shard, log) in recorded.commands.iter().enumerate() {
            violations.extend(server_checker::check(shard, log, shard_config));
        }
        violations
    }
}

/// The digest a fresh shard reaches from `log`, with a hash seed the live
/// shard did not have.
fn replay(log: &[Command], first_token: u64, limits: Limits) -> u64 {
    let mut shard = Shard::new(ShardConfig {
        hash_seed: 0x7265_706c_6179,
        first_token,
        limits,
    });
    for command in log {
        shard.apply(command.clone());
        // Answers are the live run's business; only the state is compared.
        drop(shard.take_answers());
    }
    shard.digest()
}
