//! A running node: identity, local models, the network, and the membership
//! task that owns the protocol state (peer table, gateway election), publishes
//! this node's advert, and serves peers' requests through the router. Other
//! parts read the swarm through a `watch` snapshot ([`SwarmView`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use swarm_protocol::{
    encode_msg, Advert, Candidates, Capacity, CloudStatus, Election, ElectionConfig, ModelCard, PeerEvent,
    PeerTable,
};
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cloud::CloudClient;
use crate::config::NodeConfig;
use crate::inference::{Backend, ModelHandle, WorkerOptions};
use crate::metrics::Metrics;
use crate::network::{self, NetConfig, NetEvent, NetworkHandle, TransportKind};

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("identity: {0}")]
    Identity(String),
    #[error(transparent)]
    Net(#[from] network::NetError),
    #[error("config: {0}")]
    Config(String),
}

/// A peer as this node sees it.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub advert: Arc<Advert>,
    pub last_seen: Instant,
}

#[derive(Debug, Clone)]
pub struct GatewayView {
    pub peer: String,
    pub term: u64,
    /// When this node started to see it as the gateway.
    pub since: Instant,
}

/// Snapshot of the swarm from this node, replaced on every change.
#[derive(Debug, Clone)]
pub struct SwarmView {
    pub me: Arc<Advert>,
    pub peers: Vec<PeerView>,
    pub gateway: Option<GatewayView>,
    /// Models whose last serving peer left, and when: requests for them get
    /// "no peer can serve it now" rather than "unknown model".
    pub gone: BTreeMap<String, Instant>,
}

impl SwarmView {
    /// Live peers serving `model`, least loaded first.
    pub fn peers_with_model(&self, model: &str) -> Vec<&PeerView> {
        let mut v: Vec<&PeerView> = self
            .peers
            .iter()
            .filter(|p| p.advert.models.iter().any(|m| m.id == model))
            .collect();
        v.sort_by(|a, b| {
            load_of(&a.advert.capacity)
                .total_cmp(&load_of(&b.advert.capacity))
                .then(a.advert.peer.cmp(&b.advert.peer))
        });
        v
    }

    pub fn peer(&self, id: &str) -> Option<&PeerView> {
        self.peers.iter().find(|p| p.advert.peer == id)
    }
}

/// Queue per worker slot: lower is less loaded.
pub fn load_of(c: &Capacity) -> f32 {
    c.queue as f32 / c.max_concurrency.max(1) as f32
}

/// Load (or create, mode 0600) this node's ed25519 key, and lock the file so two
/// running nodes can never share an identity by accident.
pub fn load_identity(path: &Path) -> Result<(Keypair, std::fs::File), NodeError> {
    let err = |m: String| NodeError::Identity(m);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    }
    let key = if path.exists() {
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
        Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| err(format!("{} is not an identity key: {e}", path.display())))?
    } else {
        let k = Keypair::generate_ed25519();
        let bytes = k
            .to_protobuf_encoding()
            .map_err(|e| err(format!("cannot encode key: {e}")))?;
        write_private(path, &bytes).map_err(|e| err(format!("cannot write {}: {e}", path.display())))?;
        k
    };
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .open(path)
        .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
    match lock.try_lock() {
        Ok(()) => Ok((key, lock)),
        Err(std::fs::TryLockError::WouldBlock) => Err(err(format!(
            "{} is in use by another running node; give this one its own --identity or --name",
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(err(format!("cannot lock {}: {e}", path.display()))),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What `Node::start` needs.
pub struct NodeOptions {
    pub cfg: NodeConfig,
    pub key: Keypair,
    /// Loaded backends, keyed by model id; the first is the default model.
    pub backends: Vec<Box<dyn Backend>>,
    pub transport: TransportKind,
    /// Kept open (and locked) for the node's lifetime.
    pub identity_lock: Option<std::fs::File>,
    /// This node's cloud access (only the elected gateway uses it).
    pub cloud: Option<CloudClient>,
}

pub struct NodeInner {
    pub peer_id: PeerId,
    pub name: String,
    pub cfg: NodeConfig,
    pub models: BTreeMap<String, ModelHandle>,
    pub default_model: String,
    pub net: NetworkHandle,
    pub view: watch::Receiver<Arc<SwarmView>>,
    pub metrics: Metrics,
    pub started: Instant,
    /// Measured decode speed per model (tokens/s), advertised to peers.
    pub tok_s: Mutex<BTreeMap<String, f32>>,
    pub cloud: Option<CloudClient>,
    /// The sentence embedder and safety classifier, shared by votes and safety checks.
    pub semantic: crate::safety::Semantic,
    next_id: AtomicU64,
    shutdown_tx: watch::Sender<bool>,
    _identity_lock: Option<std::fs::File>,
}

#[derive(Clone)]
pub struct Node(pub Arc<NodeInner>);

impl std::ops::Deref for Node {
    type Target = NodeInner;
    fn deref(&self) -> &NodeInner {
        &self.0
    }
}

impl Node {
    /// Start the network and the membership task; returns once listening.
    pub async fn start(opts: NodeOptions) -> Result<(Node, JoinHandle<()>), NodeError> {
        let cfg = opts.cfg;
        let peer_id = opts.key.public().to_peer_id();
        let parse = |list: &[String], what: &str| -> Result<Vec<Multiaddr>, NodeError> {
            list.iter()
                .map(|s| {
                    s.parse::<Multiaddr>()
                        .map_err(|e| NodeError::Config(format!("{what} `{s}` is not a multiaddr: {e}")))
                })
                .collect()
        };
        let net_cfg = NetConfig {
            namespace: cfg.namespace.clone(),
            listen: parse(&cfg.listen, "listen")?,
            bootstrap: parse(&cfg.bootstrap, "bootstrap")?,
            mdns: cfg.mdns,
            transport: opts.transport,
            request_timeout: Duration::from_millis(cfg.request_timeout_ms.max(1000)),
            idle_timeout: Duration::from_secs(120),
            heartbeat: Duration::from_millis((cfg.advert_interval_ms / 2).clamp(100, 1000)),
        };
        let (net, events) = network::spawn(opts.key, net_cfg)?;
        let mut models = BTreeMap::new();
        let mut default_model = String::new();
        for b in opts.backends {
            let id = b.info().id.clone();
            if default_model.is_empty() {
                default_model = id.clone();
            }
            models.insert(id, ModelHandle::spawn(b, WorkerOptions { queue: cfg.queue }));
        }
        let name = cfg.display_name();
        let me = Arc::new(Advert {
            peer: peer_id.to_string(),
            seq: 0,
            name: name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            addrs: Vec::new(),
            models: Vec::new(),
            capacity: Capacity {
                cores: 1,
                cpu_load: 0.0,
                mem_free_mb: 0,
                queue: 0,
                max_concurrency: 1,
            },
            cloud: None,
            gateway: None,
            sent_ms: wall_ms(),
        });
        let (view_tx, view) = watch::channel(Arc::new(SwarmView {
            me,
            peers: Vec::new(),
            gateway: None,
            gone: BTreeMap::new(),
        }));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let semantic = crate::safety::Semantic::new(&cfg.routing.embedder);
        let node = Node(Arc::new(NodeInner {
            peer_id,
            name,
            cfg,
            models,
            default_model,
            net,
            view,
            metrics: Metrics::new(),
            started: Instant::now(),
            tok_s: Mutex::new(BTreeMap::new()),
            cloud: opts.cloud,
            semantic,
            next_id: AtomicU64::new(wall_ms() << 16),
            shutdown_tx,
            _identity_lock: opts.identity_lock,
        }));
        let task = tokio::spawn(Membership::new(node.clone(), view_tx).run(events, shutdown_rx));
        // Load the embedder and embed the safety exemplars in the background, so start stays fast.
        let warm = node.clone();
        tokio::spawn(async move { warm.semantic.warm_up(warm.cfg.routing.safety).await });
        Ok((node, task))
    }

    /// Starts in-process nodes on the memory transport, each bootstrapping to
    /// the first, and waits until every node sees all the others (tests,
    /// benchmarks). Each entry is a node's config and its models; `listen`,
    /// `mdns` and `bootstrap` are set here.
    pub async fn start_memory_swarm(
        nodes: Vec<(NodeConfig, Vec<Box<dyn Backend>>)>,
        within: Duration,
    ) -> Result<Vec<Node>, NodeError> {
        let deadline = Instant::now() + within;
        let n = nodes.len();
        let mut started: Vec<Node> = Vec::with_capacity(n);
        for (mut cfg, backends) in nodes {
            cfg.listen = vec!["/memory/0".into()];
            cfg.mdns = false;
            if let Some(first) = started.first() {
                let addrs = first.net.listen_addrs().await?;
                cfg.bootstrap = addrs
                    .iter()
                    .map(|a| format!("{a}/p2p/{}", first.peer_id))
                    .collect();
            }
            let (node, _) = Node::start(NodeOptions {
                cfg,
                key: Keypair::generate_ed25519(),
                backends,
                transport: TransportKind::Memory,
                identity_lock: None,
                cloud: None,
            })
            .await?;
            while node.net.listen_addrs().await?.is_empty() {
                if Instant::now() > deadline {
                    return Err(NodeError::Config("a node got no listen address".into()));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            started.push(node);
        }
        while started
            .iter()
            .any(|x| x.snapshot().peers.len() < n.saturating_sub(1))
        {
            if Instant::now() > deadline {
                return Err(NodeError::Config(format!(
                    "the {n} nodes did not converge in {within:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(started)
    }

    pub fn next_request_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Arc<SwarmView> {
        self.view.borrow().clone()
    }

    /// Record a measured decode speed for the advert (exponential average).
    pub fn record_speed(&self, model: &str, tokens: usize, decode_ms: f64) {
        if tokens < 4 || decode_ms <= 0.0 {
            return;
        }
        let s = tokens as f32 / (decode_ms as f32 / 1000.0);
        if let Ok(mut m) = self.tok_s.lock() {
            let e = m.entry(model.to_string()).or_insert(s);
            *e = 0.8 * *e + 0.2 * s;
        }
    }

    /// Stop adverts and the network; queued model work is dropped with the workers.
    pub async fn shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
        self.net.shutdown().await;
    }

    /// This node's own model cards.
    fn model_cards(&self) -> Vec<ModelCard> {
        let speeds = self.tok_s.lock().map(|m| m.clone()).unwrap_or_default();
        self.models
            .values()
            .map(|h| {
                let i = h.info();
                ModelCard {
                    id: i.id.clone(),
                    arch: i.arch.clone(),
                    params: i.params,
                    quant: i.quant.clone(),
                    ctx: i.ctx,
                    domains: i
                        .domains
                        .iter()
                        .take(swarm_protocol::MAX_DOMAINS)
                        .cloned()
                        .collect(),
                    tok_s: speeds.get(&i.id).copied().unwrap_or(0.0),
                }
            })
            .collect()
    }

    /// Cloud status advertised by this node; `None` when it has no cloud access.
    pub fn cloud_status(&self) -> Option<CloudStatus> {
        crate::router::cloud_status(self)
    }
}

/// What peers route on: a change is advertised before the next period.
type AdvertKey = (Vec<ModelCard>, u32, Option<CloudStatus>, Option<u64>);

/// The membership task's state.
struct Membership {
    node: Node,
    view_tx: watch::Sender<Arc<SwarmView>>,
    table: PeerTable,
    election: Election,
    seq: u64,
    addrs: Vec<String>,
    /// `None` where the platform gives no system statistics.
    sys: Option<sysinfo::System>,
    t0: Instant,
    last_published: Option<AdvertKey>,
    last_publish_at: Instant,
    gone: BTreeMap<String, Instant>,
}

impl Membership {
    fn new(node: Node, view_tx: watch::Sender<Arc<SwarmView>>) -> Self {
        let cfg = &node.cfg;
        let table = PeerTable::new(cfg.advert_interval_ms, cfg.missed_adverts);
        let t0 = Instant::now();
        let election = Election::new(
            node.peer_id.to_string(),
            ElectionConfig {
                hysteresis_ms: cfg.gateway.hysteresis_ms,
                startup_grace_ms: cfg.gateway.startup_grace_ms,
                confirm_ms: cfg.advert_interval_ms * u64::from(cfg.missed_adverts),
            },
            0,
        );
        Self {
            node,
            view_tx,
            table,
            election,
            // Seeded from the wall clock so a restarted node's adverts are newer.
            seq: wall_ms(),
            addrs: Vec::new(),
            sys: sysinfo::System::new().ok(),
            t0,
            last_published: None,
            last_publish_at: Instant::now(),
            gone: BTreeMap::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    async fn run(
        mut self,
        mut events: tokio::sync::mpsc::Receiver<NetEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let interval = Duration::from_millis(self.node.cfg.advert_interval_ms);
        let mut advert_tick = tokio::time::interval(interval);
        advert_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Expiry and "on change" adverts are checked more often than the period.
        let mut fast_tick = tokio::time::interval((interval / 4).max(Duration::from_millis(25)));
        fast_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                ev = events.recv() => match ev {
                    Some(ev) => self.event(ev).await,
                    None => break,
                },
                _ = advert_tick.tick() => {
                    self.publish(true).await;
                }
                _ = fast_tick.tick() => {
                    let before = self.view_tx.borrow().clone();
                    let expired = self.table.expire(self.now_ms());
                    if !expired.is_empty() {
                        tracing::info!("peers expired: {expired:?}");
                        self.remember_gone(&before, &expired);
                    }
                    self.elect();
                    if !expired.is_empty() {
                        self.refresh_view();
                    }
                    self.publish(false).await;
                }
            }
        }
        tracing::debug!("membership task stopped");
    }

    async fn event(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Advert { advert } => {
                if advert.peer == self.node.peer_id.to_string() {
                    return;
                }
                let addrs: Vec<Multiaddr> = advert.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                let peer = advert.peer.parse::<PeerId>().ok();
                let ev = self.table.observe(advert, self.now_ms());
                if let (PeerEvent::Joined, Some(p)) = (&ev, peer) {
                    tracing::info!("peer joined: {p}");
                    let _ = self.node.net.add_addrs(p, addrs).await;
                }
                if !matches!(ev, PeerEvent::Stale) {
                    self.elect();
                    self.refresh_view();
                }
            }
            NetEvent::ListenAddr(a) => {
                let s = a.to_string();
                if !self.addrs.contains(&s) && self.addrs.len() < swarm_protocol::MAX_ADDRS {
                    self.addrs.push(s);
                }
            }
            NetEvent::Vote { peer, req, channel } => {
                let node = self.node.clone();
                tokio::spawn(async move {
                    let reply = crate::router::serve_vote(&node, peer, req).await;
                    let _ = node.net.respond_vote(channel, reply).await;
                });
            }
            NetEvent::Query { peer, req, channel } => {
                let node = self.node.clone();
                tokio::spawn(async move {
                    let reply = crate::router::serve_query(&node, peer, req).await;
                    let _ = node.net.respond_query(channel, reply).await;
                });
            }
            NetEvent::Escalate { peer, req, channel } => {
                let node = self.node.clone();
                tokio::spawn(async move {
                    let reply = crate::router::serve_escalate(&node, peer, req).await;
                    let _ = node.net.respond_escalate(channel, reply).await;
                });
            }
            NetEvent::Connected(p) => tracing::debug!("connected to {p}"),
            NetEvent::Disconnected(p) => tracing::debug!("disconnected from {p}"),
        }
    }

    /// Remember the models of expired peers that no live peer serves any more.
    fn remember_gone(&mut self, before: &SwarmView, expired: &[String]) {
        let now = Instant::now();
        for p in before.peers.iter().filter(|p| expired.contains(&p.advert.peer)) {
            for m in &p.advert.models {
                let still = self
                    .table
                    .live()
                    .any(|e| e.advert.models.iter().any(|x| x.id == m.id));
                if !still {
                    self.gone.insert(m.id.clone(), now);
                }
            }
        }
        // Forget after ten minutes: by then "unknown" is the honest answer.
        self.gone
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(600));
    }

    fn capacity(&mut self) -> Capacity {
        let (cpu_load, mem_free_mb) = match self.sys.as_mut() {
            Some(sys) => {
                sys.refresh_cpu_usage();
                sys.refresh_memory();
                (
                    (sys.global_cpu_usage() / 100.0).clamp(0.0, 1.0),
                    sys.available_memory() / (1024 * 1024),
                )
            }
            None => (0.0, 0),
        };
        let queue: usize = self.node.models.values().map(|m| m.load()).sum();
        Capacity {
            cores: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            cpu_load: if cpu_load.is_finite() { cpu_load } else { 0.0 },
            mem_free_mb,
            queue: queue as u32,
            max_concurrency: self.node.models.len().max(1) as u32,
        }
    }

    fn own_advert(&mut self) -> Advert {
        self.seq += 1;
        Advert {
            peer: self.node.peer_id.to_string(),
            seq: self.seq,
            name: self.node.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            addrs: self.addrs.clone(),
            models: self.node.model_cards(),
            capacity: self.capacity(),
            cloud: self.node.cloud_status(),
            gateway: self.election.claim(),
            sent_ms: wall_ms(),
        }
    }

    /// Publish on the period (`due`), or early when what peers route on changed.
    async fn publish(&mut self, due: bool) {
        let cards = self.node.model_cards();
        let queue: u32 = self.node.models.values().map(|m| m.load() as u32).sum();
        let cloud = self.node.cloud_status();
        let term = self.election.claim().map(|c| c.term);
        let key = (cards, queue, cloud, term);
        let changed = self.last_published.as_ref() != Some(&key);
        // Rate-limit change-driven adverts to a few per period.
        let min_gap = Duration::from_millis(self.node.cfg.advert_interval_ms / 4);
        let early = changed && self.last_publish_at.elapsed() >= min_gap;
        if !(due || early) {
            return;
        }
        self.last_published = Some(key);
        self.last_publish_at = Instant::now();
        let advert = self.own_advert();
        match encode_msg(&advert) {
            Ok(bytes) => {
                let _ = self.node.net.publish(bytes).await;
            }
            Err(e) => tracing::error!("own advert does not encode: {e}"),
        }
        self.refresh_view_with(Arc::new(advert));
    }

    fn elect(&mut self) {
        // This node is a candidate too, from what it would advertise now.
        let me = self.view_tx.borrow().me.clone();
        let mut me = (*me).clone();
        me.cloud = self.node.cloud_status();
        me.gateway = self.election.claim();
        let mut all: Vec<Advert> = self.table.adverts().cloned().collect();
        all.push(me);
        let cands = Candidates::from_adverts(all.iter());
        if let Some(change) = self.election.update(&cands, self.now_ms()) {
            tracing::info!(
                "gateway: {:?} -> {:?} (term {}, {:?})",
                change.previous,
                change.gateway,
                change.term,
                change.reason
            );
            self.refresh_view();
        }
    }

    fn refresh_view(&mut self) {
        let me = self.view_tx.borrow().me.clone();
        self.refresh_view_with(me);
    }

    fn refresh_view_with(&mut self, me: Arc<Advert>) {
        let now = self.now_ms();
        let peers = self
            .table
            .live()
            .map(|e| PeerView {
                advert: e.advert.clone(),
                last_seen: Instant::now() - Duration::from_millis(now.saturating_sub(e.last_seen_ms)),
            })
            .collect();
        let old_gw = self.view_tx.borrow().gateway.clone();
        let gateway = self.election.current().map(|(peer, term, _)| match &old_gw {
            Some(g) if g.peer == peer && g.term == term => g.clone(),
            _ => GatewayView {
                peer: peer.to_string(),
                term,
                since: Instant::now(),
            },
        });
        let live: Vec<&str> = self
            .table
            .live()
            .flat_map(|e| e.advert.models.iter().map(|m| m.id.as_str()))
            .collect();
        self.gone.retain(|m, _| !live.contains(&m.as_str()));
        self.view_tx.send_replace(Arc::new(SwarmView {
            me,
            peers,
            gateway,
            gone: self.gone.clone(),
        }));
    }
}
