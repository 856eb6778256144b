//! The peer protocol, on each node's peer port: Raft's three RPCs as
//! length-prefixed postcard frames over a byte stream (TCP, or turmoil's
//! in the simulation), one request at a time per connection. A connection
//! opens with a [`Hello`] naming the dialing node and the base URL of its
//! WebSocket port, which is how followers learn where to forward.
//!
//! With TLS ([`ClusterConfig::peer_tls`](crate::ClusterConfig)), every
//! peer connection is TLS 1.3 and mutual: the accepting node requires a
//! certificate its cluster CA vouches for before it reads a byte of Raft,
//! and the dialing node (its [`Dialer`] is a TLS one) checks the accepting
//! node's certificate the same way. A stranger on the network can then
//! neither inject Raft messages nor read the log's entries (which carry
//! the commands, client ids and all). Without it the port trusts whoever
//! connects, which is for loopback or a trusted network only (the binary
//! refuses a non-loopback peer address without it unless told
//! `--insecure-peers`).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadbolt_transport_ws::{Dialer, Listener};
use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, watch};

use crate::identity::Identities;
use crate::types::{NodeId, Raft, TypeConfig};

/// The largest frame a peer may send (an append of up to
/// `max_payload_entries` batches, or a snapshot chunk).
pub const FRAME_BYTES_MAX: usize = 256 << 20;

/// Peer connections a node serves at once; more wait for a slot (peers
/// are few; this bounds what a stranger on the peer port can hold).
const PEER_CONNECTIONS_MAX: usize = 64;

/// How long a new peer connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The first frame on a peer connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The dialing node.
    pub from: NodeId,
    /// Its incarnation (see [`crate::identity`]).
    pub incarnation: u64,
    /// The base URL of its WebSocket port (`ws://host:port`).
    pub client_url: String,
}

/// The answer to a [`Hello`].
#[derive(Debug, Clone, Serialize, Deserialize)]
enum HelloAck {
    /// Go ahead; this is the answering node's incarnation.
    Welcome { incarnation: u64 },
    /// The dialing node is refused (another incarnation than the one met).
    Refused(String),
}

#[derive(Debug, Serialize, Deserialize)]
enum PeerRequest {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// Whether the answering node has never been in a cluster (before a
    /// new cluster is made: see `node::bootstrap`).
    Probe,
}

#[derive(Debug, Serialize, Deserialize)]
enum PeerReply {
    Append(AppendEntriesResponse<NodeId>),
    Vote(VoteResponse<NodeId>),
    Snapshot(InstallSnapshotResponse<NodeId>),
    /// Whether it has never been in a cluster (its Raft log is empty).
    Probe {
        fresh: bool,
    },
    /// The receiving node could not handle it (it is shutting down, or
    /// refused a snapshot): the sender retries later.
    Refused(String),
}

/// Where each node's WebSocket port is, as its peer connections said.
pub type Directory = Arc<Mutex<HashMap<NodeId, String>>>;

async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    value: &impl Serialize,
) -> io::Result<()> {
    let payload = postcard::to_stdvec(value).map_err(io::Error::other)?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&n| n as usize <= FRAME_BYTES_MAX)
        .ok_or_else(|| io::Error::other("frame too large"))?;
    let mut bytes = Vec::with_capacity(4 + payload.len());
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(&payload);
    stream.write_all(&bytes).await?;
    stream.flush().await
}

async fn read_frame<S: AsyncRead + Unpin, T: DeserializeOwned>(stream: &mut S) -> io::Result<T> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(io::Error::other(format!("a frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    postcard::from_bytes(&payload).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Opens peer connections for openraft.
#[derive(Clone)]
pub struct Peers<D> {
    dialer: Arc<D>,
    hello: Hello,
    identities: Arc<Identities>,
}

impl<D: Dialer> Peers<D> {
    /// Peers dialed through `dialer`, greeted with `hello`, and checked
    /// against `identities`.
    pub fn new(dialer: Arc<D>, hello: Hello, identities: Arc<Identities>) -> Peers<D> {
        Peers {
            dialer,
            hello,
            identities,
        }
    }
}

impl<D: Dialer> RaftNetworkFactory<TypeConfig> for Peers<D> {
    type Network = PeerClient<D>;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient<D> {
        PeerClient {
            target,
            addr: node.addr.clone(),
            dialer: Arc::clone(&self.dialer),
            hello: self.hello.clone(),
            identities: Arc::clone(&self.identities),
            stream: tokio::sync::Mutex::new(None),
        }
    }
}

/// One node's connection to another.
pub struct PeerClient<D: Dialer> {
    target: NodeId,
    addr: String,
    dialer: Arc<D>,
    hello: Hello,
    identities: Arc<Identities>,
    /// openraft wants a network client that is `Sync`; a stream need not
    /// be.
    stream: tokio::sync::Mutex<Option<D::Stream>>,
}

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("cannot reach node {0}: {1}")]
    Unreachable(NodeId, io::Error),
    #[error("node {0}: {1}")]
    Failed(NodeId, String),
}

impl<E: std::error::Error> From<CallError> for RPCError<NodeId, BasicNode, E> {
    fn from(error: CallError) -> Self {
        match &error {
            CallError::Unreachable(..) => RPCError::Unreachable(Unreachable::new(&error)),
            CallError::Failed(..) => RPCError::Network(NetworkError::new(&error)),
        }
    }
}

impl<D: Dialer> PeerClient<D> {
    async fn call(&mut self, request: PeerRequest, ttl: Duration) -> Result<PeerReply, CallError> {
        let target = self.target;
        let exchanged = tokio::time::timeout(ttl, self.exchange(&request)).await;
        let result = match exchanged {
            Ok(result) => result,
            Err(_) => Err(CallError::Failed(target, "timed out".into())),
        };
        if result.is_err() {
            // The stream may hold half a frame: start over next time.
            *self.stream.get_mut() = None;
        }
        match result? {
            PeerReply::Refused(why) => Err(CallError::Failed(target, why)),
            reply => Ok(reply),
        }
    }

    async fn exchange(&mut self, request: &PeerRequest) -> Result<PeerReply, CallError> {
        let target = self.target;
        let failed = |e: io::Error| CallError::Failed(target, e.to_string());
        let stream = self.stream.get_mut();
        if stream.is_none() {
            let (host, port) =
                split_addr(&self.addr).map_err(|e| CallError::Unreachable(target, e))?;
            let mut stream = self
                .dialer
                .dial(host, port)
                .await
                .map_err(|e| CallError::Unreachable(target, e))?;
            self.greet(&mut stream)
                .await
                .map_err(|e| CallError::Unreachable(target, e))?;
            *self.stream.get_mut() = Some(stream);
        }
        let Some(stream) = self.stream.get_mut().as_mut() else {
            unreachable!("connected above")
        };
        write_frame(stream, request).await.map_err(failed)?;
        read_frame(stream).await.map_err(failed)
    }
}

impl<D: Dialer> PeerClient<D> {
    /// Whether the peer has never been in a cluster; an error if it cannot
    /// be reached or refuses this node (it remembers another incarnation of
    /// it: so it has been in a cluster with it).
    pub async fn probe(&mut self, ttl: Duration) -> Result<bool, String> {
        match self.call(PeerRequest::Probe, ttl).await {
            Ok(PeerReply::Probe { fresh }) => Ok(fresh),
            Ok(_) => Err(unexpected(self.target).to_string()),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Says hello on a new connection, and checks who answers.
    async fn greet(&self, stream: &mut D::Stream) -> io::Result<()> {
        write_frame(stream, &self.hello).await?;
        match read_frame(stream).await? {
            HelloAck::Welcome { incarnation } => self
                .identities
                .check(self.target, incarnation)
                .map_err(io::Error::other),
            HelloAck::Refused(why) => Err(io::Error::other(why)),
        }
    }
}

/// Splits `host:port`.
pub fn split_addr(addr: &str) -> io::Result<(&str, u16)> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not host:port: {addr:?}"),
        )
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    Ok((host.trim_start_matches('[').trim_end_matches(']'), port))
}

fn unexpected(target: NodeId) -> CallError {
    CallError::Failed(target, "a reply of the wrong kind".into())
}

impl<D: Dialer> RaftNetwork<TypeConfig> for PeerClient<D> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self
            .call(PeerRequest::Append(rpc), option.hard_ttl())
            .await?
        {
            PeerReply::Append(reply) => Ok(reply),
            _ => Err(unexpected(self.target).into()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self
            .call(PeerRequest::Snapshot(rpc), option.hard_ttl())
            .await?
        {
            PeerReply::Snapshot(reply) => Ok(reply),
            _ => Err(unexpected(self.target).into()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.call(PeerRequest::Vote(rpc), option.hard_ttl()).await? {
            PeerReply::Vote(reply) => Ok(reply),
            _ => Err(unexpected(self.target).into()),
        }
    }
}

/// Serves the peer port until `stopped` turns true: each connection's
/// requests are handed to `raft` one by one. With `tls`, a connection
/// must first complete a mutual TLS handshake (within [`HELLO_TIMEOUT`],
/// in its own task, so a stranger that never finishes one holds up only
/// its own slot).
pub async fn serve_peers<L: Listener>(
    mut listener: L,
    raft: Raft,
    directory: Directory,
    identities: Arc<Identities>,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stopped: watch::Receiver<bool>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(PEER_CONNECTIONS_MAX));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stopped.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "peer port: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, "peer port: too many connections; refusing");
            continue;
        };
        let (raft, directory) = (raft.clone(), Arc::clone(&directory));
        let identities = Arc::clone(&identities);
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            let served = match acceptor {
                None => serve_peer(stream, raft, directory, &identities).await,
                Some(acceptor) => match handshake(&acceptor, stream).await {
                    Ok(stream) => serve_peer(stream, raft, directory, &identities).await,
                    Err(error) => {
                        tracing::warn!(
                            %peer, %error,
                            "peer port: refused a connection without the cluster's certificate"
                        );
                        Err(error)
                    }
                },
            };
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "peer connection ended");
            }
            drop(slot);
        });
        // Reap finished connections so the set stays small.
        while connections.try_join_next().is_some() {}
    }
}

/// The server's side of a mutual TLS handshake, within [`HELLO_TIMEOUT`].
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: S,
) -> io::Result<tokio_rustls::server::TlsStream<S>> {
    tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| io::Error::other("no TLS handshake in time"))?
}

async fn serve_peer<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    raft: Raft,
    directory: Directory,
    identities: &Identities,
) -> io::Result<()> {
    let hello: Hello = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut stream))
        .await
        .map_err(|_| io::Error::other("no hello in time"))??;
    if let Err(error) = identities.check(hello.from, hello.incarnation) {
        tracing::warn!(%error, "refusing a peer");
        write_frame(&mut stream, &HelloAck::Refused(error.to_string())).await?;
        return Err(io::Error::other(error));
    }
    let own = identities.own();
    write_frame(&mut stream, &HelloAck::Welcome { incarnation: own }).await?;
    directory
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(hello.from, hello.client_url.clone());
    loop {
        let request: PeerRequest = read_frame(&mut stream).await?;
        let reply = handle(&raft, request).await;
        write_frame(&mut stream, &reply).await?;
    }
}

async fn handle(raft: &Raft, request: PeerRequest) -> PeerReply {
    let refused = |e: &dyn std::fmt::Display| PeerReply::Refused(e.to_string());
    match request {
        PeerRequest::Append(rpc) => raft
            .append_entries(rpc)
            .await
            .map_or_else(|e| refused(&e), PeerReply::Append),
        PeerRequest::Vote(rpc) => raft
            .vote(rpc)
            .await
            .map_or_else(|e| refused(&e), PeerReply::Vote),
        PeerRequest::Snapshot(rpc) => raft
            .install_snapshot(rpc)
            .await
            .map_or_else(|e| refused(&e), PeerReply::Snapshot),
        PeerRequest::Probe => PeerReply::Probe {
            fresh: raft.metrics().borrow().last_log_index.is_none(),
        },
    }
}
