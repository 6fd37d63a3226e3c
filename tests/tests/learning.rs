//! The learning loop with real `slm-swarm` processes on loopback: a gateway
//! logs the escalations it serves (and `dataset stats` / `dataset export`
//! read the log), a `privacy: swarm` question never lands in it; a model
//! gated with `models gate` is advertised and an ungated one beside it is not.
//! The cloud is `slm-swarm serve` with a tiny random model (answer quality is
//! not under test here).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use swarm_tests::{bin, loopback_start_args, tiny_models, unique_ns, wait_for, NodeProc};

fn node_args(
    ns: &str,
    models: &[&Path],
    dir: &Path,
    name: &str,
    boot: Option<&str>,
    cfg: &Path,
) -> Vec<String> {
    let mut a = loopback_start_args(&models[0].display().to_string(), ns);
    for m in &models[1..] {
        a.extend(["--model".into(), m.display().to_string()]);
    }
    a.extend([
        "--name".into(),
        name.into(),
        "--advert-interval".into(),
        "500".into(),
        "--threads".into(),
        "1".into(),
        "--identity".into(),
        dir.join(format!("{name}.key")).display().to_string(),
        "--config".into(),
        cfg.display().to_string(),
    ]);
    if let Some(b) = boot {
        a.extend(["--bootstrap".into(), b.to_string()]);
    }
    a
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin()).args(args).output().expect("run slm-swarm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn ask(n: &NodeProc, text: &str, swarm: Value) -> Value {
    let (st, r) = n
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": text}], "max_tokens": 8, "swarm": swarm}),
        )
        .expect("chat");
    assert_eq!(st, 200, "{r}");
    r
}

fn sst2() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/eval/sst2.jsonl")
}

#[test]
fn the_gateway_logs_escalations_and_dataset_reads_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = tiny_models(dir.path(), &["tiny-g", "tiny-h", "tiny-cloud"]);
    let ns = unique_ns("dataset");
    let stand_in = NodeProc::spawn(
        "stand-in",
        &[
            "serve".into(),
            "--model".into(),
            m[2].display().to_string(),
            "--http".into(),
            "127.0.0.1:0".into(),
            "--threads".into(),
            "1".into(),
        ],
        dir.path(),
        None,
    )
    .expect("stand-in");
    let log = dir.path().join("dataset");
    let gcfg = dir.path().join("g.toml");
    std::fs::write(
        &gcfg,
        format!(
            "[cloud]\nbase_url = \"{}/v1\"\nmodel = \"tiny-cloud\"\n\n[dataset]\nenabled = true\ndir = \"{}\"\n",
            stand_in.http,
            log.display()
        ),
    )
    .expect("config");
    let hcfg = dir.path().join("h.toml");
    std::fs::write(&hcfg, "").expect("config");
    let g = NodeProc::spawn(
        "g",
        &node_args(&ns, &[&m[0]], dir.path(), "g", None, &gcfg),
        dir.path(),
        None,
    )
    .expect("start g");
    let boot = g.addr_on("127.0.0.1").expect("g's address");
    let h = NodeProc::spawn(
        "h",
        &node_args(&ns, &[&m[1]], dir.path(), "h", Some(&boot), &hcfg),
        dir.path(),
        None,
    )
    .expect("start h");
    wait_for(
        Duration::from_secs(30),
        || matches!(h.get("/v1/swarm/gateway"), Ok((200, v)) if v["peer_id"] == json!(g.peer_id)),
    )
    .expect("h never saw g as gateway");
    let r = ask(
        &h,
        "Name a primary colour.",
        json!({"route": "cloud", "privacy": "cloud"}),
    );
    assert_eq!(r["swarm"]["route"], "cloud", "{r}");
    let cloud_text = r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let r = ask(
        &h,
        "Name a secret colour.",
        json!({"route": "cloud", "privacy": "swarm"}),
    );
    assert_ne!(r["swarm"]["route"], "cloud", "{r}");
    let dir_arg = log.display().to_string();
    let (ok, out, err) = cli(&["dataset", "stats", "--dir", &dir_arg, "--json"]);
    assert!(ok, "{err}");
    let s: Value = serde_json::from_str(&out).expect("stats json");
    assert_eq!(s["records"], 1, "{s}");
    assert_eq!(s["by_role"]["gateway"], 1, "{s}");
    assert_eq!(s["by_cloud_model"]["tiny-cloud"], 1, "{s}");
    let out_file = dir.path().join("train.jsonl");
    let (ok, _, err) = cli(&[
        "dataset",
        "export",
        "--dir",
        &dir_arg,
        "--out",
        &out_file.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let lines: Vec<Value> = std::fs::read_to_string(&out_file)
        .expect("export")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 1);
    let msgs = lines[0]["messages"].as_array().expect("messages");
    assert!(msgs[0]["content"]
        .as_str()
        .unwrap_or("")
        .contains("primary colour"));
    assert_eq!(msgs.last().expect("answer")["role"], "assistant");
    assert_eq!(msgs.last().expect("answer")["content"], json!(cloud_text));
    // A missing log is a clear error, not an empty summary.
    let (ok, _, err) = cli(&[
        "dataset",
        "stats",
        "--dir",
        &dir.path().join("nope").display().to_string(),
    ]);
    assert!(!ok && err.contains("no escalation log"), "{err}");
}

#[test]
fn a_model_gated_with_models_gate_is_advertised_an_ungated_one_is_not() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = tiny_models(dir.path(), &["tiny-gated", "tiny-ungated", "tiny-peer"]);
    let ns = unique_ns("gate");
    let gates = dir.path().join("gates");
    let acfg = dir.path().join("a.toml");
    std::fs::write(
        &acfg,
        format!(
            "[gate]\nmin_accuracy = {{ label = 0.0 }}\ndir = \"{}\"\n",
            gates.display()
        ),
    )
    .expect("config");
    let key = dir.path().join("a.key").display().to_string();
    let (ok, out, err) = cli(&[
        "models",
        "gate",
        "--model",
        &m[0].display().to_string(),
        "--file",
        &sst2().display().to_string(),
        "--min-accuracy",
        "0",
        "--limit",
        "8",
        "--config",
        &acfg.display().to_string(),
        "--identity",
        &key,
        "--json",
    ]);
    assert!(ok, "{err}");
    let recs: Value = serde_json::from_str(&out).expect("gate json");
    assert_eq!(recs[0]["task_kind"], "label", "{recs}");
    assert_eq!(recs[0]["n"], 8, "{recs}");
    // A bar the model cannot reach: the command says so with its exit code.
    let (ok, _, _) = cli(&[
        "models",
        "gate",
        "--model",
        &m[1].display().to_string(),
        "--file",
        &sst2().display().to_string(),
        "--min-accuracy",
        "1.0",
        "--limit",
        "8",
        "--config",
        &dir.path().join("elsewhere.toml").display().to_string(),
        "--identity",
        &key,
    ]);
    assert!(!ok, "a random model does not score 8/8 on SST-2");
    let bcfg = dir.path().join("b.toml");
    std::fs::write(&bcfg, "").expect("config");
    let a = NodeProc::spawn(
        "a",
        &node_args(&ns, &[&m[0], &m[1]], dir.path(), "a", None, &acfg),
        dir.path(),
        None,
    )
    .expect("start a");
    let boot = a.addr_on("127.0.0.1").expect("a's address");
    let b = NodeProc::spawn(
        "b",
        &node_args(&ns, &[&m[2]], dir.path(), "b", Some(&boot), &bcfg),
        dir.path(),
        None,
    )
    .expect("start b");
    let models_of_a = || -> Option<Vec<String>> {
        let (_, v) = b.get("/v1/swarm/peers").ok()?;
        let peer = v["peers"]
            .as_array()?
            .iter()
            .find(|p| p["peer_id"] == json!(a.peer_id))?
            .clone();
        Some(
            peer["models"]
                .as_array()?
                .iter()
                .filter_map(|m| Some(format!("{}@{}", m["id"].as_str()?, m["version"].as_str()?)))
                .collect(),
        )
    };
    wait_for(Duration::from_secs(30), || models_of_a().is_some()).expect("b never saw a");
    let version = recs[0]["version"].as_str().expect("version");
    assert_eq!(models_of_a(), Some(vec![format!("tiny-gated@{version}")]));
    // Node a says why the other model is not offered.
    let (_, v) = a.get("/v1/models").expect("models");
    let ungated = v["data"]
        .as_array()
        .and_then(|d| d.iter().find(|m| m["id"] == "tiny-ungated"))
        .expect("listed")
        .clone();
    assert_eq!(ungated["local"]["advertised"], false, "{ungated}");
    assert!(ungated["local"]["gate"]["reason"]
        .as_str()
        .unwrap_or("")
        .contains("no gate result"));
}
