//! The libp2p network: one actor task owns the `Swarm`; everything else talks
//! to it through a cloneable [`NetworkHandle`] (bounded command channel, oneshot
//! replies) and receives what the network delivers as [`NetEvent`]s.
//! QUIC (TLS 1.3) on real nodes, libp2p's memory transport for in-process
//! swarms (simnet's real tier); mDNS for the LAN, bootstrap peers elsewhere,
//! and peers heard of in adverts (or remembered in the peers file) dialled
//! towards a target degree, so the mesh outlives any one bootstrap node.
//! In a keyed swarm (a join token and a certificate) peers must pass the
//! admission handshake (see [`auth`]) before anything they send is used.

pub mod actor;
pub mod auth;
pub mod behaviour;
pub mod codec;
pub mod peers;
pub mod relay;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use swarm_protocol::{
    Advert, EscalateReply, EscalateRequest, QueryReply, QueryRequest, VoteReply, VoteRequest,
};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

pub use actor::spawn;
pub use auth::AdmissionSetup;
pub use relay::{RelayFrames, RelaySink};

#[derive(Debug, Error, Clone)]
pub enum NetError {
    #[error("network setup: {0}")]
    Setup(String),
    #[error("request to {peer} failed: {reason}")]
    Request { peer: String, reason: String },
    #[error("request to {peer} timed out after {ms} ms")]
    Timeout { peer: String, ms: u64 },
    #[error("network actor stopped")]
    Stopped,
    #[error("bad multiaddr `{0}`")]
    BadAddr(String),
    #[error("peer {peer} is not admitted to this swarm: {reason}")]
    NotAdmitted { peer: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// UDP/QUIC with TLS 1.3.
    Quic,
    /// In-process memory transport with Noise + Yamux (tests, simnet).
    Memory,
}

#[derive(Debug, Clone)]
pub struct NetConfig {
    pub namespace: String,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    pub transport: TransportKind,
    /// Upper bound on any one request (each request also carries its own deadline).
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    /// Gossipsub heartbeat.
    pub heartbeat: Duration,
    /// Connected peers this node dials towards, from adverts, mDNS and the
    /// peers file (bootstrap and mDNS peers are dialled regardless); 0 = none.
    pub target_peers: usize,
    pub limits: Limits,
    /// Where known peers are kept across restarts; `None` = nowhere (memory
    /// swarms and throwaway identities write no file).
    pub peers_file: Option<PathBuf>,
    /// Keyed swarm: only peers with a valid certificate are served and heard;
    /// `None` = open swarm (every peer that reaches the port is a member).
    pub admission: Option<AdmissionSetup>,
}

/// Connection and stream limits (libp2p `connection_limits`, request-response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Established connections in all; incoming ones may take all but
    /// `target_peers` of them, so inbound floods never stop our own dials.
    pub max_connections: u32,
    /// Established connections per peer (2: two peers dialling each other at
    /// once must not both be refused).
    pub max_connections_per_peer: u32,
    /// Connections being set up, per direction.
    pub max_pending: u32,
    /// Concurrent request-response streams per connection and protocol.
    pub max_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 128,
            max_connections_per_peer: 2,
            max_pending: 32,
            max_streams: 32,
        }
    }
}

impl NetConfig {
    pub fn topic(&self) -> String {
        format!("slm-swarm/{}/adverts/1", self.namespace)
    }

    /// Gossip topic of the swarm key's signed revocation list (keyed swarms).
    pub fn revocations_topic(&self) -> String {
        format!("slm-swarm/{}/revocations/1", self.namespace)
    }

    pub fn protocol(&self, name: &str) -> String {
        format!("/slm-swarm/{}/{name}/1", self.namespace)
    }
}

/// What the network delivers to the node.
pub enum NetEvent {
    /// A validated advert, signed by its author.
    Advert {
        advert: Advert,
    },
    Vote {
        peer: PeerId,
        req: VoteRequest,
        channel: ResponseChannel<VoteReply>,
    },
    Query {
        peer: PeerId,
        req: QueryRequest,
        channel: ResponseChannel<QueryReply>,
    },
    Escalate {
        peer: PeerId,
        req: EscalateRequest,
        channel: ResponseChannel<EscalateReply>,
    },
    /// An escalation whose answer is relayed piece by piece as the cloud streams it.
    EscalateStream {
        peer: PeerId,
        req: EscalateRequest,
        sink: RelaySink,
    },
    Connected(PeerId),
    Disconnected(PeerId),
    ListenAddr(Multiaddr),
    /// Keyed swarm: `peer` showed a valid certificate granting `role`; until
    /// then nothing it sends reaches the node (open swarms never emit this).
    Admitted {
        peer: PeerId,
        role: swarm_protocol::Role,
    },
    /// Keyed swarm: `peer` was disconnected (and blocked for a while, unless its
    /// certificate merely expired) for `reason`.
    Refused {
        peer: PeerId,
        reason: String,
    },
    /// Keyed swarm: a newer signed revocation list was adopted.
    Revocations(Box<swarm_protocol::Revocations>),
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, NetError>>;

pub(crate) enum Command {
    Publish(Vec<u8>),
    Vote(PeerId, VoteRequest, Reply<VoteReply>),
    Query(PeerId, QueryRequest, Reply<QueryReply>),
    Escalate(PeerId, EscalateRequest, Reply<EscalateReply>),
    RespondVote(ResponseChannel<VoteReply>, VoteReply),
    RespondQuery(ResponseChannel<QueryReply>, QueryReply),
    RespondEscalate(ResponseChannel<EscalateReply>, EscalateReply),
    AddAddrs(PeerId, Vec<Multiaddr>),
    Dial(Multiaddr),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    Connected(oneshot::Sender<Vec<PeerId>>),
    /// Whether a raw stream to the peer would be served now: an open swarm,
    /// or admitted both ways (otherwise the request-response path, which waits
    /// for the handshake, is the one to use).
    Ready(PeerId, oneshot::Sender<bool>),
    Shutdown(oneshot::Sender<()>),
}

/// Cheap to clone; every call is bounded by the command channel and a deadline.
#[derive(Clone)]
pub struct NetworkHandle {
    tx: mpsc::Sender<Command>,
    local: PeerId,
    /// Opens raw streams (the escalation relay) without going through the actor.
    streams: libp2p_stream::Control,
    relay: StreamProtocol,
}

impl NetworkHandle {
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    async fn send(&self, c: Command) -> Result<(), NetError> {
        self.tx.send(c).await.map_err(|_| NetError::Stopped)
    }

    /// Publish an encoded advert on the adverts topic.
    pub async fn publish(&self, bytes: Vec<u8>) -> Result<(), NetError> {
        self.send(Command::Publish(bytes)).await
    }

    async fn request<T>(
        &self,
        peer: PeerId,
        timeout: Duration,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(NetError::Stopped),
            Err(_) => Err(NetError::Timeout {
                peer: peer.to_string(),
                ms: timeout.as_millis() as u64,
            }),
        }
    }

    pub async fn vote(
        &self,
        peer: PeerId,
        req: VoteRequest,
        timeout: Duration,
    ) -> Result<VoteReply, NetError> {
        self.request(peer, timeout, |tx| Command::Vote(peer, req, tx))
            .await
    }

    pub async fn query(
        &self,
        peer: PeerId,
        req: QueryRequest,
        timeout: Duration,
    ) -> Result<QueryReply, NetError> {
        self.request(peer, timeout, |tx| Command::Query(peer, req, tx))
            .await
    }

    pub async fn escalate(
        &self,
        peer: PeerId,
        req: EscalateRequest,
        timeout: Duration,
    ) -> Result<EscalateReply, NetError> {
        self.request(peer, timeout, |tx| Command::Escalate(peer, req, tx))
            .await
    }

    /// An escalation whose answer the gateway relays as the cloud streams it:
    /// pieces, then the reply, all within `timeout`. `Err` before any frame
    /// means nothing was relayed (the caller may use [`Self::escalate`]).
    pub async fn escalate_stream(
        &self,
        peer: PeerId,
        req: EscalateRequest,
        timeout: Duration,
    ) -> Result<RelayFrames, NetError> {
        let deadline = Instant::now() + timeout;
        let (tx, rx) = oneshot::channel();
        self.send(Command::Ready(peer, tx)).await?;
        if !rx.await.map_err(|_| NetError::Stopped)? {
            return Err(NetError::NotAdmitted {
                peer: peer.to_string(),
                reason: "admission not complete both ways yet".into(),
            });
        }
        let mut control = self.streams.clone();
        let stream =
            match tokio::time::timeout_at(deadline.into(), control.open_stream(peer, self.relay.clone()))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(NetError::Request {
                        peer: peer.to_string(),
                        reason: e.to_string(),
                    })
                }
                Err(_) => {
                    return Err(NetError::Timeout {
                        peer: peer.to_string(),
                        ms: timeout.as_millis() as u64,
                    })
                }
            };
        relay::request(peer, stream, req, deadline).await
    }

    pub async fn respond_vote(&self, ch: ResponseChannel<VoteReply>, r: VoteReply) -> Result<(), NetError> {
        self.send(Command::RespondVote(ch, r)).await
    }

    pub async fn respond_query(
        &self,
        ch: ResponseChannel<QueryReply>,
        r: QueryReply,
    ) -> Result<(), NetError> {
        self.send(Command::RespondQuery(ch, r)).await
    }

    pub async fn respond_escalate(
        &self,
        ch: ResponseChannel<EscalateReply>,
        r: EscalateReply,
    ) -> Result<(), NetError> {
        self.send(Command::RespondEscalate(ch, r)).await
    }

    /// Remember addresses of a peer (from its advert) so requests can dial it.
    pub async fn add_addrs(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), NetError> {
        self.send(Command::AddAddrs(peer, addrs)).await
    }

    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.send(Command::Dial(addr)).await
    }

    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::ListenAddrs(tx)).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Connected(tx)).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// Stop the actor (closes connections); waits up to a second.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), rx).await;
        }
    }
}
