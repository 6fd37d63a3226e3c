//! Wire messages and pure, sans-IO state machines of the slm-swarm protocol.
//!
//! No async runtime, no networking: time comes in as `now_ms`, peers are named by their
//! base58 libp2p `PeerId` text, and every decision (membership, gateway election, vote tally,
//! routing) is a plain function or state machine that tests and the simulator drive directly.

pub mod admission;
pub mod codec;
pub mod election;
pub mod limits;
pub mod membership;
pub mod message;
pub mod peers;
pub mod policy;
pub mod query;
pub mod task;
pub mod text;
pub mod vote;

pub use admission::{
    Admission, AdmissionError, Certificate, JoinToken, Revocations, Revoked, Role, SwarmId, SwarmKey,
};
pub use codec::{decode, decode_msg, encode, encode_msg, CodecError, WireMessage};
pub use election::{
    capacity_score, rank_cmp, Candidate, Candidates, ChangeReason, Election, ElectionConfig, GatewayChange,
};
pub use message::*;
pub use peers::{PeerEntry, PeerEvent, PeerTable};
pub use policy::{
    decide_after_vote, decide_first, local_is_final, AfterVote, DegradedReason, Privacy, Route, RouteInputs,
    RouteOverride, Thresholds,
};
pub use task::detect_task;
pub use text::{clip, clip_owned};
pub use vote::{
    cluster_free, free_outcome, free_vote, normalize, select_voters, select_voters_spread, squad_normalize,
    vote_weight, Ballot, FreeCluster, FreeVote, VoteOutcome, VoteTally, VoterCandidate,
};
