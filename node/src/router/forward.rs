//! Forwarding a whole query to peers that serve the requested model when this
//! node does not, least loaded first, until one answers. Privacy is read first:
//! a `device` request never leaves this node. The safety check runs here too,
//! and the answer reports the real task and route (`forward`).

use std::time::Instant;

use libp2p::PeerId;
use swarm_protocol::{ErrorCode, Privacy, QueryReply, QueryRequest};

use super::request::{last_user, remaining, wire_deadline, Answer, ChatRequest, Provenance, RouteError};
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
        // Before any byte leaves: a device-only request is refused, not forwarded.
        if req.ext.privacy.unwrap_or(self.p.routing.privacy) == Privacy::Device {
            return Err(RouteError::BadRequest(format!(
                "model `{model}` is served only by peers, and privacy `device` keeps this request on \
                 this device: ask one of this node's models ({}), or allow privacy `swarm`",
                self.p.models.ids().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let task = req.task();
        let safety = self
            .p
            .semantic
            .check(self.p.routing.safety, last_user(&req.messages))
            .await;
        if safety.flagged {
            self.p.metrics.safety_flags.inc();
        }
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
                    self.p.metrics.observe_query("forward", elapsed as f64);
                    let mut prov = Provenance::answered_by(&p, &r.model, r.confidence, &task);
                    prov.route = "forward".into();
                    prov.elapsed_ms = elapsed;
                    prov.forwarded = true;
                    prov.safety_flag = safety.flagged;
                    prov.safety_category = safety.category.clone();
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
