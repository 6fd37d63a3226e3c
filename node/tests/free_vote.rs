//! Free-text votes through real nodes (libp2p memory transport) with the real
//! all-MiniLM-L6-v2 embedder (fetched on first use, as real_models.rs does).
//! The generators are stand-ins answering fixed sentences — real small models
//! would not reliably paraphrase each other on cue, and the vote is what is
//! tested here: two paraphrases must outvote one more confident different
//! answer, and without an embedder the node falls back to exact matching.

use std::time::{Duration, Instant};

use swarm_node::config::NodeConfig;
use swarm_node::inference::embedder::DEFAULT_EMBEDDER;
use swarm_node::inference::{
    Backend, ChatMessage, ChoiceRequest, ChoiceResult, FinishReason, GenerateRequest, Generation,
    InferenceError, ModelInfo, Scorer, TextScore, TokenLogprob,
};
use swarm_node::models::{self, Catalog, PullOptions};
use swarm_node::node::Node;
use swarm_node::router::{ChatParams, ChatRequest, SwarmExt};
use swarm_protocol::{RouteOverride, Task};

/// Answers every prompt with one fixed sentence at a fixed confidence.
struct Fixed {
    info: ModelInfo,
    text: String,
    confidence: f32,
}

impl Fixed {
    fn boxed(id: &str, text: &str, confidence: f32) -> Box<dyn Backend> {
        Box::new(Fixed {
            info: ModelInfo {
                id: id.into(),
                arch: "fixed".into(),
                params: 0,
                quant: "none".into(),
                ctx: 4096,
                domains: vec!["test".into()],
                has_chat_template: true,
                scorer: Scorer::Letter,
                path: String::new(),
            },
            text: text.into(),
            confidence,
        })
    }
}

impl Backend for Fixed {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn generate(
        &mut self,
        _req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, InferenceError> {
        if !on_text(&self.text) {
            return Err(InferenceError::Cancelled);
        }
        let lp = self.confidence.ln();
        Ok(Generation {
            text: self.text.clone(),
            tokens: vec![TokenLogprob {
                id: 0,
                text: self.text.clone(),
                logprob: lp,
                top: Vec::new(),
            }],
            prompt_tokens: 8,
            completion_tokens: 1,
            finish_reason: FinishReason::Stop,
            mean_logprob: lp,
            min_prob: self.confidence,
            confidence: self.confidence,
            prefill_ms: 1.0,
            decode_ms: 0.0,
            cached_tokens: 0,
        })
    }

    fn choose(&mut self, _req: &ChoiceRequest) -> Result<ChoiceResult, InferenceError> {
        Err(InferenceError::Unsupported("free text only".into()))
    }

    fn score_text(&mut self, _text: &str) -> Result<TextScore, InferenceError> {
        Err(InferenceError::Unsupported("free text only".into()))
    }
}

const ANSWERS: [(&str, f32); 3] = [
    ("The capital of France is Paris.", 0.5),
    ("Paris is France's capital city.", 0.5),
    ("Lyon is the capital of France.", 0.8),
];

async fn swarm(tag: &str, embedder: &str) -> Vec<Node> {
    let ns = format!("freevote-{tag}-{}", std::process::id());
    let nodes = ANSWERS
        .iter()
        .enumerate()
        .map(|(i, (text, conf))| {
            let mut cfg = NodeConfig {
                name: format!("f{i}"),
                namespace: ns.clone(),
                advert_interval_ms: 200,
                ..NodeConfig::default()
            };
            // Always vote; accept any agreement (this test is about who wins).
            cfg.routing.tau_local = 0.99;
            cfg.routing.tau_vote = 0.0;
            cfg.routing.quorum = 3;
            cfg.routing.embedder = embedder.into();
            (cfg, vec![Fixed::boxed(&format!("fixed-{i}"), text, *conf)])
        })
        .collect();
    Node::start_memory_swarm(nodes, Duration::from_secs(20))
        .await
        .expect("swarm")
}

fn question() -> ChatRequest {
    ChatRequest {
        model: None,
        messages: vec![ChatMessage::new("user", "Which city is the capital of France?")],
        params: ChatParams {
            max_tokens: 16,
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
            top_logprobs: 0,
        },
        ext: SwarmExt {
            route: RouteOverride::Auto,
            task: Some(Task::Free),
            privacy: None,
            min_confidence: None,
            team: None,
        },
        deadline: Instant::now() + Duration::from_secs(60),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paraphrases_win_a_free_text_vote_by_meaning() {
    let cat = Catalog::builtin().expect("catalog");
    let opts = PullOptions {
        progress: false,
        ..PullOptions::default()
    };
    models::ensure(&cat, &models::home_dir(), DEFAULT_EMBEDDER, &opts).expect("embedder available");
    let nodes = swarm("emb", DEFAULT_EMBEDDER).await;
    assert!(
        nodes[0].router.semantic().embedder().await.is_some(),
        "embedder loaded"
    );
    let a = nodes[0].router.chat(question()).await.expect("chat");
    assert_eq!(a.prov.route, "vote", "{:?}", a.prov);
    assert_eq!(
        a.prov.voters.iter().filter(|v| v.answer.is_some()).count(),
        3,
        "{:?}",
        a.prov.voters
    );
    assert!(a.text.contains("Paris"), "paraphrases win: {:?}", a.text);
    let agreement = a.prov.agreement.expect("agreement");
    assert!(
        (agreement - 1.0 / 1.8).abs() < 1e-3,
        "weights 0.5 + 0.5 of 1.8: {agreement}"
    );

    // Without an embedder the node matches exactly: three different answers, the confident one wins.
    let exact = swarm("exact", "").await;
    assert!(exact[0].router.semantic().embedder().await.is_none());
    let a = exact[0].router.chat(question()).await.expect("chat");
    assert_eq!(a.prov.route, "vote", "{:?}", a.prov);
    assert!(a.text.contains("Lyon"), "exact match: {:?}", a.text);
    let agreement = a.prov.agreement.expect("agreement");
    assert!((agreement - 0.8 / 1.8).abs() < 1e-3, "{agreement}");
    for n in nodes.iter().chain(&exact) {
        n.shutdown().await;
    }
}
