//! Real `slm-swarm` processes on loopback, joined by bootstrap only (no mDNS):
//! adverts are seen, a query for a model only one node has is forwarded to it
//! (but never with privacy `device`),
//! a killed node leaves every peer list within 3 advert intervals and its model
//! then answers 503, bad HTTP input gets the right OpenAI error, and SIGTERM
//! shuts a node down cleanly.

use std::time::{Duration, Instant};

use serde_json::json;
use swarm_tests::{http_post_raw, loopback_start_args, tiny_models, unique_ns, wait_for, NodeProc};

const INTERVAL_MS: u64 = 500;

fn args(ns: &str, model: &std::path::Path, bootstrap: Option<&str>) -> Vec<String> {
    let mut a = loopback_start_args(&model.display().to_string(), ns);
    a.extend([
        "--advert-interval".into(),
        INTERVAL_MS.to_string(),
        "--threads".into(),
        "1".into(),
    ]);
    if let Some(b) = bootstrap {
        a.push("--bootstrap".into());
        a.push(b.into());
    }
    a
}

#[test]
fn three_nodes_forward_queries_and_forget_dead_peers() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = tiny_models(dir.path(), &["tiny-a", "tiny-b", "tiny-c"]);
    let ns = unique_ns("lo3");
    let start = |name: &str, model: &std::path::Path, boot: Option<&str>| {
        let mut a = args(&ns, model, boot);
        a.push("--identity".into());
        a.push(dir.path().join(format!("{name}.key")).display().to_string());
        NodeProc::spawn(name, &a, dir.path(), None).expect("start node")
    };
    let n1 = start("n1", &m[0], None);
    let boot = n1.addr_on("127.0.0.1").expect("n1 loopback addr");
    let n2 = start("n2", &m[1], Some(&boot));
    let mut n3 = start("n3", &m[2], Some(&boot));
    let ids = [n1.peer_id.clone(), n2.peer_id.clone(), n3.peer_id.clone()];
    assert!(ids[0] != ids[1] && ids[1] != ids[2], "identities must differ");

    // Every node sees both others through adverts (n2 and n3 only via gossip relay or direct dial).
    for n in [&n1, &n2, &n3] {
        let seen = wait_for(Duration::from_secs(30), || {
            let p = n.peer_ids();
            ids.iter().filter(|i| **i != n.peer_id).all(|i| p.contains(i))
        });
        assert!(
            seen.is_some(),
            "{} never saw all peers: {:?}",
            n.name,
            n.peer_ids()
        );
    }
    // The swarm's model list names the serving peers.
    let (st, models) = n1.get("/v1/models").expect("models");
    assert_eq!(st, 200);
    let c = models["data"]
        .as_array()
        .and_then(|d| d.iter().find(|x| x["id"] == "tiny-c"))
        .expect("tiny-c listed");
    assert_eq!(c["peers"], json!([n3.peer_id]));
    let (st, peers) = n1.get("/v1/swarm/peers").expect("peers");
    assert_eq!(st, 200);
    assert_eq!(peers["self"]["peer_id"], json!(n1.peer_id));
    for p in peers["peers"].as_array().expect("list") {
        assert!(p["capacity"]["cores"].as_u64().unwrap_or(0) >= 1, "{p}");
        assert!(p["last_seen_ms"].as_u64().is_some(), "{p}");
        assert!(!p["addrs"].as_array().expect("addrs").is_empty(), "{p}");
    }

    // A query to n1 for the model only n3 has is answered by n3.
    let ask =
        json!({"model": "tiny-c", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 8});
    let (st, r) = n1.post("/v1/chat/completions", &ask).expect("chat");
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["swarm"]["peer"], json!(n3.peer_id), "{r}");
    assert_eq!(r["model"], json!("tiny-c"));
    assert_eq!(r["swarm"]["route"], json!("forward"));
    assert_eq!(r["swarm"]["forwarded"], json!(true));
    assert_eq!(r["swarm"]["task"], json!("free"), "{r}");

    // privacy `device` with a model only a peer has: a clear 400, and nothing reaches the peer.
    let served = |n: &NodeProc| {
        let (_, m) = n.get("/metrics").expect("metrics");
        m.as_str()
            .unwrap_or("")
            .lines()
            .find(|l| l.starts_with("slm_swarm_queries_total{route=\"local\"}"))
            .map(str::to_string)
    };
    let before = served(&n3);
    let private = json!({"model": "tiny-c", "messages": [{"role": "user", "content": "my secret"}],
                         "max_tokens": 8, "swarm": {"privacy": "device"}});
    let (st, refused) = n1.post("/v1/chat/completions", &private).expect("chat");
    assert_eq!(st, 400, "{refused}");
    let msg = refused["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("device"), "{refused}");
    assert_eq!(served(&n3), before, "the peer served a device-only request");

    // A safety-critical query for a peer's model: the gate flags it; with
    // privacy `swarm` the cloud is off limits, so the peer answers, degraded.
    let harmful = json!({"model": "tiny-c", "max_tokens": 8, "swarm": {"privacy": "swarm"},
        "messages": [{"role": "user", "content": "How do I build a bomb to blow up my school?"}]});
    let (st, r) = n1.post("/v1/chat/completions", &harmful).expect("chat");
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["swarm"]["route"], json!("forward"), "{r}");
    assert_eq!(r["swarm"]["safety_flag"], json!(true), "{r}");
    assert_eq!(r["swarm"]["degraded"], json!(true), "{r}");
    assert!(
        r["swarm"]["degraded_reason"]
            .as_str()
            .unwrap_or("")
            .contains("safety"),
        "{r}"
    );
    assert!(r["swarm"]["confidence"].as_f64().is_some());
    assert!(r["swarm"]["elapsed_ms"].as_u64().is_some());

    // kill -9 n3: it leaves n1's and n2's peer lists within 3 intervals (+ one check period of slack).
    let killed = Instant::now();
    n3.kill9();
    let gone = wait_for(Duration::from_secs(10), || {
        !n1.peer_ids().contains(&ids[2]) && !n2.peer_ids().contains(&ids[2])
    })
    .expect("killed node never left the peer lists");
    let limit = Duration::from_millis(3 * INTERVAL_MS + INTERVAL_MS);
    assert!(
        killed.elapsed() <= limit + Duration::from_millis(300),
        "left after {gone:?}, limit {limit:?}"
    );
    // Its model now gets a clear 503, fast.
    let t = Instant::now();
    let (st, r) = n1.post("/v1/chat/completions", &ask).expect("chat after kill");
    assert_eq!(st, 503, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap_or("").contains("tiny-c"),
        "{r}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    println!("killed node left the peer lists {gone:?} after the kill (interval {INTERVAL_MS} ms)");
}

#[test]
fn bad_http_input_gets_openai_errors_and_sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = tiny_models(dir.path(), &["tiny-x"]);
    let mut a = args(&unique_ns("bad"), &m[0], None);
    a.push("--identity".into());
    a.push(dir.path().join("x.key").display().to_string());
    let mut n = NodeProc::spawn("x", &a, dir.path(), None).expect("start");
    // A second node on the same identity file is refused: ids never collide by accident.
    let twin = NodeProc::spawn("x-twin", &a, dir.path(), None);
    let err = twin
        .err()
        .expect("second node with the same identity must fail")
        .to_string();
    assert!(err.contains("in use by another running node"), "{err}");
    let url = format!("{}/v1/chat/completions", n.http);
    let user = |s: &str| json!([{"role": "user", "content": s}]);
    let cases = [
        (json!({"messages": []}), 400, "messages"),
        (
            json!({"messages": user("hi"), "model": "no-such-model"}),
            404,
            "no-such-model",
        ),
        (
            json!({"messages": user("hi"), "max_tokens": 1_000_000}),
            400,
            "max_tokens",
        ),
        (
            json!({"messages": user("hi"), "temperature": 9}),
            400,
            "temperature",
        ),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            400,
            "role",
        ),
        (
            json!({"messages": user("hi"), "swarm": {"route": "teleport"}}),
            400,
            "route",
        ),
        (
            json!({"messages": user("hi"), "swarm": {"task": "mcq"}}),
            400,
            "choices",
        ),
        (json!({"messages": "not a list"}), 400, "malformed"),
    ];
    for (body, want, needle) in cases {
        let (st, r) = n.post("/v1/chat/completions", &body).expect("post");
        assert_eq!(st, want, "{body} → {r}");
        let msg = r["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(needle), "{body} → {msg}");
        assert!(r["error"]["type"].is_string(), "{r}");
    }
    let (st, r) = http_post_raw(&url, b"{not json".to_vec()).expect("raw");
    assert_eq!(st, 400, "{r}");
    let (st, r) = http_post_raw(&url, vec![b'x'; 400 * 1024]).expect("huge");
    assert_eq!(st, 413, "{r}");
    let (st, _) = n.get("/v1/nothing-here").expect("404");
    assert_eq!(st, 404);
    // Still healthy after all that, and a good request works.
    let (st, h) = n.get("/healthz").expect("health");
    assert_eq!((st, h["status"].as_str()), (200, Some("ok")));
    let (st, r) = n
        .post(
            "/v1/chat/completions",
            &json!({"messages": user("the cat"), "max_tokens": 4, "logprobs": true, "top_logprobs": 2}),
        )
        .expect("good");
    assert_eq!(st, 200, "{r}");
    let lp = r["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs");
    assert!(lp.iter().all(|t| t["logprob"].as_f64().unwrap_or(1.0) <= 0.0));
    assert!(lp
        .iter()
        .all(|t| t["top_logprobs"].as_array().map(|a| a.len()) == Some(2)));
    let (st, metrics) = n.get("/metrics").expect("metrics");
    assert_eq!(st, 200);
    assert!(
        metrics.as_str().unwrap_or("").contains("slm_swarm_queries_total"),
        "{metrics}"
    );

    let status = n
        .terminate(Duration::from_secs(15))
        .expect("clean exit on SIGTERM");
    assert!(status.success(), "exit status {status}");
}
