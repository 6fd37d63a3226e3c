//! Prometheus metrics of a node (`GET /metrics`): queries and latency by
//! route, vote sizes, voter failures, escalations, forwarded queries; and the
//! swarm as this node sees it (peers, gateway term and whether it is this node,
//! cloud budget left, queue depth and in-flight work per model), set from a
//! [`SwarmGauges`] reading just before each scrape.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

/// The swarm as this node sees it at one instant, for the gauges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SwarmGauges {
    /// Live peers, this node not counted.
    pub peers: usize,
    /// The current gateway's term (0 with no gateway).
    pub gateway_term: u64,
    pub gateway_is_self: bool,
    /// Cloud calls allowed right now: this node's own budget when it holds
    /// cloud credentials, else the gateway's advertised one, else 0.
    pub cloud_budget_left: u64,
    /// Per local model: (id, requests waiting, requests queued or running).
    pub models: Vec<(String, usize, usize)>,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub peers: Gauge,
    pub gateway_term: Gauge,
    pub gateway_is_self: Gauge,
    pub cloud_budget_left: Gauge,
    pub queue_depth: Family<ModelLabel, Gauge>,
    pub in_flight: Family<ModelLabel, Gauge>,
    pub last_vote_size: Gauge,
    pub queries: Family<RouteLabel, Counter>,
    pub latency_ms: Family<RouteLabel, Histogram>,
    pub vote_size: Histogram,
    pub voter_failures: Counter,
    pub escalations: Family<OutcomeLabel, Counter>,
    pub forwarded: Counter,
    pub degraded: Counter,
    pub safety_flags: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("slm_swarm");
        let queries = Family::<RouteLabel, Counter>::default();
        r.register("queries", "Queries answered, by route", queries.clone());
        let latency_ms = Family::<RouteLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(5.0, 2.0, 16))
        });
        r.register(
            "query_latency_ms",
            "Query latency in milliseconds, by route",
            latency_ms.clone(),
        );
        let vote_size = Histogram::new([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0]);
        r.register(
            "vote_size",
            "Valid ballots per vote, the coordinator's included",
            vote_size.clone(),
        );
        let voter_failures = Counter::default();
        r.register(
            "voter_failures",
            "Voters that failed, timed out or answered garbage",
            voter_failures.clone(),
        );
        let escalations = Family::<OutcomeLabel, Counter>::default();
        r.register(
            "escalations",
            "Escalations to the gateway, by outcome",
            escalations.clone(),
        );
        let forwarded = Counter::default();
        r.register(
            "forwarded_queries",
            "Queries forwarded to a peer that has the model",
            forwarded.clone(),
        );
        let degraded = Counter::default();
        r.register("degraded_answers", "Answers marked degraded", degraded.clone());
        let safety_flags = Counter::default();
        r.register(
            "safety_flags",
            "Queries flagged safety-critical",
            safety_flags.clone(),
        );
        let peers = Gauge::default();
        r.register(
            "peers",
            "Live peers this node sees (itself not counted)",
            peers.clone(),
        );
        let gateway_term = Gauge::default();
        r.register(
            "gateway_term",
            "Term of the current gateway (0: no gateway)",
            gateway_term.clone(),
        );
        let gateway_is_self = Gauge::default();
        r.register(
            "gateway_is_self",
            "1 when this node is the gateway",
            gateway_is_self.clone(),
        );
        let cloud_budget_left = Gauge::default();
        r.register(
            "cloud_budget_left",
            "Cloud calls allowed now (this node's budget if it holds cloud credentials, else the gateway's advertised one)",
            cloud_budget_left.clone(),
        );
        let queue_depth = Family::<ModelLabel, Gauge>::default();
        r.register(
            "queue_depth",
            "Requests waiting for a local model's worker",
            queue_depth.clone(),
        );
        let in_flight = Family::<ModelLabel, Gauge>::default();
        r.register(
            "in_flight",
            "Requests queued or running on a local model",
            in_flight.clone(),
        );
        let last_vote_size = Gauge::default();
        r.register(
            "last_vote_size",
            "Valid ballots of the latest vote this node coordinated",
            last_vote_size.clone(),
        );
        Self {
            registry: Mutex::new(r),
            peers,
            gateway_term,
            gateway_is_self,
            cloud_budget_left,
            queue_depth,
            in_flight,
            last_vote_size,
            queries,
            latency_ms,
            vote_size,
            voter_failures,
            escalations,
            forwarded,
            degraded,
            safety_flags,
        }
    }

    pub fn observe_query(&self, route: &str, ms: f64) {
        let l = RouteLabel {
            route: route.to_string(),
        };
        self.queries.get_or_create(&l).inc();
        self.latency_ms.get_or_create(&l).observe(ms);
    }

    /// A vote's valid ballots, the coordinator's included.
    pub fn observe_vote(&self, valid: usize) {
        self.vote_size.observe(valid as f64);
        self.last_vote_size.set(clamp_i64(valid as u64));
    }

    /// Set the swarm gauges (called just before a scrape).
    pub fn set_swarm(&self, g: &SwarmGauges) {
        self.peers.set(clamp_i64(g.peers as u64));
        self.gateway_term.set(clamp_i64(g.gateway_term));
        self.gateway_is_self.set(i64::from(g.gateway_is_self));
        self.cloud_budget_left.set(clamp_i64(g.cloud_budget_left));
        for (model, waiting, load) in &g.models {
            let l = ModelLabel { model: model.clone() };
            self.queue_depth.get_or_create(&l).set(clamp_i64(*waiting as u64));
            self.in_flight.get_or_create(&l).set(clamp_i64(*load as u64));
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let reg = match self.registry.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        if encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grafana_dashboard_names_only_metrics_that_exist() {
        let dash = include_str!("../../configs/grafana/slm-swarm.json");
        let v: serde_json::Value = serde_json::from_str(dash).expect("dashboard is JSON");
        assert!(v["panels"].as_array().is_some_and(|p| p.len() >= 8));
        // Labelled families render nothing until they hold a sample, as on a
        // fresh node; give each one a sample so every name is exposed.
        let m = Metrics::new();
        m.observe_query("local", 12.0);
        m.escalations
            .get_or_create(&OutcomeLabel {
                outcome: "answered".into(),
            })
            .inc();
        m.set_swarm(&SwarmGauges {
            peers: 1,
            gateway_term: 1,
            gateway_is_self: false,
            cloud_budget_left: 1,
            models: vec![("m".into(), 0, 0)],
        });
        let text = m.render();
        let mut names: Vec<&str> = Vec::new();
        let mut rest = dash;
        while let Some(i) = rest.find("slm_swarm_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.push(&tail[..end]);
            rest = &tail[end..];
        }
        assert!(names.len() >= 10, "{names:?}");
        for n in names {
            // Exposition suffixes of counters and histograms.
            let base = ["_total", "_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n);
            assert!(
                text.contains(&format!("# TYPE {base} ")),
                "the dashboard queries {n}, which /metrics does not have"
            );
        }
    }

    #[test]
    fn renders_swarm_gauges() {
        let m = Metrics::new();
        m.set_swarm(&SwarmGauges {
            peers: 2,
            gateway_term: 7,
            gateway_is_self: true,
            cloud_budget_left: 41,
            models: vec![("smollm2-135m".into(), 3, 4)],
        });
        m.observe_vote(3);
        let text = m.render();
        for want in [
            "slm_swarm_peers 2",
            "slm_swarm_gateway_term 7",
            "slm_swarm_gateway_is_self 1",
            "slm_swarm_cloud_budget_left 41",
            "slm_swarm_queue_depth{model=\"smollm2-135m\"} 3",
            "slm_swarm_in_flight{model=\"smollm2-135m\"} 4",
            "slm_swarm_last_vote_size 3",
        ] {
            assert!(text.contains(want), "missing {want} in {text}");
        }
        m.set_swarm(&SwarmGauges::default());
        let text = m.render();
        assert!(text.contains("slm_swarm_peers 0"), "{text}");
        assert!(text.contains("slm_swarm_gateway_is_self 0"), "{text}");
    }

    #[test]
    fn renders_counters_by_route() {
        let m = Metrics::new();
        m.observe_query("local", 12.0);
        m.observe_query("vote", 80.0);
        m.observe_query("local", 3.0);
        m.vote_size.observe(3.0);
        let text = m.render();
        assert!(
            text.contains("slm_swarm_queries_total{route=\"local\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("slm_swarm_queries_total{route=\"vote\"} 1"),
            "{text}"
        );
        assert!(text.contains("slm_swarm_vote_size_count 1"), "{text}");
        assert!(text.contains("slm_swarm_query_latency_ms_bucket"), "{text}");
    }
}
