//! One query path for streaming and non-streaming answers: a local answer whose
//! route cannot change streams its tokens while the model is still generating;
//! a streamed vote ends with the full `swarm` provenance; a cloud answer streams
//! as the cloud sends it, through the gateway's relay. In-process nodes over
//! libp2p's memory transport; the models are stand-ins (the routing, not the
//! model, is under test), one of which holds its generation at a gate the test opens.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use swarm_node::cloud::{CloudClient, CloudConfig};
use swarm_node::config::NodeConfig;
use swarm_node::inference::testing::FakeBackend;
use swarm_node::inference::ChatMessage;
use swarm_node::inference::{
    Backend, ChoiceRequest, ChoiceResult, FinishReason, GenerateRequest, Generation, InferenceError,
    ModelInfo, Scorer, TextScore, TokenLogprob,
};
use swarm_node::node::Node;
use swarm_node::router::{ChatEvent, ChatParams, ChatRequest, SwarmExt};

/// Generates "Hello", then waits for the test to open the gate, then " world".
struct GatedBackend {
    info: ModelInfo,
    gate: Arc<Mutex<mpsc::Receiver<()>>>,
}

impl Backend for GatedBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn generate(
        &mut self,
        _req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, InferenceError> {
        if !on_text("Hello") {
            return Err(InferenceError::Cancelled);
        }
        // Bounded: a router that never streams makes the test fail, not hang.
        let opened = self
            .gate
            .lock()
            .map(|g| g.recv_timeout(Duration::from_secs(20)).is_ok())
            .unwrap_or(false);
        if !opened || !on_text(" world") {
            return Err(InferenceError::Cancelled);
        }
        let lp = 0.5f32.ln();
        let token = |t: &str| TokenLogprob {
            id: 0,
            text: t.to_string(),
            logprob: lp,
            top: Vec::new(),
        };
        Ok(Generation {
            tokens: vec![token("Hello"), token(" world")],
            text: "Hello world".into(),
            prompt_tokens: 3,
            completion_tokens: 2,
            finish_reason: FinishReason::Stop,
            mean_logprob: lp,
            min_prob: 0.5,
            confidence: 0.5,
            prefill_ms: 1.0,
            decode_ms: 1.0,
            cached_tokens: 0,
        })
    }

    fn choose(&mut self, _req: &ChoiceRequest) -> Result<ChoiceResult, InferenceError> {
        Err(InferenceError::BadRequest("text only".into()))
    }

    fn score_text(&mut self, _text: &str) -> Result<TextScore, InferenceError> {
        Err(InferenceError::BadRequest("text only".into()))
    }
}

fn cfg(ns: &str, i: usize) -> NodeConfig {
    swarm_node::node::memory_test_config(&format!("s{i}"), ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_stream_delivers_its_first_token_before_generation_ends() {
    let (open, gate) = mpsc::channel();
    let backend = GatedBackend {
        info: ModelInfo {
            id: "gated".into(),
            arch: "fake".into(),
            params: 0,
            quant: "none".into(),
            ctx: 4096,
            domains: Vec::new(),
            has_chat_template: true,
            scorer: Scorer::Letter,
            path: String::new(),
        },
        gate: Arc::new(Mutex::new(gate)),
    };
    let ns = format!("stream-local-{}", std::process::id());
    let b: Box<dyn Backend> = Box::new(backend);
    let nodes = Node::start_memory_swarm(vec![(cfg(&ns, 0), vec![b])], Duration::from_secs(20))
        .await
        .expect("node");
    // A lone node (no peer, no gateway): the policy answers locally whatever the confidence.
    let req = ChatRequest {
        model: None,
        messages: vec![ChatMessage::new("user", "Write a greeting for the team.")],
        params: ChatParams::greedy(16),
        ext: SwarmExt {
            task: Some(swarm_protocol::Task::Free),
            ..SwarmExt::default()
        },
        deadline: std::time::Instant::now() + Duration::from_secs(60),
    };
    let mut events = nodes[0].router.chat_stream(req);
    let first = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("a first event while the model is held at the gate");
    match first {
        Some(Ok(ChatEvent::Token(t))) => assert_eq!(t, "Hello"),
        other => panic!("expected the first token, got {other:?}"),
    }
    // The model is still generating: it waits for this.
    assert_eq!(nodes[0].models.load(), 1, "generation still running");
    open.send(()).expect("open the gate");
    let mut text = String::from("Hello");
    let mut done = None;
    while let Some(ev) = events.next().await {
        match ev.expect("event") {
            ChatEvent::Token(t) => text.push_str(&t),
            ChatEvent::Done(a) => done = Some(a),
        }
    }
    let a = done.expect("a final answer");
    assert_eq!(text, "Hello world");
    assert_eq!(a.text, "Hello world");
    assert_eq!(a.prov.route, "local");
    assert!(a.prov.degraded, "no peers: the answer says why it stayed local");
    assert_eq!(a.completion_tokens, 2);
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_vote_ends_with_the_full_provenance() {
    let ns = format!("stream-vote-{}", std::process::id());
    let nodes: Vec<(NodeConfig, Vec<Box<dyn Backend>>)> = (0..3)
        .map(|i| {
            let b: Box<dyn Backend> = Box::new(FakeBackend::new(
                &format!("fake-{i}"),
                i as u64,
                Duration::from_millis(5),
                0.6,
            ));
            (cfg(&ns, i), vec![b])
        })
        .collect();
    let nodes = Node::start_memory_swarm(nodes, Duration::from_secs(20))
        .await
        .expect("swarm");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = swarm_node::api::router(nodes[0].clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let body = json!({
        "messages": [{"role": "user", "content": "Which of these is a mammal?"}],
        "stream": true,
        "swarm": {"route": "vote", "task": "mcq", "choices": ["shark", "dolphin", "trout", "eel"]},
    });
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("body");
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk json"))
        .collect();
    let last = chunks.last().expect("a last chunk");
    let swarm = &last["swarm"];
    assert_eq!(swarm["route"], "vote", "{last}");
    assert_eq!(swarm["task"], "mcq");
    assert_eq!(swarm["voters"].as_array().map(Vec::len), Some(3), "{swarm}");
    for key in [
        "agreement",
        "vote_ms",
        "confidence",
        "local_confidence",
        "elapsed_ms",
        "peer",
        "model",
    ] {
        assert!(!swarm[key].is_null(), "provenance lacks `{key}`: {swarm}");
    }
    for key in ["safety_flag", "forwarded", "degraded"] {
        assert!(swarm[key].is_boolean(), "provenance lacks `{key}`: {swarm}");
    }
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    // The decided answer is in the content deltas, and it is one of the options.
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(
        ["A. shark", "B. dolphin", "C. trout", "D. eel"].contains(&content.as_str()),
        "{content}"
    );
}

/// A cloud stand-in (no real endpoint is reachable here): answers the probe,
/// and streams "Paris" at once, then holds the rest of its answer until the
/// test opens `gate` (or 20 s pass), then " is the capital." and `[DONE]`.
async fn gated_cloud(gate: Arc<tokio::sync::Notify>) -> String {
    use axum::body::Body;
    use axum::routing::{get, post};
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        )
    };
    let app = axum::Router::new()
        .route("/v1/models", get(|| async { axum::Json(json!({"data": []})) }))
        .route(
            "/v1/chat/completions",
            post(move || {
                let gate = gate.clone();
                async move {
                    let body = async_stream::stream! {
                        yield Ok::<_, std::io::Error>(chunk(json!({"content": "Paris"}), Value::Null));
                        let _ = tokio::time::timeout(Duration::from_secs(20), gate.notified()).await;
                        yield Ok(chunk(json!({"content": " is the capital."}), Value::Null));
                        yield Ok(chunk(json!({}), json!("stop")));
                        yield Ok("data: [DONE]\n\n".to_string());
                    };
                    axum::response::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(Body::from_stream(body))
                        .expect("response")
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/v1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_answer_streams_as_the_cloud_sends_it() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let url = gated_cloud(gate.clone()).await;
    let client = CloudClient::new(CloudConfig {
        base_url: url,
        model: "stand-in".into(),
        ..CloudConfig::default()
    })
    .expect("cloud client");
    assert!(client.probe().await, "the stand-in answers the probe");
    let ns = format!("stream-cloud-{}", std::process::id());
    let fake = |i: u64| -> Vec<Box<dyn Backend>> {
        vec![Box::new(FakeBackend::new(
            &format!("fake-{i}"),
            i,
            Duration::from_millis(5),
            0.6,
        ))]
    };
    let nodes = Node::start_memory_swarm_with_cloud(
        vec![(cfg(&ns, 0), fake(0), Some(client)), (cfg(&ns, 1), fake(1), None)],
        Duration::from_secs(20),
    )
    .await
    .expect("swarm");
    let g = nodes[0].peer_id.to_string();
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while !nodes
        .iter()
        .all(|n| n.snapshot().gateway.as_ref().map(|x| &x.peer) == Some(&g))
    {
        assert!(
            std::time::Instant::now() < until,
            "node 0 never became everyone's gateway"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // From the gateway itself (its own cloud stream), then from a peer (the
    // gateway relays the cloud's pieces over `/escalate-stream`).
    for (who, node) in [("the gateway", &nodes[0]), ("a peer", &nodes[1])] {
        let req = ChatRequest {
            model: None,
            messages: vec![ChatMessage::new("user", "Tell me about the capital of France.")],
            params: ChatParams::greedy(32),
            ext: SwarmExt {
                route: swarm_protocol::RouteOverride::Cloud,
                task: Some(swarm_protocol::Task::Free),
                ..SwarmExt::default()
            },
            deadline: std::time::Instant::now() + Duration::from_secs(60),
        };
        let mut events = node.router.chat_stream(req);
        // The cloud holds the rest of its answer until this first piece arrives.
        let first = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap_or_else(|_| panic!("{who}: no piece while the cloud was still answering"));
        match first {
            Some(Ok(ChatEvent::Token(t))) => assert_eq!(t, "Paris", "{who}"),
            other => panic!("{who}: expected the cloud's first piece, got {other:?}"),
        }
        gate.notify_one();
        let mut text = String::from("Paris");
        let mut done = None;
        while let Some(ev) = events.next().await {
            match ev.unwrap_or_else(|e| panic!("{who}: {e}")) {
                ChatEvent::Token(t) => text.push_str(&t),
                ChatEvent::Done(a) => done = Some(a),
            }
        }
        let a = done.unwrap_or_else(|| panic!("{who}: no final answer"));
        assert_eq!(text, "Paris is the capital.", "{who}");
        assert_eq!(a.text, "Paris is the capital.", "{who}");
        assert_eq!(a.prov.route, "cloud", "{who}");
        assert_eq!(a.prov.gateway.as_deref(), Some(g.as_str()), "{who}");
        assert!(!a.prov.degraded, "{who}");
    }
}
