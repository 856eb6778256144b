//! The hook for plain HTTP requests: the WebSocket port upgrades `GET /ws`
//! itself and hands every other request to an [`HttpRoutes`], so that the
//! server that embeds this transport (deadbolt-server: the dashboard, the
//! browser client, metrics) decides what else the port serves.

use std::borrow::Cow;
use std::fmt;

use async_trait::async_trait;

/// Answers the plain HTTP requests of the WebSocket port: every request
/// but `/ws`. Each connection carries one request and is closed after the
/// answer.
#[async_trait]
pub trait HttpRoutes: fmt::Debug + Send + Sync + 'static {
    /// The answer to `request`.
    async fn respond(&self, request: &HttpRequest) -> HttpResponse;
}

/// The routes of a port that serves only WebSocket: `404 Not Found` to
/// everything else.
#[derive(Debug, Clone, Copy, Default)]
pub struct NotFound;

#[async_trait]
impl HttpRoutes for NotFound {
    async fn respond(&self, _request: &HttpRequest) -> HttpResponse {
        HttpResponse::not_found()
    }
}

/// What a plain request asked for. The head's other headers and any body
/// are not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// The method, as sent (`GET`, `POST`, ...).
    pub method: String,
    /// The path, without its query string.
    pub path: String,
    /// The query string, without its `?`, if there was one.
    pub query: Option<String>,
    /// The token of an `Authorization: Bearer TOKEN` header, if any: what
    /// an authenticating server's operator routes check (SPEC section 10).
    pub bearer: Option<deadbolt_core::proto::Secret>,
}

impl HttpRequest {
    /// A request for `target` (a path, perhaps with `?query`).
    pub fn new(method: &str, target: &str) -> HttpRequest {
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query.to_owned())),
            None => (target, None),
        };
        HttpRequest {
            method: method.to_owned(),
            path: path.to_owned(),
            query,
            bearer: None,
        }
    }
}

/// A complete answer. The transport adds `Content-Length`,
/// `Cache-Control: no-store` and `Connection: close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The reason phrase of the status line.
    pub reason: &'static str,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The body: built into the binary, or made for this request.
    pub body: Cow<'static, [u8]>,
}

impl HttpResponse {
    /// `200 OK` with `body`.
    pub fn ok(content_type: &'static str, body: impl Into<Cow<'static, [u8]>>) -> HttpResponse {
        HttpResponse {
            status: 200,
            reason: "OK",
            content_type,
            body: body.into(),
        }
    }

    /// A plain-text answer with any status.
    pub fn text(
        status: u16,
        reason: &'static str,
        body: impl Into<Cow<'static, [u8]>>,
    ) -> HttpResponse {
        HttpResponse {
            status,
            reason,
            content_type: "text/plain",
            body: body.into(),
        }
    }

    /// An error answer whose body repeats its status line: `404 Not Found`.
    pub fn status(status: u16, reason: &'static str) -> HttpResponse {
        HttpResponse::text(status, reason, format!("{status} {reason}\n").into_bytes())
    }

    /// `404 Not Found`.
    pub fn not_found() -> HttpResponse {
        HttpResponse::status(404, "Not Found")
    }
}
