//! The `deadbolt` binary: the server (`deadbolt serve`) and the
//! command-line client (every other subcommand).
//!
//! Layout: `cli` (the command line), `serve` (the server: flags, sockets
//! and signals for `deadbolt_server::run`), `budget` (`--memory-max` and
//! the connection limits derived from it), `config` (`--config FILE` and
//! `--print-config`), `commands` (the client commands), `connect` (server
//! URLs → client, failing over between several), `backup` (`deadbolt
//! backup` and `restore`), `verify` (`deadbolt verify`: a grant's proof).
//!
//! Exit codes of the client commands: 0 done; 1 the answer was "no" (held,
//! timed out, not held, no such set); 3 the lock was lost while the command
//! ran; 4 any other failure, such as an unreachable server. `deadbolt lock`
//! otherwise exits with its command's status.

mod backup;
mod budget;
mod cli;
mod cluster;
mod commands;
mod config;
mod connect;
mod serve;
mod verify;

use std::process::ExitCode;

use clap::FromArgMatches;

use cli::{Cli, Command, LogFormat};

/// Exit code for "the answer was no".
const EXIT_NO: u8 = 1;
/// Exit code for "the lock was lost while the command ran".
const EXIT_LOST: u8 = 3;
/// Exit code for any other failure.
const EXIT_FAILED: u8 = 4;

fn main() -> ExitCode {
    let matches = cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    if let (Command::Serve(args), Some(serve)) =
        (&mut cli.command, matches.subcommand_matches("serve"))
    {
        let resolved = match config::resolve(&matches, serve) {
            Ok(resolved) => resolved,
            Err(error) => {
                eprintln!("deadbolt: {error:#}");
                return ExitCode::from(EXIT_FAILED);
            }
        };
        if resolved.args.print_config {
            print!("{}", resolved.to_toml());
            return ExitCode::SUCCESS;
        }
        **args = resolved.args;
    }
    let log_format = match &cli.command {
        Command::Serve(args) => Some(args.log_format),
        _ => None,
    };
    init_logging(log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("deadbolt: cannot start the runtime: {error}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let result = runtime.block_on(async {
        let server = &cli.server;
        match cli.command {
            Command::Serve(args) => serve::run(*args).await.map(|()| 0),
            Command::Lock(args) => commands::lock(server, args).await,
            Command::TryLock(args) => commands::try_lock(server, args).await,
            Command::Unlock(args) => commands::unlock(server, args).await,
            Command::Inspect(args) => commands::inspect(server, args).await,
            Command::Watch(args) => commands::watch(server, args).await,
            Command::Distinct(args) => commands::distinct(server, args).await,
            Command::SetUp(args) => commands::set_up(server, args).await,
            Command::Members(args) => commands::members(server, args).await,
            Command::TearDown(args) => commands::tear_down(server, args).await,
            Command::Cluster(args) => cluster::run(server, args).await,
            Command::Backup(args) if args.online => backup::online(server).await,
            Command::Backup(args) => backup::backup(&args).map(|()| 0),
            Command::Restore(args) => backup::restore(&args).map(|()| 0),
            Command::Verify(args) => verify::run(server, args).await,
        }
    });
    // Background tasks (a connection's, a renewal's) must not hold the exit.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("deadbolt: {error:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Logs go to stderr through tracing; `RUST_LOG` filters them (default:
/// `info` for the server, which says in what format, and `warn` for client
/// commands).
fn init_logging(server: Option<LogFormat>) {
    let default = if server.is_some() { "info" } else { "warn" };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| spec.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| default.parse().unwrap_or_default());
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let registry = tracing_subscriber::registry().with(filter);
    // A second initialisation cannot happen here; ignore it if it did.
    let _ = if server == Some(LogFormat::Json) {
        let json = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr);
        registry.with(json).try_init()
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let text = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi);
        registry.with(text).try_init()
    };
}
