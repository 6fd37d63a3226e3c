//! Sentence embeddings with all-MiniLM-L6-v2 (candle's BERT): the
//! sentence-transformers recipe — truncate to 256 tokens, mean-pool the last
//! hidden states over the attention mask, L2-normalise — batched, and run off
//! the async runtime (`spawn_blocking`) so a node's tokio threads never stall.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use thiserror::Error;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::models::{self, Catalog};

/// Catalog id of the default embedder.
pub const DEFAULT_EMBEDDER: &str = "all-minilm-l6-v2";
/// sentence-transformers' `max_seq_length` for all-MiniLM-L6-v2.
pub const MAX_TOKENS: usize = 256;
/// Texts per forward pass: bounds the padded batch's memory.
pub const BATCH: usize = 32;

#[derive(Debug, Error, Clone)]
pub enum EmbedError {
    #[error("embedder files: {0}")]
    Files(String),
    #[error("embedder config: {0}")]
    Config(String),
    #[error("embedder tokenizer: {0}")]
    Tokenizer(String),
    #[error("embedder compute: {0}")]
    Compute(String),
    #[error("embedder worker: {0}")]
    Worker(String),
}

impl From<candle_core::Error> for EmbedError {
    fn from(e: candle_core::Error) -> Self {
        EmbedError::Compute(e.to_string())
    }
}

struct Core {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dim: usize,
    /// One forward pass at a time: concurrent callers would only fight over the same cores.
    gate: Mutex<()>,
}

/// A loaded sentence embedder; cheap to clone (shared model).
#[derive(Clone)]
pub struct Embedder {
    core: Arc<Core>,
    id: String,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("id", &self.id)
            .field("dim", &self.core.dim)
            .finish()
    }
}

impl Embedder {
    /// Load from a directory holding `model.safetensors`, `tokenizer.json` and `config.json`.
    pub fn load(dir: &Path, id: &str) -> Result<Self, EmbedError> {
        let file = |n: &str| -> Result<PathBuf, EmbedError> {
            let p = dir.join(n);
            if p.is_file() {
                Ok(p)
            } else {
                Err(EmbedError::Files(format!("{} is missing", p.display())))
            }
        };
        let device = Device::Cpu;
        let cfg_text = std::fs::read_to_string(file("config.json")?)
            .map_err(|e| EmbedError::Files(format!("config.json: {e}")))?;
        let cfg: Config = serde_json::from_str(&cfg_text).map_err(|e| EmbedError::Config(e.to_string()))?;
        let dim = cfg.hidden_size;
        // Loaded into memory rather than mmapped: 90 MB, and no `unsafe` needed.
        let tensors = candle_core::safetensors::load(file("model.safetensors")?, &device)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let model = BertModel::load(vb, &cfg)?;
        let mut tokenizer = Tokenizer::from_file(file("tokenizer.json")?)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        let pad_id = tokenizer.token_to_id("[PAD]").unwrap_or(cfg.pad_token_id as u32);
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_id,
            pad_token: "[PAD]".into(),
            ..PaddingParams::default()
        }));
        Ok(Self {
            core: Arc::new(Core {
                model,
                tokenizer,
                device,
                dim,
                gate: Mutex::new(()),
            }),
            id: id.to_string(),
        })
    }

    /// Load a catalog embedder that is already installed (never downloads: a node
    /// must start without network access).
    pub fn from_catalog(catalog: &Catalog, home: &Path, id: &str) -> Result<Self, EmbedError> {
        let m = models::resolve(catalog, home, id).map_err(|e| EmbedError::Files(e.to_string()))?;
        Self::load(&m.path, id)
    }

    /// Like [`Embedder::from_catalog`], but one loaded model per process: nodes
    /// started in one process (tests, simulations) share it.
    pub fn shared(catalog: &Catalog, home: &Path, id: &str) -> Result<Self, EmbedError> {
        static CACHE: OnceLock<Mutex<BTreeMap<PathBuf, Embedder>>> = OnceLock::new();
        let m = models::resolve(catalog, home, id).map_err(|e| EmbedError::Files(e.to_string()))?;
        // A map of loaded models stays valid even if a holder panicked.
        let mut cache = CACHE
            .get_or_init(|| Mutex::new(BTreeMap::new()))
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = cache.get(&m.path) {
            return Ok(e.clone());
        }
        let e = Self::load(&m.path, id)?;
        cache.insert(m.path, e.clone());
        Ok(e)
    }

    /// True when both handles share one loaded model.
    pub fn same_model(&self, other: &Embedder) -> bool {
        Arc::ptr_eq(&self.core, &other.core)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Embedding width (384 for MiniLM-L6).
    pub fn dim(&self) -> usize {
        self.core.dim
    }

    /// Unit-norm embeddings of `texts`, in order. Blocks: call from a worker
    /// thread or through [`Embedder::embed`].
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        one_at_a_time(&self.core.gate, || {
            let mut out = Vec::with_capacity(texts.len());
            for chunk in texts.chunks(BATCH) {
                out.extend(self.core.batch(chunk)?);
            }
            Ok(out)
        })
    }

    /// [`Embedder::embed_blocking`] on tokio's blocking pool.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.embed_blocking(&texts))
            .await
            .map_err(|e| EmbedError::Worker(e.to_string()))?
    }
}

/// Runs `f` holding `gate`; a panic in `f` fails this call only. The model
/// and tokenizer are only read (`&self`), so nothing is left half-updated:
/// the gate is taken even if an earlier panic poisoned it (it guards no
/// data), where a poisoned gate used to fail every later embedding, and with
/// it the safety check of every query.
fn one_at_a_time<T>(gate: &Mutex<()>, f: impl FnOnce() -> Result<T, EmbedError>) -> Result<T, EmbedError> {
    let _gate = gate.lock().unwrap_or_else(PoisonError::into_inner);
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(res) => res,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!("embedder panicked: {msg}; only this call fails");
            Err(EmbedError::Worker(format!("embedding panicked: {msg}")))
        }
    }
}

impl Core {
    fn batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        let n = enc.len();
        let len = enc.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        for e in &enc {
            // BatchLongest padding makes every row `len` long; pad defensively anyway.
            let (i, m) = (e.get_ids(), e.get_attention_mask());
            ids.extend(i.iter().copied().chain(std::iter::repeat(0)).take(len));
            mask.extend(m.iter().copied().chain(std::iter::repeat(0)).take(len));
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        let pooled = mean_pool(&hidden, &mask)?;
        let normed = l2_normalize(&pooled)?;
        Ok(normed.to_vec2::<f32>()?)
    }
}

/// Mean of the token states where the mask is 1: (batch, seq, dim) → (batch, dim).
fn mean_pool(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&m)?.sum(1)?;
    // sentence-transformers clamps the token count at 1e-9 so an empty row gives zeros, not NaN.
    let counts = m.sum(1)?.clamp(1e-9, f64::INFINITY)?;
    summed.broadcast_div(&counts)
}

/// Rows scaled to unit L2 norm (norm clamped at 1e-12 as torch's `normalize`).
fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)
}

/// Cosine of two embeddings (their dot product when both are unit-norm).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na <= 0.0 || nb <= 0.0 || a.len() != b.len() {
        return 0.0;
    }
    dot / (na * nb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pool_ignores_masked_tokens_and_normalises() -> candle_core::Result<()> {
        let d = Device::Cpu;
        // One row: token 0 = [1, 0], token 1 = [3, 4] (masked out), so the mean is [1, 0].
        let h = Tensor::from_vec(vec![1.0f32, 0.0, 3.0, 4.0], (1, 2, 2), &d)?;
        let m = Tensor::from_vec(vec![1u32, 0], (1, 2), &d)?;
        let p = mean_pool(&h, &m)?.to_vec2::<f32>()?;
        assert_eq!(p, vec![vec![1.0, 0.0]]);
        // Both tokens: mean [2, 2], normalised to [0.7071, 0.7071].
        let m = Tensor::from_vec(vec![1u32, 1], (1, 2), &d)?;
        let n = l2_normalize(&mean_pool(&h, &m)?)?.to_vec2::<f32>()?;
        assert!((n[0][0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6, "{n:?}");
        assert!((n[0][1] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6, "{n:?}");
        // A fully masked row stays finite.
        let m = Tensor::from_vec(vec![0u32, 0], (1, 2), &d)?;
        let z = l2_normalize(&mean_pool(&h, &m)?)?.to_vec2::<f32>()?;
        assert!(z[0].iter().all(|v| v.is_finite()), "{z:?}");
        Ok(())
    }

    /// A panicking embedding fails that call only; the next one runs, also
    /// after the gate was poisoned by a panic outside `one_at_a_time`.
    #[test]
    fn a_panic_fails_one_embedding_and_the_next_runs() {
        let gate = Mutex::new(());
        let r: Result<(), EmbedError> = one_at_a_time(&gate, || panic!("test-only panic"));
        match r {
            Err(EmbedError::Worker(m)) => assert!(m.contains("test-only panic"), "{m}"),
            other => panic!("expected a worker error, got {other:?}"),
        }
        assert!(!gate.is_poisoned());
        assert_eq!(one_at_a_time(&gate, || Ok(7)).ok(), Some(7));
        let _ = std::thread::scope(|s| {
            s.spawn(|| {
                let _held = gate.lock();
                panic!("test-only panic while holding the gate");
            })
            .join()
        });
        assert!(gate.is_poisoned());
        assert_eq!(one_at_a_time(&gate, || Ok(8)).ok(), Some(8));
    }

    #[test]
    fn cosine_of_known_vectors() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-6);
        assert!((cosine(&[1.0, 1.0], &[2.0, 2.0]) - 1.0).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        assert_eq!(cosine(&[1.0], &[1.0, 0.0]), 0.0);
    }
}
