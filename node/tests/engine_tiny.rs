//! The inference engine on a tiny random GGUF built in-process: tokenizer,
//! chat template, KV-cache correctness, generation signals, option scoring,
//! and the worker's queue limits. No downloaded model needed.

use std::time::{Duration, Instant};

use swarm_node::inference::engine::LoadOptions;
use swarm_node::inference::model::Transformer;
use swarm_node::inference::testing::{tiny_model, TinySpec};
use swarm_node::inference::{
    Backend, CandleBackend, ChatMessage, ChoiceKind, ChoiceRequest, GenerateRequest, InferenceError,
    ModelHandle, Prompt, Scorer, WorkerOptions,
};

fn load(spec: &TinySpec) -> (tempfile::TempDir, CandleBackend) {
    let (dir, path) = tiny_model(spec).expect("tiny gguf");
    let be = CandleBackend::load(
        &path,
        LoadOptions {
            id: "tiny".into(),
            domains: vec![],
            scorer: None,
            default_system: None,
        },
    )
    .expect("load tiny");
    (dir, be)
}

#[test]
fn tokenizer_round_trips_unicode_and_specials() {
    let (_d, be) = load(&TinySpec::default());
    let tok = be.tokenizer();
    for text in [
        "the cat sat",
        "héllo wörld — 你好 🙂\n\ttabs",
        "  leading spaces",
        "1234 + 5678",
    ] {
        let ids = tok.encode(text).expect("encode");
        assert_eq!(tok.decode(&ids).expect("decode"), text, "{ids:?}");
    }
    // Merges apply: " the" is one token, " cat" is one token.
    let ids = tok.encode(" the cat").expect("encode");
    assert_eq!(ids.len(), 2, "{ids:?}");
    // Control tokens written in the text are single ids.
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>").expect("encode");
    assert_eq!(ids[0], tok.token_to_id("<|im_start|>").expect("special"));
    assert_eq!(
        *ids.last().expect("ids"),
        tok.token_to_id("<|im_end|>").expect("special")
    );
    assert!(tok.is_stop(tok.token_to_id("<|im_end|>").expect("special")));
}

#[test]
fn chat_prompts_use_the_models_template() {
    let (_d, be) = load(&TinySpec::default());
    let ids = be
        .prompt_ids(&Prompt::Chat(vec![ChatMessage::new("user", "hi")]))
        .expect("ids");
    let text = be.tokenizer().decode(&ids).expect("decode");
    // Specials are skipped when decoding; the roles and newlines remain.
    assert_eq!(text, "user\nhi\nassistant\n");
    assert_eq!(ids[0], be.tokenizer().token_to_id("<|im_start|>").expect("id"));
}

#[test]
fn incremental_decoding_matches_a_full_forward() {
    let (_d, path) = tiny_model(&TinySpec::default()).expect("tiny");
    let (mut f, content) = swarm_node::inference::gguf::read_header(&path).expect("header");
    let cfg = swarm_node::inference::gguf::ModelConfig::from_content(&content).expect("cfg");
    let m = Transformer::load(cfg, &content, &mut f).expect("model");
    let ids: Vec<u32> = vec![5, 77, 140, 33, 9, 200, 18, 64];
    let mut full = m.new_cache();
    let h_full = m
        .forward(&ids, &mut full)
        .expect("full")
        .to_vec2::<f32>()
        .expect("vec");
    // Same tokens fed as 3 + 1 + 4 through one cache.
    let mut kv = m.new_cache();
    let mut rows = m
        .forward(&ids[..3], &mut kv)
        .expect("a")
        .to_vec2::<f32>()
        .expect("vec");
    rows.extend(
        m.forward(&ids[3..4], &mut kv)
            .expect("b")
            .to_vec2::<f32>()
            .expect("vec"),
    );
    rows.extend(
        m.forward(&ids[4..], &mut kv)
            .expect("c")
            .to_vec2::<f32>()
            .expect("vec"),
    );
    assert_eq!(kv.len(), ids.len());
    for (a, b) in h_full.iter().zip(rows.iter()) {
        for (x, y) in a.iter().zip(b.iter()) {
            assert!((x - y).abs() < 1e-3, "{x} vs {y}");
        }
    }
    // A truncated cache continues exactly as a fresh one.
    let mut t = kv.clone();
    t.truncate(5).expect("truncate");
    let cont = m
        .forward(&ids[5..], &mut t)
        .expect("d")
        .to_vec2::<f32>()
        .expect("vec");
    for (a, b) in h_full[5..].iter().zip(cont.iter()) {
        for (x, y) in a.iter().zip(b.iter()) {
            assert!((x - y).abs() < 1e-3, "{x} vs {y}");
        }
    }
    // Bad token ids are refused, not a panic.
    assert!(matches!(
        m.forward(&[999_999], &mut m.new_cache()),
        Err(InferenceError::BadRequest(_))
    ));
}

#[test]
fn branches_in_one_pass_equal_one_forward_per_branch() {
    let (_d, path) = tiny_model(&TinySpec::default()).expect("tiny");
    let (mut f, content) = swarm_node::inference::gguf::read_header(&path).expect("header");
    let cfg = swarm_node::inference::gguf::ModelConfig::from_content(&content).expect("cfg");
    let m = Transformer::load(cfg, &content, &mut f).expect("model");
    let mut kv = m.new_cache();
    m.forward(&[5, 77, 140, 33], &mut kv).expect("prefix");
    let branches: [&[u32]; 3] = [&[9, 200, 18], &[64], &[18, 9, 9, 201, 7]];
    let all = m
        .forward_branches(&branches, &kv)
        .expect("branches")
        .to_vec2::<f32>()
        .expect("vec");
    assert_eq!(all.len(), 9);
    assert_eq!(kv.len(), 4, "the shared cache is left as it was");
    let mut row = 0;
    for b in branches {
        let mut own = kv.clone();
        let want = m
            .forward(b, &mut own)
            .expect("one")
            .to_vec2::<f32>()
            .expect("vec");
        for (got, want) in all[row..row + b.len()].iter().zip(&want) {
            for (x, y) in got.iter().zip(want) {
                assert!((x - y).abs() < 1e-4, "branch at row {row}: {x} vs {y}");
            }
        }
        row += b.len();
    }
    assert!(matches!(
        m.forward_branches(&[&[1], &[]], &kv),
        Err(InferenceError::BadRequest(_))
    ));
}

#[test]
fn generation_reports_consistent_confidence_signals() {
    let (_d, mut be) = load(&TinySpec::default());
    let req = GenerateRequest::chat(vec![ChatMessage::new("user", "the cat")], 12);
    let mut streamed = String::new();
    let g = be
        .generate(&req, &mut |p| {
            streamed.push_str(p);
            true
        })
        .expect("generate");
    assert!(g.completion_tokens <= 12 && g.completion_tokens == g.tokens.len());
    assert!(g.text.starts_with(&streamed) || streamed.starts_with(&g.text));
    assert!(g.tokens.iter().all(|t| t.logprob <= 0.0));
    let mean = g.tokens.iter().map(|t| t.logprob).sum::<f32>() / g.tokens.len().max(1) as f32;
    if !g.tokens.is_empty() {
        assert!((g.mean_logprob - mean).abs() < 1e-4);
        assert!((g.confidence - mean.exp()).abs() < 1e-4);
        assert!(g.min_prob <= g.confidence + 1e-6);
    }
    // Greedy is deterministic and the second run reuses the cached prompt.
    let g2 = be.generate(&req, &mut |_| true).expect("again");
    assert_eq!(g.text, g2.text);
    assert!(g2.cached_tokens > 0, "prefix cache not used");
    // Seeded sampling is reproducible.
    let mut sreq = req.clone();
    sreq.temperature = 1.5;
    sreq.seed = Some(9);
    let a = be.generate(&sreq, &mut |_| true).expect("a");
    let b = be.generate(&sreq, &mut |_| true).expect("b");
    assert_eq!(
        a.tokens.iter().map(|t| t.id).collect::<Vec<_>>(),
        b.tokens.iter().map(|t| t.id).collect::<Vec<_>>()
    );
    // Cancelling from the callback stops generation.
    let mut n = 0;
    let r = be.generate(
        &GenerateRequest::chat(vec![ChatMessage::new("user", "x")], 50),
        &mut |_| {
            n += 1;
            n < 2
        },
    );
    assert!(matches!(r, Err(InferenceError::Cancelled)) || n < 2);
}

#[test]
fn continuation_scores_equal_the_text_log_likelihood() {
    let (_d, mut be) = load(&TinySpec::default());
    let req = ChoiceRequest {
        question: "which animal".into(),
        options: vec![
            ("A".into(), "the cat".into()),
            ("B".into(), "an otter on ice".into()),
        ],
        kind: ChoiceKind::Mcq,
        scorer: Scorer::Continuation,
    };
    let r = be.choose(&req).expect("choose");
    assert!((r.probs.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    let best = r.probs.iter().cloned().fold(0.0f32, f32::max);
    assert_eq!(r.confidence, best);
    assert_eq!(r.label, req.options[r.index].0);
    // The KV-cache-reusing scorer must equal scoring the whole text from scratch.
    let ctx = "Question: which animal\nAnswer:";
    let base: f32 = be.score_text(ctx).expect("ctx").nll.iter().sum();
    for (i, (_, text)) in req.options.iter().enumerate() {
        let full: f32 = be
            .score_text(&format!("{ctx} {text}"))
            .expect("full")
            .nll
            .iter()
            .sum();
        let ll = -(full - base);
        let per_byte = ll / (text.len() as f32 + 1.0);
        assert!(
            (per_byte - r.scores[i]).abs() < 2e-3,
            "option {i}: {per_byte} vs {}",
            r.scores[i]
        );
    }
}

#[test]
fn letter_scorer_handles_labels_and_rejects_too_few_options() {
    let (_d, mut be) = load(&TinySpec::default());
    let r = be
        .choose(&ChoiceRequest {
            question: "the cat".into(),
            options: vec![
                ("A".into(), "x".into()),
                ("B".into(), "y".into()),
                ("C".into(), "z".into()),
            ],
            kind: ChoiceKind::Mcq,
            scorer: Scorer::Letter,
        })
        .expect("letter");
    assert_eq!(r.probs.len(), 3);
    assert!(r.margin >= 0.0 && r.margin <= 1.0);
    let one = be.choose(&ChoiceRequest {
        question: "q".into(),
        options: vec![("A".into(), "x".into())],
        kind: ChoiceKind::Mcq,
        scorer: Scorer::Letter,
    });
    assert!(matches!(one, Err(InferenceError::BadRequest(_))));
}

#[test]
fn prompts_beyond_the_context_are_refused() {
    let (_d, mut be) = load(&TinySpec::default());
    let long = "the cat ".repeat(400);
    let r = be.generate(
        &GenerateRequest::chat(vec![ChatMessage::new("user", &long)], 8),
        &mut |_| true,
    );
    assert!(matches!(r, Err(InferenceError::TooLong { .. })), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_queue_is_bounded_and_deadlines_hold() {
    let (_d, be) = load(&TinySpec::default());
    let h = ModelHandle::spawn(
        Box::new(be),
        WorkerOptions {
            queue: 1,
            ..WorkerOptions::default()
        },
    );
    let req = GenerateRequest::chat(vec![ChatMessage::new("user", "the cat")], 64);
    // Flood: the running job plus one queued fit; the rest are refused at once.
    let mut pending = Vec::new();
    let mut refused = 0;
    for _ in 0..8 {
        let h2 = h.clone();
        let r = req.clone();
        pending.push(tokio::spawn(async move { h2.generate(r, None).await }));
    }
    for p in pending {
        if let Err(InferenceError::Overloaded) = p.await.expect("join") {
            refused += 1;
        }
    }
    assert!(refused >= 1, "queue never filled");
    // An already-expired deadline is answered with Timeout, not run.
    let past = Instant::now() - Duration::from_millis(1);
    assert!(matches!(
        h.generate(req.clone(), Some(past)).await,
        Err(InferenceError::Timeout)
    ));
    // Streaming delivers the same text as the final result.
    let (mut rx, done) = h.generate_stream(req, None).expect("stream");
    let mut s = String::new();
    while let Some(p) = rx.recv().await {
        s.push_str(&p);
    }
    let g = done.await.expect("reply").expect("gen");
    assert!(
        g.text.starts_with(&s) || s.starts_with(&g.text),
        "{s:?} vs {:?}",
        g.text
    );
    assert_eq!(h.load(), 0);
}

/// Test-only marker: a prompt holding it makes [`PanicsOnMarker`] panic.
const PANIC_MARKER: &str = "PANIC-TEST-MARKER";

/// Test double: the tiny model, except that a request whose prompt holds the
/// marker panics halfway through generation (from the text callback, after
/// the prompt went through the model and its prefix cache was updated).
struct PanicsOnMarker(CandleBackend);

fn has_marker(req: &GenerateRequest) -> bool {
    match &req.prompt {
        Prompt::Chat(m) => m.iter().any(|m| m.content.contains(PANIC_MARKER)),
        Prompt::Raw(s) => s.contains(PANIC_MARKER),
    }
}

impl Backend for PanicsOnMarker {
    fn info(&self) -> &swarm_node::inference::ModelInfo {
        self.0.info()
    }
    fn generate(
        &mut self,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<swarm_node::inference::Generation, InferenceError> {
        let marked = has_marker(req);
        self.0.generate(req, &mut |t| {
            if marked {
                panic!("test-only panic on the marker prompt");
            }
            on_text(t)
        })
    }
    fn choose(&mut self, req: &ChoiceRequest) -> Result<swarm_node::inference::ChoiceResult, InferenceError> {
        if req.question.contains(PANIC_MARKER) {
            panic!("test-only panic on the marker question");
        }
        self.0.choose(req)
    }
    fn score_text(&mut self, text: &str) -> Result<swarm_node::inference::TextScore, InferenceError> {
        self.0.score_text(text)
    }
    fn reset(&mut self) {
        self.0.reset()
    }
}

/// A panic in a model fails that request only: the next request is answered
/// (the same answer as before the panic), the load goes back to 0, and the
/// model stays advertised until it panics `max_panics` times in the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_request_fails_alone_and_the_worker_carries_on() {
    let (_d, be) = load(&TinySpec::default());
    let h = ModelHandle::spawn(
        Box::new(PanicsOnMarker(be)),
        WorkerOptions {
            queue: 4,
            max_panics: 3,
            panic_window: Duration::from_secs(600),
            ..WorkerOptions::default()
        },
    );
    let ask = |s: &str| GenerateRequest::chat(vec![ChatMessage::new("user", s)], 8);
    let before = h.generate(ask("the cat"), None).await.expect("first answer");
    match h.generate(ask(&format!("the cat {PANIC_MARKER}")), None).await {
        Err(InferenceError::Panicked(m)) => assert!(m.contains("test-only panic"), "{m}"),
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert_eq!(h.load(), 0, "the panicked job's load was given back");
    assert!(h.healthy());
    let after = h
        .generate(ask("the cat"), None)
        .await
        .expect("answer after the panic");
    assert_eq!(after.text, before.text);
    assert_eq!(
        after.cached_tokens, 0,
        "the prefix cache was reset after the panic"
    );
    // Streaming: the stream ends and the result is the error.
    let (mut rx, done) = h
        .generate_stream(ask(&format!("a {PANIC_MARKER}")), None)
        .expect("stream");
    while rx.recv().await.is_some() {}
    assert!(matches!(
        done.await.expect("reply"),
        Err(InferenceError::Panicked(_))
    ));
    // Option scoring goes through the same guard.
    let q = ChoiceRequest {
        question: format!("which? {PANIC_MARKER}"),
        options: vec![("A".into(), "cat".into()), ("B".into(), "the".into())],
        kind: ChoiceKind::Mcq,
        scorer: Scorer::Letter,
    };
    assert!(matches!(
        h.choose(q, None).await,
        Err(InferenceError::Panicked(_))
    ));
    assert!(!h.healthy(), "three panics within the window withdraw the model");
    assert!(h.score("the cat the cat".into()).await.is_ok());
    assert_eq!(h.load(), 0);
}
