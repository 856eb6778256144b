//! A tap on a Rust-client worker's connections, for the cluster's lease
//! rule ([`crate::lease`]): it records every attempt of a `lock` or an
//! `extend` as it is sent ([`What::Sent`]), and every answer to an attempt
//! of a `lock`, `extend`, `unlock` or `insert` ([`What::Answered`]: `ok`
//! or an error, with when that attempt was sent). An attempt sent and
//! never answered (its connection broke, or it was given up) may still
//! have been carried out. The client makes its own sense of answers (it
//! retries, takes a retried unlock's `not_held` for the first attempt's
//! success, re-anchors a long-awaited grant with an extend of its own);
//! the lease rule needs what the servers were asked and said, attempt by
//! attempt.
//!
//! The tap changes nothing the client sends or hears.

use std::sync::Arc;

use async_trait::async_trait;
use deadbolt_core::client::{Connection, Connector, TransportError};
use deadbolt_core::proto::{LockOp, Okay, Op, Outcome, Request, SetOp};

use crate::history::{Actor, History, What, now_us};

/// Opens the inner connector's connections, tapped.
pub struct TapConnector<C> {
    inner: C,
    history: History,
    worker: usize,
}

impl<C: Connector> TapConnector<C> {
    /// Taps `inner`'s connections for worker `worker`, recording in
    /// `history`.
    pub fn new(inner: C, history: History, worker: usize) -> TapConnector<C> {
        TapConnector {
            inner,
            history,
            worker,
        }
    }
}

#[async_trait]
impl<C: Connector> Connector for TapConnector<C> {
    async fn connect(&self) -> Result<Arc<dyn Connection>, TransportError> {
        let inner = self.inner.connect().await?;
        Ok(Arc::new(TapConnection {
            inner,
            history: self.history.clone(),
            worker: self.worker,
        }))
    }

    fn server(&self) -> String {
        self.inner.server()
    }

    fn fail_over(&self) {
        self.inner.fail_over();
    }
}

/// A tapped connection.
struct TapConnection {
    inner: Arc<dyn Connection>,
    history: History,
    worker: usize,
}

#[async_trait]
impl Connection for TapConnection {
    async fn call(&self, request: Request) -> Result<Outcome, TransportError> {
        let sent_us = now_us();
        let asked = Asked::of(&request.op);
        let record = |what| self.history.record(Actor::Worker(self.worker), what);
        if let Some(asked) = asked.as_ref().filter(|a| a.restarts()) {
            record(asked.sent());
        }
        let outcome = self.inner.call(request).await;
        // No answer (the connection broke): the `Sent` stays without one.
        if let (Some(asked), Ok(answer)) = (asked, &outcome) {
            record(asked.answered(answer, sent_us));
        }
        outcome
    }

    fn is_open(&self) -> bool {
        self.inner.is_open()
    }

    async fn closed(&self) {
        self.inner.closed().await;
    }
}

/// What a tapped request asked, of what the tap records.
struct Asked {
    op: &'static str,
    key: String,
    token: Option<u64>,
    ttl_ms: Option<u64>,
}

impl Asked {
    fn of(op: &Op) -> Option<Asked> {
        let (op, key, token, ttl_ms) = match op {
            Op::Lock(LockOp::Acquire(acquire)) => {
                ("lock", &acquire.key, None, Some(acquire.ttl_ms))
            }
            Op::Lock(LockOp::Extend { key, token, ttl_ms }) => {
                ("extend", key, Some(*token), Some(*ttl_ms))
            }
            Op::Lock(LockOp::Release { key, token }) => ("unlock", key, Some(*token), None),
            Op::Set(SetOp::Insert { set, .. }) => ("insert", set, None, None),
            _ => return None,
        };
        Some(Asked {
            op,
            key: key.clone(),
            token,
            ttl_ms,
        })
    }

    /// Whether it may (re)start a lease: a `lock` or an `extend`.
    fn restarts(&self) -> bool {
        matches!(self.op, "lock" | "extend")
    }

    /// The record of its sending.
    fn sent(&self) -> What {
        What::Sent {
            op: self.op,
            key: self.key.clone(),
            token: self.token,
        }
    }

    /// The record of its answer, `ok` or an error, for the attempt sent
    /// at `sent_us`.
    fn answered(self, answer: &Outcome, sent_us: u64) -> What {
        let (token, ttl_ms) = match answer {
            Ok(Okay::Granted(granted)) => (Some(granted.token), Some(granted.ttl_ms)),
            Ok(Okay::Extended(extended)) => (self.token, Some(extended.ttl_ms)),
            _ => (self.token, self.ttl_ms),
        };
        What::Answered {
            op: self.op,
            key: self.key,
            token,
            ttl_ms,
            sent_us,
            refused: answer.as_ref().err().map(|e| e.code.as_str().to_owned()),
        }
    }
}
