//! The command line, as clap reads it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use deadbolt_core::client::LockOptions;
use deadbolt_storage::Fsync;

/// deadbolt: leased locks and distinct sets for fleets of unreliable workers.
#[derive(Debug, Parser)]
#[command(name = "deadbolt", version, about)]
pub struct Cli {
    /// How client commands reach the server.
    #[command(flatten)]
    pub server: ServerArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the server is and who we are, for the client commands. These
/// flags go before or after the subcommand.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The server: ws://HOST:PORT/ws or quic://HOST:PORT. Several nodes of
    /// a cluster, comma-separated (ws://a:7420/ws,ws://b:7420/ws, or mixed
    /// with quic:// URLs): the client uses one, and moves on to the next
    /// when one cannot be reached or answers `unavailable`.
    #[arg(
        long,
        env = "DEADBOLT_SERVER",
        value_name = "URL[,URL...]",
        default_value = "ws://127.0.0.1:7420/ws",
        global = true
    )]
    pub server: String,
    /// The client id (default: a random one per run). Give the same id to a
    /// rerun of a job so that it keeps the locks and the `first` of its
    /// earlier run.
    #[arg(long, env = "DEADBOLT_CLIENT_ID", global = true)]
    pub client_id: Option<String>,
    /// The certificate (or CA) to trust for quic:// servers. Default: the
    /// certificate `deadbolt serve` generated in ./deadbolt-data, if there.
    #[arg(long, env = "DEADBOLT_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Trust any quic:// or wss:// server without checking its
    /// certificate. For development only: anyone on the path can pose as
    /// the server.
    #[arg(long, global = true)]
    pub insecure: bool,
    /// A file holding this client's secret (its first line), for a server
    /// started with --auth. The environment variable DEADBOLT_AUTH may
    /// hold the secret itself instead.
    #[arg(long, value_name = "FILE", global = true)]
    pub auth_file: Option<PathBuf>,
    /// How long to keep retrying a request while no server works: its
    /// connection broke, no server could be reached, or the server answered
    /// `unavailable` (the client id stays the same, so a retry is safe).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub retry_for: Duration,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Run a command while holding a lock, renewing it, and release it
    /// after; exits with the command's status.
    Lock(LockArgs),
    /// Take a lock if it is free and print its token; exit 1 if it is held.
    TryLock(TryLockArgs),
    /// Release the grant that TOKEN names.
    Unlock(UnlockArgs),
    /// Show who holds a lock and how many wait.
    Inspect(KeyArgs),
    /// Print each grant, release and expiry of a lock (or, with --set,
    /// each creation, expiry and tear-down of a distinct set) as it
    /// happens, one JSON object a line, until interrupted.
    Watch(WatchArgs),
    /// Print only the lines of stdin that are new to the distinct set NAME
    /// across every worker: a distributed `uniq`.
    Distinct(DistinctArgs),
    /// Create a distinct set, or restart its time to live.
    SetUp(SetUpArgs),
    /// Print the members of a distinct set, in index order.
    Members(MembersArgs),
    /// Remove a distinct set now.
    TearDown(SetArgs),
    /// Look at a replicated cluster.
    Cluster(ClusterArgs),
    /// Copy a stopped server's data directory to BACKUP (a new directory),
    /// holding its lock so that no server starts on it meanwhile; or, with
    /// --online, have the running server copy its own.
    Backup(BackupArgs),
    /// Make a data directory from BACKUP, for a server to start on.
    Restore(RestoreArgs),
    /// Check a grant's proof (`deadbolt serve --sign-grants`) offline and
    /// print what it states as JSON; exit 1 if it is forged, changed,
    /// signed by another key, expired, or not of --key/--token.
    Verify(VerifyArgs),
}

/// `deadbolt verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The proof, or `-` to read it from stdin.
    pub proof: String,
    /// The server's public key: base64url, a JWK or the JWK set `GET
    /// /pubkey` serves, or a file holding one of these. Default: fetched
    /// from the first ws:// URL of --server.
    #[arg(long, value_name = "KEY|FILE")]
    pub pubkey: Option<String>,
    /// Refuse a proof of any other lock key.
    #[arg(long)]
    pub key: Option<String>,
    /// Refuse a proof of any other fencing token.
    #[arg(long)]
    pub token: Option<u64>,
}

/// `deadbolt backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Ask the server at --server to copy its data directory, as it is at
    /// this moment, into a new directory under its --backup-dir while it
    /// keeps serving (acknowledgements wait for the copy), and print where.
    #[arg(long, conflicts_with_all = ["data_dir", "backup"])]
    pub online: bool,
    /// The data directory to copy; its server must be stopped.
    #[arg(long, default_value = "deadbolt-data")]
    pub data_dir: PathBuf,
    /// Where to write the copy: a directory that does not exist yet.
    #[arg(required_unless_present = "online")]
    pub backup: Option<PathBuf>,
}

/// `deadbolt restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// A copy made by `deadbolt backup`.
    pub backup: PathBuf,
    /// The data directory to make: it must not exist yet, or be empty.
    #[arg(long, default_value = "deadbolt-data")]
    pub data_dir: PathBuf,
}

/// `deadbolt serve`. Every flag but `--config` and `--print-config` is
/// also a key of the config file (crate::config), named as the flag
/// without its dashes.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Read settings from this TOML file: one key per flag, named as the
    /// flag without its dashes (`data-dir = "/var/lib/deadbolt"`). Flags
    /// given on the command line override the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (defaults, the file, the flags) as
    /// TOML, which `--config` reads back, and exit.
    #[arg(long)]
    pub print_config: bool,
    /// How the server writes its log to stderr: `text` for people, `json`
    /// (one object per line) for a log collector.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Address for WebSocket clients.
    #[arg(long, alias = "listen", default_value = "127.0.0.1:7420")]
    pub ws: SocketAddr,
    /// Address for QUIC clients, or `off`.
    #[arg(long, default_value = "127.0.0.1:7421")]
    pub quic: QuicListen,
    /// The server's certificate chain (PEM), for QUIC and for the
    /// WebSocket port, which then serves only wss:// (and https://).
    /// Default: QUIC uses a self-signed certificate for localhost,
    /// generated in the data directory, and the WebSocket port plain ws://.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The auth file (TOML): the principals that may connect, each with
    /// its secret, the key and set prefixes it may use, whether it is an
    /// admin, and its quotas (see README, "Securing a server"). Reloaded on
    /// SIGHUP. Without it every client may do everything.
    #[arg(long, value_name = "FILE")]
    pub auth: Option<PathBuf>,
    /// Listen on a non-loopback address without --auth: anyone who can
    /// reach the port may take, free and look at every lock and set.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Serve plain ws:// on a non-loopback address (no --tls-cert): secrets
    /// and tokens cross the network readable.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Listen for cluster peers on a non-loopback address without TLS: the
    /// peer port then trusts whoever connects (who could inject Raft
    /// messages) and the Raft log crosses the network readable.
    #[arg(long, requires = "cluster")]
    pub insecure_peers: bool,
    /// On a cluster node with --tls-cert: the certificates (PEM: a CA, or
    /// the nodes' own certificates) that vouch for the other nodes. The
    /// peer port serves mutual TLS: a peer must present a certificate
    /// vouched for by one of these, and this node presents its
    /// --tls-cert to its peers and checks theirs (and the leader's
    /// wss:// port, when it forwards) against them. Default: --tls-cert
    /// itself, for a cluster whose nodes share one certificate.
    #[arg(long, value_name = "FILE", requires = "tls_cert", requires = "cluster")]
    pub cluster_ca: Option<PathBuf>,
    /// An origin, besides the server's own, whose pages may open a
    /// WebSocket to this server (https://app.example.com; `*` for any);
    /// several, comma-separated. A browser upgrade from any other origin
    /// is answered 403.
    #[arg(long, value_name = "ORIGIN", value_delimiter = ',')]
    pub allow_origin: Vec<String>,
    /// Where the server keeps its files: the write-ahead log and snapshots
    /// of every acknowledged change, and the QUIC certificate. Locked: one
    /// server per directory.
    #[arg(long, default_value = "deadbolt-data")]
    pub data_dir: PathBuf,
    /// When the log is synced to disk: `always` (before any reply that
    /// depends on a change; survives a power cut) or `every=DURATION`, e.g.
    /// `every=10ms` (replies once written: survives the process dying, but a
    /// power cut may lose the last DURATION of acknowledged changes).
    #[arg(long, default_value = "always", value_parser = parse_fsync, conflicts_with = "in_memory")]
    pub fsync: Fsync,
    /// Keep nothing on disk: every lock and set dies with the process.
    #[arg(long)]
    pub in_memory: bool,
    /// Where `deadbolt backup --online` (`POST /backup`) makes copies of
    /// the data directory, each in a new `backup-<time>` directory. Without
    /// it, online backups are off.
    #[arg(long, value_name = "DIR", conflicts_with = "in_memory")]
    pub backup_dir: Option<PathBuf>,
    /// Shard actors. A key's shard depends on this number, so it is fixed
    /// rather than one per core.
    #[arg(long, default_value_t = deadbolt_core::engine::DEFAULT_SHARDS)]
    pub shards: usize,
    /// This node's id in the cluster `--cluster` names.
    #[arg(long, requires = "cluster")]
    pub node_id: Option<u64>,
    /// Run as one node of a replicated cluster of 3 or 5 (SPEC section 9):
    /// every member's id and peer address, the same list on every node,
    /// e.g. `1=10.0.0.1:7430,2=10.0.0.2:7430,3=10.0.0.3:7430`. This node
    /// listens for its peers on its own entry's port; clients may use any
    /// node (followers forward to the leader, on the WebSocket port of the
    /// leader's peer host: give `--ws` an address peers can reach).
    #[arg(long, requires = "node_id", value_parser = parse_cluster, conflicts_with = "in_memory")]
    pub cluster: Option<ClusterMembers>,
    /// The memory the server plans for, such as 4GiB (default: half the
    /// host's memory, or of its cgroup's limit). Half of it is shared by
    /// the connections of both transports: the defaults of
    /// --max-connections, --pending-reply-bytes-max, --quic-max-connections
    /// and --quic-receive-window come from it (printed at start); the flags
    /// override them.
    #[arg(long, value_parser = crate::budget::parse_bytes)]
    pub memory_max: Option<u64>,
    /// Most open WebSocket connections (plain HTTP requests such as
    /// /healthz take no slot) [default: from --memory-max, at most 10,000].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Most connections still sending their HTTP request head; past it, a
    /// new connection evicts the oldest of them.
    #[arg(long, default_value_t = 1024)]
    pub handshakes_max: usize,
    /// Most of those from one IP address (an IPv6 /64); past it, a new
    /// connection from there evicts that address's oldest.
    #[arg(long, default_value_t = 64)]
    pub handshakes_per_address_max: usize,
    /// Most requests in flight on one connection.
    #[arg(long, default_value_t = 4096)]
    pub max_in_flight: usize,
    /// Most bytes of replies one WebSocket connection may hold (finished
    /// and unwritten, or reserved for large replies in the making); past
    /// it the server reads no more requests from that connection
    /// [default: from --memory-max, 256 KiB to 4 MiB].
    #[arg(long)]
    pub pending_reply_bytes_max: Option<usize>,
    /// How long a new WebSocket connection may take to send its request head.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// A WebSocket client silent this long is pinged; silent three times
    /// this long, it is disconnected.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub idle_ping: Duration,
    /// Most open QUIC connections [default: from --memory-max, at most
    /// 10,000].
    #[arg(long)]
    pub quic_max_connections: Option<usize>,
    /// Bytes of unread requests one QUIC connection may send ahead (its
    /// flow-control window) [default: from --memory-max, one message to
    /// 16 MiB].
    #[arg(long)]
    pub quic_receive_window: Option<u32>,
    /// Requests (streams) in flight on one QUIC connection.
    #[arg(long, default_value_t = 4096)]
    pub quic_streams: u32,
    /// A QUIC connection with no traffic for this long is closed.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub quic_idle_timeout: Duration,
    /// With more QUIC connections open than this, new clients must first
    /// prove their address (a Retry round trip).
    #[arg(long, default_value_t = 1_000)]
    pub quic_retry_above: usize,
    /// QUIC loss recovery, acknowledgements and congestion control: `rpc`
    /// (small requests and replies) or `quinn` (quinn's defaults), either
    /// followed by `,name=value` overrides (docs/quic.md).
    #[arg(long, default_value = "rpc", value_parser = deadbolt_transport_quic::QuicTuning::parse)]
    pub quic_tuning: deadbolt_transport_quic::QuicTuning,
    /// Largest message, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub message_bytes_max: usize,
    /// Longest lease or set time to live.
    #[arg(long, default_value = "1day", value_parser = humantime::parse_duration)]
    pub ttl_max: Duration,
    /// Most keys with lock state.
    #[arg(long, default_value_t = 10_000_000)]
    pub locks_max: usize,
    /// Most bytes of keys with lock state.
    #[arg(long, default_value_t = deadbolt_core::limits::gib(2))]
    pub lock_key_bytes_max: usize,
    /// Most queued waiters.
    #[arg(long, default_value_t = 1_000_000)]
    pub waiters_max: usize,
    /// Most distinct sets.
    #[arg(long, default_value_t = 100_000)]
    pub sets_max: usize,
    /// Most members over all distinct sets.
    #[arg(long, default_value_t = 100_000_000)]
    pub members_max: usize,
    /// Most bytes of member keys over all distinct sets.
    #[arg(long, default_value_t = deadbolt_core::limits::gib(8))]
    pub member_bytes_max: usize,
    /// Most pushed-event subscriptions one connection may hold (its
    /// `watch`es and its `lock`s with `notify`); one more is `overloaded`.
    #[arg(long, default_value_t = 1024)]
    pub watches_per_connection_max: usize,
    /// Most bytes of pushed events queued for one connection and not yet
    /// written; past it the connection is closed as too slow a reader.
    #[arg(long, default_value_t = 1 << 20)]
    pub event_bytes_max: usize,
    /// Sign every grant: each `lock` reply carries a `proof`, an Ed25519
    /// statement of key, token, client, mode, time and lease that a
    /// protected resource checks offline with the key `GET /pubkey` serves
    /// (`deadbolt verify`). The key is --signing-key, else
    /// `signing-key.pem` in the data directory (made at first start), else,
    /// --in-memory, a new one each start.
    #[arg(long)]
    pub sign_grants: bool,
    /// The Ed25519 private key that signs grants (PKCS#8 PEM, as `openssl
    /// genpkey -algorithm ed25519` writes it). Give every node of a cluster
    /// the same file, so that one public key checks every node's proofs.
    #[arg(long, value_name = "FILE", requires = "sign_grants")]
    pub signing_key: Option<PathBuf>,
}

/// `deadbolt lock`.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// The lock's key.
    pub key: String,
    /// The lease; renewed every third of it while the command runs.
    #[arg(long, value_parser = parse_lease)]
    pub ttl: Duration,
    /// How long to wait for the lock (default: as long as it takes).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
    /// Release the lock as soon as this process's connection closes.
    #[arg(long)]
    pub ephemeral: bool,
    /// Shared, semaphore and lock-delay options.
    #[command(flatten)]
    pub kind: LockKindArgs,
    /// The command to run, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// `deadbolt try-lock`.
#[derive(Debug, Args)]
pub struct TryLockArgs {
    /// The lock's key.
    pub key: String,
    /// The lease.
    #[arg(long, value_parser = parse_lease)]
    pub ttl: Duration,
    /// Also print the grant's proof (from a server that signs grants) on a
    /// second line.
    #[arg(long)]
    pub proof: bool,
    /// Shared, semaphore and lock-delay options.
    #[command(flatten)]
    pub kind: LockKindArgs,
}

/// How `lock` and `try-lock` hold the key (SPEC section 7).
#[derive(Debug, Args)]
pub struct LockKindArgs {
    /// Hold the key shared (a reader): with other shared holders, and no
    /// exclusive one.
    #[arg(long, conflicts_with = "limit")]
    pub shared: bool,
    /// Hold the key as one of at most N exclusive holders (a counting
    /// semaphore: e.g. at most 5 concurrent calls of an API). Every user
    /// of the key must give the same N.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(deadbolt_core::limits::LOCK_LIMIT_MAX)))]
    pub limit: u32,
    /// If the lease runs out (this process paused or lost its connection),
    /// keep the key from everyone for this long after, so that writes
    /// still in flight land first (e.g. `10s`; at most 60s).
    #[arg(long, value_name = "DURATION", value_parser = parse_lock_delay)]
    pub lock_delay: Option<Duration>,
}

impl LockKindArgs {
    /// These options applied to `options`.
    pub fn apply(&self, options: LockOptions) -> LockOptions {
        let options = if self.shared {
            options.shared()
        } else {
            options.limit(self.limit)
        };
        options.lock_delay(self.lock_delay.unwrap_or_default())
    }
}

/// Parses a lock delay: whole milliseconds up to the protocol's bound.
fn parse_lock_delay(value: &str) -> Result<Duration, String> {
    let delay = humantime::parse_duration(value).map_err(|e| format!("{value}: {e}"))?;
    let max = Duration::from_millis(deadbolt_core::limits::LOCK_DELAY_MS_MAX);
    if delay > max {
        return Err(format!(
            "{value}: at most {}",
            humantime::format_duration(max)
        ));
    }
    Ok(delay)
}

/// `deadbolt unlock`.
#[derive(Debug, Args)]
pub struct UnlockArgs {
    /// The lock's key.
    pub key: String,
    /// The fencing token of the grant to end.
    pub token: u64,
}

/// A command about one lock key.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The lock's key.
    pub key: String,
}

/// `deadbolt watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The lock's key.
    #[arg(required_unless_present = "set", conflicts_with = "set")]
    pub key: Option<String>,
    /// Watch the distinct set NAME instead of a lock.
    #[arg(long, value_name = "NAME")]
    pub set: Option<String>,
}

/// `deadbolt distinct`.
#[derive(Debug, Args)]
pub struct DistinctArgs {
    /// The set's name.
    pub name: String,
    /// The set's time to live (restarted by every run).
    #[arg(long, default_value = "1h", value_parser = parse_lease)]
    pub ttl: Duration,
}

/// `deadbolt set-up`.
#[derive(Debug, Args)]
pub struct SetUpArgs {
    /// The set's name.
    pub name: String,
    /// The set's time to live.
    #[arg(long, value_parser = parse_lease)]
    pub ttl: Duration,
}

/// `deadbolt members`.
#[derive(Debug, Args)]
pub struct MembersArgs {
    /// The set's name.
    pub name: String,
    /// Print each key's index before it, separated by a tab.
    #[arg(long)]
    pub index: bool,
}

/// A command about one set.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// The set's name.
    pub name: String,
}

/// The format of the server's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses a lease or time to live: a duration of at least a millisecond
/// (the protocol's least `ttl_ms`), since a zero lease could only be lost.
fn parse_lease(value: &str) -> Result<Duration, String> {
    let lease = humantime::parse_duration(value).map_err(|e| format!("{value}: {e}"))?;
    if lease < Duration::from_millis(1) {
        return Err(format!("{value}: must be at least 1ms"));
    }
    Ok(lease)
}

/// `--quic ADDR` or `--quic off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuicListen {
    /// Listen on this address.
    On(SocketAddr),
    /// No QUIC frontend.
    Off,
}

impl std::str::FromStr for QuicListen {
    type Err = std::net::AddrParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.eq_ignore_ascii_case("off") {
            Ok(QuicListen::Off)
        } else {
            text.parse().map(QuicListen::On)
        }
    }
}

/// Parses `--fsync`: `always` or `every=DURATION`.
fn parse_fsync(value: &str) -> Result<Fsync, String> {
    if value == "always" {
        return Ok(Fsync::Always);
    }
    let interval = value
        .strip_prefix("every=")
        .ok_or_else(|| format!("expected `always` or `every=DURATION`, got `{value}`"))?;
    let interval = humantime::parse_duration(interval).map_err(|e| format!("{interval}: {e}"))?;
    if interval.is_zero() {
        return Err("every=0 would sync nothing; use `always`".into());
    }
    Ok(Fsync::Every(interval))
}

/// The members of a cluster: id → peer address (`host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMembers(pub std::collections::BTreeMap<u64, String>);

/// Parses `--cluster`: `ID=HOST:PORT,…`, three or five distinct members.
fn parse_cluster(value: &str) -> Result<ClusterMembers, String> {
    let mut members = std::collections::BTreeMap::new();
    for member in value.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let (id, addr) = member
            .split_once('=')
            .ok_or_else(|| format!("`{member}`: expected ID=HOST:PORT"))?;
        let id: u64 = id
            .parse()
            .map_err(|_| format!("`{id}`: a node id is a number"))?;
        let port = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok());
        if port.is_none() {
            return Err(format!("`{addr}`: expected HOST:PORT"));
        }
        if members.insert(id, addr.to_owned()).is_some() {
            return Err(format!("node {id} is listed twice"));
        }
    }
    match members.len() {
        3 | 5 => Ok(ClusterMembers(members)),
        n => Err(format!(
            "{n} members: a cluster has 3 or 5 (it survives the loss of 1 or 2)"
        )),
    }
}

/// `deadbolt cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// What to ask.
    #[command(subcommand)]
    pub command: ClusterCommand,
}

/// The `deadbolt cluster` subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Show the leader, the term, the commit index and each node's lag, as
    /// the first node of `--server` that answers sees them.
    Status,
    /// Readmit node NODE_ID after it lost its data directory: its peers
    /// refuse it until then (it could vote twice in a term). The leader
    /// takes it out of the voters, sends it the state, and makes it a
    /// voter again. Give every node's URL in `--server`: only the leader
    /// does it.
    Readmit {
        /// The node's id.
        node_id: u64,
    },
}

/// The ids of the client-only flags ([`ServerArgs`]): they are global, so
/// that they go before or after a client subcommand, but mean nothing to
/// `deadbolt serve`.
pub const CLIENT_FLAGS: [&str; 6] = [
    "server",
    "client_id",
    "ca",
    "insecure",
    "auth_file",
    "retry_for",
];

/// The command line, with the client-only flags hidden from `deadbolt
/// serve --help` and later occurrences of a `serve` flag overriding
/// earlier ones (as the flags override the config file).
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    let command = Cli::command();
    // A subcommand that has an argument of a global's id keeps its own, so
    // `serve` gets hidden copies (clap propagates globals when it builds
    // the command, and an argument cannot be changed after that).
    let hidden: Vec<clap::Arg> = command
        .get_arguments()
        .filter(|arg| CLIENT_FLAGS.contains(&arg.get_id().as_str()))
        .map(|arg| arg.clone().hide(true))
        .collect();
    command.mut_subcommand("serve", |serve| serve.args(hidden).args_override_self(true))
}

/// `deadbolt serve` on its own, as the config file is read into it.
pub fn serve_command() -> clap::Command {
    ServeArgs::augment_args(clap::Command::new("deadbolt serve")).args_override_self(true)
}
