//! The models this node serves: one worker handle per model, the default model,
//! and each model's measured decode speed. Shared by the router (which answers
//! with them) and the membership task (which advertises their cards and load).

use std::collections::BTreeMap;
use std::sync::Mutex;

use swarm_protocol::ModelCard;

use crate::inference::{Backend, ModelHandle, WorkerOptions};

pub struct LocalModels {
    handles: BTreeMap<String, ModelHandle>,
    default: String,
    /// Measured decode speed per model (tokens/s), advertised to peers.
    tok_s: Mutex<BTreeMap<String, f32>>,
}

impl LocalModels {
    /// Starts a worker per backend; the first backend is the default model.
    pub fn spawn(backends: Vec<Box<dyn Backend>>, opts: WorkerOptions) -> Self {
        let mut handles = BTreeMap::new();
        let mut default = String::new();
        for b in backends {
            let id = b.info().id.clone();
            if default.is_empty() {
                default = id.clone();
            }
            handles.insert(id, ModelHandle::spawn(b, opts.clone()));
        }
        Self {
            handles,
            default,
            tok_s: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn get(&self, id: &str) -> Option<&ModelHandle> {
        self.handles.get(id)
    }

    /// The default model's id ("" when the node serves none).
    pub fn default_id(&self) -> &str {
        &self.default
    }

    pub fn default_handle(&self) -> Option<&ModelHandle> {
        self.handles.get(&self.default)
    }

    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.handles.keys()
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Requests queued or running over all models.
    pub fn load(&self) -> usize {
        self.handles.values().map(|m| m.load()).sum()
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

    /// This node's model cards, as advertised: the healthy models only (a
    /// model whose worker keeps panicking is withdrawn, see `ModelHandle::healthy`).
    pub fn cards(&self) -> Vec<ModelCard> {
        let speeds = self.tok_s.lock().map(|m| m.clone()).unwrap_or_default();
        self.handles
            .values()
            .filter(|h| h.healthy())
            .map(|h| {
                let i = h.info();
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
                }
            })
            .collect()
    }
}
