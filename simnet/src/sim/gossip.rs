//! Gossip and membership: gossipsub-like mesh upkeep, the periodic tick, and driving each
//! node's `swarm_protocol::membership::Membership` — its local state sampled, its adverts
//! published and forwarded, adverts received, its gateway changes counted.

use std::rc::Rc;
use std::sync::Arc;

use rand::Rng;
use swarm_protocol::election::MAX_TERM;
use swarm_protocol::membership::{InEvent, LocalState, OutEvent};
use swarm_protocol::{encode_msg, Advert, Capacity, CloudStatus, GatewayClaim, ModelCard, Validate};

use super::{slot_hash, AdvMsg, Ev, Sim, DOWN};

impl Sim {
    /// Gossipsub-like mesh upkeep: drop unreachable peers, refill to D below D_lo, prune to D
    /// above D_hi, and now and then swap one peer for a random other (like gossipsub's
    /// opportunistic grafting) so meshes keep mixing, e.g. across a healed partition.
    pub(super) fn maintain_mesh(&mut self, v: u32) {
        let (d, d_lo, d_hi) = (
            self.sc.network.mesh_degree,
            self.sc.network.mesh_degree_low,
            self.sc.network.mesh_degree_high,
        );
        let mut mesh = std::mem::take(&mut self.nodes[v as usize].mesh);
        mesh.retain(|&w| self.linked(v, w));
        let rotate = !mesh.is_empty() && self.rng.random::<f64>() < 0.1;
        let want = if mesh.len() < d_lo {
            d
        } else if rotate {
            mesh.len() + 1
        } else {
            mesh.len()
        };
        let before = mesh.len();
        let mut tries = 0;
        while mesh.len() < want && tries < 8 * d {
            tries += 1;
            let w = self.rng.random_range(0..self.slots_used) as u32;
            if w == v || !self.linked(v, w) || mesh.contains(&w) || self.nodes[w as usize].mesh.len() >= d_hi
            {
                continue;
            }
            mesh.push(w);
            self.nodes[w as usize].mesh.push(v);
        }
        let target = if mesh.len() > d_hi {
            d
        } else if rotate && mesh.len() > before {
            before
        } else {
            mesh.len()
        };
        while mesh.len() > target {
            // Never the peer just grafted (it is last).
            let i = self.rng.random_range(0..mesh.len() - 1);
            let w = mesh.swap_remove(i);
            self.nodes[w as usize].mesh.retain(|x| *x != v);
        }
        self.nodes[v as usize].mesh = mesh;
    }

    pub(super) fn tick(&mut self, v: u32, inc: u32) {
        if !self.up(v) || self.nodes[v as usize].inc != inc {
            return;
        }
        let tick_ms = self.membership_tick_ms();
        let per_interval = (self.sc.timing.advert_interval_ms / tick_ms).max(1);
        {
            let n = &mut self.nodes[v as usize];
            let i = (n.ticks % 4) as usize;
            n.busy_ring[i] = std::mem::take(&mut n.busy_acc_us);
            let window_us = 4 * tick_ms * 1000;
            n.cpu_load = (n.busy_ring.iter().sum::<u64>() as f64 / window_us as f64).min(1.0) as f32;
        }
        let local = self.local_ms(v);
        let n = &mut self.nodes[v as usize];
        // Only the load changes between ticks; the rest goes in through `local_changed`.
        let capacity = Capacity {
            cores: n.cores,
            cpu_load: n.cpu_load,
            mem_free_mb: n.mem_mb,
            queue: n.queue,
            max_concurrency: 1,
        };
        n.mem.set_capacity(capacity);
        let out = n.mem.handle(InEvent::Tick, local);
        let upkeep = n.ticks.is_multiple_of(per_interval);
        n.ticks += 1;
        self.apply_membership(v, out);
        if upkeep {
            self.maintain_mesh(v);
        }
        self.push(self.now + tick_ms * 1000, Ev::Tick { node: v, inc });
    }

    pub(super) fn membership_tick_ms(&self) -> u64 {
        self.membership_cfg().tick_ms()
    }

    /// What node `v` would advertise now.
    pub(super) fn local_state(&self, v: u32) -> LocalState {
        let n = &self.nodes[v as usize];
        let profile = &self.sc.models[n.model];
        LocalState {
            name: format!("node-{v}"),
            teams: Vec::new(),
            version: "0.1.0".into(),
            addrs: vec![format!(
                "/ip4/10.{}.{}.{}/udp/4001/quic-v1",
                (v >> 16) & 255,
                (v >> 8) & 255,
                v & 255
            )],
            models: vec![ModelCard {
                id: profile.id.clone(),
                arch: profile.arch.clone(),
                params: profile.params,
                quant: "Q4_K_M".into(),
                ctx: 2048,
                domains: vec!["general".into()],
                tok_s: (1000.0 / profile.ms_per_token.max(0.1)) as f32,
                sha256: String::new(),
                version: String::new(),
            }],
            capacity: Capacity {
                cores: n.cores,
                cpu_load: n.cpu_load,
                mem_free_mb: n.mem_mb,
                queue: n.queue,
                max_concurrency: 1,
            },
            cloud: n.cloud.as_ref().map(|c| CloudStatus {
                reachable: c.reachable,
                budget_left: c.budget,
                priority: c.priority,
            }),
        }
    }

    /// Node `v`'s own state changed in a way peers decide on (cloud reachability or budget):
    /// the machine advertises it early.
    pub(super) fn local_changed(&mut self, v: u32) {
        let state = self.local_state(v);
        let local = self.local_ms(v);
        let out = self.nodes[v as usize].mem.handle(InEvent::Local(state), local);
        self.apply_membership(v, out);
    }

    /// Carries out what node `v`'s membership machine decided.
    fn apply_membership(&mut self, v: u32, out: Vec<OutEvent>) {
        for ev in out {
            match ev {
                OutEvent::Publish(advert) => self.publish(v, advert),
                OutEvent::Joined { peer, .. } => match self.id_index.get(&peer) {
                    Some(&slot) => self.nodes[v as usize].set_hash ^= slot_hash(slot),
                    None => self.nodes[v as usize].sybils_held += 1,
                },
                OutEvent::Expired(gone) => {
                    for peer in gone {
                        match self.id_index.get(&peer) {
                            Some(&slot) => self.nodes[v as usize].set_hash ^= slot_hash(slot),
                            None => {
                                let n = &mut self.nodes[v as usize];
                                n.sybils_held = n.sybils_held.saturating_sub(1);
                            }
                        }
                    }
                }
                OutEvent::Gateway(change) => {
                    self.m.view_changes += 1;
                    let me = self.ids[v as usize].as_str();
                    if change.gateway.as_deref() == Some(me) && change.previous.as_deref() != Some(me) {
                        self.m.elections += 1;
                    }
                }
            }
        }
    }

    /// Sends node `v`'s fresh advert to its mesh.
    fn publish(&mut self, v: u32, mut advert: Arc<Advert>) {
        if self.nodes[v as usize].liar {
            // The forgery of issue 18: cloud-capable, top priority, the highest claim the wire
            // allows. Its own state machine stays honest; only what it says is false.
            let a = Arc::make_mut(&mut advert);
            a.cloud = Some(CloudStatus {
                reachable: true,
                budget_left: u32::MAX,
                priority: i32::MAX,
            });
            a.gateway = Some(GatewayClaim {
                term: MAX_TERM,
                since_ms: a.sent_ms,
            });
        }
        if let Err(e) = advert.validate() {
            self.violation(format!("node {v} built an invalid advert: {e}"));
            return;
        }
        let bytes = match encode_msg(advert.as_ref()) {
            Ok(b) => b.len() as u32,
            Err(e) => {
                self.violation(format!("node {v} cannot encode its advert: {e}"));
                return;
            }
        };
        let msg = Rc::new(AdvMsg {
            origin: v,
            seq: advert.seq,
            advert,
            bytes,
        });
        self.slot(v, v).seen = msg.seq;
        self.forward(v, v, &msg);
    }

    /// The Sybil host hands every reachable node the adverts of all its fake identities, as
    /// if relayed (an open swarm has no way to tell them from real peers).
    pub(super) fn on_sybils(&mut self) {
        let host = self.sc.attack.sybil_host as u32;
        let interval = self.sc.timing.advert_interval_ms;
        if self.up(host) {
            let local = self.local_ms(host);
            let profile = &self.sc.models[self.nodes[host as usize].model];
            let card = ModelCard {
                id: profile.id.clone(),
                arch: profile.arch.clone(),
                params: profile.params,
                quant: "Q4_K_M".into(),
                ctx: 2048,
                domains: vec!["general".into()],
                tok_s: 1000.0,
                sha256: String::new(),
                version: String::new(),
            };
            let adverts: Vec<Arc<Advert>> = self
                .sybil_ids
                .iter()
                .map(|id| {
                    Arc::new(Advert {
                        peer: id.clone(),
                        seq: local,
                        name: "sybil".into(),
                        version: "0.1.0".into(),
                        addrs: Vec::new(),
                        models: vec![card.clone()],
                        capacity: Capacity {
                            cores: 8,
                            cpu_load: 0.0,
                            mem_free_mb: 8192,
                            queue: 0,
                            max_concurrency: 4,
                        },
                        cloud: None,
                        gateway: None,
                        sent_ms: local,
                        cert: None,
                        teams: Vec::new(),
                    })
                })
                .collect();
            for w in 0..self.slots_used as u32 {
                if w == host || !self.linked(host, w) {
                    continue;
                }
                let now = self.local_ms(w);
                for a in &adverts {
                    let out = self.nodes[w as usize].mem.handle(InEvent::Advert(a.clone()), now);
                    self.apply_membership(w, out);
                }
            }
        }
        if self.now < self.end_us {
            self.push(self.now + interval * 1000, Ev::Sybils);
        }
    }

    pub(super) fn on_gossip(&mut self, to: u32, from: u32, msg: Rc<AdvMsg>) {
        if self.reach[to as usize] == DOWN || self.slot(msg.origin, to).seen >= msg.seq {
            return;
        }
        self.slot(msg.origin, to).seen = msg.seq;
        let local = self.local_ms(to);
        let out = self.nodes[to as usize]
            .mem
            .handle(InEvent::Advert(msg.advert.clone()), local);
        self.apply_membership(to, out);
        self.forward(to, from, &msg);
    }

    fn forward(&mut self, v: u32, except: u32, msg: &Rc<AdvMsg>) {
        let mesh = std::mem::take(&mut self.nodes[v as usize].mesh);
        for &w in &mesh {
            if w == except || w == msg.origin {
                continue;
            }
            if !self.linked(v, w) {
                continue; // the connection is gone; mesh upkeep will notice
            }
            let known = self.slot(msg.origin, w).seen >= msg.seq;
            if self.now < self.end_us {
                self.m.gossip_msgs += 1;
                self.m.gossip_bytes += u64::from(msg.bytes);
            }
            if self.loss > 0.0 && self.rng.random::<f64>() < self.loss {
                continue;
            }
            if known {
                // Sent and paid for, but certain to be a duplicate: no need to simulate it.
                continue;
            }
            let at = self.now + self.latency_us(v, w);
            let slot = self.slot(msg.origin, w);
            if slot.pend_seq == msg.seq && slot.pend_at <= at {
                continue; // an earlier copy is already on its way: this one will be a duplicate
            }
            if msg.seq >= slot.pend_seq {
                slot.pend_seq = msg.seq;
                slot.pend_at = at;
            }
            self.push(
                at,
                Ev::Gossip {
                    to: w,
                    from: v,
                    msg: msg.clone(),
                },
            );
        }
        self.nodes[v as usize].mesh = mesh;
    }
}
