//! JSON on the wire: requests in, replies out (and the reverse, for
//! clients).
//!
//! Decoding is where bad input stops. A fast path reads a well-formed
//! request straight into typed fields; only when that fails does a slow path
//! look at the message again to find the request id (so the `bad_request`
//! reply can carry it) and to name the field that was wrong. Every bound in
//! [`Limits`] is checked on the way, once, by the rules the op table in
//! [`ops`](super::ops) gives each field; the fields, their types and the
//! ops' encoding and reply shapes come from that table too.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use super::error::ServerError;
use super::ops::{
    FIELD_TYPES, OP_NAMES, OpKind, WireRequest, WireRequestOut, decode_op, encode_op,
};
use super::reply::{Okay, Outcome};
use super::request::{Request, RequestId};
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
        Ok(mut wire) => {
            let id = wire.id;
            let op = decode_op(&mut wire, limits).map_err(|error| DecodeError {
                id: Some(id),
                error,
            })?;
            Ok(Request { id, op })
        }
        Err(fast_error) => Err(diagnose(bytes, &fast_error)),
    }
}

/// The JSON type of a request field, for the slow path's messages.
#[derive(Debug, Clone, Copy)]
pub(crate) enum FieldType {
    /// A string.
    Str,
    /// An array of strings.
    StrArray,
    /// An unsigned 64-bit integer.
    U64,
    /// A boolean.
    Bool,
    /// One of these strings.
    OneOf(&'static [&'static str]),
}

/// A Rust type a request field may have in the field table of
/// [`ops`](super::ops): its JSON type, and the type a client writes it as.
pub(crate) trait WireType {
    /// The field's JSON type.
    const JSON: FieldType;
    /// What a client writes, borrowing from the [`Op`](super::Op).
    type Out<'a>: Serialize;
}

impl WireType for String {
    const JSON: FieldType = FieldType::Str;
    type Out<'a> = &'a str;
}

impl WireType for Vec<String> {
    const JSON: FieldType = FieldType::StrArray;
    type Out<'a> = &'a [String];
}

impl WireType for u64 {
    const JSON: FieldType = FieldType::U64;
    type Out<'a> = u64;
}

impl WireType for crate::request::ModeName {
    const JSON: FieldType = FieldType::OneOf(&["exclusive", "shared"]);
    type Out<'a> = crate::request::ModeName;
}

impl WireType for bool {
    const JSON: FieldType = FieldType::Bool;
    type Out<'a> = bool;
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
            FieldType::OneOf(names) => value.as_str().is_some_and(|s| names.contains(&s)),
        }
    }

    fn describe(self) -> String {
        match self {
            FieldType::Str => "a string".to_owned(),
            FieldType::StrArray => "an array of strings".to_owned(),
            FieldType::U64 => "an unsigned 64-bit integer".to_owned(),
            FieldType::Bool => "a boolean".to_owned(),
            FieldType::OneOf(names) => {
                let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
                format!("one of {}", quoted.join(", "))
            }
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
            let message = match first_unknown_field(bytes) {
                Some(field) => format!("unknown field `{field}`"),
                None => format!("not valid JSON: {e}"),
            };
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
    if fields.get("op").is_some_and(|op| !op.is_string()) {
        return with_id("field `op` must be a string".to_owned());
    }
    for (name, expected) in FIELD_TYPES {
        match fields.get(*name) {
            // An absent optional field.
            Some(Value::Null) => {}
            Some(value) if !expected.accepts(value) => {
                return with_id(format!("field `{name}` must be {}", expected.describe()));
            }
            _ => {}
        }
    }
    match fields.get("op").and_then(Value::as_str) {
        None => with_id("missing field `op`".to_owned()),
        Some(op) if !OP_NAMES.contains(&op) => with_id(format!("unknown op `{op}`")),
        Some(op) => match fields.keys().find(|name| !is_known_field(name)) {
            Some(field) => with_id(format!("op `{op}` takes no field `{field}`")),
            None => with_id(format!("malformed request: {fast_error}")),
        },
    }
}

/// Whether some op takes a field of this name.
fn is_known_field(name: &str) -> bool {
    name == "id" || name == "op" || FIELD_TYPES.iter().any(|(known, _)| *known == name)
}

/// The first field of a JSON object that no op takes, read without
/// holding the values (which may be too deeply nested to hold): for a
/// message whose unknown field is what made it unreadable as a value.
fn first_unknown_field(bytes: &[u8]) -> Option<String> {
    struct FirstUnknown;
    impl<'de> serde::de::Visitor<'de> for FirstUnknown {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Option<String>, A::Error> {
            let mut unknown = None;
            while let Some(name) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                if unknown.is_none() && !is_known_field(&name) {
                    unknown = Some(name);
                }
            }
            Ok(unknown)
        }
    }
    let mut reader = serde_json::Deserializer::from_slice(bytes);
    serde::Deserializer::deserialize_map(&mut reader, FirstUnknown)
        .ok()
        .flatten()
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

/// Encodes a request as one JSON message.
pub fn encode_request(request: &Request) -> String {
    let mut wire = WireRequestOut::new(request.id, request.op.name());
    encode_op(&request.op, &mut wire);
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
            (Some(ok), None) => kind.decode_okay(ok.get()).map(Ok),
            (None, None) => Err(serde::de::Error::custom("reply has neither `ok` nor `err`")),
        }
    }
}

/// Reads a reply message up to its raw `ok` object.
pub fn decode_reply(bytes: &[u8]) -> Result<RawReply, serde_json::Error> {
    serde_json::from_slice(bytes)
}
