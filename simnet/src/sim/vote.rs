//! The coordinator's side of a vote: picking voters, sending requests, recording ballots (checked
//! against an independent count), deadlines, and the decision after the vote.

use std::rc::Rc;

use swarm_protocol::{
    decide_after_vote, decode_msg, encode_msg, free_outcome, normalize, select_voters_spread, AfterVote,
    ChatMessage, Task, VoteReply, VoteRequest, VoteTally, VoterCandidate, VoterRecord,
};

use super::{us, Ev, Phase, ReplyMsg, Sim};
use crate::models::Question;
use crate::scenario::Kind;

impl Sim {
    pub(super) fn start_vote(&mut self, id: u64, own_norm: Option<String>) {
        let Some(q) = self.queries.get(&id) else {
            return;
        };
        let coord = q.coord;
        let question = self.question(q).clone();
        let n = &self.nodes[coord as usize];
        let me = &self.ids[coord as usize];
        let own_model = self.sc.models[n.model].id.clone();
        let candidates: Vec<VoterCandidate> = n
            .table
            .live()
            .filter(|e| e.advert.peer != *me)
            .filter_map(|e| {
                let m = e.advert.models.first()?;
                let c = &e.advert.capacity;
                Some(VoterCandidate {
                    peer: e.advert.peer.clone(),
                    model: m.id.clone(),
                    load: c.queue as f32 / c.max_concurrency.max(1) as f32 + c.cpu_load,
                })
            })
            .collect();
        let picked = select_voters_spread(&candidates, &own_model, self.sc.queries.k, id);
        let voters: Vec<u32> = picked
            .iter()
            .filter_map(|c| self.id_index.get(&c.peer).copied())
            .collect();
        let mut tally = VoteTally::new(
            question.task.clone(),
            self.sc.queries.quorum.min(voters.len() + 1),
            voters.len() + 1,
        );
        self.m.vote.votes += 1;
        let own = self.queries.get(&id).and_then(|q| q.own.clone());
        let me = me.clone();
        let Some(q) = self.queries.get_mut(&id) else {
            return;
        };
        q.phase = Phase::Voting;
        q.voters = voters.clone();
        q.ballot_keys.insert(coord);
        q.counted += 1;
        let own_conf = own.as_ref().map_or(0.0, |a| a.confidence);
        let own_raw = own.as_ref().map_or_else(String::new, |a| a.raw.clone());
        let own_correct = own.as_ref().is_some_and(|a| a.correct);
        let record = |answer: &str, error: Option<String>| VoterRecord {
            peer: me.clone(),
            model: own_model.clone(),
            answer: answer.to_owned(),
            confidence: own_conf.clamp(0.0, 1.0),
            elapsed_ms: 0,
            error,
        };
        match &own_norm {
            Some(norm) => {
                tally.add(&me, norm, own_conf);
                q.truth
                    .insert(norm.clone(), question_truth(&question, norm, own_correct));
                if question.kind == Kind::Free {
                    if let Some(a) = &own {
                        q.free.push((norm.clone(), a.embedding.clone(), a.confidence));
                    }
                }
                q.records.push(record(&own_raw, None));
            }
            None => {
                tally.fail(&me, "unusable local answer");
                q.records
                    .push(record(&own_raw, Some("unusable local answer".into())));
            }
        }
        q.tally = Some(tally);
        if voters.is_empty() {
            self.finish_vote(id);
            return;
        }
        let req = VoteRequest {
            id,
            messages: vec![ChatMessage {
                role: "user".into(),
                content: question.prompt.clone(),
            }],
            task: question.task.clone(),
            max_tokens: self.sc.queries.tokens.get(question.kind).max(1),
            deadline_ms: self.sc.queries.vote_deadline_ms,
            model: None,
        };
        let bytes = match encode_msg(&req) {
            Ok(b) => Rc::new(b),
            Err(e) => {
                self.violation(format!("query {id}: cannot encode vote request: {e}"));
                self.finish_vote(id);
                return;
            }
        };
        let deadline = self.now + u64::from(self.sc.queries.vote_deadline_ms) * 1000;
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

    /// Records one ballot, checking the tally against an independent count.
    fn ballot(&mut self, id: u64, voter: u32, vote: Result<(String, f32, bool, Vec<f32>), String>) {
        let peer = self.ids[voter as usize].clone();
        let model = self.sc.models[self.nodes[voter as usize].model].id.clone();
        let truth = match (&vote, self.queries.get(&id)) {
            (Ok((norm, _, sampled, _)), Some(q)) => {
                question_truth(&self.bank.questions[q.qi], norm, *sampled)
            }
            _ => false,
        };
        let Some(q) = self.queries.get_mut(&id) else {
            return;
        };
        let Some(tally) = q.tally.as_mut() else {
            return;
        };
        let first = q.ballot_keys.insert(voter);
        let counted = match &vote {
            Ok((norm, conf, _, _)) => tally.add(&peer, norm, *conf),
            Err(reason) => tally.fail(&peer, reason),
        };
        let mut problem = None;
        if counted != first {
            problem = Some(format!(
                "query {id}: voter {voter} ballot counted={counted} but first={first}"
            ));
        }
        if !counted {
            self.m.vote.duplicates_ignored += 1;
        } else {
            q.counted += 1;
            let kind_free = matches!(tally.task(), Task::Free);
            match vote {
                Ok((norm, conf, _, emb)) => {
                    if kind_free {
                        q.free.push((norm.clone(), emb, conf));
                    }
                    q.truth.entry(norm.clone()).or_insert(truth);
                    q.records.push(VoterRecord {
                        peer,
                        model,
                        answer: norm,
                        confidence: conf.clamp(0.0, 1.0),
                        elapsed_ms: 0,
                        error: None,
                    });
                }
                Err(reason) => {
                    self.m.vote.voter_failures += 1;
                    *self
                        .m
                        .vote
                        .failure_kinds
                        .entry(failure_kind(&reason).to_owned())
                        .or_insert(0) += 1;
                    q.records.push(VoterRecord {
                        peer,
                        model,
                        answer: String::new(),
                        confidence: 0.0,
                        elapsed_ms: 0,
                        error: Some(reason),
                    });
                }
            }
        }
        if let Some(p) = problem {
            self.violation(p);
        }
        let done = self
            .queries
            .get(&id)
            .and_then(|q| q.tally.as_ref())
            .is_some_and(|t| t.is_complete() || t.can_stop_early());
        if done {
            let early = self
                .queries
                .get(&id)
                .and_then(|q| q.tally.as_ref())
                .is_some_and(|t| !t.is_complete());
            if early {
                self.m.vote.early_stops += 1;
            }
            self.finish_vote(id);
        }
    }

    fn voting(&self, id: u64) -> bool {
        self.live_query(id) && self.queries.get(&id).is_some_and(|q| q.phase == Phase::Voting)
    }

    pub(super) fn on_vote_reply(&mut self, id: u64, voter: u32, reply: &ReplyMsg) {
        if !self.voting(id) {
            self.m.vote.late_replies += 1;
            return;
        }
        let Some(task) = self
            .queries
            .get(&id)
            .map(|q| self.bank.questions[q.qi].task.clone())
        else {
            return;
        };
        let vote = match decode_msg::<VoteReply>(&reply.bytes) {
            Ok(VoteReply::Ok(r)) if r.id == id => match normalize(&task, &r.answer) {
                Some(norm) => Ok((norm, r.confidence, reply.correct, reply.embedding.clone())),
                None => Err(format!("unusable answer from {}", reply.model)),
            },
            Ok(VoteReply::Ok(_)) => Err("reply for another query".into()),
            Ok(VoteReply::Err(e)) => Err(format!("{:?}: {}", e.code, e.message)),
            Err(e) => {
                self.violation(format!("query {id}: vote reply does not decode: {e}"));
                Err(format!("undecodable reply: {e}"))
            }
        };
        self.ballot(id, voter, vote);
    }

    pub(super) fn on_vote_fail(&mut self, id: u64, voter: u32, reason: &str) {
        if self.voting(id) {
            self.ballot(id, voter, Err(reason.to_owned()));
        }
    }

    pub(super) fn on_vote_deadline(&mut self, id: u64) {
        if !self.voting(id) {
            return;
        }
        let missing: Vec<u32> = self
            .queries
            .get(&id)
            .map(|q| {
                q.voters
                    .iter()
                    .copied()
                    .filter(|v| !q.ballot_keys.contains(v))
                    .collect()
            })
            .unwrap_or_default();
        for v in missing {
            if self.voting(id) {
                self.ballot(id, v, Err("timeout".into()));
            }
        }
        if self.voting(id) {
            self.finish_vote(id);
        }
    }

    fn finish_vote(&mut self, id: u64) {
        let threshold = self.sc.queries.free_threshold;
        let quorum = self.sc.queries.quorum;
        let Some(q) = self.queries.get(&id) else {
            return;
        };
        let Some(tally) = q.tally.as_ref() else {
            return;
        };
        let tallied = tally.outcome();
        let outcome = if matches!(tally.task(), Task::Free) {
            let mut o = free_outcome(&q.free, threshold, quorum.min(q.voters.len() + 1));
            o.failures = tallied.failures;
            o
        } else {
            tallied.clone()
        };
        let ballots = tallied.votes + tallied.failures;
        let mut problems = Vec::new();
        if ballots != q.ballot_keys.len() || q.counted != q.ballot_keys.len() {
            problems.push(format!(
                "query {id}: tally has {ballots} ballots, {} counted, {} distinct voters",
                q.counted,
                q.ballot_keys.len()
            ));
        }
        self.m.vote.ballots += ballots as u64;
        let best = outcome.winner.as_ref().map(|w| {
            let right = q.truth.get(w).copied().unwrap_or(false);
            (w.clone(), right)
        });
        let inputs = self.inputs(q, 0.0);
        for p in problems {
            self.violation(p);
        }
        let Some(q) = self.queries.get_mut(&id) else {
            return;
        };
        q.best = best.clone();
        let right = best.as_ref().is_some_and(|b| b.1);
        match decide_after_vote(outcome.agreement, &inputs, &self.thresholds) {
            AfterVote::Accept => self.finish(id, "vote", right, None),
            AfterVote::Degraded { reason } => self.finish(id, "vote", right, Some(reason.as_str())),
            AfterVote::Escalate => self.escalate(id, 0),
        }
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
