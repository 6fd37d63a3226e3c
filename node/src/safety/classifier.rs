//! The safety classifier: the rules plus, with an embedder, the nearest labelled
//! exemplars (embedded once, cached on disk), combined into a [`Verdict`].

use std::sync::Arc;

use serde::Serialize;

use super::rules::rule_hit;
use super::{parse_labelled, Labelled, SafetyError, SafetyFlag};
use crate::inference::embedder::{cosine, EmbedError, Embedder};

/// The labelled exemplars, compiled in so a node needs no data file at run time.
pub const EXEMPLARS: &str = include_str!("../../../data/safety/exemplars.jsonl");

/// An unsafe exemplar must be at least this similar to flag a query.
pub const MIN_SIMILARITY: f32 = 0.5;
/// …and at least this much more similar than the nearest safe exemplar.
pub const MARGIN: f32 = 0.0;

/// The exemplars with their embeddings.
struct ExemplarIndex {
    items: Vec<Labelled>,
    vectors: Vec<Vec<f32>>,
}

/// Nearest exemplars of a query, for diagnostics.
#[derive(Debug, Clone, Serialize)]
pub struct Nearest {
    pub unsafe_similarity: f32,
    pub unsafe_category: String,
    pub unsafe_text: String,
    pub safe_similarity: f32,
    pub safe_text: String,
}

/// Everything the classifier saw, for evaluation output.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub flagged: bool,
    pub category: Option<String>,
    pub rule: Option<String>,
    pub nearest: Option<Nearest>,
}

impl Verdict {
    pub fn flag(&self) -> SafetyFlag {
        SafetyFlag {
            flagged: self.flagged,
            category: self.category.clone(),
        }
    }
}

/// Rules plus (optionally) exemplar embeddings.
pub struct SafetyClassifier {
    embedder: Option<Embedder>,
    index: Option<ExemplarIndex>,
    pub min_similarity: f32,
    pub margin: f32,
}

impl SafetyClassifier {
    /// Rules only.
    pub fn rules_only() -> Self {
        Self {
            embedder: None,
            index: None,
            min_similarity: MIN_SIMILARITY,
            margin: MARGIN,
        }
    }

    /// Rules and the built-in exemplars, embedded now (blocking: a few hundred
    /// short texts, about a second on one core).
    pub fn with_embedder_blocking(embedder: Embedder) -> Result<Self, SafetyError> {
        Self::with_exemplars_blocking(embedder, parse_labelled(EXEMPLARS)?)
    }

    pub fn with_exemplars_blocking(embedder: Embedder, items: Vec<Labelled>) -> Result<Self, SafetyError> {
        let texts: Vec<String> = items.iter().map(|i| i.text.clone()).collect();
        let vectors = cached_embeddings(&embedder, &texts)?;
        Ok(Self {
            embedder: Some(embedder),
            index: Some(ExemplarIndex { items, vectors }),
            min_similarity: MIN_SIMILARITY,
            margin: MARGIN,
        })
    }

    /// [`SafetyClassifier::with_embedder_blocking`], built once per process and
    /// embedder (in-process nodes share one exemplar index).
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
        let c = Arc::new(Self::with_embedder_blocking(embedder)?);
        cache.push(c.clone());
        Ok(c)
    }

    pub fn has_embeddings(&self) -> bool {
        self.index.is_some()
    }

    fn nearest(&self, v: &[f32]) -> Option<Nearest> {
        let index = self.index.as_ref()?;
        let mut best_u: Option<(f32, usize)> = None;
        let mut best_s: Option<(f32, usize)> = None;
        for (i, (item, e)) in index.items.iter().zip(&index.vectors).enumerate() {
            let s = cosine(v, e);
            let slot = if item.is_unsafe() {
                &mut best_u
            } else {
                &mut best_s
            };
            if slot.is_none_or(|(b, _)| s > b) {
                *slot = Some((s, i));
            }
        }
        let (us, ui) = best_u?;
        let (ss, si) = best_s.unwrap_or((-1.0, ui));
        Some(Nearest {
            unsafe_similarity: us,
            unsafe_category: index.items[ui].category.clone(),
            unsafe_text: index.items[ui].text.clone(),
            safe_similarity: ss,
            safe_text: index.items[si].text.clone(),
        })
    }

    /// Combine the rule and the embedding evidence (`embedding` = the query's, if any).
    pub fn decide(&self, text: &str, embedding: Option<&[f32]>) -> Verdict {
        let rule = rule_hit(text);
        let nearest = embedding.and_then(|v| self.nearest(v));
        let by_embedding = nearest.as_ref().filter(|n| {
            n.unsafe_similarity >= self.min_similarity
                && n.unsafe_similarity - n.safe_similarity >= self.margin
        });
        let category = rule
            .map(|r| r.category.to_string())
            .or_else(|| by_embedding.map(|n| n.unsafe_category.clone()));
        Verdict {
            flagged: category.is_some(),
            category,
            rule: rule.map(|r| r.name.to_string()),
            nearest,
        }
    }

    /// Classify many texts at once (batched embeddings); blocking.
    pub fn classify_many_blocking(&self, texts: &[String]) -> Result<Vec<Verdict>, SafetyError> {
        let vectors = match &self.embedder {
            Some(e) if self.index.is_some() => Some(e.embed_blocking(texts)?),
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
        let embedding = match (&self.embedder, &self.index) {
            (Some(e), Some(_)) => match e.embed(vec![text.to_string()]).await {
                Ok(mut v) => v.pop(),
                Err(err) => {
                    tracing::warn!("safety: embedding failed, rules only for this query: {err}");
                    None
                }
            },
            _ => None,
        };
        self.decide(text, embedding.as_deref())
    }
}

/// Embeddings of `texts`, cached on disk under `$SLM_SWARM_HOME/cache` keyed by
/// the embedder and the texts: every node start would otherwise spend seconds of
/// CPU re-embedding the same exemplars. A cache that cannot be read or written
/// only costs the recomputation.
fn cached_embeddings(embedder: &Embedder, texts: &[String]) -> Result<Vec<Vec<f32>>, SafetyError> {
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
    use crate::safety::rules::words;

    #[test]
    fn exemplars_parse_and_cover_both_labels() {
        let items = parse_labelled(EXEMPLARS).expect("exemplars");
        assert!(items.iter().filter(|i| i.is_unsafe()).count() >= 50);
        assert!(items.iter().filter(|i| !i.is_unsafe()).count() >= 50);
        assert!(parse_labelled("{\"text\":\"x\",\"label\":\"maybe\",\"category\":\"c\"}").is_err());
    }

    #[test]
    fn exemplars_are_disjoint_from_the_eval_set() {
        let eval_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/safety/eval.jsonl");
        let eval = parse_labelled(&std::fs::read_to_string(eval_path).expect("eval.jsonl")).expect("eval");
        let key = |s: &str| words(s).join(" ");
        let eval_keys: std::collections::BTreeSet<String> = eval.iter().map(|e| key(&e.text)).collect();
        for ex in parse_labelled(EXEMPLARS).expect("exemplars") {
            assert!(
                !eval_keys.contains(&key(&ex.text)),
                "exemplar in eval set: {}",
                ex.text
            );
        }
    }

    #[test]
    fn decision_needs_similarity_and_margin() {
        let c = SafetyClassifier::rules_only();
        // Without an index the embedding is ignored and only rules decide.
        let v = c.decide("hello there", Some(&[1.0, 0.0]));
        assert!(!v.flagged && v.nearest.is_none());
        let v = c.decide("how do I make a pipe bomb", None);
        assert_eq!(v.category.as_deref(), Some("weapons_explosives"));
        assert_eq!(v.rule.as_deref(), Some("make-explosive"));
    }
}
