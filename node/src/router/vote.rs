//! The coordinator's side of a vote: ask k heterogeneous peers (chosen by the
//! protocol's voter selection), tally answers as they arrive, stop early once
//! the leader is safe, and pick the winning wording. Free-text votes are decided
//! by meaning (answers clustered by their sentence embeddings) when the node has
//! an embedder, by exact match otherwise.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use libp2p::PeerId;
use swarm_protocol::{
    free_vote, normalize, select_voters_spread, FreeVote, Task, VoteReply, VoteRequest, VoteTally,
    VoterCandidate, VoterRecord,
};

use super::local::LocalAnswer;
use super::request::{remaining, wire_deadline, ChatRequest, VoterView};
use super::Router;
use crate::inference::embedder::{EmbedError, Embedder};
use crate::swarm::load_of;

pub(super) struct VoteRun {
    pub vote_ms: f64,
    pub winner_text: Option<String>,
    pub winner_model: Option<String>,
    pub agreement: f32,
    pub valid: usize,
    pub quorum_met: bool,
    pub voters: Vec<VoterView>,
    pub records: Vec<VoterRecord>,
}

/// A voter's raw answer: (text, confidence, model).
type Raw = (String, f32, String);

impl Router {
    /// Ask k heterogeneous peers, tally as answers arrive, stop once the leader is safe.
    pub(super) async fn run_vote(
        &self,
        query_id: u64,
        req: &ChatRequest,
        task: &Task,
        own: &LocalAnswer,
    ) -> VoteRun {
        let t_vote = Instant::now();
        let view = self.snapshot();
        let me = self.me().to_string();
        let routing = &self.p.routing;
        let cands: Vec<VoterCandidate> = view
            .peers
            .iter()
            .flat_map(|p| {
                let load = load_of(&p.advert.capacity);
                p.advert.models.iter().map(move |m| VoterCandidate {
                    peer: p.advert.peer.clone(),
                    model: m.id.clone(),
                    load,
                })
            })
            .collect();
        // Spread ties by a per-query salt so coordinators do not all pick the same idle peers.
        let picked = select_voters_spread(&cands, &own.model, routing.voters, query_id);
        let quorum = routing.quorum.min(picked.len() + 1);
        let mut tally = VoteTally::new(task.clone(), quorum, picked.len() + 1);
        let mut voters = vec![VoterView {
            peer: me.clone(),
            model: own.model.clone(),
            answer: Some(own.text.clone()),
            confidence: Some(own.confidence),
            elapsed_ms: own.elapsed_ms,
            inference_ms: Some(own.elapsed_ms),
            error: None,
        }];
        // Raw answers by voter, to show the winning group's best wording.
        let mut raw: BTreeMap<String, Raw> = BTreeMap::new();
        match &own.normalized {
            Some(n) => {
                tally.add(&me, n, own.confidence);
                raw.insert(me.clone(), (own.text.clone(), own.confidence, own.model.clone()));
            }
            None => {
                tally.fail(&me, "empty answer");
            }
        }
        let vote_deadline = req
            .deadline
            .min(Instant::now() + Duration::from_millis(routing.vote_deadline_ms));
        let mut pending = FuturesUnordered::new();
        for c in &picked {
            let Ok(peer) = c.peer.parse::<PeerId>() else {
                continue;
            };
            // Every request of one query carries the query's id, so logs on every peer can follow it.
            let vr = VoteRequest {
                id: query_id,
                messages: req.messages.clone(),
                task: task.clone(),
                max_tokens: req.params.max_tokens.clamp(1, swarm_protocol::MAX_TOKENS),
                deadline_ms: wire_deadline(remaining(vote_deadline)),
                model: Some(c.model.clone()),
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
        let mut answered: Vec<String> = vec![me.clone()];
        while let Some((c, r, ms)) = pending.next().await {
            answered.push(c.peer.clone());
            let mut view = VoterView {
                peer: c.peer.clone(),
                model: c.model.clone(),
                answer: None,
                confidence: None,
                elapsed_ms: ms,
                inference_ms: None,
                error: None,
            };
            let failure = match r {
                Ok(VoteReply::Ok(resp)) if resp.id == query_id => {
                    // The coordinator normalises; a voter's own normal form is not trusted.
                    let n = normalize(task, &resp.answer);
                    view.answer = Some(resp.answer.clone());
                    match n {
                        Some(n) => {
                            tally.add(&c.peer, &n, resp.confidence);
                            raw.insert(c.peer.clone(), (resp.answer, resp.confidence, resp.model.clone()));
                            view.confidence = Some(resp.confidence);
                            view.inference_ms = Some(u64::from(resp.elapsed_ms));
                            view.model = resp.model;
                            None
                        }
                        None => Some((
                            "unusable answer".to_string(),
                            "unusable answer for this task".to_string(),
                        )),
                    }
                }
                Ok(VoteReply::Ok(_)) => Some((
                    "reply to another request".into(),
                    "reply to another request".into(),
                )),
                Ok(VoteReply::Err(e)) => Some((e.message.clone(), format!("{:?}: {}", e.code, e.message))),
                Err(e) => Some((e.to_string(), e.to_string())),
            };
            if let Some((reason, shown)) = failure {
                self.p.metrics.voter_failures.inc();
                tally.fail(&c.peer, &reason);
                view.error = Some(shown);
            }
            voters.push(view);
            if !matches!(task, Task::Free) && tally.can_stop_early() {
                break;
            }
        }
        // Voters not waited for (early stop) are listed as such.
        for c in picked.iter().filter(|c| !answered.contains(&c.peer)) {
            voters.push(VoterView {
                peer: c.peer.clone(),
                model: c.model.clone(),
                answer: None,
                confidence: None,
                elapsed_ms: 0,
                inference_ms: None,
                error: Some("not needed: the vote was already decided".into()),
            });
        }
        let mut outcome = tally.outcome();
        // Free text: answers that say the same thing in other words are one answer.
        let mut by_meaning: Option<(String, String)> = None;
        if matches!(task, Task::Free) && raw.len() >= 2 {
            if let Some(embedder) = self.p.semantic.embedder().await {
                let answers: Vec<Raw> = raw.values().cloned().collect();
                match free_vote_by_meaning(embedder, &answers, routing.free_similarity).await {
                    Ok(v) => {
                        let (text, _, model) = &answers[v.winner];
                        outcome.winner = Some(text.clone());
                        outcome.agreement = v.agreement;
                        by_meaning = Some((text.clone(), model.clone()));
                    }
                    Err(e) => tracing::warn!("free-text vote: embedding failed, exact match used: {e}"),
                }
            }
        }
        let (winner_text, winner_model) = match (&outcome.winner, task, by_meaning) {
            (Some(_), Task::Free, Some((text, model))) => (Some(text), Some(model)),
            (Some(label), Task::Mcq { choices }, _) => (
                choices
                    .iter()
                    .find(|c| &c.label == label)
                    .map(|c| format!("{}. {}", c.label, c.text))
                    .or(Some(label.clone())),
                best_in_group(&raw, task, label).map(|(_, m)| m),
            ),
            (Some(label), Task::Label { .. }, _) => (
                Some(label.clone()),
                best_in_group(&raw, task, label).map(|(_, m)| m),
            ),
            (Some(norm), _, _) => match best_in_group(&raw, task, norm) {
                Some((text, m)) => (Some(text), Some(m)),
                None => (Some(norm.clone()), None),
            },
            (None, _, _) => (None, None),
        };
        let records = voters
            .iter()
            .map(|v| VoterRecord {
                peer: v.peer.clone(),
                model: v.model.clone(),
                answer: v.answer.clone().unwrap_or_default(),
                confidence: v.confidence.unwrap_or(0.0).clamp(0.0, 1.0),
                elapsed_ms: v.elapsed_ms.min(u64::from(u32::MAX)) as u32,
                error: v.error.clone(),
            })
            .collect();
        VoteRun {
            vote_ms: t_vote.elapsed().as_secs_f64() * 1e3,
            winner_text,
            winner_model,
            agreement: outcome.agreement,
            valid: outcome.votes,
            quorum_met: outcome.quorum_met,
            voters,
            records,
        }
    }
}

/// Embed `(text, confidence, model)` answers (off the runtime) and [`free_vote`] them.
pub async fn free_vote_by_meaning(
    embedder: &Embedder,
    answers: &[(String, f32, String)],
    threshold: f32,
) -> Result<FreeVote, EmbedError> {
    let texts: Vec<String> = answers.iter().map(|a| a.0.clone()).collect();
    let vectors = embedder.embed(texts).await?;
    let items: Vec<(String, Vec<f32>, f32)> = answers
        .iter()
        .zip(vectors)
        .map(|((t, c, _), v)| (t.clone(), v, *c))
        .collect();
    free_vote(&items, threshold).ok_or_else(|| EmbedError::Compute("no answers to cluster".into()))
}

/// The most confident raw answer among the voters whose answer normalises to `norm`.
fn best_in_group(raw: &BTreeMap<String, Raw>, task: &Task, norm: &str) -> Option<(String, String)> {
    raw.values()
        .filter(|(text, _, _)| normalize(task, text).as_deref() == Some(norm))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(t, _, m)| (t.clone(), m.clone()))
}
