//! The `[cloud]` section of the node config: which OpenAI-compatible endpoint
//! the gateway may call, how long to wait, and how often it may call.

use std::fmt;

use reqwest::Url;
use serde::{Deserialize, Serialize};

use super::CloudError;

/// `[cloud]`: an OpenAI-compatible chat completions endpoint this node may call
/// while it is the swarm's gateway. Only the node that has this section (and the
/// key in its own environment) ever talks to the cloud.
///
/// The defaults describe a local cloud stand-in (`slm-swarm serve`) on loopback
/// that needs no key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudConfig {
    /// Base URL of the API, up to and including the version segment; the client
    /// appends `/chat/completions` and `/models`. Must be `http://` or `https://`
    /// and must not carry credentials (`user:pass@`): put the key in the
    /// environment variable named by `api_key_env` instead.
    /// Default: `http://127.0.0.1:8090/v1`.
    pub base_url: String,
    /// Model name sent in every request (`"model"` in the OpenAI body).
    /// Default: `qwen2.5-coder-1.5b` (the local stand-in's model).
    pub model: String,
    /// Name of the environment variable that holds the API key, e.g.
    /// `OPENAI_API_KEY` — the name, never the key itself. Read once, when the
    /// client is built, from this node's own environment; sent only as
    /// `Authorization: Bearer …` to `base_url`. Unset (the default): no key, as
    /// for a local stand-in.
    pub api_key_env: Option<String>,
    /// Deadline for one request, in milliseconds: the whole exchange for a
    /// non-streaming call; for a streaming call, the wait for the response headers
    /// and then the longest silence between two chunks. Default: 30000.
    pub timeout_ms: u64,
    /// At most this many calls in any sliding 60-second window. Default: 60.
    pub max_calls_per_minute: u32,
    /// At most this many calls per UTC calendar day. Default: 1000.
    pub max_calls_per_day: u32,
    /// The most tokens one call may ask the cloud to generate: an escalation's
    /// `max_tokens` (a peer's number) is clamped to this. Default: 1024.
    pub max_tokens_per_call: u32,
    /// At most this many tokens (prompt + completion) in any sliding 60-second
    /// window. Each call reserves its prompt (estimated) plus its clamped
    /// `max_tokens` before it is sent and is settled to the usage the cloud
    /// reports. Default: 100000.
    pub max_tokens_per_minute: u64,
    /// At most this many tokens (prompt + completion) per UTC calendar day,
    /// counted as for `max_tokens_per_minute`. Default: 500000.
    pub max_tokens_per_day: u64,
    /// File that keeps today's call and token counts across restarts (JSON,
    /// replaced atomically). Unset: `slm-swarm start` uses
    /// `<identity key without extension>.cloud-budget.json` beside the node's
    /// identity key; a client built directly keeps its counts in memory only.
    pub budget_file: Option<String>,
    /// Operator preference for the gateway role in the election; higher wins.
    /// Advertised to peers. Default: 0.
    pub priority: i32,
    /// How often the node probes `GET {base_url}/models` to advertise
    /// `cloud.reachable`, in milliseconds. Default: 30000.
    pub probe_interval_ms: u64,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8090/v1".to_string(),
            model: "qwen2.5-coder-1.5b".to_string(),
            api_key_env: None,
            timeout_ms: 30_000,
            max_calls_per_minute: 60,
            max_calls_per_day: 1000,
            max_tokens_per_call: 1024,
            max_tokens_per_minute: 100_000,
            max_tokens_per_day: 500_000,
            budget_file: None,
            priority: 0,
            probe_interval_ms: 30_000,
        }
    }
}

impl fmt::Display for CloudConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.model, self.base_url)
    }
}

impl CloudConfig {
    /// An escalation's `max_tokens` as sent to the cloud: never more than
    /// `max_tokens_per_call`, and at least 1 (a peer's 0 or absurd number must
    /// neither fail the call here nor raise the cost).
    pub fn clamp_max_tokens(&self, asked: u32) -> u32 {
        asked.clamp(1, self.max_tokens_per_call.max(1))
    }

    /// Checks every field; the error names the offending key. Returns the parsed
    /// base URL (without a trailing slash) so the client need not parse it again.
    pub fn validate(&self) -> Result<Url, CloudError> {
        let bad = |msg: String| Err(CloudError::Config(msg));
        let trimmed = self.base_url.trim().trim_end_matches('/');
        let url = match Url::parse(trimmed) {
            Ok(u) => u,
            Err(e) => return bad(format!("cloud.base_url `{trimmed}` is not a URL: {e}")),
        };
        if !matches!(url.scheme(), "http" | "https") {
            return bad(format!(
                "cloud.base_url must start with http:// or https://, not `{}://`",
                url.scheme()
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return bad("cloud.base_url has no host".to_string());
        }
        // Credentials in the URL would show up in Debug output, logs and errors;
        // the key belongs in the environment. The URL is not echoed here for that reason.
        if !url.username().is_empty() || url.password().is_some() {
            return bad("cloud.base_url must not contain credentials (user:pass@); \
                 name an environment variable in cloud.api_key_env instead"
                .to_string());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return bad("cloud.base_url must not have a query or fragment".to_string());
        }
        if self.model.trim().is_empty() {
            return bad("cloud.model must not be empty".to_string());
        }
        if let Some(name) = &self.api_key_env {
            // A value that is not an identifier is most likely the key pasted in by
            // mistake, so it is rejected without being echoed.
            if !is_env_name(name) {
                return bad("cloud.api_key_env must be the NAME of an environment variable \
                     (letters, digits, `_`), not the key itself"
                    .to_string());
            }
        }
        if self.timeout_ms == 0 {
            return bad("cloud.timeout_ms must be > 0".to_string());
        }
        if self.max_calls_per_minute == 0 {
            return bad("cloud.max_calls_per_minute must be > 0".to_string());
        }
        if self.max_calls_per_day == 0 {
            return bad("cloud.max_calls_per_day must be > 0".to_string());
        }
        if self.max_tokens_per_call == 0 {
            return bad("cloud.max_tokens_per_call must be > 0".to_string());
        }
        // Smaller windows than one full-size call would leave the gateway
        // advertising a budget it can never spend.
        let per_call = u64::from(self.max_tokens_per_call);
        if self.max_tokens_per_minute < per_call {
            return bad(format!(
                "cloud.max_tokens_per_minute must be >= cloud.max_tokens_per_call ({per_call})"
            ));
        }
        if self.max_tokens_per_day < per_call {
            return bad(format!(
                "cloud.max_tokens_per_day must be >= cloud.max_tokens_per_call ({per_call})"
            ));
        }
        if self.budget_file.as_deref().is_some_and(|f| f.trim().is_empty()) {
            return bad("cloud.budget_file must not be empty (leave it out for the default)".to_string());
        }
        if self.probe_interval_ms == 0 {
            return bad("cloud.probe_interval_ms must be > 0".to_string());
        }
        Ok(url)
    }
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut CloudConfig)) -> CloudConfig {
        let mut c = CloudConfig::default();
        f(&mut c);
        c
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = CloudConfig::default();
        assert_eq!(c.timeout_ms, 30_000);
        assert_eq!(c.max_calls_per_minute, 60);
        assert_eq!(c.max_calls_per_day, 1000);
        assert_eq!(c.max_tokens_per_call, 1024);
        assert_eq!(c.max_tokens_per_minute, 100_000);
        assert_eq!(c.max_tokens_per_day, 500_000);
        assert!(c.budget_file.is_none());
        assert_eq!(c.priority, 0);
        assert_eq!(c.probe_interval_ms, 30_000);
        assert!(c.api_key_env.is_none());
        let url = c.validate().expect("default config is valid");
        assert_eq!(url.as_str(), "http://127.0.0.1:8090/v1");
    }

    #[test]
    fn parses_a_partial_toml_section() {
        #[derive(Deserialize)]
        struct Node {
            cloud: CloudConfig,
        }
        let n: Node = toml::from_str(
            "[cloud]\nbase_url = \"https://api.example.invalid/v1/\"\nmodel = \"big\"\n\
             api_key_env = \"OPENAI_API_KEY\"\npriority = 5\n",
        )
        .expect("parses");
        assert_eq!(n.cloud.model, "big");
        assert_eq!(n.cloud.priority, 5);
        assert_eq!(n.cloud.timeout_ms, 30_000);
        let url = n.cloud.validate().expect("valid");
        assert_eq!(url.as_str(), "https://api.example.invalid/v1");

        let typo = toml::from_str::<Node>("[cloud]\nbase_ulr = \"http://x/v1\"\n");
        assert!(typo.is_err(), "unknown keys are rejected");
    }

    #[test]
    fn clamp_max_tokens_bounds_any_number() {
        let c = with(|c| c.max_tokens_per_call = 300);
        assert_eq!(c.clamp_max_tokens(0), 1);
        assert_eq!(c.clamp_max_tokens(1), 1);
        assert_eq!(c.clamp_max_tokens(300), 300);
        assert_eq!(c.clamp_max_tokens(301), 300);
        assert_eq!(c.clamp_max_tokens(u32::MAX), 300);
    }

    #[test]
    fn rejects_bad_values() {
        let cases = [
            with(|c| c.base_url = "ftp://host/v1".into()),
            with(|c| c.base_url = "not a url".into()),
            with(|c| c.base_url = "https://user:secret@host/v1".into()),
            with(|c| c.base_url = "https://host/v1?key=secret".into()),
            with(|c| c.model = " ".into()),
            with(|c| c.api_key_env = Some("sk-live-abcdef".into())),
            with(|c| c.api_key_env = Some(String::new())),
            with(|c| c.timeout_ms = 0),
            with(|c| c.max_calls_per_minute = 0),
            with(|c| c.max_calls_per_day = 0),
            with(|c| c.probe_interval_ms = 0),
            with(|c| c.max_tokens_per_call = 0),
            with(|c| c.max_tokens_per_minute = 1023),
            with(|c| c.max_tokens_per_day = 1000),
            with(|c| c.budget_file = Some(" ".into())),
        ];
        for c in cases {
            let err = c.validate().expect_err("must be rejected");
            assert!(matches!(err, CloudError::Config(_)), "{err}");
            let text = err.to_string();
            assert!(!text.contains("secret") && !text.contains("sk-live"), "{text}");
        }
    }
}
