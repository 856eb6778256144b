//! `--memory-max`: one memory budget from which the defaults of the
//! connection limits are derived, so that the most every connection may
//! hold, times the connections allowed, fits the budget (issue 18: 10,000
//! connections of up to ~1 MiB of WebSocket buffers and up to 16 MiB of
//! QUIC receive window each added up past a small host).
//!
//! Half the budget is for connections, a quarter per transport; the other
//! half is left to locks and sets, which their own limits bound
//! (`--locks-max`, `--member-bytes-max`). The derived values are defaults:
//! a flag given explicitly wins.

use std::path::Path;

/// Most connections per transport, whatever the budget (the former fixed
/// default).
const CONNECTIONS_MAX: usize = 10_000;
/// Fewest connections per transport a budget may leave.
const CONNECTIONS_MIN: usize = 16;
/// Most bytes of replies one WebSocket connection may hold by default
/// (four `members` pages of the largest size).
const PENDING_REPLY_BYTES_CEILING: usize = 4 << 20;
/// Least reply budget a small host gets; the connection still writes one
/// reply at a time past it.
const PENDING_REPLY_BYTES_FLOOR: usize = 256 << 10;
/// Largest QUIC connection receive window (quinn's own default is
/// unbounded in effect for us: 16 MiB was the former fixed value).
const RECEIVE_WINDOW_CEILING: u64 = 16 << 20;

/// The connection limits a budget allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Derived {
    /// `--max-connections`.
    pub ws_max_connections: usize,
    /// `--pending-reply-bytes-max`.
    pub pending_reply_bytes_max: usize,
    /// `--quic-max-connections`.
    pub quic_max_connections: usize,
    /// `--quic-receive-window`.
    pub quic_receive_window: u32,
}

impl Derived {
    /// The limits for `memory_max` bytes, with messages of up to
    /// `message_bytes_max`. A WebSocket connection holds at most its reply
    /// budget, one reply past it and one request being read; a QUIC
    /// connection at most its receive window of unread requests.
    pub fn of(memory_max: u64, message_bytes_max: usize) -> Derived {
        let share = usize::try_from(memory_max / 4).unwrap_or(usize::MAX);
        let messages = message_bytes_max.saturating_mul(2);
        let pending_reply_bytes_max = (share / CONNECTIONS_MAX)
            .saturating_sub(messages)
            .clamp(PENDING_REPLY_BYTES_FLOOR, PENDING_REPLY_BYTES_CEILING);
        let per_ws = pending_reply_bytes_max + messages;
        let ws_max_connections = (share / per_ws).clamp(CONNECTIONS_MIN, CONNECTIONS_MAX);
        // A stream's window must take one whole message; the connection's
        // must take at least one stream's.
        let stream_window = stream_receive_window(message_bytes_max);
        let receive_window = (memory_max / 4 / CONNECTIONS_MAX as u64)
            .clamp(stream_window, RECEIVE_WINDOW_CEILING.max(stream_window));
        let quic_max_connections = usize::try_from(memory_max / 4 / receive_window)
            .unwrap_or(usize::MAX)
            .clamp(CONNECTIONS_MIN, CONNECTIONS_MAX);
        Derived {
            ws_max_connections,
            pending_reply_bytes_max,
            quic_max_connections,
            quic_receive_window: u32::try_from(receive_window).unwrap_or(u32::MAX),
        }
    }
}

/// A QUIC stream's receive window for messages of up to
/// `message_bytes_max`: one message and some room for framing.
pub fn stream_receive_window(message_bytes_max: usize) -> u64 {
    message_bytes_max as u64 + (64 << 10)
}

/// The host's memory, in bytes, and where that number comes from: the
/// smaller of the machine's (`/proc/meminfo`) and the cgroup's limit.
pub fn host_memory() -> Option<(u64, &'static str)> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|meminfo| mem_total(&meminfo));
    let cgroup = cgroup_limit(Path::new("/sys/fs/cgroup"));
    match (total, cgroup) {
        (Some(t), Some(c)) if c < t => Some((c, "the cgroup's memory limit")),
        (Some(t), _) => Some((t, "/proc/meminfo")),
        (None, Some(c)) => Some((c, "the cgroup's memory limit")),
        (None, None) => None,
    }
}

/// `MemTotal` of a `/proc/meminfo`, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let kb = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// The memory limit of this process's cgroup (v2 `memory.max`, or v1
/// `memory.limit_in_bytes`), if it has one.
fn cgroup_limit(root: &Path) -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(root.join(path)).ok();
    let limit = read("memory.max").or_else(|| read("memory/memory.limit_in_bytes"))?;
    // "max" (v2) or a huge number (v1) mean no limit.
    limit.trim().parse::<u64>().ok().filter(|&l| l < 1 << 60)
}

/// Parses a byte count: a number with an optional unit (`k`, `KiB`, `M`,
/// `MiB`, `G`, `GiB`: powers of 1024).
pub fn parse_bytes(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a byte count such as 512MiB or 2GiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown unit {other:?} in {value:?}")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{value:?} is too large"))
}

/// `bytes` for a person: in KiB, MiB or GiB.
pub fn human(bytes: u64) -> String {
    let (unit, name) = match bytes {
        b if b >= 1 << 30 => (1u64 << 30, "GiB"),
        b if b >= 1 << 20 => (1 << 20, "MiB"),
        _ => (1 << 10, "KiB"),
    };
    let value = bytes as f64 / unit as f64;
    if value.fract() == 0.0 {
        format!("{value:.0} {name}")
    } else {
        format!("{value:.1} {name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// The most all connections of both transports may hold.
    fn worst_case(d: Derived, message: usize) -> u64 {
        let ws = (d.pending_reply_bytes_max + 2 * message) as u64 * d.ws_max_connections as u64;
        let quic = u64::from(d.quic_receive_window) * d.quic_max_connections as u64;
        ws + quic
    }

    #[test]
    fn connections_times_what_each_may_hold_fit_half_the_budget() {
        for memory_max in [512 * MIB, 2 * GIB, 12 * GIB, 64 * GIB] {
            let d = Derived::of(memory_max, 1 << 20);
            assert!(
                worst_case(d, 1 << 20) <= memory_max / 2,
                "{memory_max}: {d:?}"
            );
        }
    }

    #[test]
    fn a_large_host_keeps_the_former_defaults() {
        let d = Derived::of(1 << 40, 1 << 20);
        assert_eq!(d.ws_max_connections, 10_000);
        assert_eq!(d.pending_reply_bytes_max, 4 << 20);
        assert_eq!(
            (d.quic_max_connections, d.quic_receive_window),
            (10_000, 16 << 20)
        );
    }

    #[test]
    fn a_small_budget_lowers_windows_before_connections() {
        let d = Derived::of(2 * GIB, 1 << 20);
        assert_eq!(d.pending_reply_bytes_max, 256 << 10);
        assert_eq!(
            u64::from(d.quic_receive_window),
            stream_receive_window(1 << 20)
        );
        assert!(d.ws_max_connections < 10_000 && d.ws_max_connections >= 16);
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(256 << 10), "256 KiB");
        assert_eq!(human((1 << 20) + (64 << 10)), "1.1 MiB");
        assert_eq!(human(12 * GIB), "12 GiB");
    }

    #[test]
    fn byte_counts_take_units() {
        assert_eq!(parse_bytes("512MiB"), Ok(512 * MIB));
        assert_eq!(parse_bytes("2G"), Ok(2 * GIB));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }

    #[test]
    fn the_cgroup_limit_counts_unless_it_is_none() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        assert_eq!(cgroup_limit(dir.path()), None);
        std::fs::write(dir.path().join("memory.max"), "max\n").expect("write");
        assert_eq!(cgroup_limit(dir.path()), None);
        std::fs::write(dir.path().join("memory.max"), "1073741824\n").expect("write");
        assert_eq!(cgroup_limit(dir.path()), Some(GIB));
        assert_eq!(
            mem_total("MemTotal:       24684000 kB\n"),
            Some(24_684_000 * 1024)
        );
    }
}
