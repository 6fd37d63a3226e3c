//! `calibrate`: from per-model answer caches, AUROC of each confidence signal,
//! Platt calibration fit on one half of the questions, the routing policy
//! simulated on the other half (accuracy vs cloud share), chosen thresholds in
//! the node config format, and an SVG of the curve.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use swarm_node::config::NodeConfig;
use swarm_node::eval::calibrate::{
    auroc, choose, in_fit_half, live_point, load_cache, load_live, log_loss, pareto, simulate, sweep, vote,
    ModelCache, Platt, Point, Signal, SimQuestion, Target,
};

#[derive(Args, Debug)]
pub(crate) struct CalibrateArgs {
    /// A swarm model's answer cache (`eval` cache or `answer --out` lines); repeat per model.
    #[arg(long = "cache", required = true)]
    pub caches: Vec<PathBuf>,
    /// The cloud model's answer cache. Without it the cloud counts as always right
    /// ("oracle cloud"), so accuracies are upper bounds.
    #[arg(long)]
    pub cloud: Option<PathBuf>,
    /// Confidence signal: auto (best AUROC on the fit half, per model) or one of
    /// confidence, margin, mean_logprob, min_prob.
    #[arg(long, default_value = "auto")]
    pub signal: String,
    /// Choose thresholds for at most this cloud share (default 0.2)…
    #[arg(long, conflicts_with = "target_accuracy")]
    pub target_cloud: Option<f64>,
    /// …or for this fraction of cloud-only accuracy, at the least cloud share.
    #[arg(long)]
    pub target_accuracy: Option<f64>,
    /// Seed of the fit/test split of question ids.
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
    /// Draw the curve (test half) to this SVG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Write the chosen thresholds (and Platt parameters) as node config TOML.
    #[arg(long)]
    pub write_config: Option<PathBuf>,
    /// A live run's cache (`eval --node …` through a swarm running the written config):
    /// its accuracy and route mix are set beside the simulated point of the chosen
    /// thresholds, on the same questions (fit half, test half, all).
    #[arg(long)]
    pub live: Option<PathBuf>,
    /// Print the whole report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One model's figures for one signal.
struct SignalFit {
    auroc_fit: Option<f64>,
    auroc_test: Option<f64>,
    platt: Platt,
    log_loss_test: f64,
}

pub(super) fn calibrate(a: CalibrateArgs) -> anyhow::Result<ExitCode> {
    let forced = match a.signal.as_str() {
        "auto" => None,
        s => Some(Signal::parse(s).with_context(|| {
            format!("unknown --signal {s}: auto, confidence, margin, mean_logprob or min_prob")
        })?),
    };
    let target = match (a.target_cloud, a.target_accuracy) {
        (_, Some(r)) if (0.0..=1.5).contains(&r) => Target::RelativeAccuracy(r),
        (Some(c), None) if (0.0..=1.0).contains(&c) => Target::CloudShare(c),
        (None, None) => Target::CloudShare(0.2),
        _ => bail!("--target-cloud must be within 0..=1, --target-accuracy within 0..=1.5"),
    };
    let mut models: Vec<ModelCache> = Vec::new();
    for p in &a.caches {
        let mut c = load_cache(p).with_context(|| format!("reading {}", p.display()))?;
        if c.model.is_empty() {
            c.model = p.display().to_string();
        }
        // Two caches of one model (e.g. two scorers) stay apart: name them by file.
        if models.iter().any(|m| m.model == c.model) {
            c.model = format!("{}@{}", c.model, file_stem(p));
        }
        models.push(c);
    }
    let cloud = match &a.cloud {
        Some(p) => Some(load_cache(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    // Only questions every cache answered.
    let mut qids: BTreeSet<String> = models[0].by_qid.keys().cloned().collect();
    for m in models.iter().skip(1).chain(cloud.iter()) {
        qids.retain(|q| m.by_qid.contains_key(q));
    }
    let (fit, test): (Vec<String>, Vec<String>) =
        qids.into_iter().partition(|q| in_fit_half(q, a.split_seed));
    if fit.len() < 10 || test.len() < 10 {
        bail!(
            "too few common questions to split ({} fit, {} test): the caches must share question ids",
            fit.len(),
            test.len()
        );
    }

    // Per model and signal: AUROC on each half, Platt fit on the fit half.
    let mut fits: Vec<BTreeMap<Signal, SignalFit>> = Vec::new();
    let mut chosen: Vec<Signal> = Vec::new();
    for m in &models {
        let mut per = BTreeMap::new();
        for s in Signal::ALL {
            let col = |ids: &[String]| -> Option<(Vec<f64>, Vec<bool>)> {
                let mut x = Vec::new();
                let mut y = Vec::new();
                for q in ids {
                    let o = &m.by_qid[q];
                    x.push(*o.signals.get(&s)?);
                    y.push(o.correct);
                }
                Some((x, y))
            };
            let (Some((xf, yf)), Some((xt, yt))) = (col(&fit), col(&test)) else {
                continue;
            };
            let platt = Platt::fit(&xf, &yf);
            let pt: Vec<f64> = xt.iter().map(|x| platt.apply(*x)).collect();
            per.insert(
                s,
                SignalFit {
                    auroc_fit: auroc(&xf, &yf),
                    auroc_test: auroc(&xt, &yt),
                    platt,
                    log_loss_test: log_loss(&pt, &yt),
                },
            );
        }
        let pick = match forced {
            Some(s) if per.contains_key(&s) => s,
            Some(s) => bail!("{}: the cache has no {} signal", m.model, s.as_str()),
            // Chosen on the fit half only; the test half just reports.
            None => per
                .iter()
                .max_by(|x, y| {
                    x.1.auroc_fit
                        .unwrap_or(0.5)
                        .total_cmp(&y.1.auroc_fit.unwrap_or(0.5))
                })
                .map(|(s, _)| *s)
                .unwrap_or(Signal::Confidence),
        };
        chosen.push(pick);
        fits.push(per);
    }

    let sim = |ids: &[String]| -> Vec<SimQuestion> {
        ids.iter()
            .map(|q| SimQuestion {
                local: models
                    .iter()
                    .zip(&fits)
                    .zip(&chosen)
                    .map(|((m, f), s)| {
                        let o = &m.by_qid[q];
                        let raw = o.signals.get(s).copied().unwrap_or(0.0);
                        (o.answer.clone(), o.correct, f[s].platt.apply(raw))
                    })
                    .collect(),
                cloud_correct: cloud.as_ref().is_none_or(|c| c.by_qid[q].correct),
            })
            .collect()
    };
    let (sim_fit, sim_test) = (sim(&fit), sim(&test));
    let cloud_acc =
        |qs: &[SimQuestion]| qs.iter().filter(|q| q.cloud_correct).count() as f64 / qs.len() as f64;
    let (cloud_fit, cloud_test) = (cloud_acc(&sim_fit), cloud_acc(&sim_test));

    // Agreement among voters as a signal for "the vote's answer is right".
    let (agr, agr_ok): (Vec<f64>, Vec<bool>) = sim_test
        .iter()
        .map(|q| {
            let v = vote(q);
            (v.agreement, v.correct)
        })
        .unzip();
    let agreement_auroc = auroc(&agr, &agr_ok);

    let pts_fit = sweep(&sim_fit);
    let (pick, met_fit) = choose(&pts_fit, target, cloud_fit).context("no grid points")?;
    let on_test = simulate(&sim_test, pick.tau_local, pick.tau_vote);
    let all: Vec<String> = fit.iter().chain(&test).cloned().collect();
    let on_all = simulate(&sim(&all), pick.tau_local, pick.tau_vote);
    // The live run against the simulation, on exactly the questions it answered.
    let live = match &a.live {
        Some(p) => {
            let l = load_live(p).with_context(|| format!("reading {}", p.display()))?;
            let mut halves = serde_json::Map::new();
            for (name, ids) in [("fit", &fit), ("test", &test), ("all", &all)] {
                let answered: Vec<String> = ids.iter().filter(|q| l.contains_key(*q)).cloned().collect();
                let lp = live_point(&l, &answered);
                let sp = simulate(&sim(&answered), pick.tau_local, pick.tau_vote);
                halves.insert(name.into(), json!({"live": lp, "simulated": sp}));
            }
            Some(Value::Object(halves))
        }
        None => None,
    };
    let front = pareto(&sweep(&sim_test));

    // Reference points on the test half; the best single model is picked on the fit half.
    let acc = |ids: &[String], m: &ModelCache| {
        ids.iter().filter(|q| m.by_qid[*q].correct).count() as f64 / ids.len() as f64
    };
    let best = (0..models.len())
        .max_by(|x, y| acc(&fit, &models[*x]).total_cmp(&acc(&fit, &models[*y])))
        .unwrap_or(0);
    let best_acc = acc(&test, &models[best]);
    let vote_only = simulate(&sim_test, f64::INFINITY, 0.0);
    // The swarm without a cloud: the chosen tau_local, and every vote accepted.
    let no_cloud = simulate(&sim_test, pick.tau_local, 0.0);
    let cloud_label = if cloud.is_some() {
        "cloud cache"
    } else {
        "oracle cloud (no --cloud cache: every escalated question counted right)"
    };

    let models_json: Vec<Value> = models
        .iter()
        .zip(&fits)
        .zip(&chosen)
        .map(|((m, f), s)| {
            let signals: serde_json::Map<String, Value> = f
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        json!({
                            "auroc": v.auroc_test, "auroc_fit": v.auroc_fit,
                            "platt": [v.platt.a, v.platt.b], "log_loss_test": v.log_loss_test,
                        }),
                    )
                })
                .collect();
            json!({
                "model": m.model, "signal": s.as_str(),
                "accuracy_fit": acc(&fit, m), "accuracy_test": acc(&test, m),
                "signals": signals,
            })
        })
        .collect();
    let report = json!({
        "questions": {"fit": fit.len(), "test": test.len(), "split_seed": a.split_seed},
        "cloud": cloud_label,
        "target": target,
        "models": models_json,
        "swarm": {"agreement": {"auroc": agreement_auroc}},
        "thresholds": {
            "tau_local": pick.tau_local, "tau_vote": pick.tau_vote,
            "target_met_on_fit": met_fit, "fit": pick, "test": on_test, "all": on_all,
        },
        "live": live,
        "reference": {
            "cloud_only": {"cloud_share": 1.0, "accuracy": cloud_test},
            "best_single": {"model": models[best].model, "cloud_share": 0.0, "accuracy": best_acc},
            "vote_only": vote_only,
            "swarm_no_cloud": no_cloud,
            "swarm": on_test,
        },
        "curve": front,
    });

    if let Some(p) = &a.plot {
        plot(
            p,
            &front,
            cloud_test,
            (&models[best].model, best_acc),
            &on_test,
            cloud.is_none(),
        )?;
    }
    if let Some(p) = &a.write_config {
        let text = config_text(&models, &fits, &chosen, &pick, target, cloud_label);
        // Must load as a node config (deny_unknown_fields catches a drifted format).
        NodeConfig::parse(&text).context("the written config does not parse as a node config")?;
        // Written beside and renamed over: a node never reads half a config.
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut tmp =
            tempfile::NamedTempFile::new_in(dir).with_context(|| format!("writing in {}", dir.display()))?;
        std::io::Write::write_all(&mut tmp, text.as_bytes())
            .with_context(|| format!("writing {}", p.display()))?;
        tmp.as_file().sync_all()?;
        tmp.persist(p)
            .with_context(|| format!("replacing {}", p.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} fit / {} test questions (split seed {}); cloud: {cloud_label}",
        fit.len(),
        test.len(),
        a.split_seed
    );
    println!("\nAUROC (test half) for \"this answer is right\"; * = signal used (best on fit half):");
    print!("{:<28} {:>6}", "model", "acc");
    for s in Signal::ALL {
        print!(" {:>13}", s.as_str());
    }
    println!();
    for ((m, f), c) in models.iter().zip(&fits).zip(&chosen) {
        print!("{:<28} {:>6.3}", m.model, acc(&test, m));
        for s in Signal::ALL {
            let cell = match f.get(&s).and_then(|v| v.auroc_test) {
                Some(x) => format!("{x:.3}{}", if *c == s { "*" } else { " " }),
                None => "-".into(),
            };
            print!(" {cell:>13}");
        }
        println!();
    }
    match agreement_auroc {
        Some(x) => println!("{:<28} {:>6} agreement {x:.3}", "swarm vote", ""),
        None => println!("{:<28} {:>6} agreement -", "swarm vote", ""),
    }
    println!(
        "\nchosen on the fit half for {target:?}{}: tau_local = {:.2}, tau_vote = {:.2}",
        if met_fit { "" } else { " (NOT met; closest)" },
        pick.tau_local,
        pick.tau_vote
    );
    println!(
        "  fit:  cloud share {:.3}, accuracy {:.3}\n  test: cloud share {:.3}, accuracy {:.3} (local {:.3}, vote {:.3})",
        pick.cloud_share, pick.accuracy, on_test.cloud_share, on_test.accuracy, on_test.local_share, on_test.vote_share
    );
    println!(
        "  all:  cloud share {:.3}, accuracy {:.3}",
        on_all.cloud_share, on_all.accuracy
    );
    println!(
        "reference (test): cloud-only {cloud_test:.3}; best single {} {best_acc:.3}; vote-only {:.3}; \
         no cloud (tau_local {:.2}, every vote accepted) {:.3}",
        models[best].model, vote_only.accuracy, pick.tau_local, no_cloud.accuracy
    );
    if let Some(Value::Object(halves)) = &live {
        println!("\nlive run vs simulation at these thresholds (same questions):");
        println!("  half     n  sim_cloud sim_acc  live_cloud live_acc  live local/vote/cloud");
        for (name, v) in halves {
            let f = |k: &str, x: &str| v[k][x].as_f64().unwrap_or(f64::NAN);
            println!(
                "  {name:<5} {:>4} {:>10.3} {:>7.3} {:>11.3} {:>8.3}  {:.3}/{:.3}/{:.3}",
                v["live"]["n"].as_u64().unwrap_or(0),
                f("simulated", "cloud_share"),
                f("simulated", "accuracy"),
                f("live", "cloud_share"),
                f("live", "accuracy"),
                f("live", "local_share"),
                f("live", "vote_share"),
                f("live", "cloud_share"),
            );
        }
    }
    println!("\ncurve (test half, Pareto front):\n  cloud_share accuracy tau_local tau_vote");
    for p in &front {
        println!(
            "  {:>11.3} {:>8.3} {:>9.2} {:>8.2}",
            p.cloud_share, p.accuracy, p.tau_local, p.tau_vote
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The `[routing]` section with the chosen thresholds, and per model the signal and its Platt parameters.
fn config_text(
    models: &[ModelCache],
    fits: &[BTreeMap<Signal, SignalFit>],
    chosen: &[Signal],
    pick: &Point,
    target: Target,
    cloud_label: &str,
) -> String {
    let mut t = format!(
        "# Written by `slm-swarm calibrate` ({target:?}; cloud: {cloud_label}).\n\
         # Fit half: cloud share {:.3}, accuracy {:.3}.\n[routing]\ntau_local = {}\ntau_vote = {}\n",
        pick.cloud_share, pick.accuracy, pick.tau_local, pick.tau_vote
    );
    for ((m, f), s) in models.iter().zip(fits).zip(chosen) {
        // The node calibrates the same signal the simulation used, with the same fit.
        let Some(c) = f.get(s) else {
            continue;
        };
        let id = m.model.split('@').next().unwrap_or(&m.model);
        t.push_str(&format!(
            "\n[routing.models.\"{id}\"]\nsignal = \"{}\"\nplatt = [{:.4}, {:.4}]\n",
            s.as_str(),
            c.platt.a,
            c.platt.b
        ));
    }
    t
}

/// Accuracy vs cloud share, with cloud-only, the best single model and the chosen swarm point.
fn plot(
    path: &Path,
    front: &[Point],
    cloud_acc: f64,
    best: (&str, f64),
    swarm: &Point,
    oracle: bool,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    if path.extension().and_then(|e| e.to_str()) != Some("svg") {
        bail!("--plot writes SVG only (name the file *.svg)");
    }
    let root = SVGBackend::new(path, (800, 560)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot: {e}");
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let lo = front
        .iter()
        .map(|p| p.accuracy)
        .chain([best.1, swarm.accuracy, cloud_acc])
        .fold(1.0f64, f64::min);
    let y0 = (lo - 0.05).max(0.0);
    let title = if oracle {
        "Accuracy vs cloud share (test half; oracle cloud)"
    } else {
        "Accuracy vs cloud share (test half)"
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0f64..1.0f64, y0..1.0f64)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("cloud share")
        .y_desc("accuracy")
        .draw()
        .map_err(|x| e(&x))?;
    chart
        .draw_series(LineSeries::new(
            front.iter().map(|p| (p.cloud_share, p.accuracy)),
            &BLUE,
        ))
        .map_err(|x| e(&x))?
        .label("swarm policy (Pareto front)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    let marks: [(f64, f64, RGBColor, String); 3] = [
        (1.0, cloud_acc, RED, "cloud only".into()),
        (0.0, best.1, BLACK, format!("best single SLM ({})", best.0)),
        (
            swarm.cloud_share,
            swarm.accuracy,
            GREEN,
            format!(
                "swarm (tau_local {:.2}, tau_vote {:.2})",
                swarm.tau_local, swarm.tau_vote
            ),
        ),
    ];
    for (x, y, c, label) in marks {
        chart
            .draw_series(std::iter::once(Circle::new((x, y), 6, c.filled())))
            .map_err(|x| e(&x))?
            .label(label)
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
