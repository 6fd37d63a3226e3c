//! The transformer's non-matmul operations on plain f32 rows: RMSNorm, rotary
//! embeddings, activations with a vectorisable exp, and causal attention over
//! the KV cache's position-major rows. Written as simple lane-parallel loops
//! that LLVM vectorises, so a decode step does no per-op allocation or
//! dispatch of its own.
//!
//! The binary is built for baseline x86-64, so each op exists twice: the
//! generic body compiled as is (SSE2), and the same body compiled inside a
//! `#[target_feature(enable = "avx2,fma")]` function; [`cpu::level`] picks one
//! per call. The bodies are generic over how they fuse a multiply-add
//! ([`Fma`]): the FMA instruction in the AVX2 variant, an exact emulation in
//! the generic one, so both give the same bits.

use super::cpu::{self, Fma, HwFma, Level, PortableFma};

/// e^x for x ≤ 88 with ~1e-7 relative error; branch-free so loops over it vectorise.
#[inline(always)]
pub fn exp<F: Fma>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = F::fma(n, -LN2_LO, F::fma(n, -LN2_HI, x));
    // Taylor polynomial of e^r on |r| ≤ ln2/2 (degree 6, error < 2e-7).
    let mut p: f32 = 1.0 / 720.0;
    p = F::fma(p, r, 1.0 / 120.0);
    p = F::fma(p, r, 1.0 / 24.0);
    p = F::fma(p, r, 1.0 / 6.0);
    p = F::fma(p, r, 0.5);
    p = F::fma(p, r, 1.0);
    p = F::fma(p, r, 1.0);
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

#[inline(always)]
fn sigmoid<F: Fma>(x: f32) -> f32 {
    1.0 / (1.0 + exp::<F>(-x))
}

#[inline(always)]
fn silu_mul_body<F: Fma>(g: &mut [f32], u: &[f32]) {
    for (g, &u) in g.iter_mut().zip(u) {
        *g = *g * sigmoid::<F>(*g) * u;
    }
}

/// √(2/π), for the tanh form of gelu.
const GELU_S: f32 = 0.797_884_6;

#[inline(always)]
fn gelu_mul_body<F: Fma>(g: &mut [f32], u: &[f32]) {
    for (g, &u) in g.iter_mut().zip(u) {
        let x = *g;
        let y = GELU_S * x * (1.0 + 0.044715 * x * x);
        *g = x * sigmoid::<F>(2.0 * y) * u;
    }
}

/// Sum of products in 8 independent lanes (vectorises without reassociation).
#[inline(always)]
pub fn dot<F: Fma>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = F::fma(x[l], y[l], acc[l]);
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s = F::fma(*x, *y, s);
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + s
}

/// out ← out + a·x
#[inline(always)]
fn axpy<F: Fma>(out: &mut [f32], a: f32, x: &[f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = F::fma(a, x, *o);
    }
}

#[inline(always)]
fn rms_norm_body<F: Fma>(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss = dot::<F>(xr, xr);
        let s = 1.0 / (ss / d as f32 + eps).sqrt();
        for ((o, &x), &w) in or.iter_mut().zip(xr).zip(w) {
            *o = x * s * w;
        }
    }
}

#[inline(always)]
fn rms_norm_inplace_body<F: Fma>(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for xr in x.chunks_exact_mut(d) {
        let ss = dot::<F>(xr, xr);
        let s = 1.0 / (ss / d as f32 + eps).sqrt();
        for (x, &w) in xr.iter_mut().zip(w) {
            *x = *x * s * w;
        }
    }
}

/// The AVX2+FMA variant of each op: the same body, compiled with those
/// features enabled and the FMA instruction for `Fma`.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    macro_rules! variants {
        ($(fn $name:ident = $body:ident($($arg:ident: $ty:ty),*);)*) => {$(
            /// # Safety
            /// The CPU must have AVX2 and FMA (`cpu::level() == Level::Avx2`).
            #[target_feature(enable = "avx2,fma")]
            pub(super) unsafe fn $name($($arg: $ty),*) {
                $body::<HwFma>($($arg),*)
            }
        )*};
    }

    variants! {
        fn silu_mul = silu_mul_body(g: &mut [f32], u: &[f32]);
        fn gelu_mul = gelu_mul_body(g: &mut [f32], u: &[f32]);
        fn rms_norm = rms_norm_body(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]);
        fn rms_norm_inplace = rms_norm_inplace_body(x: &mut [f32], w: &[f32], eps: f32);
        fn rope = rope_body(t: &RopeTable, x: &mut [f32], heads: usize, pos: usize, interleaved: bool);
        fn attend = attend_body(a: &Attn<'_>, items: std::ops::Range<usize>, scores: &mut Vec<f32>);
    }
}

/// Calls the op's AVX2 variant at `Level::Avx2`, else its generic body.
macro_rules! at_level {
    ($level:expr, $name:ident, $body:ident($($arg:expr),*)) => {
        match $level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Level::Avx2 is only chosen (cpu::level) or offered
            // (cpu::levels) when the CPU has AVX2 and FMA.
            Level::Avx2 => unsafe { avx2::$name($($arg),*) },
            _ => $body::<PortableFma>($($arg),*),
        }
    };
}

/// g ← silu(g) · u (SwiGLU), elementwise.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    silu_mul_at(cpu::level(), g, u)
}

fn silu_mul_at(level: Level, g: &mut [f32], u: &[f32]) {
    at_level!(level, silu_mul, silu_mul_body(g, u))
}

/// g ← gelu(g) · u with the tanh approximation (what candle's `gelu` computes):
/// 0.5·x·(1 + tanh(y)) = x·sigmoid(2y), y = √(2/π)·(x + 0.044715·x³).
pub fn gelu_mul(g: &mut [f32], u: &[f32]) {
    gelu_mul_at(cpu::level(), g, u)
}

fn gelu_mul_at(level: Level, g: &mut [f32], u: &[f32]) {
    at_level!(level, gelu_mul, gelu_mul_body(g, u))
}

/// RMSNorm of each `w.len()`-wide row of `x` into `out`: x / √(mean(x²) + eps) · w.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    rms_norm_at(cpu::level(), x, w, eps, out)
}

fn rms_norm_at(level: Level, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    at_level!(level, rms_norm, rms_norm_body(x, w, eps, out))
}

/// In-place RMSNorm of each row.
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    rms_norm_inplace_at(cpu::level(), x, w, eps)
}

fn rms_norm_inplace_at(level: Level, x: &mut [f32], w: &[f32], eps: f32) {
    at_level!(level, rms_norm_inplace, rms_norm_inplace_body(x, w, eps))
}

/// Rotary tables: cos and sin of position·θᵢ, [positions][dim/2].
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    half: usize,
}

impl RopeTable {
    pub fn new(dim: usize, base: f32, positions: usize) -> Self {
        let half = dim / 2;
        let inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1f32 / base.powf(i as f32 / dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Self { cos, sin, half }
    }

    /// Rotate every head of `x` ([seq][heads][dim], positions pos..pos+seq).
    /// `interleaved`: pairs (2i, 2i+1) (GGUF llama); else halves (i, i+dim/2) (NeoX).
    pub fn apply(&self, x: &mut [f32], heads: usize, pos: usize, interleaved: bool) {
        self.apply_at(cpu::level(), x, heads, pos, interleaved)
    }

    fn apply_at(&self, level: Level, x: &mut [f32], heads: usize, pos: usize, interleaved: bool) {
        at_level!(level, rope, rope_body(self, x, heads, pos, interleaved))
    }
}

/// Plain multiplies and adds (no fusing), so `F` is unused; generic anyway
/// so that every op has the same two variants.
#[allow(clippy::extra_unused_type_parameters)]
#[inline(always)]
fn rope_body<F: Fma>(t: &RopeTable, x: &mut [f32], heads: usize, pos: usize, interleaved: bool) {
    let half = t.half;
    let dim = 2 * half;
    for (s, row) in x.chunks_exact_mut(heads * dim).enumerate() {
        let at = (pos + s) * half;
        let (cos, sin) = (&t.cos[at..at + half], &t.sin[at..at + half]);
        for head in row.chunks_exact_mut(dim) {
            if interleaved {
                for i in 0..half {
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * cos[i] - b * sin[i];
                    head[2 * i + 1] = a * sin[i] + b * cos[i];
                }
            } else {
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * cos[i] - b * sin[i];
                    hi[i] = b * cos[i] + a * sin[i];
                }
            }
        }
    }
}

/// Shapes of one attention call.
pub struct AttnShape<'a> {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Position of the first query row.
    pub pos: usize,
    pub seq: usize,
    /// Keys at least this far back are hidden (sliding-window layers).
    pub window: Option<usize>,
    pub scale: f32,
    /// Branches sharing the cached prefix (the options of one question run
    /// in one call): for each query row, the index among the new rows where
    /// its branch starts. A row sees the prefix and its own branch only, at
    /// positions counted from `pos` within the branch. Empty: one sequence.
    pub branch: &'a [usize],
}

/// One attention call's inputs, shared by the pool's threads.
struct Attn<'a> {
    q: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    s: &'a AttnShape<'a>,
    /// The output buffer's address: each item writes its own (row, head)
    /// slice (an address, not a pointer, so the struct is Sync).
    out: usize,
}

/// Items (query row × head) of one attention call.
#[inline(always)]
fn attend_body<F: Fma>(a: &Attn<'_>, items: std::ops::Range<usize>, scores: &mut Vec<f32>) {
    let s = a.s;
    let (hd, nh, nkv) = (s.head_dim, s.n_head, s.n_kv_head);
    let rep = nh / nkv;
    let kv_row = nkv * hd;
    for item in items {
        let (i, h) = (item / nh, item % nh);
        let bs = s.branch.get(i).copied().unwrap_or(0);
        // Logical position of the row, and the first visible one.
        let p = s.pos + i - bs;
        let lo = match s.window {
            Some(w) => (p + 1).saturating_sub(w),
            None => 0,
        };
        // Cache rows: the visible prefix, then the row's branch up to itself.
        let rows = (lo.min(s.pos)..s.pos).chain(s.pos + bs + lo.saturating_sub(s.pos)..=s.pos + i);
        let kvh = h / rep;
        let qv = &a.q[(i * nh + h) * hd..(i * nh + h + 1) * hd];
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for j in rows.clone() {
            let kr = &a.keys[j * kv_row + kvh * hd..j * kv_row + (kvh + 1) * hd];
            let v = dot::<F>(qv, kr) * s.scale;
            max = max.max(v);
            scores.push(v);
        }
        let mut sum = 0f32;
        for v in scores.iter_mut() {
            *v = exp::<F>(*v - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        // SAFETY: `attention` checked that the output holds every item's
        // slice; each item owns the disjoint slice of its (row, head).
        let o = unsafe { std::slice::from_raw_parts_mut((a.out as *mut f32).add((i * nh + h) * hd), hd) };
        o.fill(0.0);
        for (j, &w) in rows.zip(scores.iter()) {
            let vr = &a.values[j * kv_row + kvh * hd..j * kv_row + (kvh + 1) * hd];
            axpy::<F>(o, w * inv, vr);
        }
    }
}

/// Causal softmax attention. q: [seq][n_head][hd]; keys/values: [pos+seq][n_kv_head][hd]
/// (position-major, the cache layout); out: [seq][n_head][hd].
pub fn attention(q: &[f32], keys: &[f32], values: &[f32], s: &AttnShape, out: &mut [f32]) {
    attention_at(cpu::level(), q, keys, values, s, out)
}

fn attention_at(level: Level, q: &[f32], keys: &[f32], values: &[f32], s: &AttnShape, out: &mut [f32]) {
    let (hd, nh, nkv) = (s.head_dim, s.n_head, s.n_kv_head);
    let kv_row = nkv * hd;
    let items = s.seq * nh;
    let total = s.pos + s.seq;
    assert!(
        q.len() >= items * hd && out.len() >= items * hd,
        "attention buffers"
    );
    assert!(
        keys.len() >= total * kv_row && values.len() >= total * kv_row,
        "kv buffers"
    );
    assert!(
        s.branch.is_empty() || (s.branch.len() == s.seq && s.branch.iter().enumerate().all(|(i, &b)| b <= i)),
        "branch starts"
    );
    let a = Attn {
        q,
        keys,
        values,
        s,
        out: out.as_mut_ptr() as usize,
    };
    let run = |range: std::ops::Range<usize>| {
        let mut scores = Vec::with_capacity(total);
        at_level!(level, attend, attend_body(&a, range, &mut scores))
    };
    // ~2·hd multiply-adds per visible key; small calls are not worth waking the pool.
    let work = items * total * hd;
    if work < 1 << 16 {
        run(0..items);
    } else {
        cpu::par_chunked(items, run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = ((exp::<PortableFma>(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs() as f32;
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        let e = exp::<PortableFma>(-1000.0);
        assert!((0.0..1e-37).contains(&e));
    }

    #[test]
    fn activations_match_their_definitions() {
        let xs: Vec<f32> = (-40..40).map(|i| i as f32 * 0.25).collect();
        let ones = vec![1f32; xs.len()];
        let mut s = xs.clone();
        silu_mul(&mut s, &ones);
        let mut g = xs.clone();
        gelu_mul(&mut g, &ones);
        for ((&x, &s), &g) in xs.iter().zip(&s).zip(&g) {
            let want_s = x / (1.0 + (-x).exp());
            let want_g = 0.5
                * x
                * (1.0 + ((2.0f32 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
            assert!((s - want_s).abs() < 1e-5, "silu({x}) = {s} vs {want_s}");
            assert!((g - want_g).abs() < 1e-5, "gelu({x}) = {g} vs {want_g}");
        }
    }

    /// Attention against a direct evaluation with an explicit mask.
    #[test]
    fn attention_matches_masked_softmax() {
        let (nh, nkv, hd, pos, seq) = (4, 2, 16, 5, 3);
        let total = pos + seq;
        let r = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        let q: Vec<f32> = (0..seq * nh * hd).map(r).collect();
        let k: Vec<f32> = (0..total * nkv * hd).map(|i| r(i + 13)).collect();
        let v: Vec<f32> = (0..total * nkv * hd).map(|i| r(i + 101)).collect();
        for window in [None, Some(4)] {
            let shape = AttnShape {
                n_head: nh,
                n_kv_head: nkv,
                head_dim: hd,
                pos,
                seq,
                window,
                scale: 0.25,
                branch: &[],
            };
            let mut out = vec![0f32; seq * nh * hd];
            attention(&q, &k, &v, &shape, &mut out);
            for i in 0..seq {
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let p = pos + i;
                    let vis = |j: usize| j <= p && window.is_none_or(|w| p - j < w);
                    let sc: Vec<f64> = (0..total)
                        .map(|j| {
                            let d: f64 = (0..hd)
                                .map(|x| (q[(i * nh + h) * hd + x] * k[(j * nkv + kvh) * hd + x]) as f64)
                                .sum();
                            if vis(j) {
                                d * 0.25
                            } else {
                                f64::NEG_INFINITY
                            }
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for x in 0..hd {
                        let want: f64 = (0..total)
                            .map(|j| e[j] / z * v[(j * nkv + kvh) * hd + x] as f64)
                            .sum();
                        let got = out[(i * nh + h) * hd + x] as f64;
                        assert!((got - want).abs() < 1e-5, "i={i} h={h} x={x}: {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn rope_rotates_pairs_and_halves() {
        let t = RopeTable::new(4, 10000.0, 8);
        let mut a = vec![1.0, 0.0, 1.0, 0.0];
        t.apply(&mut a, 1, 3, true);
        // Pair 0 rotates by 3 rad, pair 1 by 3·10000^-0.5.
        assert!((a[0] - 3f32.cos()).abs() < 1e-6 && (a[1] - 3f32.sin()).abs() < 1e-6);
        let th = 3.0 * 10000f32.powf(-0.5);
        assert!((a[2] - th.cos()).abs() < 1e-6 && (a[3] - th.sin()).abs() < 1e-6);
        let mut b = vec![1.0, 1.0, 0.0, 0.0];
        t.apply(&mut b, 1, 3, false);
        assert!((b[0] - 3f32.cos()).abs() < 1e-6 && (b[2] - 3f32.sin()).abs() < 1e-6);
    }

    fn pseudo(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919 % 1999) as f32 / 999.5) - 1.0)
            .collect()
    }

    #[test]
    fn dot_matches_a_plain_sum_for_ragged_lengths() {
        for n in [0, 1, 7, 8, 9, 31, 64, 100] {
            let (a, b) = (pseudo(n, 1), pseudo(n, 5));
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot::<PortableFma>(&a, &b) as f64 - want).abs() < 1e-4, "n={n}");
        }
    }

    #[test]
    fn rms_norm_matches_its_definition() {
        let d = 24;
        let x = pseudo(3 * d, 3);
        let w = pseudo(d, 9);
        let eps = 1e-6;
        let mut out = vec![0f32; x.len()];
        rms_norm(&x, &w, eps, &mut out);
        let mut inplace = x.clone();
        rms_norm_inplace(&mut inplace, &w, eps);
        assert_eq!(out, inplace);
        for (r, row) in x.chunks(d).enumerate() {
            let ms: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
            let s = 1.0 / (ms + eps as f64).sqrt();
            for j in 0..d {
                let want = row[j] as f64 * s * w[j] as f64;
                assert!((out[r * d + j] as f64 - want).abs() < 1e-5, "row {r} col {j}");
            }
        }
    }

    /// Both rotary layouts against candle's `rope_i`/`rope`, which the model
    /// used before these ops; several heads and a non-zero start position.
    #[test]
    fn rope_matches_candle_for_both_layouts() {
        use candle_core::{Device, Tensor};
        let (seq, heads, dim, pos) = (5, 3, 16, 7);
        let t = RopeTable::new(dim, 10000.0, 32);
        let x = pseudo(seq * heads * dim, 17);
        let dev = Device::Cpu;
        let cos = Tensor::from_slice(&t.cos[pos * dim / 2..(pos + seq) * dim / 2], (seq, dim / 2), &dev)
            .expect("cos");
        let sin = Tensor::from_slice(&t.sin[pos * dim / 2..(pos + seq) * dim / 2], (seq, dim / 2), &dev)
            .expect("sin");
        // candle wants (batch, heads, seq, dim); ours is [seq][heads][dim].
        let xt = Tensor::from_slice(&x, (1, seq, heads, dim), &dev)
            .and_then(|t| t.transpose(1, 2))
            .and_then(|t| t.contiguous())
            .expect("x");
        for interleaved in [true, false] {
            let want = if interleaved {
                candle_nn::rotary_emb::rope_i(&xt, &cos, &sin)
            } else {
                candle_nn::rotary_emb::rope(&xt, &cos, &sin)
            };
            let want = want
                .and_then(|t| t.transpose(1, 2))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("want");
            let mut got = x.clone();
            t.apply(&mut got, heads, pos, interleaved);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() < 1e-5,
                    "interleaved={interleaved} at {i}: {g} vs {w}"
                );
            }
        }
    }

    /// Branches in one call (options of a question) equal one call per branch
    /// on the prefix plus that branch's rows.
    #[test]
    fn branched_attention_equals_separate_calls() {
        let (nh, nkv, hd, pos) = (4, 2, 8, 6);
        let spans = [(0usize, 3usize), (3, 4), (4, 9)];
        let seq = 9;
        let row = nkv * hd;
        let r = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        let q: Vec<f32> = (0..seq * nh * hd).map(r).collect();
        let k: Vec<f32> = (0..(pos + seq) * row).map(|i| r(i + 13)).collect();
        let v: Vec<f32> = (0..(pos + seq) * row).map(|i| r(i + 101)).collect();
        let starts: Vec<usize> = spans
            .iter()
            .flat_map(|&(a, b)| std::iter::repeat_n(a, b - a))
            .collect();
        for window in [None, Some(4)] {
            let shape = |pos, seq, branch| AttnShape {
                n_head: nh,
                n_kv_head: nkv,
                head_dim: hd,
                pos,
                seq,
                window,
                scale: 0.3,
                branch,
            };
            let mut all = vec![0f32; seq * nh * hd];
            attention(&q, &k, &v, &shape(pos, seq, &starts), &mut all);
            for &(a, b) in &spans {
                let mut kb = k[..pos * row].to_vec();
                kb.extend_from_slice(&k[(pos + a) * row..(pos + b) * row]);
                let mut vb = v[..pos * row].to_vec();
                vb.extend_from_slice(&v[(pos + a) * row..(pos + b) * row]);
                let mut one = vec![0f32; (b - a) * nh * hd];
                let qb = &q[a * nh * hd..b * nh * hd];
                attention(qb, &kb, &vb, &shape(pos, b - a, &[]), &mut one);
                let got = &all[a * nh * hd..b * nh * hd];
                for (x, y) in got.iter().zip(&one) {
                    assert!((x - y).abs() < 1e-5, "{window:?} span {a}..{b}: {x} vs {y}");
                }
            }
        }
    }

    /// The generic and AVX2 variants of every op give the same bits (the
    /// generic one emulates the FMA instruction exactly), so a node without
    /// AVX2 answers like one with it.
    #[test]
    fn every_level_gives_the_same_bits() {
        let levels = cpu::levels();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        let (d, rows) = (72, 5);
        let x = pseudo(rows * d, 3);
        let u = pseudo(rows * d, 8);
        let w = pseudo(d, 11);
        // Wider range for the activations' exp.
        let g: Vec<f32> = pseudo(rows * d, 21).iter().map(|v| v * 12.0).collect();
        let t = RopeTable::new(8, 10000.0, 16);
        let (nh, nkv, hd, pos, seq) = (4, 2, 24, 200, 6);
        let q = pseudo(seq * nh * hd, 1);
        let k = pseudo((pos + seq) * nkv * hd, 2);
        let v = pseudo((pos + seq) * nkv * hd, 4);
        let starts = [0, 0, 2, 2, 2, 5];
        let run = |level: Level| -> Vec<Vec<u32>> {
            let mut out = Vec::new();
            let mut s = g.clone();
            silu_mul_at(level, &mut s, &u);
            out.push(bits(&s));
            let mut s = g.clone();
            gelu_mul_at(level, &mut s, &u);
            out.push(bits(&s));
            let mut n = vec![0f32; x.len()];
            rms_norm_at(level, &x, &w, 1e-6, &mut n);
            out.push(bits(&n));
            let mut n = x.clone();
            rms_norm_inplace_at(level, &mut n, &w, 1e-6);
            out.push(bits(&n));
            for interleaved in [true, false] {
                let mut r = x[..3 * 2 * 8].to_vec();
                t.apply_at(level, &mut r, 2, 5, interleaved);
                out.push(bits(&r));
            }
            // Small (inline) and large (pool) calls, branches and windows.
            for (p, window, branch) in [
                (3, None, &[][..]),
                (pos, Some(9), &[][..]),
                (pos, None, &starts[..]),
            ] {
                let shape = AttnShape {
                    n_head: nh,
                    n_kv_head: nkv,
                    head_dim: hd,
                    pos: p,
                    seq,
                    window,
                    scale: 0.2,
                    branch,
                };
                let mut o = vec![0f32; seq * nh * hd];
                attention_at(level, &q, &k, &v, &shape, &mut o);
                out.push(bits(&o));
            }
            out
        };
        let want = run(Level::Generic);
        for &level in &levels[1..] {
            assert_eq!(run(level), want, "{level:?} differs from the generic ops");
        }
    }
}
