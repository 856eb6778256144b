//! The cluster's operator: readmits a node that lost its disk, as
//! `deadbolt cluster readmit N` does (`POST /cluster/readmit/N` on the
//! leader's WebSocket port).
//!
//! A node that comes back without its disk is refused by its peers (it
//! could vote twice in a term); the fault driver asks for its readmission
//! a while after it restarted, so that the cluster first runs with it
//! fenced off. The leader then takes it out of the voters, catches it up
//! as a learner and makes it a voter again; faults may come meanwhile,
//! and the operator asks again until it is done.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ClusterControl, node_name};
use crate::history::{Actor, What, now_us};
use crate::worker::WS_PORT;

/// How long after a node without its disk restarted its readmission is
/// asked for.
pub const READMIT_AFTER_MS: u64 = 500;
/// How long one readmission may take before it is asked again (it waits
/// for the node to catch up).
const READMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the operator waits between two tries.
const RETRY: Duration = Duration::from_millis(300);

/// The nodes waiting to be readmitted, with when to ask.
#[derive(Debug, Clone, Default)]
pub(crate) struct Readmissions(Arc<Mutex<Vec<(u64, u64)>>>);

impl Readmissions {
    fn lock(&self) -> MutexGuard<'_, Vec<(u64, u64)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for `node`'s readmission from `at_us` on.
    pub(crate) fn ask(&self, node: u64, at_us: u64) {
        self.lock().push((node, at_us));
    }

    /// The first node whose readmission is due at `now_us`, taken out.
    fn due(&self, now_us: u64) -> Option<u64> {
        let mut asked = self.lock();
        let at = asked.iter().position(|&(_, at_us)| at_us <= now_us)?;
        Some(asked.remove(at).0)
    }
}

/// The operator host: readmits every node it is asked to, until the run
/// ends.
pub(crate) async fn run(control: ClusterControl) -> turmoil::Result {
    loop {
        match control.readmissions.due(now_us()) {
            Some(node) => readmit(&control, node).await,
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Readmits `node`, asking the leader (or, with none known, each node in
/// turn) until one says it is done.
async fn readmit(control: &ClusterControl, node: u64) {
    let record = |what| control.history.record(Actor::Operator, what);
    let mut tries: u64 = 0;
    loop {
        let ask = control
            .leaders
            .current()
            .unwrap_or(tries % super::plan::NODES + 1);
        let path = format!("/cluster/readmit/{node}");
        let answer = tokio::time::timeout(READMIT_TIMEOUT, post(&node_name(ask), &path)).await;
        match answer {
            Ok(Ok(200)) => return record(What::Readmitted { node, by: ask }),
            Ok(Ok(status)) => record(What::ReadmitRefused {
                node,
                by: ask,
                status,
            }),
            // No answer: 0.
            _ => record(What::ReadmitRefused {
                node,
                by: ask,
                status: 0,
            }),
        }
        tries += 1;
        tokio::time::sleep(RETRY).await;
    }
}

/// `POST`s `path` to `host`'s WebSocket port; the status of the answer.
async fn post(host: &str, path: &str) -> std::io::Result<u16> {
    let mut stream = turmoil::net::TcpStream::connect((host, WS_PORT)).await?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buffer = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..read]);
    }
    // "HTTP/1.1 200 OK": the second word.
    let status = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok());
    status.ok_or_else(|| std::io::Error::other("no status line"))
}
