//! Decoding OpenAI's streamed chat completions: server-sent-event framing over
//! arbitrary byte chunks, then each `data:` payload into a text delta.

use serde::Deserialize;

use super::CloudError;

/// Longest SSE line accepted; a server that never sends a newline cannot make
/// us buffer without bound.
pub(super) const MAX_SSE_LINE: usize = 1 << 20;

/// Incremental SSE parser: feed it byte chunks as they arrive, get back the
/// `data` of each complete event. Chunk boundaries may fall anywhere, including
/// inside a UTF-8 sequence or between `\r` and `\n`.
#[derive(Debug, Default)]
pub(super) struct SseParser {
    line: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    pub(super) fn new() -> Self {
        Self::default()
    }

    /// Consumes `bytes`; returns the events they completed, in order.
    pub(super) fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, CloudError> {
        let mut events = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                if self.line.last() == Some(&b'\r') {
                    self.line.pop();
                }
                let line = std::mem::take(&mut self.line);
                self.line_done(&line, &mut events)?;
            } else {
                if self.line.len() >= MAX_SSE_LINE {
                    return Err(CloudError::BadResponse(format!(
                        "stream line longer than {MAX_SSE_LINE} bytes"
                    )));
                }
                self.line.push(b);
            }
        }
        Ok(events)
    }

    /// End of the byte stream: an event not followed by its blank line still
    /// counts (lenient towards servers that close right after the last event).
    pub(super) fn finish(&mut self) -> Result<Vec<String>, CloudError> {
        let mut events = Vec::new();
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, &mut events)?;
        }
        if let Some(d) = self.data.take() {
            events.push(d);
        }
        Ok(events)
    }

    fn line_done(&mut self, line: &[u8], events: &mut Vec<String>) -> Result<(), CloudError> {
        if line.is_empty() {
            if let Some(d) = self.data.take() {
                events.push(d);
            }
            return Ok(());
        }
        let line = std::str::from_utf8(line)
            .map_err(|_| CloudError::BadResponse("stream is not UTF-8".to_string()))?;
        if line.starts_with(':') {
            return Ok(()); // comment / keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        // Only `data` matters for chat completions; `event`, `id`, `retry` are ignored.
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
        Ok(())
    }
}

/// What one event of a chat completion stream means.
#[derive(Debug, PartialEq)]
pub(super) enum StreamEvent {
    /// `data: [DONE]`: the answer is complete.
    Done,
    /// A chunk: maybe some text, maybe the finish reason.
    Delta { text: Option<String>, finished: bool },
    /// The usage chunk (`stream_options.include_usage`): tokens the call cost.
    Usage(u32),
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    usage: Option<super::http::Usage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

/// Decodes one event's data. An `error` object mid-stream (some servers send
/// one instead of closing) becomes `BadResponse` with the server's message.
pub(super) fn decode_event(data: &str) -> Result<StreamEvent, CloudError> {
    if data.trim() == "[DONE]" {
        return Ok(StreamEvent::Done);
    }
    let chunk: Chunk = serde_json::from_str(data)
        .map_err(|e| CloudError::BadResponse(format!("stream chunk is not valid JSON: {e}")))?;
    if let Some(err) = chunk.error {
        let msg = super::error_message_from_json(&err).unwrap_or_else(|| err.to_string());
        return Err(CloudError::BadResponse(format!(
            "error in stream: {}",
            super::truncate(&msg, super::MAX_ERROR_MESSAGE)
        )));
    }
    let Some(choice) = chunk.choices.into_iter().next() else {
        let total = chunk.usage.as_ref().and_then(super::http::Usage::total);
        if let Some(t) = total {
            return Ok(StreamEvent::Usage(t));
        }
        return Ok(StreamEvent::Delta {
            text: None,
            finished: false,
        });
    };
    let text = choice.delta.and_then(|d| d.content).filter(|t| !t.is_empty());
    Ok(StreamEvent::Delta {
        text,
        finished: choice.finish_reason.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = ": keep-alive\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hé\"}}]}\r\n\r\n\
        event: message\nid: 7\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"llo\"}}]}\n\n\
        data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
        data: [DONE]\n\n";

    fn decode_all(events: &[String]) -> Vec<StreamEvent> {
        events.iter().map(|e| decode_event(e).expect("decodes")).collect()
    }

    #[test]
    fn parses_events_across_every_split() {
        let bytes = STREAM.as_bytes();
        let whole = {
            let mut p = SseParser::new();
            let mut ev = p.push(bytes).expect("ok");
            ev.extend(p.finish().expect("ok"));
            ev
        };
        assert_eq!(whole.len(), 5);
        // One byte at a time: boundaries inside UTF-8 and between \r and \n.
        let mut p = SseParser::new();
        let mut ev = Vec::new();
        for b in bytes {
            ev.extend(p.push(std::slice::from_ref(b)).expect("ok"));
        }
        ev.extend(p.finish().expect("ok"));
        assert_eq!(ev, whole);
        let decoded = decode_all(&ev);
        assert_eq!(
            decoded,
            vec![
                StreamEvent::Delta {
                    text: None,
                    finished: false
                },
                StreamEvent::Delta {
                    text: Some("Hé".into()),
                    finished: false
                },
                StreamEvent::Delta {
                    text: Some("llo".into()),
                    finished: false
                },
                StreamEvent::Delta {
                    text: None,
                    finished: true
                },
                StreamEvent::Done,
            ]
        );
    }

    #[test]
    fn multi_line_data_and_unterminated_last_event() {
        let mut p = SseParser::new();
        let ev = p.push(b"data: a\ndata:b\n\ndata: [DONE]").expect("ok");
        assert_eq!(ev, vec!["a\nb".to_string()]);
        assert_eq!(p.finish().expect("ok"), vec!["[DONE]".to_string()]);
    }

    #[test]
    fn bounded_line_and_bad_chunks() {
        let mut p = SseParser::new();
        let long = vec![b'x'; MAX_SSE_LINE + 1];
        assert!(matches!(p.push(&long), Err(CloudError::BadResponse(_))));
        assert!(matches!(
            decode_event("{not json"),
            Err(CloudError::BadResponse(_))
        ));
        let err = decode_event(r#"{"error":{"message":"overloaded"}}"#).expect_err("error");
        assert!(err.to_string().contains("overloaded"), "{err}");
    }
}
