//! Hedged requests: a request still unanswered after an adaptive delay is
//! sent again, on the same connection, and the first answer wins.
//!
//! Only where a second copy can overtake a lost packet of the first: QUIC,
//! where each request has its own stream ([`Connection::hedges`]). Over
//! one ordered byte stream (WebSocket over TCP) the copy would wait behind
//! the same lost segment, so nothing is hedged there.
//!
//! Why it is safe: every op hedged here is safe to retry by the protocol
//! (SPEC sections 2 and 3), and the copy carries the same client id on the
//! same connection, so the server treats it as a retry. A `lock` and its
//! copy are answered with one token: whichever is granted first, the other
//! is answered as a re-lock of the same grant (a copy queued behind its
//! original is answered at the original's grant), never as a second
//! grant. An `insert` and its copy answer the same index and `first`. The
//! loser's stream is reset when its future is dropped, which on the server
//! cancels it if it still waits.
//!
//! Two answers can differ where a retry's does: an `unlock` (or `extend`)
//! done by one copy is `not_held` for the other. So an answer that a
//! duplicate of a successful request would also get (`not_held`, or a lost
//! connection) does not win at once: the other copy's answer is awaited,
//! and a success from either is the answer.
//!
//! Bounds: at most one copy per request; copies cost tokens from a budget
//! that every request refills by a fraction (`HedgeOptions::budget`), up
//! to a burst; none while more than `HedgeOptions::max_in_flight` requests
//! are in flight (a burst); a waiting `lock` (whose reply may legitimately take long) is
//! copied only if the transport has not yet seen its request delivered.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::{Connection, TransportError};
use crate::proto::{ErrorCode, LockOp, Op, Outcome, Request, SetOp, Wait};

/// How the client hedges.
#[derive(Debug, Clone, PartialEq)]
pub struct HedgeOptions {
    /// The shortest delay before a copy is sent.
    pub floor: Duration,
    /// The delay is this quantile of recent round trips (or the floor).
    pub quantile: f64,
    /// Copies allowed per request sent, on average.
    pub budget: f64,
    /// Copies that may be sent in a burst, beyond the average.
    pub burst: u32,
    /// No copy while more requests than this are in flight: a burst's
    /// late answers are congestion, not loss, which a copy would only add
    /// to (and many packets in flight let QUIC detect a loss without a
    /// timeout).
    pub max_in_flight: usize,
}

impl Default for HedgeOptions {
    fn default() -> HedgeOptions {
        HedgeOptions {
            // Measured on a quiet machine at 5 % packet loss, one
            // connection (docs/quic.md): against the 0.99 quantile and
            // 1 ms, p99 1.7 ms instead of 2.5 and 15 % more cycles. At
            // that loss a tenth of the round trips are slow because of a
            // loss, so a higher quantile sits among the losses it is
            // there to catch.
            floor: Duration::from_micros(500),
            quantile: 0.9,
            budget: 0.25,
            burst: 32,
            max_in_flight: 64,
        }
    }
}

/// What hedging did, for a client's whole life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HedgeStats {
    /// Copies sent.
    pub sent: u64,
    /// Copies whose answer came first.
    pub won: u64,
    /// Copies not sent because the budget was spent.
    pub over_budget: u64,
    /// Copies not sent because too many requests were in flight.
    pub crowded: u64,
}

impl std::ops::Add for HedgeStats {
    type Output = HedgeStats;
    fn add(self, other: HedgeStats) -> HedgeStats {
        HedgeStats {
            sent: self.sent + other.sent,
            won: self.won + other.won,
            over_budget: self.over_budget + other.over_budget,
            crowded: self.crowded + other.crowded,
        }
    }
}

/// Round trips kept to pick the delay from.
const SAMPLES: usize = 128;
/// The delay is recomputed after this many new samples.
const RECOMPUTE_EVERY: u32 = 16;

/// A client's hedging state.
#[derive(Debug)]
pub(crate) struct Hedger {
    options: HedgeOptions,
    state: Mutex<State>,
    in_flight: AtomicUsize,
}

#[derive(Debug)]
struct State {
    /// Recent round trips of answered requests, in µs (a ring).
    samples: Vec<u32>,
    next: usize,
    fresh: u32,
    delay: Duration,
    tokens: f64,
    stats: HedgeStats,
}

impl Hedger {
    pub(crate) fn new(options: HedgeOptions) -> Hedger {
        let state = State {
            samples: Vec::with_capacity(SAMPLES),
            next: 0,
            fresh: 0,
            // Until there are samples: no round trip is known yet.
            delay: options.floor.max(Duration::from_millis(10)),
            tokens: f64::from(options.burst),
            stats: HedgeStats::default(),
        };
        Hedger {
            options,
            state: Mutex::new(state),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn stats(&self) -> HedgeStats {
        self.state().stats
    }

    /// Whether `op` on `connection` is hedged.
    pub(crate) fn applies(connection: &dyn Connection, op: &Op) -> bool {
        connection.hedges() && retry_safe(op)
    }

    /// Sends `request` on `connection`, and a copy (with the id
    /// `copy_id`) if it is not answered in time and the budget allows.
    pub(crate) async fn call(
        &self,
        connection: &dyn Connection,
        request: Request,
        copy_id: u64,
    ) -> Result<Outcome, TransportError> {
        let may_wait = may_wait(&request.op);
        let copy = Request {
            id: copy_id,
            op: request.op.clone(),
        };
        let delay = {
            let mut state = self.state();
            state.tokens = (state.tokens + self.options.budget).min(f64::from(self.options.burst));
            state.delay
        };
        let delivered = AtomicBool::new(false);
        let _in_flight = InFlight::new(&self.in_flight);
        let sent = Instant::now();
        let original = connection.call_noting_delivery(request, may_wait.then_some(&delivered));
        tokio::pin!(original);
        tokio::select! {
            biased;
            outcome = &mut original => {
                self.record(sent.elapsed());
                return outcome;
            }
            () = tokio::time::sleep(delay) => {}
        }
        // A waiting lock the server has received is waiting, not lost.
        if may_wait && delivered.load(Ordering::Relaxed) {
            return original.await;
        }
        if !self.spend(self.in_flight.load(Ordering::Relaxed)) {
            let outcome = original.await;
            self.record(sent.elapsed());
            return outcome;
        }
        let copy_sent = Instant::now();
        let copy = connection.call(copy);
        tokio::pin!(copy);
        let (first, copy_won) = tokio::select! {
            outcome = &mut original => (outcome, false),
            outcome = &mut copy => (outcome, true),
        };
        let winner_sent = if copy_won { copy_sent } else { sent };
        if !may_be_duplicate(&first) {
            self.finish(winner_sent, copy_won);
            return first;
        }
        // The other copy may have done what this answer says is undone.
        let second = if copy_won { original.await } else { copy.await };
        if matches!(second, Ok(Ok(_))) {
            self.finish(if copy_won { sent } else { copy_sent }, !copy_won);
            return second;
        }
        self.finish(winner_sent, copy_won);
        first
    }

    fn spend(&self, in_flight: usize) -> bool {
        let mut state = self.state();
        if in_flight > self.options.max_in_flight {
            state.stats.crowded += 1;
            return false;
        }
        if state.tokens < 1.0 {
            state.stats.over_budget += 1;
            return false;
        }
        state.tokens -= 1.0;
        state.stats.sent += 1;
        true
    }

    fn finish(&self, winner_sent: Instant, copy_won: bool) {
        self.record(winner_sent.elapsed());
        if copy_won {
            self.state().stats.won += 1;
        }
    }

    /// Adds a round trip, and now and then picks the delay anew.
    fn record(&self, round_trip: Duration) {
        let micros = u32::try_from(round_trip.as_micros()).unwrap_or(u32::MAX);
        let mut state = self.state();
        if state.samples.len() < SAMPLES {
            state.samples.push(micros);
        } else {
            let at = state.next;
            state.samples[at] = micros;
        }
        state.next = (state.next + 1) % SAMPLES;
        state.fresh += 1;
        if state.fresh >= RECOMPUTE_EVERY {
            state.fresh = 0;
            let mut sorted = state.samples.clone();
            sorted.sort_unstable();
            let at = ((sorted.len() as f64 * self.options.quantile) as usize).min(sorted.len() - 1);
            let quantile = Duration::from_micros(u64::from(sorted[at]));
            state.delay = quantile.max(self.options.floor);
        }
    }
}

/// Counts a request in flight while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(count: &'a AtomicUsize) -> InFlight<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Ops a copy of which the server answers as a retry of the original, and
/// which are small: no `hello` or `cancel` (about the connection or
/// another request), no `stats`, `members` pages or batches (large), no
/// `tear_down` (its retry answers `no_such_set`).
fn retry_safe(op: &Op) -> bool {
    match op {
        Op::Ping => true,
        Op::Lock(
            LockOp::Acquire(_)
            | LockOp::Release { .. }
            | LockOp::Extend { .. }
            | LockOp::Inspect { .. },
        ) => true,
        Op::Set(SetOp::Insert { keys, .. }) => matches!(keys, crate::proto::Keys::One(_)),
        Op::Set(SetOp::SetUp { .. } | SetOp::Inspect { .. }) => true,
        _ => false,
    }
}

/// A `lock` that may wait on the server.
fn may_wait(op: &Op) -> bool {
    matches!(op, Op::Lock(LockOp::Acquire(acquire)) if acquire.wait != Wait::Never)
}

/// An answer that a copy of a request that succeeded would also get: the
/// other copy's answer decides.
fn may_be_duplicate(outcome: &Result<Outcome, TransportError>) -> bool {
    match outcome {
        Err(_) => true,
        Ok(Err(error)) => error.code == ErrorCode::NotHeld,
        Ok(Ok(_)) => false,
    }
}
