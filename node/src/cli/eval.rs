//! `eval`: answer an evaluation set through one model or a live node, with a
//! resumable JSONL cache and a report (accuracy, route mix, cloud share, latency).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Value};
use swarm_node::eval::dataset::{self, Kind, Question};
use swarm_node::eval::run::{self, EvalRecord, Signals, SHORT_SYSTEM};
use swarm_node::inference::{Backend, ChatMessage, Scorer};

use super::ModelArgs;

#[derive(Args, Debug)]
pub(crate) struct EvalArgs {
    /// Questions: a JSONL file in the data/eval schema.
    #[arg(long)]
    pub file: PathBuf,
    /// Answer directly with this model (id or GGUF path)…
    #[arg(long, conflicts_with = "node")]
    pub model: Option<String>,
    /// …or through a live node's HTTP API (routing local → vote → cloud).
    /// Repeat to spread the questions round-robin over several nodes, so each
    /// coordinates a share (as `calibrate` averages over coordinator seats).
    #[arg(long)]
    pub node: Vec<String>,
    /// With --node: send each question as the gateway would send it to the
    /// cloud (options and answer hint in the prompt, no `swarm` extension), so
    /// any OpenAI-compatible endpoint can be measured as the cloud model; the
    /// cache then serves `calibrate --cloud`. Give --node-model.
    #[arg(long, requires = "node")]
    pub cloud_prompt: bool,
    /// With --node: environment variable holding a bearer token for the endpoint.
    #[arg(long, requires = "node")]
    pub api_key_env: Option<String>,
    /// Only this many questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Shuffle the questions with this seed before --limit (default: file order).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Option scorer for --model (default: the model's).
    #[arg(long)]
    pub scorer: Option<Scorer>,
    /// Model name to request from the node (default: the node's).
    #[arg(long, requires = "node")]
    pub node_model: Option<String>,
    /// Per-question results (JSONL); existing lines are reused, so a run resumes.
    /// Default: $SLM_SWARM_HOME/eval/<file>__<model or node>.jsonl
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Ignore and overwrite an existing cache.
    #[arg(long)]
    pub fresh: bool,
    /// Write the report here as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Compute threads (with --model).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub common: ModelArgs,
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The API base of a node or endpoint URL: `http://h:p` and `http://h:p/v1` both give `…/v1`.
fn api_base(url: &str) -> String {
    let u = url.trim_end_matches('/');
    if u.ends_with("/v1") {
        u.to_string()
    } else {
        format!("{u}/v1")
    }
}

fn select(mut qs: Vec<Question>, seed: Option<u64>, limit: Option<usize>) -> Vec<Question> {
    if let Some(s) = seed {
        qs.shuffle(&mut rand::rngs::StdRng::seed_from_u64(s));
    }
    if let Some(n) = limit {
        qs.truncate(n);
    }
    qs
}

/// How `eval` talks to an HTTP endpoint.
struct Endpoint<'a> {
    agent: &'a reqwest::blocking::Client,
    model: Option<&'a str>,
    /// Bearer token, if the endpoint wants one.
    key: Option<&'a str>,
    /// Send the gateway's cloud prompt instead of a swarm request.
    cloud_prompt: bool,
}

fn node_answer(ep: &Endpoint, url: &str, q: &Question, dataset: &str) -> anyhow::Result<EvalRecord> {
    let task = run::task_of(q);
    let mut messages = Vec::new();
    let mut body = json!({});
    if q.kind == Kind::Short {
        messages.push(ChatMessage::new("system", SHORT_SYSTEM));
        body["max_tokens"] = json!(16);
        if !ep.cloud_prompt {
            body["stop"] = json!(["\n"]);
        }
    }
    messages.push(ChatMessage::new("user", &run::prompt_of(q)));
    if ep.cloud_prompt {
        // What the gateway sends: no stop sequences, greedy, no swarm extension.
        messages = swarm_node::gateway::cloud_prompt(messages, &task);
        body["temperature"] = json!(0.0);
    } else {
        let mut swarm = serde_json::to_value(&task)?;
        swarm["route"] = json!("auto");
        body["swarm"] = swarm;
    }
    body["messages"] = json!(messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect::<Vec<_>>());
    if let Some(m) = ep.model {
        body["model"] = json!(m);
    }
    let t0 = Instant::now();
    let mut post = ep
        .agent
        .post(format!("{}/chat/completions", api_base(url)))
        .json(&body);
    if let Some(k) = ep.key {
        post = post.bearer_auth(k);
    }
    let resp = post.send().with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let v: Value = resp.json()?;
    if !status.is_success() {
        bail!(
            "{} answered {status}: {}",
            url,
            v["error"]["message"].as_str().unwrap_or("")
        );
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .trim()
        .to_string();
    let s = &v["swarm"];
    let (answer, correct) = run::judge(q, &text);
    let f = |k: &str| s[k].as_f64().map(|x| x as f32);
    let model = s["model"]
        .as_str()
        .or_else(|| v["model"].as_str())
        .unwrap_or("")
        .to_string();
    // A cloud-prompt run measures the endpoint as the swarm's cloud.
    let route = if ep.cloud_prompt {
        "cloud"
    } else {
        s["route"].as_str().unwrap_or("local")
    };
    Ok(EvalRecord {
        qid: q.id.clone(),
        dataset: dataset.to_string(),
        kind: task.kind().to_string(),
        model,
        source: format!("{}:{url}", if ep.cloud_prompt { "cloud" } else { "node" }),
        route: route.to_string(),
        answer,
        text,
        correct,
        ms,
        signals: Signals {
            confidence: f("local_confidence").unwrap_or(0.0),
            margin: None,
            mean_logprob: 0.0,
            min_prob: 0.0,
            probs: None,
        },
        degraded: s["degraded"].as_bool().unwrap_or(false),
        final_confidence: f("confidence"),
    })
}

pub(super) fn eval(a: EvalArgs) -> anyhow::Result<ExitCode> {
    let all = dataset::load(&a.file)?;
    let dataset = a
        .file
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let qs = select(all, a.seed, a.limit);
    if qs.is_empty() {
        bail!("no questions selected from {}", a.file.display());
    }
    let who = match (&a.model, a.node.first()) {
        (Some(m), None) => slug(m.rsplit('/').next().unwrap_or(m)),
        (None, Some(n)) => format!(
            "{}-{}{}",
            if a.cloud_prompt { "cloud" } else { "node" },
            slug(n.trim_start_matches("http://").trim_start_matches("https://")),
            if a.node.len() > 1 {
                format!("-and-{}", a.node.len() - 1)
            } else {
                String::new()
            }
        ),
        _ => bail!("give --model ID (one model directly) or --node URL (a live swarm)"),
    };
    if a.cloud_prompt && a.node_model.is_none() {
        bail!("--cloud-prompt needs --node-model: the model name the endpoint serves");
    }
    let key = match &a.api_key_env {
        Some(env) => {
            let k = std::env::var(env).unwrap_or_default();
            if k.trim().is_empty() {
                bail!("--api-key-env: environment variable `{env}` is not set or empty");
            }
            Some(k.trim().to_string())
        }
        None => None,
    };
    let cache = a.cache.clone().unwrap_or_else(|| {
        swarm_node::models::home_dir()
            .join("eval")
            .join(format!("{dataset}__{who}.jsonl"))
    });
    if a.fresh {
        let _ = std::fs::remove_file(&cache);
    }
    let wanted: BTreeSet<&str> = qs.iter().map(|q| q.id.as_str()).collect();
    let mut done: Vec<EvalRecord> = run::read_cache(&cache)?
        .into_iter()
        .filter(|r| wanted.contains(r.qid.as_str()))
        .collect();
    let have: BTreeSet<String> = done.iter().map(|r| r.qid.clone()).collect();
    let todo: Vec<&Question> = qs.iter().filter(|q| !have.contains(&q.id)).collect();
    if !todo.is_empty() && !have.is_empty() {
        eprintln!(
            "resuming: {} of {} questions already in {}",
            have.len(),
            qs.len(),
            cache.display()
        );
    }
    let mut writer = run::CacheWriter::open(&cache)?;
    let pb = super::progress_bar(
        todo.len(),
        "{msg} [{bar:30}] {pos}/{len} acc {prefix} eta {eta}",
        format!("{dataset} · {who}"),
    );
    let mut ok = done.iter().filter(|r| r.correct).count();
    let mut seen = done.len();
    let mut step = |r: EvalRecord, done: &mut Vec<EvalRecord>| -> anyhow::Result<()> {
        writer.append(&r)?;
        ok += r.correct as usize;
        seen += 1;
        pb.set_prefix(format!("{:.1}%", 100.0 * ok as f64 / seen as f64));
        pb.inc(1);
        done.push(r);
        Ok(())
    };
    if let Some(spec) = &a.model {
        let mut be = super::local::load(&a.common, spec)?;
        let scorer = a.scorer.unwrap_or(be.info().scorer);
        for q in todo {
            let r = run::answer_direct(&mut be, q, &dataset, scorer)?;
            step(r, &mut done)?;
        }
    } else if !a.node.is_empty() {
        let agent = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()?;
        let ep = Endpoint {
            agent: &agent,
            model: a.node_model.as_deref(),
            key: key.as_deref(),
            cloud_prompt: a.cloud_prompt,
        };
        for (i, q) in todo.into_iter().enumerate() {
            let url = &a.node[i % a.node.len()];
            let r = node_answer(&ep, url, q, &dataset)?;
            step(r, &mut done)?;
        }
    }
    pb.finish_and_clear();
    // Report in question order, for stable output.
    let order: std::collections::BTreeMap<&str, usize> =
        qs.iter().enumerate().map(|(i, q)| (q.id.as_str(), i)).collect();
    done.sort_by_key(|r| order.get(r.qid.as_str()).copied().unwrap_or(usize::MAX));
    let mut rep = run::report(&done);
    rep["file"] = json!(a.file.display().to_string());
    rep["cache"] = json!(cache.display().to_string());
    rep["source"] = json!(who);
    if let Some(p) = &a.out {
        std::fs::write(p, serde_json::to_string_pretty(&rep)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "{dataset} via {who}: accuracy {:.1}% over {} questions; cloud share {:.1}%; routes {}",
            100.0 * rep["accuracy"].as_f64().unwrap_or(0.0),
            rep["n"],
            100.0 * rep["cloud_share"].as_f64().unwrap_or(0.0),
            rep["route_mix"]
        );
        for (route, l) in rep["latency_ms"].as_object().into_iter().flatten() {
            println!(
                "  {route}: p50 {:.0} ms, p95 {:.0} ms",
                l["p50"].as_f64().unwrap_or(0.0),
                l["p95"].as_f64().unwrap_or(0.0)
            );
        }
        println!("  cache: {}", cache.display());
    }
    Ok(ExitCode::SUCCESS)
}
