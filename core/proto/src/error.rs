//! Wire error codes and the error a server sends. Every failure a peer can
//! see maps to exactly one [`ErrorCode`] here.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// An error code on the wire (SPEC section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message was not valid JSON, named an unknown op, or had a missing,
    /// mistyped or out-of-bounds field. Nothing changed.
    BadRequest,
    /// `lock` with `wait_ms: 0` on a key someone else holds.
    Busy,
    /// `lock` waited `wait_ms` without being granted.
    Timeout,
    /// The waiting request was cancelled (`cancel` op or a reset stream).
    Cancelled,
    /// `unlock`/`extend` with a token that does not name the current grant.
    NotHeld,
    /// The distinct set does not exist (never set up, expired or torn down).
    NoSuchSet,
    /// The message, or a batch in it, is over a configured size limit.
    TooLarge,
    /// The server is at a capacity limit and refused the work.
    Overloaded,
    /// The client is not allowed to do this.
    Unauthorized,
    /// The server is shutting down.
    ShuttingDown,
    /// The server cannot keep a change right now (its disk is full or
    /// failing; later, no quorum). Nothing changed; retry later.
    Unavailable,
    /// A bug on the server's side.
    Internal,
    /// A `lock` disagrees with the key's holders or waiters on its limit
    /// (a shared request's is 1), or the client holds the key in the
    /// other mode (SPEC section 7). Nothing changed.
    Conflict,
}

impl ErrorCode {
    /// The code's wire name, e.g. `"not_held"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Busy => "busy",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::NotHeld => "not_held",
            ErrorCode::NoSuchSet => "no_such_set",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Conflict => "conflict",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as the server sends it: a code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ServerError {
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: Cow<'static, str>,
}

impl ServerError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> ServerError {
        ServerError {
            code,
            message: message.into(),
        }
    }

    /// `bad_request` with `message`.
    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> ServerError {
        ServerError::new(ErrorCode::BadRequest, message)
    }

    /// `busy`: the key is held and the request would not wait.
    pub fn busy() -> ServerError {
        ServerError::new(ErrorCode::Busy, "the lock is held by another client")
    }

    /// `timeout` after waiting `wait_ms`.
    pub fn timeout(wait_ms: u64) -> ServerError {
        ServerError::new(
            ErrorCode::Timeout,
            format!("not granted within wait_ms={wait_ms}"),
        )
    }

    /// `cancelled`: the waiting request was cancelled.
    pub fn cancelled() -> ServerError {
        ServerError::new(ErrorCode::Cancelled, "the request was cancelled")
    }

    /// `not_held`: the token does not name the current grant.
    pub fn not_held() -> ServerError {
        ServerError::new(
            ErrorCode::NotHeld,
            "the token does not name the current grant of this key",
        )
    }

    /// `no_such_set`.
    pub fn no_such_set() -> ServerError {
        ServerError::new(
            ErrorCode::NoSuchSet,
            "no such set (never set up, expired, or torn down)",
        )
    }

    /// `too_large` with `message`.
    pub fn too_large(message: impl Into<Cow<'static, str>>) -> ServerError {
        ServerError::new(ErrorCode::TooLarge, message)
    }

    /// `overloaded` with `message` naming the limit that was reached.
    pub fn overloaded(message: impl Into<Cow<'static, str>>) -> ServerError {
        ServerError::new(ErrorCode::Overloaded, message)
    }

    /// `shutting_down`.
    pub fn shutting_down() -> ServerError {
        ServerError::new(ErrorCode::ShuttingDown, "the server is shutting down")
    }

    /// `unavailable` with `message` saying what cannot be done now.
    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> ServerError {
        ServerError::new(ErrorCode::Unavailable, message)
    }

    /// `conflict` with `message` saying what the request disagrees with.
    pub fn conflict(message: impl Into<Cow<'static, str>>) -> ServerError {
        ServerError::new(ErrorCode::Conflict, message)
    }

    /// `internal` with `message`.
    pub fn internal(message: impl Into<Cow<'static, str>>) -> ServerError {
        ServerError::new(ErrorCode::Internal, message)
    }
}
