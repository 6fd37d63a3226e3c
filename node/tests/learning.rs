//! The swarm learns, end to end with in-process nodes over libp2p's memory
//! transport: an escalated question lands in the escalation log with the
//! cloud's answer (on the asking node and on the gateway) while a
//! `privacy: swarm` one does not; a team's queries reach only that team's
//! peers (each backend counts what it was asked: the request log); a model
//! failing its eval gate is not advertised and a passing one is; a hot swap
//! under a stream of requests loses none. The cloud is a local stand-in (no
//! real endpoint is reachable here); the gate and swap tests load real tiny
//! GGUF models, the routing tests use stand-in models.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use swarm_node::cloud::{CloudClient, CloudConfig};
use swarm_node::config::NodeConfig;
use swarm_node::dataset;
use swarm_node::gate;
use swarm_node::inference::engine::LoadOptions;
use swarm_node::inference::testing::{write_tiny_gguf, FakeBackend, TinySpec};
use swarm_node::inference::{
    Backend, CandleBackend, ChatMessage, ChoiceRequest, ChoiceResult, GenerateRequest, Generation,
    InferenceError, ModelInfo, TextScore,
};
use swarm_node::node::Node;
use swarm_node::router::{ChatParams, ChatRequest, SwarmExt};
use swarm_protocol::{Privacy, RouteOverride, Task};

fn cfg(ns: &str, i: usize) -> NodeConfig {
    swarm_node::node::memory_test_config(&format!("l{i}"), ns)
}

/// A cloud stand-in answering every chat with `text`.
async fn cloud(text: &'static str) -> CloudClient {
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route("/v1/models", get(|| async { axum::Json(json!({"data": []})) }))
        .route(
            "/v1/chat/completions",
            post(move || async move {
                axum::Json(json!({
                    "id": "x", "object": "chat.completion", "model": "stand-in",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let client = CloudClient::new(CloudConfig {
        base_url: format!("http://{addr}/v1"),
        model: "stand-in".into(),
        ..CloudConfig::default()
    })
    .expect("cloud client");
    assert!(client.probe().await, "the stand-in answers the probe");
    client
}

fn ask(text: &str, ext: SwarmExt) -> ChatRequest {
    ChatRequest {
        model: None,
        messages: vec![ChatMessage::new("user", text)],
        params: ChatParams::greedy(16),
        ext: SwarmExt {
            task: Some(Task::Free),
            ..ext
        },
        deadline: Instant::now() + Duration::from_secs(60),
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn records(dir: &std::path::Path) -> Vec<dataset::Record> {
    if !dir.join(dataset::CURRENT).exists() {
        return Vec::new();
    }
    dataset::read_all(dir).expect("read the log")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escalated_question_is_logged_with_the_clouds_answer_a_swarm_one_is_not() {
    let client = cloud("Canberra is the capital of Australia.").await;
    let ns = format!("learn-log-{}", std::process::id());
    let dirs = [
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    ];
    let nodes: Vec<_> = (0..2)
        .map(|i| {
            let mut c = cfg(&ns, i);
            c.dataset.enabled = true;
            c.dataset.dir = dirs[i].path().display().to_string();
            // Team `red` may not use the cloud.
            c.teams.serve = vec!["red".into()];
            let b: Box<dyn Backend> = Box::new(FakeBackend::new(
                &format!("fake-{i}"),
                i as u64,
                Duration::ZERO,
                0.5,
            ));
            (c, vec![b], (i == 0).then(|| client.clone()))
        })
        .collect();
    let nodes = Node::start_memory_swarm_with_cloud(nodes, Duration::from_secs(20))
        .await
        .expect("swarm");
    let g = nodes[0].peer_id.to_string();
    wait_until("node 0 is everyone's gateway", || {
        nodes
            .iter()
            .all(|n| n.snapshot().gateway.as_ref().map(|x| &x.peer) == Some(&g))
    })
    .await;
    let question = "What is the capital of Australia?";
    let a = nodes[1]
        .router
        .chat(ask(
            question,
            SwarmExt {
                route: RouteOverride::Cloud,
                privacy: Some(Privacy::Cloud),
                ..SwarmExt::default()
            },
        ))
        .await
        .expect("answer");
    assert_eq!(a.prov.route, "cloud", "{:?}", a.prov);
    // The asking node logs it with its signals; the gateway logs the peer's escalation.
    let mine = records(dirs[1].path());
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0].messages[0].content, question);
    assert_eq!(mine[0].cloud.text, "Canberra is the capital of Australia.");
    assert_eq!(mine[0].cloud.gateway, g);
    assert_eq!(mine[0].role, "coordinator");
    assert!(!mine[0].swarm.is_empty(), "the swarm's answers are kept");
    let gw = records(dirs[0].path());
    assert_eq!(gw.len(), 1, "{gw:?}");
    assert_eq!(gw[0].role, "gateway");
    assert_eq!(gw[0].origin, nodes[1].peer_id.to_string());
    assert_eq!(gw[0].cloud.text, mine[0].cloud.text);

    // `privacy: swarm` never reaches the cloud, nor the log.
    let b = nodes[1]
        .router
        .chat(ask(
            "What is the capital of Peru?",
            SwarmExt {
                route: RouteOverride::Cloud,
                privacy: Some(Privacy::Swarm),
                ..SwarmExt::default()
            },
        ))
        .await
        .expect("answer");
    assert_ne!(b.prov.route, "cloud", "{:?}", b.prov);
    assert!(b.prov.degraded);
    // Nor does a query of a team whose policy keeps it in the swarm.
    let c = nodes[1]
        .router
        .chat(ask(
            "What is the capital of Chile?",
            SwarmExt {
                route: RouteOverride::Cloud,
                privacy: Some(Privacy::Cloud),
                team: Some("red".into()),
                ..SwarmExt::default()
            },
        ))
        .await
        .expect("answer");
    assert_ne!(c.prov.route, "cloud", "{:?}", c.prov);
    assert_eq!(records(dirs[1].path()).len(), 1);
    assert_eq!(records(dirs[0].path()).len(), 1);
    let s = dataset::stats(dirs[1].path()).expect("stats");
    assert_eq!((s.records, s.by_task.get("free")), (1, Some(&1)));
    println!(
        "dataset stats after the run: {}",
        serde_json::to_string(&s).expect("json")
    );
}

/// A stand-in model that counts every request it serves: the request log.
struct Counting {
    inner: FakeBackend,
    seen: Arc<AtomicUsize>,
}

impl Backend for Counting {
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }

    fn generate(
        &mut self,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, InferenceError> {
        self.seen.fetch_add(1, Ordering::SeqCst);
        self.inner.generate(req, on_text)
    }

    fn choose(&mut self, req: &ChoiceRequest) -> Result<ChoiceResult, InferenceError> {
        self.seen.fetch_add(1, Ordering::SeqCst);
        self.inner.choose(req)
    }

    fn score_text(&mut self, text: &str) -> Result<TextScore, InferenceError> {
        self.inner.score_text(text)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_teams_queries_never_reach_a_peer_of_another_team() {
    let ns = format!("learn-team-{}", std::process::id());
    let teams = ["red", "red", "blue", "blue"];
    let seen: Vec<Arc<AtomicUsize>> = (0..4).map(|_| Arc::default()).collect();
    let nodes: Vec<(NodeConfig, Vec<Box<dyn Backend>>)> = (0..4)
        .map(|i| {
            let mut c = cfg(&ns, i);
            c.teams.serve = vec![teams[i].to_string()];
            c.routing.voters = 3;
            let b: Box<dyn Backend> = Box::new(Counting {
                inner: FakeBackend::new(&format!("fake-{i}"), i as u64, Duration::ZERO, 0.5),
                seen: seen[i].clone(),
            });
            (c, vec![b])
        })
        .collect();
    let nodes = Node::start_memory_swarm(nodes, Duration::from_secs(20))
        .await
        .expect("swarm");
    wait_until("every node sees its three peers with their teams", || {
        nodes.iter().all(|n| {
            n.snapshot()
                .peers
                .iter()
                .filter(|p| !p.advert.teams.is_empty())
                .count()
                == 3
        })
    })
    .await;
    let vote = |team: Option<&str>, q: &str| {
        ask(
            q,
            SwarmExt {
                route: RouteOverride::Vote,
                task: Some(Task::Mcq {
                    choices: ["cat", "dog", "cow", "owl"]
                        .iter()
                        .zip(["A", "B", "C", "D"])
                        .map(|(t, l)| swarm_protocol::Choice {
                            label: l.into(),
                            text: (*t).into(),
                        })
                        .collect(),
                }),
                team: team.map(String::from),
                ..SwarmExt::default()
            },
        )
    };
    for k in 0..4 {
        let a = nodes[0]
            .router
            .chat(vote(Some("red"), &format!("Which animal hoots? ({k})")))
            .await
            .expect("answer");
        let red = [nodes[0].peer_id.to_string(), nodes[1].peer_id.to_string()];
        for v in &a.prov.voters {
            assert!(
                red.contains(&v.peer),
                "a red query reached {}: {:?}",
                v.peer,
                a.prov.voters
            );
        }
    }
    assert!(seen[1].load(Ordering::SeqCst) >= 4, "the red peer voted");
    assert_eq!(seen[2].load(Ordering::SeqCst), 0, "a blue peer saw a red query");
    assert_eq!(seen[3].load(Ordering::SeqCst), 0, "a blue peer saw a red query");
    // The same vote without a team does reach the blue peers: the test could fail.
    for k in 0..4 {
        nodes[0]
            .router
            .chat(vote(None, &format!("Which animal moos? ({k})")))
            .await
            .expect("answer");
    }
    assert!(seen[2].load(Ordering::SeqCst) + seen[3].load(Ordering::SeqCst) > 0);
    // A node refuses a team it does not serve, from its user and from a peer.
    let e = nodes[2]
        .router
        .chat(vote(Some("red"), "Which animal barks?"))
        .await
        .expect_err("blue node, red query");
    assert!(e.to_string().contains("team `red`"), "{e}");
    let before = seen[2].load(Ordering::SeqCst);
    let reply = nodes[2]
        .router
        .serve_vote(
            nodes[0].peer_id,
            swarm_protocol::VoteRequest {
                id: 1,
                messages: vec![swarm_protocol::ChatMessage::new("user", "Which animal barks?")],
                task: Task::Free,
                max_tokens: 8,
                deadline_ms: 5_000,
                model: None,
                team: Some("red".into()),
            },
        )
        .await;
    assert!(matches!(reply, swarm_protocol::VoteReply::Err(_)), "{reply:?}");
    assert_eq!(
        seen[2].load(Ordering::SeqCst),
        before,
        "refused before the model ran"
    );
}

fn tiny(dir: &std::path::Path, name: &str, seed: u64) -> std::path::PathBuf {
    let p = dir.join(format!("{name}.gguf"));
    write_tiny_gguf(
        &p,
        &TinySpec {
            seed,
            ..TinySpec::default()
        },
    )
    .expect("tiny model");
    p
}

fn load(path: &std::path::Path, id: &str) -> CandleBackend {
    CandleBackend::load(
        path,
        LoadOptions {
            id: id.into(),
            domains: Vec::new(),
            scorer: None,
            default_system: None,
        },
    )
    .expect("load tiny model")
}

fn sst2() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/eval/sst2.jsonl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_failing_its_gate_is_not_advertised_and_a_passing_one_is() {
    let dir = tempfile::tempdir().expect("tmp");
    let gates = dir.path().join("gates");
    let (pa, pb) = (tiny(dir.path(), "gated-a", 1), tiny(dir.path(), "gated-b", 2));
    // The operator's key signs; a stranger's signature counts for nothing.
    let operator = libp2p::identity::Keypair::generate_ed25519();
    let stranger = libp2p::identity::Keypair::generate_ed25519();
    let questions = swarm_node::eval::dataset::load(&sst2()).expect("sst2");
    let gate_run = |path: &std::path::Path, id: &str, key: &libp2p::identity::Keypair| {
        let mut be = load(path, id);
        let sha = swarm_node::gate::backend_sha256(&be);
        let version = swarm_node::gate::version_of(&sha);
        let mut recs = gate::evaluate(
            &mut be,
            &questions,
            gate::GateRun {
                file: &sst2(),
                sha256: &sha,
                version: &version,
                min_accuracy: 0.0,
                limit: Some(20),
            },
            || {},
        )
        .expect("gate");
        assert_eq!(recs.len(), 1);
        let mut r = recs.remove(0);
        r.sign(key).expect("sign");
        gate::save(&gates, &r).expect("save");
        r
    };
    let ra = gate_run(&pa, "gated-a", &operator);
    let _rb = gate_run(&pb, "gated-b", &stranger);
    assert_eq!(ra.n, 20);
    assert!(
        ra.accuracy < 1.0,
        "a random model is not perfect: {}",
        ra.accuracy
    );
    let ns = format!("learn-gate-{}", std::process::id());
    let node_cfg = |i: usize, bar: f32| {
        let mut c = cfg(&ns, i);
        c.gate.dir = gates.display().to_string();
        c.gate.signers = vec![operator.public().to_peer_id().to_string()];
        c.gate.min_accuracy = [("label".to_string(), bar)].into();
        c
    };
    let b0: Vec<Box<dyn Backend>> = vec![Box::new(load(&pa, "gated-a")), Box::new(load(&pb, "gated-b"))];
    // Node 1 holds the passing weights to a bar just above their result.
    let b1: Vec<Box<dyn Backend>> = vec![Box::new(load(&pa, "gated-a"))];
    let nodes = Node::start_memory_swarm(
        vec![
            (node_cfg(0, ra.accuracy), b0),
            (node_cfg(1, ra.accuracy + 0.01), b1),
        ],
        Duration::from_secs(20),
    )
    .await
    .expect("swarm");
    wait_until("the nodes see each other", || {
        nodes.iter().all(|n| n.snapshot().peers.len() == 1)
    })
    .await;
    let advertised = |n: &Node| -> Vec<(String, String)> {
        n.snapshot().peers[0]
            .advert
            .models
            .iter()
            .map(|m| (m.id.clone(), m.version.clone()))
            .collect()
    };
    // Node 1 sees node 0's passing model (with its version), not the one a stranger signed.
    assert_eq!(
        advertised(&nodes[1]),
        vec![("gated-a".to_string(), ra.version.clone())]
    );
    // Node 0 sees nothing of node 1: its bar is above the model's result.
    assert!(advertised(&nodes[0]).is_empty(), "{:?}", advertised(&nodes[0]));
    let status = nodes[1].models.status();
    assert!(!status[0].advertised);
    assert!(
        status[0].gate.reason.as_deref().unwrap_or("").contains("below"),
        "{:?}",
        status[0].gate
    );
    let status = nodes[0].models.status();
    let b = status.iter().find(|s| s.id == "gated-b").expect("b");
    assert!(
        !b.advertised && b.gate.reason.as_deref().unwrap_or("").contains("trusted"),
        "{b:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_swap_under_a_stream_of_requests_loses_none() {
    let dir = tempfile::tempdir().expect("tmp");
    let (pa, pb) = (tiny(dir.path(), "swap-a", 3), tiny(dir.path(), "swap-b", 4));
    let ns = format!("learn-swap-{}", std::process::id());
    let mut c = cfg(&ns, 0);
    c.gate.hot_swap = true;
    c.gate.dir = dir.path().join("gates").display().to_string();
    let b: Vec<Box<dyn Backend>> = vec![Box::new(load(&pa, "tiny"))];
    let nodes = Node::start_memory_swarm(vec![(c, b)], Duration::from_secs(20))
        .await
        .expect("node");
    let node = nodes[0].clone();
    let old_version = node.models.version("tiny");
    assert_eq!(old_version.len(), 12);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let app = swarm_node::api::router(node.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let http = reqwest::Client::new();
    let done = Arc::new(AtomicUsize::new(0));
    let swapped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Two clients asking without pause, until six answers came after the swap.
    let clients: Vec<_> = (0..2)
        .map(|k| {
            let (http, url, done, swapped) = (http.clone(), url.clone(), done.clone(), swapped.clone());
            tokio::spawn(async move {
                let mut out: Vec<(u16, Value)> = Vec::new();
                let mut after = 0;
                while after < 3 {
                    let r = http
                        .post(format!("{url}/v1/chat/completions"))
                        .json(&json!({"messages": [{"role": "user", "content": format!("tell me {k} {}", out.len())}],
                                      "max_tokens": 4}))
                        .send()
                        .await
                        .expect("request sent");
                    let status = r.status().as_u16();
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    out.push((status, body));
                    done.fetch_add(1, Ordering::SeqCst);
                    if swapped.load(Ordering::SeqCst) {
                        after += 1;
                    }
                }
                out
            })
        })
        .collect();
    wait_until("some answers before the swap", || {
        done.load(Ordering::SeqCst) >= 4
    })
    .await;
    let r = http
        .post(format!("{url}/v1/swarm/models"))
        .json(&json!({"path": pb, "gate": {"file": sst2(), "min_accuracy": 0.0, "limit": 4}}))
        .send()
        .await
        .expect("swap");
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.expect("json");
    swapped.store(true, Ordering::SeqCst);
    let new_version = body["version"].as_str().expect("version").to_string();
    assert_ne!(new_version, old_version);
    assert_eq!(body["replaced"], json!(old_version));
    assert_eq!(body["records"][0]["n"], json!(4), "{body}");
    let mut versions = std::collections::BTreeSet::new();
    let mut total = 0;
    for c in clients {
        for (status, body) in c.await.expect("client") {
            total += 1;
            assert_eq!(status, 200, "a request failed across the swap: {body}");
            versions.insert(body["swarm"]["model_version"].as_str().unwrap_or("").to_string());
        }
    }
    assert!(
        versions.contains(&old_version) && versions.contains(&new_version),
        "{versions:?}"
    );
    println!("{total} requests across the swap, none lost; versions {versions:?}");
    // The advert and /v1/models name the new version.
    assert_eq!(node.models.cards()[0].version, new_version);
    let (_, models): (u16, Value) = {
        let r = http.get(format!("{url}/v1/models")).send().await.expect("models");
        (r.status().as_u16(), r.json().await.expect("json"))
    };
    assert_eq!(
        models["data"][0]["local"]["version"],
        json!(new_version),
        "{models}"
    );
    // A swap whose gate fails keeps the served version.
    let r = http
        .post(format!("{url}/v1/swarm/models"))
        .json(&json!({"path": pa, "gate": {"file": sst2(), "min_accuracy": 1.0, "limit": 20}}))
        .send()
        .await
        .expect("swap");
    assert_eq!(r.status().as_u16(), 422);
    assert_eq!(node.models.version("tiny"), new_version);
}
