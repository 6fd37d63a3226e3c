//! Offline calibration from per-model answer caches: AUROC of each confidence
//! signal, Platt scaling, and a simulation of the local → vote → cloud routing
//! policy over a threshold grid (the accuracy-vs-cloud-share curve).
//!
//! The parts: `caches` (reading per-model and live answer caches), `stats`
//! (AUROC, Platt scaling, log loss) and `policy` (the routing simulation, the
//! threshold sweep and the choice of thresholds); the fit/test split is here.

mod caches;
mod policy;
mod stats;

pub use caches::{live_point, load_cache, load_live, LiveAnswer, LivePoint, ModelCache, Obs};
pub use policy::{choose, grid, pareto, simulate, sweep, vote, Point, SimQuestion, Target, VoteOutcome};
pub use stats::{auroc, log_loss, Platt};

/// The raw confidence signals a cache may carry (the node calibrates one per model).
pub use crate::config::Signal;

/// Deterministic half split of question ids: FNV-1a of seed and id (stable across
/// Rust versions, unlike the std hasher). `true` = fit half.
pub fn in_fit_half(qid: &str, seed: u64) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(qid.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Mix the high bits down: FNV's low bit alone is weak.
    (h ^ (h >> 29) ^ (h >> 47)) & 1 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_and_roughly_half() {
        let ids: Vec<String> = (0..1000).map(|i| format!("q{i}")).collect();
        let fit = ids.iter().filter(|i| in_fit_half(i, 1)).count();
        assert!((400..600).contains(&fit), "{fit}");
        assert!(ids.iter().all(|i| in_fit_half(i, 1) == in_fit_half(i, 1)));
        let other = ids
            .iter()
            .filter(|i| in_fit_half(i, 1) != in_fit_half(i, 2))
            .count();
        assert!(other > 300, "seeds give different splits: {other}");
    }
}
