//! `slm-swarm eval` against live processes on loopback: a two-node swarm with a
//! gateway and a key-checking cloud stand-in. The questions are spread over
//! both nodes (`--node` twice); the report's route mix and cloud share must
//! agree with the per-question cache and with the requests the stand-in
//! actually received; a second run resumes from the cache without asking
//! again. `--cloud-prompt` measures the stand-in as the swarm's cloud, with
//! the key, and fails clearly without it.
//!
//! Tiny random models: answer quality is not under test here, only that the
//! evaluation counts what really happened.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use swarm_tests::{bin, http_get, loopback_start_args, tiny_models, unique_ns, wait_for, NodeProc};

const KEY_ENV: &str = "SLM_SWARM_TEST_EVAL_KEY";

fn chat_posts(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["method"] == "POST" && r["path"] == "/v1/chat/completions" && r["auth"] == "valid")
        .count()
}

fn cache_lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Run `slm-swarm eval` with `args`; (success, stdout, stderr).
fn eval(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut c = Command::new(bin());
    c.arg("eval").args(args).env_remove(KEY_ENV);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run slm-swarm eval");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The report's route counts, checked against its own n and cloud share.
fn checked_routes(rep: &Value, n: usize) -> std::collections::BTreeMap<String, usize> {
    assert_eq!(rep["n"].as_u64(), Some(n as u64), "report: {rep}");
    let mix: std::collections::BTreeMap<String, usize> = rep["route_mix"]
        .as_object()
        .expect("route_mix")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("count") as usize))
        .collect();
    assert_eq!(
        mix.values().sum::<usize>(),
        n,
        "route_mix must cover every question: {rep}"
    );
    let cloud = mix.get("cloud").copied().unwrap_or(0);
    let share = rep["cloud_share"].as_f64().expect("cloud_share");
    assert!(
        (share - cloud as f64 / n as f64).abs() < 1e-9,
        "cloud_share {share} vs {cloud}/{n}"
    );
    let acc = rep["accuracy"].as_f64().expect("accuracy");
    assert!((0.0..=1.0).contains(&acc));
    for route in mix.keys() {
        let l = &rep["latency_ms"][route];
        let (p50, p95) = (l["p50"].as_f64(), l["p95"].as_f64());
        assert!(
            matches!((p50, p95), (Some(a), Some(b)) if a > 0.0 && b >= a),
            "latency of route {route}: {l}"
        );
    }
    mix
}

#[test]
fn eval_counts_routes_against_a_live_swarm_and_measures_the_cloud() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let m = tiny_models(d, &["tiny-a", "tiny-b", "tiny-cloud"]);
    let ns = unique_ns("eval");
    let key = format!("sk-eval-{}", std::process::id());
    let req_log = d.join("requests.jsonl");
    let stand_in_args: Vec<String> = [
        "serve",
        "--model",
        &m[2].display().to_string(),
        "--http",
        "127.0.0.1:0",
        "--name",
        "cloud-stand-in",
        "--api-key-env",
        KEY_ENV,
        "--request-log",
        &req_log.display().to_string(),
        "--threads",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let stand_in =
        NodeProc::spawn_env("stand-in", &stand_in_args, d, None, &[(KEY_ENV, &key)]).expect("stand-in");
    let (st, _) = http_get(&format!("{}/v1/models", stand_in.http)).expect("stand-in answers");
    assert_eq!(st, 401, "the stand-in must require the key");

    // Thresholds of 1.0: a tiny model is never sure, so questions go past the vote
    // to the cloud; the route mix is whatever really happened, checked below.
    let routing = "[routing]\ntau_local = 1.0\ntau_vote = 1.0\nsafety = false\nembedder = \"\"\n";
    let node = |name: &str, model: &Path, boot: Option<&str>, cloud: bool| -> NodeProc {
        let cfg = d.join(format!("{name}.toml"));
        std::fs::write(&cfg, routing).expect("config");
        let mut a = loopback_start_args(&model.display().to_string(), &ns);
        a.extend(
            [
                "--name",
                name,
                "--advert-interval",
                "500",
                "--threads",
                "1",
                "--config",
                &cfg.display().to_string(),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        if let Some(b) = boot {
            a.extend(["--bootstrap".into(), b.to_string()]);
        }
        let mut env = vec![];
        if cloud {
            a.extend([
                "--cloud-url".into(),
                format!("{}/v1", stand_in.http),
                "--cloud-model".into(),
                "tiny-cloud".into(),
                "--cloud-key-env".into(),
                KEY_ENV.into(),
            ]);
            env.push((KEY_ENV, key.as_str()));
        }
        NodeProc::spawn_env(name, &a, d, None, &env).expect("node")
    };
    let a = node("a", &m[0], None, true);
    let boot = a.addr_on("127.0.0.1").expect("a's address");
    let b = node("b", &m[1], Some(&boot), false);
    let ready = wait_for(Duration::from_secs(30), || {
        [&a, &b]
            .iter()
            .all(|n| matches!(n.get("/v1/swarm/gateway"), Ok((200, v)) if v["peer_id"] == a.peer_id.as_str()))
    });
    assert!(ready.is_some(), "the swarm never agreed on gateway a");

    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/eval/arc_easy.jsonl");
    let file = file.display().to_string();
    let cache = d.join("swarm.jsonl");
    let cache_s = cache.display().to_string();
    let before = chat_posts(&req_log);
    let args = [
        "--node", &a.http, "--node", &b.http, "--file", &file, "--limit", "6", "--cache", &cache_s, "--json",
    ];
    let (ok, out, err) = eval(&args, &[]);
    assert!(ok, "eval failed: {err}");
    let rep: Value = serde_json::from_str(&out).expect("eval --json");
    let mix = checked_routes(&rep, 6);
    let lines = cache_lines(&cache);
    assert_eq!(lines.len(), 6, "one cache line per question");
    // Round-robin: each node coordinated half of the questions.
    for (i, l) in lines.iter().enumerate() {
        let want = if i % 2 == 0 { &a.http } else { &b.http };
        assert_eq!(l["source"], format!("node:{want}"), "line {i}: {l}");
    }
    let cloud_lines = lines.iter().filter(|l| l["route"] == "cloud").count();
    assert_eq!(mix.get("cloud").copied().unwrap_or(0), cloud_lines);
    assert!(
        cloud_lines > 0,
        "with thresholds of 1.0 some question must reach the cloud: {mix:?}"
    );
    assert_eq!(
        chat_posts(&req_log) - before,
        cloud_lines,
        "the stand-in must have received exactly the escalated questions"
    );

    // A second run resumes from the cache: same report, no new requests.
    let posts = chat_posts(&req_log);
    let (ok, out2, err) = eval(&args, &[]);
    assert!(ok, "resumed eval failed: {err}");
    let rep2: Value = serde_json::from_str(&out2).expect("eval --json");
    assert_eq!(rep2["route_mix"], rep["route_mix"]);
    assert_eq!(rep2["accuracy"], rep["accuracy"]);
    assert_eq!(chat_posts(&req_log), posts, "a resumed run must not ask again");

    // The stand-in measured as the cloud, with the gateway's prompts and the key.
    let cloud_cache = d.join("cloud.jsonl").display().to_string();
    let cloud_args = [
        "--node",
        &stand_in.http,
        "--cloud-prompt",
        "--node-model",
        "tiny-cloud",
        "--api-key-env",
        KEY_ENV,
        "--file",
        &file,
        "--limit",
        "4",
        "--cache",
        &cloud_cache,
        "--json",
    ];
    let posts = chat_posts(&req_log);
    let (ok, out, err) = eval(&cloud_args, &[(KEY_ENV, &key)]);
    assert!(ok, "cloud eval failed: {err}");
    let rep: Value = serde_json::from_str(&out).expect("eval --json");
    let mix = checked_routes(&rep, 4);
    assert_eq!(mix.get("cloud"), Some(&4), "{rep}");
    assert_eq!(chat_posts(&req_log) - posts, 4);
    for l in cache_lines(Path::new(&cloud_cache)) {
        assert_eq!(l["model"], "tiny-cloud", "{l}");
        assert!(
            l["answer"].as_str().is_some_and(|s| !s.is_empty()),
            "an mcq answer is a label: {l}"
        );
    }

    // Without the key in the environment: a clear error, nothing cached.
    let none = d.join("none.jsonl").display().to_string();
    let mut no_key = cloud_args;
    no_key[12] = &none;
    let (ok, _, err) = eval(&no_key, &[]);
    assert!(!ok);
    assert!(err.contains(KEY_ENV), "error should name the variable: {err}");
    // With a wrong key: the endpoint's refusal is reported.
    let (ok, _, err) = eval(&no_key, &[(KEY_ENV, "sk-wrong")]);
    assert!(!ok);
    assert!(err.contains("401"), "error should give the status: {err}");
    assert!(cache_lines(Path::new(&none)).is_empty());
}
