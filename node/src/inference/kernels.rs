//! Quantized matmul for the 32-value GGUF block formats (Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0) and the K-quants Q4_K and Q6_K. Weights are repacked at load
//! so one 256-bit register holds 4 consecutive k-values of 8 output columns;
//! activations are quantized to int8 once per call and broadcast 4 bytes at a
//! time, so the register lanes are output columns and a block's scales are
//! applied once per 8 columns instead of once per dot product. AVX2 (maddubs)
//! and AVX512-VNNI (vpdpbusd on ymm) variants, chosen at run time, and a
//! portable variant of the same arithmetic for CPUs without AVX2 (same
//! bits, see `cpu`); other formats go through candle's `QMatMul`, and so does
//! everything on non-x86 CPUs unless `SLM_SWARM_KERNELS=generic`.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::cpu;

/// Values per quantization block of the formats handled here.
const QK: usize = 32;
/// Output columns per register (8 lanes × 4 k-values of int8).
const LANES: usize = 8;

/// How a block's weights are stored in the packed layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Enc {
    /// Unsigned values of 4 + `hb` bits: the low 4 as nibbles, two per byte
    /// (128 bytes per 8 columns), the high `hb` bits in bit planes of
    /// 32 bytes each (Q4_x, Q4_K: 0; Q5_x: 1; Q6_K: 2).
    Nib { hb: usize },
    /// Signed bytes (Q8_0): 256 bytes per 8 columns.
    I8,
}

impl Enc {
    const fn bytes(self) -> usize {
        match self {
            Enc::Nib { hb } => QK / 2 * LANES + hb * 32,
            Enc::I8 => QK * LANES,
        }
    }
}

/// A weight matrix (n outputs × k inputs) in the column-interleaved layout.
struct Packed {
    enc: Enc,
    n: usize,
    /// n rounded up to whole groups of 8 columns; the padding columns have
    /// zero weights and scales, and the kernels write them to scratch only.
    n_pad: usize,
    k: usize,
    /// Blocks per row (k / 32).
    nb: usize,
    /// [n/8 groups][nb blocks][enc.bytes()]
    qs: Vec<u8>,
    /// Scales per 32-value block: 1, or 2 (one per 16 values, Q6_K).
    sub: usize,
    /// Block scales, [n/8][nb][sub][8].
    d: Vec<f32>,
    /// Coefficient of the activation block sum (the block minimum, or minus the
    /// zero point times the scale), [n/8][nb][sub][8]; all zero for plain
    /// Q8_0, empty when `m_of_d` gives it.
    m: Vec<f32>,
    /// The offset coefficient as a fixed multiple of the scale (Q6_K: -32).
    m_of_d: Option<f32>,
    /// Whether `m` is non-zero anywhere (Q8_0 on AVX2 has no offset term).
    has_m: bool,
}

/// f16 bits to f32, for reading block scales: exact, in plain integer and
/// float arithmetic. (`half` uses the F16C instruction only when compiled
/// for it; in a portable build it checks the CPU on every call, which made
/// repacking a model a quarter slower.)
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x03ff) as u32;
    let magnitude = match exp {
        // Zero and subnormals: mant·2^-24, exact in f32.
        0 => (mant as f32 * f32::from_bits(0x3380_0000)).to_bits(),
        // Infinities and NaNs (payload kept).
        31 => 0x7f80_0000 | (mant << 13),
        // Normals: rebias the exponent (15 → 127).
        _ => ((exp + 112) << 23) | (mant << 13),
    };
    f32::from_bits(sign | magnitude)
}

fn rd16(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// One 32-value block of a weight row: integer values plus, per half of 16
/// values, the scale and the offset coefficient, so that
/// w[i] = d[h]·q[i] + m[h]·1 (m multiplies the activation sum of half h).
/// The 32-value formats and Q4_K have one scale per block (both halves equal);
/// Q6_K has one per 16 values.
#[derive(Clone, Copy)]
struct Blk {
    q: [i16; QK],
    d: [f32; 2],
    m: [f32; 2],
}

impl Blk {
    fn new(q: [i16; QK], d: f32, m: f32) -> Self {
        Self {
            q,
            d: [d; 2],
            m: [m; 2],
        }
    }
}

/// One ggml block of a 32-value format.
fn decode_block(dtype: GgmlDType, b: &[u8]) -> Blk {
    let mut q = [0i16; QK];
    match dtype {
        GgmlDType::Q4_0 => {
            let d = rd16(b, 0);
            for j in 0..16 {
                q[j] = (b[2 + j] & 0x0f) as i16;
                q[j + 16] = (b[2 + j] >> 4) as i16;
            }
            Blk::new(q, d, -8.0 * d)
        }
        GgmlDType::Q4_1 => {
            let (d, m) = (rd16(b, 0), rd16(b, 2));
            for j in 0..16 {
                q[j] = (b[4 + j] & 0x0f) as i16;
                q[j + 16] = (b[4 + j] >> 4) as i16;
            }
            Blk::new(q, d, m)
        }
        GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
            let (d, m, qh_at) = if dtype == GgmlDType::Q5_0 {
                let d = rd16(b, 0);
                (d, -16.0 * d, 2)
            } else {
                (rd16(b, 0), rd16(b, 2), 4)
            };
            let qh = u32::from_le_bytes([b[qh_at], b[qh_at + 1], b[qh_at + 2], b[qh_at + 3]]);
            let qs = &b[qh_at + 4..qh_at + 20];
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) as i16;
                let h1 = ((qh >> (j + 16)) & 1) as i16;
                q[j] = (qs[j] & 0x0f) as i16 | (h0 << 4);
                q[j + 16] = (qs[j] >> 4) as i16 | (h1 << 4);
            }
            Blk::new(q, d, m)
        }
        GgmlDType::Q8_0 => {
            let d = rd16(b, 0);
            for j in 0..QK {
                q[j] = b[2 + j] as i8 as i16;
            }
            Blk::new(q, d, 0.0)
        }
        _ => Blk::new(q, 0.0, 0.0),
    }
}

/// Q4_K's 6-bit scale and minimum of sub-block j (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// One 256-value super-block of Q4_K (144 bytes: d, dmin, 12 bytes of
/// packed 6-bit scales and minima, 128 bytes of nibbles) as eight blocks.
/// d·sc and dmin·min are exact in f32 (11 + 6 significant bits).
fn decode_q4k(b: &[u8], out: &mut Vec<Blk>) {
    let (d, dmin) = (rd16(b, 0), rd16(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for chunk in 0..4 {
        let q = &qs[32 * chunk..32 * chunk + 32];
        for (half, shift) in [(0, 0), (1, 4)] {
            let (sc, mn) = scale_min_k4(2 * chunk + half, scales);
            let mut v = [0i16; QK];
            for (v, &q) in v.iter_mut().zip(q) {
                *v = ((q >> shift) & 0x0f) as i16;
            }
            out.push(Blk::new(v, d * sc as f32, -dmin * mn as f32));
        }
    }
}

/// One 256-value super-block of Q6_K (210 bytes: 128 bytes of low nibbles,
/// 64 of high 2-bit pairs, 16 signed 8-bit scales, d) as eight blocks of
/// unsigned 6-bit values with an offset of -32, one scale per 16 values.
fn decode_q6k(b: &[u8], out: &mut Vec<Blk>) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = rd16(b, 208);
    let mut vals = [0i16; 256];
    for n in 0..2 {
        let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
        let y = &mut vals[128 * n..];
        for l in 0..32 {
            y[l] = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i16;
            y[l + 32] = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i16;
            y[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i16;
            y[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i16;
        }
    }
    for blk in 0..8 {
        let mut q = [0i16; QK];
        q.copy_from_slice(&vals[QK * blk..QK * (blk + 1)]);
        let ds = [0, 1].map(|h| d * sc[2 * blk + h] as i8 as f32);
        out.push(Blk {
            q,
            d: ds,
            m: ds.map(|d| -32.0 * d),
        });
    }
}

/// How a ggml format is read and packed.
struct Format {
    /// Values and bytes per ggml block (32 for the simple formats, 256 for
    /// the K-quants' super-blocks).
    values: usize,
    bytes: usize,
    enc: Enc,
    /// Scales per 32-value block: 1, or 2 for Q6_K's 16-value sub-blocks.
    sub: usize,
}

fn format(dtype: GgmlDType) -> Option<Format> {
    let (values, bytes, enc, sub) = match dtype {
        GgmlDType::Q4_0 => (QK, 18, Enc::Nib { hb: 0 }, 1),
        GgmlDType::Q4_1 => (QK, 20, Enc::Nib { hb: 0 }, 1),
        GgmlDType::Q5_0 => (QK, 22, Enc::Nib { hb: 1 }, 1),
        GgmlDType::Q5_1 => (QK, 24, Enc::Nib { hb: 1 }, 1),
        GgmlDType::Q8_0 => (QK, 34, Enc::I8, 1),
        GgmlDType::Q4K => (256, 144, Enc::Nib { hb: 0 }, 1),
        GgmlDType::Q6K => (256, 210, Enc::Nib { hb: 2 }, 2),
        _ => return None,
    };
    Some(Format {
        values,
        bytes,
        enc,
        sub,
    })
}

/// One weight row (k values) as 32-value blocks.
fn decode_row(dtype: GgmlDType, f: &Format, row: &[u8], out: &mut Vec<Blk>) {
    out.clear();
    for b in row.chunks_exact(f.bytes) {
        match dtype {
            GgmlDType::Q4K => decode_q4k(b, out),
            GgmlDType::Q6K => decode_q6k(b, out),
            _ => out.push(decode_block(dtype, b)),
        }
    }
}

impl Packed {
    /// Repack ggml blocks (`raw`, n rows of k values) or None for other shapes/types.
    fn new(dtype: GgmlDType, raw: &[u8], n: usize, k: usize) -> Option<Self> {
        let f = format(dtype)?;
        if k == 0 || !k.is_multiple_of(f.values) || n == 0 {
            return None;
        }
        let row_bytes = k / f.values * f.bytes;
        if raw.len() != n * row_bytes {
            return None;
        }
        let (enc, sub) = (f.enc, f.sub);
        let nb = k / QK;
        let groups = n.div_ceil(LANES);
        let eb = enc.bytes();
        // Offsets that are a fixed multiple of the scale are derived in the
        // kernel rather than stored (less memory to stream per decode step).
        let m_of_d = match dtype {
            GgmlDType::Q4_0 => Some(-8.0),
            GgmlDType::Q5_0 => Some(-16.0),
            GgmlDType::Q6K => Some(-32.0),
            _ => None,
        };
        let stores_m = m_of_d.is_none() && dtype != GgmlDType::Q8_0;
        let mut qs = vec![0u8; groups * nb * eb];
        let mut d = vec![0f32; groups * nb * sub * LANES];
        let mut m = vec![0f32; if stores_m { d.len() } else { 0 }];
        let mut blocks = Vec::with_capacity(nb);
        for col in 0..n {
            let (g, c) = (col / LANES, col % LANES);
            decode_row(
                dtype,
                &f,
                &raw[col * row_bytes..(col + 1) * row_bytes],
                &mut blocks,
            );
            for (b, blk) in blocks.iter().enumerate() {
                let gb = g * nb + b;
                for h in 0..sub {
                    let at = (gb * sub + h) * LANES + c;
                    d[at] = blk.d[h];
                    if let Some(m) = m.get_mut(at) {
                        *m = blk.m[h];
                    }
                }
                let q = &blk.q;
                let dst = &mut qs[gb * eb..(gb + 1) * eb];
                // Register t (k-values 4t..4t+4) holds column c's 4 bytes at 4c.
                match enc {
                    Enc::Nib { hb } => {
                        // Nibble register h: low nibbles k-values of t = 2h,
                        // high nibbles t = 2h+1 (so h 0..2 cover the first 16
                        // values, h 2..4 the second: Q6_K's two scales).
                        for h in 0..4 {
                            for i in 0..4 {
                                let lo = q[4 * (2 * h) + i] as u8 & 0x0f;
                                let hi = q[4 * (2 * h + 1) + i] as u8 & 0x0f;
                                dst[h * 32 + 4 * c + i] = lo | (hi << 4);
                            }
                        }
                        // Bit planes: the high bits of t at bit hb·t of plane
                        // 0 (hb = 1: t 0..8), or of plane t/4 at 2(t%4) (hb = 2).
                        let per_plane = 8 / hb.max(1);
                        for t in 0..8 {
                            for i in 0..4 {
                                let high = (q[4 * t + i] as u8 >> 4) & ((1 << hb) - 1) as u8;
                                if hb > 0 {
                                    let plane = t / per_plane;
                                    let shift = hb * (t % per_plane);
                                    dst[128 + plane * 32 + 4 * c + i] |= high << shift;
                                }
                            }
                        }
                    }
                    Enc::I8 => {
                        for t in 0..8 {
                            for i in 0..4 {
                                dst[t * 32 + 4 * c + i] = q[4 * t + i] as i8 as u8;
                            }
                        }
                    }
                }
            }
        }
        let has_m = m_of_d.is_some() || m.iter().any(|&x| x != 0.0);
        Some(Self {
            enc,
            sub,
            n,
            n_pad: groups * LANES,
            k,
            nb,
            qs,
            d,
            m,
            m_of_d,
            has_m,
        })
    }
}

/// Activation rows quantized to int8 per 32-value block.
struct ActQ {
    /// [m][k]
    q: Vec<i8>,
    /// Block scale, [m][nb].
    d: Vec<f32>,
    /// Block scale times the sum of the block's int8 values, [m][nb].
    s: Vec<f32>,
    /// The same per half block of 16 values, [m][nb][2] (for Q6_K).
    s2: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ActQ, Enc, Packed, LANES, QK};
    use core::arch::x86_64::*;

    /// Quantize `x` (rows of k) to int8 blocks: d = max|x|/127, q = round(x/d).
    /// Per 32 values for every format, the K-quants included: ggml quantizes
    /// their activations per 256 (Q8_K), but the finer scale brings gemma3's
    /// and qwen2.5's reference NLL closer to llama.cpp's (docs/performance.md).
    pub(super) fn quantize(x: &[f32], rows: usize, k: usize) -> ActQ {
        let nb = k / QK;
        let mut out = ActQ {
            q: vec![0i8; rows * k],
            d: vec![0f32; rows * nb],
            s: vec![0f32; rows * nb],
            s2: vec![0f32; rows * nb * 2],
        };
        // SAFETY: avx2/fma were checked by the caller (`supported()`); all
        // indices stay inside the rows·k / rows·nb buffers allocated above.
        unsafe { quantize_avx2(x, rows * nb, &mut out) };
        out
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn quantize_avx2(x: &[f32], blocks: usize, out: &mut ActQ) {
        let sign = _mm256_set1_ps(-0.0);
        for blk in 0..blocks {
            // SAFETY: blk < blocks = x.len() / 32, so the 32 floats are in bounds.
            unsafe {
                let p = x.as_ptr().add(blk * QK);
                let v0 = _mm256_loadu_ps(p);
                let v1 = _mm256_loadu_ps(p.add(8));
                let v2 = _mm256_loadu_ps(p.add(16));
                let v3 = _mm256_loadu_ps(p.add(24));
                let mut mx = _mm256_andnot_ps(sign, v0);
                mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v1));
                mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v2));
                mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v3));
                let m4 = _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
                let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
                let amax = _mm_cvtss_f32(m4);
                let d = amax / 127.0;
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                let mul = _mm256_set1_ps(id);
                const R: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
                let i0 = _mm256_cvtps_epi32(_mm256_round_ps::<R>(_mm256_mul_ps(v0, mul)));
                let i1 = _mm256_cvtps_epi32(_mm256_round_ps::<R>(_mm256_mul_ps(v1, mul)));
                let i2 = _mm256_cvtps_epi32(_mm256_round_ps::<R>(_mm256_mul_ps(v2, mul)));
                let i3 = _mm256_cvtps_epi32(_mm256_round_ps::<R>(_mm256_mul_ps(v3, mul)));
                let hsum = |v: __m256i| -> i32 {
                    let s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
                    let s4 = _mm_hadd_epi32(s4, s4);
                    let s4 = _mm_hadd_epi32(s4, s4);
                    _mm_cvtsi128_si32(s4)
                };
                let lo = hsum(_mm256_add_epi32(i0, i1));
                let hi = hsum(_mm256_add_epi32(i2, i3));
                let isum = lo + hi;
                // packs interleave 128-bit lanes; the permute restores element order.
                let p01 = _mm256_packs_epi32(i0, i1);
                let p23 = _mm256_packs_epi32(i2, i3);
                let b = _mm256_packs_epi16(p01, p23);
                let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(out.q.as_mut_ptr().add(blk * QK) as *mut __m256i, b);
                *out.d.get_unchecked_mut(blk) = d;
                *out.s.get_unchecked_mut(blk) = d * isum as f32;
                *out.s2.get_unchecked_mut(2 * blk) = d * lo as f32;
                *out.s2.get_unchecked_mut(2 * blk + 1) = d * hi as f32;
            }
        }
    }

    /// The body of one tile: rows r0..r0+R of the activations against column
    /// groups g0..g0+G, written to dst[(r0+r)·n + 8(g0+g) ..]. `$dot` adds the
    /// int8 products of (u8 weights, i8 activations) into an i32x8 accumulator.
    macro_rules! tile_body {
        ($p:ident, $a:ident, $r0:ident, $g0:ident, $dst:ident, $R:expr, $G:expr, $dot:ident) => {{
            let p: &Packed = $p;
            let a: &ActQ = $a;
            let nb = p.nb;
            let k = p.k;
            let n = p.n_pad;
            let eb = p.enc.bytes();
            let mut acc = [[_mm256_setzero_ps(); $G]; $R];
            let low = _mm256_set1_epi8(0x0f);
            let bit4 = _mm256_set1_epi8(0x10);
            let bits45 = _mm256_set1_epi8(0x30);
            let mut ia = [[_mm256_setzero_si256(); $G]; $R];
            // Apply the scales of half h of block b (h = 0 for one scale per
            // block) to the integer sums and clear them.
            macro_rules! flush {
                ($b:expr, $h:expr) => {{
                    let (b, h) = ($b, $h);
                    for g in 0..$G {
                        let at = ((($g0 + g) * nb + b) * SUB + h) * LANES;
                        let dv = _mm256_loadu_ps(p.d.as_ptr().add(at));
                        // `m` is empty for formats without stored offsets: read
                        // only when the offset term applies.
                        let mv = if !p.has_m {
                            _mm256_setzero_ps()
                        } else if let Some(c) = p.m_of_d {
                            _mm256_mul_ps(dv, _mm256_set1_ps(c))
                        } else {
                            _mm256_loadu_ps(p.m.as_ptr().add(at))
                        };
                        for r in 0..$R {
                            let ab = ($r0 + r) * nb + b;
                            let sd = _mm256_mul_ps(dv, _mm256_set1_ps(*a.d.get_unchecked(ab)));
                            acc[r][g] = _mm256_fmadd_ps(sd, _mm256_cvtepi32_ps(ia[r][g]), acc[r][g]);
                            if p.has_m {
                                let sum = if SUB == 2 {
                                    *a.s2.get_unchecked(2 * ab + h)
                                } else {
                                    *a.s.get_unchecked(ab)
                                };
                                acc[r][g] = _mm256_fmadd_ps(mv, _mm256_set1_ps(sum), acc[r][g]);
                            }
                            ia[r][g] = _mm256_setzero_si256();
                        }
                    }
                }};
            }
            for b in 0..nb {
                let qa = |r: usize, t: usize| -> __m256i {
                    let at = ($r0 + r) * k + b * QK + 4 * t;
                    _mm256_set1_epi32(core::ptr::read_unaligned(a.q.as_ptr().add(at) as *const i32))
                };
                match p.enc {
                    Enc::Nib { .. } => {
                        for h in 0..4 {
                            if SUB == 2 && h == 2 {
                                flush!(b, 0);
                            }
                            let mut lo = [_mm256_setzero_si256(); $G];
                            let mut hi = [_mm256_setzero_si256(); $G];
                            for g in 0..$G {
                                let base = p.qs.as_ptr().add((($g0 + g) * nb + b) * eb);
                                let w = _mm256_loadu_si256(base.add(h * 32) as *const __m256i);
                                lo[g] = _mm256_and_si256(w, low);
                                hi[g] = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
                                // The high bits of t = 2h and 2h+1, moved to bit 4
                                // (16-bit shifts; the masks drop what crosses bytes).
                                if HB == 1 {
                                    let pl = _mm256_loadu_si256(base.add(128) as *const __m256i);
                                    let v = _mm256_srl_epi16(pl, _mm_cvtsi32_si128(2 * h as i32));
                                    lo[g] = _mm256_or_si256(
                                        lo[g],
                                        _mm256_and_si256(_mm256_slli_epi16(v, 4), bit4),
                                    );
                                    hi[g] = _mm256_or_si256(
                                        hi[g],
                                        _mm256_and_si256(_mm256_slli_epi16(v, 3), bit4),
                                    );
                                } else if HB == 2 {
                                    let pl = _mm256_loadu_si256(base.add(128 + h / 2 * 32) as *const __m256i);
                                    let v = _mm256_srl_epi16(pl, _mm_cvtsi32_si128(4 * (h % 2) as i32));
                                    lo[g] = _mm256_or_si256(
                                        lo[g],
                                        _mm256_and_si256(_mm256_slli_epi16(v, 4), bits45),
                                    );
                                    hi[g] = _mm256_or_si256(
                                        hi[g],
                                        _mm256_and_si256(_mm256_slli_epi16(v, 2), bits45),
                                    );
                                }
                            }
                            for r in 0..$R {
                                let x0 = qa(r, 2 * h);
                                let x1 = qa(r, 2 * h + 1);
                                for g in 0..$G {
                                    ia[r][g] = $dot(ia[r][g], lo[g], x0);
                                    ia[r][g] = $dot(ia[r][g], hi[g], x1);
                                }
                            }
                        }
                    }
                    Enc::I8 => {
                        for t in 0..8 {
                            // maddubs and vpdpbusd need unsigned weights: |w| times
                            // x with w's sign. (Adding 128 to w instead saturates
                            // maddubs, and on VNNI its correction term left results
                            // that differed from AVX2's in the last bits.)
                            let mut aw = [_mm256_setzero_si256(); $G];
                            let mut w = [_mm256_setzero_si256(); $G];
                            for g in 0..$G {
                                w[g] =
                                    _mm256_loadu_si256(p.qs.as_ptr().add((($g0 + g) * nb + b) * eb + t * 32)
                                        as *const __m256i);
                                aw[g] = _mm256_abs_epi8(w[g]);
                            }
                            for r in 0..$R {
                                let x = qa(r, t);
                                for g in 0..$G {
                                    ia[r][g] = $dot(ia[r][g], aw[g], _mm256_sign_epi8(x, w[g]));
                                }
                            }
                        }
                    }
                }
                flush!(b, SUB - 1);
            }
            for r in 0..$R {
                for g in 0..$G {
                    _mm256_storeu_ps($dst.add(($r0 + r) * n + ($g0 + g) * LANES), acc[r][g]);
                }
            }
        }};
    }

    #[inline(always)]
    unsafe fn dot_avx2(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: avx2 is checked at runtime before any kernel runs.
        unsafe {
            _mm256_add_epi32(
                acc,
                _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)),
            )
        }
    }

    #[inline(always)]
    unsafe fn dot_vnni(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: only reached from the avx512vnni/avx512vl functions below.
        unsafe { _mm256_dpbusd_epi32(acc, w, x) }
    }

    macro_rules! tile_fns {
        ($name:ident, $feat:literal, $dot:ident) => {
            /// Rows [r0, r0+rows) × groups [g0, g1) into dst (row stride n).
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name<const SUB: usize, const HB: usize>(
                p: &Packed,
                a: &ActQ,
                r0: usize,
                rows: usize,
                g0: usize,
                g1: usize,
                dst: *mut f32,
            ) {
                // SAFETY: the caller guarantees r0+rows ≤ m, g1 ≤ n/8 and that no
                // other thread writes the same dst elements.
                unsafe {
                    let mut r = r0;
                    let r_end = r0 + rows;
                    while r + 4 <= r_end {
                        let mut g = g0;
                        while g + 2 <= g1 {
                            tile_body!(p, a, r, g, dst, 4, 2, $dot);
                            g += 2;
                        }
                        if g < g1 {
                            tile_body!(p, a, r, g, dst, 4, 1, $dot);
                        }
                        r += 4;
                    }
                    while r < r_end {
                        let mut g = g0;
                        while g + 4 <= g1 {
                            tile_body!(p, a, r, g, dst, 1, 4, $dot);
                            g += 4;
                        }
                        while g < g1 {
                            tile_body!(p, a, r, g, dst, 1, 1, $dot);
                            g += 1;
                        }
                        r += 1;
                    }
                }
            }
        };
    }

    tile_fns!(tiles_avx2, "avx2,fma", dot_avx2);
    tile_fns!(
        tiles_vnni,
        "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni",
        dot_vnni
    );

    pub(super) fn has_vnni() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }

    pub(super) fn supported() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
}

/// The same quantization and tiles in portable Rust, for CPUs without AVX2
/// (and as the reference the SIMD variants are tested against). Every step
/// matches the x86 code: the same int8 rounding (ties to even), exact integer
/// sums, and the same float epilogue with a fused multiply-add that is exact
/// without an FMA unit (`cpu::fma_exact`), so the results are the same bits.
mod generic {
    use super::{ActQ, Enc, Packed, LANES, QK};
    use crate::inference::cpu;

    pub(super) fn quantize(x: &[f32], rows: usize, k: usize) -> ActQ {
        let nb = k / QK;
        let mut out = ActQ {
            q: vec![0i8; rows * k],
            d: vec![0f32; rows * nb],
            s: vec![0f32; rows * nb],
            s2: vec![0f32; rows * nb * 2],
        };
        for (blk, (xs, qs)) in x
            .chunks_exact(QK)
            .zip(out.q.chunks_exact_mut(QK))
            .take(rows * nb)
            .enumerate()
        {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mut sums = [0i32; 2];
            for (i, (&x, q)) in xs.iter().zip(qs.iter_mut()).enumerate() {
                // cvtps_epi32 of the rounded value, then saturating packs.
                let v = (x * id).round_ties_even() as i32;
                sums[i / 16] += v;
                *q = v.clamp(-128, 127) as i8;
            }
            out.d[blk] = d;
            out.s[blk] = d * (sums[0] + sums[1]) as f32;
            out.s2[2 * blk] = d * sums[0] as f32;
            out.s2[2 * blk + 1] = d * sums[1] as f32;
        }
        out
    }

    /// One block's weights for the 8 columns of group g in the register
    /// order of the packed layout: w[t][4c + i] is k-value 4t + i of column
    /// c, so every step is a loop over 32 contiguous bytes (vectorises).
    #[inline(always)]
    fn unpack(p: &Packed, g: usize, b: usize, w: &mut [[i16; 32]; 8]) {
        let eb = p.enc.bytes();
        let at = (g * p.nb + b) * eb;
        let base = &p.qs[at..at + eb];
        match p.enc {
            Enc::Nib { hb } => {
                for h in 0..4 {
                    let bytes = &base[h * 32..h * 32 + 32];
                    let (lo, hi) = w.split_at_mut(2 * h + 1);
                    for ((l, hh), &byte) in lo[2 * h].iter_mut().zip(hi[0].iter_mut()).zip(bytes) {
                        *l = (byte & 0x0f) as i16;
                        *hh = (byte >> 4) as i16;
                    }
                }
                // hb = 0: no bit planes. Else the high bits of t sit at bit
                // hb·t of plane 0 (hb = 1), or at 2(t%4) of plane t/4 (hb = 2).
                if let Some(per_plane) = 8usize.checked_div(hb) {
                    let mask = (1u8 << hb) - 1;
                    for (t, wt) in w.iter_mut().enumerate() {
                        let plane = &base[128 + t / per_plane * 32..128 + t / per_plane * 32 + 32];
                        let shift = hb * (t % per_plane);
                        for (v, &pl) in wt.iter_mut().zip(plane) {
                            *v |= (((pl >> shift) & mask) as i16) << 4;
                        }
                    }
                }
            }
            Enc::I8 => {
                for (t, wt) in w.iter_mut().enumerate() {
                    for (v, &byte) in wt.iter_mut().zip(&base[t * 32..t * 32 + 32]) {
                        *v = byte as i8 as i16;
                    }
                }
            }
        }
    }

    /// One row's activations of one block, each group of 4 k-values twice:
    /// x[t] = k-values 4t..4t+4, 4t..4t+4 (8 lanes of i16), the broadcast the
    /// x86 tiles do, matching 2 columns' bytes of the weight order above.
    #[inline(always)]
    fn spread(x: &[i8], out: &mut [[i16; 8]; 8]) {
        for (t, o) in out.iter_mut().enumerate() {
            for (j, v) in o.iter_mut().enumerate() {
                *v = x[4 * t + j % 4] as i16;
            }
        }
    }

    /// Integer sums of the 8 columns over k-values 4t0..4t1 of one block.
    /// On x86-64 with SSE2's pmaddwd, which every x86-64 CPU has (LLVM does
    /// not find it on its own here and leaves the loop scalar, 40× slower
    /// than the AVX2 tiles); exact either way.
    #[inline(always)]
    fn isums(w: &[[i16; 32]; 8], x: &[[i16; 8]; 8], t0: usize, t1: usize) -> [i32; LANES] {
        // lanes[q]: the pair of k-values (2q, 2q+1) mod 4 of column q/2.
        let mut lanes = [0i32; 16];
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::*;
            // SAFETY: SSE2 is part of the x86-64 baseline; every load and
            // store is unaligned and inside its array (w[t]: 4 × 8 i16,
            // x[t]: 8 i16, lanes: 4 × 4 i32).
            unsafe {
                let mut acc = [_mm_setzero_si128(); 4];
                for (wt, xt) in w.iter().zip(x).take(t1).skip(t0) {
                    let xv = _mm_loadu_si128(xt.as_ptr() as *const __m128i);
                    for (v, a) in acc.iter_mut().enumerate() {
                        let wv = _mm_loadu_si128(wt.as_ptr().add(8 * v) as *const __m128i);
                        *a = _mm_add_epi32(*a, _mm_madd_epi16(wv, xv));
                    }
                }
                for (v, a) in acc.iter().enumerate() {
                    _mm_storeu_si128(lanes.as_mut_ptr().add(4 * v) as *mut __m128i, *a);
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        for (wt, xt) in w.iter().zip(x).take(t1).skip(t0) {
            for (q, l) in lanes.iter_mut().enumerate() {
                let j = 2 * q;
                *l += wt[j] as i32 * xt[j % 8] as i32 + wt[j + 1] as i32 * xt[(j + 1) % 8] as i32;
            }
        }
        let mut out = [0i32; LANES];
        for (c, o) in out.iter_mut().enumerate() {
            *o = lanes[2 * c] + lanes[2 * c + 1];
        }
        out
    }

    /// Rows and column groups per pass: the spread activations of 16 rows
    /// and their 16 × 8 × 8 accumulators stay in L1 while each block of
    /// weights is unpacked once for all rows.
    const ROWS: usize = 16;
    const GROUPS: usize = 8;

    /// Rows [r0, r0+rows) × groups [g0, g1) into dst (row stride n_pad), the
    /// contract of the x86 tiles.
    ///
    /// # Safety
    /// r0+rows ≤ the activation rows, g1 ≤ n_pad/8, dst holds (r0+rows)·n_pad
    /// floats and no other thread writes the same elements.
    pub(super) unsafe fn tiles(
        p: &Packed,
        a: &ActQ,
        r0: usize,
        rows: usize,
        g0: usize,
        g1: usize,
        dst: *mut f32,
    ) {
        let (nb, k, n, sub) = (p.nb, p.k, p.n_pad, p.sub);
        let mut w = [[0i16; 32]; 8];
        let mut xs = [[[0i16; 8]; 8]; ROWS];
        let mut r = r0;
        while r < r0 + rows {
            let rn = ROWS.min(r0 + rows - r);
            let mut g = g0;
            while g < g1 {
                let gn = GROUPS.min(g1 - g);
                let mut acc = [[[0f32; LANES]; GROUPS]; ROWS];
                for b in 0..nb {
                    for (ri, x) in xs.iter_mut().enumerate().take(rn) {
                        let at = (r + ri) * k + b * QK;
                        spread(&a.q[at..at + QK], x);
                    }
                    for gi in 0..gn {
                        unpack(p, g + gi, b, &mut w);
                        for (ri, (acc, x)) in acc.iter_mut().zip(&xs).enumerate().take(rn) {
                            let acc = &mut acc[gi];
                            let ab = (r + ri) * nb + b;
                            // One integer sum per scale: the block, or its
                            // halves (k-values 0..16 are t 0..4).
                            for h in 0..sub {
                                let ia = isums(&w, x, h * 8 / sub, (h + 1) * 8 / sub);
                                let at = (((g + gi) * nb + b) * sub + h) * LANES;
                                let dv = &p.d[at..at + LANES];
                                let ad = a.d[ab];
                                let sd: [f32; LANES] = std::array::from_fn(|c| dv[c] * ad);
                                let fi: [f32; LANES] = ia.map(|i| i as f32);
                                cpu::fma_acc8(&sd, &fi, acc);
                                if p.has_m {
                                    let sum = if sub == 2 { a.s2[2 * ab + h] } else { a.s[ab] };
                                    let mv: [f32; LANES] = match p.m_of_d {
                                        Some(cst) => std::array::from_fn(|c| dv[c] * cst),
                                        None => std::array::from_fn(|c| p.m[at + c]),
                                    };
                                    cpu::fma_acc8(&mv, &[sum; LANES], acc);
                                }
                            }
                        }
                    }
                }
                for (ri, acc) in acc.iter().enumerate().take(rn) {
                    for (gi, acc) in acc.iter().enumerate().take(gn) {
                        // SAFETY: (r + ri, 8(g + gi)..+8) is inside dst and
                        // ours alone (the caller's contract).
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                acc.as_ptr(),
                                dst.add((r + ri) * n + (g + gi) * LANES),
                                LANES,
                            );
                        }
                    }
                }
                g += gn;
            }
            r += rn;
        }
    }
}

/// Which kernel variant runs (fixed per process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, the same bits as the others (CPUs without AVX2).
    Generic,
    Avx2,
    Vnni,
}

/// The best kernel variant this CPU runs, or None (use candle's kernels).
/// `SLM_SWARM_KERNELS=avx2` forces the AVX2 variant, `=generic` the portable
/// one (also on non-x86 CPUs, which otherwise use candle's), `=candle`
/// disables ours.
pub fn isa() -> Option<Isa> {
    use std::sync::OnceLock;
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        let force = cpu::forced();
        match force {
            "candle" => return None,
            "generic" => return Some(Isa::Generic),
            _ => {}
        }
        #[cfg(target_arch = "x86_64")]
        {
            if !x86::supported() {
                return Some(Isa::Generic);
            }
            if force != "avx2" && x86::has_vnni() {
                return Some(Isa::Vnni);
            }
            Some(Isa::Avx2)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    })
}

/// Every variant this CPU can run, the portable one first (for tests).
#[cfg(test)]
fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Generic];
    #[cfg(target_arch = "x86_64")]
    {
        if x86::supported() {
            v.push(Isa::Avx2);
        }
        if x86::supported() && x86::has_vnni() {
            v.push(Isa::Vnni);
        }
    }
    v
}

/// (m × k) · packedᵀ → (m × n), on candle's thread pool.
fn packed_matmul(p: &Packed, x: &[f32], m: usize, isa: Isa, dst: &mut [f32]) {
    packed_matmul_many(&mut [(p, dst)], x, m, isa);
}

/// Several (m × k) · packedᵀ products of the same input in one pool call: the
/// activations are quantized once and the threads meet at one barrier, not
/// one per matrix (q/k/v and gate/up of a layer; most of a decode step's
/// barriers were on the small k/v projections).
fn packed_matmul_many(jobs: &mut [(&Packed, &mut [f32])], x: &[f32], m: usize, isa: Isa) {
    let Some(k) = jobs.first().map(|(p, _)| p.k) else {
        return;
    };
    assert_eq!(x.len(), m * k, "lhs size");
    for (p, dst) in jobs.iter() {
        assert_eq!(p.k, k, "fused matmuls share their input");
        assert_eq!(dst.len(), m * p.n, "dst size");
    }
    if m == 0 {
        return;
    }
    // The tiles write whole groups of 8 columns; a ragged n goes through
    // scratch rows of n_pad and is compacted afterwards.
    let mut scratch: Vec<Vec<f32>> = jobs
        .iter()
        .map(|(p, _)| {
            if p.n_pad == p.n {
                Vec::new()
            } else {
                vec![0f32; m * p.n_pad]
            }
        })
        .collect();
    let outs: Vec<SharedOut> = jobs
        .iter_mut()
        .zip(scratch.iter_mut())
        .map(|((p, dst), s)| {
            SharedOut(if p.n_pad == p.n {
                dst.as_mut_ptr()
            } else {
                s.as_mut_ptr()
            })
        })
        .collect();
    let a = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Vnni => x86::quantize(x, m, k),
        _ => generic::quantize(x, m, k),
    };
    // Work items: (matrix, row panel, column chunk). Panels of 16 rows keep
    // the quantized rows in L1 while a chunk of weights streams past them.
    const PANEL: usize = 16;
    let chunk = if m == 1 { 4 } else { 8 };
    let panels = m.div_ceil(PANEL);
    // First item of each matrix, and the total.
    let mut first = Vec::with_capacity(jobs.len() + 1);
    first.push(0);
    for (p, _) in jobs.iter() {
        let n_chunks = (p.n_pad / LANES).div_ceil(chunk);
        first.push(first[first.len() - 1] + panels * n_chunks);
    }
    let items = first[jobs.len()];
    let packs: Vec<&Packed> = jobs.iter().map(|(p, _)| *p).collect();
    let run = |item: usize| {
        let j = first.partition_point(|&f| f <= item) - 1;
        let p = packs[j];
        let groups = p.n_pad / LANES;
        let n_chunks = groups.div_ceil(chunk);
        let local = item - first[j];
        let (pi, ci) = (local / n_chunks, local % n_chunks);
        let r0 = pi * PANEL;
        let rows = PANEL.min(m - r0);
        let g0 = ci * chunk;
        let g1 = groups.min(g0 + chunk);
        let ptr = outs[j].get();
        // SAFETY: items cover disjoint (matrix, row, column-group) ranges of
        // the outputs, each holding m·n_pad floats and outliving the pool
        // call; a SIMD ISA is only chosen when detected at runtime (`isa()`,
        // `isas()`), and `Isa::Vnni` only when every feature tiles_vnni
        // enables is present.
        unsafe {
            // One instantiation per (scales per block, high-bit planes), so
            // each format's inner loop has no per-step branches. Only
            // Q6_K has two scales per block, and it has two bit planes.
            match (isa, p.sub, p.enc) {
                #[cfg(target_arch = "x86_64")]
                (Isa::Vnni, 2, _) => x86::tiles_vnni::<2, 2>(p, &a, r0, rows, g0, g1, ptr),
                #[cfg(target_arch = "x86_64")]
                (Isa::Vnni, _, Enc::Nib { hb: 1 }) => x86::tiles_vnni::<1, 1>(p, &a, r0, rows, g0, g1, ptr),
                #[cfg(target_arch = "x86_64")]
                (Isa::Vnni, _, _) => x86::tiles_vnni::<1, 0>(p, &a, r0, rows, g0, g1, ptr),
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2, 2, _) => x86::tiles_avx2::<2, 2>(p, &a, r0, rows, g0, g1, ptr),
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2, _, Enc::Nib { hb: 1 }) => x86::tiles_avx2::<1, 1>(p, &a, r0, rows, g0, g1, ptr),
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2, _, _) => x86::tiles_avx2::<1, 0>(p, &a, r0, rows, g0, g1, ptr),
                _ => generic::tiles(p, &a, r0, rows, g0, g1, ptr),
            }
        }
    };
    cpu::par_chunked(items, |range| {
        for item in range {
            run(item)
        }
    });
    for ((p, dst), s) in jobs.iter_mut().zip(&scratch) {
        if p.n_pad != p.n {
            for (d, s) in dst.chunks_exact_mut(p.n).zip(s.chunks_exact(p.n_pad)) {
                d.copy_from_slice(&s[..p.n]);
            }
        }
    }
}

/// The output pointer handed to the pool's threads; each writes a disjoint
/// part of the buffer (see `packed_matmul`).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: the pointer is only dereferenced for disjoint ranges while the
// buffer it points into is borrowed mutably by `packed_matmul`.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// A method rather than field access so closures capture the Sync
    /// wrapper, not the raw pointer field (edition 2021 disjoint captures).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// A linear layer y = x·Wᵀ over quantized weights: our packed kernels where
/// the format and CPU allow, candle's `QMatMul` otherwise.
pub struct QLinear {
    n: usize,
    k: usize,
    imp: Imp,
}

enum Imp {
    Candle(QMatMul),
    Packed(Packed, Isa),
}

impl QLinear {
    pub fn new(w: Arc<QTensor>) -> candle_core::Result<Self> {
        let (n, k) = w.shape().dims2()?;
        if let Some(isa) = isa() {
            if matches!(w.device(), Device::Cpu) {
                let raw = w.data()?;
                if let Some(p) = Packed::new(w.dtype(), &raw, n, k) {
                    return Ok(Self {
                        n,
                        k,
                        imp: Imp::Packed(p, isa),
                    });
                }
            }
        }
        Ok(Self {
            n,
            k,
            imp: Imp::Candle(QMatMul::from_arc(w)?),
        })
    }

    /// Whether our kernels (not candle's) run this layer.
    pub fn is_packed(&self) -> bool {
        matches!(self.imp, Imp::Packed(..))
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// x (…, k) → (…, n).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.imp {
            Imp::Candle(q) => q.forward(x),
            Imp::Packed(..) => {
                let dims = x.dims();
                let Some((&last, lead)) = dims.split_last() else {
                    candle_core::bail!("qlinear input has no dimensions")
                };
                if last != self.k {
                    candle_core::bail!("qlinear expects {} inputs, got shape {:?}", self.k, dims);
                }
                let m: usize = lead.iter().product();
                let xs = x
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()?;
                let out = self.forward_rows(&xs, m)?;
                let mut shape = lead.to_vec();
                shape.push(self.n);
                Tensor::from_vec(out, shape, x.device())
            }
        }
    }

    /// Several layers over the same input rows (q/k/v, gate/up): one pass
    /// through the thread pool when all run on our kernels, else one each.
    pub fn forward_rows_many(layers: &[&QLinear], x: &[f32], m: usize) -> candle_core::Result<Vec<Vec<f32>>> {
        let isa = match layers.first().map(|l| &l.imp) {
            Some(Imp::Packed(_, isa)) => *isa,
            _ => return layers.iter().map(|l| l.forward_rows(x, m)).collect(),
        };
        let mut packs = Vec::with_capacity(layers.len());
        for l in layers {
            match &l.imp {
                Imp::Packed(p, i) if *i == isa && p.k == l.k => packs.push(p),
                _ => return layers.iter().map(|l| l.forward_rows(x, m)).collect(),
            }
            if x.len() != m * l.k {
                candle_core::bail!("qlinear expects {}x{} inputs, got {}", m, l.k, x.len());
            }
        }
        let mut outs: Vec<Vec<f32>> = layers.iter().map(|l| vec![0f32; m * l.n]).collect();
        let mut jobs: Vec<(&Packed, &mut [f32])> = packs
            .iter()
            .zip(outs.iter_mut())
            .map(|(p, o)| (*p, o.as_mut_slice()))
            .collect();
        packed_matmul_many(&mut jobs, x, m, isa);
        Ok(outs)
    }

    /// `m` rows of k inputs (row-major) → m rows of n outputs.
    pub fn forward_rows(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        if x.len() != m * self.k {
            candle_core::bail!("qlinear expects {}x{} inputs, got {}", m, self.k, x.len());
        }
        match &self.imp {
            Imp::Candle(q) => {
                let t = Tensor::from_slice(x, (m, self.k), &Device::Cpu)?;
                q.forward(&t)?.flatten_all()?.to_vec1::<f32>()
            }
            Imp::Packed(p, isa) => {
                let mut out = vec![0f32; m * self.n];
                packed_matmul(p, x, m, *isa, &mut out);
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// Deterministic pseudo-random floats in [-1, 1) (xorshift), with a few
    /// larger outliers so that block scales vary.
    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let v = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                if i % 97 == 0 {
                    v * 6.0
                } else {
                    v
                }
            })
            .collect()
    }

    /// Our kernel vs candle's QMatMul on the same quantized weights; returns the
    /// max abs difference relative to the output scale.
    fn compare(dtype: GgmlDType, m: usize, k: usize, n: usize, isa: Isa) -> f32 {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(rand_vec(n * k, 7 + n as u64), (n, k), &dev).expect("w");
        let q = Arc::new(QTensor::quantize(&w, dtype).expect("quantize"));
        let x = Tensor::from_vec(rand_vec(m * k, 11 + m as u64), (m, k), &dev).expect("x");
        let reference = QMatMul::from_arc(q.clone())
            .expect("qmm")
            .forward(&x)
            .expect("ref");
        let p = Packed::new(dtype, &q.data().expect("data"), n, k).expect("packable");
        let xs = x.flatten_all().expect("flat").to_vec1::<f32>().expect("vec");
        let mut out = vec![0f32; m * n];
        packed_matmul(&p, &xs, m, isa, &mut out);
        let want = reference
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        // Exact f32 reference on dequantized weights too: both should be close to it.
        let deq = q.dequantize(&dev).expect("deq");
        let exact = x
            .matmul(&deq.t().expect("t"))
            .expect("mm")
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        let scale = exact.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-6);
        let ours_err = out
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
            / scale;
        let candle_err = want
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
            / scale;
        let vs_candle = out
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
            / scale;
        // Activation int8 rounding is the only error source: ours must be no
        // worse than candle's own (which also quantizes activations).
        assert!(
            ours_err <= candle_err * 1.5 + 1e-4,
            "{dtype:?} m={m} k={k} n={n} {isa:?}: ours {ours_err} vs candle {candle_err}"
        );
        vs_candle
    }

    /// The formats of one scale (and offset) per 32 values.
    const BLOCK_FORMATS: [GgmlDType; 5] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ];

    #[test]
    fn packed_matches_candle_for_every_format_and_shape() {
        for isa in isas() {
            for dtype in BLOCK_FORMATS {
                // m covers decode, the 4-row tiles and their remainders and
                // more than one 16-row panel; n the 2-group tiles, an odd
                // group count and n not a multiple of 8.
                for (m, k, n) in [
                    (1, 64, 8),
                    (1, 576, 200),
                    (3, 96, 24),
                    (5, 640, 64),
                    (17, 896, 136),
                    (36, 256, 40),
                    // A single block per row, and column counts that leave a
                    // ragged last group (padded in the packed layout).
                    (1, 32, 8),
                    (2, 32, 13),
                    (5, 32, 3),
                    (4, 160, 21),
                    (1, 64, 1),
                ] {
                    let d = compare(dtype, m, k, n, isa);
                    assert!(d < 0.02, "{dtype:?} m={m} k={k} n={n} {isa:?}: {d} off candle");
                }
            }
        }
    }

    #[test]
    fn packed_matches_candle_for_the_k_quants() {
        for isa in isas() {
            for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
                // k in whole 256-value super-blocks.
                for (m, k, n) in [
                    (1, 256, 8),
                    (1, 512, 200),
                    (3, 256, 24),
                    (5, 768, 64),
                    (17, 512, 13),
                ] {
                    // Candle quantizes activations per 256 values (Q8_K), we per
                    // 32, so the two differ more than for the 32-value formats;
                    // `compare` also checks ours is closer to the exact product.
                    let d = compare(dtype, m, k, n, isa);
                    assert!(d < 0.04, "{dtype:?} m={m} k={k} n={n} {isa:?}: {d} off candle");
                }
            }
        }
    }

    /// The integer sums are exact on every variant and the float epilogue is
    /// the same arithmetic (the portable one emulates the FMA exactly), so a
    /// model gives the same outputs on every x86 CPU we run on (no AVX2,
    /// AVX2 or VNNI), bit for bit, not merely close: a rounding difference in
    /// one activation flips later int8 roundings and can move a near-tie
    /// answer (docs/performance.md). On a CPU without AVX2 only the portable
    /// variant runs; it is still checked against candle above.
    #[test]
    fn every_isa_gives_the_same_bits() {
        let isas = isas();
        let dev = Device::Cpu;
        for dtype in BLOCK_FORMATS.into_iter().chain([GgmlDType::Q4K, GgmlDType::Q6K]) {
            for (m, k, n) in [(1, 512, 72), (6, 768, 40), (17, 256, 13)] {
                let w = Tensor::from_vec(rand_vec(n * k, 50 + n as u64), (n, k), &dev).expect("w");
                let q = QTensor::quantize(&w, dtype).expect("quantize");
                let p = Packed::new(dtype, &q.data().expect("data"), n, k).expect("packable");
                let x = rand_vec(m * k, 60 + m as u64);
                let outs: Vec<Vec<f32>> = isas
                    .iter()
                    .map(|&isa| {
                        let mut out = vec![0f32; m * n];
                        packed_matmul(&p, &x, m, isa, &mut out);
                        out
                    })
                    .collect();
                for (isa, o) in isas.iter().zip(&outs) {
                    let same = o.iter().zip(&outs[0]).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{dtype:?} m={m} k={k} n={n}: {isa:?} differs from Generic");
                }
            }
        }
    }

    #[test]
    fn fused_layers_equal_one_call_each() {
        let dev = Device::Cpu;
        // Mixed formats and a ragged column count, as q/k/v of a Q4_K_M file.
        let k = 512;
        let specs = [
            (GgmlDType::Q5_0, 64usize),
            (GgmlDType::Q8_0, 13),
            (GgmlDType::Q6K, 40),
        ];
        let layers: Vec<QLinear> = specs
            .iter()
            .enumerate()
            .map(|(i, &(dtype, n))| {
                let w = Tensor::from_vec(rand_vec(n * k, 30 + i as u64), (n, k), &dev).expect("w");
                QLinear::new(Arc::new(QTensor::quantize(&w, dtype).expect("q"))).expect("lin")
            })
            .collect();
        for m in [1, 5, 20] {
            let x = rand_vec(m * k, 40 + m as u64);
            let refs: Vec<&QLinear> = layers.iter().collect();
            let fused = QLinear::forward_rows_many(&refs, &x, m).expect("fused");
            for (l, got) in layers.iter().zip(&fused) {
                assert_eq!(got, &l.forward_rows(&x, m).expect("one"), "m={m}");
            }
        }
    }

    #[test]
    fn k_quant_blocks_decode_to_candles_dequantization() {
        let dev = Device::Cpu;
        let (n, k) = (3, 512);
        let w = Tensor::from_vec(rand_vec(n * k, 21), (n, k), &dev).expect("w");
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let q = QTensor::quantize(&w, dtype).expect("quantize");
            let want = q
                .dequantize(&dev)
                .expect("deq")
                .flatten_all()
                .expect("flat")
                .to_vec1::<f32>()
                .expect("vec");
            let f = format(dtype).expect("format");
            let raw = q.data().expect("data");
            let row_bytes = raw.len() / n;
            let mut blocks = Vec::new();
            for r in 0..n {
                decode_row(dtype, &f, &raw[r * row_bytes..(r + 1) * row_bytes], &mut blocks);
                assert_eq!(blocks.len(), k / QK);
                for (b, blk) in blocks.iter().enumerate() {
                    for i in 0..QK {
                        let h = i / 16;
                        let got = blk.d[h] * blk.q[i] as f32 + blk.m[h];
                        let exp = want[r * k + b * QK + i];
                        assert!(
                            (got - exp).abs() <= 1e-6 * exp.abs().max(1.0),
                            "{dtype:?} {r} {b} {i}: {got} vs {exp}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn qlinear_keeps_leading_dims_and_falls_back_for_kquants() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(rand_vec(64 * 256, 3), (64, 256), &dev).expect("w");
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_1).expect("q"));
        let lin = QLinear::new(q.clone()).expect("lin");
        assert_eq!(lin.is_packed(), isa().is_some());
        let x = Tensor::from_vec(rand_vec(2 * 3 * 256, 5), (2, 3, 256), &dev).expect("x");
        let y = lin.forward(&x).expect("fwd");
        assert_eq!(y.dims(), &[2, 3, 64]);
        let r = QMatMul::from_arc(q).expect("qmm").forward(&x).expect("ref");
        let diff = (y - r).expect("sub").abs().expect("abs").max_all().expect("max");
        assert!(
            diff.to_dtype(DType::F32)
                .expect("f32")
                .to_scalar::<f32>()
                .expect("s")
                < 0.05
        );
        let k = Arc::new(QTensor::quantize(&w, GgmlDType::Q5K).expect("q5k"));
        assert!(!QLinear::new(k).expect("lin").is_packed());
    }

    /// CI also runs these tests under `qemu-x86_64 -cpu Westmere` (no AVX)
    /// with `SLM_SWARM_EXPECT_ISA=generic`: this makes sure the emulated CPU
    /// really hid AVX2, so that run tested the portable code.
    #[test]
    fn the_detected_variant_is_the_expected_one() {
        let want = match std::env::var("SLM_SWARM_EXPECT_ISA").as_deref() {
            Ok("generic") => (Some(Isa::Generic), cpu::Level::Generic),
            Ok("avx2") => (Some(Isa::Avx2), cpu::Level::Avx2),
            Ok("vnni") => (Some(Isa::Vnni), cpu::Level::Avx2),
            _ => return,
        };
        assert_eq!((isa(), cpu::level()), want);
        assert_eq!(isas().last().copied(), want.0);
    }

    #[test]
    fn f16_conversion_equals_half_for_every_value() {
        for h in 0..=u16::MAX {
            let (got, want) = (f16_to_f32(h), half::f16::from_bits(h).to_f32());
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn f16_conversion_matches_known_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }
}
