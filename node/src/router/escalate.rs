//! The coordinator's side of escalation: send the query and what the swarm said
//! to the elected gateway (this node's own cloud access when it is the gateway),
//! retrying once through a successor if the gateway fails mid-escalation.
//! When the caller streams, the cloud's own SSE pieces are relayed to it as they
//! arrive (through `/escalate-stream` from a remote gateway); a relay that
//! breaks after its first piece cannot be retried (the user has seen part of
//! an answer) and fails the query.

use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use libp2p::PeerId;
use swarm_protocol::query::CloudAnswer;
use swarm_protocol::{
    ErrorCode, EscalateFrame, EscalateReply, EscalateRequest, EscalateResponse, Task, VoterRecord,
};
use tokio::sync::mpsc;

use crate::dataset::{CloudRecord, DatasetLog, Record, Signals, SwarmAnswer};
use crate::network::NetError;

use super::request::{remaining, wire_deadline, ChatRequest};
use super::Router;

impl Router {
    /// Send the query and the swarm's answers to the gateway; `Err` says why the
    /// cloud could not answer (the caller degrades to the swarm's answer).
    /// With `relay`, the cloud's pieces go there as they arrive; the outer
    /// `Err` is a relay that broke after its first piece.
    pub(super) async fn escalate(
        &self,
        query_id: u64,
        req: &ChatRequest,
        task: &Task,
        votes: Vec<VoterRecord>,
        relay: Option<&mpsc::Sender<String>>,
    ) -> Result<Result<CloudAnswer, String>, RelayBroke> {
        let mut tried: Vec<String> = Vec::new();
        let mut last = String::from("no gateway");
        for attempt in 0..2 {
            let mut gw = self.snapshot().gateway.clone();
            if attempt == 1 {
                // Give the membership task a few advert periods to elect a successor.
                let wait =
                    Duration::from_millis(self.p.advert_interval_ms * u64::from(self.p.missed_adverts + 1));
                let until = (Instant::now() + wait).min(req.deadline);
                let mut rx = self.p.view.clone();
                while gw.as_ref().is_none_or(|g| tried.contains(&g.peer)) && Instant::now() < until {
                    let _ = tokio::time::timeout(remaining(until), rx.changed()).await;
                    gw = rx.borrow().gateway.clone();
                }
            }
            let Some(g) = gw.filter(|g| !tried.contains(&g.peer)) else {
                return Ok(Err(format!("cloud unavailable: {last}")));
            };
            let left = remaining(req.deadline);
            if left.is_zero() {
                return Ok(Err("cloud unavailable: deadline passed".into()));
            }
            let er = EscalateRequest {
                id: query_id,
                messages: req.messages.clone(),
                task: task.clone(),
                max_tokens: req.params.max_tokens.clamp(1, swarm_protocol::MAX_TOKENS),
                swarm_answers: votes.iter().take(swarm_protocol::MAX_VOTERS).cloned().collect(),
                deadline_ms: wire_deadline(left),
            };
            // The budget is part of the gate: a gateway that advertises none
            // left is not sent the query (nothing leaves for a sure refusal).
            if g.peer != self.me() && advertised_budget(&self.snapshot(), &g.peer) == Some(0) {
                last = format!("gateway {}: cloud budget exhausted", g.peer);
                tried.push(g.peer.clone());
                continue;
            }
            let mut not_yet = false;
            let res = if g.peer == self.me() {
                match relay {
                    Some(tx) => {
                        let frames = self.p.gateway.call_stream(&er).map(Ok::<_, NetError>);
                        match relay_frames(frames, tx).await? {
                            Ok(EscalateReply::Ok(r)) => Ok(r),
                            Ok(EscalateReply::Err(e)) => Err(e.message),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                    None => self.p.gateway.call(&er).await.map_err(|e| e.message),
                }
            } else {
                let peer = g.peer.parse::<PeerId>();
                let streamed = match (relay, &peer) {
                    (Some(tx), Ok(p)) => match self.p.net.escalate_stream(*p, er.clone(), left).await {
                        Ok(frames) => Some(relay_frames(frames, tx).await?),
                        Err(e) => {
                            // Nothing relayed yet: the plain request below serves (an older
                            // gateway, a handshake still under way, or a real failure it reports).
                            tracing::debug!("streamed escalation not opened, asking plainly: {e}");
                            None
                        }
                    },
                    _ => None,
                };
                match peer {
                    Ok(p) => match streamed
                        .map_or_else(
                            || {
                                futures::future::Either::Left(self.p.net.escalate(
                                    p,
                                    er,
                                    remaining(req.deadline),
                                ))
                            },
                            |r| futures::future::Either::Right(std::future::ready(r)),
                        )
                        .await
                    {
                        Ok(EscalateReply::Ok(r)) => Ok(r),
                        Ok(EscalateReply::Err(e)) => {
                            if e.code == ErrorCode::Unauthorized && e.message.contains("not the gateway") {
                                // Mid-handover: we chose it before it heard its predecessor
                                // expire. It may claim within an advert period; retry it once.
                                not_yet = true;
                            }
                            Err(format!("gateway {}: {}", g.peer, e.message))
                        }
                        Err(e) => {
                            // Unreachable, not merely refusing: drop its claim now rather than
                            // after its adverts expire, so the retry finds a successor sooner.
                            if unreachable(&e) {
                                let _ = self.p.unreachable.try_send(g.peer.clone());
                            }
                            Err(format!("gateway {}: {e}", g.peer))
                        }
                    },
                    Err(_) => Err("bad gateway id".into()),
                }
            };
            match res {
                Ok(r) => {
                    return Ok(Ok(CloudAnswer {
                        text: r.text,
                        model: r.model,
                        cloud_ms: r.cloud_ms,
                        gateway: r.gateway,
                    }))
                }
                Err(e) => {
                    tracing::warn!("escalation failed: {e}");
                    last = e;
                    if not_yet {
                        let pause =
                            Duration::from_millis(self.p.advert_interval_ms).min(remaining(req.deadline));
                        tokio::time::sleep(pause).await;
                    } else {
                        tried.push(g.peer.clone());
                    }
                }
            }
        }
        Ok(Err(format!("cloud unavailable: {last}")))
    }
}

impl Router {
    /// Log this node's own escalated query (with `[dataset]` on and a privacy
    /// that allows it): the swarm's answers, the signals and the cloud's answer.
    pub(super) fn record_escalation(
        &self,
        query_id: u64,
        req: &ChatRequest,
        task: &Task,
        prov: &super::Provenance,
        voters: &[super::VoterView],
        cloud: &CloudAnswer,
    ) {
        let Some(log) = &self.p.dataset else {
            return;
        };
        if !DatasetLog::allows(self.privacy_of(req)) {
            return;
        }
        log.record(&Record {
            ts_ms: crate::clock::wall_ms(),
            query_id,
            recorded_by: self.me().to_string(),
            role: "coordinator".into(),
            origin: self.me().to_string(),
            task: task.clone(),
            messages: req.messages.clone(),
            swarm: voters.iter().map(SwarmAnswer::from).collect(),
            cloud: CloudRecord {
                model: cloud.model.clone(),
                text: cloud.text.clone(),
                gateway: cloud.gateway.clone(),
                cloud_ms: u64::from(cloud.cloud_ms),
            },
            signals: Signals {
                local_confidence: prov.local_confidence,
                agreement: prov.agreement,
                safety_flag: prov.safety_flag,
                safety_category: prov.safety_category.clone(),
            },
        });
    }

    /// Gateway side: log a peer's escalation the cloud answered. Only `cloud`
    /// privacy is ever escalated, so no further check is needed here; the
    /// request carries no signals.
    pub(super) fn record_served_escalation(&self, origin: &str, req: &EscalateRequest, r: &EscalateResponse) {
        let Some(log) = &self.p.dataset else {
            return;
        };
        log.record(&Record {
            ts_ms: crate::clock::wall_ms(),
            query_id: req.id,
            recorded_by: self.me().to_string(),
            role: "gateway".into(),
            origin: origin.to_string(),
            task: req.task.clone(),
            messages: req.messages.clone(),
            swarm: req.swarm_answers.iter().map(SwarmAnswer::from).collect(),
            cloud: CloudRecord {
                model: r.model.clone(),
                text: r.text.clone(),
                gateway: r.gateway.clone(),
                cloud_ms: u64::from(r.cloud_ms),
            },
            signals: Signals::default(),
        });
    }
}

impl From<&super::VoterView> for SwarmAnswer {
    fn from(v: &super::VoterView) -> Self {
        SwarmAnswer {
            peer: v.peer.clone(),
            model: v.model.clone(),
            model_version: v.model_version.clone(),
            answer: v.answer.clone(),
            confidence: v.confidence,
            error: v.error.clone(),
        }
    }
}

impl From<&VoterRecord> for SwarmAnswer {
    fn from(v: &VoterRecord) -> Self {
        SwarmAnswer {
            peer: v.peer.clone(),
            model: v.model.clone(),
            model_version: v.model_version.clone(),
            answer: Some(v.answer.clone()),
            confidence: Some(v.confidence),
            error: v.error.clone(),
        }
    }
}

/// A relayed cloud answer broke off after part of it reached the user.
#[derive(Debug)]
pub(super) struct RelayBroke(pub String);

/// Pass a gateway's pieces on to `tx` and return its reply as a plain
/// escalation would give it. A failure before the first piece is an ordinary
/// reply (retried or degraded as usual); after it, [`RelayBroke`].
async fn relay_frames(
    frames: impl Stream<Item = Result<EscalateFrame, NetError>>,
    tx: &mpsc::Sender<String>,
) -> Result<Result<EscalateReply, NetError>, RelayBroke> {
    tokio::pin!(frames);
    let mut relayed = false;
    while let Some(frame) = frames.next().await {
        let reply = match frame {
            Ok(EscalateFrame::Piece(t)) => {
                relayed = true;
                // A receiver that left has abandoned the query; nothing to do.
                let _ = tx.send(t).await;
                continue;
            }
            Ok(EscalateFrame::End(r)) => Ok(r),
            Err(e) => Err(e),
        };
        return match (&reply, relayed) {
            (Ok(EscalateReply::Ok(_)), _) | (_, false) => Ok(reply),
            (Ok(EscalateReply::Err(e)), true) => Err(RelayBroke(e.message.clone())),
            (Err(e), true) => Err(RelayBroke(e.to_string())),
        };
    }
    let closed = "the gateway closed the stream without an answer".to_string();
    if relayed {
        return Err(RelayBroke(closed));
    }
    Ok(Err(NetError::Request {
        peer: "gateway".into(),
        reason: closed,
    }))
}

/// The cloud calls `peer` says it has left, if it advertises cloud access.
fn advertised_budget(view: &crate::swarm::SwarmView, peer: &str) -> Option<u32> {
    view.peers
        .iter()
        .find(|p| p.advert.peer == peer)
        .and_then(|p| p.advert.cloud.as_ref())
        .map(|c| c.budget_left)
}

/// The request never reached a live gateway (dial failed, connection closed), as opposed to a
/// slow cloud behind a live one (a timeout), which must not cost the gateway its role.
fn unreachable(e: &NetError) -> bool {
    match e {
        NetError::Request { reason, .. } => {
            let r = reason.to_ascii_lowercase();
            r.contains("dial") || r.contains("closed")
        }
        _ => false,
    }
}
