//! The web page in a real browser: three `slm-swarm` processes on loopback, the
//! page of one opened in headless Chromium (driven through chromedriver), a
//! question asked from the page's box, and its answer, route and voters checked
//! on the page; then a node is killed and must leave the page's peer table.
//! Also checks the swarm gauges of `/metrics` on the same swarm.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them);
//! `CHROMIUM` and `CHROMEDRIVER` override their paths. With
//! `SLM_SWARM_SCREENSHOT=FILE` the page is saved as a PNG after the answer.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use swarm_tests::{http_get, loopback_start_args, tiny_models, unique_ns, wait_for, NodeProc};

const INTERVAL_MS: u64 = 500;

fn tool(env: &str, default: &str) -> PathBuf {
    let p = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    assert!(
        p.is_file(),
        "{} not found: the web page test needs Debian's chromium and chromium-driver \
         (`apt-get install chromium chromium-driver`; .ci/run does it), or set {env}",
        p.display()
    );
    p
}

/// chromedriver on a free port, killed on drop.
struct Driver(Child, u16);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_driver(log: &Path) -> Driver {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new(tool("CHROMEDRIVER", "/usr/bin/chromedriver"))
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(log)
                .map(Stdio::from)
                .unwrap_or(Stdio::null()),
        )
        .spawn()
        .expect("start chromedriver");
    let d = Driver(child, port);
    let up = wait_for(Duration::from_secs(20), || {
        matches!(http_get(&format!("http://127.0.0.1:{port}/status")), Ok((200, _)))
    });
    assert!(up.is_some(), "chromedriver did not answer on port {port}");
    d
}

async fn browser(port: u16, profile: &Path) -> Client {
    let chromium = tool("CHROMIUM", "/usr/bin/chromium");
    let mut caps = serde_json::Map::new();
    // The flags that keep Chromium off the (closed) network and quiet in a sandboxed CI.
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium.display().to_string(),
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1100",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    // chromedriver speaks plain HTTP on loopback.
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("chromedriver session")
}

/// Poll the page until `f` holds, or fail with what the page shows.
async fn until<F, Fut>(c: &Client, what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = match c.find(Locator::Css("body")).await {
        Ok(b) => b.text().await.unwrap_or_default(),
        Err(e) => format!("(no body: {e})"),
    };
    panic!("the page never showed {what} within {within:?}; it shows:\n{text}");
}

async fn peer_rows(c: &Client) -> Vec<String> {
    let mut ids = Vec::new();
    if let Ok(rows) = c.find_all(Locator::Css("#peers tr[data-peer]")).await {
        for r in rows {
            if let Ok(Some(id)) = r.attr("data-peer").await {
                ids.push(id);
            }
        }
    }
    ids
}

async fn text_of(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[test]
fn page_shows_the_swarm_answers_from_its_box_and_drops_a_killed_node() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = tiny_models(dir.path(), &["tiny-a", "tiny-b", "tiny-c"]);
    let ns = unique_ns("web");
    let start = |name: &str, model: &Path, boot: Option<&str>| {
        let mut a = loopback_start_args(&model.display().to_string(), &ns);
        a.extend([
            "--advert-interval".into(),
            // The unit form the CLI accepts since the page issue.
            format!("{INTERVAL_MS}ms"),
            "--threads".into(),
            "1".into(),
            "--identity".into(),
            dir.path().join(format!("{name}.key")).display().to_string(),
        ]);
        if let Some(b) = boot {
            a.extend(["--bootstrap".into(), b.to_string()]);
        }
        NodeProc::spawn(name, &a, dir.path(), None).expect("start node")
    };
    let n1 = start("n1", &m[0], None);
    let boot = n1.addr_on("127.0.0.1").expect("n1 loopback addr");
    let n2 = start("n2", &m[1], Some(&boot));
    let mut n3 = start("n3", &m[2], Some(&boot));
    let ids = [n1.peer_id.clone(), n2.peer_id.clone(), n3.peer_id.clone()];
    for n in [&n1, &n2, &n3] {
        let seen = wait_for(Duration::from_secs(30), || {
            let p = n.peer_ids();
            ids.iter().filter(|i| **i != n.peer_id).all(|i| p.contains(i))
        });
        assert!(seen.is_some(), "{} never saw all peers", n.name);
    }

    // The page itself, and the swarm gauges, over plain HTTP.
    let (st, page) = n1.get("/").expect("GET /");
    assert_eq!(st, 200);
    let page = page.as_str().unwrap_or_default().to_string();
    assert!(page.starts_with("<!doctype html>") && page.contains("/v1/swarm/events"));
    assert!(
        !page.contains("https://"),
        "the page must load nothing from elsewhere"
    );
    let (st, metrics) = n1.get("/metrics").expect("GET /metrics");
    assert_eq!(st, 200);
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    for want in [
        "slm_swarm_peers 2",
        "slm_swarm_gateway_term 0",
        "slm_swarm_cloud_budget_left 0",
        "slm_swarm_queue_depth{model=\"tiny-a\"} 0",
    ] {
        assert!(metrics.contains(want), "missing {want} in:\n{metrics}");
    }

    let driver = start_driver(&dir.path().join("chromedriver.log"));
    let profile = dir.path().join("chromium-profile");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let c = browser(driver.1, &profile).await;
        c.goto(&n1.http).await.expect("open the page");
        // All three nodes, this one marked, once the live feed connects.
        until(&c, "the three nodes", Duration::from_secs(20), || async {
            let rows = peer_rows(&c).await;
            ids.iter().all(|i| rows.contains(i))
        })
        .await;
        assert_eq!(text_of(&c, "#status").await, "live");
        assert!(text_of(&c, "#me-id").await.contains(&n1.peer_id));

        // Ask from the box, as a vote so the voters show.
        let input = c.find(Locator::Id("ask-input")).await.expect("ask box");
        input.send_keys("Is the sky blue?").await.expect("type");
        c.find(Locator::Id("ask-route"))
            .await
            .expect("route select")
            .select_by_value("vote")
            .await
            .expect("select vote");
        c.find(Locator::Id("ask-button"))
            .await
            .expect("ask button")
            .click()
            .await
            .expect("click");
        until(&c, "the answer's route", Duration::from_secs(120), || async {
            !text_of(&c, "#answer-route").await.is_empty()
        })
        .await;
        assert_eq!(text_of(&c, "#answer-route").await, "vote");
        assert!(!text_of(&c, "#answer").await.trim().is_empty(), "no answer text");
        let mut voters = Vec::new();
        for v in c
            .find_all(Locator::Css("#answer-voters li[data-voter]"))
            .await
            .expect("voters")
        {
            voters.push(v.attr("data-voter").await.ok().flatten().unwrap_or_default());
        }
        assert!(
            voters.contains(&n1.peer_id),
            "the coordinator votes too: {voters:?}"
        );
        assert!(
            voters.iter().any(|v| *v == n2.peer_id || *v == n3.peer_id),
            "no peer among the voters: {voters:?}"
        );
        // The live feed shows the query with its route, and the chart counts it.
        until(
            &c,
            "the query in the live feed",
            Duration::from_secs(10),
            || async { text_of(&c, "#feed tr.query").await.contains("vote") },
        )
        .await;
        assert!(
            text_of(&c, "#mix").await.contains("vote 1"),
            "{}",
            text_of(&c, "#mix").await
        );
        if let Some(path) = std::env::var_os("SLM_SWARM_SCREENSHOT") {
            let png = c.screenshot().await.expect("screenshot");
            std::fs::write(&path, png).expect("write screenshot");
        }

        // kill -9 n3: it leaves the page once its adverts stop.
        n3.kill9();
        until(&c, "n3 gone from the peers", Duration::from_secs(15), || async {
            let rows = peer_rows(&c).await;
            !rows.contains(&ids[2]) && rows.contains(&ids[1])
        })
        .await;
        c.close().await.expect("close browser");
    });
}
