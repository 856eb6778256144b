//! `deadbolt serve --config FILE` and `--print-config`.
//!
//! The serve flags are declared once, in [`ServeArgs`]; the file's keys
//! are those flags without their dashes (`data-dir`, or `data_dir`). The
//! file is read as flags placed before the command line's, so clap checks
//! every value the same way and a flag given on the command line overrides
//! the file's key (`args_override_self`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, FromArgMatches};

use crate::cli::{CLIENT_FLAGS, ServeArgs, serve_command};

/// Serve flags that are not settings, so not keys of the file.
const NOT_SETTINGS: [&str; 4] = ["config", "print_config", "help", "version"];

/// The serve settings: the command line's flags over the config file's
/// keys over the defaults.
pub struct Resolved {
    /// The settings, parsed.
    pub args: ServeArgs,
    /// The same, as clap matched them (for `--print-config`).
    matches: ArgMatches,
}

/// Resolves `deadbolt serve`'s settings from its matches on the command
/// line (`cli`, the `serve` subcommand's) and the file `--config` names.
/// `top` are the whole command line's matches, to refuse client flags.
pub fn resolve(top: &ArgMatches, cli: &ArgMatches) -> anyhow::Result<Resolved> {
    refuse_client_flags(top)?;
    refuse_client_flags(cli)?;
    let command = serve_command();
    let config: Option<PathBuf> = cli.get_one::<PathBuf>("config").cloned();
    let mut argv: Vec<OsString> = vec!["deadbolt serve".into()];
    if let Some(path) = &config {
        argv.extend(file_flags(&command, path)?);
    }
    argv.extend(command_line_flags(&command, cli));
    let matches = command.try_get_matches_from(&argv).map_err(|error| {
        let from = match &config {
            Some(path) => format!(" (with the settings of {})", path.display()),
            None => String::new(),
        };
        // clap's first paragraph says what is wrong; its usage line would
        // list every flag the file set.
        let rendered = error.render().to_string();
        let what = rendered.split("\n\n").next().unwrap_or_default().trim();
        let what = what.strip_prefix("error: ").unwrap_or(what);
        anyhow::anyhow!("deadbolt serve{from}: {what}")
    })?;
    let args = ServeArgs::from_arg_matches(&matches)?;
    Ok(Resolved { args, matches })
}

/// A client flag given to `deadbolt serve` is a mistake: say so rather
/// than ignore it.
fn refuse_client_flags(top: &ArgMatches) -> anyhow::Result<()> {
    for id in CLIENT_FLAGS {
        if top.value_source(id) == Some(ValueSource::CommandLine) {
            bail!(
                "--{} is a flag of the client commands, not of `deadbolt serve` \
                 (which listens on --ws and --quic)",
                id.replace('_', "-")
            );
        }
    }
    Ok(())
}

/// The serve flags that are settings, in the order `--help` lists them.
fn settings(command: &clap::Command) -> impl Iterator<Item = &Arg> {
    command
        .get_arguments()
        .filter(|arg| !NOT_SETTINGS.contains(&arg.get_id().as_str()))
        .filter(|arg| arg.get_long().is_some())
}

fn is_switch(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue)
}

/// The flags given on the command line, again as flags.
fn command_line_flags(command: &clap::Command, cli: &ArgMatches) -> Vec<OsString> {
    let mut flags = Vec::new();
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if cli.value_source(id) != Some(ValueSource::CommandLine) {
            continue;
        }
        let Some(long) = arg.get_long() else { continue };
        if is_switch(arg) {
            flags.push(format!("--{long}").into());
            continue;
        }
        for value in cli.get_raw(id).into_iter().flatten() {
            let mut flag = OsString::from(format!("--{long}="));
            flag.push(value);
            flags.push(flag);
        }
    }
    flags
}

/// The settings of the TOML file `path`, as flags.
fn file_flags(command: &clap::Command, path: &Path) -> anyhow::Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
    let mut flags = Vec::new();
    let mut seen = std::collections::BTreeMap::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        if let Some(earlier) = seen.insert(long.clone(), key) {
            bail!("{}: `{earlier}` and `{key}` are one key", path.display());
        }
        let Some(arg) = settings(command).find(|arg| arg.get_long() == Some(long.as_str())) else {
            bail!(
                "{}: unknown key `{key}` (the keys are the flags of `deadbolt serve --help`, \
                 without their dashes)",
                path.display()
            );
        };
        let value = match (value, is_switch(arg)) {
            (toml::Value::Boolean(true), true) => {
                flags.push(format!("--{long}").into());
                continue;
            }
            (toml::Value::Boolean(false), true) => continue,
            (_, true) => bail!("{}: `{key}` is true or false", path.display()),
            (toml::Value::String(text), false) => text.clone(),
            (toml::Value::Integer(number), false) => number.to_string(),
            (_, false) => bail!(
                "{}: `{key}` takes a string or an integer, as its flag does",
                path.display()
            ),
        };
        flags.push(format!("--{long}={value}").into());
    }
    Ok(flags)
}

impl Resolved {
    /// The effective settings as TOML that `--config` reads back, each
    /// key under its flag's help.
    pub fn to_toml(&self) -> String {
        let command = serve_command();
        let mut out = format!(
            "# deadbolt serve {}: the effective configuration\n",
            env!("CARGO_PKG_VERSION")
        );
        for arg in settings(&command) {
            let id = arg.get_id().as_str();
            let long = arg.get_long().unwrap_or(id);
            out.push('\n');
            if let Some(help) = arg.get_help() {
                for line in help.to_string().lines() {
                    out.push_str(&format!("# {line}\n"));
                }
            }
            if is_switch(arg) {
                out.push_str(&format!("{long} = {}\n", self.matches.get_flag(id)));
                continue;
            }
            if let Some(set) = self.overridden_default(&command, arg) {
                out.push_str(&format!("# {long}: not used with {set}\n"));
                continue;
            }
            // A flag given several values (`allow-origin`) is one
            // comma-separated string, as the flag takes it.
            let values: Vec<String> = self
                .matches
                .get_raw(id)
                .into_iter()
                .flatten()
                .map(|raw| raw.to_string_lossy().into_owned())
                .collect();
            if values.is_empty() {
                out.push_str(&format!("# {long} = (not set)\n"));
            } else {
                let raw = values.join(",");
                out.push_str(&format!("{long} = {}\n", toml_value(arg, &raw)));
            }
        }
        out
    }
}

impl Resolved {
    /// For a setting left at its default that conflicts with one that was
    /// set (`fsync` with `in-memory`), the key that was set: printing the
    /// default would make a file that is refused.
    fn overridden_default(&self, command: &clap::Command, arg: &Arg) -> Option<String> {
        let id = arg.get_id().as_str();
        if self.matches.value_source(id) != Some(ValueSource::DefaultValue) {
            return None;
        }
        command
            .get_arg_conflicts_with(arg)
            .into_iter()
            .find(|other| {
                let other = other.get_id().as_str();
                matches!(
                    self.matches.value_source(other),
                    Some(ValueSource::CommandLine)
                ) && (!is_switch_id(command, other) || self.matches.get_flag(other))
            })
            .map(|other| {
                other
                    .get_long()
                    .unwrap_or(other.get_id().as_str())
                    .to_owned()
            })
    }
}

fn is_switch_id(command: &clap::Command, id: &str) -> bool {
    command
        .get_arguments()
        .any(|arg| arg.get_id() == id && is_switch(arg))
}

/// A flag's value as a TOML value: an integer if it is one (and the flag
/// is not a path), else a string.
fn toml_value(arg: &Arg, raw: &str) -> toml::Value {
    let is_path = arg.get_value_parser().type_id() == clap::value_parser!(PathBuf).type_id();
    match raw.parse::<i64>() {
        Ok(number) if !is_path => toml::Value::Integer(number),
        _ => toml::Value::String(raw.to_owned()),
    }
}
