//! The auth file of `deadbolt serve --auth FILE` (SPEC section 10): TOML,
//! one `[[principal]]` table per principal.
//!
//! ```toml
//! [[principal]]
//! name = "workers"
//! secret = "s3cr3t-workers"
//! locks = ["jobs/", "report"]   # key prefixes for lock, unlock, extend
//! sets = ["results/"]           # set-name prefixes for set_up, insert, tear_down
//! read = [""]                   # prefixes for inspect, members, inspect_set ("" = all)
//! admin = false                 # stats, dashboard, /metrics
//! # Optional quotas (these are the defaults):
//! locks_max = 10000             # locks held at once
//! waiters_max = 10000           # lock requests waiting at once
//! sets_max = 1000               # live sets it created
//! members_max = 10000000        # members it inserted first, in live sets
//! ```
//!
//! Every key but `name` and `secret` may be left out (no prefixes, not an
//! admin, the default quotas); an unknown key is refused with its name, so
//! that a misspelt grant is not silently no grant.

use std::path::{Path, PathBuf};

use deadbolt_core::auth::{Policy, PolicyError, Principal, Quotas};
use deadbolt_core::proto::Secret;
use serde::Deserialize;

/// Why an auth file could not be used. Never holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    /// The file could not be read.
    #[error("cannot read the auth file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("the auth file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, as the TOML reader says (with line and column).
        message: String,
    },
    /// The principals do not make a policy.
    #[error("the auth file {path}: {source}")]
    Policy {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: PolicyError,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    principal: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    secret: String,
    #[serde(default)]
    locks: Vec<String>,
    #[serde(default)]
    sets: Vec<String>,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    admin: bool,
    locks_max: Option<u64>,
    waiters_max: Option<u64>,
    sets_max: Option<u64>,
    members_max: Option<u64>,
}

impl Entry {
    fn into_principal(self) -> Principal {
        let defaults = Quotas::default();
        Principal {
            name: self.name,
            secret: Secret::new(self.secret),
            locks: self.locks,
            sets: self.sets,
            read: self.read,
            admin: self.admin,
            quotas: Quotas {
                locks_max: self.locks_max.unwrap_or(defaults.locks_max),
                waiters_max: self.waiters_max.unwrap_or(defaults.waiters_max),
                sets_max: self.sets_max.unwrap_or(defaults.sets_max),
                members_max: self.members_max.unwrap_or(defaults.members_max),
            },
        }
    }
}

/// Reads and checks the auth file at `path`.
pub fn load(path: &Path) -> Result<Policy, AuthFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|error| match error {
        Invalid::Toml(message) => AuthFileError::Parse {
            path: path.to_owned(),
            message,
        },
        Invalid::Policy(source) => AuthFileError::Policy {
            path: path.to_owned(),
            source,
        },
    })
}

/// Why a text is not an auth file.
#[derive(Debug)]
pub enum Invalid {
    /// Not TOML of the expected shape.
    Toml(String),
    /// Principals that do not make a policy.
    Policy(PolicyError),
}

/// Reads an auth file's text.
pub fn parse(text: &str) -> Result<Policy, Invalid> {
    // toml's full report quotes the offending line and serde's message
    // the offending value, either of which may be a secret: keep the
    // message (what was expected) with its quoted values blanked, and the
    // line number.
    let file: File = toml::from_str(text).map_err(|e| {
        let message = blank_quoted(e.message());
        let at = e
            .span()
            .map(|span| {
                let line = text[..span.start].matches('\n').count() + 1;
                format!("line {line}: ")
            })
            .unwrap_or_default();
        Invalid::Toml(format!("{at}{message}"))
    })?;
    let principals = file
        .principal
        .into_iter()
        .map(Entry::into_principal)
        .collect();
    Policy::new(principals).map_err(Invalid::Policy)
}

/// `text` with the contents of every double-quoted string replaced by
/// `…`: serde names field names in backticks, values in double quotes.
fn blank_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, part) in text.split('"').enumerate() {
        if i % 2 == 1 {
            out.push_str("\"…\"");
        } else {
            out.push_str(part);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use deadbolt_core::auth::Need;

    const EXAMPLE: &str = r#"
        [[principal]]
        name = "workers"
        secret = "s3cr3t-workers"
        locks = ["jobs/", "report"]
        sets = ["results/"]
        read = [""]
        admin = false

        [[principal]]
        name = "ops"
        secret = "s3cr3t-ops"
        admin = true
        sets_max = 5
    "#;

    #[test]
    fn the_spec_example_parses_with_defaults_for_what_is_left_out() {
        let policy = parse(EXAMPLE).expect("valid");
        let workers = policy.authenticate(&Secret::new("s3cr3t-workers")).unwrap();
        assert!(workers.allows(Need::Lock("jobs/7")));
        assert!(workers.allows(Need::Lock("report")));
        assert!(!workers.allows(Need::Set("jobs/7")));
        assert_eq!(workers.quotas, Quotas::default());
        let ops = policy.get("ops").unwrap();
        assert!(ops.admin);
        assert!(!ops.allows(Need::Lock("x")));
        assert_eq!(ops.quotas.sets_max, 5);
    }

    #[test]
    fn the_packaged_example_parses() {
        let text = include_str!("../../packaging/auth.toml");
        let policy = parse(text).expect("packaging/auth.toml is valid");
        assert_eq!(policy.names().collect::<Vec<_>>(), ["workers", "ops"]);
    }

    #[test]
    fn mistakes_are_refused_without_quoting_secrets() {
        let typo = "[[principal]]\nname = \"a\"\nsecret = \"hush-hush\"\nlock = [\"x\"]\n";
        let Err(Invalid::Toml(message)) = parse(typo) else {
            panic!("a misspelt key must be refused");
        };
        assert!(message.contains("lock"), "{message}");
        assert!(!message.contains("hush-hush"), "{message}");
        let bad_type =
            "[[principal]]\nname = \"a\"\nsecret = \"hush-hush\"\nadmin = \"hush-hush\"\n";
        let Err(Invalid::Toml(message)) = parse(bad_type) else {
            panic!("a mistyped key must be refused");
        };
        assert!(!message.contains("hush-hush"), "{message}");
        assert!(matches!(
            parse(""),
            Err(Invalid::Policy(PolicyError::Empty))
        ));
        let no_secret = "[[principal]]\nname = \"a\"\nsecret = \"\"\n";
        assert!(matches!(parse(no_secret), Err(Invalid::Policy(_))));
    }
}
