//! Commands that run one local model directly (no node): `generate`, `answer`,
//! `score` and `bench`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;
use swarm_node::eval::dataset::{self, Kind};
use swarm_node::inference::engine::LoadOptions;
use swarm_node::inference::{
    Backend, CandleBackend, ChatMessage, ChoiceKind, ChoiceRequest, GenerateRequest, Prompt, Scorer,
};

use super::models::ensure;
use super::{LocalModelArgs, ModelArgs};

#[derive(Args, Debug)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub local: LocalModelArgs,
    /// System message put before the prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy (deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed for sampling (reproducible output when temperature > 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text is generated (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Use the prompt as raw text, without the model's chat template.
    #[arg(long)]
    pub raw: bool,
    /// Print JSON with the text, confidence signals, token log-probs and timings.
    #[arg(long)]
    pub json: bool,
    /// The prompt.
    pub prompt: String,
}

#[derive(Args, Debug)]
pub(crate) struct AnswerArgs {
    #[command(flatten)]
    pub local: LocalModelArgs,
    /// Task kind; default: mcq with --choices, label with --labels.
    #[arg(long, value_parser = ["mcq", "label"])]
    pub task: Option<String>,
    /// Options of a multiple-choice question, each as LETTER=text (e.g. "A=shark").
    #[arg(long, num_args = 1..)]
    pub choices: Vec<String>,
    /// Labels of a classification question, comma-separated (e.g. negative,positive).
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Option scorer: letter (probability of the option letter) or continuation
    /// (length-normalised log-likelihood of the option text). Default: the model's.
    #[arg(long)]
    pub scorer: Option<Scorer>,
    /// Answer every mcq/label question of an evaluation JSONL file instead, and report accuracy.
    #[arg(long, conflicts_with_all = ["choices", "labels", "question"])]
    pub file: Option<PathBuf>,
    /// With --file: only the first N questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// With --file: write one JSON line per question here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The question (without its options).
    #[arg(required_unless_present = "file")]
    pub question: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct ScoreArgs {
    #[command(flatten)]
    pub local: LocalModelArgs,
    /// Text file to score (UTF-8), used verbatim.
    #[arg(long)]
    pub file: PathBuf,
    /// Print JSON: token_ids, mean_nll, n_tokens, per-token nll.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub local: LocalModelArgs,
    /// Prompt length in tokens (prefill).
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: usize,
    /// Tokens to generate (decode).
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Timed runs after one warm-up run; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Print JSON: model, threads, prefill_tok_s, decode_tok_s, and the runs.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn load(common: &ModelArgs, spec: &str) -> anyhow::Result<CandleBackend> {
    let resolved = ensure(common, spec)?;
    let scorer = resolved
        .entry
        .as_ref()
        .and_then(|e| e.scorer.as_deref())
        .map(|s| s.parse::<Scorer>())
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let domains = resolved
        .entry
        .as_ref()
        .map(|e| e.domains.clone())
        .unwrap_or_default();
    CandleBackend::load(
        &resolved.path,
        LoadOptions {
            id: resolved.id.clone(),
            domains,
            scorer,
            default_system: resolved.entry.as_ref().and_then(|e| e.system.clone()),
        },
    )
    .with_context(|| format!("loading {}", resolved.path.display()))
}

pub(super) fn generate(a: GenerateArgs) -> anyhow::Result<ExitCode> {
    let mut be = load(&a.local.common, &a.local.model)?;
    let prompt = if a.raw {
        Prompt::Raw(a.prompt.clone())
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", &a.prompt));
        Prompt::Chat(msgs)
    };
    let req = GenerateRequest {
        prompt,
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        stop: a.stop.clone(),
        top_logprobs: 0,
    };
    let stream_out = !a.json;
    let mut stdout = std::io::stdout();
    let g = be.generate(&req, &mut |piece| {
        if stream_out {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
        true
    })?;
    if a.json {
        let out = json!({
            "model": be.info().id,
            "text": g.text,
            "confidence": g.confidence,
            "mean_logprob": g.mean_logprob,
            "min_prob": g.min_prob,
            "prefill_ms": g.prefill_ms,
            "decode_ms": g.decode_ms,
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
            "finish_reason": g.finish_reason.as_str(),
            "tokens": g.tokens,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_choices(raw: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    raw.iter()
        .map(|c| match c.split_once('=') {
            Some((l, t)) if !l.trim().is_empty() && !t.trim().is_empty() => {
                Ok((l.trim().to_string(), t.trim().to_string()))
            }
            _ => bail!("--choices takes LETTER=text, got `{c}`"),
        })
        .collect()
}

pub(super) fn answer(a: AnswerArgs) -> anyhow::Result<ExitCode> {
    let mut be = load(&a.local.common, &a.local.model)?;
    let scorer = a.scorer.unwrap_or(be.info().scorer);
    if let Some(file) = &a.file {
        return answer_file(&mut be, scorer, &a, file);
    }
    let question = a.question.clone().unwrap_or_default();
    let kind = match a.task.as_deref() {
        Some("label") => ChoiceKind::Label,
        Some(_) => ChoiceKind::Mcq,
        None if !a.labels.is_empty() => ChoiceKind::Label,
        None => ChoiceKind::Mcq,
    };
    let options = match kind {
        ChoiceKind::Mcq => parse_choices(&a.choices)?,
        ChoiceKind::Label => a.labels.iter().map(|l| (l.clone(), l.clone())).collect(),
    };
    if options.len() < 2 {
        bail!("give at least two options: --choices A=… B=… (mcq) or --labels a,b (label)");
    }
    let r = be.choose(&ChoiceRequest {
        question,
        options: options.clone(),
        kind,
        scorer,
    })?;
    if a.json {
        let out = json!({
            "model": be.info().id,
            "answer": r.label,
            "text": options[r.index].1,
            "confidence": r.confidence,
            "margin": r.margin,
            "probs": options.iter().zip(&r.probs).map(|((l, _), p)| json!({"label": l, "prob": p})).collect::<Vec<_>>(),
            "scorer": r.scorer.as_str(),
            "elapsed_ms": r.elapsed_ms,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{} ({}) confidence {:.3}",
            r.label, options[r.index].1, r.confidence
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn answer_file(
    be: &mut CandleBackend,
    scorer: Scorer,
    a: &AnswerArgs,
    file: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let mut qs = dataset::load(file)?;
    qs.retain(|q| q.kind != Kind::Short);
    if let Some(n) = a.limit {
        qs.truncate(n);
    }
    if qs.is_empty() {
        bail!("{} has no mcq or label questions", file.display());
    }
    let pb = super::progress_bar(
        qs.len(),
        "{msg} [{bar:30}] {pos}/{len} eta {eta}",
        format!("{} {}", be.info().id, scorer.as_str()),
    );
    let mut out = match &a.out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut correct = 0usize;
    let mut ms = Vec::with_capacity(qs.len());
    let mut conf_sum = 0.0f64;
    for q in &qs {
        let (kind, options) = match q.kind {
            Kind::Mcq => (
                ChoiceKind::Mcq,
                q.choices
                    .iter()
                    .map(|c| (c.label.clone(), c.text.clone()))
                    .collect::<Vec<_>>(),
            ),
            _ => (
                ChoiceKind::Label,
                q.labels.iter().map(|l| (l.clone(), l.clone())).collect(),
            ),
        };
        let r = be.choose(&ChoiceRequest {
            question: q.question.clone(),
            options,
            kind,
            scorer,
        })?;
        let ok = q.answer.accepted().contains(&r.label.as_str());
        correct += ok as usize;
        conf_sum += r.confidence as f64;
        ms.push(r.elapsed_ms);
        if let Some(w) = out.as_mut() {
            let line = json!({
                "qid": q.id, "model": be.info().id, "scorer": scorer.as_str(), "answer": r.label,
                "confidence": r.confidence, "margin": r.margin, "probs": r.probs, "correct": ok, "ms": r.elapsed_ms,
            });
            writeln!(w, "{line}")?;
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    ms.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
    let n = qs.len();
    let summary = json!({
        "model": be.info().id,
        "scorer": scorer.as_str(),
        "file": file.display().to_string(),
        "n": n,
        "correct": correct,
        "accuracy": correct as f64 / n as f64,
        "mean_confidence": conf_sum / n as f64,
        "ms_p50": ms[n / 2],
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{} ({}): {}/{} correct = {:.1}% on {} (median {:.0} ms/question)",
            be.info().id,
            scorer.as_str(),
            correct,
            n,
            100.0 * correct as f64 / n as f64,
            file.display(),
            ms[n / 2]
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn score(a: ScoreArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let mut be = load(&a.local.common, &a.local.model)?;
    let s = be.score_text(&text)?;
    if a.json {
        let out = json!({
            "model": be.info().id,
            "token_ids": s.token_ids,
            "n_tokens": s.token_ids.len(),
            "bos": s.bos,
            "mean_nll": s.mean_nll,
            "perplexity": s.mean_nll.exp(),
            "nll": s.nll,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("model: {}", be.info().id);
        println!("tokens ({}): {:?}", s.token_ids.len(), s.token_ids);
        println!(
            "mean_nll: {:.4} nats/token (perplexity {:.2})",
            s.mean_nll,
            s.mean_nll.exp()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = xs.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

pub(super) fn bench(a: BenchArgs) -> anyhow::Result<ExitCode> {
    if a.prompt_tokens == 0 || a.runs == 0 {
        bail!("--prompt-tokens and --runs must be at least 1");
    }
    let mut be = load(&a.local.common, &a.local.model)?;
    let threads = candle_threads();
    be.bench_run(a.prompt_tokens, a.gen_tokens.min(8))?; // warm-up
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut runs = Vec::new();
    for _ in 0..a.runs {
        let r = be.bench_run(a.prompt_tokens, a.gen_tokens)?;
        let p = a.prompt_tokens as f64 / r.prefill_s;
        let d = if a.gen_tokens > 0 {
            a.gen_tokens as f64 / r.decode_s
        } else {
            0.0
        };
        prefill.push(p);
        decode.push(d);
        runs.push(json!({"prefill_ms": r.prefill_s * 1e3, "decode_ms": r.decode_s * 1e3, "prefill_tok_s": p, "decode_tok_s": d}));
    }
    let out = json!({
        "model": be.info().id,
        "arch": be.info().arch,
        "quant": be.info().quant,
        "threads": threads,
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "runs": runs,
        "prefill_tok_s": median(&mut prefill),
        "decode_tok_s": median(&mut decode),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{} ({} threads): prefill {:.1} tok/s ({} tokens), decode {:.1} tok/s ({} tokens), median of {} runs",
            be.info().id,
            threads,
            out["prefill_tok_s"].as_f64().unwrap_or(0.0),
            a.prompt_tokens,
            out["decode_tok_s"].as_f64().unwrap_or(0.0),
            a.gen_tokens,
            a.runs
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The thread count candle's kernels use (the env set from --threads, or the default).
fn candle_threads() -> usize {
    candle_core::utils::get_num_threads()
}
