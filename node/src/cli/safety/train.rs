//! `safety-train`: fit the safety head on labelled prompts. Training texts too
//! close to any held-out evaluation text are dropped first (embedding
//! decontamination); the L2 strength is chosen by k-fold cross-validation on the
//! training set alone; the head fitted on all of it is written as JSON.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use sha2::{Digest, Sha256};
use swarm_node::inference::embedder::{cosine, Embedder, DEFAULT_EMBEDDER};
use swarm_node::models::{self, Catalog};
use swarm_node::safety::head::{fit, FitOptions, Fitted, SafetyHead, DEFAULT_THRESHOLD, SAFE};

use super::super::ModelArgs;
use super::{embed_all, read_labelled};

#[derive(Args, Debug)]
pub(crate) struct SafetyTrainArgs {
    /// Training prompts: JSONL of {text, label: safe|unsafe, category, source};
    /// each unsafe category becomes a class of the head.
    #[arg(long, default_value = "data/safety/train.jsonl")]
    pub file: PathBuf,
    /// Where to write the fitted head (the node compiles in data/safety/head.json).
    #[arg(long, default_value = "data/safety/head.json")]
    pub out: PathBuf,
    /// Held-out sets: training texts within `--max-similarity` of any of their
    /// texts are dropped before fitting.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "data/safety/benchmarks.jsonl,data/safety/eval.jsonl"
    )]
    pub held_out: Vec<PathBuf>,
    /// Cosine similarity at or above which a training text counts as a near copy.
    #[arg(long, default_value_t = 0.9)]
    pub max_similarity: f32,
    /// Embedder (catalog id) the head is fitted on.
    #[arg(long, default_value = DEFAULT_EMBEDDER)]
    pub embedder: String,
    /// Cross-validation folds for choosing the L2 strength.
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// L2 strengths to compare.
    #[arg(long, value_delimiter = ',', default_value = "0.0001,0.001,0.01")]
    pub l2: Vec<f64>,
    /// Hidden ReLU units to compare (0 = plain logistic regression).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub hidden: Vec<usize>,
    /// Optimiser steps per fit.
    #[arg(long, default_value_t = 400)]
    pub steps: usize,
    /// Threads for the embedder and the fit (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub common: ModelArgs,
}

/// Out-of-fold binary log loss, precision and recall at the default threshold.
struct Cv {
    log_loss: f64,
    precision: f64,
    recall: f64,
}

fn cross_validate(
    x: &[Vec<f32>],
    y: &[usize],
    classes: &[String],
    folds: usize,
    o: FitOptions,
) -> anyhow::Result<Cv> {
    let mut p_unsafe = vec![0f32; x.len()];
    for f in 0..folds {
        let (mut tx, mut ty) = (Vec::new(), Vec::new());
        for (i, (v, &c)) in x.iter().zip(y).enumerate() {
            if i % folds != f {
                tx.push(v.clone());
                ty.push(c);
            }
        }
        let fitted = fit(&tx, &ty, classes.len(), o)?;
        let head = head(classes, fitted, x[0].len(), o.l2, "", tx.len(), "");
        for (i, v) in x.iter().enumerate().filter(|(i, _)| i % folds == f) {
            p_unsafe[i] = head.score(v).map_or(0.0, |s| s.p_unsafe);
        }
    }
    let (mut ll, mut tp, mut fp, mut fn_) = (0f64, 0usize, 0usize, 0usize);
    for (&p, &c) in p_unsafe.iter().zip(y) {
        let truth = c != 0;
        let p = f64::from(p).clamp(1e-6, 1.0 - 1e-6);
        ll -= if truth { p.ln() } else { (1.0 - p).ln() };
        let flag = p >= f64::from(DEFAULT_THRESHOLD);
        match (truth, flag) {
            (true, true) => tp += 1,
            (false, true) => fp += 1,
            (true, false) => fn_ += 1,
            _ => {}
        }
    }
    Ok(Cv {
        log_loss: ll / x.len() as f64,
        precision: tp as f64 / (tp + fp).max(1) as f64,
        recall: tp as f64 / (tp + fn_).max(1) as f64,
    })
}

#[allow(clippy::too_many_arguments)]
fn head(
    classes: &[String],
    (hidden, weights, bias): Fitted,
    dim: usize,
    l2: f64,
    embedder: &str,
    examples: usize,
    sha: &str,
) -> SafetyHead {
    SafetyHead {
        embedder: embedder.into(),
        dim,
        classes: classes.to_vec(),
        hidden,
        weights,
        bias,
        threshold: DEFAULT_THRESHOLD,
        data_sha256: sha.into(),
        examples,
        l2,
    }
}

pub(crate) fn safety_train(a: SafetyTrainArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(a.folds >= 2, "--folds must be at least 2");
    anyhow::ensure!(
        !a.l2.is_empty() && a.l2.iter().all(|l| *l >= 0.0),
        "--l2 needs non-negative values"
    );
    let raw = std::fs::read(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let sha = hex::encode(Sha256::digest(&raw));
    let items = read_labelled(&a.file)?;
    let catalog = Catalog::load(a.common.catalog.as_deref())?;
    let e = Embedder::from_catalog(&catalog, &models::home_dir(), &a.embedder)
        .with_context(|| format!("embedder `{}`", a.embedder))?;
    let texts: Vec<String> = items.iter().map(|i| i.text.clone()).collect();
    let vectors = embed_all(&e, &texts, "training set")?;

    // Decontaminate: no near copy of a held-out text is trained on.
    let mut held = Vec::new();
    for p in &a.held_out {
        let h = read_labelled(p)?;
        let t: Vec<String> = h.iter().map(|i| i.text.clone()).collect();
        held.extend(embed_all(&e, &t, &p.display().to_string())?);
    }
    let mut dropped = Vec::new();
    let keep: Vec<bool> = vectors
        .iter()
        .zip(&items)
        .map(|(v, it)| {
            let near = held
                .iter()
                .map(|h| cosine(v, h))
                .fold(f32::NEG_INFINITY, f32::max);
            let ok = near < a.max_similarity;
            if !ok {
                dropped.push((near, it.text.clone()));
            }
            ok
        })
        .collect();

    let categories: BTreeSet<&str> = items
        .iter()
        .filter(|i| i.is_unsafe())
        .map(|i| i.category.as_str())
        .collect();
    let classes: Vec<String> = std::iter::once(SAFE)
        .chain(categories)
        .map(str::to_string)
        .collect();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for ((v, it), k) in vectors.into_iter().zip(&items).zip(&keep) {
        if !*k {
            continue;
        }
        let c = if it.is_unsafe() {
            classes.iter().position(|c| *c == it.category).unwrap_or(0)
        } else {
            0
        };
        x.push(v);
        y.push(c);
    }
    anyhow::ensure!(
        x.len() >= 2 * a.folds,
        "too few training prompts left ({})",
        x.len()
    );
    println!(
        "{}: {} prompts, {} kept ({} unsafe in {} categories), {} dropped as near copies of held-out texts (cosine ≥ {})",
        a.file.display(),
        items.len(),
        x.len(),
        y.iter().filter(|&&c| c != 0).count(),
        classes.len() - 1,
        dropped.len(),
        a.max_similarity
    );
    dropped.sort_by(|p, q| q.0.total_cmp(&p.0));
    for (s, t) in dropped.iter().take(10) {
        println!("  dropped {s:.3}  {t}");
    }
    let mut best: Option<(FitOptions, f64)> = None;
    for &hidden in &a.hidden {
        for &l2 in &a.l2 {
            let o = FitOptions {
                hidden,
                l2,
                steps: a.steps,
                ..FitOptions::default()
            };
            let cv = cross_validate(&x, &y, &classes, a.folds, o)?;
            println!(
                "  hidden {hidden:<4} l2 {l2:<8} {}-fold CV: log loss {:.4}  precision {:.3}  recall {:.3} (threshold {DEFAULT_THRESHOLD})",
                a.folds, cv.log_loss, cv.precision, cv.recall
            );
            if best.is_none_or(|(_, ll)| cv.log_loss < ll) {
                best = Some((o, cv.log_loss));
            }
        }
    }
    let (o, _) = best.context("no L2 strength was tried")?;
    let l2 = o.l2;
    let fitted = fit(&x, &y, classes.len(), o)?;
    let h = head(&classes, fitted, e.dim(), l2, e.id(), x.len(), &sha);
    h.validate()?;
    let json = serde_json::to_string(&h)?;
    let tmp = a.out.with_extension("json.tmp");
    std::fs::write(&tmp, json + "\n").with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("cannot write {}", a.out.display()))?;
    println!(
        "wrote {} (hidden {}, l2 {l2}, {} classes, threshold {DEFAULT_THRESHOLD}); rebuild the node to ship it",
        a.out.display(),
        o.hidden,
        classes.len()
    );
    Ok(ExitCode::SUCCESS)
}
