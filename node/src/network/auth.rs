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
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use libp2p::identity::Keypair;
    use swarm_protocol::{decode_msg, encode_msg, Role, SwarmKey, Task, VoteReply, VoteRequest};
    use tokio::sync::mpsc;

    use crate::network::{spawn, Limits, NetConfig, NetEvent, NetworkHandle, TransportKind};

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
        // Oversize certificates are refused when decoded.
        let big = AuthHello {
            cert: vec![0; MAX_CERT_BYTES + 1],
            revocations: 0,
        };
        let bytes = swarm_protocol::encode(&big).expect("encode");
        assert!(decode_msg::<AuthHello>(&bytes).is_err());
    }

    fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn net_cfg(ns: &str, admission: Option<AdmissionSetup>) -> NetConfig {
        NetConfig {
            namespace: ns.into(),
            listen: vec!["/memory/0".parse().expect("addr")],
            bootstrap: Vec::new(),
            mdns: false,
            transport: TransportKind::Memory,
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            heartbeat: Duration::from_millis(200),
            target_peers: 0,
            limits: Limits::default(),
            peers_file: None,
            admission,
        }
    }

    /// A network for a fresh identity holding a certificate signed by `issuer`,
    /// trusting `trusted`'s swarm.
    fn node(ns: &str, trusted: &SwarmKey, issuer: &SwarmKey) -> (NetworkHandle, mpsc::Receiver<NetEvent>) {
        let key = Keypair::generate_ed25519();
        let me = key.public().to_peer_id().to_string();
        let now = now_ms();
        let setup = AdmissionSetup {
            token: JoinToken::new(trusted.id(), Vec::new()).expect("token"),
            cert: issuer
                .invite(&me, Role::Member, now, now + 3_600_000, 1)
                .expect("cert"),
            revocations: None,
        };
        spawn(key, net_cfg(ns, Some(setup))).expect("spawn")
    }

    fn vote() -> VoteRequest {
        VoteRequest {
            id: 1,
            messages: vec![swarm_protocol::ChatMessage {
                role: "user".into(),
                content: "2+2?".into(),
            }],
            task: Task::Short,
            max_tokens: 4,
            deadline_ms: 1000,
            model: None,
            team: None,
        }
    }

    /// Waits for the first event `f` picks out (other events are skipped).
    async fn wait_event<T>(rx: &mut mpsc::Receiver<NetEvent>, mut f: impl FnMut(NetEvent) -> Option<T>) -> T {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let ev = rx.recv().await.expect("network running");
                if let Some(t) = f(ev) {
                    return t;
                }
            }
        })
        .await
        .expect("event in time")
    }

    async fn addr_of(h: &NetworkHandle) -> libp2p::Multiaddr {
        for _ in 0..200 {
            if let Some(a) = h.listen_addrs().await.expect("addrs").first() {
                return a.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no listen address");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_are_admitted_and_another_swarms_certificate_is_refused() {
        let ns = "auth-unit";
        let swarm = SwarmKey::from_seed([7; 32]);
        let other = SwarmKey::from_seed([8; 32]);
        let (a, mut a_ev) = node(ns, &swarm, &swarm);
        let a_addr = addr_of(&a).await;
        let a_id = a.local_peer_id();

        // A member: admitted both ways, and its vote reaches a's node.
        let (m, _m_ev) = node(ns, &swarm, &swarm);
        let m_id = m.local_peer_id();
        m.dial(a_addr.clone()).await.expect("dial");
        let role = wait_event(&mut a_ev, |ev| match ev {
            NetEvent::Admitted { peer, role } if peer == m_id => Some(role),
            _ => None,
        })
        .await;
        assert_eq!(role, Role::Member);
        let asked = tokio::spawn(async move { m.vote(a_id, vote(), Duration::from_secs(10)).await });
        wait_event(&mut a_ev, |ev| match ev {
            NetEvent::Vote { peer, .. } if peer == m_id => Some(()),
            _ => None,
        })
        .await;
        asked.abort();

        // A certificate of another swarm: refused with the reason, and nothing of it reaches a's node.
        let (x, _x_ev) = node(ns, &swarm, &other);
        let x_id = x.local_peer_id();
        x.dial(a_addr).await.expect("dial");
        let reason = wait_event(&mut a_ev, |ev| match ev {
            NetEvent::Refused { peer, reason } if peer == x_id => Some(reason),
            NetEvent::Vote { peer, .. } | NetEvent::Admitted { peer, .. } if peer == x_id => {
                panic!("a peer of another swarm got through")
            }
            _ => None,
        })
        .await;
        assert!(reason.contains("another swarm"), "{reason}");
        let r = x.vote(a_id, vote(), Duration::from_secs(10)).await;
        assert!(
            !matches!(r, Ok(VoteReply::Ok(_))),
            "a refused peer's vote was answered: {r:?}"
        );
        while let Ok(ev) = a_ev.try_recv() {
            if let NetEvent::Vote { peer, .. } | NetEvent::Admitted { peer, .. } = ev {
                assert_ne!(peer, x_id, "a refused peer got through");
            }
        }
    }
}
