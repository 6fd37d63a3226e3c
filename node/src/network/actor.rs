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
    };
    tokio::spawn(actor.run(cmd_rx));
    Ok((NetworkHandle { tx: cmd_tx, local }, ev_rx))
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

    fn swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("listening on {address}");
                self.listen_addrs.push(address.clone());
                let _ = self.emit(NetEvent::ListenAddr(address));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                for b in self.bootstrap.iter_mut() {
                    let matches_dial = b.dialing == Some(connection_id);
                    let matches_addr =
                        matches!(&endpoint, ConnectedPoint::Dialer { address, .. } if *address == b.addr);
                    if matches_dial || matches_addr {
                        b.peer = Some(peer_id);
                        b.dialing = None;
                        b.backoff = BACKOFF_MIN;
                    }
                }
                let via = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => Some(address),
                    ConnectedPoint::Listener { .. } => None,
                };
                self.book.connected(&peer_id, via, Instant::now());
                if num_established.get() == 1 {
                    let _ = self.emit(NetEvent::Connected(peer_id));
                    self.start_handshake(peer_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                let now = Instant::now();
                for b in self.bootstrap.iter_mut().filter(|b| b.peer == Some(peer_id)) {
                    b.next_try = now + b.backoff;
                }
                self.book.disconnected(&peer_id, now);
                if let Some(auth) = &mut self.auth {
                    // Admission is per connection: a returning peer shows its certificate again.
                    auth.admitted.remove(&peer_id);
                    auth.accepted_by.remove(&peer_id);
                    auth.pending.remove(&peer_id);
                }
                self.fail_parked(&peer_id, "disconnected before admission");
                let _ = self.emit(NetEvent::Disconnected(peer_id));
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                peer_id,
                ..
            } => {
                if let Some(p) = peer_id {
                    if !self.swarm.is_connected(&p) {
                        self.fail_parked(&p, "unreachable");
                    }
                }
                for b in self
                    .bootstrap
                    .iter_mut()
                    .filter(|b| b.dialing == Some(connection_id))
                {
                    tracing::debug!("bootstrap {} unreachable: {error}", b.addr);
                    b.dialing = None;
                }
                if let Some(p) = self.book.dial_failed(connection_id) {
                    tracing::debug!("known peer {p} unreachable: {error}");
                }
            }
            SwarmEvent::Behaviour(ev) => self.behaviour_event(ev),
            _ => {}
        }
    }

    fn behaviour_event(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                if let Some(auth) = &self.auth {
                    // Only admitted peers are heard: anything else is dropped, not passed on.
                    let admitted = auth.admitted.contains_key(&propagation_source);
                    let is_rev = message.topic == auth.rev_topic.hash();
                    if !admitted || is_rev {
                        let acceptance = if admitted {
                            self.revocations_message(&message.data)
                        } else {
                            tracing::debug!("gossip from {propagation_source} (not admitted) dropped");
                            MessageAcceptance::Ignore
                        };
                        self.swarm
                            .behaviour_mut()
                            .gossipsub
                            .report_message_validation_result(&message_id, &propagation_source, acceptance);
                        return;
                    }
                }
                if message.topic != self.topic.hash() {
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            MessageAcceptance::Reject,
                        );
                    return;
                }
                let verdict = match decode_msg::<Advert>(&message.data) {
                    // The advert must speak for the key that signed it.
                    Ok(a) if message.source.map(|s| s.to_string()) == Some(a.peer.clone()) => Some(a),
                    Ok(a) => {
                        tracing::debug!("advert for {} signed by {:?}: rejected", a.peer, message.source);
                        None
                    }
                    Err(e) => {
                        tracing::debug!("invalid advert from {propagation_source}: {e}");
                        None
                    }
                };
                let acceptance = if verdict.is_some() {
                    MessageAcceptance::Accept
                } else {
                    MessageAcceptance::Reject
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
                if let Some(advert) = verdict {
                    if self.emit(NetEvent::Advert { advert }).is_err() {
                        tracing::warn!("node is not keeping up with adverts; one dropped");
                    }
                }
            }
            BehaviourEvent::Gossipsub(_) => {}
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                let mut by_peer: BTreeMap<PeerId, Vec<Multiaddr>> = BTreeMap::new();
                for (p, a) in list {
                    if p != *self.swarm.local_peer_id() && !self.foreign.contains(&p) {
                        by_peer.entry(p).or_default().push(a);
                    }
                }
                for (p, addrs) in by_peer {
                    for a in &addrs {
                        self.swarm.add_peer_address(p, a.clone());
                    }
                    self.book.add(p, &addrs, Instant::now());
                    if !self.swarm.is_connected(&p) {
                        let opts = DialOpts::peer_id(p).addresses(addrs).build();
                        if let Err(e) = self.swarm.dial(opts) {
                            tracing::debug!("mDNS dial {p}: {e}");
                        }
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(_)) => {}
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if info.protocol_version != identify_version(&self.cfg.namespace) {
                    // Another swarm (or another program) on the same LAN: keep apart.
                    tracing::debug!("{peer_id} speaks {}, not our namespace", info.protocol_version);
                    if self.foreign.len() >= MAX_FOREIGN {
                        if let Some(old) = self.foreign.iter().next().copied() {
                            self.foreign.remove(&old);
                        }
                    }
                    self.foreign.insert(peer_id);
                    self.book.remove(&peer_id);
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                let listen: Vec<Multiaddr> = info
                    .listen_addrs
                    .into_iter()
                    .take(swarm_protocol::MAX_ADDRS)
                    .collect();
                let now = Instant::now();
                for a in self.book.add(peer_id, &listen, now) {
                    self.swarm.add_peer_address(peer_id, a);
                }
                // Identify runs over a live connection: an inbound-only peer counts as reached too.
                self.book.connected(&peer_id, None, now);
            }
            BehaviourEvent::Identify(_) | BehaviourEvent::Ping(_) => {}
            BehaviourEvent::Limits(never) => match never {},
            BehaviourEvent::Blocked(never) => match never {},
            BehaviourEvent::Auth(ev) => self.auth_event(ev),
            BehaviourEvent::Vote(ev) => {
                if let Some((peer, req, channel)) = rr_event(ev, &mut self.votes) {
                    if !self.is_admitted(&peer) {
                        // Never reaches the node: no model load, no cloud call.
                        tracing::debug!("vote request from {peer} (not admitted) refused");
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .vote
                            .send_response(channel, VoteReply::Err(unauthorized()));
                        return;
                    }
                    if let Err(ev) = self.emit(NetEvent::Vote { peer, req, channel }) {
                        let NetEvent::Vote { channel, .. } = *ev else {
                            return;
                        };
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .vote
                            .send_response(channel, VoteReply::Err(overloaded()));
                    }
                }
            }
            BehaviourEvent::Query(ev) => {
                if let Some((peer, req, channel)) = rr_event(ev, &mut self.queries) {
                    if !self.is_admitted(&peer) {
                        // Never reaches the node: no model load, no cloud call.
                        tracing::debug!("query request from {peer} (not admitted) refused");
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .query
                            .send_response(channel, QueryReply::Err(unauthorized()));
                        return;
                    }
                    if let Err(ev) = self.emit(NetEvent::Query { peer, req, channel }) {
                        let NetEvent::Query { channel, .. } = *ev else {
                            return;
                        };
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .query
                            .send_response(channel, QueryReply::Err(overloaded()));
                    }
                }
            }
            BehaviourEvent::Escalate(ev) => {
                if let Some((peer, req, channel)) = rr_event(ev, &mut self.escalations) {
                    if !self.is_admitted(&peer) {
                        // Never reaches the node: no model load, no cloud call.
                        tracing::debug!("escalate request from {peer} (not admitted) refused");
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .escalate
                            .send_response(channel, EscalateReply::Err(unauthorized()));
                        return;
                    }
                    if let Err(ev) = self.emit(NetEvent::Escalate { peer, req, channel }) {
                        let NetEvent::Escalate { channel, .. } = *ev else {
                            return;
                        };
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .escalate
                            .send_response(channel, EscalateReply::Err(overloaded()));
                    }
                }
            }
        }
    }
}

/// Admission (keyed swarms); every method is a no-op or a pass-through in an open swarm.
impl Actor {
    /// May `peer`'s requests and gossip reach the node?
    fn is_admitted(&self, peer: &PeerId) -> bool {
        self.auth.as_ref().is_none_or(|a| a.admitted.contains_key(peer))
    }

    /// Send a request now if the peer is admitted both ways (or the swarm is
    /// open); park it while the handshake runs; refuse it at once if the peer
    /// is blocked.
    fn send_or_park(&mut self, peer: PeerId, req: Parked) {
        let Some(auth) = &mut self.auth else {
            self.send_now(peer, req);
            return;
        };
        if auth.admitted.contains_key(&peer) && auth.accepted_by.contains(&peer) {
            self.send_now(peer, req);
            return;
        }
        let refused = |reason: &str| NetError::NotAdmitted {
            peer: peer.to_string(),
            reason: reason.into(),
        };
        if auth.blocked.contains_key(&peer) || auth.refusing.iter().any(|(p, _)| *p == peer) {
            req.fail(refused("refused by this node"));
            return;
        }
        if auth.parked.len() >= MAX_PARKED {
            req.fail(refused("too many requests waiting for admission"));
            return;
        }
        auth.parked.push((peer, Instant::now() + AUTH_TIMEOUT, req));
        if self.swarm.is_connected(&peer) {
            // Admitted by us but our own handshake was lost (e.g. its connection
            // lost a simultaneous-dial race): show the certificate again.
            self.start_handshake(peer);
        } else {
            let opts = DialOpts::peer_id(peer)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                if !matches!(e, DialError::DialPeerConditionFalse(_)) {
                    self.fail_parked(&peer, &format!("cannot dial: {e}"));
                }
            }
        }
    }

    fn send_now(&mut self, peer: PeerId, req: Parked) {
        let b = self.swarm.behaviour_mut();
        match req {
            Parked::Vote(req, reply) => {
                let id = b.vote.send_request(&peer, req);
                self.votes.insert(id, (peer, reply));
            }
            Parked::Query(req, reply) => {
                let id = b.query.send_request(&peer, req);
                self.queries.insert(id, (peer, reply));
            }
            Parked::Escalate(req, reply) => {
                let id = b.escalate.send_request(&peer, req);
                self.escalations.insert(id, (peer, reply));
            }
        }
    }

    /// Fail every request parked for `peer`.
    fn fail_parked(&mut self, peer: &PeerId, reason: &str) {
        let Some(auth) = &mut self.auth else {
            return;
        };
        let (failed, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut auth.parked)
            .into_iter()
            .partition(|(p, _, _)| p == peer);
        auth.parked = kept;
        for (_, _, req) in failed {
            req.fail(NetError::NotAdmitted {
                peer: peer.to_string(),
                reason: reason.into(),
            });
        }
    }

    /// Send the requests parked for `peer` (now admitted both ways).
    fn release_parked(&mut self, peer: &PeerId) {
        let Some(auth) = &mut self.auth else {
            return;
        };
        let (ready, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut auth.parked)
            .into_iter()
            .partition(|(p, _, _)| p == peer);
        auth.parked = kept;
        for (p, _, req) in ready {
            self.send_now(p, req);
        }
    }

    /// First connection to `peer`: show our certificate and start its clock.
    fn start_handshake(&mut self, peer: PeerId) {
        let Some(auth) = &mut self.auth else {
            return;
        };
        if auth.accepted_by.contains(&peer) || auth.handshakes.values().any(|p| *p == peer) {
            return;
        }
        if !auth.admitted.contains_key(&peer) {
            auth.pending.entry(peer).or_insert(Instant::now() + AUTH_TIMEOUT);
        }
        let hello = AuthHello {
            cert: auth.own_bytes.clone(),
            revocations: auth.adm.revocations_serial(),
        };
        if let Some(rr) = self.swarm.behaviour_mut().auth.as_mut() {
            let id = rr.send_request(&peer, hello);
            auth.handshakes.insert(id, peer);
        }
    }

    /// Checks a certificate `peer` presented; admits it if valid.
    fn check_cert(&mut self, peer: PeerId, hello: &AuthHello) -> Result<Role, String> {
        let Some(auth) = &mut self.auth else {
            return Err("open swarm".into());
        };
        let cert = Certificate::from_bytes(&hello.cert).map_err(|e| e.to_string())?;
        let role = auth
            .adm
            .verify(&cert, &peer.to_string(), now_ms())
            .map_err(|e| e.to_string())?;
        if hello.revocations < auth.adm.revocations_serial() {
            // The peer missed a revocation: pass ours on soon.
            auth.next_republish = auth.next_republish.min(Instant::now() + REPUBLISH_SOON);
        }
        auth.pending.remove(&peer);
        let new = auth.admitted.insert(peer, cert).is_none();
        if new {
            tracing::info!("peer {peer} admitted ({role})");
            let _ = self.emit(NetEvent::Admitted { peer, role });
        }
        Ok(role)
    }

    /// Refuse `peer`: not admitted, nothing of it reaches the node, and it is
    /// disconnected and blocked (after `grace`, so a refusal can leave first).
    fn refuse(&mut self, peer: PeerId, reason: String, grace: Duration) {
        let Some(auth) = &mut self.auth else {
            return;
        };
        auth.admitted.remove(&peer);
        auth.accepted_by.remove(&peer);
        auth.pending.remove(&peer);
        if !auth.refusing.iter().any(|(p, _)| *p == peer) && !auth.blocked.contains_key(&peer) {
            tracing::warn!("peer {peer} refused: {reason}");
            auth.refusing.push((peer, Instant::now() + grace));
            let _ = self.emit(NetEvent::Refused {
                peer,
                reason: reason.clone(),
            });
        }
        self.fail_parked(&peer, &reason);
    }

    fn block(&mut self, peer: PeerId) {
        let Some(auth) = &mut self.auth else {
            return;
        };
        if auth.blocked.len() >= MAX_BLOCKED {
            if let Some(oldest) = auth.blocked.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p) {
                auth.blocked.remove(&oldest);
                self.swarm.behaviour_mut().blocked.unblock_peer(oldest);
            }
        }
        let Some(auth) = &mut self.auth else {
            return;
        };
        auth.blocked.insert(peer, Instant::now() + BLOCK_FOR);
        self.book.remove(&peer);
        // Closes its connections too.
        self.swarm.behaviour_mut().blocked.block_peer(peer);
    }

    fn auth_event(&mut self, ev: request_response::Event<AuthHello, AuthReply>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    let reply = match self.check_cert(peer, &request) {
                        Ok(_) => match &self.auth {
                            Some(auth) => AuthReply::Ok(AuthHello {
                                cert: auth.own_bytes.clone(),
                                revocations: auth.adm.revocations_serial(),
                            }),
                            None => return,
                        },
                        Err(reason) => {
                            self.refuse(peer, format!("invalid certificate: {reason}"), REFUSE_GRACE);
                            AuthReply::Err(WireError {
                                code: ErrorCode::Unauthorized,
                                message: swarm_protocol::clip_owned(
                                    reason,
                                    swarm_protocol::message::MAX_ERROR_LEN,
                                ),
                            })
                        }
                    };
                    if let Some(rr) = self.swarm.behaviour_mut().auth.as_mut() {
                        let _ = rr.send_response(channel, reply);
                    }
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(auth) = &mut self.auth {
                        auth.handshakes.remove(&request_id);
                    }
                    match response {
                        AuthReply::Ok(hello) => match self.check_cert(peer, &hello) {
                            Ok(_) => {
                                if let Some(auth) = &mut self.auth {
                                    auth.accepted_by.insert(peer);
                                }
                                self.release_parked(&peer);
                            }
                            Err(reason) => {
                                self.refuse(peer, format!("invalid certificate: {reason}"), Duration::ZERO)
                            }
                        },
                        AuthReply::Err(e) => {
                            // Our own certificate was refused: nothing will work with this peer.
                            tracing::error!(
                                "peer {peer} refused this node's certificate: {}; ask the swarm owner \
                                 for a new one (`slm-swarm swarm invite`)",
                                e.message
                            );
                            self.fail_parked(&peer, "it refused this node's certificate");
                            let _ = self.swarm.disconnect_peer_id(peer);
                        }
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(auth) = &mut self.auth {
                    auth.handshakes.remove(&request_id);
                }
                if matches!(error, request_response::OutboundFailure::UnsupportedProtocols) {
                    self.refuse(
                        peer,
                        "does not speak the admission protocol (an open or foreign swarm)".into(),
                        Duration::ZERO,
                    );
                } else {
                    tracing::debug!("admission handshake with {peer} failed: {error}");
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!("admission request from {peer} failed: {error}");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// A revocation list gossiped by an admitted peer: adopt it if newer, then
    /// drop admitted peers it revokes.
    fn revocations_message(&mut self, data: &[u8]) -> MessageAcceptance {
        let Some(auth) = &mut self.auth else {
            return MessageAcceptance::Ignore;
        };
        let list = match Revocations::from_bytes(data) {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!("invalid revocation list: {e}");
                return MessageAcceptance::Reject;
            }
        };
        let serial = list.serial;
        match auth.adm.apply_revocations(list.clone()) {
            Ok(true) => {
                tracing::info!("revocation list version {serial} adopted");
                // Membership drops revoked authors of adverts relayed by others too.
                let _ = self.emit(NetEvent::Revocations(Box::new(list)));
                self.recheck_admitted();
                MessageAcceptance::Accept
            }
            Ok(false) => {
                if serial < auth.adm.revocations_serial() {
                    auth.next_republish = auth.next_republish.min(Instant::now() + REPUBLISH_SOON);
                }
                MessageAcceptance::Ignore
            }
            Err(e) => {
                tracing::debug!("revocation list refused: {e}");
                MessageAcceptance::Reject
            }
        }
    }

    /// Re-verify every admitted peer (after a new revocation list or as
    /// certificates expire); revoked ones are refused and blocked, expired ones
    /// only disconnected (a renewed certificate may come straight back).
    fn recheck_admitted(&mut self) {
        let Some(auth) = &self.auth else {
            return;
        };
        let now = now_ms();
        let mut revoked = Vec::new();
        let mut expired = Vec::new();
        for (p, cert) in &auth.admitted {
            match auth.adm.verify(cert, &p.to_string(), now) {
                Ok(_) => {}
                Err(swarm_protocol::AdmissionError::Expired { .. }) => expired.push(*p),
                Err(e) => revoked.push((*p, e.to_string())),
            }
        }
        for (p, reason) in revoked {
            self.refuse(p, reason, Duration::ZERO);
        }
        for p in expired {
            if let Some(auth) = &mut self.auth {
                auth.admitted.remove(&p);
                auth.accepted_by.remove(&p);
            }
            tracing::info!("certificate of {p} expired: disconnecting");
            let _ = self.emit(NetEvent::Refused {
                peer: p,
                reason: "certificate expired".into(),
            });
            let _ = self.swarm.disconnect_peer_id(p);
        }
    }

    /// Deadlines of the handshake: slow peers are refused, refusals become
    /// blocks, blocks expire, parked requests time out, expired certificates
    /// are dropped, and the revocation list is re-published.
    fn auth_tick(&mut self) {
        let Some(auth) = &mut self.auth else {
            return;
        };
        let now = Instant::now();
        let wall = now_ms();
        let late: Vec<PeerId> = auth
            .pending
            .iter()
            .filter(|(p, t)| **t <= now && !auth.admitted.contains_key(*p))
            .map(|(p, _)| *p)
            .collect();
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut auth.refusing)
            .into_iter()
            .partition(|(_, t)| *t <= now);
        auth.refusing = waiting;
        let lifted: Vec<PeerId> = auth
            .blocked
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(p, _)| *p)
            .collect();
        for p in &lifted {
            auth.blocked.remove(p);
        }
        let (stale, parked): (Vec<_>, Vec<_>) = std::mem::take(&mut auth.parked)
            .into_iter()
            .partition(|(_, t, _)| *t <= now);
        auth.parked = parked;
        let expiring = auth
            .admitted
            .values()
            .any(|c| wall >= c.expires_ms.saturating_add(MAX_CLOCK_SKEW_MS));
        if !auth.own_expiry_warned && wall >= auth.own.expires_ms {
            auth.own_expiry_warned = true;
            tracing::error!(
                "this node's certificate expired: peers will refuse it; ask the swarm owner for a new one \
                 (`slm-swarm swarm invite --peer {}`) and restart with it",
                auth.own.peer
            );
        }
        let republish = (now >= auth.next_republish)
            .then(|| {
                auth.next_republish = now + REPUBLISH_EVERY;
                auth.adm
                    .revocations()
                    .map(|l| (auth.rev_topic.clone(), l.to_bytes()))
            })
            .flatten();
        for p in lifted {
            self.swarm.behaviour_mut().blocked.unblock_peer(p);
        }
        for p in late {
            self.refuse(
                p,
                format!("no valid certificate within {} s", AUTH_TIMEOUT.as_secs()),
                Duration::ZERO,
            );
        }
        for (p, _) in due {
            self.block(p);
        }
        for (p, _, req) in stale {
            req.fail(NetError::NotAdmitted {
                peer: p.to_string(),
                reason: format!("not admitted within {} s", AUTH_TIMEOUT.as_secs()),
            });
        }
        if expiring {
            self.recheck_admitted();
        }
        if let Some((topic, bytes)) = republish {
            if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(topic, bytes) {
                tracing::trace!("revocation list not published: {e}");
            }
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
