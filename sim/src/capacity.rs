//! Rule 12 of the server checker: capacity. SPEC section 5: the server
//! refuses the work it cannot hold with `overloaded`, and its limits are
//! configurable. A run whose scenario draws small limits
//! ([`crate::scenario::Room`]) reaches them; this judges each command of a
//! shard against its share of them, from the contract alone:
//!
//! - never admitted above a limit: after every command, the keys with lock
//!   state and their bytes, each key's waiters and all waiters, the sets,
//!   each set's members, and all members and their bytes stay within the
//!   shard's share;
//! - never refused below one: a `lock` or `set_up` or `insert` answered
//!   `overloaded` found some limit reached. For a `lock`, the state before
//!   the command is an upper bound of what it found (the deadlines the
//!   command applies first only take state away); for an `insert`, the
//!   state after it is what the refused key found (the batch's earlier
//!   keys stay inserted).

use std::collections::BTreeMap;

use deadbolt_core::Limits;
use deadbolt_core::proto::{ErrorCode, Keys, LockOp, Okay, ServerError, SetOp};
use deadbolt_core::shard::locks::KeyView;
use deadbolt_core::shard::sets::SetView;
use deadbolt_core::shard::{Answer, Handle, Input, ShardOp};

/// The lock and set state a command is judged on.
pub(crate) struct State<'a> {
    /// Keys with lock state.
    pub locks: &'a BTreeMap<String, KeyView>,
    /// Sets.
    pub sets: &'a [SetView],
}

/// What rule 12 carries from command to command: each set's members'
/// key lengths, by index (the views give sizes only).
#[derive(Debug)]
pub(crate) struct Capacity {
    limits: Limits,
    members: BTreeMap<String, BTreeMap<u64, usize>>,
}

impl Capacity {
    /// Judges against `limits`, a shard's share.
    pub(crate) fn new(limits: Limits) -> Capacity {
        Capacity {
            limits,
            members: BTreeMap::new(),
        }
    }

    /// Judges one command: what it was asked, what it answered, the state
    /// before and after it. Returns what broke the rule.
    pub(crate) fn command(
        &mut self,
        input: &Input,
        answers: &[Answer],
        before: &State<'_>,
        after: &State<'_>,
    ) -> Vec<String> {
        self.learn_members(input, answers, after.sets);
        let mut broken = self.over_a_limit(after);
        if let Some(why) = self.refused_below_the_limits(input, answers, before, after) {
            broken.push(why);
        }
        broken
    }

    /// Keeps the key lengths of the members this command added, and
    /// forgets the sets that ended (or began again).
    fn learn_members(&mut self, input: &Input, answers: &[Answer], sets: &[SetView]) {
        let sizes: BTreeMap<&str, u64> = sets.iter().map(|s| (s.set.as_str(), s.size)).collect();
        self.members.retain(|set, members| {
            sizes
                .get(set.as_str())
                .is_some_and(|&size| members.len() as u64 <= size)
        });
        let Input::Op {
            handle,
            op: ShardOp::Set(SetOp::Insert { set, keys }),
            ..
        } = input
        else {
            return;
        };
        let keys: Vec<&String> = match keys {
            Keys::One(key) => vec![key],
            Keys::Many(keys) => keys.iter().collect(),
        };
        let indexes: Vec<u64> = match answer_to(answers, *handle) {
            Some(Ok(Okay::Inserted(one))) => vec![one.index],
            Some(Ok(Okay::InsertedMany(many))) => many.results.iter().map(|r| r.index).collect(),
            // A refused batch keeps its keys before the refusal, unnamed:
            // count them by the set's size, with the longest key's length.
            _ => Vec::new(),
        };
        let members = self.members.entry(set.clone()).or_default();
        for (key, index) in keys.iter().zip(indexes) {
            members.entry(index).or_insert(key.len());
        }
        let size = sizes.get(set.as_str()).copied().unwrap_or(0);
        let longest = keys.iter().map(|k| k.len()).max().unwrap_or(0);
        for index in 1..=size {
            members.entry(index).or_insert(longest);
        }
    }

    fn member_bytes(&self) -> usize {
        self.members.values().flat_map(|m| m.values()).sum()
    }

    /// The state after a command, against every limit.
    fn over_a_limit(&self, after: &State<'_>) -> Vec<String> {
        let l = &self.limits;
        let key_bytes: usize = after.locks.keys().map(String::len).sum();
        let waiters: usize = after.locks.values().map(|v| v.waiters.len()).sum();
        let members: u64 = after.sets.iter().map(|s| s.size).sum();
        let mut over = vec![
            (after.locks.len(), l.locks_max, "keys with lock state"),
            (key_bytes, l.lock_key_bytes_max, "bytes of lock keys"),
            (waiters, l.waiters_max, "waiters"),
            (after.sets.len(), l.sets_max, "sets"),
            (members as usize, l.members_max, "members"),
            (self.member_bytes(), l.member_bytes_max, "bytes of members"),
        ];
        for view in after.locks.values() {
            over.push((
                view.waiters.len(),
                l.waiters_per_key_max,
                "waiters on a key",
            ));
        }
        for set in after.sets {
            over.push((set.size as usize, l.set_members_max, "members of a set"));
        }
        over.into_iter()
            .filter(|(count, max, _)| count > max)
            .map(|(count, max, what)| format!("{count} {what} admitted, above the limit of {max}"))
            .collect()
    }

    /// Why an `overloaded` answer to the command's own request found no
    /// limit reached, if it did not.
    fn refused_below_the_limits(
        &self,
        input: &Input,
        answers: &[Answer],
        before: &State<'_>,
        after: &State<'_>,
    ) -> Option<String> {
        let Input::Op { handle, op, .. } = input else {
            return None;
        };
        let refused = matches!(answer_to(answers, *handle),
            Some(Err(e)) if e.code == ErrorCode::Overloaded);
        if !refused {
            return None;
        }
        let l = &self.limits;
        let full = match op {
            ShardOp::Lock(LockOp::Acquire(acquire)) => {
                let key_bytes: usize = before.locks.keys().map(String::len).sum();
                let waiters: usize = before.locks.values().map(|v| v.waiters.len()).sum();
                let queue = before
                    .locks
                    .get(&acquire.key)
                    .map_or(0, |v| v.waiters.len());
                before.locks.len() >= l.locks_max
                    || key_bytes + acquire.key.len() > l.lock_key_bytes_max
                    || queue >= l.waiters_per_key_max
                    || waiters >= l.waiters_max
            }
            ShardOp::Set(SetOp::SetUp { .. }) => before.sets.len() >= l.sets_max,
            ShardOp::Set(SetOp::Insert { set, keys }) => {
                let size = after
                    .sets
                    .iter()
                    .find(|s| s.set == *set)
                    .map_or(0, |s| s.size);
                let members: u64 = after.sets.iter().map(|s| s.size).sum();
                let longest = match keys {
                    Keys::One(key) => key.len(),
                    Keys::Many(keys) => keys.iter().map(String::len).max().unwrap_or(0),
                };
                size as usize >= l.set_members_max
                    || members as usize >= l.members_max
                    || self.member_bytes() + longest > l.member_bytes_max
            }
            // Other ops hold nothing new.
            _ => false,
        };
        (!full).then(|| format!("{op:?} answered `overloaded` below every limit"))
    }
}

fn answer_to(answers: &[Answer], handle: Handle) -> Option<&Result<Okay, ServerError>> {
    answers
        .iter()
        .find(|a| a.handle == handle)
        .map(|a| &a.outcome)
}
