//! The discrete-event engine: N nodes running the real protocol state machines over a simulated
//! network, with a virtual clock, one seeded RNG, faults, queries and invariant checks.
//!
//! Determinism: one `ChaCha8Rng` drives every random choice; events are ordered by
//! (virtual time, insertion sequence); all iterated collections are `Vec` or `BTreeMap`/`BTreeSet`.
//! The same scenario and seed therefore give the same event order and a byte-identical report.
//!
//! Scale (1,000 nodes, ~30 M advert deliveries a minute): gossip is a gossipsub-like mesh (each
//! node forwards a new advert to its ~D mesh peers); a send that is certain to arrive as a
//! duplicate is counted but not simulated; duplicate-suppression state is laid out per origin so
//! one flood touches one contiguous row; the event queue is a timing wheel (`queue.rs`);
//! peer-table expiry is O(1) when nothing can expire; the membership machine builds election
//! input from the few cloud-capable peers only. Nothing is O(N²) per tick.
//!
//! The simulator is one `Sim` with its `impl` spread over files by concern:
//! - this file: the state types, construction and the event loop (`run`, `dispatch`);
//! - `net`: reachability, link latency and RPC accounting;
//! - `membership`: boot, crash, leave, churn and scripted scenario events;
//! - `gossip`: mesh upkeep, the tick, and driving each node's
//!   `swarm_protocol::membership::Membership` (its adverts published and forwarded, adverts
//!   received, gateway changes counted);
//! - `query`: query arrival, the local answer, the worker queue, the first route decision and
//!   the final answer;
//! - `vote`: the coordinator's side of a query, driving `swarm_protocol::query::Coordinator`;
//! - `voter`: the voter's side (request, inference, reply);
//! - `escalate`: escalation to the gateway, the gateway's side, retry and fallback;
//! - `check`: the invariant checker and the gateway view of each component;
//! - `summary`: the final `Report`.

mod check;
mod escalate;
mod gossip;
mod membership;
mod net;
mod query;
mod summary;
mod vote;
mod voter;

pub use check::ComponentView;

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use swarm_protocol::membership::{LocalState, Membership as MembershipMachine, MembershipConfig};
use swarm_protocol::query::Coordinator;
use swarm_protocol::{Advert, ElectionConfig, Privacy, RouteOverride, SwarmKey, Thresholds, VoterRecord};

use crate::models::{splitmix, Bank, CacheError, SimAnswer};
use crate::queue::EventQueue;
use crate::report::{AttackStats, EscalationStats, Membership, Report, RouteMix, VoteStats};
use crate::scenario::Scenario;

/// Wall-clock epoch of every simulated node clock (ms), so local clocks are realistic and positive.
const EPOCH_MS: i64 = 1_700_000_000_000;
/// After the last query arrives, keep running this long for in-flight queries to finish.
const DRAIN_US: u64 = 120_000_000;
/// `reach` value of a node that is not up.
const DOWN: u32 = u32::MAX;

fn us(ms: f64) -> u64 {
    (ms.max(0.0) * 1000.0).round() as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeState {
    /// Slot reserved for a future join.
    Unused,
    Up,
    /// Crashed; may restart.
    Down,
    /// Left for good.
    Left,
}

#[derive(Debug, Clone)]
struct CloudAccess {
    priority: i32,
    budget: u32,
    reachable: bool,
}

/// One simulated node. Fields below `// soft state` are lost in a crash.
struct Node {
    state: NodeState,
    /// Incarnation: bumped at every crash so stale timers and replies are recognised.
    inc: u32,
    group: u16,
    clock_offset_us: i64,
    drift_ppm: i64,
    model: usize,
    cores: u32,
    mem_mb: u64,
    cloud: Option<CloudAccess>,
    // soft state
    /// The protocol's membership machine (peer table, election, when to advertise).
    mem: MembershipMachine,
    /// XOR of slot hashes of this node and its peer table: cheap equality check against the
    /// live set.
    set_hash: u64,
    /// Ticks since boot; mesh upkeep runs once per advert interval.
    ticks: u64,
    /// Busy time per tick window over the last advert interval (the advertised CPU load).
    busy_ring: [u64; 4],
    /// Forges its adverts (`[attack] liars`).
    liar: bool,
    /// Sybil identities in this node's peer table (not in the live set the checker compares).
    sybils_held: usize,
    mesh: Vec<u32>,
    busy_until: u64,
    queue: u32,
    busy_acc_us: u64,
    cpu_load: f32,
}

/// What a node knows about one origin's adverts in flight.
#[derive(Debug, Clone, Copy, Default)]
struct GossipSlot {
    /// Highest seq processed (gossipsub's seen-cache, per origin since seqs only grow).
    seen: u64,
    /// Seq and arrival time of the earliest delivery already scheduled to this node.
    pend_seq: u64,
    pend_at: u64,
}

/// An advert as it travels: shared by every copy in flight and every table holding it.
struct AdvMsg {
    origin: u32,
    seq: u64,
    advert: Arc<Advert>,
    bytes: u32,
}

/// Sim-side payload of a vote reply: the wire bytes plus ground truth the coordinator may not read
/// (correctness) and what it would compute itself (the embedding of free text).
struct ReplyMsg {
    bytes: Vec<u8>,
    correct: bool,
    embedding: Vec<f32>,
}

enum Ev {
    Boot(u32),
    /// The Sybil host advertises its fake identities (once per advert interval).
    Sybils,
    Tick {
        node: u32,
        inc: u32,
    },
    Gossip {
        to: u32,
        from: u32,
        msg: Rc<AdvMsg>,
    },
    Scenario(usize),
    ChurnLeave,
    ChurnJoin,
    ChurnRestart(u32),
    QueryArrive,
    LocalDone(u64),
    VoteReq {
        q: u64,
        voter: u32,
        bytes: Rc<Vec<u8>>,
    },
    VoteDone {
        q: u64,
        voter: u32,
        inc: u32,
        answer: Box<SimAnswer>,
        started: u64,
    },
    VoteReply {
        q: u64,
        voter: u32,
        reply: Rc<ReplyMsg>,
    },
    VoteFail {
        q: u64,
        voter: u32,
        reason: &'static str,
    },
    VoteDeadline(u64),
    EscReq {
        q: u64,
        gw: u32,
        attempt: u8,
        bytes: Vec<u8>,
    },
    EscCloud {
        q: u64,
        gw: u32,
        inc: u32,
        attempt: u8,
        cloud_ms: u32,
    },
    EscReply {
        q: u64,
        attempt: u8,
        bytes: Vec<u8>,
        correct: bool,
    },
    EscFail {
        q: u64,
        attempt: u8,
    },
    EscDeadline {
        q: u64,
        attempt: u8,
    },
    EscRetry(u64),
    Check,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Local,
    Voting,
    Escalating(u8),
    /// The first escalation failed; waiting for this node's view to name another gateway.
    AwaitingGateway {
        failed: Option<u32>,
        since: u64,
    },
}

struct Query {
    id: u64,
    coord: u32,
    coord_inc: u32,
    qi: usize,
    privacy: Privacy,
    safety: bool,
    arrival: u64,
    phase: Phase,
    own: Option<SimAnswer>,
    /// The query's coordinator (the protocol's state machine), once the local answer is in.
    sm: Option<Coordinator>,
    voters: Vec<u32>,
    /// Slots whose first ballot was fed; an independent count to check the coordinator against.
    ballot_keys: BTreeSet<u32>,
    /// Voters picked that do not exist (Sybils): asked, then timed out at the deadline, each a
    /// ballot of its own.
    phantoms_pending: usize,
    phantom_voters: usize,
    /// Embeddings of the free-text answers seen, by text (what the coordinator asks to embed).
    embeddings: BTreeMap<String, Vec<f32>>,
    /// Ground truth per normalised answer seen in this query.
    truth: BTreeMap<String, bool>,
    /// What went to the gateway, kept for the retry.
    records: Vec<VoterRecord>,
    /// Ground truth of the cloud's answer, once it is in.
    cloud_correct: bool,
    /// The vote's statistics were recorded.
    vote_counted: bool,
}

#[derive(Default)]
struct Metrics {
    events: u64,
    gossip_msgs: u64,
    gossip_bytes: u64,
    rpc_msgs: u64,
    rpc_bytes: u64,
    queries: u64,
    answered: u64,
    answered_twice: u64,
    aborted: u64,
    correct: u64,
    routes: RouteMix,
    by_route: BTreeMap<&'static str, (u64, u64)>,
    degraded: BTreeMap<String, u64>,
    latencies_us: Vec<u64>,
    vote: VoteStats,
    esc: EscalationStats,
    elections: u64,
    view_changes: u64,
    membership: Membership,
    node_us: u128,
    attack: AttackStats,
}

/// Invariant bookkeeping.
#[derive(Default)]
struct Checker {
    last_disruption: u64,
    conv_first: Option<u64>,
    conv_awaiting: Option<u64>,
    reconv: Vec<u64>,
    table_bad_since: Option<u64>,
    table_reported: bool,
    gw_bad_since: BTreeMap<u16, u64>,
    gw_reported: BTreeSet<u16>,
    failover_pending: Vec<(u16, u64)>,
    failovers: Vec<u64>,
    zero_us: u64,
    multi_us: u64,
    violations: u64,
    listed: Vec<String>,
}

pub struct Sim {
    sc: Scenario,
    seed: u64,
    rng: ChaCha8Rng,
    now: u64,
    end_us: u64,
    queue: EventQueue<Ev>,
    nodes: Vec<Node>,
    /// Per node: its partition group while up, `DOWN` otherwise. Compact, so link checks in the
    /// gossip hot path stay in cache.
    reach: Vec<u32>,
    /// Gossip duplicate suppression, indexed `[origin * cap + node]`: one flood touches one row.
    gossip: Vec<GossipSlot>,
    ids: Vec<String>,
    id_index: BTreeMap<String, u32>,
    slots_used: usize,
    bank: Bank,
    queries: BTreeMap<u64, Query>,
    /// Ids of answered queries, to catch a second answer.
    finished: BTreeSet<u64>,
    next_query: u64,
    loss: f64,
    groups: usize,
    crashed: Vec<u32>,
    booted_initial: usize,
    thresholds: Thresholds,
    election_cfg: ElectionConfig,
    route_override: RouteOverride,
    cloud_nodes: Vec<usize>,
    /// Keyed swarm: the swarm key that certifies every node.
    swarm_key: Option<SwarmKey>,
    /// Sybil identities' ids (`[attack] sybils`), advertised by `sybil_host`.
    sybil_ids: Vec<String>,
    m: Metrics,
    ck: Checker,
}

/// Text form of a peer id: base58 alphabet, PeerId-like length, fixed per slot.
fn peer_id(slot: usize) -> String {
    const B58: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    let mut s = String::from("12D3KooW");
    let mut h = slot as u64;
    while s.len() < 52 {
        h = splitmix(h);
        s.push(B58[(h % 58) as usize] as char);
    }
    s
}

/// Text form of a Sybil identity: PeerId-like, never a real slot's id.
fn sybil_id(i: usize) -> String {
    let mut s = format!("12D3KooWSybiL{i}x");
    let mut h = i as u64 ^ 0xDEAD_BEEF;
    while s.len() < 52 {
        h = splitmix(h);
        s.push(char::from(b"abcdefghijkmnopqrstuvwxyz"[(h % 25) as usize]));
    }
    s
}

fn slot_hash(slot: u32) -> u64 {
    splitmix(u64::from(slot) ^ 0xA5A5_5A5A_F00D_CAFE)
}

impl Sim {
    pub fn new(sc: Scenario, seed: u64) -> Result<Sim, CacheError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bank = if sc.queries.answer_cache.is_empty() {
            Bank::generate(sc.queries.pool, sc.queries.difficulty_sd, &mut rng)
        } else {
            Bank::from_cache(&sc.queries.answer_cache, &sc.base_dir)?
        };
        let churn_joins = if sc.churn.end_s > sc.churn.start_s {
            (sc.churn.join_per_min * (sc.churn.end_s - sc.churn.start_s) / 60.0 * 2.0).ceil() as usize + 8
        } else {
            0
        };
        // Joins beyond this many slots are skipped (the report counts the joins that happened).
        let cap = sc.nodes + churn_joins.min(1_000);
        let ids: Vec<String> = (0..cap).map(peer_id).collect();
        let id_index = ids
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        let t = &sc.timing;
        let election_cfg = ElectionConfig {
            hysteresis_ms: t.hysteresis_ms,
            startup_grace_ms: t.startup_grace_ms,
            confirm_ms: t.confirm_ms,
        };
        let route_override = match sc.queries.route.as_str() {
            "local" => RouteOverride::Local,
            "vote" => RouteOverride::Vote,
            "cloud" => RouteOverride::Cloud,
            _ => RouteOverride::Auto,
        };
        let mut sim = Sim {
            seed,
            rng,
            now: 0,
            end_us: us(sc.virtual_s * 1000.0),
            // 250 µs buckets, 4 s horizon: gossip and replies land in the wheel.
            queue: EventQueue::new(250, 16_384),
            nodes: Vec::with_capacity(cap),
            reach: vec![DOWN; cap],
            gossip: vec![GossipSlot::default(); cap * cap],
            ids,
            id_index,
            slots_used: 0,
            bank,
            queries: BTreeMap::new(),
            finished: BTreeSet::new(),
            next_query: 1,
            loss: sc.network.loss,
            groups: 1,
            crashed: Vec::new(),
            booted_initial: 0,
            thresholds: Thresholds {
                tau_local: sc.queries.tau_local,
                tau_vote: sc.queries.tau_vote,
            },
            election_cfg,
            route_override,
            cloud_nodes: sc.cloud_indices(),
            // Derived from the seed: the run stays reproducible.
            swarm_key: sc.attack.keyed.then(|| {
                SwarmKey::from_seed(
                    splitmix(seed ^ 0x0051_574B_4559)
                        .to_le_bytes()
                        .repeat(4)
                        .try_into()
                        .unwrap_or([7; 32]),
                )
            }),
            sybil_ids: (0..sc.attack.sybils).map(sybil_id).collect(),
            m: Metrics::default(),
            ck: Checker::default(),
            sc,
        };
        for slot in 0..cap {
            let node = sim.make_node(slot);
            sim.nodes.push(node);
        }
        sim.slots_used = sim.sc.nodes;
        for v in 0..sim.sc.nodes {
            let at = sim.rng.random_range(0..=sim.sc.timing.boot_spread_ms * 1000);
            sim.push(at, Ev::Boot(v as u32));
        }
        let times: Vec<u64> = sim.sc.events.iter().map(|e| us(e.at_s * 1000.0)).collect();
        for (i, at) in times.into_iter().enumerate() {
            sim.push(at, Ev::Scenario(i));
        }
        let churn = sim.sc.churn.clone();
        if churn.end_s > churn.start_s {
            if churn.leave_per_min > 0.0 {
                let at = us(churn.start_s * 1000.0) + sim.exp_us(churn.leave_per_min / 60.0);
                sim.push(at, Ev::ChurnLeave);
            }
            if churn.join_per_min > 0.0 {
                let at = us(churn.start_s * 1000.0) + sim.exp_us(churn.join_per_min / 60.0);
                sim.push(at, Ev::ChurnJoin);
            }
        }
        if sim.sc.queries.rate_per_s > 0.0 {
            let at = us(sim.sc.queries.start_s * 1000.0);
            sim.push(at, Ev::QueryArrive);
        }
        let ci = sim.sc.timing.check_interval_ms * 1000;
        sim.push(ci, Ev::Check);
        if sim.sc.attack.sybils > 0 {
            let at = sim.sc.timing.boot_spread_ms * 1000;
            sim.push(at, Ev::Sybils);
        }
        Ok(sim)
    }

    fn membership_cfg(&self) -> MembershipConfig {
        MembershipConfig {
            advert_interval_ms: self.sc.timing.advert_interval_ms,
            missed_adverts: self.sc.timing.advert_missed,
            election: self.election_cfg,
            max_peers: swarm_protocol::membership::DEFAULT_MAX_PEERS,
        }
    }

    fn make_node(&mut self, slot: usize) -> Node {
        let sc = &self.sc;
        let total_share: f64 = sc.models.iter().map(|m| m.share).sum();
        let mut x = self.rng.random::<f64>() * total_share;
        let mut model = sc.models.len() - 1;
        for (i, m) in sc.models.iter().enumerate() {
            if x < m.share {
                model = i;
                break;
            }
            x -= m.share;
        }
        let cores = [2u32, 4, 4, 8][self.rng.random_range(0..4usize)];
        let mem_mb = 1024 * self.rng.random_range(1..=8u64);
        let skew = sc.clock.skew_ms;
        let clock_offset_us = (self.rng.random_range(-1.0..=1.0) * skew * 1000.0) as i64;
        let drift_ppm = (self.rng.random_range(-1.0..=1.0) * sc.clock.drift_ppm) as i64;
        let cloud = self
            .cloud_nodes
            .iter()
            .position(|c| *c == slot)
            .map(|rank| CloudAccess {
                priority: if sc.cloud.priorities.is_empty() {
                    0
                } else {
                    sc.cloud.priorities[rank % sc.cloud.priorities.len()]
                },
                budget: sc.cloud.budget,
                reachable: true,
            });
        Node {
            state: NodeState::Unused,
            inc: 0,
            group: 0,
            clock_offset_us,
            drift_ppm,
            model,
            cores,
            mem_mb,
            cloud,
            mem: MembershipMachine::new(
                self.ids[slot].clone(),
                self.membership_cfg(),
                LocalState::idle("", ""),
                0,
                0,
            ),
            set_hash: 0,
            ticks: 0,
            busy_ring: [0; 4],
            liar: self.sc.attack.liars.contains(&slot),
            sybils_held: 0,
            mesh: Vec::new(),
            busy_until: 0,
            queue: 0,
            busy_acc_us: 0,
            cpu_load: 0.0,
        }
    }

    // ---- engine -----------------------------------------------------------------------------

    fn push(&mut self, at: u64, ev: Ev) {
        self.queue.push(at.max(self.now), ev);
    }

    fn exp_us(&mut self, rate_per_s: f64) -> u64 {
        let u: f64 = self.rng.random::<f64>().max(1e-12);
        us(-u.ln() / rate_per_s * 1000.0)
    }

    fn local_ms(&self, v: u32) -> u64 {
        let n = &self.nodes[v as usize];
        let t = self.now as i64;
        let local_us = t + n.clock_offset_us + t / 1_000_000 * n.drift_ppm;
        (EPOCH_MS + local_us / 1000).max(0) as u64
    }

    /// Runs to the end of the scenario (plus a drain for in-flight queries) and reports.
    pub fn run(mut self) -> Report {
        self.run_until(u64::MAX);
        self.report()
    }

    /// Processes events up to virtual time `until_us` (for tests that inspect mid-run state).
    pub fn run_until(&mut self, until_us: u64) {
        while let Some(at) = self.queue.peek_at() {
            if at > until_us {
                break;
            }
            if self.now >= self.end_us && (self.queries.is_empty() || self.now >= self.end_us + DRAIN_US) {
                break;
            }
            let Some(e) = self.queue.pop() else {
                break;
            };
            self.now = e.at;
            self.m.events += 1;
            self.dispatch(e.item);
        }
        self.now = self.now.max(until_us.min(self.end_us));
    }

    pub fn now_us(&self) -> u64 {
        self.now
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Boot(v) => self.boot(v),
            Ev::Tick { node, inc } => self.tick(node, inc),
            Ev::Gossip { to, from, msg } => self.on_gossip(to, from, msg),
            Ev::Scenario(i) => self.on_scenario(i),
            Ev::ChurnLeave => self.on_churn_leave(),
            Ev::ChurnJoin => self.on_churn_join(),
            Ev::ChurnRestart(v) => {
                if self.nodes[v as usize].state == NodeState::Down {
                    self.m.membership.restarts += 1;
                    self.boot(v);
                }
            }
            Ev::QueryArrive => self.on_query_arrive(),
            Ev::LocalDone(q) => self.on_local_done(q),
            Ev::VoteReq { q, voter, bytes } => self.on_vote_req(q, voter, &bytes),
            Ev::VoteDone {
                q,
                voter,
                inc,
                answer,
                started,
            } => self.on_vote_done(q, voter, inc, *answer, started),
            Ev::VoteReply { q, voter, reply } => self.on_vote_reply(q, voter, &reply),
            Ev::VoteFail { q, voter, reason } => self.on_vote_fail(q, voter, reason),
            Ev::VoteDeadline(q) => self.on_vote_deadline(q),
            Ev::EscReq {
                q,
                gw,
                attempt,
                bytes,
            } => self.on_esc_req(q, gw, attempt, &bytes),
            Ev::EscCloud {
                q,
                gw,
                inc,
                attempt,
                cloud_ms,
            } => self.on_esc_cloud(q, gw, inc, attempt, cloud_ms),
            Ev::EscReply {
                q,
                attempt,
                bytes,
                correct,
            } => self.on_esc_reply(q, attempt, &bytes, correct),
            Ev::EscFail { q, attempt } | Ev::EscDeadline { q, attempt } => self.escalation_failed(q, attempt),
            Ev::EscRetry(q) => self.retry_escalation(q),
            Ev::Check => self.on_check(),
            Ev::Sybils => self.on_sybils(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ids_look_like_libp2p_ids_and_differ() {
        let a = peer_id(0);
        assert_eq!(a.len(), 52);
        assert!(a.starts_with("12D3KooW"));
        assert_ne!(a, peer_id(1));
        assert_eq!(a, peer_id(0));
    }
}
