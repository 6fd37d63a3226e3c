//! Escalation: the coordinator's request to its gateway, the gateway's side (budget, cloud
//! call, reply), the single retry through a new gateway, and the fallback to the swarm answer.

use rand::Rng;
use swarm_protocol::query::CloudAnswer;
use swarm_protocol::{
    decode_msg, encode_msg, ChatMessage, DegradedReason, ErrorCode, EscalateReply, EscalateRequest,
    EscalateResponse, WireError, MAX_VOTERS,
};

use super::{us, Ev, Phase, Sim};

impl Sim {
    pub(super) fn escalate(&mut self, id: u64, attempt: u8) {
        let Some(q) = self.queries.get(&id) else {
            return;
        };
        let coord = q.coord;
        let gw = self.gateway_of(coord);
        let Some(gw) = gw else {
            self.escalated(id, Err(DegradedReason::NoGateway.as_str().into()), false);
            return;
        };
        let question = self.question(q).clone();
        let mut records = q.records.clone();
        records.truncate(MAX_VOTERS);
        let req = EscalateRequest {
            id,
            messages: vec![ChatMessage {
                role: "user".into(),
                content: question.prompt.clone(),
            }],
            task: question.task.clone(),
            max_tokens: self.sc.queries.tokens.get(question.kind).max(1),
            swarm_answers: records,
            deadline_ms: self.sc.queries.escalate_deadline_ms,
        };
        let bytes = match encode_msg(&req) {
            Ok(b) => b,
            Err(e) => {
                self.violation(format!("query {id}: cannot encode escalation: {e}"));
                self.escalated(id, Err("escalation failed".into()), false);
                return;
            }
        };
        if let Some(q) = self.queries.get_mut(&id) {
            q.phase = Phase::Escalating(attempt);
        }
        self.m.esc.attempts += 1;
        if attempt > 0 {
            self.m.esc.retries += 1;
        }
        let deadline = self.now + u64::from(self.sc.queries.escalate_deadline_ms) * 1000;
        if gw == coord {
            self.push(
                self.now,
                Ev::EscReq {
                    q: id,
                    gw,
                    attempt,
                    bytes,
                },
            );
        } else if self.linked(coord, gw) {
            self.count_rpc(bytes.len());
            let at = self.now + self.rpc_latency_us(coord, gw);
            self.push(
                at,
                Ev::EscReq {
                    q: id,
                    gw,
                    attempt,
                    bytes,
                },
            );
        } else {
            let at = (self.now + us(self.sc.network.dial_timeout_ms)).min(deadline);
            self.push(at, Ev::EscFail { q: id, attempt });
        }
        self.push(deadline, Ev::EscDeadline { q: id, attempt });
    }

    pub(super) fn on_esc_req(&mut self, id: u64, gw: u32, attempt: u8, bytes: &[u8]) {
        if !self.up(gw) {
            return;
        }
        let coord = self.queries.get(&id).map(|q| q.coord);
        if let Err(e) = decode_msg::<EscalateRequest>(bytes) {
            self.violation(format!("gateway {gw}: escalation does not decode: {e}"));
            self.esc_error(id, gw, coord, attempt, ErrorCode::BadRequest);
            return;
        }
        let budget_left = {
            let n = &mut self.nodes[gw as usize];
            match n.cloud.as_mut() {
                Some(c) if c.reachable && c.budget > 0 => {
                    c.budget -= 1;
                    Some(c.budget)
                }
                _ => None,
            }
        };
        let Some(left) = budget_left else {
            self.esc_error(id, gw, coord, attempt, ErrorCode::NoModel);
            return;
        };
        if left == 0 {
            // No longer eligible: say so now so the swarm fails over.
            if self.nodes[gw as usize].mem.election().is_gateway() {
                let g = self.nodes[gw as usize].group;
                self.ck.failover_pending.push((g, self.now));
            }
            self.disruption();
            self.local_changed(gw);
        }
        let c = &self.sc.cloud;
        let cloud_ms = c.latency_ms + c.latency_jitter_ms * self.rng.random::<f64>();
        let at = self.now + us(cloud_ms);
        self.push(
            at,
            Ev::EscCloud {
                q: id,
                gw,
                inc: self.nodes[gw as usize].inc,
                attempt,
                cloud_ms: cloud_ms as u32,
            },
        );
    }

    fn esc_error(&mut self, id: u64, gw: u32, coord: Option<u32>, attempt: u8, code: ErrorCode) {
        let reply = EscalateReply::Err(WireError {
            code,
            message: "cannot escalate".into(),
        });
        self.send_esc_reply(id, gw, coord, attempt, &reply, false);
    }

    fn send_esc_reply(
        &mut self,
        id: u64,
        gw: u32,
        coord: Option<u32>,
        attempt: u8,
        reply: &EscalateReply,
        correct: bool,
    ) {
        let Some(coord) = coord else {
            return;
        };
        let bytes = match encode_msg(reply) {
            Ok(b) => b,
            Err(e) => {
                self.violation(format!("gateway {gw}: cannot encode reply: {e}"));
                return;
            }
        };
        let at = if gw == coord {
            self.now
        } else if self.linked(gw, coord) {
            self.count_rpc(bytes.len());
            self.now + self.rpc_latency_us(gw, coord)
        } else {
            return;
        };
        self.push(
            at,
            Ev::EscReply {
                q: id,
                attempt,
                bytes,
                correct,
            },
        );
    }

    pub(super) fn on_esc_cloud(&mut self, id: u64, gw: u32, inc: u32, attempt: u8, cloud_ms: u32) {
        if !self.up(gw) || self.nodes[gw as usize].inc != inc {
            return; // the gateway died mid-call: the coordinator's deadline retries
        }
        let Some(q) = self.queries.get(&id) else {
            return;
        };
        let (coord, qi) = (q.coord, q.qi);
        let kind = self.bank.questions[qi].kind;
        let acc = self.sc.cloud.accuracy.get(kind);
        let model = self.sc.cloud.model.clone();
        let a = self.bank.cloud_answer(qi, &model, acc, &mut self.rng);
        let reply = EscalateReply::Ok(EscalateResponse {
            id,
            text: a.raw,
            model,
            cloud_ms,
            gateway: self.ids[gw as usize].clone(),
        });
        self.send_esc_reply(id, gw, Some(coord), attempt, &reply, a.correct);
    }

    /// The gateway in `v`'s view, as a slot.
    fn gateway_of(&self, v: u32) -> Option<u32> {
        self.nodes[v as usize]
            .mem
            .election()
            .current()
            .and_then(|(p, _, _)| self.id_index.get(p).copied())
    }

    fn escalating(&self, id: u64, attempt: u8) -> bool {
        self.live_query(id)
            && self
                .queries
                .get(&id)
                .is_some_and(|q| q.phase == Phase::Escalating(attempt))
    }

    pub(super) fn on_esc_reply(&mut self, id: u64, attempt: u8, bytes: &[u8], correct: bool) {
        if !self.escalating(id, attempt) {
            return;
        }
        match decode_msg::<EscalateReply>(bytes) {
            Ok(EscalateReply::Ok(r)) if r.id == id => {
                let answer = CloudAnswer {
                    text: r.text,
                    model: r.model,
                    gateway: r.gateway,
                    cloud_ms: r.cloud_ms,
                };
                self.escalated(id, Ok(answer), correct)
            }
            Ok(_) => self.escalation_failed(id, attempt),
            Err(e) => {
                self.violation(format!("query {id}: escalation reply does not decode: {e}"));
                self.escalation_failed(id, attempt);
            }
        }
    }

    pub(super) fn retry_escalation(&mut self, id: u64) {
        if !self.live_query(id) {
            return;
        }
        let Some(q) = self.queries.get(&id) else {
            return;
        };
        let Phase::AwaitingGateway { failed, since } = q.phase else {
            return;
        };
        let now_gw = self.gateway_of(q.coord);
        let waited = self.now - since;
        let limit = u64::from(self.sc.queries.escalate_deadline_ms) * 1000;
        if now_gw != failed || waited >= limit {
            self.escalate(id, 1);
        } else {
            let step = self.sc.timing.advert_interval_ms * 500;
            self.push(self.now + step, Ev::EscRetry(id));
        }
    }

    /// An escalation errored or timed out: retry once through a *new* gateway (waiting, within
    /// the escalation deadline, for this node's view to change: re-dialling a dead gateway
    /// before its adverts expire would just fail again), then fall back to the best swarm answer.
    pub(super) fn escalation_failed(&mut self, id: u64, attempt: u8) {
        if !self.escalating(id, attempt) {
            return;
        }
        if attempt == 0 {
            let coord = self.queries.get(&id).map(|q| q.coord);
            let failed = coord.and_then(|c| self.gateway_of(c));
            if let Some(q) = self.queries.get_mut(&id) {
                q.phase = Phase::AwaitingGateway {
                    failed,
                    since: self.now,
                };
            }
            self.retry_escalation(id);
        } else {
            self.m.esc.failed += 1;
            self.escalated(id, Err("gateway failed".into()), false);
        }
    }
}
