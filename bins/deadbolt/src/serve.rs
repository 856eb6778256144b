//! `deadbolt serve`: the engine and its frontends, until Ctrl-C or SIGTERM.

use anyhow::Context;
use deadbolt_core::{Engine, EngineConfig, Limits};
use deadbolt_transport_ws::WsConfig;
use tokio::sync::watch;

use std::net::SocketAddr;

use deadbolt_transport_quic::{Identity, QuicConfig};
use tokio::task::JoinHandle;

use crate::cli::{QuicListen, ServeArgs};

/// Runs the server until a shutdown signal, then stops it gracefully.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    if !deadbolt_transport_ws::metrics::install() {
        tracing::warn!("no metrics: another metrics recorder is installed");
    }
    let engine = Engine::start(engine_config(&args));
    let listener = tokio::net::TcpListener::bind(args.ws)
        .await
        .with_context(|| format!("cannot listen on {}", args.ws))?;
    let ws_addr = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let ws_config = WsConfig {
        max_connections: args.max_connections,
        max_in_flight: args.max_in_flight,
        handshake_timeout: args.handshake_timeout,
        idle_ping: args.idle_ping,
        idle_close: args.idle_ping * 3,
        ..WsConfig::default()
    };
    let ws = tokio::spawn(deadbolt_transport_ws::serve(
        listener,
        engine.clone(),
        ws_config,
        until(stopped.clone()),
    ));
    let quic = match args.quic {
        QuicListen::On(addr) => Some(start_quic(&args, addr, &engine, stopped.clone())?),
        QuicListen::Off => None,
    };
    tracing::info!(
        "deadbolt {} listening on ws://{ws_addr}/ws",
        env!("CARGO_PKG_VERSION")
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    // The frontends hold receivers until they return.
    let _ = stop.send(true);
    ws.await.context("the WebSocket frontend panicked")??;
    if let Some(quic) = quic {
        quic.await.context("the QUIC frontend panicked")?;
    }
    engine.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Starts the QUIC frontend on `addr`, with the certificate from the flags
/// or one generated in the data directory.
fn start_quic(
    args: &ServeArgs,
    addr: SocketAddr,
    engine: &Engine,
    stopped: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
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
    let config = QuicConfig {
        max_connections: args.quic_max_connections,
        streams_per_connection: args.quic_streams,
        idle_timeout: args.quic_idle_timeout,
        retry_above: args.quic_retry_above,
        ..QuicConfig::default()
    };
    let server_config = deadbolt_transport_quic::server_config(identity, &config)?;
    let endpoint = quinn::Endpoint::server(server_config, addr)
        .with_context(|| format!("cannot listen for QUIC on {addr}"))?;
    let local = endpoint.local_addr()?;
    tracing::info!("listening on quic://{local}");
    Ok(tokio::spawn(deadbolt_transport_quic::serve(
        endpoint,
        engine.clone(),
        config,
        until(stopped),
    )))
}

fn engine_config(args: &ServeArgs) -> EngineConfig {
    let mut config = EngineConfig::new().with_entropy();
    if let Some(shards) = args.shards {
        config.shards = shards.max(1);
    }
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

/// Resolves once `stopped` turns true (or its sender is gone).
async fn until(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch for SIGTERM; only Ctrl-C stops the server");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
