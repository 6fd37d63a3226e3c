//! The node's configuration: one TOML document (`configs/node.toml` documents
//! every key with its default); `Default` is a sensible single-device setup and
//! command-line flags override the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use crate::confidence::Signal;
use serde::{Deserialize, Serialize};
use swarm_protocol::Privacy;

pub use crate::cloud::CloudConfig;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {msg}")]
    Read { path: String, msg: String },
    #[error("config {path}: {msg}")]
    Parse { path: String, msg: String },
    #[error("config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Human name shown to peers; empty = the host name.
    pub name: String,
    /// Swarm namespace: topics and protocol names carry it, so two swarms on one LAN stay apart.
    pub namespace: String,
    /// File holding this node's ed25519 key; empty = `$SLM_SWARM_HOME/identity-<name>.key`.
    pub identity: String,
    /// Models served by this node: catalog ids or paths to GGUF files.
    pub models: Vec<String>,
    /// libp2p listen addresses (QUIC).
    pub listen: Vec<String>,
    /// HTTP API address.
    pub http: String,
    /// Peers to dial at start (and redial with backoff), for networks mDNS does not reach.
    pub bootstrap: Vec<String>,
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// Connected peers to dial towards, from adverts, mDNS and the peers file
    /// (bootstrap and mDNS peers are dialled regardless); 0 = none.
    pub target_peers: usize,
    /// File of peers this node reached, read at start so it rejoins without its
    /// bootstrap; empty = beside the identity key (`<identity>.peers.json`).
    pub peers_file: String,
    /// Established connections in all (incoming ones: all but `target_peers`).
    pub max_connections: u32,
    /// Established connections per peer.
    pub max_connections_per_peer: u32,
    /// Connections being set up, per direction.
    pub max_pending_connections: u32,
    /// Concurrent request-response streams per connection and protocol.
    pub max_streams_per_connection: usize,
    /// Period of capacity adverts, ms. A peer is dropped after `missed_adverts` periods of silence.
    pub advert_interval_ms: u64,
    pub missed_adverts: u32,
    /// Requests that may wait per model before new ones are refused (HTTP 429).
    pub queue: usize,
    /// Peers' requests (votes, forwarded queries) that may wait per model,
    /// in a lane of their own behind this node's users.
    pub remote_queue: usize,
    /// One peer's requests queued or running per model; more get `Overloaded`.
    pub remote_per_peer: usize,
    /// Largest accepted HTTP request body, bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Default and upper bound of `max_tokens`.
    pub default_max_tokens: u32,
    pub max_tokens_limit: u32,
    /// Deadline of a whole request, ms.
    pub request_timeout_ms: u64,
    pub routing: RoutingConfig,
    pub gateway: GatewayConfig,
    /// Admission: which swarm to trust and this node's certificate (empty = open swarm).
    pub swarm: SwarmConfig,
    /// Who may use the HTTP API, and how much of it at once.
    pub api: ApiConfig,
    /// The web page at `/` and its live feed.
    pub ui: UiConfig,
    /// Present only on nodes that may call a cloud model.
    pub cloud: Option<CloudConfig>,
    /// The escalation log (`[dataset]`): opt-in.
    pub dataset: crate::dataset::DatasetConfig,
    /// The eval gate (`[gate]`): which models this node may advertise.
    pub gate: crate::gate::GateConfig,
    /// Teams (`[teams]`): whose queries this node serves, and which may use the cloud.
    pub teams: TeamsConfig,
}

/// `[teams]`: a query that names a team goes only to peers that serve it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TeamsConfig {
    /// Teams whose queries this node takes (from its users and from peers).
    pub serve: Vec<String>,
    /// Teams whose policy lets their queries reach the cloud (through the
    /// gateway); any other team's queries stay in the swarm.
    pub cloud: Vec<String>,
}

impl TeamsConfig {
    pub fn serves(&self, team: &str) -> bool {
        self.serve.iter().any(|t| t == team)
    }

    pub fn allows_cloud(&self, team: &str) -> bool {
        self.cloud.iter().any(|t| t == team)
    }
}

/// A keyed swarm's join token, this node's certificate and a revocation list.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SwarmConfig {
    /// Join token (text `slmswarm1:…`, or a file holding it); empty = open swarm.
    pub join: String,
    /// File holding this node's certificate (`slm-swarm swarm invite`); needed with `join`.
    pub certificate: String,
    /// File holding the swarm's signed revocation list (`slm-swarm swarm revoke`); optional.
    pub revocations: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Answer locally when the calibrated confidence is at least this.
    pub tau_local: f32,
    /// Accept the swarm's answer when the vote's agreement is at least this.
    pub tau_vote: f32,
    /// Per-model overrides of the two thresholds.
    pub models: BTreeMap<String, ModelThresholds>,
    /// Voters asked per vote (besides this node).
    pub voters: usize,
    /// Fewest valid votes (this node's included) for the swarm's answer to count.
    pub quorum: usize,
    /// Deadline of a vote, ms.
    pub vote_deadline_ms: u64,
    /// Privacy of requests that do not say: device | swarm | cloud.
    pub privacy: Privacy,
    /// Flag and escalate safety-critical queries (needs the embedder for its best accuracy).
    pub safety: bool,
    /// Sentence embedder (catalog id) for free-text votes and the safety classifier;
    /// empty = none. Not installed = rules-only safety and exact-match free votes.
    pub embedder: String,
    /// Free-text answers whose embeddings have at least this cosine count as the same answer.
    pub free_similarity: f32,
    /// What a safety flag does, per harm category.
    pub safety_policy: crate::safety::SafetyPolicy,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelThresholds {
    pub tau_local: Option<f32>,
    pub tau_vote: Option<f32>,
    /// Which raw score the router calibrates for this model (default `confidence`);
    /// `calibrate` picks the one with the best AUROC on its fit half.
    pub signal: Option<Signal>,
    /// Platt calibration of that signal: p = 1 / (1 + exp(-(a·x + b))).
    pub platt: Option<[f32; 2]>,
}

/// Access to the HTTP API: a bearer key, the host names it answers to, and a
/// cap on requests in progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Environment variable holding the API key; empty = no key (anyone who can
    /// reach the HTTP port may ask, force the cloud route and read the swarm).
    /// With a key, every endpoint but the page itself wants
    /// `Authorization: Bearer KEY` (as OpenAI clients send it).
    pub api_key_env: String,
    /// Host names (besides `localhost` and IP addresses) the API answers to; a
    /// request naming another host (DNS rebinding) is refused with 421.
    pub allowed_hosts: Vec<String>,
    /// Requests in progress at once; more are refused at once with 429.
    pub max_concurrent: usize,
}

impl ApiConfig {
    /// The key from `api_key_env`, or `None` (no variable configured, or it is unset or empty).
    pub fn key(&self) -> Option<String> {
        if self.api_key_env.is_empty() {
            return None;
        }
        std::env::var(&self.api_key_env)
            .ok()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            api_key_env: String::new(),
            allowed_hosts: Vec::new(),
            max_concurrent: 64,
        }
    }
}

/// The web page every node serves at `/` (peers, gateway, live query feed, an ask box).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UiConfig {
    /// Serve the page at `/` (the JSON endpoints and `/v1/swarm/events` stay either way).
    pub enabled: bool,
    /// Show prompt and answer text in the live feed; off, the feed shows routes,
    /// voters, confidences and latencies but no text anyone typed.
    pub show_prompts: bool,
}

impl Default for UiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            show_prompts: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// A better candidate must stay better this long before it takes the role.
    pub hysteresis_ms: u64,
    /// After start, wait this long (hearing adverts) before claiming the role.
    pub startup_grace_ms: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            namespace: "default".into(),
            identity: String::new(),
            models: vec!["smollm2-135m".into()],
            listen: vec!["/ip4/0.0.0.0/udp/0/quic-v1".into()],
            http: "127.0.0.1:8080".into(),
            bootstrap: Vec::new(),
            mdns: true,
            target_peers: 8,
            peers_file: String::new(),
            max_connections: 128,
            max_connections_per_peer: 2,
            max_pending_connections: 32,
            max_streams_per_connection: 32,
            advert_interval_ms: 1000,
            missed_adverts: 3,
            queue: 16,
            remote_queue: 8,
            remote_per_peer: 2,
            max_body_bytes: 256 * 1024,
            default_max_tokens: 128,
            max_tokens_limit: 2048,
            request_timeout_ms: 120_000,
            routing: RoutingConfig::default(),
            gateway: GatewayConfig::default(),
            swarm: SwarmConfig::default(),
            api: ApiConfig::default(),
            ui: UiConfig::default(),
            cloud: None,
            dataset: crate::dataset::DatasetConfig::default(),
            gate: crate::gate::GateConfig::default(),
            teams: TeamsConfig::default(),
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            tau_local: 0.85,
            tau_vote: 0.6,
            models: BTreeMap::new(),
            voters: 3,
            quorum: 2,
            vote_deadline_ms: 30_000,
            privacy: Privacy::Cloud,
            safety: true,
            embedder: crate::inference::embedder::DEFAULT_EMBEDDER.into(),
            free_similarity: 0.8,
            safety_policy: crate::safety::SafetyPolicy::default(),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            hysteresis_ms: 5_000,
            startup_grace_ms: 1_500,
        }
    }
}

impl RoutingConfig {
    /// (τ_local, τ_vote) for a model.
    pub fn thresholds(&self, model: &str) -> (f32, f32) {
        let m = self.models.get(model);
        (
            m.and_then(|m| m.tau_local).unwrap_or(self.tau_local),
            m.and_then(|m| m.tau_vote).unwrap_or(self.tau_vote),
        )
    }

    /// Calibrated confidence of `model`'s answer (see [`crate::confidence::calibrated`]),
    /// with the signal and Platt fit configured for it.
    pub fn calibrate(&self, model: &str, score: impl Fn(Signal) -> Option<f32>) -> f32 {
        let m = self.models.get(model);
        crate::confidence::calibrated(
            m.and_then(|m| m.signal).unwrap_or_default(),
            m.and_then(|m| m.platt),
            score,
        )
    }
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { msg, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                msg,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: NodeConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<text>".into(),
            msg: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for t in self.teams.serve.iter().chain(&self.teams.cloud) {
            if swarm_protocol::check_team("teams", t).is_err() {
                return bad(format!("team `{t}` must be 1-32 of [A-Za-z0-9_-]"));
            }
        }
        if self.teams.serve.len() > swarm_protocol::MAX_TEAMS {
            return bad(format!(
                "[teams] serve: at most {} teams",
                swarm_protocol::MAX_TEAMS
            ));
        }
        // Loading model files on request is an operator's power: behind a key,
        // or reachable from this machine only.
        let loopback = ["127.", "localhost:", "[::1]:"]
            .iter()
            .any(|p| self.http.starts_with(p));
        if self.gate.hot_swap && self.api.api_key_env.is_empty() && !loopback {
            return bad(format!(
                "[gate] hot_swap on an API reachable from other machines (http = {}) needs [api] api_key_env",
                self.http
            ));
        }
        for (kind, bar) in &self.gate.min_accuracy {
            if !["mcq", "label", "short"].contains(&kind.as_str()) || !(0.0..=1.0).contains(bar) {
                return bad(format!(
                    "[gate] min_accuracy.{kind} = {bar}: a task kind an eval file can gate (mcq, label, short) and a value in 0..=1"
                ));
            }
        }
        if self.namespace.is_empty()
            || self.namespace.len() > 64
            || !self
                .namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!(
                "namespace `{}` must be 1-64 of [A-Za-z0-9_-]",
                self.namespace
            ));
        }
        if self.name.len() > swarm_protocol::MAX_NAME_LEN {
            return bad(format!(
                "name is longer than {} bytes",
                swarm_protocol::MAX_NAME_LEN
            ));
        }
        if self.api.max_concurrent == 0 {
            return bad("api.max_concurrent must be at least 1".into());
        }
        if let Some(h) = self.api.allowed_hosts.iter().find(|h| {
            h.is_empty()
                || h.len() > 253
                || !h
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        }) {
            return bad(format!("api.allowed_hosts: `{h}` is not a host name"));
        }
        if self.advert_interval_ms < 50 {
            return bad("advert_interval_ms must be at least 50".into());
        }
        if self.missed_adverts == 0 {
            return bad("missed_adverts must be at least 1".into());
        }
        if self.max_connections == 0
            || self.max_connections_per_peer == 0
            || self.max_pending_connections == 0
            || self.max_streams_per_connection == 0
        {
            return bad(
                "max_connections, max_connections_per_peer, max_pending_connections and \
                 max_streams_per_connection must be at least 1"
                    .into(),
            );
        }
        if self.target_peers >= self.max_connections as usize {
            return bad("target_peers must be below max_connections".into());
        }
        if self.queue == 0 {
            return bad("queue must be at least 1".into());
        }
        if self.remote_per_peer == 0 && self.remote_queue > 0 {
            return bad("remote_per_peer must be at least 1 when remote_queue is not 0 (remote_queue = 0 serves no peer)".into());
        }
        if self.default_max_tokens == 0 || self.default_max_tokens > self.max_tokens_limit {
            return bad("default_max_tokens must be in 1..=max_tokens_limit".into());
        }
        for (what, v) in [
            ("tau_local", self.routing.tau_local),
            ("tau_vote", self.routing.tau_vote),
            ("free_similarity", self.routing.free_similarity),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("routing.{what} must be within 0..=1"));
            }
        }
        self.routing
            .safety_policy
            .validate()
            .map_err(ConfigError::Invalid)?;
        if self.routing.quorum == 0 {
            return bad("routing.quorum must be at least 1".into());
        }
        if let Some(c) = &self.cloud {
            c.validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        let s = &self.swarm;
        if s.join.is_empty() && (!s.certificate.is_empty() || !s.revocations.is_empty()) {
            return bad(
                "swarm.certificate and swarm.revocations need a join token (swarm.join, --join)".into(),
            );
        }
        if !s.join.is_empty() && s.certificate.is_empty() {
            return bad(
                "a join token (swarm.join, --join) needs this node's certificate (swarm.certificate, \
                 --certificate FILE): send the swarm owner this node's peer id (`slm-swarm swarm peer-id`) \
                 and ask for `slm-swarm swarm invite --dir DIR --peer PEER_ID`"
                    .into(),
            );
        }
        Ok(())
    }

    /// The admission setup of a keyed swarm (token, certificate, revocation list,
    /// read from their files), or `None` for an open swarm. The certificate is
    /// not checked against this node's peer id here: see `node::check_admission`.
    pub fn admission(&self) -> Result<Option<crate::network::AdmissionSetup>, ConfigError> {
        let s = &self.swarm;
        if s.join.is_empty() {
            return Ok(None);
        }
        let bad =
            |what: &str, e: crate::admission::AdmitFileError| ConfigError::Invalid(format!("{what}: {e}"));
        let token = crate::admission::join_token_arg(&s.join).map_err(|e| bad("join token", e))?;
        let cert = crate::admission::read_certificate(Path::new(&s.certificate))
            .map_err(|e| bad("certificate", e))?;
        let revocations = if s.revocations.is_empty() {
            None
        } else {
            crate::admission::read_revocations(Path::new(&s.revocations))
                .map_err(|e| bad("revocations", e))?
        };
        if let Some(list) = &revocations {
            list.verify(&token.swarm)
                .map_err(|e| ConfigError::Invalid(format!("revocation list {}: {e}", s.revocations)))?;
        }
        Ok(Some(crate::network::AdmissionSetup {
            token,
            cert,
            revocations,
        }))
    }

    /// The display name: configured, else the host name.
    pub fn display_name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        if host.is_empty() {
            "node".into()
        } else {
            host.chars().take(swarm_protocol::MAX_NAME_LEN).collect()
        }
    }

    /// The identity key file.
    pub fn identity_path(&self, home: &Path) -> PathBuf {
        if self.identity.is_empty() {
            let tag: String = self
                .display_name()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            home.join(format!("identity-{tag}.key"))
        } else {
            PathBuf::from(&self.identity)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_round_trips_through_toml() {
        let d = NodeConfig::default();
        let text = toml::to_string(&d).expect("serialise");
        assert_eq!(NodeConfig::parse(&text).expect("parse"), d);
    }

    #[test]
    fn every_file_in_configs_parses() {
        let node = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/node.toml");
        let parsed = NodeConfig::load(&node).expect("configs/node.toml");
        // The documented file shows the defaults.
        assert_eq!(parsed, NodeConfig::default());
        for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")).expect("dir")
        {
            let p = entry.expect("entry").path();
            if p.extension().is_some_and(|e| e == "toml") && p.file_name().is_some_and(|n| n != "models.toml")
            {
                NodeConfig::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
        }
    }

    #[test]
    fn invalid_values_are_refused_with_the_key() {
        for (text, key) in [
            ("namespace = \"a b\"", "namespace"),
            ("advert_interval_ms = 1", "advert_interval_ms"),
            ("target_peers = 200", "target_peers"),
            ("max_streams_per_connection = 0", "max_streams_per_connection"),
            ("[routing]\ntau_local = 1.5", "tau_local"),
            ("[cloud]\nbase_url = \"ftp://x\"\nmodel = \"m\"", "base_url"),
            ("unknown_key = 1", "unknown"),
            ("http = \"0.0.0.0:8080\"\n[gate]\nhot_swap = true", "hot_swap"),
            ("[gate]\nmin_accuracy = { mcq = 1.5 }", "min_accuracy"),
            ("[teams]\nserve = [\"a b\"]", "team"),
        ] {
            let e = NodeConfig::parse(text).expect_err(text).to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn per_model_thresholds_and_calibration() {
        let c = NodeConfig::parse(
            "[routing]\ntau_local = 0.7\n[routing.models.\"m1\"]\ntau_local = 0.9\nplatt = [2.0, -1.0]",
        )
        .expect("parse");
        assert_eq!(c.routing.thresholds("m1").0, 0.9);
        assert_eq!(c.routing.thresholds("other").0, 0.7);
        let conf = |x: f32| move |s: Signal| (s == Signal::Confidence).then_some(x);
        let p = c.routing.calibrate("m1", conf(0.5));
        assert!((p - 0.5).abs() < 1e-6);
        assert_eq!(c.routing.calibrate("other", conf(0.3)), 0.3);
    }

    #[test]
    fn calibration_reads_the_configured_signal() {
        let c = NodeConfig::parse("[routing.models.\"m1\"]\nsignal = \"min_prob\"\nplatt = [4.0, -2.0]")
            .expect("parse");
        let score = |s: Signal| match s {
            Signal::Confidence => Some(0.9),
            Signal::MinProb => Some(0.25),
            _ => None,
        };
        // Platt over min_prob (0.25): 1/(1+e^1), not over confidence (0.9).
        let p = c.routing.calibrate("m1", score);
        assert!((p - 1.0 / (1.0 + 1f32.exp())).abs() < 1e-6, "{p}");
        // A signal the answer lacks falls back to the raw confidence, uncalibrated.
        let c = NodeConfig::parse("[routing.models.\"m1\"]\nsignal = \"margin\"\nplatt = [4.0, -2.0]")
            .expect("parse");
        assert_eq!(c.routing.calibrate("m1", score), 0.9);
        let e = NodeConfig::parse("[routing.models.\"m1\"]\nsignal = \"vibes\"").expect_err("bad signal");
        assert!(e.to_string().contains("vibes"), "{e}");
    }
}
