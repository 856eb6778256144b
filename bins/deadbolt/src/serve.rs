//! `deadbolt serve`: flags → [`ServerConfig`] → real sockets →
//! [`deadbolt_server::run`], until Ctrl-C or SIGTERM.

use anyhow::Context;
use deadbolt_core::{EngineConfig, Limits};
use deadbolt_replication::{ClusterConfig, Timings};
use deadbolt_server::{Durable, Listeners, Peering, ServerConfig};
use deadbolt_storage::{StdDisk, StoreConfig};
use deadbolt_transport_quic::{Identity, QuicConfig};
use deadbolt_transport_ws::{TcpDialer, WsConfig};
use tokio::net::TcpListener;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::budget::{self, Derived, human};
use crate::cli::{ClusterMembers, QuicListen, ServeArgs};

/// Runs the server until a shutdown signal, then stops it gracefully.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Held until the server has stopped; the OS lets go of it if the
    // process dies, however it dies.
    let _data_dir = lock_data_dir(&args.data_dir)?;
    let shutdown = shutdown_signal();
    let config = server_config(&args, &memory_budget(&args));
    let listeners = bind(&args, &config.quic).await?;
    let peering = match &args.cluster {
        Some(members) => Some(peering(&args, members, &listeners).await?),
        None => None,
    };
    deadbolt_server::run_node(config, listeners, peering, shutdown).await?;
    Ok(())
}

/// A cluster node's peer port (its own entry in `--cluster`) and its place
/// in the cluster.
async fn peering(
    args: &ServeArgs,
    members: &ClusterMembers,
    listeners: &Listeners<TcpListener>,
) -> anyhow::Result<Peering<TcpListener, TcpDialer>> {
    let node = args.node_id.context("--cluster needs --node-id")?;
    let own = members
        .0
        .get(&node)
        .with_context(|| format!("--node-id {node} is not in --cluster"))?;
    let listener = TcpListener::bind(own)
        .await
        .with_context(|| format!("cannot listen for peers on {own}"))?;
    let (host, _) = own.rsplit_once(':').unwrap_or((own, ""));
    let ws_port = listeners.ws.local_addr()?.port();
    tracing::info!(node, peers = %own, "cluster node; members {:?}", members.0);
    let cluster = ClusterConfig {
        node,
        members: members.0.clone(),
        client_url: format!("ws://{host}:{ws_port}"),
        dir: args.data_dir.clone(),
        disk: Arc::new(StdDisk),
        writer_thread: true,
        timings: Timings::default(),
        snapshot_every: SNAPSHOT_EVERY,
        fresh_incarnation: random_incarnation(),
    };
    Ok(Peering {
        cluster,
        listener,
        dialer: TcpDialer,
    })
}

/// A random incarnation for a node whose Raft directory is new.
fn random_incarnation() -> u64 {
    let mut bytes = [0u8; 8];
    if let Err(error) = getrandom::fill(&mut bytes) {
        tracing::warn!(%error, "no OS randomness: the incarnation comes from the clock");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        return nanos as u64 ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(bytes)
}

/// Raft entries between snapshots of a cluster node.
const SNAPSHOT_EVERY: u64 = 20_000;

/// Takes the data directory for this server alone (SPEC section 8: two
/// servers never share one), creating it if needed: an exclusive lock on
/// its `LOCK` file, which also names the process that holds it.
pub(crate) fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    let path = dir.join("LOCK");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if let Err(error) = file.try_lock() {
        let mut holder = String::new();
        // Only for the message; an unreadable file says nothing more.
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        let by = if holder.is_empty() {
            String::new()
        } else {
            format!(" (by process {holder})")
        };
        anyhow::bail!(
            "the data directory {} is in use by another deadbolt server{by}: {error}; \
             stop that server, or give this one another --data-dir",
            dir.display()
        );
    }
    file.set_len(0)?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

/// The connection limits: each flag given, else derived from
/// `--memory-max` (or the host's memory), and said in the log.
fn memory_budget(args: &ServeArgs) -> Derived {
    let (memory_max, whence) = match (args.memory_max, budget::host_memory()) {
        (Some(bytes), _) => (bytes, "--memory-max".to_owned()),
        (None, Some((host, from))) => (host / 2, format!("half of {} ({from})", human(host))),
        (None, None) => (
            DEFAULT_MEMORY_MAX,
            "the host's memory is unknown".to_owned(),
        ),
    };
    let derived = Derived::of(memory_max, args.message_bytes_max);
    let limits = Derived {
        ws_max_connections: args.max_connections.unwrap_or(derived.ws_max_connections),
        pending_reply_bytes_max: args
            .pending_reply_bytes_max
            .unwrap_or(derived.pending_reply_bytes_max),
        quic_max_connections: args
            .quic_max_connections
            .unwrap_or(derived.quic_max_connections),
        quic_receive_window: args
            .quic_receive_window
            .unwrap_or(derived.quic_receive_window),
    };
    tracing::info!(
        "memory budget {} ({whence}): WebSocket {} connections, replies up to {} each; \
         QUIC {} connections, receive window {} each",
        human(memory_max),
        limits.ws_max_connections,
        human(limits.pending_reply_bytes_max as u64),
        limits.quic_max_connections,
        human(u64::from(limits.quic_receive_window)),
    );
    limits
}

/// The budget where the host's memory cannot be read.
const DEFAULT_MEMORY_MAX: u64 = 2 << 30;

fn server_config(args: &ServeArgs, limits: &Derived) -> ServerConfig {
    let stream_window = budget::stream_receive_window(args.message_bytes_max);
    ServerConfig {
        engine: engine_config(args),
        ws: WsConfig {
            max_connections: limits.ws_max_connections,
            handshakes_max: args.handshakes_max,
            handshakes_per_address_max: args.handshakes_per_address_max,
            max_in_flight: args.max_in_flight,
            pending_reply_bytes_max: limits.pending_reply_bytes_max,
            handshake_timeout: args.handshake_timeout,
            idle_ping: args.idle_ping,
            idle_close: args.idle_ping * 3,
            ..WsConfig::default()
        },
        storage: storage(args),
        quic: QuicConfig {
            max_connections: limits.quic_max_connections,
            stream_receive_window: u32::try_from(stream_window).unwrap_or(u32::MAX),
            // A connection's window takes at least one stream's.
            receive_window: limits
                .quic_receive_window
                .max(u32::try_from(stream_window).unwrap_or(u32::MAX)),
            streams_per_connection: args.quic_streams,
            idle_timeout: args.quic_idle_timeout,
            retry_above: args.quic_retry_above,
            tuning: args.quic_tuning.clone(),
            ..QuicConfig::default()
        },
    }
}

/// Binds the WebSocket port and the QUIC endpoint, and says where they
/// listen (tests read these lines: the QUIC URL comes first).
async fn bind(args: &ServeArgs, quic: &QuicConfig) -> anyhow::Result<Listeners<TcpListener>> {
    let ws = TcpListener::bind(args.ws)
        .await
        .with_context(|| format!("cannot listen on {}", args.ws))?;
    let ws_addr = ws.local_addr()?;
    let quic = match args.quic {
        QuicListen::On(addr) => Some(quic_endpoint(args, addr, quic)?),
        QuicListen::Off => None,
    };
    tracing::info!(
        "deadbolt {} listening on ws://{ws_addr}/ws",
        env!("CARGO_PKG_VERSION")
    );
    Ok(Listeners { ws, quic })
}

/// The QUIC endpoint on `addr`, with the certificate from the flags or one
/// generated in the data directory.
///
/// The TLS identity is chosen here rather than in `deadbolt-server`: the
/// server takes a ready endpoint (the simulation builds its own, with a
/// seeded token key and the simulated clock), and only the binary has a
/// data directory and certificate flags.
fn quic_endpoint(
    args: &ServeArgs,
    addr: SocketAddr,
    config: &QuicConfig,
) -> anyhow::Result<quinn::Endpoint> {
    let identity = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Identity::load(cert, key)?,
        _ => {
            let (identity, cert) = Identity::load_or_create(&args.data_dir)?;
            tracing::info!(
                "QUIC certificate for localhost: {} (clients: --ca {0})",
                cert.display()
            );
            identity
        }
    };
    let server_config = deadbolt_transport_quic::server_config(identity, config)?;
    let endpoint = quinn::Endpoint::server(server_config, addr)
        .with_context(|| format!("cannot listen for QUIC on {addr}"))?;
    tracing::info!("listening on quic://{}", endpoint.local_addr()?);
    Ok(endpoint)
}

/// The data directory's log, unless `--in-memory`.
fn storage(args: &ServeArgs) -> Option<Durable> {
    if args.in_memory {
        return None;
    }
    let mut store = StoreConfig::new(&args.data_dir);
    store.fsync = args.fsync;
    store.backup_dir.clone_from(&args.backup_dir);

    Some(Durable {
        disk: Arc::new(StdDisk),
        store,
        writer_thread: true,
    })
}

fn engine_config(args: &ServeArgs) -> EngineConfig {
    let mut config = EngineConfig::new().with_entropy();
    config.shards = args.shards.max(1);
    let ttl_ms_max = u64::try_from(args.ttl_max.as_millis()).unwrap_or(u64::MAX);
    config.limits = Limits {
        message_bytes_max: args.message_bytes_max,
        ttl_ms_max,
        locks_max: args.locks_max,
        lock_key_bytes_max: args.lock_key_bytes_max,
        waiters_max: args.waiters_max,
        sets_max: args.sets_max,
        members_max: args.members_max,
        member_bytes_max: args.member_bytes_max,
        ..Limits::default()
    };
    config
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed
/// now, before the server says it listens, so that a signal sent as soon as
/// it does is a graceful stop rather than the default death.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt());
    let mut terminate = signal(SignalKind::terminate());
    if let Err(error) = &terminate {
        tracing::warn!(%error, "cannot watch for SIGTERM");
    }
    if let Err(error) = &interrupt {
        tracing::warn!(%error, "cannot watch for Ctrl-C");
    }
    async move {
        let interrupted = async {
            match &mut interrupt {
                Ok(signal) => signal.recv().await,
                Err(_) => std::future::pending().await,
            }
        };
        let terminated = async {
            match &mut terminate {
                Ok(signal) => signal.recv().await,
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = interrupted => {}
            _ = terminated => {}
        }
    }
}
