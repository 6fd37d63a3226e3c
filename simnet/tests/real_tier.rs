//! Real tier: 50 real nodes (network actor, membership, router; stand-in models, the only mock,
//! since real models cannot run 50 times on this machine) over libp2p's memory transport with
//! explicit dials only. Every peer table must come to hold exactly the 49 others, and votes
//! started on random nodes must be answered by at least two peers of other models.

use std::collections::BTreeSet;
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use swarm_simnet::real::{self, RealConfig, RealSwarm};

const NODES: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_nodes_converge_and_route_votes() {
    let cfg = RealConfig {
        nodes: NODES,
        votes: 30,
        concurrency: 3,
        seed: 5,
        // Short enough to converge in seconds, long enough for 2 shared cores to keep up.
        advert_interval_ms: RealConfig::default_advert_ms(NODES),
        ..RealConfig::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let swarm = RealSwarm::start(cfg.clone(), &mut rng).await.expect("start");
    // A generous deadline: this asserts convergence, not its speed (that is the report's).
    let converged = swarm.wait_converged(Duration::from_secs(120)).await;
    assert!(
        converged.is_some(),
        "not converged: smallest table {} of {}",
        swarm.min_peers(),
        NODES - 1
    );
    // Each table holds exactly the other nodes (not just 49 of something).
    let all: BTreeSet<String> = swarm.nodes.iter().map(|n| n.peer_id.to_string()).collect();
    for (i, n) in swarm.nodes.iter().enumerate() {
        let seen: BTreeSet<String> = n.snapshot().peers.iter().map(|p| p.advert.peer.clone()).collect();
        let mut want = all.clone();
        want.remove(&n.peer_id.to_string());
        assert_eq!(seen, want, "node {i}'s peer table");
    }
    let records = swarm.votes(cfg.votes, &mut rng).await;
    assert_eq!(records.len(), cfg.votes);
    let coordinators: BTreeSet<usize> = records.iter().map(|r| r.coordinator).collect();
    assert!(
        coordinators.len() > 10,
        "votes should start on many nodes: {coordinators:?}"
    );
    for (q, r) in records.iter().enumerate() {
        assert!(r.failed.is_none(), "vote {q}: {r:?}");
        assert_eq!(r.route, "vote", "vote {q}: {r:?}");
        assert!(r.peer_answers >= 2, "vote {q}: fewer than 2 peer answers: {r:?}");
        // The router picks voters of models other than the coordinator's, and distinct.
        assert_eq!(r.peer_models, r.peer_answers, "vote {q}: repeated model: {r:?}");
        assert!(r.errors.is_empty(), "vote {q}: voter errors: {r:?}");
    }
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_counts_votes_and_memory() {
    // The whole `real` pipeline on a small swarm: the report's figures are consistent.
    let r = real::run(RealConfig {
        nodes: 6,
        votes: 8,
        seed: 2,
        advert_interval_ms: 300,
        ..RealConfig::default()
    })
    .await
    .expect("run");
    assert_eq!(r.nodes, 6);
    assert!(r.convergence_ms.is_some(), "{r}");
    assert_eq!(r.min_peers_seen, 5, "{r}");
    assert_eq!(r.votes, 8);
    assert_eq!(r.votes_ok, 8, "{r}");
    assert_eq!(r.voter_errors, 0, "{r}");
    assert!(r.min_peer_answers.is_some_and(|m| m >= 2), "{r}");
    assert!(r.bad_votes.is_empty(), "{r}");
    if cfg!(target_os = "linux") {
        assert!(r.rss_mb_total.is_some_and(|m| m > 0.0), "{r}");
    }
    let v = serde_json::to_value(&r).expect("json");
    for key in [
        "nodes",
        "convergence_ms",
        "rss_mb_per_node",
        "votes",
        "votes_ok",
        "voter_errors",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
}
