//! `GET /metrics`: Prometheus text, through the `metrics` facade and its
//! Prometheus exporter. Request latencies and error counts are recorded as
//! they happen (in `deadbolt-core`); counters and sizes are read from the
//! engine at each scrape.
//!
//! The recorder is process-wide, as the `metrics` facade is: the first
//! [`run`](crate::run) of a process installs it, and every server in the
//! process records into it.

use std::sync::OnceLock;
use std::time::Duration;

use deadbolt_core::Engine;
use deadbolt_transport_ws::WsGauges;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Latency buckets, in seconds: 50 µs to 30 s (a lock may wait).
const BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process's Prometheus recorder, installed on first use; `None` if
/// another recorder was installed first.
fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets(BUCKETS).ok()?;
            builder.install_recorder().ok()
        })
        .as_ref()
}

/// Installs the recorder now, so that requests are measured from the
/// start rather than from the first scrape.
pub fn install() -> bool {
    handle().is_some()
}

/// How often [`run`](crate::run) calls [`upkeep`].
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Folds the latency samples recorded since the last scrape into their
/// histograms. The recorder keeps each sample (16 bytes) until then, so a
/// server that nobody scrapes would grow with every request without this.
pub fn upkeep() {
    if let Some(handle) = handle() {
        handle.run_upkeep();
    }
}

/// The metrics page, or `None` if no recorder could be installed.
pub async fn render(engine: &Engine, ws: &WsGauges) -> Option<String> {
    let handle = handle()?;
    let stats = engine.snapshot(0).await;
    let (locks, sets) = (&stats.locks, &stats.sets);
    let gauges = [
        ("deadbolt_locks_held", locks.held),
        ("deadbolt_waiters", locks.waiters),
        ("deadbolt_sets", sets.count),
        ("deadbolt_set_members", sets.members),
    ];
    for (name, value) in gauges {
        metrics::gauge!(name).set(value as f64);
    }
    let ws_gauges = [
        ("deadbolt_ws_pending_reply_bytes", ws.pending_reply_bytes()),
        ("deadbolt_ws_handshakes", ws.handshakes()),
    ];
    for (name, value) in ws_gauges {
        metrics::gauge!(name).set(value as f64);
    }
    metrics::counter!("deadbolt_ws_handshakes_evicted_total").absolute(ws.handshakes_evicted());
    for (frontend, open) in &stats.connections {
        metrics::gauge!("deadbolt_connections", "frontend" => frontend.clone()).set(*open as f64);
    }
    let counters = [
        ("deadbolt_grants_total", locks.grants),
        ("deadbolt_releases_total", locks.releases),
        ("deadbolt_expiries_total", locks.expiries),
        ("deadbolt_disconnect_releases_total", locks.disconnects),
        ("deadbolt_timeouts_total", locks.timeouts),
        ("deadbolt_cancellations_total", locks.cancellations),
        ("deadbolt_busy_total", locks.busy),
        ("deadbolt_sets_created_total", sets.created),
        ("deadbolt_sets_expired_total", sets.expired),
        ("deadbolt_sets_torn_down_total", sets.torn_down),
    ];
    for (name, value) in counters {
        metrics::counter!(name).absolute(value);
    }
    metrics::counter!("deadbolt_inserts_total", "result" => "new").absolute(sets.inserts_new);
    metrics::counter!("deadbolt_inserts_total", "result" => "duplicate")
        .absolute(sets.inserts_duplicate);
    Some(handle.render())
}
