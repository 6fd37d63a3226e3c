//! What a query is and what it returns: the router's request (chat messages,
//! generation parameters, the `swarm` extension, a deadline), the answer with its
//! provenance, the events of a streamed answer, and the router's error type.

use std::time::{Duration, Instant};

use serde::Serialize;
use swarm_protocol::{clip_owned, ErrorCode, Privacy, RouteOverride, Task, WireError};
use thiserror::Error;

use crate::inference::{ChatMessage, InferenceError, TokenLogprob};

#[derive(Debug, Error)]
pub enum RouteError {
    #[error("{0}")]
    BadRequest(String),
    #[error("model `{0}` is not served by this node or any peer")]
    UnknownModel(String),
    #[error("no peer can serve `{model}` now: {reason}")]
    NoPeer { model: String, reason: String },
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("request too large: {0}")]
    TooLarge(String),
    #[error("deadline passed")]
    Timeout,
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<InferenceError> for RouteError {
    fn from(e: InferenceError) -> Self {
        match e {
            InferenceError::Overloaded => RouteError::Overloaded(e.to_string()),
            InferenceError::Timeout => RouteError::Timeout,
            InferenceError::TooLong { .. } => RouteError::TooLarge(e.to_string()),
            InferenceError::BadRequest(m) => RouteError::BadRequest(m),
            other => RouteError::Internal(other.to_string()),
        }
    }
}

/// Generation parameters of a chat request.
#[derive(Debug, Clone)]
pub struct ChatParams {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Alternatives per token to report (0 = only the chosen tokens).
    pub top_logprobs: usize,
}

impl ChatParams {
    /// Greedy decoding of at most `max_tokens`: what votes and benchmarks use.
    pub fn greedy(max_tokens: u32) -> Self {
        ChatParams {
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
            top_logprobs: 0,
        }
    }
}

/// The request's `swarm` extension.
#[derive(Debug, Clone, Default)]
pub struct SwarmExt {
    pub route: RouteOverride,
    pub task: Option<Task>,
    pub privacy: Option<Privacy>,
    pub min_confidence: Option<f32>,
    /// The team the query belongs to: only peers serving it see it.
    pub team: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// `None` = this node's default model.
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub params: ChatParams,
    pub ext: SwarmExt,
    pub deadline: Instant,
}

impl ChatRequest {
    /// A greedy multiple-choice question with options labelled A, B, …: the
    /// request benchmarks, simulations and tests send through the router.
    pub fn mcq(question: &str, options: &[&str], max_tokens: u32, ext: SwarmExt, within: Duration) -> Self {
        let choices = options
            .iter()
            .zip(b'A'..=b'Z')
            .map(|(t, l)| swarm_protocol::Choice {
                label: char::from(l).to_string(),
                text: (*t).to_string(),
            })
            .collect();
        ChatRequest {
            model: None,
            messages: vec![ChatMessage::new("user", question)],
            params: ChatParams::greedy(max_tokens),
            ext: SwarmExt {
                task: Some(Task::Mcq { choices }),
                ..ext
            },
            deadline: Instant::now() + within,
        }
    }

    /// The task asked for: declared, or detected from the last user message.
    pub fn task(&self) -> Task {
        task_of(&self.messages, self.ext.task.clone())
    }
}

/// The task a request asks for: declared, or detected from its last user message.
pub fn task_of(messages: &[ChatMessage], declared: Option<Task>) -> Task {
    declared.unwrap_or_else(|| swarm_protocol::detect_task(last_user(messages)))
}

pub(crate) fn last_user(messages: &[ChatMessage]) -> &str {
    messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.content.as_str())
        .unwrap_or("")
}

pub(crate) fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// A deadline as the wire carries it: a budget in ms, bounded by the protocol.
pub(crate) fn wire_deadline(left: Duration) -> u32 {
    left.as_millis().min(u128::from(swarm_protocol::MAX_DEADLINE_MS)) as u32
}

pub(crate) fn wire_err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError {
        code,
        message: clip_owned(msg.into(), swarm_protocol::MAX_ERROR_LEN),
    }
}

pub(crate) fn wire_from_inference(e: &InferenceError) -> WireError {
    let code = match e {
        InferenceError::Overloaded => ErrorCode::Overloaded,
        InferenceError::Timeout => ErrorCode::Timeout,
        InferenceError::BadRequest(_) | InferenceError::TooLong { .. } => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    wire_err(code, e.to_string())
}

/// One voter in the provenance.
#[derive(Debug, Clone, Serialize)]
pub struct VoterView {
    pub peer: String,
    pub model: String,
    pub answer: Option<String>,
    pub confidence: Option<f32>,
    /// Round trip seen by the coordinator (its own answer: its inference time).
    pub elapsed_ms: u64,
    /// The voter's own inference time, as it reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inference_ms: Option<u64>,
    pub error: Option<String>,
    /// Which version of `model` answered, as the voter reports it.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub model_version: String,
}

/// Where an answer came from: the response's `swarm` object.
#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub route: String,
    pub peer: String,
    pub model: String,
    pub confidence: f32,
    pub elapsed_ms: u64,
    pub task: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_confidence: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f32>,
    /// Wall time of the vote phase (requests out to decision).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vote_ms: Option<f64>,
    pub voters: Vec<VoterView>,
    pub gateway: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_ms: Option<u64>,
    pub degraded: bool,
    pub degraded_reason: Option<String>,
    pub safety_flag: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub safety_category: Option<String>,
    pub forwarded: bool,
    /// The version of `model` (local and vote answers; empty for the cloud).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub model_version: String,
}

impl Provenance {
    /// An answer of `model` on `peer`, not yet routed further: the one place
    /// provenance starts from, whatever the route turns out to be.
    pub(crate) fn answered_by(peer: &str, model: &str, confidence: f32, task: &Task) -> Self {
        Provenance {
            route: "local".into(),
            peer: peer.to_string(),
            model: model.to_string(),
            confidence,
            elapsed_ms: 0,
            task: task.kind().to_string(),
            local_confidence: Some(confidence),
            agreement: None,
            vote_ms: None,
            voters: Vec::new(),
            gateway: None,
            cloud_ms: None,
            degraded: false,
            degraded_reason: None,
            safety_flag: false,
            safety_category: None,
            forwarded: false,
            model_version: String::new(),
        }
    }
}

/// The answer to a query the safety policy refuses: the configured message,
/// from no model, with route `refused` and `finish_reason` `content_filter`
/// (OpenAI's name for a filtered answer).
pub(crate) fn refusal(
    me: &str,
    text: &str,
    task: &Task,
    category: Option<String>,
    elapsed_ms: u64,
) -> Answer {
    let mut prov = Provenance::answered_by(me, "safety-policy", 1.0, task);
    prov.route = "refused".into();
    prov.local_confidence = None;
    prov.safety_flag = true;
    prov.safety_category = category;
    prov.elapsed_ms = elapsed_ms;
    Answer {
        text: text.to_string(),
        model: "safety-policy".into(),
        finish_reason: "content_filter".into(),
        prompt_tokens: 0,
        completion_tokens: 0,
        tokens: Vec::new(),
        prov,
    }
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    pub model: String,
    pub finish_reason: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Per-token log-probs of a local generation (empty otherwise).
    pub tokens: Vec<TokenLogprob>,
    pub prov: Provenance,
}

/// One event of a streamed answer.
#[derive(Debug, Clone)]
pub enum ChatEvent {
    /// A piece of the answer's text. Local answers whose route cannot change
    /// stream as generated; every other route sends its decided text as one piece.
    Token(String),
    /// The answer is complete: its whole text, usage and provenance. Always last.
    Done(Box<Answer>),
}
