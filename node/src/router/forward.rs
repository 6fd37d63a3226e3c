//! Forwarding a whole query to peers that serve the requested model when this
//! node does not, least loaded first, until one answers.

use std::time::Instant;

use libp2p::PeerId;
use swarm_protocol::{ErrorCode, QueryReply, QueryRequest, Task};

use super::request::{remaining, wire_deadline, Answer, ChatRequest, Provenance, RouteError};
use super::Router;

impl Router {
    /// Send the whole query to `peers` in order; the first answer wins.
    pub(super) async fn forward(
        &self,
        query_id: u64,
        req: &ChatRequest,
        peers: Vec<String>,
        t0: Instant,
    ) -> Result<Answer, RouteError> {
        let model = req.model.clone().unwrap_or_default();
        let mut last_err = String::from("no peer answered");
        for p in peers {
            let Ok(peer) = p.parse::<PeerId>() else { continue };
            let left = remaining(req.deadline);
            if left.is_zero() {
                return Err(RouteError::Timeout);
            }
            let q = QueryRequest {
                id: query_id,
                model: model.clone(),
                messages: req.messages.clone(),
                max_tokens: req.params.max_tokens,
                temperature: req.params.temperature,
                seed: req.params.seed,
                stop: req.params.stop.clone(),
                logprobs: req.params.top_logprobs > 0,
                deadline_ms: wire_deadline(left),
            };
            match self.p.net.query(peer, q, left).await {
                Ok(QueryReply::Ok(r)) => {
                    self.p.metrics.forwarded.inc();
                    let elapsed = t0.elapsed().as_millis() as u64;
                    self.p.metrics.observe_query("local", elapsed as f64);
                    // The peer generates text whatever the task (issue #19 routes this path properly).
                    let mut prov = Provenance::answered_by(&p, &r.model, r.confidence, &Task::Free);
                    prov.elapsed_ms = elapsed;
                    prov.forwarded = true;
                    return Ok(Answer {
                        text: r.text,
                        model: r.model,
                        finish_reason: r.finish_reason,
                        prompt_tokens: r.prompt_tokens,
                        completion_tokens: r.completion_tokens,
                        tokens: Vec::new(),
                        prov,
                    });
                }
                Ok(QueryReply::Err(e)) => {
                    if e.code == ErrorCode::BadRequest {
                        return Err(RouteError::BadRequest(e.message));
                    }
                    last_err = format!("{p}: {:?}: {}", e.code, e.message);
                }
                Err(e) => last_err = e.to_string(),
            }
            tracing::debug!("forward to {p} failed: {last_err}");
        }
        Err(RouteError::NoPeer {
            model,
            reason: last_err,
        })
    }
}
