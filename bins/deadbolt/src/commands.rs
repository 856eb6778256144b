//! The client commands. Each returns the process's exit code.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::Context;
use deadbolt_core::client::{Error, LockGuard, LockOptions};
use deadbolt_core::proto::ErrorCode;
use futures_util::TryStreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Child;

use crate::cli::{
    DistinctArgs, KeyArgs, LockArgs, MembersArgs, ServerArgs, SetArgs, SetUpArgs, TryLockArgs,
    UnlockArgs, WatchArgs,
};
use crate::connect;
use crate::{EXIT_FAILED, EXIT_LOST, EXIT_NO};

/// How long a command gets to stop after SIGTERM before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Most lines sent in one `insert` by `distinct`.
const DISTINCT_BATCH: usize = 1000;
/// How long `distinct` waits for more input before sending what it has.
const DISTINCT_LINGER: Duration = Duration::from_millis(2);

/// `deadbolt lock KEY --ttl T [--wait W] [--ephemeral] -- CMD…`
pub async fn lock(server: &ServerArgs, args: LockArgs) -> anyhow::Result<u8> {
    let client = connect::client(server).await?;
    let options = LockOptions::new(args.ttl)
        .ephemeral(args.ephemeral)
        .auto_renew(true);
    let mut options = args.kind.apply(options);
    if let Some(wait) = args.wait {
        options = options.wait(wait);
    }
    let Some(guard) = client.lock_with(&args.key, options).await? else {
        eprintln!(
            "deadbolt: {} is held by someone else; not acquired",
            args.key
        );
        return Ok(EXIT_NO);
    };
    let mut command = tokio::process::Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("DEADBOLT_TOKEN", guard.token().to_string())
        .env("DEADBOLT_KEY", &args.key);
    // For the resource the command writes to, to check offline.
    if let Some(proof) = guard.proof() {
        command.env("DEADBOLT_PROOF", proof);
    }
    let spawned = command.spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => {
            // Give the lock back now: the process is about to exit, and a
            // dropped guard's background unlock would not outlive it.
            release(guard).await;
            return Err(error).with_context(|| format!("cannot run {:?}", args.command[0]));
        }
    };
    tokio::select! {
        status = child.wait() => {
            release(guard).await;
            Ok(exit_code(status.context("waiting for the command")?))
        }
        () = guard.lost() => {
            eprintln!(
                "deadbolt: lost the lock on {} (its lease could not be renewed); terminating the command",
                args.key
            );
            terminate(&mut child).await;
            Ok(EXIT_LOST)
        }
        () = interrupted() => {
            terminate(&mut child).await;
            release(guard).await;
            Ok(130)
        }
    }
}

async fn release(guard: LockGuard) {
    let key = guard.key().to_owned();
    match guard.unlock().await {
        Ok(()) => {}
        Err(e) if e.code() == Some(ErrorCode::NotHeld) => {
            eprintln!("deadbolt: the lease on {key} ran out before the command finished");
        }
        Err(e) => eprintln!("deadbolt: could not release {key}: {e}"),
    }
}

/// The exit code that reports `status` the way a shell would.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(EXIT_FAILED),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(EXIT_FAILED),
        (None, None) => EXIT_FAILED,
    }
}

/// SIGTERM, then SIGKILL if the command has not stopped within the grace.
async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        // It may have exited already.
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    if tokio::time::timeout(KILL_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

async fn interrupted() {
    let terminate = async {
        if let Ok(mut signal) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            signal.recv().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// A holder's token as `inspect` prints it: the server shows a token only
/// to its holder and to admins.
fn shown_token(token: u64) -> String {
    if token == deadbolt_core::proto::HIDDEN_TOKEN {
        "hidden".to_owned()
    } else {
        token.to_string()
    }
}

/// `deadbolt try-lock KEY --ttl T`: prints the token.
pub async fn try_lock(server: &ServerArgs, args: TryLockArgs) -> anyhow::Result<u8> {
    let client = connect::client(server).await?;
    let options = args
        .kind
        .apply(LockOptions::new(args.ttl).wait(Duration::ZERO));
    match client.lock_with(&args.key, options).await? {
        Some(guard) => {
            let proof = guard.proof().map(str::to_owned);
            // The lock stays held for its lease: that is the point.
            println!("{}", guard.detach());
            if args.proof {
                let proof = proof.context("the server does not sign grants (--sign-grants)")?;
                println!("{proof}");
            }
            Ok(0)
        }
        None => {
            eprintln!("deadbolt: {} is held by someone else", args.key);
            Ok(EXIT_NO)
        }
    }
}

/// `deadbolt unlock KEY TOKEN`.
pub async fn unlock(server: &ServerArgs, args: UnlockArgs) -> anyhow::Result<u8> {
    let client = connect::client(server).await?;
    match client.unlock(&args.key, args.token).await {
        Ok(()) => Ok(0),
        Err(e) => answer_no(
            e,
            &format!("{} is not held with token {}", args.key, args.token),
        ),
    }
}

/// An error that means "no" is reported and gives exit code 1; any other
/// is passed on.
fn answer_no(error: Error, what: &str) -> anyhow::Result<u8> {
    match error.code() {
        Some(ErrorCode::NotHeld | ErrorCode::NoSuchSet | ErrorCode::Busy | ErrorCode::Timeout) => {
            eprintln!("deadbolt: {what}");
            Ok(EXIT_NO)
        }
        _ => Err(error.into()),
    }
}

/// `deadbolt watch KEY` or `deadbolt watch --set NAME`: one JSON object a
/// line per event (its `event`, `key` or `set`, and `token`), flushed as
/// it comes. The watch lives on one connection: if that closes, it says
/// so and exits 1, since events may have been missed.
pub async fn watch(server: &ServerArgs, args: WatchArgs) -> anyhow::Result<u8> {
    let client = connect::client(server).await?;
    let mut watch = match (&args.key, &args.set) {
        (_, Some(set)) => client.watch_set(set).await?,
        (Some(key), None) => client.watch_key(key).await?,
        (None, None) => anyhow::bail!("give a KEY or --set NAME"),
    };
    let what = match (&args.key, &args.set) {
        (_, Some(set)) => format!("set {set}"),
        (key, None) => format!("key {}", key.as_deref().unwrap_or_default()),
    };
    // On stderr, so that stdout holds only events: a script (or a test)
    // may wait for this line before it makes changes to be seen.
    eprintln!("deadbolt: watching {what}");
    let mut stdout = tokio::io::stdout();
    while let Some(event) = watch.next().await {
        let mut line = serde_json::to_value(&event)?;
        if let Some(fields) = line.as_object_mut() {
            // The request id is the connection's business, not the reader's.
            fields.remove("id");
        }
        stdout.write_all(format!("{line}\n").as_bytes()).await?;
        stdout.flush().await?;
    }
    eprintln!("deadbolt: the connection closed; events may have been missed");
    Ok(EXIT_NO)
}

/// `deadbolt inspect KEY`.
pub async fn inspect(server: &ServerArgs, args: KeyArgs) -> anyhow::Result<u8> {
    let client = connect::client(server).await?;
    let info = client.inspect(&args.key).await?;
    match &info.holders[..] {
        [] => println!("{}: free, {} waiting", args.key, info.waiters),
        [h] if h.mode.is_exclusive() && info.limit == 1 => println!(
            "{}: held by {} with token {}, {} ms left, {} waiting",
            args.key,
            h.client,
            shown_token(h.token),
            h.remaining_ms,
            info.waiters
        ),
        holders => {
            let of = if info.limit > 1 {
                format!(" of {}", info.limit)
            } else {
                String::new()
            };
            println!(
                "{}: held by {}{of}, {} waiting",
                args.key,
                holders.len(),
                info.waiters
            );
            for h in holders {
                println!(
                    "  {} {} with token {}, {} ms left",
                    h.mode.as_str(),
                    h.client,
                    shown_token(h.token),
                    h.remaining_ms
                );
            }
        }
    }
    Ok(0)
}

/// `deadbolt distinct NAME [--ttl T]`: a distributed `uniq`.
pub async fn distinct(server: &ServerArgs, args: DistinctArgs) -> anyhow::Result<u8> {
    let client = connect::client(server).await?;
    let set = client.set(&args.name);
    set.set_up(args.ttl).await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    let mut printed = std::collections::HashSet::new();
    let mut done = false;
    while !done {
        let mut batch = Vec::new();
        done = read_batch(&mut lines, &mut batch).await?;
        if batch.is_empty() {
            continue;
        }
        let results = set.insert_many(batch.iter().cloned()).await?;
        let mut out = String::new();
        for (line, result) in batch.iter().zip(results) {
            // `first` holds for every insert of a key this client owns, so
            // a key repeated in our own input is printed once.
            if result.first && printed.insert(result.index) {
                out.push_str(line);
                out.push('\n');
            }
        }
        stdout.write_all(out.as_bytes()).await?;
        stdout.flush().await?;
    }
    Ok(0)
}

/// Reads up to a batch of non-empty lines, stopping early when input
/// pauses; returns whether stdin has ended.
async fn read_batch<R>(
    lines: &mut tokio::io::Lines<R>,
    batch: &mut Vec<String>,
) -> anyhow::Result<bool>
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    while batch.len() < DISTINCT_BATCH {
        let next = if batch.is_empty() {
            lines.next_line().await?
        } else {
            // `next_line` is cancel-safe: a line cut short by the timeout is
            // read in full next time.
            match tokio::time::timeout(DISTINCT_LINGER, lines.next_line()).await {
                Ok(line) => line?,
                Err(_) => return Ok(false),
            }
        };
        match next {
            None => return Ok(true),
            Some(line) if line.is_empty() => {}
            Some(line) => {
                anyhow::ensure!(
                    line.len() <= 1024,
                    "a line of {} bytes is longer than a key may be (1024)",
                    line.len()
                );
                batch.push(line);
            }
        }
    }
    Ok(false)
}

/// `deadbolt set-up NAME --ttl T`.
pub async fn set_up(server: &ServerArgs, args: SetUpArgs) -> anyhow::Result<u8> {
    let client = connect::client(server).await?;
    let reply = client.set(&args.name).set_up(args.ttl).await?;
    let state = if reply.created { "created" } else { "exists" };
    println!("{}: {state}, {} members", args.name, reply.size);
    Ok(0)
}

/// `deadbolt members NAME`.
pub async fn members(server: &ServerArgs, args: MembersArgs) -> anyhow::Result<u8> {
    let client = connect::client(server).await?;
    let mut members = std::pin::pin!(client.set(&args.name).members());
    let mut stdout = tokio::io::stdout();
    loop {
        let member = match members.try_next().await {
            Ok(Some(member)) => member,
            Ok(None) => break,
            Err(e) => return answer_no(e, &format!("no set named {}", args.name)),
        };
        let line = if args.index {
            format!("{}\t{}\n", member.index, member.key)
        } else {
            format!("{}\n", member.key)
        };
        stdout.write_all(line.as_bytes()).await?;
    }
    stdout.flush().await?;
    Ok(0)
}

/// `deadbolt tear-down NAME`.
pub async fn tear_down(server: &ServerArgs, args: SetArgs) -> anyhow::Result<u8> {
    let client = connect::client(server).await?;
    match client.set(&args.name).tear_down().await? {
        Some(size) => {
            println!("{}: removed, {size} members", args.name);
            Ok(0)
        }
        None => {
            eprintln!("deadbolt: no set named {}", args.name);
            Ok(EXIT_NO)
        }
    }
}
