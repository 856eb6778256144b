//! A harness that drives one shard with a test responder and a hand-turned
//! clock (milliseconds).

#![allow(dead_code, missing_docs)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use deadbolt_core::limits::Limits;
use deadbolt_core::proto::{
    Acquire, ErrorCode, Keys, LockInfo, LockOp, Mode, Okay, Outcome, SetOp, Wait,
};
use deadbolt_core::shard::image::ShardImage;
use deadbolt_core::shard::{Caller, Command, Handle, Input, Shard, ShardConfig, ShardOp};
use deadbolt_core::time::Tick;

/// Where one request's answers land. Counts answers, so a test can tell a
/// request that was answered twice.
#[derive(Clone, Default)]
pub struct Slot {
    answers: Rc<RefCell<Vec<Outcome>>>,
    /// When the first answer came, counted over all slots of the thread.
    answered_as: Rc<Cell<u64>>,
    /// The request's handle, and its key for a lock request.
    handle: Rc<Cell<u64>>,
    key: Rc<RefCell<Option<String>>>,
}

thread_local! {
    static ANSWERS_GIVEN: Cell<u64> = const { Cell::new(0) };
}

impl Slot {
    fn deliver(&self, outcome: Outcome) {
        if self.answers.borrow().is_empty() {
            let n = ANSWERS_GIVEN.with(|given| {
                given.set(given.get() + 1);
                given.get()
            });
            self.answered_as.set(n);
        }
        self.answers.borrow_mut().push(outcome);
    }

    pub fn handle(&self) -> Handle {
        Handle(self.handle.get())
    }

    fn key(&self) -> String {
        self.key.borrow().clone().expect("a lock request's slot")
    }

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
}

/// Drives one shard with commands, as its actor would, and routes its
/// answers to slots; checks the invariants after every command.
pub struct Harness {
    pub shard: Shard,
    pub now_ms: u64,
    next_handle: u64,
    slots: HashMap<Handle, Slot>,
    /// Every command applied, in order, for replay checks.
    pub commands: Vec<Command>,
    config: ShardConfig,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_limits(Limits::unbounded_capacity())
    }

    pub fn with_limits(limits: Limits) -> Harness {
        Harness::with_config(ShardConfig {
            hash_seed: 7,
            first_token: 100,
            limits,
        })
    }

    pub fn with_config(config: ShardConfig) -> Harness {
        Harness {
            shard: Shard::new(config),
            now_ms: 0,
            next_handle: 1,
            slots: HashMap::new(),
            commands: Vec::new(),
            config,
        }
    }

    pub fn now(&self) -> Tick {
        Tick::from_millis(self.now_ms)
    }

    /// Lets `ms` pass, applying a tick at every deadline the shard asks to
    /// be woken for on the way (as its actor would), then at the end.
    pub fn advance(&mut self, ms: u64) {
        let end = self.now().plus_millis(ms);
        // Every wake-up pops what is due, so each one is later than the last.
        while let Some(at) = self.shard.next_deadline().filter(|&d| d < end) {
            self.apply(Command {
                at,
                input: Input::Tick,
            });
        }
        self.now_ms += ms;
        self.apply(Command {
            at: self.now(),
            input: Input::Tick,
        });
    }

    /// Applies a command at the current time.
    pub fn apply_now(&mut self, input: Input) {
        self.apply(Command {
            at: self.now(),
            input,
        });
    }

    pub fn apply(&mut self, command: Command) {
        self.commands.push(command.clone());
        self.shard.apply(command);
        self.route_answers();
        self.check();
    }

    /// Shuts the shard down and routes the answers it gives.
    pub fn shutdown(&mut self) {
        self.shard.shutdown();
        self.route_answers();
    }

    fn route_answers(&mut self) {
        for answer in self.shard.take_answers() {
            let slot = self.slots.remove(&answer.handle).unwrap_or_else(|| {
                panic!("answer to {:?}, which was answered already", answer.handle)
            });
            slot.deliver(answer.outcome);
        }
    }

    /// Replays every command so far into a fresh shard whose tables use
    /// another hash seed, and checks that it reaches the same state and
    /// gives the same answers.
    pub fn check_replay(&self) {
        let mut replica = Shard::new(ShardConfig {
            hash_seed: self.config.hash_seed ^ 0x5eed,
            ..self.config
        });
        let mut answers = Vec::new();
        let mut original = Shard::new(self.config);
        let mut original_answers = Vec::new();
        for command in &self.commands {
            replica.apply(command.clone());
            answers.extend(replica.take_answers());
            original.apply(command.clone());
            original_answers.extend(original.take_answers());
        }
        assert_eq!(
            replica.digest(),
            self.shard.digest(),
            "replay reached another state"
        );
        assert_eq!(original.digest(), self.shard.digest());
        let by_handle = |mut a: Vec<deadbolt_core::shard::Answer>| {
            a.sort_by_key(|a| a.handle);
            a
        };
        assert_eq!(
            by_handle(answers),
            by_handle(original_answers),
            "replay answered otherwise"
        );
    }

    /// Replays the first `split` commands into a fresh shard, takes its
    /// image through JSON and restores it under `restore_seed` (and another
    /// first token, which a restore ignores); then feeds the rest of the
    /// commands to both. The restored shard must give the same answers (in
    /// any order: see below) and reach the same state after every command.
    pub fn check_restore(&self, split: usize, restore_seed: u64) -> Result<(), String> {
        let (before, after) = self.commands.split_at(split);
        let mut original = Shard::new(self.config);
        for command in before {
            original.apply(command.clone());
            original.take_answers();
        }
        let image = original.image();
        let json = serde_json::to_string(&image).map_err(|e| e.to_string())?;
        let read: ShardImage = serde_json::from_str(&json).map_err(|e| e.to_string())?;
        let config = ShardConfig {
            hash_seed: restore_seed,
            first_token: self.config.first_token + 12_345,
            ..self.config
        };
        let mut restored = Shard::from_image(config, read).map_err(|e| e.to_string())?;
        if restored.image() != image {
            return Err("the restored shard's image differs".to_owned());
        }
        for (i, command) in after.iter().enumerate() {
            original.apply(command.clone());
            restored.apply(command.clone());
            let (expected, got) = (original.take_answers(), restored.take_answers());
            let at = format!("command {} {command:?}", split + i);
            if got != expected {
                return Err(format!("{at}: answered {got:?}, not {expected:?}"));
            }
            if restored.digest() != original.digest() {
                return Err(format!("{at}: another state"));
            }
            if restored.counters() != original.counters() {
                return Err(format!("{at}: other counters"));
            }
            restored.check_invariants()?;
        }
        Ok(())
    }

    pub fn check(&self) {
        if let Err(broken) = self.shard.check_invariants() {
            panic!("invariant broken: {broken}");
        }
    }

    pub fn send(&mut self, client: &str, conn: u64, op: ShardOp) -> Slot {
        let slot = Slot::default();
        let handle = Handle(self.next_handle);
        self.next_handle += 1;
        slot.handle.set(handle.0);
        if let ShardOp::Lock(lock) = &op {
            *slot.key.borrow_mut() = Some(lock.key().to_owned());
        }
        self.slots.insert(handle, slot.clone());
        let caller = Caller {
            client: Arc::from(client),
            conn,
        };
        self.apply_now(Input::Op { handle, caller, op });
        slot
    }

    /// The `cancel` op for the request of `slot`.
    pub fn cancel(&mut self, slot: &Slot) {
        let (handle, key) = (slot.handle(), slot.key());
        self.apply_now(Input::Cancel { handle, key });
    }

    /// The requester of `slot` went away (its future was dropped, or its
    /// answer could not be delivered).
    pub fn gone(&mut self, slot: &Slot) {
        let (handle, key) = (slot.handle(), slot.key());
        self.apply_now(Input::RequesterGone { handle, key });
    }

    pub fn close_connection(&mut self, conn: u64) {
        self.apply_now(Input::ConnectionClosed { conn });
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
            mode: Mode::MUTEX,
            lock_delay_ms: 0,
            notify: false,
        });
        self.send(client, conn, ShardOp::Lock(op))
    }

    /// `lock` of `mode`, with a lock delay of `lock_delay_ms`, on the
    /// client's usual connection.
    pub fn lock_as(
        &mut self,
        client: &str,
        key: &str,
        ttl_ms: u64,
        wait_ms: Option<u64>,
        mode: Mode,
        lock_delay_ms: u64,
    ) -> Slot {
        let op = LockOp::Acquire(Acquire {
            key: key.to_owned(),
            ttl_ms,
            wait: Wait::from_wait_ms(wait_ms),
            ephemeral: false,
            mode,
            lock_delay_ms,
            notify: false,
        });
        self.send(client, conn_of(client), ShardOp::Lock(op))
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
