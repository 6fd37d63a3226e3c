//! One query's coordination, sans-IO: the local answer, the route decision, the
//! vote (voter choice, tally, early stop, meaning-based free text, quorum), the
//! escalation and the final answer. The node's router and the simulator both
//! drive a [`Coordinator`] with [`InEvent`]s and carry out its [`OutEvent`]s,
//! so the swarm that is simulated is the swarm that runs.
//!
//! The rules, where the node and the simulator used to differ:
//! - Voter load is [`voter_load`]: queue per worker slot plus CPU load (a busy CPU
//!   slows inference even with an empty queue). Every model a peer advertises is a
//!   candidate; peers without models are not counted as live voters.
//! - An unusable local answer (nothing that normalises for the task) has
//!   confidence 0 for the route decision: it can never be final on its own.
//! - A vote without quorum has agreement 0 for the after-vote decision (it
//!   escalates, or degrades with the quorum named in the reason).
//! - Early stop applies to exact-match tasks only; free text waits for every
//!   ballot (or the deadline), because answers are grouped by meaning at the end.
//! - Free-text votes are decided by meaning ([`free_vote`] over the answers'
//!   embeddings) when the driver supplies embeddings, by exact match otherwise.

use std::collections::BTreeMap;

use crate::message::{Advert, Capacity, Task, VoterRecord};
use crate::policy::{decide_after_vote, decide_first, AfterVote, Route, RouteInputs, Thresholds};
use crate::vote::{free_vote, normalize, select_voters_spread, VoteTally, VoterCandidate};

/// Load of a peer as voters are chosen by: lower is better.
pub fn voter_load(c: &Capacity) -> f32 {
    let cpu = if c.cpu_load.is_finite() {
        c.cpu_load.clamp(0.0, 1.0)
    } else {
        1.0
    };
    c.queue as f32 / c.max_concurrency.max(1) as f32 + cpu
}

/// Every model of every peer but `me`, with the peer's load.
pub fn voter_candidates<'a>(adverts: impl IntoIterator<Item = &'a Advert>, me: &str) -> Vec<VoterCandidate> {
    adverts
        .into_iter()
        .filter(|a| a.peer != me)
        .flat_map(|a| {
            let load = voter_load(&a.capacity);
            a.models.iter().map(move |m| VoterCandidate {
                peer: a.peer.clone(),
                model: m.id.clone(),
                load,
            })
        })
        .collect()
}

/// Peers that could vote: those that serve at least one model.
pub fn live_voters<'a>(adverts: impl IntoIterator<Item = &'a Advert>, me: &str) -> usize {
    adverts
        .into_iter()
        .filter(|a| a.peer != me && !a.models.is_empty())
        .count()
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoordinatorConfig {
    /// Voters to ask besides this node.
    pub voters: usize,
    /// Valid ballots (this node's included) a vote needs.
    pub quorum: usize,
    /// Cosine at or above which two free-text answers are the same answer.
    pub free_similarity: f32,
    pub thresholds: Thresholds,
}

/// An answer: this node's, or a voter's.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerIn {
    pub model: String,
    pub text: String,
    /// Calibrated, 0..=1.
    pub confidence: f32,
    pub elapsed_ms: u32,
}

/// The cloud's answer, through the gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct CloudAnswer {
    pub text: String,
    pub model: String,
    pub gateway: String,
    pub cloud_ms: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum InEvent {
    /// This node's answer (`Err`: it could not answer; the query fails).
    Local(AnswerIn),
    /// A voter's answer, or why it has none.
    Ballot {
        peer: String,
        result: Result<AnswerIn, String>,
    },
    /// The vote's deadline passed: voters not heard from have failed.
    VoteDeadline,
    /// Embeddings of the answers asked for by [`OutEvent::Embed`], in order;
    /// `None` when the driver has no embedder (exact matching then).
    Embeddings(Option<Vec<Vec<f32>>>),
    /// The escalation's outcome (`Err`: why the cloud could not answer).
    Escalated(Result<CloudAnswer, String>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum OutEvent {
    /// Ask these voters (the driver builds and sends the requests).
    RequestVotes(Vec<VoterCandidate>),
    /// Embed these free-text answers and reply with [`InEvent::Embeddings`].
    Embed(Vec<String>),
    /// Send the query with the swarm's answers to the gateway.
    Escalate(Vec<VoterRecord>),
    /// A ballot that did not count: not asked, a second one, or late.
    Ignored { peer: String, reason: &'static str },
    /// The query is answered.
    Finished(Box<Decision>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalRoute {
    Local,
    Vote,
    Cloud,
}

impl FinalRoute {
    pub fn as_str(self) -> &'static str {
        match self {
            FinalRoute::Local => "local",
            FinalRoute::Vote => "vote",
            FinalRoute::Cloud => "cloud",
        }
    }
}

/// The winning answer of a vote (or this node's own).
#[derive(Debug, Clone, PartialEq)]
pub struct Winner {
    /// Normal form (the option label for mcq/label tasks).
    pub key: String,
    /// The best-worded raw answer with that normal form (most confident).
    pub text: String,
    pub model: String,
    pub peer: String,
}

/// How a vote went.
#[derive(Debug, Clone, PartialEq)]
pub struct VoteSummary {
    pub agreement: f32,
    pub valid: usize,
    pub failures: usize,
    pub quorum_met: bool,
    /// Decided before every voter answered.
    pub early: bool,
    /// Decided by meaning (embeddings), not exact match.
    pub by_meaning: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub route: FinalRoute,
    /// The swarm's answer (the cloud's is in `cloud`); `None` if nobody had a usable one.
    pub winner: Option<Winner>,
    pub confidence: f32,
    pub vote: Option<VoteSummary>,
    pub cloud: Option<CloudAnswer>,
    /// Why the answer is not what the policy wanted, if it is not.
    pub degraded: Option<String>,
    /// Every ballot, this node's first, then in arrival order, then the skipped.
    pub records: Vec<VoterRecord>,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    AwaitLocal,
    Voting,
    AwaitEmbeddings,
    Escalating,
    Done,
}

/// A usable answer: (text, confidence, model, normal form).
type Valid = (String, f32, String, String);

/// One query on its coordinator. See the module docs.
#[derive(Debug, Clone)]
pub struct Coordinator {
    me: String,
    task: Task,
    cfg: CoordinatorConfig,
    inputs: RouteInputs,
    candidates: Vec<VoterCandidate>,
    salt: u64,
    phase: Phase,
    own_model: String,
    tally: Option<VoteTally>,
    asked: Vec<VoterCandidate>,
    /// Usable answers by peer.
    valid: BTreeMap<String, Valid>,
    records: Vec<VoterRecord>,
    /// The winner and summary of the vote, once tallied.
    vote: Option<(Option<Winner>, VoteSummary)>,
    /// Free-text answers sent for embedding, in order (peer).
    embedding_order: Vec<String>,
    early: bool,
}

impl Coordinator {
    /// `inputs.local_confidence` is ignored (the local answer brings it);
    /// `salt` spreads voter choice across coordinators (e.g. the query id).
    pub fn new(
        me: &str,
        task: Task,
        cfg: CoordinatorConfig,
        inputs: RouteInputs,
        candidates: Vec<VoterCandidate>,
        salt: u64,
    ) -> Self {
        Coordinator {
            me: me.to_string(),
            task,
            cfg,
            inputs,
            candidates,
            salt,
            phase: Phase::AwaitLocal,
            own_model: String::new(),
            tally: None,
            asked: Vec::new(),
            valid: BTreeMap::new(),
            records: Vec::new(),
            vote: None,
            embedding_order: Vec::new(),
            early: false,
        }
    }

    pub fn task(&self) -> &Task {
        &self.task
    }

    /// Every ballot so far, this node's first.
    pub fn records(&self) -> &[VoterRecord] {
        &self.records
    }

    /// Whether a vote was started (its summary, once tallied, is [`Coordinator::vote_summary`]).
    pub fn voted(&self) -> bool {
        self.tally.is_some()
    }

    /// How the vote went, once it is tallied.
    pub fn vote_summary(&self) -> Option<&VoteSummary> {
        self.vote.as_ref().map(|v| &v.1).filter(|_| self.voted())
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether the vote still waits for `peer`'s ballot.
    pub fn awaits(&self, peer: &str) -> bool {
        self.phase == Phase::Voting
            && self.asked.iter().any(|c| c.peer == peer)
            && !self.records.iter().any(|r| r.peer == peer)
    }

    pub fn handle(&mut self, ev: InEvent) -> Vec<OutEvent> {
        let mut out = Vec::new();
        match ev {
            InEvent::Local(a) if self.phase == Phase::AwaitLocal => self.on_local(a, &mut out),
            InEvent::Ballot { peer, result } => {
                if !self.awaits(&peer) {
                    let reason = if self.phase != Phase::Voting {
                        "late"
                    } else if self.asked.iter().any(|c| c.peer == peer) {
                        "duplicate"
                    } else {
                        "not asked"
                    };
                    out.push(OutEvent::Ignored { peer, reason });
                } else {
                    self.on_ballot(peer, result, &mut out);
                }
            }
            InEvent::VoteDeadline if self.phase == Phase::Voting => {
                let missing: Vec<String> = self
                    .asked
                    .iter()
                    .map(|c| c.peer.clone())
                    .filter(|p| !self.records.iter().any(|r| &r.peer == p))
                    .collect();
                for p in missing {
                    self.fail(&p, "timeout".into());
                }
                self.close_vote(&mut out);
            }
            InEvent::Embeddings(vectors) if self.phase == Phase::AwaitEmbeddings => {
                self.decide_vote(vectors, &mut out)
            }
            InEvent::Escalated(r) if self.phase == Phase::Escalating => self.on_escalated(r, &mut out),
            _ => {}
        }
        out
    }

    fn own_record(&self, a: &AnswerIn, error: Option<String>) -> VoterRecord {
        VoterRecord {
            peer: self.me.clone(),
            model: a.model.clone(),
            answer: a.text.clone(),
            confidence: a.confidence.clamp(0.0, 1.0),
            elapsed_ms: a.elapsed_ms,
            error,
            model_version: String::new(),
        }
    }

    fn on_local(&mut self, a: AnswerIn, out: &mut Vec<OutEvent>) {
        self.own_model = a.model.clone();
        let norm = normalize(&self.task, &a.text);
        self.inputs.local_confidence = if norm.is_some() { a.confidence } else { 0.0 };
        let me = self.me.clone();
        match &norm {
            Some(n) => {
                self.valid.insert(
                    me.clone(),
                    (a.text.clone(), a.confidence, a.model.clone(), n.clone()),
                );
                self.records.push(self.own_record(&a, None));
            }
            None => self
                .records
                .push(self.own_record(&a, Some("unusable local answer".into()))),
        }
        let own = norm.map(|key| Winner {
            key,
            text: a.text.clone(),
            model: a.model.clone(),
            peer: me.clone(),
        });
        match decide_first(&self.inputs, &self.cfg.thresholds) {
            Route::Local => self.finish_local(own, None, out),
            Route::LocalDegraded { reason } => self.finish_local(own, Some(reason.to_string()), out),
            Route::Escalate => {
                self.vote = Some((own, self.summary_of_none()));
                self.phase = Phase::Escalating;
                out.push(OutEvent::Escalate(self.records.clone()));
            }
            Route::Vote => {
                let picked =
                    select_voters_spread(&self.candidates, &self.own_model, self.cfg.voters, self.salt);
                let quorum = self.cfg.quorum.min(picked.len() + 1);
                let mut tally = VoteTally::new(self.task.clone(), quorum, picked.len() + 1);
                match self.valid.get(&me) {
                    Some((_, c, _, n)) => tally.add(&me, n, *c),
                    None => tally.fail(&me, "unusable local answer"),
                };
                self.tally = Some(tally);
                self.asked = picked.clone();
                self.phase = Phase::Voting;
                if picked.is_empty() {
                    self.close_vote(out);
                } else {
                    out.push(OutEvent::RequestVotes(picked));
                }
            }
        }
    }

    fn summary_of_none(&self) -> VoteSummary {
        VoteSummary {
            agreement: 0.0,
            valid: 0,
            failures: 0,
            quorum_met: false,
            early: false,
            by_meaning: false,
        }
    }

    fn finish_local(&mut self, own: Option<Winner>, degraded: Option<String>, out: &mut Vec<OutEvent>) {
        self.phase = Phase::Done;
        out.push(OutEvent::Finished(Box::new(Decision {
            route: FinalRoute::Local,
            winner: own,
            confidence: self.inputs.local_confidence,
            vote: None,
            cloud: None,
            degraded,
            records: self.records.clone(),
        })));
    }

    fn model_of(&self, peer: &str) -> String {
        self.asked
            .iter()
            .find(|c| c.peer == peer)
            .map(|c| c.model.clone())
            .unwrap_or_default()
    }

    fn fail(&mut self, peer: &str, reason: String) {
        if let Some(t) = self.tally.as_mut() {
            t.fail(peer, &reason);
        }
        self.records.push(VoterRecord {
            peer: peer.to_string(),
            model: self.model_of(peer),
            answer: String::new(),
            confidence: 0.0,
            elapsed_ms: 0,
            error: Some(reason),
            model_version: String::new(),
        });
    }

    fn on_ballot(&mut self, peer: String, result: Result<AnswerIn, String>, out: &mut Vec<OutEvent>) {
        match result {
            Ok(a) => match normalize(&self.task, &a.text) {
                // The coordinator normalises; a voter's own normal form is not trusted.
                Some(n) => {
                    if let Some(t) = self.tally.as_mut() {
                        t.add(&peer, &n, a.confidence);
                    }
                    self.records.push(VoterRecord {
                        peer: peer.clone(),
                        model: a.model.clone(),
                        answer: a.text.clone(),
                        confidence: a.confidence.clamp(0.0, 1.0),
                        elapsed_ms: a.elapsed_ms,
                        error: None,
                        model_version: String::new(),
                    });
                    self.valid.insert(peer, (a.text, a.confidence, a.model, n));
                }
                None => self.fail(&peer, format!("unusable answer from {}", a.model)),
            },
            Err(reason) => self.fail(&peer, reason),
        }
        let Some(t) = self.tally.as_ref() else {
            return;
        };
        let exact = !matches!(self.task, Task::Free);
        if t.is_complete() {
            self.close_vote(out);
        } else if exact && t.can_stop_early() {
            self.early = true;
            self.close_vote(out);
        }
    }

    /// The vote is closed: tally it, by meaning first where free text allows.
    fn close_vote(&mut self, out: &mut Vec<OutEvent>) {
        for c in self.asked.clone() {
            if !self.records.iter().any(|r| r.peer == c.peer) {
                self.records.push(VoterRecord {
                    peer: c.peer.clone(),
                    model: c.model.clone(),
                    answer: String::new(),
                    confidence: 0.0,
                    elapsed_ms: 0,
                    error: Some("not needed: the vote was already decided".into()),
                    model_version: String::new(),
                });
            }
        }
        if matches!(self.task, Task::Free) && self.valid.len() >= 2 {
            self.embedding_order = self.valid.keys().cloned().collect();
            let texts = self.valid.values().map(|v| v.0.clone()).collect();
            self.phase = Phase::AwaitEmbeddings;
            out.push(OutEvent::Embed(texts));
            return;
        }
        self.decide_vote(None, out);
    }

    fn best_in_group(&self, key: &str) -> Option<Winner> {
        self.valid
            .iter()
            .filter(|(_, v)| v.3 == key)
            .max_by(|a, b| a.1 .1.total_cmp(&b.1 .1).then(b.0.cmp(a.0)))
            .map(|(peer, v)| Winner {
                key: key.to_string(),
                text: v.0.clone(),
                model: v.2.clone(),
                peer: peer.clone(),
            })
    }

    fn decide_vote(&mut self, vectors: Option<Vec<Vec<f32>>>, out: &mut Vec<OutEvent>) {
        let Some(tally) = self.tally.as_ref() else {
            return;
        };
        let o = tally.outcome();
        let mut summary = VoteSummary {
            agreement: o.agreement,
            valid: o.votes,
            failures: o.failures,
            quorum_met: o.quorum_met,
            early: self.early,
            by_meaning: false,
        };
        let mut winner = o.winner.as_deref().and_then(|k| self.best_in_group(k));
        let items: Option<Vec<(String, Vec<f32>, f32)>> = vectors
            .filter(|v| v.len() == self.embedding_order.len())
            .map(|v| {
                self.embedding_order
                    .iter()
                    .zip(v)
                    .filter_map(|(p, e)| self.valid.get(p).map(|x| (p.clone(), e, x.1)))
                    .collect()
            });
        if let Some(fv) = items
            .as_ref()
            .and_then(|items| free_vote(items, self.cfg.free_similarity))
        {
            if let Some((peer, _, _)) = items.as_ref().and_then(|i| i.get(fv.winner)) {
                if let Some(v) = self.valid.get(peer) {
                    winner = Some(Winner {
                        key: v.3.clone(),
                        text: v.0.clone(),
                        model: v.2.clone(),
                        peer: peer.clone(),
                    });
                    summary.agreement = fv.agreement;
                    summary.by_meaning = true;
                }
            }
        }
        // Kept for `vote_summary` and for the answer if an escalation fails.
        self.vote = Some((winner.clone(), summary.clone()));
        let agreement = if summary.quorum_met {
            summary.agreement
        } else {
            0.0
        };
        let decision = decide_after_vote(agreement, &self.inputs, &self.cfg.thresholds);
        let degraded = |reason: String| {
            if summary.quorum_met {
                reason
            } else {
                format!(
                    "vote quorum not met ({} of {} valid votes); {reason}",
                    summary.valid, self.cfg.quorum
                )
            }
        };
        match decision {
            AfterVote::Accept => self.finish_vote(winner, summary, None, out),
            AfterVote::Degraded { reason } => {
                let d = degraded(reason.to_string());
                self.finish_vote(winner, summary, Some(d), out)
            }
            AfterVote::Escalate => {
                self.phase = Phase::Escalating;
                out.push(OutEvent::Escalate(self.records.clone()));
            }
        }
    }

    fn finish_vote(
        &mut self,
        winner: Option<Winner>,
        summary: VoteSummary,
        degraded: Option<String>,
        out: &mut Vec<OutEvent>,
    ) {
        self.phase = Phase::Done;
        out.push(OutEvent::Finished(Box::new(Decision {
            route: FinalRoute::Vote,
            winner,
            confidence: summary.agreement,
            vote: Some(summary),
            cloud: None,
            degraded,
            records: self.records.clone(),
        })));
    }

    fn on_escalated(&mut self, r: Result<CloudAnswer, String>, out: &mut Vec<OutEvent>) {
        self.phase = Phase::Done;
        let (winner, summary) = self.vote.take().unwrap_or((None, self.summary_of_none()));
        let voted = self.tally.is_some();
        let route_before = if voted {
            FinalRoute::Vote
        } else {
            FinalRoute::Local
        };
        let d = match r {
            Ok(c) => Decision {
                route: FinalRoute::Cloud,
                winner,
                confidence: 1.0,
                vote: voted.then_some(summary),
                cloud: Some(c),
                degraded: None,
                records: self.records.clone(),
            },
            Err(reason) => Decision {
                route: route_before,
                winner,
                confidence: if voted {
                    summary.agreement
                } else {
                    self.inputs.local_confidence
                },
                vote: voted.then_some(summary),
                cloud: None,
                degraded: Some(reason),
                records: self.records.clone(),
            },
        };
        out.push(OutEvent::Finished(Box::new(d)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Choice;
    use crate::policy::{Privacy, RouteOverride};

    fn mcq() -> Task {
        Task::Mcq {
            choices: ["a", "b", "c"]
                .iter()
                .zip(["A", "B", "C"])
                .map(|(t, l)| Choice {
                    label: l.into(),
                    text: (*t).into(),
                })
                .collect(),
        }
    }

    fn inputs(voters: usize, gateway: bool) -> RouteInputs {
        RouteInputs {
            local_confidence: 0.0,
            privacy: Privacy::Cloud,
            min_confidence: None,
            live_voters: voters,
            safety_flag: false,
            route_override: RouteOverride::Auto,
            gateway_available: gateway,
        }
    }

    fn cfg() -> CoordinatorConfig {
        CoordinatorConfig {
            voters: 3,
            quorum: 2,
            free_similarity: 0.8,
            thresholds: Thresholds {
                tau_local: 0.8,
                tau_vote: 0.6,
            },
        }
    }

    fn cands(n: usize) -> Vec<VoterCandidate> {
        (0..n)
            .map(|i| VoterCandidate {
                peer: format!("p{i}"),
                model: format!("m{i}"),
                load: 0.0,
            })
            .collect()
    }

    fn ans(model: &str, text: &str, c: f32) -> AnswerIn {
        AnswerIn {
            model: model.into(),
            text: text.into(),
            confidence: c,
            elapsed_ms: 5,
        }
    }

    fn finished(out: &[OutEvent]) -> Option<&Decision> {
        out.iter().find_map(|e| match e {
            OutEvent::Finished(d) => Some(&**d),
            _ => None,
        })
    }

    #[test]
    fn confident_local_answer_is_final() {
        let mut c = Coordinator::new("me", mcq(), cfg(), inputs(3, true), cands(3), 1);
        let out = c.handle(InEvent::Local(ans("own", "B. b", 0.9)));
        let d = finished(&out).expect("finished");
        assert_eq!(d.route, FinalRoute::Local);
        assert_eq!(d.winner.as_ref().map(|w| w.key.as_str()), Some("B"));
        assert!(c.is_done());
    }

    #[test]
    fn unusable_local_answer_is_never_final() {
        let mut c = Coordinator::new("me", mcq(), cfg(), inputs(3, true), cands(3), 1);
        let out = c.handle(InEvent::Local(ans("own", "", 0.99)));
        assert!(matches!(out.first(), Some(OutEvent::RequestVotes(v)) if v.len() == 3));
    }

    #[test]
    fn vote_stops_early_once_the_leader_is_safe_and_ignores_late_ballots() {
        let mut c = Coordinator::new("me", mcq(), cfg(), inputs(3, true), cands(3), 1);
        let out = c.handle(InEvent::Local(ans("own", "B. b", 0.5)));
        assert!(matches!(out.first(), Some(OutEvent::RequestVotes(_))));
        let mut done = None;
        for p in ["p0", "p1"] {
            let out = c.handle(InEvent::Ballot {
                peer: p.into(),
                result: Ok(ans("m", "B", 0.9)),
            });
            done = done.or_else(|| finished(&out).cloned());
        }
        let d = done.expect("decided before the third voter");
        assert_eq!(d.route, FinalRoute::Vote);
        let v = d.vote.expect("summary");
        assert!(v.early && v.quorum_met);
        assert_eq!(c.vote_summary(), Some(&v), "the driver reads the same summary");
        assert_eq!(d.records.len(), 4, "own, two ballots, one skipped");
        let out = c.handle(InEvent::Ballot {
            peer: "p2".into(),
            result: Ok(ans("m", "A", 0.9)),
        });
        assert!(matches!(&out[..], [OutEvent::Ignored { reason: "late", .. }]));
    }

    #[test]
    fn a_vote_without_quorum_escalates_and_a_failed_escalation_degrades() {
        let mut c = Coordinator::new("me", mcq(), cfg(), inputs(3, true), cands(3), 1);
        c.handle(InEvent::Local(ans("own", "B. b", 0.5)));
        let out = c.handle(InEvent::VoteDeadline);
        let Some(OutEvent::Escalate(records)) = out.first() else {
            panic!("{out:?}")
        };
        assert_eq!(records.len(), 4);
        assert!(records[1..].iter().all(|r| r.error.as_deref() == Some("timeout")));
        let out = c.handle(InEvent::Escalated(Err("cloud unavailable: no gateway".into())));
        let d = finished(&out).expect("finished");
        assert_eq!(d.route, FinalRoute::Vote);
        assert_eq!(d.degraded.as_deref(), Some("cloud unavailable: no gateway"));
        assert_eq!(d.winner.as_ref().map(|w| w.key.as_str()), Some("B"));
    }

    #[test]
    fn free_text_waits_for_every_ballot_and_groups_by_meaning() {
        let mut low = cfg();
        low.thresholds.tau_vote = 0.5;
        let mut c = Coordinator::new("me", Task::Free, low, inputs(2, true), cands(2), 1);
        c.handle(InEvent::Local(ans("own", "Paris", 0.5)));
        let out = c.handle(InEvent::Ballot {
            peer: "p0".into(),
            result: Ok(ans("m0", "It is Paris", 0.5)),
        });
        assert!(out.is_empty(), "no early stop on free text: {out:?}");
        let out = c.handle(InEvent::Ballot {
            peer: "p1".into(),
            result: Ok(ans("m1", "Lyon", 0.8)),
        });
        let Some(OutEvent::Embed(texts)) = out.first() else {
            panic!("{out:?}")
        };
        // Order of `texts` is by peer: me, p0, p1.
        assert_eq!(texts, &["Paris", "It is Paris", "Lyon"]);
        let out = c.handle(InEvent::Embeddings(Some(vec![
            vec![1.0, 0.0],
            vec![0.99, 0.1],
            vec![0.0, 1.0],
        ])));
        let d = finished(&out).expect("finished");
        assert_eq!(d.route, FinalRoute::Vote);
        let v = d.vote.clone().expect("summary");
        assert!(v.by_meaning);
        assert!((v.agreement - 1.0 / 1.8).abs() < 1e-4, "{}", v.agreement);
        assert!(d.winner.as_ref().expect("winner").text.contains("Paris"));
    }

    #[test]
    fn candidates_and_load_come_from_adverts() {
        let c = Capacity {
            cores: 2,
            cpu_load: 0.5,
            mem_free_mb: 0,
            queue: 2,
            max_concurrency: 4,
        };
        assert!((voter_load(&c) - 1.0).abs() < 1e-6);
        let bad = Capacity {
            cpu_load: f32::NAN,
            ..c
        };
        assert!(voter_load(&bad).is_finite());
    }
}
