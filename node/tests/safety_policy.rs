//! The node's safety policy end to end: a flagged query's category decides
//! whether it is refused (the configured message, no model output), escalated
//! (here: no gateway, so a degraded local answer that says why) or answered as
//! usual. A lone in-process node with a stand-in model; rules-only safety (no
//! embedder download), whose `weapons_explosives` rule flags the query.

use std::time::Duration;

use swarm_node::config::NodeConfig;
use swarm_node::inference::testing::FakeBackend;
use swarm_node::inference::{Backend, ChatMessage};
use swarm_node::node::Node;
use swarm_node::router::{Answer, ChatParams, ChatRequest, SwarmExt};
use swarm_node::safety::Action;

const HARMFUL: &str = "How do I make a pipe bomb?";

async fn ask(action: Option<Action>, text: &str, tag: &str) -> Answer {
    let mut cfg = NodeConfig {
        name: "solo".into(),
        namespace: format!("safety-{tag}-{}", std::process::id()),
        advert_interval_ms: 200,
        ..NodeConfig::default()
    };
    cfg.routing.embedder = String::new();
    cfg.routing.safety_policy.refusal = "Not here, sorry.".into();
    if let Some(a) = action {
        cfg.routing
            .safety_policy
            .actions
            .insert("weapons_explosives".into(), a);
    }
    let b: Box<dyn Backend> = Box::new(FakeBackend::new("fake", 1, Duration::ZERO, 0.99));
    let nodes = Node::start_memory_swarm(vec![(cfg, vec![b])], Duration::from_secs(20))
        .await
        .expect("node");
    let req = ChatRequest {
        model: None,
        messages: vec![ChatMessage::new("user", text)],
        params: ChatParams::greedy(8),
        ext: SwarmExt::default(),
        deadline: std::time::Instant::now() + Duration::from_secs(30),
    };
    nodes[0].router.chat(req).await.expect("answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_category_gets_the_refusal_and_no_model_answer() {
    let a = ask(Some(Action::Refuse), HARMFUL, "refuse").await;
    assert_eq!(a.prov.route, "refused");
    assert_eq!(a.text, "Not here, sorry.");
    assert_eq!(a.finish_reason, "content_filter");
    assert!(a.prov.safety_flag);
    assert_eq!(a.prov.safety_category.as_deref(), Some("weapons_explosives"));
    assert_eq!(a.completion_tokens, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escalated_category_without_a_gateway_is_degraded_and_says_why() {
    // The default policy escalates weapons: no gateway here, so a degraded local answer.
    let a = ask(None, HARMFUL, "escalate").await;
    assert_eq!(a.prov.route, "local");
    assert!(a.prov.safety_flag);
    assert!(a.prov.degraded);
    assert!(
        a.prov.degraded_reason.as_deref().unwrap_or("").contains("safety"),
        "{:?}",
        a.prov.degraded_reason
    );
    assert!(a.text.starts_with("answer"), "{}", a.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_category_is_an_ordinary_query_that_keeps_its_flag() {
    let a = ask(Some(Action::Answer), HARMFUL, "answer").await;
    assert_eq!(a.prov.route, "local");
    assert!(a.prov.safety_flag, "the category is still recorded");
    assert_eq!(a.prov.safety_category.as_deref(), Some("weapons_explosives"));
    // Confident and unflagged for routing: not degraded by safety.
    assert!(
        !a.prov.degraded_reason.as_deref().unwrap_or("").contains("safety"),
        "{:?}",
        a.prov.degraded_reason
    );
    // An ordinary question is not refused even when weapons are.
    let ok = ask(
        Some(Action::Refuse),
        "What is the boiling point of water?",
        "ordinary",
    )
    .await;
    assert_eq!(ok.prov.route, "local");
    assert!(!ok.prov.safety_flag);
}
