//! The systems under comparison, behind one interface: each offers leased
//! locks (try-lock, blocking lock, unlock) and a distinct set, and each is
//! started with a [`Durability`]: what an acknowledgement promises.

pub mod cluster;
pub mod deadbolt;
pub mod etcd;
pub mod memcached;
pub mod postgres;
pub mod redis;
pub mod redisson;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use async_trait::async_trait;

/// What a system's acknowledgement of a change promises: a parameter of
/// every system, which maps it to its own settings (deadbolt `--fsync`,
/// Redis `appendfsync`, PostgreSQL `synchronous_commit`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Nothing reaches the disk: a restart loses everything.
    #[default]
    Memory,
    /// On stable storage before the reply (fsync per commit, shared by the
    /// commits that arrive together).
    Always,
    /// Written before the reply, fsynced every `every_ms`: a power cut may
    /// lose the last interval's acknowledged changes.
    Periodic {
        /// The fsync interval.
        every_ms: u64,
    },
}

impl Durability {
    /// Whether two settings make the same kind of promise (so that their
    /// rows are compared): a periodic fsync matches any other interval.
    pub fn same_promise(self, other: Durability) -> bool {
        std::mem::discriminant(&self) == std::mem::discriminant(&other)
    }
}

/// As `deadbolt serve` spells it: `memory` (`--in-memory`), `always`,
/// `every=10ms`.
impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Durability::Memory => f.write_str("memory"),
            Durability::Always => f.write_str("always"),
            Durability::Periodic { every_ms } => write!(
                f,
                "every={}",
                humantime::format_duration(Duration::from_millis(every_ms))
            ),
        }
    }
}

impl FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Durability, String> {
        match s {
            "memory" | "in-memory" => Ok(Durability::Memory),
            "always" => Ok(Durability::Always),
            _ => {
                let every = s
                    .strip_prefix("every=")
                    .ok_or_else(|| format!("{s:?}: expected memory, always or every=DURATION"))?;
                let every = humantime::parse_duration(every).map_err(|e| format!("{s:?}: {e}"))?;
                let every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
                if every_ms == 0 {
                    return Err(format!("{s:?}: the interval must be at least 1 ms"));
                }
                Ok(Durability::Periodic { every_ms })
            }
        }
    }
}

/// A row that cannot run on this machine or with this build, and why:
/// reported as skipped, not as a failure.
#[derive(Debug)]
pub struct Skipped(pub String);

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Skipped {}

/// What a lock grant is known by, to release it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held(pub u64);

/// One connection to a system.
#[async_trait]
pub trait Conn: Send {
    /// Takes `key` if free; `None` if someone holds it.
    async fn try_lock(&mut self, key: &str, ttl: Duration) -> anyhow::Result<Option<Held>>;
    /// Takes `key`, waiting as long as it takes (server-side where the
    /// system can, else by polling).
    async fn lock(&mut self, key: &str, ttl: Duration) -> anyhow::Result<Held>;
    /// Releases a grant.
    async fn unlock(&mut self, key: &str, held: Held) -> anyhow::Result<()>;
    /// Makes the set exist.
    async fn set_up(&mut self, set: &str) -> anyhow::Result<()>;
    /// Inserts keys into a set, in order: whether each was new.
    async fn insert(&mut self, set: &str, keys: &[String]) -> anyhow::Result<Vec<bool>>;
    /// Lock requests this connection has sent (polls included).
    fn lock_requests(&self) -> u64;

    /// Try-lock + unlock cycles on random keys (from
    /// [`cycle_key`](crate::scenarios::cycle_key) or
    /// [`lane_key`](crate::scenarios::lane_key), seeded with `seed`) with
    /// `depth` requests in flight on this one connection, until `stop`: the
    /// cycles that took their key. `None` (the default): the harness has no
    /// pipelining client for this system.
    async fn pipelined(
        &mut self,
        depth: usize,
        seed: u64,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Option<u64>> {
        let _ = (depth, seed, stop);
        Ok(None)
    }

    /// Takes every key, each as soon as it is free (the expiry storm):
    /// when each was granted, in the order of `keys`. By default, rounds of
    /// try-locks every `retry`; systems that wait on the server override it.
    async fn lock_all(
        &mut self,
        keys: &[String],
        ttl: Duration,
        retry: Duration,
    ) -> anyhow::Result<Vec<Instant>> {
        let mut rounds = Rounds::new(keys.len());
        while let Some(open) = rounds.open() {
            let mut taken = Vec::with_capacity(open.len());
            for &i in &open {
                taken.push(self.try_lock(&keys[i], ttl).await?.is_some());
            }
            rounds.record(&open, taken);
            tokio::time::sleep(retry).await;
        }
        Ok(rounds.finish())
    }
}

/// A running system.
#[async_trait]
pub trait System: Send + Sync {
    /// Its name in the tables.
    fn name(&self) -> String;
    /// How it stores data (durability tier), in its own settings.
    fn tier(&self) -> String;
    /// A new connection.
    async fn connect(&self) -> anyhow::Result<Box<dyn Conn>>;
    /// CPU time the server has used so far.
    fn cpu(&self) -> Duration;
    /// The server's resident memory now.
    fn rss(&self) -> u64;
    /// The system's own idea of its memory use, where it has one.
    async fn own_memory(&self) -> Option<u64> {
        None
    }
    /// How many server processes hold a copy of the data (a replicated
    /// system's rows are compared with deadbolt's with as many nodes).
    fn nodes(&self) -> usize {
        1
    }
    /// Whether locks have leases (expire by themselves).
    fn has_leases(&self) -> bool {
        true
    }
    /// Whether a held lock is server state that can be counted in memory.
    fn locks_in_memory(&self) -> bool {
        true
    }
}

/// The bookkeeping of taking keys in rounds: which keys are still to take,
/// and when each was taken.
pub struct Rounds(Vec<Option<Instant>>);

impl Rounds {
    /// None of `n` keys taken yet.
    pub fn new(n: usize) -> Rounds {
        Rounds(vec![None; n])
    }

    /// The indexes of the keys still to take, or `None` when all are taken.
    pub fn open(&self) -> Option<Vec<usize>> {
        let open: Vec<usize> = (0..self.0.len()).filter(|&i| self.0[i].is_none()).collect();
        (!open.is_empty()).then_some(open)
    }

    /// Notes which of the `open` keys this round took.
    pub fn record(&mut self, open: &[usize], taken: impl IntoIterator<Item = bool>) {
        let now = Instant::now();
        for (&i, taken) in open.iter().zip(taken) {
            if taken {
                self.0[i] = Some(now);
            }
        }
    }

    /// When each key was taken, in order.
    pub fn finish(self) -> Vec<Instant> {
        self.0.into_iter().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durability_reads_and_prints_as_deadbolt_serve_spells_it() {
        for (text, durability) in [
            ("memory", Durability::Memory),
            ("always", Durability::Always),
            ("every=10ms", Durability::Periodic { every_ms: 10 }),
            ("every=1s", Durability::Periodic { every_ms: 1000 }),
        ] {
            assert_eq!(text.parse::<Durability>(), Ok(durability));
            assert_eq!(durability.to_string(), text);
        }
        for bad in ["", "sometimes", "every=", "every=0ms", "every=soon"] {
            assert!(bad.parse::<Durability>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_the_same_kind_of_promise_is_compared() {
        let every = |every_ms| Durability::Periodic { every_ms };
        assert!(every(10).same_promise(every(1000)));
        assert!(!Durability::Always.same_promise(every(10)));
        assert!(!Durability::Memory.same_promise(Durability::Always));
    }
}
