//! Successful replies, one type per operation (SPEC sections 2 to 4).

use serde::{Deserialize, Serialize};

use super::error::ServerError;

/// What a request comes to: a successful reply or a server error.
pub type Outcome = Result<Okay, ServerError>;

/// A successful reply. On the wire it is the object under `"ok"`; each
/// variant serialises as its inner type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Okay {
    /// `hello`.
    Hello(HelloReply),
    /// `{}`: `ping`, `cancel`, `unlock`.
    Empty(Empty),
    /// `lock`.
    Granted(Granted),
    /// `extend`.
    Extended(Extended),
    /// `inspect`.
    LockInfo(LockInfo),
    /// `set_up`.
    SetUp(SetUpReply),
    /// `insert` with `key`.
    Inserted(Inserted),
    /// `insert` with `keys`.
    InsertedMany(InsertedMany),
    /// `members`.
    Members(MembersPage),
    /// `inspect_set`.
    SetInfo(SetInfo),
    /// `tear_down`.
    TornDown(TornDown),
    /// `stats`.
    Stats(Box<StatsReply>),
}

impl Okay {
    /// The empty reply `{}`.
    pub const EMPTY: Okay = Okay::Empty(Empty {});
}

/// A reply of one shape, read out of an [`Okay`]: a client asks for the
/// shape that the op table (`proto/ops.rs`) gives its op's reply.
pub trait FromOkay: Sized {
    /// The reply, or `Err(okay)` back if it has another shape.
    fn from_okay(okay: Okay) -> Result<Self, Okay>;
}

/// Any shape.
impl FromOkay for Okay {
    fn from_okay(okay: Okay) -> Result<Self, Okay> {
        Ok(okay)
    }
}

macro_rules! from_okay {
    ($($variant:ident($shape:ty)),* $(,)?) => {$(
        impl FromOkay for $shape {
            fn from_okay(okay: Okay) -> Result<Self, Okay> {
                match okay {
                    Okay::$variant(reply) => Ok(reply),
                    other => Err(other),
                }
            }
        }
    )*};
}

// Each variant of `Okay` with the type it holds (the compiler checks that
// they match).
from_okay! {
    Hello(HelloReply),
    Empty(Empty),
    Granted(Granted),
    Extended(Extended),
    LockInfo(LockInfo),
    SetUp(SetUpReply),
    Inserted(Inserted),
    InsertedMany(InsertedMany),
    Members(MembersPage),
    SetInfo(SetInfo),
    TornDown(TornDown),
    Stats(Box<StatsReply>),
}

/// The empty object `{}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Empty {}

/// Reply to `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// The client id now bound to the connection.
    pub client: String,
    /// `deadbolt/<version>`.
    pub server: String,
}

/// Reply to a granted `lock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Granted {
    /// The fencing token naming this grant.
    pub token: u64,
    /// The lease, measured from the grant.
    pub ttl_ms: u64,
    /// With `--sign-grants`: the signed statement of this grant (see
    /// [`proof`](crate::proof)), added where the reply leaves the server
    /// for its client; never made by the state machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
}

impl Granted {
    /// A grant without a proof, as the state machine answers.
    pub fn new(token: u64, ttl_ms: u64) -> Granted {
        Granted {
            token,
            ttl_ms,
            proof: None,
        }
    }
}

/// Reply to `extend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extended {
    /// The new lease, measured from the extend.
    pub ttl_ms: u64,
}

/// Reply to `inspect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// The first holder (the oldest grant), or `None` if the key is free:
    /// what version 1 clients read.
    pub holder: Option<HolderInfo>,
    /// How many requests wait for the key.
    pub waiters: u64,
    /// Every holder, oldest grant first (SPEC section 7; empty from a
    /// server before it).
    #[serde(default)]
    pub holders: Vec<HolderInfo>,
    /// How many exclusive holders the key admits (1 from a server before
    /// SPEC section 7, or for a free key).
    #[serde(default = "one")]
    pub limit: u32,
}

impl LockInfo {
    /// A free key.
    pub fn free() -> LockInfo {
        LockInfo {
            holder: None,
            waiters: 0,
            holders: Vec::new(),
            limit: 1,
        }
    }
}

fn one() -> u32 {
    1
}

/// The holder of a lock, as `inspect` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderInfo {
    /// The holder's client id.
    pub client: String,
    /// The fencing token of the grant, or [`HIDDEN_TOKEN`] (left out on
    /// the wire) when the asker may not see it: with authentication on,
    /// only the holder's own client id and admins see it (SPEC section
    /// 10).
    #[serde(default, skip_serializing_if = "is_hidden")]
    pub token: u64,
    /// What is left of the lease, rounded down.
    pub remaining_ms: u64,
    /// Whether it holds the key shared or exclusive.
    #[serde(default)]
    pub mode: crate::request::ModeName,
}

/// The `token` of a [`HolderInfo`] whose token is not shown. Tokens start
/// at 1, so 0 never names a grant.
pub const HIDDEN_TOKEN: u64 = 0;

// serde's `skip_serializing_if` passes a reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_hidden(token: &u64) -> bool {
    *token == HIDDEN_TOKEN
}

/// Reply to `set_up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetUpReply {
    /// Whether this call created the set.
    pub created: bool,
    /// How many keys the set holds.
    pub size: u64,
}

/// The result of inserting one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inserted {
    /// The key's 1-based position in arrival order: the same for everyone.
    pub index: u64,
    /// Whether the caller is the client that inserted the key first.
    pub first: bool,
}

/// Reply to `insert` with `keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InsertedMany {
    /// One result per key, in the order of the request.
    pub results: Vec<Inserted>,
}

/// One key of a `members` page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The key's index.
    pub index: u64,
    /// The key.
    pub key: String,
}

/// Reply to `members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersPage {
    /// Keys in index order.
    pub members: Vec<Member>,
    /// The `after` to pass for the next page, or `None` at the end.
    pub next: Option<u64>,
}

/// Reply to `inspect_set`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetInfo {
    /// How many keys the set holds.
    pub size: u64,
    /// What is left of its time to live, rounded down.
    pub remaining_ms: u64,
}

/// Reply to `tear_down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TornDown {
    /// How many keys the set held.
    pub size: u64,
}

/// Reply to `stats`: a bounded snapshot of the server. Counters count
/// since the server started, so a reader takes rates from two snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StatsReply {
    /// `deadbolt/<version>`.
    pub server: String,
    /// How long the server has run.
    pub uptime_ms: u64,
    /// Open connections per frontend (`websocket`, `quic`, `local`).
    pub connections: std::collections::BTreeMap<String, u64>,
    /// Lock counters and sizes.
    pub locks: LockCounters,
    /// Set counters and sizes.
    pub sets: SetCounters,
    /// Held locks, most waited-for first (at most `top`).
    pub held: Vec<HeldLock>,
    /// Keys with waiters, most waiters first (at most `top`).
    pub contended: Vec<HeldLock>,
    /// Distinct sets, largest first (at most `top`).
    pub largest_sets: Vec<SetSummary>,
}

/// Lock counters (since start) and sizes (now).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[allow(missing_docs)] // each field is the counter of the same name
pub struct LockCounters {
    pub held: u64,
    pub waiters: u64,
    pub grants: u64,
    pub releases: u64,
    pub expiries: u64,
    pub disconnects: u64,
    pub timeouts: u64,
    pub cancellations: u64,
    pub busy: u64,
    /// Waiters and unheard grants dropped because their requester went
    /// away (absent from servers before it was counted).
    #[serde(default)]
    pub abandoned: u64,
}

impl LockCounters {
    /// Adds another shard's counters and sizes to these.
    pub fn merge(&mut self, other: &LockCounters) {
        // Destructured, so that a new counter cannot be left out.
        let LockCounters {
            held,
            waiters,
            grants,
            releases,
            expiries,
            disconnects,
            timeouts,
            cancellations,
            busy,
            abandoned,
        } = other;
        self.held += held;
        self.waiters += waiters;
        self.grants += grants;
        self.releases += releases;
        self.expiries += expiries;
        self.disconnects += disconnects;
        self.timeouts += timeouts;
        self.cancellations += cancellations;
        self.busy += busy;
        self.abandoned += abandoned;
    }
}

/// Set counters (since start) and sizes (now).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[allow(missing_docs)] // each field is the counter of the same name
pub struct SetCounters {
    pub count: u64,
    pub members: u64,
    pub created: u64,
    pub expired: u64,
    pub torn_down: u64,
    pub inserts_new: u64,
    pub inserts_duplicate: u64,
}

impl SetCounters {
    /// Adds another shard's counters and sizes to these.
    pub fn merge(&mut self, other: &SetCounters) {
        // Destructured, so that a new counter cannot be left out.
        let SetCounters {
            count,
            members,
            created,
            expired,
            torn_down,
            inserts_new,
            inserts_duplicate,
        } = other;
        self.count += count;
        self.members += members;
        self.created += created;
        self.expired += expired;
        self.torn_down += torn_down;
        self.inserts_new += inserts_new;
        self.inserts_duplicate += inserts_duplicate;
    }
}

/// A held lock in a `stats` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLock {
    /// The key.
    pub key: String,
    /// The holder's client id.
    pub client: String,
    /// The grant's token.
    pub token: u64,
    /// What is left of the lease.
    pub remaining_ms: u64,
    /// How many wait for it.
    pub waiters: u64,
}

/// A distinct set in a `stats` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetSummary {
    /// The set's name.
    pub set: String,
    /// How many keys it holds.
    pub size: u64,
    /// What is left of its time to live.
    pub remaining_ms: u64,
}
