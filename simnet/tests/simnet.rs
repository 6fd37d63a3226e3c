//! Properties of the deterministic simulator: reproducibility, invariants on several seeds for
//! every scenario in configs/simnet, per-side gateways during a partition, replay of an answer
//! cache, and a checker that does catch a broken swarm.
//!
//! A failing case names its scenario and seed; rerun it with
//! `cargo run -p swarm-simnet --release -- run <scenario> --seed <seed>`.

use std::path::{Path, PathBuf};

use swarm_simnet::{Report, Scenario, Sim};

fn scenario(name: &str) -> Scenario {
    let path = Scenario::repo_dir().join(format!("{name}.toml"));
    Scenario::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn run(sc: Scenario, seed: u64) -> Report {
    Sim::new(sc, seed).expect("set up").run()
}

fn assert_healthy(r: &Report) {
    let ctx = format!("scenario {} seed {}", r.scenario, r.seed);
    assert_eq!(r.invariant_violations, 0, "{ctx}: {:#?}", r.violations);
    assert_eq!(r.lost_queries, 0, "{ctx}");
    assert_eq!(r.answered_twice, 0, "{ctx}");
    assert!(r.queries > 0, "{ctx}: no queries ran");
    assert_eq!(r.answered + r.aborted, r.queries, "{ctx}");
    assert!(r.convergence_ms.is_some(), "{ctx}: tables never converged");
    let routes = &r.routes;
    assert_eq!(
        routes.local + routes.vote + routes.cloud + routes.degraded,
        r.answered,
        "{ctx}"
    );
    assert!(r.gossip_messages > 0 && r.bytes_per_node_s > 0.0, "{ctx}");
}

#[test]
fn same_seed_gives_a_byte_identical_report() {
    for (name, virtual_s) in [
        ("lan-10", None),
        ("gateway-crash", None),
        ("office-100", Some(40.0)),
    ] {
        let mut sc = scenario(name);
        if let Some(v) = virtual_s {
            sc.virtual_s = v;
        }
        let a = serde_json::to_string(&run(sc.clone(), 7)).expect("json");
        let b = serde_json::to_string(&run(sc.clone(), 7)).expect("json");
        assert_eq!(a, b, "{name}: same seed, different report");
        let c = serde_json::to_string(&run(sc, 8)).expect("json");
        assert_ne!(a, c, "{name}: the seed should matter");
    }
}

#[test]
fn city_scale_report_is_byte_identical_too() {
    // The acceptance command (`run city-1000 --seed 1 --json`, twice) on a shorter window:
    // 1,000 nodes with churn and a gateway crash must not leak nondeterminism either.
    let mut sc = scenario("city-1000");
    sc.virtual_s = 10.0;
    let a = serde_json::to_string(&run(sc.clone(), 1)).expect("json");
    let b = serde_json::to_string(&run(sc, 1)).expect("json");
    assert_eq!(a, b, "city-1000: same seed, different report");
}

#[test]
fn json_report_has_the_keys_outside_checks_read() {
    let r = run(scenario("lan-10"), 1);
    let v: serde_json::Value = serde_json::to_value(&r).expect("json");
    for key in [
        "nodes",
        "virtual_s",
        "queries",
        "lost_queries",
        "convergence_ms",
        "elections",
        "failover_ms",
        "cloud_share",
        "accuracy",
        "latency_ms_p50",
        "latency_ms_p99",
        "invariant_violations",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["nodes"], 10);
    assert_eq!(v["invariant_violations"], 0);
}

#[test]
fn invariants_hold_on_several_seeds_small_scenarios() {
    for name in ["lan-10", "partition-50", "gateway-crash"] {
        for seed in 1..=3 {
            assert_healthy(&run(scenario(name), seed));
        }
    }
}

#[test]
fn invariants_hold_on_several_seeds_office_with_churn() {
    for seed in 1..=3 {
        let r = run(scenario("office-100"), seed);
        assert_healthy(&r);
        let m = &r.membership;
        assert!(
            m.joins + m.leaves + m.crashes > 0,
            "seed {seed}: no churn happened"
        );
        assert!(r.reconvergence_ms_max.is_some(), "seed {seed}");
    }
}

#[test]
fn invariants_hold_at_city_scale_briefly() {
    // The full 60 s run is the benchmark; tests keep a short window (boot, queries, churn start).
    for seed in [1, 2] {
        let mut sc = scenario("city-1000");
        sc.virtual_s = 14.0;
        let r = run(sc, seed);
        assert_healthy(&r);
        assert_eq!(r.nodes, 1000);
        assert!(r.elections >= 1, "seed {seed}: no gateway elected");
    }
}

#[test]
fn gateway_crash_fails_over_and_escalations_survive() {
    for seed in 1..=3 {
        let r = run(scenario("gateway-crash"), seed);
        assert_healthy(&r);
        assert!(
            r.failovers.len() >= 2,
            "seed {seed}: crash and cloud loss both fail over"
        );
        // 500 ms adverts: expiry after 1.5 s, plus detection and announcement.
        let worst = r.failover_ms.expect("a failover");
        assert!(worst < 3_000.0, "seed {seed}: failover took {worst} ms");
        assert!(r.routes.cloud > 0);
        assert_eq!(
            r.escalation.failed, 0,
            "seed {seed}: retries go to the new gateway"
        );
    }
}

#[test]
fn partition_gives_each_side_a_gateway_and_heal_converges_to_one() {
    let sc = scenario("partition-50");
    let settle_us = sc.timing.settle_ms() * 1000;
    for seed in 1..=3 {
        let mut sim = Sim::new(sc.clone(), seed).expect("set up");
        // Before the partition (20 s): one swarm, one gateway.
        sim.run_until(19_000_000);
        let c = sim.components();
        assert_eq!(c.len(), 1, "seed {seed}");
        assert!(c[0].is_settled(), "seed {seed}: {c:?}");
        // During (20-50 s): two components, each settled on its own gateway.
        sim.run_until(20_000_000 + settle_us);
        let c = sim.components();
        assert_eq!(c.len(), 2, "seed {seed}");
        assert!(c.iter().all(|x| x.is_settled()), "seed {seed}: {c:?}");
        assert_ne!(c[0].claimers, c[1].claimers, "seed {seed}: sides share a gateway");
        // After the heal (50 s): one component, one gateway again.
        sim.run_until(50_000_000 + settle_us);
        let c = sim.components();
        assert_eq!(c.len(), 1, "seed {seed}");
        assert!(c[0].is_settled(), "seed {seed}: {c:?}");
        assert_eq!(c[0].claimers.len(), 1);
        let r = sim.run();
        assert_healthy(&r);
    }
}

#[test]
fn replayed_answer_cache_drives_the_votes() {
    let mut sc = scenario("lan-10");
    sc.queries.answer_cache = vec![PathBuf::from("answer-cache.jsonl")];
    sc.base_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    sc.queries.rate_per_s = 3.0;
    sc.cloud.model = "qwen2.5-coder-1.5b".into();
    let r = run(sc.clone(), 1);
    assert_healthy(&r);
    assert!(r.vote.votes > 0);
    assert!(r.accuracy > 0.0 && r.accuracy <= 1.0);
    let again = run(sc, 1);
    assert_eq!(
        serde_json::to_string(&r).expect("json"),
        serde_json::to_string(&again).expect("json")
    );
}

#[test]
fn the_checker_catches_a_swarm_that_cannot_converge() {
    // 90 % gossip loss with a sparse mesh: peers keep expiring, tables never match the live set.
    let mut sc = scenario("lan-10");
    sc.network.loss = 0.9;
    sc.network.mesh_degree = 2;
    sc.network.mesh_degree_low = 1;
    sc.network.mesh_degree_high = 2;
    sc.virtual_s = 40.0;
    let r = run(sc, 1);
    assert!(r.invariant_violations > 0, "expected violations: {r:#?}");
    assert!(
        r.violations.iter().any(|v| v.contains("peer tables")),
        "{:?}",
        r.violations
    );
}

#[test]
fn every_scenario_file_parses() {
    let dir = Scenario::repo_dir();
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("configs/simnet") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 5, "expected the five scenarios, found {n}");
    for name in [
        "lan-10",
        "office-100",
        "partition-50",
        "gateway-crash",
        "city-1000",
        "liar-30",
        "sybil-30",
    ] {
        assert!(Scenario::resolve(name).is_ok(), "{name} does not resolve by name");
    }
}

#[test]
fn a_forged_gateway_claim_wins_an_open_swarm_but_not_a_keyed_one() {
    let open = run(scenario("liar-30"), 1);
    assert!(
        open.attack.liar_gateway_node_ms > 0,
        "the attack must work on an open swarm, or this test proves nothing"
    );
    for seed in [1, 2, 3] {
        let mut sc = scenario("liar-30");
        sc.attack.keyed = true;
        let r = run(sc, seed);
        assert_healthy(&r);
        assert_eq!(
            r.attack.liar_gateway_node_ms, 0,
            "seed {seed}: a node followed the liar"
        );
        assert_eq!(r.escalation.failed, 0, "seed {seed}");
        assert!(
            r.routes.cloud > 0,
            "seed {seed}: the honest gateway served no escalation"
        );
        assert!(
            r.gateway_zero_ms < 3_000.0,
            "seed {seed}: {} ms without a gateway",
            r.gateway_zero_ms
        );
    }
}

#[test]
fn a_sybil_flood_fills_an_open_swarm_but_leaves_a_keyed_one_untouched() {
    let open = run(scenario("sybil-30"), 1);
    assert!(open.attack.peak_peer_table > 1_000, "{:?}", open.attack);
    assert!(open.attack.sybil_voters_picked > 0, "{:?}", open.attack);
    let mut keyed = scenario("sybil-30");
    keyed.attack.keyed = true;
    let mut quiet = keyed.clone();
    quiet.attack.sybils = 0;
    let (keyed, quiet) = (run(keyed, 1), run(quiet, 1));
    assert_healthy(&keyed);
    assert!(keyed.attack.peak_peer_table < 30, "{:?}", keyed.attack);
    assert!(keyed.attack.rejected_adverts > 0);
    assert_eq!(keyed.attack.sybil_voters_picked, 0);
    // Votes exactly as without the attack.
    assert_eq!(keyed.vote, quiet.vote);
    assert_eq!(keyed.accuracy, quiet.accuracy);
    assert_eq!(keyed.routes, quiet.routes);
}
