//! The local → vote → cloud routing policy simulated on cached answers: the
//! weighted vote, one threshold pair's figures, the grid sweep, the Pareto
//! front and the choice of thresholds for a target.

use std::collections::BTreeMap;

use serde::Serialize;

/// One question as the simulation sees it: every swarm model's answer with its
/// calibrated confidence, and whether the cloud got it right.
#[derive(Debug, Clone, PartialEq)]
pub struct SimQuestion {
    /// (answer, correct, calibrated confidence), one per swarm model, in order.
    pub local: Vec<(String, bool, f64)>,
    pub cloud_correct: bool,
}

/// What a weighted vote of all swarm models decides.
#[derive(Debug, Clone, PartialEq)]
pub struct VoteOutcome {
    pub correct: bool,
    /// Weighted share of the winning answer.
    pub agreement: f64,
}

/// Vote of all swarm models weighted by calibrated confidence.
pub fn vote(q: &SimQuestion) -> VoteOutcome {
    let mut w: BTreeMap<&str, (f64, bool)> = BTreeMap::new();
    let mut total = 0.0;
    for (a, ok, c) in &q.local {
        // The node's own weighting (floor for unconfident voters), so the simulation matches it.
        let c = swarm_protocol::vote_weight(*c as f32) as f64;
        let e = w.entry(a.as_str()).or_insert((0.0, *ok));
        e.0 += c;
        total += c;
    }
    // Ties go to the lexically first answer (BTreeMap order) — deterministic.
    let mut best: Option<(f64, bool)> = None;
    for (_, (s, ok)) in w {
        if best.is_none_or(|(b, _)| s > b) {
            best = Some((s, ok));
        }
    }
    match best {
        Some((s, ok)) if total > 0.0 => VoteOutcome {
            correct: ok,
            agreement: s / total,
        },
        Some((_, ok)) => VoteOutcome {
            correct: ok,
            agreement: 0.0,
        },
        None => VoteOutcome {
            correct: false,
            agreement: 0.0,
        },
    }
}

/// One policy's figures: shares of each route and accuracy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub tau_local: f64,
    pub tau_vote: f64,
    pub local_share: f64,
    pub vote_share: f64,
    pub cloud_share: f64,
    pub accuracy: f64,
}

/// Simulate the policy with every swarm model taking the coordinator's seat in
/// turn (any node may receive a request), averaged over coordinators.
pub fn simulate(qs: &[SimQuestion], tau_local: f64, tau_vote: f64) -> Point {
    let (mut n, mut local, mut voted, mut cloud, mut right) = (0usize, 0usize, 0usize, 0usize, 0usize);
    for q in qs {
        let v = vote(q);
        for (_, ok, c) in &q.local {
            n += 1;
            let correct = if *c >= tau_local {
                local += 1;
                *ok
            } else if v.agreement >= tau_vote {
                voted += 1;
                v.correct
            } else {
                cloud += 1;
                q.cloud_correct
            };
            right += correct as usize;
        }
    }
    let d = n.max(1) as f64;
    Point {
        tau_local,
        tau_vote,
        local_share: local as f64 / d,
        vote_share: voted as f64 / d,
        cloud_share: cloud as f64 / d,
        accuracy: right as f64 / d,
    }
}

/// Thresholds tried: 0, 0.02, …, 1 for each.
pub fn grid() -> Vec<f64> {
    (0..=50).map(|i| i as f64 / 50.0).collect()
}

/// Every grid point's figures.
pub fn sweep(qs: &[SimQuestion]) -> Vec<Point> {
    let g = grid();
    let mut out = Vec::with_capacity(g.len() * g.len());
    for &tl in &g {
        for &tv in &g {
            out.push(simulate(qs, tl, tv));
        }
    }
    out
}

/// The Pareto front: for rising cloud share, only points more accurate than any cheaper one.
pub fn pareto(points: &[Point]) -> Vec<Point> {
    let mut ps = points.to_vec();
    ps.sort_by(|a, b| {
        a.cloud_share
            .total_cmp(&b.cloud_share)
            .then(b.accuracy.total_cmp(&a.accuracy))
    });
    let mut out: Vec<Point> = Vec::new();
    for p in ps {
        if out.last().is_none_or(|l| p.accuracy > l.accuracy) {
            out.push(p);
        }
    }
    out
}

/// What the thresholds are chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Most accurate policy with at most this cloud share.
    CloudShare(f64),
    /// Cheapest policy reaching this fraction of cloud-only accuracy.
    RelativeAccuracy(f64),
}

/// The chosen grid point, and whether it meets the target (on the points given).
pub fn choose(points: &[Point], target: Target, cloud_only_accuracy: f64) -> Option<(Point, bool)> {
    let meets = |p: &Point| match target {
        Target::CloudShare(c) => p.cloud_share <= c + 1e-12,
        Target::RelativeAccuracy(r) => p.accuracy + 1e-12 >= r * cloud_only_accuracy,
    };
    let most_accurate = |a: &Point, b: &Point| {
        a.accuracy > b.accuracy || (a.accuracy == b.accuracy && a.cloud_share < b.cloud_share)
    };
    let cheapest = |a: &Point, b: &Point| {
        a.cloud_share < b.cloud_share || (a.cloud_share == b.cloud_share && a.accuracy > b.accuracy)
    };
    let pick = |only_meeting: bool, better: &dyn Fn(&Point, &Point) -> bool| {
        let mut best: Option<Point> = None;
        for p in points.iter().filter(|p| !only_meeting || meets(p)) {
            if best.as_ref().is_none_or(|b| better(p, b)) {
                best = Some(*p);
            }
        }
        best
    };
    type Better<'a> = &'a dyn Fn(&Point, &Point) -> bool;
    let (within, fallback): (Better, Better) = match target {
        Target::CloudShare(_) => (&most_accurate, &cheapest),
        Target::RelativeAccuracy(_) => (&cheapest, &most_accurate),
    };
    // An unreachable target gets the closest point: least cloud, or most accurate.
    let p = pick(true, within).or_else(|| pick(false, fallback))?;
    Some((p, meets(&p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(local: &[(&str, bool, f64)], cloud: bool) -> SimQuestion {
        SimQuestion {
            local: local.iter().map(|(a, ok, c)| (a.to_string(), *ok, *c)).collect(),
            cloud_correct: cloud,
        }
    }

    #[test]
    fn simulation_on_a_tiny_cache() {
        let qs = vec![
            // All confident and right: local always.
            q(&[("A", true, 0.9), ("A", true, 0.95)], true),
            // Unsure, but agree on a wrong answer: the vote accepts it.
            q(&[("B", false, 0.5), ("B", false, 0.5)], true),
            // Unsure and split: agreement 0.6/1.0 = 0.6 < 0.7 → cloud.
            q(&[("C", true, 0.6), ("D", false, 0.4)], true),
        ];
        let p = simulate(&qs, 0.8, 0.7);
        // Six coordinator seats: 2 local, 2 vote, 2 cloud; right: 2 + 0 + 2.
        assert!((p.local_share - 2.0 / 6.0).abs() < 1e-12, "{p:?}");
        assert!((p.vote_share - 2.0 / 6.0).abs() < 1e-12, "{p:?}");
        assert!((p.cloud_share - 2.0 / 6.0).abs() < 1e-12, "{p:?}");
        assert!((p.accuracy - 4.0 / 6.0).abs() < 1e-12, "{p:?}");
        // Vote threshold 0.6 accepts the split vote (C wins, right).
        let p = simulate(&qs, 0.8, 0.6);
        assert_eq!(p.cloud_share, 0.0);
        assert!((p.accuracy - 4.0 / 6.0).abs() < 1e-12, "{p:?}");
        // Never local, never vote: all cloud, all right.
        let p = simulate(&qs, 1.1, 1.1);
        assert_eq!((p.cloud_share, p.accuracy), (1.0, 1.0));
    }

    #[test]
    fn chosen_thresholds_meet_the_target() {
        let mut qs = Vec::new();
        for i in 0..40 {
            let c = i as f64 / 40.0;
            // Right more often when confident; models disagree when unsure.
            let ok = (i * 7) % 40 < i + 5;
            let other = if c < 0.5 { "Z" } else { "A" };
            qs.push(q(&[("A", ok, c), (other, !ok && other == "A", c * 0.8)], true));
        }
        let pts = sweep(&qs);
        let cloud_acc = 1.0;
        for t in [0.1, 0.2, 0.5] {
            let (p, met) = choose(&pts, Target::CloudShare(t), cloud_acc).expect("points");
            assert!(met && p.cloud_share <= t, "{t}: {p:?}");
            // Nothing within the budget is more accurate.
            assert!(pts.iter().all(|x| x.cloud_share > t || x.accuracy <= p.accuracy));
        }
        for r in [0.7, 0.9] {
            let (p, met) = choose(&pts, Target::RelativeAccuracy(r), cloud_acc).expect("points");
            assert!(met && p.accuracy >= r * cloud_acc, "{r}: {p:?}");
            assert!(pts
                .iter()
                .all(|x| x.accuracy < r * cloud_acc - 1e-12 || x.cloud_share >= p.cloud_share));
        }
        let front = pareto(&pts);
        assert!(front
            .windows(2)
            .all(|w| w[0].cloud_share < w[1].cloud_share || w[0].accuracy < w[1].accuracy));
        assert!(front.windows(2).all(|w| w[0].accuracy < w[1].accuracy));
    }
}
