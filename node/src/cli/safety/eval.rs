//! `safety-eval`: run the safety classifier over a labelled JSONL set; report
//! precision, recall, false-positive rate overall, per category and per source,
//! a threshold sweep (optionally drawn as a PR curve) and the added latency.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use swarm_node::inference::embedder::{Embedder, DEFAULT_EMBEDDER};
use swarm_node::models::{self, Catalog};
use swarm_node::safety::{Labelled, Mode, SafetyClassifier, SafetyHead, Verdict};

use super::super::ModelArgs;
use super::{embed_all, read_labelled};

#[derive(Args, Debug)]
pub(crate) struct SafetyEvalArgs {
    /// Labelled prompts: JSONL of {text, label: safe|unsafe, category, source}.
    #[arg(long, default_value = "data/safety/eval.jsonl")]
    pub file: PathBuf,
    /// Embedder (catalog id); `none` = rules only.
    #[arg(long, default_value = DEFAULT_EMBEDDER)]
    pub embedder: String,
    /// Which evidence decides (with an embedder): the trained head, the word
    /// rules, or either.
    #[arg(long, value_enum, default_value_t = Mode::Head)]
    pub mode: Mode,
    /// Override the head's threshold on P(unsafe).
    #[arg(long)]
    pub threshold: Option<f32>,
    /// Evaluate this head (JSON from `safety-train --out`) instead of the built-in one.
    #[arg(long, value_name = "FILE.json")]
    pub head: Option<PathBuf>,
    /// Draw the threshold sweep as a precision-recall curve (SVG).
    #[arg(long, value_name = "FILE.svg")]
    pub pr_curve: Option<PathBuf>,
    /// Also time this many single-query classifications (embedding + head, as a
    /// node runs them) and report p50/p95; run with `--threads 1` for one core.
    #[arg(long, default_value_t = 0)]
    pub latency: usize,
    /// Threads for the embedder (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the report (and every error) as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also list the misclassified prompts (text output).
    #[arg(long)]
    pub errors: bool,
    #[command(flatten)]
    pub common: ModelArgs,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Counts {
    tp: usize,
    fp: usize,
    tn: usize,
    #[serde(rename = "fn")]
    fn_: usize,
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

impl Counts {
    fn add(&mut self, truth: bool, flagged: bool) {
        match (truth, flagged) {
            (true, true) => self.tp += 1,
            (false, true) => self.fp += 1,
            (false, false) => self.tn += 1,
            (true, false) => self.fn_ += 1,
        }
    }
    fn n(&self) -> usize {
        self.tp + self.fp + self.tn + self.fn_
    }
    fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }
    fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }
    /// Safe prompts flagged, of all safe prompts (over-refusal).
    fn fpr(&self) -> f64 {
        ratio(self.fp, self.fp + self.tn)
    }
    fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
    fn accuracy(&self) -> f64 {
        ratio(self.tp + self.tn, self.n())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "n": self.n(), "counts": self, "precision": self.precision(), "recall": self.recall(),
            "fpr": self.fpr(), "f1": self.f1(),
        })
    }
}

#[derive(Debug, Serialize)]
struct Miss {
    text: String,
    label: String,
    category: String,
    source: Option<String>,
    predicted_category: Option<String>,
    rule: Option<String>,
    p_unsafe: Option<f32>,
}

#[derive(Debug, Serialize)]
struct SweepPoint {
    threshold: f32,
    precision: f64,
    recall: f64,
    fpr: f64,
    counts: Counts,
}

fn sweep(items: &[Labelled], verdicts: &[Verdict]) -> Vec<SweepPoint> {
    (1..100)
        .map(|i| i as f32 / 100.0)
        .map(|t| {
            let mut c = Counts::default();
            for (item, v) in items.iter().zip(verdicts) {
                c.add(item.is_unsafe(), v.category_at(t).is_some());
            }
            SweepPoint {
                threshold: t,
                precision: c.precision(),
                recall: c.recall(),
                fpr: c.fpr(),
                counts: c,
            }
        })
        .collect()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub(crate) fn safety_eval(a: SafetyEvalArgs) -> anyhow::Result<ExitCode> {
    if let Some(t) = a.threshold {
        anyhow::ensure!((0.0..=1.0).contains(&t), "--threshold must be within 0..=1");
    }
    if let Some(p) = &a.pr_curve {
        if p.extension().and_then(|e| e.to_str()) != Some("svg") {
            bail!("--pr-curve writes SVG only (name the file *.svg)");
        }
    }
    let items = read_labelled(&a.file)?;
    let rules_only = a.embedder == "none" || a.embedder.is_empty() || a.mode == Mode::Rules;
    let (mut classifier, embedder) = if rules_only {
        (SafetyClassifier::rules_only(), None)
    } else {
        let catalog = Catalog::load(a.common.catalog.as_deref())?;
        let e = Embedder::from_catalog(&catalog, &models::home_dir(), &a.embedder)
            .with_context(|| format!("embedder `{}` (or run with --embedder none)", a.embedder))?;
        let c = match &a.head {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
                let h: SafetyHead = serde_json::from_str(&text).with_context(|| p.display().to_string())?;
                SafetyClassifier::with_head(e.clone(), h)?
            }
            None => SafetyClassifier::with_embedder(e.clone())?,
        };
        (c, Some(e))
    };
    if !rules_only {
        classifier.mode = a.mode;
    }
    if let Some(t) = a.threshold {
        classifier.threshold = t;
    }
    let texts: Vec<String> = items.iter().map(|i| i.text.clone()).collect();
    let t0 = Instant::now();
    let verdicts: Vec<Verdict> = match &embedder {
        Some(e) => {
            let vectors = embed_all(e, &texts, &a.file.display().to_string())?;
            texts
                .iter()
                .zip(&vectors)
                .map(|(t, v)| classifier.decide(t, Some(v)))
                .collect()
        }
        None => classifier.classify_many_blocking(&texts)?,
    };
    let secs = t0.elapsed().as_secs_f64();
    let latency = if a.latency > 0 {
        Some(measure_latency(&classifier, &texts, a.latency)?)
    } else {
        None
    };

    let mut all = Counts::default();
    let mut by_cat: BTreeMap<String, Counts> = BTreeMap::new();
    let mut by_source: BTreeMap<String, Counts> = BTreeMap::new();
    let mut by_predicted: BTreeMap<String, usize> = BTreeMap::new();
    let mut misses = Vec::new();
    for (item, v) in items.iter().zip(&verdicts) {
        let (truth, flag) = (item.is_unsafe(), v.flagged);
        all.add(truth, flag);
        by_cat.entry(item.category.clone()).or_default().add(truth, flag);
        let source = item.source.clone().unwrap_or_else(|| "(none)".into());
        by_source.entry(source).or_default().add(truth, flag);
        if let Some(c) = &v.category {
            *by_predicted.entry(c.clone()).or_default() += 1;
        }
        if truth != flag {
            misses.push(Miss {
                text: item.text.clone(),
                label: item.label.clone(),
                category: item.category.clone(),
                source: item.source.clone(),
                predicted_category: v.category.clone(),
                rule: v.rule.clone(),
                p_unsafe: v.head.as_ref().map(|h| h.p_unsafe),
            });
        }
    }
    let has_head = classifier.has_embeddings();
    let points = if has_head {
        sweep(&items, &verdicts)
    } else {
        Vec::new()
    };
    let mode = if has_head {
        format!(
            "{:?} ({} head, threshold {})",
            classifier.mode, a.embedder, classifier.threshold
        )
        .to_lowercase()
    } else {
        "rules only".to_string()
    };
    if let Some(path) = &a.pr_curve {
        anyhow::ensure!(
            has_head,
            "--pr-curve needs the head (an embedder, --mode head or head-or-rules)"
        );
        plot(path, &points, &all, classifier.threshold, &a.file)?;
    }
    if a.json {
        let section = |m: &BTreeMap<String, Counts>| -> BTreeMap<String, serde_json::Value> {
            m.iter().map(|(k, c)| (k.clone(), c.json())).collect()
        };
        let report = serde_json::json!({
            "file": a.file.display().to_string(),
            "classifier": mode,
            "threshold": has_head.then_some(classifier.threshold),
            "n": all.n(),
            "counts": all,
            "precision": all.precision(),
            "recall": all.recall(),
            "fpr": all.fpr(),
            "f1": all.f1(),
            "accuracy": all.accuracy(),
            "seconds": secs,
            "latency_ms": latency,
            "per_category": section(&by_cat),
            "per_source": section(&by_source),
            "predicted_categories": by_predicted,
            "sweep": points,
            "errors": misses,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}: {} prompts, classifier: {mode}", a.file.display(), all.n());
    println!(
        "unsafe label: precision {:.3}  recall {:.3}  FPR {:.3}  F1 {:.3}  accuracy {:.3}  (tp {} fp {} tn {} fn {}; {:.1} s)",
        all.precision(),
        all.recall(),
        all.fpr(),
        all.f1(),
        all.accuracy(),
        all.tp,
        all.fp,
        all.tn,
        all.fn_,
        secs
    );
    if let Some(l) = &latency {
        println!(
            "added latency per query (embedding + head, {} queries one at a time): p50 {:.1} ms  p95 {:.1} ms",
            l.n, l.p50, l.p95
        );
    }
    for (title, m) in [("category", &by_cat), ("source", &by_source)] {
        println!(
            "\n{title:<44} {:>4} {:>4} {:>4} {:>4} {:>4} {:>6} {:>6} {:>6}",
            "n", "tp", "fp", "tn", "fn", "prec", "recall", "FPR"
        );
        for (k, c) in m {
            println!(
                "{:<44} {:>4} {:>4} {:>4} {:>4} {:>4} {:>6.3} {:>6.3} {:>6.3}",
                k,
                c.n(),
                c.tp,
                c.fp,
                c.tn,
                c.fn_,
                c.precision(),
                c.recall(),
                c.fpr()
            );
        }
    }
    println!("\nflags by predicted category:");
    for (k, n) in &by_predicted {
        println!("  {k:<24} {n}");
    }
    if !points.is_empty() {
        println!("\nthreshold sweep:  t     prec   recall  FPR");
        for p in points
            .iter()
            .filter(|p| (p.threshold * 100.0).round() as i32 % 10 == 0)
        {
            println!(
                "                  {:.2}  {:.3}  {:.3}   {:.3}",
                p.threshold, p.precision, p.recall, p.fpr
            );
        }
    }
    if a.errors {
        println!("\nmisclassified:");
        for m in &misses {
            println!(
                "  [{} {} {}] {} -> {:?} rule {:?} p_unsafe {:?}",
                m.label,
                m.category,
                m.source.as_deref().unwrap_or("-"),
                m.text,
                m.predicted_category,
                m.rule,
                m.p_unsafe
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct Latency {
    n: usize,
    p50: f64,
    p95: f64,
}

/// Classify `n` texts one at a time, as a node does per query.
fn measure_latency(c: &SafetyClassifier, texts: &[String], n: usize) -> anyhow::Result<Latency> {
    let mut ms = Vec::with_capacity(n);
    for t in texts.iter().cycle().take(n) {
        let t0 = Instant::now();
        c.classify_many_blocking(std::slice::from_ref(t))?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(Latency {
        n: ms.len(),
        p50: percentile(&ms, 0.5),
        p95: percentile(&ms, 0.95),
    })
}

/// Precision against recall over the sweep, with the operating point marked.
fn plot(path: &Path, points: &[SweepPoint], at: &Counts, threshold: f32, file: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (720, 560)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot: {e}");
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let name = file
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Safety head: precision vs recall ({name})"),
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0f64..1.0f64, 0.0f64..1.0f64)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("recall (unsafe caught)")
        .y_desc("precision (flags that were unsafe)")
        .draw()
        .map_err(|x| e(&x))?;
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.recall, p.precision)),
            &BLUE,
        ))
        .map_err(|x| e(&x))?
        .label("threshold 0.01 … 0.99")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(std::iter::once(Circle::new(
            (at.recall(), at.precision()),
            6,
            RED.filled(),
        )))
        .map_err(|x| e(&x))?
        .label(format!("operating point (threshold {threshold:.2})"))
        .legend(|(x, y)| Circle::new((x + 10, y), 5, RED.filled()));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
