//! CBOR framing of wire messages: a versioned envelope `{v, body}`, hard size limits, validation on decode.
//!
//! Decoding checks, in order: length (before any parsing), CBOR well-formedness, no trailing bytes,
//! envelope version, body shape, then [`Validate`]. Anything failing is an error, never a panic.

use std::io::Cursor;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::message::{
    Advert, EscalateFrame, EscalateReply, EscalateRequest, QueryReply, QueryRequest, Validate,
    ValidationError, VoteReply, VoteRequest, PROTOCOL_VERSION,
};

/// Largest encoded advert (they ride on gossip; keep them small).
pub const MAX_ADVERT_BYTES: usize = 8 * 1024;
/// Largest encoded request (64 KiB of prompt plus task and voter records).
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Largest encoded response.
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("message is {len} bytes, limit {max}")]
    Oversize { len: usize, max: usize },
    #[error("cannot encode: {0}")]
    Encode(String),
    #[error("malformed CBOR: {0}")]
    Decode(String),
    #[error("{extra} trailing bytes after the message")]
    TrailingBytes { extra: usize },
    #[error("protocol version {got}, this peer speaks {expected}")]
    Version { got: u64, expected: u16 },
    #[error("invalid message: {0}")]
    Invalid(#[from] ValidationError),
}

/// A message type with its own size limit, so callers need not pick one.
pub trait WireMessage: Serialize + DeserializeOwned + Validate {
    const MAX_BYTES: usize;
}

impl WireMessage for Advert {
    const MAX_BYTES: usize = MAX_ADVERT_BYTES;
}
impl WireMessage for VoteRequest {
    const MAX_BYTES: usize = MAX_REQUEST_BYTES;
}
impl WireMessage for QueryRequest {
    const MAX_BYTES: usize = MAX_REQUEST_BYTES;
}
impl WireMessage for EscalateRequest {
    const MAX_BYTES: usize = MAX_REQUEST_BYTES;
}
impl WireMessage for VoteReply {
    const MAX_BYTES: usize = MAX_RESPONSE_BYTES;
}
impl WireMessage for QueryReply {
    const MAX_BYTES: usize = MAX_RESPONSE_BYTES;
}
impl WireMessage for EscalateReply {
    const MAX_BYTES: usize = MAX_RESPONSE_BYTES;
}
impl WireMessage for EscalateFrame {
    const MAX_BYTES: usize = MAX_RESPONSE_BYTES;
}

#[derive(Serialize)]
struct EnvelopeRef<'a, T> {
    v: u16,
    body: &'a T,
}

// The body is parsed into a generic value first so that a message from a future version
// is reported as a version mismatch rather than as a confusing shape error.
#[derive(Deserialize)]
struct RawEnvelope {
    v: u64,
    body: ciborium::Value,
}

/// Encodes `msg` in the current envelope. No size check: use [`encode_msg`] for that.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(256);
    ciborium::into_writer(
        &EnvelopeRef {
            v: PROTOCOL_VERSION,
            body: msg,
        },
        &mut out,
    )
    .map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

/// Encodes and refuses anything a peer would reject for size.
pub fn encode_msg<T: WireMessage>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let out = encode(msg)?;
    if out.len() > T::MAX_BYTES {
        return Err(CodecError::Oversize {
            len: out.len(),
            max: T::MAX_BYTES,
        });
    }
    Ok(out)
}

/// Decodes an envelope holding a `T`, rejecting oversize input before parsing.
pub fn decode<T: DeserializeOwned + Validate>(bytes: &[u8], max_len: usize) -> Result<T, CodecError> {
    if bytes.len() > max_len {
        return Err(CodecError::Oversize {
            len: bytes.len(),
            max: max_len,
        });
    }
    let mut cursor = Cursor::new(bytes);
    let raw: RawEnvelope =
        ciborium::from_reader(&mut cursor).map_err(|e| CodecError::Decode(e.to_string()))?;
    let consumed = usize::try_from(cursor.position()).unwrap_or(usize::MAX);
    if consumed < bytes.len() {
        return Err(CodecError::TrailingBytes {
            extra: bytes.len() - consumed,
        });
    }
    if raw.v != u64::from(PROTOCOL_VERSION) {
        return Err(CodecError::Version {
            got: raw.v,
            expected: PROTOCOL_VERSION,
        });
    }
    let msg: T = raw
        .body
        .deserialized()
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    msg.validate()?;
    Ok(msg)
}

/// [`decode`] with the type's own limit.
pub fn decode_msg<T: WireMessage>(bytes: &[u8]) -> Result<T, CodecError> {
    decode(bytes, T::MAX_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;

    fn msgs() -> Vec<ChatMessage> {
        vec![
            ChatMessage {
                role: "system".into(),
                content: "Answer with the option letter.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Which is a mammal? A. shark B. dolphin".into(),
            },
        ]
    }

    fn mcq() -> Task {
        Task::Mcq {
            choices: vec![
                Choice {
                    label: "A".into(),
                    text: "shark".into(),
                },
                Choice {
                    label: "B".into(),
                    text: "dolphin".into(),
                },
            ],
        }
    }

    fn advert() -> Advert {
        Advert {
            peer: "12D3KooWAbc".into(),
            seq: 42,
            name: "n1".into(),
            version: "0.1.0".into(),
            addrs: vec!["/ip4/10.0.0.1/udp/4001/quic-v1".into()],
            models: vec![ModelCard {
                id: "gemma3-270m".into(),
                arch: "gemma3".into(),
                params: 270_000_000,
                quant: "Q4_K_M".into(),
                ctx: 8192,
                domains: vec!["general".into(), "science".into()],
                tok_s: 33.5,
                sha256: String::new(),
                version: String::new(),
            }],
            capacity: Capacity {
                cores: 2,
                cpu_load: 0.5,
                mem_free_mb: 1500,
                queue: 1,
                max_concurrency: 2,
            },
            cloud: Some(CloudStatus {
                reachable: true,
                budget_left: 99,
                priority: -3,
            }),
            gateway: Some(GatewayClaim {
                term: 3,
                since_ms: 1234,
            }),
            sent_ms: 99,
            cert: None,
            teams: Vec::new(),
        }
    }

    fn vote_request() -> VoteRequest {
        VoteRequest {
            id: 9,
            messages: msgs(),
            task: mcq(),
            max_tokens: 8,
            deadline_ms: 2000,
            model: Some("smollm2-135m".into()),
            team: None,
        }
    }

    fn escalate_request() -> EscalateRequest {
        EscalateRequest {
            id: 10,
            messages: msgs(),
            task: Task::Label {
                labels: vec!["positive".into(), "negative".into()],
            },
            max_tokens: 64,
            swarm_answers: vec![
                VoterRecord {
                    peer: "p1".into(),
                    model: "m1".into(),
                    answer: "positive".into(),
                    confidence: 0.4,
                    elapsed_ms: 120,
                    error: None,
                    model_version: String::new(),
                },
                VoterRecord {
                    peer: "p2".into(),
                    model: "m2".into(),
                    answer: String::new(),
                    confidence: 0.0,
                    elapsed_ms: 2000,
                    error: Some("timeout".into()),
                    model_version: String::new(),
                },
            ],
            deadline_ms: 30_000,
        }
    }

    fn query_request() -> QueryRequest {
        QueryRequest {
            id: 11,
            model: "qwen2.5-coder-0.5b".into(),
            messages: msgs(),
            max_tokens: 128,
            temperature: 0.7,
            seed: Some(5),
            stop: vec!["\n\n".into()],
            logprobs: true,
            deadline_ms: 10_000,
            task: None,
            team: None,
        }
    }

    fn round_trip<T: WireMessage + PartialEq + std::fmt::Debug>(m: &T) -> Vec<u8> {
        let bytes = encode_msg(m).expect("encode");
        let back: T = decode_msg(&bytes).expect("decode");
        assert_eq!(&back, m);
        bytes
    }

    #[test]
    fn every_message_round_trips() {
        let adv = round_trip(&advert());
        assert!(adv.len() < 400, "advert is {} bytes", adv.len());
        round_trip(&vote_request());
        round_trip(&VoteRequest {
            task: Task::Free,
            model: None,
            team: None,
            ..vote_request()
        });
        round_trip(&VoteReply::Ok(VoteResponse {
            id: 9,
            answer: "The answer is B".into(),
            normalized: "B".into(),
            confidence: 0.8125,
            model: "smollm2-135m".into(),
            tokens: 4,
            elapsed_ms: 310,
            model_version: String::new(),
        }));
        round_trip(&VoteReply::Err(WireError {
            code: ErrorCode::Overloaded,
            message: "queue full".into(),
        }));
        round_trip(&query_request());
        round_trip(&QueryReply::Ok(QueryResponse {
            id: 11,
            text: "fn main() {}".into(),
            model: "qwen2.5-coder-0.5b".into(),
            confidence: 0.5,
            mean_logprob: -0.75,
            min_prob: 0.125,
            prompt_tokens: 20,
            completion_tokens: 5,
            finish_reason: "stop".into(),
            elapsed_ms: 800,
        }));
        round_trip(&QueryReply::Err(WireError {
            code: ErrorCode::NoModel,
            message: "no such model".into(),
        }));
        round_trip(&escalate_request());
        round_trip(&EscalateReply::Ok(EscalateResponse {
            id: 10,
            text: "positive".into(),
            model: "gpt-cloud".into(),
            cloud_ms: 900,
            gateway: "12D3KooWGw".into(),
        }));
        round_trip(&EscalateReply::Err(WireError {
            code: ErrorCode::Unauthorized,
            message: String::new(),
        }));
    }

    #[test]
    fn oversize_is_rejected_before_parsing() {
        // Not even CBOR: an oversize check that parsed first would report a decode error.
        let junk = vec![0xffu8; MAX_ADVERT_BYTES + 1];
        assert!(matches!(
            decode::<Advert>(&junk, MAX_ADVERT_BYTES),
            Err(CodecError::Oversize { .. })
        ));
        // Within the count limits, but over the byte limit.
        let mut big = advert();
        big.models[0].domains = vec!["d".repeat(MAX_DOMAIN_LEN); MAX_DOMAINS];
        big.models = vec![big.models[0].clone(); MAX_MODELS];
        assert_eq!(big.validate(), Ok(()));
        assert!(matches!(encode_msg(&big), Err(CodecError::Oversize { .. })));
        let bytes = encode(&big).expect("encode");
        assert!(matches!(
            decode::<Advert>(&bytes, MAX_ADVERT_BYTES),
            Err(CodecError::Oversize { .. })
        ));
    }

    #[test]
    fn wrong_version_is_reported_as_such() {
        #[derive(Serialize)]
        struct Future {
            v: u16,
            body: &'static str,
        }
        let mut bytes = Vec::new();
        ciborium::into_writer(
            &Future {
                v: 2,
                body: "a shape nobody knows",
            },
            &mut bytes,
        )
        .expect("write");
        match decode::<Advert>(&bytes, MAX_ADVERT_BYTES) {
            Err(CodecError::Version { got: 2, .. }) => {}
            other => panic!("expected a version error, got {other:?}"),
        }
    }

    #[test]
    fn invalid_fields_and_trailing_bytes_are_rejected() {
        let mut bad = advert();
        bad.capacity.cpu_load = 7.0;
        let bytes = encode(&bad).expect("encode");
        assert!(matches!(
            decode::<Advert>(&bytes, MAX_ADVERT_BYTES),
            Err(CodecError::Invalid(_))
        ));
        let mut bytes = encode(&advert()).expect("encode");
        bytes.push(0);
        assert!(matches!(
            decode::<Advert>(&bytes, MAX_ADVERT_BYTES),
            Err(CodecError::TrailingBytes { extra: 1 })
        ));
        // A valid message of another type is a shape error, not a panic.
        let bytes = encode(&vote_request()).expect("encode");
        assert!(decode::<Advert>(&bytes, MAX_REQUEST_BYTES).is_err());
    }

    /// SplitMix64: a tiny seeded generator so the fuzz cases are reproducible without deps.
    struct Mix(u64);
    impl Mix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    fn decode_all(bytes: &[u8]) {
        // Only "does not panic" matters here; results are discarded on purpose.
        let _ = decode_msg::<Advert>(bytes);
        let _ = decode_msg::<VoteRequest>(bytes);
        let _ = decode_msg::<VoteReply>(bytes);
        let _ = decode_msg::<QueryRequest>(bytes);
        let _ = decode_msg::<QueryReply>(bytes);
        let _ = decode_msg::<EscalateRequest>(bytes);
        let _ = decode_msg::<EscalateReply>(bytes);
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Mix(0x5eed);
        // Random bytes of many lengths, some starting like a CBOR map so parsing gets deeper.
        for len in (0..512).chain([1000, 4096, 9000]) {
            for _ in 0..4 {
                let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if len > 0 && rng.next().is_multiple_of(2) {
                    bytes[0] = 0xa2;
                }
                decode_all(&bytes);
            }
        }
        // Truncations and bit flips of valid encodings.
        let valid = [
            encode(&advert()).expect("enc"),
            encode(&vote_request()).expect("enc"),
            encode(&escalate_request()).expect("enc"),
            encode(&query_request()).expect("enc"),
        ];
        for v in &valid {
            for cut in 0..v.len() {
                decode_all(&v[..cut]);
            }
            for _ in 0..2000 {
                let mut b = v.clone();
                let flips = 1 + rng.next() % 3;
                for _ in 0..flips {
                    let i = (rng.next() as usize) % b.len();
                    b[i] ^= 1 << (rng.next() % 8);
                }
                decode_all(&b);
            }
        }
        // Deep nesting must hit ciborium's recursion limit, not the stack.
        let deep = vec![0x81u8; 100_000];
        decode_all(&deep);
    }

    #[test]
    fn escalate_frames_round_trip_and_oversized_pieces_are_refused() {
        let piece = EscalateFrame::Piece("Hé".repeat(10));
        let bytes = encode_msg(&piece).expect("encode");
        assert_eq!(decode_msg::<EscalateFrame>(&bytes).expect("decode"), piece);
        let end = EscalateFrame::End(EscalateReply::Ok(EscalateResponse {
            id: 9,
            text: "B".into(),
            model: "cloud".into(),
            cloud_ms: 12,
            gateway: "12D3KooWAbc".into(),
        }));
        let bytes = encode_msg(&end).expect("encode");
        assert_eq!(decode_msg::<EscalateFrame>(&bytes).expect("decode"), end);
        let big = EscalateFrame::Piece("x".repeat(MAX_PIECE_BYTES + 1));
        let bytes = encode(&big).expect("encode");
        assert!(matches!(
            decode_msg::<EscalateFrame>(&bytes),
            Err(CodecError::Invalid(ValidationError::TooLong {
                field: "piece",
                ..
            }))
        ));
    }
}
