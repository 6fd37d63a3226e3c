//! Invariant checking: violations and disruptions, the gateway view of each connected component,
//! peer tables against the live set, convergence and failover timing.

use std::collections::{BTreeMap, BTreeSet};

use super::{slot_hash, Ev, NodeState, Sim};

/// Violations listed in the report (all are counted).
const MAX_LISTED_VIOLATIONS: usize = 20;

/// One gateway-view sample of a connected component, for tests and the checker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentView {
    pub group: u16,
    pub nodes: usize,
    /// Some node in the component could be gateway.
    pub eligible: bool,
    /// Nodes that believe they are the gateway.
    pub claimers: Vec<String>,
    /// Distinct gateway views among the component's nodes.
    pub views: BTreeSet<Option<String>>,
}

impl ComponentView {
    /// Exactly one gateway that everyone in the component agrees on (none if none is eligible).
    pub fn is_settled(&self) -> bool {
        if self.eligible {
            self.claimers.len() == 1
                && self.views.len() == 1
                && self.views.first() == Some(&Some(self.claimers[0].clone()))
        } else {
            self.claimers.is_empty() && self.views.iter().all(Option::is_none)
        }
    }
}

impl Sim {
    pub(super) fn violation(&mut self, what: String) {
        self.ck.violations += 1;
        if self.ck.listed.len() < MAX_LISTED_VIOLATIONS {
            self.ck
                .listed
                .push(format!("t={:.3}s: {what}", self.now as f64 / 1e6));
        }
    }

    pub(super) fn disruption(&mut self) {
        self.ck.last_disruption = self.now;
        // Reconvergence counts from the last disruption of a burst (e.g. the end of churn).
        if self.ck.conv_first.is_some() {
            self.ck.conv_awaiting = Some(self.now);
        }
    }

    /// Gateway views per connected component (partition group) of live nodes.
    pub fn components(&self) -> Vec<ComponentView> {
        let mut out: BTreeMap<u16, ComponentView> = BTreeMap::new();
        for v in 0..self.slots_used {
            let n = &self.nodes[v];
            if n.state != NodeState::Up {
                continue;
            }
            let c = out.entry(n.group).or_insert_with(|| ComponentView {
                group: n.group,
                nodes: 0,
                eligible: false,
                claimers: Vec::new(),
                views: BTreeSet::new(),
            });
            c.nodes += 1;
            c.eligible |= n.cloud.as_ref().is_some_and(|cl| cl.reachable && cl.budget > 0);
            if n.mem.election().is_gateway() {
                c.claimers.push(self.ids[v].clone());
            }
            c.views
                .insert(n.mem.election().current().map(|(p, _, _)| p.to_owned()));
        }
        out.into_values().collect()
    }

    /// Nodes whose peer table differs from the live set of their component.
    fn table_mismatches(&self) -> (usize, Option<u32>) {
        let mut live: BTreeMap<u16, (usize, u64)> = BTreeMap::new();
        for v in 0..self.slots_used {
            let n = &self.nodes[v];
            if n.state == NodeState::Up {
                let e = live.entry(n.group).or_insert((0, 0));
                e.0 += 1;
                e.1 ^= slot_hash(v as u32);
            }
        }
        let mut bad = 0;
        let mut example = None;
        for v in 0..self.slots_used {
            let n = &self.nodes[v];
            if n.state != NodeState::Up {
                continue;
            }
            let (count, hash) = live.get(&n.group).copied().unwrap_or((0, 0));
            // The table holds the peers; the live set counts the node itself too.
            if n.mem.table().len() - n.sybils_held.min(n.mem.table().len()) + 1 != count || n.set_hash != hash
            {
                bad += 1;
                example.get_or_insert(v as u32);
            }
        }
        (bad, example)
    }

    /// What attackers hold right now: table sizes, and views that name a liar as gateway.
    fn check_attack(&mut self, interval_us: u64) {
        let mut liar_views = 0u64;
        for n in self.nodes[..self.slots_used]
            .iter()
            .filter(|n| n.state == NodeState::Up)
        {
            self.m.attack.peak_peer_table = self.m.attack.peak_peer_table.max(n.mem.table().len());
            let gw = n
                .mem
                .election()
                .current()
                .and_then(|(p, _, _)| self.id_index.get(p));
            if gw.is_some_and(|&g| self.nodes[g as usize].liar) {
                liar_views += 1;
            }
        }
        self.m.attack.liar_gateway_node_ms += liar_views * interval_us / 1000;
    }

    pub(super) fn on_check(&mut self) {
        let interval = self.sc.timing.check_interval_ms * 1000;
        let settle = self.sc.timing.settle_ms() * 1000;
        let now = self.now;
        let quiet = now.saturating_sub(self.ck.last_disruption) >= settle;
        let up = self.nodes[..self.slots_used]
            .iter()
            .filter(|n| n.state == NodeState::Up)
            .count();
        self.m.node_us += up as u128 * u128::from(interval);
        if self.sc.attack != Default::default() {
            self.check_attack(interval);
        }

        let (bad, example) = self.table_mismatches();
        // Convergence counts from the moment every initial node has booted.
        let booting = self.booted_initial < self.sc.nodes;
        if bad == 0 && !booting {
            if self.ck.conv_first.is_none() {
                self.ck.conv_first = Some(now);
            }
            if let Some(since) = self.ck.conv_awaiting.take() {
                self.ck.reconv.push(now - since);
            }
            self.ck.table_bad_since = None;
            self.ck.table_reported = false;
        } else {
            let since = *self.ck.table_bad_since.get_or_insert(now);
            if quiet && now - since >= settle && !self.ck.table_reported {
                self.ck.table_reported = true;
                let v = example.unwrap_or(0);
                let n = &self.nodes[v as usize];
                self.violation(format!(
                    "peer tables differ from the live set on {bad} node(s), e.g. node {v} holds {} peers",
                    n.mem.table().len()
                ));
            }
        }

        let comps = self.components();
        let mut seen = BTreeSet::new();
        for c in &comps {
            seen.insert(c.group);
            if c.eligible && c.claimers.is_empty() {
                self.ck.zero_us += interval;
            }
            if c.claimers.len() > 1 {
                self.ck.multi_us += interval;
            }
            if c.is_settled() {
                self.ck.gw_bad_since.remove(&c.group);
                self.ck.gw_reported.remove(&c.group);
                let g = c.group;
                let mut done = Vec::new();
                self.ck.failover_pending.retain(|(pg, start)| {
                    if *pg == g {
                        done.push(now - start);
                        false
                    } else {
                        true
                    }
                });
                self.ck.failovers.extend(done);
            } else {
                let since = *self.ck.gw_bad_since.entry(c.group).or_insert(now);
                if quiet && now - since >= settle && !self.ck.gw_reported.contains(&c.group) {
                    self.ck.gw_reported.insert(c.group);
                    self.violation(format!(
                        "component {} ({} nodes): {} gateway claimer(s) {:?}, {} distinct view(s)",
                        c.group,
                        c.nodes,
                        c.claimers.len(),
                        c.claimers,
                        c.views.len()
                    ));
                }
            }
        }
        self.ck.gw_bad_since.retain(|g, _| seen.contains(g));
        if now + interval < self.end_us {
            self.push(now + interval, Ev::Check);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(eligible: bool, claimers: &[&str], views: &[Option<&str>]) -> ComponentView {
        ComponentView {
            group: 0,
            nodes: views.len(),
            eligible,
            claimers: claimers.iter().map(|s| s.to_string()).collect(),
            views: views.iter().map(|v| v.map(str::to_owned)).collect(),
        }
    }

    #[test]
    fn settled_means_one_agreed_gateway_or_none_if_none_is_eligible() {
        assert!(view(true, &["g"], &[Some("g"), Some("g")]).is_settled());
        assert!(!view(true, &[], &[Some("g")]).is_settled(), "nobody claims");
        assert!(!view(true, &["g", "h"], &[Some("g")]).is_settled(), "two claim");
        assert!(
            !view(true, &["g"], &[Some("g"), Some("h")]).is_settled(),
            "views differ"
        );
        assert!(
            !view(true, &["g"], &[Some("h")]).is_settled(),
            "view is not the claimer"
        );
        assert!(view(false, &[], &[None, None]).is_settled());
        assert!(!view(false, &[], &[Some("g")]).is_settled(), "stale view");
    }
}
