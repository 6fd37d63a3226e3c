//! The router really consults the policy: in-process nodes over libp2p's memory
//! transport with stand-in models (fixed confidence). τ_local above the local
//! confidence makes every query vote, below it none do; privacy `device` never
//! leaves the node; a vote lists every voter with its answer.

use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use swarm_node::config::NodeConfig;
use swarm_node::inference::testing::FakeBackend;
use swarm_node::inference::Backend;
use swarm_node::network::TransportKind;
use swarm_node::node::{Node, NodeOptions};
use swarm_node::router::{self, ChatRequest, SwarmExt};
use swarm_protocol::{Privacy, RouteOverride};

async fn swarm(tau_local: f32, n: usize) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    let ns = format!("routing-{}-{tau_local}", std::process::id());
    for i in 0..n {
        let mut cfg = NodeConfig {
            name: format!("r{i}"),
            namespace: ns.clone(),
            listen: vec!["/memory/0".into()],
            mdns: false,
            advert_interval_ms: 200,
            ..NodeConfig::default()
        };
        cfg.routing.tau_local = tau_local;
        cfg.routing.quorum = 1;
        if let Some(first) = nodes.first() {
            let addrs = first.net.listen_addrs().await.expect("addrs");
            cfg.bootstrap = addrs
                .iter()
                .map(|a| format!("{a}/p2p/{}", first.peer_id))
                .collect();
        }
        let b: Box<dyn Backend> = Box::new(FakeBackend::new(
            &format!("fake-{i}"),
            i as u64,
            Duration::from_millis(5),
            0.6,
        ));
        let (node, _) = Node::start(NodeOptions {
            cfg,
            key: Keypair::generate_ed25519(),
            backends: vec![b],
            transport: TransportKind::Memory,
            identity_lock: None,
            cloud: None,
        })
        .await
        .expect("node");
        let t0 = Instant::now();
        while node.net.listen_addrs().await.expect("addrs").is_empty() {
            assert!(t0.elapsed() < Duration::from_secs(5), "no listen address");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        nodes.push(node);
    }
    let t0 = Instant::now();
    while nodes.iter().any(|x| x.snapshot().peers.len() < n - 1) {
        assert!(t0.elapsed() < Duration::from_secs(20), "swarm did not converge");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nodes
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
        let a = router::chat(&high[0], mcq(i, None)).await.expect("chat");
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
    let a = router::chat(&high[0], mcq(9, Some(Privacy::Device)))
        .await
        .expect("chat");
    assert_eq!(a.prov.route, "local");
    assert!(a.prov.degraded, "{:?}", a.prov);
    assert!(a.prov.voters.is_empty());
    let low = swarm(0.1, 3).await;
    for i in 0..5 {
        let a = router::chat(&low[0], mcq(i, None)).await.expect("chat");
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
