//! Several servers behind one [`Connector`]: the client of a replicated
//! cluster (SPEC section 9), where any node accepts clients.
//!
//! [`FailoverConnector`] keeps a current server. A connect goes to it
//! first and, if that fails, to the next one and the next, once round the
//! list; the one that answers becomes current. When a whole round fails
//! the connect fails, and the [`Client`](super::Client) backs off and
//! tries another round within its retry budget, as it does for one
//! server: there is one retry loop, the client's. When a server answers
//! that it cannot serve now (`unavailable`: no quorum or no leader;
//! `shutting_down`), the client drops that connection and calls
//! [`Connector::fail_over`], which makes the next server current.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;

use super::{Connection, Connector, TransportError};

/// Opens connections to the first of several servers that answers, trying
/// them in turn from the current one. Any transports may be mixed.
pub struct FailoverConnector {
    servers: Vec<Arc<dyn Connector>>,
    /// The index of the server to try first: the one that last answered,
    /// or the one after a server that said it cannot serve.
    current: AtomicUsize,
}

impl std::fmt::Debug for FailoverConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverConnector")
            .field("servers", &self.server())
            .field("current", &self.current.load(Ordering::Relaxed))
            .finish()
    }
}

impl FailoverConnector {
    /// Connections to `servers`, tried in this order first. `None` if the
    /// list is empty.
    pub fn new(servers: Vec<Arc<dyn Connector>>) -> Option<FailoverConnector> {
        if servers.is_empty() {
            return None;
        }
        Some(FailoverConnector {
            servers,
            current: AtomicUsize::new(0),
        })
    }

    /// The address of the server a connect tries first.
    pub fn current_server(&self) -> String {
        self.servers[self.current_index()].server()
    }

    fn current_index(&self) -> usize {
        self.current.load(Ordering::Acquire) % self.servers.len()
    }
}

#[async_trait]
impl Connector for FailoverConnector {
    /// Tries every server once, from the current one; the first that
    /// answers becomes current. Fails with every server's reason if none
    /// does.
    async fn connect(&self) -> Result<Arc<dyn Connection>, TransportError> {
        let start = self.current_index();
        let mut reasons = Vec::with_capacity(self.servers.len());
        for step in 0..self.servers.len() {
            let at = (start + step) % self.servers.len();
            match self.servers[at].connect().await {
                Ok(connection) => {
                    self.current.store(at, Ordering::Release);
                    if step > 0 {
                        tracing::info!(server = self.servers[at].server(), "failed over");
                    }
                    return Ok(connection);
                }
                Err(error) => reasons.push(reason_of(&error)),
            }
        }
        Err(TransportError::Connect {
            server: self.server(),
            reason: reasons.join("; "),
        })
    }

    /// Every server, comma-separated, as the command line takes them.
    fn server(&self) -> String {
        let servers: Vec<String> = self.servers.iter().map(|s| s.server()).collect();
        servers.join(",")
    }

    /// Makes the server after the current one current.
    fn fail_over(&self) {
        let next = (self.current_index() + 1) % self.servers.len();
        self.current.store(next, Ordering::Release);
    }
}

/// One server's failure, naming the server.
fn reason_of(error: &TransportError) -> String {
    match error {
        TransportError::Connect { server, reason } => format!("{server}: {reason}"),
        other => other.to_string(),
    }
}
