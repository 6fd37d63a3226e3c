//! The OpenAI-compatible HTTP API (axum): chat completions (JSON and SSE
//! streaming) with the `swarm` extension and provenance, models of the whole
//! swarm, peers, gateway, health and Prometheus metrics. One `ApiError` maps
//! every failure to OpenAI's error JSON with the right status code.

mod guard;
mod swap;
mod types;
mod ui;
mod workflow;

use std::convert::Infallible;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};

use crate::metrics::SwarmGauges;
use crate::node::Node;
use crate::router::{Answer, ChatEvent, ChatRequest, RouteError};
pub use types::{ChatCompletionRequest, ErrorBody};

/// An error as OpenAI's API reports it.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
}

impl ApiError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: msg.into(),
            kind: "invalid_request_error",
            param: None,
        }
    }

    fn with_param(mut self, p: &str) -> Self {
        self.param = Some(p.to_string());
        self
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        let (status, kind) = match &e {
            RouteError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            RouteError::UnknownModel(_) => (StatusCode::NOT_FOUND, "model_not_found"),
            RouteError::NoPeer { .. } => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
            RouteError::Overloaded(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded"),
            RouteError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error"),
            RouteError::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            RouteError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        Self {
            status,
            message: e.to_string(),
            kind,
            param: None,
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return Self {
                status,
                message: "request body is too large".into(),
                kind: "invalid_request_error",
                param: None,
            };
        }
        Self::bad_request(format!("malformed request: {}", r.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status.as_u16(),
            }
        });
        (self.status, Json(body)).into_response()
    }
}

/// Connections the kernel may hold for the HTTP server before it accepts
/// them. The default of std, mio and tokio (128) overflows in an office
/// burst: the dropped SYNs are retried a second later, so a burst that the
/// node refuses within milliseconds would see one-second stalls.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Listen for HTTP on `addr` (host:port, names resolved) with [`LISTEN_BACKLOG`].
pub async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let sock = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        match sock.bind(a).and_then(|()| sock.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} names no address"),
        )
    }))
}

/// The HTTP API of `node`, behind its `[api]` checks (host, key, concurrency cap).
pub fn router(node: Node) -> Router {
    let limit = node.cfg.max_body_bytes;
    let api = node.cfg.api.clone();
    // A chat's own deadline plus a margin: the layer only catches what hangs past it.
    let deadline = Duration::from_millis(node.cfg.request_timeout_ms.saturating_add(5_000));
    let page = node.cfg.ui.enabled;
    let mut r = Router::new();
    if page {
        r = r.route("/", get(ui::page)).route("/ui", get(ui::page));
    }
    let app = r
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/swarm/events", get(ui::events))
        .route("/v1/models", get(models))
        .route("/v1/swarm/models", post(swap::swap))
        .route("/v1/swarm/peers", get(peers))
        .route("/v1/swarm/gateway", get(gateway))
        .route("/v1/swarm/workflows", post(workflow::run))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint".into(),
                kind: "invalid_request_error",
                param: None,
            }
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(node);
    guard::wrap(app, &api, deadline, limit)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn chat_completions(
    State(node): State<Node>,
    body: Result<Json<ChatCompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let stream = body.stream.unwrap_or(false);
    let want_logprobs = body.logprobs.unwrap_or(false);
    let req = body.into_request(&node)?;
    let id = format!("chatcmpl-{:x}", node.router.next_id());
    if stream {
        return Ok(stream_response(node, req, id).await?.into_response());
    }
    let outer = req.deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
    let answer = match tokio::time::timeout(outer, node.router.chat(req)).await {
        Ok(r) => r?,
        Err(_) => return Err(RouteError::Timeout.into()),
    };
    Ok(Json(completion_json(&id, &answer, want_logprobs)).into_response())
}

fn logprobs_json(a: &Answer) -> Value {
    let content: Vec<Value> = a
        .tokens
        .iter()
        .map(|t| {
            json!({
                "token": t.text,
                "logprob": t.logprob,
                "bytes": t.text.as_bytes(),
                "top_logprobs": t.top.iter().map(|(s, l)| json!({"token": s, "logprob": l, "bytes": s.as_bytes()})).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "content": content })
}

fn completion_json(id: &str, a: &Answer, want_logprobs: bool) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": unix_now(),
        "model": a.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": a.text},
            "logprobs": if want_logprobs { logprobs_json(a) } else { Value::Null },
            "finish_reason": a.finish_reason,
        }],
        "usage": {
            "prompt_tokens": a.prompt_tokens,
            "completion_tokens": a.completion_tokens,
            "total_tokens": a.prompt_tokens + a.completion_tokens,
        },
        "swarm": a.prov,
    })
}

fn chunk(id: &str, model: &str, delta: Value, finish: Option<&str>, extra: Option<(&str, Value)>) -> Event {
    let mut v = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": unix_now(),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    if let (Some((k, x)), Some(obj)) = (extra, v.as_object_mut()) {
        obj.insert(k.to_string(), x);
    }
    Event::default().data(v.to_string())
}

type EventStream = std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>>;
type SseStream = Sse<axum::response::sse::KeepAliveStream<EventStream>>;

/// SSE over the router's event stream: each token a content delta, then a last
/// chunk with the finish reason and the `swarm` provenance. An error before the
/// first event is an HTTP error; one after it ends the stream with an error chunk.
async fn stream_response(node: Node, req: ChatRequest, id: String) -> Result<SseStream, ApiError> {
    // Chunks before the last name the requested model; the last names the one that answered.
    let model = match req.model.as_deref() {
        None | Some("") | Some("auto") | Some("swarm") => node.models.default_id().to_string(),
        Some(m) => m.to_string(),
    };
    let mut events = node.router.chat_stream(req);
    let first = match events.next().await {
        Some(Ok(ev)) => ev,
        Some(Err(e)) => return Err(e.into()),
        None => return Err(RouteError::Internal("no answer".into()).into()),
    };
    let head = stream::once({
        let (id, model) = (id.clone(), model.clone());
        async move { Ok(chunk(&id, &model, json!({"role": "assistant"}), None, None)) }
    });
    let body = stream::once(async move { Ok(first) })
        .chain(events)
        .map(move |ev| {
            Ok(match ev {
                Ok(ChatEvent::Token(t)) => chunk(&id, &model, json!({"content": t}), None, None),
                Ok(ChatEvent::Done(a)) => {
                    let prov = serde_json::to_value(&a.prov).unwrap_or(Value::Null);
                    chunk(
                        &id,
                        &a.model,
                        json!({}),
                        Some(&a.finish_reason),
                        Some(("swarm", prov)),
                    )
                }
                Err(e) => chunk(
                    &id,
                    &model,
                    json!({}),
                    Some("error"),
                    Some(("swarm", json!({"error": e.to_string()}))),
                ),
            })
        });
    let done_ev = stream::once(async { Ok(Event::default().data("[DONE]")) });
    let s = head.chain(body).chain(done_ev);
    Ok(Sse::new(Box::pin(s) as EventStream).keep_alive(KeepAlive::default()))
}

/// `GET /v1/models`: every model this node or a peer serves, with who serves
/// which version (sha256 of the weights); this node's own models also say
/// whether they are advertised and their gate verdict.
async fn models(State(node): State<Node>) -> Json<Value> {
    let view = node.snapshot();
    let mut by_model: std::collections::BTreeMap<String, (Vec<String>, Vec<Value>)> = Default::default();
    let me = node.peer_id.to_string();
    let mut local = std::collections::BTreeMap::new();
    for s in node.models.status() {
        let e = by_model.entry(s.id.clone()).or_default();
        e.0.push(me.clone());
        e.1.push(json!({"peer": me, "version": s.version, "sha256": s.sha256}));
        local.insert(s.id.clone(), s);
    }
    for p in &view.peers {
        for m in &p.advert.models {
            let e = by_model.entry(m.id.clone()).or_default();
            e.0.push(p.advert.peer.clone());
            e.1.push(json!({"peer": p.advert.peer, "version": m.version, "sha256": m.sha256}));
        }
    }
    let data: Vec<Value> = by_model
        .into_iter()
        .map(|(id, (peers, versions))| {
            let mut v = json!({"id": id, "object": "model", "created": 0, "owned_by": "slm-swarm",
                               "peers": peers, "versions": versions});
            if let Some(s) = local.get(&id) {
                v["local"] = json!({"version": s.version, "sha256": s.sha256,
                                    "advertised": s.advertised, "gate": s.gate});
            }
            v
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

fn peer_json(a: &swarm_protocol::Advert) -> Value {
    json!({
        "peer_id": a.peer,
        "name": a.name,
        "version": a.version,
        "addrs": a.addrs,
        "models": a.models.iter().map(|m| json!({
            "id": m.id, "arch": m.arch, "params": m.params, "quant": m.quant, "ctx": m.ctx,
            "domains": m.domains, "tok_s": m.tok_s, "version": m.version, "sha256": m.sha256,
        })).collect::<Vec<_>>(),
        "capacity": {
            "cores": a.capacity.cores, "cpu_load": a.capacity.cpu_load, "mem_free_mb": a.capacity.mem_free_mb,
            "queue": a.capacity.queue, "max_concurrency": a.capacity.max_concurrency,
        },
        "cloud": a.cloud.as_ref().map(|c| json!({"reachable": c.reachable, "budget_left": c.budget_left, "priority": c.priority})),
        "gateway_term": a.gateway.map(|g| g.term),
    })
}

async fn peers(State(node): State<Node>) -> Json<Value> {
    Json(swarm_json(&node))
}

/// This node, its peers and the gateway: `GET /v1/swarm/peers` and the page's `swarm` events.
pub(crate) fn swarm_json(node: &Node) -> Value {
    let view = node.snapshot();
    let mut me = peer_json(&view.me);
    if let Some(o) = me.as_object_mut() {
        o.insert("peer_id".into(), json!(node.peer_id.to_string()));
        o.insert("name".into(), json!(node.name));
        if let Some(c) = &node.cloud_client {
            // This node's own budget, live rather than as of its last advert,
            // with the tokens left that the advert has no room for.
            let st = c.status();
            o.insert(
                "cloud".into(),
                json!({"reachable": st.reachable, "budget_left": st.budget_left,
                       "tokens_left": st.tokens_left, "priority": c.priority()}),
            );
        }
        // Keyed swarm with a certificate that verified at start (open swarm: false).
        o.insert("admitted".into(), json!(node.admission.is_some()));
    }
    let peers: Vec<Value> = view
        .peers
        .iter()
        .map(|p| {
            let mut v = peer_json(&p.advert);
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "last_seen_ms".into(),
                    json!(p.last_seen.elapsed().as_millis() as u64),
                );
            }
            v
        })
        .collect();
    json!({"self": me, "peers": peers, "gateway": gateway_json(node)})
}

fn gateway_json(node: &Node) -> Value {
    match &node.snapshot().gateway {
        Some(g) => {
            json!({"peer_id": g.peer, "term": g.term, "since_ms": g.since.elapsed().as_millis() as u64})
        }
        None => json!({"peer_id": null}),
    }
}

async fn gateway(State(node): State<Node>) -> Json<Value> {
    Json(gateway_json(&node))
}

async fn healthz(State(node): State<Node>) -> Json<Value> {
    let view = node.snapshot();
    Json(json!({
        "status": "ok",
        "peer_id": node.peer_id.to_string(),
        "name": node.name,
        "models": node.models.ids(),
        "peers": view.peers.len(),
        "uptime_s": node.started.elapsed().as_secs(),
    }))
}

/// The gauges' reading now.
fn swarm_gauges(node: &Node) -> SwarmGauges {
    let view = node.snapshot();
    let me = node.peer_id.to_string();
    let cloud_budget_left = match (&node.cloud_client, &view.gateway) {
        (Some(c), _) => u64::from(c.status().budget_left),
        (None, Some(g)) => view
            .peer(&g.peer)
            .and_then(|p| p.advert.cloud.as_ref())
            .map(|c| u64::from(c.budget_left))
            .unwrap_or(0),
        (None, None) => 0,
    };
    SwarmGauges {
        peers: view.peers.len(),
        gateway_term: view.gateway.as_ref().map(|g| g.term).unwrap_or(0),
        gateway_is_self: view.gateway.as_ref().is_some_and(|g| g.peer == me),
        cloud_budget_left,
        models: node
            .models
            .ids()
            .into_iter()
            .filter_map(|id| node.models.get(&id).map(|h| (id.clone(), h.load())))
            // One worker thread per model runs one job; the rest wait.
            .map(|(id, load)| (id, load.saturating_sub(1), load))
            .collect(),
    }
}

async fn metrics(State(node): State<Node>) -> impl IntoResponse {
    node.metrics.set_swarm(&swarm_gauges(&node));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        node.metrics.render(),
    )
}
