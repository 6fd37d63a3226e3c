//! Answer caches as calibration reads them: one model's answers by question id
//! (`eval` records or `answer --out` lines), and a live run's routes.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Signal;
use crate::eval::run::{EvalRecord, Signals};
use crate::eval::EvalError;

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

#[cfg(test)]
mod tests {
    use super::*;

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
