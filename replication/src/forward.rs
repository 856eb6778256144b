//! How a follower reaches the leader: for each of its client connections,
//! a WebSocket connection to the leader's [`FORWARDED_PATH`], which says
//! `hello` as that client, so the leader sees the client's own id.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use deadbolt_core::client::{Connection, Connector};
use deadbolt_core::engine::replica::Forwarder;
use deadbolt_core::proto::{Okay, Op, Request, Secret, ServerError};
use deadbolt_transport_ws::{Dialer, FORWARDED_PATH, WsConnector};

use crate::network::Directory;
use crate::types::Raft;

/// Forwards to the leader openraft knows of.
pub struct LeaderForwarder<D> {
    /// Set once Raft has started (the engine starts first).
    pub raft: Arc<OnceLock<Raft>>,
    /// Where each node's WebSocket port is.
    pub directory: Directory,
    /// Opens streams to the leader.
    pub dialer: D,
}

fn unavailable(why: impl Into<String>) -> ServerError {
    ServerError::unavailable(why.into())
}

#[async_trait]
impl<D: Dialer + Clone> Forwarder for LeaderForwarder<D> {
    fn leader(&self) -> Option<u64> {
        self.raft.get()?.metrics().borrow().current_leader
    }

    async fn open(
        &self,
        client: &str,
        auth: Option<&Secret>,
    ) -> Result<(u64, Arc<dyn Connection>), ServerError> {
        let leader = self
            .leader()
            .ok_or_else(|| unavailable("no leader right now (an election is under way)"))?;
        let base = self
            .directory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&leader)
            .cloned()
            .ok_or_else(|| unavailable(format!("node {leader} leads, but has not called yet")))?;
        let url = format!("{base}{FORWARDED_PATH}");
        let connector = WsConnector::with_dialer(&url, self.dialer.clone())
            .map_err(|e| unavailable(format!("leader {leader}: {e}")))?;
        let connection = connector
            .connect()
            .await
            .map_err(|e| unavailable(format!("leader {leader}: {e}")))?;
        let hello = Request {
            id: 0,
            op: Op::Hello {
                client: client.to_owned(),
                auth: auth.cloned(),
            },
        };
        match connection.call(hello).await {
            Ok(Ok(Okay::Hello(_))) => Ok((leader, connection)),
            Ok(Err(error)) => Err(error),
            Ok(Ok(other)) => Err(unavailable(format!(
                "leader {leader} answered hello with {other:?}"
            ))),
            Err(e) => Err(unavailable(format!("leader {leader}: {e}"))),
        }
    }
}
