//! Membership and faults: booting and taking nodes down (crash or leave), churn, and the
//! scripted scenario events (partition, heal, crash, restart, loss, cloud reachability).

use std::cmp::Reverse;

use rand::Rng;
use swarm_protocol::membership::Membership as MembershipMachine;
use swarm_protocol::{Admission, Role};

use super::{slot_hash, us, Ev, GossipSlot, NodeState, Sim};
use crate::scenario::{parse_target, Action, Target};

impl Sim {
    pub(super) fn boot(&mut self, v: u32) {
        if self.nodes[v as usize].state == NodeState::Unused && (v as usize) < self.sc.nodes {
            self.booted_initial += 1;
        }
        let local = self.local_ms(v);
        let id = self.ids[v as usize].clone();
        let cfg = self.membership_cfg();
        let now = self.now;
        {
            let n = &mut self.nodes[v as usize];
            n.state = NodeState::Up;
            n.mesh.clear();
            n.busy_until = now;
            n.queue = 0;
            n.busy_acc_us = 0;
            n.busy_ring = [0; 4];
            n.cpu_load = 0.0;
            n.ticks = 0;
        }
        let state = self.local_state(v);
        let mut mem = MembershipMachine::new(id.clone(), cfg, state, local, local);
        if let Some(key) = &self.swarm_key {
            // Cloud nodes may be gateway; everyone else (liars included) is a plain member.
            let role = if self.nodes[v as usize].cloud.is_some() {
                Role::Cloud
            } else {
                Role::Member
            };
            const YEAR_MS: u64 = 365 * 86_400_000;
            match key.invite(
                &id,
                role,
                local.saturating_sub(YEAR_MS),
                local + YEAR_MS,
                u64::from(v),
            ) {
                Ok(cert) => mem = mem.keyed(Admission::new(key.id()), cert),
                Err(e) => self.violation(format!("node {v}: cannot certify: {e}")),
            }
        }
        let n = &mut self.nodes[v as usize];
        // The old machine's count survives the restart in the report.
        self.m.attack.rejected_adverts += n.mem.rejected();
        // The local clock seeds advert seqs, so a restarted node's adverts are newer.
        n.mem = mem;
        n.sybils_held = 0;
        n.set_hash = slot_hash(v);
        let cap = self.ids.len();
        for o in 0..cap {
            self.gossip[o * cap + v as usize] = GossipSlot::default();
        }
        self.set_reach(v);
        let peak = self.nodes.iter().filter(|n| n.state == NodeState::Up).count();
        self.m.membership.peak_nodes = self.m.membership.peak_nodes.max(peak);
        self.maintain_mesh(v);
        self.disruption();
        let inc = self.nodes[v as usize].inc;
        self.push(self.now, Ev::Tick { node: v, inc });
    }

    fn take_down(&mut self, v: u32, left: bool) {
        if !self.up(v) {
            return;
        }
        let was_gateway = self.nodes[v as usize].mem.election().is_gateway();
        let group = self.nodes[v as usize].group;
        let now = self.now;
        let n = &mut self.nodes[v as usize];
        n.state = if left { NodeState::Left } else { NodeState::Down };
        n.inc += 1;
        n.mesh.clear();
        self.set_reach(v);
        if was_gateway {
            self.ck.failover_pending.push((group, now));
        }
        // Queries it coordinated die with it: the client sees a broken connection.
        let dead: Vec<u64> = self
            .queries
            .values()
            .filter(|q| q.coord == v)
            .map(|q| q.id)
            .collect();
        for id in dead {
            self.queries.remove(&id);
            self.m.aborted += 1;
        }
        if left {
            self.m.membership.leaves += 1;
        } else {
            self.m.membership.crashes += 1;
        }
        self.disruption();
    }

    pub(super) fn random_up(&mut self, exclude_cloud: bool) -> Option<u32> {
        let n = self.slots_used;
        let ok = |s: &Sim, v: usize| {
            s.nodes[v].state == NodeState::Up && !(exclude_cloud && s.nodes[v].cloud.is_some())
        };
        for _ in 0..64 {
            let v = self.rng.random_range(0..n);
            if ok(self, v) {
                return Some(v as u32);
            }
        }
        let start = self.rng.random_range(0..n);
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&v| ok(self, v))
            .map(|v| v as u32)
    }

    /// The gateway most nodes would name: the claimer with the highest term.
    fn current_gateway(&self) -> Option<u32> {
        (0..self.slots_used as u32)
            .filter(|&v| self.up(v) && self.nodes[v as usize].mem.election().is_gateway())
            .max_by_key(|&v| (self.nodes[v as usize].mem.election().term(), Reverse(v)))
    }

    fn resolve_target(&mut self, target: Target) -> Option<u32> {
        match target {
            Target::Gateway => self.current_gateway(),
            Target::Random => self.random_up(false),
            Target::Node(i) => (i < self.slots_used).then_some(i as u32),
        }
    }

    pub(super) fn on_scenario(&mut self, i: usize) {
        let action = self.sc.events[i].action.clone();
        match action {
            Action::Partition { groups } => {
                self.groups = groups;
                let n = self.sc.nodes;
                for v in 0..self.slots_used {
                    self.nodes[v].group = if v < n {
                        (v * groups / n) as u16
                    } else {
                        self.rng.random_range(0..groups) as u16
                    };
                    self.set_reach(v as u32);
                }
                self.disruption();
            }
            Action::Heal => {
                self.groups = 1;
                for v in 0..self.slots_used {
                    self.nodes[v].group = 0;
                    self.set_reach(v as u32);
                }
                self.disruption();
            }
            Action::Crash { target, count } => {
                let Some(t) = parse_target(&target) else {
                    return;
                };
                for _ in 0..count {
                    if let Some(v) = self.resolve_target(t) {
                        if self.up(v) {
                            self.take_down(v, false);
                            self.crashed.push(v);
                        }
                    }
                }
            }
            Action::Restart => {
                for v in std::mem::take(&mut self.crashed) {
                    if self.nodes[v as usize].state == NodeState::Down {
                        self.m.membership.restarts += 1;
                        self.boot(v);
                    }
                }
            }
            Action::Loss { value } => {
                self.loss = value;
                self.disruption();
            }
            Action::Cloud { target, reachable } => {
                let Some(t) = parse_target(&target) else {
                    return;
                };
                let Some(v) = self.resolve_target(t) else {
                    return;
                };
                let was_gateway = self.nodes[v as usize].mem.election().is_gateway();
                if let Some(c) = self.nodes[v as usize].cloud.as_mut() {
                    c.reachable = reachable;
                    if was_gateway && !reachable {
                        let g = self.nodes[v as usize].group;
                        self.ck.failover_pending.push((g, self.now));
                    }
                    self.disruption();
                    if self.up(v) {
                        self.local_changed(v);
                    }
                }
            }
        }
    }

    pub(super) fn on_churn_leave(&mut self) {
        let churn = self.sc.churn.clone();
        if let Some(v) = self.random_up(false) {
            if self.rng.random::<f64>() < churn.restart_share {
                self.take_down(v, false);
                let down = self.rng.random_range(churn.down_s[0]..=churn.down_s[1]);
                let at = self.now + us(down * 1000.0);
                self.push(at, Ev::ChurnRestart(v));
            } else {
                self.take_down(v, true);
            }
        }
        let next = self.now + self.exp_us(churn.leave_per_min / 60.0);
        if next < us(churn.end_s * 1000.0) {
            self.push(next, Ev::ChurnLeave);
        }
    }

    pub(super) fn on_churn_join(&mut self) {
        let churn = self.sc.churn.clone();
        if self.slots_used < self.nodes.len() {
            let v = self.slots_used as u32;
            self.slots_used += 1;
            if self.groups > 1 {
                self.nodes[v as usize].group = self.rng.random_range(0..self.groups) as u16;
            }
            self.m.membership.joins += 1;
            self.boot(v);
        }
        let next = self.now + self.exp_us(churn.join_per_min / 60.0);
        if next < us(churn.end_s * 1000.0) {
            self.push(next, Ev::ChurnJoin);
        }
    }
}
