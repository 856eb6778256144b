//! Events a server pushes (SPEC section 7): one JSON object per message,
//! `{"id":<request id>,"event":<name>,…}`, under the id of the request
//! that asked for them (a `lock` with `notify`, or a `watch`).
//!
//! A reply always carries `ok` or `err` after its id and an event carries
//! `event` there, so a client tells them apart by the second field
//! ([`is_event`]) without reading the message twice.

use serde::{Deserialize, Serialize};

use crate::RequestId;

/// One pushed event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The id of the request whose events these are.
    pub id: RequestId,
    /// What happened.
    pub event: EventName,
    /// The lock key, for a watch on a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The set's name, for a watch on a set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
    /// The grant's fencing token (lock events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    /// What is left of the lease (`expiring`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_ms: Option<u64>,
    /// Why the grant ended (`lost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<LostReason>,
}

/// The `event` of a pushed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventName {
    /// `notify`: a third of the lease is left, and no extend came.
    Expiring,
    /// `notify`: the grant ended, and not by its holder's `unlock`.
    Lost,
    /// Watch on a key: a grant was made.
    Granted,
    /// Watch on a key: a grant ended before its lease ran out (`unlock`,
    /// its ephemeral connection closed).
    Released,
    /// Watch on a key: a lease ran out; watch on a set: its time to live
    /// ran out.
    Expired,
    /// Watch on a set: `set_up` made it.
    Created,
    /// Watch on a set: `tear_down` removed it.
    TornDown,
}

/// Why a grant was `lost`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostReason {
    /// Its lease ran out.
    Expired,
    /// It ended some other way its holder did not ask for: an `unlock`
    /// with its token from another client id, or (ephemeral) its
    /// connection closed.
    Revoked,
}

impl Event {
    /// An event about the grant `token` of a `lock` with `notify`.
    pub fn about_grant(id: RequestId, event: EventName, token: u64) -> Event {
        Event {
            id,
            event,
            key: None,
            set: None,
            token: Some(token),
            remaining_ms: None,
            reason: None,
        }
    }

    /// An event of a watch on the lock `key`.
    pub fn about_key(id: RequestId, event: EventName, key: String, token: u64) -> Event {
        Event {
            key: Some(key),
            ..Event::about_grant(id, event, token)
        }
    }

    /// An event of a watch on the set `set`.
    pub fn about_set(id: RequestId, event: EventName, set: String) -> Event {
        Event {
            id,
            event,
            key: None,
            set: Some(set),
            token: None,
            remaining_ms: None,
            reason: None,
        }
    }

    /// Encodes the event as one JSON message.
    pub fn encode(&self) -> String {
        // Plain fields with string keys: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Whether a message from the server is a pushed event rather than a
/// reply: its second field is `event` (a reply's is `ok` or `err`).
pub fn is_event(message: &[u8]) -> bool {
    let Some(comma) = message.iter().position(|&b| b == b',') else {
        return false;
    };
    let rest = &message[comma + 1..];
    let rest = rest.trim_ascii_start();
    rest.starts_with(b"\"event\"")
}

/// Reads a pushed event.
pub fn decode_event(message: &[u8]) -> Result<Event, serde_json::Error> {
    serde_json::from_slice(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_told_from_replies_by_their_second_field() {
        let lost = Event {
            reason: Some(LostReason::Expired),
            ..Event::about_grant(7, EventName::Lost, 42)
        };
        let text = lost.encode();
        assert_eq!(
            text,
            r#"{"id":7,"event":"lost","token":42,"reason":"expired"}"#
        );
        assert!(is_event(text.as_bytes()));
        assert_eq!(decode_event(text.as_bytes()).ok(), Some(lost));
        assert!(!is_event(br#"{"id":7,"ok":{"event":"x"}}"#));
        assert!(!is_event(
            br#"{"id":null,"err":{"code":"bad_request","message":"x"}}"#
        ));
        let set = Event::about_set(3, EventName::TornDown, "s".into()).encode();
        assert_eq!(set, r#"{"id":3,"event":"torn_down","set":"s"}"#);
    }
}
