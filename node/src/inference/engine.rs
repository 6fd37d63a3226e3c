//! The candle GGUF backend: loads a model file (weights, tokenizer, chat
//! template from its metadata) and implements generation with per-token
//! log-probabilities, option scoring for constrained answers, and text NLL.
//! Keeps the KV cache of the last prompt so a shared prefix is not recomputed.

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;

use super::gguf::{file_type_name, read_header, Meta, ModelConfig};
use super::model::{log_softmax, row_logprobs, KvCache, Transformer};
use super::sampling::{argmax, top_k, Sampler};
use super::template::{ChatMessage, ChatTemplate};
use super::tokenizer::TextTokenizer;
use super::{
    softmax_scaled, summarize_logprobs, Backend, ChoiceKind, ChoiceRequest, ChoiceResult, FinishReason,
    GenerateRequest, Generation, InferenceError, ModelInfo, Prompt, Scorer, TextScore, TokenLogprob,
};

/// Rows of logits materialised at once when scoring long texts.
const LOGIT_CHUNK: usize = 64;

pub struct CandleBackend {
    model: Transformer,
    tok: TextTokenizer,
    template: ChatTemplate,
    info: ModelInfo,
    /// Tokens whose keys/values `prefix_kv` holds (the last prompt run).
    prefix_ids: Vec<u32>,
    prefix_kv: KvCache,
    default_system: Option<String>,
}

/// Options for loading a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub id: String,
    pub domains: Vec<String>,
    pub scorer: Option<Scorer>,
    /// System message used when a chat has none (some checkpoints answer
    /// badly under the default their template injects).
    pub default_system: Option<String>,
}

impl CandleBackend {
    pub fn load(path: &Path, opts: LoadOptions) -> Result<Self, InferenceError> {
        let (mut file, content) = read_header(path)?;
        let cfg = ModelConfig::from_content(&content)?;
        let tok = TextTokenizer::from_gguf(&content)?;
        let meta = Meta::new(&content);
        let bos_text = tok.bos.map(|b| tok.token_text(b)).unwrap_or_default();
        let eos_text = tok.eos.map(|e| tok.token_text(e)).unwrap_or_default();
        let template = ChatTemplate::new(meta.str_opt("tokenizer.chat_template"), &bos_text, &eos_text)?;
        let model = Transformer::load(cfg.clone(), &content, &mut file)?;
        let info = ModelInfo {
            id: opts.id,
            arch: cfg.arch.as_str().to_string(),
            params: cfg.approx_params(),
            quant: file_type_name(cfg.file_type).to_string(),
            ctx: model.max_positions() as u32,
            domains: opts.domains,
            has_chat_template: template.has_model_template(),
            scorer: opts.scorer.unwrap_or_default(),
            path: path.display().to_string(),
        };
        let prefix_kv = model.new_cache();
        Ok(Self {
            model,
            tok,
            template,
            info,
            prefix_ids: Vec::new(),
            prefix_kv,
            default_system: opts.default_system,
        })
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tok
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    /// Token ids of a prompt, with BOS where the model wants it and the text lacks it.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, InferenceError> {
        let text = match prompt {
            Prompt::Chat(msgs) => match &self.default_system {
                Some(sys) if msgs.first().is_none_or(|m| m.role != "system") => {
                    let mut with = Vec::with_capacity(msgs.len() + 1);
                    with.push(ChatMessage::new("system", sys));
                    with.extend(msgs.iter().cloned());
                    self.template.render(&with, true)?
                }
                _ => self.template.render(msgs, true)?,
            },
            Prompt::Raw(s) => s.clone(),
        };
        let mut ids = self.tok.encode(&text)?;
        if self.tok.add_bos {
            if let Some(b) = self.tok.bos {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        if ids.is_empty() {
            return Err(InferenceError::BadRequest("empty prompt".into()));
        }
        Ok(ids)
    }

    /// Run `ids`, reusing the longest prefix still in the cache. Returns the
    /// cache after `ids`, the hidden states of the computed positions, and how
    /// many positions were reused.
    fn prefill(&mut self, ids: &[u32]) -> Result<(KvCache, Tensor, usize), InferenceError> {
        let common = self
            .prefix_ids
            .iter()
            .zip(ids.iter())
            .take_while(|(a, b)| a == b)
            .count();
        // At least the last token is recomputed: its logits are needed.
        let reuse = common.min(ids.len() - 1).min(self.prefix_kv.len());
        let mut kv = if reuse > 0 {
            let mut kv = self.prefix_kv.clone();
            kv.truncate(reuse)?;
            kv
        } else {
            self.model.new_cache()
        };
        let h = match self.model.forward(&ids[reuse..], &mut kv) {
            Ok(h) => h,
            Err(e) => {
                self.forget_prefix();
                return Err(e);
            }
        };
        self.remember_prefix(ids.to_vec(), kv.clone());
        Ok((kv, h, reuse))
    }

    fn remember_prefix(&mut self, ids: Vec<u32>, kv: KvCache) {
        debug_assert_eq!(ids.len(), kv.len());
        self.prefix_ids = ids;
        self.prefix_kv = kv;
    }

    fn forget_prefix(&mut self) {
        self.prefix_ids.clear();
        self.prefix_kv = self.model.new_cache();
    }

    fn check_room(&self, prompt: usize, max_tokens: usize) -> Result<(), InferenceError> {
        let ctx = self.model.max_positions();
        if prompt + max_tokens.max(1) > ctx {
            return Err(InferenceError::TooLong {
                tokens: prompt,
                max_tokens,
                context: ctx,
            });
        }
        Ok(())
    }

    /// First token of `text` that is not pure whitespace (tokenizers that split
    /// digits give " 1" as [" ", "1"]), for letter scoring.
    fn first_token(&self, text: &str) -> Option<u32> {
        let ids = self.tok.encode(text).ok()?;
        ids.iter()
            .copied()
            .find(|&i| !self.tok.token_text(i).trim().is_empty())
    }

    fn choose_letter(&mut self, req: &ChoiceRequest) -> Result<(Vec<f32>, usize), InferenceError> {
        let prompt = letter_prompt(req, self.template.has_model_template());
        let ids = self.prompt_ids(&prompt)?;
        self.check_room(ids.len(), 1)?;
        let (_, h, _) = self.prefill(&ids)?;
        let lp = log_softmax(&self.model.last_logits(&h)?);
        let mut scores = Vec::with_capacity(req.options.len());
        let mut seen = Vec::new();
        for (label, _) in &req.options {
            let mut variants = vec![label.clone(), format!(" {label}")];
            if req.kind == ChoiceKind::Label {
                let cap = capitalize(label);
                variants.push(cap.clone());
                variants.push(format!(" {cap}"));
            }
            let mut ids: Vec<u32> = variants.iter().filter_map(|v| self.first_token(v)).collect();
            ids.sort_unstable();
            ids.dedup();
            if ids.is_empty() || ids.iter().any(|i| seen.contains(i)) {
                return Err(InferenceError::BadRequest(format!(
                    "option `{label}` has no first token of its own; use the continuation scorer"
                )));
            }
            seen.extend(ids.iter().copied());
            // Probability mass of any spelling of the option's first token.
            let mass: f64 = ids.iter().map(|&i| (lp[i as usize] as f64).exp()).sum();
            scores.push(mass.max(1e-30).ln() as f32);
        }
        Ok((scores, ids.len()))
    }

    /// Per option: the log-probability of each of its tokens; and the prompt length.
    fn choose_continuation(&mut self, req: &ChoiceRequest) -> Result<(Vec<Vec<f32>>, usize), InferenceError> {
        let context = continuation_context(req);
        let ctx_ids = self.prompt_ids(&Prompt::Raw(context.clone()))?;
        let mut conts: Vec<Vec<u32>> = Vec::with_capacity(req.options.len());
        for (_, text) in &req.options {
            let cont = format!(" {}", text.trim());
            let full = self.prompt_ids(&Prompt::Raw(format!("{context}{cont}")))?;
            let ids = if full.len() > ctx_ids.len() && full.starts_with(&ctx_ids) {
                full[ctx_ids.len()..].to_vec()
            } else {
                self.tok.encode(&cont)?
            };
            if ids.is_empty() {
                return Err(InferenceError::BadRequest("an option is empty".into()));
            }
            conts.push(ids);
        }
        let longest = conts.iter().map(Vec::len).max().unwrap_or(1);
        self.check_room(ctx_ids.len(), longest)?;
        let (kv, h, _) = self.prefill(&ctx_ids)?;
        let first = log_softmax(&self.model.last_logits(&h)?);
        let mut per_option: Vec<Vec<f32>> = conts.iter().map(|ids| vec![first[ids[0] as usize]]).collect();
        // Every option's tokens after its first, run together after the
        // question's cache (each sees only the question and itself).
        // The rows of one pass are appended to the cache side by side, so
        // options are grouped to fit the context (each fits alone: checked above).
        let room = self.model.max_positions() - ctx_ids.len();
        let mut pending: Vec<usize> = (0..conts.len()).filter(|&i| conts[i].len() > 1).collect();
        while !pending.is_empty() {
            let mut rows = 0;
            let take = pending
                .iter()
                .take_while(|&&i| {
                    rows += conts[i].len() - 1;
                    rows <= room
                })
                .count()
                .max(1);
            let group: Vec<usize> = pending.drain(..take).collect();
            let branches: Vec<&[u32]> = group.iter().map(|&i| &conts[i][..conts[i].len() - 1]).collect();
            let h = self.model.forward_branches(&branches, &kv)?;
            let logits = self.model.logits(&h)?;
            let mut row = 0;
            for &i in &group {
                let n = conts[i].len() - 1;
                per_option[i].extend(row_logprobs(&logits.narrow(0, row, n)?, &conts[i][1..])?);
                row += n;
            }
        }
        Ok((per_option, ctx_ids.len()))
    }
}

/// The mcq/label question with its options, asking for the letter or label.
fn letter_prompt(req: &ChoiceRequest, chat: bool) -> Prompt {
    let mut body = req.question.trim().to_string();
    match req.kind {
        ChoiceKind::Mcq => {
            for (label, text) in &req.options {
                body.push_str(&format!("\n{label}. {}", text.trim()));
            }
        }
        ChoiceKind::Label => {
            let labels: Vec<&str> = req.options.iter().map(|(l, _)| l.as_str()).collect();
            body.push_str(&format!("\nOptions: {}", labels.join(", ")));
        }
    }
    if chat {
        let ask = match req.kind {
            ChoiceKind::Mcq => "Answer with the letter of the correct option.",
            ChoiceKind::Label => "Answer with one of the options.",
        };
        Prompt::Chat(vec![ChatMessage::new("user", &format!("{body}\n{ask}"))])
    } else {
        let q = if req.kind == ChoiceKind::Mcq {
            format!("Question: {body}\nAnswer:")
        } else {
            format!("{body}\nAnswer:")
        };
        Prompt::Raw(q)
    }
}

/// lm-evaluation-harness style context: options are continuations of it.
fn continuation_context(req: &ChoiceRequest) -> String {
    match req.kind {
        ChoiceKind::Mcq => format!("Question: {}\nAnswer:", req.question.trim()),
        ChoiceKind::Label => format!("{}\nAnswer:", req.question.trim()),
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

impl Backend for CandleBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn generate(
        &mut self,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, InferenceError> {
        let t0 = Instant::now();
        let ids = self.prompt_ids(&req.prompt)?;
        let max_tokens = req.max_tokens.max(1);
        self.check_room(ids.len(), max_tokens)?;
        let mut stops: Vec<String> = req.stop.iter().filter(|s| !s.is_empty()).cloned().collect();
        if matches!(req.prompt, Prompt::Chat(_)) {
            stops.extend(self.template.stop_strings());
        }
        let (mut kv, h, cached) = self.prefill(&ids)?;
        let mut logits = self.model.last_logits(&h)?;
        let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        let mut sampler = Sampler::new(req.temperature, req.top_p, req.seed);
        let mut fed = ids.clone();
        let mut out_ids: Vec<u32> = Vec::new();
        let mut tokens: Vec<TokenLogprob> = Vec::new();
        let mut stream = self.tok.stream();
        let mut text = String::new();
        let mut finish = FinishReason::Length;
        let mut stop_lp = None;
        for step in 0..max_tokens {
            let lp = log_softmax(&logits);
            let next = sampler.sample(&lp);
            let next_lp = lp[next as usize];
            if self.tok.is_stop(next) {
                finish = FinishReason::Stop;
                stop_lp = Some(next_lp);
                break;
            }
            out_ids.push(next);
            let top = top_k(&lp, req.top_logprobs)
                .into_iter()
                .map(|(i, l)| (self.tok.token_text(i), l))
                .collect();
            tokens.push(TokenLogprob {
                id: next,
                text: self.tok.token_text(next),
                logprob: next_lp,
                top,
            });
            if let Some(piece) = stream.push(next)? {
                text.push_str(&piece);
                if let Some(cut) = find_stop(&text, &stops) {
                    text.truncate(cut);
                    finish = FinishReason::Stop;
                    break;
                }
                if !on_text(&piece) {
                    return Err(InferenceError::Cancelled);
                }
            }
            if step + 1 == max_tokens {
                break;
            }
            let h = self.model.forward(&[next], &mut kv)?;
            fed.push(next);
            logits = self.model.last_logits(&h)?;
        }
        if finish == FinishReason::Length {
            // Flush any bytes held back for an incomplete character.
            let full = stream.text()?;
            if full.len() > text.len() && full.starts_with(&text) {
                let rest = full[text.len()..].to_string();
                on_text(&rest);
                text = full;
            }
        }
        drop(stream);
        self.remember_prefix(fed, kv);
        let mut lps: Vec<f32> = tokens.iter().map(|t| t.logprob).collect();
        if lps.is_empty() {
            lps.extend(stop_lp);
        }
        let (mean_logprob, min_prob, confidence) = summarize_logprobs(&lps);
        Ok(Generation {
            text,
            completion_tokens: tokens.len(),
            tokens,
            prompt_tokens: ids.len(),
            finish_reason: finish,
            mean_logprob,
            min_prob,
            confidence,
            prefill_ms,
            decode_ms: t1.elapsed().as_secs_f64() * 1e3,
            cached_tokens: cached,
        })
    }

    fn choose(&mut self, req: &ChoiceRequest) -> Result<ChoiceResult, InferenceError> {
        if req.options.len() < 2 {
            return Err(InferenceError::BadRequest(
                "a choice needs at least two options".into(),
            ));
        }
        let t0 = Instant::now();
        // Per option: its score, and the log-probabilities of its tokens.
        let (scores, probs, token_lps, prompt_tokens) = match req.scorer {
            Scorer::Letter => {
                let (scores, n) = self.choose_letter(req)?;
                let probs = softmax_scaled(&scores, 1.0);
                let lps = scores.iter().map(|&s| vec![s]).collect::<Vec<_>>();
                (scores, probs, lps, n)
            }
            Scorer::Continuation => {
                let (lps, n) = self.choose_continuation(req)?;
                let per_byte: Vec<f32> = req
                    .options
                    .iter()
                    .zip(&lps)
                    .map(|((_, t), l)| l.iter().sum::<f32>() / (t.trim().len() as f32 + 1.0))
                    .collect();
                // Per-byte scores rescaled to the mean option length behave like
                // total log-likelihoods of equally long options.
                let mean_len = req
                    .options
                    .iter()
                    .map(|(_, t)| t.trim().len() as f32 + 1.0)
                    .sum::<f32>()
                    / req.options.len() as f32;
                let probs = softmax_scaled(&per_byte, mean_len);
                (per_byte, probs, lps, n)
            }
        };
        let index = argmax(&scores) as usize;
        let mut sorted = probs.clone();
        sorted.sort_by(|a, b| b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal));
        let margin = sorted[0] - sorted.get(1).copied().unwrap_or(0.0);
        let chosen = &token_lps[index];
        let (mean_logprob, min_prob, _) = summarize_logprobs(chosen);
        Ok(ChoiceResult {
            index,
            label: req.options[index].0.clone(),
            mean_logprob,
            min_prob,
            confidence: probs[index],
            probs,
            scores,
            margin,
            scorer: req.scorer,
            prompt_tokens,
            elapsed_ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }

    fn score_text(&mut self, text: &str) -> Result<TextScore, InferenceError> {
        let ids = self.tok.encode_with_bos(text)?;
        if ids.len() < 2 {
            return Err(InferenceError::BadRequest(
                "text needs at least two tokens".into(),
            ));
        }
        self.check_room(ids.len(), 0)?;
        let mut kv = self.model.new_cache();
        let h = self.model.forward(&ids, &mut kv)?;
        let n = ids.len() - 1;
        let mut nll = Vec::with_capacity(n);
        let mut start = 0;
        while start < n {
            let len = LOGIT_CHUNK.min(n - start);
            let logits = self.model.logits(&h.narrow(0, start, len)?)?;
            let lp = row_logprobs(&logits, &ids[start + 1..start + 1 + len])?;
            nll.extend(lp.iter().map(|x| -x));
            start += len;
        }
        let mean_nll = nll.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        Ok(TextScore {
            bos: self.tok.add_bos,
            token_ids: ids,
            nll,
            mean_nll,
        })
    }

    /// The prefix cache is the only per-request state (weights never
    /// change); a request that panicked may have left it half-updated.
    fn reset(&mut self) {
        self.forget_prefix();
    }
}

/// Byte offset where the first stop string starts, if any.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Timings of one synthetic benchmark run.
#[derive(Debug, Clone, Copy)]
pub struct BenchRun {
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl CandleBackend {
    /// Prefill `prompt_tokens` tokens from an empty cache, then decode
    /// `gen_tokens` greedy tokens (end-of-text ignored), timing both phases.
    pub fn bench_run(&mut self, prompt_tokens: usize, gen_tokens: usize) -> Result<BenchRun, InferenceError> {
        let ids = self.bench_prompt(prompt_tokens)?;
        self.check_room(ids.len(), gen_tokens)?;
        let t0 = Instant::now();
        let mut kv = self.model.new_cache();
        let h = self.model.forward(&ids, &mut kv)?;
        let mut logits = self.model.last_logits(&h)?;
        let prefill_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for _ in 0..gen_tokens {
            let next = argmax(&logits);
            let h = self.model.forward(&[next], &mut kv)?;
            logits = self.model.last_logits(&h)?;
        }
        Ok(BenchRun {
            prefill_s,
            decode_s: t1.elapsed().as_secs_f64(),
        })
    }

    /// Exactly `n` tokens of ordinary English text.
    pub fn bench_prompt(&self, n: usize) -> Result<Vec<u32>, InferenceError> {
        const TEXT: &str = "The swarm of small models answered the question together. Each device on the network ran its own model, and when one of them was unsure, it asked its neighbours for a vote. Only the hardest questions were sent to the large model in the cloud. ";
        let mut ids = Vec::new();
        if self.tok.add_bos {
            ids.extend(self.tok.bos);
        }
        let chunk = self.tok.encode(TEXT)?;
        if chunk.is_empty() {
            return Err(InferenceError::Tokenizer(
                "benchmark text encodes to nothing".into(),
            ));
        }
        while ids.len() < n {
            ids.extend(chunk.iter().copied());
        }
        ids.truncate(n.max(1));
        Ok(ids)
    }
}
