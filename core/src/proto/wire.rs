//! JSON on the wire: requests in, replies out (and the reverse, for
//! clients).
//!
//! Decoding is where bad input stops. A fast path reads a well-formed
//! request straight into typed fields; only when that fails does a slow path
//! look at the message again to find the request id (so the `bad_request`
//! reply can carry it) and to name the field that was wrong. Every bound in
//! [`Limits`] is checked here, once.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use super::error::ServerError;
use super::reply::{
    Empty, Extended, Granted, HelloReply, Inserted, InsertedMany, LockInfo, MembersPage, Okay,
    Outcome, SetInfo, SetUpReply, StatsReply, TornDown,
};
use super::request::{Acquire, Keys, LockOp, Op, OpKind, Request, RequestId, SetOp, Wait};
use crate::limits::Limits;

/// A reply as a transport sends it: the request id (`None` when the request
/// was unreadable) and the outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The id of the request this answers, or `None` (`"id": null`).
    pub id: Option<RequestId>,
    /// The answer.
    pub outcome: Outcome,
}

/// Why a message could not be decoded into a request: the error to send back
/// and the request id to send it under, where one could be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request {id:?}: {error}")]
pub struct DecodeError {
    /// The request id, if the message had a readable one.
    pub id: Option<RequestId>,
    /// `bad_request` or `too_large`.
    pub error: ServerError,
}

impl DecodeError {
    /// The reply that answers the bad message.
    pub fn into_reply(self) -> Reply {
        Reply {
            id: self.id,
            outcome: Err(self.error),
        }
    }
}

/// Operation names as they appear in `"op"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OpName {
    Hello,
    Ping,
    Cancel,
    Stats,
    Lock,
    Unlock,
    Extend,
    Inspect,
    SetUp,
    Insert,
    Members,
    InspectSet,
    TearDown,
}

/// Every field any request may carry. Unknown fields are ignored, so a newer
/// client can talk to an older server.
#[derive(Deserialize)]
struct WireRequest {
    id: RequestId,
    op: OpName,
    key: Option<String>,
    keys: Option<Vec<String>>,
    set: Option<String>,
    ttl_ms: Option<u64>,
    wait_ms: Option<u64>,
    ephemeral: Option<bool>,
    token: Option<u64>,
    target: Option<u64>,
    after: Option<u64>,
    limit: Option<u64>,
    client: Option<String>,
    top: Option<u64>,
}

/// Decodes and validates one request message.
///
/// Never panics, whatever the bytes. On failure the error says which request
/// id to answer under and why.
pub fn decode_request(bytes: &[u8], limits: &Limits) -> Result<Request, DecodeError> {
    if bytes.len() > limits.message_bytes_max {
        return Err(DecodeError {
            id: None,
            error: ServerError::too_large(format!(
                "message of {} bytes is over the limit of {} bytes",
                bytes.len(),
                limits.message_bytes_max
            )),
        });
    }
    match serde_json::from_slice::<WireRequest>(bytes) {
        Ok(wire) => {
            let id = wire.id;
            let op = validate(wire, limits).map_err(|error| DecodeError {
                id: Some(id),
                error,
            })?;
            Ok(Request { id, op })
        }
        Err(fast_error) => Err(diagnose(bytes, &fast_error)),
    }
}

fn validate(w: WireRequest, limits: &Limits) -> Result<Op, ServerError> {
    let op = match w.op {
        OpName::Hello => Op::Hello {
            client: bounded_str("client", w.client, limits.client_id_bytes_max)?,
        },
        OpName::Ping => Op::Ping,
        OpName::Cancel => Op::Cancel {
            target: required("target", w.target)?,
        },
        OpName::Stats => Op::Stats {
            top: bounded_u32("top", w.top, 20, limits.stats_top_max)?,
        },
        OpName::Lock => Op::Lock(LockOp::Acquire(Acquire {
            key: key("key", w.key, limits)?,
            ttl_ms: ttl_ms(w.ttl_ms, limits)?,
            wait: Wait::from_wait_ms(wait_ms(w.wait_ms, limits)?),
            ephemeral: w.ephemeral.unwrap_or(false),
        })),
        OpName::Unlock => Op::Lock(LockOp::Release {
            key: key("key", w.key, limits)?,
            token: required("token", w.token)?,
        }),
        OpName::Extend => Op::Lock(LockOp::Extend {
            key: key("key", w.key, limits)?,
            token: required("token", w.token)?,
            ttl_ms: ttl_ms(w.ttl_ms, limits)?,
        }),
        OpName::Inspect => Op::Lock(LockOp::Inspect {
            key: key("key", w.key, limits)?,
        }),
        OpName::SetUp => Op::Set(SetOp::SetUp {
            set: key("set", w.set, limits)?,
            ttl_ms: ttl_ms(w.ttl_ms, limits)?,
        }),
        OpName::Insert => Op::Set(SetOp::Insert {
            set: key("set", w.set, limits)?,
            keys: insert_keys(w.key, w.keys, limits)?,
        }),
        OpName::Members => Op::Set(SetOp::Members {
            set: key("set", w.set, limits)?,
            after: w.after.unwrap_or(0),
            limit: page_limit(w.limit, limits)?,
        }),
        OpName::InspectSet => Op::Set(SetOp::Inspect {
            set: key("set", w.set, limits)?,
        }),
        OpName::TearDown => Op::Set(SetOp::TearDown {
            set: key("set", w.set, limits)?,
        }),
    };
    Ok(op)
}

fn required<T>(name: &str, value: Option<T>) -> Result<T, ServerError> {
    value.ok_or_else(|| ServerError::bad_request(format!("missing field `{name}`")))
}

fn bounded_str(name: &str, value: Option<String>, max: usize) -> Result<String, ServerError> {
    let value = required(name, value)?;
    if value.is_empty() || value.len() > max {
        return Err(ServerError::bad_request(format!(
            "field `{name}` must be 1..={max} bytes, got {}",
            value.len()
        )));
    }
    Ok(value)
}

fn key(name: &str, value: Option<String>, limits: &Limits) -> Result<String, ServerError> {
    bounded_str(name, value, limits.key_bytes_max)
}

fn ttl_ms(value: Option<u64>, limits: &Limits) -> Result<u64, ServerError> {
    let ttl = required("ttl_ms", value)?;
    in_range("ttl_ms", ttl, 1, limits.ttl_ms_max)
}

fn wait_ms(value: Option<u64>, limits: &Limits) -> Result<Option<u64>, ServerError> {
    value
        .map(|wait| in_range("wait_ms", wait, 0, limits.wait_ms_max))
        .transpose()
}

fn page_limit(value: Option<u64>, limits: &Limits) -> Result<u32, ServerError> {
    bounded_u32("limit", value, 1000, limits.members_page_max)
}

/// A count in `1..=max` (default `default`, at most `max`).
fn bounded_u32(name: &str, value: Option<u64>, default: u32, max: u32) -> Result<u32, ServerError> {
    let max = u64::from(max);
    let value = in_range(name, value.unwrap_or(u64::from(default).min(max)), 1, max)?;
    // In range of a u32 because the maximum is one.
    Ok(u32::try_from(value).unwrap_or(u32::MAX))
}

fn in_range(name: &str, value: u64, min: u64, max: u64) -> Result<u64, ServerError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ServerError::bad_request(format!(
            "field `{name}` must be in {min}..={max}, got {value}"
        )))
    }
}

fn insert_keys(
    one: Option<String>,
    many: Option<Vec<String>>,
    limits: &Limits,
) -> Result<Keys, ServerError> {
    match (one, many) {
        (Some(k), None) => Ok(Keys::One(key("key", Some(k), limits)?)),
        (None, Some(keys)) => {
            if keys.len() > limits.insert_batch_max {
                return Err(ServerError::too_large(format!(
                    "a batch of {} keys is over the limit of {}",
                    keys.len(),
                    limits.insert_batch_max
                )));
            }
            for k in &keys {
                if k.is_empty() || k.len() > limits.key_bytes_max {
                    return Err(ServerError::bad_request(format!(
                        "every entry of `keys` must be 1..={} bytes",
                        limits.key_bytes_max
                    )));
                }
            }
            Ok(Keys::Many(keys))
        }
        (Some(_), Some(_)) => Err(ServerError::bad_request(
            "give either `key` or `keys`, not both",
        )),
        (None, None) => Err(ServerError::bad_request("missing field `key` or `keys`")),
    }
}

/// The JSON type each known field must have, for the slow path's messages.
const FIELD_TYPES: &[(&str, FieldType)] = &[
    ("op", FieldType::Str),
    ("key", FieldType::Str),
    ("keys", FieldType::StrArray),
    ("set", FieldType::Str),
    ("client", FieldType::Str),
    ("ttl_ms", FieldType::U64),
    ("wait_ms", FieldType::U64),
    ("token", FieldType::U64),
    ("target", FieldType::U64),
    ("after", FieldType::U64),
    ("limit", FieldType::U64),
    ("top", FieldType::U64),
    ("ephemeral", FieldType::Bool),
];

#[derive(Clone, Copy)]
enum FieldType {
    Str,
    StrArray,
    U64,
    Bool,
}

impl FieldType {
    fn accepts(self, value: &Value) -> bool {
        match self {
            FieldType::Str => value.is_string(),
            FieldType::StrArray => value
                .as_array()
                .is_some_and(|items| items.iter().all(Value::is_string)),
            FieldType::U64 => value.is_u64(),
            FieldType::Bool => value.is_boolean(),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            FieldType::Str => "a string",
            FieldType::StrArray => "an array of strings",
            FieldType::U64 => "an unsigned 64-bit integer",
            FieldType::Bool => "a boolean",
        }
    }
}

/// Just the id, skipping everything else without recursion.
#[derive(Deserialize)]
struct IdOnly {
    id: Option<RequestId>,
}

/// The slow path: find the id and say precisely what is wrong.
fn diagnose(bytes: &[u8], fast_error: &serde_json::Error) -> DecodeError {
    let unreadable = |message: String| DecodeError {
        id: None,
        error: ServerError::bad_request(message),
    };
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(value) => value,
        Err(e) => {
            // Valid JSON too deep to hold as a value still has a readable id.
            let id = serde_json::from_slice::<IdOnly>(bytes)
                .ok()
                .and_then(|r| r.id);
            let message = format!("not valid JSON: {e}");
            return DecodeError {
                id,
                error: ServerError::bad_request(message),
            };
        }
    };
    let Value::Object(fields) = value else {
        return unreadable("a request must be a JSON object".to_owned());
    };
    let Some(id) = fields.get("id").and_then(Value::as_u64) else {
        return unreadable("field `id` must be present and an unsigned 64-bit integer".to_owned());
    };
    let with_id = |message: String| DecodeError {
        id: Some(id),
        error: ServerError::bad_request(message),
    };
    for (name, expected) in FIELD_TYPES {
        match fields.get(*name) {
            Some(Value::Null) if *name != "op" => {}
            Some(value) if !expected.accepts(value) => {
                return with_id(format!("field `{name}` must be {}", expected.describe()));
            }
            _ => {}
        }
    }
    match fields.get("op").and_then(Value::as_str) {
        None => with_id("missing field `op`".to_owned()),
        Some(op) if serde_json::from_value::<OpName>(Value::from(op)).is_err() => {
            with_id(format!("unknown op `{op}`"))
        }
        Some(_) => with_id(format!("malformed request: {fast_error}")),
    }
}

#[derive(Serialize)]
struct WireReply<'a> {
    id: Option<RequestId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ok: Option<&'a Okay>,
    #[serde(skip_serializing_if = "Option::is_none")]
    err: Option<&'a ServerError>,
}

/// Encodes a reply as one JSON message (and counts errors by code, for
/// metrics: every transport sends every reply through here).
pub fn encode_reply(reply: &Reply) -> String {
    if let Err(error) = &reply.outcome {
        metrics::counter!("deadbolt_errors_total", "code" => error.code.as_str()).increment(1);
    }
    let wire = WireReply {
        id: reply.id,
        ok: reply.outcome.as_ref().ok(),
        err: reply.outcome.as_ref().err(),
    };
    // Serialising these plain structs to a String cannot fail: every map
    // key is a string and no value is a non-finite float.
    serde_json::to_string(&wire).unwrap_or_else(|e| {
        format!(r#"{{"id":null,"err":{{"code":"internal","message":"encode: {e}"}}}}"#)
    })
}

/// A request as a client writes it.
#[derive(Serialize)]
struct WireRequestOut<'a> {
    id: RequestId,
    op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keys: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    set: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wait_ms: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ephemeral: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top: Option<u64>,
}

impl<'a> WireRequestOut<'a> {
    fn new(id: RequestId, kind: OpKind) -> Self {
        WireRequestOut {
            id,
            op: kind.wire_name(),
            key: None,
            keys: None,
            set: None,
            ttl_ms: None,
            wait_ms: None,
            ephemeral: false,
            token: None,
            target: None,
            after: None,
            limit: None,
            client: None,
            top: None,
        }
    }

    fn fill(mut self, op: &'a Op) -> Self {
        match op {
            Op::Hello { client } => self.client = Some(client),
            Op::Ping => {}
            Op::Cancel { target } => self.target = Some(*target),
            Op::Stats { top } => self.top = Some(u64::from(*top)),
            Op::Lock(lock) => self.fill_lock(lock),
            Op::Set(set) => self.fill_set(set),
        }
        self
    }

    fn fill_lock(&mut self, op: &'a LockOp) {
        self.key = Some(op.key());
        match op {
            LockOp::Acquire(a) => {
                self.ttl_ms = Some(a.ttl_ms);
                self.wait_ms = a.wait.to_wait_ms();
                self.ephemeral = a.ephemeral;
            }
            LockOp::Release { token, .. } => self.token = Some(*token),
            LockOp::Extend { token, ttl_ms, .. } => {
                self.token = Some(*token);
                self.ttl_ms = Some(*ttl_ms);
            }
            LockOp::Inspect { .. } => {}
        }
    }

    fn fill_set(&mut self, op: &'a SetOp) {
        self.set = Some(op.set());
        match op {
            SetOp::SetUp { ttl_ms, .. } => self.ttl_ms = Some(*ttl_ms),
            SetOp::Insert { keys, .. } => match keys {
                Keys::One(key) => self.key = Some(key),
                Keys::Many(keys) => self.keys = Some(keys),
            },
            SetOp::Members { after, limit, .. } => {
                self.after = Some(*after);
                self.limit = Some(u64::from(*limit));
            }
            SetOp::Inspect { .. } | SetOp::TearDown { .. } => {}
        }
    }
}

/// Encodes a request as one JSON message.
pub fn encode_request(request: &Request) -> String {
    let wire = WireRequestOut::new(request.id, request.op.kind()).fill(&request.op);
    // As in `encode_reply`, this cannot fail for these types.
    serde_json::to_string(&wire).unwrap_or_default()
}

/// A reply as a client first reads it: the id, and the `ok` object still
/// raw, because its shape depends on the request it answers.
#[derive(Debug, Deserialize)]
pub struct RawReply {
    /// The id of the request this answers, or `None`.
    pub id: Option<RequestId>,
    /// The `ok` object of a successful reply.
    pub ok: Option<Box<RawValue>>,
    /// The error of a failed reply.
    pub err: Option<ServerError>,
}

impl RawReply {
    /// Reads the outcome, knowing which operation the request was.
    pub fn into_outcome(self, kind: OpKind) -> Result<Outcome, serde_json::Error> {
        match (self.ok, self.err) {
            (_, Some(err)) => Ok(Err(err)),
            (Some(ok), None) => decode_okay(kind, ok.get()).map(Ok),
            (None, None) => Err(serde::de::Error::custom("reply has neither `ok` nor `err`")),
        }
    }
}

/// Reads a reply message up to its raw `ok` object.
pub fn decode_reply(bytes: &[u8]) -> Result<RawReply, serde_json::Error> {
    serde_json::from_slice(bytes)
}

fn decode_okay(kind: OpKind, json: &str) -> Result<Okay, serde_json::Error> {
    Ok(match kind {
        OpKind::Hello => Okay::Hello(serde_json::from_str::<HelloReply>(json)?),
        OpKind::Ping | OpKind::Cancel | OpKind::Unlock => {
            Okay::Empty(serde_json::from_str::<Empty>(json)?)
        }
        OpKind::Lock => Okay::Granted(serde_json::from_str::<Granted>(json)?),
        OpKind::Extend => Okay::Extended(serde_json::from_str::<Extended>(json)?),
        OpKind::Inspect => Okay::LockInfo(serde_json::from_str::<LockInfo>(json)?),
        OpKind::SetUp => Okay::SetUp(serde_json::from_str::<SetUpReply>(json)?),
        OpKind::Insert => Okay::Inserted(serde_json::from_str::<Inserted>(json)?),
        OpKind::InsertMany => Okay::InsertedMany(serde_json::from_str::<InsertedMany>(json)?),
        OpKind::Members => Okay::Members(serde_json::from_str::<MembersPage>(json)?),
        OpKind::InspectSet => Okay::SetInfo(serde_json::from_str::<SetInfo>(json)?),
        OpKind::TearDown => Okay::TornDown(serde_json::from_str::<TornDown>(json)?),
        OpKind::Stats => Okay::Stats(Box::new(serde_json::from_str::<StatsReply>(json)?)),
    })
}
