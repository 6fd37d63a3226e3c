//! `dataset stats` and `dataset export`: the escalation log a node keeps with
//! `[dataset] enabled` (see `swarm_node::dataset`), summarised or written out
//! as chat fine-tuning data for a distillation run.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use swarm_node::config::NodeConfig;
use swarm_node::dataset;

#[derive(Subcommand, Debug)]
pub(crate) enum DatasetCmd {
    /// Summarise the escalation log: records, task kinds, cloud and swarm
    /// models, how often the swarm already agreed with the cloud.
    Stats(StatsArgs),
    /// Write the log as chat fine-tuning examples, one JSON object per line:
    /// `{"messages": [... the prompt the cloud saw ..., {"role": "assistant",
    /// "content": the cloud's answer}]}`.
    Export(ExportArgs),
}

/// Where the log is.
#[derive(Args, Debug, Clone)]
pub(crate) struct DirArgs {
    /// The log's directory (default: the config's `[dataset] dir`, else
    /// `$SLM_SWARM_HOME/datasets`).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// A node config whose `[dataset] dir` to read.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct StatsArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// Output file ("-" = standard output).
    #[arg(long, short, default_value = "-")]
    pub out: PathBuf,
    /// Only these task kinds (mcq, label, short, free); repeatable.
    #[arg(long = "task")]
    pub tasks: Vec<String>,
    /// Each distinct question once (its latest cloud answer).
    #[arg(long)]
    pub dedup: bool,
}

pub(super) fn run(cmd: DatasetCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        DatasetCmd::Stats(a) => stats(a),
        DatasetCmd::Export(a) => export(a),
    }
}

fn dir_of(a: &DirArgs) -> anyhow::Result<PathBuf> {
    let dir = match (&a.dir, &a.config) {
        (Some(d), _) => d.clone(),
        (None, Some(c)) => NodeConfig::load(c)?.dataset.dir(&swarm_node::models::home_dir()),
        (None, None) => dataset::DatasetConfig::default().dir(&swarm_node::models::home_dir()),
    };
    if !dir.is_dir() {
        bail!(
            "no escalation log at {}: enable it in the node's config (`[dataset] enabled = true`) \
             and escalate some queries, or pass --dir",
            dir.display()
        );
    }
    Ok(dir)
}

fn stats(a: StatsArgs) -> anyhow::Result<ExitCode> {
    let dir = dir_of(&a.dir)?;
    let s = dataset::stats(&dir)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("log: {}", dir.display());
    println!(
        "{} records ({} distinct questions) in {} files, {:.1} kB",
        s.records,
        s.unique_questions,
        s.files,
        s.bytes as f64 / 1e3
    );
    if let (Some(a), Some(b)) = (s.first_ms, s.last_ms) {
        println!("from {a} to {b} (Unix ms)");
    }
    let line = |name: &str, m: &std::collections::BTreeMap<String, usize>| {
        let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("{name:<16} {}", parts.join(", "));
    };
    line("task kinds", &s.by_task);
    line("recorded as", &s.by_role);
    line("cloud models", &s.by_cloud_model);
    line("swarm answers", &s.swarm_models);
    if let Some(x) = s.swarm_agreed_with_cloud {
        println!(
            "{:<16} {:.1} % (the swarm's most confident answer = the cloud's, mcq/label)",
            "swarm = cloud",
            100.0 * x
        );
    }
    println!("{:<16} {}", "safety-flagged", s.safety_flagged);
    Ok(ExitCode::SUCCESS)
}

fn export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    for t in &a.tasks {
        if !["mcq", "label", "short", "free"].contains(&t.as_str()) {
            bail!("--task {t}: expected mcq, label, short or free");
        }
    }
    let dir = dir_of(&a.dir)?;
    let mut records = dataset::read_all(&dir)?;
    records.retain(|r| a.tasks.is_empty() || a.tasks.iter().any(|t| t == r.task.kind()));
    if a.dedup {
        // Latest answer wins: walk newest first, keep the first of each question.
        let mut seen = std::collections::HashSet::new();
        records.reverse();
        records.retain(|r| seen.insert(serde_json::to_string(&r.messages).unwrap_or_default()));
        records.reverse();
    }
    let mut out: Box<dyn Write> = if a.out.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?,
        ))
    };
    for r in &records {
        serde_json::to_writer(&mut out, &dataset::to_example(r))?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    if a.out.as_os_str() != "-" {
        eprintln!("{} examples written to {}", records.len(), a.out.display());
    }
    Ok(ExitCode::SUCCESS)
}
