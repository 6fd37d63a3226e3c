//! The network actor: the only owner of the libp2p `Swarm`. It turns commands
//! into swarm calls, swarm events into [`NetEvent`]s, validates adverts in
//! gossipsub, dials mDNS and bootstrap peers (with retry and backoff) and the
//! peers it hears of (see [`super::peers`]) towards a target degree, keeps the
//! peers file, and keeps peers of other namespaces away. In a keyed swarm it
//! runs the admission handshake on every new connection and keeps peers that
//! have not passed it (or were refused) away from the node: their requests are
//! answered `Unauthorized`, their gossip is dropped, and after a refusal or
//! [`AUTH_TIMEOUT`] without a valid certificate they are disconnected and blocked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::core::transport::MemoryTransport;
use libp2p::core::upgrade::Version;
use libp2p::core::ConnectedPoint;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{identify, mdns, noise, yamux, Multiaddr, PeerId, Swarm, Transport};
use swarm_protocol::admission::MAX_CLOCK_SKEW_MS;
use swarm_protocol::{
    decode_msg, Admission, Advert, Certificate, ErrorCode, EscalateReply, EscalateRequest, QueryReply,
    QueryRequest, Revocations, Role, VoteReply, VoteRequest, WireError,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::auth::{AuthHello, AuthReply};
use super::behaviour::{identify_version, Behaviour, BehaviourEvent, AUTH_TIMEOUT};
use super::peers::{self, PeerBook, MAX_KNOWN_PEERS};

mod admit;
mod events;
use super::{Command, NetConfig, NetError, NetEvent, NetworkHandle, Reply, TransportKind};

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The peers file is rewritten at most this often (and at shutdown).
const SAVE_EVERY: Duration = Duration::from_secs(5);
/// Peer ids of other namespaces remembered (so they are not redialled).
const MAX_FOREIGN: usize = 1024;
/// QUIC idle timeout and keep-alive: a peer killed without closing its
/// connections is noticed after this much silence (libp2p's default is 10 s),
/// so requests in flight to it fail and are retried elsewhere sooner. With a
/// keep-alive every second, five lost in a row are needed on a live link.
const QUIC_IDLE_MS: u32 = 5_000;
const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// A refused peer stays blocked this long, so a re-issued certificate can rejoin later.
const BLOCK_FOR: Duration = Duration::from_secs(600);
/// Most peers blocked at once (the oldest block is lifted first).
const MAX_BLOCKED: usize = 4096;
/// Outbound requests waiting for a peer's admission.
const MAX_PARKED: usize = 256;
/// A refused peer is blocked this long after the refusal is sent, so the
/// refusal (which says why) reaches it first.
const REFUSE_GRACE: Duration = Duration::from_millis(300);
/// The revocation list in force is re-published this often (peers that
/// joined since learn it); also soon after a peer shows an older one.
const REPUBLISH_EVERY: Duration = Duration::from_secs(30);
const REPUBLISH_SOON: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// An outbound request held until its peer is admitted.
enum Parked {
    Vote(VoteRequest, Reply<VoteReply>),
    Query(QueryRequest, Reply<QueryReply>),
    Escalate(EscalateRequest, Reply<EscalateReply>),
}

impl Parked {
    fn fail(self, e: NetError) {
        match self {
            Parked::Vote(_, tx) => {
                let _ = tx.send(Err(e));
            }
            Parked::Query(_, tx) => {
                let _ = tx.send(Err(e));
            }
            Parked::Escalate(_, tx) => {
                let _ = tx.send(Err(e));
            }
        }
    }
}

/// Admission state of a keyed swarm.
struct Auth {
    adm: Admission,
    own: Certificate,
    own_bytes: Vec<u8>,
    own_expiry_warned: bool,
    rev_topic: IdentTopic,
    /// Peers whose certificate verified, with it (re-checked on expiry and new lists).
    admitted: HashMap<PeerId, Certificate>,
    /// Peers that accepted our certificate: requests to them may go out.
    accepted_by: HashSet<PeerId>,
    /// Connected peers still in the handshake, with their deadline.
    pending: HashMap<PeerId, Instant>,
    /// Refused peers to block once the refusal has had time to leave.
    refusing: Vec<(PeerId, Instant)>,
    /// Blocked peers and when to lift the block.
    blocked: HashMap<PeerId, Instant>,
    handshakes: HashMap<OutboundRequestId, PeerId>,
    parked: Vec<(PeerId, Instant, Parked)>,
    next_republish: Instant,
}

struct Bootstrap {
    addr: Multiaddr,
    peer: Option<PeerId>,
    next_try: Instant,
    backoff: Duration,
    dialing: Option<ConnectionId>,
}

struct Actor {
    swarm: Swarm<Behaviour>,
    cfg: NetConfig,
    topic: IdentTopic,
    events: mpsc::Sender<NetEvent>,
    bootstrap: Vec<Bootstrap>,
    book: PeerBook,
    peers_file: Option<PathBuf>,
    /// The peers file's content differs from the book's.
    save_due: bool,
    last_save: Option<Instant>,
    saving: Option<JoinHandle<()>>,
    foreign: HashSet<PeerId>,
    listen_addrs: Vec<Multiaddr>,
    votes: HashMap<OutboundRequestId, (PeerId, Reply<VoteReply>)>,
    queries: HashMap<OutboundRequestId, (PeerId, Reply<QueryReply>)>,
    escalations: HashMap<OutboundRequestId, (PeerId, Reply<EscalateReply>)>,
    /// `None`: open swarm.
    auth: Option<Auth>,
    /// Inbound streams of the escalation relay, and the slots they may hold.
    relay_in: libp2p_stream::IncomingStreams,
    relay_slots: std::sync::Arc<tokio::sync::Semaphore>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> BoxError {
    Box::new(e)
}

fn build_swarm(key: Keypair, cfg: &NetConfig) -> Result<Swarm<Behaviour>, NetError> {
    let setup = |e: String| NetError::Setup(e);
    let idle = cfg.idle_timeout;
    // QUIC's own per-connection stream cap: the request-response protocols'
    // limit each, plus room for gossipsub, identify and ping.
    let quic_streams =
        u32::try_from(cfg.limits.max_streams.saturating_mul(3).saturating_add(16)).unwrap_or(u32::MAX);
    let swarm = match cfg.transport {
        TransportKind::Quic => libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_quic_config(|mut q| {
                q.max_idle_timeout = QUIC_IDLE_MS;
                q.keep_alive_interval = QUIC_KEEP_ALIVE;
                q.max_concurrent_stream_limit = quic_streams;
                q
            })
            .with_behaviour(|k| Behaviour::new(k, cfg).map_err(boxed))
            .map_err(|e| setup(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build(),
        TransportKind::Memory => libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_other_transport(|k| -> Result<_, BoxError> {
                Ok(MemoryTransport::default()
                    .upgrade(Version::V1)
                    .authenticate(noise::Config::new(k).map_err(boxed)?)
                    .multiplex(yamux::Config::default())
                    .boxed())
            })
            .map_err(|e| setup(e.to_string()))?
            .with_behaviour(|k| Behaviour::new(k, cfg).map_err(boxed))
            .map_err(|e| setup(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build(),
    };
    Ok(swarm)
}

/// Start the network actor on the current tokio runtime.
pub fn spawn(key: Keypair, cfg: NetConfig) -> Result<(NetworkHandle, mpsc::Receiver<NetEvent>), NetError> {
    let local = key.public().to_peer_id();
    let mut swarm = build_swarm(key, &cfg)?;
    let topic = IdentTopic::new(cfg.topic());
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(|e| NetError::Setup(format!("subscribe: {e}")))?;
    let now = Instant::now();
    let auth = match &cfg.admission {
        Some(setup) => {
            let rev_topic = IdentTopic::new(cfg.revocations_topic());
            swarm
                .behaviour_mut()
                .gossipsub
                .subscribe(&rev_topic)
                .map_err(|e| NetError::Setup(format!("subscribe: {e}")))?;
            let mut adm = Admission::new(setup.token.swarm);
            if let Some(list) = &setup.revocations {
                adm.apply_revocations(list.clone())
                    .map_err(|e| NetError::Setup(format!("revocation list: {e}")))?;
            }
            Some(Auth {
                adm,
                own_bytes: setup.cert.to_bytes(),
                own: setup.cert.clone(),
                own_expiry_warned: false,
                rev_topic,
                admitted: HashMap::new(),
                accepted_by: HashSet::new(),
                pending: HashMap::new(),
                refusing: Vec::new(),
                blocked: HashMap::new(),
                handshakes: HashMap::new(),
                parked: Vec::new(),
                next_republish: now + REPUBLISH_SOON,
            })
        }
        None => None,
    };
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Setup(format!("cannot listen on {addr}: {e}")))?;
    }
    let bootstrap = cfg
        .bootstrap
        .iter()
        .map(|a| Bootstrap {
            addr: a.clone(),
            peer: None,
            next_try: now,
            backoff: BACKOFF_MIN,
            dialing: None,
        })
        .collect();
    let mut book = PeerBook::new(local, cfg.transport, MAX_KNOWN_PEERS);
    if let Some(path) = &cfg.peers_file {
        match peers::load(path) {
            Ok(list) => {
                for (p, addrs) in &list {
                    for a in book.add(*p, addrs, now) {
                        swarm.add_peer_address(*p, a);
                    }
                }
                if !list.is_empty() {
                    tracing::info!("{} known peers from {}", book.len(), path.display());
                }
            }
            // A damaged file must not stop the node: bootstrap and mDNS still work.
            Err(e) => tracing::warn!("ignoring the peers file: {e}"),
        }
    }
    let relay = libp2p::StreamProtocol::try_from_owned(cfg.protocol("escalate-stream"))
        .map_err(|e| NetError::Setup(format!("protocol name: {e}")))?;
    let mut streams = swarm.behaviour().stream.new_control();
    let relay_in = streams
        .accept(relay.clone())
        .map_err(|e| NetError::Setup(format!("relay protocol: {e:?}")))?;
    let relay_slots = super::relay::slots(cfg.limits.max_streams);
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (ev_tx, ev_rx) = mpsc::channel(1024);
    let cfg_peers_file = cfg.peers_file.clone();
    let actor = Actor {
        swarm,
        topic,
        cfg,
        events: ev_tx,
        bootstrap,
        book,
        peers_file: cfg_peers_file,
        save_due: false,
        last_save: None,
        saving: None,
        foreign: HashSet::new(),
        listen_addrs: Vec::new(),
        votes: HashMap::new(),
        queries: HashMap::new(),
        escalations: HashMap::new(),
        auth,
        relay_in,
        relay_slots,
    };
    tokio::spawn(actor.run(cmd_rx));
    let handle = NetworkHandle {
        tx: cmd_tx,
        local,
        streams,
        relay,
    };
    Ok((handle, ev_rx))
}

fn unauthorized() -> WireError {
    WireError {
        code: ErrorCode::Unauthorized,
        message: "not admitted to this swarm: present a valid certificate first".into(),
    }
}

fn overloaded() -> WireError {
    WireError {
        code: ErrorCode::Overloaded,
        message: "node is busy".into(),
    }
}

impl Actor {
    async fn run(mut self, mut cmds: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                cmd = cmds.recv() => match cmd {
                    Some(Command::Shutdown(done)) => {
                        self.save_now();
                        let _ = done.send(());
                        break;
                    }
                    Some(c) => self.command(c),
                    None => break,
                },
                ev = self.swarm.select_next_some() => self.swarm_event(ev),
                Some((peer, stream)) = self.relay_in.next() => {
                    // Admission is known here; the reading happens in a task of its own.
                    let admitted = self.is_admitted(&peer);
                    tokio::spawn(super::relay::accept(
                        peer,
                        stream,
                        admitted,
                        self.relay_slots.clone(),
                        self.events.clone(),
                    ));
                }
                _ = tick.tick() => {
                    self.auth_tick();
                    self.redial_bootstrap();
                    self.dial_known();
                    self.maybe_save();
                }
            }
        }
        tracing::debug!("network actor stopped");
    }

    /// Hand an event to the node without blocking; a full queue gives it back.
    fn emit(&self, ev: NetEvent) -> Result<(), Box<NetEvent>> {
        self.events.try_send(ev).map_err(|e| match e {
            mpsc::error::TrySendError::Full(ev) | mpsc::error::TrySendError::Closed(ev) => Box::new(ev),
        })
    }

    fn command(&mut self, c: Command) {
        let b = self.swarm.behaviour_mut();
        match c {
            Command::Publish(bytes) => {
                if let Err(e) = b.gossipsub.publish(self.topic.clone(), bytes) {
                    // No subscribed peer yet is normal for a lone node.
                    tracing::trace!("advert not published: {e}");
                }
            }
            Command::Vote(peer, req, reply) => self.send_or_park(peer, Parked::Vote(req, reply)),
            Command::Query(peer, req, reply) => self.send_or_park(peer, Parked::Query(req, reply)),
            Command::Escalate(peer, req, reply) => self.send_or_park(peer, Parked::Escalate(req, reply)),
            Command::RespondVote(ch, r) => {
                let _ = b.vote.send_response(ch, r);
            }
            Command::RespondQuery(ch, r) => {
                let _ = b.query.send_response(ch, r);
            }
            Command::RespondEscalate(ch, r) => {
                let _ = b.escalate.send_response(ch, r);
            }
            Command::AddAddrs(peer, addrs) => {
                // Only addresses the book accepts (dialable, bounded) reach the swarm.
                if !self.foreign.contains(&peer) {
                    for a in self.book.add(peer, &addrs, Instant::now()) {
                        self.swarm.add_peer_address(peer, a);
                    }
                }
            }
            Command::Dial(addr) => {
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::debug!("dial {addr}: {e}");
                }
            }
            Command::ListenAddrs(tx) => {
                let _ = tx.send(self.listen_addrs.clone());
            }
            Command::Connected(tx) => {
                let _ = tx.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Ready(peer, tx) => {
                let ready = self
                    .auth
                    .as_ref()
                    .is_none_or(|a| a.admitted.contains_key(&peer) && a.accepted_by.contains(&peer));
                let _ = tx.send(ready);
            }
            Command::Shutdown(_) => {}
        }
    }

    fn redial_bootstrap(&mut self) {
        let now = Instant::now();
        for i in 0..self.bootstrap.len() {
            let due = {
                let b = &self.bootstrap[i];
                let connected = b.peer.is_some_and(|p| self.swarm.is_connected(&p));
                !connected && b.dialing.is_none() && now >= b.next_try
            };
            if !due {
                continue;
            }
            let opts = DialOpts::from(self.bootstrap[i].addr.clone());
            let id = opts.connection_id();
            let b = &mut self.bootstrap[i];
            b.next_try = now + b.backoff;
            b.backoff = (b.backoff * 2).min(BACKOFF_MAX);
            match self.swarm.dial(opts) {
                Ok(()) => self.bootstrap[i].dialing = Some(id),
                Err(e) => tracing::debug!("bootstrap dial {}: {e}", self.bootstrap[i].addr),
            }
        }
    }

    /// Dial peers from the book while fewer than `target_peers` are connected
    /// or being dialled; the book decides who is due (backoff per peer).
    fn dial_known(&mut self) {
        let target = self.cfg.target_peers;
        if target == 0 || self.book.len() == 0 {
            return;
        }
        let busy = self.swarm.connected_peers().count()
            + self.book.dialing()
            + self.bootstrap.iter().filter(|b| b.dialing.is_some()).count();
        let want = target.saturating_sub(busy);
        if want == 0 {
            return;
        }
        let (swarm, foreign) = (&self.swarm, &self.foreign);
        let due = self.book.due(Instant::now(), want, |p| {
            swarm.is_connected(p) || foreign.contains(p)
        });
        for (peer, addrs) in due {
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            let id = opts.connection_id();
            self.book.dial_started(&peer, id);
            match self.swarm.dial(opts) {
                Ok(()) => tracing::debug!("dialling known peer {peer}"),
                // Someone else (a request, mDNS) is dialling it already: not a failure.
                Err(DialError::DialPeerConditionFalse(_)) => self.book.dial_skipped(&peer),
                Err(e) => {
                    tracing::debug!("dial {peer}: {e}");
                    self.book.dial_failed(id);
                }
            }
        }
    }

    /// Rewrite the peers file in the background when it is out of date, at most every [`SAVE_EVERY`].
    fn maybe_save(&mut self) {
        if self.book.take_dirty() {
            self.save_due = true;
        }
        let Some(path) = self.peers_file.clone() else {
            return;
        };
        let recent = self.last_save.is_some_and(|t| t.elapsed() < SAVE_EVERY);
        let busy = self.saving.as_ref().is_some_and(|h| !h.is_finished());
        if !self.save_due || recent || busy {
            return;
        }
        self.save_due = false;
        self.last_save = Some(Instant::now());
        let bytes = peers::encode(&self.book.saved());
        self.saving = Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = peers::write_atomic(&path, &bytes) {
                tracing::warn!("{e}");
            }
        }));
    }

    /// At shutdown: write the peers file now if it is out of date.
    fn save_now(&mut self) {
        if self.book.take_dirty() {
            self.save_due = true;
        }
        if let (Some(path), true) = (&self.peers_file, self.save_due) {
            if let Err(e) = peers::write_atomic(path, &peers::encode(&self.book.saved())) {
                tracing::warn!("{e}");
            }
            self.save_due = false;
        }
    }
}

/// Settle responses and failures of outbound requests; return inbound requests.
fn rr_event<Req, Resp>(
    ev: request_response::Event<Req, Resp>,
    pending: &mut HashMap<OutboundRequestId, (PeerId, Reply<Resp>)>,
) -> Option<(PeerId, Req, request_response::ResponseChannel<Resp>)> {
    match ev {
        request_response::Event::Message { peer, message, .. } => match message {
            request_response::Message::Request { request, channel, .. } => Some((peer, request, channel)),
            request_response::Message::Response { request_id, response } => {
                if let Some((_, tx)) = pending.remove(&request_id) {
                    let _ = tx.send(Ok(response));
                }
                None
            }
        },
        request_response::Event::OutboundFailure {
            peer,
            request_id,
            error,
            ..
        } => {
            if let Some((_, tx)) = pending.remove(&request_id) {
                let _ = tx.send(Err(NetError::Request {
                    peer: peer.to_string(),
                    reason: error.to_string(),
                }));
            }
            None
        }
        request_response::Event::InboundFailure { peer, error, .. } => {
            tracing::debug!("inbound request from {peer} failed: {error}");
            None
        }
        request_response::Event::ResponseSent { .. } => None,
    }
}
