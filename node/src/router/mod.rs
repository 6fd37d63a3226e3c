//! Runs a query: the local answer with its calibrated confidence, then the
//! protocol's route policy decides between answering locally, a distributed
//! vote among heterogeneous peers, or escalation to the gateway's cloud model.
//! Also serves peers: votes, forwarded queries and (on the gateway) escalations.
//! Decisions come from `swarm_protocol::policy`; this module only executes them.
//!
//! One path for every caller: [`Router::chat_stream`] yields the answer's text
//! as [`ChatEvent::Token`]s, then one [`ChatEvent::Done`] with the whole answer
//! and its provenance; [`Router::chat`] collects it. Local tokens stream as they
//! are generated when the policy says the route is local whatever the
//! confidence; otherwise the decided answer streams as soon as it is decided.
//!
//! The [`Router`] holds only what a query needs; `Node::start` builds it.

mod escalate;
mod forward;
mod local;
pub(crate) mod request;
mod serve;
mod vote;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::stream::{Stream, StreamExt};
use swarm_protocol::query::{
    live_voters, voter_candidates, AnswerIn, Coordinator, CoordinatorConfig, FinalRoute, InEvent, OutEvent,
};
use swarm_protocol::{local_is_final, RouteInputs, Task, Thresholds};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

pub use local::{generate_request, LocalAnswer};
pub use request::{
    task_of, Answer, ChatEvent, ChatParams, ChatRequest, Provenance, RouteError, SwarmExt, VoterView,
};

use crate::config::RoutingConfig;
use crate::events::Events;
use crate::gateway::Gateway;
use crate::inference::{InferenceError, ModelHandle};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::network::NetworkHandle;
use crate::safety::Semantic;
use crate::served::LocalModels;
use crate::swarm::SwarmView;
use local::Live;
use request::last_user;

/// What a router needs, handed over by `Node::start`.
pub struct RouterParts {
    /// This node's peer id (text) and display name (for log spans).
    pub me: String,
    pub name: String,
    pub routing: RoutingConfig,
    /// Membership timing: how long a failed gateway takes to be replaced.
    pub advert_interval_ms: u64,
    pub missed_adverts: u32,
    /// Cap on tokens a peer may ask this node to generate.
    pub max_tokens_limit: u32,
    pub models: Arc<LocalModels>,
    pub net: NetworkHandle,
    pub view: watch::Receiver<Arc<SwarmView>>,
    pub gateway: Arc<Gateway>,
    pub semantic: Arc<Semantic>,
    pub metrics: Arc<Metrics>,
    /// The live query feed (web page, `GET /v1/swarm/events`).
    pub events: Arc<Events>,
    /// Tells the membership task a peer could not be reached (it drops it at once).
    pub unreachable: mpsc::Sender<String>,
    /// The teams this node serves and their cloud policy.
    pub teams: crate::config::TeamsConfig,
    /// The escalation log, when `[dataset]` is enabled.
    pub dataset: Option<Arc<crate::dataset::DatasetLog>>,
}

/// Runs queries for this node and serves its peers' requests. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    p: Arc<RouterParts>,
    next_id: Arc<AtomicU64>,
}

/// A streamed answer: tokens, then the answer (or an error).
pub type ChatStream = std::pin::Pin<Box<dyn Stream<Item = Result<ChatEvent, RouteError>> + Send>>;

/// Resolve the requested model: a local handle, or the peers that serve it.
pub enum Target {
    Local(ModelHandle),
    Remote(Vec<String>),
}

impl Router {
    pub fn new(p: RouterParts) -> Self {
        // Seeded from the wall clock so ids stay unique across restarts.
        let seed = crate::clock::wall_ms() << 16;
        Router {
            p: Arc::new(p),
            next_id: Arc::new(AtomicU64::new(seed)),
        }
    }

    /// This node's peer id.
    pub fn me(&self) -> &str {
        &self.p.me
    }

    /// A fresh id: queries, completions.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The privacy a request runs at: its own (or the node's default), kept in
    /// the swarm when its team's policy does not allow the cloud.
    pub(crate) fn privacy_of(&self, req: &ChatRequest) -> swarm_protocol::Privacy {
        use swarm_protocol::Privacy;
        let p = req.ext.privacy.unwrap_or(self.p.routing.privacy);
        match &req.ext.team {
            Some(t) if p == Privacy::Cloud && !self.p.teams.allows_cloud(t) => Privacy::Swarm,
            _ => p,
        }
    }

    /// Whether a peer's advert says it serves the request's team (every peer
    /// serves a request without one).
    pub fn serves_team(advert: &swarm_protocol::Advert, team: Option<&str>) -> bool {
        team.is_none_or(|t| advert.teams.iter().any(|x| x == t))
    }

    pub fn snapshot(&self) -> Arc<SwarmView> {
        self.p.view.borrow().clone()
    }

    pub fn models(&self) -> &LocalModels {
        &self.p.models
    }

    pub fn semantic(&self) -> &Semantic {
        &self.p.semantic
    }

    pub fn target(&self, model: Option<&str>) -> Result<Target, RouteError> {
        let models = &self.p.models;
        let id = match model {
            None | Some("") | Some("auto") | Some("swarm") => models.default_id(),
            Some(m) => m,
        };
        if let Some(h) = models.get(id) {
            return Ok(Target::Local(h));
        }
        let view = self.snapshot();
        let peers: Vec<String> = view
            .peers_with_model(id)
            .iter()
            .map(|p| p.advert.peer.clone())
            .collect();
        if peers.is_empty() {
            if let Some(t) = view.gone.get(id) {
                return Err(RouteError::NoPeer {
                    model: id.to_string(),
                    reason: format!("its last peer left {} s ago", t.elapsed().as_secs()),
                });
            }
            return Err(RouteError::UnknownModel(id.to_string()));
        }
        Ok(Target::Remote(peers))
    }

    /// Answer a chat request (the collected [`Router::chat_stream`]; the cloud
    /// is asked for a whole answer, whose usage settles the budget exactly).
    pub async fn chat(&self, req: ChatRequest) -> Result<Answer, RouteError> {
        let mut events = self.events(req, false);
        while let Some(ev) = events.next().await {
            if let ChatEvent::Done(a) = ev? {
                return Ok(*a);
            }
        }
        Err(RouteError::Internal(
            "the answer stream ended without an answer".into(),
        ))
    }

    /// Answer a chat request as a stream of events (see the module docs); a
    /// cloud answer streams as the cloud sends it. Dropping the stream abandons
    /// the query.
    pub fn chat_stream(&self, req: ChatRequest) -> ChatStream {
        self.events(req, true)
    }

    fn events(&self, req: ChatRequest, relay_cloud: bool) -> ChatStream {
        let router = self.clone();
        // Kept for the feed only when it may show it.
        let prompt = if self.p.events.shows_prompts() {
            last_user(&req.messages).to_string()
        } else {
            String::new()
        };
        let t0 = Instant::now();
        Box::pin(async_stream::stream! {
            let (tx, mut rx) = mpsc::channel::<String>(64);
            let run = router.run(req, tx, relay_cloud);
            tokio::pin!(run);
            let mut streamed = false;
            let mut open = true;
            let result = loop {
                let step = tokio::select! {
                    biased;
                    t = rx.recv(), if open => Ok(t),
                    r = &mut run => Err(r),
                };
                match step {
                    Ok(Some(t)) => {
                        streamed = true;
                        yield Ok(ChatEvent::Token(t));
                    }
                    Ok(None) => open = false,
                    Err(r) => break r,
                }
            };
            while let Ok(t) = rx.try_recv() {
                streamed = true;
                yield Ok(ChatEvent::Token(t));
            }
            let ms = t0.elapsed().as_millis() as u64;
            router.p.events.record(&prompt, result.as_ref(), ms);
            match result {
                Ok(a) => {
                    if !streamed && !a.text.is_empty() {
                        yield Ok(ChatEvent::Token(a.text.clone()));
                    }
                    yield Ok(ChatEvent::Done(Box::new(a)));
                }
                Err(e) => yield Err(e),
            }
        })
    }

    /// One query, start to end; local tokens go to `tokens` when they may, and
    /// with `relay_cloud` the cloud's pieces as they arrive.
    async fn run(
        &self,
        req: ChatRequest,
        tokens: mpsc::Sender<String>,
        relay_cloud: bool,
    ) -> Result<Answer, RouteError> {
        let query_id = self.next_id();
        let span = tracing::info_span!("query", node = %self.p.name, query_id);
        self.route(query_id, req, tokens, relay_cloud)
            .instrument(span)
            .await
    }

    async fn route(
        &self,
        query_id: u64,
        req: ChatRequest,
        tokens: mpsc::Sender<String>,
        relay_cloud: bool,
    ) -> Result<Answer, RouteError> {
        let cloud_tokens = tokens.clone();
        let t0 = Instant::now();
        let team = req.ext.team.clone();
        if let Some(t) = &team {
            if !self.p.teams.serves(t) {
                return Err(RouteError::BadRequest(format!(
                    "this node does not serve team `{t}`: send the query to one of its nodes"
                )));
            }
        }
        let handle = match self.target(req.model.as_deref())? {
            Target::Local(h) => h,
            Target::Remote(peers) => {
                // A team's query is forwarded only to that team's peers.
                let view = self.snapshot();
                let peers: Vec<String> = peers
                    .into_iter()
                    .filter(|p| {
                        view.peers
                            .iter()
                            .any(|v| &v.advert.peer == p && Self::serves_team(&v.advert, team.as_deref()))
                    })
                    .collect();
                if peers.is_empty() {
                    return Err(RouteError::NoPeer {
                        model: req.model.clone().unwrap_or_default(),
                        reason: format!("no peer of team `{}` serves it", team.unwrap_or_default()),
                    });
                }
                return self.forward(query_id, &req, peers, t0).await;
            }
        };
        let routing = &self.p.routing;
        let task = req.task();
        let (tau_local, tau_vote) = routing.thresholds(&handle.info().id);
        let thresholds = Thresholds { tau_local, tau_vote };
        let view = self.snapshot();
        // A team's query sees only the team's peers: as voters, and in the counts.
        let adverts = || {
            view.peers
                .iter()
                .map(|p| &*p.advert)
                .filter(|a| Self::serves_team(a, team.as_deref()))
        };
        let mut inputs = RouteInputs {
            local_confidence: 0.0,
            privacy: self.privacy_of(&req),
            min_confidence: req.ext.min_confidence,
            live_voters: live_voters(adverts(), self.me()),
            safety_flag: false,
            route_override: req.ext.route,
            gateway_available: view.gateway.is_some(),
        };
        // The safety check (an embedding on the blocking pool) runs alongside the
        // local answer; once it is known, the policy says whether the local tokens
        // may stream before the answer's confidence is known.
        let (release_tx, release) = oneshot::channel();
        let live = Live { tokens, release };
        let safety = async {
            let s = self
                .p
                .semantic
                .check(routing.safety, &routing.safety_policy, last_user(&req.messages))
                .await;
            // A refused query streams nothing: the local answer is never final.
            let pre = RouteInputs {
                safety_flag: s.escalates() || s.refuses(),
                ..inputs
            };
            let _ = release_tx.send(local_is_final(&pre, &thresholds));
            s
        };
        // A local failure (a full queue above all) ends the query at once,
        // without waiting for the embedding: a burst is refused quickly.
        let (safety, local) = tokio::try_join!(
            async { Ok::<_, InferenceError>(safety.await) },
            self.answer_locally(
                &handle,
                &req.messages,
                &task,
                &req.params,
                req.deadline,
                Some(live)
            )
        )?;
        let metrics = &self.p.metrics;
        if safety.flagged {
            metrics.safety_flags.inc();
        }
        if safety.refuses() {
            let elapsed = t0.elapsed().as_millis() as u64;
            metrics.observe_query("refused", elapsed as f64);
            return Ok(request::refusal(
                self.me(),
                &routing.safety_policy.refusal,
                &task,
                safety.category.clone(),
                elapsed,
            ));
        }
        inputs.safety_flag = safety.escalates();
        let cfg = CoordinatorConfig {
            voters: routing.voters,
            quorum: routing.quorum,
            free_similarity: routing.free_similarity,
            thresholds,
        };
        let candidates = voter_candidates(adverts(), self.me());
        let mut coord = Coordinator::new(self.me(), task.clone(), cfg, inputs, candidates, query_id);
        let mut voters = vec![VoterView {
            peer: self.me().to_string(),
            model: local.model.clone(),
            answer: Some(local.text.clone()),
            confidence: Some(local.confidence),
            elapsed_ms: local.elapsed_ms,
            inference_ms: Some(local.elapsed_ms),
            error: None,
            model_version: self.p.models.version(&local.model),
        }];
        let mut vote_ms = None;
        let mut cloud_tried = false;
        let mut pending: VecDeque<OutEvent> = coord
            .handle(InEvent::Local(AnswerIn {
                model: local.model.clone(),
                text: local.text.clone(),
                confidence: local.confidence,
                elapsed_ms: local.elapsed_ms.min(u64::from(u32::MAX)) as u32,
            }))
            .into();
        // Carry out what the coordinator asks for until it decides.
        let decision = loop {
            let Some(ev) = pending.pop_front() else {
                return Err(RouteError::Internal(
                    "the query coordinator stopped without a decision".into(),
                ));
            };
            match ev {
                OutEvent::Finished(d) => break *d,
                OutEvent::RequestVotes(picked) => {
                    let t_vote = Instant::now();
                    let (out, views) = self.run_vote(&mut coord, query_id, &req, &picked).await;
                    vote_ms = Some(t_vote.elapsed().as_secs_f64() * 1e3);
                    voters.extend(views);
                    pending.extend(out);
                }
                OutEvent::Embed(texts) => {
                    let vectors = match self.p.semantic.embedder().await {
                        Some(e) => match e.embed(texts).await {
                            Ok(v) => Some(v),
                            Err(e) => {
                                tracing::warn!("free-text vote: embedding failed, exact match used: {e}");
                                None
                            }
                        },
                        None => None,
                    };
                    pending.extend(coord.handle(InEvent::Embeddings(vectors)));
                }
                OutEvent::Escalate(mut records) => {
                    cloud_tried = true;
                    // The gateway logs which version of each model answered.
                    for r in &mut records {
                        if let Some(v) = voters.iter().find(|v| v.peer == r.peer && v.model == r.model) {
                            r.model_version = v.model_version.clone();
                        }
                    }
                    let relay = relay_cloud.then_some(&cloud_tokens);
                    let r = match self.escalate(query_id, &req, &task, records, relay).await {
                        Ok(r) => r,
                        Err(escalate::RelayBroke(why)) => {
                            self.p
                                .metrics
                                .escalations
                                .get_or_create(&OutcomeLabel {
                                    outcome: "failed".into(),
                                })
                                .inc();
                            return Err(RouteError::Internal(format!(
                                "the cloud's answer broke off while it was streaming: {why}"
                            )));
                        }
                    };
                    pending.extend(coord.handle(InEvent::Escalated(r)));
                }
                OutEvent::Ignored { .. } => {}
            }
        };
        tracing::debug!(
            route = decision.route.as_str(),
            confidence = local.confidence,
            "route decided"
        );
        debug_assert!(
            !local.streamed || decision.route == FinalRoute::Local,
            "streamed tokens of an answer that was not final"
        );
        if cloud_tried {
            let outcome = if decision.route == FinalRoute::Cloud {
                "ok"
            } else {
                "failed"
            };
            metrics
                .escalations
                .get_or_create(&OutcomeLabel {
                    outcome: outcome.into(),
                })
                .inc();
        }
        let mut prov = Provenance::answered_by(self.me(), &local.model, local.confidence, &task);
        prov.model_version = self.p.models.version(&local.model);
        prov.safety_flag = safety.flagged;
        prov.safety_category = safety.category.clone();
        let mut answer = Answer {
            text: local.text.clone(),
            model: local.model.clone(),
            finish_reason: local.finish_reason.clone(),
            prompt_tokens: local.prompt_tokens,
            completion_tokens: local.completion_tokens,
            tokens: local
                .generation
                .as_ref()
                .map(|g| g.tokens.clone())
                .unwrap_or_default(),
            prov: prov.clone(),
        };
        if let Some(v) = &decision.vote {
            metrics.observe_vote(v.valid);
            prov.route = "vote".into();
            prov.vote_ms = vote_ms;
            prov.voters = voters.clone();
            prov.agreement = Some(v.agreement);
            prov.confidence = v.agreement;
            if let Some(w) = &decision.winner {
                answer.text = match &task {
                    Task::Mcq { choices } => choices
                        .iter()
                        .find(|c| c.label == w.key)
                        .map(|c| format!("{}. {}", c.label, c.text))
                        .unwrap_or_else(|| w.key.clone()),
                    Task::Label { .. } => w.key.clone(),
                    Task::Short | Task::Free => w.text.clone(),
                };
                answer.tokens.clear();
                if w.model != local.model {
                    answer.finish_reason = "stop".into();
                }
            }
        }
        if let Some(c) = decision.cloud {
            self.record_escalation(query_id, &req, &task, &prov, &voters, &c);
            prov.route = "cloud".into();
            prov.peer = c.gateway.clone();
            prov.gateway = Some(c.gateway);
            prov.cloud_ms = Some(u64::from(c.cloud_ms));
            prov.model = c.model.clone();
            prov.model_version.clear();
            prov.confidence = 1.0;
            answer.text = c.text;
            answer.model = c.model;
            answer.tokens.clear();
            answer.finish_reason = "stop".into();
        }
        if let Some(reason) = decision.degraded {
            prov.degraded = true;
            prov.degraded_reason = Some(reason);
            metrics.degraded.inc();
        }
        prov.elapsed_ms = t0.elapsed().as_millis() as u64;
        metrics.observe_query(&prov.route, prov.elapsed_ms as f64);
        answer.prov = prov;
        Ok(answer)
    }
}
