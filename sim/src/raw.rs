//! A raw-protocol worker: speaks the JSON protocol over the simulated
//! WebSocket itself, without the Rust client, and trusts the server's
//! `ttl_ms` with no margin of its own: it believes it holds a lock from
//! the reply until the time it sent the request plus the granted `ttl_ms`
//! (the grant came after the send, so that is all the contract promises),
//! and a re-lock answered with the same token moves that end to the
//! re-lock's send plus its `ttl_ms`. The Rust client re-anchors leases
//! with extends of its own, which hides lease arithmetic errors on the
//! server; this worker does not. Its request ids start at 1 on every
//! connection, as the Rust client's do, so ids collide across
//! connections (they are unique per connection only).
//!
//! It runs its plan's counter steps as try-locks (a waited grant leaves a
//! send-time view with nothing in it) with an optional re-lock, and skips
//! the other steps. A step that would wait, or take an ephemeral lock,
//! brings a deserting waiter along: a second connection
//! queued behind the grant that closes just as the grant is released.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::history::{Actor, History, What, now_us};
use crate::resource;
use crate::scenario::{CounterStep, Guard, LOCK_KEYS, Step, Wait};
use crate::worker::{Shared, WS_PORT};

/// How long a request may go unanswered before the connection is taken
/// for broken.
const REPLY_TIMEOUT: Duration = Duration::from_millis(1_500);

type Socket = tokio_tungstenite::WebSocketStream<turmoil::net::TcpStream>;

/// One connection, with its own request ids.
struct Connection {
    socket: Socket,
    next_id: u64,
    /// Where the events it hears are recorded: the history and the worker.
    heard_by: (History, usize),
    /// The key of each `lock` with `notify` sent on it, by request id.
    notified: BTreeMap<u64, String>,
}

impl Connection {
    /// Connects, upgrades and says `hello`, all within [`REPLY_TIMEOUT`]:
    /// an upgrade whose answer is lost to a partition must not hang the
    /// worker for good.
    async fn open(
        client: &str,
        host: &str,
        heard_by: (History, usize),
    ) -> Result<Connection, String> {
        let connecting = async {
            let stream = turmoil::net::TcpStream::connect((host, WS_PORT))
                .await
                .map_err(|e| e.to_string())?;
            let url = format!("ws://{host}:{WS_PORT}/ws");
            let (socket, _) = tokio_tungstenite::client_async(url, stream)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(socket)
        };
        let socket = tokio::time::timeout(REPLY_TIMEOUT, connecting)
            .await
            .map_err(|_| "connect timed out".to_owned())??;
        let mut connection = Connection {
            socket,
            next_id: 1,
            heard_by,
            notified: BTreeMap::new(),
        };
        connection
            .call(json!({"op": "hello", "client": client}))
            .await?;
        Ok(connection)
    }

    /// Sends `request` with the next id; returns the id.
    async fn send(&mut self, mut request: Value) -> Result<u64, String> {
        let id = self.next_id;
        self.next_id += 1;
        request["id"] = json!(id);
        let sending = self.socket.send(Message::Text(request.to_string().into()));
        tokio::time::timeout(REPLY_TIMEOUT, sending)
            .await
            .map_err(|_| "send timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        Ok(id)
    }

    /// Waits for the reply (`ok` or `err`) to request `id`, within
    /// [`REPLY_TIMEOUT`].
    async fn reply(&mut self, id: u64) -> Result<Value, String> {
        let reply = tokio::time::timeout(REPLY_TIMEOUT, async {
            while let Some(message) = self.socket.next().await {
                let Ok(Message::Text(text)) = message else {
                    continue;
                };
                let reply: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                if reply.get("event").is_some() {
                    self.heard(&reply);
                    continue;
                }
                if reply["id"] == json!(id) {
                    return Ok(reply);
                }
            }
            Err("connection closed".to_owned())
        });
        reply.await.map_err(|_| "no reply".to_owned())?
    }

    /// Sends `request` with the next id and waits for its reply.
    async fn call(&mut self, request: Value) -> Result<Value, String> {
        let id = self.send(request).await?;
        self.reply(id).await
    }
}

impl Connection {
    /// Waits `span`, hearing (and recording) the events that come
    /// meanwhile, so that each is recorded when it arrives.
    async fn listen(&mut self, span: Duration) {
        let until = tokio::time::Instant::now() + span;
        while let Ok(Some(message)) = tokio::time::timeout_at(until, self.socket.next()).await {
            let Ok(Message::Text(text)) = message else {
                continue;
            };
            let event: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if event.get("event").is_some() {
                self.heard(&event);
            }
        }
        // A closed connection: the rest of the wait is a plain one.
        tokio::time::sleep_until(until).await;
    }

    /// Records a pushed event about a grant of one of its `notify` locks
    /// (an event is read whenever the worker next reads: late, never
    /// early).
    fn heard(&self, event: &Value) {
        let id = event["id"].as_u64().unwrap_or(0);
        let (history, me) = &self.heard_by;
        let text = |field: &str| event[field].as_str().map(str::to_owned);
        history.record(
            Actor::Worker(*me),
            What::Pushed {
                key: self.notified.get(&id).cloned().unwrap_or_default(),
                token: event["token"].as_u64().unwrap_or(0),
                event: text("event").unwrap_or_default(),
                reason: text("reason"),
                remaining_ms: event["remaining_ms"].as_u64(),
                watch: false,
            },
        );
    }
}

/// Runs raw worker `me` until its plan is done.
pub async fn run(shared: Shared, me: usize) -> turmoil::Result {
    let record = |what| shared.history.record(Actor::Worker(me), what);
    record(What::Started);
    let client = format!("raw-{me}");
    let mut connection: Option<Connection> = None;
    // In a cluster it fails over as the Rust client does: a connection
    // that failed or was refused moves it on to the next node.
    let hosts = shared.hosts(me);
    let mut host = 0;
    loop {
        let at = shared.progress.lock().unwrap_or_else(|p| p.into_inner())[me];
        let Some(step) = shared.scenario.workers[me].steps.get(at) else {
            break;
        };
        // It speaks the plain mutex protocol: the other kinds of lock are
        // the Rust client's.
        if let Step::Counter(
            plan @ CounterStep {
                key,
                ttl_ms,
                hold_ms,
                relock,
                guard: Guard::Mutex,
                notify,
                ..
            },
        ) = step
        {
            let open = match connection.take() {
                Some(open) => Ok(open),
                None => {
                    let heard_by = (shared.history.clone(), me);
                    Connection::open(&client, hosts[host % hosts.len()], heard_by).await
                }
            };
            match open {
                Ok(mut open) => {
                    let counter = RawCounter {
                        shared: &shared,
                        me,
                        key: LOCK_KEYS[*key],
                        ttl_ms: *ttl_ms,
                        // It never waits itself: its steps that would wait,
                        // and those that take an ephemeral lock, bring a
                        // waiter that leaves as the key is handed to it.
                        deserter: (plan.ephemeral || plan.wait != Wait::Try)
                            .then(|| hosts[host % hosts.len()]),
                        notify: *notify,
                    };
                    if counter.run(&mut open, *hold_ms, *relock).await {
                        connection = Some(open);
                    } else {
                        host += 1;
                    }
                }
                Err(_) => {
                    host += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        shared.progress.lock().unwrap_or_else(|p| p.into_inner())[me] = at + 1;
    }
    record(What::Done);
    Ok(())
}

/// One try-lock-guarded counter step.
struct RawCounter<'a> {
    shared: &'a Shared,
    me: usize,
    key: &'static str,
    ttl_ms: u64,
    /// The host a deserting waiter connects to, if the step has one
    /// ([`RawCounter::desert`]).
    deserter: Option<&'a str>,
    /// Whether its first `lock` asks for pushed events.
    notify: bool,
}

impl RawCounter<'_> {
    fn record(&self, what: What) {
        self.shared.history.record(Actor::Worker(self.me), what);
    }

    /// `lock` with `wait_ms: 0`: the token and the end of the lease as
    /// the reply lets the worker know it, or why not.
    /// With `notify`, the grant's events are recorded as they are heard.
    async fn try_lock(
        &self,
        connection: &mut Connection,
        notify: bool,
    ) -> Result<Option<(u64, u64)>, String> {
        let sent_us = now_us();
        let mut request =
            json!({"op": "lock", "key": self.key, "ttl_ms": self.ttl_ms, "wait_ms": 0});
        if notify {
            request["notify"] = json!(true);
            let id = connection.next_id;
            connection.notified.insert(id, self.key.to_owned());
        }
        self.tap(What::Sent {
            op: "lock",
            key: self.key.to_owned(),
            token: None,
        });
        let reply = connection.call(request).await?;
        let ok = &reply["ok"];
        match (ok["token"].as_u64(), ok["ttl_ms"].as_u64()) {
            (Some(token), Some(ttl_ms)) => {
                self.answered("lock", Some(token), Some(ttl_ms), sent_us, &reply);
                Ok(Some((token, sent_us + ttl_ms * 1000)))
            }
            _ => {
                self.answered("lock", None, Some(self.ttl_ms), sent_us, &reply);
                if reply["err"]["code"] == json!("busy") {
                    Ok(None)
                } else {
                    Err(reply.to_string())
                }
            }
        }
    }

    /// Returns whether the connection is still good.
    async fn run(&self, connection: &mut Connection, hold_ms: u64, relock: bool) -> bool {
        let key = self.key.to_owned();
        self.record(What::LockAsked {
            key: key.clone(),
            ttl_ms: self.ttl_ms,
            wait_ms: Some(0),
            ephemeral: false,
        });
        let (token, mut valid_until_us) = match self.try_lock(connection, self.notify).await {
            Ok(Some(granted)) => granted,
            Ok(None) => {
                self.record(What::NotGranted { key });
                return true;
            }
            Err(error) => {
                self.record(What::LockFailed { key, error });
                return false;
            }
        };
        self.record(What::Granted {
            key: key.clone(),
            token,
            valid_until_us,
            shared: false,
        });
        let value = self.fenced_read(token, valid_until_us).await;
        let mut good = true;
        if relock {
            match self.try_lock(connection, false).await {
                Ok(Some((again, until))) if again == token => {
                    valid_until_us = until;
                    self.record(What::Extended {
                        key: key.clone(),
                        token,
                        valid_until_us,
                    });
                }
                // Not ours any more (or never answered): stop believing.
                Ok(_) => valid_until_us = 0,
                Err(_) => {
                    valid_until_us = 0;
                    good = false;
                }
            }
        }
        connection.listen(Duration::from_millis(hold_ms)).await;
        if let Some(value) = value.filter(|_| now_us() < valid_until_us) {
            self.fenced_write(token, value + 1).await;
        }
        self.record(What::Released {
            key: key.clone(),
            token,
        });
        if !good {
            self.record(What::Unlocked {
                key,
                token,
                ok: false,
            });
            return false;
        }
        let deserter = match self.deserter {
            Some(host) => self.desert(host).await,
            None => None,
        };
        let unlock = json!({"op": "unlock", "key": self.key, "token": token});
        let sent_us = now_us();
        // A deserting waiter closes its connection just after the unlock
        // that hands it the key is sent: while the shard's batch waits for
        // its log, or before the shard reads its leaving. Its grant, if
        // made, is heard by nobody (the server must undo it: server
        // checker rule 13).
        let reply = match connection.send(unlock).await {
            Ok(id) => {
                if let Some(deserter) = deserter {
                    // Aimed at the middle of the sync the unlock's batch
                    // waits for, after which its answers are delivered.
                    let sync_ms = self.shared.scenario.disk.sync_latency_ms;
                    tokio::time::sleep(Duration::from_millis(sync_ms / 2)).await;
                    drop(deserter);
                }
                connection.reply(id).await
            }
            Err(error) => Err(error),
        };
        let ok = reply.as_ref().is_ok_and(|r| r.get("ok").is_some());
        if let Ok(reply) = &reply {
            self.answered("unlock", Some(token), None, sent_us, reply);
        }
        self.record(What::Unlocked { key, token, ok });
        reply.is_ok()
    }

    /// A second client's connection that asks for the key (ephemeral,
    /// waiting) and is left queued behind this worker's grant, to be
    /// dropped as the grant is released: a lost grant answer, which the
    /// rest of the workload makes too rarely. Nothing is recorded of it:
    /// nobody ever believes it holds the key.
    async fn desert(&self, host: &str) -> Option<Connection> {
        let client = format!("raw-{}-deserter", self.me);
        // It asks for no events, so nothing is ever heard by it.
        let heard_by = (self.shared.history.clone(), self.me);
        let mut waiter = Connection::open(&client, host, heard_by).await.ok()?;
        let lock = json!({"op": "lock", "key": self.key, "ttl_ms": self.ttl_ms,
            "wait_ms": 5_000, "ephemeral": true});
        waiter.send(lock).await.ok()?;
        // Long enough for the request to reach the shard and queue.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some(waiter)
    }

    /// Records `what` if the run taps its workers (as [`crate::tap`] does
    /// for the Rust client's connections).
    fn tap(&self, what: What) {
        if self.shared.tap {
            self.record(what);
        }
    }

    /// Records the server's `reply` to `op`, sent at `sent_us`, if the
    /// run taps its workers.
    fn answered(
        &self,
        op: &'static str,
        token: Option<u64>,
        ttl_ms: Option<u64>,
        sent_us: u64,
        reply: &Value,
    ) {
        let refused = reply.get("ok").is_none().then(|| {
            let code = reply["err"]["code"].as_str();
            code.unwrap_or("unknown").to_owned()
        });
        self.tap(What::Answered {
            op,
            key: self.key.to_owned(),
            token,
            ttl_ms,
            sent_us,
            refused,
        });
    }

    async fn fenced_read(&self, token: u64, valid_until_us: u64) -> Option<u64> {
        if now_us() >= valid_until_us {
            return None;
        }
        resource::recorded_read(&self.shared.history, self.me, self.key, token).await
    }

    async fn fenced_write(&self, token: u64, value: u64) {
        resource::recorded_write(&self.shared.history, self.me, self.key, token, value).await;
    }
}
