//! The simulated server's command log, seen from inside: every record its
//! write-ahead log kept (the store's observer, called once a record is
//! synced, in log order, across every crash and restart of the server), the
//! digest each shard reported when the server last stopped gracefully, and
//! any invariant found broken after a batch.
//!
//! After the run, each shard's commands (the `Restart` commands each start
//! of the server logged included) are replayed into a fresh shard with
//! another hash seed; it must reach the digest the live shard reported.
//! The live shards were rebuilt from snapshots and log tails at each
//! restart, so this checks the log, the snapshots and recovery together:
//! what the server ended with is exactly what its log says. The records'
//! numbers must also run on without a gap or a repeat across restarts: a
//! number seen twice means records kept (and acknowledged) were lost.
//! And every snapshot the log writer wrote must hold exactly the state of
//! its shard's commands below the record it says it covers, whether or not
//! a crash ever made a recovery start from it.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use deadbolt_core::EngineConfig;
use deadbolt_core::engine::InvariantAlarm;
use deadbolt_core::shard::{Command, Shard, ShardConfig};
use deadbolt_storage::{Disk, Record, RecordObserver, StoppedObserver, codec, frame, snapshot};

use crate::checker::Violation;
use crate::server_checker::{self, Timing};

/// What the simulated server's log kept and its shards reported.
#[derive(Debug, Default)]
pub struct Trace {
    inner: Mutex<Recorded>,
    /// How long a sync of the server's log takes (it makes deadlines late).
    sync_latency: Duration,
}

#[derive(Debug, Default)]
struct Recorded {
    /// Per shard, every command its log kept, in order.
    commands: Vec<Vec<Command>>,
    /// Per shard, each of its batch records: its number, and how many of
    /// the shard's commands the log held once it was kept.
    batches: Vec<Vec<(u64, usize)>>,
    /// Every snapshot file the log writer wrote, as written.
    snapshots: Vec<Vec<u8>>,
    /// Records found in the log at a restart that nobody was told of:
    /// written as the power failed, before their sync was over.
    unobserved: usize,
    /// Per shard, the positions in `commands` of the first command kept
    /// after the log refused a batch (the disk was full): it, and the rest
    /// of its batch, may apply deadlines late.
    after_refusal: Vec<BTreeSet<usize>>,
    /// The number of the last record seen.
    last_lsn: u64,
    /// Where the record numbers first did not run on, if they did not.
    misnumbered: Option<(u64, u64)>,
    /// Per shard, the digest reported when it stopped.
    stopped: Vec<Option<u64>>,
    /// Invariants found broken, with the shard.
    broken: Vec<(usize, String)>,
}

/// The positions of every command in the batches that start at `firsts`
/// (`batches`: each batch's record number and the end of its commands).
/// The first batch kept after a refusal starts with the notices the
/// refused ones held, at the times they came (the shard applies them
/// then), and goes on with what came while the disk was full: each of
/// its commands may apply deadlines that passed while nothing could be
/// logged.
fn whole_batches(firsts: &BTreeSet<usize>, batches: &[(u64, usize)]) -> BTreeSet<usize> {
    let mut positions = BTreeSet::new();
    for &first in firsts {
        let end = batches
            .iter()
            .map(|&(_, end)| end)
            .find(|&end| end > first)
            .unwrap_or(first + 1);
        positions.extend(first..end);
    }
    positions
}

fn grow<T: Default>(per_shard: &mut Vec<T>, shard: usize) {
    if per_shard.len() <= shard {
        per_shard.resize_with(shard + 1, T::default);
    }
}

impl Trace {
    /// The trace of a server whose log syncs take `sync_latency`.
    pub fn with_sync_latency(sync_latency: Duration) -> Trace {
        Trace {
            sync_latency,
            ..Trace::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, Recorded> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store's observer: records every record the log keeps.
    pub fn observer(self: &Arc<Self>) -> RecordObserver {
        let trace = Arc::clone(self);
        Arc::new(move |lsn, record| trace.kept(lsn, record))
    }

    /// The store's stop callback: records each shard's final digest.
    pub fn on_stopped(self: &Arc<Self>) -> StoppedObserver {
        let trace = Arc::clone(self);
        Arc::new(move |shard, digest| {
            let mut recorded = trace.lock();
            grow(&mut recorded.stopped, shard);
            recorded.stopped[shard] = Some(digest);
        })
    }

    /// An alarm that records broken invariants here.
    pub fn alarm(self: &Arc<Self>) -> InvariantAlarm {
        let trace = Arc::clone(self);
        Arc::new(move |shard, what| trace.lock().broken.push((shard, what)))
    }

    /// Record `lsn` was kept. Only batches carry commands; a run's limits
    /// are the engine's own in the simulation, and token reservations are
    /// in the `Restart` commands that use them.
    fn kept(&self, lsn: u64, record: &Record) {
        let mut recorded = self.lock();
        if lsn != recorded.last_lsn + 1 && recorded.misnumbered.is_none() {
            recorded.misnumbered = Some((recorded.last_lsn + 1, lsn));
        }
        recorded.last_lsn = lsn;
        match record {
            Record::Run { shards, .. } => {
                grow(&mut recorded.commands, (*shards as usize).saturating_sub(1));
            }
            Record::Batch { shard, commands } => {
                let shard = *shard as usize;
                grow(&mut recorded.commands, shard);
                grow(&mut recorded.batches, shard);
                recorded.commands[shard].extend_from_slice(commands);
                let end = recorded.commands[shard].len();
                recorded.batches[shard].push((lsn, end));
            }
            Record::Reserve { .. } => {}
        }
    }

    /// Before the server starts on `dir` of `disk`: takes in the records
    /// its log holds that were never observed. A crash in the middle of a
    /// sync may leave a group of records written whole though nobody was
    /// told (nor answered), and the recovery replays them: the trace must
    /// hold what the log holds.
    pub fn catch_up(&self, disk: &dyn Disk, dir: &Path) {
        let wal = dir.join("wal");
        // Nothing to catch up with before the first start.
        let Ok(names) = disk.list(&wal) else { return };
        for name in names.iter().filter(|n| n.ends_with(".log")) {
            let Ok(bytes) = disk.read(&wal.join(name)) else {
                continue;
            };
            // The intact records, as recovery reads them; it cuts the rest.
            for (_, payload) in frame::scan(&bytes).0 {
                let Ok((lsn, record)) = codec::decode(payload) else {
                    break;
                };
                if lsn > self.lock().last_lsn {
                    self.kept(lsn, &record);
                    self.lock().unobserved += 1;
                }
            }
        }
    }

    /// How many records the log kept that nobody was told of (written as
    /// the power failed).
    pub fn unobserved(&self) -> usize {
        self.lock().unobserved
    }

    /// The log writer wrote a snapshot file with `bytes`.
    pub fn snapshot_written(&self, bytes: &[u8]) {
        self.lock().snapshots.push(bytes.to_vec());
    }

    /// The log refused a write (the disk is full): every shard's next kept
    /// command may apply its deadlines late.
    pub fn refused(&self) {
        let recorded = &mut *self.lock();
        recorded
            .after_refusal
            .resize_with(recorded.commands.len(), BTreeSet::new);
        for (late_ok, log) in recorded.after_refusal.iter_mut().zip(&recorded.commands) {
            late_ok.insert(log.len());
        }
    }

    /// The invariants found broken so far, with their shard.
    pub fn broken(&self) -> Vec<(usize, String)> {
        self.lock().broken.clone()
    }

    /// How many commands the log kept in all.
    pub fn commands(&self) -> usize {
        self.lock().commands.iter().map(Vec::len).sum()
    }

    /// Checks what was recorded: no invariant broken, record numbers that
    /// run on, every shard stopped (the server shut down gracefully), and
    /// every shard's log replays to the state it stopped in.
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
        if let Some((expected, lsn)) = recorded.misnumbered {
            violations.push(Violation::LogRenumbered { expected, lsn });
        }
        for bytes in &recorded.snapshots {
            violations.extend(recorded.check_snapshot(bytes, config));
        }
        for shard in 0..config.shards {
            let Some(Some(digest)) = recorded.stopped.get(shard).copied() else {
                violations.push(Violation::ShardNotStopped { shard });
                continue;
            };
            let log = recorded.commands.get(shard).map_or(&[][..], Vec::as_slice);
            if replay(log, config) != digest {
                violations.push(Violation::ReplayDiverged {
                    shard,
                    commands: log.len(),
                });
            }
        }
        violations
    }

    /// Checks the server-side rules ([`server_checker`]) over every
    /// shard's log, replayed into a shard built as the live one was.
    pub fn check_server(&self, config: &EngineConfig) -> Vec<Violation> {
        let recorded = self.lock();
        let mut violations = Vec::new();
        let none = BTreeSet::new();
        for (shard, log) in recorded.commands.iter().enumerate() {
            let firsts = recorded.after_refusal.get(shard).unwrap_or(&none);
            let batches = recorded.batches.get(shard).map_or(&[][..], Vec::as_slice);
            let late_ok = whole_batches(firsts, batches);
            let timing = Timing::for_sync_latency(self.sync_latency, &late_ok);
            let config = shard_config(config);
            violations.extend(server_checker::check(shard, log, config, timing));
        }
        violations
    }
}

impl Recorded {
    /// A snapshot must hold exactly the state its shard's commands below
    /// the record it covers to replay to: recovery starts from it and
    /// replays only the records after.
    fn check_snapshot(&self, bytes: &[u8], config: &EngineConfig) -> Option<Violation> {
        let unreadable = |why: String| Violation::SnapshotDiverged {
            shard: usize::MAX,
            covers_below: 0,
            why,
        };
        let (header, image) = match snapshot::decode(bytes) {
            Ok(decoded) => decoded,
            Err(error) => return Some(unreadable(error.to_string())),
        };
        let shard = header.shard as usize;
        let shard_config = ShardConfig {
            limits: header.limits.share_of(config.shards.max(1)),
            ..shard_config(config)
        };
        let restored = match Shard::from_image(shard_config, image) {
            Ok(restored) => restored.digest(),
            Err(error) => return Some(unreadable(error.to_string())),
        };
        let covered = self
            .batches
            .get(shard)
            .and_then(|b| {
                b.iter()
                    .take_while(|(lsn, _)| *lsn < header.covers_below)
                    .last()
            })
            .map_or(0, |&(_, end)| end);
        let log = self.commands.get(shard).map_or(&[][..], Vec::as_slice);
        let replayed = replay(&log[..covered], config);
        (replayed != restored).then(|| Violation::SnapshotDiverged {
            shard,
            covers_below: header.covers_below,
            why: format!(
                "its state is not the state of the shard's first {covered} logged commands"
            ),
        })
    }
}

/// A fresh shard of `config`'s engine, as recovery builds one when there
/// is no snapshot.
fn shard_config(config: &EngineConfig) -> ShardConfig {
    ShardConfig {
        hash_seed: config.seed,
        first_token: 1,
        limits: config.limits.share_of(config.shards.max(1)),
    }
}

/// The digest a fresh shard reaches from `log`, with a hash seed the live
/// shard did not have.
fn replay(log: &[Command], config: &EngineConfig) -> u64 {
    let mut shard = Shard::new(ShardConfig {
        hash_seed: 0x7265_706c_6179,
        ..shard_config(config)
    });
    for command in log {
        shard.apply(command.clone());
        // Answers are the live run's business; only the state is compared.
        drop(shard.take_answers());
    }
    shard.digest()
}

#[cfg(test)]
mod tests {
    use deadbolt_core::Limits;
    use deadbolt_core::proto::{Keys, SetOp};
    use deadbolt_core::shard::{Caller, Handle, Input, ShardOp};
    use deadbolt_core::time::Tick;
    use deadbolt_storage::snapshot::SnapshotHeader;

    use super::*;

    fn engine() -> EngineConfig {
        EngineConfig {
            shards: 1,
            ..EngineConfig::new()
        }
    }

    /// Request `n`, at `n` ms, a set op by one client.
    fn set_op(n: u64, op: SetOp) -> Command {
        let caller = Caller {
            client: Arc::from("c"),
            conn: 1,
        };
        Command {
            at: Tick::from_millis(n),
            input: Input::Op {
                handle: Handle(n),
                caller,
                op: ShardOp::Set(op),
            },
        }
    }

    fn insert(n: u64, key: &str) -> Command {
        let keys = Keys::One(key.into());
        set_op(
            n,
            SetOp::Insert {
                set: "s".into(),
                keys,
            },
        )
    }

    /// A log of one shard: the run, then a set and two inserts, each its
    /// own batch (records 1 to 4).
    fn log() -> Vec<(u64, Record)> {
        let run = Record::Run {
            shards: 1,
            limits: Limits::default(),
        };
        let set_up = set_op(
            1,
            SetOp::SetUp {
                set: "s".into(),
                ttl_ms: 60_000,
            },
        );
        let batches = [set_up, insert(2, "a"), insert(3, "b")]
            .into_iter()
            .map(|command| Record::Batch {
                shard: 0,
                commands: vec![command],
            });
        std::iter::once(run)
            .chain(batches)
            .zip(1..)
            .map(|(r, n)| (n, r))
            .collect()
    }

    /// The digest, and the snapshot covering the records below
    /// `covers_below`, of a shard that applied the first `applied`
    /// commands of [`log`].
    fn shard_after(applied: usize, covers_below: u64) -> (u64, Vec<u8>) {
        let mut shard = Shard::new(shard_config(&engine()));
        let commands = log().into_iter().filter_map(|(_, record)| match record {
            Record::Batch { commands, .. } => Some(commands),
            _ => None,
        });
        for command in commands.flatten().take(applied) {
            shard.apply(command);
        }
        let header = SnapshotHeader {
            shard: 0,
            shards: 1,
            covers_below,
            token_reserved: 1,
            limits: Limits::default(),
        };
        let bytes = snapshot::encode(&header, &shard.image()).expect("encodes");
        (shard.digest(), bytes)
    }

    fn kinds(trace: &Trace) -> Vec<&'static str> {
        trace.check(&engine()).iter().map(Violation::kind).collect()
    }

    #[test]
    fn a_log_that_replays_to_the_final_state_keeps_every_rule() {
        let trace = Arc::new(Trace::default());
        let observe = trace.observer();
        for (lsn, record) in log() {
            observe(lsn, &record);
        }
        let (digest, snapshot) = shard_after(2, 4);
        trace.snapshot_written(&snapshot);
        (trace.on_stopped())(0, shard_after(3, 5).0);
        assert_ne!(digest, shard_after(3, 5).0);
        assert!(kinds(&trace).is_empty(), "{:?}", kinds(&trace));
    }

    #[test]
    fn record_numbers_that_repeat_are_caught() {
        let trace = Arc::new(Trace::default());
        let observe = trace.observer();
        for (lsn, record) in log() {
            // The last record again, as a log that lost it would write it.
            observe(lsn.min(3), &record);
        }
        (trace.on_stopped())(0, shard_after(3, 5).0);
        assert_eq!(kinds(&trace), ["log renumbered"]);
    }

    #[test]
    fn a_snapshot_that_says_it_covers_a_batch_it_does_not_hold_is_caught() {
        let trace = Arc::new(Trace::default());
        let observe = trace.observer();
        for (lsn, record) in log() {
            observe(lsn, &record);
        }
        // It holds two commands (records 2 and 3), and says it covers 4.
        trace.snapshot_written(&shard_after(2, 5).1);
        (trace.on_stopped())(0, shard_after(3, 5).0);
        assert_eq!(kinds(&trace), ["snapshot diverged"]);
    }

    #[test]
    fn a_shard_that_ends_elsewhere_than_its_log_is_caught() {
        let trace = Arc::new(Trace::default());
        let observe = trace.observer();
        for (lsn, record) in log() {
            observe(lsn, &record);
        }
        (trace.on_stopped())(0, shard_after(2, 4).0);
        assert_eq!(kinds(&trace), ["replay diverged"]);
    }
}
