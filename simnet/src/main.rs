//! `swarm-simnet run <scenario> [--seed N] [--json] [--virtual-s S]`: runs one simulation;
//! `swarm-simnet real --nodes N [--votes V] [--seed S] [--json]`: runs the real tier.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use swarm_simnet::real::RealConfig;
use swarm_simnet::Scenario;

#[derive(Parser)]
#[command(about = "Seeded, virtual-time simulation of an slm-swarm at scale, with faults")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a scenario (a path, or a name in configs/simnet/).
    Run {
        scenario: String,
        /// RNG seed (default: the scenario's own).
        #[arg(long)]
        seed: Option<u64>,
        /// Print one JSON object instead of the text report.
        #[arg(long)]
        json: bool,
        /// Override the scenario's virtual duration (seconds).
        #[arg(long = "virtual-s")]
        virtual_s: Option<f64>,
        /// Run the swarm keyed (every node certified by one swarm key), whatever the scenario says.
        #[arg(long)]
        keyed: bool,
    },
    /// Real tier: N real nodes (stand-in models) in this process over libp2p's memory
    /// transport; reports convergence time, memory per node and vote routing.
    Real {
        #[arg(long, default_value_t = 10)]
        nodes: usize,
        /// Votes run from random nodes once the swarm has converged.
        #[arg(long, default_value_t = 20)]
        votes: usize,
        /// Votes in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Seeds the topology, the model pool and the vote coordinators (not the timings).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Distinct stand-in model ids (node i serves model i mod M).
        #[arg(long, default_value_t = 8)]
        models: usize,
        /// Extra random links each node dials besides its ring neighbour.
        #[arg(long, default_value_t = 2)]
        links: usize,
        /// Advert period, ms (default: max(1000, N²)).
        #[arg(long = "advert-ms")]
        advert_ms: Option<u64>,
        /// Stand-in inference time per answer, ms.
        #[arg(long = "inference-ms", default_value_t = 5)]
        inference_ms: u64,
        /// Give up waiting for convergence after this many seconds.
        #[arg(long = "timeout-s", default_value_t = 120)]
        timeout_s: u64,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().cmd {
        Cmd::Run {
            scenario,
            seed,
            json,
            virtual_s,
            keyed,
        } => run(scenario, seed, json, virtual_s, keyed),
        Cmd::Real {
            nodes,
            votes,
            concurrency,
            seed,
            models,
            links,
            advert_ms,
            inference_ms,
            timeout_s,
            json,
        } => real(
            RealConfig {
                nodes,
                votes,
                concurrency,
                seed,
                models,
                links,
                advert_interval_ms: advert_ms.unwrap_or_else(|| RealConfig::default_advert_ms(nodes)),
                inference_ms,
                converge_timeout: Duration::from_secs(timeout_s),
            },
            json,
        ),
    }
}

fn real(cfg: RealConfig, json: bool) -> anyhow::Result<ExitCode> {
    // The nodes log through `tracing`; quiet unless RUST_LOG asks, and on stderr only.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let report = rt.block_on(swarm_simnet::real::run(cfg))?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    let healthy = report.convergence_ms.is_some() && report.votes_ok == report.votes;
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn run(
    scenario: String,
    seed: Option<u64>,
    json: bool,
    virtual_s: Option<f64>,
    keyed: bool,
) -> anyhow::Result<ExitCode> {
    let mut sc = Scenario::resolve(&scenario)?;
    sc.attack.keyed |= keyed;
    if let Some(v) = virtual_s {
        anyhow::ensure!(v > 0.0 && v.is_finite(), "--virtual-s must be positive");
        sc.virtual_s = v;
    }
    let seed = seed.unwrap_or(sc.seed);
    let name = sc.name.clone();
    let started = Instant::now();
    let report = swarm_simnet::run(sc, seed).context("cannot set up the simulation")?;
    let wall = started.elapsed().as_secs_f64();
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    // Wall time varies between runs, so it stays out of the (byte-identical) report.
    eprintln!("wall time {wall:.2} s");
    if report.invariant_violations > 0 || report.lost_queries > 0 {
        eprintln!(
            "invariant violated (scenario {name}, seed {seed}); reproduce with: \
             cargo run -p swarm-simnet --release -- run {scenario} --seed {seed}"
        );
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}
