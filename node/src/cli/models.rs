//! `models list`, `models pull` and `models rm`, and resolving model arguments for other
//! commands (fetching catalog models on first use).

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;
use swarm_node::models::{self, Catalog, PullOptions, PullOutcome, ResolvedModel};

use super::ModelArgs;

pub(super) fn list(args: &ModelArgs, as_json: bool) -> anyhow::Result<ExitCode> {
    let cat = Catalog::load(args.catalog.as_deref())?;
    let home = models::home_dir();
    let rows: Vec<serde_json::Value> = cat
        .models
        .iter()
        .map(|m| {
            let installed = m.is_installed(&home);
            json!({
                "id": m.id,
                "name": m.name,
                "arch": m.arch,
                "quant": m.quant,
                "role": m.role,
                "licence": m.licence,
                "size": m.size,
                "installed": installed,
                "path": if installed { Some(m.install_path(&home).display().to_string()) } else { None },
            })
        })
        .collect();
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("cache: {}", models::catalog::models_dir(&home).display());
    println!(
        "{:<20} {:<9} {:<7} {:<7} {:>9}  INSTALLED",
        "ID", "ROLE", "ARCH", "QUANT", "SIZE"
    );
    for (m, r) in cat.models.iter().zip(rows.iter()) {
        let size = m
            .size
            .map(|s| format!("{:.0} MB", s as f64 / 1e6))
            .unwrap_or_else(|| "-".into());
        let role = serde_json::to_value(&m.role)?.as_str().unwrap_or("").to_string();
        let inst = match r["path"].as_str() {
            Some(p) => format!("yes  {p}"),
            None => "no".to_string(),
        };
        println!(
            "{:<20} {:<9} {:<7} {:<7} {:>9}  {}",
            m.id, role, m.arch, m.quant, size, inst
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn pull(args: &ModelArgs, ids: &[String]) -> anyhow::Result<ExitCode> {
    let cat = Catalog::load(args.catalog.as_deref())?;
    let home = models::home_dir();
    let ids: Vec<String> = if ids.iter().any(|i| i == "all") {
        cat.models.iter().map(|m| m.id.clone()).collect()
    } else {
        ids.to_vec()
    };
    // Check every id first: a typo should not fail after minutes of downloading.
    let entries = ids.iter().map(|id| cat.get(id)).collect::<Result<Vec<_>, _>>()?;
    let opts = PullOptions {
        progress: std::io::stderr().is_terminal(),
        ..PullOptions::default()
    };
    for e in entries {
        let t0 = std::time::Instant::now();
        match models::pull(e, &home, &opts).with_context(|| format!("pulling `{}`", e.id))? {
            PullOutcome::AlreadyInstalled(p) => println!("{}: already installed at {}", e.id, p.display()),
            PullOutcome::Installed {
                path,
                downloaded_bytes,
            } => println!(
                "{}: installed at {} ({:.1} MB in {:.1} s, sha256 verified)",
                e.id,
                path.display(),
                downloaded_bytes as f64 / 1e6,
                t0.elapsed().as_secs_f64()
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn rm(args: &ModelArgs, ids: &[String]) -> anyhow::Result<ExitCode> {
    let cat = Catalog::load(args.catalog.as_deref())?;
    let home = models::home_dir();
    let all = ids.iter().any(|i| i == "all");
    // Check every id first, as pull does: a typo deletes nothing.
    let entries = if all {
        cat.models.iter().collect::<Vec<_>>()
    } else {
        ids.iter().map(|id| cat.get(id)).collect::<Result<Vec<_>, _>>()?
    };
    let mut freed = 0u64;
    for e in entries {
        match e.remove(&home).with_context(|| format!("removing `{}`", e.id))? {
            Some(bytes) => {
                freed += bytes;
                println!("{}: removed ({:.1} MB)", e.id, bytes as f64 / 1e6);
            }
            None if !all => println!("{}: not installed", e.id),
            None => {}
        }
    }
    println!(
        "freed {:.1} MB in {}",
        freed as f64 / 1e6,
        models::catalog::models_dir(&home).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Resolve a model argument; a catalog model not yet installed is fetched now.
pub(super) fn ensure(args: &ModelArgs, spec: &str) -> anyhow::Result<ResolvedModel> {
    let cat = Catalog::load(args.catalog.as_deref())?;
    let opts = PullOptions {
        progress: std::io::stderr().is_terminal(),
        ..PullOptions::default()
    };
    models::ensure(&cat, &models::home_dir(), spec, &opts).with_context(|| format!("model `{spec}`"))
}

/// `models gate`: evaluate a model on a file, sign the result per task kind
/// with this node's identity key, and store it where the node looks for it.
#[derive(clap::Args, Debug)]
pub(crate) struct GateArgs {
    /// The model: a catalog id or a GGUF path (e.g. a newly distilled model).
    #[arg(long, short)]
    pub model: String,
    /// Evaluation file (JSONL of questions, as `slm-swarm eval` reads).
    #[arg(long, value_name = "FILE")]
    pub file: std::path::PathBuf,
    /// The bar the result is marked against (the node applies its own
    /// `[gate] min_accuracy` when it decides to advertise).
    #[arg(long)]
    pub min_accuracy: f32,
    /// At most this many questions of each task kind.
    #[arg(long)]
    pub limit: Option<usize>,
    /// The node config whose identity key signs and whose `[gate] dir` keeps the result.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Identity key that signs (default: the config's node identity).
    #[arg(long, value_name = "FILE")]
    pub identity: Option<std::path::PathBuf>,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the signed records as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: ModelArgs,
}

pub(super) fn gate(a: GateArgs) -> anyhow::Result<ExitCode> {
    use swarm_node::gate;
    if !(0.0..=1.0).contains(&a.min_accuracy) {
        anyhow::bail!("--min-accuracy {} must be within 0..=1", a.min_accuracy);
    }
    let cfg = match &a.config {
        Some(p) => swarm_node::config::NodeConfig::load(p)?,
        None => swarm_node::config::NodeConfig::default(),
    };
    let home = models::home_dir();
    let key_path = a.identity.clone().unwrap_or_else(|| cfg.identity_path(&home));
    let key = swarm_node::node::load_or_create_key(&key_path)?;
    let questions = swarm_node::eval::dataset::load(&a.file)?;
    let mut backends = super::node::load_backends(&a.common, std::slice::from_ref(&a.model))?;
    let be = backends
        .first_mut()
        .ok_or_else(|| anyhow::anyhow!("no model loaded"))?;
    let sha256 = swarm_node::served::backend_sha256(be.as_ref());
    if sha256.is_empty() {
        anyhow::bail!(
            "{} has no model file to hash: only file-backed models can be gated",
            a.model
        );
    }
    let version = swarm_node::served::version_of(&sha256);
    let n = match a.limit {
        Some(l) => {
            let mut per: std::collections::BTreeMap<String, usize> = Default::default();
            for q in &questions {
                *per.entry(swarm_node::eval::run::task_of(q).kind().into())
                    .or_default() += 1;
            }
            per.values().map(|c| (*c).min(l)).sum()
        }
        None => questions.len(),
    };
    let pb = super::progress_bar(
        n,
        "{msg} [{bar:30}] {pos}/{len} {eta}",
        format!("gating {}@{version}", be.info().id),
    );
    let run = gate::GateRun {
        file: &a.file,
        sha256: &sha256,
        version: &version,
        min_accuracy: a.min_accuracy,
        limit: a.limit,
    };
    let mut records = gate::evaluate(be.as_mut(), &questions, run, || pb.inc(1))?;
    pb.finish_and_clear();
    let dir = cfg.gate.dir(&home);
    let mut all_passed = true;
    for r in &mut records {
        r.sign(&key)?;
        let path = gate::save(&dir, r)?;
        all_passed &= r.passed;
        if !a.json {
            println!(
                "{} {}@{} {}: {}/{} = {:.3} (bar {:.3}) signed by {} → {}",
                if r.passed { "PASS" } else { "FAIL" },
                r.model,
                r.version,
                r.task_kind,
                r.correct,
                r.n,
                r.accuracy,
                r.min_accuracy,
                r.signer,
                path.display()
            );
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
    }
    Ok(if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
