//! `CloudClient`: construction (URLs, key header, HTTP client), the non-streamed
//! chat and the probe, budget and reachability as advertised, and keeping the
//! day's budget on disk. The streamed chat is in `stream`, the HTTP exchanges
//! themselves in `http`.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::Url;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::budget::{Budget, Clock, Limits, SystemClock};
use super::key::ApiKey;
use super::{ChatMessage, CloudConfig, CloudError};

/// Probes answer "can I reach it", which needs no long wait.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the budget writer saves a changed budget: a crash loses at most
/// this much of the day's count, and a busy gateway still writes rarely.
const BUDGET_WRITE_INTERVAL: Duration = Duration::from_secs(2);

/// One chat completion to ask the cloud for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudRequest {
    pub messages: Vec<ChatMessage>,
    pub max_tokens: u32,
    pub temperature: f32,
    /// Stop sequences; omitted from the request when empty.
    #[serde(default)]
    pub stop: Vec<String>,
}

impl CloudRequest {
    /// A request with 512 tokens, temperature 0 (the gateway wants the cloud's
    /// best answer, not a sample) and no stop sequences.
    pub fn new(messages: Vec<ChatMessage>) -> Self {
        Self {
            messages,
            max_tokens: 512,
            temperature: 0.0,
            stop: Vec::new(),
        }
    }
}

/// The cloud's answer to a non-streamed request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudAnswer {
    pub text: String,
    /// The model the endpoint says answered (falls back to the configured one).
    pub model: String,
    /// From just before the request was sent to the parsed answer.
    pub latency_ms: u64,
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
    /// `usage.total_tokens`, or prompt + completion when only those came.
    pub total_tokens: Option<u32>,
}

/// What a node advertises about its cloud access (`Advert.cloud`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudStatusView {
    /// Last probe (or call) reached the endpoint and was accepted; false until
    /// the first probe.
    pub reachable: bool,
    /// Calls allowed right now: min(left this minute, left today), and no more
    /// than the tokens left pay for at `max_tokens_per_call` each — so it is 0
    /// once either the calls or the tokens run out.
    pub budget_left: u32,
    /// Tokens allowed right now: min(left this minute, left today).
    pub tokens_left: u64,
}

/// Text deltas of a streamed answer, in order. Ends after `data: [DONE]`; an
/// error item is always the last item.
pub type CloudStream = BoxStream<'static, Result<String, CloudError>>;

/// Client for one OpenAI-compatible endpoint. Cheap to clone (shared state:
/// connection pool, budget, counters).
#[derive(Clone)]
pub struct CloudClient {
    pub(super) inner: Arc<Inner>,
}

/// The state every clone of a [`CloudClient`] shares.
pub(super) struct Inner {
    pub(super) cfg: CloudConfig,
    pub(super) chat_url: Url,
    pub(super) models_url: Url,
    pub(super) key: Option<ApiKey>,
    /// `Bearer <key>`, marked sensitive so the HTTP stack never prints it.
    pub(super) auth: Option<HeaderValue>,
    pub(super) http: reqwest::Client,
    pub(super) timeout: Duration,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) budget: Mutex<Budget>,
    /// Where the day's counts are kept across restarts (`None`: memory only).
    pub(super) budget_file: Option<PathBuf>,
    /// Serializes writers and remembers the budget version last written, so
    /// an older snapshot never overwrites a newer one.
    pub(super) written: Mutex<u64>,
    pub(super) reachable: AtomicBool,
    pub(super) calls: AtomicU64,
}

impl CloudClient {
    /// Validates `cfg` and reads the key (if `api_key_env` is set) from this
    /// process's environment. Fails if the variable is named but unset.
    pub fn new(cfg: CloudConfig) -> Result<Self, CloudError> {
        Self::with_clock(cfg, Arc::new(SystemClock))
    }

    /// As [`CloudClient::new`], with the clock the budget counts on.
    pub fn with_clock(cfg: CloudConfig, clock: Arc<dyn Clock>) -> Result<Self, CloudError> {
        let key = match &cfg.api_key_env {
            Some(env) => {
                // Validate first so a key pasted into api_key_env is never used as a name.
                cfg.validate()?;
                Some(ApiKey::from_env(env)?)
            }
            None => None,
        };
        Self::with_key(cfg, key, clock)
    }

    /// Builds the client with a key obtained some other way (tests, a secret
    /// store). `cfg.api_key_env` is ignored.
    pub fn with_key(
        cfg: CloudConfig,
        key: Option<ApiKey>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, CloudError> {
        let url = cfg.validate()?;
        let base = url.as_str().trim_end_matches('/');
        let join = |path: &str| {
            Url::parse(&format!("{base}/{path}"))
                .map_err(|e| CloudError::Config(format!("cloud.base_url: {e}")))
        };
        let chat_url = join("chat/completions")?;
        let models_url = join("models")?;
        let auth = match &key {
            Some(k) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {}", k.expose()))
                    .map_err(|_| CloudError::BadKey { env: String::new() })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let mut builder = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("slm-swarm/", env!("CARGO_PKG_VERSION")))
            // An API endpoint has no reason to redirect, and following one could
            // carry the key to another host: a redirect is reported as an error.
            .redirect(reqwest::redirect::Policy::none());
        if is_loopback(&url) {
            // A proxy cannot reach our loopback; don't let HTTP_PROXY try.
            builder = builder.no_proxy();
        }
        let http = builder
            .build()
            .map_err(|e| CloudError::Config(format!("HTTP client: {e}")))?;
        let mut budget = Budget::new(Limits {
            calls_per_minute: cfg.max_calls_per_minute,
            calls_per_day: cfg.max_calls_per_day,
            tokens_per_minute: cfg.max_tokens_per_minute,
            tokens_per_day: cfg.max_tokens_per_day,
            tokens_per_call: u64::from(cfg.max_tokens_per_call),
        });
        let budget_file = cfg.budget_file.as_ref().map(PathBuf::from);
        if let Some(path) = &budget_file {
            restore_budget(&mut budget, path, clock.now_ms());
        }
        let written = budget.version();
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                chat_url,
                models_url,
                key,
                auth,
                http,
                timeout,
                clock,
                budget: Mutex::new(budget),
                budget_file,
                written: Mutex::new(written),
                reachable: AtomicBool::new(false),
                calls: AtomicU64::new(0),
            }),
        })
    }

    pub fn config(&self) -> &CloudConfig {
        &self.inner.cfg
    }

    /// Gateway-election priority from the config (advertised with the status).
    pub fn priority(&self) -> i32 {
        self.inner.cfg.priority
    }

    /// Chat requests sent to the network so far (streamed or not; probes and
    /// calls refused by the budget are not counted).
    pub fn calls_made(&self) -> u64 {
        self.inner.calls.load(Ordering::SeqCst)
    }

    /// What to advertise: reachability and the budget left now.
    pub fn status(&self) -> CloudStatusView {
        let now = self.inner.clock.now_ms();
        let left = self.inner.budget().left(now);
        CloudStatusView {
            reachable: self.inner.reachable.load(Ordering::SeqCst),
            budget_left: left.calls,
            tokens_left: left.tokens,
        }
    }

    /// The file the day's budget is kept in, if any.
    pub fn budget_file(&self) -> Option<&Path> {
        self.inner.budget_file.as_deref()
    }

    /// Writes the day's budget to `budget_file` now if it changed since the
    /// last write (blocking file I/O: call from a blocking context or at
    /// shutdown). Failures are logged, never fatal: the budget in memory
    /// still holds.
    pub fn flush_budget(&self) {
        self.inner.flush_budget();
    }

    /// Saves a changed budget every couple of seconds until every clone of this
    /// client is dropped (then once more, on drop). `None` without a
    /// `budget_file`. Needs a tokio runtime.
    pub fn spawn_budget_writer(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.inner.budget_file.as_ref()?;
        let weak = Arc::downgrade(&self.inner);
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(BUDGET_WRITE_INTERVAL).await;
                let Some(inner) = weak.upgrade() else { break };
                // File I/O and fsync off the async workers.
                let _ = tokio::task::spawn_blocking(move || inner.flush_budget()).await;
            }
        }))
    }

    /// One non-streamed chat completion, within `timeout_ms` overall.
    /// `max_tokens` is clamped to `max_tokens_per_call`.
    pub async fn chat(&self, req: CloudRequest) -> Result<CloudAnswer, CloudError> {
        let inner = &self.inner;
        check_request(&req)?;
        let req = inner.clamped(req);
        let reservation = inner.take_budget(&req)?;
        let started = Instant::now();
        let result = match tokio::time::timeout(inner.timeout, inner.chat_once(&req)).await {
            Ok(r) => r,
            Err(_) => Err(inner.timeout_error()),
        };
        let latency_ms = elapsed_ms(started);
        inner.settle(reservation, &result);
        match result {
            Ok(mut answer) => {
                inner.mark_reachable(true);
                answer.latency_ms = latency_ms;
                debug!(
                    model = %answer.model,
                    latency_ms,
                    completion_tokens = answer.completion_tokens,
                    "cloud chat answered"
                );
                Ok(answer)
            }
            Err(e) => Err(inner.failed(e, latency_ms)),
        }
    }

    /// `GET {base_url}/models` with the key: true when it answers 2xx within a
    /// few seconds. Updates `status().reachable`. Does not use the budget.
    pub async fn probe(&self) -> bool {
        let inner = &self.inner;
        let limit = inner.timeout.min(PROBE_TIMEOUT);
        let mut rb = inner.http.get(inner.models_url.clone()).timeout(limit);
        if let Some(a) = &inner.auth {
            rb = rb.header(AUTHORIZATION, a.clone());
        }
        let ok = match tokio::time::timeout(limit, rb.send()).await {
            Ok(Ok(resp)) if resp.status().is_success() => true,
            Ok(Ok(resp)) => {
                debug!(status = resp.status().as_u16(), "cloud probe refused");
                false
            }
            Ok(Err(e)) => {
                let e = inner.net_error(&e).scrubbed(inner.key.as_ref());
                debug!(error = %e, "cloud probe failed");
                false
            }
            Err(_) => {
                debug!(timeout_ms = limit.as_millis() as u64, "cloud probe timed out");
                false
            }
        };
        inner.mark_reachable(ok);
        ok
    }

    /// Probes now and then every `probe_interval_ms`, until every clone of this
    /// client is dropped (or the handle is aborted). Needs a tokio runtime.
    pub fn spawn_prober(&self) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        let interval = Duration::from_millis(self.inner.cfg.probe_interval_ms);
        tokio::spawn(async move {
            loop {
                // Hold the client only while probing, so dropping it ends the loop.
                let Some(inner) = weak.upgrade() else { break };
                CloudClient { inner }.probe().await;
                tokio::time::sleep(interval).await;
            }
        })
    }
}

/// Continues from the file's counts if they are today's; anything wrong with
/// the file is logged and the day starts from zero (never fatal: a node must
/// still start, and the file is rewritten at the next call).
fn restore_budget(budget: &mut Budget, path: &Path, now: u64) {
    match super::persist::load(path) {
        Ok(Some(saved)) => {
            if budget.restore(saved, now) {
                info!(
                    file = %path.display(),
                    calls = saved.calls,
                    tokens = saved.tokens,
                    "cloud budget: continuing today's counts"
                );
            } else {
                debug!(file = %path.display(), "cloud budget file is from another day; ignored");
            }
        }
        Ok(None) => {}
        Err(e) => warn!(error = %e, "cloud budget file ignored; today's counts start from zero"),
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Last chance to keep what was spent since the last periodic write.
        self.flush_budget();
    }
}

impl fmt::Debug for CloudClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("CloudClient")
            .field("base_url", &i.cfg.base_url)
            .field("model", &i.cfg.model)
            .field("api_key", &i.key) // ApiKey prints ***
            .field("timeout_ms", &i.cfg.timeout_ms)
            .field("reachable", &i.reachable.load(Ordering::SeqCst))
            .field("calls_made", &i.calls.load(Ordering::SeqCst))
            .finish()
    }
}

impl fmt::Display for CloudClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cloud {}", self.inner.cfg)
    }
}

pub(super) fn check_request(req: &CloudRequest) -> Result<(), CloudError> {
    if req.messages.is_empty() {
        return Err(CloudError::BadRequest("no messages".to_string()));
    }
    if req.max_tokens == 0 {
        return Err(CloudError::BadRequest("max_tokens must be > 0".to_string()));
    }
    if !req.temperature.is_finite() || req.temperature < 0.0 {
        return Err(CloudError::BadRequest(format!(
            "temperature must be a finite number >= 0, not {}",
            req.temperature
        )));
    }
    Ok(())
}

fn is_loopback(url: &Url) -> bool {
    let host = url
        .host_str()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

pub(super) fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}
