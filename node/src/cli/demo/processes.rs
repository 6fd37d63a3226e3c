//! The demo's child processes (this binary's `serve` and `start`): spawning one
//! and reading what it prints at start, stopping it, and the models they need.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use swarm_node::models::{self, Catalog};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::cli::ModelArgs;

/// A child process of this binary; killed when dropped (so also on errors and Ctrl-C).
pub(crate) struct Proc {
    pub(crate) name: String,
    child: Child,
    pub(crate) http: String,
    pub(crate) peer_id: String,
    pub(crate) addrs: Vec<String>,
    /// The model ids it announced.
    pub(super) models: String,
}

impl Proc {
    pub(crate) async fn spawn(
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
        dir: &Path,
    ) -> anyhow::Result<Proc> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let err_path = dir.join(format!("{name}.err"));
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env("RUST_LOG", "info,libp2p=warn,libp2p_mdns=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&err_path)?))
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("{name}: no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let mut log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let (mut http, mut peer_id, mut addrs, mut models) = (None, String::new(), Vec::new(), String::new());
        let deadline = Instant::now() + Duration::from_secs(300);
        while http.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match tokio::time::timeout(left, lines.next_line()).await {
                Ok(Ok(Some(l))) => l,
                Ok(_) | Err(_) => {
                    let _ = child.start_kill();
                    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
                    let tail: Vec<&str> = err.lines().rev().take(8).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    bail!("{name} did not start:\n{}", tail.join("\n"));
                }
            };
            let _ = writeln!(log, "{line}");
            if let Some(p) = line.strip_prefix("peer id: ") {
                peer_id = p.trim().to_string();
            } else if let Some(a) = line.strip_prefix("listening: ") {
                addrs.push(a.trim().to_string());
            } else if let Some(m) = line
                .strip_prefix("models: ")
                .or_else(|| line.strip_prefix("slm-swarm serve: "))
            {
                models = m.trim().to_string();
            } else if let Some(h) = line.strip_prefix("http: ") {
                http = Some(h.trim().to_string());
            }
        }
        // Keep draining stdout into the log so the child never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = writeln!(log, "{l}");
            }
        });
        Ok(Proc {
            name: name.to_string(),
            child,
            http: http.unwrap_or_default(),
            peer_id,
            addrs,
            models,
        })
    }

    /// SIGTERM (a clean shutdown), then SIGKILL if it is still running after `grace`.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// Fetch every catalog model that is not installed yet, with progress.
pub(crate) fn fetch_models(common: &ModelArgs, specs: &[&str]) -> anyhow::Result<()> {
    let cat = Catalog::load(common.catalog.as_deref())?;
    let home = models::home_dir();
    for spec in specs {
        // Paths to GGUF files and unknown ids are resolved (and reported) by the children.
        let Ok(entry) = cat.get(spec) else { continue };
        if entry.is_installed(&home) {
            continue;
        }
        let size = entry
            .size
            .map(|s| format!(", {:.0} MB", s as f64 / 1e6))
            .unwrap_or_default();
        eprintln!("fetching {spec}{size} (first run only)…");
        let t0 = Instant::now();
        crate::cli::models::ensure(common, spec)?;
        eprintln!("  {spec} installed in {:.0} s", t0.elapsed().as_secs_f64());
    }
    Ok(())
}

/// The id a model is served under: the catalog id, or a GGUF file's stem.
pub(super) fn model_id(common: &ModelArgs, spec: &str) -> String {
    let known = Catalog::load(common.catalog.as_deref())
        .map(|c| c.get(spec).is_ok())
        .unwrap_or(false);
    if known {
        return spec.to_string();
    }
    Path::new(spec)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string())
}
