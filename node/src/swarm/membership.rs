//! The membership task: drives the protocol's sans-IO [`Machine`] (peer table,
//! gateway election, when to advertise; its rules are written down in
//! `swarm_protocol::membership`), samples this node's load for it, carries out
//! what it decides, and replaces the [`SwarmView`] snapshot on every change. Peers'
//! requests (votes, forwarded queries, escalations) are handed to the request
//! handler that `Node::start` wires in (the router), so this task never runs a model.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use swarm_protocol::membership::{
    InEvent, LocalState, Membership as Machine, MembershipConfig, OutEvent, DEFAULT_MAX_PEERS,
};
use swarm_protocol::{encode_msg, Admission, Advert, Capacity, Certificate, ElectionConfig};
use tokio::sync::{mpsc, watch};

use super::{GatewayView, PeerView, SwarmView};
use crate::config::NodeConfig;
use crate::gateway::Gateway;
use crate::network::{NetEvent, NetworkHandle};
use crate::served::LocalModels;

/// Receives the peers' requests (vote, query, escalate events); must not block.
pub type RequestHandler = Box<dyn Fn(NetEvent) + Send + Sync>;

pub(crate) use crate::clock::wall_ms;

/// An advert with nothing measured yet: the view's `me` until the first publish.
pub(crate) fn initial_advert(peer: &str, name: &str) -> Advert {
    let idle = LocalState::idle(name, env!("CARGO_PKG_VERSION"));
    Advert {
        peer: peer.to_string(),
        seq: 0,
        name: idle.name,
        version: idle.version,
        addrs: idle.addrs,
        models: idle.models,
        capacity: idle.capacity,
        cloud: None,
        gateway: None,
        sent_ms: wall_ms(),
        cert: None,
        teams: Vec::new(),
    }
}

/// What the membership task is given by `Node::start`.
pub struct MembershipParts {
    pub me: String,
    /// Teams this node serves (advertised).
    pub teams: Vec<String>,
    pub name: String,
    pub advert_interval_ms: u64,
    pub missed_adverts: u32,
    pub election: ElectionConfig,
    pub models: Arc<LocalModels>,
    pub gateway: Arc<Gateway>,
    pub net: NetworkHandle,
    pub view_tx: watch::Sender<Arc<SwarmView>>,
    pub on_request: RequestHandler,
    /// Keyed swarm: the verifier and this node's certificate; `None` runs an open swarm.
    pub admission: Option<(Admission, Certificate)>,
    /// Peers the router found unreachable.
    pub unreachable: mpsc::Receiver<String>,
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

/// The membership task: samples this node's state, drives the protocol's
/// [`Machine`] and carries out what it decides.
pub struct Membership {
    p: MembershipParts,
    machine: Machine,
    addrs: Vec<String>,
    /// `None` where the platform gives no system statistics.
    sys: Option<sysinfo::System>,
    t0: Instant,
    gone: BTreeMap<String, Instant>,
}

impl Membership {
    pub fn new(mut p: MembershipParts) -> Self {
        let cfg = MembershipConfig {
            advert_interval_ms: p.advert_interval_ms,
            missed_adverts: p.missed_adverts,
            election: p.election,
            max_peers: DEFAULT_MAX_PEERS,
        };
        // Idle until the first sample, taken below before the task runs.
        let idle = LocalState::idle(&p.name, env!("CARGO_PKG_VERSION"));
        let mut machine = Machine::new(p.me.clone(), cfg, idle, 0, wall_ms());
        if let Some((adm, cert)) = p.admission.take() {
            machine = machine.keyed(adm, cert);
        }
        let mut m = Self {
            machine,
            p,
            addrs: Vec::new(),
            sys: sysinfo::System::new().ok(),
            t0: Instant::now(),
            gone: BTreeMap::new(),
        };
        let local = m.local_state();
        m.machine.set_local(local);
        m
    }

    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<NetEvent>, mut shutdown: watch::Receiver<bool>) {
        let tick_every = Duration::from_millis(self.machine.config().tick_ms());
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                ev = events.recv() => match ev {
                    Some(ev) => self.event(ev).await,
                    None => break,
                },
                Some(peer) = self.p.unreachable.recv() => {
                    tracing::info!("peer {peer} unreachable: dropped until it is heard again");
                    let out = self.machine.handle(InEvent::Unreachable(peer), self.now_ms());
                    self.carry_out(out).await;
                    self.refresh_view();
                }
                _ = tick.tick() => {
                    let local = self.local_state();
                    self.machine.set_local(local);
                    let out = self.machine.handle(InEvent::Tick, self.now_ms());
                    self.carry_out(out).await;
                    // Every tick: the view's own entry shows the load just sampled.
                    self.refresh_view();
                }
            }
        }
        tracing::debug!("membership task stopped");
    }

    async fn event(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Advert { advert } => {
                let now = self.now_ms();
                let out = self.machine.handle(InEvent::Advert(Arc::new(advert)), now);
                self.carry_out(out).await;
                self.refresh_view();
            }
            NetEvent::ListenAddr(a) => {
                let s = a.to_string();
                if !self.addrs.contains(&s) && self.addrs.len() < swarm_protocol::MAX_ADDRS {
                    self.addrs.push(s);
                }
            }
            ev @ (NetEvent::Vote { .. }
            | NetEvent::Query { .. }
            | NetEvent::Escalate { .. }
            | NetEvent::EscalateStream { .. }) => (self.p.on_request)(ev),
            NetEvent::Connected(p) => tracing::debug!("connected to {p}"),
            NetEvent::Disconnected(p) => tracing::debug!("disconnected from {p}"),
            NetEvent::Admitted { .. } | NetEvent::Refused { .. } => tracing::debug!("admission event"),
            NetEvent::Revocations(list) => {
                let out = self.machine.handle(InEvent::Revocations(*list), self.now_ms());
                self.carry_out(out).await;
                self.refresh_view();
            }
        }
    }

    /// Does what the machine decided: publish, dial, log.
    async fn carry_out(&mut self, out: Vec<OutEvent>) {
        for ev in out {
            match ev {
                OutEvent::Publish(advert) => match encode_msg(advert.as_ref()) {
                    Ok(bytes) => {
                        let _ = self.p.net.publish(bytes).await;
                    }
                    Err(e) => tracing::error!("own advert does not encode: {e}"),
                },
                OutEvent::Joined { peer, addrs } => {
                    tracing::info!("peer joined: {peer}");
                    let addrs: Vec<Multiaddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
                    if let Ok(p) = peer.parse::<PeerId>() {
                        let _ = self.p.net.add_addrs(p, addrs).await;
                    }
                }
                OutEvent::Expired(expired) => {
                    tracing::info!("peers expired: {expired:?}");
                    let before = self.p.view_tx.borrow().clone();
                    self.remember_gone(&before, &expired);
                }
                OutEvent::Gateway(change) => tracing::info!(
                    "gateway: {:?} -> {:?} (term {}, {:?})",
                    change.previous,
                    change.gateway,
                    change.term,
                    change.reason
                ),
            }
        }
    }

    /// Remember the models of expired peers that no live peer serves any more.
    fn remember_gone(&mut self, before: &SwarmView, expired: &[String]) {
        let now = Instant::now();
        for p in before.peers.iter().filter(|p| expired.contains(&p.advert.peer)) {
            for m in &p.advert.models {
                let still = self
                    .machine
                    .table()
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

    /// What this node would advertise now.
    fn local_state(&mut self) -> LocalState {
        LocalState {
            name: self.p.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            addrs: self.addrs.clone(),
            models: self.p.models.cards(),
            capacity: self.capacity(),
            cloud: self.p.gateway.status(),
            teams: self.p.teams.clone(),
        }
    }

    /// The view's own entry: the last advert, with the load and cloud status just sampled.
    fn me_now(&self) -> Arc<Advert> {
        let local = self.machine.local();
        let mut me = match self.machine.own() {
            Some(a) => (**a).clone(),
            None => initial_advert(&self.p.me, &self.p.name),
        };
        me.capacity = local.capacity.clone();
        me.cloud = local.cloud.clone();
        me.models = local.models.clone();
        me.teams = local.teams.clone();
        me.gateway = self.machine.election().claim();
        Arc::new(me)
    }

    fn refresh_view(&mut self) {
        let me = self.me_now();
        self.refresh_view_with(me);
    }

    fn refresh_view_with(&mut self, me: Arc<Advert>) {
        let now = self.now_ms();
        let peers = self
            .machine
            .table()
            .live()
            .map(|e| PeerView {
                advert: e.advert.clone(),
                last_seen: Instant::now() - Duration::from_millis(now.saturating_sub(e.last_seen_ms)),
            })
            .collect();
        let old_gw = self.p.view_tx.borrow().gateway.clone();
        let gateway = self
            .machine
            .election()
            .current()
            .map(|(peer, term, _)| match &old_gw {
                Some(g) if g.peer == peer && g.term == term => g.clone(),
                _ => GatewayView {
                    peer: peer.to_string(),
                    term,
                    since: Instant::now(),
                },
            });
        let live: Vec<&str> = self
            .machine
            .table()
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
