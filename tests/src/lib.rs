//! Helpers for end-to-end tests: the `slm-swarm` binary, tiny models, node
//! processes (optionally inside a Linux network namespace) and a small HTTP client.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

/// The `slm-swarm` binary built with this test run (`$SLM_SWARM_BIN` overrides).
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SLM_SWARM_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test> → target/<profile>/slm-swarm
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let b = dir.join("slm-swarm");
    assert!(
        b.is_file(),
        "{} not found: build it first (cargo build --release -p swarm-node) or set SLM_SWARM_BIN",
        b.display()
    );
    b
}

/// Write tiny random GGUF models named `<name>.gguf` (model id = name) into `dir`.
pub fn tiny_models(dir: &Path, names: &[&str]) -> Vec<PathBuf> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let p = dir.join(format!("{n}.gguf"));
            let spec = swarm_node::inference::testing::TinySpec {
                seed: 100 + i as u64,
                ..Default::default()
            };
            swarm_node::inference::testing::write_tiny_gguf(&p, &spec).expect("tiny model");
            p
        })
        .collect()
}

/// A unique namespace per test, so concurrent tests never form one swarm.
pub fn unique_ns(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() % 100_000
    )
}

/// A running `slm-swarm` process.
pub struct NodeProc {
    pub child: Child,
    pub name: String,
    pub http: String,
    pub peer_id: String,
    /// Full multiaddrs with /p2p/ suffix.
    pub addrs: Vec<String>,
    pub log: PathBuf,
}

impl NodeProc {
    /// Start `slm-swarm <args>` (optionally in network namespace `netns`) and
    /// wait until it prints its HTTP address.
    pub fn spawn(name: &str, args: &[String], dir: &Path, netns: Option<&str>) -> anyhow::Result<NodeProc> {
        Self::spawn_env(name, args, dir, netns, &[])
    }

    /// As [`NodeProc::spawn`], with extra environment variables (they may
    /// override `RUST_LOG`), e.g. a cloud API key for a gateway-capable node.
    pub fn spawn_env(
        name: &str,
        args: &[String],
        dir: &Path,
        netns: Option<&str>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<NodeProc> {
        let log = dir.join(format!("{name}.log"));
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        // The model cache is shared (SLM_SWARM_HOME is inherited); tests pass --identity.
        cmd.args(args)
            .env("RUST_LOG", "info,libp2p=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(
                dir.join(format!("{name}.err")),
            )?));
        let mut child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel::<String>();
        let log_path = log.clone();
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(&log_path).ok();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(f) = f.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                let _ = tx.send(line);
            }
        });
        let (mut http, mut peer_id, mut addrs) = (None, None, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(120);
        while http.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let err = std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default();
                    bail!("{name} did not start:\n{err}");
                }
            };
            if let Some(p) = line.strip_prefix("peer id: ") {
                peer_id = Some(p.trim().to_string());
            } else if let Some(a) = line.strip_prefix("listening: ") {
                addrs.push(a.trim().to_string());
            } else if let Some(h) = line.strip_prefix("http: ") {
                http = Some(h.trim().to_string());
            }
        }
        Ok(NodeProc {
            child,
            name: name.to_string(),
            http: http.unwrap_or_default(),
            peer_id: peer_id.ok_or_else(|| anyhow!("{name} printed no peer id"))?,
            addrs,
            log,
        })
    }

    /// Everything the process printed so far: its stdout log, then its stderr.
    pub fn output(&self) -> String {
        let mut s = std::fs::read_to_string(&self.log).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default());
        s
    }

    /// A listen address on `ip` (e.g. 127.0.0.1) to bootstrap from.
    pub fn addr_on(&self, ip: &str) -> Option<String> {
        self.addrs
            .iter()
            .find(|a| a.starts_with(&format!("/ip4/{ip}/")))
            .cloned()
    }

    pub fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        http_get(&format!("{}{path}", self.http))
    }

    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        http_post(&format!("{}{path}", self.http), body)
    }

    /// Peer ids this node currently lists.
    pub fn peer_ids(&self) -> Vec<String> {
        match self.get("/v1/swarm/peers") {
            Ok((200, v)) => v["peers"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| p["peer_id"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `within` for the process to exit.
    pub fn terminate(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if t0.elapsed() > within {
                bail!("{} did not exit within {within:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(300)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn read(resp: ureq::http::Response<ureq::Body>) -> anyhow::Result<(u16, Value)> {
    let status = resp.status().as_u16();
    let text = resp.into_body().read_to_string()?;
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, v))
}

pub fn http_get(url: &str) -> anyhow::Result<(u16, Value)> {
    read(agent().get(url).call()?)
}

pub fn http_post(url: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    read(
        agent()
            .post(url)
            .header("content-type", "application/json")
            .send(body.to_string())?,
    )
}

/// POST raw bytes (for malformed-input tests), over a plain socket: a server
/// may answer an oversized body (413) before reading all of it and close the
/// connection, which is legal HTTP; an HTTP client that writes the whole body
/// first then fails with a broken pipe instead of reading the answer. Here a
/// writer thread sends the body while this thread reads the response.
pub fn http_post_raw(url: &str, body: Vec<u8>) -> anyhow::Result<(u16, Value)> {
    use std::io::Read;
    let rest = url.strip_prefix("http://").context("http:// url")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut stream =
        std::net::TcpStream::connect(authority).with_context(|| format!("connect {authority}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    // Write errors after the server has answered are expected (see above).
    let send = std::thread::spawn(move || {
        let _ = writer
            .write_all(head.as_bytes())
            .and_then(|()| writer.write_all(&body));
    });
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A reset after the whole response arrived ends it as well.
            Err(e) if !raw.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e).context("read response"),
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = send.join();
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of headers in the response")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line: {head}"))?;
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        bail!("chunked response to a raw POST: {head}");
    }
    let json = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).with_context(|| format!("body: {body}"))?
    };
    Ok((status, json))
}

/// Poll `f` until it returns true or `timeout` passes; returns the time it took.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A Python interpreter with the official `openai` client, in a venv created
/// on first use under the slm-swarm cache (pip must reach the package registry).
pub fn openai_python() -> anyhow::Result<PathBuf> {
    let venv = swarm_node::models::home_dir().join("venv-openai");
    let py = venv.join("bin/python");
    let ok = |p: &Path| {
        Command::new(p)
            .args(["-c", "import openai"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if py.is_file() && ok(&py) {
        return Ok(py);
    }
    let st = Command::new("python3").args(["-m", "venv"]).arg(&venv).status()?;
    if !st.success() {
        bail!(
            "cannot create a venv at {} (Debian: apt-get install python3-venv)",
            venv.display()
        );
    }
    let st = Command::new(&py)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "openai",
        ])
        .status()?;
    if !st.success() || !ok(&py) {
        bail!(
            "cannot install the openai client with pip into {}",
            venv.display()
        );
    }
    Ok(py)
}

/// Make sure catalog models are installed (fetched on first use) before nodes start.
pub fn ensure_models(ids: &[&str]) {
    let cat = swarm_node::models::Catalog::builtin().expect("catalog");
    let opts = swarm_node::models::PullOptions {
        progress: false,
        ..Default::default()
    };
    for id in ids {
        swarm_node::models::ensure(&cat, &swarm_node::models::home_dir(), id, &opts)
            .unwrap_or_else(|e| panic!("model {id}: {e}"));
    }
}

/// The first `n` questions of a file in data/eval.
pub fn eval_questions(file: &str, n: usize) -> Vec<Value> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/eval")
        .join(file);
    std::fs::read_to_string(&p)
        .expect("eval file")
        .lines()
        .take(n)
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// `slm-swarm start` arguments for a node on loopback only: QUIC on a free
/// port, HTTP on a free port, no mDNS, in namespace `ns`. Tests add the rest.
pub fn loopback_start_args(model: &str, ns: &str) -> Vec<String> {
    [
        "start",
        "--model",
        model,
        "--http",
        "127.0.0.1:0",
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
        "--no-mdns",
        "--namespace",
        ns,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
