//! The message schema (SPEC section 4), shared by every transport and client.
//!
//! - [`request`]: requests and their operations, as the engine sees them;
//! - [`reply`]: successful replies, one type per operation;
//! - [`error`]: wire error codes and the error a server sends;
//! - [`wire`]: JSON encode and decode, where every field and bound is
//!   checked once so that nothing past the decoder meets bad input.

pub mod error;
mod macros;
pub mod ops;
pub mod reply;
pub mod request;
mod rules;
pub mod wire;

pub use error::{ErrorCode, ServerError};
pub use ops::{OP_NAMES, OpKind};
pub use reply::{
    Empty, Extended, FromOkay, Granted, HeldLock, HelloReply, HolderInfo, Inserted, InsertedMany,
    LockCounters, LockInfo, Member, MembersPage, Okay, Outcome, SetCounters, SetInfo, SetSummary,
    SetUpReply, StatsReply, TornDown,
};
pub use request::{Acquire, Keys, LockOp, Op, Request, RequestId, SetOp, Wait};
pub use wire::{DecodeError, Reply, decode_reply, decode_request, encode_reply, encode_request};

/// The protocol version this crate speaks (SPEC section 4).
pub const PROTOCOL_VERSION: u32 = 1;

/// What the server calls itself in the `hello` reply.
pub const SERVER_NAME: &str = concat!("deadbolt/", env!("CARGO_PKG_VERSION"));
