//! Property tests (proptest) of everything the protocol crate decodes from peers and
//! users: the wire codec, admission documents, task detection and answer
//! normalisation. The same entry points have cargo-fuzz targets in `fuzz/`; these
//! run with bounded case counts in the normal test suite, on stable.
//!
//! Also keeps the fuzz seed corpus of `wire_decode` honest: every committed seed
//! must still decode (`SLM_SWARM_WRITE_FUZZ_SEEDS=1` rewrites them).

use proptest::collection::vec;
use proptest::prelude::*;
use swarm_protocol::codec::{MAX_ADVERT_BYTES, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES};
use swarm_protocol::message::*;
use swarm_protocol::{
    clip_owned, decode, decode_msg, detect_task, encode, encode_msg, normalize, squad_normalize, Certificate,
    CodecError, JoinToken, Revocations, Revoked, Role, SwarmKey, WireMessage,
};

fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Shrunk failures are reported in the test output; CI clones start clean anyway.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any text (all of Unicode) of at most `max` bytes.
fn text(max: usize) -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..=max.min(64)).prop_map(move |c| clip_owned(c.into_iter().collect(), max))
}

fn id(max: usize) -> impl Strategy<Value = String> {
    text(max).prop_map(|s| if s.is_empty() { "x".to_string() } else { s })
}

fn unit() -> impl Strategy<Value = f32> {
    0.0f32..=1.0
}

fn messages() -> impl Strategy<Value = Vec<ChatMessage>> {
    vec(
        (id(MAX_ROLE_LEN), text(512)).prop_map(|(role, content)| ChatMessage { role, content }),
        1..6,
    )
}

fn task() -> impl Strategy<Value = Task> {
    prop_oneof![
        Just(Task::Short),
        Just(Task::Free),
        vec(text(MAX_CHOICE_TEXT_LEN), 2..=MAX_CHOICES).prop_map(|texts| Task::Mcq {
            choices: texts
                .into_iter()
                .enumerate()
                .map(|(i, text)| Choice {
                    label: ((b'A' + i as u8) as char).to_string(),
                    text,
                })
                .collect(),
        }),
        (1..=8usize).prop_map(|n| Task::Label {
            labels: (0..n).map(|i| format!("label{i}")).collect(),
        }),
    ]
}

fn wire_error() -> impl Strategy<Value = WireError> {
    (
        prop_oneof![
            Just(ErrorCode::Overloaded),
            Just(ErrorCode::NoModel),
            Just(ErrorCode::BadRequest),
            Just(ErrorCode::Timeout),
            Just(ErrorCode::Internal),
            Just(ErrorCode::Unauthorized),
        ],
        text(MAX_ERROR_LEN),
    )
        .prop_map(|(code, message)| WireError { code, message })
}

fn cert(peer: String) -> Certificate {
    SwarmKey::from_seed([7; 32])
        .invite(&peer, Role::Member, 1_000, 2_000, 5)
        .expect("invite")
}

fn advert() -> impl Strategy<Value = Advert> {
    let card = (
        id(MAX_MODEL_ID_LEN),
        text(MAX_MODEL_ID_LEN),
        any::<u64>(),
        any::<u32>(),
        vec(text(MAX_DOMAIN_LEN), 0..=MAX_DOMAINS),
        0.0f32..1.0e6,
    )
        .prop_map(|(id, arch, params, ctx, domains, tok_s)| ModelCard {
            id,
            quant: arch.clone(),
            arch,
            params,
            ctx,
            domains,
            tok_s,
            sha256: String::new(),
            version: String::new(),
        });
    (
        id(MAX_PEER_ID_LEN),
        any::<u64>(),
        text(MAX_NAME_LEN),
        vec(text(MAX_ADDR_LEN), 0..4),
        vec(card, 0..4),
        (any::<u32>(), unit(), any::<u64>(), any::<u32>(), any::<u32>()),
        proptest::option::of((any::<bool>(), any::<u32>(), any::<i32>())),
        proptest::option::of((1..=swarm_protocol::limits::MAX_TERM, any::<u64>())),
        any::<bool>(),
    )
        .prop_map(
            |(peer, seq, name, addrs, models, cap, cloud, gw, with_cert)| Advert {
                cert: with_cert.then(|| cert(peer.clone())),
                teams: Vec::new(),
                peer,
                seq,
                name,
                version: "0.1.0".into(),
                addrs,
                models,
                capacity: Capacity {
                    cores: cap.0,
                    cpu_load: cap.1,
                    mem_free_mb: cap.2,
                    queue: cap.3,
                    max_concurrency: cap.4,
                },
                cloud: cloud.map(|(reachable, budget_left, priority)| CloudStatus {
                    reachable,
                    budget_left,
                    priority,
                }),
                gateway: gw.map(|(term, since_ms)| GatewayClaim { term, since_ms }),
                sent_ms: seq,
            },
        )
}

fn vote_request() -> impl Strategy<Value = VoteRequest> {
    (
        any::<u64>(),
        messages(),
        task(),
        1..=MAX_TOKENS,
        1..=MAX_DEADLINE_MS,
        proptest::option::of(id(MAX_MODEL_ID_LEN)),
    )
        .prop_map(
            |(id, messages, task, max_tokens, deadline_ms, model)| VoteRequest {
                id,
                messages,
                task,
                max_tokens,
                deadline_ms,
                model,
                team: None,
            },
        )
}

fn vote_reply() -> impl Strategy<Value = VoteReply> {
    prop_oneof![
        (
            any::<u64>(),
            text(2048),
            text(64),
            unit(),
            id(MAX_MODEL_ID_LEN),
            any::<u32>()
        )
            .prop_map(
                |(id, answer, normalized, confidence, model, tokens)| VoteReply::Ok(VoteResponse {
                    id,
                    answer,
                    normalized,
                    confidence,
                    model,
                    tokens,
                    elapsed_ms: tokens,
                    model_version: String::new(),
                })
            ),
        wire_error().prop_map(VoteReply::Err),
    ]
}

fn query_request() -> impl Strategy<Value = QueryRequest> {
    (
        any::<u64>(),
        id(MAX_MODEL_ID_LEN),
        messages(),
        1..=MAX_TOKENS,
        0.0f32..=MAX_TEMPERATURE,
        proptest::option::of(any::<u64>()),
        vec(id(MAX_STOP_LEN), 0..=MAX_STOP),
        any::<bool>(),
    )
        .prop_map(
            |(id, model, messages, max_tokens, temperature, seed, stop, logprobs)| QueryRequest {
                id,
                model,
                messages,
                max_tokens,
                temperature,
                seed,
                stop,
                logprobs,
                deadline_ms: 5_000,
                task: None,
                team: None,
            },
        )
}

fn query_reply() -> impl Strategy<Value = QueryReply> {
    prop_oneof![
        (
            any::<u64>(),
            text(4096),
            id(MAX_MODEL_ID_LEN),
            unit(),
            -1.0e6f32..=0.0,
            unit()
        )
            .prop_map(
                |(id, text, model, confidence, mean_logprob, min_prob)| QueryReply::Ok(QueryResponse {
                    id,
                    text,
                    model,
                    confidence,
                    mean_logprob,
                    min_prob,
                    prompt_tokens: 3,
                    completion_tokens: 4,
                    finish_reason: "stop".into(),
                    elapsed_ms: 5,
                })
            ),
        wire_error().prop_map(QueryReply::Err),
    ]
}

fn escalate_request() -> impl Strategy<Value = EscalateRequest> {
    let voter = (
        id(MAX_PEER_ID_LEN),
        text(MAX_MODEL_ID_LEN),
        text(256),
        unit(),
        proptest::option::of(text(64)),
    )
        .prop_map(|(peer, model, answer, confidence, error)| VoterRecord {
            peer,
            model,
            answer,
            confidence,
            elapsed_ms: 10,
            error,
            model_version: String::new(),
        });
    (any::<u64>(), messages(), task(), 1..=MAX_TOKENS, vec(voter, 0..5)).prop_map(
        |(id, messages, task, max_tokens, swarm_answers)| EscalateRequest {
            id,
            messages,
            task,
            max_tokens,
            swarm_answers,
            deadline_ms: 30_000,
        },
    )
}

fn escalate_reply() -> impl Strategy<Value = EscalateReply> {
    prop_oneof![
        (
            any::<u64>(),
            text(4096),
            id(MAX_MODEL_ID_LEN),
            id(MAX_PEER_ID_LEN)
        )
            .prop_map(|(id, text, model, gateway)| EscalateReply::Ok(EscalateResponse {
                id,
                text,
                model,
                cloud_ms: 9,
                gateway,
            })),
        wire_error().prop_map(EscalateReply::Err),
    ]
}

/// A valid message round-trips exactly; its encoding is within the type's limit
/// (or `encode_msg` refuses it, and then a receiver would too).
fn round_trips<T: WireMessage + PartialEq + std::fmt::Debug>(m: &T) -> Result<(), TestCaseError> {
    prop_assert_eq!(m.validate(), Ok(()));
    let raw = encode(m).expect("encode");
    match encode_msg(m) {
        Ok(bytes) => {
            prop_assert!(bytes.len() <= T::MAX_BYTES);
            prop_assert_eq!(&decode_msg::<T>(&bytes).expect("decode"), m);
        }
        Err(CodecError::Oversize { len, max }) => {
            prop_assert_eq!((len, max), (raw.len(), T::MAX_BYTES));
            let refused = matches!(decode_msg::<T>(&raw), Err(CodecError::Oversize { .. }));
            prop_assert!(refused);
        }
        Err(e) => return Err(TestCaseError::fail(format!("encode_msg: {e}"))),
    }
    Ok(())
}

/// Whatever decodes is valid, within its limit, and stable under re-encoding.
fn decodes_sanely<T: WireMessage>(bytes: &[u8]) -> Result<(), TestCaseError> {
    match decode_msg::<T>(bytes) {
        Ok(m) => {
            prop_assert!(bytes.len() <= T::MAX_BYTES);
            prop_assert_eq!(m.validate(), Ok(()));
            let once = encode(&m).expect("encode");
            let back: T = decode(&once, usize::MAX).expect("re-decode");
            prop_assert_eq!(encode(&back).expect("encode"), once);
        }
        Err(CodecError::Oversize { len, max }) => prop_assert!(len > max && max == T::MAX_BYTES),
        Err(_) => {}
    }
    Ok(())
}

fn decode_everything(bytes: &[u8]) -> Result<(), TestCaseError> {
    decodes_sanely::<Advert>(bytes)?;
    decodes_sanely::<VoteRequest>(bytes)?;
    decodes_sanely::<VoteReply>(bytes)?;
    decodes_sanely::<QueryRequest>(bytes)?;
    decodes_sanely::<QueryReply>(bytes)?;
    decodes_sanely::<EscalateRequest>(bytes)?;
    decodes_sanely::<EscalateReply>(bytes)?;
    if let Ok(c) = Certificate::from_bytes(bytes) {
        prop_assert_eq!(Certificate::from_bytes(&c.to_bytes()).ok(), Some(c));
    }
    if let Ok(r) = Revocations::from_bytes(bytes) {
        prop_assert_eq!(Revocations::from_bytes(&r.to_bytes()).ok(), Some(r));
    }
    if let Ok(t) = JoinToken::from_bytes(bytes) {
        prop_assert_eq!(JoinToken::from_bytes(&t.to_bytes()).ok(), Some(t));
    }
    Ok(())
}

/// One encoded example of each message kind (also the `wire_decode` fuzz seeds).
fn examples() -> Vec<(&'static str, Vec<u8>)> {
    let key = SwarmKey::from_seed([7; 32]);
    let msgs = vec![ChatMessage {
        role: "user".into(),
        content: "Which is a mammal? A. shark B. dolphin".into(),
    }];
    let mcq = detect_task(&msgs[0].content);
    let advert = Advert {
        peer: "12D3KooWSeed".into(),
        seq: 3,
        name: "n1".into(),
        version: "0.1.0".into(),
        addrs: vec!["/ip4/127.0.0.1/udp/4001/quic-v1".into()],
        models: vec![ModelCard {
            id: "smollm2-135m".into(),
            arch: "llama".into(),
            params: 135_000_000,
            quant: "Q4_1".into(),
            ctx: 2048,
            domains: vec!["general".into()],
            tok_s: 40.5,
            sha256: String::new(),
            version: String::new(),
        }],
        capacity: Capacity {
            cores: 2,
            cpu_load: 0.25,
            mem_free_mb: 1024,
            queue: 0,
            max_concurrency: 2,
        },
        cloud: Some(CloudStatus {
            reachable: true,
            budget_left: 10,
            priority: 1,
        }),
        gateway: Some(GatewayClaim { term: 2, since_ms: 5 }),
        sent_ms: 7,
        cert: Some(key.invite("12D3KooWSeed", Role::Cloud, 1, 2, 3).expect("cert")),
        teams: Vec::new(),
    };
    let err = WireError {
        code: ErrorCode::Overloaded,
        message: "queue full".into(),
    };
    let revoked = key
        .sign_revocations(
            2,
            vec![Revoked::Serial(3), Revoked::Peer("12D3KooWGone".into())],
            9,
        )
        .expect("list");
    let token = JoinToken::new(key.id(), vec!["/ip4/127.0.0.1/udp/4001/quic-v1".into()]).expect("token");
    let enc = |r: Result<Vec<u8>, CodecError>| r.expect("encode");
    vec![
        ("advert.cbor", enc(encode_msg(&advert))),
        (
            "vote-request.cbor",
            enc(encode_msg(&VoteRequest {
                id: 1,
                messages: msgs.clone(),
                task: mcq.clone(),
                max_tokens: 8,
                deadline_ms: 2_000,
                model: Some("smollm2-135m".into()),
                team: None,
            })),
        ),
        (
            "vote-reply.cbor",
            enc(encode_msg(&VoteReply::Ok(VoteResponse {
                id: 1,
                answer: "B".into(),
                normalized: "B".into(),
                confidence: 0.75,
                model: "smollm2-135m".into(),
                tokens: 1,
                elapsed_ms: 20,
                model_version: String::new(),
            }))),
        ),
        ("vote-error.cbor", enc(encode_msg(&VoteReply::Err(err.clone())))),
        (
            "query-request.cbor",
            enc(encode_msg(&QueryRequest {
                id: 2,
                model: "smollm2-135m".into(),
                messages: msgs.clone(),
                max_tokens: 16,
                temperature: 0.5,
                seed: Some(1),
                stop: vec!["\n".into()],
                logprobs: true,
                deadline_ms: 2_000,
                task: None,
                team: None,
            })),
        ),
        (
            "query-reply.cbor",
            enc(encode_msg(&QueryReply::Ok(QueryResponse {
                id: 2,
                text: "dolphin".into(),
                model: "smollm2-135m".into(),
                confidence: 0.5,
                mean_logprob: -0.5,
                min_prob: 0.25,
                prompt_tokens: 9,
                completion_tokens: 2,
                finish_reason: "stop".into(),
                elapsed_ms: 30,
            }))),
        ),
        (
            "escalate-request.cbor",
            enc(encode_msg(&EscalateRequest {
                id: 3,
                messages: msgs,
                task: Task::Label {
                    labels: vec!["yes".into(), "no".into()],
                },
                max_tokens: 32,
                swarm_answers: vec![VoterRecord {
                    peer: "p1".into(),
                    model: "m1".into(),
                    answer: "yes".into(),
                    confidence: 0.5,
                    elapsed_ms: 100,
                    error: Some("late".into()),
                    model_version: String::new(),
                }],
                deadline_ms: 9_000,
            })),
        ),
        (
            "escalate-reply.cbor",
            enc(encode_msg(&EscalateReply::Ok(EscalateResponse {
                id: 3,
                text: "yes".into(),
                model: "cloud".into(),
                cloud_ms: 300,
                gateway: "12D3KooWGw".into(),
            }))),
        ),
        ("escalate-error.cbor", enc(encode_msg(&EscalateReply::Err(err)))),
        (
            "certificate.cbor",
            key.invite("12D3KooWSeed", Role::Member, 1, 2, 3)
                .expect("cert")
                .to_bytes(),
        ),
        ("revocations.cbor", revoked.to_bytes()),
        ("join-token.cbor", token.to_bytes()),
        ("join-token.txt", token.to_text().into_bytes()),
        ("revocations.txt", revoked.to_text().into_bytes()),
    ]
}

/// Does `bytes` parse as anything a peer or user may send?
fn parses_as_something(bytes: &[u8]) -> bool {
    let text = std::str::from_utf8(bytes).unwrap_or("");
    decode_msg::<Advert>(bytes).is_ok()
        || decode_msg::<VoteRequest>(bytes).is_ok()
        || decode_msg::<VoteReply>(bytes).is_ok()
        || decode_msg::<QueryRequest>(bytes).is_ok()
        || decode_msg::<QueryReply>(bytes).is_ok()
        || decode_msg::<EscalateRequest>(bytes).is_ok()
        || decode_msg::<EscalateReply>(bytes).is_ok()
        || Certificate::from_bytes(bytes).is_ok()
        || Revocations::from_bytes(bytes).is_ok()
        || JoinToken::from_bytes(bytes).is_ok()
        || JoinToken::from_text(text).is_ok()
        || Revocations::from_text(text).is_ok()
}

#[test]
fn fuzz_seeds_still_decode() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/wire_decode");
    if std::env::var_os("SLM_SWARM_WRITE_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).expect("seed dir");
        for (name, bytes) in examples() {
            std::fs::write(dir.join(name), bytes).expect("write seed");
        }
    }
    for (name, bytes) in examples() {
        assert!(parses_as_something(&bytes), "example {name}");
    }
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return; // a checkout without fuzz/ (the crate published alone)
    };
    for e in entries {
        let path = e.expect("entry").path();
        let bytes = std::fs::read(&path).expect("seed");
        assert!(
            parses_as_something(&bytes),
            "{} no longer decodes: rerun with SLM_SWARM_WRITE_FUZZ_SEEDS=1",
            path.display()
        );
    }
}

proptest! {
    #![proptest_config(cfg(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..2048)) {
        decode_everything(&bytes)?;
    }

    #[test]
    fn mutated_examples_never_panic(
        pick in any::<prop::sample::Index>(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let ex = examples();
        let mut bytes = ex[pick.index(ex.len())].1.clone();
        for (at, byte, op) in edits {
            let i = at.index(bytes.len().max(1));
            match op {
                0 if i < bytes.len() => bytes[i] = byte,
                1 if i < bytes.len() => bytes[i] ^= 1 << (byte % 8),
                2 => bytes.insert(i.min(bytes.len()), byte),
                _ if i < bytes.len() => { bytes.remove(i); }
                _ => {}
            }
        }
        let end = cut.index(bytes.len() + 1);
        decode_everything(&bytes)?;
        decode_everything(&bytes[..end])?;
    }

    #[test]
    fn oversize_is_refused_whatever_it_holds(extra in 1usize..64, fill in any::<u8>()) {
        for max in [MAX_ADVERT_BYTES, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES] {
            let bytes = vec![fill; max + extra];
            let refused = matches!(decode::<Advert>(&bytes, max), Err(CodecError::Oversize { .. }));
            prop_assert!(refused);
        }
    }
}

proptest! {
    #![proptest_config(cfg(64))]

    #[test]
    fn valid_messages_round_trip(
        a in advert(),
        vq in vote_request(),
        vr in vote_reply(),
        qq in query_request(),
        qr in query_reply(),
        eq in escalate_request(),
        er in escalate_reply(),
    ) {
        round_trips(&a)?;
        round_trips(&vq)?;
        round_trips(&vr)?;
        round_trips(&qq)?;
        round_trips(&qr)?;
        round_trips(&eq)?;
        round_trips(&er)?;
    }

    #[test]
    fn admission_documents_round_trip(peer in id(swarm_protocol::limits::MAX_PEER_ID_LEN), serial in any::<u64>()) {
        let key = SwarmKey::from_seed([9; 32]);
        let c = key.invite(&peer, Role::Member, 10, 20, serial).expect("invite");
        prop_assert_eq!(Certificate::from_text(&c.to_text()).ok(), Some(c));
        let r = key.sign_revocations(serial, vec![Revoked::Peer(peer)], 5).expect("sign");
        prop_assert_eq!(Revocations::from_text(&r.to_text()).ok(), Some(r.clone()));
        prop_assert!(r.verify(&key.id()).is_ok());
    }

    #[test]
    fn admission_text_never_panics(s in "(slmswarm1:|slmcert1:|slmrevoke1:|slmswarmkey1:)?[A-Za-z0-9_=-]{0,300}") {
        let _ = JoinToken::from_text(&s);
        let _ = Certificate::from_text(&s);
        let _ = Revocations::from_text(&s);
        let _ = SwarmKey::from_text(&s);
    }
}

/// Option texts, short or up to twice the wire limit on a choice.
fn option_text() -> impl Strategy<Value = String> {
    prop_oneof![
        text(64),
        (any::<char>(), 0..2 * MAX_CHOICE_TEXT_LEN)
            .prop_map(|(c, n)| format!("x{}", c.to_string().repeat(n))),
    ]
}

/// Prompts that look like multiple choice, with options of any length and text around.
fn mcq_like() -> impl Strategy<Value = String> {
    (
        text(200),
        vec(
            (
                prop_oneof![Just("A. "), Just("B) "), Just("(C) "), Just("D. "), Just("A) ")],
                option_text(),
            ),
            0..6,
        ),
        any::<bool>(),
    )
        .prop_map(|(head, opts, inline)| {
            let sep = if inline { " " } else { "\n" };
            let mut s = head;
            for (marker, t) in opts {
                s.push_str(sep);
                s.push_str(marker);
                s.push_str(&t);
            }
            s
        })
}

proptest! {
    #![proptest_config(cfg(256))]

    #[test]
    fn detected_tasks_are_deterministic_and_valid(prompt in prop_oneof![text(4096), mcq_like()]) {
        let t = detect_task(&prompt);
        prop_assert_eq!(&t, &detect_task(&prompt));
        prop_assert_eq!(t.validate(), Ok(()), "{:?}", t);
    }

    #[test]
    fn normalized_answers_are_labels_of_the_task(t in task(), raw in prop_oneof![text(300), "(The answer is |Answer: |option )?[A-Pa-p][.)]? ?[a-z ]{0,20}"]) {
        let n = normalize(&t, &raw);
        prop_assert_eq!(&n, &normalize(&t, &raw));
        if let Some(n) = n {
            match &t {
                Task::Mcq { choices } => prop_assert!(choices.iter().any(|c| c.label == n)),
                Task::Label { labels } => prop_assert!(labels.contains(&n)),
                Task::Short => prop_assert_eq!(n, squad_normalize(&raw)),
                Task::Free => prop_assert_eq!(n.as_str(), raw.trim()),
            }
        }
    }
}
