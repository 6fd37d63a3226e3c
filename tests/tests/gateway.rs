//! The gateway and cloud escalation with real `slm-swarm` processes on loopback:
//! a cloud stand-in (`slm-swarm serve` requiring an API key and logging every
//! request), two cloud-capable nodes and one without cloud access. The elected
//! gateway is the same on every node and answers the third node's escalations;
//! the key is used (the stand-in checks it) but appears in no node's output at
//! debug level, in no API answer and not in the non-gateway node's memory;
//! `privacy: device` never reaches the stand-in; kill -9 of the gateway hands
//! the role to the other cloud node (the failover time is printed) and the
//! returning node waits out its hysteresis; a dead cloud, an exhausted budget
//! or no gateway at all gives a degraded answer, never a hang. `slm-swarm demo`
//! shows the local, vote and cloud routes and leaves no child running.
//!
//! The stand-in serves a tiny random model: answer quality is not under test here.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use swarm_tests::{
    bin, http_get, http_post, loopback_start_args, tiny_models, unique_ns, wait_for, NodeProc,
};

/// Advert period of the test nodes (`SLM_TEST_ADVERT_MS` overrides, e.g. 1000
/// to measure failover with the default interval).
fn interval_ms() -> u64 {
    std::env::var("SLM_TEST_ADVERT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

/// The nodes' `gateway.hysteresis_ms` (the default).
const HYSTERESIS_MS: u64 = 5_000;

const KEY_ENV: &str = "SLM_SWARM_TEST_CLOUD_KEY";

/// A fresh random key, so a leak cannot hide behind a well-known value.
fn random_key() -> String {
    use std::io::Read;
    let mut b = [0u8; 18];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("random bytes");
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("sk-test-{hex}")
}

struct Cloud<'a> {
    url: &'a str,
    model: &'a str,
    priority: i32,
}

/// `start` arguments; `boot` lists the nodes to dial. Each node is told of every
/// earlier one (a star around one bootstrap node is tested in `mesh.rs`).
fn node_args(
    ns: &str,
    model: &Path,
    dir: &Path,
    name: &str,
    boot: &[&str],
    cloud: Option<&Cloud>,
) -> Vec<String> {
    let mut a = loopback_start_args(&model.display().to_string(), ns);
    a.extend([
        "--name".into(),
        name.into(),
        "--advert-interval".into(),
        interval_ms().to_string(),
        "--threads".into(),
        "1".into(),
        "--identity".into(),
        dir.join(format!("{name}.key")).display().to_string(),
    ]);
    for b in boot {
        a.extend(["--bootstrap".into(), b.to_string()]);
    }
    if let Some(c) = cloud {
        // The operator's priority decides the gateway among cloud nodes, so which
        // one holds the role (after the election settles) is known in advance.
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, format!("[cloud]\npriority = {}\n", c.priority)).expect("config file");
        a.extend([
            "--config".into(),
            cfg.display().to_string(),
            "--cloud-url".into(),
            c.url.into(),
            "--cloud-model".into(),
            c.model.into(),
            "--cloud-key-env".into(),
            KEY_ENV.into(),
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

fn ask(n: &NodeProc, text: &str, swarm: Value) -> (u16, Value) {
    ask_url(&format!("{}/v1/chat/completions", n.http), text, swarm)
}

fn ask_url(url: &str, text: &str, swarm: Value) -> (u16, Value) {
    let body = json!({
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 8,
        "swarm": swarm,
    });
    http_post(url, &body).expect("chat request")
}

/// The stand-in's request log: one JSON object per request it received.
fn requests(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn chat_posts(log: &Path) -> usize {
    requests(log)
        .iter()
        .filter(|r| r["method"] == "POST" && r["path"] == "/v1/chat/completions")
        .count()
}

/// Whether `needle` occurs in any writable memory mapping of process `pid`
/// (heap, stacks, anonymous maps): where a key received from a peer would be.
fn in_process_memory(pid: u32, needle: &[u8]) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let Some((lo, hi)) = range.split_once('-') else {
            continue;
        };
        let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else {
            continue;
        };
        let mut buf = vec![0u8; (hi - lo) as usize];
        if mem.seek(SeekFrom::Start(lo)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue; // guard pages and the like
        }
        if buf.windows(needle.len()).any(|w| w == needle) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A scratch directory for logs, kept (and printed) when `SLM_TEST_KEEP` is set.
struct Scratch(#[allow(dead_code)] Option<tempfile::TempDir>, std::path::PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().to_path_buf();
        if std::env::var_os("SLM_TEST_KEEP").is_some() {
            println!("logs kept in {}", p.display());
            let _ = t.keep();
            return Scratch(None, p);
        }
        Scratch(Some(t), p)
    }

    fn path(&self) -> &Path {
        &self.1
    }
}

#[test]
fn gateway_escalates_for_peers_keeps_the_key_and_fails_over() {
    let dir = Scratch::new();
    let m = tiny_models(dir.path(), &["tiny-a", "tiny-b", "tiny-c", "tiny-cloud"]);
    let ns = unique_ns("gw");
    let key = random_key();
    let debug = ("RUST_LOG", "debug");

    // The cloud stand-in requires the key, as a real cloud API does.
    let req_log = dir.path().join("requests.jsonl");
    let stand_in_args: Vec<String> = vec![
        "serve".into(),
        "--model".into(),
        m[3].display().to_string(),
        "--http".into(),
        "127.0.0.1:0".into(),
        "--name".into(),
        "cloud-stand-in".into(),
        "--api-key-env".into(),
        KEY_ENV.into(),
        "--request-log".into(),
        req_log.display().to_string(),
        "--threads".into(),
        "1".into(),
    ];
    let mut stand_in = NodeProc::spawn_env(
        "stand-in",
        &stand_in_args,
        dir.path(),
        None,
        &[(KEY_ENV, &key), debug],
    )
    .expect("start the cloud stand-in");
    let cloud_url = format!("{}/v1", stand_in.http);
    // Without the key the stand-in refuses: the key check is real.
    let (st, _) = http_get(&format!("{cloud_url}/models")).expect("stand-in");
    assert_eq!(st, 401, "the stand-in must require the key");
    // a is preferred (priority 10) over b (priority 0).
    let cloud_a = Cloud {
        url: &cloud_url,
        model: "tiny-cloud",
        priority: 10,
    };
    let cloud_b = Cloud {
        priority: 0,
        ..cloud_a
    };

    let with_key = [(KEY_ENV, key.as_str()), debug];
    let a = NodeProc::spawn_env(
        "a",
        &node_args(&ns, &m[0], dir.path(), "a", &[], Some(&cloud_a)),
        dir.path(),
        None,
        &with_key,
    )
    .expect("start a");
    let boot_a = a.addr_on("127.0.0.1").expect("a's loopback address");
    let b = NodeProc::spawn_env(
        "b",
        &node_args(&ns, &m[1], dir.path(), "b", &[&boot_a], Some(&cloud_b)),
        dir.path(),
        None,
        &with_key,
    )
    .expect("start b");
    let boot_b = b.addr_on("127.0.0.1").expect("b's loopback address");
    // c has no cloud access and no key in its environment.
    let c = NodeProc::spawn_env(
        "c",
        &node_args(&ns, &m[2], dir.path(), "c", &[&boot_a, &boot_b], None),
        dir.path(),
        None,
        &[debug],
    )
    .expect("start c");
    let mut nodes = vec![a, b, c];
    let ids: Vec<String> = nodes.iter().map(|n| n.peer_id.clone()).collect();
    for n in &nodes {
        let seen = wait_for(Duration::from_secs(30), || {
            let p = n.peer_ids();
            ids.iter().filter(|i| **i != n.peer_id).all(|i| p.contains(i))
        });
        assert!(
            seen.is_some(),
            "{} never saw all peers: {:?}",
            n.name,
            n.peer_ids()
        );
    }

    // One gateway, the same on every node: the preferred cloud node a (b may hold
    // the role first, until a has ranked better for the hysteresis period).
    let agreed = wait_for(Duration::from_secs(30), || {
        nodes
            .iter()
            .all(|n| gateway_of(n).as_deref() == Some(ids[0].as_str()))
    });
    assert!(
        agreed.is_some(),
        "no agreed gateway: {:?} (a = {})",
        nodes.iter().map(gateway_of).collect::<Vec<_>>(),
        ids[0]
    );
    let gw = ids[0].clone();
    let (_, g) = nodes[2].get("/v1/swarm/gateway").expect("gateway");
    assert!(g["term"].as_u64().unwrap_or(0) >= 1, "{g}");
    assert!(g["since_ms"].as_u64().is_some(), "{g}");
    // `slm-swarm peers` shows it too.
    let out = Command::new(bin())
        .args(["peers", "--node", &nodes[2].http])
        .output()
        .expect("slm-swarm peers");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("gateway: {gw} (term")), "{text}");

    // c escalates through the gateway; the gateway's call carried the key.
    let before = chat_posts(&req_log);
    let t = Instant::now();
    let (st, r) = ask(&nodes[2], "the cat sat on", json!({"route": "cloud"}));
    assert_eq!(st, 200, "{r}");
    println!("escalation from c answered in {} ms", t.elapsed().as_millis());
    let s = &r["swarm"];
    assert_eq!(s["route"], json!("cloud"), "{r}");
    assert_eq!(s["gateway"], json!(gw), "{r}");
    assert_eq!(s["degraded"], json!(false), "{r}");
    assert_eq!(r["model"], json!("tiny-cloud"), "{r}");
    assert!(s["cloud_ms"].as_u64().is_some(), "{r}");
    assert_eq!(
        chat_posts(&req_log),
        before + 1,
        "exactly one cloud call per escalation"
    );
    // Every request after this test's own keyless one came from a gateway-capable node, with the key.
    let reqs = requests(&req_log);
    assert_eq!(reqs.first().map(|q| &q["auth"]), Some(&json!("missing")));
    assert!(reqs.len() >= 2);
    for q in &reqs[1..] {
        assert_eq!(
            q["auth"],
            json!("valid"),
            "every request from the nodes carries the key: {q}"
        );
    }

    // A streaming client gets the cloud's answer as SSE chunks, provenance last.
    let (st, sse) = http_post(
        &format!("{}/v1/chat/completions", nodes[2].http),
        &json!({"messages": [{"role": "user", "content": "the sun rose over"}], "max_tokens": 8,
                "stream": true, "swarm": {"route": "cloud"}}),
    )
    .expect("streaming request");
    assert_eq!(st, 200, "{sse}");
    let events: Vec<Value> = sse
        .as_str()
        .unwrap_or("")
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("chunk JSON"))
        .collect();
    assert!(sse.as_str().unwrap_or("").contains("data: [DONE]"), "{sse}");
    let last = events.last().expect("chunks");
    assert_eq!(last["swarm"]["route"], json!("cloud"), "{last}");
    assert_eq!(last["swarm"]["gateway"], json!(gw), "{last}");
    assert!(
        events.iter().all(|e| e["object"] == "chat.completion.chunk"),
        "{sse}"
    );

    // Privacy device or swarm: the query never reaches the stand-in.
    for privacy in ["device", "swarm"] {
        let before = chat_posts(&req_log);
        let (st, r) = ask(
            &nodes[2],
            "my private medical record says",
            json!({"route": "cloud", "privacy": privacy}),
        );
        assert_eq!(st, 200, "{r}");
        assert_ne!(r["swarm"]["route"], json!("cloud"), "{r}");
        assert_eq!(r["swarm"]["degraded"], json!(true), "{r}");
        let reason = r["swarm"]["degraded_reason"].as_str().unwrap_or("");
        assert!(reason.contains("privacy"), "{reason}");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            chat_posts(&req_log),
            before,
            "privacy {privacy} reached the cloud"
        );
    }

    // The key is in no output of any process (debug logs included), in no API
    // answer of the node without cloud, and not in that node's memory.
    let (_, peers) = nodes[2].get("/v1/swarm/peers").expect("peers");
    assert!(!peers.to_string().contains(&key));
    assert!(!r.to_string().contains(&key));
    #[cfg(target_os = "linux")]
    match in_process_memory(nodes[2].child.id(), key.as_bytes()) {
        Ok(found) => assert!(!found, "the key reached the node without cloud access"),
        Err(e) => println!("memory scan of c skipped: {e}"),
    }

    // kill -9 the gateway: the other cloud node takes over. One escalation is sent
    // right after the kill, while c still sees the dead gateway: it must be
    // retried through the new one (or come back degraded), never hang.
    let survivor = ids[1].clone();
    let c_url = format!("{}/v1/chat/completions", nodes[2].http);
    let killed = Instant::now();
    nodes[0].kill9();
    let in_flight = std::thread::spawn(move || {
        let r = ask_url(&c_url, "the fish swam under", json!({"route": "cloud"}));
        (killed.elapsed(), r)
    });
    let switched = wait_for(Duration::from_secs(30), || {
        gateway_of(&nodes[2]).as_deref() == Some(survivor.as_str())
            && gateway_of(&nodes[1]).as_deref() == Some(survivor.as_str())
    })
    .map(|_| killed.elapsed())
    .expect("the survivors never agreed on the new gateway");
    let (st, r) = ask(&nodes[2], "the dog ran to", json!({"route": "cloud"}));
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["swarm"]["route"], json!("cloud"), "{r}");
    assert_eq!(r["swarm"]["gateway"], json!(survivor), "{r}");
    let answered = killed.elapsed();
    let (in_flight_ms, (st, r)) = in_flight.join().expect("in-flight escalation");
    assert_eq!(st, 200, "{r}");
    let retried = r["swarm"]["route"] == "cloud";
    if retried {
        assert_eq!(r["swarm"]["gateway"], json!(survivor), "{r}");
    } else {
        assert_eq!(r["swarm"]["degraded"], json!(true), "{r}");
    }
    println!(
        "failover (advert interval {} ms, 3 missed adverts): both survivors saw the new gateway {} ms \
         after the kill; c's next escalation succeeded {} ms after the kill; the escalation sent at the \
         kill to the dead gateway {} after {} ms",
        interval_ms(),
        switched.as_millis(),
        answered.as_millis(),
        if retried {
            "was retried through the new gateway and answered"
        } else {
            "came back degraded"
        },
        in_flight_ms.as_millis()
    );

    // The old gateway returns (same identity, higher priority): it must not take
    // the role back before it has ranked better for the hysteresis period.
    let mut args_a = node_args(&ns, &m[0], dir.path(), "a", &[&boot_b], Some(&cloud_a));
    args_a.extend([
        "--bootstrap".into(),
        nodes[2].addr_on("127.0.0.1").expect("c's address"),
    ]);
    // The returning process cannot rank itself better before it exists, so the
    // role must stay with b for at least the hysteresis from here.
    let t_restart = Instant::now();
    let back = NodeProc::spawn_env("a-again", &args_a, dir.path(), None, &with_key).expect("restart a");
    assert_eq!(back.peer_id, ids[0], "same identity file, same peer id");
    let seen = wait_for(Duration::from_secs(30), || nodes[2].peer_ids().contains(&ids[0]))
        .expect("c never saw a again");
    let t_seen = Instant::now();
    let retaken = wait_for(Duration::from_secs(60), || {
        let g = gateway_of(&nodes[2]);
        assert!(g.is_some(), "c lost the gateway while a returned");
        g.as_deref() == Some(ids[0].as_str())
    })
    .expect("a (higher priority) never took the role back");
    let held = t_restart.elapsed();
    println!(
        "a returned: c saw it {} ms after it was up; a took the role back {} ms after its restart \
         began ({} ms after c saw it; hysteresis {} ms)",
        seen.as_millis(),
        held.as_millis(),
        t_seen.elapsed().as_millis(),
        HYSTERESIS_MS
    );
    assert!(
        held >= Duration::from_millis(HYSTERESIS_MS),
        "a took the role back {held:?} after its restart ({retaken:?} after c saw it), before its \
         hysteresis of {HYSTERESIS_MS} ms"
    );
    nodes.push(back);

    // The cloud goes down: an escalation comes back degraded with the reason, fast.
    stand_in.kill9();
    let t = Instant::now();
    let (st, r) = ask(&nodes[2], "the bird flew over", json!({"route": "cloud"}));
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["swarm"]["degraded"], json!(true), "{r}");
    let reason = r["swarm"]["degraded_reason"].as_str().unwrap_or("");
    assert!(reason.contains("cloud"), "{reason}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "hung for {:?}",
        t.elapsed()
    );
    println!(
        "cloud down: degraded after {} ms: {reason}",
        t.elapsed().as_millis()
    );

    for n in nodes.iter().chain(std::iter::once(&stand_in)) {
        let out = n.output();
        assert!(!out.is_empty(), "{} printed nothing", n.name);
        assert!(!out.contains(&key), "the key appears in the output of {}", n.name);
    }
    // The debug logs were really on (so the grep above covered them).
    assert!(
        nodes[2].output().contains("DEBUG"),
        "c's logs are not at debug level"
    );
}

#[test]
fn no_gateway_means_a_degraded_answer_not_a_hang() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = tiny_models(dir.path(), &["tiny-p", "tiny-q"]);
    let ns = unique_ns("nogw");
    let p = NodeProc::spawn(
        "p",
        &node_args(&ns, &m[0], dir.path(), "p", &[], None),
        dir.path(),
        None,
    )
    .expect("start p");
    let boot = p.addr_on("127.0.0.1").expect("p's loopback address");
    let q = NodeProc::spawn(
        "q",
        &node_args(&ns, &m[1], dir.path(), "q", &[&boot], None),
        dir.path(),
        None,
    )
    .expect("start q");
    wait_for(Duration::from_secs(30), || p.peer_ids().contains(&q.peer_id)).expect("p never saw q");
    let (st, g) = q.get("/v1/swarm/gateway").expect("gateway");
    assert_eq!((st, &g), (200, &json!({"peer_id": null})));
    let t = Instant::now();
    let (st, r) = ask(&q, "the cat sat on", json!({"route": "cloud"}));
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["swarm"]["degraded"], json!(true), "{r}");
    assert_ne!(r["swarm"]["route"], json!("cloud"), "{r}");
    let reason = r["swarm"]["degraded_reason"].as_str().unwrap_or("");
    assert!(reason.contains("gateway"), "{reason}");
    assert!(!r["choices"][0]["message"]["content"].is_null(), "{r}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "hung for {:?}",
        t.elapsed()
    );
}

#[test]
fn exhausted_cloud_budget_degrades_the_next_escalation() {
    let dir = Scratch::new();
    let m = tiny_models(dir.path(), &["tiny-g", "tiny-h", "tiny-cloud"]);
    let ns = unique_ns("budget");
    let stand_in = NodeProc::spawn(
        "stand-in",
        &[
            "serve".into(),
            "--model".into(),
            m[2].display().to_string(),
            "--http".into(),
            "127.0.0.1:0".into(),
            "--threads".into(),
            "1".into(),
        ],
        dir.path(),
        None,
    )
    .expect("stand-in");
    // The gateway may call the cloud once a minute.
    let cfg = dir.path().join("g.toml");
    std::fs::write(
        &cfg,
        format!(
            "[cloud]\nbase_url = \"{}/v1\"\nmodel = \"tiny-cloud\"\nmax_calls_per_minute = 1\n",
            stand_in.http
        ),
    )
    .expect("config");
    let mut ga = node_args(&ns, &m[0], dir.path(), "g", &[], None);
    ga.extend(["--config".into(), cfg.display().to_string()]);
    let g = NodeProc::spawn("g", &ga, dir.path(), None).expect("start g");
    let boot = g.addr_on("127.0.0.1").expect("g's address");
    let h = NodeProc::spawn(
        "h",
        &node_args(&ns, &m[1], dir.path(), "h", &[&boot], None),
        dir.path(),
        None,
    )
    .expect("start h");
    wait_for(Duration::from_secs(30), || {
        gateway_of(&h).as_deref() == Some(g.peer_id.as_str())
    })
    .expect("h never saw g as gateway");
    let (st, r) = ask(&h, "the cat sat on", json!({"route": "cloud"}));
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        r["swarm"]["route"],
        json!("cloud"),
        "the first call is within budget: {r}"
    );
    let t = Instant::now();
    let (st, r) = ask(&h, "the dog ran to", json!({"route": "cloud"}));
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["swarm"]["degraded"], json!(true), "{r}");
    assert_ne!(r["swarm"]["route"], json!("cloud"), "{r}");
    let reason = r["swarm"]["degraded_reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("budget") || reason.contains("gateway"),
        "{reason}"
    );
    assert!(!r["choices"][0]["message"]["content"].is_null(), "{r}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "hung for {:?}",
        t.elapsed()
    );
    println!(
        "budget exhausted: degraded after {} ms: {reason}",
        t.elapsed().as_millis()
    );
}

#[test]
fn demo_shows_every_route_and_stops_its_children() {
    let dir = Scratch::new();
    let m = tiny_models(dir.path(), &["tiny-d1", "tiny-d2", "tiny-d3", "tiny-dcloud"]);
    let q = dir.path().join("questions.jsonl");
    std::fs::write(
        &q,
        concat!(
            "{\"question\": \"the cat sat on\", \"route\": \"local\"}\n",
            "{\"question\": \"Which is a mammal?\", \"kind\": \"mcq\", \"route\": \"vote\", ",
            "\"choices\": [{\"label\": \"A\", \"text\": \"shark\"}, {\"label\": \"B\", \"text\": \"dolphin\"}]}\n",
            "{\"question\": \"the dog ran to\", \"route\": \"cloud\"}\n",
            "{\"question\": \"the bird flew over\"}\n",
        ),
    )
    .expect("questions");
    let logs = dir.path().join("demo-logs");
    let mut args: Vec<String> = vec!["demo".into()];
    for p in &m[..3] {
        args.extend(["--model".into(), p.display().to_string()]);
    }
    args.extend([
        "--cloud-model".into(),
        m[3].display().to_string(),
        "--questions".into(),
        q.display().to_string(),
        "--no-fetch".into(),
        "--json".into(),
        "--log-dir".into(),
        logs.display().to_string(),
    ]);
    let out = Command::new(bin()).args(&args).output().expect("slm-swarm demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}");
    assert!(stderr.contains("swarm ready"), "{stderr}");
    let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON row"))
        .collect();
    assert_eq!(rows.len(), 4, "{rows:?}");
    let routes: Vec<&str> = rows.iter().map(|r| r["route"].as_str().unwrap_or("")).collect();
    assert_eq!(&routes[..3], ["local", "vote", "cloud"], "{rows:?}");
    assert_eq!(rows[2]["gateway_node"], json!("node-1"), "{}", rows[2]);
    assert!(rows[1]["voters"].as_u64().unwrap_or(0) >= 2, "{}", rows[1]);
    assert!(rows.iter().all(|r| r["error"].is_null()), "{rows:?}");
    // Every child is gone: no process runs with the demo's log directory in its arguments.
    let needle = logs.display().to_string();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect();
    assert!(left.is_empty(), "children still running: {left:?}");
}
