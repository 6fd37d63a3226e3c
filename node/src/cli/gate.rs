//! `models gate`: evaluate a model on a file, sign the result per task kind
//! with this node's identity key, and store it where the node looks for it
//! (see `swarm_node::gate`).

use std::process::ExitCode;

use swarm_node::models;

use super::ModelArgs;

/// `models gate` arguments.
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
    let sha256 = swarm_node::gate::backend_sha256(be.as_ref());
    if sha256.is_empty() {
        anyhow::bail!(
            "{} has no model file to hash: only file-backed models can be gated",
            a.model
        );
    }
    let version = swarm_node::gate::version_of(&sha256);
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
