//! One connection's view of the engine.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use std::collections::{HashMap, HashSet};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::actor::{Respond, ShardMsg};
use super::events::{self, Events, Listener, Note, Sink, Subscription};
use super::mailbox::Refused;
use super::replica::Forwarding;
use super::{Engine, Frontend};
use crate::auth::{Need, Principal, quota, unauthorized};
use crate::client::Connection;
use crate::proto::proof::Statement;
use crate::proto::{
    HIDDEN_TOKEN, HelloReply, LockOp, Okay, Op, OpKind, Outcome, Reply, Request, RequestId,
    SERVER_NAME, Secret, ServerError, Wait, Watched,
};
use crate::shard::{Caller, ClientId, ConnId, Handle, ShardOp};

/// One connection: its client id, its identity, and its requests that may
/// wait. Cheap to clone; when the last clone is dropped the engine is told
/// that the connection closed, so its waiters leave their queues and its
/// ephemeral locks are released.
///
/// Because every in-flight [`Session::execute`] holds the session (by
/// reference, or through the clone a transport moves into the request's
/// task), that notice always reaches each shard after the connection's last
/// request.
#[derive(Debug, Clone)]
pub struct Session {
    inner: Arc<SessionInner>,
}

struct SessionInner {
    engine: Engine,
    frontend: Frontend,
    conn: ConnId,
    state: Mutex<SessionState>,
    /// On a follower: the connection to the leader this session's requests
    /// go through, and which node it leads to.
    leader_link: tokio::sync::Mutex<Option<LeaderLink>>,
    /// Turns true when the engine ends the session (see
    /// [`Session::ended`]).
    ended: Arc<tokio::sync::watch::Sender<bool>>,
    /// In a replicated engine, once the session holds an ephemeral lock:
    /// it is watched for a change of leader.
    pinned: std::sync::atomic::AtomicBool,
    /// Dropped with the session, which stops its watcher.
    watching: Mutex<Option<oneshot::Sender<()>>>,
    /// The request-duration histogram of each op, looked up in the
    /// recorder on its first request here: `histogram!` with a label looks
    /// its key up (and allocates the labels) on every call.
    durations: [OnceLock<metrics::Histogram>; OpKind::ALL.len()],
    /// Where this connection's pushed events go (SPEC section 7).
    sink: Sink,
    /// The queue they are read from, until its transport takes it; a
    /// connection whose transport never does cannot subscribe.
    events: Mutex<Option<Events>>,
    /// Where the shards put the answers to requests submitted through
    /// [`Answers`].
    answers: mpsc::UnboundedSender<Answered>,
    /// The queue they are read from, until its transport takes it.
    answers_queue: Mutex<Option<mpsc::UnboundedReceiver<Answered>>>,
}

#[derive(Debug)]
struct SessionState {
    client: ClientId,
    /// `lock` requests that may be queued, by request id: where to send a
    /// `cancel`.
    waiting: HashMap<RequestId, Waiting>,
    /// The ids of the requests being carried out (SPEC: unique among a
    /// connection's requests in flight).
    in_flight: HashSet<RequestId>,
    /// With authentication on, who the connection proved it is.
    principal: Option<Authenticated>,
    /// With authentication on, the ephemeral grants made to this
    /// connection: they end with it, and leave their principal's quota.
    ephemeral: Vec<(String, u64)>,
}

/// The principal a connection authenticated as. Its name is kept, not its
/// grants: those are looked up in the policy at each request, so that a
/// reloaded auth file applies to open connections.
#[derive(Debug, Clone)]
struct Authenticated {
    name: Arc<str>,
    /// Said again to the leader by a follower that forwards.
    secret: Secret,
}

/// A request that passed authorisation: its principal (with authentication
/// on) and its place among the principal's waiters, if it may wait.
struct Admitted<'a> {
    principal: Option<Arc<Principal>>,
    _waiting: Option<quota::Waiting<'a>>,
}

/// A connection to the leader that has said `hello` as this session's
/// client, and the node it leads to.
type LeaderLink = (u64, Arc<dyn Connection>);

/// A `lock` request that may be queued in a shard.
#[derive(Debug, Clone)]
struct Waiting {
    shard: usize,
    handle: Handle,
    key: String,
}

impl Session {
    pub(super) fn new(engine: Engine, conn: ConnId, client: String, frontend: Frontend) -> Session {
        let (sink, events) = events::queue(conn, engine.limits().event_bytes_max);
        let (answers, answers_queue) = mpsc::unbounded_channel();
        Session {
            inner: Arc::new(SessionInner {
                engine,
                frontend,
                conn,
                state: Mutex::new(SessionState {
                    client: Arc::from(client),
                    waiting: HashMap::new(),
                    in_flight: HashSet::new(),
                    principal: None,
                    ephemeral: Vec::new(),
                }),
                leader_link: tokio::sync::Mutex::new(None),
                ended: Arc::new(tokio::sync::watch::Sender::new(false)),
                pinned: std::sync::atomic::AtomicBool::new(false),
                watching: Mutex::new(None),
                durations: std::array::from_fn(|_| OnceLock::new()),
                sink,
                events: Mutex::new(Some(events)),
                answers,
                answers_queue: Mutex::new(Some(answers_queue)),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, SessionState> {
        // A panic while holding this lock cannot leave the state half
        // changed (every change is one assignment or map operation).
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The client id bound to the connection.
    pub fn client(&self) -> ClientId {
        Arc::clone(&self.state().client)
    }

    /// The connection's queue of pushed events (SPEC section 7), for its
    /// transport to write beside the replies; `None` after the first call.
    /// Until a transport takes it, `watch` and `notify` are refused: their
    /// events would have nowhere to go.
    pub fn take_events(&self) -> Option<Events> {
        self.inner
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The connection's queue of answers, for its transport to submit
    /// requests through (see [`Answers::submit`]); `None` after the first
    /// call.
    pub fn take_answers(&self) -> Option<Answers> {
        let queue = self
            .inner
            .answers_queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        Some(Answers {
            session: self.clone(),
            queue,
            batch_time: None,
        })
    }

    /// Whether a transport reads this connection's events.
    fn carries_events(&self) -> bool {
        self.inner
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// Whether the engine behind this session is shutting down.
    pub fn engine_is_shutting_down(&self) -> bool {
        self.inner.engine.is_shutting_down()
    }

    /// The connection's identity within the engine.
    pub fn conn(&self) -> ConnId {
        self.inner.conn
    }

    /// Resolves when the engine ends this session: its transport must then
    /// close the connection. In a replicated engine a session that took an
    /// ephemeral lock ends when the leader that granted it stops leading
    /// (the new leader released the lock), so that its client learns that
    /// the lock is gone the way it learns it at a restart: its connection
    /// closes.
    pub async fn ended(&self) {
        let mut ended = self.inner.ended.subscribe();
        // The sender lives as long as the session.
        let _ = ended.wait_for(|ended| *ended).await;
    }

    /// Carries out one request and returns its reply. Dropping the future
    /// before it completes cancels a waiting `lock`.
    ///
    /// A request whose id is already in flight on this connection is
    /// refused `bad_request`; the one in flight is not disturbed.
    pub async fn execute(&self, request: Request) -> Reply {
        let id = request.id;
        if !self.state().in_flight.insert(id) {
            let duplicate = format!("request id {id} is already in flight on this connection");
            return Reply {
                id: Some(id),
                outcome: Err(ServerError::bad_request(duplicate)),
            };
        }
        let _in_flight = InFlight { session: self, id };
        if self.inner.sink.subscriptions().contains(id) {
            let live = format!(
                "request id {id} has events still coming on this connection; `cancel` it first"
            );
            return Reply {
                id: Some(id),
                outcome: Err(ServerError::bad_request(live)),
            };
        }
        let admitted = match self.admit(&request.op) {
            Ok(admitted) => admitted,
            Err(error) => {
                return Reply {
                    id: Some(id),
                    outcome: Err(error),
                };
            }
        };
        // For the quota ledger, which reads it with the answer.
        let effect = admitted
            .principal
            .as_ref()
            .and_then(|_| quota::Effect::of(&request.op));
        let started = Instant::now();
        let kind = request.op.kind();
        let ephemeral = matches!(&request.op, Op::Lock(LockOp::Acquire(a)) if a.ephemeral);
        let to_prove = self.to_prove(&request.op);
        let mut request = request;
        let notify = match self.events_first(id, &mut request.op) {
            Ok(notify) => notify,
            Err(outcome) => {
                return Reply {
                    id: Some(id),
                    outcome,
                };
            }
        };
        if let Some(forwarding) = self.forwards(&request.op) {
            let outcome = Box::pin(self.forward_noting(forwarding, request, notify)).await;
            let mut outcome = self.prove(to_prove, outcome);
            if ephemeral && matches!(outcome, Ok(Okay::Granted(_))) {
                Box::pin(self.pin_to_link()).await;
            }
            self.settle(&admitted, effect.as_ref(), &mut outcome);
            return Reply {
                id: Some(id),
                outcome,
            };
        }
        // The rare ops' futures are boxed: every request's future is as
        // large as its largest branch, and a transport allocates one per
        // request (past 1 KiB, allocation leaves malloc's fast path).
        let outcome = match request.op {
            Op::Hello { client, auth } => Box::pin(self.hello(id, client, auth)).await,
            Op::Ping => Ok(Okay::EMPTY),
            Op::Cancel { target } => self.cancel(target).await,
            Op::Stats { .. } if self.inner.engine.is_shutting_down() => {
                Err(ServerError::shutting_down())
            }
            Op::Stats { top } => {
                let snapshot = Box::pin(self.inner.engine.snapshot(top as usize)).await;
                Ok(Okay::Stats(Box::new(snapshot)))
            }
            // Boxed: a watch's future would make every request's larger.
            Op::Watch { target } => Box::pin(self.start_watch(id, target)).await,
            Op::Lock(op) => {
                let mut reserved = notify.as_ref().map(|_| Reserved::new(self, id));
                let outcome = self.call_shard(id, ShardOp::Lock(op), notify).await;
                Reserved::keep_if_granted(reserved.as_mut(), &outcome);
                outcome
            }
            Op::Set(op) => self.call_shard(id, ShardOp::Set(op), None).await,
        };
        let mut outcome = self.prove(to_prove, outcome);
        if ephemeral && matches!(outcome, Ok(Okay::Granted(_))) {
            self.pin_to_role();
        }
        self.settle(&admitted, effect.as_ref(), &mut outcome);
        self.duration(kind).record(started.elapsed().as_secs_f64());
        Reply {
            id: Some(id),
            outcome,
        }
    }

    /// What a grant of `op` would state, less its token, time and lease:
    /// `Some` for a `lock` when grants are signed.
    fn to_prove(&self, op: &Op) -> Option<ToProve> {
        self.inner.engine.grant_signer()?;
        match op {
            Op::Lock(LockOp::Acquire(acquire)) => Some(ToProve {
                key: acquire.key.clone(),
                // The client the grant is for: a `hello` that arrives
                // while the request waits does not change it.
                client: self.client(),
                mode: acquire.mode.name().as_str(),
            }),
            _ => None,
        }
    }

    /// Adds the signed proof to a grant (`--sign-grants`), stamped with
    /// the wall clock now: at or just after the grant, which was made when
    /// its command was stamped and answered once the journal kept it. A
    /// grant that a follower forwarded keeps the leader's proof.
    fn prove(&self, to_prove: Option<ToProve>, mut outcome: Outcome) -> Outcome {
        let (Some(to_prove), Some(signer), Ok(Okay::Granted(granted))) =
            (to_prove, self.inner.engine.grant_signer(), outcome.as_mut())
        else {
            return outcome;
        };
        if granted.proof.is_none() {
            let statement = Statement {
                key: to_prove.key,
                token: granted.token,
                client: to_prove.client.to_string(),
                mode: to_prove.mode.to_owned(),
                granted_at_ms: wall_clock_ms(),
                ttl_ms: granted.ttl_ms,
            };
            granted.proof = Some(signer.sign(&statement));
        }
        outcome
    }

    /// The request-duration histogram of `kind`.
    fn duration(&self, kind: OpKind) -> &metrics::Histogram {
        self.inner.durations[kind as usize].get_or_init(
            || metrics::histogram!("deadbolt_request_duration_seconds", "op" => kind.wire_name()),
        )
    }

    /// Whether `op` goes to the leader: on a follower, every op that reads
    /// or changes the shards (and a `cancel` of one), unless the request
    /// already came from another node (one hop only: two nodes that
    /// disagree about the leader must not pass a request back and forth).
    fn forwards(&self, op: &Op) -> Option<&Forwarding> {
        let forwarding = self.inner.engine.forwarding()?;
        if super::planted::active(super::planted::ReplicaBug::FollowerGrantsLocally) {
            return None;
        }
        let shard_op = matches!(op, Op::Lock(_) | Op::Set(_) | Op::Cancel { .. });
        (shard_op && self.inner.frontend != Frontend::Forwarded).then_some(forwarding)
    }

    /// Carries `request` out on the leader, through this session's link.
    async fn forward(&self, forwarding: &Forwarding, request: Request) -> Outcome {
        if self.inner.frontend == Frontend::Forwarded {
            return Err(ServerError::unavailable("this node is not the leader"));
        }
        let link = self.leader_link(forwarding).await?;
        match link.call(request).await {
            Ok(outcome) => outcome,
            Err(error) => {
                *self.inner.leader_link.lock().await = None;
                Err(ServerError::unavailable(format!(
                    "lost the connection to the leader: {error}"
                )))
            }
        }
    }

    /// The link to the current leader, opened (as this session's client)
    /// if there is none, it broke, or the leader changed.
    async fn leader_link(
        &self,
        forwarding: &Forwarding,
    ) -> Result<Arc<dyn Connection>, ServerError> {
        let leader = forwarding.forwarder.leader();
        let mut link = self.inner.leader_link.lock().await;
        if let Some((node, connection)) = link.as_ref()
            && Some(*node) == leader
            && connection.is_open()
        {
            return Ok(Arc::clone(connection));
        }
        if let Some((_, stale)) = link.take()
            && self.inner.pinned.load(std::sync::atomic::Ordering::Acquire)
        {
            // Its ephemeral lock went with the old leader: end here too.
            drop(stale);
            self.inner.ended.send_replace(true);
            return Err(ServerError::unavailable(
                "the leader changed: this connection's ephemeral locks are gone",
            ));
        }
        let secret = self.state().principal.as_ref().map(|p| p.secret.clone());
        let (node, connection) = forwarding
            .forwarder
            .open(&self.client(), secret.as_ref())
            .await?;
        *link = Some((node, Arc::clone(&connection)));
        Ok(connection)
    }

    /// Whether this session is pinned already (and pins it if not).
    fn pin_once(&self) -> bool {
        self.inner
            .pinned
            .swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// An ephemeral lock was granted here while this node leads: the
    /// session ends when it stops leading.
    fn pin_to_role(&self) {
        let Some(forwarding) = self.inner.engine.inner.forwarding.as_ref() else {
            return;
        };
        let mut role = forwarding.role.clone();
        let granted_in = *role.borrow_and_update();
        if self.pin_once() {
            return;
        }
        self.watch(async move {
            // A closed watch means the engine is gone: end the session too.
            let _ = role.wait_for(|now| *now != granted_in).await;
        });
    }

    /// Ends the session when `event` happens, unless the session is
    /// dropped first.
    fn watch(&self, event: impl Future<Output = ()> + Send + 'static) {
        let (watching, dropped) = oneshot::channel::<()>();
        *self
            .inner
            .watching
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(watching);
        let ended = Arc::clone(&self.inner.ended);
        tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = dropped => {}
                () = event => {
                    ended.send_replace(true);
                }
            }
        });
    }

    /// An ephemeral lock was granted through the link to the leader: the
    /// session ends when that link closes (the leader died or stopped
    /// leading and ended its side).
    async fn pin_to_link(&self) {
        let link = self.inner.leader_link.lock().await.clone();
        let Some((_, connection)) = link else {
            return;
        };
        if self.pin_once() {
            return;
        }
        self.watch(async move { connection.closed().await });
    }

    async fn hello(&self, id: RequestId, client: String, secret: Option<Secret>) -> Outcome {
        let (principal, link) = self.authenticate(id, &client, secret).await?;
        // A link to the leader speaks for the old client id; a follower's
        // claim opened one for the new id.
        *self.inner.leader_link.lock().await = link;
        let mut state = self.state();
        state.client = Arc::from(client.as_str());
        if principal.is_some() {
            state.principal = principal;
        }
        drop(state);
        Ok(Okay::Hello(HelloReply {
            client,
            server: SERVER_NAME.to_owned(),
        }))
    }

    /// With authentication on, the principal whose secret `secret` is,
    /// now owning `client` (and, on a follower, the link to the leader
    /// that claimed it); `unauthorized` (and nothing changed) if there is
    /// none or another principal owns the id. Without, `None`.
    async fn authenticate(
        &self,
        id: RequestId,
        client: &str,
        secret: Option<Secret>,
    ) -> Result<(Option<Authenticated>, Option<LeaderLink>), ServerError> {
        let Some(auth) = self.inner.engine.auth() else {
            return Ok((None, None));
        };
        let secret = secret.ok_or_else(|| {
            unauthorized("this server requires `auth` in `hello`: a principal's secret")
        })?;
        let principal = auth
            .policy()
            .authenticate(&secret)
            .ok_or_else(|| unauthorized("no principal has this secret"))?;
        let link = self.claim(id, client, &principal.name, &secret).await?;
        let authenticated = Authenticated {
            name: Arc::from(principal.name.as_str()),
            secret,
        };
        Ok((Some(authenticated), link))
    }

    /// Makes `principal` the owner of `client` unless another principal
    /// owns it (SPEC section 10). The claim is a shard command, logged and
    /// replicated like a lock, so ownership survives a restart and a new
    /// leader. A follower has the leader claim it: it opens a link to the
    /// leader that says `hello` as `client` with `secret`, and returns it.
    async fn claim(
        &self,
        id: RequestId,
        client: &str,
        principal: &str,
        secret: &Secret,
    ) -> Result<Option<LeaderLink>, ServerError> {
        let follower = self.inner.engine.forwarding();
        if let Some(forwarding) = follower.filter(|_| self.inner.frontend != Frontend::Forwarded) {
            return forwarding
                .forwarder
                .open(client, Some(secret))
                .await
                .map(Some);
        }
        let op = ShardOp::Claim {
            client: client.to_owned(),
            principal: principal.to_owned(),
        };
        self.call_shard(id, op, None).await.map(|_| None)
    }

    /// Checks `op` against the grants of the connection's principal (with
    /// authentication on) and its quotas: `unauthorized` before a
    /// successful `hello` and outside the grants, `overloaded` past a
    /// quota. Nothing has changed when either is answered.
    fn admit(&self, op: &Op) -> Result<Admitted<'_>, ServerError> {
        let Some(auth) = self.inner.engine.auth() else {
            return Ok(Admitted {
                principal: None,
                _waiting: None,
            });
        };
        if let Op::Hello { .. } = op {
            // `hello` is how a connection authenticates: checked there.
            return Ok(Admitted {
                principal: None,
                _waiting: None,
            });
        }
        let name = self.state().principal.as_ref().map(|p| Arc::clone(&p.name));
        let name = name.ok_or_else(|| {
            unauthorized("say `hello` with `auth` first: this server authenticates its clients")
        })?;
        let principal = auth.policy().get(&name).ok_or_else(|| {
            unauthorized(format!("principal `{name}` is no longer in the auth file"))
        })?;
        let need = Need::of(op);
        if !principal.allows(need) {
            return Err(unauthorized(refusal(&name, op, need)));
        }
        let now = Instant::now();
        let client = self.client();
        let waiting = auth.usage().admit(&principal, &client, op, now)?;
        Ok(Admitted {
            principal: Some(principal),
            _waiting: waiting,
        })
    }

    /// After a request ran, with authentication on: counts what it changed
    /// against its principal's quotas, and hides a holder's token from
    /// `inspect` unless the asker holds the lock or is an admin.
    fn settle(
        &self,
        admitted: &Admitted<'_>,
        effect: Option<&quota::Effect>,
        outcome: &mut Outcome,
    ) {
        let (Some(principal), Some(effect), Some(auth)) =
            (&admitted.principal, effect, self.inner.engine.auth())
        else {
            return;
        };
        let now = Instant::now();
        let ttl_ms_max = self.inner.engine.limits().ttl_ms_max;
        let client = self.client();
        auth.usage()
            .record(&principal.name, &client, effect, outcome, now, ttl_ms_max);
        match (effect, outcome) {
            (
                quota::Effect::Grant {
                    key,
                    ephemeral: true,
                    ..
                },
                Ok(Okay::Granted(g)),
            ) => {
                self.state().ephemeral.push((key.clone(), g.token));
            }
            (quota::Effect::Inspect, Ok(Okay::LockInfo(info))) if !principal.admin => {
                let me = self.client();
                let others = info.holder.iter_mut().chain(info.holders.iter_mut());
                for holder in others.filter(|h| *h.client != *me) {
                    holder.token = HIDDEN_TOKEN;
                }
            }
            _ => {}
        }
    }

    async fn cancel(&self, target: RequestId) -> Outcome {
        let found = self.state().waiting.remove(&target);
        if let Some(Waiting { shard, handle, key }) = found {
            let message = ShardMsg::Cancel { handle, key };
            // A shard that has stopped has answered its waiters already.
            self.inner.engine.mailbox(shard).notify(message);
        }
        Ok(Okay::EMPTY)
    }

    /// For a `lock` with `notify`: takes the flag out of the op (the shard
    /// and the log never see it) and returns the listener the shard adds
    /// to the grant, having counted it among the connection's
    /// subscriptions. `overloaded` past
    /// [`watches_per_connection_max`](crate::Limits::watches_per_connection_max);
    /// refused where the events could not reach the client.
    fn subscribe_grant(
        &self,
        id: RequestId,
        op: &mut Op,
    ) -> Result<Option<Box<Listener>>, ServerError> {
        let Op::Lock(LockOp::Acquire(acquire)) = op else {
            return Ok(None);
        };
        if !acquire.notify {
            return Ok(None);
        }
        acquire.notify = false;
        let shard = self.inner.engine.shard_of(&acquire.key);
        self.reserve_subscription(id, shard, false)?;
        // Boxed: it travels in every request's future and message.
        Ok(Some(Box::new(Listener {
            id,
            sink: self.inner.sink.clone(),
        })))
    }

    /// Counts request `id` (on `shard`) among the connection's
    /// subscriptions, if the connection carries events and has room.
    fn reserve_subscription(
        &self,
        id: RequestId,
        shard: usize,
        watch: bool,
    ) -> Result<(), ServerError> {
        if !self.carries_events() {
            return Err(ServerError::bad_request(
                "this connection does not carry pushed events (`watch`, `notify`)",
            ));
        }
        let max = self.inner.engine.limits().watches_per_connection_max;
        let subscriptions = self.inner.sink.subscriptions();
        if !subscriptions.insert(id, Subscription { shard, watch }, max) {
            return Err(ServerError::overloaded(format!(
                "too many watches on this connection (watches_per_connection_max = {max}, \
                 counting locks with `notify`)"
            )));
        }
        Ok(())
    }

    /// What pushed events need of a request before it runs: for a `lock`
    /// with `notify`, its listener (see [`Session::subscribe_grant`]); a
    /// `cancel` of a request with events stops them. `Err` is the answer
    /// already: a refused `notify`, or a cancelled watch (which ends here,
    /// on a follower too: it is served here). A cancelled `lock` with
    /// `notify` goes on, as any cancel, to the lock, which may still wait.
    fn events_first(&self, id: RequestId, op: &mut Op) -> Result<Option<Box<Listener>>, Outcome> {
        if let Op::Cancel { target } = *op
            && self.unsubscribe(target) == Some(true)
        {
            return Err(Ok(Okay::EMPTY));
        }
        self.subscribe_grant(id, op).map_err(Err)
    }

    /// Carries `request` out on the leader; for a `lock` with `notify`,
    /// the grant it answers is followed here.
    async fn forward_noting(
        &self,
        forwarding: &Forwarding,
        request: Request,
        notify: Option<Box<Listener>>,
    ) -> Outcome {
        let id = request.id;
        let follow = notify.map(|listener| self.prepare_to_follow(&request.op, *listener));
        let mut reserved = follow.as_ref().map(|_| Reserved::new(self, id));
        let outcome = self.forward(forwarding, request).await;
        if let (Some(follow), Ok(Okay::Granted(granted))) = (follow, &outcome) {
            self.follow(follow, granted);
        }
        Reserved::keep_if_granted(reserved.as_mut(), &outcome);
        outcome
    }

    /// On a follower, before a `lock` with `notify` goes to the leader:
    /// the local shard starts reporting events, so that it sees the
    /// grant's end however soon that comes after the grant.
    fn prepare_to_follow(&self, op: &Op, listener: Listener) -> Following {
        let key = match op {
            Op::Lock(LockOp::Acquire(acquire)) => acquire.key.clone(),
            _ => String::new(),
        };
        let shard = self.inner.engine.shard_of(&key);
        self.inner
            .engine
            .mailbox(shard)
            .notify(ShardMsg::EnableEvents);
        Following {
            listener,
            key,
            shard,
        }
    }

    /// On a follower, once the leader granted a `lock` with `notify`: the
    /// local shard, which applies the same log, follows the grant and
    /// tells this connection of its lease and its end, as the leader's
    /// would.
    fn follow(&self, following: Following, granted: &crate::proto::Granted) {
        let Following {
            listener,
            key,
            shard,
        } = following;
        let message = ShardMsg::FollowGrant {
            key,
            token: granted.token,
            ttl_ms: granted.ttl_ms,
            listener,
        };
        self.inner.engine.mailbox(shard).notify(message);
    }

    /// `watch`: from now until it is cancelled or the connection closes,
    /// every change of the key or set is pushed under request id `id`.
    /// Served by the node the client is connected to, leader or follower:
    /// every node applies the same log, so its shards report the same
    /// changes.
    async fn start_watch(&self, id: RequestId, target: Watched) -> Outcome {
        let engine = &self.inner.engine;
        if engine.is_shutting_down() {
            return Err(ServerError::shutting_down());
        }
        let shard = engine.shard_of(target.name());
        self.reserve_subscription(id, shard, true)?;
        let (reply, placed) = oneshot::channel();
        let listener = Listener {
            id,
            sink: self.inner.sink.clone(),
        };
        let message = ShardMsg::Watch {
            target,
            listener,
            reply,
        };
        let refused = match engine.mailbox(shard).try_request(message) {
            Ok(()) => placed.await.err().map(|_| ServerError::shutting_down()),
            Err(Refused::Full) => Some(ServerError::overloaded("shard mailbox full; retry later")),
            Err(Refused::Closed) => Some(ServerError::shutting_down()),
        };
        match refused {
            None => Ok(Okay::EMPTY),
            Some(error) => {
                self.inner.sink.subscriptions().remove(id);
                Err(error)
            }
        }
    }

    /// Stops the events of request `target` (a `watch`, or a `lock` with
    /// `notify`), as a `cancel` of it does: for a transport whose client
    /// ended the request another way (a reset QUIC stream). Its queue then
    /// says it is done. Whether `target` had events coming.
    pub fn stop_events(&self, target: RequestId) -> bool {
        self.unsubscribe(target).is_some()
    }

    /// `cancel` of a request that has events coming: its events stop, and
    /// its queue says it is done. `None` if `target` was not one; else
    /// whether it was a watch.
    fn unsubscribe(&self, target: RequestId) -> Option<bool> {
        let Subscription { shard, watch } = self.inner.sink.subscriptions().remove(target)?;
        let conn = self.inner.conn;
        // A notice: never refused, so the listener cannot outlive this.
        self.inner
            .engine
            .mailbox(shard)
            .notify(ShardMsg::Unwatch { conn, id: target });
        self.inner.sink.send(Note::Done(target));
        Some(watch)
    }

    async fn call_shard(
        &self,
        id: RequestId,
        op: ShardOp,
        notify: Option<Box<Listener>>,
    ) -> Outcome {
        let engine = &self.inner.engine;
        if engine.is_shutting_down() {
            return Err(ServerError::shutting_down());
        }
        let routing_key = op.routing_key();
        let shard = engine.shard_of(routing_key);
        let handle = engine.new_handle();
        let may_wait = matches!(&op, ShardOp::Lock(LockOp::Acquire(a)) if a.wait != Wait::Never);
        let (reply, answer) = oneshot::channel();
        let caller = Caller {
            client: self.client(),
            conn: self.inner.conn,
        };
        let mut cancel_on_drop = may_wait.then(|| {
            let waiting = Waiting {
                shard,
                handle,
                key: routing_key.to_owned(),
            };
            self.state().waiting.insert(id, waiting);
            CancelOnDrop {
                session: self,
                id,
                done: false,
            }
        });
        let message = ShardMsg::Op {
            handle,
            caller,
            op,
            reply: Respond::Once(reply),
            notify,
        };
        let outcome = match engine.mailbox(shard).try_request(message) {
            Ok(()) => answer
                .await
                .unwrap_or_else(|_| Err(ServerError::shutting_down())),
            Err(Refused::Full) => Err(ServerError::overloaded("shard mailbox full; retry later")),
            Err(Refused::Closed) => Err(ServerError::shutting_down()),
        };
        // Answered (or never queued): nothing to cancel in the shard.
        if let Some(guard) = cancel_on_drop.as_mut() {
            guard.done = true;
        }
        outcome
    }
}

/// A connection's queue of answers to the requests it submitted (see
/// [`Answers::submit`]). Those requests run without a future of their own:
/// the shard puts each answer here, and many answers wake the connection
/// once. Holds its session.
#[derive(Debug)]
pub struct Answers {
    session: Session,
    queue: mpsc::UnboundedReceiver<Answered>,
    /// The time the answers taken since the queue was last empty are
    /// counted done at: the clock is read once per batch of answers.
    batch_time: Option<Instant>,
}

impl Answers {
    /// Sends `request` to its shard and returns at once; its reply comes
    /// out of [`Answers::poll_next`]. Only a request that needs nothing but
    /// its shard goes this way: a `lock` that does not wait and has no
    /// `notify`, `unlock`, `extend`, `inspect`, or a set op, on an engine
    /// that neither forwards, authenticates nor signs grants. Any other
    /// request is given back, for [`Session::execute`], as is one whose id
    /// is in flight already or still has events coming (`execute` refuses
    /// it). Either way the reply is the one `execute` would give: a full
    /// mailbox answers `overloaded`, a stopped shard `shutting_down`.
    ///
    /// `received` is when the request was read: its duration is measured
    /// from there. The caller passes the time it read a batch of requests
    /// at, so that the clock is read once per batch, not per request.
    pub fn submit(&self, request: Request, received: Instant) -> Result<(), Request> {
        let session = &self.session;
        let id = request.id;
        if !session.alone_in_shard(&request.op) || !session.claim_id(id) {
            return Err(request);
        }
        let kind = request.op.kind();
        let op = match request.op {
            Op::Lock(op) => ShardOp::Lock(op),
            Op::Set(op) => ShardOp::Set(op),
            op => {
                session.state().in_flight.remove(&id);
                return Err(Request { id, op });
            }
        };
        let engine = &session.inner.engine;
        let shard = engine.shard_of(op.routing_key());
        let handle = engine.new_handle();
        let unheard = match &op {
            ShardOp::Lock(LockOp::Acquire(acquire)) => Some(Unheard {
                shard,
                handle,
                key: acquire.key.clone(),
            }),
            _ => None,
        };
        let queued = Queued {
            answers: session.inner.answers.clone(),
            id,
            kind,
            started: received,
            unheard,
            sent: false,
        };
        let message = ShardMsg::Op {
            handle,
            caller: Caller {
                client: session.client(),
                conn: session.inner.conn,
            },
            op,
            reply: Respond::Queue(queued),
            notify: None,
        };
        if let Err((refused, refused_message)) = engine.mailbox(shard).try_admit(message)
            && let ShardMsg::Op { reply, .. } = *refused_message
        {
            let error = match refused {
                Refused::Full => ServerError::overloaded("shard mailbox full; retry later"),
                Refused::Closed => ServerError::shutting_down(),
            };
            // The queue is this one's: it is there to take the answer.
            let _ = reply.send(Err(error));
        }
        Ok(())
    }

    /// The next answer of a submitted request, in the order the shards
    /// gave them; its id is free again once it is taken. (Never `None`:
    /// the session holds a sender.)
    pub fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Reply>> {
        self.poll_answer(cx).map(|answer| Some(answer?.0))
    }

    /// As [`Answers::poll_next`], with what undoes the answer's grant if
    /// it turns out that nobody hears it (see [`Answers::unheard`]): for a
    /// transport whose client may give up on one request (a stopped QUIC
    /// stream).
    pub fn poll_answer(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<(Reply, Option<Unheard>)>> {
        let Some(mut answered) = std::task::ready!(self.queue.poll_recv(cx)) else {
            return std::task::Poll::Ready(None);
        };
        let done_at = *self.batch_time.get_or_insert_with(Instant::now);
        if self.queue.is_empty() {
            // The next answer is another batch's, taken later.
            self.batch_time = None;
        }
        let unheard = answered
            .unheard
            .take()
            .filter(|_| matches!(answered.outcome, Ok(Okay::Granted(_))));
        let reply = self.session.take_answer(answered, done_at);
        std::task::Poll::Ready(Some((reply, unheard)))
    }

    /// A grant whose answer nobody received (its requester gave up) is
    /// undone, as one whose request's future was dropped is: else the key
    /// would stay held, for a whole lease, by a client that does not know
    /// it holds it (the shard's "requester gone"; a re-lock that answered
    /// the same client since keeps it).
    pub fn unheard(&self, unheard: Unheard) {
        let Unheard { shard, handle, key } = unheard;
        // A notice is never refused, even by a full mailbox.
        let mailbox = self.session.inner.engine.mailbox(shard);
        mailbox.notify(ShardMsg::Gone { handle, key });
    }

    /// The next answer of a submitted request, once there is one.
    pub async fn next(&mut self) -> Option<Reply> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

/// An answer on its way to its connection's [`Answers`].
#[derive(Debug)]
pub(crate) struct Answered {
    id: RequestId,
    kind: OpKind,
    started: Instant,
    unheard: Option<Unheard>,
    outcome: Outcome,
}

/// What undoes a grant made through [`Answers`] whose answer nobody
/// received (see [`Answers::unheard`]).
#[derive(Debug)]
pub struct Unheard {
    shard: usize,
    handle: Handle,
    key: String,
}

/// Where the answer to a submitted request goes. Dropped unanswered (its
/// shard stopped), it answers `shutting_down`, as `execute` answers a
/// request whose shard dropped its reply.
#[derive(Debug)]
pub(crate) struct Queued {
    answers: mpsc::UnboundedSender<Answered>,
    id: RequestId,
    kind: OpKind,
    started: Instant,
    /// For a `lock`: what undoes its grant if nobody hears of it.
    unheard: Option<Unheard>,
    sent: bool,
}

impl Queued {
    /// Puts the answer in the connection's queue; `Err` if the connection
    /// is gone.
    pub(crate) fn send(mut self, outcome: Outcome) -> Result<(), Outcome> {
        self.sent = true;
        let answered = self.answered(outcome);
        self.answers
            .send(answered)
            .map_err(|unsent| unsent.0.outcome)
    }

    fn answered(&mut self, outcome: Outcome) -> Answered {
        Answered {
            id: self.id,
            kind: self.kind,
            started: self.started,
            unheard: self.unheard.take(),
            outcome,
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if !self.sent {
            let answered = self.answered(Err(ServerError::shutting_down()));
            let _ = self.answers.send(answered);
        }
    }
}

impl Session {
    /// Whether carrying `op` out needs nothing but its shard (see
    /// [`Answers::submit`]).
    fn alone_in_shard(&self, op: &Op) -> bool {
        let engine = &self.inner.engine;
        let plain = engine.auth().is_none()
            && engine.grant_signer().is_none()
            && engine.inner.forwarding.is_none()
            && !engine.is_shutting_down();
        plain
            && match op {
                Op::Lock(LockOp::Acquire(a)) => a.wait == Wait::Never && !a.notify,
                Op::Lock(_) | Op::Set(_) => true,
                _ => false,
            }
    }

    /// Marks request `id` in flight, as `execute` does; `false` (and
    /// nothing changed) if it is already, or has events still coming.
    fn claim_id(&self, id: RequestId) -> bool {
        !self.inner.sink.subscriptions().contains(id) && self.state().in_flight.insert(id)
    }

    /// What `execute` does once a request is answered: its id is free,
    /// and its duration recorded.
    fn take_answer(&self, answered: Answered, done_at: Instant) -> Reply {
        let Answered {
            id,
            kind,
            started,
            outcome,
            ..
        } = answered;
        self.state().in_flight.remove(&id);
        let duration = done_at.saturating_duration_since(started);
        self.duration(kind).record(duration.as_secs_f64());
        Reply {
            id: Some(id),
            outcome,
        }
    }
}

/// A forwarded `lock` with `notify`: who listens, and where its key lives.
struct Following {
    listener: Listener,
    key: String,
    shard: usize,
}

/// The parts of a grant's statement known from its request.
struct ToProve {
    key: String,
    client: ClientId,
    mode: &'static str,
}

/// The wall clock, in ms since the Unix epoch (0 before it).
fn wall_clock_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// What `unauthorized` says about `op`: which grant the principal lacks.
fn refusal(name: &str, op: &Op, need: Need<'_>) -> String {
    let op = op.name();
    match need {
        Need::Lock(key) => {
            format!("principal `{name}` may not `{op}` key `{key}` (no `locks` prefix of it)")
        }
        Need::Set(set) => {
            format!("principal `{name}` may not `{op}` set `{set}` (no `sets` prefix of it)")
        }
        Need::Read(what) => {
            format!("principal `{name}` may not `{op}` `{what}` (no `read` prefix of it)")
        }
        Need::Admin => format!("principal `{name}` may not `{op}`: it is not an admin"),
        Need::Session => format!("principal `{name}` may not `{op}`"),
    }
}

/// A `lock` with `notify` counted among its connection's subscriptions
/// while it runs: if it ends without a grant (refused, cancelled, its
/// future dropped) it stops counting. A grant's listener is in its shard
/// by then, and its end (`lost`, or its holder's `unlock`) ends the count.
struct Reserved<'a> {
    session: &'a Session,
    id: RequestId,
    /// Granted: counted until the grant's end.
    kept: bool,
}

impl<'a> Reserved<'a> {
    fn new(session: &'a Session, id: RequestId) -> Reserved<'a> {
        Reserved {
            session,
            id,
            kept: false,
        }
    }

    /// Keeps the count if `outcome` is a grant.
    fn keep_if_granted(reserved: Option<&mut Reserved<'_>>, outcome: &Outcome) {
        if let Some(reserved) = reserved {
            reserved.kept = matches!(outcome, Ok(Okay::Granted(_)));
        }
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.session.inner.sink.subscriptions().remove(self.id);
        }
    }
}

/// Frees a request's id when it ends, answered or dropped.
struct InFlight<'a> {
    session: &'a Session,
    id: RequestId,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.session.state().in_flight.remove(&self.id);
    }
}

/// Forgets a possibly-waiting `lock` when its request ends, and tells its
/// shard that nobody listens for it if the request ended without an answer
/// (its future was dropped: a reset QUIC stream, a closed connection).
struct CancelOnDrop<'a> {
    session: &'a Session,
    id: RequestId,
    done: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        let found = self.session.state().waiting.remove(&self.id);
        if self.done {
            return;
        }
        if let Some(Waiting { shard, handle, key }) = found {
            // A notice is never refused, even by a full mailbox: else the
            // waiter would stay queued, and maybe be granted, for nobody.
            let mailbox = self.session.inner.engine.mailbox(shard);
            mailbox.notify(ShardMsg::Gone { handle, key });
        }
    }
}

impl std::fmt::Debug for SessionInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionInner")
            .field("frontend", &self.frontend)
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

impl Drop for SessionInner {
    fn drop(&mut self) {
        self.engine.session_closed(self.frontend);
        if let Some(auth) = self.engine.auth() {
            let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
            for (key, token) in state.ephemeral.drain(..) {
                auth.usage().release(&key, token);
            }
        }
        for mailbox in self.engine.mailboxes() {
            // Ephemeral locks must be released: a notice is never refused.
            mailbox.notify(ShardMsg::Closed { conn: self.conn });
        }
    }
}
