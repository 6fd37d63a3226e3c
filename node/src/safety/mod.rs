//! The per-query safety classifier and the node's shared sentence embedder.
//!
//! A query is flagged (and the router escalates it) when either
//! (a) a documented rule matches — word patterns for self-harm, violence,
//!     weapons/explosives, drugs, medical dosage, legal/financial advice and
//!     crime (`RULES`; data/safety/README.md lists them), or
//! (b) its MiniLM embedding is closer to an unsafe exemplar than to every safe
//!     one, by at least `min_similarity` (data/safety/exemplars.jsonl, embedded
//!     once). Safe look-alikes ("kill a Python process", "a can of coke") are
//!     exemplars too, so near misses fall on the safe side.
//!
//! Without an embedder only the rules run. The exemplars are disjoint from the
//! evaluation set data/safety/eval.jsonl (`slm-swarm safety-eval`).
//!
//! The parts: `rules` (the documented word patterns), `classifier` (rules and
//! exemplar embeddings combined into a verdict) and `semantic` (the node's
//! embedder and classifier, loaded once and shared).

mod classifier;
mod rules;
mod semantic;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::inference::embedder::EmbedError;

pub use classifier::{Nearest, SafetyClassifier, Verdict, EXEMPLARS, MARGIN, MIN_SIMILARITY};
pub use rules::{rule_hit, Rule, RULES};
pub use semantic::Semantic;

#[derive(Debug, Error)]
pub enum SafetyError {
    #[error("exemplar line {line}: {msg}")]
    Exemplar { line: usize, msg: String },
    #[error(transparent)]
    Embed(#[from] EmbedError),
}

/// The safety classifier's verdict on a query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SafetyFlag {
    pub flagged: bool,
    pub category: Option<String>,
}

/// One labelled example (exemplar or evaluation item).
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
