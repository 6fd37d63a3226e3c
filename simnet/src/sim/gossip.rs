//! Gossip and election: gossipsub-like mesh upkeep, the periodic tick, building, publishing,
//! receiving and forwarding adverts, and re-running a node's gateway election.

use std::rc::Rc;
use std::sync::Arc;

use rand::Rng;
use swarm_protocol::{encode_msg, Advert, Candidates, Capacity, CloudStatus, ModelCard, PeerEvent, Validate};

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
        let local = self.local_ms(v);
        let interval_us = self.sc.timing.advert_interval_ms * 1000;
        let gone = self.nodes[v as usize].table.expire(local);
        let mut election_dirty = false;
        for peer in gone {
            if let Some(&slot) = self.id_index.get(&peer) {
                self.slot(slot, v).relevant = false;
                let n = &mut self.nodes[v as usize];
                n.set_hash ^= slot_hash(slot);
                election_dirty |= n.relevant.remove(&slot);
            }
        }
        {
            let n = &mut self.nodes[v as usize];
            n.cpu_load = (n.busy_acc_us as f64 / interval_us as f64).min(1.0) as f32;
            n.busy_acc_us = 0;
        }
        if election_dirty {
            self.run_election(v);
        }
        self.publish(v);
        self.maintain_mesh(v);
        self.push(self.now + interval_us, Ev::Tick { node: v, inc });
    }

    fn advert_of(&mut self, v: u32, local: u64) -> Advert {
        let n = &mut self.nodes[v as usize];
        n.seq = (n.seq + 1).max(local);
        let profile = &self.sc.models[n.model];
        Advert {
            peer: self.ids[v as usize].clone(),
            seq: n.seq,
            name: format!("node-{v}"),
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
            gateway: n.election.claim(),
            sent_ms: local,
        }
    }

    /// Publishes a fresh advert: into the node's own table, then to its mesh.
    pub(super) fn publish(&mut self, v: u32) {
        let local = self.local_ms(v);
        let advert = self.advert_of(v, local);
        if let Err(e) = advert.validate() {
            self.violation(format!("node {v} built an invalid advert: {e}"));
            return;
        }
        let bytes = match encode_msg(&advert) {
            Ok(b) => b.len() as u32,
            Err(e) => {
                self.violation(format!("node {v} cannot encode its advert: {e}"));
                return;
            }
        };
        let msg = Rc::new(AdvMsg {
            origin: v,
            seq: advert.seq,
            relevant: advert.cloud.is_some() || advert.gateway.is_some(),
            advert: Arc::new(advert),
            bytes,
        });
        self.receive(v, &msg);
        self.run_election(v);
        self.forward(v, v, &msg);
    }

    /// Applies a first-seen advert to node `v`'s table; true when it changed the election view.
    fn receive(&mut self, v: u32, msg: &AdvMsg) {
        let local = self.local_ms(v);
        let slot = self.slot(msg.origin, v);
        slot.seen = msg.seq;
        let was_relevant = std::mem::replace(&mut slot.relevant, msg.relevant);
        let n = &mut self.nodes[v as usize];
        if n.table.observe(msg.advert.clone(), local) == PeerEvent::Joined {
            n.set_hash ^= slot_hash(msg.origin);
        }
        if msg.relevant && !was_relevant {
            n.relevant.insert(msg.origin);
        } else if was_relevant && !msg.relevant {
            n.relevant.remove(&msg.origin);
        }
    }

    pub(super) fn on_gossip(&mut self, to: u32, from: u32, msg: Rc<AdvMsg>) {
        if self.reach[to as usize] == DOWN || self.slot(msg.origin, to).seen >= msg.seq {
            return;
        }
        let was_relevant = self.slot(msg.origin, to).relevant;
        self.receive(to, &msg);
        if msg.relevant || was_relevant {
            let claimed = self.nodes[to as usize].election.is_gateway();
            self.run_election(to);
            // Adverts go out on change too: a new or former gateway says so at once.
            if self.nodes[to as usize].election.is_gateway() != claimed {
                self.publish(to);
            }
        }
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

    fn run_election(&mut self, v: u32) {
        let local = self.local_ms(v);
        let n = &mut self.nodes[v as usize];
        let ids = &self.ids;
        let cands = Candidates::from_adverts(
            n.relevant
                .iter()
                .filter_map(|s| n.table.get(&ids[*s as usize]))
                .map(|e| e.advert.as_ref()),
        );
        let was = n.election.is_gateway();
        if n.election.update(&cands, local).is_some() {
            self.m.view_changes += 1;
            if !was && n.election.is_gateway() {
                self.m.elections += 1;
            }
        }
    }
}
