//! The swarm as this node sees it: the [`SwarmView`] snapshot (peers, gateway,
//! models that just left) that the membership task publishes through a `watch`
//! channel, and the membership task itself ([`membership`]).

pub mod membership;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use swarm_protocol::{Advert, Capacity};

/// A peer as this node sees it.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub advert: Arc<Advert>,
    pub last_seen: Instant,
}

#[derive(Debug, Clone)]
pub struct GatewayView {
    pub peer: String,
    pub term: u64,
    /// When this node started to see it as the gateway.
    pub since: Instant,
}

/// Snapshot of the swarm from this node, replaced on every change.
#[derive(Debug, Clone)]
pub struct SwarmView {
    pub me: Arc<Advert>,
    pub peers: Vec<PeerView>,
    pub gateway: Option<GatewayView>,
    /// Models whose last serving peer left, and when: requests for them get
    /// "no peer can serve it now" rather than "unknown model".
    pub gone: BTreeMap<String, Instant>,
}

impl SwarmView {
    /// Live peers serving `model`, least loaded first.
    pub fn peers_with_model(&self, model: &str) -> Vec<&PeerView> {
        let mut v: Vec<&PeerView> = self
            .peers
            .iter()
            .filter(|p| p.advert.models.iter().any(|m| m.id == model))
            .collect();
        v.sort_by(|a, b| {
            load_of(&a.advert.capacity)
                .total_cmp(&load_of(&b.advert.capacity))
                .then(a.advert.peer.cmp(&b.advert.peer))
        });
        v
    }

    pub fn peer(&self, id: &str) -> Option<&PeerView> {
        self.peers.iter().find(|p| p.advert.peer == id)
    }
}

/// A peer's load as every choice of peer reads it (the protocol's one rule): lower is less loaded.
pub fn load_of(c: &Capacity) -> f32 {
    swarm_protocol::query::voter_load(c)
}
