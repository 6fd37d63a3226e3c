//! The local node processes `bench-load` watches and kills: found by their
//! listening port through /proc, their peak memory sampled, and each one in
//! turn SIGKILLed and started again from its own command line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A local process found by its listening TCP port, and how to start it again.
#[derive(Clone, Debug)]
pub(super) struct LocalNode {
    pub(super) url: String,
    pub(super) port: u16,
}

/// Socket inodes listening on `port` (IPv4 and IPv6).
pub(super) fn listening_inodes(port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" {
                continue;
            }
            let Some(p) = cols[1].rsplit(':').next() else {
                continue;
            };
            if u16::from_str_radix(p, 16).ok() == Some(port) {
                if let Ok(ino) = cols[9].parse() {
                    out.push(ino);
                }
            }
        }
    }
    out
}

/// The process holding a socket listening on `port`.
pub(super) fn pid_on_port(port: u16) -> Option<u32> {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(t) = std::fs::read_link(fd.path()) {
                if wanted.iter().any(|w| Path::new(w) == t) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

pub(super) fn rss_mb(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// What it takes to start a process again as it was.
pub(super) struct Relaunch {
    pub(super) argv: Vec<String>,
    pub(super) cwd: PathBuf,
    pub(super) env: Vec<(String, String)>,
}

pub(super) fn relaunch_of(pid: u32) -> anyhow::Result<Relaunch> {
    let split = |b: Vec<u8>| -> Vec<String> {
        b.split(|&c| c == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    };
    let argv = split(std::fs::read(format!("/proc/{pid}/cmdline"))?);
    if argv.is_empty() {
        bail!("process {pid} has no command line");
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))?;
    let env = split(std::fs::read(format!("/proc/{pid}/environ"))?)
        .into_iter()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    Ok(Relaunch { argv, cwd, env })
}

pub(super) fn port_of(url: &str) -> anyhow::Result<u16> {
    let u = reqwest::Url::parse(url).with_context(|| format!("`{url}` is not a URL"))?;
    u.port_or_known_default()
        .with_context(|| format!("`{url}` has no port"))
}

/// Peak resident memory of each node process, sampled until `stop`.
pub(super) async fn sample_rss(
    nodes: Vec<LocalNode>,
    stop: Arc<AtomicBool>,
    peak: Arc<Mutex<BTreeMap<String, f64>>>,
) {
    let mut pids: Vec<Option<u32>> = vec![None; nodes.len()];
    while !stop.load(Ordering::SeqCst) {
        for (i, n) in nodes.iter().enumerate() {
            let mut rss = pids[i].and_then(rss_mb);
            if rss.is_none() {
                pids[i] = pid_on_port(n.port);
                rss = pids[i].and_then(rss_mb);
            }
            if let Some(r) = rss {
                let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                let e = p.entry(n.url.clone()).or_insert(0.0);
                *e = e.max(r);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every `every`: SIGKILL one node (in turn), wait `down`, start it again.
/// What the chaos task works on and reports to.
pub(super) struct Chaos {
    pub(super) nodes: Vec<LocalNode>,
    /// Per node: bumped just before each kill and at each restart, so it is odd
    /// while the node is killed (dying or down) and not yet restarted.
    pub(super) kills: Arc<Vec<AtomicU64>>,
    pub(super) every: Duration,
    pub(super) down: Duration,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) log: Arc<Mutex<Vec<String>>>,
    pub(super) restarted: Arc<Mutex<Vec<tokio::process::Child>>>,
    pub(super) dir: PathBuf,
}

pub(super) async fn chaos(c: Chaos) {
    let Chaos {
        nodes,
        kills,
        every,
        down,
        stop,
        log,
        restarted,
        dir,
    } = c;
    let note = |s: String| {
        tracing::info!("{s}");
        log.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    };
    let mut turn = 0usize;
    let t0 = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let idx = turn % nodes.len();
        let n = &nodes[idx];
        turn += 1;
        let Some(pid) = pid_on_port(n.port) else {
            note(format!(
                "{:.0}s: no process serves {}; not killed",
                t0.elapsed().as_secs_f64(),
                n.url
            ));
            continue;
        };
        let how = match relaunch_of(pid) {
            Ok(r) => r,
            Err(e) => {
                note(format!("cannot read how to restart {}: {e}; not killed", n.url));
                continue;
            }
        };
        kills[idx].fetch_add(1, Ordering::SeqCst);
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        note(format!(
            "{:.0}s: SIGKILL {} (pid {pid}){}",
            t0.elapsed().as_secs_f64(),
            n.url,
            if killed { "" } else { " failed" }
        ));
        // Give the port back before starting again.
        let gone = Instant::now();
        while pid_on_port(n.port).is_some() && gone.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(down).await;
        // Requests sent from now on meet the restarting node, not the dead one.
        kills[idx].fetch_add(1, Ordering::SeqCst);
        let out = std::fs::File::create(dir.join(format!("restart-{turn}.log")));
        let mut cmd = tokio::process::Command::new(&how.argv[0]);
        cmd.args(&how.argv[1..])
            .current_dir(&how.cwd)
            .env_clear()
            .envs(how.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        match out.and_then(|f| Ok((f.try_clone()?, f))) {
            Ok((a, b)) => {
                cmd.stdout(a).stderr(b);
            }
            Err(_) => {
                cmd.stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
            }
        }
        match cmd.spawn() {
            Ok(child) => {
                note(format!("{:.0}s: restarted {}", t0.elapsed().as_secs_f64(), n.url));
                restarted.lock().unwrap_or_else(|e| e.into_inner()).push(child);
            }
            Err(e) => note(format!("cannot restart {}: {e}", n.url)),
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
    }
}
