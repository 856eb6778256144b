//! `deadbolt backup` and `deadbolt restore`: a copy of a data directory,
//! offline, or online by the running server (`--online`).
//!
//! A data directory is its write-ahead log (`wal/`), each shard's latest
//! snapshot (`snapshots/`), the QUIC certificate, and a cluster node's
//! `raft/`; everything a restart recovers from. Copied while no server
//! runs on it (the copy holds the directory's lock, so none can start
//! meanwhile), it is exactly the state that server acknowledged, and a
//! server started on the copy recovers it as it would have.

use std::fs;
use std::path::Path;

use anyhow::{Context, bail};

use crate::cli::{BackupArgs, RestoreArgs, ServerArgs};
use crate::cluster::http;
use crate::serve::lock_data_dir;

/// The lock file, which belongs to the directory's server, not its data.
const LOCK_FILE: &str = "LOCK";

/// `deadbolt backup --online`: `POST /backup` to the first server of
/// `--server` that answers, which copies its data directory under its
/// `--backup-dir` (see `deadbolt_storage::Store::backup`).
pub async fn online(server: &ServerArgs) -> anyhow::Result<u8> {
    let mut failures = Vec::new();
    for url in server.server.split(',').map(str::trim) {
        match http(url, "POST", "/backup", server).await {
            Ok(answer) => {
                println!("{}", answer.trim_end());
                return Ok(0);
            }
            Err(error) => failures.push(format!("{url}: {error:#}")),
        }
    }
    bail!("no backup made: {}", failures.join("; "))
}

/// `deadbolt backup --data-dir DIR BACKUP`.
pub fn backup(args: &BackupArgs) -> anyhow::Result<()> {
    let Some(target) = &args.backup else {
        bail!("give the directory to copy to (or --online)");
    };
    if !args.data_dir.join("wal").is_dir() && !args.data_dir.join("raft").is_dir() {
        bail!(
            "{} is not a deadbolt data directory (no wal/ or raft/ in it)",
            args.data_dir.display()
        );
    }
    let _held = lock_data_dir(&args.data_dir)?;
    make_new_dir(target)?;
    let copied = copy_tree(&args.data_dir, target)?;
    println!(
        "copied {copied} files of {} to {}",
        args.data_dir.display(),
        target.display()
    );
    Ok(())
}

/// `deadbolt restore BACKUP --data-dir DIR`.
pub fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    if !args.backup.join("wal").is_dir() && !args.backup.join("raft").is_dir() {
        bail!(
            "{} is not a copy made by `deadbolt backup` (no wal/ or raft/ in it)",
            args.backup.display()
        );
    }
    let held = lock_data_dir(&args.data_dir)?;
    let only_the_lock = fs::read_dir(&args.data_dir)?
        .filter_map(Result::ok)
        .all(|entry| entry.file_name() == LOCK_FILE);
    if !only_the_lock {
        bail!(
            "{} is not empty: restore into a new data directory, so that nothing is mixed \
             with or lost from what is there",
            args.data_dir.display()
        );
    }
    let copied = copy_tree(&args.backup, &args.data_dir)?;
    drop(held);
    println!(
        "restored {copied} files from {} into {}; start the server with --data-dir {}",
        args.backup.display(),
        args.data_dir.display(),
        args.data_dir.display()
    );
    Ok(())
}

fn make_new_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        bail!(
            "{} exists: give a new directory for the copy",
            dir.display()
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Copies every file under `from` (but the lock file and unfinished
/// `.tmp` files) to `to`, syncing each file and directory; returns how
/// many files it copied.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<usize> {
    let mut copied = 0;
    for entry in fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let (source, target) = (entry.path(), to.join(&name));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            fs::create_dir_all(&target)
                .with_context(|| format!("cannot create {}", target.display()))?;
            copied += copy_tree(&source, &target)?;
        } else if kind.is_file() && name != LOCK_FILE && !name.to_string_lossy().ends_with(".tmp") {
            fs::copy(&source, &target).with_context(|| {
                format!("cannot copy {} to {}", source.display(), target.display())
            })?;
            fs::File::open(&target)?.sync_all()?;
            copied += 1;
        }
    }
    fs::File::open(to)?.sync_all()?;
    Ok(copied)
}
