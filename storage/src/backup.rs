//! Online backups ([`Store::backup`](crate::Store::backup)): a copy of the
//! data directory, made by the log writer between two groups, after a
//! sync. Nothing is appended, snapshotted or deleted while it copies, so
//! the copy is exactly what a crash at that moment would leave: every
//! acknowledged change, which recovery reads back as from any data
//! directory.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::disk::Disk;

/// What a backup copied.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Copied {
    /// Files copied.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// Makes a new directory under `root` for a backup, named after the time:
/// `backup-<seconds since 1970>`, with `-2`, `-3`... if that is taken.
pub(crate) fn new_dir(disk: &dyn Disk, root: &Path) -> io::Result<PathBuf> {
    disk.create_dir_all(root)?;
    let taken = disk.list(root)?;
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let base = format!("backup-{seconds}");
    let name = (1..)
        .map(|n| {
            if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            }
        })
        .find(|name| !taken.contains(name))
        .unwrap_or(base);
    let dir = root.join(name);
    disk.create_dir_all(&dir)?;
    Ok(dir)
}

/// Copies the files `names` of `from` into `to` (made if missing), each
/// synced, then `to` itself.
pub(crate) fn copy_files(
    disk: &dyn Disk,
    from: &Path,
    to: &Path,
    names: impl IntoIterator<Item = String>,
    copied: &mut Copied,
) -> io::Result<()> {
    disk.create_dir_all(to)?;
    for name in names {
        let bytes = disk.read(&from.join(&name))?;
        disk.write_synced(&to.join(&name), &bytes)?;
        copied.files += 1;
        copied.bytes += bytes.len() as u64;
    }
    disk.sync_dir(to)
}
