//! What became of each request of `bench-load`: one request and its outcome,
//! the tally of all of them, and percentiles.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What became of one request.
pub(super) enum Outcome {
    Ok {
        ms: f64,
        route: String,
    },
    /// 429/503/504 with an error body: the node said no, clearly (and when
    /// to come back: `Retry-After`).
    Refused(u16, Option<Duration>),
    /// The node could not be reached (killed by chaos, or down).
    Unreachable,
    /// The connection broke while the chaos killed that node: lost with it.
    Interrupted,
    Error(String),
}

#[derive(Default)]
pub(super) struct Tally {
    pub(super) ok_ms: Vec<f64>,
    pub(super) refused: usize,
    pub(super) unreachable: usize,
    pub(super) interrupted: usize,
    pub(super) errors: usize,
    pub(super) statuses: BTreeMap<String, usize>,
    pub(super) routes: BTreeMap<String, usize>,
    pub(super) error_samples: Vec<String>,
}

impl Tally {
    pub(super) fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Ok { ms, route } => {
                self.ok_ms.push(ms);
                *self.statuses.entry("200".into()).or_default() += 1;
                *self.routes.entry(route).or_default() += 1;
            }
            Outcome::Refused(st, _) => {
                self.refused += 1;
                *self.statuses.entry(st.to_string()).or_default() += 1;
            }
            Outcome::Unreachable => self.unreachable += 1,
            Outcome::Interrupted => self.interrupted += 1,
            Outcome::Error(e) => {
                self.errors += 1;
                if self.error_samples.len() < 10 {
                    self.error_samples.push(e);
                }
            }
        }
    }

    pub(super) fn requests(&self) -> usize {
        self.ok_ms.len() + self.refused + self.unreachable + self.interrupted + self.errors
    }
}

pub(super) async fn one(c: &reqwest::Client, url: &str, q: &str, max_tokens: u32) -> Outcome {
    let body = json!({
        "messages": [{"role": "user", "content": q}],
        "max_tokens": max_tokens,
    });
    let t0 = Instant::now();
    let resp = match c
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) if e.is_connect() => return Outcome::Unreachable,
        Err(e) => return Outcome::Error(format!("{url}: {}", chain(&e))),
    };
    let st = resp.status().as_u16();
    let retry = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(30)));
    let v: Result<Value, _> = resp.json().await;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    match (st, v) {
        (200, Ok(v)) if v["choices"][0]["message"]["content"].is_string() => Outcome::Ok {
            ms,
            route: v["swarm"]["route"].as_str().unwrap_or("?").to_string(),
        },
        (429 | 503 | 504, Ok(v)) if v["error"]["message"].is_string() => Outcome::Refused(st, retry),
        (st, Ok(v)) => Outcome::Error(format!("{url}: HTTP {st}: {}", clip(&v.to_string()))),
        (st, Err(e)) => Outcome::Error(format!("{url}: HTTP {st}, unreadable body: {e}")),
    }
}

/// An error with its causes ("error sending request: connection reset").
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub(super) fn clip(s: &str) -> String {
    s.chars().take(200).collect()
}

pub(super) fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    Some(sorted[i])
}
