//! Planted bugs: a corrupting proxy between the WebSocket workers and the
//! server, and the state machine's, the storage's and the replication's
//! own planted bugs. For the proxy's, nothing in the production code
//! changes: the proxy lies to the workers the way a broken server would.
//! The others are small mistakes in the rules themselves
//! (`deadbolt_state::planted`), in the log and its recovery
//! (`deadbolt_storage::planted`) or in a cluster's replicated engine
//! (`deadbolt_core::engine::planted`: a follower that grants on its own,
//! a leader that answers before a majority has the batch), compiled only
//! with the `planted-bugs` feature. A test shows the checkers catch each.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use deadbolt_core::engine::planted::{EventBug, ReplicaBug};
use deadbolt_core::shard::planted::PlantedBug;
use deadbolt_storage::StorageBug;

use crate::history::{Actor, History, What};
use crate::worker::WS_PORT;

/// A bug the proxy can plant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bug {
    /// Grants a lock without asking the server: a second holder.
    DoubleGrant,
    /// Replaces a grant's token with an earlier token of the same key.
    LowerToken,
    /// Tells an inserter `first: true` when the server said false.
    DoubleFirst,
    /// Reports a lease four times longer than the server granted: the
    /// lease runs past the deadline the holder believes in.
    StretchLease,
    /// Acknowledges an insert without passing it on: it is lost.
    DropInsert,
    /// A bug in the state machine itself (no proxy).
    Server(PlantedBug),
    /// A bug in the storage: the log or its recovery (no proxy).
    Storage(StorageBug),
    /// A bug in a cluster's replicated engine (no proxy).
    Replica(ReplicaBug),
    /// A bug in the engine's pushed events (no proxy).
    Events(EventBug),
}

impl Bug {
    /// Every planted bug: the proxy's, then the state machine's, the
    /// storage's, the replication's and the pushed events'.
    pub const ALL: [Bug; 29] = [
        Bug::DoubleGrant,
        Bug::LowerToken,
        Bug::DoubleFirst,
        Bug::StretchLease,
        Bug::DropInsert,
        Bug::Server(PlantedBug::ALL[0]),
        Bug::Server(PlantedBug::ALL[1]),
        Bug::Server(PlantedBug::ALL[2]),
        Bug::Server(PlantedBug::ALL[3]),
        Bug::Server(PlantedBug::ALL[4]),
        Bug::Server(PlantedBug::ALL[5]),
        Bug::Server(PlantedBug::ALL[6]),
        Bug::Server(PlantedBug::ALL[7]),
        Bug::Server(PlantedBug::ALL[8]),
        Bug::Server(PlantedBug::ALL[9]),
        Bug::Server(PlantedBug::ALL[10]),
        Bug::Server(PlantedBug::ALL[11]),
        Bug::Server(PlantedBug::ALL[12]),
        Bug::Server(PlantedBug::ALL[13]),
        Bug::Server(PlantedBug::ALL[14]),
        Bug::Server(PlantedBug::ALL[15]),
        Bug::Storage(StorageBug::ALL[0]),
        Bug::Storage(StorageBug::ALL[1]),
        Bug::Storage(StorageBug::ALL[2]),
        Bug::Replica(ReplicaBug::ALL[0]),
        Bug::Replica(ReplicaBug::ALL[1]),
        Bug::Events(EventBug::ALL[0]),
        Bug::Events(EventBug::ALL[1]),
        Bug::Events(EventBug::ALL[2]),
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Bug::DoubleGrant => "double-grant",
            Bug::LowerToken => "lower-token",
            Bug::DoubleFirst => "double-first",
            Bug::StretchLease => "stretch-lease",
            Bug::DropInsert => "drop-insert",
            Bug::Server(bug) => bug.name(),
            Bug::Storage(bug) => bug.name(),
            Bug::Replica(bug) => bug.name(),
            Bug::Events(bug) => bug.name(),
        }
    }

    /// The bug named `name`.
    pub fn from_name(name: &str) -> Option<Bug> {
        Bug::ALL.into_iter().find(|b| b.name() == name)
    }

    /// The state machine's bug, if this is one.
    pub fn planted(self) -> Option<PlantedBug> {
        match self {
            Bug::Server(bug) => Some(bug),
            _ => None,
        }
    }

    /// The storage's bug, if this is one.
    pub fn storage(self) -> Option<StorageBug> {
        match self {
            Bug::Storage(bug) => Some(bug),
            _ => None,
        }
    }

    /// The replication's bug, if this is one.
    pub fn replica(self) -> Option<ReplicaBug> {
        match self {
            Bug::Replica(bug) => Some(bug),
            _ => None,
        }
    }

    /// The pushed events' bug, if this is one.
    pub fn events(self) -> Option<EventBug> {
        match self {
            Bug::Events(bug) => Some(bug),
            _ => None,
        }
    }

    /// Whether it is compiled in only with the `planted-bugs` feature.
    pub fn needs_feature(self) -> bool {
        self.planted().is_some()
            || self.storage().is_some()
            || self.replica().is_some()
            || self.events().is_some()
    }

    /// Whether the proxy plants it (so WebSocket workers go through it).
    pub fn needs_proxy(self) -> bool {
        !self.needs_feature()
    }
}

/// What the proxy remembers across connections.
#[derive(Default)]
struct Memory {
    /// How many chances to lie it has had: it lies on every other one.
    chances: u64,
    /// Per lock key, the tokens granted so far.
    tokens: BTreeMap<String, Vec<u64>>,
}

impl Memory {
    /// Whether to lie at this chance: at every other one for the bugs that
    /// invent answers (so the workload still makes progress), at every one
    /// for the bugs that bend real answers.
    fn lie_now(&mut self, bug: Bug) -> bool {
        self.chances += 1;
        match bug {
            Bug::DoubleGrant | Bug::DropInsert => self.chances.is_multiple_of(2),
            Bug::LowerToken | Bug::DoubleFirst | Bug::StretchLease => true,
            Bug::Server(_) | Bug::Storage(_) | Bug::Replica(_) | Bug::Events(_) => false,
        }
    }
}

/// A client silent this long is gone (workers ping every 250 ms): the
/// proxy drops both sides, as a server would.
const CLIENT_SILENCE: std::time::Duration = std::time::Duration::from_millis(1500);

/// Serves as the workers' WebSocket server, relaying to the real one.
pub async fn serve(bug: Bug, history: History) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", WS_PORT)).await?;
    let memory = Arc::new(Mutex::new(Memory::default()));
    loop {
        let (stream, _) = listener.accept().await?;
        let (memory, history) = (memory.clone(), history.clone());
        tokio::spawn(async move {
            // A broken relay is a dropped connection; the worker reconnects.
            let _ = relay(stream, bug, memory, history).await;
        });
    }
}

async fn relay(
    stream: turmoil::net::TcpStream,
    bug: Bug,
    memory: Arc<Mutex<Memory>>,
    history: History,
) -> Result<(), Box<dyn std::error::Error>> {
    let client = tokio_tungstenite::accept_async(stream).await?;
    let upstream = turmoil::net::TcpStream::connect(("server", WS_PORT)).await?;
    let (server, _) =
        tokio_tungstenite::client_async(format!("ws://server:{WS_PORT}/ws"), upstream).await?;
    let (mut to_client, mut from_client) = client.split();
    let (mut to_server, mut from_server) = server.split();
    let mut asked: BTreeMap<u64, Value> = BTreeMap::new();
    let lie = |detail: String| {
        history.record(
            Actor::Driver,
            What::Fault {
                kind: "planted bug",
                detail,
            },
        )
    };
    let mut heard = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(CLIENT_SILENCE / 3);
    loop {
        tokio::select! {
            biased;
            _ = tick.tick() => {
                if heard.elapsed() > CLIENT_SILENCE {
                    return Ok(());
                }
            }
            message = from_client.next() => {
                heard = tokio::time::Instant::now();
                let Some(Ok(message)) = message else { return Ok(()) };
                let Message::Text(text) = message else {
                    to_server.send(message).await?;
                    continue;
                };
                let request: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let forged = forge(bug, &request, &mut memory.lock().unwrap_or_else(|p| p.into_inner()));
                if let Some(reply) = forged {
                    lie(format!("{bug:?}: answered {request} with {reply}"));
                    to_client.send(Message::Text(reply.to_string().into())).await?;
                    continue;
                }
                if let Some(id) = request["id"].as_u64() {
                    asked.insert(id, request);
                }
                to_server.send(Message::Text(text)).await?;
            }
            message = from_server.next() => {
                let Some(Ok(message)) = message else { return Ok(()) };
                let Message::Text(text) = message else {
                    to_client.send(message).await?;
                    continue;
                };
                let mut reply: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let request = reply["id"].as_u64().and_then(|id| asked.remove(&id)).unwrap_or(Value::Null);
                let before = reply.clone();
                corrupt(bug, &request, &mut reply, &mut memory.lock().unwrap_or_else(|p| p.into_inner()));
                if reply != before {
                    lie(format!("{bug:?}: changed {before} to {reply}"));
                }
                to_client.send(Message::Text(reply.to_string().into())).await?;
            }
        }
    }
}

/// A reply made up without asking the server, for the bugs that do that.
fn forge(bug: Bug, request: &Value, memory: &mut Memory) -> Option<Value> {
    let id = request["id"].as_u64()?;
    match (bug, request["op"].as_str()?) {
        (Bug::DoubleGrant, "lock") if memory.lie_now(bug) => {
            let key = request["key"].as_str()?;
            let token = memory
                .tokens
                .get(key)
                .and_then(|t| t.last())
                .copied()
                .unwrap_or(0)
                + 1;
            Some(json!({"id": id, "ok": {"token": token, "ttl_ms": request["ttl_ms"]}}))
        }
        (Bug::DropInsert, "insert") if memory.lie_now(bug) => {
            let fake = |n: u64| json!({"index": 10_000 + n, "first": true});
            match request["keys"].as_array() {
                Some(keys) => Some(
                    json!({"id": id, "ok": {"results": (0..keys.len() as u64).map(fake).collect::<Vec<_>>()}}),
                ),
                None => Some(json!({"id": id, "ok": fake(0)})),
            }
        }
        _ => None,
    }
}

/// Changes a real reply, for the bugs that do that.
fn corrupt(bug: Bug, request: &Value, reply: &mut Value, memory: &mut Memory) {
    let ok = &mut reply["ok"];
    match request["op"].as_str() {
        Some("lock") => {
            let (Some(key), Some(token)) = (request["key"].as_str(), ok["token"].as_u64()) else {
                return;
            };
            let seen = memory.tokens.entry(key.to_owned()).or_default();
            let earlier = seen.iter().rev().find(|&&t| t < token).copied();
            seen.push(token);
            match bug {
                Bug::LowerToken if memory.lie_now(bug) => {
                    if let Some(earlier) = earlier {
                        ok["token"] = json!(earlier);
                    }
                }
                Bug::StretchLease if memory.lie_now(bug) => {
                    if let Some(ttl) = ok["ttl_ms"].as_u64() {
                        ok["ttl_ms"] = json!(ttl * 4);
                    }
                }
                _ => {}
            }
        }
        Some("insert") if bug == Bug::DoubleFirst => {
            let results = match ok.get_mut("results") {
                Some(Value::Array(results)) => results.iter_mut().collect::<Vec<_>>(),
                _ => vec![ok],
            };
            for result in results {
                if result["first"] == json!(false) && memory.lie_now(bug) {
                    result["first"] = json!(true);
                }
            }
        }
        _ => {}
    }
}
