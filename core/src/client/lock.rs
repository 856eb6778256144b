//! Lock guards: a grant with a conservative view of its lease, optional
//! background renewal, and release.
//!
//! The lease view never outlasts the server's. The server measures a lease
//! from the grant, and the grant happened after the client sent the request
//! that got it; so the client anchors the lease at that send time, minus a
//! margin for clock-rate drift (1 % of the lease + 2 ms, as Redlock does).
//! A grant that came after a long wait would leave little of that view, so
//! the client re-anchors it with an `extend` round trip, whose send time is
//! again a sound anchor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Client, Connection, Error, Timed};
use crate::proto::{
    Acquire, Empty, ErrorCode, EventName, Extended, Granted, LockOp, Mode, Op, Wait,
};

/// How to take a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockOptions {
    /// The lease.
    pub ttl: Duration,
    /// How long to wait: `None` for as long as it takes, zero for not at
    /// all.
    pub wait: Option<Duration>,
    /// Release as soon as the connection that took it closes.
    pub ephemeral: bool,
    /// Renew the lease in the background (every third of the lease) until
    /// the guard is released or dropped.
    pub auto_renew: bool,
    /// Shared or exclusive, and how many exclusive holders the key admits
    /// (SPEC section 7); a mutex by default.
    pub mode: Mode,
    /// After this grant's lease runs out (not after an unlock), nobody is
    /// granted the key for this long: time for a paused holder's writes
    /// in flight to land. Whole milliseconds, at most 60 s.
    pub lock_delay: Duration,
    /// Ask the server to push `expiring` and `lost` events about the grant
    /// (SPEC section 7), which [`LockGuard::expiring`] and
    /// [`LockGuard::lost`] heed beside the client's own lease view.
    pub notify: bool,
}

impl LockOptions {
    /// An exclusive lock (a mutex), waiting as long as it takes, not
    /// ephemeral, no renewal, no lock delay.
    pub fn new(ttl: Duration) -> LockOptions {
        LockOptions {
            ttl,
            wait: None,
            ephemeral: false,
            auto_renew: false,
            mode: Mode::MUTEX,
            lock_delay: Duration::ZERO,
            notify: false,
        }
    }

    /// Have the server push `expiring` and `lost` events about the grant.
    pub fn notify(mut self, notify: bool) -> LockOptions {
        self.notify = notify;
        self
    }

    /// Hold the key shared: with any number of other shared holders, and
    /// no exclusive one.
    pub fn shared(mut self) -> LockOptions {
        self.mode = Mode::Shared;
        self
    }

    /// Hold the key as one of at most `limit` exclusive holders (a counting
    /// semaphore; 1 is a mutex). Every request on the key must say the
    /// same limit while it is held or waited on.
    pub fn limit(mut self, limit: u32) -> LockOptions {
        self.mode = Mode::Exclusive { limit };
        self
    }

    /// After the lease runs out, keep the key from everyone for `delay`.
    pub fn lock_delay(mut self, delay: Duration) -> LockOptions {
        self.lock_delay = delay;
        self
    }

    /// Wait at most `wait` (zero: do not wait).
    pub fn wait(mut self, wait: Duration) -> LockOptions {
        self.wait = Some(wait);
        self
    }

    /// Release when the connection closes.
    pub fn ephemeral(mut self, ephemeral: bool) -> LockOptions {
        self.ephemeral = ephemeral;
        self
    }

    /// Renew the lease in the background.
    pub fn auto_renew(mut self, auto_renew: bool) -> LockOptions {
        self.auto_renew = auto_renew;
        self
    }
}

/// The client's view of a lease.
#[derive(Debug, Clone, Copy)]
struct Lease {
    /// The lease is certainly still held before this instant.
    valid_until: Instant,
    ttl: Duration,
    /// The server said the grant is gone, or renewal failed past the lease.
    lost: bool,
}

/// The margin for clock-rate drift between client and server.
fn drift(ttl: Duration) -> Duration {
    ttl / 100 + Duration::from_millis(2)
}

fn lease_from(anchor: Instant, ttl: Duration) -> Instant {
    anchor + ttl.saturating_sub(drift(ttl))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A held lock. Release it with [`LockGuard::unlock`]; dropping it stops
/// renewal and releases it in the background, best effort.
///
/// An ephemeral guard keeps the connection that took the lock open, and
/// counts the lock lost the moment that connection closes (the server
/// releases it then), whatever the lease view says.
pub struct LockGuard {
    client: Client,
    key: String,
    token: u64,
    lease: Arc<watch::Sender<Lease>>,
    /// Held around each `extend` and the lease update after it, so that
    /// the renewer and [`LockGuard::extend`] never race: the last extend
    /// sent is the one the lease view records.
    extending: Arc<Mutex<()>>,
    /// For an ephemeral lock, the connection it lives and dies with.
    bound_to: Option<Arc<dyn Connection>>,
    /// The renewer and the watcher of `bound_to`.
    tasks: Vec<JoinHandle<()>>,
    released: bool,
    /// The server's signed statement of the grant (`--sign-grants`).
    proof: Option<String>,
    /// How many `expiring` events the server pushed (with `notify`).
    warnings: Arc<watch::Sender<u64>>,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.key)
            .field("token", &self.token)
            .field("lease", &*self.lease.borrow())
            .field("ephemeral", &self.bound_to.is_some())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Takes `key`, waiting as long as it takes.
    pub async fn lock(&self, key: &str, ttl: Duration) -> Result<LockGuard, Error> {
        let options = LockOptions::new(ttl);
        self.lock_with(key, options)
            .await?
            .ok_or_else(|| Error::Server(crate::proto::ServerError::timeout(0)))
    }

    /// Takes `key` shared (as a reader), waiting as long as it takes: any
    /// number of shared holders hold it at once, and none while an
    /// exclusive holder (a writer) does or waits ahead.
    pub async fn lock_shared(&self, key: &str, ttl: Duration) -> Result<LockGuard, Error> {
        let options = LockOptions::new(ttl).shared();
        self.lock_with(key, options)
            .await?
            .ok_or_else(|| Error::Server(crate::proto::ServerError::timeout(0)))
    }

    /// Takes `key` if it is free; `None` if someone else holds it.
    pub async fn try_lock(&self, key: &str, ttl: Duration) -> Result<Option<LockGuard>, Error> {
        self.lock_with(key, LockOptions::new(ttl).wait(Duration::ZERO))
            .await
    }

    /// Takes `key`, waiting at most `wait`; `None` if it was not granted in
    /// time.
    pub async fn lock_timeout(
        &self,
        key: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Option<LockGuard>, Error> {
        self.lock_with(key, LockOptions::new(ttl).wait(wait)).await
    }

    /// Takes `key` as `options` say; `None` if it was busy or the wait ran
    /// out.
    pub async fn lock_with(
        &self,
        key: &str,
        options: LockOptions,
    ) -> Result<Option<LockGuard>, Error> {
        let deadline = options.wait.map(|wait| Instant::now() + wait);
        self.inner.releases.settled(key).await;
        loop {
            let granted = match self.request_lock(key, &options, deadline).await {
                Ok(granted) => granted,
                Err(e) if matches!(e.code(), Some(ErrorCode::Busy | ErrorCode::Timeout)) => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            if let Some(guard) = self.anchor(key, &options, granted).await? {
                return Ok(Some(guard));
            }
            // The grant ran out before it could be re-anchored: the wait
            // was longer than the lease. Ask again, within the wait left.
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
        }
    }

    async fn request_lock(
        &self,
        key: &str,
        options: &LockOptions,
        deadline: Option<Instant>,
    ) -> Result<Timed<Granted>, Error> {
        let make_op = |_| {
            let wait = match deadline {
                None => Wait::Forever,
                Some(d) => {
                    Wait::from_wait_ms(Some(millis(d.saturating_duration_since(Instant::now()))))
                }
            };
            Op::Lock(LockOp::Acquire(Acquire {
                key: key.to_owned(),
                ttl_ms: millis(options.ttl).max(1),
                wait,
                ephemeral: options.ephemeral,
                mode: options.mode,
                lock_delay_ms: millis(options.lock_delay),
                notify: options.notify,
            }))
        };
        self.call_with(make_op, options.notify).await
    }

    /// Turns a grant into a guard with a sound lease view, or `None` if the
    /// grant was lost before that could be done.
    async fn anchor(
        &self,
        key: &str,
        options: &LockOptions,
        timed: Timed<Granted>,
    ) -> Result<Option<LockGuard>, Error> {
        let granted = timed.reply;
        let ttl = Duration::from_millis(granted.ttl_ms);
        let mut anchor = timed.sent_at;
        if anchor.elapsed() > ttl / 10 {
            match self.extend_timed(key, granted.token, ttl).await {
                Ok(sent_at) => anchor = sent_at,
                Err(e) if e.code() == Some(ErrorCode::NotHeld) => return Ok(None),
                Err(e) => {
                    // Nobody will hold a guard for this grant: give it back
                    // rather than leave the key taken for a whole lease.
                    unlock_in_background(self.clone(), key.to_owned(), granted.token);
                    return Err(e);
                }
            }
        }
        let lease = Lease {
            valid_until: lease_from(anchor, ttl),
            ttl,
            lost: false,
        };
        let bound_to = options.ephemeral.then_some(timed.connection);
        let mut guard = LockGuard::new(
            self.clone(),
            key.to_owned(),
            granted.token,
            lease,
            bound_to,
            options.auto_renew,
        );
        guard.proof = granted.proof;
        if let Some(feed) = timed.events {
            guard.heed(feed);
        }
        Ok(Some(guard))
    }

    /// `extend`: restarts the lease of the grant `token` of `key` at `ttl`.
    pub async fn extend(&self, key: &str, token: u64, ttl: Duration) -> Result<(), Error> {
        self.extend_timed(key, token, ttl).await.map(|_| ())
    }

    /// `extend`, returning when the successful attempt was sent.
    async fn extend_timed(&self, key: &str, token: u64, ttl: Duration) -> Result<Instant, Error> {
        let op = Op::Lock(LockOp::Extend {
            key: key.to_owned(),
            token,
            ttl_ms: millis(ttl).max(1),
        });
        let timed: Timed<Extended> = self.call_timed(op).await?;
        Ok(timed.sent_at)
    }

    /// `unlock`: ends the grant `token` of `key`, from any connection.
    ///
    /// `not_held` means the grant had already ended (its lease ran out, or
    /// someone unlocked it) — unless an earlier attempt of this call may
    /// have been carried out before its connection broke, in which case it
    /// is taken as that attempt's success (so may an `unavailable` one, in a
    /// cluster; not one refused `overloaded`, or never sent).
    pub async fn unlock(&self, key: &str, token: u64) -> Result<(), Error> {
        let op = Op::Lock(LockOp::Release {
            key: key.to_owned(),
            token,
        });
        let mut earlier_may_have_run = false;
        let result = self
            .call_adapting::<Empty>(|attempt| {
                earlier_may_have_run = attempt.earlier_may_have_run;
                op.clone()
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if earlier_may_have_run && e.code() == Some(ErrorCode::NotHeld) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl LockGuard {
    fn new(
        client: Client,
        key: String,
        token: u64,
        lease: Lease,
        bound_to: Option<Arc<dyn Connection>>,
        auto_renew: bool,
    ) -> LockGuard {
        let lease = Arc::new(watch::Sender::new(lease));
        let extending = Arc::new(Mutex::new(()));
        let mut tasks = Vec::new();
        if let Some(connection) = &bound_to {
            let (connection, lease) = (Arc::clone(connection), Arc::clone(&lease));
            tasks.push(tokio::spawn(async move {
                connection.closed().await;
                lease.send_modify(|lease| lease.lost = true);
            }));
        }
        if auto_renew {
            let renewer = Renewer {
                client: client.clone(),
                key: key.clone(),
                token,
                lease: Arc::clone(&lease),
                extending: Arc::clone(&extending),
            };
            tasks.push(tokio::spawn(renewer.run()));
        }
        LockGuard {
            client,
            key,
            token,
            lease,
            extending,
            bound_to,
            tasks,
            released: false,
            proof: None,
            warnings: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Heeds the server's events about this grant: `lost` ends the lease
    /// view at once, `expiring` wakes [`LockGuard::expiring`]. The feed
    /// ends with its connection; the lease view then goes on alone.
    fn heed(&mut self, mut feed: super::EventFeed) {
        let (lease, warnings) = (Arc::clone(&self.lease), Arc::clone(&self.warnings));
        let token = self.token;
        self.tasks.push(tokio::spawn(async move {
            while let Some(event) = feed.next().await {
                if event.token != Some(token) {
                    continue;
                }
                match event.event {
                    EventName::Lost => {
                        lease.send_modify(|lease| lease.lost = true);
                        return;
                    }
                    EventName::Expiring => {
                        warnings.send_modify(|n| *n += 1);
                    }
                    _ => {}
                }
            }
        }));
    }

    /// Resolves once a third of the lease (or less) is left without an
    /// extend: when the server says so (a lock taken with
    /// [`LockOptions::notify`]), or when the client's own lease view says
    /// so, whichever is first; at once if the lock may be lost already.
    /// Extend the lease then, or wind the work down.
    pub async fn expiring(&self) {
        let mut warned = self.warnings.subscribe();
        warned.borrow_and_update();
        let mut changes = self.lease.subscribe();
        let third_left = |lease: &Lease| {
            lease
                .valid_until
                .checked_sub(lease.ttl / 3)
                .unwrap_or(lease.valid_until)
        };
        let local = async {
            while let Some(lease) = next_lease(&mut changes, third_left).await {
                if third_left(&lease) <= Instant::now() {
                    return;
                }
            }
        };
        tokio::select! {
            () = local => {}
            _ = warned.changed() => {}
        }
    }

    /// The server's signed proof of this grant, if the server signs grants
    /// (`deadbolt serve --sign-grants`): hand it to the protected resource,
    /// which checks it offline with [`crate::proof::verify`] and the
    /// server's public key (`GET /pubkey`). It states the grant's first
    /// lease; extends are not signed.
    pub fn proof(&self) -> Option<&str> {
        self.proof.as_deref()
    }

    /// The lock's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The fencing token of this grant: pass it to whatever the lock
    /// protects, which should refuse any token lower than one it has seen.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// How much longer the lock is certainly held (zero once it may not be).
    pub fn valid_for(&self) -> Duration {
        let lease = *self.lease.borrow();
        let connection_closed = self.bound_to.as_ref().is_some_and(|c| !c.is_open());
        if lease.lost || connection_closed {
            return Duration::ZERO;
        }
        lease.valid_until.saturating_duration_since(Instant::now())
    }

    /// Whether the lock is certainly still held.
    pub fn is_held(&self) -> bool {
        !self.valid_for().is_zero()
    }

    /// Resolves once the lock may no longer be held: the lease view ran out
    /// (renewal, if on, failed to keep it up), the server said the grant is
    /// gone, or (ephemeral) the connection that took it closed.
    pub async fn lost(&self) {
        let mut changes = self.lease.subscribe();
        while let Some(lease) = next_lease(&mut changes, |lease| lease.valid_until).await {
            if lease.valid_until <= Instant::now() {
                return;
            }
        }
    }

    /// [`LockGuard::lost`] as a future that owns what it needs, so a task
    /// of its own can watch for the loss while the guard is busy elsewhere.
    pub fn lost_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let lease = Arc::clone(&self.lease);
        async move {
            let mut changes = lease.subscribe();
            while let Some(lease) = next_lease(&mut changes, |lease| lease.valid_until).await {
                if lease.valid_until <= Instant::now() {
                    return;
                }
            }
        }
    }

    /// Restarts the lease at `ttl` (and renews at that period from now on).
    pub async fn extend(&self, ttl: Duration) -> Result<(), Error> {
        let _one_at_a_time = self.extending.lock().await;
        match self.client.extend_timed(&self.key, self.token, ttl).await {
            Ok(sent_at) => {
                self.lease.send_modify(|lease| {
                    lease.valid_until = lease_from(sent_at, ttl);
                    lease.ttl = ttl;
                });
                Ok(())
            }
            Err(e) => {
                if e.code() == Some(ErrorCode::NotHeld) {
                    self.lease.send_modify(|lease| lease.lost = true);
                }
                Err(e)
            }
        }
    }

    /// Stops renewal and releases the lock. `not_held` means the lease had
    /// already run out: whatever the lock protected may have been touched
    /// by the next holder.
    pub async fn unlock(mut self) -> Result<(), Error> {
        self.stop_renewal();
        self.released = true;
        self.client.unlock(&self.key, self.token).await
    }

    /// Lets go of the guard without releasing the lock: renewal stops and
    /// the lock stays held until its lease ends (or someone unlocks it with
    /// the token, which this returns). `deadbolt try-lock` uses this to
    /// leave a lock to another process.
    pub fn detach(mut self) -> u64 {
        self.stop_renewal();
        self.released = true;
        self.token
    }

    fn stop_renewal(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.stop_renewal();
        if self.released {
            return;
        }
        unlock_in_background(self.client.clone(), self.key.clone(), self.token);
    }
}

/// Releases a grant nobody holds a guard for, best effort: its lease ends
/// it anyway if this fails.
fn unlock_in_background(client: Client, key: String, token: u64) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let releasing = Releasing::begin(&client, &key);
        runtime.spawn(async move {
            if let Err(error) = client.unlock(&key, token).await {
                tracing::debug!(%error, key, "background unlock failed");
            }
            drop(releasing);
        });
    }
}

/// The background unlocks in flight, per key.
///
/// A `lock` by the client that holds the key is a re-lock and returns the
/// same token (SPEC section 2); so if this client locked a key again while
/// the release of a dropped guard was still on its way, that late release
/// would end the new grant. A `lock` of the key waits for them first.
#[derive(Debug, Default)]
pub(crate) struct Releases {
    pending: std::sync::Mutex<HashMap<String, watch::Sender<u32>>>,
}

impl Releases {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<u32>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn end(&self, key: &str) {
        let mut pending = self.pending();
        if let Some(count) = pending.get(key) {
            count.send_modify(|n| *n -= 1);
            if *count.borrow() == 0 {
                pending.remove(key);
            }
        }
    }

    /// Resolves once no release of `key` is in flight.
    async fn settled(&self, key: &str) {
        let count = self.pending().get(key).map(watch::Sender::subscribe);
        if let Some(mut count) = count {
            // Dropped with its last release: settled either way.
            let _ = count.wait_for(|n| *n == 0).await;
        }
    }
}

/// One release in flight; ends when dropped (also if its task is).
struct Releasing {
    client: Client,
    key: String,
}

impl Releasing {
    /// Counts a release of `key` by `client` in flight until dropped.
    fn begin(client: &Client, key: &str) -> Releasing {
        client
            .inner
            .releases
            .pending()
            .entry(key.to_owned())
            .or_insert_with(|| watch::Sender::new(0))
            .send_modify(|n| *n += 1);
        Releasing {
            client: client.clone(),
            key: key.to_owned(),
        }
    }
}

impl Drop for Releasing {
    fn drop(&mut self) {
        self.client.inner.releases.end(&self.key);
    }
}

/// Renews a guard's lease in the background.
struct Renewer {
    client: Client,
    key: String,
    token: u64,
    lease: Arc<watch::Sender<Lease>>,
    extending: Arc<Mutex<()>>,
}

/// What one renewal attempt came to.
enum Renewal {
    /// The lease was restarted, or moved by someone else meanwhile.
    Renewed,
    /// It failed but the lease still runs: try again soon.
    TryAgain,
    /// The grant is gone or may be.
    Lost,
}

impl Renewer {
    /// Renews the lease every third of it until aborted or the grant is
    /// lost. A change to the lease (an explicit extend) restarts the count.
    async fn run(self) {
        let mut changes = self.lease.subscribe();
        while let Some(lease) = next_lease(&mut changes, renew_at).await {
            match self.renew_once().await {
                Renewal::Renewed => {}
                Renewal::TryAgain => tokio::time::sleep(lease.ttl / 20).await,
                Renewal::Lost => {
                    tracing::warn!(
                        key = self.key,
                        token = self.token,
                        "lock lost: the lease could not be renewed"
                    );
                    self.lease.send_modify(|l| l.lost = true);
                    return;
                }
            }
        }
    }

    async fn renew_once(&self) -> Renewal {
        let _one_at_a_time = self.extending.lock().await;
        // Read again under the lock: an explicit extend may have just moved
        // the lease.
        let lease = *self.lease.borrow();
        if lease.lost {
            return Renewal::Lost;
        }
        if Instant::now() < renew_at(&lease) {
            return Renewal::Renewed;
        }
        let Lease {
            valid_until, ttl, ..
        } = lease;
        let left = valid_until.saturating_duration_since(Instant::now());
        let extend = self.client.extend_timed(&self.key, self.token, ttl);
        match tokio::time::timeout(left, extend).await {
            Ok(Ok(sent_at)) => {
                self.lease
                    .send_modify(|l| l.valid_until = lease_from(sent_at, ttl));
                Renewal::Renewed
            }
            Ok(Err(e)) if e.code() != Some(ErrorCode::NotHeld) && Instant::now() < valid_until => {
                tracing::debug!(%e, key = self.key, "lease renewal failed; trying again");
                Renewal::TryAgain
            }
            Ok(Err(_)) | Err(_) => Renewal::Lost,
        }
    }
}

/// Waits until the instant `at(lease)` of the current lease, starting over
/// whenever the lease changes. Returns the lease as it is then, or `None`
/// once it is lost (or the guard is gone).
async fn next_lease(
    changes: &mut watch::Receiver<Lease>,
    at: impl Fn(&Lease) -> Instant,
) -> Option<Lease> {
    loop {
        let lease = *changes.borrow_and_update();
        if lease.lost {
            return None;
        }
        tokio::select! {
            biased;
            changed = changes.changed() => changed.ok()?,
            () = tokio::time::sleep_until(at(&lease)) => return Some(*changes.borrow()),
        }
    }
}

/// When to renew: with a third of the lease gone.
fn renew_at(lease: &Lease) -> Instant {
    lease
        .valid_until
        .checked_sub(lease.ttl * 2 / 3)
        .unwrap_or(lease.valid_until)
}
