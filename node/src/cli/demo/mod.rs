//! `demo`: a whole swarm on this machine in one command. Fetches the models
//! if missing, starts a cloud stand-in (`serve`, requiring a random API key)
//! and three swarm nodes with different models as child processes of this
//! binary on loopback, asks a mixed question set (easy, hard, safety), prints
//! where every answer came from, and stops the children (also on Ctrl-C).
//!
//! The parts: `questions` (the built-in set and the `--questions` file),
//! `processes` (the child processes and the models they need), `swarm` (starting
//! the swarm and asking it) and `table` (what is printed at the end).

pub(crate) mod processes;
mod questions;
mod swarm;
mod table;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;

use self::processes::{fetch_models, Proc};
use self::questions::{parse_questions, BUILTIN};
use self::table::{print_table, summary};
use super::ModelArgs;

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Models of the three swarm nodes, one per node (catalog ids or GGUF paths).
    #[arg(long = "model", num_args = 1, default_values_t = [
        "smollm2-135m".to_string(), "gemma3-270m".to_string(), "qwen2.5-coder-0.5b".to_string()])]
    pub models: Vec<String>,
    /// Model of the cloud stand-in (e.g. qwen2.5-coder-0.5b for a quicker run).
    #[arg(long, default_value = "qwen2.5-coder-1.5b")]
    pub cloud_model: String,
    /// Questions, JSONL: data/eval's schema ({"kind", "question", "choices" |
    /// "labels"}) or just {"question": …}; optional "route" (auto | local |
    /// vote | cloud) forces a route. Default: a built-in mixed set.
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// Ask at most this many questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Compute threads of each swarm node (the stand-in uses every core).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Advert period of the nodes: a duration (500ms, 1s) or bare ms.
    #[arg(long, value_name = "DURATION", default_value = "500ms",
          value_parser = super::duration::parse_duration_ms)]
    pub advert_interval: u64,
    /// Keep the children's logs in this directory (default: a temporary one, removed).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Fetch nothing up front (the nodes still fetch a missing catalog model;
    /// without the sentence embedder the safety classifier runs its rules only).
    #[arg(long)]
    pub no_fetch: bool,
    /// Print one JSON object per question instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: ModelArgs,
}

pub(super) fn demo(a: DemoArgs) -> anyhow::Result<ExitCode> {
    if a.models.len() != 3 {
        bail!("give exactly three --model (one per swarm node), or none for the defaults");
    }
    if a.threads == 0 || a.advert_interval == 0 {
        bail!("--threads and --advert-interval must be at least 1");
    }
    let mut questions = match &a.questions {
        Some(p) => parse_questions(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            &p.display().to_string(),
        )?,
        None => parse_questions(BUILTIN, "built-in questions")?,
    };
    if let Some(n) = a.limit {
        questions.truncate(n.max(1));
    }
    let mut specs: Vec<&str> = a.models.iter().map(String::as_str).collect();
    specs.push(&a.cloud_model);
    // The nodes' sentence embedder (safety classifier, free-text votes): without it
    // they fall back to rules only, so fetch it here with the models, with progress.
    specs.push(swarm_node::inference::embedder::DEFAULT_EMBEDDER);
    if !a.no_fetch {
        fetch_models(&a.common, &specs)?;
    }

    let tmp;
    let dir = match &a.log_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("slm-swarm-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let out = rt.block_on(async {
        let mut procs: Vec<Proc> = Vec::new();
        let r = tokio::select! {
            r = swarm::run(&a, questions, &dir, &mut procs) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
        eprintln!("stopping the swarm…");
        for p in procs.iter_mut().rev() {
            p.stop(Duration::from_secs(5)).await;
        }
        r
    });
    if let Some(d) = &a.log_dir {
        eprintln!("logs: {}", d.display());
    }
    let rows = match out {
        Ok(r) => r,
        Err(e) if a.log_dir.is_none() && std::io::stderr().is_terminal() => {
            return Err(e.context("rerun with --log-dir DIR to keep the nodes' logs"))
        }
        Err(e) => return Err(e),
    };
    if !a.json {
        println!();
        print_table(&rows);
    }
    let failed = rows.iter().filter(|r| r.error.is_some()).count();
    if !a.json {
        summary(&rows);
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("{failed} question(s) failed");
        ExitCode::from(1)
    })
}
