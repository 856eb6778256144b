//! deadbolt-proto: the message schema (SPEC section 4) and every bound
//! (SPEC section 5), shared by the server, every transport and every
//! client. Pure data and pure functions: no I/O, no clock, no runtime.
//!
//! # Where an op is defined
//!
//! Each op is defined once, in [`ops`]: one entry of its op table gives the
//! op's wire name, its fields with their bounds, the [`Op`] they build and
//! the shape of its reply. Everything else about an op is derived from
//! that entry, so nothing else repeats it:
//!
//! - decoding (in [`wire`]): the fast path reads a message into a typed
//!   struct made from the field table and builds the op with the entry's
//!   field rules, which refuse bad values with a `bad_request` naming the
//!   field; the slow path takes the fields' JSON types and the op names
//!   from the tables too;
//! - encoding ([`encode_request`]): the entry's `Op`, read as a pattern,
//!   and the same field rules write the fields back;
//! - the client's side: [`OpKind`] (what [`Op::kind`] says), the reading of
//!   each reply's `ok` object ([`wire::RawReply::into_outcome`]) and the
//!   check of its shape ([`OpKind::expects`]);
//! - metrics: [`Op::name`] and [`OpKind::wire_name`] label requests by op.
//!
//! The browser client, `server/web/deadbolt.js`, is written by hand; a test
//! in `server/tests/js_client.rs` checks that it sends exactly the ops of
//! the table.
//!
//! # Layout
//!
//! - [`ops`]: the op table and the field table: **the one file that defines
//!   each op** (its [`Op`] variant lives in [`request`]);
//! - `rules.rs`: the field rules the op table uses (`Text`, `InRange`,
//!   `Count`, …): how a field is checked and written back, with the
//!   `bad_request` messages;
//! - `macros.rs`: the machinery that turns the tables into code;
//! - [`request`]: requests and their operations, as the engine sees them;
//! - [`reply`]: successful replies, one type per reply shape;
//! - [`error`]: wire error codes and the error a server sends;
//! - [`event`]: the events a server pushes (SPEC section 7);
//! - [`wire`]: JSON encode and decode, where every field and bound is
//!   checked once so that nothing past the decoder meets bad input;
//! - [`limits`]: every bound, each configurable;
//! - [`secret`]: the `auth` secret of `hello`, redacted and compared in
//!   constant time.

pub mod error;
pub mod event;
pub mod limits;
mod macros;
pub mod ops;
pub mod proof;
pub mod reply;
pub mod request;
mod rules;
pub mod secret;
pub mod wire;

pub use error::{ErrorCode, ServerError};
pub use event::{Event, EventName, LostReason};
pub use ops::{OP_NAMES, OpKind};
pub use reply::HIDDEN_TOKEN;
pub use reply::{
    Empty, Extended, FromOkay, Granted, HeldLock, HelloReply, HolderInfo, Inserted, InsertedMany,
    LockCounters, LockInfo, Member, MembersPage, Okay, Outcome, SetCounters, SetInfo, SetSummary,
    SetUpReply, StatsReply, TornDown,
};
pub use request::{
    Acquire, Keys, LockOp, Mode, ModeName, Op, Request, RequestId, SetOp, Wait, Watched,
};
pub use secret::Secret;
pub use wire::{DecodeError, Reply, decode_reply, decode_request, encode_reply, encode_request};

/// The protocol version this crate speaks (SPEC section 4).
pub const PROTOCOL_VERSION: u32 = 1;

/// What the server calls itself in the `hello` reply.
pub const SERVER_NAME: &str = concat!("deadbolt/", env!("CARGO_PKG_VERSION"));
