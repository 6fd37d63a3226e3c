//! The chat completions endpoint's body: raw bytes through serde_json (as axum's
//! `Json` extractor does) into `ChatCompletionRequest`, then its validation into
//! the router's request.
//!
//! Properties: no panic; an accepted request stays within the documented limits,
//! and the requests the router then sends to peers (vote, escalate, forward), built
//! as the router builds them, are valid and fit the wire limits, so nothing a user
//! can send makes a node emit messages its peers must refuse.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use swarm_node::api::ChatCompletionRequest;
use swarm_node::config::NodeConfig;
use swarm_node::router::task_of;
use swarm_protocol::{encode_msg, EscalateRequest, QueryRequest, VoteRequest, WireMessage};

fn cfg() -> &'static NodeConfig {
    static CFG: OnceLock<NodeConfig> = OnceLock::new();
    CFG.get_or_init(NodeConfig::default)
}

fn fits<T: WireMessage + std::fmt::Debug>(what: &str, msg: &T) {
    if let Err(e) = msg.validate() {
        panic!("accepted HTTP request gives an invalid {what}: {e}");
    }
    if let Err(e) = encode_msg(msg) {
        panic!("accepted HTTP request gives an unsendable {what}: {e}");
    }
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(body) = serde_json::from_slice::<ChatCompletionRequest>(bytes) else {
        return;
    };
    let cfg = cfg();
    let Ok(req) = body.into_request_with(cfg) else {
        return;
    };
    assert!(!req.messages.is_empty() && req.messages.len() <= swarm_protocol::MAX_MESSAGES);
    let total: usize = req.messages.iter().map(|m| m.content.len()).sum();
    assert!(total <= swarm_protocol::MAX_CONTENT_BYTES);
    assert!((1..=cfg.max_tokens_limit).contains(&req.params.max_tokens));
    assert!((0.0..=swarm_protocol::MAX_TEMPERATURE).contains(&req.params.temperature));

    let task = task_of(&req.messages, req.ext.task.clone());
    assert_eq!(
        task,
        task_of(&req.messages, req.ext.task.clone()),
        "task detection is not deterministic"
    );
    let max_tokens = req.params.max_tokens.clamp(1, swarm_protocol::MAX_TOKENS);
    fits(
        "vote request",
        &VoteRequest {
            id: 1,
            messages: req.messages.clone(),
            task: task.clone(),
            max_tokens,
            deadline_ms: 1_000,
            model: Some("smollm2-135m".into()),
            team: None,
        },
    );
    fits(
        "escalate request",
        &EscalateRequest {
            id: 1,
            messages: req.messages.clone(),
            task,
            max_tokens,
            swarm_answers: Vec::new(),
            deadline_ms: 1_000,
        },
    );
    fits(
        "query request",
        &QueryRequest {
            id: 1,
            model: "smollm2-135m".into(),
            messages: req.messages,
            max_tokens: req.params.max_tokens,
            temperature: req.params.temperature,
            seed: req.params.seed,
            stop: req.params.stop,
            logprobs: req.params.top_logprobs > 0,
            deadline_ms: 1_000,
            task: None,
            team: None,
        },
    );
});
