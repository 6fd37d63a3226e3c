//! The voter's side of a vote: decoding the request, queueing the inference, and sending the
//! reply (or an error) back, possibly duplicated by the network.

use std::rc::Rc;

use rand::Rng;
use swarm_protocol::{
    decode_msg, encode_msg, normalize, ErrorCode, VoteReply, VoteRequest, VoteResponse, WireError,
};

use super::{Ev, ReplyMsg, Sim};
use crate::models::SimAnswer;

impl Sim {
    pub(super) fn on_vote_req(&mut self, id: u64, voter: u32, bytes: &[u8]) {
        if !self.up(voter) {
            return; // the coordinator's deadline covers it
        }
        let coord = self.queries.get(&id).map(|q| q.coord);
        if let Err(e) = decode_msg::<VoteRequest>(bytes) {
            self.violation(format!("voter {voter}: vote request does not decode: {e}"));
            self.reply_error(id, voter, coord, ErrorCode::BadRequest, "undecodable");
            return;
        }
        if self.nodes[voter as usize].queue >= self.sc.queries.max_queue {
            self.reply_error(id, voter, coord, ErrorCode::Overloaded, "queue full");
            return;
        }
        let Some(qi) = self.queries.get(&id).map(|q| q.qi) else {
            // The query is gone (coordinator crashed); the voter still does the work.
            return;
        };
        let profile = self.sc.models[self.nodes[voter as usize].model].clone();
        let Some(answer) = self.bank.answer(qi, &profile, &mut self.rng) else {
            self.reply_error(
                id,
                voter,
                coord,
                ErrorCode::NoModel,
                "no answer for this question",
            );
            return;
        };
        let kind = self.bank.questions[qi].kind;
        let dur = self.inference_us(kind, &profile, Some(&answer));
        let done = self.enqueue(voter, dur);
        self.push(
            done,
            Ev::VoteDone {
                q: id,
                voter,
                inc: self.nodes[voter as usize].inc,
                answer: Box::new(answer),
                started: self.now,
            },
        );
    }

    fn reply_error(&mut self, id: u64, voter: u32, coord: Option<u32>, code: ErrorCode, msg: &str) {
        let reply = VoteReply::Err(WireError {
            code,
            message: msg.into(),
        });
        self.send_vote_reply(id, voter, coord, reply, false, Vec::new());
    }

    fn send_vote_reply(
        &mut self,
        id: u64,
        voter: u32,
        coord: Option<u32>,
        reply: VoteReply,
        correct: bool,
        embedding: Vec<f32>,
    ) {
        let Some(coord) = coord else {
            return;
        };
        if !self.linked(voter, coord) {
            return;
        }
        let bytes = match encode_msg(&reply) {
            Ok(b) => b,
            Err(e) => {
                self.violation(format!("voter {voter}: cannot encode reply: {e}"));
                return;
            }
        };
        self.count_rpc(bytes.len());
        let msg = Rc::new(ReplyMsg {
            bytes,
            correct,
            embedding,
        });
        let at = self.now + self.rpc_latency_us(voter, coord);
        self.push(
            at,
            Ev::VoteReply {
                q: id,
                voter,
                reply: msg.clone(),
            },
        );
        if self.rng.random::<f64>() < self.sc.network.duplicate {
            let again = at + self.latency_us(voter, coord);
            self.push(
                again,
                Ev::VoteReply {
                    q: id,
                    voter,
                    reply: msg,
                },
            );
        }
    }

    pub(super) fn on_vote_done(&mut self, id: u64, voter: u32, inc: u32, answer: SimAnswer, started: u64) {
        self.dequeue_if(voter, inc);
        if !self.up(voter) || self.nodes[voter as usize].inc != inc {
            return; // crashed while thinking
        }
        let Some(q) = self.queries.get(&id) else {
            return;
        };
        let coord = q.coord;
        let task = &self.bank.questions[q.qi].task;
        let normalized = normalize(task, &answer.raw).unwrap_or_default();
        let kind = self.bank.questions[q.qi].kind;
        let model = self.sc.models[self.nodes[voter as usize].model].id.clone();
        let reply = VoteReply::Ok(VoteResponse {
            id,
            answer: answer.raw,
            normalized,
            confidence: answer.confidence,
            model,
            tokens: self.sc.queries.tokens.get(kind),
            elapsed_ms: ((self.now - started) / 1000) as u32,
            model_version: String::new(),
        });
        self.send_vote_reply(id, voter, Some(coord), reply, answer.correct, answer.embedding);
    }

    fn dequeue_if(&mut self, v: u32, inc: u32) {
        if self.nodes[v as usize].inc == inc {
            self.dequeue(v);
        }
    }
}
