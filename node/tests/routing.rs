//! The router really consults the policy: in-process nodes over libp2p's memory
//! transport with stand-in models (fixed confidence). τ_local above the local
//! confidence makes every query vote, below it none do; privacy `device` never
//! leaves the node; a vote lists every voter with its answer.

use std::time::Duration;

use swarm_node::config::NodeConfig;
use swarm_node::inference::testing::FakeBackend;
use swarm_node::inference::Backend;
use swarm_node::node::Node;
use swarm_node::router::{ChatRequest, SwarmExt};
use swarm_protocol::{Privacy, RouteOverride};

async fn swarm(tau_local: f32, n: usize) -> Vec<Node> {
    let ns = format!("routing-{}-{tau_local}", std::process::id());
    let nodes = (0..n)
        .map(|i| {
            let mut cfg = NodeConfig {
                name: format!("r{i}"),
                namespace: ns.clone(),
                advert_interval_ms: 200,
                ..NodeConfig::default()
            };
            cfg.routing.tau_local = tau_local;
            cfg.routing.quorum = 1;
            let b: Box<dyn Backend> = Box::new(FakeBackend::new(
                &format!("fake-{i}"),
                i as u64,
                Duration::from_millis(5),
                0.6,
            ));
            (cfg, vec![b])
        })
        .collect();
    Node::start_memory_swarm(nodes, Duration::from_secs(20))
        .await
        .expect("swarm")
}

fn mcq(i: usize, privacy: Option<Privacy>) -> ChatRequest {
    let ext = SwarmExt {
        route: RouteOverride::Auto,
        privacy,
        ..SwarmExt::default()
    };
    ChatRequest::mcq(
        &format!("Q{i}: which is a mammal?"),
        &["shark", "dolphin", "trout", "eel"],
        8,
        ext,
        Duration::from_secs(30),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_tau_local_votes_every_time_low_never() {
    let high = swarm(0.9, 3).await;
    for i in 0..5 {
        let a = high[0].router.chat(mcq(i, None)).await.expect("chat");
        assert_eq!(a.prov.route, "vote", "query {i}: {:?}", a.prov);
        assert_eq!(a.prov.voters.len(), 3, "{:?}", a.prov.voters);
        let models: std::collections::BTreeSet<&str> =
            a.prov.voters.iter().map(|v| v.model.as_str()).collect();
        assert_eq!(models.len(), 3, "voters must be heterogeneous: {models:?}");
        for v in &a.prov.voters {
            assert!(v.error.is_some() || v.answer.is_some(), "{v:?}");
        }
        assert!(a.prov.agreement.is_some());
    }
    // Privacy `device` never asks peers, even when unsure.
    let a = high[0]
        .router
        .chat(mcq(9, Some(Privacy::Device)))
        .await
        .expect("chat");
    assert_eq!(a.prov.route, "local");
    assert!(a.prov.degraded, "{:?}", a.prov);
    assert!(a.prov.voters.is_empty());
    let low = swarm(0.1, 3).await;
    for i in 0..5 {
        let a = low[0].router.chat(mcq(i, None)).await.expect("chat");
        assert_eq!(a.prov.route, "local", "query {i}: {:?}", a.prov);
        assert!(a.prov.voters.is_empty());
        assert!(!a.prov.degraded);
    }
    let votes = high[0].metrics.render();
    assert!(
        votes.contains("slm_swarm_queries_total{route=\"vote\"} 5"),
        "{votes}"
    );
    for n in high.iter().chain(low.iter()) {
        n.shutdown().await;
    }
}
