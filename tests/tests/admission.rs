//! A keyed swarm with real `slm-swarm` processes on loopback: the owner creates
//! a swarm key and invites g (cloud role) and h (member) with the CLI; both
//! start with the join token and their certificate, h sees g as gateway and its
//! escalation reaches the cloud stand-in through g. Then an outsider (a libp2p
//! network in this process, same namespace, fresh key, no certificate) dials g
//! and sends valid vote, query and escalate requests: all refused, nothing in
//! the stand-in's request log; its signed adverts appear in no peer table; g
//! disconnects it. A start with a certificate of another swarm fails with a hint.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use serde_json::{json, Value};
use swarm_node::network::{self, Limits, NetConfig, TransportKind};
use swarm_protocol::{
    encode_msg, Advert, Capacity, ChatMessage, CloudStatus, ErrorCode, EscalateFrame, EscalateReply,
    EscalateRequest, GatewayClaim, QueryReply, QueryRequest, Task, VoteReply, VoteRequest,
};
use swarm_tests::{bin, http_post, loopback_start_args, tiny_models, unique_ns, wait_for, NodeProc};

/// Runs `slm-swarm <args>` and parses its JSON output.
fn cli_json(args: &[&str]) -> Value {
    let out = Command::new(bin()).args(args).output().expect("run slm-swarm");
    assert!(
        out.status.success(),
        "slm-swarm {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn gateway_of(n: &NodeProc) -> Option<String> {
    match n.get("/v1/swarm/gateway") {
        Ok((200, v)) => v["peer_id"].as_str().map(String::from),
        _ => None,
    }
}

fn self_admitted(n: &NodeProc) -> Value {
    let (st, v) = n.get("/v1/swarm/peers").expect("peers");
    assert_eq!(st, 200, "{v}");
    v["self"]["admitted"].clone()
}

fn cloud_calls(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["method"] == "POST" && r["path"] == "/v1/chat/completions")
        .count()
}

/// A node's peer id, and a certificate for it written to `<name>.cert`.
fn invite(swarm_dir: &Path, dir: &Path, name: &str, role: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let id = cli_json(&[
        "swarm",
        "peer-id",
        "--identity",
        &key.display().to_string(),
        "--json",
    ]);
    let peer = id["peer_id"].as_str().expect("peer_id").to_string();
    let cert = dir.join(format!("{name}.cert"));
    let v = cli_json(&[
        "swarm",
        "invite",
        "--dir",
        &swarm_dir.display().to_string(),
        "--peer",
        &peer,
        "--role",
        role,
        "--out",
        &cert.display().to_string(),
        "--json",
    ]);
    assert_eq!(v["role"], json!(role), "{v}");
    (key, cert)
}

fn node_args(ns: &str, model: &Path, name: &str, key: &Path, token: &str, cert: &Path) -> Vec<String> {
    let mut a = loopback_start_args(&model.display().to_string(), ns);
    a.extend(
        [
            "--name",
            name,
            "--advert-interval",
            "500",
            "--threads",
            "1",
            "--identity",
            &key.display().to_string(),
            "--join",
            token,
            "--certificate",
            &cert.display().to_string(),
        ]
        .map(String::from),
    );
    a
}

fn msgs() -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: "user".into(),
        content: "the cat sat on".into(),
    }]
}

fn refused<T: std::fmt::Debug>(what: &str, r: &Result<T, network::NetError>, err_code: Option<ErrorCode>) {
    match (r, err_code) {
        (Err(_), _) => {}
        (Ok(_), Some(ErrorCode::Unauthorized)) => {}
        (Ok(v), _) => panic!("the outsider's {what} was answered: {v:?}"),
    }
}

#[test]
fn a_keyed_swarm_serves_members_and_refuses_outsiders() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let m = tiny_models(dir, &["tiny-g", "tiny-h", "tiny-cloud"]);
    let ns = unique_ns("auth");

    let req_log = dir.join("requests.jsonl");
    let stand_in = NodeProc::spawn(
        "stand-in",
        &[
            "serve".into(),
            "--model".into(),
            m[2].display().to_string(),
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
    .expect("stand-in");

    // The owner's side: a swarm key, and certificates for g (cloud) and h (member).
    let swarm_dir = dir.join("swarm");
    let init = cli_json(&[
        "swarm",
        "init",
        "--dir",
        &swarm_dir.display().to_string(),
        "--json",
    ]);
    let token = init["join_token"].as_str().expect("join_token").to_string();
    let (g_key, g_cert) = invite(&swarm_dir, dir, "g", "cloud");
    let (h_key, h_cert) = invite(&swarm_dir, dir, "h", "member");

    let mut ga = node_args(&ns, &m[0], "g", &g_key, &token, &g_cert);
    ga.extend([
        "--cloud-url".into(),
        format!("{}/v1", stand_in.http),
        "--cloud-model".into(),
        "tiny-cloud".into(),
    ]);
    let g = NodeProc::spawn("g", &ga, dir, None).expect("start g");
    let g_addr = g.addr_on("127.0.0.1").expect("g's address");
    let mut ha = node_args(&ns, &m[1], "h", &h_key, &token, &h_cert);
    ha.extend(["--bootstrap".into(), g_addr.clone()]);
    let h = NodeProc::spawn("h", &ha, dir, None).expect("start h");
    assert_eq!(self_admitted(&g), json!(true));
    assert_eq!(self_admitted(&h), json!(true));

    // The keyed swarm works end to end: h sees g as gateway and escalates through it.
    wait_for(Duration::from_secs(60), || {
        gateway_of(&h).as_deref() == Some(g.peer_id.as_str())
    })
    .unwrap_or_else(|| panic!("h never saw g as gateway:\n{}", h.output()));
    let before = cloud_calls(&req_log);
    let (st, r) = http_post(
        &format!("{}/v1/chat/completions", h.http),
        &json!({"messages": [{"role": "user", "content": "the cat sat on"}], "max_tokens": 8,
                "swarm": {"route": "cloud"}}),
    )
    .expect("chat");
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["swarm"]["route"], json!("cloud"), "{r}");
    assert_eq!(r["swarm"]["gateway"], json!(g.peer_id), "{r}");
    assert_eq!(cloud_calls(&req_log), before + 1);

    // The outsider: same namespace, fresh key, no certificate.
    let calls_before = cloud_calls(&req_log);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let g_peer: PeerId = g.peer_id.parse().expect("g's peer id");
    let g_multi: Multiaddr = g_addr.parse().expect("g's multiaddr");
    let outsider_id = rt.block_on(async {
        let key = Keypair::generate_ed25519();
        let me = key.public().to_peer_id();
        let (net, _events) = network::spawn(
            key,
            NetConfig {
                namespace: ns.clone(),
                listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr")],
                bootstrap: Vec::new(),
                mdns: false,
                transport: TransportKind::Quic,
                request_timeout: Duration::from_secs(20),
                idle_timeout: Duration::from_secs(60),
                heartbeat: Duration::from_millis(200),
                target_peers: 0,
                limits: Limits::default(),
                peers_file: None,
                admission: None,
            },
        )
        .expect("outsider network");
        net.dial(g_multi).await.expect("dial g");
        let t = Duration::from_secs(20);
        let vote = net
            .vote(
                g_peer,
                VoteRequest {
                    id: 1,
                    messages: msgs(),
                    task: Task::Short,
                    max_tokens: 8,
                    deadline_ms: 10_000,
                    model: None,
                    team: None,
                },
                t,
            )
            .await;
        let code = |e: &swarm_protocol::WireError| Some(e.code);
        refused(
            "vote",
            &vote,
            vote.as_ref().ok().and_then(|v| match v {
                VoteReply::Err(e) => code(e),
                VoteReply::Ok(_) => None,
            }),
        );
        let query = net
            .query(
                g_peer,
                QueryRequest {
                    id: 2,
                    model: "tiny-g".into(),
                    messages: msgs(),
                    max_tokens: 8,
                    temperature: 0.0,
                    seed: None,
                    stop: Vec::new(),
                    logprobs: false,
                    deadline_ms: 10_000,
                    task: None,
                    team: None,
                },
                t,
            )
            .await;
        refused(
            "query",
            &query,
            query.as_ref().ok().and_then(|v| match v {
                QueryReply::Err(e) => code(e),
                QueryReply::Ok(_) => None,
            }),
        );
        let esc = net
            .escalate(
                g_peer,
                EscalateRequest {
                    id: 3,
                    messages: msgs(),
                    task: Task::Short,
                    max_tokens: 8,
                    swarm_answers: Vec::new(),
                    deadline_ms: 10_000,
                },
                t,
            )
            .await;
        refused(
            "escalation",
            &esc,
            esc.as_ref().ok().and_then(|v| match v {
                EscalateReply::Err(e) => code(e),
                EscalateReply::Ok(_) => None,
            }),
        );
        // The streamed relay too: at most a refusal, never a piece or an answer.
        let relayed: Vec<Result<EscalateFrame, network::NetError>> = match net
            .escalate_stream(
                g_peer,
                EscalateRequest {
                    id: 4,
                    messages: msgs(),
                    task: Task::Short,
                    max_tokens: 8,
                    swarm_answers: Vec::new(),
                    deadline_ms: 10_000,
                },
                t,
            )
            .await
        {
            Ok(frames) => futures::StreamExt::collect(frames).await,
            Err(e) => vec![Err(e)],
        };
        for f in &relayed {
            match f {
                Err(_) => {}
                Ok(EscalateFrame::End(EscalateReply::Err(e))) if e.code == ErrorCode::Unauthorized => {}
                other => panic!("the outsider's streamed escalation was served: {other:?}"),
            }
        }
        println!("outsider: vote {vote:?}\nquery {query:?}\nescalate {esc:?}\nstreamed {relayed:?}");

        // Signed adverts claiming the gateway role with top priority, for a few seconds.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let t0 = Instant::now();
        let mut seq = now_ms;
        while t0.elapsed() < Duration::from_secs(4) {
            seq += 1;
            let advert = Advert {
                peer: me.to_string(),
                seq,
                name: "outsider".into(),
                version: "0.1.0".into(),
                addrs: Vec::new(),
                models: Vec::new(),
                capacity: Capacity {
                    cores: 64,
                    cpu_load: 0.0,
                    mem_free_mb: 1 << 20,
                    queue: 0,
                    max_concurrency: 64,
                },
                cloud: Some(CloudStatus {
                    reachable: true,
                    budget_left: 1,
                    priority: i32::MAX,
                }),
                gateway: Some(GatewayClaim {
                    term: 1_000_000,
                    since_ms: now_ms,
                }),
                sent_ms: now_ms,
                cert: None,
                teams: Vec::new(),
            };
            let _ = net.publish(encode_msg(&advert).expect("advert")).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // g refuses the outsider (no certificate) and drops the connection.
        let t0 = Instant::now();
        let mut dropped = false;
        while t0.elapsed() < Duration::from_secs(20) {
            if !net.connected_peers().await.unwrap_or_default().contains(&g_peer) {
                dropped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(dropped, "g kept the outsider connected");
        net.shutdown().await;
        me.to_string()
    });
    for n in [&g, &h] {
        assert!(
            !n.peer_ids().contains(&outsider_id),
            "the outsider is in {}'s peer table",
            n.name
        );
        assert_eq!(gateway_of(n).as_deref(), Some(g.peer_id.as_str()), "{}", n.name);
    }
    assert_eq!(
        cloud_calls(&req_log),
        calls_before,
        "an outsider's request reached the cloud"
    );
    assert!(g.output().contains("refused"), "g did not log the refusal");

    // A certificate of another swarm: the node refuses to start and says what to do.
    let other_dir = dir.join("other-swarm");
    cli_json(&[
        "swarm",
        "init",
        "--dir",
        &other_dir.display().to_string(),
        "--json",
    ]);
    let (x_key, x_cert) = invite(&other_dir, dir, "x", "member");
    let out = Command::new(bin())
        .args(node_args(&ns, &m[1], "x", &x_key, &token, &x_cert))
        .output()
        .expect("start x");
    assert!(
        !out.status.success(),
        "a node with another swarm's certificate started"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another swarm") && err.contains("slm-swarm swarm invite"),
        "{err}"
    );
}
