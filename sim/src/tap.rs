//! A tap on a Rust-client worker's connections, for the cluster's lease
//! rules: it records, as [`What::Answered`], every attempt of a `lock`,
//! `extend`, `unlock` or `insert` that a server answered `ok`, with when
//! that attempt was sent. The client makes its own sense of answers (it
//! retries, takes a retried unlock's `not_held` for the first attempt's
//! success, re-anchors a long-awaited grant with an extend of its own);
//! the lease rules need what the server said, attempt by attempt.
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
        let outcome = self.inner.call(request).await;
        if let (Some(asked), Ok(Ok(okay))) = (asked, &outcome) {
            let what = asked.answered(okay, sent_us);
            self.history.record(Actor::Worker(self.worker), what);
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
}

impl Asked {
    fn of(op: &Op) -> Option<Asked> {
        let (op, key, token) = match op {
            Op::Lock(LockOp::Acquire(acquire)) => ("lock", &acquire.key, None),
            Op::Lock(LockOp::Extend { key, token, .. }) => ("extend", key, Some(*token)),
            Op::Lock(LockOp::Release { key, token }) => ("unlock", key, Some(*token)),
            Op::Set(SetOp::Insert { set, .. }) => ("insert", set, None),
            _ => return None,
        };
        Some(Asked {
            op,
            key: key.clone(),
            token,
        })
    }

    /// The record of its `ok` answer `okay`, for the attempt sent at
    /// `sent_us`.
    fn answered(self, okay: &Okay, sent_us: u64) -> What {
        let (token, ttl_ms) = match okay {
            Okay::Granted(granted) => (Some(granted.token), Some(granted.ttl_ms)),
            Okay::Extended(extended) => (self.token, Some(extended.ttl_ms)),
            _ => (self.token, None),
        };
        What::Answered {
            op: self.op,
            key: self.key,
            token,
            ttl_ms,
            sent_us,
        }
    }
}
