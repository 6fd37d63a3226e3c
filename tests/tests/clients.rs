//! Real clients against a real node: the official `openai` Python client
//! (chat, streaming, model list), and a raw libp2p peer that sends garbage on
//! the node's request-response protocols (the node must survive and keep serving).

use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol};
use serde_json::{json, Value};
use swarm_tests::{loopback_start_args, openai_python, tiny_models, unique_ns, NodeProc};

fn start(dir: &std::path::Path, name: &str, model: &std::path::Path, ns: &str) -> NodeProc {
    let mut args = loopback_start_args(&model.display().to_string(), ns);
    args.extend([
        "--identity".into(),
        dir.join(format!("{name}.key")).display().to_string(),
        "--threads".into(),
        "1".into(),
    ]);
    NodeProc::spawn(name, &args, dir, None).expect("start node")
}

const SCRIPT: &str = r#"
import json, sys
from openai import OpenAI
c = OpenAI(base_url=sys.argv[1] + "/v1", api_key="not-needed")
r = c.chat.completions.create(model="tiny-o", messages=[{"role": "user", "content": "the cat"}], max_tokens=6)
extra = r.model_extra or {}
s = c.chat.completions.create(model="tiny-o", messages=[{"role": "user", "content": "the cat"}], max_tokens=6, stream=True)
pieces, finish = [], None
for ch in s:
    if ch.choices and ch.choices[0].delta and ch.choices[0].delta.content:
        pieces.append(ch.choices[0].delta.content)
    if ch.choices and ch.choices[0].finish_reason:
        finish = ch.choices[0].finish_reason
models = [m.id for m in c.models.list()]
try:
    c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    err = None
except Exception as e:
    err = type(e).__name__
print(json.dumps({"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
                  "usage": r.usage.total_tokens, "swarm": extra.get("swarm"), "stream": "".join(pieces),
                  "stream_finish": finish, "models": models, "error": err}))
"#;

#[test]
fn official_openai_python_client_works() {
    let py = openai_python().expect("python with the openai package");
    let dir = tempfile::tempdir().expect("tmp");
    let m = tiny_models(dir.path(), &["tiny-o"]);
    let n = start(dir.path(), "o", &m[0], &unique_ns("oai"));
    let out = Command::new(py)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&n.http)
        .output()
        .expect("run python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json from the script");
    assert!(v["text"].is_string(), "{v}");
    assert!(v["usage"].as_u64().unwrap_or(0) > 0, "{v}");
    assert_eq!(v["swarm"]["model"], json!("tiny-o"), "{v}");
    assert!(v["swarm"]["route"].is_string(), "{v}");
    // Greedy decoding: the streamed answer is the same text, and it finishes.
    assert_eq!(v["stream"], v["text"], "{v}");
    assert!(v["stream_finish"].is_string(), "{v}");
    assert_eq!(v["models"], json!(["tiny-o"]), "{v}");
    assert_eq!(v["error"], json!("NotFoundError"), "{v}");
}

/// Writes raw bytes as a request; reads whatever comes back.
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let mut v = Vec::new();
        futures::AsyncReadExt::read_to_end(io, &mut v).await?;
        Ok(v)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let mut v = Vec::new();
        let mut limited = futures::AsyncReadExt::take(io, 4 << 20);
        futures::AsyncReadExt::read_to_end(&mut limited, &mut v).await?;
        if v.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "no response",
            ));
        }
        Ok(v)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Vec<u8>) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        futures::AsyncWriteExt::write_all(io, &req).await?;
        futures::AsyncWriteExt::close(io).await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, res: Vec<u8>) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        futures::AsyncWriteExt::write_all(io, &res).await?;
        futures::AsyncWriteExt::close(io).await
    }
}

#[test]
fn garbage_on_the_wire_is_refused_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = tiny_models(dir.path(), &["tiny-w"]);
    let ns = unique_ns("wire");
    let n = start(dir.path(), "w", &m[0], &ns);
    let addr: Multiaddr = n.addr_on("127.0.0.1").expect("addr").parse().expect("multiaddr");
    let valid_but_wrong = swarm_protocol::encode(&json!({"hello": "world"})).expect("cbor");
    let oversize = vec![0xa1u8; swarm_protocol::codec::MAX_REQUEST_BYTES + 1024];
    let payloads: Vec<Vec<u8>> = vec![
        vec![0xff; 64],
        vec![],
        valid_but_wrong,
        oversize,
        b"GET / HTTP/1.1\r\n".to_vec(),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("rt");
    let outcomes = rt.block_on(async {
        let protos: Vec<(StreamProtocol, ProtocolSupport)> = ["vote", "query", "escalate"]
            .iter()
            .map(|p| {
                (
                    StreamProtocol::try_from_owned(format!("/slm-swarm/{ns}/{p}/1")).expect("proto"),
                    ProtocolSupport::Outbound,
                )
            })
            .collect();
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_quic()
            .with_behaviour(|_| {
                request_response::Behaviour::<RawCodec>::new(
                    protos,
                    request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
                )
            })
            .expect("behaviour")
            .build();
        let peer = n.peer_id.parse().expect("peer id");
        swarm.add_peer_address(peer, addr);
        let total = payloads.len();
        for p in payloads {
            swarm.behaviour_mut().send_request(&peer, p);
        }
        let mut outcomes = Vec::new();
        let deadline = tokio::time::sleep(Duration::from_secs(30));
        tokio::pin!(deadline);
        while outcomes.len() < total {
            tokio::select! {
                _ = &mut deadline => break,
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::Behaviour(request_response::Event::Message { message: request_response::Message::Response { response, .. }, .. }) => {
                        outcomes.push(Ok(response));
                    }
                    SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                        outcomes.push(Err(error.to_string()));
                    }
                    _ => {}
                }
            }
        }
        outcomes
    });
    assert_eq!(
        outcomes.len(),
        5,
        "every request must end (no hang): {outcomes:?}"
    );
    // None of them may be answered as if valid: the node drops the stream.
    assert!(outcomes.iter().all(|o| o.is_err()), "{outcomes:?}");
    // The node is alive and still answers a real request.
    let (st, r) = n
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "the cat"}], "max_tokens": 3}),
        )
        .expect("post");
    assert_eq!(st, 200, "{r}");
}
