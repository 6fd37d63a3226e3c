//! The vote's network side: send the requests the query coordinator
//! (`swarm_protocol::query`) asks for, feed it each ballot as it arrives, and
//! stop as soon as it decides (early stop) or the vote's deadline passes. The
//! coordinator owns the rules (tally, quorum, meaning-based free text); this
//! module only carries messages and records what each voter did for the provenance.

use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use libp2p::PeerId;
use swarm_protocol::query::{AnswerIn, Coordinator, InEvent, OutEvent};
use swarm_protocol::{VoteReply, VoteRequest, VoterCandidate};

use super::request::{remaining, wire_deadline, ChatRequest, VoterView};
use super::Router;

impl Router {
    /// Ask `picked`, feeding `coord` until it decides; returns its events from
    /// then on and what each voter did.
    pub(super) async fn run_vote(
        &self,
        coord: &mut Coordinator,
        query_id: u64,
        req: &ChatRequest,
        picked: &[VoterCandidate],
    ) -> (Vec<OutEvent>, Vec<VoterView>) {
        let routing = &self.p.routing;
        let vote_deadline = req
            .deadline
            .min(Instant::now() + Duration::from_millis(routing.vote_deadline_ms));
        let mut pending = FuturesUnordered::new();
        let mut out: Vec<OutEvent> = Vec::new();
        for c in picked {
            let Ok(peer) = c.peer.parse::<PeerId>() else {
                out.extend(coord.handle(InEvent::Ballot {
                    peer: c.peer.clone(),
                    result: Err("bad peer id".into()),
                }));
                continue;
            };
            // Every request of one query carries the query's id, so logs on every peer can follow it.
            let vr = VoteRequest {
                id: query_id,
                messages: req.messages.clone(),
                task: coord.task().clone(),
                max_tokens: req.params.max_tokens.clamp(1, swarm_protocol::MAX_TOKENS),
                deadline_ms: wire_deadline(remaining(vote_deadline)),
                model: Some(c.model.clone()),
                team: req.ext.team.clone(),
            };
            let net = self.p.net.clone();
            let c = c.clone();
            let wait = remaining(vote_deadline);
            pending.push(async move {
                let t = Instant::now();
                let r = net.vote(peer, vr, wait).await;
                (c, r, t.elapsed().as_millis() as u64)
            });
        }
        let mut views: Vec<VoterView> = Vec::new();
        let decided = |out: &[OutEvent]| out.iter().any(|e| !matches!(e, OutEvent::Ignored { .. }));
        while !decided(&out) {
            let next = tokio::time::timeout(remaining(vote_deadline), pending.next()).await;
            let Ok(Some((c, r, ms))) = next else {
                // Deadline (or nobody left to hear from): the missing voters have failed.
                out.extend(coord.handle(InEvent::VoteDeadline));
                break;
            };
            let mut view = VoterView {
                peer: c.peer.clone(),
                model: c.model.clone(),
                answer: None,
                confidence: None,
                elapsed_ms: ms,
                inference_ms: None,
                error: None,
                model_version: String::new(),
            };
            let result = match r {
                Ok(VoteReply::Ok(resp)) if resp.id == query_id => {
                    view.answer = Some(resp.answer.clone());
                    view.confidence = Some(resp.confidence);
                    view.inference_ms = Some(u64::from(resp.elapsed_ms));
                    view.model = resp.model.clone();
                    view.model_version = resp.model_version.clone();
                    Ok(AnswerIn {
                        model: resp.model,
                        text: resp.answer,
                        confidence: resp.confidence,
                        elapsed_ms: ms.min(u64::from(u32::MAX)) as u32,
                    })
                }
                Ok(VoteReply::Ok(_)) => Err("reply to another request".to_string()),
                Ok(VoteReply::Err(e)) => Err(format!("{:?}: {}", e.code, e.message)),
                Err(e) => Err(e.to_string()),
            };
            let events = coord.handle(InEvent::Ballot {
                peer: c.peer.clone(),
                result,
            });
            // The coordinator may refuse the answer (nothing usable for the task).
            if let Some(err) = coord_error(coord, &c.peer) {
                view.confidence = None;
                view.error = Some(err);
                self.p.metrics.voter_failures.inc();
            }
            views.push(view);
            out.extend(events);
        }
        // Voters not waited for, or not heard from by the deadline, as the coordinator recorded them.
        for c in picked {
            if views.iter().all(|v| v.peer != c.peer) {
                let error = coord_error(coord, &c.peer);
                if error.as_deref() == Some("timeout") {
                    self.p.metrics.voter_failures.inc();
                }
                views.push(VoterView {
                    peer: c.peer.clone(),
                    model: c.model.clone(),
                    answer: None,
                    confidence: None,
                    elapsed_ms: 0,
                    inference_ms: None,
                    error: error.or_else(|| Some("not needed: the vote was already decided".into())),
                    model_version: String::new(),
                });
            }
        }
        (out, views)
    }
}

/// The error the coordinator recorded for `peer`'s ballot, if any.
fn coord_error(coord: &Coordinator, peer: &str) -> Option<String> {
    coord
        .records()
        .iter()
        .find(|r| r.peer == peer)
        .and_then(|r| r.error.clone())
}
