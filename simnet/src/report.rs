//! The run report: one JSON object (stable key order, rounded figures) and a text rendering.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// How queries were finally answered.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RouteMix {
    pub local: u64,
    pub vote: u64,
    pub cloud: u64,
    pub degraded: u64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct VoteStats {
    /// Votes run.
    pub votes: u64,
    /// Ballots counted (valid answers and failures, the coordinator's own included).
    pub ballots: u64,
    pub voter_failures: u64,
    /// Failures by kind: timeout, unreachable, overloaded, no_model, unusable, other.
    pub failure_kinds: BTreeMap<String, u64>,
    pub early_stops: u64,
    /// Duplicate replies that the tally refused to count again.
    pub duplicates_ignored: u64,
    /// Replies that arrived after the vote had finished.
    pub late_replies: u64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct EscalationStats {
    pub attempts: u64,
    /// Second attempts after the first failed (sent once the coordinator saw a new gateway).
    pub retries: u64,
    /// Both attempts failed: answered degraded.
    pub failed: u64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Membership {
    pub joins: u64,
    pub leaves: u64,
    pub crashes: u64,
    pub restarts: u64,
    pub peak_nodes: usize,
}

/// What attackers achieved (all zero without an `[attack]`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct AttackStats {
    pub keyed: bool,
    /// Adverts nodes ignored (no or a bad certificate, over the peer limit), summed over nodes.
    pub rejected_adverts: u64,
    /// Largest peer table any node held.
    pub peak_peer_table: usize,
    /// Votes asked of identities that do not exist (Sybils picked as voters).
    pub sybil_voters_picked: u64,
    /// Node-milliseconds during which a node's view named a liar as gateway.
    pub liar_gateway_node_ms: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    /// Initial swarm size.
    pub nodes: usize,
    pub virtual_s: f64,
    pub events: u64,
    pub queries: u64,
    pub answered: u64,
    /// Queries whose coordinator crashed or left before answering (the client saw an error).
    pub aborted: u64,
    /// Queries neither answered nor aborted: must be 0.
    pub lost_queries: u64,
    pub answered_twice: u64,
    /// Boot until every node's peer table first equals the live set.
    pub convergence_ms: Option<f64>,
    /// Disruption (crash, join, partition, …) until tables match the live set again.
    pub reconvergence_ms_p50: Option<f64>,
    pub reconvergence_ms_max: Option<f64>,
    /// Times a node took the gateway role.
    pub elections: u64,
    /// Gateway changes summed over every node's view.
    pub gateway_view_changes: u64,
    /// Worst gateway loss (crash, cloud loss) until one agreed gateway again.
    pub failover_ms: Option<f64>,
    pub failovers: Vec<f64>,
    /// Component-milliseconds with 0 gateways although one was eligible, and with more than 1.
    pub gateway_zero_ms: f64,
    pub gateway_multi_ms: f64,
    pub routes: RouteMix,
    pub degraded_reasons: BTreeMap<String, u64>,
    pub accuracy: f64,
    pub accuracy_by_route: BTreeMap<String, f64>,
    pub cloud_share: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
    pub vote: VoteStats,
    pub escalation: EscalationStats,
    pub membership: Membership,
    pub attack: AttackStats,
    pub gossip_messages: u64,
    pub gossip_bytes: u64,
    pub rpc_messages: u64,
    pub rpc_bytes: u64,
    pub messages_per_node_s: f64,
    pub bytes_per_node_s: f64,
    pub invariant_violations: u64,
    /// The first violations, with their virtual time.
    pub violations: Vec<String>,
}

/// Rounds for the report: figures stay readable and stable.
pub fn round3(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

fn opt(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "scenario {} · seed {} · {} nodes · {} virtual s · {} events",
            self.scenario, self.seed, self.nodes, self.virtual_s, self.events
        )?;
        writeln!(
            f,
            "membership   joins {} leaves {} crashes {} restarts {} peak {}",
            self.membership.joins,
            self.membership.leaves,
            self.membership.crashes,
            self.membership.restarts,
            self.membership.peak_nodes
        )?;
        writeln!(
            f,
            "adverts      convergence {} ms · reconvergence p50 {} / max {} ms",
            opt(self.convergence_ms),
            opt(self.reconvergence_ms_p50),
            opt(self.reconvergence_ms_max)
        )?;
        writeln!(
            f,
            "gateway      elections {} · view changes {} · failover {} ms {:?} · 0 gw {:.0} ms · >1 gw {:.0} ms",
            self.elections,
            self.gateway_view_changes,
            opt(self.failover_ms),
            self.failovers,
            self.gateway_zero_ms,
            self.gateway_multi_ms
        )?;
        writeln!(
            f,
            "queries      {} · answered {} · aborted {} · lost {} · twice {}",
            self.queries, self.answered, self.aborted, self.lost_queries, self.answered_twice
        )?;
        writeln!(
            f,
            "routes       local {} · vote {} · cloud {} · degraded {} {:?}",
            self.routes.local,
            self.routes.vote,
            self.routes.cloud,
            self.routes.degraded,
            self.degraded_reasons
        )?;
        writeln!(
            f,
            "quality      accuracy {:.3} {:?} · cloud share {:.3}",
            self.accuracy, self.accuracy_by_route, self.cloud_share
        )?;
        writeln!(
            f,
            "latency      p50 {:.0} ms · p99 {:.0} ms · max {:.0} ms",
            self.latency_ms_p50, self.latency_ms_p99, self.latency_ms_max
        )?;
        writeln!(
            f,
            "votes        {} · ballots {} · failures {} {:?} · early stops {} · duplicates ignored {} · late {}",
            self.vote.votes,
            self.vote.ballots,
            self.vote.voter_failures,
            self.vote.failure_kinds,
            self.vote.early_stops,
            self.vote.duplicates_ignored,
            self.vote.late_replies
        )?;
        writeln!(
            f,
            "escalations  {} · retries {} · failed {}",
            self.escalation.attempts, self.escalation.retries, self.escalation.failed
        )?;
        writeln!(
            f,
            "traffic      {:.1} msg/node/s · {:.0} B/node/s (gossip {} msg {} B, rpc {} msg {} B)",
            self.messages_per_node_s,
            self.bytes_per_node_s,
            self.gossip_messages,
            self.gossip_bytes,
            self.rpc_messages,
            self.rpc_bytes
        )?;
        if self.attack != AttackStats::default() {
            writeln!(
                f,
                "attack       {} · rejected adverts {} · peak peer table {} · Sybil voters picked {} · liar as gateway {} node-ms",
                if self.attack.keyed { "keyed swarm" } else { "open swarm" },
                self.attack.rejected_adverts,
                self.attack.peak_peer_table,
                self.attack.sybil_voters_picked,
                self.attack.liar_gateway_node_ms
            )?;
        }
        write!(f, "invariants   {} violation(s)", self.invariant_violations)?;
        for v in &self.violations {
            write!(f, "\n  - {v}")?;
        }
        Ok(())
    }
}
