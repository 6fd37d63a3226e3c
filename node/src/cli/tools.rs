//! `serve` (a plain OpenAI-compatible server with no swarm, e.g. the cloud
//! stand-in, optionally requiring an API key and logging every request) and
//! `bench-vote` (vote overhead among three nodes on loopback).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use clap::Args;
use libp2p::identity::Keypair;
use serde_json::json;
use swarm_node::config::NodeConfig;
use swarm_node::inference::testing::FakeBackend;
use swarm_node::inference::Backend;
use swarm_node::network::TransportKind;
use swarm_node::node::{Node, NodeOptions};
use swarm_node::router::{ChatRequest, SwarmExt};
use swarm_protocol::{Privacy, RouteOverride};

use super::node::{load_backends, serve_http, StartArgs};
use super::{ModelArgs, ServingArgs};

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Model to serve: catalog id or GGUF path (repeatable).
    #[arg(long = "model", short = 'm', required = true)]
    pub models: Vec<String>,
    /// HTTP API address.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub http: String,
    /// Name reported in answers.
    #[arg(long, default_value = "serve")]
    pub name: String,
    /// Cloud endpoint behind this server (same as `start`; rarely useful here).
    #[arg(long)]
    pub cloud_url: Option<String>,
    #[arg(long)]
    pub cloud_model: Option<String>,
    #[arg(long)]
    pub cloud_key_env: Option<String>,
    /// Require `Authorization: Bearer <key>` on every request, the key being the
    /// value of this environment variable (401 otherwise), as a real cloud API does.
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// Append one JSON line per request received to this file: time, method,
    /// path, status, ms and whether an Authorization header came and matched
    /// (never the header itself).
    #[arg(long)]
    pub request_log: Option<PathBuf>,
    #[command(flatten)]
    pub serving: ServingArgs,
}

/// What the request guard of `serve` checks and records.
#[derive(Clone)]
struct Guard {
    /// The expected `Authorization` value (`Bearer <key>`), when a key is required.
    expected: Option<Arc<String>>,
    log: Option<Arc<Mutex<std::fs::File>>>,
}

/// Checks the key (when one is required) and logs the request (when asked);
/// the header's value is compared, never written anywhere.
async fn guard(State(g): State<Guard>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec());
    let auth = match (&g.expected, &given) {
        (_, None) => "missing",
        (None, Some(_)) => "present",
        (Some(want), Some(got)) if got.as_slice() == want.as_bytes() => "valid",
        (Some(_), Some(_)) => "invalid",
    };
    let resp = if g.expected.is_some() && auth != "valid" {
        let body = json!({"error": {"message": "invalid or missing API key", "type": "invalid_request_error",
                                    "param": null, "code": "invalid_api_key"}});
        (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
    } else {
        next.run(req).await
    };
    if let Some(log) = &g.log {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let line = json!({"unix_ms": unix_ms, "method": method, "path": path, "auth": auth,
                          "status": resp.status().as_u16(), "ms": t0.elapsed().as_millis() as u64});
        if let Ok(mut f) = log.lock() {
            // A failed log write must not fail the request it describes.
            let _ = writeln!(f, "{line}");
        }
    }
    resp
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A node that joins no swarm and always answers with its own model.
pub(super) fn serve(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let start = StartArgs {
        models: a.models.clone(),
        http: Some(a.http.clone()),
        name: Some(a.name.clone()),
        no_mdns: true,
        cloud_url: a.cloud_url.clone(),
        cloud_model: a.cloud_model.clone(),
        cloud_key_env: a.cloud_key_env.clone(),
        ..StartArgs::default()
    };
    let mut cfg = start.config()?;
    cfg.listen.clear();
    cfg.bootstrap.clear();
    cfg.mdns = false;
    cfg.routing.tau_local = 0.0;
    cfg.routing.safety = false;
    cfg.routing.privacy = Privacy::Device;
    let expected = match &a.api_key_env {
        Some(env) => {
            let key = std::env::var(env).unwrap_or_default();
            if key.trim().is_empty() {
                bail!("--api-key-env: environment variable `{env}` is not set or empty");
            }
            Some(Arc::new(format!("Bearer {}", key.trim())))
        }
        None => None,
    };
    let log = match &a.request_log {
        Some(p) => Some(Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open the request log {}", p.display()))?,
        ))),
        None => None,
    };
    let guard_state = Guard { expected, log };
    let backends = load_backends(&a.serving.common, &cfg.models)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = swarm_node::api::bind(&cfg.http)
            .await
            .with_context(|| format!("cannot listen for HTTP on {}", cfg.http))?;
        let local = listener.local_addr()?;
        let (node, _t) = Node::start(NodeOptions {
            cfg,
            // No network identity worth keeping: this server joins no swarm.
            key: Keypair::generate_ed25519(),
            backends,
            transport: TransportKind::Quic,
            identity_lock: None,
            cloud: None,
        })
        .await?;
        println!("slm-swarm serve: {}", node.models.ids().join(", "));
        println!("peer id: {}", node.peer_id);
        println!("http: http://{local}");
        println!("OpenAI base URL: http://{local}/v1");
        if guard_state.expected.is_none() && guard_state.log.is_none() {
            return serve_http(node, listener).await;
        }
        let app =
            swarm_node::api::router(node.clone()).layer(middleware::from_fn_with_state(guard_state, guard));
        axum::serve(listener, app)
            .with_graceful_shutdown(stop_signal())
            .await?;
        node.shutdown().await;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub(crate) struct BenchVoteArgs {
    /// Votes to run (after a few warm-up votes).
    #[arg(long, default_value_t = 60)]
    pub votes: usize,
    /// Three models, one per node (ids or GGUF paths). Default: stand-in
    /// models answering after --latency-ms, so only the vote machinery is timed.
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// Inference time of the stand-in models: a duration (20ms, 1s) or bare ms.
    #[arg(long, alias = "latency", value_name = "DURATION", default_value = "20ms",
          value_parser = super::duration::parse_duration_ms_or_zero)]
    pub latency_ms: u64,
    /// Print JSON: votes, overhead_ms_p50, overhead_ms_p95, …
    #[arg(long)]
    pub json: bool,
    /// Compute threads for real models.
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub common: ModelArgs,
}

fn pct(xs: &mut [f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let i = ((xs.len() - 1) as f64 * p).round() as usize;
    xs[i]
}

/// Three in-process nodes over QUIC on loopback; node 1 coordinates every vote.
pub(super) fn bench_vote(a: BenchVoteArgs) -> anyhow::Result<ExitCode> {
    if a.votes == 0 {
        bail!("--votes must be at least 1");
    }
    if !a.models.is_empty() && a.models.len() != 3 {
        bail!("give exactly three --model (one per node), or none for stand-in models");
    }
    let mut backends: Vec<Box<dyn Backend>> = Vec::new();
    if a.models.is_empty() {
        for (i, id) in ["stand-in-a", "stand-in-b", "stand-in-c"].iter().enumerate() {
            backends.push(Box::new(FakeBackend::new(
                id,
                i as u64,
                Duration::from_millis(a.latency_ms),
                0.6,
            )));
        }
    } else {
        backends = load_backends(&a.common, &a.models)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (overheads, walls, n) = rt.block_on(async move {
        let mut nodes: Vec<Node> = Vec::new();
        let ns = format!("bench-vote-{}", std::process::id());
        for (i, b) in backends.into_iter().enumerate() {
            let mut cfg = NodeConfig {
                name: format!("bench-{i}"),
                namespace: ns.clone(),
                listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".into()],
                mdns: false,
                advert_interval_ms: 250,
                ..NodeConfig::default()
            };
            cfg.routing.quorum = 1;
            if let Some(first) = nodes.first() {
                let addrs = first.net.listen_addrs().await.unwrap_or_default();
                cfg.bootstrap = addrs
                    .iter()
                    .map(|x| format!("{x}/p2p/{}", first.peer_id))
                    .collect();
            }
            let (node, _t) = Node::start(NodeOptions {
                cfg,
                key: Keypair::generate_ed25519(),
                backends: vec![b],
                transport: TransportKind::Quic,
                identity_lock: None,
                cloud: None,
            })
            .await?;
            let t0 = Instant::now();
            while node.net.listen_addrs().await.unwrap_or_default().is_empty()
                && t0.elapsed() < Duration::from_secs(5)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            nodes.push(node);
        }
        let t0 = Instant::now();
        while nodes.iter().any(|n| n.snapshot().peers.len() < 2) {
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the three nodes did not find each other within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let coord = nodes[0].clone();
        let mut overheads = Vec::new();
        let mut walls = Vec::new();
        let warmup = 5;
        for i in 0..a.votes + warmup {
            let ext = SwarmExt {
                route: RouteOverride::Vote,
                privacy: Some(Privacy::Swarm),
                ..SwarmExt::default()
            };
            let req = ChatRequest::mcq(
                &format!("Question {i}: which is a mammal?"),
                &["shark", "dolphin", "trout", "eel"],
                16,
                ext,
                Duration::from_secs(120),
            );
            let ans = coord.router.chat(req).await?;
            let p = ans.prov;
            let Some(vote_ms) = p.vote_ms else {
                bail!("vote {i} did not run: route {}", p.route)
            };
            let remote: Vec<u64> = p.voters.iter().skip(1).filter_map(|v| v.inference_ms).collect();
            if remote.is_empty() {
                bail!("vote {i} got no remote answer: {:?}", p.voters);
            }
            if i >= warmup {
                let slowest = remote.iter().copied().max().unwrap_or(0) as f64;
                overheads.push(vote_ms - slowest);
                walls.push(vote_ms);
            }
        }
        for n in &nodes {
            n.shutdown().await;
        }
        Ok::<_, anyhow::Error>((overheads, walls, a.votes))
    })?;
    let (mut o, mut w) = (overheads, walls);
    let out = json!({
        "votes": n,
        "voters_per_vote": 2,
        "overhead_ms_p50": pct(&mut o, 0.5),
        "overhead_ms_p95": pct(&mut o, 0.95),
        "vote_ms_p50": pct(&mut w, 0.5),
        "vote_ms_p95": pct(&mut w, 0.95),
        "inference": if a.models.is_empty() { format!("stand-in models, {} ms each", a.latency_ms) } else { a.models.join(",") },
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{} votes among 3 nodes on loopback: overhead p50 {:.2} ms, p95 {:.2} ms (vote wall time p50 {:.2} ms)",
            n, out["overhead_ms_p50"].as_f64().unwrap_or(0.0), out["overhead_ms_p95"].as_f64().unwrap_or(0.0),
            out["vote_ms_p50"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(ExitCode::SUCCESS)
}
