//! Admission on the wire: the `/slm-swarm/<ns>/auth/1` handshake messages and
//! the setup a keyed node starts with.
//!
//! Right after a connection is established each side sends its certificate
//! ([`AuthHello`]); the receiver checks it against the peer id the transport
//! authenticated and answers with its own. The actor (see `actor.rs`) keeps who
//! is admitted; these types only carry bytes, size-checked before decoding.

use serde::{Deserialize, Serialize};
use swarm_protocol::admission::MAX_CERT_BYTES;
use swarm_protocol::message::{Validate, ValidationError};
use swarm_protocol::{Certificate, JoinToken, Revocations, WireError, WireMessage};

/// What a keyed node needs: the swarm it trusts (token), its own certificate,
/// and the revocation list it starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionSetup {
    pub token: JoinToken,
    pub cert: Certificate,
    pub revocations: Option<Revocations>,
}

/// Handshake request, and the body of a successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthHello {
    /// [`Certificate::to_bytes`] of the sender.
    pub cert: Vec<u8>,
    /// Version of the sender's revocation list (0 = none), so the one with the
    /// newer list knows to pass it on.
    pub revocations: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthReply {
    Ok(AuthHello),
    /// The requester's certificate was refused (the message says why).
    Err(WireError),
}

impl Validate for AuthHello {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.cert.len() > MAX_CERT_BYTES {
            return Err(ValidationError::TooLong {
                field: "auth.cert",
                len: self.cert.len(),
                max: MAX_CERT_BYTES,
            });
        }
        Ok(())
    }
}

impl Validate for AuthReply {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            AuthReply::Ok(h) => h.validate(),
            AuthReply::Err(e) => e.validate(),
        }
    }
}

// CBOR writes a byte vector as an array of small integers (up to 2 bytes each):
// a full-size certificate still fits with room for the envelope.
const MAX_AUTH_BYTES: usize = 3 * MAX_CERT_BYTES;

impl WireMessage for AuthHello {
    const MAX_BYTES: usize = MAX_AUTH_BYTES;
}

impl WireMessage for AuthReply {
    const MAX_BYTES: usize = MAX_AUTH_BYTES + swarm_protocol::message::MAX_ERROR_LEN * 2;
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarm_protocol::{decode_msg, encode_msg, Role, SwarmKey};

    #[test]
    fn a_full_size_hello_round_trips_within_its_limit() {
        let key = SwarmKey::from_seed([3; 32]);
        let peer = "12D3KooWPeerPeerPeerPeerPeerPeerPeerPeerPeerPeerPeer";
        let cert = key.invite(peer, Role::Cloud, 1, 2, u64::MAX).expect("cert");
        let hello = AuthHello {
            cert: cert.to_bytes(),
            revocations: u64::MAX,
        };
        let bytes = encode_msg(&hello).expect("encode");
        assert_eq!(decode_msg::<AuthHello>(&bytes).expect("decode"), hello);
        // Oversize certificates are refused before anything is decoded.
        let big = AuthHello {
            cert: vec![0; MAX_CERT_BYTES + 1],
            revocations: 0,
        };
        assert!(
            encode_msg(&big).is_err()
                || decode_msg::<AuthHello>(&encode_msg(&big).unwrap_or_default()).is_err()
        );
    }
}
