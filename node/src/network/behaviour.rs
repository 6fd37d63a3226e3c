//! The composed libp2p behaviour: a block list (refused peers), connection
//! limits, gossipsub for adverts (and revocation lists in keyed swarms), mDNS,
//! identify, ping, the admission handshake (keyed swarms only) and three
//! request-response protocols (query, vote, escalate) with bounded concurrent
//! streams, raw streams for the streamed escalation relay, all named with the swarm's namespace so two swarms on one LAN never mix.

use std::hash::{Hash, Hasher};
use std::time::Duration;

use libp2p::allow_block_list::{self, BlockedPeers};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{connection_limits, gossipsub, identify, mdns, ping, StreamProtocol};
use swarm_protocol::admission::MAX_REVOCATIONS_BYTES;
use swarm_protocol::codec::MAX_ADVERT_BYTES;
use swarm_protocol::{EscalateReply, EscalateRequest, QueryReply, QueryRequest, VoteReply, VoteRequest};

use super::auth::{AuthHello, AuthReply};
use super::codec::WireCodec;
use super::{NetConfig, NetError};

pub type QueryCodec = WireCodec<QueryRequest, QueryReply>;
pub type VoteCodec = WireCodec<VoteRequest, VoteReply>;
pub type EscalateCodec = WireCodec<EscalateRequest, EscalateReply>;
pub type AuthCodec = WireCodec<AuthHello, AuthReply>;

/// How long a peer has to complete the admission handshake.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Refused peers: denied before any other behaviour sees their connections.
    pub blocked: allow_block_list::Behaviour<BlockedPeers>,
    /// Then, so a connection over the limits is refused before any other behaviour sees it.
    pub limits: connection_limits::Behaviour,
    pub gossipsub: gossipsub::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub query: request_response::Behaviour<QueryCodec>,
    pub vote: request_response::Behaviour<VoteCodec>,
    pub escalate: request_response::Behaviour<EscalateCodec>,
    /// The admission handshake; off in an open swarm, so a keyed node refuses
    /// an open one (it does not speak the protocol).
    pub auth: Toggle<request_response::Behaviour<AuthCodec>>,
    /// Raw streams: the streamed escalation relay (`relay.rs`).
    pub stream: libp2p_stream::Behaviour,
}

/// identify's protocol version: carries the namespace so foreign swarms can be told apart.
pub fn identify_version(ns: &str) -> String {
    format!("/slm-swarm/{ns}/1.0.0")
}

impl Behaviour {
    pub fn new(key: &Keypair, cfg: &NetConfig) -> Result<Self, NetError> {
        let setup = |e: String| NetError::Setup(e);
        let rev_topic = gossipsub::IdentTopic::new(cfg.revocations_topic()).hash();
        let rev_id_topic = rev_topic.clone();
        let mut gs_builder = gossipsub::ConfigBuilder::default();
        if cfg.admission.is_some() {
            // A full revocation list is far larger than an advert; only this topic gets the room.
            gs_builder.max_transmit_size_for_topic(MAX_REVOCATIONS_BYTES + 1024, rev_topic);
        }
        let gs_cfg = gs_builder
            .heartbeat_interval(cfg.heartbeat)
            .validation_mode(gossipsub::ValidationMode::Strict)
            // The node validates each advert (decode + checks + author == peer)
            // before gossipsub forwards it.
            .validate_messages()
            .max_transmit_size(MAX_ADVERT_BYTES)
            // Adverts are idempotent state: the same bytes twice are one message.
            .message_id_fn(move |m: &gossipsub::Message| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                m.data.hash(&mut h);
                m.source.hash(&mut h);
                // A revocation list is re-published unchanged (for peers that
                // joined later): each publication must be a new message.
                if m.topic == rev_id_topic {
                    m.sequence_number.hash(&mut h);
                }
                gossipsub::MessageId::from(h.finish().to_be_bytes().to_vec())
            })
            .build()
            .map_err(|e| setup(format!("gossipsub config: {e}")))?;
        let gossipsub =
            gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gs_cfg)
                .map_err(|e| setup(format!("gossipsub: {e}")))?;
        let local = key.public().to_peer_id();
        let mdns = if cfg.mdns {
            let m = mdns::tokio::Behaviour::new(
                mdns::Config {
                    query_interval: Duration::from_secs(5),
                    ..Default::default()
                },
                local,
            )
            .map_err(|e| setup(format!("mDNS: {e}")))?;
            Toggle::from(Some(m))
        } else {
            Toggle::from(None)
        };
        let identify = identify::Behaviour::new(
            identify::Config::new(identify_version(&cfg.namespace), key.public())
                .with_agent_version(format!("slm-swarm/{}", env!("CARGO_PKG_VERSION"))),
        );
        let ping = ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5)));
        let rr_cfg = request_response::Config::default()
            .with_request_timeout(cfg.request_timeout)
            .with_max_concurrent_streams(cfg.limits.max_streams.max(1));
        let l = cfg.limits;
        let limits = connection_limits::Behaviour::new(
            connection_limits::ConnectionLimits::default()
                .with_max_established(Some(l.max_connections))
                .with_max_established_incoming(Some(
                    l.max_connections
                        .saturating_sub(u32::try_from(cfg.target_peers).unwrap_or(u32::MAX))
                        .max(1),
                ))
                .with_max_established_per_peer(Some(l.max_connections_per_peer.max(1)))
                .with_max_pending_incoming(Some(l.max_pending.max(1)))
                .with_max_pending_outgoing(Some(l.max_pending.max(1))),
        );
        let proto = |name: &str| -> Result<StreamProtocol, NetError> {
            StreamProtocol::try_from_owned(cfg.protocol(name))
                .map_err(|e| setup(format!("protocol name: {e}")))
        };
        Ok(Self {
            limits,
            gossipsub,
            mdns,
            identify,
            ping,
            query: request_response::Behaviour::with_codec(
                QueryCodec::default(),
                [(proto("query")?, ProtocolSupport::Full)],
                rr_cfg.clone(),
            ),
            vote: request_response::Behaviour::with_codec(
                VoteCodec::default(),
                [(proto("vote")?, ProtocolSupport::Full)],
                rr_cfg.clone(),
            ),
            escalate: request_response::Behaviour::with_codec(
                EscalateCodec::default(),
                [(proto("escalate")?, ProtocolSupport::Full)],
                rr_cfg,
            ),
            auth: Toggle::from(match cfg.admission {
                Some(_) => Some(request_response::Behaviour::with_codec(
                    AuthCodec::default(),
                    [(proto("auth")?, ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(AUTH_TIMEOUT)
                        .with_max_concurrent_streams(4),
                )),
                None => None,
            }),
            blocked: allow_block_list::Behaviour::default(),
            stream: libp2p_stream::Behaviour::new(),
        })
    }
}
