//! One node's membership, sans-IO: the peer table, the gateway election, and when this node
//! publishes its own advert. The node's membership task and the simulator both only drive it:
//! they feed [`InEvent`]s with their clock and carry out the [`OutEvent`]s.
//!
//! Rules (the node and simnet used to differ; these are the intended ones):
//! - **Tick** every [`MembershipConfig::tick_ms`] (a quarter of the advert interval): expire
//!   silent peers, re-run the election (hysteresis, confirmation and startup grace need time to
//!   pass), publish if due.
//! - **Periodic advert** every `advert_interval_ms`, on a fixed schedule from boot; early adverts
//!   do not move it.
//! - **Early advert** when what peers *decide* on changes: the set of served models, cloud
//!   eligibility (reachable, budget left or not, priority) or this node's gateway claim. A claim
//!   change goes out at once (failover speed depends on it); the others at most once per tick
//!   period. Load (queue, CPU) and the exact budget ride on the periodic advert only: they change
//!   with every request, and flooding them cost up to 4× the gossip at 1,000 nodes (the node
//!   used to publish on every queue change, the simulator never did).
//! - **Election input**: this node's own would-be advert plus every live peer whose advert is
//!   *relevant* (cloud-capable or claiming the role); other adverts cannot change the outcome,
//!   so they do not re-run it. A node's own adverts heard back are ignored.
//! - **Sequence numbers** are `max(previous + 1, wall clock ms)`, so a restarted node's adverts
//!   are newer than the ones peers still hold.
//! - **Keyed swarms** ([`Membership::keyed`]): an advert counts only if it carries a certificate
//!   of this swarm for its author (verified once per certificate, then cached); only authors
//!   whose certificate has the cloud role are election candidates (a member's claim or cloud
//!   status is ignored). A new revocation list drops the peers it revokes. In an open swarm
//!   every advert counts, as before.
//! - **Bounded**: at most `max_peers` peers; adverts from further new peers are ignored (and
//!   counted in [`Membership::rejected`]).
//! - **Unreachable peers**: when a request to a peer fails at the network level (e.g. the
//!   gateway during an escalation), [`InEvent::Unreachable`] drops it at once and ignores its
//!   adverts for one expiry window, instead of waiting for them to stop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::admission::{Admission, Certificate, Revocations, Role, MAX_CLOCK_SKEW_MS};
use crate::election::{Candidates, Election, ElectionConfig, GatewayChange};
use crate::message::{Advert, Capacity, CloudStatus, ModelCard};
use crate::peers::{PeerEvent, PeerTable};

/// Timing of one node's membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MembershipConfig {
    pub advert_interval_ms: u64,
    /// A peer is dropped after this many advert intervals of silence.
    pub missed_adverts: u32,
    pub election: ElectionConfig,
    /// Most peers held; see [`DEFAULT_MAX_PEERS`].
    pub max_peers: usize,
}

/// Room for a large office or a city-scale simulation, small enough that a flood of fake
/// identities cannot exhaust memory.
pub const DEFAULT_MAX_PEERS: usize = 4_096;

impl MembershipConfig {
    /// How often the driver should send [`InEvent::Tick`].
    pub fn tick_ms(&self) -> u64 {
        (self.advert_interval_ms / 4).max(25)
    }
}

/// What this node would advertise now, sampled by the driver.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalState {
    pub name: String,
    pub version: String,
    pub addrs: Vec<String>,
    pub models: Vec<ModelCard>,
    pub capacity: Capacity,
    pub cloud: Option<CloudStatus>,
    /// Teams this node serves.
    pub teams: Vec<String>,
}

impl LocalState {
    /// A node with nothing sampled yet: no models, one core, no cloud.
    pub fn idle(name: &str, version: &str) -> Self {
        LocalState {
            name: name.to_string(),
            version: version.to_string(),
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
            teams: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub enum InEvent {
    /// A validated advert from the network.
    Advert(Arc<Advert>),
    /// Time passed; send every [`MembershipConfig::tick_ms`].
    Tick,
    /// This node's own state, freshly sampled (load, models, cloud status).
    Local(LocalState),
    /// A request to this peer failed at the network level: drop it now.
    Unreachable(String),
    /// A signed revocation list (keyed swarms; ignored unless newer and valid).
    Revocations(Revocations),
}

#[derive(Debug, Clone, PartialEq)]
pub enum OutEvent {
    /// Send this advert to the swarm (it is already this node's current advert).
    Publish(Arc<Advert>),
    /// First advert from a peer (or first since it expired): its addresses are worth dialling.
    Joined { peer: String, addrs: Vec<String> },
    /// Peers silent for `missed_adverts` intervals, dropped from the table.
    Expired(Vec<String>),
    /// This node's view of the gateway changed.
    Gateway(GatewayChange),
}

/// What peers decide on; a change is published before the next period.
#[derive(Debug, Clone, PartialEq)]
struct DecisionKey {
    models: Vec<String>,
    /// (reachable, budget left, priority)
    cloud: Option<(bool, bool, i32)>,
}

impl DecisionKey {
    fn of(local: &LocalState) -> Self {
        DecisionKey {
            models: local.models.iter().map(|m| m.id.clone()).collect(),
            cloud: local
                .cloud
                .as_ref()
                .map(|c| (c.reachable, c.budget_left > 0, c.priority)),
        }
    }
}

fn relevant(a: &Advert) -> bool {
    a.cloud.is_some() || a.gateway.is_some()
}

/// One node's membership state machine.
#[derive(Debug, Clone)]
pub struct Membership {
    me: String,
    cfg: MembershipConfig,
    table: PeerTable,
    election: Election,
    /// Peers whose latest advert is relevant to the election.
    relevant: BTreeSet<String>,
    local: LocalState,
    /// `DecisionKey::of(&local)`, kept with it (read on every relevant advert).
    local_key: DecisionKey,
    seq: u64,
    t0_ms: u64,
    wall0_ms: u64,
    next_due_ms: u64,
    last_publish_ms: Option<u64>,
    published_key: Option<DecisionKey>,
    published_term: Option<u64>,
    /// Re-publish at the next tick: a decision change that came too soon after the last advert.
    pending: bool,
    own: Option<Arc<Advert>>,
    /// Keyed swarm: the verifier and this node's own certificate.
    admission: Option<(Admission, Certificate)>,
    /// Keyed swarm: each peer's verified certificate and role (a cache: verify once).
    roles: HashMap<String, (Certificate, Role)>,
    /// Peers found unreachable, ignored until the time given.
    suspended: BTreeMap<String, u64>,
    rejected: u64,
}

impl Membership {
    /// `now_ms` is the driver's monotonic clock, `wall_ms` the wall clock at the same instant
    /// (used only for sequence numbers and the advert's informational `sent_ms`).
    pub fn new(
        me: impl Into<String>,
        cfg: MembershipConfig,
        local: LocalState,
        now_ms: u64,
        wall_ms: u64,
    ) -> Self {
        let me = me.into();
        Membership {
            table: PeerTable::new(cfg.advert_interval_ms, cfg.missed_adverts),
            election: Election::new(me.clone(), cfg.election, now_ms),
            me,
            cfg,
            relevant: BTreeSet::new(),
            local_key: DecisionKey::of(&local),
            local,
            seq: 0,
            t0_ms: now_ms,
            wall0_ms: wall_ms,
            next_due_ms: now_ms,
            last_publish_ms: None,
            published_key: None,
            published_term: None,
            pending: false,
            own: None,
            admission: None,
            roles: HashMap::new(),
            suspended: BTreeMap::new(),
            rejected: 0,
        }
    }

    /// Makes this a keyed swarm's membership: adverts must carry a certificate `admission`
    /// accepts, and this node's adverts carry `own`.
    pub fn keyed(mut self, admission: Admission, own: Certificate) -> Self {
        self.admission = Some((admission, own));
        self
    }

    /// This node's role: `None` in an open swarm.
    pub fn role(&self) -> Option<Role> {
        self.admission.as_ref().map(|(_, c)| c.role)
    }

    /// Adverts ignored: no or a bad certificate, over the peer limit, or from a suspended peer.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    fn wall_ms(&self, now_ms: u64) -> u64 {
        self.wall0_ms.saturating_add(now_ms.saturating_sub(self.t0_ms))
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn config(&self) -> &MembershipConfig {
        &self.cfg
    }

    /// Live peers (never this node).
    pub fn table(&self) -> &PeerTable {
        &self.table
    }

    pub fn election(&self) -> &Election {
        &self.election
    }

    pub fn local(&self) -> &LocalState {
        &self.local
    }

    /// The advert this node last published; `None` before the first.
    pub fn own(&self) -> Option<&Arc<Advert>> {
        self.own.as_ref()
    }

    /// Stores a fresh sample of this node's state; it takes effect at the next
    /// [`InEvent::Tick`] (use [`InEvent::Local`] to act on it at once).
    pub fn set_local(&mut self, local: LocalState) {
        self.local_key = DecisionKey::of(&local);
        self.local = local;
    }

    /// Stores a fresh load sample alone (cheaper than [`Membership::set_local`]; load never
    /// triggers an early advert).
    pub fn set_capacity(&mut self, capacity: Capacity) {
        self.local.capacity = capacity;
    }

    pub fn handle(&mut self, ev: InEvent, now_ms: u64) -> Vec<OutEvent> {
        let mut out = Vec::new();
        match ev {
            InEvent::Advert(a) => self.on_advert(a, now_ms, &mut out),
            InEvent::Tick => self.on_tick(now_ms, &mut out),
            InEvent::Local(local) => {
                let before = self.local_key.clone();
                self.set_local(local);
                if self.local_key != before {
                    self.elect(now_ms, &mut out);
                    self.maybe_publish(now_ms, false, &mut out);
                }
            }
            InEvent::Unreachable(peer) => {
                if self.table.remove(&peer, now_ms).is_some() {
                    self.relevant.remove(&peer);
                    self.roles.remove(&peer);
                    let until = now_ms.saturating_add(self.table.expiry_ms());
                    self.suspended.insert(peer.clone(), until);
                    out.push(OutEvent::Expired(vec![peer]));
                    self.elect(now_ms, &mut out);
                    self.maybe_publish(now_ms, false, &mut out);
                }
            }
            InEvent::Revocations(list) => self.on_revocations(list, now_ms, &mut out),
        }
        out
    }

    fn on_revocations(&mut self, list: Revocations, now_ms: u64, out: &mut Vec<OutEvent>) {
        let wall = self.wall_ms(now_ms);
        let Some((adm, _)) = self.admission.as_mut() else {
            return;
        };
        if !matches!(adm.apply_revocations(list), Ok(true)) {
            return;
        }
        let adm = &*adm;
        let revoked: Vec<String> = self
            .roles
            .iter()
            .filter(|(peer, (cert, _))| adm.verify(cert, peer, wall).is_err())
            .map(|(peer, _)| peer.clone())
            .collect();
        let mut gone = Vec::new();
        for peer in revoked {
            self.roles.remove(&peer);
            self.relevant.remove(&peer);
            if self.table.remove(&peer, now_ms).is_some() {
                gone.push(peer);
            }
        }
        if !gone.is_empty() {
            gone.sort();
            out.push(OutEvent::Expired(gone));
            self.elect(now_ms, out);
            self.maybe_publish(now_ms, false, out);
        }
    }

    /// Keyed swarm: the role `a`'s certificate gives its author, `None` if it does not admit it.
    fn admit(&mut self, a: &Advert, now_ms: u64) -> Option<Role> {
        let wall = self.wall_ms(now_ms);
        let (adm, _) = self.admission.as_ref()?;
        let cert = a.cert.as_ref()?;
        if let Some((known, role)) = self.roles.get(&a.peer) {
            if known == cert && wall <= cert.expires_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
                return Some(*role);
            }
        }
        let role = adm.verify(cert, &a.peer, wall).ok()?;
        self.roles.insert(a.peer.clone(), (cert.clone(), role));
        Some(role)
    }

    fn on_advert(&mut self, a: Arc<Advert>, now_ms: u64, out: &mut Vec<OutEvent>) {
        if a.peer == self.me {
            return;
        }
        if !self.suspended.is_empty() && self.suspended.get(&a.peer).is_some_and(|&t| now_ms < t) {
            self.rejected += 1;
            return;
        }
        if self.table.len() >= self.cfg.max_peers && !self.table.contains(&a.peer) {
            self.rejected += 1;
            return;
        }
        if self.admission.is_some() && self.admit(&a, now_ms).is_none() {
            self.rejected += 1;
            return;
        }
        // In a keyed swarm a peer serves only the teams its certificate names:
        // an advert claiming another is a forgery (an honest node trims its own).
        if self.admission.is_some()
            && a.teams
                .iter()
                .any(|t| !a.cert.as_ref().is_some_and(|c| c.teams.contains(t)))
        {
            self.rejected += 1;
            return;
        }
        let is_relevant = relevant(&a);
        // A second handle on the advert (no copy): the table takes the first.
        let held = a.clone();
        let was_relevant = match self.table.observe_replacing(a, now_ms) {
            (PeerEvent::Stale, _) => return,
            (PeerEvent::Joined, _) => {
                out.push(OutEvent::Joined {
                    peer: held.peer.clone(),
                    addrs: held.addrs.clone(),
                });
                false
            }
            (PeerEvent::Updated, old) => old.is_some_and(|o| relevant(&o)),
        };
        // The set changes only when relevance does: most adverts touch it not at all.
        if is_relevant && !was_relevant {
            self.relevant.insert(held.peer.clone());
        } else if was_relevant && !is_relevant {
            self.relevant.remove(&held.peer);
        }
        if is_relevant || was_relevant {
            self.elect(now_ms, out);
            self.maybe_publish(now_ms, false, out);
        }
    }

    fn on_tick(&mut self, now_ms: u64, out: &mut Vec<OutEvent>) {
        let gone = self.table.expire(now_ms);
        if !gone.is_empty() {
            for p in &gone {
                self.relevant.remove(p);
                self.roles.remove(p);
            }
            out.push(OutEvent::Expired(gone));
        }
        if !self.suspended.is_empty() {
            self.suspended.retain(|_, t| now_ms < *t);
        }
        self.elect(now_ms, out);
        let due = now_ms >= self.next_due_ms;
        if due {
            let period = self.cfg.advert_interval_ms.max(1);
            self.next_due_ms = self.next_due_ms.saturating_add(period);
            if self.next_due_ms <= now_ms {
                // The driver stalled: keep the phase, skip the missed periods.
                self.next_due_ms = now_ms.saturating_add(period);
            }
        }
        self.maybe_publish(now_ms, due, out);
    }

    /// This node's own would-be advert as an election candidate.
    fn own_candidate(&self) -> Advert {
        Advert {
            peer: self.me.clone(),
            seq: self.seq,
            name: String::new(),
            version: String::new(),
            addrs: Vec::new(),
            models: Vec::new(),
            capacity: self.local.capacity.clone(),
            // In a keyed swarm only the cloud role may stand.
            cloud: self
                .local
                .cloud
                .clone()
                .filter(|_| self.role().is_none_or(|r| r.may_be_gateway())),
            gateway: self.election.claim(),
            sent_ms: 0,
            cert: None,
            teams: Vec::new(),
        }
    }

    fn elect(&mut self, now_ms: u64, out: &mut Vec<OutEvent>) {
        let own = self.own_candidate();
        let table = &self.table;
        let keyed = self.admission.is_some();
        let roles = &self.roles;
        let peers = self
            .relevant
            .iter()
            .filter(|p| !keyed || roles.get(*p).is_some_and(|(_, r)| r.may_be_gateway()))
            .filter_map(|p| table.get(p))
            .map(|e| e.advert.as_ref());
        let cands = Candidates::from_adverts(peers.chain(std::iter::once(&own)));
        if let Some(change) = self.election.update(&cands, now_ms) {
            out.push(OutEvent::Gateway(change));
        }
    }

    fn maybe_publish(&mut self, now_ms: u64, due: bool, out: &mut Vec<OutEvent>) {
        let term = self.election.claim().map(|c| c.term);
        let claim_changed = self.published_term != term;
        let key_changed = self.published_key.as_ref() != Some(&self.local_key);
        let gap_ok = self
            .last_publish_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= self.cfg.tick_ms());
        if key_changed && !gap_ok {
            self.pending = true;
        }
        let early = claim_changed || ((key_changed || self.pending) && gap_ok);
        if !(due || early) {
            return;
        }
        self.pending = false;
        self.published_key = Some(self.local_key.clone());
        self.published_term = term;
        self.last_publish_ms = Some(now_ms);
        let wall = self.wall_ms(now_ms);
        self.seq = self.seq.saturating_add(1).max(wall);
        let l = &self.local;
        let advert = Arc::new(Advert {
            peer: self.me.clone(),
            seq: self.seq,
            name: l.name.clone(),
            version: l.version.clone(),
            addrs: l.addrs.clone(),
            models: l.models.clone(),
            capacity: l.capacity.clone(),
            cloud: l.cloud.clone(),
            gateway: self.election.claim(),
            sent_ms: wall,
            cert: self.admission.as_ref().map(|(_, c)| c.clone()),
            teams: l.teams.clone(),
        });
        self.own = Some(advert.clone());
        out.push(OutEvent::Publish(advert));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: MembershipConfig = MembershipConfig {
        advert_interval_ms: 1000,
        missed_adverts: 3,
        election: ElectionConfig {
            hysteresis_ms: 5_000,
            startup_grace_ms: 1_000,
            confirm_ms: 3_000,
        },
        max_peers: DEFAULT_MAX_PEERS,
    };

    fn local(cloud: bool) -> LocalState {
        LocalState {
            name: "n".into(),
            version: "0".into(),
            addrs: vec![],
            models: vec![],
            teams: Vec::new(),
            capacity: Capacity {
                cores: 4,
                cpu_load: 0.0,
                mem_free_mb: 1024,
                queue: 0,
                max_concurrency: 1,
            },
            cloud: cloud.then_some(CloudStatus {
                reachable: true,
                budget_left: 10,
                priority: 0,
            }),
        }
    }

    fn publishes(out: &[OutEvent]) -> Vec<Arc<Advert>> {
        out.iter()
            .filter_map(|e| match e {
                OutEvent::Publish(a) => Some(a.clone()),
                _ => None,
            })
            .collect()
    }

    fn peer_advert(peer: &str, seq: u64, cloud: bool) -> Arc<Advert> {
        let l = local(cloud);
        Arc::new(Advert {
            peer: peer.into(),
            seq,
            name: peer.into(),
            version: "0".into(),
            addrs: vec!["/ip4/10.0.0.2/udp/1/quic-v1".into()],
            models: vec![],
            capacity: l.capacity,
            cloud: l.cloud,
            gateway: None,
            sent_ms: 0,
            cert: None,
            teams: Vec::new(),
        })
    }

    #[test]
    fn publishes_on_its_period_not_on_load_changes() {
        let mut m = Membership::new("me", CFG, local(false), 0, 5_000);
        let out = m.handle(InEvent::Tick, 0);
        let first = publishes(&out);
        assert_eq!(first.len(), 1, "the first tick publishes");
        assert!(first[0].seq >= 5_000, "seq is seeded from the wall clock");
        let mut busy = local(false);
        busy.capacity.queue = 7;
        assert!(publishes(&m.handle(InEvent::Local(busy), 100)).is_empty());
        for t in [250, 500, 750] {
            assert!(publishes(&m.handle(InEvent::Tick, t)).is_empty());
        }
        let p = publishes(&m.handle(InEvent::Tick, 1000));
        assert_eq!(p.len(), 1, "due after one interval");
        assert_eq!(p[0].capacity.queue, 7, "the periodic advert carries the load");
        assert!(p[0].seq > first[0].seq);
    }

    #[test]
    fn a_decision_change_is_published_early_but_rate_limited() {
        let mut m = Membership::new("me", CFG, local(false), 0, 0);
        m.handle(InEvent::Tick, 0);
        let mut with_model = local(false);
        with_model.models.push(ModelCard {
            id: "m1".into(),
            arch: "llama".into(),
            params: 1,
            quant: "q".into(),
            ctx: 1,
            domains: vec![],
            tok_s: 1.0,
            sha256: String::new(),
            version: String::new(),
        });
        // Too soon after the last advert: deferred to the next tick, not dropped.
        assert!(publishes(&m.handle(InEvent::Local(with_model.clone()), 100)).is_empty());
        let p = publishes(&m.handle(InEvent::Tick, 250));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].models.len(), 1);
        // Later change with the gap respected: at once.
        let mut more = with_model;
        more.models[0].id = "m2".into();
        assert_eq!(publishes(&m.handle(InEvent::Local(more), 600)).len(), 1);
    }

    #[test]
    fn joins_expires_and_ignores_own_and_stale_adverts() {
        let mut m = Membership::new("me", CFG, local(false), 0, 0);
        let out = m.handle(InEvent::Advert(peer_advert("a", 1, false)), 10);
        assert!(matches!(&out[..], [OutEvent::Joined { peer, addrs }] if peer == "a" && addrs.len() == 1));
        assert!(m
            .handle(InEvent::Advert(peer_advert("a", 1, false)), 20)
            .is_empty());
        assert!(m
            .handle(InEvent::Advert(peer_advert("me", 99, true)), 20)
            .is_empty());
        assert_eq!(m.table().len(), 1);
        let out = m.handle(InEvent::Tick, 3_010);
        assert!(out.contains(&OutEvent::Expired(vec!["a".into()])));
        assert!(m.table().is_empty());
    }

    #[test]
    fn a_lone_cloud_node_takes_the_role_after_grace_and_says_so_at_once() {
        let mut m = Membership::new("me", CFG, local(true), 0, 0);
        m.handle(InEvent::Tick, 0);
        assert!(!m.election().is_gateway(), "startup grace: listen first");
        let out = m.handle(InEvent::Tick, 1_000);
        assert!(m.election().is_gateway());
        let p = publishes(&out);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].gateway.map(|c| c.term), Some(1));
        // The claim went out with the due advert; nothing more until the next period.
        assert!(publishes(&m.handle(InEvent::Tick, 1_250)).is_empty());
    }

    #[test]
    fn a_follower_fails_over_when_the_gateway_expires() {
        let mut m = Membership::new("me", CFG, local(true), 0, 0);
        let mut g = (*peer_advert("a", 1, true)).clone();
        g.cloud = Some(CloudStatus {
            reachable: true,
            budget_left: 10,
            priority: 5,
        });
        g.gateway = Some(crate::message::GatewayClaim { term: 4, since_ms: 0 });
        let out = m.handle(InEvent::Advert(Arc::new(g)), 0);
        assert!(out
            .iter()
            .any(|e| matches!(e, OutEvent::Gateway(c) if c.gateway.as_deref() == Some("a"))));
        assert_eq!(m.election().current().map(|c| c.1), Some(4));
        // Silence from "a": expired after 3 intervals, this node takes over with a higher term
        // and publishes the claim in the same step.
        let out = m.handle(InEvent::Tick, 3_000);
        assert!(m.election().is_gateway());
        let p = publishes(&out);
        assert_eq!(p.last().and_then(|a| a.gateway).map(|c| c.term), Some(5));
    }

    fn cloud_advert(peer: &str, seq: u64, priority: i32, claim: Option<u64>) -> Advert {
        let mut a = (*peer_advert(peer, seq, true)).clone();
        a.cloud = Some(CloudStatus {
            reachable: true,
            budget_left: 10,
            priority,
        });
        a.gateway = claim.map(|term| crate::message::GatewayClaim { term, since_ms: 0 });
        a
    }

    mod keyed {
        use super::*;
        use crate::admission::{Role, SwarmKey};

        const DAY: u64 = 86_400_000;
        const WALL: u64 = 1_800_000_000_000;

        fn key(seed: u8) -> SwarmKey {
            SwarmKey::from_seed([seed; 32])
        }

        fn cert(k: &SwarmKey, peer: &str, role: Role) -> Certificate {
            k.invite(peer, role, WALL - DAY, WALL + DAY, 7).expect("invite")
        }

        fn node(k: &SwarmKey, me: &str, role: Role, cloud: bool) -> Membership {
            Membership::new(me, CFG, local(cloud), 0, WALL).keyed(Admission::new(k.id()), cert(k, me, role))
        }

        fn with_cert(mut a: Advert, c: Certificate) -> Arc<Advert> {
            a.cert = Some(c);
            Arc::new(a)
        }

        #[test]
        fn adverts_without_a_valid_certificate_are_not_members() {
            let k = key(1);
            let mut m = node(&k, "me", Role::Member, false);
            m.handle(InEvent::Advert(peer_advert("anon", 1, false)), 10);
            let other_swarm = cert(&key(2), "x", Role::Cloud);
            m.handle(
                InEvent::Advert(with_cert((*peer_advert("x", 1, false)).clone(), other_swarm)),
                10,
            );
            // A valid certificate, but of someone else.
            let stolen = cert(&k, "ok", Role::Cloud);
            m.handle(
                InEvent::Advert(with_cert(
                    (*peer_advert("thief", 1, false)).clone(),
                    stolen.clone(),
                )),
                10,
            );
            assert!(m.table().is_empty(), "no outsider is in the table");
            assert_eq!(m.rejected(), 3);
            m.handle(
                InEvent::Advert(with_cert((*peer_advert("ok", 1, false)).clone(), stolen)),
                10,
            );
            assert_eq!(m.table().len(), 1);
            // Own adverts carry the certificate.
            let p = publishes(&m.handle(InEvent::Tick, 20));
            assert_eq!(p[0].cert.as_ref().map(|c| c.peer.as_str()), Some("me"));
        }

        #[test]
        fn a_keyed_peer_serves_only_the_teams_its_certificate_names() {
            let k = key(1);
            let mut m = node(&k, "me", Role::Member, false);
            let legal = k
                .invite_to_teams(
                    "l",
                    Role::Member,
                    1,
                    WALL + 1_000_000_000,
                    7,
                    vec!["legal".into()],
                )
                .expect("invite");
            let claim = |peer: &str, teams: &[&str], c: Certificate| {
                let mut a = (*peer_advert(peer, 1, false)).clone();
                a.teams = teams.iter().map(|t| t.to_string()).collect();
                with_cert(a, c)
            };
            // A member whose certificate names no team claims one: refused.
            m.handle(
                InEvent::Advert(claim("x", &["legal"], cert(&k, "x", Role::Member))),
                10,
            );
            // A legal member claims a second team: refused.
            m.handle(InEvent::Advert(claim("l", &["legal", "hr"], legal.clone())), 10);
            assert!(m.table().is_empty());
            assert_eq!(m.rejected(), 2);
            // Within its certificate: a member.
            m.handle(InEvent::Advert(claim("l", &["legal"], legal.clone())), 10);
            assert_eq!(m.table().len(), 1);
            // The teams are signed: editing them breaks the certificate.
            let mut forged = legal;
            forged.teams.push("hr".into());
            m.handle(InEvent::Advert(claim("l", &["legal", "hr"], forged)), 20);
            assert_eq!(m.rejected(), 3);
        }

        #[test]
        fn a_member_claiming_the_role_cannot_take_it_from_a_cloud_gateway() {
            let k = key(1);
            let mut m = node(&k, "me", Role::Member, false);
            let honest = with_cert(cloud_advert("g", 1, 1, Some(3)), cert(&k, "g", Role::Cloud));
            m.handle(InEvent::Advert(honest), 0);
            assert_eq!(m.election().current().map(|c| c.0), Some("g"));
            // An admitted member lies: top priority, huge term (within the wire cap).
            let liar = with_cert(
                cloud_advert("liar", 1, i32::MAX, Some(crate::election::MAX_TERM)),
                cert(&k, "liar", Role::Member),
            );
            m.handle(InEvent::Advert(liar), 100);
            for t in (250..20_000).step_by(250) {
                let mut g = cloud_advert("g", 2 + t, 1, Some(3));
                g.cert = Some(cert(&k, "g", Role::Cloud));
                m.handle(InEvent::Advert(Arc::new(g)), t);
                let mut l = cloud_advert("liar", 2 + t, i32::MAX, Some(crate::election::MAX_TERM));
                l.cert = Some(cert(&k, "liar", Role::Member));
                m.handle(InEvent::Advert(Arc::new(l)), t);
                m.handle(InEvent::Tick, t);
            }
            assert_eq!(m.election().current().map(|c| (c.0, c.1)), Some(("g", 3)));
            // A member node itself never stands, whatever its cloud config says.
            let mut alone = node(&k, "solo", Role::Member, true);
            for t in (0..5_000).step_by(250) {
                alone.handle(InEvent::Tick, t);
            }
            assert!(alone.election().current().is_none());
        }

        #[test]
        fn revocation_drops_the_revoked_peer() {
            let k = key(1);
            let mut m = node(&k, "me", Role::Member, false);
            m.handle(
                InEvent::Advert(with_cert(
                    (*peer_advert("a", 1, false)).clone(),
                    cert(&k, "a", Role::Member),
                )),
                0,
            );
            m.handle(
                InEvent::Advert(with_cert(
                    (*peer_advert("b", 1, false)).clone(),
                    cert(&k, "b", Role::Member),
                )),
                0,
            );
            let list = k
                .sign_revocations(1, vec![crate::admission::Revoked::Peer("a".into())], WALL)
                .expect("sign");
            let out = m.handle(InEvent::Revocations(list), 10);
            assert!(out.contains(&OutEvent::Expired(vec!["a".into()])));
            assert!(!m.table().contains("a") && m.table().contains("b"));
            m.handle(
                InEvent::Advert(with_cert(
                    (*peer_advert("a", 2, false)).clone(),
                    cert(&k, "a", Role::Member),
                )),
                20,
            );
            assert!(!m.table().contains("a"), "a revoked peer cannot come back");
        }
    }

    #[test]
    fn an_unreachable_peer_is_dropped_at_once_and_ignored_for_a_while() {
        let mut m = Membership::new("me", CFG, local(false), 0, 0);
        m.handle(InEvent::Advert(Arc::new(cloud_advert("g", 1, 0, Some(2)))), 0);
        assert_eq!(m.election().current().map(|c| c.0), Some("g"));
        let out = m.handle(InEvent::Unreachable("g".into()), 1_500);
        assert!(out.contains(&OutEvent::Expired(vec!["g".into()])));
        assert!(m.election().current().is_none());
        m.handle(InEvent::Advert(Arc::new(cloud_advert("g", 2, 0, Some(2)))), 2_000);
        assert!(!m.table().contains("g"), "suspended for one expiry window");
        m.handle(InEvent::Tick, 4_500);
        m.handle(InEvent::Advert(Arc::new(cloud_advert("g", 3, 0, Some(2)))), 4_600);
        assert!(m.table().contains("g"), "heard again after the window");
    }

    #[test]
    fn the_peer_table_is_bounded() {
        let cfg = MembershipConfig { max_peers: 3, ..CFG };
        let mut m = Membership::new("me", cfg, local(false), 0, 0);
        for i in 0..10 {
            m.handle(InEvent::Advert(peer_advert(&format!("sybil{i}"), 1, false)), 0);
        }
        assert_eq!(m.table().len(), 3);
        assert_eq!(m.rejected(), 7);
        // Known peers still update.
        m.handle(InEvent::Advert(peer_advert("sybil0", 2, false)), 10);
        assert_eq!(m.table().get("sybil0").map(|e| e.advert.seq), Some(2));
    }
}
