//! Runs a query: the local answer with its calibrated confidence, then the
//! protocol's route policy decides between answering locally, a distributed
//! vote among heterogeneous peers, or escalation to the gateway's cloud model.
//! Also serves peers: votes, forwarded queries and (on the gateway) escalations.
//! Decisions come from `swarm_protocol::policy`; this module only executes them.
//! Free-text votes are decided by meaning (answers clustered by their sentence
//! embeddings) when the node has an embedder, by exact match otherwise.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use libp2p::PeerId;
use serde::Serialize;
use swarm_protocol::{
    cluster_free, decide_after_vote, decide_first, detect_task, normalize, select_voters_spread, AfterVote,
    ErrorCode, EscalateReply, EscalateRequest, FreeCluster, Privacy, QueryReply, QueryRequest, QueryResponse,
    Route, RouteInputs, RouteOverride, Task, Thresholds, VoteReply, VoteRequest, VoteResponse, VoteTally,
    VoterCandidate, VoterRecord, WireError,
};
use thiserror::Error;

use crate::config::Signal;
use crate::inference::embedder::{EmbedError, Embedder};
use crate::inference::{
    ChatMessage, ChoiceKind, ChoiceRequest, ChoiceResult, GenerateRequest, Generation, InferenceError,
    ModelHandle, Prompt, TokenLogprob,
};
use crate::node::Node;

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

/// The request's `swarm` extension.
#[derive(Debug, Clone, Default)]
pub struct SwarmExt {
    pub route: RouteOverride,
    pub task: Option<Task>,
    pub privacy: Option<Privacy>,
    pub min_confidence: Option<f32>,
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
            params: ChatParams {
                max_tokens,
                temperature: 0.0,
                top_p: 1.0,
                seed: None,
                stop: Vec::new(),
                top_logprobs: 0,
            },
            ext: SwarmExt {
                task: Some(Task::Mcq { choices }),
                ..ext
            },
            deadline: Instant::now() + within,
        }
    }
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

/// The local answer of one model, with its signals.
#[derive(Debug, Clone)]
pub struct LocalAnswer {
    pub text: String,
    pub normalized: Option<String>,
    pub raw_confidence: f32,
    pub confidence: f32,
    pub model: String,
    pub generation: Option<Generation>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub finish_reason: String,
    pub elapsed_ms: u64,
}

fn to_wire(m: &[ChatMessage]) -> Vec<swarm_protocol::ChatMessage> {
    m.iter()
        .map(|m| swarm_protocol::ChatMessage {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect()
}

fn from_wire(m: &[swarm_protocol::ChatMessage]) -> Vec<ChatMessage> {
    m.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect()
}

fn last_user(messages: &[ChatMessage]) -> &str {
    messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.content.as_str())
        .unwrap_or("")
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn wire_err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    let mut message: String = msg.into();
    message.truncate(swarm_protocol::MAX_ERROR_LEN);
    WireError { code, message }
}

fn wire_from_inference(e: &InferenceError) -> WireError {
    let code = match e {
        InferenceError::Overloaded => ErrorCode::Overloaded,
        InferenceError::Timeout => ErrorCode::Timeout,
        InferenceError::BadRequest(_) | InferenceError::TooLong { .. } => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    wire_err(code, e.to_string())
}

/// The task a request asks for: declared, or detected from its last user message.
pub fn task_of(messages: &[ChatMessage], declared: Option<Task>) -> Task {
    declared.unwrap_or_else(|| detect_task(last_user(messages)))
}

/// One raw signal of a scored choice, for `RoutingConfig::calibrate`.
pub fn choice_signal(r: &ChoiceResult, s: Signal) -> Option<f32> {
    Some(match s {
        Signal::Confidence => r.confidence,
        Signal::Margin => r.margin,
        Signal::MeanLogprob => r.mean_logprob,
        Signal::MinProb => r.min_prob,
    })
}

/// One raw signal of generated text (no option margin there).
pub fn generation_signal(g: &Generation, s: Signal) -> Option<f32> {
    match s {
        Signal::Confidence => Some(g.confidence),
        Signal::Margin => None,
        Signal::MeanLogprob => Some(g.mean_logprob),
        Signal::MinProb => Some(g.min_prob),
    }
}

/// Answer with a local model: options are scored for mcq/label tasks, text is
/// generated otherwise. The confidence is calibrated per model.
pub async fn answer_locally(
    node: &Node,
    model: &ModelHandle,
    messages: &[ChatMessage],
    task: &Task,
    params: &ChatParams,
    deadline: Instant,
) -> Result<LocalAnswer, InferenceError> {
    let t0 = Instant::now();
    let info = model.info().clone();
    let routing = &node.cfg.routing;
    match task {
        Task::Mcq { choices } => {
            let r = model
                .choose(
                    ChoiceRequest {
                        question: last_user(messages).to_string(),
                        options: choices
                            .iter()
                            .map(|c| (c.label.clone(), c.text.clone()))
                            .collect(),
                        kind: ChoiceKind::Mcq,
                        scorer: info.scorer,
                    },
                    Some(deadline),
                )
                .await?;
            let text = choices
                .get(r.index)
                .map(|c| format!("{}. {}", c.label, c.text))
                .unwrap_or_else(|| r.label.clone());
            Ok(LocalAnswer {
                text,
                normalized: Some(r.label.clone()),
                raw_confidence: r.confidence,
                confidence: routing.calibrate(&info.id, |s| choice_signal(&r, s)),
                model: info.id.clone(),
                generation: None,
                prompt_tokens: r.prompt_tokens as u32,
                completion_tokens: 1,
                finish_reason: "stop".into(),
                elapsed_ms: t0.elapsed().as_millis() as u64,
            })
        }
        Task::Label { labels } => {
            let r = model
                .choose(
                    ChoiceRequest {
                        question: last_user(messages).to_string(),
                        options: labels.iter().map(|l| (l.clone(), l.clone())).collect(),
                        kind: ChoiceKind::Label,
                        scorer: info.scorer,
                    },
                    Some(deadline),
                )
                .await?;
            Ok(LocalAnswer {
                text: r.label.clone(),
                normalized: Some(r.label.clone()),
                raw_confidence: r.confidence,
                confidence: routing.calibrate(&info.id, |s| choice_signal(&r, s)),
                model: info.id.clone(),
                generation: None,
                prompt_tokens: r.prompt_tokens as u32,
                completion_tokens: 1,
                finish_reason: "stop".into(),
                elapsed_ms: t0.elapsed().as_millis() as u64,
            })
        }
        Task::Short | Task::Free => {
            let g = model
                .generate(generate_request(messages, params), Some(deadline))
                .await?;
            node.record_speed(&info.id, g.completion_tokens, g.decode_ms);
            let text = g.text.trim().to_string();
            Ok(LocalAnswer {
                normalized: normalize(task, &text),
                raw_confidence: g.confidence,
                confidence: routing.calibrate(&info.id, |s| generation_signal(&g, s)),
                model: info.id.clone(),
                prompt_tokens: g.prompt_tokens as u32,
                completion_tokens: g.completion_tokens as u32,
                finish_reason: g.finish_reason.as_str().to_string(),
                text,
                generation: Some(g),
                elapsed_ms: t0.elapsed().as_millis() as u64,
            })
        }
    }
}

pub fn generate_request(messages: &[ChatMessage], p: &ChatParams) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Chat(messages.to_vec()),
        max_tokens: p.max_tokens as usize,
        temperature: p.temperature,
        top_p: p.top_p,
        seed: p.seed,
        stop: p.stop.clone(),
        top_logprobs: p.top_logprobs,
    }
}

/// Resolve the requested model: a local handle, or the peers that serve it.
pub enum Target<'a> {
    Local(&'a ModelHandle),
    Remote(Vec<String>),
}

pub fn target<'a>(node: &'a Node, model: Option<&str>) -> Result<Target<'a>, RouteError> {
    let id = match model {
        None | Some("") | Some("auto") | Some("swarm") => node.default_model.as_str(),
        Some(m) => m,
    };
    if let Some(h) = node.models.get(id) {
        return Ok(Target::Local(h));
    }
    let view = node.snapshot();
    let peers: Vec<String> = view
        .peers_with_model(id)
        .iter()
        .map(|p| p.advert.peer.clone())
        .collect();
    if peers.is_empty() {
        if let Some(t) = view.gone.get(id) {
            return Err(RouteError::NoPeer {
                model: id.to_string(),
                reason: format!("its last peer left {} s ago", t.elapsed().as_secs()),
            });
        }
        return Err(RouteError::UnknownModel(id.to_string()));
    }
    Ok(Target::Remote(peers))
}

/// Answer a chat request: local answer, then local / vote / cloud as the policy decides.
pub async fn chat(node: &Node, req: ChatRequest) -> Result<Answer, RouteError> {
    let t0 = Instant::now();
    let model_id = req.model.clone();
    let handle = match target(node, model_id.as_deref())? {
        Target::Local(h) => h.clone(),
        Target::Remote(peers) => return forward(node, &req, peers, t0).await,
    };
    let task = task_of(&req.messages, req.ext.task.clone());
    let privacy = req.ext.privacy.unwrap_or(node.cfg.routing.privacy);
    // The safety check (an embedding on the blocking pool) runs alongside the local answer.
    let (safety, local) = tokio::join!(
        crate::gateway::safety_check(node, last_user(&req.messages)),
        answer_locally(node, &handle, &req.messages, &task, &req.params, req.deadline)
    );
    let local = local?;
    if safety.flagged {
        node.metrics.safety_flags.inc();
    }
    let view = node.snapshot();
    let (tau_local, tau_vote) = node.cfg.routing.thresholds(&local.model);
    let thresholds = Thresholds { tau_local, tau_vote };
    let inputs = RouteInputs {
        local_confidence: local.confidence,
        privacy,
        min_confidence: req.ext.min_confidence,
        live_voters: view.peers.iter().filter(|p| !p.advert.models.is_empty()).count(),
        safety_flag: safety.flagged,
        route_override: req.ext.route,
        gateway_available: view.gateway.is_some(),
    };
    let me = node.peer_id.to_string();
    let mut prov = Provenance {
        route: "local".into(),
        peer: me.clone(),
        model: local.model.clone(),
        confidence: local.confidence,
        elapsed_ms: 0,
        task: task.kind().to_string(),
        local_confidence: Some(local.confidence),
        agreement: None,
        vote_ms: None,
        voters: Vec::new(),
        gateway: None,
        cloud_ms: None,
        degraded: false,
        degraded_reason: None,
        safety_flag: safety.flagged,
        safety_category: safety.category.clone(),
        forwarded: false,
    };
    let mut answer = Answer {
        text: local.text.clone(),
        model: local.model.clone(),
        finish_reason: local.finish_reason.clone(),
        prompt_tokens: local.prompt_tokens,
        completion_tokens: local.completion_tokens,
        tokens: local
            .generation
            .as_ref()
            .map(|g| g.tokens.clone())
            .unwrap_or_default(),
        prov: prov.clone(),
    };
    let first = decide_first(&inputs, &thresholds);
    tracing::debug!(?first, confidence = local.confidence, "route decision");
    let mut swarm_records: Vec<VoterRecord> = Vec::new();
    let escalate_now = match first {
        Route::Local => false,
        Route::LocalDegraded { reason } => {
            prov.degraded = true;
            prov.degraded_reason = Some(reason.to_string());
            false
        }
        Route::Escalate => true,
        Route::Vote => {
            let v = run_vote(node, &req, &task, &local).await;
            node.metrics.vote_size.observe(v.valid as f64);
            prov.route = "vote".into();
            prov.vote_ms = Some(v.vote_ms);
            prov.voters = v.voters.clone();
            prov.agreement = Some(v.agreement);
            prov.confidence = v.agreement;
            swarm_records = v.records.clone();
            if let Some(text) = &v.winner_text {
                answer.text = text.clone();
                answer.tokens.clear();
                if v.winner_model.as_deref() != Some(local.model.as_str()) {
                    answer.finish_reason = "stop".into();
                }
            }
            let agreement = if v.quorum_met { v.agreement } else { 0.0 };
            match decide_after_vote(agreement, &inputs, &thresholds) {
                AfterVote::Accept => false,
                AfterVote::Escalate => true,
                AfterVote::Degraded { reason } => {
                    prov.degraded = true;
                    prov.degraded_reason = Some(if v.quorum_met {
                        reason.to_string()
                    } else {
                        format!(
                            "vote quorum not met ({} of {} valid votes); {reason}",
                            v.valid, node.cfg.routing.quorum
                        )
                    });
                    false
                }
            }
        }
    };
    if escalate_now {
        if swarm_records.is_empty() {
            swarm_records.push(VoterRecord {
                peer: me.clone(),
                model: local.model.clone(),
                answer: local.text.clone(),
                confidence: local.confidence,
                elapsed_ms: local.elapsed_ms as u32,
                error: None,
            });
        }
        match escalate(node, &req, &task, swarm_records).await {
            Ok(r) => {
                node.metrics
                    .escalations
                    .get_or_create(&crate::metrics::OutcomeLabel { outcome: "ok".into() })
                    .inc();
                prov.route = "cloud".into();
                prov.peer = r.gateway.clone();
                prov.gateway = Some(r.gateway.clone());
                prov.cloud_ms = Some(r.cloud_ms as u64);
                prov.model = r.model.clone();
                prov.confidence = 1.0;
                answer.text = r.text;
                answer.model = r.model;
                answer.tokens.clear();
                answer.finish_reason = "stop".into();
            }
            Err(reason) => {
                node.metrics
                    .escalations
                    .get_or_create(&crate::metrics::OutcomeLabel {
                        outcome: "failed".into(),
                    })
                    .inc();
                prov.degraded = true;
                prov.degraded_reason = Some(reason);
            }
        }
    }
    if prov.degraded {
        node.metrics.degraded.inc();
    }
    prov.elapsed_ms = t0.elapsed().as_millis() as u64;
    node.metrics.observe_query(&prov.route, prov.elapsed_ms as f64);
    answer.prov = prov;
    Ok(answer)
}

/// Send the whole query to peers that have the model, least loaded first.
async fn forward(
    node: &Node,
    req: &ChatRequest,
    peers: Vec<String>,
    t0: Instant,
) -> Result<Answer, RouteError> {
    let model = req.model.clone().unwrap_or_default();
    let mut last_err = String::from("no peer answered");
    for p in peers {
        let Ok(peer) = p.parse::<PeerId>() else { continue };
        let left = remaining(req.deadline);
        if left.is_zero() {
            return Err(RouteError::Timeout);
        }
        let q = QueryRequest {
            id: node.next_request_id(),
            model: model.clone(),
            messages: to_wire(&req.messages),
            max_tokens: req.params.max_tokens,
            temperature: req.params.temperature,
            seed: req.params.seed,
            stop: req.params.stop.clone(),
            logprobs: req.params.top_logprobs > 0,
            deadline_ms: left.as_millis().min(swarm_protocol::MAX_DEADLINE_MS as u128) as u32,
        };
        match node.net.query(peer, q, left).await {
            Ok(QueryReply::Ok(r)) => {
                node.metrics.forwarded.inc();
                let elapsed = t0.elapsed().as_millis() as u64;
                node.metrics.observe_query("local", elapsed as f64);
                return Ok(Answer {
                    text: r.text,
                    model: r.model.clone(),
                    finish_reason: r.finish_reason,
                    prompt_tokens: r.prompt_tokens,
                    completion_tokens: r.completion_tokens,
                    tokens: Vec::new(),
                    prov: Provenance {
                        route: "local".into(),
                        peer: p.clone(),
                        model: r.model,
                        confidence: r.confidence,
                        elapsed_ms: elapsed,
                        task: "free".into(),
                        local_confidence: Some(r.confidence),
                        agreement: None,
                        vote_ms: None,
                        voters: Vec::new(),
                        gateway: None,
                        cloud_ms: None,
                        degraded: false,
                        degraded_reason: None,
                        safety_flag: false,
                        safety_category: None,
                        forwarded: true,
                    },
                });
            }
            Ok(QueryReply::Err(e)) => {
                if e.code == ErrorCode::BadRequest {
                    return Err(RouteError::BadRequest(e.message));
                }
                last_err = format!("{p}: {:?}: {}", e.code, e.message);
            }
            Err(e) => last_err = e.to_string(),
        }
        tracing::debug!("forward to {p} failed: {last_err}");
    }
    Err(RouteError::NoPeer {
        model,
        reason: last_err,
    })
}

struct VoteRun {
    vote_ms: f64,
    winner_text: Option<String>,
    winner_model: Option<String>,
    agreement: f32,
    valid: usize,
    quorum_met: bool,
    voters: Vec<VoterView>,
    records: Vec<VoterRecord>,
}

/// Ask k heterogeneous peers, tally as answers arrive, stop once the leader is safe.
async fn run_vote(node: &Node, req: &ChatRequest, task: &Task, own: &LocalAnswer) -> VoteRun {
    let t_vote = Instant::now();
    let view = node.snapshot();
    let me = node.peer_id.to_string();
    let cands: Vec<VoterCandidate> = view
        .peers
        .iter()
        .flat_map(|p| {
            let load = crate::node::load_of(&p.advert.capacity);
            p.advert.models.iter().map(move |m| VoterCandidate {
                peer: p.advert.peer.clone(),
                model: m.id.clone(),
                load,
            })
        })
        .collect();
    // Spread ties by a per-request salt so coordinators do not all pick the same idle peers.
    let picked = select_voters_spread(
        &cands,
        &own.model,
        node.cfg.routing.voters,
        node.next_request_id(),
    );
    let quorum = node.cfg.routing.quorum.min(picked.len() + 1);
    let mut tally = VoteTally::new(task.clone(), quorum, picked.len() + 1);
    let mut voters = vec![VoterView {
        peer: me.clone(),
        model: own.model.clone(),
        answer: Some(own.text.clone()),
        confidence: Some(own.confidence),
        elapsed_ms: own.elapsed_ms,
        inference_ms: Some(own.elapsed_ms),
        error: None,
    }];
    // Raw answers by voter, to show the winning group's best wording.
    let mut raw: BTreeMap<String, (String, f32, String)> = BTreeMap::new();
    match &own.normalized {
        Some(n) => {
            tally.add(&me, n, own.confidence);
            raw.insert(me.clone(), (own.text.clone(), own.confidence, own.model.clone()));
        }
        None => {
            tally.fail(&me, "empty answer");
        }
    }
    let vote_deadline = req
        .deadline
        .min(Instant::now() + Duration::from_millis(node.cfg.routing.vote_deadline_ms));
    let mut pending = FuturesUnordered::new();
    for c in &picked {
        let Ok(peer) = c.peer.parse::<PeerId>() else {
            continue;
        };
        let vr = VoteRequest {
            id: node.next_request_id(),
            messages: to_wire(&req.messages),
            task: task.clone(),
            max_tokens: req.params.max_tokens.clamp(1, swarm_protocol::MAX_TOKENS),
            deadline_ms: remaining(vote_deadline)
                .as_millis()
                .min(u128::from(swarm_protocol::MAX_DEADLINE_MS)) as u32,
            model: Some(c.model.clone()),
        };
        let net = node.net.clone();
        let c = c.clone();
        let wait = remaining(vote_deadline);
        pending.push(async move {
            let t = Instant::now();
            let id = vr.id;
            let r = net.vote(peer, vr, wait).await;
            (c, id, r, t.elapsed().as_millis() as u64)
        });
    }
    let mut answered: Vec<String> = vec![me.clone()];
    while let Some((c, id, r, ms)) = pending.next().await {
        answered.push(c.peer.clone());
        let mut view = VoterView {
            peer: c.peer.clone(),
            model: c.model.clone(),
            answer: None,
            confidence: None,
            elapsed_ms: ms,
            inference_ms: None,
            error: None,
        };
        match r {
            Ok(VoteReply::Ok(resp)) if resp.id == id => {
                // The coordinator normalises; a voter's own normal form is not trusted.
                match normalize(task, &resp.answer) {
                    Some(n) => {
                        tally.add(&c.peer, &n, resp.confidence);
                        raw.insert(
                            c.peer.clone(),
                            (resp.answer.clone(), resp.confidence, resp.model.clone()),
                        );
                        view.answer = Some(resp.answer);
                        view.confidence = Some(resp.confidence);
                        view.inference_ms = Some(u64::from(resp.elapsed_ms));
                        view.model = resp.model;
                    }
                    None => {
                        node.metrics.voter_failures.inc();
                        tally.fail(&c.peer, "unusable answer");
                        view.answer = Some(resp.answer);
                        view.error = Some("unusable answer for this task".into());
                    }
                }
            }
            Ok(VoteReply::Ok(_)) => {
                node.metrics.voter_failures.inc();
                tally.fail(&c.peer, "reply to another request");
                view.error = Some("reply to another request".into());
            }
            Ok(VoteReply::Err(e)) => {
                node.metrics.voter_failures.inc();
                tally.fail(&c.peer, &e.message);
                view.error = Some(format!("{:?}: {}", e.code, e.message));
            }
            Err(e) => {
                node.metrics.voter_failures.inc();
                tally.fail(&c.peer, &e.to_string());
                view.error = Some(e.to_string());
            }
        }
        voters.push(view);
        if !matches!(task, Task::Free) && tally.can_stop_early() {
            break;
        }
    }
    // Voters not waited for (early stop) are listed as such.
    for c in &picked {
        if !answered.contains(&c.peer) {
            voters.push(VoterView {
                peer: c.peer.clone(),
                model: c.model.clone(),
                answer: None,
                confidence: None,
                elapsed_ms: 0,
                inference_ms: None,
                error: Some("not needed: the vote was already decided".into()),
            });
        }
    }
    let mut outcome = tally.outcome();
    // Free text: answers that say the same thing in other words are one answer.
    let mut by_meaning: Option<(String, String)> = None;
    if matches!(task, Task::Free) && raw.len() >= 2 {
        if let Some(embedder) = node.semantic.embedder().await {
            let answers: Vec<(String, f32, String)> = raw.values().cloned().collect();
            match free_vote_by_meaning(embedder, &answers, node.cfg.routing.free_similarity).await {
                Ok(v) => {
                    let (text, _, model) = &answers[v.winner];
                    outcome.winner = Some(text.clone());
                    outcome.agreement = v.agreement;
                    by_meaning = Some((text.clone(), model.clone()));
                }
                Err(e) => tracing::warn!("free-text vote: embedding failed, exact match used: {e}"),
            }
        }
    }
    let (winner_text, winner_model) = match (&outcome.winner, task) {
        (Some(_), Task::Free) if by_meaning.is_some() => match by_meaning {
            Some((text, model)) => (Some(text), Some(model)),
            None => (None, None),
        },
        (Some(label), Task::Mcq { choices }) => (
            choices
                .iter()
                .find(|c| &c.label == label)
                .map(|c| format!("{}. {}", c.label, c.text))
                .or(Some(label.clone())),
            best_in_group(&raw, task, label).map(|(_, m)| m),
        ),
        (Some(label), Task::Label { .. }) => (
            Some(label.clone()),
            best_in_group(&raw, task, label).map(|(_, m)| m),
        ),
        (Some(norm), _) => match best_in_group(&raw, task, norm) {
            Some((text, m)) => (Some(text), Some(m)),
            None => (Some(norm.clone()), None),
        },
        (None, _) => (None, None),
    };
    let records = voters
        .iter()
        .map(|v| VoterRecord {
            peer: v.peer.clone(),
            model: v.model.clone(),
            answer: v.answer.clone().unwrap_or_default(),
            confidence: v.confidence.unwrap_or(0.0).clamp(0.0, 1.0),
            elapsed_ms: v.elapsed_ms.min(u64::from(u32::MAX)) as u32,
            error: v.error.clone(),
        })
        .collect();
    VoteRun {
        vote_ms: t_vote.elapsed().as_secs_f64() * 1e3,
        winner_text,
        winner_model,
        agreement: outcome.agreement,
        valid: outcome.votes,
        quorum_met: outcome.quorum_met,
        voters,
        records,
    }
}

/// A free-text vote decided by meaning.
#[derive(Debug, Clone, PartialEq)]
pub struct FreeVote {
    /// Index of the winning cluster's representative (its most confident answer).
    pub winner: usize,
    /// The winning cluster's weighted share of all answers.
    pub agreement: f32,
    pub clusters: Vec<FreeCluster>,
}

/// Cluster `(text, embedding, confidence)` answers by cosine ≥ `threshold`; the
/// heaviest cluster wins and its share of the weight is the agreement.
pub fn free_vote(answers: &[(String, Vec<f32>, f32)], threshold: f32) -> Option<FreeVote> {
    let clusters = cluster_free(answers, threshold);
    let total: f32 = clusters.iter().map(|c| c.weight).sum();
    let first = clusters.first()?;
    if total <= 0.0 {
        return None;
    }
    Some(FreeVote {
        winner: first.representative,
        agreement: (first.weight / total).min(1.0),
        clusters,
    })
}

/// Embed `(text, confidence, model)` answers (off the runtime) and [`free_vote`] them.
pub async fn free_vote_by_meaning(
    embedder: &Embedder,
    answers: &[(String, f32, String)],
    threshold: f32,
) -> Result<FreeVote, EmbedError> {
    let texts: Vec<String> = answers.iter().map(|a| a.0.clone()).collect();
    let vectors = embedder.embed(texts).await?;
    let items: Vec<(String, Vec<f32>, f32)> = answers
        .iter()
        .zip(vectors)
        .map(|((t, c, _), v)| (t.clone(), v, *c))
        .collect();
    free_vote(&items, threshold).ok_or_else(|| EmbedError::Compute("no answers to cluster".into()))
}

/// The most confident raw answer among the voters whose answer normalises to `norm`.
fn best_in_group(
    raw: &BTreeMap<String, (String, f32, String)>,
    task: &Task,
    norm: &str,
) -> Option<(String, String)> {
    raw.values()
        .filter(|(text, _, _)| normalize(task, text).as_deref() == Some(norm))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(t, _, m)| (t.clone(), m.clone()))
}

/// Outcome of an escalation.
pub struct Escalated {
    pub text: String,
    pub model: String,
    pub cloud_ms: u32,
    pub gateway: String,
}

/// Send the query and what the swarm said to the gateway; retried once through
/// a new gateway if the first one fails (e.g. it crashed mid-escalation).
async fn escalate(
    node: &Node,
    req: &ChatRequest,
    task: &Task,
    votes: Vec<VoterRecord>,
) -> Result<Escalated, String> {
    let mut tried: Vec<String> = Vec::new();
    let mut last = String::from("no gateway");
    for attempt in 0..2 {
        let mut gw = node.snapshot().gateway.clone();
        if attempt == 1 {
            // Give the membership task a few advert periods to elect a successor.
            let wait =
                Duration::from_millis(node.cfg.advert_interval_ms * u64::from(node.cfg.missed_adverts + 1));
            let until = (Instant::now() + wait).min(req.deadline);
            let mut rx = node.view.clone();
            while gw.as_ref().is_none_or(|g| tried.contains(&g.peer)) && Instant::now() < until {
                let _ = tokio::time::timeout(remaining(until), rx.changed()).await;
                gw = rx.borrow().gateway.clone();
            }
        }
        let Some(g) = gw.filter(|g| !tried.contains(&g.peer)) else {
            return Err(format!("cloud unavailable: {last}"));
        };
        tried.push(g.peer.clone());
        let left = remaining(req.deadline);
        if left.is_zero() {
            return Err("cloud unavailable: deadline passed".into());
        }
        let er = EscalateRequest {
            id: node.next_request_id(),
            messages: to_wire(&req.messages),
            task: task.clone(),
            max_tokens: req.params.max_tokens.clamp(1, swarm_protocol::MAX_TOKENS),
            swarm_answers: votes.iter().take(swarm_protocol::MAX_VOTERS).cloned().collect(),
            deadline_ms: left.as_millis().min(u128::from(swarm_protocol::MAX_DEADLINE_MS)) as u32,
        };
        let res = if g.peer == node.peer_id.to_string() {
            crate::gateway::cloud_call(node, &er).await.map_err(|e| e.message)
        } else {
            match g.peer.parse::<PeerId>() {
                Ok(p) => match node.net.escalate(p, er, left).await {
                    Ok(EscalateReply::Ok(r)) => Ok(r),
                    Ok(EscalateReply::Err(e)) => Err(format!("gateway {}: {}", g.peer, e.message)),
                    Err(e) => Err(format!("gateway {}: {e}", g.peer)),
                },
                Err(_) => Err("bad gateway id".into()),
            }
        };
        match res {
            Ok(r) => {
                return Ok(Escalated {
                    text: r.text,
                    model: r.model,
                    cloud_ms: r.cloud_ms,
                    gateway: r.gateway,
                })
            }
            Err(e) => {
                tracing::warn!("escalation failed: {e}");
                last = e;
            }
        }
    }
    Err(format!("cloud unavailable: {last}"))
}

/// Voter side: answer a peer's vote request with the requested (or default) model.
pub async fn serve_vote(node: &Node, peer: PeerId, req: VoteRequest) -> VoteReply {
    let deadline = Instant::now() + Duration::from_millis(u64::from(req.deadline_ms));
    let model = req
        .model
        .as_ref()
        .and_then(|m| node.models.get(m))
        .or_else(|| node.models.get(&node.default_model));
    let Some(model) = model else {
        return VoteReply::Err(wire_err(ErrorCode::NoModel, "this node serves no model"));
    };
    tracing::debug!(%peer, id = req.id, "vote request");
    let params = ChatParams {
        max_tokens: req.max_tokens.min(node.cfg.max_tokens_limit),
        temperature: 0.0,
        top_p: 1.0,
        seed: None,
        stop: Vec::new(),
        top_logprobs: 0,
    };
    let messages = from_wire(&req.messages);
    match answer_locally(node, model, &messages, &req.task, &params, deadline).await {
        Ok(a) => VoteReply::Ok(VoteResponse {
            id: req.id,
            normalized: a.normalized.clone().unwrap_or_default(),
            answer: truncate(a.text, swarm_protocol::MAX_ANSWER_BYTES),
            confidence: a.confidence.clamp(0.0, 1.0),
            model: a.model,
            tokens: a.completion_tokens,
            elapsed_ms: a.elapsed_ms.min(u64::from(u32::MAX)) as u32,
        }),
        Err(e) => VoteReply::Err(wire_from_inference(&e)),
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Serve a whole query forwarded by a peer that lacks the model.
pub async fn serve_query(node: &Node, peer: PeerId, req: QueryRequest) -> QueryReply {
    let Some(model) = node.models.get(&req.model) else {
        return QueryReply::Err(wire_err(
            ErrorCode::NoModel,
            format!("no model `{}` here", req.model),
        ));
    };
    tracing::debug!(%peer, id = req.id, "forwarded query");
    let t0 = Instant::now();
    let deadline = Instant::now() + Duration::from_millis(u64::from(req.deadline_ms));
    let params = ChatParams {
        max_tokens: req.max_tokens.min(node.cfg.max_tokens_limit),
        temperature: req.temperature,
        top_p: 1.0,
        seed: req.seed,
        stop: req.stop.clone(),
        top_logprobs: 0,
    };
    let messages = from_wire(&req.messages);
    match model
        .generate(generate_request(&messages, &params), Some(deadline))
        .await
    {
        Ok(g) => {
            node.record_speed(&req.model, g.completion_tokens, g.decode_ms);
            let elapsed = t0.elapsed().as_millis() as u64;
            node.metrics.observe_query("local", elapsed as f64);
            QueryReply::Ok(QueryResponse {
                id: req.id,
                text: truncate(g.text.trim().to_string(), swarm_protocol::MAX_TEXT_BYTES),
                model: req.model.clone(),
                confidence: node
                    .cfg
                    .routing
                    .calibrate(&req.model, |s| generation_signal(&g, s)),
                mean_logprob: g.mean_logprob.clamp(-1.0e6, 0.0),
                min_prob: g.min_prob.clamp(0.0, 1.0),
                prompt_tokens: g.prompt_tokens as u32,
                completion_tokens: g.completion_tokens as u32,
                finish_reason: g.finish_reason.as_str().into(),
                elapsed_ms: elapsed.min(u64::from(u32::MAX)) as u32,
            })
        }
        Err(e) => QueryReply::Err(wire_from_inference(&e)),
    }
}

/// Gateway side: call the cloud for a peer's escalation.
pub async fn serve_escalate(node: &Node, peer: PeerId, req: EscalateRequest) -> EscalateReply {
    tracing::debug!(%peer, id = req.id, "escalation request");
    let view = node.snapshot();
    if view.gateway.as_ref().map(|g| g.peer.as_str()) != Some(node.peer_id.to_string().as_str()) {
        return EscalateReply::Err(wire_err(ErrorCode::Unauthorized, "this node is not the gateway"));
    }
    match crate::gateway::cloud_call(node, &req).await {
        Ok(r) => EscalateReply::Ok(r),
        Err(e) => EscalateReply::Err(e),
    }
}

/// This node's advertised cloud status (`None` without cloud access).
pub fn cloud_status(node: &Node) -> Option<swarm_protocol::CloudStatus> {
    crate::gateway::cloud_status_of(node)
}
