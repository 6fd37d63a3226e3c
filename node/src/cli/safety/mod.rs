//! `safety-eval` and `safety-train`: measure the safety classifier on labelled
//! prompts (per category, per source, a threshold sweep and its PR curve, the
//! added latency) and fit its head on the training set.

mod eval;
mod train;

use std::path::Path;

use anyhow::Context;
use swarm_node::inference::embedder::Embedder;
use swarm_node::safety::{embed_cached, parse_labelled, Labelled};

pub(crate) use eval::{safety_eval, SafetyEvalArgs};
pub(crate) use train::{safety_train, SafetyTrainArgs};

/// Read a labelled JSONL file, with the file named in any error.
fn read_labelled(path: &Path) -> anyhow::Result<Vec<Labelled>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let items = parse_labelled(&text).with_context(|| path.display().to_string())?;
    anyhow::ensure!(!items.is_empty(), "{} holds no prompts", path.display());
    Ok(items)
}

/// Embed `texts` in chunks (each cached on disk), with a progress bar on a terminal.
fn embed_all(e: &Embedder, texts: &[String], what: &str) -> anyhow::Result<Vec<Vec<f32>>> {
    const CHUNK: usize = 256;
    let pb = super::progress_bar(
        texts.len(),
        "{msg} [{bar:30}] {pos}/{len} eta {eta}",
        format!("embedding {what}"),
    );
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(CHUNK) {
        out.extend(embed_cached(e, chunk)?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(out)
}
