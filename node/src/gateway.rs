//! The gateway's side of escalation and the per-query safety signal: calling
//! the cloud model for the swarm (only the elected gateway does), what this
//! node advertises about its cloud access, and the safety check's entry point
//! (the classifier itself is `crate::safety`).

use std::time::{Duration, Instant};

use swarm_protocol::{CloudStatus, ErrorCode, EscalateRequest, EscalateResponse, Task, WireError};

use crate::cloud::{CloudError, CloudRequest};
use crate::inference::ChatMessage;
use crate::node::Node;

pub use crate::safety::SafetyFlag;

/// Classify a query (not flagged when the classifier is off). Async: the
/// embedding runs on the blocking pool, never on the runtime's threads.
pub async fn safety_check(node: &Node, text: &str) -> SafetyFlag {
    if !node.cfg.routing.safety {
        return SafetyFlag::default();
    }
    node.semantic.classifier().await.classify(text).await.flag()
}

fn wire(code: ErrorCode, e: &CloudError) -> WireError {
    let mut message = format!("{}: {e}", e.reason());
    message.truncate(swarm_protocol::MAX_ERROR_LEN);
    WireError { code, message }
}

/// The messages sent to the cloud for an escalation.
fn cloud_messages(req: &EscalateRequest) -> Vec<ChatMessage> {
    let msgs: Vec<ChatMessage> = req
        .messages
        .iter()
        .map(|m| ChatMessage::new(&m.role, &m.content))
        .collect();
    cloud_prompt(msgs, &req.task)
}

/// The messages sent to the cloud for a query: for constrained tasks, ask for
/// the option itself. Public so that `eval` can measure a cloud model on
/// exactly the prompts the gateway would send it.
pub fn cloud_prompt(mut msgs: Vec<ChatMessage>, task: &Task) -> Vec<ChatMessage> {
    let hint = match task {
        Task::Mcq { choices } => {
            let has_options = msgs
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .is_some_and(|m| choices.iter().all(|c| m.content.contains(&c.text)));
            let mut h = String::new();
            if !has_options {
                for c in choices {
                    h.push_str(&format!("\n{}. {}", c.label, c.text));
                }
            }
            h.push_str("\nAnswer with the letter of the correct option only.");
            Some(h)
        }
        Task::Label { labels } => Some(format!("\nAnswer with exactly one of: {}.", labels.join(", "))),
        Task::Short => Some("\nAnswer briefly.".to_string()),
        Task::Free => None,
    };
    if let (Some(h), Some(last)) = (hint, msgs.iter_mut().rev().find(|m| m.role == "user")) {
        last.content.push_str(&h);
    }
    msgs
}

/// Call the cloud model for an escalation; only valid on a node with cloud access.
pub async fn cloud_call(node: &Node, req: &EscalateRequest) -> Result<EscalateResponse, WireError> {
    let Some(client) = &node.cloud else {
        return Err(WireError {
            code: ErrorCode::NoModel,
            message: "this node has no cloud access".into(),
        });
    };
    let deadline = Instant::now() + Duration::from_millis(u64::from(req.deadline_ms));
    let creq = CloudRequest {
        messages: cloud_messages(req),
        max_tokens: req.max_tokens,
        temperature: 0.0,
        stop: Vec::new(),
    };
    let t0 = Instant::now();
    let answer = match tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        client.chat(creq),
    )
    .await
    {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            let code = match e {
                CloudError::BudgetExhausted { .. } => ErrorCode::Overloaded,
                CloudError::Timeout { .. } => ErrorCode::Timeout,
                _ => ErrorCode::Internal,
            };
            return Err(wire(code, &e));
        }
        Err(_) => {
            return Err(WireError {
                code: ErrorCode::Timeout,
                message: "cloud_timeout: the escalation's deadline passed".into(),
            })
        }
    };
    let mut text = answer.text;
    text.truncate(swarm_protocol::MAX_TEXT_BYTES);
    let mut model = if answer.model.is_empty() {
        client.config().model.clone()
    } else {
        answer.model
    };
    model.truncate(swarm_protocol::MAX_MODEL_ID_LEN);
    Ok(EscalateResponse {
        id: req.id,
        text: text.trim().to_string(),
        model,
        cloud_ms: t0.elapsed().as_millis().min(u128::from(u32::MAX)) as u32,
        gateway: node.peer_id.to_string(),
    })
}

/// What this node advertises about its cloud access.
pub fn cloud_status_of(node: &Node) -> Option<CloudStatus> {
    node.cloud.as_ref().map(|c| {
        let s = c.status();
        CloudStatus {
            reachable: s.reachable,
            budget_left: s.budget_left,
            priority: c.priority(),
        }
    })
}
