//! `POST /v1/swarm/models`: hot swap. Load a new version of a model next to
//! the one serving, gate it (evaluate, sign, store the result), and only when
//! it passes switch to it: new requests and the next advert see the new
//! version, requests already running finish on the old one. Off unless
//! `[gate] hot_swap = true`; protect it with `[api] api_key_env`.

use std::path::PathBuf;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::ApiError;
use crate::gate;
use crate::gate::{backend_sha256, version_of};
use crate::inference::engine::LoadOptions;
use crate::inference::{Backend, CandleBackend};
use crate::node::Node;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SwapRequest {
    /// The new model file (GGUF) on this node's disk.
    pub path: PathBuf,
    /// The model id it serves as (default: this node's default model).
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub gate: Option<GateSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GateSpec {
    /// Evaluation file (JSONL questions) on this node's disk.
    pub file: PathBuf,
    /// The bar the run is marked against (default: the node's `[gate]` bar
    /// for the kind, else 0).
    #[serde(default)]
    pub min_accuracy: Option<f32>,
    /// At most this many questions per task kind (default 200).
    #[serde(default)]
    pub limit: Option<usize>,
}

fn status(code: StatusCode, msg: impl Into<String>) -> ApiError {
    ApiError {
        status: code,
        message: msg.into(),
        kind: "invalid_request_error",
        param: None,
    }
}

pub(super) async fn swap(
    State(node): State<Node>,
    body: Result<Json<SwapRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body?;
    if !node.cfg.gate.hot_swap {
        return Err(status(
            StatusCode::FORBIDDEN,
            "model swaps are off on this node: set `[gate] hot_swap = true` (and protect the API with `[api] api_key_env`)",
        ));
    }
    // One swap at a time: each loads a whole model, and a burst of them would
    // hold several in memory at once.
    let Ok(_one) = node.swapping.try_lock() else {
        return Err(status(
            StatusCode::CONFLICT,
            "another model swap is in progress on this node; retry when it has finished",
        ));
    };
    let id = req
        .id
        .clone()
        .unwrap_or_else(|| node.models.default_id().to_string());
    let old = node.models.get(&id).map(|h| h.info().clone());
    if !req.path.is_file() {
        return Err(
            ApiError::bad_request(format!("{} is not a file on this node", req.path.display()))
                .with_param("path"),
        );
    }
    if let Some(g) = &req.gate {
        if !g.file.is_file() {
            return Err(ApiError::bad_request(format!(
                "gate file {} is not a file on this node",
                g.file.display()
            ))
            .with_param("gate.file"));
        }
        if g.min_accuracy.is_some_and(|m| !(0.0..=1.0).contains(&m)) {
            return Err(ApiError::bad_request("gate.min_accuracy must be within 0..=1")
                .with_param("gate.min_accuracy"));
        }
    }
    let gate_cfg = node.cfg.gate.clone();
    let key = node.signer.clone();
    let path = req.path.clone();
    let spec = req.gate;
    let load_id = id.clone();
    // Loading and gating are seconds of CPU: off the async workers, while the
    // old version keeps serving.
    let prepared = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let mut be = CandleBackend::load(
            &path,
            LoadOptions {
                id: load_id,
                domains: old.as_ref().map(|i| i.domains.clone()).unwrap_or_default(),
                scorer: old.as_ref().map(|i| i.scorer),
                default_system: None,
            },
        )
        .map_err(|e| {
            ApiError::bad_request(format!("cannot load {}: {e}", path.display())).with_param("path")
        })?;
        let sha256 = backend_sha256(&be);
        let version = version_of(&sha256);
        let mut records = Vec::new();
        if let Some(g) = spec {
            let questions = crate::eval::dataset::load(&g.file)
                .map_err(|e| ApiError::bad_request(format!("gate file: {e}")).with_param("gate.file"))?;
            let bar = g
                .min_accuracy
                .unwrap_or_else(|| gate_cfg.min_accuracy.values().copied().fold(0.0f32, f32::max));
            let run = gate::GateRun {
                file: &g.file,
                sha256: &sha256,
                version: &version,
                min_accuracy: bar,
                limit: Some(g.limit.unwrap_or(200)),
            };
            records = gate::evaluate(&mut be, &questions, run, || {})
                .map_err(|e| status(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
            let dir = gate_cfg.dir(&crate::models::home_dir());
            for r in &mut records {
                r.sign(&key)
                    .map_err(|e| status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
                gate::save(&dir, r).map_err(|e| status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            }
        }
        Ok((be, sha256, version, records))
    })
    .await
    .map_err(|e| {
        status(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("loading task failed: {e}"),
        )
    })??;
    let (be, sha256, version, records) = prepared;
    if let Some(r) = records.iter().find(|r| !r.passed) {
        return Err(status(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{id}@{version} failed its gate on {}: accuracy {:.3} < {:.3}; the served version stays",
                r.task_kind, r.accuracy, r.min_accuracy
            ),
        ));
    }
    let verdict = node.models.gate().verdict(&sha256);
    // A configured gate that the new version does not pass keeps the old one serving.
    if node.cfg.gate.enabled() && !verdict.advertise {
        return Err(status(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{id}@{version} failed its gate, the served version stays: {}",
                verdict.reason.clone().unwrap_or_default()
            ),
        ));
    }
    let be: Box<dyn Backend> = Box::new(be);
    let replaced = node.models.swap(be, sha256.clone(), verdict.clone());
    tracing::info!("model {id} now serves version {version} (was {replaced:?})");
    Ok(Json(json!({
        "id": id,
        "version": version,
        "sha256": sha256,
        "replaced": replaced,
        "gate": verdict,
        "records": records,
    })))
}
