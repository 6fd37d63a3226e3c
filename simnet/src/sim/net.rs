//! The simulated network: which nodes can reach each other, per-link latency with jitter,
//! request/response delay under loss, the per-origin gossip slots, and RPC accounting.

use rand::Rng;

use super::{us, GossipSlot, NodeState, Sim, DOWN};
use crate::models::splitmix;

impl Sim {
    pub(super) fn up(&self, v: u32) -> bool {
        self.nodes[v as usize].state == NodeState::Up
    }

    pub(super) fn linked(&self, a: u32, b: u32) -> bool {
        let ra = self.reach[a as usize];
        ra != DOWN && ra == self.reach[b as usize]
    }

    /// Refreshes `reach` after a node's state or group changed.
    pub(super) fn set_reach(&mut self, v: u32) {
        let n = &self.nodes[v as usize];
        self.reach[v as usize] = if n.state == NodeState::Up {
            u32::from(n.group)
        } else {
            DOWN
        };
    }

    pub(super) fn slot(&mut self, origin: u32, node: u32) -> &mut GossipSlot {
        let cap = self.ids.len();
        &mut self.gossip[origin as usize * cap + node as usize]
    }

    /// One-way delay a → b: a fixed per-link base plus jitter.
    pub(super) fn latency_us(&mut self, a: u32, b: u32) -> u64 {
        let n = &self.sc.network;
        let (lo, hi) = (a.min(b) as u64, a.max(b) as u64);
        let h = splitmix(self.seed ^ (lo << 32 | hi) ^ 0x51_7CC1_B727_220A);
        let frac = (h >> 11) as f64 / (1u64 << 53) as f64;
        let base = n.latency_ms[0] + (n.latency_ms[1] - n.latency_ms[0]) * frac;
        let jitter = n.jitter_ms * self.rng.random::<f64>();
        us(base + jitter)
    }

    /// Request/response delay: lost packets cost a retransmission timeout each.
    pub(super) fn rpc_latency_us(&mut self, a: u32, b: u32) -> u64 {
        let mut d = self.latency_us(a, b);
        let mut tries = 0;
        while self.loss > 0.0 && tries < 5 && self.rng.random::<f64>() < self.loss {
            d += us(self.sc.network.rto_ms);
            tries += 1;
        }
        d
    }

    pub(super) fn count_rpc(&mut self, bytes: usize) {
        if self.now < self.end_us {
            self.m.rpc_msgs += 1;
            self.m.rpc_bytes += bytes as u64;
        }
    }
}
