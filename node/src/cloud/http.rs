//! The HTTP exchanges of `CloudClient` (on its shared state): the request body,
//! reading an answer or an error within size limits, budget taking and
//! settling, error classification and redaction, reachability changes.

use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

use futures::StreamExt;
use reqwest::header::{ACCEPT, AUTHORIZATION};
use reqwest::Response;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::budget::{Budget, Reservation};
use super::client::Inner;
use super::{error_message_from_json, truncate, ChatMessage, CloudAnswer, CloudError, CloudRequest};

/// Largest non-streamed answer body accepted.
const MAX_BODY: usize = 8 << 20;
/// How much of an error body is read to find its message.
const MAX_ERROR_BODY: usize = 64 << 10;

#[derive(Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: &'a [ChatMessage],
    max_tokens: u32,
    temperature: f32,
    #[serde(skip_serializing_if = "no_stops")]
    stop: &'a [String],
    stream: bool,
    /// Streams only: ask for the usage chunk at the end, so a streamed call
    /// settles its token reservation like a plain one.
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

fn no_stops(s: &&[String]) -> bool {
    s.is_empty()
}

#[derive(Deserialize)]
struct ChatResponse {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<ResponseChoice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ResponseChoice {
    #[serde(default)]
    message: Option<ResponseMessage>,
    /// Legacy completions shape, accepted from lenient stand-ins.
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct ResponseMessage {
    #[serde(default)]
    content: Option<String>,
}

/// `usage` of an answer or of a stream's usage chunk.
#[derive(Deserialize)]
pub(super) struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u32>,
    #[serde(default)]
    completion_tokens: Option<u32>,
    #[serde(default)]
    total_tokens: Option<u32>,
}

impl Usage {
    /// `total_tokens`, or prompt + completion when only those came.
    pub(super) fn total(&self) -> Option<u32> {
        self.total_tokens
            .or_else(|| self.prompt_tokens?.checked_add(self.completion_tokens?))
    }
}

impl Inner {
    pub(super) fn budget(&self) -> MutexGuard<'_, Budget> {
        // The budget holds plain counters; a panic elsewhere cannot leave it torn.
        self.budget.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `req` with `max_tokens` no higher than this gateway's own limit,
    /// whatever the caller (or the peer behind it) asked for.
    pub(super) fn clamped(&self, mut req: CloudRequest) -> CloudRequest {
        req.max_tokens = self.cfg.clamp_max_tokens(req.max_tokens);
        req
    }

    /// Takes one call from the budget and reserves the most it can cost (its
    /// estimated prompt plus `max_tokens`), or refuses without any network
    /// I/O; counts the call as made.
    pub(super) fn take_budget(&self, req: &CloudRequest) -> Result<Reservation, CloudError> {
        let now = self.clock.now_ms();
        let tokens = estimate_prompt_tokens(&req.messages).saturating_add(u64::from(req.max_tokens));
        match self.budget().try_take(now, tokens) {
            Ok(r) => {
                self.calls.fetch_add(1, Ordering::SeqCst);
                Ok(r)
            }
            Err(e) => {
                debug!(error = %e, "cloud call refused by budget");
                Err(e)
            }
        }
    }

    /// Replaces a call's reservation by what it cost: the usage the endpoint
    /// reports; nothing for a request it refused with an HTTP error; the whole
    /// reservation when the cost is unknown (no usage, timeout, cut-off
    /// answer), since the endpoint may still have billed it.
    pub(super) fn settle(&self, r: Reservation, result: &Result<CloudAnswer, CloudError>) {
        let used = match result {
            Ok(a) => a.total_tokens.map(u64::from),
            Err(CloudError::Http { .. }) => Some(0),
            Err(_) => None,
        };
        if let Some(used) = used {
            let now = self.clock.now_ms();
            self.budget().settle(r, used, now);
        }
    }

    /// Saves the day's counts if they changed since the last save. The write
    /// lock is held across snapshot and write so saves land in order.
    pub(super) fn flush_budget(&self) {
        let Some(path) = &self.budget_file else { return };
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let (version, usage) = {
            let mut b = self.budget();
            (b.version(), b.usage(self.clock.now_ms()))
        };
        if version == *written {
            return;
        }
        match super::persist::save(path, usage) {
            Ok(()) => *written = version,
            Err(e) => warn!(error = %e, "cloud budget not saved (kept in memory; retried at the next write)"),
        }
    }

    pub(super) fn timeout_error(&self) -> CloudError {
        CloudError::Timeout {
            ms: self.cfg.timeout_ms,
        }
    }

    pub(super) fn mark_reachable(&self, ok: bool) {
        let was = self.reachable.swap(ok, Ordering::SeqCst);
        if was != ok {
            info!(base_url = %self.cfg.base_url, reachable = ok, "cloud endpoint reachability changed");
        }
    }

    /// Final treatment of every error leaving the client: redact the key, note
    /// an endpoint that looks down, log once.
    pub(super) fn failed(&self, e: CloudError, latency_ms: u64) -> CloudError {
        let e = e.scrubbed(self.key.as_ref());
        if e.endpoint_unusable() {
            self.mark_reachable(false);
        }
        warn!(error = %e, latency_ms, "cloud call failed");
        e
    }

    pub(super) fn net_error(&self, e: &reqwest::Error) -> CloudError {
        if e.is_timeout() {
            return self.timeout_error();
        }
        if e.is_decode() {
            return CloudError::BadResponse(error_chain(e));
        }
        CloudError::Unreachable(error_chain(e))
    }

    fn post(&self, req: &CloudRequest, stream: bool) -> reqwest::RequestBuilder {
        let body = ChatBody {
            model: &self.cfg.model,
            messages: &req.messages,
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            stop: &req.stop,
            stream,
            stream_options: stream.then_some(StreamOptions { include_usage: true }),
        };
        let mut rb = self.http.post(self.chat_url.clone()).json(&body);
        if stream {
            rb = rb.header(ACCEPT, "text/event-stream");
        }
        if let Some(a) = &self.auth {
            rb = rb.header(AUTHORIZATION, a.clone());
        }
        rb
    }

    pub(super) async fn chat_once(&self, req: &CloudRequest) -> Result<CloudAnswer, CloudError> {
        let resp = self
            .post(req, false)
            .send()
            .await
            .map_err(|e| self.net_error(&e))?;
        if !resp.status().is_success() {
            return Err(self.http_error(resp).await);
        }
        self.read_answer(resp).await
    }

    pub(super) async fn open_stream(&self, req: &CloudRequest) -> Result<Response, CloudError> {
        let resp = self
            .post(req, true)
            .send()
            .await
            .map_err(|e| self.net_error(&e))?;
        if !resp.status().is_success() {
            return Err(self.http_error(resp).await);
        }
        Ok(resp)
    }

    pub(super) async fn read_answer(&self, resp: Response) -> Result<CloudAnswer, CloudError> {
        let (body, _) = self.read_limited(resp, MAX_BODY, true).await?;
        let parsed: ChatResponse = serde_json::from_slice(&body)
            .map_err(|e| CloudError::BadResponse(format!("chat completion is not valid JSON: {e}")))?;
        let choice = parsed
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| CloudError::BadResponse("no choices in the answer".to_string()))?;
        let text = match (choice.message, choice.text) {
            // A null content (e.g. a content filter) is an empty answer, not a malformed one.
            (Some(m), _) => m.content.unwrap_or_default(),
            (None, Some(t)) => t,
            (None, None) => return Err(CloudError::BadResponse("first choice has no message".to_string())),
        };
        let usage = parsed.usage;
        let total_tokens = usage.as_ref().and_then(Usage::total);
        Ok(CloudAnswer {
            text,
            model: parsed
                .model
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| self.cfg.model.clone()),
            latency_ms: 0,
            prompt_tokens: usage.as_ref().and_then(|u| u.prompt_tokens),
            completion_tokens: usage.as_ref().and_then(|u| u.completion_tokens),
            total_tokens,
        })
    }

    /// Non-2xx → `Http` with the OpenAI error message when the body has one,
    /// else the start of the body, else the status' reason phrase.
    async fn http_error(&self, resp: Response) -> CloudError {
        let status = resp.status();
        let body = match self.read_limited(resp, MAX_ERROR_BODY, false).await {
            Ok((b, _)) => b,
            Err(_) => Vec::new(),
        };
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| error_message_from_json(&v))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        // One line, bounded: it ends up in logs and HTTP answers.
        let mut message = message.split_whitespace().collect::<Vec<_>>().join(" ");
        if message.is_empty() {
            message = status.canonical_reason().unwrap_or("no message").to_string();
        }
        CloudError::Http {
            status: status.as_u16(),
            message: truncate(&message, super::MAX_ERROR_MESSAGE),
        }
    }

    /// Reads at most `limit` bytes of body. `strict`: more is an error;
    /// otherwise the rest is dropped and the flag says so.
    async fn read_limited(
        &self,
        resp: Response,
        limit: usize,
        strict: bool,
    ) -> Result<(Vec<u8>, bool), CloudError> {
        let too_big = || CloudError::BadResponse(format!("answer larger than {limit} bytes"));
        if strict && resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_big());
        }
        let mut body = resp.bytes_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| self.net_error(&e))?;
            if buf.len() + chunk.len() > limit {
                if strict {
                    return Err(too_big());
                }
                let room = limit - buf.len();
                buf.extend_from_slice(&chunk[..room]);
                return Ok((buf, true));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok((buf, false))
    }
}

/// An upper-end guess of a prompt's tokens, for the reservation: a token is
/// rarely shorter than 4 bytes of text, plus a few per message for the chat
/// template. Multibyte text is overestimated, which errs on the safe side.
pub(super) fn estimate_prompt_tokens(messages: &[ChatMessage]) -> u64 {
    messages
        .iter()
        .map(|m| (m.role.len() + m.content.len()).div_ceil(4) as u64 + 4)
        .fold(0, u64::saturating_add)
}

/// The error and its causes on one line ("error sending request …: connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s
}
