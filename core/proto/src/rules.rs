//! Field rules: the words the op table in [`ops`](super::ops) uses for a
//! field's bounds. Each rule reads one field (or, for `key`/`keys`, a pair)
//! of a decoded request into the value an [`Op`](super::Op) holds, refusing
//! anything out of bounds with a `bad_request` that names the field, and
//! writes that value back for the encoder. Decoding and encoding of a field
//! live side by side here, so they cannot disagree.

use super::error::ServerError;
use super::request::{Keys, Mode, ModeName, Wait, Watched};

/// One wire field as the decoder hands it to a rule: its name (for error
/// messages) and its value, if the request carried it.
#[derive(Debug)]
pub(crate) struct Slot<T> {
    /// The field's name on the wire.
    pub name: &'static str,
    /// The field's value; `None` when absent or `null`.
    pub value: Option<T>,
}

/// How one field of an op is read from the wire and written back to it.
pub(crate) trait Rule {
    /// The field's value in the [`Op`](super::Op).
    type Value;
    /// What the rule reads: one [`Slot`], or a tuple of them.
    type Wire;
    /// What the rule writes: one optional wire value (`None`: leave the
    /// field out), or a tuple of them.
    type Out<'a>
    where
        Self::Value: 'a;

    /// Reads and checks the field.
    fn decode(self, wire: Self::Wire) -> Result<Self::Value, ServerError>;

    /// Writes the field back, as a client sends it.
    fn encode(value: &Self::Value) -> Self::Out<'_>;
}

/// A required string of 1..=`max` bytes of UTF-8: a key, a set name, a
/// client id.
pub(crate) struct Text(pub usize);

impl Rule for Text {
    type Value = String;
    type Wire = Slot<String>;
    type Out<'a> = Option<&'a str>;

    fn decode(self, slot: Slot<String>) -> Result<String, ServerError> {
        let name = slot.name;
        text_in_bounds(name, required(slot)?, self.0)
    }

    fn encode(value: &String) -> Option<&str> {
        Some(value)
    }
}

/// An optional secret of 1..=`max` bytes: the `auth` of `hello`.
pub(crate) struct OptSecret(pub usize);

impl Rule for OptSecret {
    type Value = Option<crate::Secret>;
    type Wire = Slot<String>;
    type Out<'a> = Option<&'a str>;

    fn decode(self, slot: Slot<String>) -> Result<Self::Value, ServerError> {
        let name = slot.name;
        let Some(text) = slot.value else {
            return Ok(None);
        };
        // Not `text_in_bounds`: its message would say nothing secret, but
        // keep the rule's errors free of the value in any case.
        if text.is_empty() || text.len() > self.0 {
            return Err(ServerError::bad_request(format!(
                "field `{name}` must be 1..={} bytes",
                self.0
            )));
        }
        Ok(Some(crate::Secret::new(text)))
    }

    fn encode(value: &Self::Value) -> Option<&str> {
        value.as_ref().map(crate::Secret::expose)
    }
}

/// A required unsigned 64-bit integer, any value: a token, a request id.
pub(crate) struct Integer;

impl Rule for Integer {
    type Value = u64;
    type Wire = Slot<u64>;
    type Out<'a> = Option<u64>;

    fn decode(self, slot: Slot<u64>) -> Result<u64, ServerError> {
        required(slot)
    }

    fn encode(value: &u64) -> Option<u64> {
        Some(*value)
    }
}

/// An optional unsigned 64-bit integer, the given default when absent
/// (always written).
pub(crate) struct IntegerOr(pub u64);

impl Rule for IntegerOr {
    type Value = u64;
    type Wire = Slot<u64>;
    type Out<'a> = Option<u64>;

    fn decode(self, slot: Slot<u64>) -> Result<u64, ServerError> {
        Ok(slot.value.unwrap_or(self.0))
    }

    fn encode(value: &u64) -> Option<u64> {
        Some(*value)
    }
}

/// A required unsigned integer in `min..=max`: a lease, a time to live.
pub(crate) struct InRange(pub u64, pub u64);

impl Rule for InRange {
    type Value = u64;
    type Wire = Slot<u64>;
    type Out<'a> = Option<u64>;

    fn decode(self, slot: Slot<u64>) -> Result<u64, ServerError> {
        let name = slot.name;
        in_range(name, required(slot)?, self.0, self.1)
    }

    fn encode(value: &u64) -> Option<u64> {
        Some(*value)
    }
}

/// `wait_ms`: optional, in `0..=max`; absent means wait as long as it takes
/// (see [`Wait`]).
pub(crate) struct WaitMs(pub u64);

impl Rule for WaitMs {
    type Value = Wait;
    type Wire = Slot<u64>;
    type Out<'a> = Option<u64>;

    fn decode(self, slot: Slot<u64>) -> Result<Wait, ServerError> {
        let name = slot.name;
        let wait_ms = slot
            .value
            .map(|wait| in_range(name, wait, 0, self.0))
            .transpose()?;
        Ok(Wait::from_wait_ms(wait_ms))
    }

    fn encode(value: &Wait) -> Option<u64> {
        value.to_wait_ms()
    }
}

/// An optional boolean, false when absent (and written only when true).
pub(crate) struct Flag;

impl Rule for Flag {
    type Value = bool;
    type Wire = Slot<bool>;
    type Out<'a> = Option<bool>;

    fn decode(self, slot: Slot<bool>) -> Result<bool, ServerError> {
        Ok(slot.value.unwrap_or(false))
    }

    fn encode(value: &bool) -> Option<bool> {
        value.then_some(true)
    }
}

/// An optional count in `1..=max`: `default` when absent (or `max`, if
/// that is lower).
pub(crate) struct Count {
    /// The count when the field is absent.
    pub default: u32,
    /// The largest count allowed.
    pub max: u32,
}

impl Rule for Count {
    type Value = u32;
    type Wire = Slot<u64>;
    type Out<'a> = Option<u64>;

    fn decode(self, slot: Slot<u64>) -> Result<u32, ServerError> {
        let max = u64::from(self.max);
        let value = slot.value.unwrap_or(u64::from(self.default).min(max));
        let value = in_range(slot.name, value, 1, max)?;
        // In range of a u32 because the maximum is one.
        Ok(u32::try_from(value).unwrap_or(u32::MAX))
    }

    fn encode(value: &u32) -> Option<u64> {
        Some(u64::from(*value))
    }
}

/// An optional unsigned integer in `0..=max`, 0 when absent (and written
/// only when not 0): `lock_delay_ms`.
pub(crate) struct OptionalUpTo(pub u64);

impl Rule for OptionalUpTo {
    type Value = u64;
    type Wire = Slot<u64>;
    type Out<'a> = Option<u64>;

    fn decode(self, slot: Slot<u64>) -> Result<u64, ServerError> {
        let name = slot.name;
        in_range(name, slot.value.unwrap_or(0), 0, self.0)
    }

    fn encode(value: &u64) -> Option<u64> {
        (*value != 0).then_some(*value)
    }
}

/// The pair `mode` (default `"exclusive"`) and `limit` (1..=`max`,
/// default 1) of a `lock`, as one [`Mode`]; each written only when not
/// its default. A shared lock admits any number of holders already, so
/// `limit` is refused beside `"mode":"shared"` (but for 1).
pub(crate) struct ModeAndLimit(pub u32);

impl Rule for ModeAndLimit {
    type Value = Mode;
    type Wire = (Slot<ModeName>, Slot<u64>);
    type Out<'a> = (Option<ModeName>, Option<u64>);

    fn decode(self, (mode, limit): Self::Wire) -> Result<Mode, ServerError> {
        let count = limit.value.unwrap_or(1);
        let count = in_range(limit.name, count, 1, u64::from(self.0))?;
        // In range of a u32 because the maximum is one.
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        match mode.value.unwrap_or_default() {
            ModeName::Exclusive => Ok(Mode::Exclusive { limit: count }),
            ModeName::Shared if count == 1 => Ok(Mode::Shared),
            ModeName::Shared => Err(ServerError::bad_request(format!(
                "field `{}` is for exclusive locks (a counting semaphore): a `{}` of \"shared\" \
                 admits any number of holders",
                limit.name, mode.name
            ))),
        }
    }

    fn encode(value: &Mode) -> Self::Out<'_> {
        match *value {
            Mode::Exclusive { limit: 1 } => (None, None),
            Mode::Exclusive { limit } => (None, Some(u64::from(limit))),
            Mode::Shared => (Some(ModeName::Shared), None),
        }
    }
}

/// Exactly one of a pair of fields: one string (`key`) or a batch of them
/// (`keys`), each of 1..=`bytes_max` bytes, at most `batch_max` in a batch
/// (more is `too_large`).
pub(crate) struct OneOrMany {
    /// The most bytes of one string.
    pub bytes_max: usize,
    /// The most strings in a batch.
    pub batch_max: usize,
}

impl Rule for OneOrMany {
    type Value = Keys;
    type Wire = (Slot<String>, Slot<Vec<String>>);
    type Out<'a> = (Option<&'a str>, Option<&'a [String]>);

    fn decode(self, (one, many): Self::Wire) -> Result<Keys, ServerError> {
        match (one.value, many.value) {
            (Some(key), None) => Ok(Keys::One(text_in_bounds(one.name, key, self.bytes_max)?)),
            (None, Some(keys)) => {
                if keys.len() > self.batch_max {
                    return Err(ServerError::too_large(format!(
                        "a batch of {} keys is over the limit of {}",
                        keys.len(),
                        self.batch_max
                    )));
                }
                if keys
                    .iter()
                    .any(|k| k.is_empty() || k.len() > self.bytes_max)
                {
                    return Err(ServerError::bad_request(format!(
                        "every entry of `{}` must be 1..={} bytes",
                        many.name, self.bytes_max
                    )));
                }
                Ok(Keys::Many(keys))
            }
            (Some(_), Some(_)) => Err(ServerError::bad_request(format!(
                "give either `{}` or `{}`, not both",
                one.name, many.name
            ))),
            (None, None) => Err(ServerError::bad_request(format!(
                "missing field `{}` or `{}`",
                one.name, many.name
            ))),
        }
    }

    fn encode(value: &Keys) -> Self::Out<'_> {
        match value {
            Keys::One(key) => (Some(key), None),
            Keys::Many(keys) => (None, Some(keys)),
        }
    }
}

/// Exactly one of `key` (a lock key) and `set` (a set name), each of
/// 1..=`max` bytes: what a `watch` watches.
pub(crate) struct KeyOrSet(pub usize);

impl Rule for KeyOrSet {
    type Value = Watched;
    type Wire = (Slot<String>, Slot<String>);
    type Out<'a> = (Option<&'a str>, Option<&'a str>);

    fn decode(self, (key, set): Self::Wire) -> Result<Watched, ServerError> {
        match (key.value, set.value) {
            (Some(name), None) => Ok(Watched::Key(text_in_bounds(key.name, name, self.0)?)),
            (None, Some(name)) => Ok(Watched::Set(text_in_bounds(set.name, name, self.0)?)),
            (Some(_), Some(_)) => Err(ServerError::bad_request(format!(
                "give either `{}` or `{}`, not both",
                key.name, set.name
            ))),
            (None, None) => Err(ServerError::bad_request(format!(
                "missing field `{}` or `{}`",
                key.name, set.name
            ))),
        }
    }

    fn encode(value: &Watched) -> Self::Out<'_> {
        match value {
            Watched::Key(key) => (Some(key), None),
            Watched::Set(set) => (None, Some(set)),
        }
    }
}

fn required<T>(slot: Slot<T>) -> Result<T, ServerError> {
    let name = slot.name;
    slot.value
        .ok_or_else(|| ServerError::bad_request(format!("missing field `{name}`")))
}

fn text_in_bounds(name: &str, value: String, max: usize) -> Result<String, ServerError> {
    if value.is_empty() || value.len() > max {
        return Err(ServerError::bad_request(format!(
            "field `{name}` must be 1..={max} bytes, got {}",
            value.len()
        )));
    }
    Ok(value)
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
