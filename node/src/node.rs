//! A running node: identity, and the one place that wires the parts together —
//! the network, the models it serves, the membership task (peer table, gateway
//! election, adverts), the gateway's cloud access, and the router that runs
//! queries and serves peers. Other parts never see a `Node`; they get only
//! the pieces they need.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cloud::CloudClient;
use crate::config::NodeConfig;
use crate::events::Events;
use crate::gateway::Gateway;
use crate::inference::{Backend, WorkerOptions};
use crate::metrics::Metrics;
use crate::network::{self, AdmissionSetup, NetConfig, NetworkHandle, TransportKind};
use crate::router::{Router, RouterParts};
use crate::safety::Semantic;
use crate::served::LocalModels;
use crate::swarm::membership::{initial_advert, Membership, MembershipParts};
use crate::swarm::SwarmView;

pub use crate::swarm::{load_of, GatewayView, PeerView};

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("identity: {0}")]
    Identity(String),
    #[error(transparent)]
    Net(#[from] network::NetError),
    #[error("config: {0}")]
    Config(String),
    #[error("admission: {0}")]
    Admission(String),
}

/// The admission setup of `cfg` with this node's own certificate checked for
/// `peer` (right swarm, right peer id, in its validity window, not revoked), or
/// `None` for an open swarm. Every refusal says what to do about it.
pub fn check_admission(cfg: &NodeConfig, peer: &PeerId) -> Result<Option<AdmissionSetup>, NodeError> {
    let Some(setup) = cfg.admission().map_err(|e| NodeError::Admission(e.to_string()))? else {
        return Ok(None);
    };
    let mut adm = swarm_protocol::Admission::new(setup.token.swarm);
    if let Some(list) = &setup.revocations {
        adm.apply_revocations(list.clone())
            .map_err(|e| NodeError::Admission(format!("revocation list: {e}")))?;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    adm.verify(&setup.cert, &peer.to_string(), now).map_err(|e| {
        NodeError::Admission(format!(
            "this node's certificate ({}) does not admit it to swarm {}: {e}. Ask the swarm owner for \
             one: `slm-swarm swarm invite --dir DIR --peer {peer} [--role cloud]`, and start with \
             --certificate FILE",
            cfg.swarm.certificate, setup.token.swarm
        ))
    })?;
    Ok(Some(setup))
}

/// Load (or create, mode 0600) this node's ed25519 key, and lock the file so two
/// running nodes can never share an identity by accident.
pub fn load_identity(path: &Path) -> Result<(Keypair, std::fs::File), NodeError> {
    let err = |m: String| NodeError::Identity(m);
    let key = load_or_create_key(path)?;
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

/// Load (or create, mode 0600) an ed25519 identity key without locking it: for reading a
/// node's peer id, even while that node runs.
pub fn load_or_create_key(path: &Path) -> Result<Keypair, NodeError> {
    let err = |m: String| NodeError::Identity(m);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    }
    if path.exists() {
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
        Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| err(format!("{} is not an identity key: {e}", path.display())))
    } else {
        let k = Keypair::generate_ed25519();
        let bytes = k
            .to_protobuf_encoding()
            .map_err(|e| err(format!("cannot encode key: {e}")))?;
        write_private(path, &bytes).map_err(|e| err(format!("cannot write {}: {e}", path.display())))?;
        Ok(k)
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

/// What `Node::start` needs.
/// One in-process node of a memory swarm: its config, models and cloud access.
/// A node config for in-process test swarms: fast adverts, no embedder
/// download (rules-only safety, exact free-text votes), a quorum of one.
#[cfg(any(test, feature = "testing"))]
pub fn memory_test_config(name: &str, namespace: &str) -> NodeConfig {
    let mut cfg = NodeConfig {
        name: name.to_string(),
        namespace: namespace.to_string(),
        advert_interval_ms: 200,
        ..NodeConfig::default()
    };
    cfg.routing.embedder = String::new();
    cfg.routing.quorum = 1;
    cfg
}

#[cfg(any(test, feature = "testing"))]
pub type MemoryNode = (NodeConfig, Vec<Box<dyn Backend>>, Option<CloudClient>);

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
    pub router: Router,
    pub models: Arc<LocalModels>,
    pub net: NetworkHandle,
    pub metrics: Arc<Metrics>,
    /// The live query feed the page and `GET /v1/swarm/events` show.
    pub events: Arc<Events>,
    pub started: Instant,
    /// Whether this node holds cloud credentials (it may become the gateway).
    pub cloud: Option<String>,
    /// The cloud client itself, for its budget in the status API and its
    /// final budget write at shutdown.
    pub cloud_client: Option<CloudClient>,
    /// Keyed swarm: the token and this node's (verified) certificate; `None` = open swarm.
    pub admission: Option<AdmissionSetup>,
    /// This node's identity key: signs its gate records.
    pub(crate) signer: Keypair,
    /// Held while a model swap loads and gates (one at a time).
    pub(crate) swapping: tokio::sync::Mutex<()>,
    view: watch::Receiver<Arc<SwarmView>>,
    shutdown_tx: watch::Sender<bool>,
    _identity_lock: Option<std::fs::File>,
}

/// A running node, as the HTTP API and the command line see it.
#[derive(Clone)]
pub struct Node(Arc<NodeInner>);

impl std::ops::Deref for Node {
    type Target = NodeInner;
    fn deref(&self) -> &NodeInner {
        &self.0
    }
}

impl Node {
    /// Start the network, the models, the membership task and the router; returns once listening.
    pub async fn start(opts: NodeOptions) -> Result<(Node, JoinHandle<()>), NodeError> {
        let cfg = opts.cfg;
        let peer_id = opts.key.public().to_peer_id();
        let me = peer_id.to_string();
        let parse = |list: &[String], what: &str| -> Result<Vec<Multiaddr>, NodeError> {
            list.iter()
                .map(|s| {
                    s.parse::<Multiaddr>()
                        .map_err(|e| NodeError::Config(format!("{what} `{s}` is not a multiaddr: {e}")))
                })
                .collect()
        };
        let admission = check_admission(&cfg, &peer_id)?;
        let mut bootstrap = parse(&cfg.bootstrap, "bootstrap")?;
        match &admission {
            Some(a) => {
                tracing::info!(
                    "keyed swarm {}: admitted as {} until {} (Unix ms); only peers with a certificate \
                     of this swarm are heard",
                    a.token.swarm,
                    a.cert.role,
                    a.cert.expires_ms
                );
                // The token's addresses join the configured ones (a bad one is skipped, not fatal).
                for s in &a.token.bootstrap {
                    match s.parse::<Multiaddr>() {
                        Ok(m) if !bootstrap.contains(&m) => bootstrap.push(m),
                        Ok(_) => {}
                        Err(e) => tracing::warn!("join token bootstrap `{s}` ignored: {e}"),
                    }
                }
            }
            None => tracing::warn!(
                "OPEN SWARM: no join token, so ANY host that can reach this node's port is a full member \
                 (it can query, vote, and be elected gateway). Use only on a trusted network; otherwise \
                 create a swarm key (`slm-swarm swarm init`) and start with --join TOKEN --certificate FILE"
            ),
        }
        let net_cfg = NetConfig {
            namespace: cfg.namespace.clone(),
            listen: parse(&cfg.listen, "listen")?,
            bootstrap,
            mdns: cfg.mdns,
            transport: opts.transport,
            request_timeout: Duration::from_millis(cfg.request_timeout_ms.max(1000)),
            idle_timeout: Duration::from_secs(120),
            heartbeat: Duration::from_millis((cfg.advert_interval_ms / 2).clamp(100, 1000)),
            target_peers: cfg.target_peers,
            limits: network::Limits {
                max_connections: cfg.max_connections,
                max_connections_per_peer: cfg.max_connections_per_peer,
                max_pending: cfg.max_pending_connections,
                max_streams: cfg.max_streams_per_connection,
            },
            // Only a node with a persistent (locked) identity on a real transport
            // keeps a peers file: memory swarms and throwaway keys write nothing.
            peers_file: match (opts.transport, &opts.identity_lock) {
                (TransportKind::Quic, Some(_)) if cfg.peers_file.is_empty() => Some(
                    cfg.identity_path(&crate::models::home_dir())
                        .with_extension("peers.json"),
                ),
                (TransportKind::Quic, Some(_)) => Some(cfg.peers_file.clone().into()),
                _ => None,
            },
            admission: admission.clone(),
        };
        let signer = opts.key.clone();
        let (net, events) = network::spawn(opts.key, net_cfg)?;
        let models = Arc::new(LocalModels::spawn(
            opts.backends,
            WorkerOptions {
                queue: cfg.queue,
                remote_queue: cfg.remote_queue,
                per_peer: cfg.remote_per_peer,
                ..WorkerOptions::default()
            },
            crate::served::GatePolicy {
                cfg: cfg.gate.clone(),
                dir: cfg.gate.dir(&crate::models::home_dir()),
                me: me.clone(),
            },
        ));
        let name = cfg.display_name();
        let cloud = opts.cloud.as_ref().map(|c| c.to_string());
        let cloud_client = opts.cloud.clone();
        let gateway = Arc::new(Gateway::new(opts.cloud, me.clone()));
        let (view_tx, view) = watch::channel(Arc::new(SwarmView {
            me: Arc::new(initial_advert(&me, &name)),
            peers: Vec::new(),
            gateway: None,
            gone: Default::default(),
        }));
        let semantic = Arc::new(Semantic::new(&cfg.routing.embedder));
        let metrics = Arc::new(Metrics::new());
        let feed = Arc::new(Events::new(cfg.ui.show_prompts));
        let (unreachable_tx, unreachable_rx) = tokio::sync::mpsc::channel(64);
        // In a keyed swarm the certificate says which teams this node may serve.
        let mut teams = cfg.teams.clone();
        if let Some(a) = &admission {
            let (kept, dropped): (Vec<String>, Vec<String>) = teams
                .serve
                .iter()
                .cloned()
                .partition(|t| a.cert.teams.contains(t));
            if !dropped.is_empty() {
                tracing::warn!(
                    "teams {dropped:?} are not in this node's certificate, so it does not serve them; ask \
                     the swarm owner for a certificate with them (`slm-swarm swarm invite --team T`)"
                );
            }
            teams.serve = kept;
        }
        let dataset = crate::dataset::DatasetLog::open(&cfg.dataset, &crate::models::home_dir())
            .map_err(|e| NodeError::Config(e.to_string()))?
            .map(Arc::new);
        if let Some(d) = &dataset {
            tracing::info!("escalation log: {}", d.dir().display());
        }
        let router = Router::new(RouterParts {
            me: me.clone(),
            name: name.clone(),
            routing: cfg.routing.clone(),
            advert_interval_ms: cfg.advert_interval_ms,
            missed_adverts: cfg.missed_adverts,
            max_tokens_limit: cfg.max_tokens_limit,
            models: models.clone(),
            net: net.clone(),
            view: view.clone(),
            gateway: gateway.clone(),
            semantic: semantic.clone(),
            metrics: metrics.clone(),
            events: feed.clone(),
            unreachable: unreachable_tx,
            dataset,
            teams: teams.clone(),
        });
        let serving = router.clone();
        let membership = Membership::new(MembershipParts {
            me,
            teams: teams.serve.clone(),
            name: name.clone(),
            advert_interval_ms: cfg.advert_interval_ms,
            missed_adverts: cfg.missed_adverts,
            election: MembershipParts::election_config(&cfg),
            models: models.clone(),
            gateway,
            net: net.clone(),
            view_tx,
            on_request: Box::new(move |ev| serving.serve(ev)),
            admission: admission.as_ref().map(|a| {
                let mut adm = swarm_protocol::Admission::new(a.token.swarm);
                if let Some(list) = &a.revocations {
                    // Already checked by `check_admission`.
                    let _ = adm.apply_revocations(list.clone());
                }
                (adm, a.cert.clone())
            }),
            unreachable: unreachable_rx,
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(membership.run(events, shutdown_rx));
        // Load the embedder and the safety head in the background, so start stays fast.
        let safety = cfg.routing.safety;
        tokio::spawn(async move { semantic.warm_up(safety).await });
        let node = Node(Arc::new(NodeInner {
            peer_id,
            name,
            cfg,
            router,
            models,
            net,
            metrics,
            events: feed,
            started: Instant::now(),
            cloud,
            cloud_client,
            admission,
            signer,
            swapping: tokio::sync::Mutex::new(()),
            view,
            shutdown_tx,
            _identity_lock: opts.identity_lock,
        }));
        Ok((node, task))
    }

    /// Starts in-process nodes on the memory transport, each bootstrapping to
    /// the first, and waits until every node sees all the others (tests,
    /// benchmarks). Each entry is a node's config and its models; `listen`,
    /// `mdns` and `bootstrap` are set here.
    #[cfg(any(test, feature = "testing"))]
    pub async fn start_memory_swarm(
        nodes: Vec<(NodeConfig, Vec<Box<dyn Backend>>)>,
        within: Duration,
    ) -> Result<Vec<Node>, NodeError> {
        let nodes = nodes.into_iter().map(|(c, b)| (c, b, None)).collect();
        Self::start_memory_swarm_with_cloud(nodes, within).await
    }

    /// [`Node::start_memory_swarm`], with cloud access for the nodes given one.
    #[cfg(any(test, feature = "testing"))]
    pub async fn start_memory_swarm_with_cloud(
        nodes: Vec<MemoryNode>,
        within: Duration,
    ) -> Result<Vec<Node>, NodeError> {
        let deadline = Instant::now() + within;
        let n = nodes.len();
        let mut started: Vec<Node> = Vec::with_capacity(n);
        for (mut cfg, backends, cloud) in nodes {
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
                cloud,
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

    pub fn snapshot(&self) -> Arc<SwarmView> {
        self.view.borrow().clone()
    }

    /// Stop adverts and the network; queued model work is dropped with the workers.
    pub async fn shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
        self.net.shutdown().await;
        if let Some(c) = self.cloud_client.clone() {
            // So a restart continues today's cloud budget instead of resetting it.
            let _ = tokio::task::spawn_blocking(move || c.flush_budget()).await;
        }
    }
}
