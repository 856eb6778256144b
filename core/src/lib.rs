//! deadbolt-core: the heart of deadbolt, a lock and de-duplication server.
//!
//! Every rule of the contract (`SPEC.md` sections 2, 3 and 5) lives here, so
//! that every transport and the simulation get exactly the same behaviour.
//!
//! Layout:
//! - [`proto`]: the message schema, shared by server and clients; decoding
//!   is where every field and bound is checked.
//! - [`shard`]: the sans-IO state machine of one key shard: leased locks
//!   with FIFO waiters and fencing tokens, and distinct sets.
//! - [`engine`]: the actor runtime, one task per shard, and the cheap
//!   [`engine::Engine`] handle that transports call.
//! - [`client`]: the client side: the transport trait that the WebSocket and
//!   QUIC clients implement, and the transport-agnostic [`client::Client`]
//!   with reconnects, retries, lock guards and distinct-set handles.
//! - [`limits`] and [`time`]: bounds and the shard's notion of time.

pub mod client;
pub mod engine;
pub mod limits;
pub mod proto;
pub mod shard;
pub mod time;

pub use engine::{Engine, EngineConfig, Session};
pub use limits::Limits;
