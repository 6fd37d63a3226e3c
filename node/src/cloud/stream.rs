//! `CloudClient::chat_stream`: a streamed chat completion read as server-sent
//! events, with a deadline between chunks and a bound on the whole answer.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use reqwest::header::CONTENT_TYPE;
use tracing::debug;

use super::client::{check_request, elapsed_ms};
use super::sse::{decode_event, SseParser, StreamEvent};
use super::{CloudAnswer, CloudClient, CloudError, CloudRequest, CloudStream};

/// Largest streamed answer accepted, all chunks together.
const MAX_STREAM_BYTES: usize = 16 << 20;

impl CloudClient {
    /// A streamed chat completion. Returns once the endpoint has accepted the
    /// request (within `timeout_ms`); the stream then fails with `Timeout` if
    /// the endpoint stays silent for `timeout_ms` between two chunks. A server
    /// that ignores `stream: true` and answers plain JSON is handled too (one item).
    /// `max_tokens` is clamped to `max_tokens_per_call`. The request asks for
    /// the usage chunk (`stream_options.include_usage`): a complete answer that
    /// reports it settles its reservation to it; otherwise the reservation stands.
    pub async fn chat_stream(&self, req: CloudRequest) -> Result<CloudStream, CloudError> {
        let inner = Arc::clone(&self.inner);
        check_request(&req)?;
        let req = inner.clamped(req);
        let reservation = inner.take_budget(&req)?;
        let started = Instant::now();
        let opened = match tokio::time::timeout(inner.timeout, inner.open_stream(&req)).await {
            Ok(r) => r,
            Err(_) => Err(inner.timeout_error()),
        };
        let resp = match opened {
            Ok(r) => r,
            Err(e) => {
                inner.settle(reservation, &Err(e.clone()));
                return Err(inner.failed(e, elapsed_ms(started)));
            }
        };
        inner.mark_reachable(true);
        let is_json = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json"));
        let stream = async_stream::stream! {
            if is_json {
                let answer = match tokio::time::timeout(inner.timeout, inner.read_answer(resp)).await {
                    Ok(r) => r,
                    Err(_) => Err(inner.timeout_error()),
                };
                inner.settle(reservation, &answer);
                match answer {
                    Ok(a) => yield Ok(a.text),
                    Err(e) => yield Err(inner.failed(e, elapsed_ms(started))),
                }
                return;
            }
            let mut body = resp.bytes_stream();
            let mut parser = SseParser::new();
            let mut total = 0usize;
            let mut pieces = 0u32;
            let mut finished = false;
            let mut used: Option<u32> = None;
            let mut held = Some(reservation);
            // Settle once the answer is known to be whole (to the usage, if it came).
            let mut settle = |used: Option<u32>| {
                if let Some(r) = held.take() {
                    let cost = CloudAnswer {
                        text: String::new(),
                        model: String::new(),
                        latency_ms: elapsed_ms(started),
                        prompt_tokens: None,
                        completion_tokens: None,
                        total_tokens: used,
                    };
                    inner.settle(r, &Ok(cost));
                }
            };
            loop {
                let next = match tokio::time::timeout(inner.timeout, body.next()).await {
                    Ok(n) => n,
                    Err(_) => {
                        yield Err(inner.failed(inner.timeout_error(), elapsed_ms(started)));
                        return;
                    }
                };
                let (events, at_end) = match next {
                    Some(Ok(bytes)) => {
                        total += bytes.len();
                        if total > MAX_STREAM_BYTES {
                            let e = CloudError::BadResponse(format!(
                                "streamed answer exceeds {MAX_STREAM_BYTES} bytes"
                            ));
                            yield Err(inner.failed(e, elapsed_ms(started)));
                            return;
                        }
                        (parser.push(&bytes), false)
                    }
                    Some(Err(e)) => {
                        yield Err(inner.failed(inner.net_error(&e), elapsed_ms(started)));
                        return;
                    }
                    None => (parser.finish(), true),
                };
                let events = match events {
                    Ok(ev) => ev,
                    Err(e) => {
                        yield Err(inner.failed(e, elapsed_ms(started)));
                        return;
                    }
                };
                for data in events {
                    match decode_event(&data) {
                        Ok(StreamEvent::Done) => {
                            debug!(latency_ms = elapsed_ms(started), pieces, "cloud stream done");
                            settle(used);
                            return;
                        }
                        Ok(StreamEvent::Usage(t)) => used = Some(t),
                        Ok(StreamEvent::Delta { text, finished: f }) => {
                            finished |= f;
                            if let Some(t) = text {
                                pieces += 1;
                                yield Ok(t);
                            }
                        }
                        Err(e) => {
                            yield Err(inner.failed(e, elapsed_ms(started)));
                            return;
                        }
                    }
                }
                if at_end {
                    // No [DONE]: complete only if a finish_reason came; otherwise
                    // the answer was cut off and must not pass as whole.
                    if !finished {
                        let e = CloudError::BadResponse(
                            "stream ended before [DONE] (answer cut off)".to_string(),
                        );
                        yield Err(inner.failed(e, elapsed_ms(started)));
                    } else {
                        settle(used);
                    }
                    return;
                }
            }
        };
        Ok(Box::pin(stream))
    }
}
