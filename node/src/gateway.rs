//! The gateway's side of escalation: this node's cloud access (held only here),
//! what it advertises about it, and the cloud call made for the swarm while this
//! node is the elected gateway. The coordinator's side (choosing the gateway,
//! retrying through a successor) is `router::escalate`.

use std::time::{Duration, Instant};

use futures::stream::{BoxStream, StreamExt};
use swarm_protocol::{
    clip, clip_owned, CloudStatus, ErrorCode, EscalateFrame, EscalateReply, EscalateRequest,
    EscalateResponse, Task, WireError,
};

use crate::cloud::{CloudClient, CloudError, CloudRequest};
use crate::inference::ChatMessage;

/// This node's cloud access: `None` on a node without cloud credentials.
pub struct Gateway {
    cloud: Option<CloudClient>,
    /// This node's peer id, reported in the answers it gets from the cloud.
    me: String,
}

/// A cloud failure as the swarm reports it: an exhausted budget is `Overloaded`
/// (peers fail over), a slow cloud `Timeout`, anything else `Internal`.
fn wire_of(e: &CloudError) -> WireError {
    let code = match e {
        CloudError::BudgetExhausted { .. } => ErrorCode::Overloaded,
        CloudError::Timeout { .. } => ErrorCode::Timeout,
        _ => ErrorCode::Internal,
    };
    wire(code, e)
}

fn no_cloud() -> WireError {
    WireError {
        code: ErrorCode::NoModel,
        message: "this node has no cloud access".into(),
    }
}

fn deadline_passed() -> WireError {
    WireError {
        code: ErrorCode::Timeout,
        message: "cloud_timeout: the escalation's deadline passed".into(),
    }
}

fn wire(code: ErrorCode, e: &CloudError) -> WireError {
    WireError {
        code,
        message: clip_owned(format!("{}: {e}", e.reason()), swarm_protocol::MAX_ERROR_LEN),
    }
}

/// The cloud call for an escalation, greedy.
fn cloud_request(client: &CloudClient, req: &EscalateRequest) -> CloudRequest {
    CloudRequest {
        messages: cloud_messages(req),
        // The peer's number is a wish: never more than this gateway allows
        // (the client clamps again; doing it here keeps the intent visible).
        max_tokens: client.config().clamp_max_tokens(req.max_tokens),
        temperature: 0.0,
        stop: Vec::new(),
    }
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

impl Gateway {
    pub fn new(cloud: Option<CloudClient>, me: String) -> Self {
        Self { cloud, me }
    }

    /// What this node advertises about its cloud access (`None` without it).
    pub fn status(&self) -> Option<CloudStatus> {
        self.cloud.as_ref().map(|c| {
            let s = c.status();
            CloudStatus {
                reachable: s.reachable,
                budget_left: s.budget_left,
                priority: c.priority(),
            }
        })
    }

    /// Call the cloud model for an escalation; only valid on a node with cloud access.
    pub async fn call(&self, req: &EscalateRequest) -> Result<EscalateResponse, WireError> {
        let Some(client) = &self.cloud else {
            return Err(no_cloud());
        };
        let deadline = Instant::now() + Duration::from_millis(u64::from(req.deadline_ms));
        let creq = cloud_request(client, req);
        let t0 = Instant::now();
        let answer = match tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            client.chat(creq),
        )
        .await
        {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Err(wire_of(&e)),
            Err(_) => return Err(deadline_passed()),
        };
        // The cloud's text is untrusted: cut on a character boundary, never inside one.
        let text = clip_owned(answer.text, swarm_protocol::MAX_TEXT_BYTES);
        let model = if answer.model.is_empty() {
            client.config().model.clone()
        } else {
            answer.model
        };
        Ok(EscalateResponse {
            id: req.id,
            text: text.trim().to_string(),
            model: clip_owned(model, swarm_protocol::MAX_MODEL_ID_LEN),
            cloud_ms: t0.elapsed().as_millis().min(u128::from(u32::MAX)) as u32,
            gateway: self.me.clone(),
        })
    }
}

impl Gateway {
    /// Call the cloud for an escalation with a streamed completion: the cloud's
    /// own SSE pieces as they arrive (the answer's leading whitespace dropped,
    /// never more than `MAX_TEXT_BYTES` in all), then `End` with the whole
    /// reply (text trimmed, as [`Gateway::call`] gives it). Dropping the stream
    /// abandons the cloud call.
    pub fn call_stream(&self, req: &EscalateRequest) -> BoxStream<'static, EscalateFrame> {
        let client = self.cloud.clone();
        let me = self.me.clone();
        let id = req.id;
        let deadline = Instant::now() + Duration::from_millis(u64::from(req.deadline_ms));
        let creq = client.as_ref().map(|c| cloud_request(c, req));
        async_stream::stream! {
            let (Some(client), Some(creq)) = (client, creq) else {
                yield EscalateFrame::End(EscalateReply::Err(no_cloud()));
                return;
            };
            let t0 = Instant::now();
            let mut pieces = match tokio::time::timeout_at(deadline.into(), client.chat_stream(creq)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    yield EscalateFrame::End(EscalateReply::Err(wire_of(&e)));
                    return;
                }
                Err(_) => {
                    yield EscalateFrame::End(EscalateReply::Err(deadline_passed()));
                    return;
                }
            };
            let mut text = String::new();
            loop {
                match tokio::time::timeout_at(deadline.into(), pieces.next()).await {
                    Ok(Some(Ok(piece))) => {
                        let piece = if text.is_empty() { piece.trim_start() } else { piece.as_str() };
                        // The cloud's text is untrusted: cut on a character boundary.
                        let head = clip(piece, swarm_protocol::MAX_TEXT_BYTES - text.len());
                        if !head.is_empty() {
                            text.push_str(head);
                            yield EscalateFrame::Piece(head.to_string());
                        }
                    }
                    Ok(Some(Err(e))) => {
                        yield EscalateFrame::End(EscalateReply::Err(wire_of(&e)));
                        return;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        yield EscalateFrame::End(EscalateReply::Err(deadline_passed()));
                        return;
                    }
                }
            }
            let end = text.trim_end().len();
            text.truncate(end);
            yield EscalateFrame::End(EscalateReply::Ok(EscalateResponse {
                id,
                text,
                // A streamed answer names no model: the configured one answered.
                model: clip_owned(client.config().model.clone(), swarm_protocol::MAX_MODEL_ID_LEN),
                cloud_ms: t0.elapsed().as_millis().min(u128::from(u32::MAX)) as u32,
                gateway: me,
            }));
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    //! The cloud endpoint is a local stand-in (no real endpoint is reachable
    //! here): an axum server that answers every chat with the same JSON and
    //! records the `max_tokens` of every request it gets.
    use std::sync::{Arc, Mutex};

    use super::*;
    use axum::routing::post;
    use axum::Json;
    use serde_json::{json, Value};
    use swarm_protocol::ChatMessage as WireMessage;

    type Seen = Arc<Mutex<Vec<Value>>>;

    async fn stand_in(text: String, model: String) -> String {
        stand_in_costing(text, model, 2).await.0
    }

    /// A stand-in whose every answer reports `total_tokens` tokens used.
    async fn stand_in_costing(text: String, model: String, total_tokens: u64) -> (String, Seen) {
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            post(move |Json(body): Json<Value>| {
                let (text, model) = (text.clone(), model.clone());
                log.lock().expect("log").push(body["max_tokens"].clone());
                async move {
                    Json(json!({
                        "id": "x", "object": "chat.completion", "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": total_tokens},
                    }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (format!("http://{addr}/v1"), seen)
    }

    fn escalation(max_tokens: u32) -> EscalateRequest {
        EscalateRequest {
            id: 1,
            messages: vec![WireMessage::new("user", "hello")],
            task: Task::Free,
            max_tokens,
            swarm_answers: Vec::new(),
            deadline_ms: 10_000,
        }
    }

    #[tokio::test]
    async fn an_escalations_max_tokens_is_clamped_to_the_gateways_limit() {
        let (base_url, seen) = stand_in_costing("ok".into(), "m".into(), 2).await;
        let client = CloudClient::new(crate::cloud::CloudConfig {
            base_url,
            max_tokens_per_call: 200,
            ..Default::default()
        })
        .expect("client");
        let gw = Gateway::new(Some(client), "me".into());
        // The protocol's own ceiling, u32::MAX from a peer that skips it, and 0.
        for asked in [swarm_protocol::MAX_TOKENS, u32::MAX, 201, 200, 50, 0] {
            gw.call(&escalation(asked)).await.expect("answer");
        }
        let seen = seen.lock().expect("log").clone();
        assert_eq!(seen, [200, 200, 200, 200, 50, 1].map(|n| json!(n)));
    }

    #[tokio::test]
    async fn an_exhausted_token_budget_advertises_no_calls_left() {
        let (base_url, seen) = stand_in_costing("ok".into(), "m".into(), 400).await;
        let client = CloudClient::new(crate::cloud::CloudConfig {
            base_url,
            max_tokens_per_call: 100,
            max_tokens_per_day: 1_000,
            ..Default::default()
        })
        .expect("client");
        let gw = Gateway::new(Some(client), "me".into());
        let left = |gw: &Gateway| gw.status().map(|s| s.budget_left);
        assert_eq!(left(&gw), Some(10), "1000 tokens pay for 10 calls of 100");
        // Each answer really costs 400 tokens (a long prompt, say).
        gw.call(&escalation(100)).await.expect("1");
        assert_eq!(left(&gw), Some(6));
        gw.call(&escalation(100)).await.expect("2");
        assert_eq!(left(&gw), Some(2));
        gw.call(&escalation(100))
            .await
            .expect("3: its reservation fits in the 200 left");
        assert_eq!(left(&gw), Some(0), "the tokens ran out: peers must fail over");
        let err = gw.call(&escalation(100)).await.expect_err("refused");
        assert_eq!(err.code, ErrorCode::Overloaded, "as for the call budget");
        assert!(
            err.message.starts_with("cloud_budget_exhausted"),
            "{}",
            err.message
        );
        assert_eq!(
            seen.lock().expect("log").len(),
            3,
            "nothing sent for the refused call"
        );
    }

    #[tokio::test]
    async fn a_huge_multibyte_cloud_answer_is_clipped_on_a_character_boundary() {
        // One ASCII byte first, so every byte limit falls inside an "é".
        let text = format!("x{}", "é".repeat(300_000));
        let model = format!("m{}", "é".repeat(40));
        let base_url = stand_in(text.clone(), model.clone()).await;
        let client = CloudClient::new(crate::cloud::CloudConfig {
            base_url,
            ..Default::default()
        })
        .expect("client");
        let gw = Gateway::new(Some(client), "me".into());
        let req = EscalateRequest {
            id: 7,
            messages: vec![WireMessage::new("user", "say é")],
            task: Task::Free,
            max_tokens: 16,
            swarm_answers: Vec::new(),
            deadline_ms: 10_000,
        };
        let r = gw.call(&req).await.expect("cloud answer");
        assert_eq!(r.id, 7);
        assert!(r.text.len() <= swarm_protocol::MAX_TEXT_BYTES);
        assert!(
            r.text.len() > swarm_protocol::MAX_TEXT_BYTES - 2,
            "{}",
            r.text.len()
        );
        assert!(text.starts_with(&r.text));
        assert!(r.model.len() <= swarm_protocol::MAX_MODEL_ID_LEN);
        assert!(model.starts_with(&r.model));
        assert_eq!(r.gateway, "me");
        // What goes back on the wire passes the protocol's own validation.
        swarm_protocol::Validate::validate(&r).expect("valid response");
    }
}
