//! The per-query safety classifier and the node's shared sentence embedder.
//!
//! A query is flagged, with a harm category, when the trained head on its MiniLM
//! embedding gives P(unsafe) at or above its threshold (`head`: multinomial
//! logistic regression fitted by `slm-swarm safety-train` on
//! data/safety/train.jsonl). Without an embedder the documented word rules
//! (`rules`) stand in. What a flag does (escalate, refuse, answer) is the node's
//! per-category policy (`policy`). The training data is disjoint from every
//! evaluation set (data/safety/README.md; a test checks it).
//!
//! The parts: `head` (the trained classifier and its fit), `rules` (the word
//! patterns), `classifier` (the evidence combined into a verdict), `policy`
//! (category → action) and `semantic` (the node's embedder and classifier,
//! loaded once and shared).

mod classifier;
pub mod head;
pub mod policy;
mod rules;
mod semantic;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::inference::embedder::EmbedError;

pub use classifier::{embed_cached, Mode, SafetyClassifier, Verdict, EXEMPLARS};
pub use head::{HeadScore, SafetyHead};
pub use policy::{Action, SafetyPolicy};
pub use rules::{rule_hit, Rule, RULES};
pub use semantic::Semantic;

#[derive(Debug, Error)]
pub enum SafetyError {
    #[error("labelled prompts, line {line}: {msg}")]
    Exemplar { line: usize, msg: String },
    #[error("safety head: {0}")]
    Head(String),
    #[error(transparent)]
    Embed(#[from] EmbedError),
}

/// The safety classifier's verdict on a query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SafetyFlag {
    pub flagged: bool,
    pub category: Option<String>,
    /// What the node's policy does with it (`None` when not flagged).
    pub action: Option<Action>,
}

impl SafetyFlag {
    /// Whether the query must go to the cloud (or be marked degraded without it).
    pub fn escalates(&self) -> bool {
        self.action == Some(Action::Escalate)
    }

    pub fn refuses(&self) -> bool {
        self.action == Some(Action::Refuse)
    }
}

/// One labelled prompt (training or evaluation item).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Labelled {
    pub text: String,
    /// `safe` or `unsafe`.
    pub label: String,
    pub category: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl Labelled {
    pub fn is_unsafe(&self) -> bool {
        self.label == "unsafe"
    }
}

/// Parse JSONL of [`Labelled`] items (blank lines skipped).
pub fn parse_labelled(text: &str) -> Result<Vec<Labelled>, SafetyError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let item: Labelled = serde_json::from_str(line).map_err(|e| SafetyError::Exemplar {
            line: i + 1,
            msg: e.to_string(),
        })?;
        if item.label != "safe" && item.label != "unsafe" {
            return Err(SafetyError::Exemplar {
                line: i + 1,
                msg: format!("label must be safe or unsafe, not `{}`", item.label),
            });
        }
        out.push(item);
    }
    Ok(out)
}
