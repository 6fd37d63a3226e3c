//! Fair under load, with a real node running the real SmolLM2-135M (slow
//! enough on one thread for queues to fill):
//! - a rogue peer (a libp2p network in this process, open swarm) sends 50
//!   vote requests at once, each asking for a long answer; its quota lets two
//!   in and refuses the rest with `Overloaded` at once, while this node's own
//!   HTTP users are still answered (their lane goes first);
//! - with the model's queue full, 500 concurrent HTTP POSTs are all answered
//!   429 within a second each.

use std::path::Path;
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use serde_json::{json, Value};
use swarm_node::network::{self, Limits, NetConfig, TransportKind};
use swarm_protocol::{ChatMessage, ErrorCode, Task, VoteReply, VoteRequest};
use swarm_tests::{ensure_models, loopback_start_args, unique_ns, NodeProc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MODEL: &str = "smollm2-135m";

/// A prompt the model keeps answering for as long as it is allowed to.
const LONG: &str = "Count from 1 to 500, separated by commas: 1, 2, 3, 4,";

fn start(dir: &Path, name: &str, config: &str) -> (NodeProc, String) {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, config).expect("config");
    let ns = unique_ns(name);
    let mut a = loopback_start_args(MODEL, &ns);
    a.extend(
        [
            "--threads",
            "1",
            "--identity",
            &dir.join(format!("{name}.key")).display().to_string(),
            "--config",
            &cfg.display().to_string(),
        ]
        .map(String::from),
    );
    (NodeProc::spawn(name, &a, dir, None).expect("start node"), ns)
}

fn local_chat(content: &str, max_tokens: u32) -> Value {
    json!({
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "swarm": {"route": "local"},
    })
}

#[test]
fn a_rogue_peer_cannot_starve_local_users() {
    ensure_models(&[MODEL]);
    let tmp = tempfile::tempdir().expect("tmp");
    let (node, ns) = start(
        tmp.path(),
        "fair",
        "queue = 16\nremote_queue = 8\nremote_per_peer = 2\n",
    );
    let peer: PeerId = node.peer_id.parse().expect("peer id");
    let addr: Multiaddr = node
        .addr_on("127.0.0.1")
        .expect("quic address")
        .parse()
        .expect("multiaddr");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let (replies, local) = rt.block_on(async {
        let (net, _events) = network::spawn(
            Keypair::generate_ed25519(),
            NetConfig {
                namespace: ns.clone(),
                listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr")],
                bootstrap: Vec::new(),
                mdns: false,
                transport: TransportKind::Quic,
                request_timeout: Duration::from_secs(120),
                idle_timeout: Duration::from_secs(120),
                heartbeat: Duration::from_millis(200),
                target_peers: 0,
                limits: Limits::default(),
                peers_file: None,
                admission: None,
            },
        )
        .expect("rogue network");
        net.dial(addr).await.expect("dial the node");
        // 50 long votes at once.
        let votes: Vec<_> = (0..50u64)
            .map(|i| {
                let net = net.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    let r = net
                        .vote(
                            peer,
                            VoteRequest {
                                id: 1000 + i,
                                messages: vec![ChatMessage {
                                    role: "user".into(),
                                    content: LONG.into(),
                                }],
                                task: Task::Free,
                                max_tokens: 96,
                                deadline_ms: 110_000,
                                model: None,
                                team: None,
                            },
                            Duration::from_secs(115),
                        )
                        .await;
                    (r, t.elapsed())
                })
            })
            .collect();
        // Local users while the storm is on.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut local = Vec::new();
        for i in 0..5 {
            let http = node.http.clone();
            let r = tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                let r = swarm_tests::http_post(
                    &format!("{http}/v1/chat/completions"),
                    &local_chat(&format!("Name a colour ({i})."), 6),
                );
                (r, t.elapsed())
            })
            .await
            .expect("join");
            local.push(r);
        }
        let mut replies = Vec::new();
        for v in votes {
            replies.push(v.await.expect("join"));
        }
        (replies, local)
    });

    for (r, took) in &local {
        let (st, body) = r.as_ref().expect("local request");
        assert_eq!(*st, 200, "a local user was refused during the storm: {body}");
        assert_eq!(body["swarm"]["route"], json!("local"), "{body}");
        println!("local answer in {took:?}");
    }
    let mut answered = 0;
    let mut overloaded = Vec::new();
    let mut other = Vec::new();
    for (r, took) in &replies {
        match r {
            Ok(VoteReply::Ok(_)) => answered += 1,
            Ok(VoteReply::Err(e)) if e.code == ErrorCode::Overloaded => overloaded.push(*took),
            other_reply => other.push(format!("{other_reply:?}")),
        }
    }
    println!(
        "rogue: {answered} answered, {} overloaded, {} other: {other:?}",
        overloaded.len(),
        other.len()
    );
    // Two places for this peer; refused ones may be retried by nobody, so at
    // most a few slip in as the first ones finish.
    assert!(answered >= 1, "the node still serves the peer within its quota");
    assert!(answered <= 6, "{answered} of the rogue's votes were served");
    assert!(
        overloaded.len() >= 25,
        "only {} votes were refused as Overloaded",
        overloaded.len()
    );
    // Refused at once, not after waiting for a place.
    let mut o = overloaded.clone();
    o.sort();
    assert!(
        o[o.len() / 2] < Duration::from_secs(2),
        "median refusal took {:?}",
        o[o.len() / 2]
    );
    drop(node);
}

/// One raw HTTP/1.1 POST on its own connection; the status code.
async fn raw_post(host: &str, body: &str) -> std::io::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(host).await?;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let head = String::from_utf8_lossy(&buf[..buf.len().min(64)]).to_string();
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line: {head:?}")))
}

#[test]
fn five_hundred_posts_against_a_full_queue_are_all_refused_quickly() {
    ensure_models(&[MODEL]);
    let tmp = tempfile::tempdir().expect("tmp");
    let (node, _) = start(tmp.path(), "full", "queue = 1\n[api]\nmax_concurrent = 64\n");
    let host = node.http.trim_start_matches("http://").to_string();

    // Fill the model with long answers (one running, one waiting) until one
    // more is refused. Their threads end when the node is stopped.
    let mut full = false;
    for _ in 0..8 {
        let http = node.http.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = swarm_tests::http_post(&format!("{http}/v1/chat/completions"), &local_chat(LONG, 1500));
            let _ = tx.send(r.map(|(st, _)| st).ok());
        });
        if let Ok(Some(429)) = rx.recv_timeout(Duration::from_millis(1500)) {
            full = true;
            break;
        }
    }
    assert!(full, "the queue never filled");

    let body = local_chat("What is the capital of France?", 8).to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let results = rt.block_on(async {
        let tasks: Vec<_> = (0..500)
            .map(|_| {
                let host = host.clone();
                let body = body.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    let st = raw_post(&host, &body).await;
                    (st, t.elapsed())
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("join"));
        }
        out
    });
    let mut times = Vec::new();
    for (st, took) in &results {
        let st = st.as_ref().expect("an answer");
        assert_eq!(*st, 429, "a request behind a full queue got {st}");
        times.push(*took);
    }
    times.sort();
    let slowest = times[times.len() - 1];
    println!(
        "500 refusals: median {:?}, slowest ten {:?}",
        times[times.len() / 2],
        &times[times.len() - 10..]
    );
    assert!(
        slowest < Duration::from_secs(1),
        "slowest refusal took {slowest:?}"
    );
}
