//! One decoder-only transformer for the GGUF architectures we ship (llama, qwen2,
//! gemma3) on our quantized kernels (candle's for the K-quants). Unlike
//! candle-transformers' models it keeps weights immutable and the KV cache
//! outside (so caches can be kept, truncated and shared as prefixes), and it
//! returns hidden states for every position (needed for log-likelihood
//! scoring), not only the last one. Activations are plain f32 rows between
//! the matmuls, so a decode step costs the matmuls and little else.

use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor, D};

use super::gguf::{Arch, ModelConfig};
use super::kernels::QLinear;
use super::ops::{self, AttnShape, RopeTable};
use super::InferenceError;

/// Positions we precompute rotary tables for; prompts beyond this are refused.
pub const MAX_POSITIONS: usize = 8192;

struct Layer {
    wq: QLinear,
    wk: QLinear,
    wv: QLinear,
    wo: QLinear,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    attn_norm: Vec<f32>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    post_ffn_norm: Option<Vec<f32>>,
    gate: QLinear,
    up: QLinear,
    down: QLinear,
    local: bool,
}

/// Append `src` (whole rows of `row` floats) after the first `len` rows of
/// `slot`. Clones of a cache share their buffers (a prefix cache and the
/// queries extending it); a buffer is written in place only by its sole
/// owner, anyone else copies the `len` rows it uses first. Copy-on-write
/// costs one prefix copy per clone that diverges (a few MB at most, far less
/// than recomputing the prefix) and keeps the cache free of unsafe code.
fn append(slot: &mut Option<Arc<Vec<f32>>>, len: usize, src: &[f32], row: usize, max: usize) {
    let keep = len * row;
    if let Some(buf) = slot.as_mut().and_then(Arc::get_mut) {
        if buf.len() >= keep {
            // Rows past `len` belong to a truncated tail nobody else can see.
            buf.truncate(keep);
            buf.extend_from_slice(src);
            return;
        }
    }
    let rows = len + src.len() / row;
    // Room to grow without reallocating for a while, never past the model's
    // context (`max`), which bounds what a cache can ever hold.
    let cap = (2 * rows).max(256).min(max.max(rows));
    let mut fresh = Vec::with_capacity(cap * row);
    if let Some(old) = slot.as_ref() {
        fresh.extend_from_slice(&old[..keep]);
    }
    fresh.extend_from_slice(src);
    *slot = Some(Arc::new(fresh));
}

#[derive(Clone, Default)]
struct KvLayer {
    /// Keys, [position][kv_head·head_dim].
    k: Option<Arc<Vec<f32>>>,
    /// Values, same layout.
    v: Option<Arc<Vec<f32>>>,
}

/// Keys and values of the positions seen so far, per layer.
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<KvLayer>,
    len: usize,
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        Self {
            layers: vec![KvLayer::default(); n_layer],
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keep only the first `len` positions (the buffers stay shared).
    pub fn truncate(&mut self, len: usize) -> Result<(), InferenceError> {
        if len < self.len {
            self.len = len;
        }
        Ok(())
    }
}

pub struct Transformer {
    pub cfg: ModelConfig,
    embed: Arc<QTensor>,
    embed_scale: Option<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: QLinear,
    rope: RopeTable,
    rope_local: Option<RopeTable>,
    device: Device,
    max_positions: usize,
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>, InferenceError> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

impl Transformer {
    pub fn load<R: std::io::Read + std::io::Seek>(
        cfg: ModelConfig,
        content: &Content,
        reader: &mut R,
    ) -> Result<Self, InferenceError> {
        let dev = Device::Cpu;
        if cfg.rope_dim != cfg.head_dim {
            return Err(InferenceError::Unsupported(format!(
                "partial rotary embeddings (rope dim {} < head dim {})",
                cfg.rope_dim, cfg.head_dim
            )));
        }
        let mut get = |name: &str| -> Result<QTensor, InferenceError> {
            content
                .tensor(reader, name, &dev)
                .map_err(|e| InferenceError::BadModel(format!("tensor `{name}`: {e}")))
        };
        let embed = Arc::new(get("token_embd.weight")?);
        let output = if content.tensor_infos.contains_key("output.weight") {
            QLinear::new(Arc::new(get("output.weight")?))?
        } else {
            QLinear::new(embed.clone())?
        };
        let norm = to_vec(&get("output_norm.weight")?.dequantize(&dev)?)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        let has = |n: &str| content.tensor_infos.contains_key(n);
        for i in 0..cfg.n_layer {
            let p = format!("blk.{i}");
            let mut opt = |name: String| -> Result<Option<Vec<f32>>, InferenceError> {
                if has(&name) {
                    Ok(Some(to_vec(&get(&name)?.dequantize(&dev)?)?))
                } else {
                    Ok(None)
                }
            };
            let bq = opt(format!("{p}.attn_q.bias"))?;
            let bk = opt(format!("{p}.attn_k.bias"))?;
            let bv = opt(format!("{p}.attn_v.bias"))?;
            let q_norm = opt(format!("{p}.attn_q_norm.weight"))?;
            let k_norm = opt(format!("{p}.attn_k_norm.weight"))?;
            let post_attn_norm = opt(format!("{p}.post_attention_norm.weight"))?;
            let post_ffn_norm = opt(format!("{p}.post_ffw_norm.weight"))?;
            let attn_norm = opt(format!("{p}.attn_norm.weight"))?
                .ok_or_else(|| InferenceError::BadModel(format!("{p}.attn_norm.weight missing")))?;
            let ffn_norm = opt(format!("{p}.ffn_norm.weight"))?
                .ok_or_else(|| InferenceError::BadModel(format!("{p}.ffn_norm.weight missing")))?;
            let mut q = |name: &str| -> Result<QLinear, InferenceError> {
                Ok(QLinear::new(Arc::new(get(&format!("{p}.{name}"))?))?)
            };
            let layer = Layer {
                wq: q("attn_q.weight")?,
                wk: q("attn_k.weight")?,
                wv: q("attn_v.weight")?,
                wo: q("attn_output.weight")?,
                gate: q("ffn_gate.weight")?,
                up: q("ffn_up.weight")?,
                down: q("ffn_down.weight")?,
                bq,
                bk,
                bv,
                q_norm,
                k_norm,
                attn_norm,
                post_attn_norm,
                ffn_norm,
                post_ffn_norm,
                local: cfg.is_local_layer(i),
            };
            let c = &cfg;
            let (qn, kvn) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
            let shapes_ok = layer.wq.out_features() == qn
                && layer.wk.out_features() == kvn
                && layer.wv.out_features() == kvn
                && layer.attn_norm.len() == c.n_embd
                && layer.ffn_norm.len() == c.n_embd
                && layer.q_norm.as_ref().is_none_or(|w| w.len() == c.head_dim)
                && layer.k_norm.as_ref().is_none_or(|w| w.len() == c.head_dim);
            if !shapes_ok {
                return Err(InferenceError::BadModel(format!(
                    "{p}: tensor shapes do not match the header"
                )));
            }
            layers.push(layer);
        }
        let max_positions = cfg.context_length.clamp(16, MAX_POSITIONS);
        let rope = RopeTable::new(cfg.head_dim, cfg.rope_base, max_positions);
        let rope_local = cfg
            .sliding_window
            .map(|_| RopeTable::new(cfg.head_dim, cfg.rope_base_local, max_positions));
        let embed_scale = (cfg.arch == Arch::Gemma3).then(|| (cfg.n_embd as f64).sqrt() as f32);
        Ok(Self {
            cfg,
            embed,
            embed_scale,
            layers,
            norm,
            output,
            rope,
            rope_local,
            device: dev,
            max_positions,
        })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.n_layer)
    }

    /// Longest sequence (prompt + generation) this instance accepts.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Run `tokens` after what `cache` holds; returns the final-norm hidden
    /// states of every new position, shape (tokens, n_embd).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor, InferenceError> {
        self.run(tokens, cache, &[])
    }

    /// Run several continuations of what `cache` holds in one pass (the
    /// options of one question): each branch sees the cached prefix and its
    /// own tokens only, so the result equals one `forward` per branch on a
    /// clone of the cache, but every matmul runs once over all rows. Returns
    /// the hidden states of all branches' rows, in order; `cache` is unchanged.
    pub fn forward_branches(&self, branches: &[&[u32]], cache: &KvCache) -> Result<Tensor, InferenceError> {
        if branches.iter().any(|b| b.is_empty()) {
            return Err(InferenceError::BadRequest("an empty branch".into()));
        }
        let tokens: Vec<u32> = branches.iter().flat_map(|b| b.iter().copied()).collect();
        let mut starts = Vec::with_capacity(tokens.len());
        for b in branches {
            let at = starts.len();
            starts.extend(std::iter::repeat_n(at, b.len()));
        }
        let mut kv = cache.clone();
        self.run(&tokens, &mut kv, &starts)
    }

    /// `forward` with branch starts per row (see `AttnShape::branch`).
    fn run(&self, tokens: &[u32], cache: &mut KvCache, branch: &[usize]) -> Result<Tensor, InferenceError> {
        if tokens.is_empty() {
            return Err(InferenceError::BadRequest("no tokens to run".into()));
        }
        let pos = cache.len;
        let seq = tokens.len();
        if pos + seq > self.max_positions {
            return Err(InferenceError::TooLong {
                tokens: pos + seq,
                max_tokens: 0,
                context: self.max_positions,
            });
        }
        let vocab = self.cfg.vocab_size as u32;
        if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
            return Err(InferenceError::BadRequest(format!(
                "token id {bad} out of vocabulary"
            )));
        }
        if cache.layers.len() != self.layers.len() {
            return Err(InferenceError::BadRequest("cache of another model".into()));
        }
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = to_vec(&self.embed.embedding(&ids)?)?;
        if let Some(s) = self.embed_scale {
            x.iter_mut().for_each(|v| *v *= s);
        }
        let eps = self.cfg.rms_eps as f32;
        let mut h = vec![0f32; x.len()];
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            ops::rms_norm(&x, &layer.attn_norm, eps, &mut h);
            let mut a = self.attention(layer, &h, pos, seq, slot, branch)?;
            if let Some(w) = &layer.post_attn_norm {
                ops::rms_norm_inplace(&mut a, w, eps);
            }
            x.iter_mut().zip(&a).for_each(|(x, a)| *x += a);
            ops::rms_norm(&x, &layer.ffn_norm, eps, &mut h);
            let [mut g, u]: [Vec<f32>; 2] = QLinear::forward_rows_many(&[&layer.gate, &layer.up], &h, seq)?
                .try_into()
                .map_err(|_| InferenceError::Compute("gate/up outputs".into()))?;
            match self.cfg.arch {
                Arch::Gemma3 => ops::gelu_mul(&mut g, &u),
                Arch::Llama | Arch::Qwen2 => ops::silu_mul(&mut g, &u),
            }
            let mut f = layer.down.forward_rows(&g, seq)?;
            if let Some(w) = &layer.post_ffn_norm {
                ops::rms_norm_inplace(&mut f, w, eps);
            }
            x.iter_mut().zip(&f).for_each(|(x, f)| *x += f);
        }
        cache.len = pos + seq;
        ops::rms_norm_inplace(&mut x, &self.norm, eps);
        Ok(Tensor::from_vec(x, (seq, self.cfg.n_embd), &self.device)?)
    }

    /// Logits for hidden states of shape (n, n_embd) → (n, vocab).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor, InferenceError> {
        Ok(self.output.forward(hidden)?)
    }

    /// Logits of the last row of `hidden`, as a vector.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Vec<f32>, InferenceError> {
        let n = hidden.dim(0)?;
        let last = to_vec(&hidden.narrow(0, n - 1, 1)?)?;
        Ok(self.output.forward_rows(&last, 1)?)
    }

    fn attention(
        &self,
        l: &Layer,
        h: &[f32],
        pos: usize,
        seq: usize,
        slot: &mut KvLayer,
        branch: &[usize],
    ) -> Result<Vec<f32>, InferenceError> {
        let c = &self.cfg;
        let hd = c.head_dim;
        let [mut q, mut k, mut v]: [Vec<f32>; 3] =
            QLinear::forward_rows_many(&[&l.wq, &l.wk, &l.wv], h, seq)?
                .try_into()
                .map_err(|_| InferenceError::Compute("q/k/v outputs".into()))?;
        for (y, bias) in [(&mut q, &l.bq), (&mut k, &l.bk), (&mut v, &l.bv)] {
            if let Some(b) = bias {
                for row in y.chunks_exact_mut(b.len()) {
                    row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                }
            }
        }
        let eps = c.rms_eps as f32;
        if let Some(w) = &l.q_norm {
            ops::rms_norm_inplace(&mut q, w, eps);
        }
        if let Some(w) = &l.k_norm {
            ops::rms_norm_inplace(&mut k, w, eps);
        }
        let rope = match (&self.rope_local, l.local) {
            (Some(r), true) => r,
            _ => &self.rope,
        };
        // GGUF llama weights are permuted for interleaved rotary pairs; qwen2 and
        // gemma3 use the NeoX half-split layout (llama.cpp's rope type).
        let interleaved = c.arch == Arch::Llama;
        // Each branch's rows take positions from `pos` on.
        let (qrow, krow) = (c.n_head * hd, c.n_kv_head * hd);
        let mut at = 0;
        while at < seq {
            let start = branch.get(at).copied().unwrap_or(0);
            let end = (at + 1..seq)
                .find(|&i| branch.get(i).copied().unwrap_or(0) != start)
                .unwrap_or(seq);
            let p = pos + at - start;
            rope.apply(&mut q[at * qrow..end * qrow], c.n_head, p, interleaved);
            rope.apply(&mut k[at * krow..end * krow], c.n_kv_head, p, interleaved);
            at = end;
        }
        let row = c.n_kv_head * hd;
        append(&mut slot.k, pos, &k, row, self.max_positions);
        append(&mut slot.v, pos, &v, row, self.max_positions);
        let (Some(kb), Some(vb)) = (&slot.k, &slot.v) else {
            return Err(InferenceError::Compute("kv cache not written".into()));
        };
        let total = pos + seq;
        let shape = AttnShape {
            n_head: c.n_head,
            n_kv_head: c.n_kv_head,
            head_dim: hd,
            pos,
            seq,
            window: if l.local { c.sliding_window } else { None },
            scale: 1.0 / (hd as f32).sqrt(),
            branch,
        };
        let mut y = vec![0f32; seq * c.n_head * hd];
        let n = total * row;
        ops::attention(&q, &kb[..n], &vb[..n], &shape, &mut y);
        Ok(l.wo.forward_rows(&y, seq)?)
    }
}

/// log-softmax of one row of logits, in f64 for the normaliser.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    logits.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// Log-probability of `target` under each row of `logits` (n, vocab).
pub fn row_logprobs(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>, InferenceError> {
    let logits = logits.to_dtype(DType::F32)?;
    let lse = {
        let max = logits.max_keepdim(D::Minus1)?;
        let ex = logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()?;
        (ex + max)?.squeeze(D::Minus1)?.to_vec1::<f32>()?
    };
    let idx = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    let picked = logits.gather(&idx, 1)?.squeeze(1)?.to_vec1::<f32>()?;
    Ok(picked.iter().zip(lse.iter()).map(|(p, l)| p - l).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_kv_rows_are_never_overwritten() {
        let row = 2;
        let mut a: Option<Arc<Vec<f32>>> = None;
        append(&mut a, 0, &[1.0, 1.0, 2.0, 2.0], row, 64);
        // b shares a's buffer; both extend from position 2.
        let mut b = a.clone();
        append(&mut a, 2, &[3.0, 3.0], row, 64);
        append(&mut b, 2, &[9.0, 9.0], row, 64);
        let (a, b) = (a.expect("a"), b.expect("b"));
        assert_eq!(a[..6], [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        assert_eq!(b[..6], [1.0, 1.0, 2.0, 2.0, 9.0, 9.0]);
        // A truncated sole owner reuses its buffer in place.
        let mut c = Some(a);
        let ptr = c.as_ref().map(|x| x.as_ptr());
        append(&mut c, 1, &[5.0, 5.0], row, 64);
        assert_eq!(c.as_ref().map(|x| x.as_ptr()), ptr);
        assert_eq!(c.expect("c")[..], [1.0, 1.0, 5.0, 5.0]);
        // A shared prefix truncated below what the other holder uses is copied.
        let mut d = Some(b.clone());
        append(&mut d, 1, &[7.0, 7.0], row, 64);
        assert_eq!(d.expect("d")[..], [1.0, 1.0, 7.0, 7.0]);
        assert_eq!(b[..6], [1.0, 1.0, 2.0, 2.0, 9.0, 9.0]);
    }

    #[test]
    fn kv_rows_grow_past_their_capacity_and_small_contexts() {
        let mut a: Option<Arc<Vec<f32>>> = None;
        let mut want = Vec::new();
        for i in 0..600 {
            append(&mut a, i, &[i as f32], 1, 8192);
            want.push(i as f32);
        }
        assert_eq!(a.expect("a")[..], want[..]);
        // A context shorter than the default reservation (tiny test models).
        let mut b: Option<Arc<Vec<f32>>> = None;
        append(&mut b, 0, &[1.0; 12], 3, 16);
        assert_eq!(b.expect("b").len(), 12);
    }
}
