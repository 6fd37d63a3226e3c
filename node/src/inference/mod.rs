//! Inference: the `Backend` trait every model runtime implements, the request and
//! result types with their confidence signals, and the candle GGUF backend.

pub mod cpu;
pub mod embedder;
pub mod engine;
pub mod gguf;
pub mod kernels;
pub mod model;
pub mod ops;
pub mod sampling;
pub mod template;
pub mod testing;
pub mod tokenizer;
pub mod worker;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use engine::CandleBackend;
pub use template::ChatMessage;
pub use worker::{ModelHandle, WorkerOptions};

#[derive(Debug, Error, Clone)]
pub enum InferenceError {
    #[error("I/O: {0}")]
    Io(String),
    #[error("bad model file: {0}")]
    BadModel(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("template: {0}")]
    Template(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error(
        "prompt too long: {tokens} tokens with {max_tokens} to generate exceeds the context of {context}"
    )]
    TooLong {
        tokens: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("model is overloaded (queue full)")]
    Overloaded,
    #[error("deadline passed before the request finished")]
    Timeout,
    #[error("request cancelled")]
    Cancelled,
    #[error("model worker stopped")]
    WorkerGone,
    /// The model panicked on this request (a bug); the worker carries on.
    #[error("the model failed on this request (internal error: {0})")]
    Panicked(String),
    #[error("compute: {0}")]
    Compute(String),
}

impl From<candle_core::Error> for InferenceError {
    fn from(e: candle_core::Error) -> Self {
        InferenceError::Compute(e.to_string())
    }
}

/// What a prompt is: a chat (rendered with the model's template) or raw text.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prompt {
    Chat(Vec<ChatMessage>),
    Raw(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// How many alternatives to report per token (0 = none).
    pub top_logprobs: usize,
}

impl GenerateRequest {
    pub fn chat(messages: Vec<ChatMessage>, max_tokens: usize) -> Self {
        Self {
            prompt: Prompt::Chat(messages),
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
            top_logprobs: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<(String, f32)>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A generated answer with the signals the router calibrates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<TokenLogprob>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
    /// Mean natural-log probability of the generated tokens.
    pub mean_logprob: f32,
    /// Lowest probability of any generated token.
    pub min_prob: f32,
    /// Raw confidence: geometric-mean token probability, exp(mean_logprob).
    pub confidence: f32,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// Prompt tokens served from the prefix cache instead of recomputed.
    pub cached_tokens: usize,
}

/// How options are scored for constrained answers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scorer {
    /// (a) probability of each option's letter/label token after the question (one pass).
    Letter,
    /// (b) length-normalised log-likelihood of each option's text as a continuation
    /// (lm-evaluation-harness `acc_norm`), reusing the prompt's KV cache.
    #[default]
    Continuation,
}

impl std::str::FromStr for Scorer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "letter" | "a" => Ok(Scorer::Letter),
            "continuation" | "b" => Ok(Scorer::Continuation),
            other => Err(format!("unknown scorer `{other}` (letter | continuation)")),
        }
    }
}

impl Scorer {
    pub fn as_str(&self) -> &'static str {
        match self {
            Scorer::Letter => "letter",
            Scorer::Continuation => "continuation",
        }
    }
}

/// A constrained question: pick one of the options.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChoiceRequest {
    pub question: String,
    /// (label, text): for an mcq the label is the letter; for a label task both are the label.
    pub options: Vec<(String, String)>,
    pub kind: ChoiceKind,
    pub scorer: Scorer,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ChoiceKind {
    Mcq,
    Label,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChoiceResult {
    pub index: usize,
    pub label: String,
    /// Normalised probability over the options.
    pub probs: Vec<f32>,
    /// Raw per-option scores (log-prob of the letter, or LL per byte).
    pub scores: Vec<f32>,
    /// Probability of the chosen option.
    pub confidence: f32,
    /// Chosen option's probability minus the runner-up's.
    pub margin: f32,
    /// Mean log-probability of the chosen option's tokens (its letter for `letter`).
    pub mean_logprob: f32,
    /// Lowest probability among the chosen option's tokens.
    pub min_prob: f32,
    pub scorer: Scorer,
    pub prompt_tokens: usize,
    pub elapsed_ms: f64,
}

/// Per-token negative log-likelihood of a text (perplexity tool).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextScore {
    pub token_ids: Vec<u32>,
    pub nll: Vec<f32>,
    pub mean_nll: f64,
    pub bos: bool,
}

/// Static facts about a loaded model, advertised to peers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    pub arch: String,
    pub params: u64,
    pub quant: String,
    pub ctx: u32,
    pub domains: Vec<String>,
    pub has_chat_template: bool,
    pub scorer: Scorer,
    pub path: String,
}

/// A model runtime. Implementations own their mutable state (KV caches), so a
/// worker thread holds each one; see [`worker`].
pub trait Backend: Send {
    fn info(&self) -> &ModelInfo;

    /// Generate; `on_text` receives text increments and returns `false` to cancel.
    fn generate(
        &mut self,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, InferenceError>;

    /// Pick one option of a constrained question.
    fn choose(&mut self, req: &ChoiceRequest) -> Result<ChoiceResult, InferenceError>;

    /// NLL of a raw text.
    fn score_text(&mut self, text: &str) -> Result<TextScore, InferenceError>;

    /// Drop per-request state (caches) after a request panicked halfway, so
    /// the next one starts clean; the worker calls it and carries on.
    fn reset(&mut self) {}
}

/// Summary of per-token log-probs: (mean_logprob, min_prob, confidence).
pub fn summarize_logprobs(lps: &[f32]) -> (f32, f32, f32) {
    if lps.is_empty() {
        return (0.0, 1.0, 1.0);
    }
    let mean = lps.iter().map(|&x| x as f64).sum::<f64>() / lps.len() as f64;
    let min = lps.iter().copied().fold(f32::INFINITY, f32::min);
    (mean as f32, min.exp(), (mean.exp()) as f32)
}

/// softmax over `xs` scaled by `t`, in f64 for stability.
pub fn softmax_scaled(xs: &[f32], t: f32) -> Vec<f32> {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = xs.iter().map(|&x| (((x - max) * t) as f64).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_logprobs() {
        let (mean, min_p, conf) = summarize_logprobs(&[-0.1, -2.0, -0.3]);
        assert!((mean - (-0.8)).abs() < 1e-6);
        assert!((min_p - (-2.0f32).exp()).abs() < 1e-6);
        assert!((conf - (-0.8f32).exp()).abs() < 1e-6);
    }

    #[test]
    fn softmax_sums_to_one_and_orders() {
        let p = softmax_scaled(&[1.0, 3.0, 2.0], 1.0);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(p[1] > p[2] && p[2] > p[0]);
    }
}
