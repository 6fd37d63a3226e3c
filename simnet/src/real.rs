//! Real tier: N real `swarm-node` nodes (network actor, membership task, router) with stand-in
//! models, in one process over libp2p's memory transport — mDNS off, explicit dials only. It
//! measures how long adverts take to reach every peer table, the memory each node costs, and
//! whether votes started on random nodes really reach their peers.
//!
//! Unlike the deterministic tier this runs on the wall clock: the seed fixes the topology, the
//! model pool and which node starts each vote, not the timings.

use std::collections::BTreeSet;
use std::fmt;
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use swarm_node::config::NodeConfig;
use swarm_node::inference::testing::FakeBackend;
use swarm_node::inference::Backend;
use swarm_node::network::TransportKind;
use swarm_node::node::{Node, NodeError, NodeOptions};
use swarm_node::router::{self, ChatRequest, RouteError, SwarmExt};
use swarm_protocol::{Privacy, RouteOverride};
use thiserror::Error;

use crate::report::round3;

#[derive(Debug, Error)]
pub enum RealError {
    #[error("invalid real-tier settings: {0}")]
    Invalid(String),
    #[error("node {index}: {source}")]
    Node {
        index: usize,
        #[source]
        source: NodeError,
    },
    #[error("node {0} got no listen address within 5 s")]
    NoListenAddr(usize),
    #[error("node {index}: the network actor stopped")]
    Stopped { index: usize },
}

/// What to start and how to drive it.
#[derive(Debug, Clone)]
pub struct RealConfig {
    pub nodes: usize,
    /// Votes run after convergence (0 = only measure convergence and memory).
    pub votes: usize,
    /// Votes in flight at once.
    pub concurrency: usize,
    pub seed: u64,
    /// Distinct stand-in model ids; node i serves model `i % models`.
    pub models: usize,
    /// Extra seeded links each node dials, besides its ring neighbour.
    pub links: usize,
    /// Advert period of every node; see [`RealConfig::default_advert_ms`].
    pub advert_interval_ms: u64,
    /// Stand-in inference time per answer.
    pub inference_ms: u64,
    /// Give up waiting for convergence after this long (votes still run, on what is known).
    pub converge_timeout: Duration,
}

impl Default for RealConfig {
    fn default() -> Self {
        Self {
            nodes: 10,
            votes: 20,
            concurrency: 4,
            seed: 1,
            models: 8,
            links: 2,
            advert_interval_ms: Self::default_advert_ms(10),
            inference_ms: 5,
            converge_timeout: Duration::from_secs(120),
        }
    }
}

impl RealConfig {
    /// max(1 s, N² ms): 2.5 s for 50 nodes, 10 s for 100. In one process every node checks the
    /// signature of every copy of every advert (gossipsub verifies before it drops duplicates)
    /// and rebuilds its view on each one, so the work per period grows as N²·degree (+ N³ for
    /// the views); a period ∝ N² keeps the CPU per second about flat. Measured on 2 shared
    /// cores: 100 nodes at 1 s never converge, at 5 s they converge but votes then slow down
    /// and tables can expire (vote connections raise the gossip degree), at 8–10 s they hold.
    pub fn default_advert_ms(nodes: usize) -> u64 {
        (nodes as u64 * nodes as u64).max(1000)
    }

    fn validate(&self) -> Result<(), RealError> {
        let bad = |m: &str| Err(RealError::Invalid(m.into()));
        if self.nodes < 2 {
            return bad("at least 2 nodes");
        }
        if self.models == 0 {
            return bad("at least 1 model");
        }
        if self.concurrency == 0 {
            return bad("concurrency must be at least 1");
        }
        if self.advert_interval_ms < 50 {
            return bad("advert interval must be at least 50 ms");
        }
        Ok(())
    }
}

/// One vote as the coordinator saw it.
#[derive(Debug, Clone, Serialize)]
pub struct VoteRecord {
    pub coordinator: usize,
    pub route: String,
    /// Peers (not the coordinator) that answered.
    pub peer_answers: usize,
    /// Distinct models among the answering peers.
    pub peer_models: usize,
    /// Asked voters that failed (timeout, unreachable, refusal, unusable answer).
    pub errors: Vec<String>,
    pub vote_ms: Option<f64>,
    /// The whole request at the coordinator (local answer, vote, decision).
    pub query_ms: Option<u64>,
    /// The router returned an error instead of an answer.
    pub failed: Option<String>,
}

impl VoteRecord {
    /// Routed as a vote, answered by `min_peers` peers or more, no voter failed.
    pub fn ok(&self, min_peers: usize) -> bool {
        self.failed.is_none()
            && self.route == "vote"
            && self.peer_answers >= min_peers
            && self.errors.is_empty()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RealReport {
    pub nodes: usize,
    pub seed: u64,
    pub models: usize,
    pub links_per_node: usize,
    pub advert_interval_ms: u64,
    /// Time to start every node (each has a listen address).
    pub startup_ms: f64,
    /// First node started → every peer table holds all N-1 others; `None` if the timeout hit.
    pub convergence_ms: Option<f64>,
    /// Smallest peer table at the end of the wait (N-1 when converged).
    pub min_peers_seen: usize,
    /// Process RSS growth from before the first node to convergence, divided by N.
    pub rss_mb_per_node: Option<f64>,
    pub rss_mb_total: Option<f64>,
    /// Live libp2p connections per node at convergence (before votes dial more).
    pub connections_per_node: f64,
    pub votes: usize,
    pub votes_ok: usize,
    /// Asked voters that failed, summed over all votes.
    pub voter_errors: usize,
    /// Router errors (no answer at all).
    pub vote_failures: usize,
    pub min_peer_answers: Option<usize>,
    pub vote_ms_p50: Option<f64>,
    pub vote_ms_p95: Option<f64>,
    pub query_ms_p50: Option<f64>,
    pub query_ms_p95: Option<f64>,
    pub votes_wall_ms: f64,
    /// The first few votes that were not ok.
    pub bad_votes: Vec<VoteRecord>,
}

impl fmt::Display for RealReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        writeln!(
            f,
            "real tier · {} nodes · seed {} · {} models · ring + {} links · adverts every {} ms",
            self.nodes, self.seed, self.models, self.links_per_node, self.advert_interval_ms
        )?;
        writeln!(
            f,
            "convergence  {} ms (startup {:.0} ms) · smallest table {} · {:.1} connections/node",
            o(self.convergence_ms),
            self.startup_ms,
            self.min_peers_seen,
            self.connections_per_node
        )?;
        writeln!(
            f,
            "memory       {} MB/node · {} MB total",
            o(self.rss_mb_per_node),
            o(self.rss_mb_total)
        )?;
        write!(
            f,
            "votes        {} · ok {} · voter errors {} · router errors {} · min peer answers {} · vote p50 {} / p95 {} ms · request p50 {} / p95 {} ms · {:.0} ms wall",
            self.votes,
            self.votes_ok,
            self.voter_errors,
            self.vote_failures,
            self.min_peer_answers.map_or_else(|| "-".into(), |v| v.to_string()),
            o(self.vote_ms_p50),
            o(self.vote_ms_p95),
            o(self.query_ms_p50),
            o(self.query_ms_p95),
            self.votes_wall_ms
        )?;
        for b in &self.bad_votes {
            write!(f, "\n  - {b:?}")?;
        }
        Ok(())
    }
}

/// Resident set size of this process, MB (Linux; `None` elsewhere).
pub fn rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The running swarm: nodes in start order.
pub struct RealSwarm {
    pub nodes: Vec<Node>,
    pub cfg: RealConfig,
    started: Instant,
    startup_ms: f64,
    rss_before: Option<f64>,
}

/// Which earlier nodes each node dials: its predecessor on the ring, plus `links` seeded random
/// others (the last node also closes the ring to node 0). Always connected; dials go one way.
pub fn topology(n: usize, links: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    (0..n)
        .map(|i| {
            let mut to = BTreeSet::new();
            if i > 0 {
                to.insert(i - 1);
            }
            if i == n - 1 && n > 2 {
                to.insert(0);
            }
            // Only earlier nodes can be dialed at start: they already listen.
            let base = to.len();
            let extra = links.min(i.saturating_sub(base));
            while to.len() < base + extra {
                to.insert(rng.random_range(0..i));
            }
            to.into_iter().collect()
        })
        .collect()
}

impl RealSwarm {
    /// Start every node, each dialing its topology links through `bootstrap` (redialed with
    /// backoff by the network actor, so a slow start does not lose a link).
    pub async fn start(cfg: RealConfig, rng: &mut ChaCha8Rng) -> Result<Self, RealError> {
        cfg.validate()?;
        let links = topology(cfg.nodes, cfg.links, rng);
        let rss_before = rss_mb();
        let started = Instant::now();
        // Memory-transport ports are process-wide: a namespace per run keeps runs apart anyway.
        let ns = format!("real-{}-{}", std::process::id(), rng.random::<u32>());
        let mut nodes: Vec<Node> = Vec::with_capacity(cfg.nodes);
        let mut addrs: Vec<Vec<Multiaddr>> = Vec::with_capacity(cfg.nodes);
        for (i, to) in links.iter().enumerate() {
            let mut nc = NodeConfig {
                name: format!("real-{i}"),
                namespace: ns.clone(),
                listen: vec!["/memory/0".into()],
                mdns: false,
                advert_interval_ms: cfg.advert_interval_ms,
                ..NodeConfig::default()
            };
            // Stand-in models only: no sentence embedder (it would be one shared model loaded in
            // this process, skewing memory per node) and no safety classifier in the path.
            nc.routing.safety = false;
            nc.routing.embedder = String::new();
            nc.bootstrap = to
                .iter()
                .flat_map(|&j| {
                    let peer = nodes[j].peer_id;
                    addrs[j].iter().map(move |a| format!("{a}/p2p/{peer}"))
                })
                .collect();
            let model = i % cfg.models;
            // Same model id → same answers (seeded by the model), as real replicas would give.
            let b: Box<dyn Backend> = Box::new(FakeBackend::new(
                &format!("stand-in-{model}"),
                model as u64,
                Duration::from_millis(cfg.inference_ms),
                0.6,
            ));
            let (node, _task) = Node::start(NodeOptions {
                cfg: nc,
                key: Keypair::generate_ed25519(),
                backends: vec![b],
                transport: TransportKind::Memory,
                identity_lock: None,
                cloud: None,
            })
            .await
            .map_err(|source| RealError::Node { index: i, source })?;
            let t0 = Instant::now();
            let listen = loop {
                let a = node
                    .net
                    .listen_addrs()
                    .await
                    .map_err(|_| RealError::Stopped { index: i })?;
                if !a.is_empty() {
                    break a;
                }
                if t0.elapsed() > Duration::from_secs(5) {
                    return Err(RealError::NoListenAddr(i));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            nodes.push(node);
            addrs.push(listen);
        }
        let startup_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(Self {
            nodes,
            cfg,
            started,
            startup_ms,
            rss_before,
        })
    }

    /// Smallest peer table over all nodes.
    pub fn min_peers(&self) -> usize {
        self.nodes
            .iter()
            .map(|n| n.snapshot().peers.len())
            .min()
            .unwrap_or(0)
    }

    /// Wait until every node sees all N-1 others; ms since the first node started, or `None`.
    pub async fn wait_converged(&self, timeout: Duration) -> Option<f64> {
        let want = self.nodes.len() - 1;
        let t0 = Instant::now();
        loop {
            if self.min_peers() >= want {
                return Some(self.started.elapsed().as_secs_f64() * 1e3);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn connections_per_node(&self) -> f64 {
        let mut total = 0usize;
        for n in &self.nodes {
            total += n.net.connected_peers().await.map(|p| p.len()).unwrap_or(0);
        }
        total as f64 / self.nodes.len() as f64
    }

    /// Run `count` votes from seeded random coordinators, `concurrency` at a time.
    pub async fn votes(&self, count: usize, rng: &mut ChaCha8Rng) -> Vec<VoteRecord> {
        let coordinators: Vec<usize> = (0..count)
            .map(|_| rng.random_range(0..self.nodes.len()))
            .collect();
        let mut out = Vec::with_capacity(count);
        for (batch_no, batch) in coordinators.chunks(self.cfg.concurrency).enumerate() {
            let mut set = tokio::task::JoinSet::new();
            for (k, &c) in batch.iter().enumerate() {
                let node = self.nodes[c].clone();
                let q = batch_no * self.cfg.concurrency + k;
                set.spawn(async move { (k, vote_record(c, node.router.chat(vote_request(q)).await)) });
            }
            let mut done: Vec<(usize, VoteRecord)> = Vec::new();
            while let Some(r) = set.join_next().await {
                match r {
                    Ok(x) => done.push(x),
                    Err(e) => done.push((
                        usize::MAX,
                        VoteRecord {
                            coordinator: usize::MAX,
                            route: String::new(),
                            peer_answers: 0,
                            peer_models: 0,
                            errors: Vec::new(),
                            vote_ms: None,
                            query_ms: None,
                            failed: Some(format!("vote task panicked: {e}")),
                        },
                    )),
                }
            }
            // Report in issue order, not completion order.
            done.sort_by_key(|(k, _)| *k);
            out.extend(done.into_iter().map(|(_, r)| r));
        }
        out
    }

    pub async fn shutdown(&self) {
        for n in &self.nodes {
            n.shutdown().await;
        }
    }
}

/// An MCQ forced onto the vote route, on the swarm (no cloud) privacy level.
pub fn vote_request(q: usize) -> ChatRequest {
    let ext = SwarmExt {
        route: RouteOverride::Vote,
        privacy: Some(Privacy::Swarm),
        ..SwarmExt::default()
    };
    ChatRequest::mcq(
        &format!("Question {q}: which of these is a mammal?"),
        &MAMMAL_OPTIONS,
        8,
        ext,
        Duration::from_secs(60),
    )
}

const MAMMAL_OPTIONS: [&str; 4] = ["shark", "dolphin", "trout", "eel"];

/// The router marks voters skipped after an early decision with this error text.
const NOT_NEEDED: &str = "not needed";

fn vote_record(coordinator: usize, r: Result<router::Answer, RouteError>) -> VoteRecord {
    match r {
        Ok(a) => {
            let p = a.prov;
            // voters[0] is the coordinator's own answer.
            let peers = p.voters.iter().skip(1);
            let answered: Vec<_> = peers
                .clone()
                .filter(|v| v.error.is_none() && v.answer.is_some())
                .collect();
            let models: BTreeSet<&str> = answered.iter().map(|v| v.model.as_str()).collect();
            let errors = peers
                .filter_map(|v| v.error.as_ref())
                .filter(|e| !e.starts_with(NOT_NEEDED))
                .cloned()
                .collect();
            VoteRecord {
                coordinator,
                route: p.route,
                peer_answers: answered.len(),
                peer_models: models.len(),
                errors,
                vote_ms: p.vote_ms,
                query_ms: Some(p.elapsed_ms),
                failed: None,
            }
        }
        Err(e) => VoteRecord {
            coordinator,
            route: String::new(),
            peer_answers: 0,
            peer_models: 0,
            errors: Vec::new(),
            vote_ms: None,
            query_ms: None,
            failed: Some(e.to_string()),
        },
    }
}

fn pct(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted.get(i).copied().map(round3)
}

/// Start the swarm, wait for convergence, measure memory, run the votes, stop. Needs a
/// multi-threaded tokio runtime (model workers block their own threads, not the runtime).
pub async fn run(cfg: RealConfig) -> Result<RealReport, RealError> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let timeout = cfg.converge_timeout;
    let swarm = RealSwarm::start(cfg.clone(), &mut rng).await?;
    let convergence_ms = swarm.wait_converged(timeout).await;
    let min_peers_seen = swarm.min_peers();
    let rss_after = rss_mb();
    let n = cfg.nodes as f64;
    let rss_total = match (swarm.rss_before, rss_after) {
        (Some(a), Some(b)) => Some((b - a).max(0.0)),
        _ => None,
    };
    let connections_per_node = swarm.connections_per_node().await;
    let t_votes = Instant::now();
    let records = swarm.votes(cfg.votes, &mut rng).await;
    let votes_wall_ms = t_votes.elapsed().as_secs_f64() * 1e3;
    swarm.shutdown().await;
    let min_peers = 2.min(cfg.nodes - 1);
    let mut ms: Vec<f64> = records.iter().filter_map(|r| r.vote_ms).collect();
    ms.sort_by(f64::total_cmp);
    let mut qms: Vec<f64> = records
        .iter()
        .filter_map(|r| r.query_ms.map(|x| x as f64))
        .collect();
    qms.sort_by(f64::total_cmp);
    Ok(RealReport {
        nodes: cfg.nodes,
        seed: cfg.seed,
        models: cfg.models,
        links_per_node: cfg.links,
        advert_interval_ms: cfg.advert_interval_ms,
        startup_ms: round3(swarm.startup_ms),
        convergence_ms: convergence_ms.map(round3),
        min_peers_seen,
        rss_mb_per_node: rss_total.map(|t| round3(t / n)),
        rss_mb_total: rss_total.map(round3),
        connections_per_node: round3(connections_per_node),
        votes: records.len(),
        votes_ok: records.iter().filter(|r| r.ok(min_peers)).count(),
        voter_errors: records.iter().map(|r| r.errors.len()).sum(),
        vote_failures: records.iter().filter(|r| r.failed.is_some()).count(),
        min_peer_answers: records.iter().map(|r| r.peer_answers).min(),
        vote_ms_p50: pct(&ms, 0.5),
        vote_ms_p95: pct(&ms, 0.95),
        query_ms_p50: pct(&qms, 0.5),
        query_ms_p95: pct(&qms, 0.95),
        votes_wall_ms: round3(votes_wall_ms),
        bad_votes: records
            .iter()
            .filter(|r| !r.ok(min_peers))
            .take(5)
            .cloned()
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_is_connected_and_seeded() {
        for n in [2, 3, 10, 57] {
            let t = topology(n, 2, &mut ChaCha8Rng::seed_from_u64(3));
            assert_eq!(t, topology(n, 2, &mut ChaCha8Rng::seed_from_u64(3)));
            // Union-find over the undirected links.
            let mut root: Vec<usize> = (0..n).collect();
            fn find(r: &mut [usize], x: usize) -> usize {
                if r[x] == x {
                    x
                } else {
                    let y = find(r, r[x]);
                    r[x] = y;
                    y
                }
            }
            for (i, to) in t.iter().enumerate() {
                for &j in to {
                    assert!(j < i, "node {i} dials {j}, which is not started yet");
                    let (a, b) = (find(&mut root, i), find(&mut root, j));
                    root[a] = b;
                }
            }
            let r0 = find(&mut root, 0);
            assert!((0..n).all(|i| find(&mut root, i) == r0), "n={n}: {t:?}");
            // Nodes far enough in have their ring link plus the extra ones.
            if n > 5 {
                assert!(t[4].len() >= 3, "{:?}", t[4]);
            }
        }
    }
}
