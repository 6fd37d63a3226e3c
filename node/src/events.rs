//! The node's live query feed: one [`QueryEvent`] per query this node answered
//! (route, voters with their answers and confidences, latency, cloud or not),
//! kept in a short ring for pages that open later and broadcast to every
//! listener of `GET /v1/swarm/events`. Prompt and answer text are recorded only
//! when the node is configured to show them (`[ui] show_prompts`): the page may
//! be open on a screen anyone can see.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::router::request::{Answer, RouteError, VoterView};

/// Queries kept for a page that opens later.
pub const RECENT: usize = 100;
/// Events a slow listener may fall behind by before it skips ahead.
const CHANNEL: usize = 256;
/// Longest text (voter answers, and prompts/answers when shown) in an event, in chars.
const MAX_TEXT: usize = 200;

/// One answered (or failed) query, as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct QueryEvent {
    /// Wall-clock time the query ended, Unix ms.
    pub at_ms: u64,
    /// "local", "forward", "vote", "cloud", or "error".
    pub route: String,
    pub task: String,
    pub model: String,
    /// Peer whose answer was returned.
    pub peer: String,
    pub confidence: f32,
    pub latency_ms: u64,
    pub cloud: bool,
    pub forwarded: bool,
    pub degraded: bool,
    pub safety_flag: bool,
    pub voters: Vec<VoterView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The feed: a ring of recent queries and a broadcast of new ones. Cheap to share.
pub struct Events {
    show_prompts: bool,
    tx: broadcast::Sender<Arc<QueryEvent>>,
    recent: Mutex<VecDeque<Arc<QueryEvent>>>,
    /// Set when the node shuts down, so open feeds end instead of holding the server.
    closed: watch::Sender<bool>,
}

fn clip(s: &str) -> String {
    match s.char_indices().nth(MAX_TEXT) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn wall_ms() -> u64 {
    crate::swarm::membership::wall_ms()
}

impl Events {
    pub fn new(show_prompts: bool) -> Self {
        let (tx, _) = broadcast::channel(CHANNEL);
        Self {
            show_prompts,
            tx,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            closed: watch::channel(false).0,
        }
    }

    /// End every open feed (the node is shutting down).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Turns true when the feeds close.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Whether prompts and answers are shown (the page says so).
    pub fn shows_prompts(&self) -> bool {
        self.show_prompts
    }

    /// New queries from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<QueryEvent>> {
        self.tx.subscribe()
    }

    /// The last [`RECENT`] queries, oldest first.
    pub fn recent(&self) -> Vec<Arc<QueryEvent>> {
        let r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        r.iter().cloned().collect()
    }

    /// Record a query's outcome: its answer, or the error it ended with.
    pub fn record(&self, prompt: &str, outcome: Result<&Answer, &RouteError>, latency_ms: u64) {
        let shown = |s: &str| self.show_prompts.then(|| clip(s));
        let ev = match outcome {
            Ok(a) => {
                let p = &a.prov;
                QueryEvent {
                    at_ms: wall_ms(),
                    route: p.route.clone(),
                    task: p.task.clone(),
                    model: a.model.clone(),
                    peer: p.peer.clone(),
                    confidence: p.confidence,
                    latency_ms: p.elapsed_ms.max(latency_ms),
                    cloud: p.route == "cloud",
                    forwarded: p.forwarded,
                    degraded: p.degraded,
                    safety_flag: p.safety_flag,
                    voters: p
                        .voters
                        .iter()
                        .map(|v| VoterView {
                            answer: v.answer.as_deref().map(clip),
                            error: v.error.as_deref().map(clip),
                            ..v.clone()
                        })
                        .collect(),
                    prompt: shown(prompt),
                    answer: shown(&a.text),
                    error: None,
                }
            }
            Err(e) => QueryEvent {
                at_ms: wall_ms(),
                route: "error".into(),
                task: String::new(),
                model: String::new(),
                peer: String::new(),
                confidence: 0.0,
                latency_ms,
                cloud: false,
                forwarded: false,
                degraded: false,
                safety_flag: false,
                voters: Vec::new(),
                prompt: shown(prompt),
                answer: None,
                error: Some(clip(&e.to_string())),
            },
        };
        let ev = Arc::new(ev);
        {
            let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if r.len() == RECENT {
                r.pop_front();
            }
            r.push_back(ev.clone());
        }
        // No listener is fine: the ring keeps it.
        let _ = self.tx.send(ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::request::Provenance;

    fn answer(route: &str, text: &str) -> Answer {
        let mut prov = Provenance::answered_by("p1", "m", 0.7, &swarm_protocol::Task::Free);
        prov.route = route.into();
        prov.elapsed_ms = 12;
        prov.voters = vec![VoterView {
            peer: "p2".into(),
            model: "m2".into(),
            answer: Some("é".repeat(1000)),
            confidence: Some(0.4),
            elapsed_ms: 5,
            inference_ms: None,
            error: None,
            model_version: String::new(),
        }];
        Answer {
            text: text.into(),
            model: "m".into(),
            finish_reason: "stop".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            tokens: Vec::new(),
            prov,
        }
    }

    #[test]
    fn hides_prompts_unless_configured_and_clips_text() {
        let hidden = Events::new(false);
        let mut rx = hidden.subscribe();
        hidden.record("secret question", Ok(&answer("vote", "secret answer")), 10);
        let ev = rx.try_recv().expect("broadcast");
        assert_eq!(ev.route, "vote");
        assert!(ev.prompt.is_none() && ev.answer.is_none());
        let json = serde_json::to_string(&*ev).expect("json");
        assert!(!json.contains("secret"), "{json}");
        let clipped = ev.voters[0].answer.as_deref().expect("voter answer");
        assert_eq!(clipped.chars().count(), MAX_TEXT + 1);

        let shown = Events::new(true);
        shown.record("what is 2+2", Ok(&answer("cloud", "4")), 10);
        let r = shown.recent();
        assert_eq!(r[0].prompt.as_deref(), Some("what is 2+2"));
        assert_eq!(r[0].answer.as_deref(), Some("4"));
        assert!(r[0].cloud);
    }

    #[test]
    fn keeps_only_the_most_recent_and_records_errors() {
        let ev = Events::new(false);
        for _ in 0..RECENT + 5 {
            ev.record("q", Ok(&answer("local", "a")), 1);
        }
        ev.record("q", Err(&RouteError::Timeout), 30);
        let r = ev.recent();
        assert_eq!(r.len(), RECENT);
        let last = r.last().expect("last");
        assert_eq!(last.route, "error");
        assert_eq!(last.latency_ms, 30);
        assert!(last.error.is_some());
    }
}
