//! Authentication and authorisation (SPEC section 10): who a connection
//! is, and what it may do.
//!
//! A server started with an auth file has a [`Policy`]: named
//! [`Principal`]s, each with a secret, the key prefixes it may lock, the set
//! prefixes it may change, the prefixes it may read, whether it is an admin,
//! and its [`Quotas`]. A connection says `hello` with a secret; the session
//! then carries that principal's *name*, and every later request is checked
//! against the grants the current policy gives that name, so that a
//! reloaded policy ([`Auth::reload`], on SIGHUP) applies to connections
//! already open.
//!
//! This is the server's front, not its state machine: the policy and the
//! quota counts ([`quota`](crate::auth::quota)) live in this process only.
//! Who owns each client id does not: a `hello` claims its id with a shard
//! command ([`ShardOp::Claim`](crate::shard::ShardOp::Claim)), logged and
//! replicated like a lock, so ownership survives a restart and a change
//! of leader (see `deadbolt_state::claims`). See `docs/protocol.md`,
//! "Authentication".

pub mod quota;

use std::sync::{Arc, RwLock};

use crate::proto::{LockOp, Op, Secret, ServerError, SetOp};
pub use quota::{Quotas, Usage};

/// One principal of the auth file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Its name: what logs and messages call it, and what owns client ids.
    pub name: String,
    /// The secret a connection proves it is this principal with.
    pub secret: Secret,
    /// Key prefixes for `lock`, `unlock`, `extend` (`""`: every key).
    pub locks: Vec<String>,
    /// Set-name prefixes for `set_up`, `insert`, `tear_down`.
    pub sets: Vec<String>,
    /// Prefixes for `inspect` (keys), `members` and `inspect_set` (sets).
    pub read: Vec<String>,
    /// May use `stats`, the dashboard's data, `/metrics` and the other
    /// operator routes, and sees every holder's token.
    pub admin: bool,
    /// How much of the server this principal may hold.
    pub quotas: Quotas,
}

/// What a request needs of its principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need<'a> {
    /// Nothing beyond being authenticated: `ping`, `cancel` (of the
    /// connection's own requests).
    Session,
    /// A `locks` prefix of this key.
    Lock(&'a str),
    /// A `sets` prefix of this set.
    Set(&'a str),
    /// A `read` prefix of this key or set.
    Read(&'a str),
    /// Admin.
    Admin,
}

impl<'a> Need<'a> {
    /// What `op` needs. `hello` needs nothing (it is how a connection
    /// authenticates).
    pub fn of(op: &'a Op) -> Need<'a> {
        match op {
            Op::Hello { .. } | Op::Ping | Op::Cancel { .. } => Need::Session,
            Op::Stats { .. } => Need::Admin,
            Op::Watch { target } => Need::Read(target.name()),
            Op::Lock(LockOp::Inspect { key }) => Need::Read(key),
            Op::Lock(op) => Need::Lock(op.key()),
            Op::Set(SetOp::Members { set, .. } | SetOp::Inspect { set }) => Need::Read(set),
            Op::Set(op) => Need::Set(op.set()),
        }
    }
}

impl Principal {
    /// Whether this principal may do what `need` says.
    pub fn allows(&self, need: Need<'_>) -> bool {
        let under = |prefixes: &[String], name: &str| {
            prefixes
                .iter()
                .any(|prefix| name.starts_with(prefix.as_str()))
        };
        match need {
            Need::Session => true,
            Need::Lock(key) => under(&self.locks, key),
            Need::Set(set) => under(&self.sets, set),
            Need::Read(name) => under(&self.read, name),
            Need::Admin => self.admin,
        }
    }
}

/// Why a list of principals is not a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// No principal at all: nobody could connect.
    #[error("no [[principal]]: nobody could connect")]
    Empty,
    /// A principal without a name.
    #[error("principal number {0} has an empty name")]
    EmptyName(usize),
    /// Two principals with one name.
    #[error("two principals are named `{0}`")]
    DuplicateName(String),
    /// A principal whose secret is empty or too long.
    #[error("principal `{name}`: the secret must be 1..={max} bytes")]
    BadSecret {
        /// The principal.
        name: String,
        /// The longest secret a `hello` may carry.
        max: usize,
    },
    /// Two principals with one secret: a connection could not say which
    /// it is.
    #[error("principals `{0}` and `{1}` have the same secret")]
    DuplicateSecret(String, String),
}

/// A checked set of principals.
#[derive(Debug, Clone)]
pub struct Policy {
    principals: Vec<Arc<Principal>>,
}

impl Policy {
    /// Checks `principals`: at least one, names unique and not empty,
    /// secrets unique and within the `hello` bound.
    pub fn new(principals: Vec<Principal>) -> Result<Policy, PolicyError> {
        if principals.is_empty() {
            return Err(PolicyError::Empty);
        }
        let max = crate::limits::SECRET_BYTES_MAX;
        for (i, p) in principals.iter().enumerate() {
            if p.name.is_empty() {
                return Err(PolicyError::EmptyName(i + 1));
            }
            let secret = p.secret.expose();
            if secret.is_empty() || secret.len() > max {
                return Err(PolicyError::BadSecret {
                    name: p.name.clone(),
                    max,
                });
            }
            for q in &principals[..i] {
                if q.name == p.name {
                    return Err(PolicyError::DuplicateName(p.name.clone()));
                }
                if q.secret.matches(&p.secret) {
                    return Err(PolicyError::DuplicateSecret(q.name.clone(), p.name.clone()));
                }
            }
        }
        let principals = principals.into_iter().map(Arc::new).collect();
        Ok(Policy { principals })
    }

    /// The principal whose secret is `secret`. Every principal's secret is
    /// compared, each in constant time, so the time taken does not say
    /// which one (if any) matched, nor how much of a guess was right.
    pub fn authenticate(&self, secret: &Secret) -> Option<Arc<Principal>> {
        let mut found = None;
        for principal in &self.principals {
            if principal.secret.matches(secret) {
                found = Some(Arc::clone(principal));
            }
        }
        found
    }

    /// The principal named `name`, if the policy still has it.
    pub fn get(&self, name: &str) -> Option<Arc<Principal>> {
        self.principals.iter().find(|p| p.name == name).cloned()
    }

    /// The principals' names, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.principals.iter().map(|p| p.name.as_str())
    }
}

/// The server's authentication front: the current policy (replaced by
/// [`Auth::reload`]) and each principal's usage against its quotas. Shared by every session of an engine.
#[derive(Debug)]
pub struct Auth {
    policy: RwLock<Arc<Policy>>,
    usage: quota::Ledger,
}

impl Auth {
    /// The front of a server that enforces `policy`.
    pub fn new(policy: Policy) -> Auth {
        Auth {
            policy: RwLock::new(Arc::new(policy)),
            usage: quota::Ledger::default(),
        }
    }

    /// The policy now.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the policy. Open connections keep their principal's name
    /// and are checked against the new grants from their next request on;
    /// a connection whose principal is gone is refused everything but a
    /// new `hello`.
    pub fn reload(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }

    /// Each principal's usage against its quotas.
    pub fn usage(&self) -> &quota::Ledger {
        &self.usage
    }
}

/// `unauthorized` with `message`.
pub fn unauthorized(message: impl Into<std::borrow::Cow<'static, str>>) -> ServerError {
    ServerError::new(crate::proto::ErrorCode::Unauthorized, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(name: &str, secret: &str) -> Principal {
        Principal {
            name: name.into(),
            secret: Secret::new(secret),
            locks: vec!["jobs/".into()],
            sets: vec![],
            read: vec![String::new()],
            admin: false,
            quotas: Quotas::default(),
        }
    }

    #[test]
    fn a_policy_refuses_duplicates_and_finds_principals_by_secret() {
        let dup = Policy::new(vec![principal("a", "s"), principal("a", "t")]);
        assert_eq!(dup.unwrap_err(), PolicyError::DuplicateName("a".into()));
        let same = Policy::new(vec![principal("a", "s"), principal("b", "s")]);
        assert!(matches!(same, Err(PolicyError::DuplicateSecret(..))));
        assert_eq!(Policy::new(vec![]).unwrap_err(), PolicyError::Empty);
        let policy = Policy::new(vec![principal("a", "s"), principal("b", "t")]).unwrap();
        let found = policy.authenticate(&Secret::new("t")).unwrap();
        assert_eq!(found.name, "b");
        assert!(policy.authenticate(&Secret::new("x")).is_none());
    }

    #[test]
    fn grants_are_prefixes() {
        let p = principal("a", "s");
        assert!(p.allows(Need::Lock("jobs/1")));
        assert!(!p.allows(Need::Lock("job")));
        assert!(!p.allows(Need::Set("jobs/1")));
        assert!(p.allows(Need::Read("anything")));
        assert!(!p.allows(Need::Admin));
    }
}
