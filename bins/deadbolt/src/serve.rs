//! `deadbolt serve`: flags → [`ServerConfig`] → real sockets →
//! [`deadbolt_server::run`], until Ctrl-C or SIGTERM.

use anyhow::Context;
use deadbolt_core::auth::Auth;
use deadbolt_core::proof::GrantSigner;
use deadbolt_core::{EngineConfig, Limits};
use deadbolt_replication::{ClusterConfig, Timings};
use deadbolt_server::{Durable, Listeners, Peering, ServerConfig};
use deadbolt_storage::{StdDisk, StoreConfig};
use deadbolt_transport_quic::{Identity, QuicConfig};
use deadbolt_transport_ws::{TcpDialer, TlsDialer, WsConfig};
use tokio::net::TcpListener;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::budget::{self, Derived, human};
use crate::cli::{ClusterMembers, QuicListen, ServeArgs};

/// Runs the server until a shutdown signal, then stops it gracefully.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    refuse_exposure(&args)?;
    // Held until the server has stopped; the OS lets go of it if the
    // process dies, however it dies.
    let _data_dir = lock_data_dir(&args.data_dir)?;
    let shutdown = shutdown_signal();
    let auth = match &args.auth {
        Some(path) => Some(load_auth(path)?),
        None => None,
    };
    let mut config = server_config(&args, &memory_budget(&args));
    config.engine.auth = auth;
    config.engine.grant_signer = grant_signer(&args)?;
    config.ws.tls = ws_tls(&args)?;
    let listeners = bind(&args, &config).await?;
    let Some(members) = &args.cluster else {
        deadbolt_server::run(config, listeners, shutdown).await?;
        return Ok(());
    };
    // One dialer for the peer ports and for forwarding to the leader's
    // WebSocket port: TLS with this node's certificate, or plain TCP.
    match peer_tls(&args)? {
        Some(tls) => {
            let dialer = TlsDialer::new(tls.client);
            let peering = peering(&args, members, &listeners, dialer, Some(tls.server)).await?;
            deadbolt_server::run_node(config, listeners, Some(peering), shutdown).await?;
        }
        None => {
            let peering = peering(&args, members, &listeners, TcpDialer, None).await?;
            deadbolt_server::run_node(config, listeners, Some(peering), shutdown).await?;
        }
    }
    Ok(())
}

/// The key that signs grants, with `--sign-grants`: `--signing-key`, else
/// the data directory's `signing-key.pem` (made at first start, so that
/// proofs stay checkable across restarts and go with backups), else, with
/// `--in-memory`, a key that lives as long as the process.
fn grant_signer(args: &ServeArgs) -> anyhow::Result<Option<Arc<GrantSigner>>> {
    if !args.sign_grants {
        return Ok(None);
    }
    let (pem, from) = match &args.signing_key {
        Some(path) => (read_signing_key(path)?, path.display().to_string()),
        None if args.in_memory => (
            GrantSigner::generate_pem()?,
            "a new key (--in-memory: proofs will not verify with the next run's key)".to_owned(),
        ),
        None => {
            let path = args.data_dir.join(SIGNING_KEY_FILE);
            (signing_key_in_data_dir(&path)?, path.display().to_string())
        }
    };
    let signer = GrantSigner::from_pem(&pem).with_context(|| format!("signing key {from}"))?;
    let public = signer.public_key();
    tracing::info!(
        kid = public.kid(),
        public_key = %public.to_base64url(),
        "signing grants with {from}; GET /pubkey serves its public key"
    );
    Ok(Some(Arc::new(signer)))
}

/// The signing key's file in the data directory.
const SIGNING_KEY_FILE: &str = "signing-key.pem";

fn read_signing_key(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the signing key {}", path.display()))
}

/// The key in `path`, made (readable by this user only) if there is none.
fn signing_key_in_data_dir(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return read_signing_key(path);
    }
    let pem = GrantSigner::generate_pem()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create the signing key {}", path.display()))?;
    file.write_all(pem.as_bytes())?;
    file.sync_all()?;
    Ok(pem)
}

/// Refuses a configuration that would expose the server (SPEC section
/// 10): a non-loopback address without `--auth` (unless
/// `--insecure-no-auth`), or a non-loopback WebSocket port without TLS
/// (unless `--insecure-plaintext`). The message says how to fix it.
fn refuse_exposure(args: &ServeArgs) -> anyhow::Result<()> {
    let quic = match args.quic {
        QuicListen::On(addr) => Some(addr),
        QuicListen::Off => None,
    };
    let exposed = std::iter::once(args.ws)
        .chain(quic)
        .find(|addr| !addr.ip().is_loopback());
    if let Some(addr) = exposed
        && args.auth.is_none()
        && !args.insecure_no_auth
    {
        anyhow::bail!(
            "refusing to listen on {addr}, which is not a loopback address, without \
             authentication: anyone who can reach it could take, free and read every lock \
             and set. Give --auth FILE (principals and their grants; see the README, \
             \"Securing a server\"), or listen on 127.0.0.1, or pass --insecure-no-auth \
             if every host that can reach it is trusted"
        );
    }
    if !args.ws.ip().is_loopback() && ws_tls_wanted(args).is_none() && !args.insecure_plaintext {
        anyhow::bail!(
            "refusing to serve plain ws:// on {}, which is not a loopback address: \
             secrets and fencing tokens would cross the network readable. Give \
             --tls-cert FILE --tls-key FILE (the WebSocket port then serves wss://, with \
             the certificate QUIC uses), or pass --insecure-plaintext if the network \
             is trusted",
            args.ws
        );
    }
    refuse_exposed_peers(args)
}

/// Refuses a cluster node whose peer port is on a non-loopback address
/// without TLS (unless `--insecure-peers`): whoever reaches it could send
/// Raft messages (votes, entries: any lock, any set) and read the log.
fn refuse_exposed_peers(args: &ServeArgs) -> anyhow::Result<()> {
    let (Some(members), Some(node)) = (&args.cluster, args.node_id) else {
        return Ok(());
    };
    // A node missing from --cluster is refused later, with its own message.
    let Some(own) = members.0.get(&node) else {
        return Ok(());
    };
    if args.tls_cert.is_some() || args.insecure_peers || is_loopback_peer(own) {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to listen for cluster peers on {own}, which is not a loopback address, \
         without TLS: anyone who can reach it could inject Raft messages (and so take, free \
         and change every lock and set) and read every change. Give --tls-cert FILE \
         --tls-key FILE (the peer port then serves mutual TLS: every node's certificate \
         must be vouched for by --cluster-ca FILE, which defaults to the certificate itself \
         for nodes that share one; followers forward over wss://), or listen for peers on a \
         loopback address, or pass --insecure-peers if the network between the nodes is \
         trusted"
    );
}

/// Whether the peer address `host:port` is on loopback: `localhost`, a
/// loopback IP, or a name that resolves to loopback addresses only.
fn is_loopback_peer(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    let Ok((host, port)) = deadbolt_replication::network::split_addr(addr) else {
        return false;
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    match (host, port).to_socket_addrs() {
        Ok(resolved) => {
            let resolved: Vec<SocketAddr> = resolved.collect();
            !resolved.is_empty() && resolved.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// A cluster node's TLS towards its peers (see [`peer_tls`]).
struct PeerTls {
    /// The peer port's: mutual TLS.
    server: Arc<rustls::ServerConfig>,
    /// The dialer's, to peers and to the leader's `wss://` port.
    client: rustls::ClientConfig,
}

/// With `--tls-cert` on a cluster node: mutual TLS on the peer port, with
/// the node's certificate on both sides, vouched for by `--cluster-ca`
/// (by default the certificate file itself).
fn peer_tls(args: &ServeArgs) -> anyhow::Result<Option<PeerTls>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let ca_path = args.cluster_ca.as_deref().unwrap_or(cert);
    let ca = std::fs::read(ca_path)
        .with_context(|| format!("cannot read the cluster CA {}", ca_path.display()))?;
    let identity = Identity::load(cert, key)?;
    let client = deadbolt_transport_quic::tls::peer_client_tls(identity.duplicate(), &ca, ca_path)?;
    let server = deadbolt_transport_quic::tls::peer_server_tls(identity, &ca, ca_path)?;
    Ok(Some(PeerTls {
        server: Arc::new(server),
        client,
    }))
}

/// Reads the auth file, and reloads it on every SIGHUP for as long as the
/// process runs: open connections keep their principal and get its new
/// grants. A file that no longer reads is refused and the old policy kept.
fn load_auth(path: &Path) -> anyhow::Result<Arc<Auth>> {
    let policy = deadbolt_server::auth_file::load(path)?;
    tracing::info!(
        file = %path.display(),
        principals = ?policy.names().collect::<Vec<_>>(),
        "authentication on"
    );
    let auth = Arc::new(Auth::new(policy));
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot watch for SIGHUP")?;
    let (reloaded, path) = (Arc::clone(&auth), path.to_owned());
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match deadbolt_server::auth_file::load(&path) {
                Ok(policy) => {
                    let names: Vec<&str> = policy.names().collect();
                    tracing::info!(file = %path.display(), principals = ?names, "auth file reloaded");
                    reloaded.reload(policy);
                }
                Err(error) => {
                    tracing::error!(%error, "auth file not reloaded; the previous one stays in force");
                }
            }
        }
    });
    Ok(auth)
}

/// The certificate and key the WebSocket port serves `wss://` with: those
/// of `--tls-cert`/`--tls-key` (on a cluster node too: its followers then
/// forward to the leader's `wss://` port).
fn ws_tls_wanted(args: &ServeArgs) -> Option<(&Path, &Path)> {
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        _ => None,
    }
}

/// The WebSocket port's TLS configuration (see [`ws_tls_wanted`]).
fn ws_tls(args: &ServeArgs) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let Some((cert, key)) = ws_tls_wanted(args) else {
        return Ok(None);
    };
    let identity = Identity::load(cert, key)?;
    let mut tls = deadbolt_transport_quic::tls::server_tls(identity)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(tls)))
}

/// A cluster node's peer port (its own entry in `--cluster`) and its place
/// in the cluster; it dials its peers and the leader with `dialer`, and
/// serves its peer port with `peer_tls`, if any.
async fn peering<D>(
    args: &ServeArgs,
    members: &ClusterMembers,
    listeners: &Listeners<TcpListener>,
    dialer: D,
    peer_tls: Option<Arc<rustls::ServerConfig>>,
) -> anyhow::Result<Peering<TcpListener, D>> {
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
    let scheme = if peer_tls.is_some() { "wss" } else { "ws" };
    let peers_tls = if peer_tls.is_some() {
        "mutual TLS"
    } else {
        "plain TCP"
    };
    tracing::info!(node, peers = %own, "cluster node, peers over {peers_tls}; members {:?}", members.0);
    let cluster = ClusterConfig {
        node,
        members: members.0.clone(),
        client_url: format!("{scheme}://{host}:{ws_port}"),
        dir: args.data_dir.clone(),
        disk: Arc::new(StdDisk),
        writer_thread: true,
        timings: Timings::default(),
        snapshot_every: SNAPSHOT_EVERY,
        fresh_incarnation: random_incarnation(),
        peer_tls,
    };
    Ok(Peering {
        cluster,
        listener,
        dialer,
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
            allowed_origins: args.allow_origin.clone(),
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
async fn bind(args: &ServeArgs, config: &ServerConfig) -> anyhow::Result<Listeners<TcpListener>> {
    let quic = &config.quic;
    let ws = TcpListener::bind(args.ws)
        .await
        .with_context(|| format!("cannot listen on {}", args.ws))?;
    let ws_addr = ws.local_addr()?;
    let quic = match args.quic {
        QuicListen::On(addr) => Some(quic_endpoint(args, addr, quic)?),
        QuicListen::Off => None,
    };
    let scheme = if config.ws.tls.is_some() { "wss" } else { "ws" };
    tracing::info!(
        "deadbolt {} listening on {scheme}://{ws_addr}/ws",
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
        watches_per_connection_max: args.watches_per_connection_max,
        event_bytes_max: args.event_bytes_max,
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
