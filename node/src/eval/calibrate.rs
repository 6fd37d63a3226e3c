//! Offline calibration from per-model answer caches: AUROC of each confidence
//! signal, Platt scaling, and a simulation of the local → vote → cloud routing
//! policy over a threshold grid (the accuracy-vs-cloud-share curve).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::run::{EvalRecord, Signals};
use super::EvalError;

/// The raw confidence signals a cache may carry (the node calibrates one per model).
pub use crate::config::Signal;

/// One model's answer to one question, reduced to what calibration needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Obs {
    pub answer: String,
    pub correct: bool,
    /// Only the signals the cache line actually carries.
    pub signals: BTreeMap<Signal, f64>,
}

impl Obs {
    pub fn from_record(r: &EvalRecord) -> Obs {
        Obs {
            answer: r.answer.clone(),
            correct: r.correct,
            signals: signals_of(&r.signals, true),
        }
    }
}

fn signals_of(s: &Signals, token_signals: bool) -> BTreeMap<Signal, f64> {
    let mut m = BTreeMap::new();
    m.insert(Signal::Confidence, s.confidence as f64);
    if let Some(x) = s.margin {
        m.insert(Signal::Margin, x as f64);
    }
    if token_signals {
        m.insert(Signal::MeanLogprob, s.mean_logprob as f64);
        m.insert(Signal::MinProb, s.min_prob as f64);
    }
    m.retain(|_, v| v.is_finite());
    m
}

/// A line written by `slm-swarm answer --file … --out F` (flatter than an eval record).
#[derive(Debug, Deserialize)]
struct AnswerLine {
    qid: String,
    model: String,
    answer: String,
    correct: bool,
    confidence: f32,
    #[serde(default)]
    margin: Option<f32>,
    #[serde(default)]
    mean_logprob: Option<f32>,
    #[serde(default)]
    min_prob: Option<f32>,
}

/// The answers of one model (or of the cloud stand-in), by question id.
#[derive(Debug, Clone, Default)]
pub struct ModelCache {
    pub model: String,
    pub by_qid: BTreeMap<String, Obs>,
}

/// Read a cache in either format: `eval`'s records or `answer --out` lines.
/// Unreadable lines are skipped with a warning (a torn last line is normal).
pub fn load_cache(path: &Path) -> Result<ModelCache, EvalError> {
    let f = std::fs::File::open(path).map_err(|e| EvalError::Io(format!("{}: {e}", path.display())))?;
    let mut c = ModelCache::default();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| EvalError::Io(format!("{}: {e}", path.display())))?;
        if line.trim().is_empty() {
            continue;
        }
        let (qid, model, obs) = if let Ok(r) = serde_json::from_str::<EvalRecord>(&line) {
            let o = Obs::from_record(&r);
            (r.qid, r.model, o)
        } else if let Ok(a) = serde_json::from_str::<AnswerLine>(&line) {
            let mut s = BTreeMap::new();
            s.insert(Signal::Confidence, a.confidence as f64);
            for (k, v) in [
                (Signal::Margin, a.margin),
                (Signal::MeanLogprob, a.mean_logprob),
                (Signal::MinProb, a.min_prob),
            ] {
                if let Some(v) = v {
                    s.insert(k, v as f64);
                }
            }
            s.retain(|_, v| v.is_finite());
            let o = Obs {
                answer: a.answer,
                correct: a.correct,
                signals: s,
            };
            (a.qid, a.model, o)
        } else {
            tracing::warn!("{}:{}: skipping an unreadable line", path.display(), i + 1);
            continue;
        };
        if c.model.is_empty() {
            c.model = model;
        }
        // Later lines win: a resumed run may re-answer a question.
        c.by_qid.insert(qid, obs);
    }
    if c.by_qid.is_empty() {
        return Err(EvalError::Io(format!("{}: no answers", path.display())));
    }
    Ok(c)
}

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

/// A live run's figures over some questions, with the routes the nodes reported.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LivePoint {
    pub n: usize,
    pub local_share: f64,
    pub vote_share: f64,
    pub cloud_share: f64,
    pub accuracy: f64,
}

/// One question of a live run: the route that answered it and whether it was right.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveAnswer {
    pub route: String,
    pub correct: bool,
}

/// Read an `eval --node` cache (records only) by question id; later lines win.
pub fn load_live(path: &Path) -> Result<BTreeMap<String, LiveAnswer>, EvalError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| EvalError::Io(format!("{}: {e}", path.display())))?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<EvalRecord>(line) {
            Ok(r) => {
                out.insert(
                    r.qid,
                    LiveAnswer {
                        route: r.route,
                        correct: r.correct,
                    },
                );
            }
            Err(_) => tracing::warn!("{}:{}: skipping an unreadable line", path.display(), i + 1),
        }
    }
    if out.is_empty() {
        return Err(EvalError::Io(format!("{}: no answers", path.display())));
    }
    Ok(out)
}

/// Figures of a live run over `ids` (ids it did not answer are left out; `n` says how many counted).
pub fn live_point(live: &BTreeMap<String, LiveAnswer>, ids: &[String]) -> LivePoint {
    let got: Vec<&LiveAnswer> = ids.iter().filter_map(|q| live.get(q)).collect();
    let d = got.len().max(1) as f64;
    let share = |r: &str| got.iter().filter(|a| a.route == r).count() as f64 / d;
    LivePoint {
        n: got.len(),
        local_share: share("local"),
        vote_share: share("vote"),
        cloud_share: share("cloud"),
        accuracy: got.iter().filter(|a| a.correct).count() as f64 / d,
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

    fn q(local: &[(&str, bool, f64)], cloud: bool) -> SimQuestion {
        SimQuestion {
            local: local.iter().map(|(a, ok, c)| (a.to_string(), *ok, *c)).collect(),
            cloud_correct: cloud,
        }
    }

    #[test]
    fn live_point_counts_routes_over_the_given_ids() {
        let dir = std::env::temp_dir().join(format!("slm-live-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("live.jsonl");
        let line = |q: &str, route: &str, ok: bool| {
            format!(
                r#"{{"qid":"{q}","dataset":"d","kind":"mcq","model":"m","source":"node:x","route":"{route}","answer":"A","text":"A","correct":{ok},"ms":1.0,"signals":{{"confidence":0.5,"mean_logprob":0.0,"min_prob":0.0}}}}"#
            )
        };
        let text = [
            line("q1", "local", true),
            line("q2", "vote", false),
            line("q3", "cloud", true),
            "torn {".to_string(),
            line("q4", "cloud", false),
        ]
        .join("\n");
        std::fs::write(&p, text).expect("write");
        let live = load_live(&p).expect("load");
        assert_eq!(live.len(), 4);
        let ids: Vec<String> = ["q1", "q2", "q3", "q9"].iter().map(|s| s.to_string()).collect();
        let pt = live_point(&live, &ids);
        // q9 was not answered live: three count.
        assert_eq!(pt.n, 3);
        assert!((pt.cloud_share - 1.0 / 3.0).abs() < 1e-12, "{pt:?}");
        assert!((pt.local_share - 1.0 / 3.0).abs() < 1e-12, "{pt:?}");
        assert!((pt.accuracy - 2.0 / 3.0).abs() < 1e-12, "{pt:?}");
        std::fs::remove_dir_all(&dir).ok();
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

    #[test]
    fn loads_both_cache_formats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.jsonl");
        std::fs::write(
            &p,
            concat!(
                r#"{"answer":"A","confidence":0.5,"correct":true,"margin":0.2,"model":"m","ms":1.0,"probs":[0.5,0.3,0.2],"qid":"q1","scorer":"letter"}"#,
                "\n",
                r#"{"qid":"q2","dataset":"d","kind":"mcq","model":"m","source":"model:m","route":"local","answer":"B","text":"B","correct":false,"ms":1.0,"signals":{"confidence":0.4,"margin":0.1,"mean_logprob":-0.9,"min_prob":0.4}}"#,
                "\n{\"torn\n"
            ),
        )
        .expect("write");
        let c = load_cache(&p).expect("load");
        assert_eq!(c.model, "m");
        assert_eq!(c.by_qid.len(), 2);
        assert!(c.by_qid["q1"].correct);
        assert!(!c.by_qid["q1"].signals.contains_key(&Signal::MeanLogprob));
        assert_eq!(
            c.by_qid["q2"].signals.get(&Signal::MeanLogprob),
            Some(&(-0.9f32 as f64))
        );
    }
}
