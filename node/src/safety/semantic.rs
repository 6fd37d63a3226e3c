//! [`Semantic`]: the node's sentence embedder and safety classifier, loaded once
//! in the background and shared by free-text votes and safety checks.

use std::sync::Arc;

use tokio::sync::OnceCell;

use super::{SafetyClassifier, SafetyFlag, SafetyPolicy};
use crate::inference::embedder::Embedder;

/// The node's embedder and safety classifier, loaded once in the background at
/// start and shared by votes and safety checks. Callers that arrive before the
/// load finishes wait for it (it takes about a second).
pub struct Semantic {
    embedder_id: String,
    embedder: OnceCell<Option<Embedder>>,
    classifier: OnceCell<Arc<SafetyClassifier>>,
}

impl Semantic {
    /// `embedder_id` empty = no embedder.
    pub fn new(embedder_id: &str) -> Self {
        Self {
            embedder_id: embedder_id.to_string(),
            embedder: OnceCell::new(),
            classifier: OnceCell::new(),
        }
    }

    /// With an already loaded embedder (tests, tools).
    pub fn with_embedder(embedder: Option<Embedder>) -> Self {
        let s = Self::new(embedder.as_ref().map_or("", |e| e.id()));
        // A fresh cell cannot be full: `set` only fails when already set.
        let _ = s.embedder.set(embedder);
        s
    }

    /// The embedder, loading it on first call (off the runtime); `None` when
    /// none is configured or it is not installed (said once, in the log).
    pub async fn embedder(&self) -> Option<&Embedder> {
        self.embedder
            .get_or_init(|| async {
                if self.embedder_id.is_empty() {
                    tracing::info!("no embedder configured: free-text votes match exactly, safety uses rules only");
                    return None;
                }
                let id = self.embedder_id.clone();
                let loaded = tokio::task::spawn_blocking(move || {
                    let catalog = crate::models::Catalog::builtin().map_err(|e| e.to_string())?;
                    Embedder::shared(&catalog, &crate::models::home_dir(), &id).map_err(|e| e.to_string())
                })
                .await;
                match loaded {
                    Ok(Ok(e)) => {
                        tracing::info!("embedder {} loaded ({}-d)", e.id(), e.dim());
                        Some(e)
                    }
                    Ok(Err(msg)) => {
                        tracing::warn!(
                            "embedder `{}` unavailable ({msg}); free-text votes fall back to exact matching and safety to rules only",
                            self.embedder_id
                        );
                        None
                    }
                    Err(e) => {
                        tracing::warn!("embedder load task failed: {e}");
                        None
                    }
                }
            })
            .await
            .as_ref()
    }

    /// The safety classifier (the trained head when the embedder is there, else the rules).
    pub async fn classifier(&self) -> Arc<SafetyClassifier> {
        self.classifier
            .get_or_init(|| async {
                let Some(e) = self.embedder().await.cloned() else {
                    return Arc::new(SafetyClassifier::rules_only());
                };
                let built = tokio::task::spawn_blocking(move || SafetyClassifier::shared(e)).await;
                match built {
                    Ok(Ok(c)) => c,
                    Ok(Err(err)) => {
                        tracing::warn!("safety head unavailable ({err}); rules only");
                        Arc::new(SafetyClassifier::rules_only())
                    }
                    Err(err) => {
                        tracing::warn!("safety head task failed ({err}); rules only");
                        Arc::new(SafetyClassifier::rules_only())
                    }
                }
            })
            .await
            .clone()
    }

    /// The safety signal of one query under the node's `policy` (never flagged
    /// when `enabled` is false). Async: the embedding runs on the blocking pool,
    /// never on the runtime's threads.
    pub async fn check(&self, enabled: bool, policy: &SafetyPolicy, text: &str) -> SafetyFlag {
        if !enabled {
            return SafetyFlag::default();
        }
        let v = self.classifier().await.classify(text).await;
        // A configured threshold re-reads the head's probability.
        let category = match policy.threshold {
            Some(t) => v.category_at(t),
            None => v.category,
        };
        let flagged = category.is_some();
        SafetyFlag {
            flagged,
            action: policy.action(flagged, category.as_deref()),
            category,
        }
    }

    /// Load both now (spawned at node start so the first query does not pay for it).
    pub async fn warm_up(&self, safety: bool) {
        if safety {
            let _ = self.classifier().await;
        } else {
            let _ = self.embedder().await;
        }
    }
}
