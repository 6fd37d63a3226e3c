//! The coordinator's side of a query, driven through `swarm_protocol::query::Coordinator` (the
//! state machine the node's router drives too): starting it after the local answer, carrying out
//! what it asks (vote requests, embeddings, escalation), feeding it ballots and deadlines, and
//! turning its decision into the query's outcome. Ballots are checked against an independent
//! count; ground truth stays here, since the coordinator never sees it.

use std::rc::Rc;

use swarm_protocol::query::{
    live_voters, voter_candidates, AnswerIn, Coordinator, CoordinatorConfig, InEvent, OutEvent,
};
use swarm_protocol::{
    decode_msg, encode_msg, normalize, ChatMessage, VoteReply, VoteRequest, VoterCandidate,
};

use super::{us, Ev, Phase, ReplyMsg, Sim};
use crate::models::Question;
use crate::scenario::Kind;

impl Sim {
    /// Peers in the coordinator's table that could vote (they serve a model).
    pub(super) fn live_voters_of(&self, coord: u32) -> usize {
        let n = &self.nodes[coord as usize];
        live_voters(
            n.mem.table().live().map(|e| e.advert.as_ref()),
            &self.ids[coord as usize],
        )
    }

    /// The local answer is in: start the query's coordinator and carry out its first decision.
    pub(super) fn start_coordinator(&mut self, id: u64) {
        let Some(q) = self.queries.get(&id) else {
            return;
        };
        let coord = q.coord;
        let question = self.question(q).clone();
        let me = self.ids[coord as usize].clone();
        let candidates: Vec<VoterCandidate> = voter_candidates(
            self.nodes[coord as usize]
                .mem
                .table()
                .live()
                .map(|e| e.advert.as_ref()),
            &me,
        );
        let inputs = self.inputs(q, 0.0);
        let cfg = CoordinatorConfig {
            voters: self.sc.queries.k,
            quorum: self.sc.queries.quorum,
            free_similarity: self.sc.queries.free_threshold,
            thresholds: self.thresholds,
        };
        let mut sm = Coordinator::new(&me, question.task.clone(), cfg, inputs, candidates, id);
        let own_model = self.sc.models[self.nodes[coord as usize].model].id.clone();
        let own = q.own.clone();
        let (text, confidence) = own
            .as_ref()
            .map_or((String::new(), 0.0), |a| (a.raw.clone(), a.confidence));
        if let Some(a) = &own {
            if let Some(norm) = normalize(&question.task, &a.raw) {
                let truth = question_truth(&question, &norm, a.correct);
                if let Some(q) = self.queries.get_mut(&id) {
                    q.truth.insert(norm, truth);
                    q.embeddings.insert(a.raw.clone(), a.embedding.clone());
                }
            }
        }
        let out = sm.handle(InEvent::Local(AnswerIn {
            model: own_model,
            text,
            confidence,
            elapsed_ms: 0,
        }));
        let Some(q) = self.queries.get_mut(&id) else {
            return;
        };
        q.ballot_keys.insert(coord);
        q.sm = Some(sm);
        self.apply(id, out);
    }

    /// Feed the query's coordinator one event and carry out what it asks.
    fn feed(&mut self, id: u64, ev: InEvent) {
        let Some(out) = self
            .queries
            .get_mut(&id)
            .and_then(|q| q.sm.as_mut())
            .map(|sm| sm.handle(ev))
        else {
            return;
        };
        self.apply(id, out);
    }

    fn apply(&mut self, id: u64, out: Vec<OutEvent>) {
        for ev in out {
            match ev {
                OutEvent::RequestVotes(picked) => self.send_votes(id, &picked),
                OutEvent::Embed(texts) => {
                    // The simulated answers carry their embeddings; the driver looks them up.
                    let vectors = self.queries.get(&id).and_then(|q| {
                        texts
                            .iter()
                            .map(|t| q.embeddings.get(t).cloned())
                            .collect::<Option<Vec<_>>>()
                    });
                    self.feed(id, InEvent::Embeddings(vectors));
                }
                OutEvent::Escalate(records) => {
                    self.count_vote(id);
                    if let Some(q) = self.queries.get_mut(&id) {
                        q.records = records;
                    }
                    self.escalate(id, 0);
                }
                OutEvent::Ignored { peer, reason } => match reason {
                    "late" => self.m.vote.late_replies += 1,
                    "duplicate" => self.m.vote.duplicates_ignored += 1,
                    _ => self.violation(format!("query {id}: ballot from {peer} ignored: {reason}")),
                },
                OutEvent::Finished(d) => {
                    self.count_vote(id);
                    let right = match (&d.cloud, &d.winner) {
                        (Some(_), _) => self.queries.get(&id).is_some_and(|q| q.cloud_correct),
                        (None, Some(w)) => self
                            .queries
                            .get(&id)
                            .is_some_and(|q| q.truth.get(&w.key).copied().unwrap_or(false)),
                        (None, None) => false,
                    };
                    self.finish(id, d.route.as_str(), right, d.degraded.as_deref());
                }
            }
        }
    }

    /// Once per query, when its vote is tallied: ballots, early stops and voter failures.
    fn count_vote(&mut self, id: u64) {
        let Some(q) = self.queries.get_mut(&id) else {
            return;
        };
        if q.vote_counted {
            return;
        }
        let Some(sm) = q.sm.as_ref() else {
            return;
        };
        let Some(v) = sm.vote_summary().cloned() else {
            return;
        };
        q.vote_counted = true;
        let me = &self.ids[q.coord as usize];
        let failures: Vec<String> = sm
            .records()
            .iter()
            .filter(|r| &r.peer != me)
            .filter_map(|r| r.error.clone())
            .filter(|e| !e.starts_with("not needed"))
            .collect();
        let ballots = v.valid + v.failures;
        let keys = q.ballot_keys.len() + q.phantom_voters;
        self.m.vote.votes += 1;
        self.m.vote.ballots += ballots as u64;
        if v.early {
            self.m.vote.early_stops += 1;
        }
        for reason in &failures {
            self.m.vote.voter_failures += 1;
            *self
                .m
                .vote
                .failure_kinds
                .entry(failure_kind(reason).to_owned())
                .or_insert(0) += 1;
        }
        if ballots != keys {
            self.violation(format!(
                "query {id}: tally has {ballots} ballots, {keys} distinct voters"
            ));
        }
    }

    fn send_votes(&mut self, id: u64, picked: &[VoterCandidate]) {
        let Some(q) = self.queries.get(&id) else {
            return;
        };
        let coord = q.coord;
        let question = self.question(q).clone();
        let voters: Vec<u32> = picked
            .iter()
            .filter_map(|c| self.id_index.get(&c.peer).copied())
            .collect();
        // The rest are Sybils: asked, they never answer (the coordinator times them out).
        let phantoms = picked.len() - voters.len();
        self.m.attack.sybil_voters_picked += phantoms as u64;
        if let Some(q) = self.queries.get_mut(&id) {
            q.phase = Phase::Voting;
            q.voters = voters.clone();
            q.phantoms_pending += phantoms;
        }
        let req = VoteRequest {
            id,
            messages: vec![ChatMessage::new("user", &question.prompt)],
            task: question.task.clone(),
            max_tokens: self.sc.queries.tokens.get(question.kind).max(1),
            deadline_ms: self.sc.queries.vote_deadline_ms,
            model: None,
            team: None,
        };
        let deadline = self.now + u64::from(self.sc.queries.vote_deadline_ms) * 1000;
        let bytes = match encode_msg(&req) {
            Ok(b) => Rc::new(b),
            Err(e) => {
                self.violation(format!("query {id}: cannot encode vote request: {e}"));
                self.push(deadline, Ev::VoteDeadline(id));
                return;
            }
        };
        for v in voters {
            if self.linked(coord, v) {
                self.count_rpc(bytes.len());
                let at = self.now + self.rpc_latency_us(coord, v);
                self.push(
                    at,
                    Ev::VoteReq {
                        q: id,
                        voter: v,
                        bytes: bytes.clone(),
                    },
                );
            } else {
                // Dial fails: the peer is gone or on the other side of a partition.
                let at = (self.now + us(self.sc.network.dial_timeout_ms)).min(deadline);
                self.push(
                    at,
                    Ev::VoteFail {
                        q: id,
                        voter: v,
                        reason: "unreachable",
                    },
                );
            }
        }
        self.push(deadline, Ev::VoteDeadline(id));
    }

    /// Feeds one ballot, checking the coordinator's acceptance against an independent count.
    fn ballot(&mut self, id: u64, voter: u32, result: Result<AnswerIn, String>) {
        let peer = self.ids[voter as usize].clone();
        let Some(q) = self.queries.get_mut(&id) else {
            return;
        };
        let awaited = q.sm.as_ref().is_some_and(|sm| sm.awaits(&peer));
        let first = q.voters.contains(&voter) && q.ballot_keys.insert(voter);
        if awaited != first {
            self.violation(format!(
                "query {id}: voter {voter} ballot awaited={awaited} but first={first}"
            ));
        }
        self.feed(id, InEvent::Ballot { peer, result });
    }

    fn voting(&self, id: u64) -> bool {
        self.live_query(id) && self.queries.get(&id).is_some_and(|q| q.phase == Phase::Voting)
    }

    pub(super) fn on_vote_reply(&mut self, id: u64, voter: u32, reply: &ReplyMsg) {
        if !self.voting(id) {
            self.m.vote.late_replies += 1;
            return;
        }
        let Some(question) = self.queries.get(&id).map(|q| self.question(q).clone()) else {
            return;
        };
        let result = match decode_msg::<VoteReply>(&reply.bytes) {
            Ok(VoteReply::Ok(r)) if r.id == id => {
                // Ground truth of what the coordinator will normalise this answer to.
                if let Some(norm) = normalize(&question.task, &r.answer) {
                    let truth = question_truth(&question, &norm, reply.correct);
                    if let Some(q) = self.queries.get_mut(&id) {
                        q.truth.entry(norm).or_insert(truth);
                        q.embeddings
                            .entry(r.answer.clone())
                            .or_insert_with(|| reply.embedding.clone());
                    }
                }
                Ok(AnswerIn {
                    model: r.model,
                    text: r.answer,
                    confidence: r.confidence,
                    elapsed_ms: r.elapsed_ms,
                })
            }
            Ok(VoteReply::Ok(_)) => Err("reply for another query".into()),
            Ok(VoteReply::Err(e)) => Err(format!("{:?}: {}", e.code, e.message)),
            Err(e) => {
                self.violation(format!("query {id}: vote reply does not decode: {e}"));
                Err(format!("undecodable reply: {e}"))
            }
        };
        self.ballot(id, voter, result);
    }

    pub(super) fn on_vote_fail(&mut self, id: u64, voter: u32, reason: &str) {
        if self.voting(id) {
            self.ballot(id, voter, Err(reason.to_owned()));
        }
    }

    pub(super) fn on_vote_deadline(&mut self, id: u64) {
        if self.voting(id) {
            // The voters not heard from fail now: they count as ballots too.
            if let Some(q) = self.queries.get_mut(&id) {
                let missing: Vec<u32> = q
                    .voters
                    .iter()
                    .copied()
                    .filter(|v| !q.ballot_keys.contains(v))
                    .collect();
                q.ballot_keys.extend(missing);
                q.phantom_voters += std::mem::take(&mut q.phantoms_pending);
            }
            self.feed(id, InEvent::VoteDeadline);
        }
    }

    /// Escalation over: the cloud's answer (with its ground truth) or why there is none.
    pub(super) fn escalated(
        &mut self,
        id: u64,
        result: Result<swarm_protocol::query::CloudAnswer, String>,
        correct: bool,
    ) {
        if let Some(q) = self.queries.get_mut(&id) {
            q.cloud_correct = correct;
        }
        self.feed(id, InEvent::Escalated(result));
    }
}

/// Coarse category of a voter failure reason, for the report.
fn failure_kind(reason: &str) -> &'static str {
    if reason == "timeout" {
        "timeout"
    } else if reason == "unreachable" {
        "unreachable"
    } else if reason.starts_with("Overloaded") {
        "overloaded"
    } else if reason.starts_with("NoModel") {
        "no_model"
    } else if reason.starts_with("unusable") {
        "unusable"
    } else {
        "other"
    }
}

/// Ground truth of a normalised answer: the bank's map, or the sampled flag for free text.
fn question_truth(q: &Question, norm: &str, sampled: bool) -> bool {
    if q.kind == Kind::Free || q.truth.is_empty() {
        sampled
    } else {
        q.is_correct(norm)
    }
}
