//! The web page every node serves at `/` (one embedded HTML file: no CDN, the
//! device may be offline) and its live feed, `GET /v1/swarm/events` (SSE).
//!
//! The feed sends, as JSON with a `type` field and the same SSE event name:
//! `hello` (this node: peer id, name, version, whether prompts are shown), then
//! `swarm` (the body of `GET /v1/swarm/peers`) at once and whenever the view
//! changes (at most once per [`SWARM_EVERY`]), then the recent `query` events
//! (`"replay": true`) and every new one as it ends.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use futures::stream::Stream;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::swarm_json;
use crate::events::QueryEvent;
use crate::node::Node;

/// The page: HTML, CSS and script in one file.
const PAGE: &str = include_str!("ui.html");

/// Shortest gap between two `swarm` events: adverts change the view several
/// times a second in a busy swarm, and a page needs no more than this.
pub(super) const SWARM_EVERY: Duration = Duration::from_millis(750);

pub(super) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            // Everything the page needs is same-origin; nothing else may run in it.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline' 'self'; style-src 'unsafe-inline' 'self'; img-src 'self' data:",
            ),
        ],
        PAGE,
    )
}

fn event(kind: &str, mut v: Value) -> Event {
    if let Some(o) = v.as_object_mut() {
        o.insert("type".into(), json!(kind));
    }
    Event::default().event(kind).data(v.to_string())
}

fn query_event(q: &QueryEvent, replay: bool) -> Event {
    let mut v = serde_json::to_value(q).unwrap_or(Value::Null);
    if replay {
        if let Some(o) = v.as_object_mut() {
            o.insert("replay".into(), json!(true));
        }
    }
    event("query", v)
}

pub(super) async fn events(State(node): State<Node>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut queries = node.events.subscribe();
    let recent = node.events.recent();
    let mut closed = node.events.closed();
    let s = async_stream::stream! {
        yield Ok(event("hello", json!({
            "peer_id": node.peer_id.to_string(),
            "name": node.name,
            "version": env!("CARGO_PKG_VERSION"),
            "show_prompts": node.events.shows_prompts(),
        })));
        let mut last = node.snapshot();
        yield Ok(event("swarm", swarm_json(&node)));
        for q in recent {
            yield Ok(query_event(&q, true));
        }
        let mut tick = tokio::time::interval(SWARM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !*closed.borrow() {
            tokio::select! {
                _ = closed.changed() => break,
                q = queries.recv() => match q {
                    Ok(q) => yield Ok(query_event(&q, false)),
                    // A page that fell behind skips ahead; the ring has the rest.
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => break,
                },
                _ = tick.tick() => {
                    let now = node.snapshot();
                    if !Arc::ptr_eq(&now, &last) {
                        last = now;
                        yield Ok(event("swarm", swarm_json(&node)));
                    }
                }
            }
        }
    };
    Sse::new(s).keep_alive(KeepAlive::default())
}
