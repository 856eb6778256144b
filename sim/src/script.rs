//! Short scripted scenarios, turmoil-test style, for the rules that random
//! seeds reach rarely: a script builds a small world (the real server
//! assembly on simulated TCP, clients on the real Rust client), steps it,
//! cuts and repairs links, and asserts on what each side saw.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadbolt_core::client::{Client, ClientOptions, Error};
use deadbolt_server::{Listeners, ServerConfig};
use deadbolt_transport_ws::{WsClientConfig, WsConnector};

use crate::disk::{DiskControl, storage};
use crate::net::{SimDialer, SimListener, engine_config, ws_config};
use crate::trace::Trace;
use crate::worker::WS_PORT;

/// The server host's name.
pub const SERVER: &str = "server";

/// A world for a script: fixed 5 ms links, 1 ms ticks, up to a minute.
pub fn world(seed: u64) -> turmoil::Sim<'static> {
    turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(60))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(5))
        .build()
}

/// The scripted server's shard count.
pub const SCRIPT_SHARDS: usize = 2;
/// The scripted server's log segments and snapshot threshold: small, so
/// that scripts snapshot too.
const SEGMENT_BYTES: u64 = 16 << 10;

/// Adds the server host: `deadbolt_server::run` with WebSocket only, on a
/// data directory of the simulated disk (so a script may crash and bounce
/// it), the shards' invariants checked and the log's records kept in
/// `trace`, and short idle limits so that a dead peer is noticed within
/// about a second.
pub fn add_server(sim: &mut turmoil::Sim<'_>, trace: &Arc<Trace>) {
    let trace = Arc::clone(trace);
    let disk = DiskControl::new(None, None, &trace);
    sim.host(SERVER, move || {
        let config = ServerConfig {
            engine: engine_config(SCRIPT_SHARDS, 0, &trace),
            ws: ws_config(),
            storage: Some(storage(&disk, &trace, SEGMENT_BYTES, SEGMENT_BYTES)),
            ..ServerConfig::default()
        };
        async move {
            let ws = turmoil::net::TcpListener::bind(("0.0.0.0", WS_PORT)).await?;
            let listeners = Listeners {
                ws: SimListener(ws),
                quic: None,
            };
            deadbolt_server::run(config, listeners, std::future::pending::<()>()).await?;
            Ok(())
        }
    });
}

/// A client of the server, over simulated TCP, that notices a silent
/// server within about a second and retries for up to 20 s.
pub async fn connect() -> Result<Client, Error> {
    connect_with(None).await
}

/// [`connect`] as client `client_id`.
pub async fn connect_as(client_id: &str) -> Result<Client, Error> {
    connect_with(Some(client_id.to_owned())).await
}

async fn connect_with(client_id: Option<String>) -> Result<Client, Error> {
    let config = WsClientConfig {
        connect_timeout: Duration::from_millis(1000),
        ping_interval: Duration::from_millis(250),
        silence_timeout: Duration::from_millis(1000),
        ..WsClientConfig::default()
    };
    let url = format!("ws://{SERVER}:{WS_PORT}/ws");
    let connector = WsConnector::with_dialer(&url, SimDialer)?.config(config);
    let options = ClientOptions {
        client_id,
        retry_for: Duration::from_secs(20),
        retry_delay: Duration::from_millis(50),
        retry_delay_max: Duration::from_millis(500),
        ..ClientOptions::default()
    };
    Client::connect(connector, options).await
}

/// What the hosts of a script saw, in the order they saw it, with the
/// simulated time in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct Log(Arc<Mutex<Vec<(u64, String)>>>);

impl Log {
    /// Notes `what` at the current simulated time.
    pub fn note(&self, what: impl Into<String>) {
        let ms = turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((ms, what.into()));
    }

    /// When `what` was first noted, if it was.
    pub fn when(&self, what: &str) -> Option<u64> {
        let entries = self.0.lock().unwrap_or_else(|p| p.into_inner());
        entries.iter().find(|(_, w)| w == what).map(|(ms, _)| *ms)
    }

    /// Everything noted, for failure messages.
    pub fn dump(&self) -> String {
        let entries = self.0.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .iter()
            .map(|(ms, what)| format!("{ms:>6} ms  {what}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Steps `sim` until `done` holds or `limit_ms` of simulated time pass;
/// whether `done` held.
pub fn step_until(
    sim: &mut turmoil::Sim<'_>,
    limit_ms: u64,
    mut done: impl FnMut() -> bool,
) -> turmoil::Result<bool> {
    let limit = Duration::from_millis(limit_ms);
    while sim.elapsed() < limit {
        if done() {
            return Ok(true);
        }
        sim.step()?;
    }
    Ok(done())
}
