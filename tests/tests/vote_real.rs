//! Distributed votes among three nodes running three different real models
//! (SmolLM2-135M, Gemma3-270M, Qwen2.5-Coder-0.5B) over QUIC on loopback:
//! ARC-Easy questions with route `vote` list all three voters and their
//! answers; a voter killed during a vote is reported as failed while the vote
//! completes with the others; the CLI's `query --json` shows the provenance.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use swarm_tests::{bin, ensure_models, eval_questions, loopback_start_args, unique_ns, wait_for, NodeProc};

const MODELS: [&str; 3] = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"];

#[test]
fn three_models_vote_and_a_dead_voter_is_dropped() {
    ensure_models(&MODELS);
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("n1.toml");
    std::fs::write(&cfg, "[routing]\nvote_deadline_ms = 8000\nquorum = 2\n").expect("config");
    let ns = unique_ns("vote");
    let mut nodes: Vec<NodeProc> = Vec::new();
    for (i, m) in MODELS.iter().enumerate() {
        let mut a = loopback_start_args(m, &ns);
        a.extend([
            "--advert-interval".into(),
            "500".into(),
            "--identity".into(),
            dir.path().join(format!("v{i}.key")).display().to_string(),
            "--threads".into(),
            "1".into(),
        ]);
        if i == 0 {
            a.push("--config".into());
            a.push(cfg.display().to_string());
        } else {
            a.push("--bootstrap".into());
            a.push(nodes[0].addr_on("127.0.0.1").expect("addr"));
        }
        nodes.push(NodeProc::spawn(&format!("v{i}"), &a, dir.path(), None).expect("start"));
    }
    let ids: Vec<String> = nodes.iter().map(|n| n.peer_id.clone()).collect();
    let ok = wait_for(Duration::from_secs(60), || nodes[0].peer_ids().len() == 2);
    assert!(ok.is_some(), "coordinator never saw both voters");

    for q in eval_questions("arc_easy.jsonl", 3) {
        let choices = q["choices"].clone();
        let labels: Vec<String> = choices
            .as_array()
            .expect("choices")
            .iter()
            .map(|c| c["label"].as_str().unwrap_or("").to_string())
            .collect();
        let body = json!({
            "messages": [{"role": "user", "content": q["question"]}],
            "swarm": {"route": "vote", "task": "mcq", "choices": choices},
        });
        let (st, r) = nodes[0].post("/v1/chat/completions", &body).expect("vote");
        assert_eq!(st, 200, "{r}");
        let s = &r["swarm"];
        assert_eq!(s["route"], json!("vote"), "{s}");
        let voters = s["voters"].as_array().expect("voters");
        assert_eq!(voters.len(), 3, "{s}");
        let models: std::collections::BTreeSet<&str> =
            voters.iter().filter_map(|v| v["model"].as_str()).collect();
        assert_eq!(models, MODELS.iter().copied().collect(), "{s}");
        for v in voters {
            if v["error"].is_null() {
                let ans = v["answer"].as_str().expect("answer");
                assert!(
                    labels.iter().any(|l| ans.starts_with(&format!("{l}."))),
                    "{ans} not one of {labels:?}"
                );
                let c = v["confidence"].as_f64().expect("confidence");
                assert!((0.0..=1.0).contains(&c), "{v}");
            } else {
                // Only an early stop may leave a voter out.
                assert!(v["error"].as_str().unwrap_or("").contains("not needed"), "{v}");
            }
        }
        let content = r["choices"][0]["message"]["content"].as_str().expect("content");
        assert!(
            labels.iter().any(|l| content.starts_with(&format!("{l}."))),
            "{content}"
        );
        let agreement = s["confidence"].as_f64().expect("confidence");
        assert!(agreement > 0.0 && agreement <= 1.0, "{s}");
    }

    // The newcomer's command shows route, confidence and voters.
    let out = Command::new(bin())
        .args([
            "query",
            "--node",
            &nodes[0].http,
            "--json",
            "Which is a mammal? A. shark B. dolphin C. trout D. eel",
        ])
        .output()
        .expect("query");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["swarm"]["task"], json!("mcq"), "{v}");
    assert!(
        v["swarm"]["route"].is_string() && v["swarm"]["confidence"].is_number(),
        "{v}"
    );
    if v["swarm"]["route"] == "vote" {
        assert!(
            v["swarm"]["voters"].as_array().is_some_and(|a| a.len() >= 2),
            "{v}"
        );
    }

    // Kill the Qwen voter while it is generating: the vote completes without it.
    let http = nodes[0].http.clone();
    let req = std::thread::spawn(move || {
        swarm_tests::http_post(
            &format!("{http}/v1/chat/completions"),
            &json!({
                "messages": [{"role": "user", "content": "Write two sentences about the sea."}],
                "max_tokens": 48,
                "swarm": {"route": "vote", "task": "free", "privacy": "swarm"},
            }),
        )
    });
    std::thread::sleep(Duration::from_millis(600));
    nodes[2].kill9();
    let (st, r) = req.join().expect("thread").expect("post");
    assert_eq!(st, 200, "{r}");
    let s = &r["swarm"];
    assert_eq!(s["route"], json!("vote"), "{s}");
    let voters = s["voters"].as_array().expect("voters");
    let dead = voters
        .iter()
        .find(|v| v["peer"] == json!(ids[2]))
        .expect("dead voter listed");
    assert!(
        dead["error"].is_string(),
        "the killed voter must be reported failed: {dead}"
    );
    let alive: Vec<&Value> = voters.iter().filter(|v| v["peer"] != json!(ids[2])).collect();
    assert_eq!(alive.len(), 2, "{s}");
    assert!(
        alive
            .iter()
            .all(|v| v["answer"].is_string() && v["error"].is_null()),
        "{s}"
    );
    assert!(
        !r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "{r}"
    );
}
