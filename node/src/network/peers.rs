//! Known peers: a bounded address book the network actor dials towards a
//! target degree, with exponential backoff per peer, and a small file of the
//! peers it reached (`peers.json` beside the identity key) so a restarted node
//! rejoins without its bootstrap.
//!
//! Hand-rolled rather than Kademlia or gossipsub peer exchange: adverts already
//! carry every peer's signed listen addresses, so the only missing piece is
//! "dial some of them"; Kademlia would add a second routing table, queries and
//! a protocol to keep in step with the peer table, and gossipsub's PX only
//! sends peer ids (no signed records in rust-libp2p) and only on PRUNE, never
//! when a peer dies. Addresses come from untrusted adverts, so everything here
//! is bounded: addresses per peer, peers in the book, failed dials per peer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::TransportKind;

/// Addresses kept per peer (an advert may list up to `swarm_protocol::MAX_ADDRS`).
pub(crate) const MAX_ADDRS_PER_PEER: usize = 8;
/// Peers kept in the book; the least recently heard of is evicted beyond it.
pub(crate) const MAX_KNOWN_PEERS: usize = 256;
/// Peers written to the peers file (most recently connected first).
pub(crate) const MAX_SAVED_PEERS: usize = 32;
/// A peers file larger than this is not read (it cannot be ours).
const MAX_FILE_BYTES: u64 = 64 * 1024;
/// Consecutive failed dials after which a peer is forgotten until it is heard of again.
const MAX_FAILURES: u32 = 8;
pub(crate) const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum PeersFileError {
    #[error("cannot read {path}: {msg}")]
    Read { path: String, msg: String },
    #[error("{path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: String },
    #[error("{path} is not a peers file: {msg}")]
    Parse { path: String, msg: String },
    #[error("cannot write {path}: {msg}")]
    Write { path: String, msg: String },
}

#[derive(Debug)]
struct Known {
    /// Newest first.
    addrs: Vec<Multiaddr>,
    /// Book clock when last heard of (advert, mDNS, identify, file): eviction order.
    heard: u64,
    /// Book clock of the last established connection; `None` = never reached.
    connected: Option<u64>,
    next_try: Instant,
    backoff: Duration,
    failures: u32,
    dialing: Option<ConnectionId>,
}

/// Bounded set of dialable peers with per-peer backoff.
#[derive(Debug)]
pub(crate) struct PeerBook {
    local: PeerId,
    transport: TransportKind,
    max_peers: usize,
    peers: HashMap<PeerId, Known>,
    /// Logical clock: orders hearing and connecting without reading time.
    clock: u64,
    /// Whether what [`PeerBook::saved`] returns changed since the last `take_dirty`.
    dirty: bool,
}

/// Whether `addr` can be dialled by this transport, without its `/p2p/` suffix;
/// `None` for an address that names another peer, cannot be dialled or relays.
pub(crate) fn dialable(peer: &PeerId, addr: &Multiaddr, transport: TransportKind) -> Option<Multiaddr> {
    let mut out = Multiaddr::empty();
    let (mut udp, mut quic, mut memory) = (false, false, false);
    for p in addr.iter() {
        match p {
            Protocol::P2p(id) => {
                if id != *peer {
                    return None;
                }
                continue;
            }
            Protocol::Ip4(ip) if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() => {
                return None
            }
            Protocol::Ip6(ip) if ip.is_unspecified() || ip.is_multicast() => return None,
            Protocol::Udp(0) => return None,
            Protocol::Udp(_) => udp = true,
            Protocol::QuicV1 => quic = true,
            Protocol::Memory(0) => return None,
            Protocol::Memory(_) => memory = true,
            Protocol::P2pCircuit => return None,
            _ => {}
        }
        out.push(p);
    }
    let ok = match transport {
        TransportKind::Quic => udp && quic,
        TransportKind::Memory => memory,
    };
    ok.then_some(out)
}

impl PeerBook {
    pub(crate) fn new(local: PeerId, transport: TransportKind, max_peers: usize) -> Self {
        Self {
            local,
            transport,
            max_peers: max_peers.max(1),
            peers: HashMap::new(),
            clock: 0,
            dirty: false,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    pub(crate) fn len(&self) -> usize {
        self.peers.len()
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, peer: &PeerId) -> bool {
        self.peers.contains_key(peer)
    }

    /// The addresses kept for `peer`, newest first.
    #[cfg(test)]
    pub(crate) fn addrs(&self, peer: &PeerId) -> &[Multiaddr] {
        self.peers.get(peer).map(|k| k.addrs.as_slice()).unwrap_or(&[])
    }

    /// Learn (or refresh) a peer's addresses; returns the ones kept that are new.
    /// A peer heard of again gets a fresh start (no backoff, no failures).
    pub(crate) fn add(&mut self, peer: PeerId, addrs: &[Multiaddr], now: Instant) -> Vec<Multiaddr> {
        if peer == self.local {
            return Vec::new();
        }
        let clean: Vec<Multiaddr> = addrs
            .iter()
            .filter_map(|a| dialable(&peer, a, self.transport))
            .take(MAX_ADDRS_PER_PEER)
            .collect();
        if clean.is_empty() {
            return Vec::new();
        }
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.max_peers {
            self.evict_one();
        }
        let heard = self.tick();
        let k = self.peers.entry(peer).or_insert_with(|| Known {
            addrs: Vec::new(),
            heard,
            connected: None,
            next_try: now,
            backoff: BACKOFF_MIN,
            failures: 0,
            dialing: None,
        });
        k.heard = heard;
        if k.failures > 0 && k.dialing.is_none() {
            k.failures = 0;
            k.backoff = BACKOFF_MIN;
            k.next_try = now;
        }
        let mut fresh = Vec::new();
        for a in clean.into_iter().rev() {
            if let Some(i) = k.addrs.iter().position(|x| *x == a) {
                k.addrs.remove(i);
            } else {
                fresh.push(a.clone());
            }
            k.addrs.insert(0, a);
        }
        k.addrs.truncate(MAX_ADDRS_PER_PEER);
        if !fresh.is_empty() && k.connected.is_some() {
            self.dirty = true;
        }
        fresh
    }

    /// Drop the least recently heard of peer that is not being dialled.
    fn evict_one(&mut self) {
        let victim = self
            .peers
            .iter()
            .filter(|(_, k)| k.dialing.is_none())
            .min_by_key(|(_, k)| k.heard)
            .or_else(|| self.peers.iter().min_by_key(|(_, k)| k.heard))
            .map(|(p, _)| *p);
        if let Some(p) = victim {
            self.remove(&p);
        }
    }

    pub(crate) fn remove(&mut self, peer: &PeerId) {
        if let Some(k) = self.peers.remove(peer) {
            if k.connected.is_some() {
                self.dirty = true;
            }
        }
    }

    /// Peers to dial now (up to `want`): not connected, not being dialled, past
    /// their backoff; fewest failures first, then most recently heard of.
    /// Each is marked as tried (its backoff doubles until a connection succeeds).
    pub(crate) fn due(
        &mut self,
        now: Instant,
        want: usize,
        skip: impl Fn(&PeerId) -> bool,
    ) -> Vec<(PeerId, Vec<Multiaddr>)> {
        if want == 0 {
            return Vec::new();
        }
        let mut cands: Vec<(&PeerId, &Known)> = self
            .peers
            .iter()
            .filter(|(p, k)| k.dialing.is_none() && now >= k.next_try && !skip(p))
            .collect();
        cands.sort_by_key(|(_, k)| (k.failures, std::cmp::Reverse(k.heard)));
        let picked: Vec<PeerId> = cands.into_iter().take(want).map(|(p, _)| *p).collect();
        picked
            .into_iter()
            .filter_map(|p| {
                let k = self.peers.get_mut(&p)?;
                k.next_try = now + k.backoff;
                k.backoff = (k.backoff * 2).min(BACKOFF_MAX);
                Some((p, k.addrs.clone()))
            })
            .collect()
    }

    /// Dials in flight from the book.
    pub(crate) fn dialing(&self) -> usize {
        self.peers.values().filter(|k| k.dialing.is_some()).count()
    }

    pub(crate) fn dial_started(&mut self, peer: &PeerId, id: ConnectionId) {
        if let Some(k) = self.peers.get_mut(peer) {
            k.dialing = Some(id);
        }
    }

    /// The swarm did not start our dial (another one to the peer is under way): no failure.
    pub(crate) fn dial_skipped(&mut self, peer: &PeerId) {
        if let Some(k) = self.peers.get_mut(peer) {
            k.dialing = None;
        }
    }

    /// A dial from the book failed; a peer failing too often is forgotten.
    pub(crate) fn dial_failed(&mut self, id: ConnectionId) -> Option<PeerId> {
        let peer = self
            .peers
            .iter()
            .find(|(_, k)| k.dialing == Some(id))
            .map(|(p, _)| *p)?;
        let k = self.peers.get_mut(&peer)?;
        k.dialing = None;
        k.failures += 1;
        if k.failures >= MAX_FAILURES {
            tracing::debug!("forgetting {peer}: {MAX_FAILURES} failed dials");
            self.remove(&peer);
        }
        Some(peer)
    }

    /// A connection to `peer` is up (whoever dialled); `via` is the address we
    /// dialled, if we did. Resets its backoff.
    pub(crate) fn connected(&mut self, peer: &PeerId, via: Option<&Multiaddr>, now: Instant) {
        if let Some(a) = via {
            self.add(*peer, std::slice::from_ref(a), now);
        }
        let at = self.tick();
        if let Some(k) = self.peers.get_mut(peer) {
            // Whichever connection came first, a dial of ours still in flight
            // no longer counts: its failure would not say the peer is unreachable.
            k.dialing = None;
            if k.connected.is_none() {
                self.dirty = true;
            }
            k.connected = Some(at);
            k.failures = 0;
            k.backoff = BACKOFF_MIN;
        }
    }

    /// The last connection to `peer` closed: it may be dialled again after the
    /// shortest backoff (it was reachable a moment ago).
    pub(crate) fn disconnected(&mut self, peer: &PeerId, now: Instant) {
        if let Some(k) = self.peers.get_mut(peer) {
            k.next_try = now + k.backoff;
        }
    }

    /// Peers worth remembering across restarts: the ones reached, most recent first.
    pub(crate) fn saved(&self) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let mut reached: Vec<(&PeerId, &Known)> =
            self.peers.iter().filter(|(_, k)| k.connected.is_some()).collect();
        reached.sort_by_key(|(_, k)| std::cmp::Reverse(k.connected));
        reached
            .into_iter()
            .take(MAX_SAVED_PEERS)
            .map(|(p, k)| (*p, k.addrs.clone()))
            .collect()
    }

    /// Whether the saved set changed since the last call.
    pub(crate) fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct PeersFile {
    version: u32,
    peers: Vec<SavedPeer>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedPeer {
    peer: String,
    addrs: Vec<String>,
}

/// Read a peers file: `Ok(empty)` when there is none; entries that do not
/// parse are skipped (the book filters the addresses again).
pub(crate) fn load(path: &Path) -> Result<Vec<(PeerId, Vec<Multiaddr>)>, PeersFileError> {
    let p = path.display().to_string();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(PeersFileError::Read {
                path: p,
                msg: e.to_string(),
            })
        }
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(PeersFileError::TooLarge { path: p });
    }
    let text = std::fs::read_to_string(path).map_err(|e| PeersFileError::Read {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    let file: PeersFile = serde_json::from_str(&text).map_err(|e| PeersFileError::Parse {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    if file.version != 1 {
        return Err(PeersFileError::Parse {
            path: p,
            msg: format!("unknown version {}", file.version),
        });
    }
    Ok(file
        .peers
        .into_iter()
        .take(MAX_SAVED_PEERS)
        .filter_map(|s| {
            let peer = s.peer.parse::<PeerId>().ok()?;
            let addrs = s
                .addrs
                .iter()
                .take(MAX_ADDRS_PER_PEER)
                .filter_map(|a| a.parse().ok())
                .collect();
            Some((peer, addrs))
        })
        .collect())
}

/// The bytes of a peers file.
pub(crate) fn encode(peers: &[(PeerId, Vec<Multiaddr>)]) -> Vec<u8> {
    let file = PeersFile {
        version: 1,
        peers: peers
            .iter()
            .map(|(p, a)| SavedPeer {
                peer: p.to_string(),
                addrs: a.iter().map(|x| x.to_string()).collect(),
            })
            .collect(),
    };
    // Serialising plain strings cannot fail; an empty list is still a valid file.
    serde_json::to_vec_pretty(&file).unwrap_or_else(|_| b"{\"version\":1,\"peers\":[]}".to_vec())
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory,
/// synced, then renamed over the old one (a crash leaves the old or the new file).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PeersFileError> {
    use std::io::Write;
    let err = |e: std::io::Error| PeersFileError::Write {
        path: path.display().to_string(),
        msg: e.to_string(),
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(err)?;
    tmp.write_all(bytes).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quic(port: u16) -> Multiaddr {
        format!("/ip4/127.0.0.1/udp/{port}/quic-v1")
            .parse()
            .expect("addr")
    }

    #[test]
    fn only_dialable_addresses_of_the_right_peer_are_kept() {
        let me = PeerId::random();
        let p = PeerId::random();
        let other = PeerId::random();
        let mut b = PeerBook::new(me, TransportKind::Quic, 4);
        let addrs: Vec<Multiaddr> = [
            "/ip4/0.0.0.0/udp/4001/quic-v1",
            "/ip4/127.0.0.1/tcp/4001",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "/memory/7",
            &format!("/ip4/127.0.0.1/udp/4002/quic-v1/p2p/{other}"),
            &format!("/ip4/127.0.0.1/udp/4003/quic-v1/p2p/{p}"),
            "/ip4/10.0.0.1/udp/4004/quic-v1",
        ]
        .iter()
        .map(|s| s.parse().expect("addr"))
        .collect();
        b.add(p, &addrs, Instant::now());
        assert_eq!(
            b.addrs(&p),
            &[quic(4003), "/ip4/10.0.0.1/udp/4004/quic-v1".parse().expect("a")]
        );
        // Never ourselves, never a peer with nothing dialable.
        assert!(b.add(me, &[quic(1)], Instant::now()).is_empty());
        assert!(!b.contains(&me));
        b.add(
            other,
            &["/ip4/127.0.0.1/tcp/1".parse().expect("a")],
            Instant::now(),
        );
        assert!(!b.contains(&other));
        // The memory transport keeps only memory addresses.
        let mut m = PeerBook::new(me, TransportKind::Memory, 4);
        m.add(p, &["/memory/7".parse().expect("a"), quic(5)], Instant::now());
        assert_eq!(m.addrs(&p), &["/memory/7".parse::<Multiaddr>().expect("a")]);
    }

    #[test]
    fn addresses_and_peers_are_bounded_oldest_evicted() {
        let mut b = PeerBook::new(PeerId::random(), TransportKind::Quic, 3);
        let p0 = PeerId::random();
        let many: Vec<Multiaddr> = (1..=20).map(quic).collect();
        b.add(p0, &many, Instant::now());
        assert_eq!(b.addrs(&p0).len(), MAX_ADDRS_PER_PEER);
        let ps: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        for (i, p) in ps.iter().enumerate() {
            b.add(*p, &[quic(100 + i as u16)], Instant::now());
        }
        assert_eq!(b.len(), 3);
        assert!(!b.contains(&p0), "the least recently heard of is evicted");
        // Hearing of ps[0] again makes ps[1] the oldest.
        b.add(ps[0], &[quic(100)], Instant::now());
        b.add(PeerId::random(), &[quic(200)], Instant::now());
        assert!(b.contains(&ps[0]) && !b.contains(&ps[1]));
    }

    #[test]
    fn dials_back_off_reset_on_connection_and_give_up() {
        let t0 = Instant::now();
        let mut b = PeerBook::new(PeerId::random(), TransportKind::Quic, 8);
        let p = PeerId::random();
        b.add(p, &[quic(1)], t0);
        assert_eq!(b.due(t0, 0, |_| false).len(), 0, "want 0 dials nothing");
        assert_eq!(b.due(t0, 4, |_| true).len(), 0, "skipped (e.g. connected)");
        // Waits between tries: 0, then the backoff doubling from BACKOFF_MIN.
        let mut t = t0;
        let mut waits = Vec::new();
        for i in 0..MAX_FAILURES {
            let mut wait = Duration::ZERO;
            while b.due(t + wait, 4, |_| false).is_empty() {
                wait += Duration::from_millis(250);
                assert!(wait <= BACKOFF_MAX, "try {i} never due");
            }
            waits.push(wait);
            t += wait;
            let id = ConnectionId::new_unchecked(i as usize);
            b.dial_started(&p, id);
            assert_eq!(b.dialing(), 1);
            assert!(
                b.due(t + BACKOFF_MAX, 4, |_| false).is_empty(),
                "one dial at a time"
            );
            assert_eq!(b.dial_failed(id), Some(p));
        }
        assert_eq!(
            waits[..4],
            [Duration::ZERO, BACKOFF_MIN, BACKOFF_MIN * 2, BACKOFF_MIN * 4]
        );
        assert!(waits.iter().all(|w| *w <= BACKOFF_MAX), "{waits:?}");
        assert!(!b.contains(&p), "forgotten after {MAX_FAILURES} failures");
        assert!(waits[1] > waits[0], "backoff grows: {waits:?}");
        // Heard of again: a fresh start, dialled at once; a connection resets the backoff.
        b.add(p, &[quic(1)], t);
        assert_eq!(b.due(t, 4, |_| false).len(), 1);
        let id = ConnectionId::new_unchecked(99);
        b.dial_started(&p, id);
        b.connected(&p, Some(&quic(1)), t);
        assert_eq!(b.dialing(), 0);
        b.disconnected(&p, t);
        assert_eq!(b.due(t + BACKOFF_MIN, 4, |_| false).len(), 1);
    }

    #[test]
    fn the_peers_file_round_trips_and_refuses_garbage() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("node.peers.json");
        assert!(load(&path).expect("missing file").is_empty());
        let t = Instant::now();
        let mut b = PeerBook::new(PeerId::random(), TransportKind::Quic, 8);
        let (p, q) = (PeerId::random(), PeerId::random());
        b.add(p, &[quic(1)], t);
        b.add(q, &[quic(2)], t);
        assert!(b.saved().is_empty(), "only peers once reached are saved");
        b.connected(&p, None, t);
        assert!(b.take_dirty());
        assert!(!b.take_dirty());
        write_atomic(&path, &encode(&b.saved())).expect("write");
        assert_eq!(load(&path).expect("load"), vec![(p, vec![quic(1)])]);
        std::fs::write(&path, b"{not json").expect("write");
        assert!(matches!(load(&path), Err(PeersFileError::Parse { .. })));
        std::fs::write(&path, vec![b' '; MAX_FILE_BYTES as usize + 1]).expect("write");
        assert!(matches!(load(&path), Err(PeersFileError::TooLarge { .. })));
        // Bad entries are skipped, good ones kept.
        std::fs::write(
            &path,
            format!(
                "{{\"version\":1,\"peers\":[{{\"peer\":\"nope\",\"addrs\":[]}},\
                 {{\"peer\":\"{q}\",\"addrs\":[\"garbage\",\"/ip4/127.0.0.1/udp/2/quic-v1\"]}}]}}"
            ),
        )
        .expect("write");
        assert_eq!(load(&path).expect("load"), vec![(q, vec![quic(2)])]);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
    }
}
