//! Requests as the engine sees them: already decoded and validated.

/// A request id: picked by the client, unique among that connection's
/// requests still in flight; it pairs a reply with its request.
pub type RequestId = u64;

/// One request: its id and what it asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Pairs the reply with this request.
    pub id: RequestId,
    /// What is asked.
    pub op: Op,
}

/// Every operation of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Bind `client` as this connection's client id.
    Hello {
        /// The client id, 1..=64 bytes.
        client: String,
        /// The principal's secret, where the server requires one.
        auth: Option<crate::Secret>,
    },
    /// Answer `{}`: a liveness check.
    Ping,
    /// Cancel this connection's request `target` if it is still waiting.
    Cancel {
        /// The request id to cancel.
        target: RequestId,
    },
    /// A bounded snapshot of the server: counters, sizes and the top
    /// `top` held locks, contended keys and sets (for dashboards).
    Stats {
        /// How many entries each top list may hold.
        top: u32,
    },
    /// Push events about a lock key or a set to this connection until
    /// cancelled (SPEC section 7).
    Watch {
        /// What is watched.
        target: Watched,
    },
    /// An operation on one lock key.
    Lock(LockOp),
    /// An operation on one distinct set.
    Set(SetOp),
}

/// Operations on a lock (SPEC section 2). Each names one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockOp {
    /// `lock`: take the key, waiting as `wait` says.
    Acquire(Acquire),
    /// `unlock`: end the grant that `token` names.
    Release {
        /// The lock's key.
        key: String,
        /// The fencing token of the grant to end.
        token: u64,
    },
    /// `extend`: restart the lease of the grant that `token` names.
    Extend {
        /// The lock's key.
        key: String,
        /// The fencing token of the grant to extend.
        token: u64,
        /// The new lease, from now.
        ttl_ms: u64,
    },
    /// `inspect`: who holds the key, and how many wait.
    Inspect {
        /// The lock's key.
        key: String,
    },
}

/// Per result of an insert batch: `{"index":18446744073709551615,"first":false},`.
const INSERT_RESULT_BYTES: usize = 48;

impl Op {
    /// The most bytes the reply to this op may take, for an op whose reply
    /// can be far larger than its request: a `members` page or a `stats`
    /// snapshot (built from the server's state, up to the message limit; the
    /// shard cuts a page by its encoded size), an insert batch (a result per
    /// key). Others answer with a few numbers: 0. A transport reserves this
    /// much of a connection's reply budget before the request starts.
    pub fn reply_bytes_bound(&self, message_bytes_max: usize) -> usize {
        match self {
            Op::Stats { .. } | Op::Set(SetOp::Members { .. }) => message_bytes_max,
            Op::Set(SetOp::Insert {
                keys: Keys::Many(keys),
                ..
            }) => keys
                .len()
                .saturating_mul(INSERT_RESULT_BYTES)
                .min(message_bytes_max),
            _ => 0,
        }
    }
}

impl LockOp {
    /// The key this operation is about.
    pub fn key(&self) -> &str {
        match self {
            LockOp::Acquire(a) => &a.key,
            LockOp::Release { key, .. } | LockOp::Extend { key, .. } | LockOp::Inspect { key } => {
                key
            }
        }
    }
}

/// A `lock` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquire {
    /// The lock's key.
    pub key: String,
    /// The lease, from the grant.
    pub ttl_ms: u64,
    /// How long to wait if someone else holds it.
    pub wait: Wait,
    /// Release as soon as the connection that took it closes.
    pub ephemeral: bool,
    /// Shared or exclusive, and how many exclusive holders the key admits
    /// (SPEC section 7).
    pub mode: Mode,
    /// When this grant's lease runs out (not when it is unlocked), nobody
    /// is granted the key for this many more milliseconds.
    pub lock_delay_ms: u64,
    /// Push `expiring` and `lost` events about the grant to the
    /// requester's connection (SPEC section 7). Not the shard's business:
    /// the session takes it out before the request is ordered, so the log
    /// never holds it.
    pub notify: bool,
}

impl Acquire {
    /// A plain mutex `lock` of `key` for `ttl_ms`: exclusive, limit 1, no
    /// lock delay, not ephemeral, waiting as `wait` says.
    pub fn mutex(key: impl Into<String>, ttl_ms: u64, wait: Wait) -> Acquire {
        Acquire {
            key: key.into(),
            ttl_ms,
            wait,
            ephemeral: false,
            mode: Mode::MUTEX,
            lock_delay_ms: 0,
            notify: false,
        }
    }
}

/// What a `watch` watches: a lock key (`key`) or a distinct set (`set`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Watched {
    /// The lock `key`: its grants, releases and expiries.
    Key(String),
    /// The set `set`: its creation, expiry and tear-down.
    Set(String),
}

impl Watched {
    /// The key or set name, which places the watch on a shard.
    pub fn name(&self) -> &str {
        match self {
            Watched::Key(name) | Watched::Set(name) => name,
        }
    }
}

/// How a `lock` holds its key (SPEC section 7): the `mode` and `limit`
/// fields. A key is held by any number of shared holders or by up to
/// `limit` exclusive ones; every request on a key that has holders or
/// waiters must agree on its limit (a shared request's is 1), or it gets
/// `conflict`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// `"mode":"exclusive"` (the default) with `"limit":N` (default 1):
    /// one of at most `limit` holders that exclude every shared one. 1 is
    /// a mutex (or the writer of a read-write lock), more a counting
    /// semaphore.
    Exclusive {
        /// How many exclusive holders the key admits at once.
        limit: u32,
    },
    /// `"mode":"shared"`: one of any number of shared holders (readers),
    /// while no exclusive one holds the key.
    Shared,
}

impl Mode {
    /// A mutex: exclusive, one holder at a time.
    pub const MUTEX: Mode = Mode::Exclusive { limit: 1 };

    /// The key's limit this request needs: 1 for a shared request.
    pub fn limit(self) -> u32 {
        match self {
            Mode::Exclusive { limit } => limit,
            Mode::Shared => 1,
        }
    }

    /// Whether this is a shared request.
    pub fn is_shared(self) -> bool {
        self == Mode::Shared
    }

    /// The `mode` field's value.
    pub fn name(self) -> ModeName {
        match self {
            Mode::Exclusive { .. } => ModeName::Exclusive,
            Mode::Shared => ModeName::Shared,
        }
    }
}

/// The value of a `mode` field on the wire.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ModeName {
    /// `"exclusive"`.
    #[default]
    Exclusive,
    /// `"shared"`.
    Shared,
}

impl ModeName {
    /// `"exclusive"` or `"shared"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ModeName::Exclusive => "exclusive",
            ModeName::Shared => "shared",
        }
    }

    /// Whether this is the default, `"exclusive"` (left out of replies).
    pub fn is_exclusive(&self) -> bool {
        *self == ModeName::Exclusive
    }
}

/// How long a `lock` waits for a key someone else holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// `wait_ms` absent: as long as it takes.
    Forever,
    /// `wait_ms: 0`: answer `busy` at once.
    Never,
    /// `wait_ms: N`: at most N milliseconds, then `timeout`.
    UpTo(u64),
}

impl Wait {
    /// The wait that a `wait_ms` field says.
    pub fn from_wait_ms(wait_ms: Option<u64>) -> Wait {
        match wait_ms {
            None => Wait::Forever,
            Some(0) => Wait::Never,
            Some(ms) => Wait::UpTo(ms),
        }
    }

    /// The `wait_ms` field that says this wait.
    pub fn to_wait_ms(self) -> Option<u64> {
        match self {
            Wait::Forever => None,
            Wait::Never => Some(0),
            Wait::UpTo(ms) => Some(ms),
        }
    }
}

/// Operations on a distinct set (SPEC section 3). Each names one set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetOp {
    /// `set_up`: create the set, or restart its time to live.
    SetUp {
        /// The set's name.
        set: String,
        /// Time to live, from now.
        ttl_ms: u64,
    },
    /// `insert`: add keys, learning each one's index and whether the caller
    /// owns it.
    Insert {
        /// The set's name.
        set: String,
        /// The key (`key`) or keys (`keys`) to insert.
        keys: Keys,
    },
    /// `members`: one page of keys in index order.
    Members {
        /// The set's name.
        set: String,
        /// Start after this index (0: from the start).
        after: u64,
        /// At most this many keys.
        limit: u32,
    },
    /// `inspect_set`: size and remaining time to live.
    Inspect {
        /// The set's name.
        set: String,
    },
    /// `tear_down`: remove the set now.
    TearDown {
        /// The set's name.
        set: String,
    },
}

impl SetOp {
    /// The set this operation is about.
    pub fn set(&self) -> &str {
        match self {
            SetOp::SetUp { set, .. }
            | SetOp::Insert { set, .. }
            | SetOp::Members { set, .. }
            | SetOp::Inspect { set }
            | SetOp::TearDown { set } => set,
        }
    }
}

/// The keys of an `insert`: one (`key`, answered with one result) or a batch
/// (`keys`, answered with a list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keys {
    /// `key`.
    One(String),
    /// `keys`, applied in order.
    Many(Vec<String>),
}
