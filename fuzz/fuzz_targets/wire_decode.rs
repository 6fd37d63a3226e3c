//! Every message a peer can send us, decoded from the same arbitrary bytes: the
//! gossiped advert and revocation list, the vote / query / escalate requests and
//! replies, the admission handshake, certificates and join tokens (bytes and text).
//!
//! Properties: no panic; a message that decodes is valid and within its size limit
//! (the limit is checked before parsing); re-encoding a decoded message and decoding
//! that again gives the same bytes (encode ∘ decode is a fixed point after one round).
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_node::network::auth::{AuthHello, AuthReply};
use swarm_protocol::{
    decode, decode_msg, encode, Admission, Advert, Certificate, EscalateReply, EscalateRequest, JoinToken,
    QueryReply, QueryRequest, Revocations, SwarmKey, VoteReply, VoteRequest, WireMessage,
};

fn wire<T: WireMessage>(bytes: &[u8]) {
    let Ok(msg) = decode_msg::<T>(bytes) else {
        return;
    };
    assert!(
        bytes.len() <= T::MAX_BYTES,
        "accepted {} bytes over the limit",
        bytes.len()
    );
    assert!(msg.validate().is_ok(), "decoded message fails validation");
    // Re-encoding may legitimately grow (defaulted fields written out), so the
    // round trip is checked without the wire limit.
    let once = encode(&msg).expect("a decoded message re-encodes");
    let back: T = decode(&once, usize::MAX).expect("a re-encoded message decodes");
    assert_eq!(
        encode(&back).expect("encode again"),
        once,
        "encode/decode is not stable"
    );
}

/// A fixed trust root, so certificates and lists go through signature checks too.
fn admission() -> Admission {
    Admission::new(SwarmKey::from_seed([7; 32]).id())
}

fn admission_bytes(bytes: &[u8]) {
    if let Ok(c) = Certificate::from_bytes(bytes) {
        assert_eq!(Certificate::from_bytes(&c.to_bytes()).ok(), Some(c.clone()));
        let _ = admission().verify(&c, &c.peer, c.issued_ms);
    }
    if let Ok(r) = Revocations::from_bytes(bytes) {
        assert_eq!(Revocations::from_bytes(&r.to_bytes()).ok(), Some(r.clone()));
        let mut adm = admission();
        let _ = r.verify(&adm.swarm());
        let _ = adm.apply_revocations(r);
    }
    if let Ok(t) = JoinToken::from_bytes(bytes) {
        assert_eq!(JoinToken::from_bytes(&t.to_bytes()).ok(), Some(t));
    }
}

fn admission_text(text: &str) {
    if let Ok(c) = Certificate::from_text(text) {
        assert_eq!(Certificate::from_text(&c.to_text()).ok(), Some(c));
    }
    if let Ok(r) = Revocations::from_text(text) {
        assert_eq!(Revocations::from_text(&r.to_text()).ok(), Some(r));
    }
    if let Ok(t) = JoinToken::from_text(text) {
        assert_eq!(JoinToken::from_text(&t.to_text()).ok(), Some(t));
    }
    let _ = SwarmKey::from_text(text);
    let _ = text.parse::<swarm_protocol::SwarmId>();
}

fuzz_target!(|bytes: &[u8]| {
    wire::<Advert>(bytes);
    wire::<VoteRequest>(bytes);
    wire::<VoteReply>(bytes);
    wire::<QueryRequest>(bytes);
    wire::<QueryReply>(bytes);
    wire::<EscalateRequest>(bytes);
    wire::<EscalateReply>(bytes);
    wire::<AuthHello>(bytes);
    wire::<AuthReply>(bytes);
    admission_bytes(bytes);
    if let Ok(text) = std::str::from_utf8(bytes) {
        admission_text(text);
    }
});
