//! `safety-eval`: run the safety classifier over a labelled JSONL set and report
//! precision, recall and F1 of the `unsafe` label, overall and per category.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use swarm_node::inference::embedder::{Embedder, DEFAULT_EMBEDDER};
use swarm_node::models::{self, Catalog};
use swarm_node::safety::{parse_labelled, SafetyClassifier};

use super::ModelArgs;

#[derive(Args, Debug)]
pub(crate) struct SafetyEvalArgs {
    /// Labelled prompts: JSONL of {text, label: safe|unsafe, category, source}.
    #[arg(long, default_value = "data/safety/eval.jsonl")]
    pub file: PathBuf,
    /// Embedder (catalog id); `none` = rules only.
    #[arg(long, default_value = DEFAULT_EMBEDDER)]
    pub embedder: String,
    /// Override the classifier's minimum similarity to an unsafe exemplar.
    #[arg(long)]
    pub min_similarity: Option<f32>,
    /// Override the required margin over the nearest safe exemplar.
    #[arg(long)]
    pub margin: Option<f32>,
    /// Print the report (and every error) as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also list the misclassified prompts (text output).
    #[arg(long)]
    pub errors: bool,
    #[command(flatten)]
    pub common: ModelArgs,
}

#[derive(Debug, Default, Clone, Serialize)]
struct Counts {
    tp: usize,
    fp: usize,
    tn: usize,
    #[serde(rename = "fn")]
    fn_: usize,
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
    fn ratio(a: usize, b: usize) -> f64 {
        if b == 0 {
            0.0
        } else {
            a as f64 / b as f64
        }
    }
    fn precision(&self) -> f64 {
        Self::ratio(self.tp, self.tp + self.fp)
    }
    fn recall(&self) -> f64 {
        Self::ratio(self.tp, self.tp + self.fn_)
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
        Self::ratio(self.tp + self.tn, self.n())
    }
}

#[derive(Debug, Serialize)]
struct Miss {
    text: String,
    label: String,
    category: String,
    predicted_category: Option<String>,
    rule: Option<String>,
    nearest_unsafe: Option<(f32, String)>,
    nearest_safe: Option<(f32, String)>,
}

pub(super) fn safety_eval(a: SafetyEvalArgs) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let items = parse_labelled(&text).with_context(|| a.file.display().to_string())?;
    anyhow::ensure!(!items.is_empty(), "{} holds no prompts", a.file.display());
    let t0 = Instant::now();
    let mut classifier = if a.embedder == "none" || a.embedder.is_empty() {
        SafetyClassifier::rules_only()
    } else {
        let catalog = Catalog::load(a.common.catalog.as_deref())?;
        let e = Embedder::from_catalog(&catalog, &models::home_dir(), &a.embedder)
            .with_context(|| format!("embedder `{}` (or run with --embedder none)", a.embedder))?;
        SafetyClassifier::with_embedder_blocking(e)?
    };
    if let Some(s) = a.min_similarity {
        classifier.min_similarity = s;
    }
    if let Some(m) = a.margin {
        classifier.margin = m;
    }
    let texts: Vec<String> = items.iter().map(|i| i.text.clone()).collect();
    let verdicts = classifier.classify_many_blocking(&texts)?;
    let secs = t0.elapsed().as_secs_f64();
    let mut all = Counts::default();
    let mut by_cat: BTreeMap<String, Counts> = BTreeMap::new();
    let mut by_predicted: BTreeMap<String, usize> = BTreeMap::new();
    let mut misses = Vec::new();
    for (item, v) in items.iter().zip(&verdicts) {
        all.add(item.is_unsafe(), v.flagged);
        by_cat
            .entry(item.category.clone())
            .or_default()
            .add(item.is_unsafe(), v.flagged);
        if let Some(c) = &v.category {
            *by_predicted.entry(c.clone()).or_default() += 1;
        }
        if item.is_unsafe() != v.flagged {
            misses.push(Miss {
                text: item.text.clone(),
                label: item.label.clone(),
                category: item.category.clone(),
                predicted_category: v.category.clone(),
                rule: v.rule.clone(),
                nearest_unsafe: v
                    .nearest
                    .as_ref()
                    .map(|n| (n.unsafe_similarity, n.unsafe_text.clone())),
                nearest_safe: v
                    .nearest
                    .as_ref()
                    .map(|n| (n.safe_similarity, n.safe_text.clone())),
            });
        }
    }
    let mode = if classifier.has_embeddings() {
        format!(
            "rules + {} exemplars (min_similarity {}, margin {})",
            a.embedder, classifier.min_similarity, classifier.margin
        )
    } else {
        "rules only".to_string()
    };
    if a.json {
        let cats: BTreeMap<&String, serde_json::Value> = by_cat
            .iter()
            .map(|(k, c)| {
                (
                    k,
                    serde_json::json!({"counts": c, "precision": c.precision(), "recall": c.recall(), "f1": c.f1()}),
                )
            })
            .collect();
        let report = serde_json::json!({
            "file": a.file.display().to_string(),
            "classifier": mode,
            "n": all.n(),
            "counts": all,
            "precision": all.precision(),
            "recall": all.recall(),
            "f1": all.f1(),
            "accuracy": all.accuracy(),
            "seconds": secs,
            "per_category": cats,
            "predicted_categories": by_predicted,
            "errors": misses,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}: {} prompts, classifier: {mode}", a.file.display(), all.n());
    println!(
        "unsafe label: precision {:.3}  recall {:.3}  F1 {:.3}  accuracy {:.3}  (tp {} fp {} tn {} fn {}; {:.1} s)",
        all.precision(),
        all.recall(),
        all.f1(),
        all.accuracy(),
        all.tp,
        all.fp,
        all.tn,
        all.fn_,
        secs
    );
    println!(
        "\n{:<34} {:>4} {:>4} {:>4} {:>4} {:>4}",
        "category", "n", "tp", "fp", "tn", "fn"
    );
    for (k, c) in &by_cat {
        println!(
            "{:<34} {:>4} {:>4} {:>4} {:>4} {:>4}",
            k,
            c.n(),
            c.tp,
            c.fp,
            c.tn,
            c.fn_
        );
    }
    println!("\nflags by predicted category:");
    for (k, n) in &by_predicted {
        println!("  {k:<24} {n}");
    }
    if a.errors {
        println!("\nmisclassified:");
        for m in &misses {
            println!(
                "  [{} {}] {} -> {:?} rule {:?} unsafe≈{:?} safe≈{:?}",
                m.label, m.category, m.text, m.predicted_category, m.rule, m.nearest_unsafe, m.nearest_safe
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
