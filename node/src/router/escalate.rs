//! The coordinator's side of escalation: send the query and what the swarm said
//! to the elected gateway (this node's own cloud access when it is the gateway),
//! retrying once through a successor if the gateway fails mid-escalation.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use swarm_protocol::query::CloudAnswer;
use swarm_protocol::{ErrorCode, EscalateReply, EscalateRequest, Task, VoterRecord};

use crate::network::NetError;

use super::request::{remaining, wire_deadline, ChatRequest};
use super::Router;

impl Router {
    /// Send the query and the swarm's answers to the gateway; `Err` says why the
    /// cloud could not answer (the caller degrades to the swarm's answer).
    pub(super) async fn escalate(
        &self,
        query_id: u64,
        req: &ChatRequest,
        task: &Task,
        votes: Vec<VoterRecord>,
    ) -> Result<CloudAnswer, String> {
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
                return Err(format!("cloud unavailable: {last}"));
            };
            let left = remaining(req.deadline);
            if left.is_zero() {
                return Err("cloud unavailable: deadline passed".into());
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
                self.p.gateway.call(&er).await.map_err(|e| e.message)
            } else {
                match g.peer.parse::<PeerId>() {
                    Ok(p) => match self.p.net.escalate(p, er, left).await {
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
                    return Ok(CloudAnswer {
                        text: r.text,
                        model: r.model,
                        cloud_ms: r.cloud_ms,
                        gateway: r.gateway,
                    })
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
        Err(format!("cloud unavailable: {last}"))
    }
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
