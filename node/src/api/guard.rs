//! Who may use the HTTP API and how much at once: the `Host` check (DNS
//! rebinding), the bearer key, and the concurrency cap and deadline that turn
//! a burst into fast 429s instead of a queue. See `[api]` in configs/node.toml.

use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{BoxError, Router};
use sha2::{Digest, Sha256};
use tower::ServiceBuilder;

use super::ApiError;
use crate::config::ApiConfig;

/// The cookie the page keeps the key in (EventSource cannot send headers).
pub(super) const KEY_COOKIE: &str = "slm_swarm_key";

/// The checks every request passes, built once from the config.
#[derive(Debug)]
pub(super) struct Guard {
    /// SHA-256 of the key: compared in constant time, never kept in clear.
    key: Option<[u8; 32]>,
    /// The key's variable is configured but unset or empty: refuse everything.
    fail_closed: bool,
    hosts: Vec<String>,
    /// Largest request body read before any check answers.
    body_limit: usize,
}

/// How long a client has to send its whole request body.
const BODY_READ: Duration = Duration::from_secs(10);

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Guard {
    /// From `[api]`, with the key read from the environment now.
    pub(super) fn new(cfg: &ApiConfig) -> Self {
        let key = cfg.key();
        Self {
            fail_closed: !cfg.api_key_env.is_empty() && key.is_none(),
            key: key.map(|k| digest(k.as_bytes())),
            hosts: cfg
                .allowed_hosts
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            body_limit: 1 << 20,
        }
    }

    /// Whether a `Host` header value names this node: an IP address, localhost,
    /// or a configured name. A rebinding attack needs a host name, so any IP
    /// literal is safe.
    pub(super) fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim();
        let name = if let Some(rest) = host.strip_prefix('[') {
            // [v6]:port
            return rest
                .split(']')
                .next()
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
        } else {
            match host.rsplit_once(':') {
                Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
                _ => host,
            }
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || self.hosts.contains(&name)
    }

    /// Whether the request carries the key (bearer header, or the page's cookie).
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(want) = &self.key else {
            return !self.fail_closed;
        };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|k| k.trim().as_bytes().to_vec());
        let cookie = || {
            headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().strip_prefix(KEY_COOKIE)?.strip_prefix('='))
                .map(|v| percent_encoding::percent_decode_str(v).collect::<Vec<u8>>())
                .next()
        };
        bearer.or_else(cookie).is_some_and(|k| same(&digest(&k), want))
    }
}

fn refuse(status: StatusCode, kind: &'static str, msg: String) -> Response {
    let mut r = ApiError {
        status,
        message: msg,
        kind,
        param: None,
    }
    .into_response();
    // The connection closes after a refusal; saying so keeps the client from
    // pooling it and sending its next request into the closing socket.
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The middleware: host first (a rebinding page learns nothing), then the key.
pub(super) async fn check(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    // The whole body is read first (bounded in size and time): a socket closed
    // with request bytes still unread is reset by the kernel, and the reset can
    // reach the client before the refusal does (bench-load saw such resets).
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(BODY_READ, axum::body::to_bytes(body, g.body_limit)).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body is over {} bytes or broke off", g.body_limit),
            )
        }
        Err(_) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!("the request body did not arrive within {} s", BODY_READ.as_secs()),
            )
        }
    };
    let req = Request::from_parts(parts, axum::body::Body::from(bytes));
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    if let Some(h) = host.filter(|h| !g.host_allowed(h)) {
        let shown: String = h.chars().take(64).collect();
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "invalid_request_error",
            format!(
                "this node does not answer to host `{shown}`: only localhost, IP addresses and \
                 [api] allowed_hosts are accepted (add the name there to use it)"
            ),
        );
    }
    // The page itself holds no data; it asks for the key when it needs one.
    let open = matches!(req.uri().path(), "/" | "/ui");
    if !open && !g.authorized(req.headers()) {
        let msg = if g.fail_closed {
            "this node's API key variable is not set, so every request is refused; set it and restart".into()
        } else {
            "missing or wrong API key: send `Authorization: Bearer KEY`".into()
        };
        let mut r = refuse(StatusCode::UNAUTHORIZED, "invalid_api_key", msg);
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    next.run(req).await
}

/// Turn the cap's and the deadline's errors into OpenAI error JSON.
async fn overloaded(e: BoxError) -> Response {
    if e.is::<tower::load_shed::error::Overloaded>() {
        let mut r = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "this node has too many requests in progress; retry shortly".into(),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r
    } else if e.is::<tower::timeout::error::Elapsed>() {
        refuse(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the request took longer than this node allows".into(),
        )
    } else {
        refuse(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e.to_string())
    }
}

/// Wrap `app`: host and key checks outside (cheap refusals take no slot), then
/// at most `max_concurrent` requests in progress (the rest refused at once),
/// each with `deadline` to produce its response head.
pub(super) fn wrap<S: Clone + Send + Sync + 'static>(
    app: Router<S>,
    cfg: &ApiConfig,
    deadline: Duration,
    body_limit: usize,
) -> Router<S> {
    let guard = Guard {
        body_limit,
        ..Guard::new(cfg)
    };
    wrap_with(app, guard, cfg, deadline)
}

fn wrap_with<S: Clone + Send + Sync + 'static>(
    app: Router<S>,
    guard: Guard,
    cfg: &ApiConfig,
    deadline: Duration,
) -> Router<S> {
    let guard = Arc::new(guard);
    app.layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(overloaded))
            .load_shed()
            // Global: axum wraps each route on its own, and the cap is for the node.
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                cfg.max_concurrent.max(1),
            ))
            .timeout(deadline),
    )
    .layer(axum::middleware::from_fn_with_state(guard, check))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(key: Option<&str>, hosts: &[&str]) -> Guard {
        Guard {
            key: key.map(|k| digest(k.as_bytes())),
            fail_closed: false,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            body_limit: 1 << 20,
        }
    }

    /// A router whose every request takes `ms`, behind the guard.
    fn slow_app(cfg: &ApiConfig, ms: u64, deadline: Duration) -> Router {
        let slow = move || async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            "done"
        };
        let app = Router::new()
            .route("/a", axum::routing::get(slow))
            .route("/b", axum::routing::get(slow));
        wrap(app, cfg, deadline, 1 << 20)
    }

    fn get(path: &str, host: &str, auth: Option<&str>) -> Request {
        let mut b = Request::builder().uri(path).header("host", host);
        if let Some(k) = auth {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        b.body(axum::body::Body::empty()).expect("request")
    }

    /// Over real TCP: a client that sends a large body while the node is full
    /// reads a 429, not a reset (the body is read before the refusal, so the
    /// socket is never closed with bytes unread).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_client_reads_its_429_even_with_a_large_body() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let cfg = ApiConfig {
            max_concurrent: 1,
            ..ApiConfig::default()
        };
        let app = Router::new().route(
            "/slow",
            axum::routing::post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "done"
            }),
        );
        let app = wrap(app, &cfg, Duration::from_secs(30), 1 << 20);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let post = |body_len: usize| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let head =
                format!("POST /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {body_len}\r\n\r\n");
            s.write_all(head.as_bytes()).await?;
            s.write_all(&vec![b'x'; body_len]).await?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).await?;
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).to_string())
        };
        // Take the only slot.
        let busy = tokio::spawn(post(10));
        tokio::time::sleep(Duration::from_millis(200)).await;
        for _ in 0..10 {
            let r = post(900 * 1024)
                .await
                .expect("no reset: the refusal arrives whole");
            assert!(r.starts_with("HTTP/1.1 429"), "{}", &r[..r.len().min(200)]);
        }
        busy.abort();
    }

    #[tokio::test]
    async fn a_burst_beyond_the_cap_is_refused_at_once_with_429() {
        use tower::ServiceExt;
        let cfg = ApiConfig {
            max_concurrent: 4,
            ..ApiConfig::default()
        };
        let app = slow_app(&cfg, 800, Duration::from_secs(30));
        let t0 = std::time::Instant::now();
        // Two routes: the cap is one for the whole node, not one per route.
        let reqs = (0..200).map(|i| {
            let app = app.clone();
            let path = if i % 2 == 0 { "/a" } else { "/b" };
            tokio::spawn(async move {
                let r = app
                    .oneshot(get(path, "127.0.0.1:8080", None))
                    .await
                    .expect("infallible");
                (r.status(), std::time::Instant::now())
            })
        });
        let mut ok = 0;
        let mut refused_late = 0;
        for h in reqs.collect::<Vec<_>>() {
            let (status, at) = h.await.expect("task");
            match status {
                StatusCode::OK => ok += 1,
                StatusCode::TOO_MANY_REQUESTS => {
                    if at.duration_since(t0) > Duration::from_millis(500) {
                        refused_late += 1;
                    }
                }
                s => panic!("unexpected {s}"),
            }
        }
        assert_eq!(ok, 4, "exactly the cap is served");
        assert_eq!(refused_late, 0, "refusals must not wait for a slot");
    }

    #[tokio::test]
    async fn hung_requests_time_out_with_504_and_checks_come_first() {
        use tower::ServiceExt;
        let cfg = ApiConfig::default();
        let app = slow_app(&cfg, 5_000, Duration::from_millis(100));
        let r = app
            .clone()
            .oneshot(get("/a", "localhost", None))
            .await
            .expect("infallible");
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        let r = app
            .oneshot(get("/a", "evil.example", None))
            .await
            .expect("infallible");
        assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST);
    }

    #[tokio::test]
    async fn with_a_key_only_the_page_is_open() {
        use tower::ServiceExt;
        let cfg = ApiConfig::default();
        let ok = || async { "ok" };
        let app = wrap_with(
            Router::new()
                .route("/", axum::routing::get(ok))
                .route("/metrics", axum::routing::get(ok)),
            guard(Some("k-123"), &[]),
            &cfg,
            Duration::from_secs(5),
        );
        let status = |req: Request| {
            let app = app.clone();
            async move { app.oneshot(req).await.expect("infallible").status() }
        };
        assert_eq!(status(get("/", "localhost", None)).await, StatusCode::OK);
        assert_eq!(
            status(get("/metrics", "localhost", None)).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(get("/metrics", "localhost", Some("nope"))).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(get("/metrics", "localhost", Some("k-123"))).await,
            StatusCode::OK
        );
        // The right key does not open a rebinding host.
        assert_eq!(
            status(get("/metrics", "evil.example", Some("k-123"))).await,
            StatusCode::MISDIRECTED_REQUEST
        );
    }

    #[test]
    fn hosts_allowed_are_ips_localhost_and_configured_names() {
        let g = guard(None, &["office-server.local"]);
        for ok in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "192.168.1.7:80",
            "[::1]:8080",
            "localhost:8080",
            "LOCALHOST",
            "app.localhost:3000",
            "office-server.local:8080",
            "Office-Server.Local.",
        ] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "[evil]:80",
            "localhost.evil.example",
        ] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn key_from_bearer_or_cookie_and_nothing_else() {
        let g = guard(Some("s3cret/+="), &[]);
        let h = |k: &'static str, v: &str| {
            let mut m = HeaderMap::new();
            m.insert(k, HeaderValue::from_str(v).expect("header"));
            m
        };
        assert!(g.authorized(&h("authorization", "Bearer s3cret/+=")));
        assert!(!g.authorized(&h("authorization", "Bearer s3cret")));
        assert!(!g.authorized(&h("authorization", "Basic s3cret/+=")));
        assert!(g.authorized(&h("cookie", "a=b; slm_swarm_key=s3cret%2F%2B%3D")));
        assert!(!g.authorized(&h("cookie", "slm_swarm_key=wrong")));
        assert!(!g.authorized(&HeaderMap::new()));
        // No key configured: open.
        assert!(guard(None, &[]).authorized(&HeaderMap::new()));
        // A key variable configured but unset: closed.
        let closed = Guard {
            key: None,
            fail_closed: true,
            hosts: Vec::new(),
            body_limit: 1 << 20,
        };
        assert!(!closed.authorized(&h("authorization", "Bearer anything")));
    }
}
