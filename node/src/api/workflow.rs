//! `POST /v1/swarm/workflows`: the HTTP side of a multi-step request. The
//! plan, its checks and its execution are `crate::workflow`'s; this maps its
//! errors to the API's error JSON and its result to the response.

use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::ApiError;
use crate::node::Node;
use crate::workflow::{WorkflowError, WorkflowRequest, WorkflowResult};

impl From<WorkflowError> for ApiError {
    fn from(e: WorkflowError) -> Self {
        match e {
            // Status and type as the chat endpoint gives the same failure.
            WorkflowError::Step { step, error } => {
                let mut api = ApiError::from(error);
                api.message = format!("step `{step}`: {}", api.message);
                api
            }
            // The plan is fine; the swarm lacks the model for it right now.
            e @ WorkflowError::NoDomain { .. } => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: e.to_string(),
                kind: "service_unavailable",
                param: Some("steps".into()),
            },
            e @ WorkflowError::InputTooLarge(_) => ApiError::bad_request(e.to_string()).with_param("input"),
            e @ WorkflowError::BadTeam => ApiError::bad_request(e.to_string()).with_param("team"),
            e => ApiError::bad_request(e.to_string()).with_param("steps"),
        }
    }
}

pub(super) async fn run(
    State(node): State<Node>,
    body: Result<Json<WorkflowRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body?;
    let deadline = Instant::now() + Duration::from_millis(node.cfg.request_timeout_ms);
    let plan = body.validate(&node.cfg)?;
    let targets = plan.targets(&node.router)?;
    let result = plan.run(&node.router, &targets, deadline).await?;
    let id = format!("wf-{:x}", node.router.next_id());
    Ok(Json(response_json(&id, plan.team.as_deref(), &result)))
}

fn response_json(id: &str, team: Option<&str>, r: &WorkflowResult) -> Value {
    let steps: Vec<Value> = r
        .steps
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "task": s.task,
                "output": s.answer.text,
                "rounds": s.rounds,
                "converged": s.converged,
                "model": s.answer.model,
                // The chat endpoint's `swarm` object: the same `Provenance`, serialized.
                "provenance": s.answer.prov,
            })
        })
        .collect();
    json!({
        "id": id,
        "object": "swarm.workflow",
        "team": team,
        "output": r.output(),
        "elapsed_ms": r.elapsed_ms,
        "steps": steps,
    })
}
