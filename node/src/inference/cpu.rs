//! What this CPU runs, decided once per process at run time: the binary is
//! built for baseline x86-64 (no global `target-feature` flags, so it starts
//! on any x86-64 CPU), and the hot code keeps AVX2+FMA variants that are
//! chosen here with `is_x86_feature_detected!`.
//!
//! The generic variants compute the same bits as the SIMD ones: they use the
//! same operation order, and where the SIMD code fuses a multiply-add the
//! generic code uses [`fma_exact`], a correctly rounded fused multiply-add
//! that needs no FMA unit. A node without AVX2 therefore answers exactly like
//! one with it, only slower.
//!
//! `SLM_SWARM_KERNELS=generic` forces the generic variants everywhere (ops and
//! matmuls), to test or compare them on a machine that has AVX2.
//!
//! Also the one way our kernels spread work over the cores ([`par_chunked`]).

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock, PoisonError};

/// The SIMD level of the vector ops (`ops.rs`); the matmul kernels choose
/// among more variants (`kernels::isa`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Portable code for the baseline target (SSE2 on x86-64).
    Generic,
    /// x86-64 with AVX2 and FMA.
    Avx2,
}

/// The `SLM_SWARM_KERNELS` override, read once.
pub(crate) fn forced() -> &'static str {
    static FORCED: OnceLock<String> = OnceLock::new();
    FORCED.get_or_init(|| std::env::var("SLM_SWARM_KERNELS").unwrap_or_default())
}

/// Whether this CPU has AVX2 and FMA (never on other architectures).
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The level the ops run at in this process.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        if forced() != "generic" && has_avx2_fma() {
            Level::Avx2
        } else {
            Level::Generic
        }
    })
}

/// Levels this CPU can run, the generic one first (tests compare them).
pub fn levels() -> Vec<Level> {
    let mut v = vec![Level::Generic];
    if has_avx2_fma() {
        v.push(Level::Avx2);
    }
    v
}

/// How generic code computes a fused multiply-add: `f32::mul_add` where the
/// target has an FMA instruction, else [`fma_exact`]. (`mul_add` without an
/// FMA instruction calls libm's `fmaf`, which is exact but switches rounding
/// modes on every call: several times slower than the emulation below.)
pub trait Fma {
    fn fma(a: f32, b: f32, c: f32) -> f32;
}

/// The hardware instruction: only inside functions compiled with `fma`
/// enabled (`#[target_feature]`), or on targets that always have it.
pub struct HwFma;

impl Fma for HwFma {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// Whatever is exact and fastest for the build's baseline target.
pub struct PortableFma;

impl Fma for PortableFma {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        if cfg!(any(target_feature = "fma", target_arch = "aarch64")) {
            a.mul_add(b, c)
        } else {
            fma_exact(a, b, c)
        }
    }
}

/// a·b + c rounded once, as an FMA instruction computes it, from f64
/// arithmetic: the product of two f32 is exact in f64 (48 significant bits),
/// the sum is rounded to odd (round to nearest, then, if inexact and even,
/// one step towards the exact value, found by TwoSum), and rounding that to
/// f32 is then correct because f64 carries more than 24 + 2 bits (Boldo and
/// Melquiond, "Emulation of FMA and correctly rounded sums", 2008). Plain
/// f64 rounding twice would be wrong in rare ties. Branch-free apart from
/// selects, so loops over it still vectorise.
#[inline(always)]
pub fn fma_exact(a: f32, b: f32, c: f32) -> f32 {
    let p = a as f64 * b as f64;
    let c = c as f64;
    let s = p + c;
    // TwoSum (Knuth): e is exactly (p + c) - s.
    let bc = s - p;
    let e = (p - (s - bc)) + (c - bc);
    let bits = s.to_bits();
    // Inexact and even: move one ulp towards the exact value (away from zero
    // when e has s's sign). s is never 0 here: a sum that rounds to 0 is exact.
    let step = if e != 0.0 && bits & 1 == 0 && s.is_finite() {
        if (e > 0.0) == (s > 0.0) {
            1i64
        } else {
            -1
        }
    } else {
        0
    };
    f64::from_bits(bits.wrapping_add_signed(step)) as f32
}

/// acc[i] ← a[i]·b[i] + acc[i], each rounded once, for 8 lanes: the
/// portable kernels' epilogue, in a form that vectorises. On targets with an
/// FMA instruction that is `mul_add`. Without one, the f64 sum rounded to
/// f32 is already the correctly rounded result unless the f64 sum is an f32
/// midpoint (a double rounding can only go wrong there: the exact sum and its
/// f64 rounding lie on the same side of every midpoint otherwise) or outside
/// f32's normal range; only then, almost never, the lanes go through
/// [`fma_exact`]. This costs a third of what `fma_exact` on every lane does.
#[inline(always)]
pub fn fma_acc8(a: &[f32; 8], b: &[f32; 8], acc: &mut [f32; 8]) {
    if cfg!(any(target_feature = "fma", target_arch = "aarch64")) {
        for ((o, &a), &b) in acc.iter_mut().zip(a).zip(b) {
            *o = a.mul_add(b, *o);
        }
        return;
    }
    // f32's smallest normal (2^-126) and 2^128, as f64 bit patterns.
    const MIN_NORMAL: u64 = 897 << 52;
    const TOO_BIG: u64 = 1151 << 52;
    let mut s = [0f64; 8];
    let mut hard = false;
    for (((s, &a), &b), &c) in s.iter_mut().zip(a).zip(b).zip(acc.iter()) {
        // The product is exact in f64 (24 + 24 bits); one rounding here.
        *s = a as f64 * b as f64 + c as f64;
        let mag = s.to_bits() & !(1 << 63);
        let midpoint = mag & 0x1fff_ffff == 0x1000_0000;
        hard |= midpoint || (mag != 0 && mag < MIN_NORMAL) || mag >= TOO_BIG;
    }
    if hard {
        for ((o, &a), &b) in acc.iter_mut().zip(a).zip(b) {
            *o = fma_exact(a, b, *o);
        }
    } else {
        for (o, s) in acc.iter_mut().zip(s) {
            *o = s as f32;
        }
    }
}

/// `f` over 0..n in chunks on candle's persistent barrier pool (the calling
/// thread takes part). A panic in `f` is caught on the thread where it
/// happens and resumed here once the pool call has returned: unwinding
/// through the pool poisons its internal lock, after which every pool call
/// of every model in the process panics too. This way a panic stays one
/// request's failure (the model worker catches it).
pub fn par_chunked<F: Fn(std::ops::Range<usize>) + Sync>(n: usize, f: F) {
    let panicked: Mutex<Option<Box<dyn Any + Send>>> = Mutex::new(None);
    candle_core::utils::barrier_pool().execute_chunked(n, |range| {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(range))) {
            let mut slot = panicked.lock().unwrap_or_else(PoisonError::into_inner);
            slot.get_or_insert(p);
        }
    });
    if let Some(p) = panicked.into_inner().unwrap_or_else(PoisonError::into_inner) {
        resume_unwind(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f32 values that stress the rounding: random significands over a wide
    /// exponent range, both signs, zeros, subnormals and near-ties.
    fn samples(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut v: Vec<f32> = (0..n)
            .map(|_| {
                let r = next();
                // Sign, exponent in [-40, 40], 24-bit significand.
                let mant = (r & 0x7f_ffff) as u32 | 0x80_0000;
                let exp = ((r >> 23) % 81) as i32 - 40;
                let x = mant as f32 * 2f32.powi(exp - 23);
                if r >> 63 == 1 {
                    -x
                } else {
                    x
                }
            })
            .collect();
        v.extend([
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::MIN_POSITIVE,
            1e-40,
            -1e-45,
            0.5,
            1.0 + f32::EPSILON,
        ]);
        v
    }

    #[test]
    fn emulated_fma_equals_a_single_rounding() {
        // f32::mul_add is the correctly rounded fma on every target (an
        // instruction or libm's exact fmaf), so it is the reference.
        let xs = samples(4000, 0x9e37_79b9_7f4a_7c15);
        let mut checked = 0usize;
        for (i, &a) in xs.iter().enumerate() {
            let b = xs[(i * 7 + 3) % xs.len()];
            for &c in xs.iter().skip(i % 13).step_by(97) {
                let (want, got) = (a.mul_add(b, c), fma_exact(a, b, c));
                assert!(
                    want.to_bits() == got.to_bits() || (want == 0.0 && got == 0.0),
                    "fma({a:e}, {b:e}, {c:e}) = {want:e}, emulated {got:e}"
                );
                checked += 1;
            }
        }
        assert!(checked > 100_000);
    }

    /// The case that needs the round-to-odd step: the exact result lies just
    /// below an f32 tie, by less than an f64 ulp, so rounding the f64 sum to
    /// nearest lands on the tie and the second rounding goes the wrong way.
    #[test]
    fn emulated_fma_avoids_double_rounding() {
        // a·b = 2^-24 - 2^-70; c = 1 + 2^-23 (odd). The exact sum is just
        // below the tie 1 + 3·2^-24, so the answer is c; rounded to f64 first
        // it becomes the tie itself, which then rounds to even, 1 + 2^-22.
        let a = 1.0f32 + 2f32.powi(-23);
        let b = 2f32.powi(-24) * (1.0 - 2f32.powi(-23));
        let c = 1.0f32 + 2f32.powi(-23);
        let naive = (a as f64 * b as f64 + c as f64) as f32;
        assert_eq!(a.mul_add(b, c), c);
        assert_ne!(naive, c, "the case must defeat plain double rounding");
        assert_eq!(fma_exact(a, b, c), c);
        // The same mirrored, and just above a tie.
        assert_eq!(fma_exact(-a, b, -c), -c);
        assert_eq!(
            fma_exact(a, -b, c + 2f32.powi(-22)).to_bits(),
            a.mul_add(-b, c + 2f32.powi(-22)).to_bits()
        );
    }

    /// The vectorised epilogue against the reference, on random lanes and on
    /// the cases that take its slow path (a midpoint, subnormal results).
    #[test]
    fn fma_lanes_equal_a_single_rounding() {
        let xs = samples(4096, 0x2545_f491_4f6c_dd1d);
        let check = |a: [f32; 8], b: [f32; 8], c: [f32; 8]| {
            let mut got = c;
            fma_acc8(&a, &b, &mut got);
            for i in 0..8 {
                let want = a[i].mul_add(b[i], c[i]);
                assert!(
                    want.to_bits() == got[i].to_bits() || (want == 0.0 && got[i] == 0.0),
                    "lane {i}: fma({:e}, {:e}, {:e}) = {want:e}, got {:e}",
                    a[i],
                    b[i],
                    c[i],
                    got[i]
                );
            }
        };
        let lane = |o: usize| -> [f32; 8] { std::array::from_fn(|i| xs[(o + 37 * i) % xs.len()]) };
        for o in 0..3000 {
            check(lane(o), lane(o * 7 + 1), lane(o * 13 + 2));
        }
        // The double-rounding case in one lane among ordinary ones.
        let (mut a, mut b, mut c) = (lane(5), lane(6), lane(7));
        a[3] = 1.0 + 2f32.powi(-23);
        b[3] = 2f32.powi(-24) * (1.0 - 2f32.powi(-23));
        c[3] = 1.0 + 2f32.powi(-23);
        check(a, b, c);
        // Subnormal results.
        check([1e-20; 8], [1e-20; 8], [3e-39; 8]);
    }

    #[test]
    fn a_panic_in_the_pool_reaches_the_caller_and_leaves_the_pool_usable() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let r = catch_unwind(|| {
            par_chunked(64, |range| {
                if range.contains(&37) {
                    panic!("item 37");
                }
            })
        });
        let msg = r
            .err()
            .and_then(|p| p.downcast_ref::<&str>().map(|s| s.to_string()));
        assert_eq!(msg.as_deref(), Some("item 37"));
        // Every later call still runs (an unwinding pool call would have
        // poisoned the pool's lock and made this one panic).
        let sum = AtomicUsize::new(0);
        par_chunked(1000, |range| {
            sum.fetch_add(range.sum::<usize>(), Ordering::Relaxed);
        });
        assert_eq!(sum.into_inner(), 999 * 1000 / 2);
    }

    #[test]
    fn generic_level_is_always_available() {
        assert_eq!(levels()[0], Level::Generic);
        assert!(levels().contains(&level()));
    }
}
