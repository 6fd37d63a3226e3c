//! Multi-step requests (`POST /v1/swarm/workflows`): a small typed plan of
//! steps (a task kind and a prompt template each, e.g. extract → classify →
//! summarise), its validation, the choice of a model per step, and running the
//! steps in order through the router's one query path, with a bounded feedback
//! loop per step. This module owns the plan and its execution; the HTTP shape
//! of the request and the response is `api::workflow`'s.
//!
//! Templates know three placeholders: `{{input}}` (the workflow's input),
//! `{{steps.NAME}}` (the output of an earlier step) and `{{previous}}` (this
//! step's output in its previous round; empty in the first). Everything a plan
//! can get wrong is found by [`WorkflowRequest::validate`] before any step runs.

use std::time::{Duration, Instant};

use serde::Deserialize;
use swarm_protocol::{clip_owned, Choice, ModelCard, Privacy, Task};
use thiserror::Error;

use crate::config::NodeConfig;
use crate::inference::ChatMessage;
use crate::router::{Answer, ChatParams, ChatRequest, RouteError, Router, SwarmExt};
use crate::swarm::SwarmView;

/// Steps in one plan.
pub const MAX_STEPS: usize = 8;
/// Bytes of a step's name.
pub const MAX_NAME_LEN: usize = 32;
/// Bytes of one step's template.
pub const MAX_TEMPLATE_BYTES: usize = 8 * 1024;
/// Bytes of the workflow's input.
pub const MAX_INPUT_BYTES: usize = 32 * 1024;
/// Bytes of a rendered prompt; longer ones are clipped (earlier outputs can
/// make a prompt grow past what its template alone allows).
pub const MAX_PROMPT_BYTES: usize = 32 * 1024;
/// Rounds of one step's feedback loop.
pub const MAX_ROUNDS: u32 = 5;
/// Rounds over the whole plan, counting each step at its `max_rounds`: the
/// bound on how many queries one workflow can cost.
pub const MAX_TOTAL_ROUNDS: u32 = 16;
/// Labels of a `label` step.
pub const LABELS: std::ops::RangeInclusive<usize> = 2..=16;
/// Choices of an `mcq` step (labelled A, B, …).
pub const CHOICES: std::ops::RangeInclusive<usize> = 2..=8;
/// Bytes of the short strings: `repeat_until`, `domain`, `model`, `team`.
const MAX_SHORT: usize = 256;

/// A workflow as posted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowRequest {
    /// What `{{input}}` stands for.
    pub input: String,
    pub steps: Vec<Step>,
    /// The team the workflow runs for: every step goes only to the team's
    /// peers (and to the cloud only if the team's policy allows it).
    #[serde(default)]
    pub team: Option<String>,
    /// Applies to every step (the chat endpoint's `swarm.privacy`).
    #[serde(default)]
    pub privacy: Option<Privacy>,
}

/// One step of a posted workflow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Unique in the plan; later steps refer to its output as `{{steps.NAME}}`.
    pub name: String,
    /// `free`, `short`, `mcq` or `label`.
    pub task: String,
    /// The prompt template.
    pub input: String,
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    #[serde(default)]
    pub choices: Option<Vec<String>>,
    /// Ask a model whose card lists this domain (ignored when `model` is set).
    #[serde(default)]
    pub domain: Option<String>,
    /// Ask this model, on this node or a peer.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Re-run the step until its output contains this (case-insensitive)…
    #[serde(default)]
    pub repeat_until: Option<String>,
    /// …or it has run this many rounds (1..=5, default 1).
    #[serde(default)]
    pub max_rounds: Option<u32>,
}

/// Why a workflow was refused or failed. All but `NoDomain` and `Step` are
/// found before anything runs.
#[derive(Debug, Error)]
pub enum WorkflowError {
    #[error("a workflow has 1..={MAX_STEPS} steps, this one has {0}")]
    StepCount(usize),
    #[error("input is {0} bytes, at most {MAX_INPUT_BYTES}")]
    InputTooLarge(usize),
    #[error("team must be 1..=32 of [A-Za-z0-9_-]")]
    BadTeam,
    #[error("steps[{index}].name `{name}`: 1..={MAX_NAME_LEN} characters of A-Z, a-z, 0-9, `_` and `-`")]
    BadName { index: usize, name: String },
    #[error("duplicate step name `{0}`")]
    DuplicateName(String),
    #[error("step `{step}`: unknown task `{task}` (free | short | mcq | label)")]
    UnknownTask { step: String, task: String },
    #[error("step `{step}`: {reason}")]
    BadTask { step: String, reason: String },
    #[error("step `{step}`: input template is {bytes} bytes, at most {MAX_TEMPLATE_BYTES}")]
    TemplateTooLarge { step: String, bytes: usize },
    #[error("step `{step}`: unknown placeholder `{{{{{placeholder}}}}}` (input | steps.NAME | previous)")]
    UnknownPlaceholder { step: String, placeholder: String },
    #[error("step `{step}`: `{{{{steps.{target}}}}}` names no earlier step")]
    UnknownStep { step: String, target: String },
    #[error("step `{step}`: `{{{{steps.{target}}}}}` names a later step (or this one): steps see only earlier outputs")]
    LaterStep { step: String, target: String },
    #[error("step `{step}`: `{{{{previous}}}}` needs repeat_until (it is empty without a feedback loop)")]
    PreviousWithoutLoop { step: String },
    #[error("step `{step}`: max_rounds must be in 1..={MAX_ROUNDS}, got {got}")]
    MaxRounds { step: String, got: u32 },
    #[error("step `{step}`: max_rounds > 1 needs repeat_until")]
    RoundsWithoutLoop { step: String },
    #[error("the steps' max_rounds add up to {0}, at most {MAX_TOTAL_ROUNDS}")]
    TotalRounds(u32),
    #[error("step `{step}`: max_tokens must be in 1..={limit}, got {got}")]
    MaxTokens { step: String, got: u32, limit: u32 },
    #[error("step `{step}`: {field} must be 1..={MAX_SHORT} bytes")]
    BadField { step: String, field: &'static str },
    #[error("step `{step}`: no model on this node or its peers has domain `{domain}`")]
    NoDomain { step: String, domain: String },
    #[error("step `{step}`: {error}")]
    Step {
        step: String,
        #[source]
        error: RouteError,
    },
}

/// A piece of a parsed template.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Input,
    /// The output of the step at this index (always an earlier one).
    Output(usize),
    Previous,
}

/// A validated step.
#[derive(Debug, Clone)]
pub struct PlannedStep {
    pub name: String,
    pub task: Task,
    template: Vec<Piece>,
    pub domain: Option<String>,
    pub model: Option<String>,
    pub max_tokens: u32,
    pub repeat_until: Option<String>,
    pub max_rounds: u32,
}

/// A validated workflow: only a `Plan` runs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub input: String,
    pub steps: Vec<PlannedStep>,
    pub team: Option<String>,
    pub privacy: Option<Privacy>,
}

/// One step's result: its last round's answer (with its provenance).
#[derive(Debug, Clone)]
pub struct StepResult {
    pub name: String,
    pub task: &'static str,
    pub rounds: u32,
    /// `repeat_until` was met (always true for a step without one).
    pub converged: bool,
    pub answer: Answer,
}

#[derive(Debug, Clone)]
pub struct WorkflowResult {
    pub steps: Vec<StepResult>,
    pub elapsed_ms: u64,
}

impl WorkflowResult {
    /// The workflow's output: its last step's.
    pub fn output(&self) -> &str {
        self.steps.last().map(|s| s.answer.text.as_str()).unwrap_or("")
    }
}

fn valid_name(n: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn short_ok(s: &str) -> bool {
    (1..=MAX_SHORT).contains(&s.len())
}

/// Parse `template` of the step at `index`; `names` are all the plan's step names.
fn parse_template(
    step: &str,
    index: usize,
    template: &str,
    names: &[&str],
) -> Result<Vec<Piece>, WorkflowError> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        // A `{{` without a closing `}}` is text (prompts may hold code).
        let Some(close) = rest[open + 2..].find("}}") else {
            break;
        };
        if open > 0 {
            pieces.push(Piece::Text(rest[..open].to_string()));
        }
        let inner = rest[open + 2..open + 2 + close].trim();
        pieces.push(match inner {
            "input" => Piece::Input,
            "previous" => Piece::Previous,
            _ => match inner.strip_prefix("steps.") {
                Some(target) => match names.iter().position(|n| *n == target) {
                    Some(i) if i < index => Piece::Output(i),
                    Some(_) => {
                        return Err(WorkflowError::LaterStep {
                            step: step.to_string(),
                            target: target.to_string(),
                        })
                    }
                    None => {
                        return Err(WorkflowError::UnknownStep {
                            step: step.to_string(),
                            target: target.to_string(),
                        })
                    }
                },
                None => {
                    return Err(WorkflowError::UnknownPlaceholder {
                        step: step.to_string(),
                        // Quoted back in the error: keep it short.
                        placeholder: swarm_protocol::clip(inner, 64).to_string(),
                    });
                }
            },
        });
        rest = &rest[open + 2 + close + 2..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_string()));
    }
    Ok(pieces)
}

fn parse_task(s: &Step) -> Result<Task, WorkflowError> {
    let bad = |reason: String| WorkflowError::BadTask {
        step: s.name.clone(),
        reason,
    };
    let task = match s.task.as_str() {
        "free" => Task::Free,
        "short" => Task::Short,
        "label" => {
            let labels = s
                .labels
                .clone()
                .ok_or_else(|| bad("task label needs labels".into()))?;
            if !LABELS.contains(&labels.len()) {
                return Err(bad(format!(
                    "labels: {}..={} of them, got {}",
                    LABELS.start(),
                    LABELS.end(),
                    labels.len()
                )));
            }
            Task::Label { labels }
        }
        "mcq" => {
            let choices = s
                .choices
                .as_ref()
                .ok_or_else(|| bad("task mcq needs choices".into()))?;
            if !CHOICES.contains(&choices.len()) {
                return Err(bad(format!(
                    "choices: {}..={} of them, got {}",
                    CHOICES.start(),
                    CHOICES.end(),
                    choices.len()
                )));
            }
            Task::Mcq {
                choices: choices
                    .iter()
                    .zip(b'A'..)
                    .map(|(t, l)| Choice {
                        label: char::from(l).to_string(),
                        text: t.clone(),
                    })
                    .collect(),
            }
        }
        other => {
            return Err(WorkflowError::UnknownTask {
                step: s.name.clone(),
                task: swarm_protocol::clip(other, 32).to_string(),
            })
        }
    };
    if !matches!(task, Task::Label { .. }) && s.labels.is_some() {
        return Err(bad("labels belong to task label".into()));
    }
    if !matches!(task, Task::Mcq { .. }) && s.choices.is_some() {
        return Err(bad("choices belong to task mcq".into()));
    }
    // The protocol's own limits on labels and choices (lengths, uniqueness).
    swarm_protocol::Validate::validate(&task).map_err(|e| bad(e.to_string()))?;
    Ok(task)
}

impl WorkflowRequest {
    /// Check the whole plan against the limits and `cfg`'s token limits.
    pub fn validate(self, cfg: &NodeConfig) -> Result<Plan, WorkflowError> {
        if !(1..=MAX_STEPS).contains(&self.steps.len()) {
            return Err(WorkflowError::StepCount(self.steps.len()));
        }
        if self.input.len() > MAX_INPUT_BYTES {
            return Err(WorkflowError::InputTooLarge(self.input.len()));
        }
        if self
            .team
            .as_deref()
            .is_some_and(|t| swarm_protocol::check_team("team", t).is_err())
        {
            return Err(WorkflowError::BadTeam);
        }
        for (index, s) in self.steps.iter().enumerate() {
            if !valid_name(&s.name) {
                return Err(WorkflowError::BadName {
                    index,
                    name: swarm_protocol::clip(&s.name, 64).to_string(),
                });
            }
            if self.steps[..index].iter().any(|p| p.name == s.name) {
                return Err(WorkflowError::DuplicateName(s.name.clone()));
            }
        }
        let names: Vec<&str> = self.steps.iter().map(|s| s.name.as_str()).collect();
        let mut steps = Vec::with_capacity(self.steps.len());
        let mut total_rounds = 0u32;
        for (index, s) in self.steps.iter().enumerate() {
            let step = || s.name.clone();
            let task = parse_task(s)?;
            if s.input.len() > MAX_TEMPLATE_BYTES {
                return Err(WorkflowError::TemplateTooLarge {
                    step: step(),
                    bytes: s.input.len(),
                });
            }
            let template = parse_template(&s.name, index, &s.input, &names)?;
            for (field, v) in [
                ("domain", &s.domain),
                ("model", &s.model),
                ("repeat_until", &s.repeat_until),
            ] {
                if v.as_deref().is_some_and(|v| !short_ok(v)) {
                    return Err(WorkflowError::BadField { step: step(), field });
                }
            }
            let max_rounds = s.max_rounds.unwrap_or(1);
            if !(1..=MAX_ROUNDS).contains(&max_rounds) {
                return Err(WorkflowError::MaxRounds {
                    step: step(),
                    got: max_rounds,
                });
            }
            if s.repeat_until.is_none() {
                if max_rounds > 1 {
                    return Err(WorkflowError::RoundsWithoutLoop { step: step() });
                }
                if template.contains(&Piece::Previous) {
                    return Err(WorkflowError::PreviousWithoutLoop { step: step() });
                }
            }
            total_rounds += max_rounds;
            let limit = cfg.max_tokens_limit;
            let max_tokens = s.max_tokens.unwrap_or(cfg.default_max_tokens);
            if max_tokens == 0 || max_tokens > limit {
                return Err(WorkflowError::MaxTokens {
                    step: step(),
                    got: max_tokens,
                    limit,
                });
            }
            steps.push(PlannedStep {
                name: s.name.clone(),
                task,
                template,
                domain: s.domain.clone(),
                model: s.model.clone(),
                max_tokens,
                repeat_until: s.repeat_until.clone(),
                max_rounds,
            });
        }
        if total_rounds > MAX_TOTAL_ROUNDS {
            return Err(WorkflowError::TotalRounds(total_rounds));
        }
        Ok(Plan {
            input: self.input,
            steps,
            team: self.team,
            privacy: self.privacy,
        })
    }
}

/// The model for `domain`: among this node's cards and its peers' adverts,
/// the fastest (advertised decode speed) whose card lists the domain; on a
/// tie this node's (no network hop), then the smaller id (a stable choice).
/// With a `team`, only the team's peers count.
pub fn model_for_domain(
    domain: &str,
    mine: &[ModelCard],
    view: &SwarmView,
    team: Option<&str>,
) -> Option<String> {
    let has = |c: &ModelCard| c.domains.iter().any(|d| d.eq_ignore_ascii_case(domain));
    let ours = mine.iter().filter(|c| has(c)).map(|c| (c, true));
    let theirs = view
        .peers
        .iter()
        .filter(|p| Router::serves_team(&p.advert, team))
        .flat_map(|p| p.advert.models.iter())
        .filter(|c| has(c))
        .map(|c| (c, false));
    ours.chain(theirs)
        .min_by(|(a, a_mine), (b, b_mine)| {
            b.tok_s
                .total_cmp(&a.tok_s)
                .then(b_mine.cmp(a_mine))
                .then(a.id.cmp(&b.id))
        })
        .map(|(c, _)| c.id.clone())
}

impl Plan {
    /// The model each step asks (`None`: the node's default, routed as usual),
    /// chosen before anything runs so that a missing domain costs no query.
    pub fn targets(&self, router: &Router) -> Result<Vec<Option<String>>, WorkflowError> {
        let mine = router.models().cards();
        let view = router.snapshot();
        self.steps
            .iter()
            .map(|s| match (&s.model, &s.domain) {
                (Some(m), _) => Ok(Some(m.clone())),
                (None, Some(d)) => model_for_domain(d, &mine, &view, self.team.as_deref())
                    .map(Some)
                    .ok_or_else(|| WorkflowError::NoDomain {
                        step: s.name.clone(),
                        domain: d.clone(),
                    }),
                (None, None) => Ok(None),
            })
            .collect()
    }

    /// Render step `index`'s prompt from the outputs so far, clipped to
    /// [`MAX_PROMPT_BYTES`] on a character boundary.
    fn render(&self, index: usize, outputs: &[String], previous: &str) -> String {
        let mut out = String::new();
        for p in &self.steps[index].template {
            out.push_str(match p {
                Piece::Text(t) => t,
                Piece::Input => &self.input,
                Piece::Output(i) => outputs.get(*i).map(String::as_str).unwrap_or(""),
                Piece::Previous => previous,
            });
            // Stop copying once over: the rest would be clipped anyway.
            if out.len() > MAX_PROMPT_BYTES {
                break;
            }
        }
        clip_owned(out, MAX_PROMPT_BYTES)
    }

    /// Run the steps in order, each through `router.chat`, within `deadline`
    /// for the whole workflow. The first failing step fails the workflow.
    pub async fn run(
        &self,
        router: &Router,
        targets: &[Option<String>],
        deadline: Instant,
    ) -> Result<WorkflowResult, WorkflowError> {
        let t0 = Instant::now();
        let mut outputs: Vec<String> = Vec::with_capacity(self.steps.len());
        let mut results = Vec::with_capacity(self.steps.len());
        for (index, s) in self.steps.iter().enumerate() {
            let fail = |error| WorkflowError::Step {
                step: s.name.clone(),
                error,
            };
            let until = s.repeat_until.as_deref().map(str::to_lowercase);
            let mut previous = String::new();
            let mut rounds = 0;
            let (answer, converged) = loop {
                rounds += 1;
                let left = deadline.saturating_duration_since(Instant::now());
                // Every step gets what is left of the workflow's one deadline.
                if left.is_zero() {
                    return Err(fail(RouteError::Timeout));
                }
                let req = ChatRequest {
                    model: targets.get(index).cloned().flatten(),
                    messages: vec![ChatMessage::new("user", &self.render(index, &outputs, &previous))],
                    params: ChatParams::greedy(s.max_tokens),
                    ext: SwarmExt {
                        task: Some(s.task.clone()),
                        privacy: self.privacy,
                        team: self.team.clone(),
                        ..SwarmExt::default()
                    },
                    deadline,
                };
                // As the chat endpoint: a margin past the deadline catches only what hangs.
                let asked = tokio::time::timeout(left + Duration::from_secs(1), router.chat(req));
                let answer = match asked.await {
                    Ok(r) => r.map_err(fail)?,
                    Err(_) => return Err(fail(RouteError::Timeout)),
                };
                let met = until
                    .as_deref()
                    .is_none_or(|u| answer.text.to_lowercase().contains(u));
                if met || rounds >= s.max_rounds {
                    break (answer, met);
                }
                previous = answer.text;
            };
            outputs.push(answer.text.clone());
            results.push(StepResult {
                name: s.name.clone(),
                task: s.task.kind(),
                rounds,
                converged,
                answer,
            });
        }
        Ok(WorkflowResult {
            steps: results,
            elapsed_ms: t0.elapsed().as_millis() as u64,
        })
    }
}
