//! The end-of-run summary: builds the `Report` from the metrics and the checker.

use crate::report::{round3, AttackStats, Report};

use super::Sim;

impl Sim {
    pub(super) fn report(mut self) -> Report {
        let lost = self.queries.len() as u64;
        if lost > 0 {
            let ids: Vec<u64> = self.queries.keys().take(5).copied().collect();
            self.violation(format!("{lost} queries never answered, e.g. {ids:?}"));
        }
        let mut lat = std::mem::take(&mut self.m.latencies_us);
        lat.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            let rank = ((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len());
            lat[rank - 1] as f64 / 1000.0
        };
        let answered = self.m.answered.max(1) as f64;
        let mut reconv: Vec<f64> = self.ck.reconv.iter().map(|x| *x as f64 / 1000.0).collect();
        reconv.sort_by(f64::total_cmp);
        let failovers: Vec<f64> = self
            .ck
            .failovers
            .iter()
            .map(|x| round3(*x as f64 / 1000.0))
            .collect();
        let node_s = (self.m.node_us as f64 / 1e6).max(1e-9);
        let msgs = (self.m.gossip_msgs + self.m.rpc_msgs) as f64;
        let bytes = (self.m.gossip_bytes + self.m.rpc_bytes) as f64;
        Report {
            scenario: self.sc.name.clone(),
            seed: self.seed,
            nodes: self.sc.nodes,
            virtual_s: self.sc.virtual_s,
            events: self.m.events,
            queries: self.m.queries,
            answered: self.m.answered,
            aborted: self.m.aborted,
            lost_queries: lost,
            answered_twice: self.m.answered_twice,
            convergence_ms: self.ck.conv_first.map(|t| round3(t as f64 / 1000.0)),
            reconvergence_ms_p50: reconv.get(reconv.len() / 2).copied().map(round3),
            reconvergence_ms_max: reconv.last().copied().map(round3),
            elections: self.m.elections,
            gateway_view_changes: self.m.view_changes,
            failover_ms: failovers.iter().copied().reduce(f64::max),
            failovers,
            gateway_zero_ms: round3(self.ck.zero_us as f64 / 1000.0),
            gateway_multi_ms: round3(self.ck.multi_us as f64 / 1000.0),
            routes: self.m.routes.clone(),
            degraded_reasons: self.m.degraded.clone(),
            accuracy: round3(self.m.correct as f64 / answered),
            accuracy_by_route: self
                .m
                .by_route
                .iter()
                .map(|(k, (n, c))| ((*k).to_owned(), round3(*c as f64 / (*n).max(1) as f64)))
                .collect(),
            cloud_share: round3(self.m.routes.cloud as f64 / answered),
            latency_ms_p50: round3(pct(0.50)),
            latency_ms_p99: round3(pct(0.99)),
            latency_ms_max: round3(lat.last().map_or(0.0, |x| *x as f64 / 1000.0)),
            vote: self.m.vote.clone(),
            escalation: self.m.esc.clone(),
            membership: self.m.membership.clone(),
            attack: AttackStats {
                keyed: self.sc.attack.keyed,
                rejected_adverts: self.m.attack.rejected_adverts
                    + self.nodes.iter().map(|n| n.mem.rejected()).sum::<u64>(),
                ..self.m.attack.clone()
            },
            gossip_messages: self.m.gossip_msgs,
            gossip_bytes: self.m.gossip_bytes,
            rpc_messages: self.m.rpc_msgs,
            rpc_bytes: self.m.rpc_bytes,
            messages_per_node_s: round3(msgs / node_s),
            bytes_per_node_s: round3(bytes / node_s),
            invariant_violations: self.ck.violations,
            violations: self.ck.listed.clone(),
        }
    }
}
