//! The models this node serves: one worker handle per model, the default model,
//! each model's weights hash and version, its gate verdict (advertised or
//! not), and its measured decode speed. Shared by the router (which answers
//! with them) and the membership task (which advertises their cards and
//! load). A model can be replaced while serving ([`LocalModels::swap`]):
//! requests already holding the old handle finish on it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};

use swarm_protocol::ModelCard;

use crate::gate::{backend_sha256, version_of, GateConfig, Verdict};
use crate::inference::{Backend, ModelHandle, WorkerOptions};

/// One served model.
#[derive(Clone)]
struct Served {
    handle: ModelHandle,
    sha256: String,
    version: String,
    verdict: Verdict,
}

/// How a node decides which of its models to advertise.
#[derive(Debug, Clone, Default)]
pub struct GatePolicy {
    pub cfg: GateConfig,
    /// Where gate records are.
    pub dir: PathBuf,
    /// This node's peer id (its own records are always trusted).
    pub me: String,
}

impl GatePolicy {
    /// The verdict for a model file with this sha256.
    pub fn verdict(&self, sha256: &str) -> Verdict {
        if !self.cfg.enabled() {
            return Verdict::ungated();
        }
        let records = crate::gate::records_for(&self.dir, sha256);
        crate::gate::decide(&self.cfg, &self.me, sha256, &records)
    }
}

/// What `/v1/models` and the page say about a local model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelStatus {
    pub id: String,
    pub sha256: String,
    pub version: String,
    pub advertised: bool,
    pub gate: Verdict,
}

pub struct LocalModels {
    served: RwLock<BTreeMap<String, Served>>,
    default: String,
    opts: WorkerOptions,
    gate: GatePolicy,
    /// Measured decode speed per model (tokens/s), advertised to peers.
    tok_s: Mutex<BTreeMap<String, f32>>,
}

impl LocalModels {
    /// Starts a worker per backend; the first backend is the default model.
    pub fn spawn(backends: Vec<Box<dyn Backend>>, opts: WorkerOptions, gate: GatePolicy) -> Self {
        let mut served = BTreeMap::new();
        let mut default = String::new();
        for b in backends {
            let id = b.info().id.clone();
            if default.is_empty() {
                default = id.clone();
            }
            let sha256 = backend_sha256(b.as_ref());
            let verdict = gate.verdict(&sha256);
            if let Some(why) = &verdict.reason {
                tracing::warn!("model {id} is served here but not advertised: {why}");
            }
            served.insert(
                id,
                Served {
                    handle: ModelHandle::spawn(b, opts.clone()),
                    version: version_of(&sha256),
                    sha256,
                    verdict,
                },
            );
        }
        Self {
            served: RwLock::new(served),
            default,
            opts,
            gate,
            tok_s: Mutex::new(BTreeMap::new()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Served>> {
        self.served.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<ModelHandle> {
        self.read().get(id).map(|s| s.handle.clone())
    }

    /// The default model's id ("" when the node serves none).
    pub fn default_id(&self) -> &str {
        &self.default
    }

    pub fn default_handle(&self) -> Option<ModelHandle> {
        self.get(&self.default)
    }

    pub fn ids(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// The version of `id` served now ("" when unversioned).
    pub fn version(&self, id: &str) -> String {
        self.read().get(id).map(|s| s.version.clone()).unwrap_or_default()
    }

    pub fn gate(&self) -> &GatePolicy {
        &self.gate
    }

    pub fn status(&self) -> Vec<ModelStatus> {
        self.read()
            .iter()
            .map(|(id, s)| ModelStatus {
                id: id.clone(),
                sha256: s.sha256.clone(),
                version: s.version.clone(),
                advertised: s.verdict.advertise && s.handle.healthy(),
                gate: s.verdict.clone(),
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Requests queued or running over all models.
    pub fn load(&self) -> usize {
        self.read().values().map(|m| m.handle.load()).sum()
    }

    /// Serve `backend` as its id, replacing the version served now (if any):
    /// new requests go to it at once; requests that already hold the old
    /// handle finish on the old worker, which stops when the last is done.
    /// Returns the replaced version.
    pub fn swap(&self, backend: Box<dyn Backend>, sha256: String, verdict: Verdict) -> Option<String> {
        let id = backend.info().id.clone();
        let new = Served {
            handle: ModelHandle::spawn(backend, self.opts.clone()),
            version: version_of(&sha256),
            sha256,
            verdict,
        };
        let mut map = self.served.write().unwrap_or_else(|p| p.into_inner());
        map.insert(id, new).map(|old| old.version)
    }

    /// Record a measured decode speed for the advert (exponential average).
    pub fn record_speed(&self, model: &str, tokens: usize, decode_ms: f64) {
        if tokens < 4 || decode_ms <= 0.0 {
            return;
        }
        let s = tokens as f32 / (decode_ms as f32 / 1000.0);
        if let Ok(mut m) = self.tok_s.lock() {
            let e = m.entry(model.to_string()).or_insert(s);
            *e = 0.8 * *e + 0.2 * s;
        }
    }

    /// This node's model cards, as advertised: the healthy models that passed
    /// their gate (a model whose worker keeps panicking is withdrawn, see
    /// `ModelHandle::healthy`).
    pub fn cards(&self) -> Vec<ModelCard> {
        let speeds = self.tok_s.lock().map(|m| m.clone()).unwrap_or_default();
        self.read()
            .values()
            .filter(|s| s.handle.healthy() && s.verdict.advertise)
            .map(|s| {
                let i = s.handle.info();
                ModelCard {
                    id: i.id.clone(),
                    arch: i.arch.clone(),
                    params: i.params,
                    quant: i.quant.clone(),
                    ctx: i.ctx,
                    domains: i
                        .domains
                        .iter()
                        .take(swarm_protocol::MAX_DOMAINS)
                        .cloned()
                        .collect(),
                    tok_s: speeds.get(&i.id).copied().unwrap_or(0.0),
                    sha256: s.sha256.clone(),
                    version: s.version.clone(),
                }
            })
            .collect()
    }
}
