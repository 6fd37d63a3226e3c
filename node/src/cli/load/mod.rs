//! `slm-swarm bench-load`: hold N concurrent chat requests against one or
//! more nodes for a while, optionally killing (SIGKILL) and restarting a node
//! every `--chaos-every`, and report what happened to every request (answered,
//! refused with a clear error, failed), latency percentiles and the nodes'
//! peak resident memory. Without `--node` it starts its own swarm on loopback.
//!
//! Chaos works on local processes: the process listening on a node URL's port
//! is found through /proc, killed, and started again from its own command
//! line, working directory and environment (so its URL, identity and ports
//! stay the same).

mod chaos;
mod tally;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::cli::demo::processes::{fetch_models, Proc};
use crate::cli::ModelArgs;
use chaos::*;
use tally::*;

#[derive(clap::Args, Debug)]
pub(crate) struct BenchLoadArgs {
    /// A node to load, e.g. http://127.0.0.1:8080 (repeat for several; requests
    /// go round-robin). Without any, bench-load starts --local-nodes nodes of
    /// its own on loopback and stops them at the end.
    #[arg(long = "node", value_name = "URL")]
    pub nodes: Vec<String>,
    /// Nodes to start when no --node is given.
    #[arg(long, default_value_t = 3)]
    pub local_nodes: usize,
    /// Model of the nodes bench-load starts (catalog id or GGUF path).
    #[arg(long, default_value = "smollm2-135m")]
    pub model: String,
    /// Compute threads of each node bench-load starts.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long to hold the load: seconds, or a duration with a unit (90s, 5m).
    #[arg(long, default_value = "60", value_parser = parse_seconds)]
    pub duration: Duration,
    /// Kill one node with SIGKILL every --chaos-every and start it again after
    /// --chaos-down (nodes must run on this machine).
    #[arg(long)]
    pub chaos: bool,
    #[arg(long, default_value = "30s", value_parser = parse_seconds)]
    pub chaos_every: Duration,
    #[arg(long, default_value = "5s", value_parser = parse_seconds)]
    pub chaos_down: Duration,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// Client deadline per request; beyond it the request counts as an error.
    /// Longer than a node's own deadline (`request_timeout_ms`, 120 s), so a
    /// node that cannot answer in time says so (504) first.
    #[arg(long, default_value = "150s", value_parser = parse_seconds)]
    pub timeout: Duration,
    /// Bearer key of the nodes' HTTP API.
    #[arg(long, env = "SLM_SWARM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print one JSON object: requests, ok, refused, errors, p50_ms, p95_ms, max_rss_mb, …
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: ModelArgs,
}

/// Seconds when bare (`60`), else a duration with a unit (`500ms`, `2m`).
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()) {
        let n: u64 = t.parse().map_err(|_| format!("`{t}` is too large"))?;
        if n == 0 {
            return Err("must be more than 0".into());
        }
        return Ok(Duration::from_secs(n));
    }
    super::duration::parse_duration_ms(t).map(Duration::from_millis)
}

/// Everyday questions of several kinds, so routing sees a realistic mix.
const QUESTIONS: [&str; 12] = [
    "What is the capital of France?",
    "Is the sun a star? Answer yes or no.",
    "Name a primary colour.",
    "How many legs does a spider have?",
    "What gas do plants take in for photosynthesis?",
    "Translate 'thank you' into Spanish.",
    "What is 12 times 12?",
    "Which planet is known as the red planet?",
    "Give a synonym of 'happy'.",
    "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?",
    "What is the largest ocean on Earth?",
];

/// Free loopback ports (TCP for HTTP, UDP for QUIC) fixed up front, so a node
/// restarted by the chaos keeps its URL and its peers find it again.
fn free_ports() -> anyhow::Result<(u16, u16)> {
    let t = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let u = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    Ok((t, u))
}

async fn start_swarm(a: &BenchLoadArgs, dir: &Path) -> anyhow::Result<Vec<Proc>> {
    if a.local_nodes == 0 {
        bail!("--local-nodes must be at least 1 (or give --node URLs)");
    }
    let ns = format!("bench-load-{}", std::process::id());
    let mut procs: Vec<Proc> = Vec::new();
    let mut quic: Vec<String> = Vec::new();
    for i in 0..a.local_nodes {
        let (http, udp) = free_ports()?;
        let mut args: Vec<String> = [
            "start",
            "--model",
            &a.model,
            "--name",
            &format!("load-{i}"),
            "--http",
            &format!("127.0.0.1:{http}"),
            "--listen",
            &format!("/ip4/127.0.0.1/udp/{udp}/quic-v1"),
            "--no-mdns",
            "--namespace",
            &ns,
            "--identity",
            &dir.join(format!("node-{i}.key")).display().to_string(),
            "--threads",
            &a.threads.to_string(),
        ]
        .map(String::from)
        .to_vec();
        if let Some(c) = &a.common.catalog {
            args.extend(["--catalog".into(), c.display().to_string()]);
        }
        for q in &quic {
            args.extend(["--bootstrap".into(), q.clone()]);
        }
        let p = Proc::spawn(&format!("load-{i}"), &args, &[], dir).await?;
        if let Some(q) = p.addrs.iter().find(|x| x.starts_with("/ip4/127.0.0.1/")) {
            quic.push(q.clone());
        }
        procs.push(p);
    }
    // Wait for the swarm to form (each node sees the others), at most 60 s.
    let c = reqwest::Client::new();
    let want = a.local_nodes - 1;
    let t0 = Instant::now();
    loop {
        let mut formed = true;
        for p in &procs {
            let v: Option<Value> = match c.get(format!("{}/v1/swarm/peers", p.http)).send().await {
                Ok(r) => r.json().await.ok(),
                Err(_) => None,
            };
            let n = v
                .as_ref()
                .and_then(|v| v["peers"].as_array().map(|x| x.len()))
                .unwrap_or(0);
            formed &= n >= want;
        }
        if formed || t0.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(procs)
}

pub(super) fn bench_load(a: BenchLoadArgs) -> anyhow::Result<std::process::ExitCode> {
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if a.nodes.is_empty() {
        fetch_models(&a.common, &[a.model.as_str()])?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(a))
}

async fn run(a: BenchLoadArgs) -> anyhow::Result<std::process::ExitCode> {
    let dir = tempfile::Builder::new()
        .prefix("slm-swarm-bench-load")
        .tempdir()?;
    let mut own = Vec::new();
    let urls: Vec<String> = if a.nodes.is_empty() {
        eprintln!("starting {} nodes of {} on loopback…", a.local_nodes, a.model);
        own = start_swarm(&a, dir.path()).await?;
        own.iter().map(|p| p.http.clone()).collect()
    } else {
        a.nodes
            .iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect()
    };
    let mut locals = Vec::new();
    for u in &urls {
        locals.push(LocalNode {
            url: u.clone(),
            port: port_of(u)?,
        });
    }
    if a.chaos {
        for n in &locals {
            if pid_on_port(n.port).is_none() {
                bail!(
                    "--chaos kills and restarts nodes on this machine, but no local process listens on {} \
                     (start the nodes here, or omit --node to let bench-load start its own)",
                    n.url
                );
            }
        }
        if locals.len() < 2 {
            bail!("--chaos needs at least two nodes (one is down at a time)");
        }
    }

    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(k) = a.api_key.as_deref().filter(|k| !k.is_empty()) {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {k}"))
            .context("the API key has characters a header cannot carry")?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    let builder = move || {
        reqwest::Client::builder()
            .timeout(a.timeout)
            .connect_timeout(Duration::from_secs(5))
            .default_headers(headers.clone())
            .build()
    };
    // One client per node, replaced when the chaos restarts that node: its
    // pooled connections lead to the dead process.
    let mut per_node = Vec::new();
    for _ in &locals {
        per_node.push(Mutex::new((0u64, builder()?)));
    }
    let clients = Arc::new(per_node);
    let builder = Arc::new(builder);

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(Mutex::new(BTreeMap::new()));
    let chaos_log = Arc::new(Mutex::new(Vec::new()));
    let restarted = Arc::new(Mutex::new(Vec::new()));
    let sampler = tokio::spawn(sample_rss(locals.clone(), stop.clone(), peak.clone()));
    let kills: Arc<Vec<AtomicU64>> = Arc::new(locals.iter().map(|_| AtomicU64::new(0)).collect());
    let monkey = a.chaos.then(|| {
        tokio::spawn(chaos(Chaos {
            nodes: locals.clone(),
            kills: kills.clone(),
            every: a.chaos_every,
            down: a.chaos_down,
            stop: stop.clone(),
            log: chaos_log.clone(),
            restarted: restarted.clone(),
            dir: dir.path().to_path_buf(),
        }))
    });

    let tally = Arc::new(Mutex::new(Tally::default()));
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(a.duration.as_secs().max(1));
        b.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    };
    let t0 = Instant::now();
    let end = t0 + a.duration;
    let urls = Arc::new(urls);
    let mut workers = Vec::new();
    for w in 0..a.concurrency {
        let (clients, builder) = (clients.clone(), builder.clone());
        let (urls, tally, kills) = (urls.clone(), tally.clone(), kills.clone());
        let max_tokens = a.max_tokens;
        workers.push(tokio::spawn(async move {
            let mut i = w;
            while Instant::now() < end {
                let n = i % urls.len();
                let url = &urls[n];
                let q = QUESTIONS[i % QUESTIONS.len()];
                let epoch = kills[n].load(Ordering::SeqCst);
                let c = {
                    let mut slot = clients[n].lock().unwrap_or_else(|e| e.into_inner());
                    if slot.0 != epoch {
                        if let Ok(fresh) = builder() {
                            *slot = (epoch, fresh);
                        }
                    }
                    slot.1.clone()
                };
                let mut o = one(&c, url, q, max_tokens).await;
                // Met a node as it was killed: it changed during the request, or
                // it is killed now (a request sent between the signal and the
                // process's death fails before the restart).
                let now = kills[n].load(Ordering::SeqCst);
                let met_kill = match o {
                    Outcome::Unreachable => now != epoch,
                    Outcome::Error(_) => now != epoch || now % 2 == 1,
                    _ => false,
                };
                if met_kill {
                    o = Outcome::Interrupted;
                }
                if let Outcome::Error(e) = o {
                    // When it happened, to set it beside the chaos events.
                    o = Outcome::Error(format!("{:.1}s {e}", t0.elapsed().as_secs_f64()));
                }
                // As a polite client: come back when a refusal says, and do
                // not spin on a dead node that refuses connections at once.
                let pause = match &o {
                    Outcome::Refused(_, after) => Some(after.unwrap_or(Duration::from_secs(1))),
                    Outcome::Unreachable | Outcome::Interrupted => Some(Duration::from_millis(200)),
                    _ => None,
                };
                tally.lock().unwrap_or_else(|e| e.into_inner()).add(o);
                if let Some(p) = pause {
                    tokio::time::sleep(p.min(end.saturating_duration_since(Instant::now()))).await;
                }
                i += urls.len().max(1) * 7 + 1;
            }
        }));
    }
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = tally.lock().unwrap_or_else(|e| e.into_inner());
        bar.set_position(t0.elapsed().as_secs());
        bar.set_message(format!(
            "{} ok, {} refused, {} errors, {} unreachable, {} interrupted",
            t.ok_ms.len(),
            t.refused,
            t.errors,
            t.unreachable,
            t.interrupted
        ));
    }
    for w in workers {
        let _ = w.await;
    }
    bar.finish_and_clear();
    stop.store(true, Ordering::SeqCst);
    if let Some(m) = monkey {
        m.abort();
    }
    let _ = sampler.await;
    let wall = t0.elapsed().as_secs_f64();

    // The nodes started here, and any the chaos restarted, are stopped.
    for p in own.iter_mut() {
        p.stop(Duration::from_secs(5)).await;
    }
    let kids: Vec<tokio::process::Child> =
        std::mem::take(&mut *restarted.lock().unwrap_or_else(|e| e.into_inner()));
    if a.nodes.is_empty() {
        for mut k in kids {
            let _ = k.kill().await;
        }
    } else {
        // Restarted nodes of the user's swarm keep running.
        for k in kids {
            std::mem::forget(k);
        }
    }

    let t = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    let mut ms = t.ok_ms.clone();
    ms.sort_by(f64::total_cmp);
    let peak = peak.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let max_rss = peak
        .values()
        .copied()
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let round1 = |x: Option<f64>| x.map(|v| (v * 10.0).round() / 10.0);
    let chaos_events = chaos_log.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let out = json!({
        "requests": t.requests(),
        "ok": t.ok_ms.len(),
        "refused": t.refused,
        "errors": t.errors,
        "unreachable": t.unreachable,
        "interrupted": t.interrupted,
        "p50_ms": round1(pct(&ms, 0.5)),
        "p95_ms": round1(pct(&ms, 0.95)),
        "max_ms": round1(ms.last().copied()),
        "max_rss_mb": round1(max_rss),
        "rss_mb_by_node": peak,
        "concurrency": a.concurrency,
        "duration_s": (wall * 10.0).round() / 10.0,
        "throughput_rps": ((t.ok_ms.len() as f64 / wall.max(1e-9)) * 100.0).round() / 100.0,
        "nodes": *urls,
        "chaos": a.chaos,
        "chaos_events": chaos_events,
        "status": t.statuses,
        "routes": t.routes,
        "error_samples": t.error_samples,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{} requests in {:.0} s at concurrency {}: {} ok, {} refused (429/503/504), {} errors, {} unreachable, {} interrupted by a kill",
            t.requests(),
            wall,
            a.concurrency,
            t.ok_ms.len(),
            t.refused,
            t.errors,
            t.unreachable,
            t.interrupted
        );
        let f = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.0} ms"));
        println!(
            "latency of answered: p50 {}  p95 {}  max {}",
            f(pct(&ms, 0.5)),
            f(pct(&ms, 0.95)),
            f(ms.last().copied())
        );
        println!(
            "peak RSS: {}",
            max_rss.map_or("unknown (nodes not on this machine)".into(), |v| format!(
                "{v:.0} MB"
            ))
        );
        println!("routes: {}", serde_json::to_string(&t.routes)?);
        for e in &chaos_events {
            println!("chaos: {e}");
        }
        for e in &t.error_samples {
            println!("error: {e}");
        }
    }
    Ok(if t.errors == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_seconds_when_bare() {
        assert_eq!(parse_seconds("60"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_seconds("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_seconds("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("soon").is_err());
    }

    #[test]
    fn finds_this_process_by_its_listening_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        assert_eq!(pid_on_port(port), Some(std::process::id()));
        assert!(rss_mb(std::process::id()).is_some_and(|r| r > 0.0));
        drop(l);
        assert_eq!(pid_on_port(port), None);
    }

    #[test]
    fn tally_counts_every_outcome_once() {
        let mut t = Tally::default();
        t.add(Outcome::Ok {
            ms: 5.0,
            route: "local".into(),
        });
        t.add(Outcome::Refused(429, None));
        t.add(Outcome::Unreachable);
        t.add(Outcome::Error("x".into()));
        t.add(Outcome::Interrupted);
        assert_eq!(t.requests(), 5);
        assert_eq!((t.ok_ms.len(), t.refused, t.unreachable, t.errors), (1, 1, 1, 1));
        assert_eq!(t.statuses.get("429"), Some(&1));
        assert_eq!(pct(&[1.0, 2.0, 3.0], 0.5), Some(2.0));
    }
}
