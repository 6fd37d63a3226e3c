//! Scenario files (`configs/simnet/*.toml`): swarm size, timing, network, models, queries, faults.
//!
//! Every key has a default, so a scenario only states what makes it different. Unknown keys are
//! rejected so that a typo does not silently run a different experiment.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ScenarioError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot parse {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("no scenario file or name {0:?} (looked in configs/simnet/)")]
    NotFound(String),
    #[error("invalid scenario: {0}")]
    Invalid(String),
}

/// A value per task kind.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerKind<T> {
    pub mcq: T,
    pub label: T,
    pub short: T,
    pub free: T,
}

impl<T: Copy> PerKind<T> {
    pub fn get(&self, kind: Kind) -> T {
        *self.get_ref(kind)
    }
}

impl<T> PerKind<T> {
    pub fn get_ref(&self, kind: Kind) -> &T {
        match kind {
            Kind::Mcq => &self.mcq,
            Kind::Label => &self.label,
            Kind::Short => &self.short,
            Kind::Free => &self.free,
        }
    }
}

/// Task kinds, in a fixed order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Mcq,
    Label,
    Short,
    Free,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Mcq, Kind::Label, Kind::Short, Kind::Free];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Mcq => "mcq",
            Kind::Label => "label",
            Kind::Short => "short",
            Kind::Free => "free",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    pub advert_interval_ms: u64,
    /// Adverts a peer may miss before it expires.
    pub advert_missed: u32,
    pub hysteresis_ms: u64,
    pub startup_grace_ms: u64,
    pub confirm_ms: u64,
    /// Initial nodes boot uniformly within this window.
    pub boot_spread_ms: u64,
    /// Quiet time after a disruption before invariants must hold; 0 = derived from the timers.
    pub settle_ms: u64,
    /// How often invariants are sampled.
    pub check_interval_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            advert_interval_ms: 1000,
            advert_missed: 3,
            hysteresis_ms: 5000,
            startup_grace_ms: 1500,
            confirm_ms: 3000,
            boot_spread_ms: 1000,
            settle_ms: 0,
            check_interval_ms: 100,
        }
    }
}

impl Timing {
    /// Settle time: expiry, two more advert rounds to notice, elect and announce, plus the
    /// longer of the confirmation and startup-grace waits.
    pub fn settle_ms(&self) -> u64 {
        if self.settle_ms > 0 {
            return self.settle_ms;
        }
        self.advert_interval_ms * (u64::from(self.advert_missed) + 2)
            + self.confirm_ms.max(self.startup_grace_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// Per-link base latency, drawn once per link uniformly from `[min, max]` ms.
    pub latency_ms: [f64; 2],
    /// Per-message extra delay, uniform in `[0, jitter_ms]`.
    pub jitter_ms: f64,
    /// Probability a gossip message is dropped; for request/response it costs a retransmission.
    pub loss: f64,
    /// Probability a vote reply is delivered twice.
    pub duplicate: f64,
    pub rto_ms: f64,
    pub dial_timeout_ms: f64,
    /// Gossip mesh degree (gossipsub D, D_lo, D_hi).
    pub mesh_degree: usize,
    pub mesh_degree_low: usize,
    pub mesh_degree_high: usize,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            latency_ms: [1.0, 3.0],
            jitter_ms: 1.0,
            loss: 0.0,
            duplicate: 0.0,
            rto_ms: 200.0,
            dial_timeout_ms: 1000.0,
            mesh_degree: 6,
            mesh_degree_low: 4,
            mesh_degree_high: 12,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Clock {
    /// Each node's clock is offset by a uniform value in `[-skew_ms, skew_ms]`.
    pub skew_ms: f64,
    /// ... and runs fast or slow by up to this many parts per million.
    pub drift_ppm: f64,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            skew_ms: 50.0,
            drift_ppm: 100.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cloud {
    /// Cloud-capable nodes, spread evenly over the initial node indices.
    pub nodes: usize,
    /// Explicit indices instead (overrides `nodes`).
    pub indices: Vec<usize>,
    /// Priorities, cycled over the cloud nodes.
    pub priorities: Vec<i32>,
    /// Calls each cloud node may make.
    pub budget: u32,
    pub model: String,
    pub accuracy: PerKind<f64>,
    pub latency_ms: f64,
    pub latency_jitter_ms: f64,
}

impl Default for Cloud {
    fn default() -> Self {
        Cloud {
            nodes: 2,
            indices: Vec::new(),
            priorities: vec![0],
            budget: 100_000,
            model: "cloud-large".into(),
            accuracy: PerKind {
                mcq: 0.95,
                label: 0.95,
                short: 0.8,
                free: 0.9,
            },
            latency_ms: 900.0,
            latency_jitter_ms: 400.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Queries {
    /// Arrivals per second over the whole swarm (Poisson).
    pub rate_per_s: f64,
    pub start_s: f64,
    pub mix: PerKind<f64>,
    /// Shares of privacy levels.
    pub privacy: PrivacyMix,
    /// Share of queries the safety classifier flags.
    pub safety_share: f64,
    /// Forced route for every query: auto, local, vote or cloud.
    pub route: String,
    pub k: usize,
    pub quorum: usize,
    pub vote_deadline_ms: u32,
    pub escalate_deadline_ms: u32,
    pub tau_local: f32,
    pub tau_vote: f32,
    /// Cosine threshold for clustering free-text answers.
    pub free_threshold: f32,
    /// Generated tokens per answer.
    pub tokens: PerKind<u32>,
    /// Questions per kind in the generated bank.
    pub pool: usize,
    /// Spread of question difficulty (logit units); makes errors correlate across models.
    pub difficulty_sd: f64,
    /// Voter queue length at which it answers `Overloaded`.
    pub max_queue: u32,
    /// Replay answers from these JSONL files (relative to the scenario) instead of profiles.
    pub answer_cache: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyMix {
    pub cloud: f64,
    pub swarm: f64,
    pub device: f64,
}

impl Default for Queries {
    fn default() -> Self {
        Queries {
            rate_per_s: 2.0,
            start_s: 5.0,
            mix: PerKind {
                mcq: 0.4,
                label: 0.2,
                short: 0.3,
                free: 0.1,
            },
            privacy: PrivacyMix {
                cloud: 0.9,
                swarm: 0.08,
                device: 0.02,
            },
            safety_share: 0.02,
            route: "auto".into(),
            k: 3,
            quorum: 2,
            vote_deadline_ms: 4000,
            escalate_deadline_ms: 8000,
            tau_local: 0.8,
            tau_vote: 0.6,
            free_threshold: 0.85,
            tokens: PerKind {
                mcq: 4,
                label: 3,
                short: 12,
                free: 96,
            },
            pool: 500,
            difficulty_sd: 1.0,
            max_queue: 4,
            answer_cache: Vec::new(),
        }
    }
}

/// A simulated local model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelProfile {
    pub id: String,
    /// Relative share of nodes carrying it.
    #[serde(default = "one")]
    pub share: f64,
    #[serde(default = "default_arch")]
    pub arch: String,
    #[serde(default)]
    pub params: u64,
    /// Probability of a correct answer per kind, for a question of average difficulty.
    pub accuracy: PerKind<f64>,
    /// Confidence when right: mean, standard deviation (clamped to [0, 1]).
    #[serde(default = "conf_correct")]
    pub conf_correct: [f64; 2],
    /// Confidence when wrong.
    #[serde(default = "conf_wrong")]
    pub conf_wrong: [f64; 2],
    #[serde(default = "prefill")]
    pub prefill_ms: f64,
    #[serde(default = "per_token")]
    pub ms_per_token: f64,
    /// Probability of an unusable answer (fails normalisation).
    #[serde(default = "garbage")]
    pub garbage: f64,
}

fn one() -> f64 {
    1.0
}
fn default_arch() -> String {
    "llama".into()
}
fn conf_correct() -> [f64; 2] {
    [0.75, 0.15]
}
fn conf_wrong() -> [f64; 2] {
    [0.5, 0.2]
}
fn prefill() -> f64 {
    250.0
}
fn per_token() -> f64 {
    15.0
}
fn garbage() -> f64 {
    0.02
}

/// A fault or change at a point in virtual time.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "RawEvent")]
pub struct Event {
    pub at_s: f64,
    pub action: Action,
}

#[derive(Debug, Clone)]
pub enum Action {
    /// Split the initial nodes into `groups` contiguous index ranges that cannot talk.
    Partition { groups: usize },
    /// Everyone can talk again.
    Heal,
    /// Crash nodes: `target` = "gateway" (the current one), "random", or "node:<index>".
    Crash { target: String, count: usize },
    /// Restart every node crashed by a `crash` event (not churn departures).
    Restart,
    /// Set the gossip loss probability.
    Loss { value: f64 },
    /// Make a node's cloud endpoint (un)reachable; target as for crash.
    Cloud { target: String, reachable: bool },
}

/// TOML shape of an event: `{ at_s = 20, kind = "crash", target = "gateway" }`.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum RawEvent {
    Partition {
        at_s: f64,
        groups: usize,
    },
    Heal {
        at_s: f64,
    },
    Crash {
        at_s: f64,
        target: String,
        #[serde(default = "one_usize")]
        count: usize,
    },
    Restart {
        at_s: f64,
    },
    Loss {
        at_s: f64,
        value: f64,
    },
    Cloud {
        at_s: f64,
        target: String,
        reachable: bool,
    },
}

impl From<RawEvent> for Event {
    fn from(r: RawEvent) -> Self {
        let (at_s, action) = match r {
            RawEvent::Partition { at_s, groups } => (at_s, Action::Partition { groups }),
            RawEvent::Heal { at_s } => (at_s, Action::Heal),
            RawEvent::Crash { at_s, target, count } => (at_s, Action::Crash { target, count }),
            RawEvent::Restart { at_s } => (at_s, Action::Restart),
            RawEvent::Loss { at_s, value } => (at_s, Action::Loss { value }),
            RawEvent::Cloud {
                at_s,
                target,
                reachable,
            } => (at_s, Action::Cloud { target, reachable }),
        };
        Event { at_s, action }
    }
}

fn one_usize() -> usize {
    1
}

/// Continuous join/leave churn in a window.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Churn {
    pub start_s: f64,
    pub end_s: f64,
    pub leave_per_min: f64,
    pub join_per_min: f64,
    /// Share of departures that are crashes followed by a restart after `down_s`.
    pub restart_share: f64,
    pub down_s: [f64; 2],
}

impl Default for Churn {
    fn default() -> Self {
        Churn {
            start_s: 0.0,
            end_s: 0.0,
            leave_per_min: 0.0,
            join_per_min: 0.0,
            restart_share: 0.5,
            down_s: [5.0, 20.0],
        }
    }
}

/// Admission and attackers (issue 18's threat model).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Attack {
    /// Keyed swarm: every node holds a certificate of one swarm key (the cloud nodes with the
    /// cloud role, the others as members); adverts without a valid one are ignored.
    pub keyed: bool,
    /// Nodes that forge their adverts: cloud reachable, top priority, a claim with the highest
    /// term the wire allows. In a keyed swarm they are admitted members (an insider).
    pub liars: Vec<usize>,
    /// Fake identities that one attacker node advertises every advert interval, each with a
    /// model and no load (so they look like the best voters). They have no certificate.
    pub sybils: usize,
    /// The node that hosts the Sybil identities (its peers get their adverts directly).
    pub sybil_host: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub nodes: usize,
    pub virtual_s: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default)]
    pub timing: Timing,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub clock: Clock,
    #[serde(default)]
    pub cloud: Cloud,
    #[serde(default)]
    pub queries: Queries,
    pub models: Vec<ModelProfile>,
    #[serde(default)]
    pub events: Vec<Event>,
    #[serde(default)]
    pub churn: Churn,
    #[serde(default)]
    pub attack: Attack,
    /// Directory of the scenario file; answer-cache paths are relative to it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

fn default_seed() -> u64 {
    1
}

fn check(ok: bool, what: &str) -> Result<(), ScenarioError> {
    if ok {
        Ok(())
    } else {
        Err(ScenarioError::Invalid(what.to_owned()))
    }
}

fn prob(p: f64) -> bool {
    (0.0..=1.0).contains(&p)
}

impl Scenario {
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ScenarioError> {
        let mut s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        s.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        s.validate()?;
        Ok(s)
    }

    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError::Read {
            path: path.to_owned(),
            source: e,
        })?;
        Self::from_toml(&text, path)
    }

    /// A path, or a bare name looked up in `configs/simnet/` (current directory, then the repo).
    pub fn resolve(arg: &str) -> Result<Self, ScenarioError> {
        let direct = PathBuf::from(arg);
        if direct.is_file() {
            return Self::load(&direct);
        }
        let file = if arg.ends_with(".toml") {
            arg.to_owned()
        } else {
            format!("{arg}.toml")
        };
        let candidates = [
            PathBuf::from("configs/simnet").join(&file),
            Self::repo_dir().join(&file),
        ];
        match candidates.iter().find(|p| p.is_file()) {
            Some(p) => Self::load(p),
            None => Err(ScenarioError::NotFound(arg.to_owned())),
        }
    }

    /// `configs/simnet/` of the source tree this crate was built from.
    pub fn repo_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/simnet")
    }

    pub fn validate(&self) -> Result<(), ScenarioError> {
        check(self.nodes >= 1, "nodes must be at least 1")?;
        // Gossip bookkeeping is a slots × slots matrix (see sim/): bound the swarm.
        check(self.nodes <= 4_000, "nodes must be at most 4000")?;
        check(
            self.virtual_s > 0.0 && self.virtual_s <= 86_400.0,
            "virtual_s must be in (0, 86400]",
        )?;
        check(!self.models.is_empty(), "at least one [[models]] entry")?;
        check(
            self.attack.liars.iter().all(|&l| l < self.nodes),
            "attack.liars must name initial nodes",
        )?;
        check(
            self.attack.sybils <= 100_000 && (self.attack.sybils == 0 || self.attack.sybil_host < self.nodes),
            "attack.sybils must be at most 100000 and attack.sybil_host an initial node",
        )?;
        for m in &self.models {
            for k in Kind::ALL {
                check(prob(m.accuracy.get(k)), "model accuracy must be in [0, 1]")?;
            }
            check(m.share > 0.0, "model share must be positive")?;
            check(prob(m.garbage), "model garbage must be in [0, 1]")?;
            check(
                m.prefill_ms >= 0.0 && m.ms_per_token >= 0.0,
                "model latencies must be non-negative",
            )?;
        }
        let t = &self.timing;
        check(t.advert_interval_ms >= 10, "advert_interval_ms ≥ 10")?;
        check(t.advert_missed >= 1, "advert_missed ≥ 1")?;
        check(t.check_interval_ms >= 10, "check_interval_ms ≥ 10")?;
        let n = &self.network;
        check(
            n.latency_ms[0] >= 0.0 && n.latency_ms[1] >= n.latency_ms[0],
            "network.latency_ms = [min, max] with 0 ≤ min ≤ max",
        )?;
        check(n.jitter_ms >= 0.0, "jitter_ms ≥ 0")?;
        check(prob(n.loss) && n.loss < 1.0, "loss in [0, 1)")?;
        check(prob(n.duplicate), "duplicate in [0, 1]")?;
        check(
            n.mesh_degree_low >= 1
                && n.mesh_degree_low <= n.mesh_degree
                && n.mesh_degree <= n.mesh_degree_high,
            "mesh degrees: 1 ≤ low ≤ degree ≤ high",
        )?;
        let q = &self.queries;
        check(q.rate_per_s >= 0.0, "rate_per_s ≥ 0")?;
        check(q.k >= 1 && q.k <= 16, "k in 1..=16")?;
        check(q.quorum >= 1, "quorum ≥ 1")?;
        check(q.vote_deadline_ms >= 1, "vote_deadline_ms ≥ 1")?;
        check(q.escalate_deadline_ms >= 1, "escalate_deadline_ms ≥ 1")?;
        check(q.pool >= 1, "pool ≥ 1")?;
        check(prob(q.safety_share), "safety_share in [0, 1]")?;
        check(
            matches!(q.route.as_str(), "auto" | "local" | "vote" | "cloud"),
            "queries.route is auto, local, vote or cloud",
        )?;
        let mix_total: f64 = Kind::ALL.iter().map(|k| q.mix.get(*k)).sum();
        check(mix_total > 0.0, "queries.mix must not be all zero")?;
        let p = q.privacy;
        check(
            p.cloud >= 0.0 && p.swarm >= 0.0 && p.device >= 0.0 && p.cloud + p.swarm + p.device > 0.0,
            "queries.privacy shares must be non-negative and not all zero",
        )?;
        let c = &self.cloud;
        check(
            c.indices.iter().all(|i| *i < self.nodes),
            "cloud.indices must be node indices",
        )?;
        check(c.nodes <= self.nodes, "cloud.nodes ≤ nodes")?;
        for k in Kind::ALL {
            check(prob(c.accuracy.get(k)), "cloud accuracy must be in [0, 1]")?;
        }
        let ch = &self.churn;
        check(
            ch.leave_per_min >= 0.0 && ch.join_per_min >= 0.0 && prob(ch.restart_share),
            "churn rates ≥ 0 and restart_share in [0, 1]",
        )?;
        check(
            ch.down_s[0] >= 0.0 && ch.down_s[1] >= ch.down_s[0],
            "churn.down_s = [min, max]",
        )?;
        for e in &self.events {
            check(e.at_s >= 0.0, "event times ≥ 0")?;
            match &e.action {
                Action::Partition { groups } => check(*groups >= 2, "partition groups ≥ 2")?,
                Action::Crash { target, .. } | Action::Cloud { target, .. } => check(
                    parse_target(target).is_some(),
                    "target is gateway, random or node:<i>",
                )?,
                Action::Loss { value } => check(prob(*value) && *value < 1.0, "loss in [0, 1)")?,
                Action::Heal | Action::Restart => {}
            }
        }
        Ok(())
    }

    /// Cloud-capable node indices.
    pub fn cloud_indices(&self) -> Vec<usize> {
        if !self.cloud.indices.is_empty() {
            let mut v = self.cloud.indices.clone();
            v.sort_unstable();
            v.dedup();
            return v;
        }
        let n = self.cloud.nodes;
        (0..n).map(|i| i * self.nodes / n.max(1)).collect()
    }
}

/// Who an event applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Gateway,
    Random,
    Node(usize),
}

pub fn parse_target(s: &str) -> Option<Target> {
    match s {
        "gateway" => Some(Target::Gateway),
        "random" => Some(Target::Random),
        _ => s
            .strip_prefix("node:")
            .and_then(|i| i.parse().ok())
            .map(Target::Node),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_scenario_gets_defaults() {
        let s = Scenario::from_toml(
            r#"
name = "tiny"
nodes = 3
virtual_s = 10
[[models]]
id = "m"
accuracy = { mcq = 0.5, label = 0.5, short = 0.5, free = 0.5 }
[[events]]
at_s = 2
kind = "crash"
target = "node:1"
"#,
            Path::new("x/tiny.toml"),
        )
        .expect("parse");
        assert_eq!(s.timing.advert_interval_ms, 1000);
        assert_eq!(s.cloud_indices(), vec![0, 1]);
        assert_eq!(s.base_dir, PathBuf::from("x"));
        assert!(matches!(s.events[0].action, Action::Crash { count: 1, .. }));
    }

    #[test]
    fn typos_and_bad_values_are_rejected() {
        let base = "name = \"t\"\nnodes = 3\nvirtual_s = 10\n[[models]]\nid = \"m\"\naccuracy = { mcq = 0.5, label = 0.5, short = 0.5, free = 0.5 }\n";
        assert!(Scenario::from_toml(
            &format!("{base}[timing]\nadvert_intervall_ms = 5\n"),
            Path::new("t")
        )
        .is_err());
        assert!(Scenario::from_toml(&format!("{base}[network]\nloss = 1.5\n"), Path::new("t")).is_err());
        assert!(Scenario::from_toml(
            &format!("{base}[[events]]\nat_s = 1\nkind = \"crash\"\ntarget = \"nobody\"\n"),
            Path::new("t")
        )
        .is_err());
        assert_eq!(parse_target("node:7"), Some(Target::Node(7)));
    }
}
