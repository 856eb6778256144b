//! Server processes under test: starting them pinned to their own core,
//! waiting until they listen, stopping them by a signal, and reading their
//! CPU time and memory from `/proc` and their files' size.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, Command};

/// The core the servers run on; the harness takes the other(s).
pub const SERVER_CORE: usize = 1;

/// Pins this process (the harness) away from the servers' core, where the
/// machine has more than one.
pub fn pin_harness() -> Option<usize> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        return None;
    }
    let mut set = nix::sched::CpuSet::new();
    for core in (0..cores).filter(|&c| c != SERVER_CORE) {
        set.set(core).ok()?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).ok()?;
    Some(cores - 1)
}

/// A server process, killed when dropped.
pub struct Server {
    child: Child,
    /// Its process id.
    pub pid: u32,
    /// Its scratch directory, removed when dropped.
    pub dir: PathBuf,
    /// Whether it has exited and been reaped: its pid may then belong to
    /// someone else, so drop must not signal it.
    exited: bool,
}

impl Server {
    /// Starts `program args` pinned to [`SERVER_CORE`] (as `user`, if
    /// given) with stderr piped, in a fresh scratch directory.
    pub fn start(
        name: &str,
        program: &str,
        args: &[String],
        user: Option<&str>,
    ) -> anyhow::Result<Server> {
        let dir = scratch(name)?;
        let mut command = Command::new("taskset");
        command.arg("-c").arg(SERVER_CORE.to_string());
        if let Some(user) = user {
            command.args(["runuser", "-u", user, "--"]);
        }
        command
            .arg(program)
            .args(args)
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let pid = child.id().context("server pid")?;
        Ok(Server {
            child,
            pid,
            dir,
            exited: false,
        })
    }

    /// Sends the server `signal` and waits for it to exit, at most
    /// `within`: how long it took. `taskset` execs the server, so the
    /// signal reaches it (not a wrapper) where no `user` was given.
    pub async fn stop(mut self, signal: Signal, within: Duration) -> anyhow::Result<Duration> {
        let sent = tokio::time::Instant::now();
        nix::sys::signal::kill(Pid::from_raw(self.pid as i32), signal)
            .with_context(|| format!("sending {signal} to {}", self.pid))?;
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .with_context(|| format!("the server did not exit within {within:?} of {signal}"))??;
        self.exited = true;
        let took = sent.elapsed();
        // SIGTERM asks for a clean stop; a kill ends it whatever it says.
        if signal == Signal::SIGTERM {
            anyhow::ensure!(
                status.success(),
                "the server exited with {status} on {signal}"
            );
        }
        Ok(took)
    }

    /// The server's stderr, to read its readiness line.
    pub fn stderr(&mut self) -> Option<tokio::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// CPU time (user + system) of the server and its children.
    pub fn cpu(&self) -> Duration {
        tree_cpu(self.pid)
    }

    /// Resident memory of the server (not its children), in bytes.
    pub fn rss(&self) -> u64 {
        rss(self.pid)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // kill_on_drop takes the process; children of a wrapper go with
        // its process group on SIGKILL of the leader only if they share it,
        // so kill the whole tree explicitly.
        if !self.exited {
            for pid in tree(self.pid) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh scratch directory anyone can write (postgres runs as its own user).
pub fn scratch(name: &str) -> anyhow::Result<PathBuf> {
    scratch_in(&std::env::temp_dir(), name)
}

/// A fresh scratch directory under `root` (the temporary directory, or a
/// tmpfs for data that must not reach a disk).
fn scratch_in(root: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let dir = root.join(format!("deadbolt-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
    Ok(dir)
}

/// The sum of the sizes of the files under `dir` (what `du
/// --apparent-size --bytes` counts, without the directories themselves).
pub fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            bytes += dir_bytes(&entry.path())?;
        } else if kind.is_file() {
            bytes += entry.metadata()?.len();
        }
    }
    Ok(bytes)
}

/// A scratch directory (see [`scratch`]), removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    /// A fresh scratch directory for `name`.
    pub fn new(name: &str) -> anyhow::Result<Scratch> {
        Ok(Scratch(scratch(name)?))
    }

    /// A fresh scratch directory for `name` in memory, on [`TMPFS`]: a
    /// server's fsyncs there cost nothing.
    pub fn in_memory(name: &str) -> anyhow::Result<Scratch> {
        anyhow::ensure!(
            Path::new(TMPFS).is_dir(),
            "no {TMPFS} on this machine for data kept in memory"
        );
        Ok(Scratch(scratch_in(Path::new(TMPFS), name)?))
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where data that must stay in memory goes: a tmpfs on Linux.
pub const TMPFS: &str = "/dev/shm";

/// The last lines a server wrote to stderr, read as it writes them (so that
/// it never blocks on a full pipe), to say why it failed.
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    /// Lines kept.
    const LINES: usize = 20;

    /// Reads `stderr` to its end in the background.
    pub fn follow(stderr: tokio::process::ChildStderr) -> Tail {
        Tail::follow_lines(BufReader::new(stderr).lines())
    }

    /// Reads the rest of `lines` (a stderr partly read already) in the
    /// background.
    pub fn follow_lines(mut lines: Lines<BufReader<tokio::process::ChildStderr>>) -> Tail {
        let tail = Tail::default();
        let kept = tail.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut kept = kept.0.lock().unwrap_or_else(|p| p.into_inner());
                if kept.len() == Tail::LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        tail
    }

    /// The lines kept, joined.
    pub fn text(&self) -> String {
        let kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        kept.iter().cloned().collect::<Vec<_>>().join(" / ")
    }
}

/// A free TCP port on loopback (bound and released; good enough here).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until something accepts TCP connections on `port`.
pub async fn wait_for_port(port: u16, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("nothing listened on port {port} within {within:?}")
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields start after its ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// The process and all its descendants.
fn tree(root: u32) -> Vec<u32> {
    let mut all = vec![root];
    let mut i = 0;
    let processes: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|pid| Some((pid, stat_fields(pid)?.get(1)?.parse::<u32>().ok()?)))
                .collect()
        })
        .unwrap_or_default();
    while i < all.len() {
        let parent = all[i];
        all.extend(
            processes
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    all
}

/// User + system CPU time of a process tree.
fn tree_cpu(root: u32) -> Duration {
    tree(root).into_iter().map(process_cpu).sum()
}

/// User + system CPU time of one process (all its threads).
fn process_cpu(pid: u32) -> Duration {
    let ticks_per_second = 100.0; // USER_HZ on Linux
    // utime and stime are fields 14 and 15 of /proc/pid/stat.
    let ticks = stat_fields(pid)
        .and_then(|fields| {
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / ticks_per_second)
}

/// CPU time this process (the harness) has used, without its children
/// (the servers).
pub fn own_cpu() -> Duration {
    process_cpu(std::process::id())
}

/// Resident set size of one process, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|kb| kb.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Whether `program` is on this machine.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| Path::new(&dir).join(program).exists())
    })
}
