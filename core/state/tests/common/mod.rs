//! A small driver for one shard: a clock in milliseconds, handles
//! numbered in order, the invariants checked after every command.

#![allow(dead_code, missing_docs)]

use std::sync::Arc;

use deadbolt_proto::limits::Limits;
use deadbolt_proto::{Acquire, Keys, LockOp, Mode, Okay, Outcome, SetOp, Wait};
use deadbolt_state::time::Tick;
use deadbolt_state::{Answer, Caller, Command, Handle, Input, Shard, ShardConfig, ShardOp};

pub fn config(hash_seed: u64) -> ShardConfig {
    ShardConfig {
        hash_seed,
        first_token: 100,
        limits: Limits::unbounded_capacity(),
    }
}

pub struct Driver {
    pub shard: Shard,
    pub now_ms: u64,
    pub next_handle: u64,
}

impl Driver {
    pub fn new(hash_seed: u64) -> Driver {
        Driver::of(Shard::new(config(hash_seed)))
    }

    pub fn of(shard: Shard) -> Driver {
        Driver {
            now_ms: shard.now().0 / 1000,
            shard,
            next_handle: 1,
        }
    }

    /// A driver for `shard` that carries on where `self` is: same clock,
    /// same next handle.
    pub fn like(&self, shard: Shard) -> Driver {
        Driver {
            shard,
            now_ms: self.now_ms,
            next_handle: self.next_handle,
        }
    }

    /// Applies `input` at the driver's time; returns its answers.
    pub fn apply(&mut self, input: Input) -> Vec<Answer> {
        let at = Tick::from_millis(self.now_ms);
        self.shard.apply(Command { at, input });
        if let Err(broken) = self.shard.check_invariants() {
            panic!("invariant broken: {broken}");
        }
        self.shard.take_answers()
    }

    /// Moves the clock to `ms` and applies a tick there.
    pub fn tick_at(&mut self, ms: u64) -> Vec<Answer> {
        self.now_ms = ms;
        self.apply(Input::Tick)
    }

    pub fn op(&mut self, client: &str, conn: u64, op: ShardOp) -> (Handle, Vec<Answer>) {
        let handle = Handle(self.next_handle);
        self.next_handle += 1;
        let caller = Caller {
            client: Arc::from(client),
            conn,
        };
        let answers = self.apply(Input::Op { handle, caller, op });
        (handle, answers)
    }

    /// `lock`; `wait_ms` as on the wire (`None`: as long as it takes).
    pub fn lock(&mut self, client: &str, conn: u64, key: &str, ttl_ms: u64) -> Lock<'_> {
        Lock {
            driver: self,
            client: client.to_owned(),
            conn,
            key: key.to_owned(),
            ttl_ms,
            wait_ms: None,
            ephemeral: false,
        }
    }

    pub fn set_up(&mut self, set: &str, ttl_ms: u64) -> Outcome {
        let set = set.to_owned();
        let op = ShardOp::Set(SetOp::SetUp { set, ttl_ms });
        only_answer(self.op("setter", 1, op).1)
    }

    pub fn insert(&mut self, client: &str, set: &str, keys: &[&str]) -> Outcome {
        let keys = Keys::Many(keys.iter().map(|k| (*k).to_owned()).collect());
        let set = set.to_owned();
        only_answer(
            self.op(client, 1, ShardOp::Set(SetOp::Insert { set, keys }))
                .1,
        )
    }
}

/// A `lock` request being built.
pub struct Lock<'a> {
    driver: &'a mut Driver,
    client: String,
    conn: u64,
    key: String,
    ttl_ms: u64,
    wait_ms: Option<u64>,
    ephemeral: bool,
}

impl Lock<'_> {
    pub fn wait_ms(mut self, wait_ms: u64) -> Self {
        self.wait_ms = Some(wait_ms);
        self
    }

    pub fn ephemeral(mut self) -> Self {
        self.ephemeral = true;
        self
    }

    /// Sends it; returns its handle and the answers the command gave.
    pub fn send(self) -> (Handle, Vec<Answer>) {
        let op = LockOp::Acquire(Acquire {
            key: self.key,
            ttl_ms: self.ttl_ms,
            wait: Wait::from_wait_ms(self.wait_ms),
            ephemeral: self.ephemeral,
            mode: Mode::MUTEX,
            lock_delay_ms: 0,
            notify: false,
        });
        self.driver.op(&self.client, self.conn, ShardOp::Lock(op))
    }

    /// Sends it and expects an immediate grant; returns its token.
    pub fn granted(self) -> u64 {
        let (handle, answers) = self.send();
        token_for(&answers, handle).expect("an immediate grant")
    }
}

/// The token granted to `handle` among `answers`, if any.
pub fn token_for(answers: &[Answer], handle: Handle) -> Option<u64> {
    answers.iter().find_map(|a| match &a.outcome {
        Ok(Okay::Granted(g)) if a.handle == handle => Some(g.token),
        _ => None,
    })
}

pub fn only_answer(mut answers: Vec<Answer>) -> Outcome {
    assert_eq!(answers.len(), 1, "{answers:?}");
    answers.remove(0).outcome
}
