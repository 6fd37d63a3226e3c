//! The membership task: owns the protocol's peer table and gateway election,
//! publishes this node's advert (on its period, and early when what peers route
//! on changes), and replaces the [`SwarmView`] snapshot on every change. Peers'
//! requests (votes, forwarded queries, escalations) are handed to the request
//! handler that `Node::start` wires in (the router), so this task never runs a model.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libp2p::{Multiaddr, PeerId};
use swarm_protocol::{
    encode_msg, Advert, Candidates, Capacity, CloudStatus, Election, ElectionConfig, ModelCard, PeerEvent,
    PeerTable,
};
use tokio::sync::{mpsc, watch};

use super::{GatewayView, PeerView, SwarmView};
use crate::config::NodeConfig;
use crate::gateway::Gateway;
use crate::network::{NetEvent, NetworkHandle};
use crate::served::LocalModels;

/// Receives the peers' requests (vote, query, escalate events); must not block.
pub type RequestHandler = Box<dyn Fn(NetEvent) + Send + Sync>;

pub(crate) fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An advert with nothing measured yet: the view's `me` until the first publish.
pub(crate) fn initial_advert(peer: &str, name: &str) -> Advert {
    Advert {
        peer: peer.to_string(),
        seq: 0,
        name: name.to_string(),
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
    }
}

/// What peers route on: a change is advertised before the next period.
type AdvertKey = (Vec<ModelCard>, u32, Option<CloudStatus>, Option<u64>);

/// What the membership task is given by `Node::start`.
pub struct MembershipParts {
    pub me: String,
    pub name: String,
    pub advert_interval_ms: u64,
    pub missed_adverts: u32,
    pub election: ElectionConfig,
    pub models: Arc<LocalModels>,
    pub gateway: Arc<Gateway>,
    pub net: NetworkHandle,
    pub view_tx: watch::Sender<Arc<SwarmView>>,
    pub on_request: RequestHandler,
}

impl MembershipParts {
    /// The election timing a node config asks for.
    pub fn election_config(cfg: &NodeConfig) -> ElectionConfig {
        ElectionConfig {
            hysteresis_ms: cfg.gateway.hysteresis_ms,
            startup_grace_ms: cfg.gateway.startup_grace_ms,
            confirm_ms: cfg.advert_interval_ms * u64::from(cfg.missed_adverts),
        }
    }
}

/// The membership task's state.
pub struct Membership {
    p: MembershipParts,
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
    pub fn new(p: MembershipParts) -> Self {
        let table = PeerTable::new(p.advert_interval_ms, p.missed_adverts);
        let election = Election::new(p.me.clone(), p.election, 0);
        Self {
            p,
            table,
            election,
            // Seeded from the wall clock so a restarted node's adverts are newer.
            seq: wall_ms(),
            addrs: Vec::new(),
            sys: sysinfo::System::new().ok(),
            t0: Instant::now(),
            last_published: None,
            last_publish_at: Instant::now(),
            gone: BTreeMap::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<NetEvent>, mut shutdown: watch::Receiver<bool>) {
        let interval = Duration::from_millis(self.p.advert_interval_ms);
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
                    let before = self.p.view_tx.borrow().clone();
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
                if advert.peer == self.p.me {
                    return;
                }
                let addrs: Vec<Multiaddr> = advert.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                let peer = advert.peer.parse::<PeerId>().ok();
                let ev = self.table.observe(advert, self.now_ms());
                if let (PeerEvent::Joined, Some(p)) = (&ev, peer) {
                    tracing::info!("peer joined: {p}");
                    let _ = self.p.net.add_addrs(p, addrs).await;
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
            ev @ (NetEvent::Vote { .. } | NetEvent::Query { .. } | NetEvent::Escalate { .. }) => {
                (self.p.on_request)(ev)
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
        Capacity {
            cores: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            cpu_load: if cpu_load.is_finite() { cpu_load } else { 0.0 },
            mem_free_mb,
            queue: self.p.models.load() as u32,
            max_concurrency: self.p.models.len().max(1) as u32,
        }
    }

    fn own_advert(&mut self) -> Advert {
        self.seq += 1;
        Advert {
            peer: self.p.me.clone(),
            seq: self.seq,
            name: self.p.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            addrs: self.addrs.clone(),
            models: self.p.models.cards(),
            capacity: self.capacity(),
            cloud: self.p.gateway.status(),
            gateway: self.election.claim(),
            sent_ms: wall_ms(),
        }
    }

    /// Publish on the period (`due`), or early when what peers route on changed.
    async fn publish(&mut self, due: bool) {
        let cards = self.p.models.cards();
        let queue = self.p.models.load() as u32;
        let cloud = self.p.gateway.status();
        let term = self.election.claim().map(|c| c.term);
        let key = (cards, queue, cloud, term);
        let changed = self.last_published.as_ref() != Some(&key);
        // Rate-limit change-driven adverts to a few per period.
        let min_gap = Duration::from_millis(self.p.advert_interval_ms / 4);
        let early = changed && self.last_publish_at.elapsed() >= min_gap;
        if !(due || early) {
            return;
        }
        self.last_published = Some(key);
        self.last_publish_at = Instant::now();
        let advert = self.own_advert();
        match encode_msg(&advert) {
            Ok(bytes) => {
                let _ = self.p.net.publish(bytes).await;
            }
            Err(e) => tracing::error!("own advert does not encode: {e}"),
        }
        self.refresh_view_with(Arc::new(advert));
    }

    fn elect(&mut self) {
        // This node is a candidate too, from what it would advertise now.
        let me = self.p.view_tx.borrow().me.clone();
        let mut me = (*me).clone();
        me.cloud = self.p.gateway.status();
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
        let me = self.p.view_tx.borrow().me.clone();
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
        let old_gw = self.p.view_tx.borrow().gateway.clone();
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
        self.p.view_tx.send_replace(Arc::new(SwarmView {
            me,
            peers,
            gateway,
            gone: self.gone.clone(),
        }));
    }
}
