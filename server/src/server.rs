//! [`run`]: start the engine, serve both frontends until the shutdown
//! future completes, then stop the frontends and the engine in that order.

use std::future::Future;
use std::io;
use std::sync::Arc;

use deadbolt_core::{Engine, EngineConfig};
use deadbolt_storage::{LogWriter, RecoveryReport, Store, StoreConfig};
use deadbolt_transport_ws::{Listener, WsConfig};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinError, JoinSet};
use tokio::time::MissedTickBehavior;

use crate::config::{Durable, Listeners, Peering, ServerConfig};
use crate::metrics;
use crate::routes::Routes;
use deadbolt_transport_ws::{Dialer, TcpDialer};

/// Why the server stopped without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The WebSocket frontend's accept loop failed.
    #[error("the WebSocket frontend failed")]
    WebSocket(#[source] io::Error),
    /// A frontend's task panicked.
    #[error("a frontend panicked")]
    Panicked(#[source] JoinError),
    /// The data directory cannot be used.
    #[error("cannot use the data directory")]
    Storage(#[from] deadbolt_storage::StorageError),
    /// The cluster node could not start.
    #[error("cannot start the cluster node")]
    Cluster(#[from] deadbolt_replication::StartError),
}

/// Runs the server on `listeners` until `shutdown` completes (its output is
/// ignored, so `tokio::signal::ctrl_c()` will do).
///
/// It installs the process's Prometheus recorder (once per process; see
/// [`metrics`]) and starts the engine from `config.engine`. Then it serves
/// WebSocket on `listeners.ws`, with the [`Routes`] of the dashboard, the
/// browser client and the metrics on the same port (a `GET` for any other
/// path goes to `config.ws.routes`), and QUIC on `listeners.quic`, if
/// any. On shutdown it stops the shards' clocks (nothing runs out while
/// clients cannot renew it: [`Engine::stop_clocks`]), stops both
/// frontends (each answers its requests in
/// flight `shutting_down` and closes its connections, within its shutdown
/// grace), and then shuts the engine down. If a frontend fails first, the
/// server stops the same way and returns the failure.
///
/// Dropping the returned future instead ends the server at once, without
/// the graceful part: its tasks are aborted and the engine's shards end
/// with their last handle. That is a crash, which is how the simulation can
/// crash a server host.
pub async fn run<L: Listener>(
    config: ServerConfig,
    listeners: Listeners<L>,
    shutdown: impl Future,
) -> Result<(), Error> {
    run_node::<L, TcpDialer>(config, listeners, None, shutdown).await
}

/// Like [`run`], and with `peering`, as one node of a cluster (SPEC
/// section 9): the engine is a replica of the cluster's Raft log, kept in
/// the cluster's data directory (`config.storage` is not used), the peer
/// port is served beside the frontends, and `GET /cluster` shows the
/// node's view of the cluster.
pub async fn run_node<L: Listener, D: Dialer + Clone>(
    config: ServerConfig,
    listeners: Listeners<L>,
    peering: Option<Peering<L, D>>,
    shutdown: impl Future,
) -> Result<(), Error> {
    if !metrics::install() {
        tracing::warn!("no metrics: another metrics recorder is installed");
    }
    let (engine, ending, store) = match peering {
        Some(peering) => {
            let node = deadbolt_replication::start(
                peering.cluster,
                config.engine,
                peering.listener,
                peering.dialer,
            )
            .await?;
            (node.engine.clone(), Ending::Node(node), None)
        }
        None => {
            let (engine, log_writer, store) = start_engine(config.engine, config.storage)?;
            (engine, Ending::Single(log_writer), store)
        }
    };
    let mut routes = Routes::new(engine.clone(), config.ws.routes.clone())
        .with_ws_gauges(config.ws.gauges.clone());
    // Consumed here: the engine keeps the only strong reference, so that
    // the log writer ends when the engine stops.
    if let Some(store) = store {
        routes = routes.with_backups(&store);
    }
    if let Ending::Node(node) = &ending {
        routes = routes.with_cluster(node.raft.clone());
    }
    let ws_config = WsConfig {
        routes: Arc::new(routes),
        ..config.ws
    };
    let (stop, stopped) = watch::channel(false);
    // A set, so that dropping `run` aborts the frontends with it.
    let mut frontends = JoinSet::new();
    frontends.spawn(serve_ws(
        listeners.ws,
        engine.clone(),
        ws_config,
        stopped.clone(),
    ));
    if let Some(endpoint) = listeners.quic {
        let serve = deadbolt_transport_quic::serve(
            endpoint,
            engine.clone(),
            config.quic,
            until(stopped.clone()),
        );
        frontends.spawn(async move {
            serve.await;
            Ok(())
        });
    }
    let mut failure = serve_until(shutdown, &mut frontends).await;
    tracing::info!("shutting down");
    // Before the frontends stop listening: nothing may run out while
    // clients can no longer renew it.
    engine.stop_clocks();
    // The frontends hold receivers until they return; if they are all
    // gone already, there is nobody left to tell.
    let _ = stop.send(true);
    while let Some(ended) = frontends.join_next().await {
        if let Err(error) = flatten(ended) {
            failure.get_or_insert(error);
        }
    }
    engine.shutdown().await;
    drop(engine);
    match ending {
        Ending::Node(node) => node.shutdown().await,
        // It ends once the shards, the last holders of the store, are gone.
        Ending::Single(Some(log_writer)) => {
            let _ = log_writer.await;
        }
        Ending::Single(None) => {}
    }
    tracing::info!("stopped");
    failure.map_or(Ok(()), Err)
}

/// What to wait for after the engine has stopped.
enum Ending {
    /// A single server's log writer, if it is durable.
    Single(Option<oneshot::Receiver<()>>),
    /// A cluster node: Raft, its peer port and its log writer.
    Node(deadbolt_replication::Node),
}

/// A started engine, the end of its log writer (to wait for after the
/// engine) and its store (for backups), if it is durable.
type Started = (Engine, Option<oneshot::Receiver<()>>, Option<Arc<Store>>);

/// Starts the engine: empty, or recovered from `storage` and journaling
/// into it.
fn start_engine(mut engine: EngineConfig, storage: Option<Durable>) -> Result<Started, Error> {
    let Some(durable) = storage else {
        return Ok((Engine::start(engine), None, None));
    };
    let mut store = durable.store.clone();
    store.yield_to_shards = durable.writer_thread;
    let opened = deadbolt_storage::open(durable.disk, store, &engine)?;
    report_recovery(&durable.store, &opened.report);
    if let Some(auth) = &engine.auth {
        recount_quotas(auth, &opened.shards);
    }
    engine.start_at = opened.start_at;
    engine.journal = Some(opened.store.clone());
    let ended = spawn_writer(opened.writer, durable.writer_thread);
    let engine = Engine::start_with(engine, opened.shards);
    Ok((engine, Some(ended), Some(opened.store)))
}

/// Counts what the recovered `shards` hold against the quotas of the
/// principals that own their client ids (see
/// [`deadbolt_core::auth::quota`]): a restart must not give a principal
/// its quota afresh.
fn recount_quotas(auth: &deadbolt_core::auth::Auth, shards: &[deadbolt_core::shard::Shard]) {
    let mut census = deadbolt_core::auth::quota::Census::default();
    for shard in shards {
        census.add(&shard.image());
    }
    auth.usage().forget();
    auth.usage().rebuild(&census, tokio::time::Instant::now());
    tracing::info!("quotas count the recovered locks, sets and members");
}

/// Runs the log writer on its own thread or as a task; the receiver hears
/// when it has ended.
fn spawn_writer(writer: LogWriter, own_thread: bool) -> oneshot::Receiver<()> {
    let (ended, on_end) = oneshot::channel();
    let run = async move {
        writer.run().await;
        let _ = ended.send(());
    };
    if !own_thread {
        tokio::spawn(run);
        return on_end;
    }
    let spawned = std::thread::Builder::new()
        .name("deadbolt-log".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(runtime) => runtime.block_on(run),
                Err(error) => tracing::error!("cannot start the log writer: {error}"),
            }
        });
    if let Err(error) = spawned {
        tracing::error!("cannot start the log writer's thread: {error}");
    }
    on_end
}

fn report_recovery(store: &StoreConfig, report: &RecoveryReport) {
    tracing::info!(
        data_dir = %store.dir.display(),
        snapshots = report.snapshots,
        records = report.records,
        fsync = ?store.fsync,
        "recovered the data directory"
    );
    if let Some((path, offset, bytes)) = &report.torn_tail {
        tracing::warn!(
            "the log ended in a torn record (a write cut short by a crash): cut {bytes}              bytes off {} at byte {offset}",
            path.display()
        );
    }
}

/// Waits for `shutdown`, or for a frontend to fail, whichever comes first;
/// meanwhile keeps the metrics recorder drained.
async fn serve_until(
    shutdown: impl Future,
    frontends: &mut JoinSet<Result<(), Error>>,
) -> Option<Error> {
    tokio::pin!(shutdown);
    let mut upkeep = tokio::time::interval(metrics::UPKEEP_INTERVAL);
    upkeep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => return None,
            Some(ended) = frontends.join_next(), if !frontends.is_empty() => match flatten(ended) {
                // Only QUIC ends cleanly before shutdown: its endpoint was
                // closed by its owner. WebSocket clients are still served.
                Ok(()) => tracing::warn!("the QUIC endpoint closed; serving WebSocket only"),
                Err(error) => {
                    tracing::error!(%error, "stopping the server");
                    return Some(error);
                }
            },
            _ = upkeep.tick() => metrics::upkeep(),
        }
    }
}

async fn serve_ws<L: Listener>(
    listener: L,
    engine: Engine,
    config: WsConfig,
    stopped: watch::Receiver<bool>,
) -> Result<(), Error> {
    deadbolt_transport_ws::serve(listener, engine, config, until(stopped))
        .await
        .map_err(Error::WebSocket)
}

fn flatten(ended: Result<Result<(), Error>, JoinError>) -> Result<(), Error> {
    ended.map_err(Error::Panicked)?
}

/// Resolves once `stopped` turns true (or its sender is gone).
async fn until(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}
