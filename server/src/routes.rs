//! The HTTP side of the WebSocket port, besides `/ws`: the dashboard
//! (`GET /`), the browser client and its types (`/deadbolt.js`,
//! `/deadbolt.d.ts`), `/metrics`, `/healthz` and `/pubkey`. The transport hands these
//! requests to [`Routes`] through its [`HttpRoutes`] hook.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use deadbolt_core::{Engine, proof};
use deadbolt_transport_ws::{HttpRequest, HttpResponse, HttpRoutes, WsGauges};

use crate::metrics;

/// A file served as it was built into the binary.
#[derive(Debug)]
struct Asset {
    /// The paths it answers.
    paths: &'static [&'static str],
    /// Its `Content-Type`.
    content_type: &'static str,
    /// Its bytes.
    body: &'static str,
}

/// The dashboard, and the browser client with its types.
const ASSETS: &[Asset] = &[
    Asset {
        paths: &["/", "/index.html"],
        content_type: "text/html; charset=utf-8",
        body: include_str!("../web/index.html"),
    },
    Asset {
        paths: &["/deadbolt.js"],
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../web/deadbolt.js"),
    },
    Asset {
        paths: &["/deadbolt.d.ts"],
        content_type: "application/typescript; charset=utf-8",
        body: include_str!("../web/deadbolt.d.ts"),
    },
];

/// `Content-Type` of the metrics page: Prometheus text format 0.0.4.
/// Where a `POST` readmits a cluster node that lost its disk.
const READMIT_PATH: &str = "/cluster/readmit/";
/// `POST` here makes a backup of the data directory (`deadbolt backup --online`).
const BACKUP_PATH: &str = "/backup";

/// Where the key that checks grant proofs is served.
pub const PUBKEY_PATH: &str = "/pubkey";

const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// deadbolt's plain HTTP routes. Only `GET` is served (anything else gets
/// `405`) but for the `POST`s of `/cluster/readmit/N` and `/backup`; a
/// `GET` for a path not listed above goes to the fallback.
pub struct Routes {
    /// Read by `/metrics`.
    engine: Engine,
    /// The WebSocket frontend's load, also read by `/metrics`.
    ws_gauges: WsGauges,
    /// Answers the `GET`s these routes do not know.
    fallback: Arc<dyn HttpRoutes>,
    /// A cluster node's Raft, read by `/cluster`.
    cluster: Option<deadbolt_replication::types::Raft>,
    /// A durable single server's store, for `POST /backup`. Weak: the log
    /// writer ends once the engine lets go of the store, at shutdown.
    store: Option<Weak<deadbolt_storage::Store>>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("cluster", &self.cluster.is_some())
            .finish_non_exhaustive()
    }
}

impl Routes {
    /// The routes of `engine`'s server, handing unknown paths to
    /// `fallback` (such as [`NotFound`](deadbolt_transport_ws::NotFound)).
    pub fn new(engine: Engine, fallback: Arc<dyn HttpRoutes>) -> Routes {
        Routes {
            engine,
            ws_gauges: WsGauges::default(),
            fallback,
            cluster: None,
            store: None,
        }
    }

    /// Answers `POST /backup` by copying the data directory of `store`
    /// into a new directory under its `backup_dir`.
    pub fn with_backups(self, store: &Arc<deadbolt_storage::Store>) -> Routes {
        Routes {
            store: Some(Arc::downgrade(store)),
            ..self
        }
    }

    /// `POST /backup`: a copy of the data directory as it is now.
    async fn backup(&self, method: &str) -> HttpResponse {
        if method != "POST" {
            return HttpResponse::status(405, "Method Not Allowed");
        }
        let Some(store) = &self.store else {
            let body = "no data directory to back up: the server runs --in-memory, \
                        or is a cluster node (a node that lost its data is readmitted)\n";
            return HttpResponse::text(404, "Not Found", body.as_bytes().to_vec());
        };
        let Some(store) = store.upgrade() else {
            let body = &b"the server is stopping\n"[..];
            return HttpResponse::text(503, "Service Unavailable", body);
        };
        match store.backup().await {
            Ok(dest) => HttpResponse::ok(
                "text/plain",
                format!("backed up to {}\n", dest.display()).into_bytes(),
            ),
            Err(why) => {
                HttpResponse::text(503, "Service Unavailable", format!("{why}\n").into_bytes())
            }
        }
    }

    /// Answers `GET /cluster` with this node's view of its cluster (SPEC
    /// section 9, `deadbolt cluster status`).
    pub fn with_cluster(self, raft: deadbolt_replication::types::Raft) -> Routes {
        Routes {
            cluster: Some(raft),
            ..self
        }
    }

    /// `POST /cluster/readmit/N`: readmit node N, which lost its disk.
    async fn readmit(&self, method: &str, node: &str) -> HttpResponse {
        if method != "POST" {
            return HttpResponse::status(405, "Method Not Allowed");
        }
        let Some(raft) = &self.cluster else {
            return HttpResponse::text(404, "Not Found", &b"not a cluster\n"[..]);
        };
        let Ok(node) = node.parse() else {
            return HttpResponse::text(
                400,
                "Bad Request",
                &b"expected /cluster/readmit/NODE_ID\n"[..],
            );
        };
        match deadbolt_replication::readmit(raft, node).await {
            Ok(()) => HttpResponse::ok(
                "text/plain",
                format!("node {node} readmitted\n").into_bytes(),
            ),
            Err(refusal @ deadbolt_replication::Refusal::NotLeader(_)) => HttpResponse::text(
                421,
                "Misdirected Request",
                format!("{refusal}\n").into_bytes(),
            ),
            Err(refusal) => HttpResponse::text(
                503,
                "Service Unavailable",
                format!("{refusal}\n").into_bytes(),
            ),
        }
    }

    fn cluster_status(&self) -> HttpResponse {
        let Some(raft) = &self.cluster else {
            let body = &b"not a cluster: this server runs alone\n"[..];
            return HttpResponse::text(404, "Not Found", body);
        };
        let status = deadbolt_replication::ClusterStatus::of(&raft.metrics().borrow());
        match serde_json::to_vec_pretty(&status) {
            Ok(json) => HttpResponse::ok("application/json", json),
            Err(_) => HttpResponse::status(500, "Internal Server Error"),
        }
    }

    /// `GET /pubkey`: the key that checks this server's grant proofs, as a
    /// JSON Web Key Set (`{"keys":[…]}`). Public: it proves nothing by
    /// itself, so it needs no credentials.
    fn pubkey(&self) -> HttpResponse {
        let Some(signer) = self.engine.grant_signer() else {
            let body = "this server does not sign grants (deadbolt serve --sign-grants)\n";
            return HttpResponse::text(404, "Not Found", body.as_bytes().to_vec());
        };
        let keys = std::slice::from_ref(signer.public_key());
        HttpResponse::ok("application/json", proof::jwks(keys).into_bytes())
    }

    /// Reports the load of the WebSocket frontend that reports to
    /// `gauges` on `/metrics`.
    pub fn with_ws_gauges(self, gauges: WsGauges) -> Routes {
        Routes {
            ws_gauges: gauges,
            ..self
        }
    }
}

/// The paths only an admin may use when the server authenticates (SPEC
/// section 10): what they show or do is the whole server's. The dashboard
/// page and the browser client are the same bytes for everyone and carry
/// no data: the dashboard reads `stats`, which is admin-only too.
fn for_admins(path: &str) -> bool {
    path == "/metrics"
        || path == "/cluster"
        || path == BACKUP_PATH
        || path.starts_with(READMIT_PATH)
}

impl Routes {
    /// `401` unless `request` carries an admin's secret as its bearer
    /// token, when the server authenticates; `None` when it may proceed.
    fn refuse_non_admin(&self, request: &HttpRequest) -> Option<HttpResponse> {
        let auth = self.engine.auth()?;
        let principal = request
            .bearer
            .as_ref()
            .and_then(|secret| auth.policy().authenticate(secret));
        match principal {
            Some(principal) if principal.admin => None,
            Some(_) => Some(HttpResponse::text(
                403,
                "Forbidden",
                &b"forbidden: this principal is not an admin\n"[..],
            )),
            None => Some(HttpResponse::text(
                401,
                "Unauthorized",
                &b"unauthorized: send an admin's secret as `Authorization: Bearer SECRET`\n"[..],
            )),
        }
    }
}

#[async_trait]
impl HttpRoutes for Routes {
    async fn respond(&self, request: &HttpRequest) -> HttpResponse {
        if for_admins(&request.path)
            && let Some(refusal) = self.refuse_non_admin(request)
        {
            return refusal;
        }
        if let Some(node) = request.path.strip_prefix(READMIT_PATH) {
            return self.readmit(&request.method, node).await;
        }
        if request.path == BACKUP_PATH {
            return self.backup(&request.method).await;
        }
        if request.method != "GET" {
            return HttpResponse::status(405, "Method Not Allowed");
        }
        let path = request.path.as_str();
        if let Some(asset) = ASSETS.iter().find(|a| a.paths.contains(&path)) {
            return HttpResponse::ok(asset.content_type, asset.body.as_bytes());
        }
        match path {
            "/healthz" => HttpResponse::ok("text/plain", &b"ok\n"[..]),
            "/cluster" => self.cluster_status(),
            PUBKEY_PATH => self.pubkey(),
            "/metrics" => match metrics::render(&self.engine, &self.ws_gauges).await {
                Some(text) => HttpResponse::ok(METRICS_CONTENT_TYPE, text.into_bytes()),
                None => HttpResponse::text(
                    503,
                    "Service Unavailable",
                    &b"metrics unavailable: another recorder is installed\n"[..],
                ),
            },
            _ => self.fallback.respond(request).await,
        }
    }
}
