//! Time as the state machines see it.
//!
//! The shard never reads a clock: its caller passes `now` as a [`Tick`], a
//! count of microseconds since the engine started. Microseconds keep a lease
//! that is `ttl_ms` long exact to well under a millisecond, and a `u64` of
//! them lasts half a million years.

use std::time::Duration;

/// A point on the engine's monotonic clock, in microseconds since its epoch.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Tick(pub u64);

impl Tick {
    /// The engine's epoch.
    pub const ZERO: Tick = Tick(0);

    /// The tick `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: u64) -> Tick {
        Tick(ms.saturating_mul(1000))
    }

    /// The tick `d` after the epoch.
    pub fn from_duration(d: Duration) -> Tick {
        Tick(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    /// This tick plus `ms` milliseconds, saturating.
    pub const fn plus_millis(self, ms: u64) -> Tick {
        Tick(self.0.saturating_add(ms.saturating_mul(1000)))
    }

    /// Whole milliseconds from `self` until `later`, rounded down (0 if
    /// `later` has passed). Rounding down keeps a reported remaining lease
    /// from ever outlasting the real one.
    pub const fn millis_until(self, later: Tick) -> u64 {
        later.0.saturating_sub(self.0) / 1000
    }

    /// The duration from `self` until `later` (zero if `later` has passed).
    pub const fn until(self, later: Tick) -> Duration {
        Duration::from_micros(later.0.saturating_sub(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_until_rounds_down_and_saturates() {
        let t = Tick(1_500);
        assert_eq!(t.millis_until(Tick(3_499)), 1);
        assert_eq!(t.millis_until(Tick(3_500)), 2);
        assert_eq!(Tick(10).millis_until(Tick(5)), 0);
    }

    #[test]
    fn plus_millis_saturates() {
        assert_eq!(Tick(u64::MAX - 1).plus_millis(1), Tick(u64::MAX));
        assert_eq!(Tick::from_millis(2).plus_millis(3), Tick(5_000));
    }
}
