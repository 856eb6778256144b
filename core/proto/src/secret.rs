//! A shared secret (the `auth` of `hello`, SPEC section 10): kept out of
//! every log and debug print, and compared in constant time.

use std::fmt;

/// A principal's secret. Its `Debug` says `Secret(<redacted>)`, so that a
/// request, a config or an error that holds one never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `text`.
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    /// The secret's text, to send it or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `other` is this secret, in time that depends only on the
    /// lengths (not on where the two first differ), so that timing a
    /// wrong guess says nothing about the right one.
    pub fn matches(&self, other: &Secret) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.0.as_bytes().ct_eq(other.0.as_bytes()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn debug_redacts_and_matches_compares() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        assert!(secret.matches(&Secret::new("hunter2")));
        assert!(!secret.matches(&Secret::new("hunter3")));
        assert!(!secret.matches(&Secret::new("hunter")));
    }
}
