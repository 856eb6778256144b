//! Counting semaphores (SPEC section 7): a key that admits up to `limit`
//! holders at once, each holding a permit with its own token and lease.
//!
//! A permit is a grant of the key like any other, so it is a [`LockGuard`]
//! underneath: a conservative lease view, optional renewal, and release on
//! drop. A client id holds at most one permit of a key: asking again is a
//! retry of the same grant (SPEC section 2), so a worker that needs two
//! permits of one semaphore uses two [`Client`]s.

use std::ops::Deref;
use std::time::Duration;

use super::{Client, Error, LockGuard, LockOptions};
use crate::proto::ServerError;

/// A counting semaphore on one key: at most `limit` permits held at once,
/// across every client that uses the key with the same limit. Made by
/// [`Client::semaphore`].
#[derive(Debug, Clone)]
pub struct Semaphore {
    client: Client,
    key: String,
    limit: u32,
}

/// One permit of a [`Semaphore`]: released with [`Permit::release`], or in
/// the background when dropped, as a [`LockGuard`] is (which it derefs to,
/// for its token, lease view and `lost`).
#[derive(Debug)]
#[must_use = "dropping a permit releases it"]
pub struct Permit(LockGuard);

impl Client {
    /// The counting semaphore `key` with `limit` permits (1..=10,000).
    /// Every client of the key must use the same limit while it is held
    /// or waited on; one that does not gets `conflict`.
    pub fn semaphore(&self, key: &str, limit: u32) -> Semaphore {
        Semaphore {
            client: self.clone(),
            key: key.to_owned(),
            limit,
        }
    }
}

impl Semaphore {
    /// The semaphore's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// How many permits it has.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Takes a permit, waiting as long as it takes.
    pub async fn acquire(&self, ttl: Duration) -> Result<Permit, Error> {
        self.acquire_with(LockOptions::new(ttl))
            .await?
            .ok_or_else(|| Error::Server(ServerError::timeout(0)))
    }

    /// Takes a permit if one is free now; `None` if all are held.
    pub async fn try_acquire(&self, ttl: Duration) -> Result<Option<Permit>, Error> {
        self.acquire_with(LockOptions::new(ttl).wait(Duration::ZERO))
            .await
    }

    /// Takes a permit as `options` say (their mode is this semaphore's);
    /// `None` if none was free in time.
    pub async fn acquire_with(&self, options: LockOptions) -> Result<Option<Permit>, Error> {
        let options = options.limit(self.limit);
        let guard = self.client.lock_with(&self.key, options).await?;
        Ok(guard.map(Permit))
    }
}

impl Permit {
    /// Releases the permit. `not_held` means its lease had already run out.
    pub async fn release(self) -> Result<(), Error> {
        self.0.unlock().await
    }

    /// The permit as the lock guard it is.
    pub fn into_guard(self) -> LockGuard {
        self.0
    }
}

impl Deref for Permit {
    type Target = LockGuard;

    fn deref(&self) -> &LockGuard {
        &self.0
    }
}
