//! The command line as a user meets it: durations with units, shell completions,
//! `models rm`, errors that say what to do next, and `query` streaming a real
//! node's answer by default (a node on loopback serving a tiny random model).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use swarm_node::inference::testing::{write_tiny_gguf, TinySpec};

fn slm(args: &[&str], home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slm-swarm"))
        .args(args)
        .env("SLM_SWARM_HOME", home)
        .env_remove("RUST_LOG")
        .env_remove("SLM_SWARM_NODE")
        .env_remove("SLM_SWARM_API_KEY")
        .output()
        .expect("run slm-swarm")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn durations_take_units_and_bad_ones_say_which_units_exist() {
    let home = tempfile::tempdir().expect("tmp");
    let out = slm(
        &["start", "--advert-interval", "1x", "--model", "none.gguf"],
        home.path(),
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("unknown unit") && err.contains("ms, s, m, h or d"),
        "{err}"
    );
    // A good one gets past parsing (and fails later, on the missing model file).
    let out = slm(
        &[
            "start",
            "--advert-interval",
            "1s",
            "--model",
            "/nonexistent/none.gguf",
            "--http",
            "127.0.0.1:0",
        ],
        home.path(),
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(!err.contains("--advert-interval"), "{err}");
    assert!(err.contains("none.gguf"), "{err}");
}

#[test]
fn completions_cover_the_commands() {
    let home = tempfile::tempdir().expect("tmp");
    let out = slm(&["completions", "bash"], home.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let script = text(&out.stdout);
    for w in [
        "complete -F _slm__swarm",
        "query",
        "models",
        "completions",
        "--advert-interval",
    ] {
        assert!(script.contains(w), "bash completion lacks {w}");
    }
    let out = slm(&["completions", "zsh"], home.path());
    assert!(out.status.success() && text(&out.stdout).contains("#compdef slm-swarm"));
    let out = slm(&["completions", "tcsh"], home.path());
    assert!(!out.status.success());
}

#[test]
fn models_rm_deletes_what_is_installed_and_checks_ids_first() {
    let home = tempfile::tempdir().expect("tmp");
    let dir = home.path().join("models");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("smollm2-135m.Q4_1.gguf"), vec![1u8; 2_000_000]).expect("write");
    std::fs::write(dir.join("smollm2-135m.Q4_1.gguf.verified"), "ok").expect("stamp");
    // A typo anywhere deletes nothing.
    let out = slm(&["models", "rm", "smollm2-135m", "gpt-9"], home.path());
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("gpt-9"));
    assert!(dir.join("smollm2-135m.Q4_1.gguf").exists());
    let out = slm(&["models", "rm", "smollm2-135m", "gemma3-270m"], home.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("smollm2-135m: removed (2.0 MB)"), "{said}");
    assert!(said.contains("gemma3-270m: not installed"), "{said}");
    assert!(!dir.join("smollm2-135m.Q4_1.gguf").exists());
    assert!(!dir.join("smollm2-135m.Q4_1.gguf.verified").exists());
}

#[test]
fn query_of_a_node_that_is_not_there_says_how_to_start_one() {
    let home = tempfile::tempdir().expect("tmp");
    // A port nothing listens on: bind, read it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let node = format!("http://127.0.0.1:{port}");
    let out = slm(&["query", "--node", &node, "hello"], home.path());
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains(&node) && err.contains("slm-swarm start"), "{err}");
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node on loopback serving a tiny model `tiny-q`; returns it with its HTTP URL.
fn start_node(home: &Path, extra: &[&str], env: &[(&str, &str)]) -> (Proc, String) {
    let model = home.join("tiny-q.gguf");
    write_tiny_gguf(&model, &TinySpec::default()).expect("tiny model");
    let ns = format!("cli-{}-{}", std::process::id(), extra.len());
    let key = home.join("q.key");
    let mut args = vec![
        "start".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--http".into(),
        "127.0.0.1:0".into(),
        "--listen".into(),
        "/ip4/127.0.0.1/udp/0/quic-v1".into(),
        "--no-mdns".into(),
        "--threads".into(),
        "1".into(),
        "--namespace".into(),
        ns,
        "--identity".into(),
        key.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_slm-swarm"))
        .args(&args)
        .env("SLM_SWARM_HOME", home)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start node");
    let stdout = child.stdout.take().expect("stdout");
    let node = Proc(child);
    let t0 = Instant::now();
    let mut http = None;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(u) = line.strip_prefix("http: ") {
            http = Some(u.to_string());
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "node did not start");
    }
    (node, http.expect("node printed its HTTP address"))
}

#[test]
fn query_streams_a_real_answer_by_default() {
    let home = tempfile::tempdir().expect("tmp");
    let (node, http) = start_node(home.path(), &[], &[]);
    let out = slm(
        &[
            "query",
            "--node",
            &http,
            "--route",
            "local",
            "--max-tokens",
            "8",
            "the cat",
        ],
        home.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("[route local · model tiny-q"), "{said}");
    // The same answer as JSON (not streamed) has the provenance object.
    let out = slm(
        &[
            "query",
            "--node",
            &http,
            "--route",
            "local",
            "--max-tokens",
            "8",
            "--json",
            "the cat",
        ],
        home.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["swarm"]["route"], "local");

    // The live feed: hello, the swarm, then both queries replayed, as JSON events.
    let resp = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
        .get(format!("{http}/v1/swarm/events"))
        .send()
        .expect("events");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/event-stream"));
    let mut events: Vec<(String, serde_json::Value)> = Vec::new();
    let mut name = String::new();
    for line in BufReader::new(resp).lines() {
        let line = line.expect("read feed");
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            events.push((name.clone(), serde_json::from_str(d).expect("event JSON")));
            if events.iter().filter(|(n, _)| n == "query").count() == 2 {
                break;
            }
        }
    }
    assert_eq!(events[0].0, "hello");
    assert_eq!(events[0].1["show_prompts"], false);
    assert_eq!(events[1].0, "swarm");
    assert!(events[1].1["self"]["peer_id"].is_string());
    let q = &events[2].1;
    assert_eq!(
        (q["type"].as_str(), q["route"].as_str()),
        (Some("query"), Some("local"))
    );
    assert_eq!(q["replay"], true);
    assert_eq!(q["model"], "tiny-q");
    // No prompt text unless the node is configured to show it.
    assert!(q.get("prompt").is_none() && q.get("answer").is_none(), "{q}");
    drop(node);
}

/// A raw GET with a chosen `Host` header (clients derive it from the URL).
fn get_with_host(http: &str, path: &str, host: &str, key: Option<&str>) -> u16 {
    use std::io::{Read, Write};
    let addr = http.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let auth = key
        .map(|k| format!("authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {host}\r\n{auth}connection: close\r\n\r\n"
    )
    .expect("write");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).expect("status line");
    String::from_utf8_lossy(&head[9..12]).parse().expect("status")
}

#[test]
fn api_key_guards_every_endpoint_but_the_page_and_rebinding_hosts_are_refused() {
    let home = tempfile::tempdir().expect("tmp");
    // The key's variable must be set: a node refuses to start without it.
    let out = slm(
        &[
            "start",
            "--api-key-env",
            "SLM_CLI_TEST_UNSET_KEY",
            "--model",
            "x.gguf",
        ],
        home.path(),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("SLM_CLI_TEST_UNSET_KEY"),
        "{}",
        text(&out.stderr)
    );

    let key = "k-9f2c1e";
    let (node, http) = start_node(
        home.path(),
        &["--api-key-env", "SLM_CLI_TEST_KEY"],
        &[("SLM_CLI_TEST_KEY", key)],
    );
    let host = http.trim_start_matches("http://").to_string();
    assert_eq!(get_with_host(&http, "/metrics", &host, None), 401);
    assert_eq!(get_with_host(&http, "/v1/swarm/peers", &host, Some("wrong")), 401);
    assert_eq!(get_with_host(&http, "/metrics", &host, Some(key)), 200);
    assert_eq!(
        get_with_host(&http, "/", &host, None),
        200,
        "the page asks for the key itself"
    );
    assert_eq!(get_with_host(&http, "/metrics", "evil.example", Some(key)), 421);
    assert_eq!(get_with_host(&http, "/", "evil.example:8080", None), 421);
    assert_eq!(get_with_host(&http, "/healthz", "localhost", Some(key)), 200);

    // The CLI sends the key from SLM_SWARM_API_KEY, and says what to do without it.
    let ask = [
        "query",
        "--node",
        &http,
        "--route",
        "local",
        "--max-tokens",
        "4",
        "hi",
    ];
    let out = slm(&ask, home.path());
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("SLM_SWARM_API_KEY"),
        "{}",
        text(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_slm-swarm"))
        .args(ask)
        .env("SLM_SWARM_HOME", home.path())
        .env("SLM_SWARM_API_KEY", key)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("[route local"));
    drop(node);
}
