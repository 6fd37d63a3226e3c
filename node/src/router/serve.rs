//! Serving peers: answering a coordinator's vote request, a whole query
//! forwarded by a peer that lacks the model, and (on the gateway) an
//! escalation. Each request runs in its own task, in a span that carries the
//! requesting peer and the coordinator's query id.

use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::PeerId;
use swarm_protocol::{
    clip_owned, ErrorCode, EscalateFrame, EscalateReply, EscalateRequest, QueryReply, QueryRequest,
    QueryResponse, Task, VoteReply, VoteRequest, VoteResponse,
};
use tracing::Instrument;

use super::local::generate_request;
use super::request::{wire_err, wire_from_inference, ChatParams};
use super::Router;
use crate::confidence;
use crate::network::{NetEvent, RelaySink};

impl Router {
    /// Serve one request from a peer in its own task; other events are ignored.
    pub fn serve(&self, ev: NetEvent) {
        let r = self.clone();
        let node = self.p.name.clone();
        match ev {
            NetEvent::Vote { peer, req, channel } => {
                let span = tracing::info_span!("vote", node = %node, query_id = req.id, %peer);
                tokio::spawn(
                    async move {
                        let reply = r.serve_vote(peer, req).await;
                        let _ = r.p.net.respond_vote(channel, reply).await;
                    }
                    .instrument(span),
                );
            }
            NetEvent::Query { peer, req, channel } => {
                let span = tracing::info_span!("forwarded", node = %node, query_id = req.id, %peer);
                tokio::spawn(
                    async move {
                        let reply = r.serve_query(peer, req).await;
                        let _ = r.p.net.respond_query(channel, reply).await;
                    }
                    .instrument(span),
                );
            }
            NetEvent::Escalate { peer, req, channel } => {
                let span = tracing::info_span!("escalation", node = %node, query_id = req.id, %peer);
                tokio::spawn(
                    async move {
                        let reply = r.serve_escalate(peer, req).await;
                        let _ = r.p.net.respond_escalate(channel, reply).await;
                    }
                    .instrument(span),
                );
            }
            NetEvent::EscalateStream { peer, req, sink } => {
                let span = tracing::info_span!("escalation", node = %node, query_id = req.id, %peer);
                tokio::spawn(r.serve_escalate_stream(peer, req, sink).instrument(span));
            }
            _ => {}
        }
    }

    /// Voter side: answer a peer's vote request with the requested (or default) model.
    pub async fn serve_vote(&self, peer: PeerId, req: VoteRequest) -> VoteReply {
        let deadline = Instant::now() + Duration::from_millis(u64::from(req.deadline_ms));
        if let Some(t) = &req.team {
            // The coordinator should not have asked; refuse rather than see another team's data.
            if !self.p.teams.serves(t) {
                tracing::warn!(%peer, team = %t, "vote request for a team this node does not serve, refused");
                return VoteReply::Err(wire_err(
                    ErrorCode::Unauthorized,
                    "this node does not serve that team",
                ));
            }
        }
        let models = &self.p.models;
        let model = req
            .model
            .as_ref()
            .and_then(|m| models.get(m))
            .or_else(|| models.default_handle());
        let Some(model) = model else {
            return VoteReply::Err(wire_err(ErrorCode::NoModel, "this node serves no model"));
        };
        tracing::debug!(%peer, "vote request");
        // The remote lane: behind local users, within this peer's quota.
        let model = &model.for_peer(&peer.to_string());
        let params = ChatParams::greedy(req.max_tokens.min(self.p.max_tokens_limit));
        match self
            .answer_locally(model, &req.messages, &req.task, &params, deadline, None)
            .await
        {
            Ok(a) => VoteReply::Ok(VoteResponse {
                id: req.id,
                normalized: a.normalized.clone().unwrap_or_default(),
                answer: clip_owned(a.text, swarm_protocol::MAX_ANSWER_BYTES),
                confidence: a.confidence.clamp(0.0, 1.0),
                model_version: self.p.models.version(&a.model),
                model: a.model,
                tokens: a.completion_tokens,
                elapsed_ms: a.elapsed_ms.min(u64::from(u32::MAX)) as u32,
            }),
            Err(e) => VoteReply::Err(wire_from_inference(&e)),
        }
    }

    /// Serve a whole query forwarded by a peer that lacks the model.
    pub async fn serve_query(&self, peer: PeerId, req: QueryRequest) -> QueryReply {
        let Some(model) = self.p.models.get(&req.model) else {
            return QueryReply::Err(wire_err(
                ErrorCode::NoModel,
                format!("no model `{}` here", req.model),
            ));
        };
        tracing::debug!(%peer, "forwarded query");
        if let Some(t) = &req.team {
            if !self.p.teams.serves(t) {
                tracing::warn!(%peer, team = %t, "forwarded query for a team this node does not serve, refused");
                return QueryReply::Err(wire_err(
                    ErrorCode::Unauthorized,
                    "this node does not serve that team",
                ));
            }
        }
        let model = &model.for_peer(&peer.to_string());
        let t0 = Instant::now();
        let deadline = Instant::now() + Duration::from_millis(u64::from(req.deadline_ms));
        // A constrained task is answered as the coordinator would: by scoring its options.
        if let Some(task @ (Task::Mcq { .. } | Task::Label { .. })) = &req.task {
            let params = ChatParams::greedy(req.max_tokens.min(self.p.max_tokens_limit));
            return match self
                .answer_locally(model, &req.messages, task, &params, deadline, None)
                .await
            {
                Ok(a) => QueryReply::Ok(QueryResponse {
                    id: req.id,
                    text: clip_owned(a.text, swarm_protocol::MAX_TEXT_BYTES),
                    model: req.model.clone(),
                    confidence: a.confidence.clamp(0.0, 1.0),
                    mean_logprob: a.raw_confidence.clamp(1e-9, 1.0).ln(),
                    min_prob: a.raw_confidence.clamp(0.0, 1.0),
                    prompt_tokens: a.prompt_tokens,
                    completion_tokens: a.completion_tokens,
                    finish_reason: a.finish_reason,
                    elapsed_ms: a.elapsed_ms.min(u64::from(u32::MAX)) as u32,
                }),
                Err(e) => QueryReply::Err(wire_from_inference(&e)),
            };
        }
        let params = ChatParams {
            max_tokens: req.max_tokens.min(self.p.max_tokens_limit),
            temperature: req.temperature,
            top_p: 1.0,
            seed: req.seed,
            stop: req.stop.clone(),
            top_logprobs: 0,
        };
        match model
            .generate(generate_request(&req.messages, &params), Some(deadline))
            .await
        {
            Ok(g) => {
                self.p
                    .models
                    .record_speed(&req.model, g.completion_tokens, g.decode_ms);
                let elapsed = t0.elapsed().as_millis() as u64;
                self.p.metrics.observe_query("local", elapsed as f64);
                QueryReply::Ok(QueryResponse {
                    id: req.id,
                    text: clip_owned(g.text.trim().to_string(), swarm_protocol::MAX_TEXT_BYTES),
                    model: req.model.clone(),
                    confidence: self
                        .p
                        .routing
                        .calibrate(&req.model, |s| confidence::generation_signal(&g, s)),
                    mean_logprob: g.mean_logprob.clamp(-1.0e6, 0.0),
                    min_prob: g.min_prob.clamp(0.0, 1.0),
                    prompt_tokens: g.prompt_tokens as u32,
                    completion_tokens: g.completion_tokens as u32,
                    finish_reason: g.finish_reason.as_str().into(),
                    elapsed_ms: elapsed.min(u64::from(u32::MAX)) as u32,
                })
            }
            Err(e) => QueryReply::Err(wire_from_inference(&e)),
        }
    }

    /// Gateway side: call the cloud for a peer's escalation.
    pub async fn serve_escalate(&self, peer: PeerId, req: EscalateRequest) -> EscalateReply {
        tracing::debug!(%peer, "escalation request");
        let view = self.snapshot();
        if view.gateway.as_ref().map(|g| g.peer.as_str()) != Some(self.me()) {
            return EscalateReply::Err(wire_err(ErrorCode::Unauthorized, "this node is not the gateway"));
        }
        match self.p.gateway.call(&req).await {
            Ok(r) => {
                self.record_served_escalation(&peer.to_string(), &req, &r);
                EscalateReply::Ok(r)
            }
            Err(e) => EscalateReply::Err(e),
        }
    }

    /// Gateway side, streamed: relay the cloud's pieces to the peer as they
    /// arrive, then the whole reply. A peer that stops reading ends the relay
    /// and, with it, the cloud call.
    pub async fn serve_escalate_stream(self, peer: PeerId, req: EscalateRequest, mut sink: RelaySink) {
        tracing::debug!(%peer, "streamed escalation request");
        let view = self.snapshot();
        if view.gateway.as_ref().map(|g| g.peer.as_str()) != Some(self.me()) {
            let no = EscalateReply::Err(wire_err(ErrorCode::Unauthorized, "this node is not the gateway"));
            sink.end(no).await;
            return;
        }
        let mut frames = self.p.gateway.call_stream(&req);
        while let Some(frame) = frames.next().await {
            match frame {
                EscalateFrame::Piece(t) => {
                    if let Err(e) = sink.piece(&t).await {
                        tracing::debug!(%peer, "relay ended: {e}");
                        return;
                    }
                }
                EscalateFrame::End(reply) => {
                    if let EscalateReply::Ok(r) = &reply {
                        self.record_served_escalation(&peer.to_string(), &req, r);
                    }
                    sink.end(reply).await;
                    return;
                }
            }
        }
    }
}
