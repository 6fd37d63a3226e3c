//! Forwarding a whole query to peers that serve the requested model when this
//! node does not, least loaded first, until one answers. Privacy is read first:
//! a `device` request never leaves this node. The safety check runs here too:
//! a flagged query goes to the cloud when its privacy allows (else the peer's
//! answer is marked degraded). The answer reports the real task and route.

use std::time::Instant;

use libp2p::PeerId;
use swarm_protocol::policy::DegradedReason;
use swarm_protocol::{ErrorCode, Privacy, QueryReply, QueryRequest};

use crate::metrics::OutcomeLabel;

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
        if self.privacy_of(req) == Privacy::Device {
            return Err(RouteError::BadRequest(format!(
                "model `{model}` is served only by peers, and privacy `device` keeps this request on \
                 this device: ask one of this node's models ({}), or allow privacy `swarm`",
                self.p.models.ids().join(", ")
            )));
        }
        let task = req.task();
        let safety = self
            .p
            .semantic
            .check(
                self.p.routing.safety,
                &self.p.routing.safety_policy,
                last_user(&req.messages),
            )
            .await;
        if safety.flagged {
            self.p.metrics.safety_flags.inc();
        }
        if safety.refuses() {
            let elapsed = t0.elapsed().as_millis() as u64;
            self.p.metrics.observe_query("refused", elapsed as f64);
            return Ok(super::request::refusal(
                self.me(),
                &self.p.routing.safety_policy.refusal,
                &task,
                safety.category.clone(),
                elapsed,
            ));
        }
        // A safety-critical query is for the cloud, as on the local path: a
        // peer's small model answers it only when the cloud is not allowed or
        // not available, and the answer then says so.
        let mut degraded: Option<String> = None;
        if safety.escalates() {
            if self.privacy_of(req) != Privacy::Cloud {
                degraded = Some(DegradedReason::SafetyPrivacyForbidsCloud.as_str().into());
            } else if self.snapshot().gateway.is_none() {
                degraded = Some("safety: no gateway to the cloud".into());
            } else {
                // Not relayed (`None`): no relay can break, so the outer error never comes.
                let r = self
                    .escalate(query_id, req, &task, Vec::new(), None)
                    .await
                    .unwrap_or_else(|super::escalate::RelayBroke(e)| Err(e));
                let outcome = if r.is_ok() { "ok" } else { "failed" };
                self.p
                    .metrics
                    .escalations
                    .get_or_create(&OutcomeLabel {
                        outcome: outcome.into(),
                    })
                    .inc();
                match r {
                    Ok(c) => {
                        let elapsed = t0.elapsed().as_millis() as u64;
                        self.p.metrics.observe_query("cloud", elapsed as f64);
                        let mut prov = Provenance::answered_by(&c.gateway, &c.model, 1.0, &task);
                        prov.route = "cloud".into();
                        prov.gateway = Some(c.gateway.clone());
                        prov.cloud_ms = Some(u64::from(c.cloud_ms));
                        prov.elapsed_ms = elapsed;
                        prov.safety_flag = true;
                        prov.safety_category = safety.category.clone();
                        return Ok(Answer {
                            text: c.text,
                            model: c.model,
                            finish_reason: "stop".into(),
                            prompt_tokens: 0,
                            completion_tokens: 0,
                            tokens: Vec::new(),
                            prov,
                        });
                    }
                    Err(e) => degraded = Some(format!("safety: {e}")),
                }
            }
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
                task: Some(task.clone()),
                team: req.ext.team.clone(),
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
                    if let Some(d) = degraded {
                        prov.degraded = true;
                        prov.degraded_reason = Some(d);
                        self.p.metrics.degraded.inc();
                    }
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
