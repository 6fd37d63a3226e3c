//! Tests of the cloud client against a local OpenAI-compatible mock server.
//!
//! The mock is deliberate: a real cloud endpoint cannot be reached from this
//! sandbox or CI, so a tiny axum server on 127.0.0.1:0 speaks the same wire
//! format (JSON and SSE), checks the bearer key and records every request, which
//! lets the tests prove what did and did not go over the network.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};

use super::*;

const KEY: &str = "sk-mock-SECRET-0123456789abcdef";
const T0: u64 = 1_700_000_000_000;
const PIECES: [&str; 6] = ["Hel", "lo", ", ", "wor", "ld", "!"];

#[derive(Clone, Default)]
struct Mode {
    delay_ms: u64,
    fail: Option<(u16, String)>,
    malformed: bool,
    /// Stream: send the first piece, then go silent.
    stall_stream: bool,
    /// Stream: close after the pieces, without finish_reason or [DONE].
    cut_stream: bool,
    /// Stream requested, but answer plain JSON (servers without streaming).
    ignore_stream: bool,
    /// Replaces the `usage` object of plain answers (`Value::Null`: none).
    usage: Option<Value>,
    /// Replaces the answer: plain content, or the streamed pieces.
    answer: Option<Vec<String>>,
    /// Stream: an `error` event with this message after the pieces.
    stream_error: Option<String>,
    /// Stream: bytes per body chunk (default 7, so boundaries fall mid-event).
    chunk_bytes: Option<usize>,
}

#[derive(Clone, Debug)]
struct Recorded {
    path: &'static str,
    auth: Option<String>,
    body: Value,
}

struct MockState {
    key: Option<String>,
    log: Mutex<Vec<Recorded>>,
    mode: Mutex<Mode>,
}

struct Mock {
    addr: SocketAddr,
    state: Arc<MockState>,
}

impl Mock {
    async fn start(key: Option<&str>) -> Mock {
        let state = Arc::new(MockState {
            key: key.map(str::to_string),
            log: Mutex::new(Vec::new()),
            mode: Mutex::new(Mode::default()),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(mock_chat))
            .route("/v1/models", get(mock_models))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind mock");
        let addr = listener.local_addr().expect("mock addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Mock { addr, state }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn set(&self, f: impl FnOnce(&mut Mode)) {
        f(&mut self.state.mode.lock().expect("mode"));
    }

    fn requests(&self) -> Vec<Recorded> {
        self.state.log.lock().expect("log").clone()
    }

    fn chat_requests(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.path == "/v1/chat/completions")
            .count()
    }
}

fn record(s: &MockState, path: &'static str, headers: &HeaderMap, body: Value) -> Option<String> {
    let auth = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    s.log.lock().expect("log").push(Recorded {
        path,
        auth: auth.clone(),
        body,
    });
    auth
}

/// 401 like OpenAI's, echoing the presented key — to prove the client redacts it.
fn check_auth(s: &MockState, auth: Option<&str>) -> Option<Response> {
    let expected = s.key.as_ref()?;
    let presented = auth.and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("");
    if presented == expected {
        return None;
    }
    let body = json!({"error": {
        "message": format!("Incorrect API key provided: {presented}. Check your key."),
        "type": "invalid_request_error", "code": "invalid_api_key"}});
    Some((StatusCode::UNAUTHORIZED, Json(body)).into_response())
}

async fn mock_models(State(s): State<Arc<MockState>>, headers: HeaderMap) -> Response {
    let auth = record(&s, "/v1/models", &headers, Value::Null);
    if let Some(denied) = check_auth(&s, auth.as_deref()) {
        return denied;
    }
    Json(json!({"object": "list", "data": [{"id": "mock-large", "object": "model"}]})).into_response()
}

async fn mock_chat(State(s): State<Arc<MockState>>, headers: HeaderMap, body: String) -> Response {
    let req: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let auth = record(&s, "/v1/chat/completions", &headers, req.clone());
    if let Some(denied) = check_auth(&s, auth.as_deref()) {
        return denied;
    }
    let mode = s.mode.lock().expect("mode").clone();
    if mode.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(mode.delay_ms)).await;
    }
    if let Some((code, body)) = mode.fail {
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (code, [(CONTENT_TYPE, "application/json")], body).into_response();
    }
    if mode.malformed {
        return ([(CONTENT_TYPE, "application/json")], "{\"choices\": [").into_response();
    }
    let last = req["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    if req["stream"] != json!(true) || mode.ignore_stream {
        let usage = mode
            .usage
            .unwrap_or_else(|| json!({"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}));
        let mut answer = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "mock-large",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": match &mode.answer {
                             Some(pieces) => pieces.concat(),
                             None => format!("echo: {last}"),
                         }}}],
        });
        if !usage.is_null() {
            answer["usage"] = usage;
        }
        return Json(answer).into_response();
    }
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "c1", "object": "chat.completion.chunk", "model": "mock-large",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        )
    };
    let mut events = vec![
        ": keep-alive\n\n".to_string(),
        chunk(json!({"role": "assistant"}), Value::Null),
    ];
    let pieces = mode
        .answer
        .clone()
        .unwrap_or_else(|| PIECES.map(String::from).to_vec());
    for p in pieces {
        events.push(chunk(json!({"content": p}), Value::Null));
    }
    if let Some(msg) = &mode.stream_error {
        events.push(format!("data: {}\n\n", json!({"error": {"message": msg}})));
    }
    if !mode.cut_stream {
        events.push(chunk(json!({}), json!("stop")));
        // As OpenAI does: a usage chunk with no choices, only when asked for.
        if let (Some(u), true) = (&mode.usage, req["stream_options"]["include_usage"] == json!(true)) {
            events.push(format!(
                "data: {}\n\n",
                json!({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": u})
            ));
        }
        events.push("data: [DONE]\n\n".to_string());
    }
    let body = async_stream::stream! {
        for (i, ev) in events.into_iter().enumerate() {
            // Small slices with pauses, so chunk boundaries fall mid-event.
            for piece in ev.as_bytes().chunks(mode.chunk_bytes.unwrap_or(7)) {
                yield Ok::<_, std::io::Error>(Bytes::copy_from_slice(piece));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if mode.stall_stream && i == 2 {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    };
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn config(base_url: &str) -> CloudConfig {
    CloudConfig {
        base_url: base_url.to_string(),
        model: "cloud-model".to_string(),
        timeout_ms: 5_000,
        ..CloudConfig::default()
    }
}

fn client_with(cfg: CloudConfig, key: Option<&str>) -> (CloudClient, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    let key = key.map(|k| ApiKey::new(k).expect("key"));
    let client = CloudClient::with_key(cfg, key, clock.clone()).expect("client");
    (client, clock)
}

fn question(q: &str) -> CloudRequest {
    CloudRequest::new(vec![
        ChatMessage::new("system", "Answer briefly."),
        ChatMessage::new("user", q),
    ])
}

/// A loopback port with nobody listening.
fn dead_port_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    format!("http://127.0.0.1:{port}/v1")
}

async fn collect(stream: CloudStream) -> Vec<Result<String, CloudError>> {
    tokio::time::timeout(Duration::from_secs(20), stream.collect::<Vec<_>>())
        .await
        .expect("stream must end, not hang")
}

#[tokio::test]
async fn chat_round_trip() {
    let mock = Mock::start(Some(KEY)).await;
    let (client, _) = client_with(config(&mock.base_url()), Some(KEY));
    let mut req = question("What is 2+2?");
    req.max_tokens = 64;
    req.temperature = 0.25;
    req.stop = vec!["\n\n".to_string()];
    let a = client.chat(req).await.expect("answer");
    assert_eq!(a.text, "echo: What is 2+2?");
    assert_eq!(a.model, "mock-large");
    assert_eq!(a.prompt_tokens, Some(11));
    assert_eq!(a.completion_tokens, Some(3));
    assert!(a.latency_ms < 5_000);
    assert_eq!(client.calls_made(), 1);
    assert!(client.status().reachable, "a successful call proves reachability");

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    let body = &reqs[0].body;
    assert_eq!(body["model"], "cloud-model");
    assert_eq!(body["stream"], false);
    assert_eq!(body["max_tokens"], 64);
    assert_eq!(body["temperature"], 0.25);
    assert_eq!(body["stop"], json!(["\n\n"]));
    assert_eq!(
        body["messages"][0],
        json!({"role": "system", "content": "Answer briefly."})
    );
    assert_eq!(reqs[0].auth.as_deref(), Some(format!("Bearer {KEY}").as_str()));

    // No stop sequences: the field is left out rather than sent empty.
    client.chat(question("again")).await.expect("answer");
    assert!(mock.requests()[1].body.get("stop").is_none());
}

#[tokio::test]
async fn streaming_yields_chunks_in_order() {
    let mock = Mock::start(Some(KEY)).await;
    let (client, _) = client_with(config(&mock.base_url()), Some(KEY));
    let stream = client.chat_stream(question("hi")).await.expect("stream opens");
    let items: Vec<String> = collect(stream)
        .await
        .into_iter()
        .map(|r| r.expect("chunk"))
        .collect();
    assert_eq!(items, PIECES);
    assert_eq!(mock.requests()[0].body["stream"], true);
    assert_eq!(client.calls_made(), 1);

    // A server that ignores `stream: true` still works: one item.
    mock.set(|m| m.ignore_stream = true);
    let stream = client.chat_stream(question("hi")).await.expect("opens");
    let items = collect(stream).await;
    assert_eq!(items, vec![Ok("echo: hi".to_string())]);
}

#[tokio::test]
async fn stream_cut_off_or_stalled_ends_in_an_error() {
    let mock = Mock::start(None).await;
    let mut cfg = config(&mock.base_url());
    cfg.timeout_ms = 400;
    let (client, _) = client_with(cfg, None);

    mock.set(|m| m.cut_stream = true);
    let items = collect(client.chat_stream(question("x")).await.expect("opens")).await;
    assert_eq!(items.len(), PIECES.len() + 1);
    assert!(
        matches!(items.last(), Some(Err(CloudError::BadResponse(_)))),
        "{items:?}"
    );

    mock.set(|m| {
        m.cut_stream = false;
        m.stall_stream = true;
    });
    let started = Instant::now();
    let items = collect(client.chat_stream(question("x")).await.expect("opens")).await;
    assert!(started.elapsed() < Duration::from_secs(3), "no hang");
    assert_eq!(items.first(), Some(&Ok("Hel".to_string())));
    assert_eq!(items.last(), Some(&Err(CloudError::Timeout { ms: 400 })));
    assert!(!client.status().reachable);
}

#[tokio::test]
async fn key_is_sent_as_bearer_but_never_printed() {
    // A unique variable per test: tests run in parallel in one process.
    let env = "SLM_SWARM_TEST_CLOUD_KEY_BEARER";
    std::env::set_var(env, KEY);
    let mock = Mock::start(Some(KEY)).await;
    let mut cfg = config(&mock.base_url());
    cfg.api_key_env = Some(env.to_string());
    let client = CloudClient::new(cfg.clone()).expect("client from env");
    assert!(client.probe().await, "mock accepts the key from the environment");
    client.chat(question("q")).await.expect("answer");
    let stream = client.chat_stream(question("q")).await.expect("stream");
    assert_eq!(collect(stream).await.len(), PIECES.len());
    for r in mock.requests() {
        assert_eq!(r.auth.as_deref(), Some(format!("Bearer {KEY}").as_str()));
    }

    let printed = [
        format!("{client:?}"),
        format!("{client}"),
        format!("{cfg:?}"),
        format!("{cfg}"),
        format!("{:?}", client.status()),
        serde_json::to_string(&client.status()).expect("json"),
        toml::to_string(&cfg).expect("toml"),
    ];
    for p in &printed {
        assert!(!p.contains(KEY), "key leaked in {p}");
    }
    assert!(printed[0].contains("***"), "{}", printed[0]);

    // A server that echoes the key in its error: the error text is redacted.
    let other = Mock::start(Some("sk-some-other-key")).await;
    let mut cfg2 = cfg.clone();
    cfg2.base_url = other.base_url();
    let client2 = CloudClient::new(cfg2).expect("client");
    let err = client2.chat(question("q")).await.expect_err("401");
    let CloudError::Http { status, message } = &err else {
        panic!("expected Http, got {err:?}")
    };
    assert_eq!(*status, 401);
    assert!(message.contains("Incorrect API key provided: ***"), "{message}");
    let err_stream = match client2.chat_stream(question("q")).await {
        Err(e) => e,
        Ok(_) => panic!("401 must fail before streaming"),
    };
    for text in [err.to_string(), format!("{err:?}"), err_stream.to_string()] {
        assert!(!text.contains(KEY), "key leaked in {text}");
    }
    assert!(!client2.status().reachable, "a refused key makes it unusable");
    assert!(!client2.probe().await, "a refused key is not reachable");

    // Named but unset variable: a clear error naming the variable.
    let mut cfg3 = cfg.clone();
    cfg3.api_key_env = Some("SLM_SWARM_TEST_CLOUD_KEY_UNSET".to_string());
    let err = CloudClient::new(cfg3).expect_err("missing key");
    assert!(matches!(err, CloudError::MissingKey { .. }));
    assert!(err.to_string().contains("SLM_SWARM_TEST_CLOUD_KEY_UNSET"));
}

#[tokio::test]
async fn budget_refuses_without_network_and_recovers() {
    let mock = Mock::start(None).await;
    let mut cfg = config(&mock.base_url());
    cfg.max_calls_per_minute = 2;
    cfg.max_calls_per_day = 3;
    let (client, clock) = client_with(cfg, None);
    assert_eq!(client.status().budget_left, 2);

    client.chat(question("1")).await.expect("1");
    client.chat(question("2")).await.expect("2");
    assert_eq!(client.status().budget_left, 0);
    let started = Instant::now();
    let err = client.chat(question("3")).await.expect_err("over budget");
    assert!(
        matches!(
            err,
            CloudError::BudgetExhausted {
                window: BudgetWindow::Minute,
                limit: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        client.chat_stream(question("3")).await,
        Err(CloudError::BudgetExhausted { .. })
    ));
    assert!(started.elapsed() < Duration::from_millis(200), "refused at once");
    assert_eq!(mock.chat_requests(), 2, "no request reached the network");
    assert_eq!(client.calls_made(), 2);

    // The minute window slides: one call left, then the day limit (3) bites.
    clock.advance(Duration::from_secs(60));
    assert_eq!(client.status().budget_left, 1);
    client.chat(question("4")).await.expect("after the window");
    let err = client.chat(question("5")).await.expect_err("day limit");
    assert!(
        matches!(
            err,
            CloudError::BudgetExhausted {
                window: BudgetWindow::Day,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(mock.chat_requests(), 3);

    clock.advance(Duration::from_secs(86_400));
    assert_eq!(client.status().budget_left, 2);
    client.chat(question("6")).await.expect("next day");
    assert_eq!(mock.chat_requests(), 4);
    assert_eq!(client.calls_made(), 4);
}

#[tokio::test]
async fn unreachable_endpoint_fails_fast() {
    let (client, _) = client_with(config(&dead_port_url()), Some(KEY));
    let started = Instant::now();
    let err = client.chat(question("q")).await.expect_err("nobody listens");
    assert!(matches!(err, CloudError::Unreachable(_)), "{err:?}");
    assert!(matches!(
        client.chat_stream(question("q")).await,
        Err(CloudError::Unreachable(_))
    ));
    assert!(!client.probe().await);
    assert!(started.elapsed() < Duration::from_secs(3), "fails fast");
    assert!(!client.status().reachable);
    assert!(!err.to_string().contains(KEY));
    assert_eq!(err.reason(), "cloud_unreachable");
}

#[tokio::test]
async fn slow_endpoint_times_out_instead_of_hanging() {
    let mock = Mock::start(None).await;
    mock.set(|m| m.delay_ms = 10_000);
    let mut cfg = config(&mock.base_url());
    cfg.timeout_ms = 300;
    let (client, _) = client_with(cfg, None);
    let started = Instant::now();
    let err = client.chat(question("q")).await.expect_err("too slow");
    assert_eq!(err, CloudError::Timeout { ms: 300 });
    assert!(matches!(
        client.chat_stream(question("q")).await,
        Err(CloudError::Timeout { ms: 300 })
    ));
    assert!(started.elapsed() < Duration::from_secs(3), "no hang");
}

#[tokio::test]
async fn http_errors_carry_the_server_message() {
    let mock = Mock::start(None).await;
    let (client, _) = client_with(config(&mock.base_url()), None);
    mock.set(|m| {
        m.fail = Some((
            500,
            r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error"}}"#
                .to_string(),
        ))
    });
    let err = client.chat(question("q")).await.expect_err("500");
    assert_eq!(
        err,
        CloudError::Http {
            status: 500,
            message: "The server had an error while processing your request.".to_string()
        }
    );
    assert!(
        client.probe().await,
        "an HTTP error is not an unreachable endpoint"
    );

    // A non-JSON error page is cut short.
    mock.set(|m| m.fail = Some((502, "<html>".repeat(1_000))));
    let Err(CloudError::Http { status, message }) = client.chat(question("q")).await else {
        panic!("expected Http")
    };
    assert_eq!(status, 502);
    assert!(message.len() <= super::MAX_ERROR_MESSAGE + '…'.len_utf8());
    assert!(message.ends_with('…'));

    mock.set(|m| {
        m.fail = None;
        m.malformed = true;
    });
    let err = client.chat(question("q")).await.expect_err("malformed");
    assert!(matches!(err, CloudError::BadResponse(_)), "{err:?}");
}

#[tokio::test]
async fn probe_reports_reachability() {
    let mock = Mock::start(Some(KEY)).await;
    let mut cfg = config(&mock.base_url());
    cfg.probe_interval_ms = 50;
    let (client, _) = client_with(cfg.clone(), Some(KEY));
    assert!(!client.status().reachable, "unknown until probed");
    assert!(client.probe().await);
    assert!(client.status().reachable);
    assert_eq!(client.calls_made(), 0, "probes do not use the budget");
    assert_eq!(client.status().budget_left, 60);

    let (dead, _) = client_with(config(&dead_port_url()), Some(KEY));
    assert!(!dead.probe().await);
    assert!(!dead.status().reachable);

    // The background prober probes repeatedly and stops with the client.
    let (probed, _) = client_with(cfg, Some(KEY));
    let handle = probed.spawn_prober();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(probed.status().reachable);
    let models = mock.requests().iter().filter(|r| r.path == "/v1/models").count();
    assert!(models >= 3, "{models} probes");
    drop(probed);
    tokio::time::timeout(Duration::from_secs(2), handle)
        .await
        .expect("prober ends when the client is dropped")
        .expect("prober task");
}

#[tokio::test]
async fn bad_requests_are_refused_before_the_budget() {
    let (client, _) = client_with(config(&dead_port_url()), None);
    let mut req = question("q");
    req.temperature = f32::NAN;
    assert!(matches!(client.chat(req).await, Err(CloudError::BadRequest(_))));
    assert!(matches!(
        client.chat(CloudRequest::new(vec![])).await,
        Err(CloudError::BadRequest(_))
    ));
    assert_eq!(client.calls_made(), 0);
    assert_eq!(client.status().budget_left, 60);
}

/// What a call reserves before it is sent: estimated prompt plus `max_tokens`.
mod multibyte;
mod tokens;
