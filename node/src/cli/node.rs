//! `start` (run a swarm node), and the clients of a running node: `query` and `peers`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use swarm_node::cloud::CloudClient;
use swarm_node::config::NodeConfig;
use swarm_node::inference::engine::LoadOptions;
use swarm_node::inference::{Backend, CandleBackend, Scorer};
use swarm_node::models;
use swarm_node::network::TransportKind;
use swarm_node::node::{check_admission, load_identity, Node, NodeOptions};

use super::models::ensure;
use super::{ModelArgs, NodeArgs, ServingArgs};

#[derive(Args, Debug, Default)]
pub(crate) struct StartArgs {
    /// Node configuration file (TOML; see configs/node.toml for every key and its default).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Name shown to peers (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Model to serve: catalog id or GGUF path (repeatable; replaces the config's list).
    #[arg(long = "model", short = 'm')]
    pub models: Vec<String>,
    /// libp2p listen address (repeatable), e.g. /ip4/0.0.0.0/udp/4001/quic-v1.
    #[arg(long)]
    pub listen: Vec<String>,
    /// HTTP API address, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub http: Option<String>,
    /// Peer to dial at start, retried with backoff (repeatable), e.g.
    /// /ip4/192.0.2.7/udp/4001/quic-v1/p2p/12D3Koo….
    #[arg(long)]
    pub bootstrap: Vec<String>,
    /// Do not discover peers with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Swarm namespace: only nodes of the same namespace form a swarm.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Identity key file (ed25519), created on first start.
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// Advert period: a duration (`1s`, `500ms`) or bare milliseconds (peers
    /// expire after 3 missed periods).
    #[arg(long, value_name = "DURATION", value_parser = super::duration::parse_duration_ms)]
    pub advert_interval: Option<u64>,
    /// Answer locally at or above this confidence.
    #[arg(long)]
    pub tau_local: Option<f32>,
    /// Accept a vote at or above this agreement.
    #[arg(long)]
    pub tau_vote: Option<f32>,
    /// OpenAI-compatible cloud endpoint this node may call as gateway (e.g. http://127.0.0.1:8090/v1).
    #[arg(long)]
    pub cloud_url: Option<String>,
    /// Model name at the cloud endpoint.
    #[arg(long)]
    pub cloud_model: Option<String>,
    /// Environment variable holding the cloud API key.
    #[arg(long)]
    pub cloud_key_env: Option<String>,
    /// Environment variable holding this node's HTTP API key: clients must then
    /// send `Authorization: Bearer KEY` (the `query` and `peers` commands read
    /// it from SLM_SWARM_API_KEY or --api-key).
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
    /// Join a keyed swarm: its join token (`slmswarm1:…`, from `slm-swarm swarm init` or
    /// `swarm token`), or a file holding it. Needs --certificate. Without a token the
    /// swarm is open: any host that reaches the port is a full member.
    #[arg(long, value_name = "TOKEN")]
    pub join: Option<String>,
    /// This node's membership certificate (a file from `slm-swarm swarm invite`).
    #[arg(long, value_name = "FILE")]
    pub certificate: Option<PathBuf>,
    /// The swarm's signed revocation list (a file from `slm-swarm swarm revoke`).
    #[arg(long, value_name = "FILE")]
    pub revocations: Option<PathBuf>,
    #[command(flatten)]
    pub serving: ServingArgs,
}

impl StartArgs {
    /// The configuration file with flags applied.
    pub(crate) fn config(&self) -> anyhow::Result<NodeConfig> {
        let mut cfg = match &self.config {
            Some(p) => NodeConfig::load(p)?,
            None => NodeConfig::default(),
        };
        if let Some(n) = &self.name {
            cfg.name = n.clone();
        }
        if !self.models.is_empty() {
            cfg.models = self.models.clone();
        }
        if !self.listen.is_empty() {
            cfg.listen = self.listen.clone();
        }
        if let Some(h) = &self.http {
            cfg.http = h.clone();
        }
        if !self.bootstrap.is_empty() {
            cfg.bootstrap = self.bootstrap.clone();
        }
        if self.no_mdns {
            cfg.mdns = false;
        }
        if let Some(ns) = &self.namespace {
            cfg.namespace = ns.clone();
        }
        if let Some(i) = &self.identity {
            cfg.identity = i.display().to_string();
        }
        if let Some(ms) = self.advert_interval {
            cfg.advert_interval_ms = ms;
        }
        if let Some(v) = &self.api_key_env {
            cfg.api.api_key_env = v.clone();
        }
        if let Some(j) = &self.join {
            cfg.swarm.join = j.clone();
        }
        if let Some(c) = &self.certificate {
            cfg.swarm.certificate = c.display().to_string();
        }
        if let Some(r) = &self.revocations {
            cfg.swarm.revocations = r.display().to_string();
        }
        if let Some(t) = self.tau_local {
            cfg.routing.tau_local = t;
        }
        if let Some(t) = self.tau_vote {
            cfg.routing.tau_vote = t;
        }
        if self.cloud_url.is_some() || self.cloud_model.is_some() || self.cloud_key_env.is_some() {
            let mut c = cfg.cloud.clone().unwrap_or_default();
            if let Some(u) = &self.cloud_url {
                c.base_url = u.clone();
            }
            if let Some(m) = &self.cloud_model {
                c.model = m.clone();
            }
            if let Some(k) = &self.cloud_key_env {
                c.api_key_env = Some(k.clone());
            }
            cfg.cloud = Some(c);
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Load every configured model (fetching catalog models on first use).
pub(super) fn load_backends(common: &ModelArgs, specs: &[String]) -> anyhow::Result<Vec<Box<dyn Backend>>> {
    let mut out: Vec<Box<dyn Backend>> = Vec::new();
    for spec in specs {
        let t0 = Instant::now();
        let r = ensure(common, spec)?;
        let scorer = r
            .entry
            .as_ref()
            .and_then(|e| e.scorer.as_deref())
            .map(|s| s.parse::<Scorer>())
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let be = CandleBackend::load(
            &r.path,
            LoadOptions {
                id: r.id.clone(),
                domains: r.entry.as_ref().map(|e| e.domains.clone()).unwrap_or_default(),
                scorer,
                default_system: r.entry.as_ref().and_then(|e| e.system.clone()),
            },
        )
        .with_context(|| format!("loading {}", r.path.display()))?;
        tracing::info!("loaded {} in {:.1} s", r.id, t0.elapsed().as_secs_f64());
        out.push(Box::new(be));
    }
    if out.is_empty() {
        bail!("no model to serve: give --model ID or set `models` in the config");
    }
    Ok(out)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Serve `node`'s HTTP API until SIGINT/SIGTERM; in-flight requests get a grace period.
pub(super) async fn serve_http(node: Node, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let app = swarm_node::api::router(node.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    shutdown_signal().await;
    eprintln!("shutting down: finishing in-flight requests (up to 10 s)…");
    // Live feeds (the page) never end on their own.
    node.events.close();
    let _ = stop_tx.send(());
    if tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .is_err()
    {
        eprintln!("in-flight requests cancelled");
    }
    node.shutdown().await;
    Ok(())
}

pub(super) fn start(a: StartArgs) -> anyhow::Result<ExitCode> {
    let cfg = a.config()?;
    if !cfg.api.api_key_env.is_empty() && cfg.api.key().is_none() {
        bail!(
            "the API key variable {} is not set (or empty): export it, or drop --api-key-env / \
             [api] api_key_env to run without a key",
            cfg.api.api_key_env
        );
    }
    let home = models::home_dir();
    let id_path = cfg.identity_path(&home);
    let (key, lock) = load_identity(&id_path)?;
    // Refuse a bad certificate before spending time on loading models.
    check_admission(&cfg, &key.public().to_peer_id())?;
    let backends = load_backends(&a.serving.common, &cfg.models)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let http = cfg.http.clone();
        let listener = swarm_node::api::bind(&http)
            .await
            .with_context(|| format!("cannot listen for HTTP on {http}"))?;
        let local_http = listener.local_addr()?;
        if cfg.api.key().is_none() && !local_http.ip().is_loopback() {
            tracing::warn!(
                "HTTP API on {local_http} WITHOUT A KEY: anyone who reaches it may ask, force the cloud \
                 route and read the swarm. Set one with --api-key-env VAR (or [api] api_key_env)"
            );
        }
        let cloud = match &cfg.cloud {
            Some(c) => {
                let mut c = c.clone();
                // Beside the identity key: one budget per node, and the key's
                // lock already keeps a second process off the same file.
                c.budget_file
                    .get_or_insert_with(|| id_path.with_extension("cloud-budget.json").display().to_string());
                let client = CloudClient::new(c)?;
                client.spawn_prober();
                client.spawn_budget_writer();
                Some(client)
            }
            None => None,
        };
        let (node, _task) = Node::start(NodeOptions {
            cfg,
            key,
            backends,
            transport: TransportKind::Quic,
            identity_lock: Some(lock),
            cloud,
        })
        .await?;
        // Wait briefly for the listeners so the addresses can be printed.
        let t0 = Instant::now();
        let mut addrs = Vec::new();
        while t0.elapsed() < Duration::from_secs(3) {
            addrs = node.net.listen_addrs().await.unwrap_or_default();
            if !addrs.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("slm-swarm node `{}` started", node.name);
        println!("peer id: {}", node.peer_id);
        println!("models: {}", node.models.ids().join(", "));
        println!("namespace: {}", node.cfg.namespace);
        match &node.admission {
            Some(a) => println!(
                "swarm: {} (keyed; this node: {}, certificate serial {})",
                a.token.swarm, a.cert.role, a.cert.serial
            ),
            None => println!("swarm: OPEN (no join token: any host reaching the port is a member)"),
        }
        println!("identity: {}", id_path.display());
        for a in &addrs {
            println!("listening: {a}/p2p/{}", node.peer_id);
        }
        if let Some(c) = &node.cloud {
            println!("cloud: {c} (this node may become the gateway)");
        }
        if let Some(f) = node.cloud_client.as_ref().and_then(|c| c.budget_file()) {
            println!("cloud budget: {}", f.display());
        }
        println!("http: http://{local_http}");
        serve_http(node, listener).await
    })?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub(crate) struct QueryArgs {
    #[command(flatten)]
    pub target: NodeArgs,
    /// Model (default: the node's default model).
    #[arg(long, short)]
    pub model: Option<String>,
    /// Route: auto (confidence decides), local, vote or cloud.
    #[arg(long, default_value = "auto")]
    pub route: String,
    /// Privacy: device, swarm or cloud (default: the node's).
    #[arg(long)]
    pub privacy: Option<String>,
    /// The query's team: only peers serving it see the query.
    #[arg(long)]
    pub team: Option<String>,
    /// Most tokens to generate.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Print the whole JSON response (with the `swarm` provenance); does not stream.
    #[arg(long)]
    pub json: bool,
    /// Wait for the whole answer instead of printing tokens as they arrive.
    #[arg(long)]
    pub no_stream: bool,
    /// The question.
    pub text: String,
}

fn client(target: &NodeArgs) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(k) = target.api_key.as_deref().filter(|k| !k.is_empty()) {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {k}"))
            .context("the API key has characters a header cannot carry")?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .default_headers(headers)
        .build()?)
}

fn endpoint(node: &str, path: &str) -> String {
    format!("{}{path}", node.trim_end_matches('/'))
}

async fn check(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let body: Value = resp.json().await.context("reading the node's answer")?;
    if !status.is_success() {
        let msg = body["error"]["message"].as_str().unwrap_or("unknown error");
        if status == reqwest::StatusCode::UNAUTHORIZED {
            bail!("node answered {status}: {msg}. Pass its key with --api-key or SLM_SWARM_API_KEY");
        }
        bail!("node answered {status}: {msg}");
    }
    Ok(body)
}

pub(super) fn query(a: QueryArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut swarm = json!({"route": a.route});
        if let Some(p) = &a.privacy {
            swarm["privacy"] = json!(p);
        }
        if let Some(t) = &a.team {
            swarm["team"] = json!(t);
        }
        // --json prints the one whole response, so it does not stream.
        let stream = !a.no_stream && !a.json;
        let mut body = json!({
            "messages": [{"role": "user", "content": a.text}],
            "swarm": swarm,
            "stream": stream,
        });
        if let Some(m) = &a.model {
            body["model"] = json!(m);
        }
        if let Some(n) = a.max_tokens {
            body["max_tokens"] = json!(n);
        }
        let resp = client(&a.target)?
            .post(endpoint(&a.target.node, "/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .map_err(|e| unreachable_node(&a.target.node, e))?;
        if stream && resp.status().is_success() {
            let prov = print_stream(resp).await?;
            print_provenance(&prov);
            return Ok(ExitCode::SUCCESS);
        }
        let v = check(resp).await?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(ExitCode::SUCCESS);
        }
        println!("{}", v["choices"][0]["message"]["content"].as_str().unwrap_or(""));
        print_provenance(&v["swarm"]);
        Ok(ExitCode::SUCCESS)
    })
}

/// A node that cannot be reached, with what to do about it.
fn unreachable_node(node: &str, e: reqwest::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot reach the node at {node}: {e}. Is one running? Start one with `slm-swarm start` \
         (or `slm-swarm demo` for a whole local swarm), or point at another with --node URL \
         (or SLM_SWARM_NODE)"
    )
}

/// Print the content deltas of an SSE answer as they arrive; the `swarm`
/// provenance of its last chunk is returned (an error chunk is an error).
async fn print_stream(resp: reqwest::Response) -> anyhow::Result<Value> {
    use futures::StreamExt;
    use std::io::Write;
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut prov = Value::Null;
    let mut out = std::io::stdout();
    let mut wrote_any = false;
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.context("reading the node's answer")?);
        // Frames end with a blank line; a frame may arrive in pieces.
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = buf.drain(..end + 2).collect();
            for line in String::from_utf8_lossy(&frame).lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data).context("the node sent a malformed chunk")?;
                if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                    out.write_all(t.as_bytes())?;
                    out.flush()?;
                    wrote_any |= !t.is_empty();
                }
                if !v["swarm"].is_null() {
                    prov = v["swarm"].clone();
                }
            }
        }
    }
    if wrote_any {
        println!();
    }
    if let Some(e) = prov["error"].as_str() {
        bail!("the node failed while answering: {e}");
    }
    if prov.is_null() {
        bail!("the answer stream ended before the answer was complete");
    }
    Ok(prov)
}

/// The route line and the voters of an answer's `swarm` provenance.
fn print_provenance(s: &Value) {
    println!(
        "\n[route {} · model {} · confidence {:.2} · {} ms{}]",
        s["route"].as_str().unwrap_or("?"),
        s["model"].as_str().unwrap_or("?"),
        s["confidence"].as_f64().unwrap_or(0.0),
        s["elapsed_ms"].as_u64().unwrap_or(0),
        if s["degraded"].as_bool() == Some(true) {
            format!(" · degraded: {}", s["degraded_reason"].as_str().unwrap_or(""))
        } else {
            String::new()
        }
    );
    if let Some(voters) = s["voters"].as_array().filter(|v| !v.is_empty()) {
        for vt in voters {
            let peer = vt["peer"].as_str().unwrap_or("");
            let short = peer.get(peer.len().saturating_sub(8)..).unwrap_or(peer);
            match vt["error"].as_str() {
                Some(e) => println!(
                    "  voter …{short} {}: error: {e}",
                    vt["model"].as_str().unwrap_or("")
                ),
                None => println!(
                    "  voter …{short} {}: {} ({:.2}, {} ms)",
                    vt["model"].as_str().unwrap_or(""),
                    vt["answer"].as_str().unwrap_or("").lines().next().unwrap_or(""),
                    vt["confidence"].as_f64().unwrap_or(0.0),
                    vt["elapsed_ms"].as_u64().unwrap_or(0)
                ),
            }
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct PeersArgs {
    #[command(flatten)]
    pub target: NodeArgs,
    /// Print JSON (`GET /v1/swarm/peers`).
    #[arg(long)]
    pub json: bool,
}

pub(super) fn peers(a: PeersArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let resp = client(&a.target)?
            .get(endpoint(&a.target.node, "/v1/swarm/peers"))
            .send()
            .await
            .map_err(|e| unreachable_node(&a.target.node, e))?;
        let v = check(resp).await?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(ExitCode::SUCCESS);
        }
        let models = |p: &Value| {
            p["models"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .filter_map(|x| x["id"].as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default()
        };
        let me = &v["self"];
        println!(
            "self  {}  {:<16} {}",
            me["peer_id"].as_str().unwrap_or(""),
            me["name"].as_str().unwrap_or(""),
            models(me)
        );
        for p in v["peers"].as_array().into_iter().flatten() {
            println!(
                "peer  {}  {:<16} {:<40} queue {} load {:.2} seen {} ms ago",
                p["peer_id"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or(""),
                models(p),
                p["capacity"]["queue"],
                p["capacity"]["cpu_load"].as_f64().unwrap_or(0.0),
                p["last_seen_ms"]
            );
        }
        match v["gateway"]["peer_id"].as_str() {
            Some(g) => println!("gateway: {g} (term {})", v["gateway"]["term"]),
            None => println!("gateway: none"),
        }
        Ok(ExitCode::SUCCESS)
    })
}
