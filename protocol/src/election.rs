//! Gateway election: which peer holds the cloud role, decided from the shared peer table.
//!
//! **Candidates** are live peers whose advert says `cloud.reachable && budget_left > 0`.
//! **Rank**: priority (desc), then [`capacity_score`] (desc), then peer id (asc), so every node
//! with the same adverts ranks the same way.
//!
//! Each node runs one [`Election`]. Its rules, in the order `update` applies them:
//! 1. **Claims win by term.** A gateway announces `GatewayClaim { term }` in its advert. The
//!    strongest live claim (highest term, then best rank) replaces our view when its term is
//!    higher than our gateway's, or equal with a better rank. This is how the two sides of a healed
//!    partition converge to one gateway, and how followers learn of a takeover.
//! 2. **Lease.** While our gateway stays a live candidate we keep it.
//!    Only the challenger itself may take the role from a live incumbent, and only after it has
//!    ranked better for `hysteresis_ms` without interruption; it then claims a higher term and
//!    followers switch by rule 1. Followers never switch on their own view of ranks, which
//!    differs briefly between nodes as load figures propagate; that would split the swarm.
//! 3. **Confirmation.** A follower whose gateway has not claimed the role within `confirm_ms`
//!    treats it as gone (it may never learn it was chosen, e.g. an older node).
//! 4. **Failover.** When our gateway is gone (expired, no longer a candidate, unconfirmed), an
//!    existing claim is adopted, else the best candidate takes over at once — except during
//!    `startup_grace_ms` after boot, when a node only listens, so a restarted node does not
//!    crown someone before it has heard the adverts.
//!
//! Terms never decrease: a node's own election uses `max(every term seen in adverts, own) + 1`;
//! adopting a claim takes the claim's term if higher (so nodes agree on (gateway, term) pairs).
//!
//! **Honest terms and ranks** (a peer may lie): adverts with a term above [`MAX_TERM`] are
//! invalid; once a node knows a term, claims more than [`MAX_TERM_STEP`] above it are ignored
//! (neither adopted nor counted), so one forged `term: u64::MAX` cannot take the role for good,
//! and terms grow with `checked_add`. Self-reported priority and capacity are clamped before
//! ranking. Who may be a candidate at all is decided by the caller (in a keyed swarm only
//! certificate holders with the cloud role; see `membership`).

use std::cmp::Ordering;

use crate::message::{Advert, Capacity, GatewayClaim};
use crate::peers::PeerTable;

pub use crate::limits::MAX_TERM;
/// How far above the highest known term a claim may be and still count. Honest terms grow by
/// one per election; partitions that elect more than this many times apart need an operator.
pub const MAX_TERM_STEP: u64 = 1_000;
/// Operator priorities are small numbers; anything beyond is clamped.
pub const MAX_PRIORITY: i32 = 1_000;

/// Coarse score of a candidate's spare capacity; higher is better.
///
/// `free half-cores + free request slots + free memory in GiB (capped at 32)`, where free
/// half-cores = `floor(cores * (1 - cpu_load) * 2)`. Coarse steps on purpose: small load jitter
/// must not reorder candidates (hysteresis absorbs the rest). Priority dominates it anyway.
pub fn capacity_score(c: &Capacity) -> u32 {
    let load = if c.cpu_load.is_finite() {
        c.cpu_load.clamp(0.0, 1.0)
    } else {
        1.0
    };
    // Clamped to what an edge device can have: a liar's u32::MAX cores must not outrank all.
    let free_half_cores = (c.cores.min(256) as f32 * (1.0 - load) * 2.0).floor() as u32;
    let free_slots = c.max_concurrency.min(64).saturating_sub(c.queue);
    let free_gib = (c.mem_free_mb / 1024).min(32) as u32;
    free_half_cores
        .saturating_add(free_slots)
        .saturating_add(free_gib)
}

/// A live peer eligible for the gateway role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub peer: String,
    pub priority: i32,
    pub score: u32,
    /// The role claim in its advert, if it says it is the gateway.
    pub claim: Option<GatewayClaim>,
}

impl Candidate {
    /// `Some` when the advert makes its sender eligible.
    pub fn from_advert(a: &Advert) -> Option<Candidate> {
        let cloud = a.cloud.as_ref()?;
        if !cloud.reachable || cloud.budget_left == 0 {
            return None;
        }
        Some(Candidate {
            peer: a.peer.clone(),
            priority: cloud.priority.clamp(-MAX_PRIORITY, MAX_PRIORITY),
            score: capacity_score(&a.capacity),
            claim: a.gateway,
        })
    }
}

/// `Less` when `a` ranks better than `b` (sorts best first).
pub fn rank_cmp(a: &Candidate, b: &Candidate) -> Ordering {
    b.priority
        .cmp(&a.priority)
        .then_with(|| b.score.cmp(&a.score))
        .then_with(|| a.peer.cmp(&b.peer))
}

/// The input of an election round: eligible peers best first, and the highest term seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Candidates {
    list: Vec<Candidate>,
    max_term: u64,
}

impl Candidates {
    /// Builds from live adverts in any order (the result does not depend on it).
    pub fn from_adverts<'a>(adverts: impl IntoIterator<Item = &'a Advert>) -> Self {
        let mut list = Vec::new();
        let mut max_term = 0;
        for a in adverts {
            if let Some(g) = &a.gateway {
                max_term = max_term.max(g.term);
            }
            if let Some(c) = Candidate::from_advert(a) {
                list.push(c);
            }
        }
        list.sort_by(rank_cmp);
        // A peer appears once in a table; dedup guards callers that merge sources.
        list.dedup_by(|a, b| a.peer == b.peer);
        Candidates { list, max_term }
    }

    pub fn from_table(table: &PeerTable) -> Self {
        Self::from_adverts(table.adverts())
    }

    /// Eligible peers, best first.
    pub fn list(&self) -> &[Candidate] {
        &self.list
    }

    /// Highest term claimed in any advert seen (candidates or not).
    pub fn max_term(&self) -> u64 {
        self.max_term
    }

    pub fn best(&self) -> Option<&Candidate> {
        self.list.first()
    }

    pub fn get(&self, peer: &str) -> Option<&Candidate> {
        self.list.iter().find(|c| c.peer == peer)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElectionConfig {
    /// How long a challenger must rank better than a live incumbent before it takes over.
    pub hysteresis_ms: u64,
    /// After boot, only adopt claims for this long (hear the adverts before choosing).
    pub startup_grace_ms: u64,
    /// How long a follower waits for its chosen gateway to claim the role.
    pub confirm_ms: u64,
}

impl Default for ElectionConfig {
    fn default() -> Self {
        ElectionConfig {
            hysteresis_ms: 10_000,
            startup_grace_ms: 2_000,
            confirm_ms: 5_000,
        }
    }
}

/// Why the gateway changed in this node's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeReason {
    /// The incumbent was gone (or there was none): the best candidate, chosen here.
    Failover,
    /// Followed a stronger claim seen in an advert.
    Adopted,
    /// This node ranked better for `hysteresis_ms` and took the role.
    Takeover,
    /// No candidate left.
    Lost,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayChange {
    pub previous: Option<String>,
    pub gateway: Option<String>,
    pub term: u64,
    pub at_ms: u64,
    pub reason: ChangeReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Current {
    peer: String,
    term: u64,
    since_ms: u64,
    /// `None` once the gateway's own advert claimed the role.
    unconfirmed_since: Option<u64>,
}

/// One node's view of who the gateway is.
#[derive(Debug, Clone)]
pub struct Election {
    me: String,
    cfg: ElectionConfig,
    started_ms: u64,
    term: u64,
    current: Option<Current>,
    /// Since when this node has ranked better than the incumbent without interruption.
    challenging_since: Option<u64>,
}

impl Election {
    /// `me` is this node's peer id; `now_ms` its boot time.
    pub fn new(me: impl Into<String>, cfg: ElectionConfig, now_ms: u64) -> Self {
        Election {
            me: me.into(),
            cfg,
            started_ms: now_ms,
            term: 0,
            current: None,
            challenging_since: None,
        }
    }

    /// `(peer, term, since_ms)` of the gateway in this node's view; `since_ms` is local time.
    pub fn current(&self) -> Option<(&str, u64, u64)> {
        self.current
            .as_ref()
            .map(|c| (c.peer.as_str(), c.term, c.since_ms))
    }

    /// Highest term this node knows.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// True when this node holds the role; it should then put [`Election::claim`] in its advert.
    pub fn is_gateway(&self) -> bool {
        self.current.as_ref().is_some_and(|c| c.peer == self.me)
    }

    /// The claim to advertise, while this node is the gateway.
    pub fn claim(&self) -> Option<GatewayClaim> {
        self.current
            .as_ref()
            .filter(|c| c.peer == self.me)
            .map(|c| GatewayClaim {
                term: c.term,
                since_ms: c.since_ms,
            })
    }

    /// Re-evaluates the role from the current candidates; call on every relevant advert and
    /// periodically (hysteresis and confirmation need time to pass).
    pub fn update(&mut self, cands: &Candidates, now_ms: u64) -> Option<GatewayChange> {
        let bound = self.term_bound();
        let bounded = |cl: &GatewayClaim| cl.term <= bound;
        if cands.max_term <= bound {
            self.term = self.term.max(cands.max_term);
        } else {
            // Some claim is out of bounds: count only the ones within.
            let max_ok = cands
                .list
                .iter()
                .filter_map(|c| c.claim)
                .filter(bounded)
                .map(|cl| cl.term)
                .max()
                .unwrap_or(0);
            self.term = self.term.max(max_ok);
        }

        // Strongest live claim: highest term, then best rank.
        let leader = cands
            .list
            .iter()
            .filter_map(|c| c.claim.filter(bounded).map(|cl| (c, cl)))
            .max_by(|(a, ca), (b, cb)| ca.term.cmp(&cb.term).then_with(|| rank_cmp(b, a)));

        let incumbent = self
            .current
            .as_ref()
            .and_then(|cur| cands.get(&cur.peer).map(|c| (cur.clone(), c)));

        if let Some((cur, inc)) = incumbent {
            if let Some((lc, claim)) = leader {
                if lc.peer != cur.peer
                    && (claim.term > cur.term
                        || (claim.term == cur.term && rank_cmp(lc, inc) == Ordering::Less))
                {
                    return self.adopt(lc, claim, now_ms);
                }
            }
            let me = self.me.as_str();
            let mut unconfirmed = None;
            if let Some(c) = self.current.as_mut() {
                if let Some(cl) = inc.claim.filter(bounded) {
                    // Our gateway confirms; take its term if it is ahead of ours.
                    c.unconfirmed_since = None;
                    c.term = c.term.max(cl.term);
                } else if c.peer != me {
                    unconfirmed = Some(*c.unconfirmed_since.get_or_insert(now_ms));
                }
            }
            if let Some(since) = unconfirmed {
                if now_ms.saturating_sub(since) >= self.cfg.confirm_ms {
                    return self.replace_gone(cands, leader, now_ms);
                }
            }
            return self.consider_challenge(cands, inc, now_ms);
        }
        self.replace_gone(cands, leader, now_ms)
    }

    /// Highest claim term this node accepts now.
    fn term_bound(&self) -> u64 {
        if self.term == 0 {
            MAX_TERM
        } else {
            self.term.saturating_add(MAX_TERM_STEP).min(MAX_TERM)
        }
    }

    /// Rule 2: only this node may challenge a live incumbent, after hysteresis.
    fn consider_challenge(
        &mut self,
        cands: &Candidates,
        inc: &Candidate,
        now_ms: u64,
    ) -> Option<GatewayChange> {
        let better = cands
            .get(&self.me)
            .filter(|me| me.peer != inc.peer && rank_cmp(me, inc) == Ordering::Less);
        let Some(me) = better else {
            self.challenging_since = None;
            return None;
        };
        let since = *self.challenging_since.get_or_insert(now_ms);
        if now_ms.saturating_sub(since) < self.cfg.hysteresis_ms {
            return None;
        }
        let me = me.clone();
        Some(self.elect(&me, now_ms, ChangeReason::Takeover))
    }

    /// Rule 4: the incumbent is gone (or never was).
    fn replace_gone(
        &mut self,
        cands: &Candidates,
        leader: Option<(&Candidate, GatewayClaim)>,
        now_ms: u64,
    ) -> Option<GatewayChange> {
        if let Some((lc, claim)) = leader {
            if self.current.as_ref().map(|c| c.peer.as_str()) != Some(lc.peer.as_str()) {
                return self.adopt(lc, claim, now_ms);
            }
        }
        if now_ms.saturating_sub(self.started_ms) < self.cfg.startup_grace_ms {
            return None;
        }
        match cands.best() {
            Some(best) => {
                let same = self.current.as_ref().map(|c| c.peer.as_str()) == Some(&best.peer);
                if same {
                    // Our (unconfirmed) choice is still the best one: keep waiting for its claim.
                    if let Some(c) = self.current.as_mut() {
                        c.unconfirmed_since = Some(now_ms);
                    }
                    return None;
                }
                let best = best.clone();
                Some(self.elect(&best, now_ms, ChangeReason::Failover))
            }
            None => {
                let previous = self.current.take()?.peer;
                self.challenging_since = None;
                Some(GatewayChange {
                    previous: Some(previous),
                    gateway: None,
                    term: self.term,
                    at_ms: now_ms,
                    reason: ChangeReason::Lost,
                })
            }
        }
    }

    fn adopt(&mut self, lc: &Candidate, claim: GatewayClaim, now_ms: u64) -> Option<GatewayChange> {
        self.term = self.term.max(claim.term);
        let previous = self.current.take().map(|c| c.peer);
        self.current = Some(Current {
            peer: lc.peer.clone(),
            term: self.term,
            since_ms: now_ms,
            unconfirmed_since: None,
        });
        self.challenging_since = None;
        Some(GatewayChange {
            previous,
            gateway: Some(lc.peer.clone()),
            term: self.term,
            at_ms: now_ms,
            reason: ChangeReason::Adopted,
        })
    }

    fn elect(&mut self, c: &Candidate, now_ms: u64, reason: ChangeReason) -> GatewayChange {
        // Cannot overflow (terms are capped at MAX_TERM); checked all the same.
        self.term = self.term.checked_add(1).unwrap_or(self.term).min(MAX_TERM);
        let previous = self.current.take().map(|c| c.peer);
        let unconfirmed_since = (c.peer != self.me).then_some(now_ms);
        self.current = Some(Current {
            peer: c.peer.clone(),
            term: self.term,
            since_ms: now_ms,
            unconfirmed_since,
        });
        self.challenging_since = None;
        GatewayChange {
            previous,
            gateway: Some(c.peer.clone()),
            term: self.term,
            at_ms: now_ms,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Capacity, CloudStatus};

    const CFG: ElectionConfig = ElectionConfig {
        hysteresis_ms: 5_000,
        startup_grace_ms: 1_000,
        confirm_ms: 3_000,
    };

    fn adv(peer: &str, priority: i32, cores: u32) -> Advert {
        Advert {
            peer: peer.into(),
            seq: 1,
            name: peer.into(),
            version: "0".into(),
            addrs: vec![],
            models: vec![],
            capacity: Capacity {
                cores,
                cpu_load: 0.0,
                mem_free_mb: 0,
                queue: 0,
                max_concurrency: 1,
            },
            cloud: Some(CloudStatus {
                reachable: true,
                budget_left: 100,
                priority,
            }),
            gateway: None,
            sent_ms: 0,
            cert: None,
            teams: Vec::new(),
        }
    }

    fn plain(peer: &str) -> Advert {
        Advert {
            cloud: None,
            ..adv(peer, 0, 1)
        }
    }

    /// A tiny swarm where every node sees every advert instantly; adverts carry claims.
    struct Swarm {
        adverts: Vec<Advert>,
        nodes: Vec<Election>,
    }

    impl Swarm {
        fn new(adverts: Vec<Advert>, now: u64) -> Self {
            let nodes = adverts
                .iter()
                .map(|a| Election::new(a.peer.clone(), CFG, now))
                .collect();
            Swarm { adverts, nodes }
        }

        /// One round: every node updates, then republishes its claim.
        fn step(&mut self, now: u64) -> usize {
            let cands = Candidates::from_adverts(&self.adverts);
            let mut changes = 0;
            for n in &mut self.nodes {
                changes += usize::from(n.update(&cands, now).is_some());
            }
            for (a, n) in self.adverts.iter_mut().zip(&self.nodes) {
                a.gateway = n.claim();
                a.seq += 1;
            }
            changes
        }

        fn views(&self) -> Vec<Option<String>> {
            self.nodes
                .iter()
                .map(|n| n.current().map(|(p, _, _)| p.to_string()))
                .collect()
        }

        fn claimers(&self) -> Vec<String> {
            self.adverts
                .iter()
                .filter(|a| a.gateway.is_some())
                .map(|a| a.peer.clone())
                .collect()
        }

        fn agreed(&self) -> Option<String> {
            let v = self.views();
            let first = v[0].clone();
            assert!(v.iter().all(|x| *x == first), "views differ: {v:?}");
            first
        }
    }

    #[test]
    fn capacity_score_is_coarse_and_ordered() {
        let mut c = Capacity {
            cores: 4,
            cpu_load: 0.0,
            mem_free_mb: 4096,
            queue: 0,
            max_concurrency: 2,
        };
        assert_eq!(capacity_score(&c), 8 + 2 + 4);
        c.cpu_load = 0.01;
        assert_eq!(capacity_score(&c), 7 + 2 + 4);
        c.cpu_load = 0.02;
        assert_eq!(capacity_score(&c), 7 + 2 + 4, "jitter in a step is ignored");
        c.queue = 5;
        c.cpu_load = f32::NAN;
        assert_eq!(capacity_score(&c), 4);
    }

    #[test]
    fn rank_is_priority_then_score_then_id() {
        let cands = Candidates::from_adverts(&[
            adv("c", 0, 8),
            adv("b", 1, 1),
            adv("a", 0, 8),
            adv("d", 0, 2),
            plain("e"),
        ]);
        let order: Vec<&str> = cands.list().iter().map(|c| c.peer.as_str()).collect();
        assert_eq!(order, ["b", "a", "c", "d"]);
    }

    #[test]
    fn every_node_picks_the_same_winner_from_shuffled_tables() {
        let base: Vec<Advert> = (0..20i32)
            .map(|i| {
                if i % 3 == 0 {
                    plain(&format!("p{i:02}"))
                } else {
                    adv(&format!("p{i:02}"), i % 4, (i % 5) as u32)
                }
            })
            .collect();
        let mut winners = Vec::new();
        let mut order = base.clone();
        for round in 0..30u64 {
            // Deterministic shuffle (LCG-driven Fisher–Yates).
            let mut s = round.wrapping_mul(6364136223846793005).wrapping_add(1);
            for i in (1..order.len()).rev() {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            let cands = Candidates::from_adverts(&order);
            let mut e = Election::new(format!("observer{round}"), CFG, 0);
            let ch = e.update(&cands, 5_000).expect("a winner");
            assert_eq!(ch.reason, ChangeReason::Failover);
            winners.push(ch.gateway.expect("some"));
        }
        assert!(winners.iter().all(|w| w == &winners[0]));
        // priority 3 wins: i % 4 == 3 and i % 3 != 0 → 7, 11, 19; scores 2, 1, 4 → p19.
        assert_eq!(winners[0], "p19");
    }

    #[test]
    fn boot_converges_to_one_gateway_without_storm() {
        let mut s = Swarm::new(
            vec![adv("a", 0, 2), adv("b", 0, 4), adv("c", 5, 1), plain("d")],
            0,
        );
        // Grace: nobody chooses yet.
        assert_eq!(s.step(500), 0);
        assert!(s.claimers().is_empty());
        s.step(1_000);
        s.step(1_100);
        assert_eq!(s.agreed().as_deref(), Some("c"));
        assert_eq!(s.claimers(), ["c"]);
        for t in 2..40 {
            assert_eq!(s.step(t * 500), 0, "no change once settled");
        }
        assert_eq!(s.nodes[0].term(), 1);
    }

    #[test]
    fn failover_when_the_gateway_expires_and_terms_increase() {
        let mut s = Swarm::new(vec![adv("a", 3, 1), adv("b", 2, 1), adv("c", 1, 1)], 0);
        s.step(1_000);
        s.step(1_100);
        assert_eq!(s.agreed().as_deref(), Some("a"));
        let t1 = s.nodes[1].term();
        // a dies: its advert expires from the tables and its node stops running.
        s.adverts.remove(0);
        s.nodes.remove(0);
        let changes = s.step(2_000);
        assert_eq!(changes, 2, "both survivors fail over immediately");
        assert_eq!(s.agreed().as_deref(), Some("b"));
        assert!(s.nodes.iter().all(|n| n.term() > t1));
        s.step(2_100);
        assert_eq!(s.claimers(), ["b"]);
    }

    #[test]
    fn better_candidate_waits_for_hysteresis() {
        let mut s = Swarm::new(vec![adv("a", 1, 1), adv("b", 1, 1), plain("x")], 0);
        s.step(1_000);
        s.step(1_100);
        assert_eq!(s.agreed().as_deref(), Some("a"));
        // b gets more capacity: better rank, but a holds the lease.
        s.adverts[1].capacity.cores = 8;
        let term_before = s.nodes[2].term();
        for t in 0..9 {
            assert_eq!(s.step(2_000 + t * 500), 0, "t={t}");
        }
        assert_eq!(s.agreed().as_deref(), Some("a"));
        // Past 5 s of being better, b takes the role; followers adopt its higher-term claim.
        s.step(7_000);
        s.step(7_100);
        assert_eq!(s.agreed().as_deref(), Some("b"));
        assert_eq!(s.claimers(), ["b"]);
        assert_eq!(s.nodes[2].term(), term_before + 1);
    }

    #[test]
    fn flapping_better_peer_causes_no_storm() {
        let mut s = Swarm::new(vec![adv("a", 1, 1), adv("b", 5, 1), plain("x")], 0);
        // b starts unreachable, a becomes gateway.
        s.adverts[1].cloud.as_mut().expect("cloud").reachable = false;
        s.step(1_000);
        s.step(1_100);
        assert_eq!(s.agreed().as_deref(), Some("a"));
        // b flaps every 2 s for a minute: never better for 5 s in a row.
        let mut changes = 0;
        for t in 0..120u64 {
            let up = (t / 4) % 2 == 0;
            s.adverts[1].cloud.as_mut().expect("cloud").reachable = up;
            changes += s.step(2_000 + t * 500);
        }
        assert_eq!(changes, 0);
        assert_eq!(s.agreed().as_deref(), Some("a"));
    }

    #[test]
    fn returning_old_gateway_does_not_steal_back_before_hysteresis() {
        let mut s = Swarm::new(vec![adv("a", 9, 1), adv("b", 1, 1), plain("x")], 0);
        s.step(1_000);
        s.step(1_100);
        assert_eq!(s.agreed().as_deref(), Some("a"));
        // a restarts: gone from tables, then back with fresh state and no claim.
        let a_adv = s.adverts.remove(0);
        s.nodes.remove(0);
        s.step(2_000);
        s.step(2_100);
        assert_eq!(s.agreed().as_deref(), Some("b"));
        let mut back = a_adv;
        back.gateway = None;
        s.adverts.insert(0, back);
        s.nodes.insert(0, Election::new("a", CFG, 3_000));
        s.step(3_000);
        assert_eq!(s.agreed().as_deref(), Some("b"), "a adopts b's claim");
        for t in 1..10 {
            s.step(3_000 + t * 500);
            assert_eq!(s.agreed().as_deref(), Some("b"), "t={t}");
        }
        // a ranks better since it first compared (3 500): it takes over 5 s later, not before.
        s.step(8_400);
        assert_eq!(s.agreed().as_deref(), Some("b"));
        s.step(8_500);
        s.step(8_600);
        assert_eq!(s.agreed().as_deref(), Some("a"));
        assert_eq!(s.claimers(), ["a"]);
    }

    #[test]
    fn healed_partition_converges_on_the_higher_term() {
        // Side 1 keeps a (term 1); side 2 loses a and elects b (term 2).
        let mut side1 = Swarm::new(vec![adv("a", 9, 1), plain("x")], 0);
        let mut side2 = Swarm::new(vec![adv("b", 1, 1), plain("y")], 0);
        side2.nodes[0].term = 1;
        side2.nodes[1].term = 1;
        side1.step(1_000);
        side1.step(1_100);
        side2.step(1_000);
        side2.step(1_100);
        assert_eq!(side1.claimers(), ["a"]);
        assert_eq!(side2.claimers(), ["b"]);
        let mut healed = Swarm {
            adverts: side1.adverts.into_iter().chain(side2.adverts).collect(),
            nodes: side1.nodes.into_iter().chain(side2.nodes).collect(),
        };
        healed.step(1_200);
        healed.step(1_300);
        assert_eq!(healed.agreed().as_deref(), Some("b"), "higher term wins");
        assert_eq!(healed.claimers(), ["b"]);
        // Then a (priority 9) takes back the role after hysteresis, once.
        let mut changes = 0;
        for t in 0..40 {
            changes += healed.step(1_400 + t * 250);
        }
        assert_eq!(healed.agreed().as_deref(), Some("a"));
        assert_eq!(healed.claimers(), ["a"]);
        assert_eq!(changes, 4, "one takeover, seen once by each of the 4 nodes");
    }

    #[test]
    fn equal_terms_break_by_rank() {
        let mut s = Swarm::new(vec![adv("a", 1, 1), adv("b", 2, 1), plain("x")], 0);
        // Both claim term 1 (e.g. both self-elected on separate sides).
        s.adverts[0].gateway = Some(GatewayClaim { term: 1, since_ms: 0 });
        s.adverts[1].gateway = Some(GatewayClaim { term: 1, since_ms: 0 });
        s.step(0);
        s.step(100);
        assert_eq!(s.agreed().as_deref(), Some("b"));
        assert_eq!(s.claimers(), ["b"]);
        assert!(s.nodes.iter().all(|n| n.term() == 1));
    }

    #[test]
    fn unconfirmed_choice_falls_back_to_a_claimant() {
        // x chooses a (best), but a never claims (say, an old node); b does claim.
        let mut e = Election::new("x", CFG, 0);
        let mut a = adv("a", 9, 1);
        let mut b = adv("b", 1, 1);
        let ch = e
            .update(&Candidates::from_adverts([&a, &b]), 1_000)
            .expect("choose");
        assert_eq!(ch.gateway.as_deref(), Some("a"));
        b.gateway = Some(GatewayClaim { term: 1, since_ms: 0 });
        a.seq += 1;
        // Same term as our view, worse rank: not adopted yet.
        assert!(e.update(&Candidates::from_adverts([&a, &b]), 2_000).is_none());
        let ch = e
            .update(&Candidates::from_adverts([&a, &b]), 4_000)
            .expect("confirm timeout");
        assert_eq!(ch.gateway.as_deref(), Some("b"));
        assert_eq!(ch.reason, ChangeReason::Adopted);
    }

    #[test]
    fn no_candidates_means_no_gateway_and_term_survives() {
        let mut e = Election::new("x", CFG, 0);
        let a = adv("a", 0, 1);
        e.update(&Candidates::from_adverts([&a]), 1_000).expect("choose");
        let ch = e
            .update(&Candidates::from_adverts([&plain("x")]), 2_000)
            .expect("lost");
        assert_eq!(ch.reason, ChangeReason::Lost);
        assert_eq!(e.current(), None);
        assert_eq!(e.term(), 1);
        let ch = e.update(&Candidates::from_adverts([&a]), 3_000).expect("back");
        assert_eq!(ch.term, 2);
    }

    #[test]
    fn terms_from_non_candidates_are_respected() {
        let mut e = Election::new("x", CFG, 0);
        let mut old = plain("old");
        old.gateway = Some(GatewayClaim {
            term: 41,
            since_ms: 0,
        });
        let ch = e
            .update(&Candidates::from_adverts([&old, &adv("a", 0, 1)]), 1_000)
            .expect("choose");
        assert_eq!(ch.term, 42);
    }

    #[test]
    fn a_forged_term_far_above_the_known_one_is_ignored() {
        use crate::message::GatewayClaim;
        use crate::message::Validate;
        let mut e = Election::new("me", CFG, 0);
        let mut g = adv("g", 1, 2);
        g.gateway = Some(GatewayClaim { term: 5, since_ms: 0 });
        let cands = Candidates::from_adverts([&g]);
        e.update(&cands, 0);
        assert_eq!(e.current().map(|c| (c.0, c.1)), Some(("g", 5)));
        // u64::MAX does not even pass validation.
        let mut liar = adv("liar", i32::MAX, u32::MAX);
        liar.gateway = Some(GatewayClaim {
            term: u64::MAX,
            since_ms: 0,
        });
        assert!(liar.validate().is_err());
        // Within the wire cap but far beyond the known term: neither adopted nor counted.
        liar.gateway = Some(GatewayClaim {
            term: MAX_TERM,
            since_ms: 0,
        });
        let cands = Candidates::from_adverts([&g, &liar]);
        for t in 0..20 {
            e.update(&cands, 100 + t * 1_000);
        }
        assert_eq!(e.current().map(|c| (c.0, c.1)), Some(("g", 5)));
        assert_eq!(e.term(), 5);
        // A claim a few terms ahead (a healed partition) still wins.
        liar.gateway = Some(GatewayClaim { term: 9, since_ms: 0 });
        let cands = Candidates::from_adverts([&g, &liar]);
        e.update(&cands, 30_000);
        assert_eq!(e.current().map(|c| (c.0, c.1)), Some(("liar", 9)));
    }

    #[test]
    fn self_reported_priority_and_capacity_are_clamped() {
        let huge = Candidate::from_advert(&adv("a", i32::MAX, u32::MAX)).expect("candidate");
        assert_eq!(huge.priority, MAX_PRIORITY);
        let big = Candidate::from_advert(&adv("b", MAX_PRIORITY, 256)).expect("candidate");
        assert_eq!(huge.score, big.score, "cores beyond 256 buy nothing");
        // Equal after clamping: the tie goes to the peer id, not to the bigger lie.
        assert_eq!(rank_cmp(&huge, &big), std::cmp::Ordering::Less);
    }
}
