//! Every operation of protocol version 1, each defined here once.
//!
//! Two tables. The **field table** lists every field a request may carry
//! and its JSON type. The **op table** has one entry per op:
//!
//! ```text
//! /// docs
//! Kind = "wire name" -> ReplyShape {
//!     binding: wire_field => Rule(bounds),
//!     …
//! } => { the Op built from the bindings }
//! ```
//!
//! that is: the op's [`OpKind`], its name on the wire, the
//! [`Okay`](super::Okay) variant its reply is, and each field it takes: the
//! value of wire field `wire_field`, read and checked by a rule from
//! `rules.rs` (whose bounds may read the server's
//! [`Limits`](crate::limits::Limits) as `limits`), is bound to `binding`,
//! and the bindings build the [`Op`]. The same `Op` expression, read as a
//! pattern, takes an op apart again for the encoder. An op with a second
//! reply shape (only `insert`) adds `| OtherKind -> OtherShape if { pattern }`.
//!
//! From these tables come (see `macros.rs`) the decoder's fast path and its
//! field checks, the names and types its slow path reports, the encoder,
//! [`Op::kind`] and [`Op::name`] (the label of per-op metrics), and a
//! client's reading and checking of each reply.
//! `transport-ws/tests/js_client.rs` checks that the browser client sends
//! exactly these op names.
//!
//! To add an op: add its variant to [`Op`] (or [`LockOp`], [`SetOp`]), its
//! entry here (and any new field to the field table), and its handling in
//! the engine; the compiler points at anything left out.

use super::limits::{LOCK_DELAY_MS_MAX, LOCK_LIMIT_MAX};
use super::macros::{define_ops, wire_fields};
use super::request::{Acquire, Keys, LockOp, ModeName, Op, SetOp};
use super::rules::{
    Count, Flag, InRange, Integer, IntegerOr, KeyOrSet, ModeAndLimit, OneOrMany, OptSecret,
    OptionalUpTo, Text, WaitMs,
};

wire_fields! {
    // SPEC section 5 (issue 13): a field the op does not take answers
    // `bad_request` naming it, so that a misspelt `ephemral`, or a `mode`
    // sent to a server that does not know it, is never silently ignored
    // and a lock the client did not ask for never granted.
    unknown_fields: refuse;

    // In this order the slow path checks the fields' types (the first
    // mistyped one is reported) and a client writes them.
    key: String,
    keys: Vec<String>,
    set: String,
    client: String,
    ttl_ms: u64,
    wait_ms: u64,
    token: u64,
    target: u64,
    after: u64,
    limit: u64,
    top: u64,
    ephemeral: bool,
    auth: String,
    mode: ModeName,
    lock_delay_ms: u64,
    notify: bool,
}

define_ops! {
    |limits|

    /// `hello` (SPEC section 4): binds the client id to the connection;
    /// sent first, and answered with the id and the server's name. With
    /// `auth` (SPEC section 10), the principal's secret.
    Hello = "hello" -> Hello {
        client: client => Text(limits.client_id_bytes_max),
        auth: auth => OptSecret(crate::limits::SECRET_BYTES_MAX),
    } => { Op::Hello { client, auth } }

    /// `ping`: a liveness check, answered `{}`.
    Ping = "ping" -> Empty {} => { Op::Ping }

    /// `cancel`: cancels this connection's request `target` if it is
    /// still waiting (it then answers `cancelled`); answered `{}`.
    Cancel = "cancel" -> Empty {
        target: target => Integer,
    } => { Op::Cancel { target } }

    /// `watch` (SPEC section 7): pushes an event for every grant, release
    /// and expiry of the lock `key`, or for the creation, expiry and tear
    /// down of the set `set`, until it is cancelled or its connection
    /// closes; answered `{}` once the watch is in place.
    Watch = "watch" -> Empty {
        target: (key, set) => KeyOrSet(limits.key_bytes_max),
    } => { Op::Watch { target } }

    /// `stats`: a bounded snapshot of the server, with the `top` held
    /// locks, contended keys and largest sets.
    Stats = "stats" -> Stats {
        top: top => Count { default: 20, max: limits.stats_top_max },
    } => { Op::Stats { top } }

    /// `lock` (SPEC sections 2 and 7): takes the key, waiting as
    /// `wait_ms` says, shared or exclusive (`mode`), as one of up to
    /// `limit` exclusive holders, with a lock delay after its lease runs
    /// out (`lock_delay_ms`); answered with the grant's token and lease.
    Lock = "lock" -> Granted {
        key: key => Text(limits.key_bytes_max),
        ttl_ms: ttl_ms => InRange(1, limits.ttl_ms_max),
        wait: wait_ms => WaitMs(limits.wait_ms_max),
        ephemeral: ephemeral => Flag,
        mode: (mode, limit) => ModeAndLimit(LOCK_LIMIT_MAX),
        lock_delay_ms: lock_delay_ms => OptionalUpTo(LOCK_DELAY_MS_MAX),
        notify: notify => Flag,
    } => {
        Op::Lock(LockOp::Acquire(Acquire {
            key, ttl_ms, wait, ephemeral, mode, lock_delay_ms, notify
        }))
    }

    /// `unlock`: ends the grant that `token` names; answered `{}`.
    Unlock = "unlock" -> Empty {
        key: key => Text(limits.key_bytes_max),
        token: token => Integer,
    } => { Op::Lock(LockOp::Release { key, token }) }

    /// `extend`: restarts the lease of the grant that `token` names.
    Extend = "extend" -> Extended {
        key: key => Text(limits.key_bytes_max),
        token: token => Integer,
        ttl_ms: ttl_ms => InRange(1, limits.ttl_ms_max),
    } => { Op::Lock(LockOp::Extend { key, token, ttl_ms }) }

    /// `inspect`: who holds the key, and how many wait for it.
    Inspect = "inspect" -> LockInfo {
        key: key => Text(limits.key_bytes_max),
    } => { Op::Lock(LockOp::Inspect { key }) }

    /// `set_up` (SPEC section 3): creates the set, or restarts its time to
    /// live.
    SetUp = "set_up" -> SetUp {
        set: set => Text(limits.key_bytes_max),
        ttl_ms: ttl_ms => InRange(1, limits.ttl_ms_max),
    } => { Op::Set(SetOp::SetUp { set, ttl_ms }) }

    /// `insert`: adds `key` to the set, answered with its index and
    /// whether the caller owns it; or a batch of `keys`, in order, answered
    /// with one such result per key (kind `InsertMany`).
    Insert = "insert" -> Inserted {
        set: set => Text(limits.key_bytes_max),
        keys: (key, keys) => OneOrMany {
            bytes_max: limits.key_bytes_max,
            batch_max: limits.insert_batch_max,
        },
    } => { Op::Set(SetOp::Insert { set, keys }) }
    | InsertMany -> InsertedMany if { Op::Set(SetOp::Insert { keys: Keys::Many(_), .. }) }

    /// `members`: one page of keys in index order, after index `after`.
    Members = "members" -> Members {
        set: set => Text(limits.key_bytes_max),
        after: after => IntegerOr(0),
        limit: limit => Count { default: 1000, max: limits.members_page_max },
    } => { Op::Set(SetOp::Members { set, after, limit }) }

    /// `inspect_set`: the set's size and remaining time to live.
    InspectSet = "inspect_set" -> SetInfo {
        set: set => Text(limits.key_bytes_max),
    } => { Op::Set(SetOp::Inspect { set }) }

    /// `tear_down`: removes the set now, answered with its size.
    TearDown = "tear_down" -> TornDown {
        set: set => Text(limits.key_bytes_max),
    } => { Op::Set(SetOp::TearDown { set }) }
}
