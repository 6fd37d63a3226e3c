//! Versioned wire messages of the swarm and their field validation (bounds on every string, list and float).
//!
//! Every message that crosses the network implements [`Validate`]; `codec::decode` runs it, so
//! code behind the codec can rely on the limits below (no unbounded strings, no NaN confidences).

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Version carried in every codec envelope; a peer rejects other versions.
pub const PROTOCOL_VERSION: u16 = 1;

pub use crate::limits::{MAX_ADDRS, MAX_ADDR_LEN, MAX_PEER_ID_LEN, MAX_TEAMS, MAX_TEAM_LEN, MAX_TERM};
/// Longest human-readable node name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest software version string.
pub const MAX_VERSION_LEN: usize = 32;
/// Most model cards in one advert.
pub const MAX_MODELS: usize = 64;
/// Longest model id / architecture / quantisation name.
pub const MAX_MODEL_ID_LEN: usize = 64;
/// Most domain tags on one model card.
pub const MAX_DOMAINS: usize = 8;
/// Longest domain tag.
pub const MAX_DOMAIN_LEN: usize = 32;
/// A team name: 1..=32 of `[A-Za-z0-9_-]`.
pub fn check_team(field: &'static str, t: &str) -> Result<(), ValidationError> {
    if t.is_empty()
        || t.len() > MAX_TEAM_LEN
        || !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ValidationError::Invalid {
            field,
            reason: "a team is 1-32 of [A-Za-z0-9_-]",
        });
    }
    Ok(())
}
/// Most chat messages in one request.
pub const MAX_MESSAGES: usize = 64;
/// Longest chat role name.
pub const MAX_ROLE_LEN: usize = 16;
/// Total bytes of message content in one request.
pub const MAX_CONTENT_BYTES: usize = 64 * 1024;
/// Most options of a multiple-choice task.
pub const MAX_CHOICES: usize = 16;
/// Longest option label (e.g. "A").
pub const MAX_CHOICE_LABEL_LEN: usize = 8;
/// Longest option text.
pub const MAX_CHOICE_TEXT_LEN: usize = 1024;
/// Most labels of a classification task.
pub const MAX_LABELS: usize = 64;
/// Longest classification label.
pub const MAX_LABEL_LEN: usize = 64;
/// Largest `max_tokens` a peer will accept.
pub const MAX_TOKENS: u32 = 32_768;
/// Longest deadline budget a request may carry (10 minutes).
pub const MAX_DEADLINE_MS: u32 = 600_000;
/// Most stop sequences.
pub const MAX_STOP: usize = 8;
/// Longest stop sequence.
pub const MAX_STOP_LEN: usize = 64;
/// Longest vote answer (raw or normalised).
pub const MAX_ANSWER_BYTES: usize = 16 * 1024;
/// Longest generated text in a query or escalation response.
pub const MAX_TEXT_BYTES: usize = 512 * 1024;
/// Longest piece of a streamed escalation answer (one frame).
pub const MAX_PIECE_BYTES: usize = 16 * 1024;
/// Most voter records attached to an escalation.
pub const MAX_VOTERS: usize = 64;
/// Longest error message.
pub const MAX_ERROR_LEN: usize = 1024;
/// Longest finish reason ("stop", "length", ...).
pub const MAX_FINISH_REASON_LEN: usize = 32;
/// Highest sampling temperature accepted (OpenAI's range).
pub const MAX_TEMPERATURE: f32 = 2.0;

/// Why a message failed validation.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ValidationError {
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} bytes, limit {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} has {count} items, limit {max}")]
    TooMany {
        field: &'static str,
        count: usize,
        max: usize,
    },
    #[error("{field} = {value} is not a finite number in [{min}, {max}]")]
    OutOfRange {
        field: &'static str,
        value: f64,
        min: f64,
        max: f64,
    },
    #[error("{field}: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
}

/// Field-level validation of a decoded message.
pub trait Validate {
    fn validate(&self) -> Result<(), ValidationError>;
}

// ---- small checkers shared by the impls below -------------------------------------------

fn check_str(field: &'static str, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.len() > max {
        return Err(ValidationError::TooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

fn check_id(field: &'static str, s: &str, max: usize) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::Empty { field });
    }
    check_str(field, s, max)
}

fn check_count(field: &'static str, count: usize, max: usize) -> Result<(), ValidationError> {
    if count > max {
        return Err(ValidationError::TooMany { field, count, max });
    }
    Ok(())
}

fn check_f32(field: &'static str, v: f32, min: f32, max: f32) -> Result<(), ValidationError> {
    if !v.is_finite() || v < min || v > max {
        return Err(ValidationError::OutOfRange {
            field,
            value: f64::from(v),
            min: f64::from(min),
            max: f64::from(max),
        });
    }
    Ok(())
}

fn check_deadline(deadline_ms: u32) -> Result<(), ValidationError> {
    if deadline_ms == 0 || deadline_ms > MAX_DEADLINE_MS {
        return Err(ValidationError::Invalid {
            field: "deadline_ms",
            reason: "must be in 1..=600000",
        });
    }
    Ok(())
}

fn check_max_tokens(max_tokens: u32) -> Result<(), ValidationError> {
    if max_tokens == 0 || max_tokens > MAX_TOKENS {
        return Err(ValidationError::Invalid {
            field: "max_tokens",
            reason: "must be in 1..=32768",
        });
    }
    Ok(())
}

// ---- adverts ------------------------------------------------------------------------------

/// What a peer publishes on the adverts gossip topic every `advert_interval` and on change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Advert {
    pub peer: String,
    /// Strictly increasing per peer, also across restarts (seed it from the wall clock).
    pub seq: u64,
    pub name: String,
    pub version: String,
    pub addrs: Vec<String>,
    pub models: Vec<ModelCard>,
    pub capacity: Capacity,
    /// Present only on nodes configured with a cloud endpoint.
    pub cloud: Option<CloudStatus>,
    /// Present while this peer holds the gateway role.
    pub gateway: Option<GatewayClaim>,
    /// Sender's wall clock; informational only (clocks are not trusted for expiry).
    pub sent_ms: u64,
    /// In a keyed swarm: the sender's membership certificate (its role decides whether it may
    /// be gateway). Carried in the advert, not only in the connection handshake, so a node
    /// can check the author of an advert relayed by others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<crate::admission::Certificate>,
    /// Teams whose queries this peer serves; a team's queries go only to its peers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub teams: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    pub arch: String,
    pub params: u64,
    pub quant: String,
    pub ctx: u32,
    pub domains: Vec<String>,
    pub tok_s: f32,
    /// sha256 of the model file (hex), empty when the model has no file.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// The served version of `id` (by default the sha256's first 12 hex digits):
    /// peers and votes name which one answered.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    pub cores: u32,
    /// Fraction of CPU in use, 0..=1.
    pub cpu_load: f32,
    pub mem_free_mb: u64,
    /// Requests waiting for the inference worker.
    pub queue: u32,
    pub max_concurrency: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudStatus {
    pub reachable: bool,
    pub budget_left: u32,
    /// Operator preference for the gateway role; higher wins.
    pub priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayClaim {
    pub term: u64,
    /// Claimant's clock when it took the role.
    pub since_ms: u64,
}

impl Validate for ModelCard {
    fn validate(&self) -> Result<(), ValidationError> {
        check_id("model.id", &self.id, MAX_MODEL_ID_LEN)?;
        check_str("model.arch", &self.arch, MAX_MODEL_ID_LEN)?;
        check_str("model.quant", &self.quant, MAX_MODEL_ID_LEN)?;
        check_count("model.domains", self.domains.len(), MAX_DOMAINS)?;
        for d in &self.domains {
            check_str("model.domains[]", d, MAX_DOMAIN_LEN)?;
        }
        check_f32("model.tok_s", self.tok_s, 0.0, 1.0e6)?;
        if !self.sha256.is_empty()
            && (self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(ValidationError::Invalid {
                field: "model.sha256",
                reason: "64 hex digits or empty",
            });
        }
        check_str("model.version", &self.version, MAX_VERSION_LEN)
    }
}

impl Validate for Capacity {
    fn validate(&self) -> Result<(), ValidationError> {
        check_f32("capacity.cpu_load", self.cpu_load, 0.0, 1.0)
    }
}

impl Validate for Advert {
    fn validate(&self) -> Result<(), ValidationError> {
        check_id("peer", &self.peer, MAX_PEER_ID_LEN)?;
        check_str("name", &self.name, MAX_NAME_LEN)?;
        check_str("version", &self.version, MAX_VERSION_LEN)?;
        check_count("addrs", self.addrs.len(), MAX_ADDRS)?;
        for a in &self.addrs {
            check_str("addrs[]", a, MAX_ADDR_LEN)?;
        }
        check_count("models", self.models.len(), MAX_MODELS)?;
        for m in &self.models {
            m.validate()?;
        }
        check_count("teams", self.teams.len(), MAX_TEAMS)?;
        for t in &self.teams {
            check_team("teams[]", t)?;
        }
        self.capacity.validate()?;
        if let Some(g) = &self.gateway {
            if g.term == 0 {
                return Err(ValidationError::Invalid {
                    field: "gateway.term",
                    reason: "terms start at 1",
                });
            }
            if g.term > MAX_TERM {
                return Err(ValidationError::Invalid {
                    field: "gateway.term",
                    reason: "beyond any term an honest swarm reaches",
                });
            }
        }
        if let Some(c) = &self.cert {
            if c.peer != self.peer {
                return Err(ValidationError::Invalid {
                    field: "cert.peer",
                    reason: "certificate of another peer",
                });
            }
        }
        Ok(())
    }
}

// ---- requests shared pieces ----------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    pub label: String,
    pub text: String,
}

/// What kind of answer a query expects; decides how votes are normalised and compared.
///
/// Serialised with an inner `task` tag so the HTTP extension's JSON
/// `{"task":"mcq","choices":[...]}` deserialises directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "lowercase")]
pub enum Task {
    Mcq { choices: Vec<Choice> },
    Label { labels: Vec<String> },
    Short,
    Free,
}

impl Task {
    /// Lower-case kind name, as in the JSON tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Task::Mcq { .. } => "mcq",
            Task::Label { .. } => "label",
            Task::Short => "short",
            Task::Free => "free",
        }
    }
}

impl Validate for Task {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Task::Mcq { choices } => {
                if choices.len() < 2 {
                    return Err(ValidationError::Invalid {
                        field: "choices",
                        reason: "an mcq needs at least 2 choices",
                    });
                }
                check_count("choices", choices.len(), MAX_CHOICES)?;
                for (i, c) in choices.iter().enumerate() {
                    check_id("choices[].label", &c.label, MAX_CHOICE_LABEL_LEN)?;
                    check_str("choices[].text", &c.text, MAX_CHOICE_TEXT_LEN)?;
                    if choices[..i].iter().any(|p| p.label == c.label) {
                        return Err(ValidationError::Invalid {
                            field: "choices[].label",
                            reason: "labels must be unique",
                        });
                    }
                }
                Ok(())
            }
            Task::Label { labels } => {
                if labels.is_empty() {
                    return Err(ValidationError::Empty { field: "labels" });
                }
                check_count("labels", labels.len(), MAX_LABELS)?;
                for (i, l) in labels.iter().enumerate() {
                    check_id("labels[]", l, MAX_LABEL_LEN)?;
                    if labels[..i].iter().any(|p| p.eq_ignore_ascii_case(l)) {
                        return Err(ValidationError::Invalid {
                            field: "labels[]",
                            reason: "labels must be unique (case-insensitive)",
                        });
                    }
                }
                Ok(())
            }
            Task::Short | Task::Free => Ok(()),
        }
    }
}

fn check_messages(messages: &[ChatMessage]) -> Result<(), ValidationError> {
    if messages.is_empty() {
        return Err(ValidationError::Empty { field: "messages" });
    }
    check_count("messages", messages.len(), MAX_MESSAGES)?;
    let mut total = 0usize;
    for m in messages {
        check_id("messages[].role", &m.role, MAX_ROLE_LEN)?;
        total = total.saturating_add(m.content.len());
    }
    if total > MAX_CONTENT_BYTES {
        return Err(ValidationError::TooLong {
            field: "messages[].content (total)",
            len: total,
            max: MAX_CONTENT_BYTES,
        });
    }
    Ok(())
}

/// Error half of every reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Overloaded,
    NoModel,
    BadRequest,
    Timeout,
    Internal,
    Unauthorized,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl Validate for WireError {
    fn validate(&self) -> Result<(), ValidationError> {
        check_str("error.message", &self.message, MAX_ERROR_LEN)
    }
}

// ---- vote ---------------------------------------------------------------------------------

/// `/slm-swarm/<ns>/vote/1` request: answer this with your model, within `deadline_ms` of receipt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VoteRequest {
    pub id: u64,
    pub messages: Vec<ChatMessage>,
    pub task: Task,
    pub max_tokens: u32,
    /// Budget measured from receipt, so clock skew between peers does not matter.
    pub deadline_ms: u32,
    /// Preferred model on the voter; `None` = its default.
    pub model: Option<String>,
    /// The query's team: a voter that does not serve it refuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VoteResponse {
    pub id: u64,
    pub answer: String,
    pub normalized: String,
    /// Calibrated confidence, 0..=1.
    pub confidence: f32,
    pub model: String,
    pub tokens: u32,
    pub elapsed_ms: u32,
    /// Which version of `model` answered (its advertised `version`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model_version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum VoteReply {
    Ok(VoteResponse),
    Err(WireError),
}

impl Validate for VoteRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        check_messages(&self.messages)?;
        self.task.validate()?;
        check_max_tokens(self.max_tokens)?;
        check_deadline(self.deadline_ms)?;
        if let Some(m) = &self.model {
            check_id("model", m, MAX_MODEL_ID_LEN)?;
        }
        if let Some(t) = &self.team {
            check_team("team", t)?;
        }
        Ok(())
    }
}

impl Validate for VoteResponse {
    fn validate(&self) -> Result<(), ValidationError> {
        check_str("answer", &self.answer, MAX_ANSWER_BYTES)?;
        check_str("normalized", &self.normalized, MAX_ANSWER_BYTES)?;
        check_f32("confidence", self.confidence, 0.0, 1.0)?;
        check_id("model", &self.model, MAX_MODEL_ID_LEN)?;
        check_str("model_version", &self.model_version, MAX_VERSION_LEN)
    }
}

impl Validate for VoteReply {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            VoteReply::Ok(r) => r.validate(),
            VoteReply::Err(e) => e.validate(),
        }
    }
}

// ---- query (forward a whole query) ----------------------------------------------------------

/// `/slm-swarm/<ns>/query/1` request: run this generation on your model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryRequest {
    pub id: u64,
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: u32,
    pub temperature: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub logprobs: bool,
    pub deadline_ms: u32,
    /// The query's task: a constrained one (mcq, label) is answered by scoring
    /// its options, as the coordinator would locally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
    /// The query's team: a peer that does not serve it refuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryResponse {
    pub id: u64,
    pub text: String,
    pub model: String,
    pub confidence: f32,
    /// Mean log-probability of the generated tokens (≤ 0).
    pub mean_logprob: f32,
    /// Lowest token probability of the generated tokens.
    pub min_prob: f32,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub finish_reason: String,
    pub elapsed_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum QueryReply {
    Ok(QueryResponse),
    Err(WireError),
}

impl Validate for QueryRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        check_id("model", &self.model, MAX_MODEL_ID_LEN)?;
        check_messages(&self.messages)?;
        check_max_tokens(self.max_tokens)?;
        check_f32("temperature", self.temperature, 0.0, MAX_TEMPERATURE)?;
        check_count("stop", self.stop.len(), MAX_STOP)?;
        for s in &self.stop {
            check_id("stop[]", s, MAX_STOP_LEN)?;
        }
        if let Some(t) = &self.task {
            t.validate()?;
        }
        if let Some(t) = &self.team {
            check_team("team", t)?;
        }
        check_deadline(self.deadline_ms)
    }
}

impl Validate for QueryResponse {
    fn validate(&self) -> Result<(), ValidationError> {
        check_str("text", &self.text, MAX_TEXT_BYTES)?;
        check_id("model", &self.model, MAX_MODEL_ID_LEN)?;
        check_f32("confidence", self.confidence, 0.0, 1.0)?;
        check_f32("mean_logprob", self.mean_logprob, -1.0e6, 0.0)?;
        check_f32("min_prob", self.min_prob, 0.0, 1.0)?;
        check_str("finish_reason", &self.finish_reason, MAX_FINISH_REASON_LEN)
    }
}

impl Validate for QueryReply {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            QueryReply::Ok(r) => r.validate(),
            QueryReply::Err(e) => e.validate(),
        }
    }
}

// ---- escalate (to the gateway) --------------------------------------------------------------

/// What one voter said, forwarded to the gateway and reported as provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VoterRecord {
    pub peer: String,
    pub model: String,
    pub answer: String,
    pub confidence: f32,
    pub elapsed_ms: u32,
    pub error: Option<String>,
    /// Which version of `model` answered, when the coordinator knows it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model_version: String,
}

impl Validate for VoterRecord {
    fn validate(&self) -> Result<(), ValidationError> {
        check_id("voter.peer", &self.peer, MAX_PEER_ID_LEN)?;
        check_str("voter.model", &self.model, MAX_MODEL_ID_LEN)?;
        check_str("voter.answer", &self.answer, MAX_ANSWER_BYTES)?;
        check_f32("voter.confidence", self.confidence, 0.0, 1.0)?;
        check_str("voter.model_version", &self.model_version, MAX_VERSION_LEN)?;
        if let Some(e) = &self.error {
            check_str("voter.error", e, MAX_ERROR_LEN)?;
        }
        Ok(())
    }
}

/// `/slm-swarm/<ns>/escalate/1` request: the gateway asks the cloud model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EscalateRequest {
    pub id: u64,
    pub messages: Vec<ChatMessage>,
    pub task: Task,
    pub max_tokens: u32,
    pub swarm_answers: Vec<VoterRecord>,
    pub deadline_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EscalateResponse {
    pub id: u64,
    pub text: String,
    pub model: String,
    pub cloud_ms: u32,
    /// Peer id of the gateway that made the cloud call.
    pub gateway: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EscalateReply {
    Ok(EscalateResponse),
    Err(WireError),
}

impl Validate for EscalateRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        check_messages(&self.messages)?;
        self.task.validate()?;
        check_max_tokens(self.max_tokens)?;
        check_count("swarm_answers", self.swarm_answers.len(), MAX_VOTERS)?;
        for v in &self.swarm_answers {
            v.validate()?;
        }
        check_deadline(self.deadline_ms)
    }
}

impl Validate for EscalateResponse {
    fn validate(&self) -> Result<(), ValidationError> {
        check_str("text", &self.text, MAX_TEXT_BYTES)?;
        check_id("model", &self.model, MAX_MODEL_ID_LEN)?;
        check_id("gateway", &self.gateway, MAX_PEER_ID_LEN)
    }
}

impl Validate for EscalateReply {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            EscalateReply::Ok(r) => r.validate(),
            EscalateReply::Err(e) => e.validate(),
        }
    }
}

/// One frame of `/slm-swarm/<ns>/escalate-stream/1`: the gateway relays the
/// cloud's answer as it arrives (`Piece`s), then ends with the whole reply,
/// whose text is authoritative (the pieces are for the user to watch).
/// Each frame is length-prefixed on the stream; the request is an
/// [`EscalateRequest`] framed the same way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EscalateFrame {
    Piece(String),
    End(EscalateReply),
}

impl Validate for EscalateFrame {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            EscalateFrame::Piece(t) => check_str("piece", t, MAX_PIECE_BYTES),
            EscalateFrame::End(r) => r.validate(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn advert() -> Advert {
        Advert {
            peer: "12D3KooWExamplePeer".into(),
            seq: 7,
            name: "kitchen-pi".into(),
            version: "0.1.0".into(),
            addrs: vec!["/ip4/192.168.1.5/udp/4001/quic-v1".into()],
            models: vec![ModelCard {
                id: "smollm2-135m".into(),
                arch: "llama".into(),
                params: 135_000_000,
                quant: "Q4_1".into(),
                ctx: 2048,
                domains: vec!["general".into()],
                tok_s: 73.0,
                sha256: String::new(),
                version: String::new(),
            }],
            capacity: Capacity {
                cores: 4,
                cpu_load: 0.25,
                mem_free_mb: 2048,
                queue: 0,
                max_concurrency: 1,
            },
            cloud: None,
            gateway: None,
            sent_ms: 1_700_000_000_000,
            cert: None,
            teams: Vec::new(),
        }
    }

    #[test]
    fn valid_advert_passes_and_limits_bite() {
        let a = advert();
        assert_eq!(a.validate(), Ok(()));

        let mut b = a.clone();
        b.peer.clear();
        assert_eq!(b.validate(), Err(ValidationError::Empty { field: "peer" }));

        let mut b = a.clone();
        b.models = vec![a.models[0].clone(); MAX_MODELS + 1];
        assert!(matches!(
            b.validate(),
            Err(ValidationError::TooMany { field: "models", .. })
        ));

        let mut b = a.clone();
        b.capacity.cpu_load = f32::NAN;
        assert!(matches!(b.validate(), Err(ValidationError::OutOfRange { .. })));

        let mut b = a;
        b.gateway = Some(GatewayClaim { term: 0, since_ms: 0 });
        assert!(b.validate().is_err());
    }

    #[test]
    fn task_json_matches_http_extension() {
        let t: Task = serde_json::from_str(
            r#"{"task":"mcq","choices":[{"label":"A","text":"shark"},{"label":"B","text":"dolphin"}]}"#,
        )
        .expect("mcq json");
        assert_eq!(t.kind(), "mcq");
        assert_eq!(t.validate(), Ok(()));
        let t: Task =
            serde_json::from_str(r#"{"task":"label","labels":["positive","negative"]}"#).expect("label json");
        assert!(matches!(t, Task::Label { ref labels } if labels.len() == 2));
        let t: Task = serde_json::from_str(r#"{"task":"short"}"#).expect("short json");
        assert_eq!(t, Task::Short);
        assert_eq!(
            serde_json::to_string(&Task::Free).expect("ser"),
            r#"{"task":"free"}"#
        );
    }

    #[test]
    fn task_rejects_duplicate_or_too_few_options() {
        let one = Task::Mcq {
            choices: vec![Choice {
                label: "A".into(),
                text: "x".into(),
            }],
        };
        assert!(one.validate().is_err());
        let dup = Task::Mcq {
            choices: vec![
                Choice {
                    label: "A".into(),
                    text: "x".into(),
                },
                Choice {
                    label: "A".into(),
                    text: "y".into(),
                },
            ],
        };
        assert!(dup.validate().is_err());
        let labels = Task::Label {
            labels: vec!["Yes".into(), "yes".into()],
        };
        assert!(labels.validate().is_err());
    }

    #[test]
    fn request_content_budget_is_total_not_per_message() {
        let half = "x".repeat(MAX_CONTENT_BYTES / 2 + 1);
        let req = VoteRequest {
            id: 1,
            team: None,
            messages: vec![
                ChatMessage {
                    role: "user".into(),
                    content: half.clone(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: half,
                },
            ],
            task: Task::Short,
            max_tokens: 16,
            deadline_ms: 1000,
            model: None,
        };
        assert!(matches!(req.validate(), Err(ValidationError::TooLong { .. })));
    }

    #[test]
    fn deadlines_and_token_budgets_are_bounded() {
        let mut req = QueryRequest {
            id: 1,
            model: "m".into(),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            max_tokens: 8,
            temperature: 0.0,
            seed: None,
            stop: vec![],
            logprobs: true,
            deadline_ms: 1000,
            task: None,
            team: None,
        };
        assert_eq!(req.validate(), Ok(()));
        req.deadline_ms = 0;
        assert!(req.validate().is_err());
        req.deadline_ms = 1000;
        req.max_tokens = MAX_TOKENS + 1;
        assert!(req.validate().is_err());
        req.max_tokens = 8;
        req.temperature = f32::INFINITY;
        assert!(req.validate().is_err());
    }
}
