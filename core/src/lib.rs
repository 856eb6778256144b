//! deadbolt-core: the heart of deadbolt, a lock and de-duplication server.
//!
//! Every rule of the contract (`SPEC.md` sections 2, 3 and 5) lives in this
//! crate and the two pure crates beneath it, so that every transport and the
//! simulation get exactly the same behaviour. It is built in three layers:
//!
//! - [`proto`] (the `deadbolt-proto` crate, `core/proto/`): the message
//!   schema, each op defined once; decoding is where every field and bound
//!   ([`limits`]) is checked;
//! - [`shard`] (the `deadbolt-state` crate, `core/state/`): the
//!   deterministic state machine of one key shard, a function of its
//!   command log: leased locks with FIFO waiters and fencing tokens, and
//!   distinct sets; [`time`] is its notion of time. Neither crate depends
//!   on an async runtime;
//! - this crate, the runtime above them: the [`engine`] (one actor per
//!   shard that orders commands, hands each batch to a journal and then
//!   releases its answers; the cheap [`engine::Engine`] handle transports
//!   call), and the [`client`] (the transport trait the WebSocket and QUIC
//!   clients implement, and the transport-agnostic [`client::Client`] with
//!   reconnects, retries, lock guards and distinct-set handles); and
//!   [`auth`], who may connect and what each principal may do, checked by
//!   every session before a request reaches a shard.

pub mod auth;
pub mod client;
pub mod engine;

pub use deadbolt_proto as proto;
pub use deadbolt_proto::limits;
/// Signed grants: the proof format and [`proof::verify`], the offline check
/// a protected resource makes.
pub use deadbolt_proto::proof;
pub use deadbolt_state as shard;
pub use deadbolt_state::time;

pub use engine::{Engine, EngineConfig, Session};
pub use limits::Limits;
