//! The mesh outlives its bootstrap node, with real `slm-swarm` processes on
//! loopback and default advert timing: a star (g1 gateway and the only
//! bootstrap, g2 cloud-capable, n3 without cloud; g2 and n3 told of g1 only).
//! Nodes dial the peers they hear of in adverts, so after `kill -9` of g1, n3
//! sees g2 as the new gateway and its next escalation reaches the cloud
//! stand-in through g2. n3 restarted with no bootstrap at all rejoins from its
//! peers file.
//!
//! `star_failover_timing` (ignored; `bench/star-failover.sh`) repeats the kill
//! and prints the median time from the kill to n3 naming the new gateway.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use swarm_tests::{http_post, loopback_start_args, tiny_models, unique_ns, wait_for, NodeProc};

/// A scratch directory for logs, kept (and printed) when `SLM_TEST_KEEP` is set.
fn scratch() -> (Option<tempfile::TempDir>, PathBuf) {
    let t = tempfile::tempdir().expect("tmp");
    let p = t.path().to_path_buf();
    if std::env::var_os("SLM_TEST_KEEP").is_some() {
        println!("logs kept in {}", p.display());
        let _ = t.keep();
        return (None, p);
    }
    (Some(t), p)
}

/// `start` arguments with default advert timing; `boot` = nodes to dial;
/// `cloud` = (stand-in URL, priority) for a cloud-capable node.
fn node_args(
    ns: &str,
    model: &Path,
    dir: &Path,
    name: &str,
    boot: &[&str],
    cloud: Option<(&str, i32)>,
) -> Vec<String> {
    let mut a = loopback_start_args(&model.display().to_string(), ns);
    a.extend([
        "--name".into(),
        name.into(),
        "--threads".into(),
        "1".into(),
        "--identity".into(),
        dir.join(format!("{name}.key")).display().to_string(),
    ]);
    for b in boot {
        a.extend(["--bootstrap".into(), b.to_string()]);
    }
    if let Some((url, priority)) = cloud {
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, format!("[cloud]\npriority = {priority}\n")).expect("config file");
        a.extend([
            "--config".into(),
            cfg.display().to_string(),
            "--cloud-url".into(),
            url.into(),
            "--cloud-model".into(),
            "tiny-cloud".into(),
        ]);
    }
    a
}

fn gateway_of(n: &NodeProc) -> Option<String> {
    match n.get("/v1/swarm/gateway") {
        Ok((200, v)) => v["peer_id"].as_str().map(String::from),
        _ => None,
    }
}

fn escalate(n: &NodeProc, text: &str) -> (u16, Value) {
    let body = json!({
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 8,
        "swarm": {"route": "cloud"},
    });
    http_post(&format!("{}/v1/chat/completions", n.http), &body).expect("chat request")
}

/// Chat completions the cloud stand-in received (one JSON line per request).
fn cloud_calls(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["method"] == "POST" && r["path"] == "/v1/chat/completions")
        .count()
}

/// Peer ids in a node's peers file (beside its identity key).
fn saved_peers(dir: &Path, name: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("{name}.peers.json")))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| {
            v["peers"].as_array().map(|a| {
                a.iter()
                    .filter_map(|p| p["peer"].as_str().map(String::from))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// The star: a stand-in, g1 (preferred gateway, the only bootstrap), g2
/// (cloud-capable), n3; returns once every node sees the others, g1 is the
/// gateway everywhere and n3 has reached g2 directly (its peers file says so).
struct Star {
    models: Vec<PathBuf>,
    ns: String,
    req_log: PathBuf,
    stand_in: NodeProc,
    g1: NodeProc,
    g2: NodeProc,
    n3: NodeProc,
}

impl Star {
    fn start(dir: &Path, tag: &str) -> Star {
        let models = tiny_models(dir, &["tiny-g1", "tiny-g2", "tiny-n3", "tiny-cloud"]);
        let ns = unique_ns(tag);
        let req_log = dir.join(format!("{tag}-requests.jsonl"));
        let stand_in = NodeProc::spawn(
            &format!("{tag}-stand-in"),
            &[
                "serve".into(),
                "--model".into(),
                models[3].display().to_string(),
                "--http".into(),
                "127.0.0.1:0".into(),
                "--request-log".into(),
                req_log.display().to_string(),
                "--threads".into(),
                "1".into(),
            ],
            dir,
            None,
        )
        .expect("start the cloud stand-in");
        let url = format!("{}/v1", stand_in.http);
        let g1 = NodeProc::spawn(
            "g1",
            &node_args(&ns, &models[0], dir, "g1", &[], Some((&url, 10))),
            dir,
            None,
        )
        .expect("start g1");
        let boot = g1.addr_on("127.0.0.1").expect("g1's loopback address");
        let g2 = NodeProc::spawn(
            "g2",
            &node_args(&ns, &models[1], dir, "g2", &[&boot], Some((&url, 0))),
            dir,
            None,
        )
        .expect("start g2");
        let n3 = NodeProc::spawn(
            "n3",
            &node_args(&ns, &models[2], dir, "n3", &[&boot], None),
            dir,
            None,
        )
        .expect("start n3");
        let star = Star {
            models,
            ns,
            req_log,
            stand_in,
            g1,
            g2,
            n3,
        };
        let nodes = [&star.g1, &star.g2, &star.n3];
        let ids: Vec<&str> = nodes.iter().map(|n| n.peer_id.as_str()).collect();
        for n in nodes {
            wait_for(Duration::from_secs(30), || {
                let p = n.peer_ids();
                ids.iter()
                    .filter(|i| **i != n.peer_id)
                    .all(|i| p.iter().any(|x| x == i))
            })
            .unwrap_or_else(|| panic!("{} never saw all peers: {:?}", n.name, n.peer_ids()));
        }
        wait_for(Duration::from_secs(30), || {
            nodes.iter().all(|n| gateway_of(n).as_deref() == Some(ids[0]))
        })
        .unwrap_or_else(|| panic!("no agreed gateway g1: {:?}", nodes.map(gateway_of)));
        // n3 was told of g1 only: g2 in its peers file means it dialled g2 itself.
        wait_for(Duration::from_secs(20), || {
            saved_peers(dir, "n3").contains(&star.g2.peer_id)
        })
        .unwrap_or_else(|| panic!("n3 never reached g2: {:?}", saved_peers(dir, "n3")));
        star
    }

    /// kill -9 g1; the time until n3 names g2 as its gateway (`None` after `within`).
    fn kill_gateway(&mut self, within: Duration) -> Option<Duration> {
        let killed = Instant::now();
        self.g1.kill9();
        wait_for(within, || {
            gateway_of(&self.n3).as_deref() == Some(self.g2.peer_id.as_str())
        })
        .map(|_| killed.elapsed())
    }
}

#[test]
fn star_survives_its_bootstrap_gateway_and_rejoins_from_the_peers_file() {
    let (_keep, dir) = scratch();
    let mut star = Star::start(&dir, "star");

    // Through g1 first: the escalation path works before the kill.
    let before = cloud_calls(&star.req_log);
    let (st, r) = escalate(&star.n3, "the cat sat on");
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["swarm"]["route"], json!("cloud"), "{r}");
    assert_eq!(r["swarm"]["gateway"], json!(star.g1.peer_id), "{r}");
    assert_eq!(cloud_calls(&star.req_log), before + 1);

    // Generous bound for a loaded CI machine; the 3 s target is measured by
    // `star_failover_timing`.
    let took = star.kill_gateway(Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "n3 has no new gateway 10 s after the kill: {:?}",
            gateway_of(&star.n3)
        )
    });
    println!(
        "star failover: n3 named g2 the gateway {} ms after kill -9 of g1",
        took.as_millis()
    );
    let before = cloud_calls(&star.req_log);
    let (st, r) = escalate(&star.n3, "the dog ran to");
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["swarm"]["route"], json!("cloud"), "{r}");
    assert_eq!(r["swarm"]["gateway"], json!(star.g2.peer_id), "{r}");
    assert_eq!(r["swarm"]["degraded"], json!(false), "{r}");
    assert_eq!(
        cloud_calls(&star.req_log),
        before + 1,
        "the stand-in saw the escalation"
    );

    // n3 restarts with no bootstrap at all (and no mDNS): its peers file leads it back to g2.
    star.n3
        .terminate(Duration::from_secs(15))
        .expect("n3 stops on SIGTERM");
    assert!(
        saved_peers(&dir, "n3").contains(&star.g2.peer_id),
        "n3's peers file: {:?}",
        saved_peers(&dir, "n3")
    );
    let n3 = NodeProc::spawn(
        "n3-again",
        &node_args(&star.ns, &star.models[2], &dir, "n3", &[], None),
        &dir,
        None,
    )
    .expect("restart n3");
    let g2 = star.g2.peer_id.clone();
    wait_for(Duration::from_secs(20), || {
        gateway_of(&n3).as_deref() == Some(g2.as_str())
    })
    .unwrap_or_else(|| panic!("restarted n3 never rejoined: peers {:?}", n3.peer_ids()));
    let (st, r) = escalate(&n3, "the bird flew over");
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["swarm"]["gateway"], json!(g2), "{r}");
    assert_eq!(r["swarm"]["route"], json!("cloud"), "{r}");
    drop(star.stand_in);
}

/// The failover figure: the star `SLM_FAILOVER_RUNS` times (default 5), kill -9
/// of g1 each time; prints every time and the median (kill → n3's
/// `GET /v1/swarm/gateway` names g2).
#[test]
#[ignore = "measurement: bench/star-failover.sh"]
fn star_failover_timing() {
    let runs: usize = std::env::var("SLM_FAILOVER_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut times = Vec::new();
    for i in 0..runs {
        let (_keep, dir) = scratch();
        let mut star = Star::start(&dir, &format!("fo{i}"));
        // Kill at a random point of g1's advert period, as a crash would.
        let jitter = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_millis() as u64)
            .unwrap_or(0);
        std::thread::sleep(Duration::from_millis(500 + jitter));
        let t = star
            .kill_gateway(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("run {i}: no new gateway within 30 s"));
        println!("run {}: failover {} ms", i + 1, t.as_millis());
        times.push(t);
    }
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "star failover, median of {runs}: {} ms (all: {:?} ms)",
        median.as_millis(),
        times.iter().map(|t| t.as_millis()).collect::<Vec<_>>()
    );
}
