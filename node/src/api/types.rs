//! Request types of the chat completions endpoint, OpenAI's shape plus the
//! optional `swarm` extension, and their validation into a router request.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use swarm_protocol::{Choice, Privacy, RouteOverride, Task};

use super::ApiError;
use crate::config::NodeConfig;
use crate::inference::ChatMessage;
use crate::node::Node;
use crate::router::{ChatParams, ChatRequest, SwarmExt};

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `content`: a string, or OpenAI's list of parts (only text parts are used).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

/// An mcq option: a bare text (labelled A, B, … in order) or `{label, text}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ChoiceIn {
    Text(String),
    Labelled { label: String, text: String },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmIn {
    #[serde(default)]
    pub route: Option<String>,
    #[serde(default)]
    pub task: Option<String>,
    #[serde(default)]
    pub choices: Option<Vec<ChoiceIn>>,
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    #[serde(default)]
    pub privacy: Option<Privacy>,
    #[serde(default)]
    pub min_confidence: Option<f32>,
    /// The query's team: it goes only to peers that serve the team.
    #[serde(default)]
    pub team: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<MessageIn>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub swarm: Option<SwarmIn>,
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub message: String,
}

const ROLES: &[&str] = &["system", "user", "assistant", "developer", "tool"];

fn parse_task(s: &SwarmIn) -> Result<Option<Task>, ApiError> {
    let Some(kind) = s.task.as_deref() else {
        if s.choices.is_some() || s.labels.is_some() {
            return Err(
                ApiError::bad_request("swarm.choices/labels need swarm.task").with_param("swarm.task")
            );
        }
        return Ok(None);
    };
    let task = match kind {
        "mcq" => {
            let choices = s.choices.as_ref().ok_or_else(|| {
                ApiError::bad_request("swarm.task mcq needs swarm.choices").with_param("swarm.choices")
            })?;
            let choices: Vec<Choice> = choices
                .iter()
                .enumerate()
                .map(|(i, c)| match c {
                    ChoiceIn::Text(t) => Choice {
                        label: ((b'A' + (i as u8).min(25)) as char).to_string(),
                        text: t.clone(),
                    },
                    ChoiceIn::Labelled { label, text } => Choice {
                        label: label.clone(),
                        text: text.clone(),
                    },
                })
                .collect();
            Task::Mcq { choices }
        }
        "label" => Task::Label {
            labels: s.labels.clone().ok_or_else(|| {
                ApiError::bad_request("swarm.task label needs swarm.labels").with_param("swarm.labels")
            })?,
        },
        "short" => Task::Short,
        "free" => Task::Free,
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown swarm.task `{other}` (mcq | label | short | free)"
            ))
            .with_param("swarm.task"))
        }
    };
    swarm_protocol::Validate::validate(&task)
        .map_err(|e| ApiError::bad_request(format!("swarm task: {e}")).with_param("swarm"))?;
    Ok(Some(task))
}

fn parse_route(s: Option<&str>) -> Result<RouteOverride, ApiError> {
    Ok(match s {
        None | Some("auto") => RouteOverride::Auto,
        Some("local") => RouteOverride::Local,
        Some("vote") => RouteOverride::Vote,
        Some("cloud") => RouteOverride::Cloud,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown swarm.route `{other}` (auto | local | vote | cloud)"
            ))
            .with_param("swarm.route"))
        }
    })
}

impl ChatCompletionRequest {
    /// Validate and convert into the router's request.
    pub fn into_request(self, node: &Node) -> Result<ChatRequest, ApiError> {
        self.into_request_with(&node.cfg)
    }

    /// [`Self::into_request`] against a configuration alone (all it reads of
    /// the node), so tests and the fuzz targets need no running node.
    pub fn into_request_with(self, cfg: &NodeConfig) -> Result<ChatRequest, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_request("messages must not be empty").with_param("messages"));
        }
        if self.messages.len() > swarm_protocol::MAX_MESSAGES {
            return Err(ApiError::bad_request(format!(
                "at most {} messages",
                swarm_protocol::MAX_MESSAGES
            )));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for m in &self.messages {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(
                    ApiError::bad_request(format!("unknown role `{}`", m.role)).with_param("messages")
                );
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => parts
                    .iter()
                    .filter(|p| p.kind == "text")
                    .filter_map(|p| p.text.clone())
                    .collect::<Vec<_>>()
                    .join("\n"),
            };
            let role = if m.role == "developer" {
                "system"
            } else {
                m.role.as_str()
            };
            messages.push(ChatMessage::new(role, &content));
        }
        if !messages.iter().any(|m| m.role == "user") {
            return Err(ApiError::bad_request("at least one user message is required").with_param("messages"));
        }
        let total: usize = messages.iter().map(|m| m.content.len()).sum();
        if total > swarm_protocol::MAX_CONTENT_BYTES {
            return Err(ApiError {
                status: axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                message: format!(
                    "messages hold {total} bytes, limit {}",
                    swarm_protocol::MAX_CONTENT_BYTES
                ),
                kind: "invalid_request_error",
                param: Some("messages".into()),
            });
        }
        if self.n.unwrap_or(1) != 1 {
            return Err(ApiError::bad_request("only n = 1 is supported").with_param("n"));
        }
        let limit = cfg.max_tokens_limit;
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(cfg.default_max_tokens);
        if max_tokens == 0 || max_tokens > limit {
            return Err(
                ApiError::bad_request(format!("max_tokens must be in 1..={limit}")).with_param("max_tokens"),
            );
        }
        let temperature = self.temperature.unwrap_or(0.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad_request("temperature must be within 0..=2").with_param("temperature"));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad_request("top_p must be within (0, 1]").with_param("top_p"));
        }
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stop.len() > swarm_protocol::MAX_STOP
            || stop
                .iter()
                .any(|s| s.is_empty() || s.len() > swarm_protocol::MAX_STOP_LEN)
        {
            return Err(ApiError::bad_request(format!(
                "stop: at most {} non-empty strings of at most {} bytes",
                swarm_protocol::MAX_STOP,
                swarm_protocol::MAX_STOP_LEN
            ))
            .with_param("stop"));
        }
        let top_logprobs = self.top_logprobs.unwrap_or(0);
        if top_logprobs > 20 {
            return Err(ApiError::bad_request("top_logprobs must be at most 20").with_param("top_logprobs"));
        }
        let ext_in = self.swarm.unwrap_or_default();
        if let Some(mc) = ext_in.min_confidence {
            if !(0.0..=1.0).contains(&mc) {
                return Err(ApiError::bad_request("swarm.min_confidence must be within 0..=1")
                    .with_param("swarm.min_confidence"));
            }
        }
        let ext = SwarmExt {
            route: parse_route(ext_in.route.as_deref())?,
            task: parse_task(&ext_in)?,
            privacy: ext_in.privacy,
            min_confidence: ext_in.min_confidence,
            team: match ext_in.team {
                Some(t) => {
                    swarm_protocol::check_team("swarm.team", &t).map_err(|e| {
                        ApiError::bad_request(format!("swarm.team: {e}")).with_param("swarm.team")
                    })?;
                    Some(t)
                }
                None => None,
            },
        };
        Ok(ChatRequest {
            model: self.model,
            messages,
            params: ChatParams {
                max_tokens,
                temperature,
                top_p,
                seed: self.seed,
                stop,
                top_logprobs: if self.logprobs.unwrap_or(false) {
                    top_logprobs as usize
                } else {
                    0
                },
            },
            ext,
            deadline: Instant::now() + Duration::from_millis(cfg.request_timeout_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    //! Properties of the body → request conversion (the `http_request` fuzz
    //! target's, with bounded case counts): no panic on any body; an accepted
    //! request is within the limits, and the messages the router builds from it
    //! for peers are valid and fit the wire.

    use proptest::collection::vec;
    use proptest::prelude::*;
    use serde_json::{json, Map, Value};
    use swarm_protocol::{encode_msg, EscalateRequest, QueryRequest, VoteRequest, WireMessage};

    use super::*;
    use crate::router::task_of;

    fn fits<T: WireMessage + std::fmt::Debug>(what: &str, msg: &T) -> Result<(), TestCaseError> {
        prop_assert_eq!(msg.validate(), Ok(()), "{} from an accepted request", what);
        prop_assert!(
            encode_msg(msg).is_ok(),
            "{} from an accepted request does not fit",
            what
        );
        Ok(())
    }

    /// What the `http_request` fuzz target checks, for one body.
    fn check(body: &[u8]) -> Result<(), TestCaseError> {
        let Ok(parsed) = serde_json::from_slice::<ChatCompletionRequest>(body) else {
            return Ok(());
        };
        let cfg = NodeConfig::default();
        let Ok(req) = parsed.into_request_with(&cfg) else {
            return Ok(());
        };
        prop_assert!(!req.messages.is_empty() && req.messages.len() <= swarm_protocol::MAX_MESSAGES);
        let total: usize = req.messages.iter().map(|m| m.content.len()).sum();
        prop_assert!(total <= swarm_protocol::MAX_CONTENT_BYTES);
        prop_assert!((1..=cfg.max_tokens_limit).contains(&req.params.max_tokens));
        let task = task_of(&req.messages, req.ext.task.clone());
        prop_assert_eq!(&task, &task_of(&req.messages, req.ext.task.clone()));
        let max_tokens = req.params.max_tokens.clamp(1, swarm_protocol::MAX_TOKENS);
        fits(
            "vote request",
            &VoteRequest {
                id: 1,
                messages: req.messages.clone(),
                task: task.clone(),
                max_tokens,
                deadline_ms: 1_000,
                model: Some("m".into()),
                team: None,
            },
        )?;
        fits(
            "escalate request",
            &EscalateRequest {
                id: 1,
                messages: req.messages.clone(),
                task,
                max_tokens,
                swarm_answers: Vec::new(),
                deadline_ms: 1_000,
            },
        )?;
        fits(
            "query request",
            &QueryRequest {
                id: 1,
                model: "m".into(),
                messages: req.messages,
                max_tokens: req.params.max_tokens,
                temperature: req.params.temperature,
                seed: req.params.seed,
                stop: req.params.stop,
                logprobs: req.params.top_logprobs > 0,
                deadline_ms: 1_000,
                task: None,
                team: None,
            },
        )
    }

    fn short_text() -> impl Strategy<Value = String> {
        vec(any::<char>(), 0..24).prop_map(String::from_iter)
    }

    /// Multiple choice prompts, in line and inline form, with options up to 2 KiB.
    fn mcq_prompt() -> impl Strategy<Value = String> {
        (short_text(), vec(0usize..2048, 2..5), any::<bool>()).prop_map(|(q, lens, inline)| {
            let sep = if inline { " " } else { "\n" };
            let mut s = q;
            for (i, n) in lens.into_iter().enumerate() {
                s.push_str(sep);
                s.push((b'A' + i as u8) as char);
                s.push_str(". ");
                s.push_str(&"é".repeat(n / 2 + 1));
            }
            s
        })
    }

    fn content() -> impl Strategy<Value = Value> {
        prop_oneof![
            short_text().prop_map(Value::from),
            mcq_prompt().prop_map(Value::from),
            Just(Value::Null),
            vec(
                (
                    prop_oneof![Just("text"), Just("image_url")],
                    proptest::option::of(short_text())
                ),
                0..3
            )
            .prop_map(|parts| Value::Array(
                parts
                    .into_iter()
                    .map(|(t, text)| json!({"type": t, "text": text}))
                    .collect()
            )),
        ]
    }

    fn role() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just("user"),
            Just("system"),
            Just("assistant"),
            Just("developer"),
            Just("tool"),
            Just("robot"),
        ]
    }

    fn swarm_ext() -> impl Strategy<Value = Value> {
        (
            proptest::option::of(prop_oneof![
                Just("auto"),
                Just("local"),
                Just("vote"),
                Just("cloud"),
                Just("x")
            ]),
            proptest::option::of(prop_oneof![
                Just("mcq"),
                Just("label"),
                Just("short"),
                Just("free"),
                Just("y")
            ]),
            proptest::option::of(vec(short_text(), 0..20)),
            proptest::option::of(vec(short_text(), 0..70)),
            proptest::option::of(-0.5f32..1.5),
        )
            .prop_map(|(route, task, choices, labels, mc)| {
                let mut m = Map::new();
                let mut put = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        m.insert(k.into(), v);
                    }
                };
                put("route", route.map(Value::from));
                put("task", task.map(Value::from));
                put("choices", choices.map(Value::from));
                put("labels", labels.map(Value::from));
                put("min_confidence", mc.map(Value::from));
                Value::Object(m)
            })
    }

    fn body() -> impl Strategy<Value = Value> {
        (
            vec((role(), content()), 0..5),
            proptest::option::of(0u32..5000),
            proptest::option::of(-1.0f32..3.0),
            proptest::option::of(prop_oneof![
                short_text().prop_map(Value::from),
                vec(short_text(), 0..10).prop_map(Value::from)
            ]),
            proptest::option::of(0u32..3),
            proptest::option::of(swarm_ext()),
        )
            .prop_map(|(msgs, max_tokens, temperature, stop, n, swarm)| {
                let mut m = Map::new();
                m.insert(
                    "messages".into(),
                    Value::Array(
                        msgs.into_iter()
                            .map(|(r, c)| json!({"role": r, "content": c}))
                            .collect(),
                    ),
                );
                let mut put = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        m.insert(k.into(), v);
                    }
                };
                put("max_tokens", max_tokens.map(Value::from));
                put("temperature", temperature.map(Value::from));
                put("stop", stop);
                put("n", n.map(Value::from));
                put("swarm", swarm);
                Value::Object(m)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn accepted_requests_are_bounded_and_sendable(b in body()) {
            check(&serde_json::to_vec(&b).expect("json"))?;
        }

        #[test]
        fn arbitrary_bodies_never_panic(bytes in vec(any::<u8>(), 0..512)) {
            check(&bytes)?;
        }
    }
}
