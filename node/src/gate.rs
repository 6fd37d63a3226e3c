//! The eval gate: a model is advertised to the swarm only after it has shown,
//! on an evaluation file, the accuracy the operator asks for per task kind
//! (`[gate] min_accuracy`). A gate run gives one signed record per task kind,
//! kept under `$SLM_SWARM_HOME/gates/` and keyed by the model file's sha256,
//! so a record speaks for exactly those weights; the signature (the gating
//! node's identity key) says who ran it. `slm-swarm models gate` and the hot
//! swap (`POST /v1/swarm/models`) both run [`evaluate`].

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use libp2p::identity::{Keypair, PublicKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::eval::dataset::Question;
use crate::eval::run::answer_direct;
use crate::inference::Backend;

#[derive(Debug, Error)]
pub enum GateError {
    #[error("gate {path}: {msg}")]
    Io { path: String, msg: String },
    #[error("gate: {0}")]
    Eval(String),
    #[error("gate: cannot sign: {0}")]
    Sign(String),
}

/// `[gate]` in the node's config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GateConfig {
    /// Task kind (mcq, label, short) → accuracy a model must have shown on its
    /// gate run before this node advertises it. Empty = no gate.
    pub min_accuracy: BTreeMap<String, f32>,
    /// Where gate records are; empty = `$SLM_SWARM_HOME/gates`.
    pub dir: String,
    /// Peer ids whose signed records this node also accepts (its own always).
    pub signers: Vec<String>,
    /// Allow `POST /v1/swarm/models` (load, gate and switch to a new model
    /// version while serving). Protect the API with `[api] api_key_env`.
    pub hot_swap: bool,
}

impl GateConfig {
    pub fn dir(&self, home: &Path) -> PathBuf {
        if self.dir.is_empty() {
            home.join("gates")
        } else {
            PathBuf::from(&self.dir)
        }
    }

    pub fn enabled(&self) -> bool {
        !self.min_accuracy.is_empty()
    }
}

/// One signed-off result: a model file's accuracy on one task kind of one file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateRecord {
    pub model: String,
    pub sha256: String,
    pub version: String,
    pub task_kind: String,
    /// The evaluation file (its name and sha256: what the accuracy was measured on).
    pub file: String,
    pub file_sha256: String,
    pub n: usize,
    pub correct: usize,
    pub accuracy: f32,
    /// The bar given to the run, and whether it was met (the node applies its own bar).
    pub min_accuracy: f32,
    pub passed: bool,
    pub at_ms: u64,
    /// The signer's peer id and public key (protobuf, hex), and its ed25519
    /// signature (hex) over the record with `signature` empty.
    pub signer: String,
    pub signer_key: String,
    pub signature: String,
}

impl GateRecord {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut r = self.clone();
        r.signature.clear();
        serde_json::to_vec(&r).unwrap_or_default()
    }

    pub fn sign(&mut self, key: &Keypair) -> Result<(), GateError> {
        self.signer = key.public().to_peer_id().to_string();
        self.signer_key = hex::encode(key.public().encode_protobuf());
        self.signature.clear();
        let sig = key
            .sign(&self.signed_bytes())
            .map_err(|e| GateError::Sign(e.to_string()))?;
        self.signature = hex::encode(sig);
        Ok(())
    }

    /// Whether the signature is good and made by the key the record names.
    pub fn verify(&self) -> bool {
        let (Ok(key), Ok(sig)) = (hex::decode(&self.signer_key), hex::decode(&self.signature)) else {
            return false;
        };
        let Ok(pk) = PublicKey::try_decode_protobuf(&key) else {
            return false;
        };
        pk.to_peer_id().to_string() == self.signer && pk.verify(&self.signed_bytes(), &sig)
    }
}

/// sha256 (hex) of a file, streamed. Model files are large: a cache under
/// `$SLM_SWARM_HOME` keyed by path, size and mtime makes a restart cheap.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let meta = std::fs::metadata(path)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let key = format!(
        "{}|{}|{mtime}",
        std::fs::canonicalize(path)?.display(),
        meta.len()
    );
    let cache_path = crate::models::home_dir().join("hashes.json");
    let mut cache: BTreeMap<String, String> = std::fs::read_to_string(&cache_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if let Some(h) = cache.get(&key) {
        return Ok(h.clone());
    }
    let mut f = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let h = hex::encode(hasher.finalize());
    // Only files large enough to matter are cached (tests write many tiny ones).
    if meta.len() >= 8 << 20 {
        cache.insert(key, h.clone());
        if let Ok(t) = serde_json::to_string(&cache) {
            let _ = std::fs::create_dir_all(crate::models::home_dir());
            let _ = std::fs::write(&cache_path, t);
        }
    }
    Ok(h)
}

/// The version a model file is served as: its sha256's first 12 hex digits.
pub fn version_of(sha256: &str) -> String {
    sha256.chars().take(12).collect()
}

/// The weights hash of a backend's file ("" for a model without one, e.g. a stand-in).
pub fn backend_sha256(b: &dyn Backend) -> String {
    let path = &b.info().path;
    if path.is_empty() {
        return String::new();
    }
    match file_sha256(Path::new(path)) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("cannot hash {path}: {e}; the model is served unversioned");
            String::new()
        }
    }
}

/// What a gate run is asked to do.
#[derive(Debug, Clone, Copy)]
pub struct GateRun<'a> {
    /// The evaluation file the questions came from.
    pub file: &'a Path,
    /// The weights under test.
    pub sha256: &'a str,
    pub version: &'a str,
    /// The bar the result is marked against.
    pub min_accuracy: f32,
    /// At most this many questions of each task kind (in file order).
    pub limit: Option<usize>,
}

/// Evaluate `be` on `questions`: one unsigned record per task kind present.
/// `progress` sees each answer.
pub fn evaluate(
    be: &mut dyn Backend,
    questions: &[Question],
    run: GateRun<'_>,
    mut progress: impl FnMut(),
) -> Result<Vec<GateRecord>, GateError> {
    let GateRun {
        file,
        sha256,
        version,
        min_accuracy,
        limit,
    } = run;
    let file_sha256 = file_sha256(file).map_err(|e| GateError::Io {
        path: file.display().to_string(),
        msg: e.to_string(),
    })?;
    let dataset = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("gate")
        .to_string();
    let scorer = be.info().scorer;
    let mut tally: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for q in questions {
        let kind = crate::eval::run::task_of(q).kind().to_string();
        let t = tally.entry(kind).or_default();
        if limit.is_some_and(|l| t.0 >= l) {
            continue;
        }
        let r = answer_direct(be, q, &dataset, scorer)
            .map_err(|e| GateError::Eval(format!("question {}: {e}", q.id)))?;
        t.0 += 1;
        t.1 += usize::from(r.correct);
        progress();
    }
    if tally.is_empty() {
        return Err(GateError::Eval(format!("{} has no question", file.display())));
    }
    let at_ms = crate::clock::wall_ms();
    Ok(tally
        .into_iter()
        .map(|(kind, (n, correct))| {
            let accuracy = correct as f32 / n.max(1) as f32;
            GateRecord {
                model: be.info().id.clone(),
                sha256: sha256.to_string(),
                version: version.to_string(),
                task_kind: kind,
                file: file.display().to_string(),
                file_sha256: file_sha256.clone(),
                n,
                correct,
                accuracy,
                min_accuracy,
                passed: accuracy >= min_accuracy,
                at_ms,
                signer: String::new(),
                signer_key: String::new(),
                signature: String::new(),
            }
        })
        .collect())
}

/// Store a signed record (one file per model file and task kind; a new run replaces the old).
pub fn save(dir: &Path, rec: &GateRecord) -> Result<PathBuf, GateError> {
    let err = |p: &Path, e: std::io::Error| GateError::Io {
        path: p.display().to_string(),
        msg: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let path = dir.join(format!("{}-{}.json", rec.sha256, rec.task_kind));
    let text = serde_json::to_string_pretty(rec).map_err(|e| GateError::Eval(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| err(&path, e))?;
    Ok(path)
}

/// The stored records for a model file, one per task kind (unreadable ones skipped).
pub fn records_for(dir: &Path, sha256: &str) -> BTreeMap<String, GateRecord> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with(sha256) || !name.ends_with(".json") {
            continue;
        }
        let path = e.path();
        match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<GateRecord>(&t).map_err(|e| e.to_string()))
        {
            Ok(r) if r.sha256 == sha256 => {
                out.insert(r.task_kind.clone(), r);
            }
            Ok(_) => {}
            Err(why) => tracing::warn!("gate record {}: {why}", path.display()),
        }
    }
    out
}

/// Whether this node may advertise a model file, and why not.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub advertise: bool,
    /// Task kind → gated accuracy, for the kinds that passed.
    pub passed: BTreeMap<String, f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Verdict {
    pub fn ungated() -> Self {
        Verdict {
            advertise: true,
            passed: BTreeMap::new(),
            reason: None,
        }
    }
}

/// Apply the node's bar to a model file's records: every configured task kind
/// needs a record signed by an accepted signer, for this very file, at or
/// above the node's own bar (the bar the run was given does not matter).
pub fn decide(cfg: &GateConfig, me: &str, sha256: &str, records: &BTreeMap<String, GateRecord>) -> Verdict {
    if !cfg.enabled() {
        return Verdict::ungated();
    }
    let mut passed = BTreeMap::new();
    let mut reasons = Vec::new();
    if sha256.is_empty() {
        reasons.push("the model has no file to gate".to_string());
    }
    for (kind, &bar) in &cfg.min_accuracy {
        match records.get(kind) {
            None => reasons.push(format!("no gate result for {kind}")),
            Some(r) if r.sha256 != sha256 => reasons.push(format!("{kind}: record is for other weights")),
            Some(r) if !r.verify() => reasons.push(format!("{kind}: bad signature")),
            Some(r) if r.signer != me && !cfg.signers.contains(&r.signer) => {
                reasons.push(format!("{kind}: signed by {}, not a trusted signer", r.signer))
            }
            Some(r) if r.accuracy < bar => reasons.push(format!(
                "{kind}: accuracy {:.3} on {} questions is below {bar:.3}",
                r.accuracy, r.n
            )),
            Some(r) => {
                passed.insert(kind.clone(), r.accuracy);
            }
        }
    }
    Verdict {
        advertise: reasons.is_empty(),
        passed,
        reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(acc: f32) -> GateRecord {
        GateRecord {
            model: "m".into(),
            sha256: "ab".repeat(32),
            version: "abababababab".into(),
            task_kind: "mcq".into(),
            file: "f.jsonl".into(),
            file_sha256: "cd".repeat(32),
            n: 10,
            correct: (acc * 10.0) as usize,
            accuracy: acc,
            min_accuracy: 0.0,
            passed: true,
            at_ms: 1,
            signer: String::new(),
            signer_key: String::new(),
            signature: String::new(),
        }
    }

    fn cfg(bar: f32) -> GateConfig {
        GateConfig {
            min_accuracy: [("mcq".to_string(), bar)].into(),
            ..GateConfig::default()
        }
    }

    #[test]
    fn a_signed_record_passes_at_or_above_the_nodes_bar_only() {
        let key = Keypair::generate_ed25519();
        let me = key.public().to_peer_id().to_string();
        let mut r = rec(0.6);
        r.sign(&key).expect("sign");
        assert!(r.verify());
        let recs: BTreeMap<_, _> = [("mcq".to_string(), r.clone())].into();
        let sha = r.sha256.clone();
        assert!(decide(&cfg(0.6), &me, &sha, &recs).advertise);
        let no = decide(&cfg(0.61), &me, &sha, &recs);
        assert!(!no.advertise);
        assert!(no.reason.unwrap_or_default().contains("below"));
        // Other weights, a stranger's signature, a tampered accuracy: refused.
        assert!(!decide(&cfg(0.5), &me, &"ef".repeat(32), &recs).advertise);
        let stranger = Keypair::generate_ed25519().public().to_peer_id().to_string();
        assert!(!decide(&cfg(0.5), &stranger, &sha, &recs).advertise);
        let mut forged = r;
        forged.accuracy = 0.99;
        assert!(!forged.verify());
        let recs: BTreeMap<_, _> = [("mcq".to_string(), forged)].into();
        assert!(!decide(&cfg(0.5), &me, &sha, &recs).advertise);
        // No record at all, or no gate configured.
        assert!(!decide(&cfg(0.1), &me, &sha, &BTreeMap::new()).advertise);
        assert!(decide(&GateConfig::default(), &me, &sha, &BTreeMap::new()).advertise);
    }

    #[test]
    fn saved_records_are_found_by_the_weights_hash() {
        let dir = tempfile::tempdir().expect("tmp");
        let key = Keypair::generate_ed25519();
        let mut r = rec(0.7);
        r.sign(&key).expect("sign");
        save(dir.path(), &r).expect("save");
        let found = records_for(dir.path(), &r.sha256);
        assert_eq!(found.get("mcq"), Some(&r));
        assert!(records_for(dir.path(), &"ef".repeat(32)).is_empty());
    }
}
