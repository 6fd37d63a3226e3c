//! Confidence of one answer: the raw signals a scored choice or a generation
//! offers ([`Signal`]), and their Platt calibration per model as configured in
//! `[routing.models]` (fitted by `slm-swarm calibrate`; the config picks the
//! fit per model). Every calibrated confidence the node reports or votes with comes from here.

use serde::{Deserialize, Serialize};

use crate::inference::{ChoiceResult, Generation};

/// A raw confidence score of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Chosen option's probability (mcq/label), geometric-mean token probability (text).
    #[default]
    Confidence,
    /// Chosen minus runner-up option probability (mcq/label only).
    Margin,
    /// Mean log-probability of the answer's tokens.
    MeanLogprob,
    /// Lowest token probability.
    MinProb,
}

impl Signal {
    pub const ALL: [Signal; 4] = [
        Signal::Confidence,
        Signal::Margin,
        Signal::MeanLogprob,
        Signal::MinProb,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Confidence => "confidence",
            Signal::Margin => "margin",
            Signal::MeanLogprob => "mean_logprob",
            Signal::MinProb => "min_prob",
        }
    }

    pub fn parse(s: &str) -> Option<Signal> {
        Signal::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// Platt's sigmoid p = 1 / (1 + exp(-(a·x + b))).
pub fn platt([a, b]: [f32; 2], x: f32) -> f32 {
    1.0 / (1.0 + (-(a * x + b)).exp())
}

/// One raw signal of a scored choice.
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

/// Calibrated confidence of an answer: Platt over `signal`, read with `score`
/// (which returns None where the answer lacks it). Without Platt parameters, or
/// when the signal is missing (no margin on generated text), the raw
/// `confidence` stands, clamped to 0..=1: a Platt fit of one signal means
/// nothing applied to another.
pub fn calibrated(signal: Signal, fit: Option<[f32; 2]>, score: impl Fn(Signal) -> Option<f32>) -> f32 {
    match (fit, score(signal)) {
        (Some(ab), Some(x)) if x.is_finite() => platt(ab, x),
        _ => score(Signal::Confidence).unwrap_or(0.0).clamp(0.0, 1.0),
    }
}
