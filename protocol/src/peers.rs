//! The peer table: latest advert per peer, liveness by last-heard time, expiry after missed adverts.
//!
//! Times are the *local* clock of the node owning the table (`now_ms`), never the sender's
//! `sent_ms`, so clock skew between peers cannot keep a dead peer alive or expire a live one.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::Arc;

use crate::message::Advert;

/// What an advert did to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerEvent {
    /// First advert from this peer (or first since it expired).
    Joined,
    /// A newer advert from a known peer.
    Updated,
    /// `seq` not newer than what we hold (a duplicate or reordered gossip copy); ignored.
    Stale,
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct PeerEntry {
    /// Shared so that snapshots of the table are cheap to hand to readers.
    pub advert: Arc<Advert>,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
}

/// Identity hasher for keys that already are (keyed) hashes.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Rows live in a slab. Lookups go through a hash index keyed by a keyed 64-bit hash of the peer
/// id and are confirmed against the row's own advert, so the per-advert lookup costs one probe
/// instead of ~20 string comparisons in a B-tree (this dominated the 1,000-node simulation).
/// Two ids with the same hash are astronomically unlikely, but handled exactly: the later one
/// lives in `collided`. A B-tree over the ids gives the deterministic iteration order; the hash
/// map is never iterated.
#[derive(Debug, Clone)]
pub struct PeerTable {
    slots: Vec<Option<PeerEntry>>,
    free: Vec<usize>,
    hasher: RandomState,
    index: HashMap<u64, usize, BuildHasherDefault<PassThrough>>,
    collided: BTreeMap<String, usize>,
    order: BTreeMap<String, usize>,
    /// Highest seq of peers recently removed, so a late gossip copy cannot resurrect them.
    tombstones: BTreeMap<String, (u64, u64)>,
    advert_interval_ms: u64,
    missed: u32,
    /// No entry can expire before this time; lets `expire` skip the scan almost always.
    next_check_ms: u64,
    /// Test hook: every id hashes alike, to exercise the collision path.
    #[cfg(test)]
    degenerate_hash: bool,
}

impl PeerTable {
    /// A table whose peers expire after `missed` advert intervals without a newer advert.
    pub fn new(advert_interval_ms: u64, missed: u32) -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            hasher: RandomState::new(),
            index: HashMap::default(),
            collided: BTreeMap::new(),
            order: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            advert_interval_ms: advert_interval_ms.max(1),
            missed: missed.max(1),
            next_check_ms: u64::MAX,
            #[cfg(test)]
            degenerate_hash: false,
        }
    }

    /// How long a peer stays without a fresh advert.
    pub fn expiry_ms(&self) -> u64 {
        self.advert_interval_ms.saturating_mul(u64::from(self.missed))
    }

    /// Records an advert heard at `now_ms`. Callers validate adverts before this.
    pub fn observe(&mut self, advert: impl Into<Arc<Advert>>, now_ms: u64) -> PeerEvent {
        self.observe_replacing(advert, now_ms).0
    }

    /// Like [`PeerTable::observe`], also handing back the advert it replaced (on `Updated`),
    /// so a caller can compare old and new without a second lookup.
    pub fn observe_replacing(
        &mut self,
        advert: impl Into<Arc<Advert>>,
        now_ms: u64,
    ) -> (PeerEvent, Option<Arc<Advert>>) {
        let advert = advert.into();
        if let Some(entry) = self
            .find(&advert.peer)
            .and_then(|i| self.slots.get_mut(i))
            .and_then(Option::as_mut)
        {
            if advert.seq <= entry.advert.seq {
                return (PeerEvent::Stale, None);
            }
            let old = std::mem::replace(&mut entry.advert, advert);
            entry.last_seen_ms = entry.last_seen_ms.max(now_ms);
            return (PeerEvent::Updated, Some(old));
        }
        if let Some((seq, _)) = self.tombstones.get(&advert.peer) {
            if advert.seq <= *seq {
                return (PeerEvent::Stale, None);
            }
            self.tombstones.remove(&advert.peer);
        }
        self.next_check_ms = self.next_check_ms.min(now_ms.saturating_add(self.expiry_ms()));
        let peer = advert.peer.clone();
        let entry = PeerEntry {
            advert,
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
        };
        let slot = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(entry);
                i
            }
            None => {
                self.slots.push(Some(entry));
                self.slots.len() - 1
            }
        };
        let h = self.key(&peer);
        match self.index.entry(h) {
            Entry::Occupied(_) => {
                self.collided.insert(peer.clone(), slot);
            }
            Entry::Vacant(v) => {
                v.insert(slot);
            }
        }
        self.order.insert(peer, slot);
        (PeerEvent::Joined, None)
    }

    fn key(&self, peer: &str) -> u64 {
        #[cfg(test)]
        if self.degenerate_hash {
            return 42;
        }
        self.hasher.hash_one(peer)
    }

    /// Slot of `peer`, if present.
    fn find(&self, peer: &str) -> Option<usize> {
        let h = self.key(peer);
        if let Some(&i) = self.index.get(&h) {
            if self.entry(i).is_some_and(|e| e.advert.peer == peer) {
                return Some(i);
            }
        }
        // Empty unless two ids shared a hash: then an O(log n) exact lookup.
        self.collided.get(peer).copied()
    }

    fn take(&mut self, peer: &str) -> Option<PeerEntry> {
        let slot = self.find(peer)?;
        let h = self.key(peer);
        if self.index.get(&h) == Some(&slot) {
            self.index.remove(&h);
        } else {
            self.collided.remove(peer);
        }
        self.order.remove(peer);
        let e = self.slots.get_mut(slot)?.take();
        self.free.push(slot);
        e
    }

    fn entry(&self, slot: usize) -> Option<&PeerEntry> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    /// Removes peers not heard from for `missed * advert_interval_ms`; returns their ids in order.
    ///
    /// Cheap when nothing can have expired: last-heard times only grow, so the earliest possible
    /// expiry computed by the previous scan stays a valid lower bound.
    pub fn expire(&mut self, now_ms: u64) -> Vec<String> {
        if now_ms < self.next_check_ms {
            return Vec::new();
        }
        let window = self.expiry_ms();
        let mut gone = Vec::new();
        let mut earliest = u64::MAX;
        for (peer, e) in self
            .order
            .iter()
            .filter_map(|(p, &i)| self.entry(i).map(|e| (p, e)))
        {
            let deadline = e.last_seen_ms.saturating_add(window);
            if deadline <= now_ms {
                gone.push(peer.clone());
            } else {
                earliest = earliest.min(deadline);
            }
        }
        for peer in &gone {
            if let Some(e) = self.take(peer) {
                self.tombstones.insert(peer.clone(), (e.advert.seq, now_ms));
            }
        }
        // Tombstones only need to outlive any gossip copy still in flight.
        self.tombstones
            .retain(|_, (_, at)| at.saturating_add(window) > now_ms);
        if !self.tombstones.is_empty() {
            earliest = earliest.min(now_ms.saturating_add(window));
        }
        self.next_check_ms = earliest;
        gone
    }

    /// Drops a peer now (e.g. it failed authorisation or said goodbye).
    pub fn remove(&mut self, peer: &str, now_ms: u64) -> Option<PeerEntry> {
        let e = self.take(peer)?;
        self.tombstones.insert(peer.to_owned(), (e.advert.seq, now_ms));
        self.next_check_ms = self.next_check_ms.min(now_ms.saturating_add(self.expiry_ms()));
        Some(e)
    }

    pub fn get(&self, peer: &str) -> Option<&PeerEntry> {
        self.find(peer).and_then(|i| self.entry(i))
    }

    pub fn contains(&self, peer: &str) -> bool {
        self.find(peer).is_some()
    }

    /// Entries not yet expired, ordered by peer id.
    pub fn live(&self) -> impl Iterator<Item = &PeerEntry> {
        self.order.values().filter_map(|&i| self.entry(i))
    }

    /// Adverts not yet expired, ordered by peer id.
    pub fn adverts(&self) -> impl Iterator<Item = &Advert> {
        self.live().map(|e| e.advert.as_ref())
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Capacity;

    fn adv(peer: &str, seq: u64) -> Advert {
        Advert {
            peer: peer.into(),
            seq,
            name: peer.into(),
            version: "0".into(),
            addrs: vec![],
            models: vec![],
            capacity: Capacity {
                cores: 1,
                cpu_load: 0.0,
                mem_free_mb: 0,
                queue: 0,
                max_concurrency: 1,
            },
            cloud: None,
            gateway: None,
            sent_ms: 0,
            cert: None,
            teams: Vec::new(),
        }
    }

    #[test]
    fn join_update_stale() {
        let mut t = PeerTable::new(1000, 3);
        assert_eq!(t.observe(adv("a", 1), 0), PeerEvent::Joined);
        assert_eq!(t.observe(adv("a", 2), 10), PeerEvent::Updated);
        assert_eq!(t.observe(adv("a", 2), 20), PeerEvent::Stale);
        assert_eq!(t.observe(adv("a", 1), 30), PeerEvent::Stale);
        let e = t.get("a").expect("a present");
        assert_eq!(e.advert.seq, 2);
        // A stale copy must not refresh liveness.
        assert_eq!(e.last_seen_ms, 10);
        assert_eq!(e.first_seen_ms, 0);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn expiry_after_missed_intervals_only() {
        let mut t = PeerTable::new(1000, 3);
        t.observe(adv("a", 1), 0);
        t.observe(adv("b", 1), 500);
        assert!(t.expire(2999).is_empty());
        assert_eq!(t.expire(3000), vec!["a".to_string()]);
        assert!(t.expire(3499).is_empty());
        t.observe(adv("b", 2), 3400);
        assert!(t.expire(6399).is_empty());
        assert_eq!(t.expire(6400), vec!["b".to_string()]);
        assert!(t.is_empty());
    }

    #[test]
    fn late_copy_does_not_resurrect_but_newer_rejoins() {
        let mut t = PeerTable::new(100, 3);
        t.observe(adv("a", 5), 0);
        assert_eq!(t.expire(300), vec!["a".to_string()]);
        assert_eq!(t.observe(adv("a", 5), 310), PeerEvent::Stale);
        assert!(!t.contains("a"));
        assert_eq!(t.observe(adv("a", 6), 320), PeerEvent::Joined);
        assert!(t.contains("a"));
    }

    #[test]
    fn tombstones_are_forgotten_after_a_window() {
        let mut t = PeerTable::new(100, 3);
        t.observe(adv("a", 5), 0);
        assert!(t.remove("a", 0).is_some());
        assert_eq!(t.observe(adv("a", 5), 10), PeerEvent::Stale);
        t.expire(300);
        // The restarted peer with a reset seq is accepted once the tombstone is gone.
        assert_eq!(t.observe(adv("a", 1), 301), PeerEvent::Joined);
    }

    #[test]
    fn slots_are_reused_and_order_survives_churn() {
        let mut t = PeerTable::new(100, 3);
        for (i, p) in ["d", "b", "a", "c"].iter().enumerate() {
            t.observe(adv(p, 1), i as u64);
        }
        t.remove("b", 10);
        t.remove("d", 10);
        t.observe(adv("e", 1), 11);
        t.observe(adv("0", 1), 11);
        assert_eq!(t.slots.len(), 4, "freed slots are reused");
        let ids: Vec<&str> = t.live().map(|e| e.advert.peer.as_str()).collect();
        assert_eq!(ids, ["0", "a", "c", "e"]);
        assert_eq!(t.len(), 4);
        assert_eq!(t.get("c").map(|e| e.first_seen_ms), Some(3));
        assert!(t.get("b").is_none());
    }

    #[test]
    fn hash_collisions_are_resolved_exactly() {
        let mut t = PeerTable::new(100, 3);
        t.degenerate_hash = true;
        for p in ["a", "b", "c"] {
            assert_eq!(t.observe(adv(p, 1), 0), PeerEvent::Joined);
        }
        assert_eq!(t.observe(adv("b", 2), 1), PeerEvent::Updated);
        assert_eq!(t.observe(adv("c", 1), 1), PeerEvent::Stale);
        assert_eq!(t.get("b").map(|e| e.advert.seq), Some(2));
        // Remove the one in the index, then one in the collision map.
        assert!(t.remove("a", 2).is_some());
        assert!(t.get("b").is_some() && t.get("c").is_some() && t.get("a").is_none());
        assert!(t.remove("c", 2).is_some());
        assert_eq!(t.observe(adv("d", 1), 3), PeerEvent::Joined);
        let ids: Vec<&str> = t.live().map(|e| e.advert.peer.as_str()).collect();
        assert_eq!(ids, ["b", "d"]);
        assert_eq!(t.observe(adv("d", 2), 4), PeerEvent::Updated);
        // b was last heard at 1, d at 4: only b is past 300 ms at 302.
        assert_eq!(t.expire(302), vec!["b".to_string()]);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn live_is_ordered_by_peer_id() {
        let mut t = PeerTable::new(1000, 3);
        for p in ["c", "a", "b"] {
            t.observe(adv(p, 1), 0);
        }
        let ids: Vec<&str> = t.live().map(|e| e.advert.peer.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(t.adverts().count(), 3);
    }

    #[test]
    fn expire_scan_is_skipped_until_something_can_expire() {
        let mut t = PeerTable::new(1000, 3);
        t.observe(adv("a", 1), 0);
        assert_eq!(t.next_check_ms, 3000);
        // Refreshes keep the old bound; it stays a valid lower bound.
        t.observe(adv("a", 2), 2500);
        assert!(t.expire(3000).is_empty());
        assert_eq!(t.next_check_ms, 5500);
        assert!(t.expire(5000).is_empty());
        assert_eq!(t.expire(5500), vec!["a".to_string()]);
    }
}
