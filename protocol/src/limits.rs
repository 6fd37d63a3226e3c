//! Wire limits shared by the messages and the admission certificates, kept apart so
//! that neither module depends on the other for them.

/// Longest peer id accepted (base58 libp2p PeerIds are ~52 bytes).
pub const MAX_PEER_ID_LEN: usize = 128;
/// Most listen addresses in one advert.
pub const MAX_ADDRS: usize = 16;
/// Longest multiaddr text.
pub const MAX_ADDR_LEN: usize = 256;
/// No honest swarm reaches this gateway term (one election a millisecond for 8,900 years);
/// adverts claiming more are invalid.
pub const MAX_TERM: u64 = 1 << 48;
/// Most teams one peer serves (or one certificate names).
pub const MAX_TEAMS: usize = 16;
/// Longest team name.
pub const MAX_TEAM_LEN: usize = 32;

/// Whether `t` is a team name: 1..=32 of `[A-Za-z0-9_-]`.
pub fn is_team(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= MAX_TEAM_LEN
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
