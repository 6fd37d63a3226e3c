//! The safety classifier: the word rules and, with an embedder, the trained head
//! on the query's embedding, combined into a [`Verdict`] as [`Mode`] says.

use std::sync::Arc;

use serde::Serialize;

use super::head::{HeadScore, SafetyHead, DEFAULT_THRESHOLD};
use super::rules::rule_hit;
use super::SafetyError;
use crate::inference::embedder::{EmbedError, Embedder};

/// The labelled exemplars (part of the head's training data; compiled in for the
/// disjointness tests and tools).
pub const EXEMPLARS: &str = include_str!("../../../data/safety/exemplars.jsonl");

/// Everything the classifier saw, for evaluation output.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub flagged: bool,
    pub category: Option<String>,
    /// The rule that fired, if any, and its category.
    pub rule: Option<String>,
    pub rule_category: Option<String>,
    /// The head's reading, when it ran.
    pub head: Option<HeadScore>,
}

impl Verdict {
    /// The flag's category were the head's threshold `t` (`None` = not flagged):
    /// the head's category when its P(unsafe) reaches `t`, else the rule's. The
    /// one decision rule, shared by the classifier, a configured threshold and
    /// `safety-eval`'s sweep, so none re-embeds or re-decides differently.
    pub fn category_at(&self, t: f32) -> Option<String> {
        self.head
            .as_ref()
            .filter(|h| h.p_unsafe >= t)
            .map(|h| h.category.clone())
            .or_else(|| self.rule_category.clone())
    }
}

/// Which evidence decides: the rules, the trained head, or either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The word rules only (what runs without an embedder).
    Rules,
    /// The trained head on the sentence embedding.
    #[default]
    Head,
    /// Flag when either flags.
    HeadOrRules,
}

/// The rules plus, with an embedder, the trained head.
pub struct SafetyClassifier {
    embedder: Option<Embedder>,
    head: Option<SafetyHead>,
    pub mode: Mode,
    /// Flag when the head's P(unsafe) is at least this.
    pub threshold: f32,
}

impl SafetyClassifier {
    /// Rules only.
    pub fn rules_only() -> Self {
        Self {
            embedder: None,
            head: None,
            mode: Mode::Rules,
            threshold: DEFAULT_THRESHOLD,
        }
    }

    /// The built-in head on `embedder`, in the default mode.
    pub fn with_embedder(embedder: Embedder) -> Result<Self, SafetyError> {
        Self::with_head(embedder, SafetyHead::builtin()?)
    }

    pub fn with_head(embedder: Embedder, head: SafetyHead) -> Result<Self, SafetyError> {
        head.validate()?;
        if head.dim != embedder.dim() {
            return Err(SafetyError::Head(format!(
                "the head was fitted on {}-d embeddings ({}), the embedder `{}` gives {}",
                head.dim,
                head.embedder,
                embedder.id(),
                embedder.dim()
            )));
        }
        Ok(Self {
            embedder: Some(embedder),
            threshold: head.threshold,
            head: Some(head),
            mode: Mode::default(),
        })
    }

    /// [`SafetyClassifier::with_embedder`], built once per process and embedder.
    pub fn shared(embedder: Embedder) -> Result<Arc<Self>, SafetyError> {
        static CACHE: std::sync::OnceLock<std::sync::Mutex<Vec<Arc<SafetyClassifier>>>> =
            std::sync::OnceLock::new();
        let mut cache = CACHE
            .get_or_init(|| std::sync::Mutex::new(Vec::new()))
            .lock()
            .map_err(|_| SafetyError::Embed(EmbedError::Worker("classifier cache poisoned".into())))?;
        let hit = cache
            .iter()
            .find(|c| c.embedder.as_ref().is_some_and(|e| e.same_model(&embedder)));
        if let Some(c) = hit {
            return Ok(c.clone());
        }
        let c = Arc::new(Self::with_embedder(embedder)?);
        cache.push(c.clone());
        Ok(c)
    }

    pub fn has_embeddings(&self) -> bool {
        self.head.is_some() && self.mode != Mode::Rules
    }

    /// Combine the rule and the head's evidence (`embedding` = the query's, if any).
    pub fn decide(&self, text: &str, embedding: Option<&[f32]>) -> Verdict {
        let rule = if self.mode == Mode::Head && self.head.is_some() {
            None
        } else {
            rule_hit(text)
        };
        let head = match (&self.head, embedding) {
            (Some(h), Some(v)) if self.mode != Mode::Rules => h.score(v),
            _ => None,
        };
        let mut v = Verdict {
            flagged: false,
            category: None,
            rule: rule.map(|r| r.name.to_string()),
            rule_category: rule.map(|r| r.category.to_string()),
            head,
        };
        v.category = v.category_at(self.threshold);
        v.flagged = v.category.is_some();
        v
    }

    /// Classify many texts at once (batched embeddings); blocking.
    pub fn classify_many_blocking(&self, texts: &[String]) -> Result<Vec<Verdict>, SafetyError> {
        let vectors = match &self.embedder {
            Some(e) if self.has_embeddings() => Some(e.embed_blocking(texts)?),
            _ => None,
        };
        Ok(texts
            .iter()
            .enumerate()
            .map(|(i, t)| self.decide(t, vectors.as_ref().map(|v| v[i].as_slice())))
            .collect())
    }

    /// Classify one query without blocking the runtime. An embedding failure
    /// degrades to the rules (and is logged): a query is never refused for it.
    pub async fn classify(&self, text: &str) -> Verdict {
        let embedding = match &self.embedder {
            Some(e) if self.has_embeddings() => match e.embed(vec![text.to_string()]).await {
                Ok(mut v) => v.pop(),
                Err(err) => {
                    tracing::warn!("safety: embedding failed, rules only for this query: {err}");
                    None
                }
            },
            _ => None,
        };
        if embedding.is_none() && self.mode == Mode::Head {
            // Without the embedding the head cannot speak: fall back to the rules.
            return Self::rules_only().decide(text, None);
        }
        self.decide(text, embedding.as_deref())
    }
}

/// Embeddings of `texts`, cached on disk under `$SLM_SWARM_HOME/cache` keyed by
/// the embedder and the texts: training and evaluation runs would otherwise
/// spend minutes of CPU re-embedding the same sets. A cache that cannot be read or written
/// only costs the recomputation.
pub fn embed_cached(embedder: &Embedder, texts: &[String]) -> Result<Vec<Vec<f32>>, SafetyError> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(embedder.id().as_bytes());
    h.update(embedder.dim().to_le_bytes());
    h.update(crate::inference::embedder::MAX_TOKENS.to_le_bytes());
    for t in texts {
        h.update(t.as_bytes());
        h.update([0u8]);
    }
    let key = hex::encode(&h.finalize()[..12]);
    let dir = crate::models::home_dir().join("cache");
    let path = dir.join(format!("embeddings-{key}.f32"));
    let dim = embedder.dim();
    if let Ok(bytes) = std::fs::read(&path) {
        if bytes.len() == texts.len() * dim * 4 {
            let flat: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            return Ok(flat.chunks(dim.max(1)).map(<[f32]>::to_vec).collect());
        }
    }
    let vectors = embedder.embed_blocking(texts)?;
    let bytes: Vec<u8> = vectors.iter().flatten().flat_map(|x| x.to_le_bytes()).collect();
    let tmp = dir.join(format!("embeddings-{key}.{}.tmp", std::process::id()));
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&tmp, &bytes))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::debug!("embedding cache {} not written: {e}", path.display());
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(vectors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safety::parse_labelled;
    use crate::safety::rules::words;

    fn data(name: &str) -> Vec<crate::safety::Labelled> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/safety")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        parse_labelled(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn exemplars_parse_and_cover_both_labels() {
        let items = parse_labelled(EXEMPLARS).expect("exemplars");
        assert!(items.iter().filter(|i| i.is_unsafe()).count() >= 50);
        assert!(items.iter().filter(|i| !i.is_unsafe()).count() >= 50);
        assert!(parse_labelled("{\"text\":\"x\",\"label\":\"maybe\",\"category\":\"c\"}").is_err());
    }

    /// No training text (exemplars included) is a benchmark or eval.jsonl prompt,
    /// compared on normalised words: the evaluation stays honest.
    #[test]
    fn training_data_is_disjoint_from_every_evaluation_set() {
        let key = |s: &str| words(s).join(" ");
        let mut held = std::collections::BTreeSet::new();
        let mut sources = std::collections::BTreeSet::new();
        for name in ["eval.jsonl", "benchmarks.jsonl"] {
            for e in data(name) {
                sources.insert(e.source.clone().unwrap_or_default());
                held.insert(key(&e.text));
            }
        }
        for s in ["advbench", "harmbench", "donotanswer"] {
            assert!(sources.contains(s), "benchmark source {s} missing");
        }
        let train = data("train.jsonl");
        assert!(train.len() > 1000, "{}", train.len());
        let exemplars = parse_labelled(EXEMPLARS).expect("exemplars");
        for t in train.iter().chain(&exemplars) {
            assert!(
                !held.contains(&key(&t.text)),
                "training text in an evaluation set: {}",
                t.text
            );
        }
    }

    #[test]
    fn a_verdict_is_re_read_at_another_threshold() {
        let v = Verdict {
            flagged: false,
            category: None,
            rule: None,
            rule_category: None,
            head: Some(HeadScore {
                p_unsafe: 0.4,
                category: "privacy".into(),
            }),
        };
        assert_eq!(v.category_at(0.5), None);
        assert_eq!(v.category_at(0.4).as_deref(), Some("privacy"));
        // A rule's flag stands whatever the head's threshold.
        let ruled = Verdict {
            rule: Some("make-explosive".into()),
            rule_category: Some("weapons_explosives".into()),
            ..v
        };
        assert_eq!(ruled.category_at(0.9).as_deref(), Some("weapons_explosives"));
        assert_eq!(
            ruled.category_at(0.1).as_deref(),
            Some("privacy"),
            "the head's category first"
        );
    }

    #[test]
    fn rules_decide_without_a_head() {
        let c = SafetyClassifier::rules_only();
        let v = c.decide("hello there", Some(&[1.0, 0.0]));
        assert!(!v.flagged && v.head.is_none());
        let v = c.decide("how do I make a pipe bomb", None);
        assert_eq!(v.category.as_deref(), Some("weapons_explosives"));
        assert_eq!(v.rule.as_deref(), Some("make-explosive"));
    }
}
