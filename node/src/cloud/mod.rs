//! Cloud adapter: a client for any OpenAI-compatible chat completions endpoint,
//! used only by the node that is currently the swarm's gateway.
//!
//! The API key is read from this node's environment when the client is built
//! and goes nowhere but the `Authorization` header sent to `base_url`: it is
//! wrapped in [`ApiKey`] (prints `***`) and redacted from every error text.
//! Calls are bounded by a deadline and by a per-minute / per-day budget of
//! calls and of tokens; a call over budget fails at once without touching the
//! network. `max_tokens` is clamped to `max_tokens_per_call` whoever asks, and
//! the day's counters can be kept in a file so a restart does not reset them.

mod budget;
mod client;
mod config;
mod http;
mod key;
mod persist;
mod sse;
mod stream;
#[cfg(test)]
mod tests;

use thiserror::Error;

pub use crate::inference::ChatMessage;
pub use budget::{BudgetUnit, BudgetWindow, Clock, ManualClock, SystemClock};
pub use client::{CloudAnswer, CloudClient, CloudRequest, CloudStatusView, CloudStream};
pub use config::CloudConfig;
pub use key::ApiKey;

/// Longest server-provided message kept in an error.
pub(crate) const MAX_ERROR_MESSAGE: usize = 300;

#[derive(Debug, Clone, Error, PartialEq)]
pub enum CloudError {
    #[error("invalid [cloud] config: {0}")]
    Config(String),
    #[error("cloud API key: environment variable `{env}` (cloud.api_key_env) is not set or empty")]
    MissingKey { env: String },
    #[error("cloud API key in `{env}` contains characters not allowed in an HTTP header")]
    BadKey { env: String },
    #[error("invalid cloud request: {0}")]
    BadRequest(String),
    /// Refused by the call or the token budget, without touching the network.
    #[error("cloud {unit} budget exhausted: {limit} {unit} per {window} already used; next call possible in {retry_after_ms} ms")]
    BudgetExhausted {
        window: BudgetWindow,
        unit: BudgetUnit,
        limit: u64,
        retry_after_ms: u64,
    },
    #[error("cloud endpoint unreachable: {0}")]
    Unreachable(String),
    #[error("cloud endpoint did not answer within {ms} ms")]
    Timeout { ms: u64 },
    #[error("cloud endpoint answered HTTP {status}: {message}")]
    Http { status: u16, message: String },
    #[error("cloud endpoint sent a malformed answer: {0}")]
    BadResponse(String),
}

impl CloudError {
    /// A short stable code for `swarm.degraded_reason` and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            CloudError::Config(_) | CloudError::MissingKey { .. } | CloudError::BadKey { .. } => {
                "cloud_misconfigured"
            }
            CloudError::BadRequest(_) => "cloud_bad_request",
            CloudError::BudgetExhausted { .. } => "cloud_budget_exhausted",
            CloudError::Unreachable(_) => "cloud_unreachable",
            CloudError::Timeout { .. } => "cloud_timeout",
            CloudError::Http { .. } => "cloud_http_error",
            CloudError::BadResponse(_) => "cloud_bad_response",
        }
    }

    /// Whether the endpoint is unusable for any call (down, or refusing our key),
    /// as opposed to refusing this one call; `status().reachable` turns false
    /// on such errors without waiting for the next probe.
    pub fn endpoint_unusable(&self) -> bool {
        matches!(
            self,
            CloudError::Unreachable(_)
                | CloudError::Timeout { .. }
                | CloudError::Http {
                    status: 401 | 403,
                    ..
                }
        )
    }

    /// Redacts `key` from every string this error carries.
    fn scrubbed(self, key: Option<&ApiKey>) -> Self {
        let s = |t: String| key::scrub(key, &t);
        match self {
            CloudError::Config(m) => CloudError::Config(s(m)),
            CloudError::BadRequest(m) => CloudError::BadRequest(s(m)),
            CloudError::Unreachable(m) => CloudError::Unreachable(s(m)),
            CloudError::Http { status, message } => CloudError::Http {
                status,
                message: s(message),
            },
            CloudError::BadResponse(m) => CloudError::BadResponse(s(m)),
            other @ (CloudError::MissingKey { .. }
            | CloudError::BadKey { .. }
            | CloudError::BudgetExhausted { .. }
            | CloudError::Timeout { .. }) => other,
        }
    }
}

/// The human message inside an OpenAI-style error body:
/// `{"error": {"message": …}}`, `{"error": "…"}` or `{"message": …}`.
pub(crate) fn error_message_from_json(v: &serde_json::Value) -> Option<String> {
    let err = v.get("error").unwrap_or(v);
    err.get("message")
        .and_then(|m| m.as_str())
        .or_else(|| err.as_str())
        .or_else(|| v.get("message").and_then(|m| m.as_str()))
        .map(str::to_string)
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
