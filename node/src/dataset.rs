//! The escalation log: each question the cloud answered, with what the swarm
//! said and the signals that sent it there, appended as JSON lines under
//! `$SLM_SWARM_HOME/datasets/` (opt-in, `[dataset]`), rotated by size with a
//! cap on the files kept. `slm-swarm dataset export` turns it into chat
//! fine-tuning data (the cloud as teacher) and `dataset stats` summarises it.
//!
//! Only requests whose privacy is `cloud` are recorded: their text has already
//! been allowed to leave the LAN, so keeping it on a swarm device exposes
//! nothing new; `device` and `swarm` requests never reach the cloud or the log.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use swarm_protocol::{Privacy, Task};
use thiserror::Error;

use crate::inference::ChatMessage;

/// The file being appended to; rotated files are `escalations-<unix ms>.jsonl`.
pub const CURRENT: &str = "escalations.jsonl";

#[derive(Debug, Error)]
pub enum DatasetError {
    #[error("dataset {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("dataset {path} line {line}: {msg}")]
    Parse { path: String, line: usize, msg: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// `[dataset]` in the node's config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetConfig {
    /// Record escalated questions (off unless the operator opts in).
    pub enabled: bool,
    /// Where; empty = `$SLM_SWARM_HOME/datasets`.
    pub dir: String,
    /// Rotate the current file when it would grow past this.
    pub max_file_bytes: u64,
    /// Files kept, the current one included; the oldest go first.
    pub max_files: usize,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            dir: String::new(),
            max_file_bytes: 16 * 1024 * 1024,
            max_files: 8,
        }
    }
}

impl DatasetConfig {
    pub fn dir(&self, home: &Path) -> PathBuf {
        if self.dir.is_empty() {
            home.join("datasets")
        } else {
            PathBuf::from(&self.dir)
        }
    }
}

/// One answer the swarm gave before the cloud was asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwarmAnswer {
    pub peer: String,
    pub model: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model_version: String,
    pub answer: Option<String>,
    pub confidence: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The cloud's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudRecord {
    pub model: String,
    pub text: String,
    pub gateway: String,
    pub cloud_ms: u64,
}

/// Why the query went to the cloud, as far as the recorder knows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Signals {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_confidence: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f32>,
    #[serde(default)]
    pub safety_flag: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safety_category: Option<String>,
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub ts_ms: u64,
    pub query_id: u64,
    /// The node that wrote the line, and as what: `coordinator` (its own
    /// query) or `gateway` (a peer's escalation).
    pub recorded_by: String,
    pub role: String,
    /// The node that took the query from its user.
    pub origin: String,
    pub task: Task,
    pub messages: Vec<ChatMessage>,
    pub swarm: Vec<SwarmAnswer>,
    pub cloud: CloudRecord,
    #[serde(default)]
    pub signals: Signals,
}

/// The open log of a node with `[dataset] enabled`.
pub struct DatasetLog {
    dir: PathBuf,
    max_file_bytes: u64,
    max_files: usize,
    /// The current file and its size; one writer at a time keeps lines whole.
    state: Mutex<Option<(File, u64)>>,
}

impl DatasetLog {
    /// The log `cfg` asks for, or `None` when recording is off.
    pub fn open(cfg: &DatasetConfig, home: &Path) -> Result<Option<DatasetLog>, DatasetError> {
        if !cfg.enabled {
            return Ok(None);
        }
        let dir = cfg.dir(home);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Some(DatasetLog {
            dir,
            max_file_bytes: cfg.max_file_bytes.max(4096),
            max_files: cfg.max_files.max(1),
            state: Mutex::new(None),
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a request of this privacy may be recorded at all.
    pub fn allows(privacy: Privacy) -> bool {
        privacy == Privacy::Cloud
    }

    /// Append `rec`; a failure is logged, never fatal to the query it describes.
    pub fn record(&self, rec: &Record) {
        if let Err(e) = self.append(rec) {
            tracing::warn!("escalation log: {e}");
        }
    }

    fn append(&self, rec: &Record) -> Result<(), DatasetError> {
        let mut line = serde_json::to_vec(rec).map_err(|e| DatasetError::Parse {
            path: self.dir.display().to_string(),
            line: 0,
            msg: e.to_string(),
        })?;
        line.push(b'\n');
        let current = self.dir.join(CURRENT);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.is_none() {
            *state = Some(open_append(&current)?);
        }
        if let Some((_, size)) = state.as_ref() {
            if *size > 0 && size + line.len() as u64 > self.max_file_bytes {
                *state = None;
                self.rotate(&current)?;
                *state = Some(open_append(&current)?);
            }
        }
        if let Some((f, size)) = state.as_mut() {
            f.write_all(&line).map_err(io(&current))?;
            f.flush().map_err(io(&current))?;
            *size += line.len() as u64;
        }
        Ok(())
    }

    /// Move the current file aside and drop the oldest beyond `max_files`.
    fn rotate(&self, current: &Path) -> Result<(), DatasetError> {
        // Stamps only grow, so name order is age order even within one ms.
        let newest = files(&self.dir)?
            .iter()
            .filter_map(|p| stamp_of(p))
            .max()
            .unwrap_or(0);
        let stamp = crate::clock::wall_ms().max(newest + 1);
        let to = self.dir.join(format!("escalations-{stamp}.jsonl"));
        std::fs::rename(current, &to).map_err(io(current))?;
        let files = files(&self.dir)?;
        let rotated: Vec<&PathBuf> = files.iter().filter(|p| !p.ends_with(CURRENT)).collect();
        // The current file (about to be reopened) counts as one of the kept.
        let excess = (rotated.len() + 1).saturating_sub(self.max_files);
        for old in rotated.into_iter().take(excess) {
            std::fs::remove_file(old).map_err(io(old))?;
        }
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<(File, u64), DatasetError> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    let size = f.metadata().map_err(io(path))?.len();
    Ok((f, size))
}

fn stamp_of(p: &Path) -> Option<u64> {
    p.file_name()?
        .to_str()?
        .strip_prefix("escalations-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// The log's files, oldest first (rotated ones by their stamp, the current last).
pub fn files(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let mut rotated: Vec<(u64, PathBuf)> = Vec::new();
    let mut current = None;
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let p = e.map_err(io(dir))?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name == CURRENT {
            current = Some(p);
        } else if let Some(stamp) = stamp_of(&p) {
            rotated.push((stamp, p));
        }
    }
    rotated.sort();
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    out.extend(current);
    Ok(out)
}

/// Every record in `dir`, oldest first. A torn last line (a crash mid-write)
/// is skipped with a warning; any other bad line is an error naming it.
pub fn read_all(dir: &Path) -> Result<Vec<Record>, DatasetError> {
    let mut out = Vec::new();
    for path in files(dir)? {
        let f = File::open(&path).map_err(io(&path))?;
        let lines: Vec<String> = BufReader::new(f)
            .lines()
            .collect::<Result<_, _>>()
            .map_err(io(&path))?;
        let n = lines.len();
        for (i, l) in lines.iter().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Record>(l) {
                Ok(r) => out.push(r),
                Err(e) if i + 1 == n => {
                    tracing::warn!("{}: last line unreadable, skipped: {e}", path.display());
                }
                Err(e) => {
                    return Err(DatasetError::Parse {
                        path: path.display().to_string(),
                        line: i + 1,
                        msg: e.to_string(),
                    })
                }
            }
        }
    }
    Ok(out)
}

/// A record as one chat fine-tuning example: the prompt the cloud was sent
/// (options spelled out for constrained tasks), answered by the cloud.
pub fn to_example(r: &Record) -> serde_json::Value {
    let mut msgs = crate::gateway::cloud_prompt(r.messages.clone(), &r.task);
    msgs.push(ChatMessage::new("assistant", &r.cloud.text));
    serde_json::json!({
        "messages": msgs.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
    })
}

/// What `dataset stats` prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    pub records: usize,
    pub unique_questions: usize,
    pub files: usize,
    pub bytes: u64,
    pub first_ms: Option<u64>,
    pub last_ms: Option<u64>,
    pub by_task: BTreeMap<String, usize>,
    pub by_cloud_model: BTreeMap<String, usize>,
    pub by_role: BTreeMap<String, usize>,
    /// Answers per swarm model (with its version, when known).
    pub swarm_models: BTreeMap<String, usize>,
    /// Of records with a swarm answer to compare: how often the most
    /// confident swarm answer said what the cloud said (constrained tasks).
    pub swarm_agreed_with_cloud: Option<f64>,
    pub safety_flagged: usize,
}

/// Summarise the log in `dir`.
pub fn stats(dir: &Path) -> Result<Stats, DatasetError> {
    let files = files(dir)?;
    let mut s = Stats {
        files: files.len(),
        ..Stats::default()
    };
    for f in &files {
        s.bytes += std::fs::metadata(f).map_err(io(f))?.len();
    }
    let records = read_all(dir)?;
    let mut seen = std::collections::HashSet::new();
    let (mut compared, mut agreed) = (0usize, 0usize);
    for r in &records {
        s.records += 1;
        seen.insert(serde_json::to_string(&r.messages).unwrap_or_default());
        s.first_ms = Some(s.first_ms.map_or(r.ts_ms, |t| t.min(r.ts_ms)));
        s.last_ms = Some(s.last_ms.map_or(r.ts_ms, |t| t.max(r.ts_ms)));
        *s.by_task.entry(r.task.kind().into()).or_default() += 1;
        *s.by_cloud_model.entry(r.cloud.model.clone()).or_default() += 1;
        *s.by_role.entry(r.role.clone()).or_default() += 1;
        if r.signals.safety_flag {
            s.safety_flagged += 1;
        }
        for a in &r.swarm {
            let key = if a.model_version.is_empty() {
                a.model.clone()
            } else {
                format!("{}@{}", a.model, a.model_version)
            };
            *s.swarm_models.entry(key).or_default() += 1;
        }
        let best = r
            .swarm
            .iter()
            .filter_map(|a| Some((a.answer.as_deref()?, a.confidence.unwrap_or(0.0))))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let (Some((answer, _)), Some(cloud)) = (best, cloud_key(&r.task, &r.cloud.text)) {
            compared += 1;
            if swarm_protocol::normalize(&r.task, answer).as_deref() == Some(cloud.as_str()) {
                agreed += 1;
            }
        }
    }
    s.unique_questions = seen.len();
    if compared > 0 {
        s.swarm_agreed_with_cloud = Some(agreed as f64 / compared as f64);
    }
    Ok(s)
}

/// The cloud's answer as a vote key, for tasks whose answers compare exactly.
fn cloud_key(task: &Task, text: &str) -> Option<String> {
    match task {
        Task::Mcq { .. } | Task::Label { .. } => swarm_protocol::normalize(task, text),
        Task::Short | Task::Free => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u64, text: &str) -> Record {
        Record {
            ts_ms: 1000 + i,
            query_id: i,
            recorded_by: "me".into(),
            role: "coordinator".into(),
            origin: "me".into(),
            task: Task::Label {
                labels: vec!["positive".into(), "negative".into()],
            },
            messages: vec![ChatMessage::new("user", text)],
            swarm: vec![SwarmAnswer {
                peer: "p".into(),
                model: "m".into(),
                model_version: "abc".into(),
                answer: Some("negative".into()),
                confidence: Some(0.4),
                error: None,
            }],
            cloud: CloudRecord {
                model: "big".into(),
                text: "positive".into(),
                gateway: "g".into(),
                cloud_ms: 5,
            },
            signals: Signals::default(),
        }
    }

    #[test]
    fn rotation_keeps_at_most_max_files_and_loses_no_line_it_keeps() {
        let dir = tempfile::tempdir().expect("tmp");
        let cfg = DatasetConfig {
            enabled: true,
            dir: dir.path().display().to_string(),
            max_file_bytes: 4096,
            max_files: 3,
        };
        let log = DatasetLog::open(&cfg, dir.path())
            .expect("open")
            .expect("enabled");
        let long = "x".repeat(900);
        for i in 0..40 {
            log.record(&rec(i, &format!("{i} {long}")));
        }
        let fs = files(dir.path()).expect("files");
        assert_eq!(fs.len(), 3, "{fs:?}");
        for f in &fs {
            assert!(std::fs::metadata(f).expect("meta").len() <= 4096, "{f:?} too big");
        }
        let all = read_all(dir.path()).expect("read");
        // The newest records survive, in order, without a gap.
        assert_eq!(all.last().map(|r| r.query_id), Some(39));
        let ids: Vec<u64> = all.iter().map(|r| r.query_id).collect();
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
        assert!(ids.len() < 40);
    }

    #[test]
    fn disabled_logs_nothing_and_only_cloud_privacy_is_recordable() {
        let dir = tempfile::tempdir().expect("tmp");
        assert!(DatasetLog::open(&DatasetConfig::default(), dir.path())
            .expect("open")
            .is_none());
        assert!(DatasetLog::allows(Privacy::Cloud));
        assert!(!DatasetLog::allows(Privacy::Swarm));
        assert!(!DatasetLog::allows(Privacy::Device));
    }

    #[test]
    fn stats_and_export_read_what_was_written() {
        let dir = tempfile::tempdir().expect("tmp");
        let cfg = DatasetConfig {
            enabled: true,
            dir: dir.path().display().to_string(),
            ..DatasetConfig::default()
        };
        let log = DatasetLog::open(&cfg, dir.path())
            .expect("open")
            .expect("enabled");
        log.record(&rec(1, "great film"));
        log.record(&rec(2, "great film"));
        let mut r = rec(3, "dull film");
        r.cloud.text = "negative".into();
        log.record(&r);
        let s = stats(dir.path()).expect("stats");
        assert_eq!(s.records, 3);
        assert_eq!(s.unique_questions, 2);
        assert_eq!(s.by_task.get("label"), Some(&3));
        assert_eq!(s.swarm_models.get("m@abc"), Some(&3));
        let agreed = s.swarm_agreed_with_cloud.expect("compared");
        assert!((agreed - 1.0 / 3.0).abs() < 1e-9, "{agreed}");
        let ex = to_example(&r);
        let msgs = ex["messages"].as_array().expect("messages");
        assert_eq!(msgs.last().expect("last")["role"], "assistant");
        assert_eq!(msgs.last().expect("last")["content"], "negative");
        assert!(msgs[0]["content"]
            .as_str()
            .expect("text")
            .contains("positive, negative"));
    }

    #[test]
    fn a_torn_last_line_is_skipped_a_torn_middle_line_is_an_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let good = serde_json::to_string(&rec(1, "a")).expect("json");
        std::fs::write(dir.path().join(CURRENT), format!("{good}\n{{\"ts_ms\": 1")).expect("write");
        assert_eq!(read_all(dir.path()).expect("read").len(), 1);
        std::fs::write(dir.path().join(CURRENT), format!("{{\"ts\n{good}\n")).expect("write");
        let e = read_all(dir.path()).expect_err("bad line");
        assert!(e.to_string().contains("line 1"), "{e}");
    }
}
