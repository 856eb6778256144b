//! A read-write lock on Redis as Redisson builds one (`RedissonReadLock`,
//! `RedissonWriteLock`, `RedissonLock`'s waiting), for the shared-lock
//! benchmark.
//!
//! The data model and the commands are Redisson's: one hash per lock with a
//! `mode` field (`read` or `write`) and one field per holder counting its
//! holds; every read hold also has a timeout key of its own
//! (`{lock}:{holder}:rwlock_timeout:{n}`, with the lease), and the hash's
//! expiry is the longest of them; a write lock is taken only when there is
//! no mode at all; unlocking recomputes the hash's expiry from the read
//! holds left (the longest remaining timeout key), and the last unlock
//! deletes the hash and publishes on the lock's channel
//! (`redisson_rwlock:{lock}`). A request that is refused gets the hash's
//! remaining time to live, and its client waits on the channel for at most
//! that long before it tries again: Redisson's strategy (subscribe, retry
//! on each message or when the time to live runs out), not polling. As in
//! Redisson, a reader is let in whenever the mode is `read`, even while a
//! writer waits: the lock has no writer preference.
//!
//! The scripts are written here from that design, not copied. Left out,
//! because the benchmark never needs them: re-entrant holds by the write
//! holder (a writer taking a read lock, or the write lock twice), and the
//! unlock latch keys that make a retried unlock idempotent (one more `GET`
//! and `SET` per unlock in Redisson).

use std::time::Duration;

use anyhow::Context;
use futures_util::FutureExt;
use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSub};

/// Takes a read hold. KEYS: the lock's hash, this holder's timeout-key
/// prefix. ARGV: lease (ms), holder name. Returns -1 when held, else the
/// hash's remaining time to live (ms).
const READ_LOCK: &str = r"
local mode = redis.call('hget', KEYS[1], 'mode')
if mode == 'write' then
  return redis.call('pttl', KEYS[1])
end
if not mode then
  redis.call('hset', KEYS[1], 'mode', 'read')
end
local holds = redis.call('hincrby', KEYS[1], ARGV[2], 1)
local timeout = KEYS[2] .. ':' .. holds
redis.call('set', timeout, 1)
redis.call('pexpire', timeout, ARGV[1])
local left = redis.call('pttl', KEYS[1])
redis.call('pexpire', KEYS[1], math.max(left, tonumber(ARGV[1])))
return -1
";

/// Releases a read hold. KEYS: the lock's hash, its channel, this
/// holder's timeout-key prefix, the prefix of every holder's timeout keys.
/// ARGV: holder name. Returns 1 when the lock became free, 0 when others
/// still hold it, -1 if this holder held nothing.
const READ_UNLOCK: &str = r"
if redis.call('hexists', KEYS[1], ARGV[1]) == 0 then
  return -1
end
local holds = redis.call('hincrby', KEYS[1], ARGV[1], -1)
if holds == 0 then
  redis.call('hdel', KEYS[1], ARGV[1])
end
redis.call('del', KEYS[3] .. ':' .. (holds + 1))
if redis.call('hlen', KEYS[1]) > 1 then
  local longest = -3
  for _, holder in ipairs(redis.call('hkeys', KEYS[1])) do
    local count = tonumber(redis.call('hget', KEYS[1], holder))
    if count then
      for n = count, 1, -1 do
        local left = redis.call('pttl', KEYS[4] .. ':' .. holder .. ':rwlock_timeout:' .. n)
        longest = math.max(longest, left)
      end
    end
  end
  if longest > 0 then
    redis.call('pexpire', KEYS[1], longest)
    return 0
  end
end
redis.call('del', KEYS[1])
redis.call('publish', KEYS[2], 0)
return 1
";

/// Takes the write lock. KEYS: the lock's hash. ARGV: lease (ms), holder
/// name. Returns -1 when held, else the hash's remaining time to live.
const WRITE_LOCK: &str = r"
if redis.call('hget', KEYS[1], 'mode') then
  return redis.call('pttl', KEYS[1])
end
redis.call('hset', KEYS[1], 'mode', 'write')
redis.call('hset', KEYS[1], ARGV[2], 1)
redis.call('pexpire', KEYS[1], ARGV[1])
return -1
";

/// Releases the write lock. KEYS: the lock's hash, its channel. ARGV:
/// holder name. Returns 1 when released, -1 if this holder held nothing.
const WRITE_UNLOCK: &str = r"
if redis.call('hget', KEYS[1], 'mode') ~= 'write' or redis.call('hexists', KEYS[1], ARGV[1]) == 0 then
  return -1
end
redis.call('hdel', KEYS[1], ARGV[1])
if redis.call('hlen', KEYS[1]) == 1 then
  redis.call('del', KEYS[1])
  redis.call('publish', KEYS[2], 1)
else
  redis.call('hset', KEYS[1], 'mode', 'read')
end
return 1
";

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Shared with other readers.
    Read,
    /// Alone.
    Write,
}

/// One client of a Redisson-style read-write lock: a connection for the
/// scripts and one subscribed to the lock's channel, to wait on.
pub struct RwClient {
    connection: MultiplexedConnection,
    /// Subscribed to the lock's channel only while this client waits.
    pubsub: PubSub,
    lock: String,
    holder: String,
    lease_ms: u64,
    scripts: Scripts,
}

struct Scripts {
    read_lock: redis::Script,
    read_unlock: redis::Script,
    write_lock: redis::Script,
    write_unlock: redis::Script,
}

impl RwClient {
    /// A client of the lock `lock` on `client`'s server, known as `holder`
    /// (unique per client, as Redisson's `{uuid}:{thread}`), taking holds
    /// with leases of `lease`.
    pub async fn connect(
        client: &redis::Client,
        lock: &str,
        holder: &str,
        lease: Duration,
    ) -> anyhow::Result<RwClient> {
        let connection = client.get_multiplexed_async_connection().await?;
        let pubsub = client.get_async_pubsub().await?;
        Ok(RwClient {
            connection,
            pubsub,
            lock: lock.to_owned(),
            holder: holder.to_owned(),
            lease_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1),
            scripts: Scripts {
                read_lock: redis::Script::new(READ_LOCK),
                read_unlock: redis::Script::new(READ_UNLOCK),
                write_lock: redis::Script::new(WRITE_LOCK),
                write_unlock: redis::Script::new(WRITE_UNLOCK),
            },
        })
    }

    /// Takes the lock for `access`, waiting as long as it takes, as
    /// `RedissonLock.lock` does: tries; if refused, subscribes to the
    /// lock's channel and, until a try succeeds, waits for an unlock
    /// message (or the time to live the refusal named) and tries again;
    /// then unsubscribes.
    pub async fn lock(&mut self, access: Access) -> anyhow::Result<()> {
        if self.try_lock(access).await? == -1 {
            return Ok(());
        }
        let channel = channel(&self.lock);
        self.pubsub.subscribe(&channel).await.context("SUBSCRIBE")?;
        loop {
            let left_ms = self.try_lock(access).await?;
            if left_ms == -1 {
                break;
            }
            // -2: the hash vanished between the check and PTTL: try again.
            if left_ms > 0 {
                let left = Duration::from_millis(left_ms.unsigned_abs());
                let _ = tokio::time::timeout(left, self.pubsub.on_message().next()).await;
            }
        }
        self.pubsub
            .unsubscribe(&channel)
            .await
            .context("UNSUBSCRIBE")?;
        // Messages that came after the grant, before the unsubscribe: not
        // for the next wait.
        while self
            .pubsub
            .on_message()
            .next()
            .now_or_never()
            .flatten()
            .is_some()
        {}
        Ok(())
    }

    /// One attempt: -1 if taken, else the lock's remaining time to live.
    async fn try_lock(&mut self, access: Access) -> anyhow::Result<i64> {
        let left: i64 = match access {
            Access::Read => {
                let timeouts = self.timeout_prefix();
                self.scripts
                    .read_lock
                    .key(&self.lock)
                    .key(timeouts)
                    .arg(self.lease_ms)
                    .arg(&self.holder)
                    .invoke_async(&mut self.connection)
                    .await
                    .context("read lock")?
            }
            Access::Write => self
                .scripts
                .write_lock
                .key(&self.lock)
                .arg(self.lease_ms)
                .arg(&self.holder)
                .invoke_async(&mut self.connection)
                .await
                .context("write lock")?,
        };
        Ok(left)
    }

    /// Releases a hold taken with `access`.
    pub async fn unlock(&mut self, access: Access) -> anyhow::Result<()> {
        let released: i64 = match access {
            Access::Read => {
                let timeouts = self.timeout_prefix();
                self.scripts
                    .read_unlock
                    .key(&self.lock)
                    .key(channel(&self.lock))
                    .key(timeouts)
                    .key(&self.lock)
                    .arg(&self.holder)
                    .invoke_async(&mut self.connection)
                    .await
                    .context("read unlock")?
            }
            Access::Write => self
                .scripts
                .write_unlock
                .key(&self.lock)
                .key(channel(&self.lock))
                .arg(&self.holder)
                .invoke_async(&mut self.connection)
                .await
                .context("write unlock")?,
        };
        anyhow::ensure!(released >= 0, "{access:?} unlock: not held");
        Ok(())
    }

    /// This holder's read timeout keys: `{lock}:{holder}:rwlock_timeout`.
    fn timeout_prefix(&self) -> String {
        format!("{}:{}:rwlock_timeout", self.lock, self.holder)
    }
}

/// The lock's unlock channel, as Redisson names it.
fn channel(lock: &str) -> String {
    format!("redisson_rwlock:{{{lock}}}")
}
