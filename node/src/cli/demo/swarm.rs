//! One demo run: start the cloud stand-in and the three nodes, wait for the
//! swarm to form and elect its gateway, and ask each question of a node.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use swarm_node::eval::run::SHORT_SYSTEM;
use swarm_protocol::Task;

use super::processes::{model_id, Proc};
use super::questions::QuestionIn;
use super::table::Row;
use super::DemoArgs;

/// Environment variable holding the demo's random cloud key (stand-in and node-1 only).
const KEY_ENV: &str = "SLM_SWARM_DEMO_CLOUD_KEY";

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?)
}

async fn get_json(c: &reqwest::Client, url: &str) -> Option<Value> {
    c.get(url).send().await.ok()?.json().await.ok()
}

async fn ask(c: &reqwest::Client, node: &Proc, q: &QuestionIn) -> anyhow::Result<Row> {
    let task = q.task()?;
    let mut swarm = serde_json::to_value(&task)?;
    let route = q.route.clone().unwrap_or_else(|| "auto".into());
    swarm["route"] = json!(route);
    let mut messages = Vec::new();
    let mut body = json!({});
    match task {
        Task::Short => {
            messages.push(json!({"role": "system", "content": SHORT_SYSTEM}));
            body["max_tokens"] = json!(24);
            body["stop"] = json!(["\n"]);
        }
        Task::Free => body["max_tokens"] = json!(96),
        _ => {}
    }
    messages.push(json!({"role": "user", "content": q.prompt()}));
    body["messages"] = json!(messages);
    body["swarm"] = swarm;
    let t0 = Instant::now();
    let resp = c
        .post(format!("{}/v1/chat/completions", node.http))
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach {}", node.name))?;
    let status = resp.status();
    let v: Value = resp.json().await.context("reading the answer")?;
    let ms = t0.elapsed().as_millis() as u64;
    let mut row = Row {
        question: q.question.trim().to_string(),
        tag: q.tag.clone().unwrap_or_default(),
        asked: node.name.clone(),
        forced: route != "auto",
        safety: false,
        route: String::new(),
        answer: String::new(),
        confidence: None,
        voters: None,
        ms,
        degraded_reason: None,
        gateway: None,
        gateway_node: None,
        model: String::new(),
        error: None,
    };
    if !status.is_success() {
        row.route = "error".into();
        row.error = Some(format!(
            "HTTP {status}: {}",
            v["error"]["message"].as_str().unwrap_or("")
        ));
        return Ok(row);
    }
    let s = &v["swarm"];
    row.route = s["route"].as_str().unwrap_or("?").to_string();
    row.answer = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .trim()
        .to_string();
    row.confidence = s["confidence"].as_f64();
    row.voters = s["voters"]
        .as_array()
        .map(|vs| vs.iter().filter(|x| x["error"].is_null()).count())
        .filter(|n| *n > 0);
    if s["degraded"].as_bool() == Some(true) {
        row.degraded_reason = Some(s["degraded_reason"].as_str().unwrap_or("degraded").to_string());
    }
    row.safety = s["safety_flag"].as_bool() == Some(true);
    row.gateway = s["gateway"].as_str().map(String::from);
    row.model = s["model"].as_str().unwrap_or("").to_string();
    Ok(row)
}

/// Wait until every node lists the two others and agrees that `gateway` holds the role.
async fn wait_ready(c: &reqwest::Client, nodes: &[Proc], gateway: &str) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let mut missing = Vec::new();
        for n in nodes {
            let peers = get_json(c, &format!("{}/v1/swarm/peers", n.http)).await;
            let seen = peers
                .as_ref()
                .and_then(|p| p["peers"].as_array().map(|a| a.len()))
                .unwrap_or(0);
            let gw = peers
                .as_ref()
                .and_then(|p| p["gateway"]["peer_id"].as_str().map(String::from));
            if seen < nodes.len() - 1 {
                missing.push(format!("{} sees {seen} of {} peers", n.name, nodes.len() - 1));
            } else if gw.as_deref() != Some(gateway) {
                missing.push(format!("{} has no gateway yet", n.name));
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(90) {
            bail!("the swarm did not form within 90 s: {}", missing.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(super) async fn run(
    a: &DemoArgs,
    questions: Vec<QuestionIn>,
    dir: &Path,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<Vec<Row>> {
    let c = http_client()?;
    let key = format!("demo-{:032x}", rand::random::<u128>());
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let t0 = Instant::now();
    // The stand-in's port is chosen here so that it and node-1 can load their
    // models at the same time; node-1's prober finds the stand-in once it is up.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let cloud_url = format!("http://127.0.0.1:{port}/v1");
    let cloud_model = model_id(&a.common, &a.cloud_model);
    let stand_in_args: Vec<String> = vec![
        "serve".into(),
        "--model".into(),
        a.cloud_model.clone(),
        "--http".into(),
        format!("127.0.0.1:{port}"),
        "--name".into(),
        "cloud-stand-in".into(),
        "--api-key-env".into(),
        KEY_ENV.into(),
        "--request-log".into(),
        dir.join("cloud-requests.jsonl").display().to_string(),
        "--threads".into(),
        threads.to_string(),
    ];
    // node-1 may call the cloud: a longer cloud deadline suits a CPU-only stand-in,
    // and frequent probes notice it soon after it has loaded.
    let cfg1 = dir.join("node-1.toml");
    // node-1 is the gateway: its escalation log (`slm-swarm dataset stats --dir
    // <log dir>/dataset`) keeps what the cloud answered during the demo.
    let dataset_dir = dir.join("dataset");
    std::fs::write(
        &cfg1,
        format!(
            "[cloud]\ntimeout_ms = 120000\nprobe_interval_ms = 1000\n\n[dataset]\nenabled = true\ndir = {}\n",
            toml::Value::String(dataset_dir.display().to_string())
        ),
    )?;
    let ns = format!("demo-{}", std::process::id());
    let node_args = |i: usize, boot: Option<&str>| {
        let name = format!("node-{}", i + 1);
        let mut v: Vec<String> = vec![
            "start".into(),
            "--name".into(),
            name.clone(),
            "--model".into(),
            a.models[i].clone(),
            "--http".into(),
            "127.0.0.1:0".into(),
            "--listen".into(),
            "/ip4/127.0.0.1/udp/0/quic-v1".into(),
            "--no-mdns".into(),
            "--namespace".into(),
            ns.clone(),
            "--identity".into(),
            dir.join(format!("{name}.key")).display().to_string(),
            "--advert-interval".into(),
            a.advert_interval.to_string(),
            "--threads".into(),
            a.threads.to_string(),
        ];
        if let Some(b) = boot {
            v.extend(["--bootstrap".into(), b.to_string()]);
        }
        (name, v)
    };
    let (_, mut args1) = node_args(0, None);
    args1.extend([
        "--config".into(),
        cfg1.display().to_string(),
        "--cloud-url".into(),
        cloud_url.clone(),
        "--cloud-model".into(),
        cloud_model.clone(),
        "--cloud-key-env".into(),
        KEY_ENV.into(),
    ]);
    eprintln!(
        "starting the cloud stand-in ({}) and node-1 ({}, may call the cloud)…",
        a.cloud_model, a.models[0]
    );
    let key_env = [(KEY_ENV, key.as_str())];
    let (stand_in, n1) = tokio::join!(
        Proc::spawn("cloud-stand-in", &stand_in_args, &key_env, dir),
        Proc::spawn("node-1", &args1, &key_env, dir),
    );
    // Whatever started is kept in `procs`, so it is stopped even if the other failed.
    let (stand_in, n1) = match (stand_in, n1) {
        (Ok(s), Ok(n)) => (s, n),
        (s, n) => {
            procs.extend(s.ok());
            procs.extend(n.ok());
            bail!("the stand-in or node-1 did not start (see --log-dir)");
        }
    };
    if !stand_in.models.split(", ").any(|m| m == cloud_model) {
        procs.push(stand_in);
        procs.push(n1);
        bail!("the stand-in serves `{}`, not `{cloud_model}`", procs[0].models);
    }
    eprintln!(
        "  cloud stand-in: {} at {cloud_url} (requires an API key)",
        stand_in.models
    );
    procs.push(stand_in);
    let boot = n1
        .addrs
        .iter()
        .find(|x| x.starts_with("/ip4/127.0.0.1/"))
        .cloned()
        .ok_or_else(|| anyhow!("node-1 printed no loopback address"))?;
    let gateway = n1.peer_id.clone();
    procs.push(n1);
    eprintln!("starting node-2 ({}) and node-3 ({})…", a.models[1], a.models[2]);
    let (_, args2) = node_args(1, Some(&boot));
    let (_, args3) = node_args(2, Some(&boot));
    // No key in these nodes' environment: only node-1 can reach the cloud.
    let (n2, n3) = tokio::join!(
        Proc::spawn("node-2", &args2, &[], dir),
        Proc::spawn("node-3", &args3, &[], dir)
    );
    let (n2, n3) = match (n2, n3) {
        (Ok(x), Ok(y)) => (x, y),
        (x, y) => {
            procs.extend(x.ok());
            procs.extend(y.ok());
            bail!("node-2 or node-3 did not start (see --log-dir)");
        }
    };
    procs.push(n2);
    procs.push(n3);
    eprintln!("waiting for the swarm to form and elect node-1 as gateway…");
    wait_ready(&c, &procs[1..], &gateway).await?;
    eprintln!(
        "swarm ready in {:.1} s: {} nodes, gateway node-1\n",
        t0.elapsed().as_secs_f64(),
        procs.len() - 1
    );
    let mut rows = Vec::new();
    let n = questions.len();
    for (i, q) in questions.iter().enumerate() {
        // Spread the questions over the nodes: each coordinates its share.
        let node = &procs[1 + i % 3];
        let row = match ask(&c, node, q).await {
            Ok(r) => r,
            Err(e) => Row {
                question: q.question.clone(),
                tag: q.tag.clone().unwrap_or_default(),
                asked: node.name.clone(),
                forced: false,
                safety: false,
                route: "error".into(),
                answer: String::new(),
                confidence: None,
                voters: None,
                ms: 0,
                degraded_reason: None,
                gateway: None,
                gateway_node: None,
                model: String::new(),
                error: Some(format!("{e:#}")),
            },
        };
        let mut row = row;
        row.gateway_node = row
            .gateway
            .as_ref()
            .and_then(|g| procs.iter().find(|p| &p.peer_id == g))
            .map(|p| p.name.clone());
        eprintln!(
            "[{}/{n}] {} → {}{}{} ({} ms)",
            i + 1,
            row.asked,
            row.route,
            if row.forced { " (forced)" } else { "" },
            if row.safety { " (safety)" } else { "" },
            row.ms
        );
        if a.json {
            println!("{}", serde_json::to_string(&row)?);
        }
        rows.push(row);
    }
    Ok(rows)
}
