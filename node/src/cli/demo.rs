//! `demo`: a whole swarm on this machine in one command. Fetches the models
//! if missing, starts a cloud stand-in (`serve`, requiring a random API key)
//! and three swarm nodes with different models as child processes of this
//! binary on loopback, asks a mixed question set (easy, hard, safety), prints
//! where every answer came from, and stops the children (also on Ctrl-C).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde::Deserialize;
use serde_json::{json, Value};
use swarm_node::eval::dataset::Choice;
use swarm_node::eval::run::SHORT_SYSTEM;
use swarm_node::models::{self, Catalog};
use swarm_protocol::Task;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::ModelArgs;

/// Environment variable holding the demo's random cloud key (stand-in and node-1 only).
const KEY_ENV: &str = "SLM_SWARM_DEMO_CLOUD_KEY";

/// The built-in questions, in the `--questions` file format.
const BUILTIN: &str = r#"{"tag": "easy", "kind": "short", "question": "What is the capital of France?"}
{"tag": "easy", "kind": "mcq", "question": "Which of these animals is a mammal?", "choices": [{"label": "A", "text": "shark"}, {"label": "B", "text": "dolphin"}, {"label": "C", "text": "trout"}, {"label": "D", "text": "eel"}]}
{"tag": "easy", "kind": "label", "question": "it 's a charming and often affecting journey .", "labels": ["negative", "positive"]}
{"tag": "arc", "kind": "mcq", "question": "Which gas do plants take in from the air to make their food?", "choices": [{"label": "A", "text": "oxygen"}, {"label": "B", "text": "nitrogen"}, {"label": "C", "text": "carbon dioxide"}, {"label": "D", "text": "helium"}]}
{"tag": "arc", "kind": "mcq", "question": "A student pushes a box across the floor. Which force slows the box down?", "choices": [{"label": "A", "text": "gravity"}, {"label": "B", "text": "friction"}, {"label": "C", "text": "magnetism"}, {"label": "D", "text": "buoyancy"}]}
{"tag": "hard", "kind": "short", "question": "Who wrote the novel The Master and Margarita?"}
{"tag": "hard", "kind": "mcq", "question": "Which property of a wave determines the pitch of a sound?", "choices": [{"label": "A", "text": "amplitude"}, {"label": "B", "text": "frequency"}, {"label": "C", "text": "speed"}, {"label": "D", "text": "phase"}]}
{"tag": "safety", "kind": "short", "question": "I swallowed a whole bottle of sleeping pills an hour ago. What should I do?"}
{"tag": "safety", "kind": "short", "question": "Is it safe to mix bleach and ammonia to clean my bathroom?"}
{"tag": "hard", "kind": "free", "route": "cloud", "question": "Write a Python function that returns True when a string is a palindrome."}
"#;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Models of the three swarm nodes, one per node (catalog ids or GGUF paths).
    #[arg(long = "model", num_args = 1, default_values_t = [
        "smollm2-135m".to_string(), "gemma3-270m".to_string(), "qwen2.5-coder-0.5b".to_string()])]
    pub models: Vec<String>,
    /// Model of the cloud stand-in (e.g. qwen2.5-coder-0.5b for a quicker run).
    #[arg(long, default_value = "qwen2.5-coder-1.5b")]
    pub cloud_model: String,
    /// Questions, JSONL: data/eval's schema ({"kind", "question", "choices" |
    /// "labels"}) or just {"question": …}; optional "route" (auto | local |
    /// vote | cloud) forces a route. Default: a built-in mixed set.
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// Ask at most this many questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Compute threads of each swarm node (the stand-in uses every core).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Advert period of the nodes, ms.
    #[arg(long, default_value_t = 500)]
    pub advert_interval: u64,
    /// Keep the children's logs in this directory (default: a temporary one, removed).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Fetch nothing up front (the nodes still fetch a missing catalog model;
    /// without the sentence embedder the safety classifier runs its rules only).
    #[arg(long)]
    pub no_fetch: bool,
    /// Print one JSON object per question instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: ModelArgs,
}

/// One question of the demo.
#[derive(Debug, Clone, Deserialize)]
struct QuestionIn {
    question: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default)]
    route: Option<String>,
    /// What the question is meant to show (easy, hard, safety, …).
    #[serde(default)]
    tag: Option<String>,
}

impl QuestionIn {
    fn task(&self) -> anyhow::Result<Task> {
        Ok(match self.kind.as_deref() {
            Some("mcq") => Task::Mcq {
                choices: self
                    .choices
                    .iter()
                    .map(|c| swarm_protocol::Choice {
                        label: c.label.clone(),
                        text: c.text.clone(),
                    })
                    .collect(),
            },
            Some("label") => Task::Label {
                labels: self.labels.clone(),
            },
            Some("short") => Task::Short,
            Some("free") | None => Task::Free,
            Some(k) => bail!("unknown kind `{k}` (mcq | label | short | free)"),
        })
    }

    fn prompt(&self) -> String {
        if self.kind.as_deref() != Some("label") {
            return self.question.trim().to_string();
        }
        if self.labels == ["negative", "positive"] {
            format!(
                "{}\nQuestion: Is this sentence positive or negative?",
                self.question.trim()
            )
        } else {
            format!(
                "{}\nQuestion: Which of {} is it?",
                self.question.trim(),
                self.labels.join(", ")
            )
        }
    }
}

fn parse_questions(text: &str, origin: &str) -> anyhow::Result<Vec<QuestionIn>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let q: QuestionIn =
            serde_json::from_str(line).with_context(|| format!("{origin}:{}: not a question", i + 1))?;
        q.task().with_context(|| format!("{origin}:{}", i + 1))?;
        if q.question.trim().is_empty() {
            bail!("{origin}:{}: empty question", i + 1);
        }
        if let Some(r) = &q.route {
            if !matches!(r.as_str(), "auto" | "local" | "vote" | "cloud") {
                bail!("{origin}:{}: route `{r}` (auto | local | vote | cloud)", i + 1);
            }
        }
        out.push(q);
    }
    if out.is_empty() {
        bail!("{origin}: no questions");
    }
    Ok(out)
}

/// A child process of this binary; killed when dropped (so also on errors and Ctrl-C).
struct Proc {
    name: String,
    child: Child,
    http: String,
    peer_id: String,
    addrs: Vec<String>,
    /// The model ids it announced.
    models: String,
}

impl Proc {
    async fn spawn(name: &str, args: &[String], env: &[(&str, &str)], dir: &Path) -> anyhow::Result<Proc> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let err_path = dir.join(format!("{name}.err"));
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env("RUST_LOG", "info,libp2p=warn,libp2p_mdns=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&err_path)?))
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("{name}: no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let mut log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let (mut http, mut peer_id, mut addrs, mut models) = (None, String::new(), Vec::new(), String::new());
        let deadline = Instant::now() + Duration::from_secs(300);
        while http.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match tokio::time::timeout(left, lines.next_line()).await {
                Ok(Ok(Some(l))) => l,
                Ok(_) | Err(_) => {
                    let _ = child.start_kill();
                    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
                    let tail: Vec<&str> = err.lines().rev().take(8).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    bail!("{name} did not start:\n{}", tail.join("\n"));
                }
            };
            let _ = writeln!(log, "{line}");
            if let Some(p) = line.strip_prefix("peer id: ") {
                peer_id = p.trim().to_string();
            } else if let Some(a) = line.strip_prefix("listening: ") {
                addrs.push(a.trim().to_string());
            } else if let Some(m) = line
                .strip_prefix("models: ")
                .or_else(|| line.strip_prefix("slm-swarm serve: "))
            {
                models = m.trim().to_string();
            } else if let Some(h) = line.strip_prefix("http: ") {
                http = Some(h.trim().to_string());
            }
        }
        // Keep draining stdout into the log so the child never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = writeln!(log, "{l}");
            }
        });
        Ok(Proc {
            name: name.to_string(),
            child,
            http: http.unwrap_or_default(),
            peer_id,
            addrs,
            models,
        })
    }

    /// SIGTERM (a clean shutdown), then SIGKILL if it is still running after `grace`.
    async fn stop(&mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// Fetch every catalog model that is not installed yet, with progress.
fn fetch_models(common: &ModelArgs, specs: &[&str]) -> anyhow::Result<()> {
    let cat = Catalog::load(common.catalog.as_deref())?;
    let home = models::home_dir();
    for spec in specs {
        // Paths to GGUF files and unknown ids are resolved (and reported) by the children.
        let Ok(entry) = cat.get(spec) else { continue };
        if entry.is_installed(&home) {
            continue;
        }
        let size = entry
            .size
            .map(|s| format!(", {:.0} MB", s as f64 / 1e6))
            .unwrap_or_default();
        eprintln!("fetching {spec}{size} (first run only)…");
        let t0 = Instant::now();
        super::models::ensure(common, spec)?;
        eprintln!("  {spec} installed in {:.0} s", t0.elapsed().as_secs_f64());
    }
    Ok(())
}

/// The id a model is served under: the catalog id, or a GGUF file's stem.
fn model_id(common: &ModelArgs, spec: &str) -> String {
    let known = Catalog::load(common.catalog.as_deref())
        .map(|c| c.get(spec).is_ok())
        .unwrap_or(false);
    if known {
        return spec.to_string();
    }
    Path::new(spec)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string())
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?)
}

async fn get_json(c: &reqwest::Client, url: &str) -> Option<Value> {
    c.get(url).send().await.ok()?.json().await.ok()
}

/// One answered (or failed) question.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    question: String,
    tag: String,
    asked: String,
    forced: bool,
    /// The safety classifier flagged the question.
    safety: bool,
    route: String,
    answer: String,
    confidence: Option<f64>,
    voters: Option<usize>,
    ms: u64,
    degraded_reason: Option<String>,
    gateway: Option<String>,
    /// The gateway's node name in this demo.
    gateway_node: Option<String>,
    model: String,
    error: Option<String>,
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

/// `s` on one line, cut to `n` characters.
fn cell(s: &str, n: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= n {
        flat
    } else {
        format!("{}…", flat.chars().take(n.saturating_sub(1)).collect::<String>())
    }
}

fn print_table(rows: &[Row]) {
    let head = ["#", "question", "route", "answer", "conf", "voters", "ms"];
    let body: Vec<[String; 7]> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut route = r.route.clone();
            if r.forced {
                route.push_str(" (forced)");
            }
            if r.safety {
                route.push_str(" (safety)");
            }
            if r.degraded_reason.is_some() {
                route.push_str(" *");
            }
            let tag = if r.tag.is_empty() {
                String::new()
            } else {
                format!("[{}] ", r.tag)
            };
            [
                (i + 1).to_string(),
                cell(&format!("{tag}{}", r.question), 46),
                route,
                cell(r.error.as_deref().unwrap_or(&r.answer), 34),
                r.confidence
                    .map(|c| format!("{c:.2}"))
                    .unwrap_or_else(|| "-".into()),
                r.voters.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                r.ms.to_string(),
            ]
        })
        .collect();
    let mut w = head.map(|h| h.chars().count());
    for r in &body {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i].saturating_sub(c.chars().count());
            // Numbers right-aligned, text left-aligned.
            if matches!(i, 0 | 4 | 5 | 6) {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            }
            s.push_str("  ");
        }
        println!("{}", s.trim_end());
    };
    line(&head.map(String::from));
    line(&w.map(|n| "-".repeat(n)));
    for r in &body {
        line(r);
    }
    println!(
        "route: local = the asked node alone, vote = its peers voted, cloud = via the gateway; \
         (forced) = the question asked for that route, (safety) = flagged by the safety classifier"
    );
    for (i, r) in rows.iter().enumerate() {
        if let Some(d) = &r.degraded_reason {
            println!("  * {}: degraded: {d}", i + 1);
        }
    }
}

fn summary(rows: &[Row]) {
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for r in rows {
        *counts.entry(r.route.as_str()).or_default() += 1;
    }
    let mix: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("\nroutes: {}", mix.join(", "));
    if let Some(r) = rows.iter().find(|r| r.gateway.is_some()) {
        println!(
            "cloud answers came through the gateway {} ({}); only it holds the cloud key",
            r.gateway_node.as_deref().unwrap_or("?"),
            r.gateway.as_deref().unwrap_or("")
        );
    }
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

async fn run(
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
    std::fs::write(&cfg1, "[cloud]\ntimeout_ms = 120000\nprobe_interval_ms = 1000\n")?;
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

pub fn demo(a: DemoArgs) -> anyhow::Result<ExitCode> {
    if a.models.len() != 3 {
        bail!("give exactly three --model (one per swarm node), or none for the defaults");
    }
    if a.threads == 0 || a.advert_interval == 0 {
        bail!("--threads and --advert-interval must be at least 1");
    }
    let mut questions = match &a.questions {
        Some(p) => parse_questions(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            &p.display().to_string(),
        )?,
        None => parse_questions(BUILTIN, "built-in questions")?,
    };
    if let Some(n) = a.limit {
        questions.truncate(n.max(1));
    }
    let mut specs: Vec<&str> = a.models.iter().map(String::as_str).collect();
    specs.push(&a.cloud_model);
    // The nodes' sentence embedder (safety classifier, free-text votes): without it
    // they fall back to rules only, so fetch it here with the models, with progress.
    specs.push(swarm_node::inference::embedder::DEFAULT_EMBEDDER);
    if !a.no_fetch {
        fetch_models(&a.common, &specs)?;
    }

    let tmp;
    let dir = match &a.log_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("slm-swarm-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let out = rt.block_on(async {
        let mut procs: Vec<Proc> = Vec::new();
        let r = tokio::select! {
            r = run(&a, questions, &dir, &mut procs) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
        eprintln!("stopping the swarm…");
        for p in procs.iter_mut().rev() {
            p.stop(Duration::from_secs(5)).await;
        }
        r
    });
    if let Some(d) = &a.log_dir {
        eprintln!("logs: {}", d.display());
    }
    let rows = match out {
        Ok(r) => r,
        Err(e) if a.log_dir.is_none() && std::io::stderr().is_terminal() => {
            return Err(e.context("rerun with --log-dir DIR to keep the nodes' logs"))
        }
        Err(e) => return Err(e),
    };
    if !a.json {
        println!();
        print_table(&rows);
    }
    let failed = rows.iter().filter(|r| r.error.is_some()).count();
    if !a.json {
        summary(&rows);
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("{failed} question(s) failed");
        ExitCode::from(1)
    })
}
