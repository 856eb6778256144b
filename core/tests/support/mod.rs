//! A harness that drives one shard with a test responder and a hand-turned
//! clock (milliseconds).

#![allow(dead_code, missing_docs)]

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use deadbolt_core::limits::ShardLimits;
use deadbolt_core::proto::{
    Acquire, ErrorCode, Keys, LockInfo, LockOp, Okay, Outcome, SetOp, Wait,
};
use deadbolt_core::shard::{Caller, Responder, Shard, ShardConfig, ShardOp};
use deadbolt_core::time::Tick;

/// Where one request's answers land. Counts answers, so a test can tell a
/// request that was answered twice.
#[derive(Clone, Default)]
pub struct Slot {
    answers: Rc<RefCell<Vec<Outcome>>>,
    closed: Rc<Cell<bool>>,
    /// Reports "open" but refuses delivery: a requester that went away
    /// between the shard's check and its answer.
    vanishing: Rc<Cell<bool>>,
    /// When the first answer came, counted over all slots of the thread.
    answered_as: Rc<Cell<u64>>,
}

thread_local! {
    static ANSWERS_GIVEN: Cell<u64> = const { Cell::new(0) };
}

impl Responder for Slot {
    fn is_closed(&self) -> bool {
        self.closed.get()
    }

    fn respond(self, outcome: Outcome) -> bool {
        if self.closed.get() || self.vanishing.get() {
            return false;
        }
        if self.answers.borrow().is_empty() {
            let n = ANSWERS_GIVEN.with(|given| {
                given.set(given.get() + 1);
                given.get()
            });
            self.answered_as.set(n);
        }
        self.answers.borrow_mut().push(outcome);
        true
    }
}

impl Slot {
    pub fn answers(&self) -> usize {
        self.answers.borrow().len()
    }

    /// The position of this slot's first answer among all answers given on
    /// this thread (0 if unanswered).
    pub fn answer_order(&self) -> u64 {
        self.answered_as.get()
    }

    pub fn is_pending(&self) -> bool {
        self.answers() == 0
    }

    /// The first answer, if any, without requiring exactly one.
    pub fn answers_now(&self) -> Outcome {
        self.answers
            .borrow()
            .first()
            .cloned()
            .unwrap_or_else(|| Err(deadbolt_core::proto::ServerError::internal("no answer")))
    }

    pub fn outcome(&self) -> Outcome {
        let answers = self.answers.borrow();
        assert_eq!(
            answers.len(),
            1,
            "expected exactly one answer, got {answers:?}"
        );
        answers[0].clone()
    }

    pub fn ok(&self) -> Okay {
        self.outcome().expect("expected an ok reply")
    }

    pub fn token(&self) -> u64 {
        match self.ok() {
            Okay::Granted(g) => g.token,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    pub fn code(&self) -> ErrorCode {
        self.outcome().expect_err("expected an error").code
    }

    /// The requester goes away (its future was dropped).
    pub fn close(&self) {
        self.closed.set(true);
    }

    pub fn vanish(&self) {
        self.vanishing.set(true);
    }
}

pub struct Harness {
    pub shard: Shard<Slot>,
    pub now_ms: u64,
    next_request: u64,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_limits(ShardLimits::unbounded())
    }

    pub fn with_limits(limits: ShardLimits) -> Harness {
        Harness {
            shard: Shard::new(ShardConfig {
                hash_seed: 7,
                first_token: 100,
                limits,
            }),
            now_ms: 0,
            next_request: 1,
        }
    }

    pub fn now(&self) -> Tick {
        Tick::from_millis(self.now_ms)
    }

    pub fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
        self.shard.advance(self.now());
        self.check();
    }

    pub fn check(&self) {
        if let Err(broken) = self.shard.check_invariants() {
            panic!("invariant broken: {broken}");
        }
    }

    pub fn send(&mut self, client: &str, conn: u64, op: ShardOp) -> Slot {
        let slot = Slot::default();
        let caller = Caller {
            client: Arc::from(client),
            conn,
            request: self.next_request,
        };
        self.next_request += 1;
        self.shard.handle(self.now(), caller, op, slot.clone());
        self.check();
        slot
    }

    pub fn last_request(&self) -> u64 {
        self.next_request - 1
    }

    pub fn lock_with(
        &mut self,
        client: &str,
        conn: u64,
        key: &str,
        ttl_ms: u64,
        wait_ms: Option<u64>,
        ephemeral: bool,
    ) -> Slot {
        let op = LockOp::Acquire(Acquire {
            key: key.to_owned(),
            ttl_ms,
            wait: Wait::from_wait_ms(wait_ms),
            ephemeral,
        });
        self.send(client, conn, ShardOp::Lock(op))
    }

    /// `lock` waiting as long as it takes; the connection is the client's
    /// first letter's code, so tests read naturally.
    pub fn lock(&mut self, client: &str, key: &str, ttl_ms: u64, wait_ms: Option<u64>) -> Slot {
        let conn = conn_of(client);
        self.lock_with(client, conn, key, ttl_ms, wait_ms, false)
    }

    pub fn unlock(&mut self, client: &str, key: &str, token: u64) -> Slot {
        let op = LockOp::Release {
            key: key.to_owned(),
            token,
        };
        self.send(client, conn_of(client), ShardOp::Lock(op))
    }

    pub fn extend(&mut self, client: &str, key: &str, token: u64, ttl_ms: u64) -> Slot {
        let op = LockOp::Extend {
            key: key.to_owned(),
            token,
            ttl_ms,
        };
        self.send(client, conn_of(client), ShardOp::Lock(op))
    }

    pub fn inspect(&mut self, key: &str) -> LockInfo {
        let op = LockOp::Inspect {
            key: key.to_owned(),
        };
        match self.send("inspector", 999, ShardOp::Lock(op)).ok() {
            Okay::LockInfo(info) => info,
            other => panic!("expected lock info, got {other:?}"),
        }
    }

    pub fn holder(&mut self, key: &str) -> Option<(String, u64)> {
        self.inspect(key).holder.map(|h| (h.client, h.token))
    }

    pub fn set_op(&mut self, client: &str, op: SetOp) -> Slot {
        self.send(client, conn_of(client), ShardOp::Set(op))
    }

    pub fn set_up(&mut self, set: &str, ttl_ms: u64) -> Okay {
        let op = SetOp::SetUp {
            set: set.to_owned(),
            ttl_ms,
        };
        self.set_op("setter", op).ok()
    }

    pub fn insert(&mut self, client: &str, set: &str, key: &str) -> Outcome {
        let op = SetOp::Insert {
            set: set.to_owned(),
            keys: Keys::One(key.to_owned()),
        };
        self.set_op(client, op).outcome()
    }
}

pub fn conn_of(client: &str) -> u64 {
    u64::from(client.as_bytes()[0])
}
