//! Queries: arrival at a random coordinator, the local answer on the node's single inference
//! worker (enqueue/dequeue), the first route decision, and the final answer with its metrics.

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;
use swarm_protocol::{Privacy, RouteInputs};

use super::{us, Ev, Phase, Query, Sim};
use crate::models::{Question, SimAnswer};
use crate::scenario::Kind;

impl Sim {
    fn pick_kind(&mut self) -> Option<Kind> {
        let mix = self.sc.queries.mix;
        let avail: Vec<(Kind, f64)> = Kind::ALL
            .iter()
            .filter(|k| !self.bank.by_kind.get_ref(**k).is_empty())
            .map(|k| (*k, mix.get(*k)))
            .collect();
        let total: f64 = avail.iter().map(|a| a.1).sum();
        if avail.is_empty() {
            return None;
        }
        if total <= 0.0 {
            return Some(avail[0].0);
        }
        let mut x = self.rng.random::<f64>() * total;
        for (k, w) in &avail {
            if x < *w {
                return Some(*k);
            }
            x -= w;
        }
        avail.last().map(|a| a.0)
    }

    pub(super) fn on_query_arrive(&mut self) {
        let rate = self.sc.queries.rate_per_s;
        let next = self.now + self.exp_us(rate);
        if next < self.end_us {
            self.push(next, Ev::QueryArrive);
        }
        let (Some(coord), Some(kind)) = (self.random_up(false), self.pick_kind()) else {
            return;
        };
        let list = self.bank.by_kind.get_ref(kind);
        let qi = list[self.rng.random_range(0..list.len())];
        let p = self.sc.queries.privacy;
        let x = self.rng.random::<f64>() * (p.cloud + p.swarm + p.device);
        let privacy = if x < p.cloud {
            Privacy::Cloud
        } else if x < p.cloud + p.swarm {
            Privacy::Swarm
        } else {
            Privacy::Device
        };
        let safety = self.rng.random::<f64>() < self.sc.queries.safety_share;
        let id = self.next_query;
        self.next_query += 1;
        self.m.queries += 1;
        // The local model answers first; its time depends on this node's queue.
        let profile = self.sc.models[self.nodes[coord as usize].model].clone();
        let own = self.bank.answer(qi, &profile, &mut self.rng);
        let dur = self.inference_us(kind, &profile, own.as_ref());
        let done = self.enqueue(coord, dur);
        self.queries.insert(
            id,
            Query {
                id,
                coord,
                coord_inc: self.nodes[coord as usize].inc,
                qi,
                privacy,
                safety,
                arrival: self.now,
                phase: Phase::Local,
                own,
                sm: None,
                voters: Vec::new(),
                ballot_keys: BTreeSet::new(),
                phantoms_pending: 0,
                phantom_voters: 0,
                embeddings: BTreeMap::new(),
                truth: BTreeMap::new(),
                records: Vec::new(),
                cloud_correct: false,
                vote_counted: false,
            },
        );
        self.push(done, Ev::LocalDone(id));
    }

    pub(super) fn inference_us(
        &mut self,
        kind: Kind,
        p: &crate::scenario::ModelProfile,
        a: Option<&SimAnswer>,
    ) -> u64 {
        if let Some(ms) = a.and_then(|a| a.ms) {
            return us(ms);
        }
        let tokens = f64::from(self.sc.queries.tokens.get(kind));
        let factor = self.rng.random_range(0.8..1.2);
        us((p.prefill_ms + tokens * p.ms_per_token) * factor)
    }

    /// Queues work on a node's single inference worker; returns when it completes.
    pub(super) fn enqueue(&mut self, v: u32, dur: u64) -> u64 {
        let now = self.now;
        let n = &mut self.nodes[v as usize];
        let start = n.busy_until.max(now);
        n.busy_until = start + dur;
        n.queue += 1;
        n.busy_acc_us += dur;
        n.busy_until
    }

    pub(super) fn dequeue(&mut self, v: u32) {
        let n = &mut self.nodes[v as usize];
        n.queue = n.queue.saturating_sub(1);
    }

    pub(super) fn question(&self, q: &Query) -> &Question {
        &self.bank.questions[q.qi]
    }

    pub(super) fn inputs(&self, q: &Query, local_confidence: f32) -> RouteInputs {
        let n = &self.nodes[q.coord as usize];
        RouteInputs {
            local_confidence,
            privacy: q.privacy,
            min_confidence: None,
            live_voters: self.live_voters_of(q.coord),
            safety_flag: q.safety,
            route_override: self.route_override,
            gateway_available: n.mem.election().current().is_some(),
        }
    }

    /// The query, if it is still live and its coordinator is the incarnation that took it.
    pub(super) fn live_query(&self, id: u64) -> bool {
        self.queries
            .get(&id)
            .is_some_and(|q| self.up(q.coord) && self.nodes[q.coord as usize].inc == q.coord_inc)
    }

    pub(super) fn on_local_done(&mut self, id: u64) {
        let Some(q) = self.queries.get(&id) else {
            return;
        };
        self.dequeue(q.coord);
        if self.live_query(id) {
            self.start_coordinator(id);
        }
    }

    pub(super) fn finish(&mut self, id: u64, route: &'static str, correct: bool, degraded: Option<&str>) {
        if !self.finished.insert(id) {
            self.m.answered_twice += 1;
            self.violation(format!("query {id} answered twice"));
            return;
        }
        let Some(q) = self.queries.remove(&id) else {
            self.violation(format!("query {id} answered after it was dropped"));
            return;
        };
        let latency = self.now - q.arrival;
        self.m.answered += 1;
        self.m.latencies_us.push(latency);
        let label = match degraded {
            Some(reason) => {
                *self.m.degraded.entry(reason.to_owned()).or_insert(0) += 1;
                self.m.routes.degraded += 1;
                "degraded"
            }
            None => {
                match route {
                    "local" => self.m.routes.local += 1,
                    "cloud" => self.m.routes.cloud += 1,
                    _ => self.m.routes.vote += 1,
                }
                route
            }
        };
        let e = self.m.by_route.entry(label).or_insert((0, 0));
        e.0 += 1;
        if correct {
            e.1 += 1;
            self.m.correct += 1;
        }
    }
}
