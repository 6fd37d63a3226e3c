//! Statistics of one confidence signal against correctness: AUROC, Platt
//! scaling (the `[routing.models]` parameters) and log loss.

use serde::Serialize;

/// Area under the ROC curve of `score` for `label` (rank-based, ties count half).
/// `None` when one class is empty.
pub fn auroc(score: &[f64], label: &[bool]) -> Option<f64> {
    let n = score.len().min(label.len());
    let pos = label[..n].iter().filter(|l| **l).count();
    let neg = n - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|a, b| score[*a].total_cmp(&score[*b]));
    // Mann–Whitney U: sum of positive ranks, tied groups get their mean rank.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && score[idx[j + 1]] == score[idx[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += idx[i..=j].iter().filter(|k| label[**k]).count() as f64 * mean_rank;
        i = j + 1;
    }
    let u = rank_sum - (pos * (pos + 1)) as f64 / 2.0;
    Some(u / (pos * neg) as f64)
}

/// Platt parameters: p = 1 / (1 + exp(-(a·x + b))), as in `[routing.models]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Platt {
    pub a: f64,
    pub b: f64,
}

impl Platt {
    pub fn apply(&self, x: f64) -> f64 {
        1.0 / (1.0 + (-(self.a * x + self.b)).exp())
    }

    /// Logistic regression of `label` on `x` by Newton's method, with Platt's
    /// smoothed targets and a tiny ridge so separable data stays finite.
    pub fn fit(x: &[f64], label: &[bool]) -> Platt {
        let n = x.len().min(label.len());
        let pos = label[..n].iter().filter(|l| **l).count() as f64;
        let neg = n as f64 - pos;
        let t_pos = (pos + 1.0) / (pos + 2.0);
        let t_neg = 1.0 / (neg + 2.0);
        let base = ((pos + 1.0) / (neg + 1.0)).ln();
        let mut p = Platt { a: 0.0, b: base };
        const RIDGE: f64 = 1e-3;
        for _ in 0..100 {
            let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (RIDGE * p.a, 0.0, RIDGE, 0.0, 1e-9);
            for i in 0..n {
                let q = p.apply(x[i]);
                let t = if label[i] { t_pos } else { t_neg };
                let d = q - t;
                let w = (q * (1.0 - q)).max(1e-12);
                ga += d * x[i];
                gb += d;
                haa += w * x[i] * x[i];
                hab += w * x[i];
                hbb += w;
            }
            let det = haa * hbb - hab * hab;
            if det.abs() < 1e-18 {
                break;
            }
            let da = (hbb * ga - hab * gb) / det;
            let db = (haa * gb - hab * ga) / det;
            p.a -= da;
            p.b -= db;
            if da.abs() + db.abs() < 1e-10 {
                break;
            }
        }
        p
    }
}

/// Mean negative log-likelihood of `label` under probabilities `p`.
pub fn log_loss(p: &[f64], label: &[bool]) -> f64 {
    let n = p.len().min(label.len()).max(1);
    p.iter()
        .zip(label)
        .map(|(p, l)| {
            let p = p.clamp(1e-6, 1.0 - 1e-6);
            if *l {
                -p.ln()
            } else {
                -(1.0 - p).ln()
            }
        })
        .sum::<f64>()
        / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_known_cases() {
        let s = [0.1, 0.2, 0.3, 0.4];
        assert_eq!(auroc(&s, &[false, false, true, true]), Some(1.0));
        assert_eq!(auroc(&s, &[true, true, false, false]), Some(0.0));
        assert_eq!(auroc(&[0.5; 4], &[true, false, true, false]), Some(0.5));
        // One positive ranked between two negatives: 1 of 2 pairs right.
        assert_eq!(auroc(&[0.1, 0.2, 0.3], &[false, true, false]), Some(0.5));
        // Tie between a positive and a negative counts half: (1 + 0.5) / 2.
        assert_eq!(auroc(&[0.1, 0.5, 0.5], &[false, true, false]), Some(0.75));
        assert_eq!(auroc(&s, &[true; 4]), None);
    }

    #[test]
    fn platt_is_monotone_and_beats_raw_log_loss() {
        // Overconfident raw scores: true accuracy at x is 0.25 + 0.5·x, but the raw
        // score claims x. Deterministic pseudo-random labels (LCG).
        let mut seed: u64 = 7;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let x: Vec<f64> = (0..2000).map(|i| (i % 100) as f64 / 100.0).collect();
        let y: Vec<bool> = x.iter().map(|x| next() < 0.25 + 0.5 * x).collect();
        let p = Platt::fit(&x, &y);
        assert!(p.a > 0.0, "{p:?}");
        let cal: Vec<f64> = x.iter().map(|x| p.apply(*x)).collect();
        for w in [0.0, 0.3, 0.6, 0.9].windows(2) {
            assert!(p.apply(w[0]) < p.apply(w[1]));
        }
        let raw: Vec<f64> = x.to_vec();
        let (lc, lr) = (log_loss(&cal, &y), log_loss(&raw, &y));
        assert!(lc < lr, "calibrated {lc} vs raw {lr}");
        // The fit should land near the true curve at the ends.
        assert!((p.apply(0.0) - 0.25).abs() < 0.07, "{}", p.apply(0.0));
        assert!((p.apply(0.99) - 0.745).abs() < 0.07, "{}", p.apply(0.99));
    }
}
