//! This node's own answer: options scored for mcq/label tasks, text generated
//! otherwise, with its calibrated confidence. A generation's pieces are held
//! back until the router knows whether the route is local whatever the
//! confidence; then they are released to the caller's stream as they come.

use std::time::Instant;

use swarm_protocol::{normalize, Task};
use tokio::sync::{mpsc, oneshot};

use super::request::{last_user, ChatParams};
use super::Router;
use crate::confidence;
use crate::inference::{
    ChatMessage, ChoiceKind, ChoiceRequest, GenerateRequest, Generation, InferenceError, ModelHandle, Prompt,
};

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
    /// Its pieces went out to the caller's stream as they were generated.
    pub streamed: bool,
}

/// Where a generation's pieces may go: `tokens`, once `release` says `true`.
pub(super) struct Live {
    pub tokens: mpsc::Sender<String>,
    pub release: oneshot::Receiver<bool>,
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

impl Router {
    /// Answer with a local model; see the module docs for `live`.
    pub(super) async fn answer_locally(
        &self,
        model: &ModelHandle,
        messages: &[ChatMessage],
        task: &Task,
        params: &ChatParams,
        deadline: Instant,
        live: Option<Live>,
    ) -> Result<LocalAnswer, InferenceError> {
        let t0 = Instant::now();
        let info = model.info().clone();
        let routing = &self.p.routing;
        let (options, kind) = match task {
            Task::Mcq { choices } => (
                choices
                    .iter()
                    .map(|c| (c.label.clone(), c.text.clone()))
                    .collect(),
                ChoiceKind::Mcq,
            ),
            Task::Label { labels } => (
                labels.iter().map(|l| (l.clone(), l.clone())).collect(),
                ChoiceKind::Label,
            ),
            Task::Short | Task::Free => {
                let req = generate_request(messages, params);
                let (g, streamed) = match live {
                    Some(live) => generate_live(model, req, deadline, live).await?,
                    None => (model.generate(req, Some(deadline)).await?, false),
                };
                self.p
                    .models
                    .record_speed(&info.id, g.completion_tokens, g.decode_ms);
                let text = g.text.trim().to_string();
                return Ok(LocalAnswer {
                    normalized: normalize(task, &text),
                    raw_confidence: g.confidence,
                    confidence: routing.calibrate(&info.id, |s| confidence::generation_signal(&g, s)),
                    model: info.id.clone(),
                    prompt_tokens: g.prompt_tokens as u32,
                    completion_tokens: g.completion_tokens as u32,
                    finish_reason: g.finish_reason.as_str().to_string(),
                    text,
                    generation: Some(g),
                    elapsed_ms: t0.elapsed().as_millis() as u64,
                    streamed,
                });
            }
        };
        let r = model
            .choose(
                ChoiceRequest {
                    question: last_user(messages).to_string(),
                    options,
                    kind,
                    scorer: info.scorer,
                },
                Some(deadline),
            )
            .await?;
        let text = match task {
            Task::Mcq { choices } => choices
                .get(r.index)
                .map(|c| format!("{}. {}", c.label, c.text))
                .unwrap_or_else(|| r.label.clone()),
            _ => r.label.clone(),
        };
        Ok(LocalAnswer {
            text,
            normalized: Some(r.label.clone()),
            raw_confidence: r.confidence,
            confidence: routing.calibrate(&info.id, |s| confidence::choice_signal(&r, s)),
            model: info.id.clone(),
            generation: None,
            prompt_tokens: r.prompt_tokens as u32,
            completion_tokens: 1,
            finish_reason: "stop".into(),
            elapsed_ms: t0.elapsed().as_millis() as u64,
            streamed: false,
        })
    }
}

/// Generate with pieces held until `live.release` decides: `true` sends the
/// held pieces and every later one to `live.tokens`, `false` (or a dropped
/// sender) discards them. Returns the generation and whether it was streamed.
async fn generate_live(
    model: &ModelHandle,
    req: GenerateRequest,
    deadline: Instant,
    live: Live,
) -> Result<(Generation, bool), InferenceError> {
    let (mut pieces, done) = model.generate_stream(req, Some(deadline))?;
    let Live { tokens, release } = live;
    let mut release = Some(release);
    let mut open = false;
    let mut held: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            p = pieces.recv() => match p {
                Some(p) if open => {
                    // A caller that went away stops nothing here: the answer still completes.
                    let _ = tokens.send(p).await;
                }
                Some(p) => {
                    if release.is_some() {
                        held.push(p);
                    }
                }
                None => break,
            },
            r = async {
                match release.as_mut() {
                    Some(r) => r.await,
                    None => std::future::pending().await,
                }
            }, if release.is_some() => {
                release = None;
                if r.unwrap_or(false) {
                    open = true;
                    for p in held.drain(..) {
                        let _ = tokens.send(p).await;
                    }
                } else {
                    held.clear();
                }
            }
        }
    }
    let g = done.await.map_err(|_| InferenceError::WorkerGone)??;
    Ok((g, open))
}
