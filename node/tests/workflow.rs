//! `POST /v1/swarm/workflows` end to end: in-process nodes over libp2p's memory
//! transport, the HTTP API on a loopback port. The models are stand-ins that
//! echo their prompt (so a later step's output shows what its prompt held),
//! pick the label or choice their question mentions, and count their calls
//! (so a refused plan can be shown to have run nothing).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use swarm_node::config::NodeConfig;
use swarm_node::inference::{
    Backend, ChoiceRequest, ChoiceResult, FinishReason, GenerateRequest, Generation, InferenceError,
    ModelInfo, Prompt, Scorer, TextScore, TokenLogprob,
};
use swarm_node::node::Node;

/// Confident enough (above the default `tau_local`) that a node answers alone:
/// the provenance then names exactly the node and model that answered.
const CONFIDENCE: f32 = 0.95;

/// Answers "<id> PROMPT"; picks the first option its question mentions.
struct EchoBackend {
    info: ModelInfo,
    calls: Arc<AtomicUsize>,
}

fn echo(id: &str, domain: &str, calls: &Arc<AtomicUsize>) -> Box<dyn Backend> {
    Box::new(EchoBackend {
        info: ModelInfo {
            id: id.into(),
            arch: "echo".into(),
            params: 0,
            quant: "none".into(),
            ctx: 4096,
            domains: vec![domain.into()],
            has_chat_template: true,
            scorer: Scorer::Letter,
            path: String::new(),
        },
        calls: calls.clone(),
    })
}

impl Backend for EchoBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn generate(
        &mut self,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, InferenceError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let prompt = match &req.prompt {
            Prompt::Chat(m) => m.last().map(|m| m.content.clone()).unwrap_or_default(),
            Prompt::Raw(s) => s.clone(),
        };
        let text = format!("<{}> {prompt}", self.info.id);
        if !on_text(&text) {
            return Err(InferenceError::Cancelled);
        }
        Ok(Generation {
            tokens: vec![TokenLogprob {
                id: 0,
                text: text.clone(),
                logprob: CONFIDENCE.ln(),
                top: Vec::new(),
            }],
            text,
            prompt_tokens: prompt.len() / 4 + 1,
            completion_tokens: 1,
            finish_reason: FinishReason::Stop,
            mean_logprob: CONFIDENCE.ln(),
            min_prob: CONFIDENCE,
            confidence: CONFIDENCE,
            prefill_ms: 1.0,
            decode_ms: 1.0,
            cached_tokens: 0,
        })
    }

    fn choose(&mut self, req: &ChoiceRequest) -> Result<ChoiceResult, InferenceError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let q = req.question.to_lowercase();
        let n = req.options.len();
        let index = req
            .options
            .iter()
            .position(|(_, text)| q.contains(&text.to_lowercase()))
            .unwrap_or(0);
        let rest = (1.0 - CONFIDENCE) / (n.max(2) - 1) as f32;
        let probs: Vec<f32> = (0..n)
            .map(|i| if i == index { CONFIDENCE } else { rest })
            .collect();
        Ok(ChoiceResult {
            index,
            label: req.options[index].0.clone(),
            scores: probs.iter().map(|p| p.ln()).collect(),
            confidence: CONFIDENCE,
            margin: CONFIDENCE - rest,
            mean_logprob: CONFIDENCE.ln(),
            min_prob: CONFIDENCE,
            probs,
            scorer: req.scorer,
            prompt_tokens: req.question.len() / 4 + 1,
            elapsed_ms: 1.0,
        })
    }

    fn score_text(&mut self, _text: &str) -> Result<TextScore, InferenceError> {
        Err(InferenceError::Unsupported(
            "the echo model scores no text".into(),
        ))
    }
}

fn cfg(ns: &str, i: usize) -> NodeConfig {
    swarm_node::node::memory_test_config(&format!("w{i}"), ns)
}

/// A swarm of one node per `(model id, domain)`, each model with its call counter.
async fn swarm(tag: &str, models: &[(&str, &str)]) -> (Vec<Node>, Vec<Arc<AtomicUsize>>) {
    let ns = format!("workflow-{tag}-{}", std::process::id());
    let calls: Vec<Arc<AtomicUsize>> = models.iter().map(|_| Arc::default()).collect();
    let nodes = models
        .iter()
        .zip(&calls)
        .enumerate()
        .map(|(i, ((id, domain), c))| (cfg(&ns, i), vec![echo(id, domain, c)]))
        .collect();
    let nodes = Node::start_memory_swarm(nodes, Duration::from_secs(20))
        .await
        .expect("swarm");
    (nodes, calls)
}

/// Serve `node`'s HTTP API on a loopback port; returns the workflow endpoint.
async fn serve(node: &Node) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = swarm_node::api::router(node.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/v1/swarm/workflows")
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .expect("post");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

fn calls(c: &[Arc<AtomicUsize>]) -> Vec<usize> {
    c.iter().map(|c| c.load(Ordering::SeqCst)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_step_workflow_returns_each_steps_provenance() {
    let (nodes, counters) = swarm(
        "three",
        &[("echo-0", "test"), ("echo-1", "test"), ("echo-2", "test")],
    )
    .await;
    let url = serve(&nodes[0]).await;
    let me = nodes[0].peer_id.to_string();
    let body = json!({
        "input": "Invoice 42 from ACME: pay 300 EUR by Friday.",
        "steps": [
            {"name": "extract", "task": "short", "input": "Extract the payer and amount: {{input}}"},
            // The label is in the extracted text only: it is picked only if that text reached the prompt.
            {"name": "classify", "task": "label", "input": "Which kind of document is this? {{ steps.extract }}",
             "labels": ["complaint", "invoice", "spam"]},
            {"name": "summarise", "task": "free",
             "input": "Summarise this {{steps.classify}} in one line: {{steps.extract}}"},
        ],
    });
    let (status, v) = post(&url, &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "swarm.workflow");
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("wf-")), "{v}");
    let steps = v["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 3, "{v}");
    let extract = "<echo-0> Extract the payer and amount: Invoice 42 from ACME: pay 300 EUR by Friday.";
    let outputs = [
        extract.to_string(),
        "invoice".to_string(),
        format!("<echo-0> Summarise this invoice in one line: {extract}"),
    ];
    for (s, (name, task, output)) in steps.iter().zip([
        ("extract", "short", &outputs[0]),
        ("classify", "label", &outputs[1]),
        ("summarise", "free", &outputs[2]),
    ]) {
        assert_eq!(s["name"], name, "{s}");
        assert_eq!(s["task"], task, "{s}");
        assert_eq!(s["output"].as_str(), Some(output.as_str()), "{s}");
        assert_eq!(s["rounds"], 1, "{s}");
        assert_eq!(s["converged"], true, "{s}");
        assert_eq!(s["model"], "echo-0", "{s}");
        let p = &s["provenance"];
        assert_eq!(p["route"], "local", "{name}: {p}");
        assert_eq!(p["peer"], me.as_str(), "{name}: {p}");
        assert_eq!(p["model"], "echo-0", "{name}: {p}");
        assert_eq!(p["task"], task, "{name}: {p}");
        let conf = p["confidence"].as_f64().expect("confidence");
        assert!((conf - f64::from(CONFIDENCE)).abs() < 1e-3, "{name}: {p}");
        for key in ["elapsed_ms", "voters", "degraded", "safety_flag", "forwarded"] {
            assert!(!p[key].is_null(), "{name}: provenance lacks `{key}`: {p}");
        }
    }
    assert_eq!(v["output"], steps[2]["output"]);
    // One query per step, all answered on the node asked (confident: no vote).
    assert_eq!(calls(&counters), vec![3, 0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_step_goes_to_the_peer_whose_model_card_has_it() {
    let (nodes, counters) = swarm(
        "domain",
        &[("echo-0", "test"), ("echo-1", "test"), ("legal-echo", "legal")],
    )
    .await;
    let url = serve(&nodes[0]).await;
    let body = json!({
        "input": "The tenant pays on the first of each month.",
        "steps": [
            {"name": "review", "task": "free", "input": "Review the clause: {{input}}", "domain": "legal"},
            // Domains match case-insensitively; two nodes have `test` at the same
            // (unmeasured) speed, so the node asked answers itself.
            {"name": "plain", "task": "free", "input": "Restate: {{steps.review}}", "domain": "TEST"},
        ],
    });
    let (status, v) = post(&url, &body).await;
    assert_eq!(status, 200, "{v}");
    let review = &v["steps"][0];
    assert_eq!(review["model"], "legal-echo", "{review}");
    assert_eq!(
        review["output"],
        "<legal-echo> Review the clause: The tenant pays on the first of each month."
    );
    let p = &review["provenance"];
    assert_eq!(p["peer"], nodes[2].peer_id.to_string().as_str(), "{p}");
    assert_eq!(p["route"], "forward", "{p}");
    assert_eq!(p["forwarded"], true, "{p}");
    let plain = &v["steps"][1];
    assert_eq!(plain["model"], "echo-0", "{plain}");
    assert_eq!(plain["provenance"]["peer"], nodes[0].peer_id.to_string().as_str());
    assert_eq!(
        plain["output"].as_str(),
        Some(format!("<echo-0> Restate: {}", review["output"].as_str().unwrap_or("?")).as_str())
    );
    assert_eq!(calls(&counters), vec![1, 0, 1]);

    // A constrained step forwarded to the peer is answered there as a label
    // (its options scored), not as free text.
    let body = json!({
        "input": "The tenant rents the flat: it is a lease.",
        "steps": [
            {"name": "kind", "task": "label", "labels": ["sale", "lease"],
             "input": "Classify: {{input}}", "domain": "legal"},
        ],
    });
    let (status, v) = post(&url, &body).await;
    assert_eq!(status, 200, "{v}");
    let kind = &v["steps"][0];
    assert_eq!(kind["output"], "lease", "{kind}");
    assert_eq!(kind["provenance"]["route"], "forward", "{kind}");
    assert_eq!(calls(&counters), vec![1, 0, 2]);

    // A domain nobody serves fails before any step runs, naming the step.
    let body = json!({
        "input": "x",
        "steps": [
            {"name": "first", "task": "free", "input": "{{input}}"},
            {"name": "diagnose", "task": "free", "input": "{{steps.first}}", "domain": "medical"},
        ],
    });
    let (status, v) = post(&url, &body).await;
    assert_eq!(status, 503, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("diagnose") && msg.contains("medical"), "{msg}");
    assert_eq!(calls(&counters), vec![1, 0, 2], "nothing ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_until_that_never_matches_stops_after_max_rounds() {
    let (nodes, counters) = swarm("repeat", &[("echo-0", "test")]).await;
    let url = serve(&nodes[0]).await;
    let body = json!({
        "input": "the plan",
        "steps": [
            // The echo never says APPROVED: three rounds, each seeing the last one's output.
            {"name": "draft", "task": "free", "input": "Improve: {{input}} | before: {{previous}}",
             "repeat_until": "APPROVED", "max_rounds": 3},
            // Met in the first round ("Check" is echoed; case-insensitive).
            {"name": "check", "task": "free", "input": "Check {{steps.draft}}",
             "repeat_until": "CHECK", "max_rounds": 2},
        ],
    });
    let (status, v) = post(&url, &body).await;
    assert_eq!(status, 200, "{v}");
    let draft = &v["steps"][0];
    assert_eq!(draft["rounds"], 3, "{draft}");
    assert_eq!(draft["converged"], false, "{draft}");
    let round1 = "<echo-0> Improve: the plan | before:";
    let round2 = format!("<echo-0> Improve: the plan | before: {round1}");
    let round3 = format!("<echo-0> Improve: the plan | before: {round2}");
    assert_eq!(draft["output"].as_str(), Some(round3.as_str()), "{draft}");
    let check = &v["steps"][1];
    assert_eq!(check["rounds"], 1, "{check}");
    assert_eq!(check["converged"], true, "{check}");
    assert_eq!(calls(&counters), vec![4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_plans_are_refused_before_anything_runs() {
    let (nodes, counters) = swarm("invalid", &[("echo-0", "test")]).await;
    let url = serve(&nodes[0]).await;
    let step = |name: &str, input: &str| json!({"name": name, "task": "free", "input": input});
    let looped = |name: &str, rounds: u32| {
        json!({"name": name, "task": "free", "input": "{{input}} {{previous}}",
               "repeat_until": "done", "max_rounds": rounds})
    };
    let plan = |steps: Vec<Value>| json!({"input": "hello", "steps": steps});
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "unknown step",
            plan(vec![step("a", "{{input}}"), step("b", "see {{steps.x}}")]),
            "step `b`: `{{steps.x}}` names no earlier step",
        ),
        (
            "later step",
            plan(vec![step("a", "{{steps.b}}"), step("b", "{{input}}")]),
            "`{{steps.b}}` names a later step",
        ),
        (
            "nine steps",
            plan((0..9).map(|i| step(&format!("s{i}"), "{{input}}")).collect()),
            "1..=8 steps, this one has 9",
        ),
        ("no steps", plan(vec![]), "this one has 0"),
        (
            "duplicate names",
            plan(vec![step("a", "{{input}}"), step("a", "{{input}}")]),
            "duplicate step name `a`",
        ),
        (
            "max_rounds 6",
            plan(vec![step("a", "{{input}}"), looped("b", 6)]),
            "step `b`: max_rounds must be in 1..=5, got 6",
        ),
        (
            "rounds over the workflow",
            plan((0..4).map(|i| looped(&format!("s{i}"), 5)).collect()),
            "add up to 20, at most 16",
        ),
        (
            "rounds without a loop",
            plan(vec![
                json!({"name": "a", "task": "free", "input": "x", "max_rounds": 2}),
            ]),
            "max_rounds > 1 needs repeat_until",
        ),
        (
            "previous without a loop",
            plan(vec![step("a", "{{previous}}")]),
            "`{{previous}}` needs repeat_until",
        ),
        (
            "unknown placeholder",
            plan(vec![step("a", "{{inptu}}")]),
            "unknown placeholder `{{inptu}}`",
        ),
        (
            "bad name",
            plan(vec![step("a b", "{{input}}")]),
            "steps[0].name `a b`",
        ),
        (
            "unknown task",
            plan(vec![json!({"name": "a", "task": "essay", "input": "x"})]),
            "unknown task `essay`",
        ),
        (
            "label without labels",
            plan(vec![json!({"name": "a", "task": "label", "input": "x"})]),
            "task label needs labels",
        ),
        (
            "mcq with one choice",
            plan(vec![
                json!({"name": "a", "task": "mcq", "input": "x", "choices": ["only"]}),
            ]),
            "choices: 2..=8 of them, got 1",
        ),
        (
            "max_tokens over the limit",
            plan(vec![
                json!({"name": "a", "task": "free", "input": "x", "max_tokens": 1_000_000}),
            ]),
            "max_tokens must be in 1..=",
        ),
        (
            "unknown field",
            plan(vec![
                json!({"name": "a", "task": "free", "input": "x", "temperature": 1}),
            ]),
            "unknown field `temperature`",
        ),
        ("missing steps", json!({"input": "x"}), "missing field `steps`"),
    ];
    for (what, body, expected) in cases {
        let (status, v) = post(&url, &body).await;
        assert_eq!(status, 400, "{what}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{what}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(expected), "{what}: `{msg}` lacks `{expected}`");
    }
    let resp = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 400, "malformed JSON");
    assert_eq!(calls(&counters), vec![0], "a refused plan runs nothing");

    // A step that fails while running fails the workflow, named, with the chat
    // endpoint's status for the same failure (an unknown model: 404).
    let body = plan(vec![
        step("a", "{{input}}"),
        json!({"name": "b", "task": "free", "input": "{{steps.a}}", "model": "nope"}),
    ]);
    let (status, v) = post(&url, &body).await;
    assert_eq!(status, 404, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(msg.starts_with("step `b`: model `nope`"), "{msg}");
    assert_eq!(calls(&counters), vec![1], "step a ran, then b failed");
}
