//! The day's cloud budget on disk: a small JSON file with the UTC day and its
//! call and token counts, so a restarted gateway continues from what it has
//! already spent instead of starting the day over.
//!
//! Written atomically (a temporary file in the same directory, fsync, rename,
//! fsync of the directory): a crash leaves either the old or the new file,
//! never a torn one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::budget::DayUsage;

/// Bigger than any file this module writes; a larger one is not ours.
const MAX_FILE_BYTES: u64 = 64 * 1024;
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub(super) enum PersistError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} is not a cloud budget file: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetFile {
    version: u32,
    /// Days since the Unix epoch (UTC) the counts belong to.
    utc_day: u64,
    calls: u32,
    tokens: u64,
}

/// The saved counts, or `None` if there is no file yet.
pub(super) fn load(path: &Path) -> Result<Option<DayUsage>, PersistError> {
    let read_err = |source| PersistError::Read {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |reason: String| PersistError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(corrupt(format!("{} bytes", meta.len())));
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    let f: BudgetFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if f.version != FORMAT_VERSION {
        return Err(corrupt(format!("unknown version {}", f.version)));
    }
    Ok(Some(DayUsage {
        day: f.utc_day,
        calls: f.calls,
        tokens: f.tokens,
    }))
}

/// Replaces the file with `usage`, atomically.
pub(super) fn save(path: &Path, usage: DayUsage) -> Result<(), PersistError> {
    let write_err = |source| PersistError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(write_err)?;
    let body = serde_json::to_vec(&BudgetFile {
        version: FORMAT_VERSION,
        utc_day: usage.day,
        calls: usage.calls,
        tokens: usage.tokens,
    })
    .map_err(|e| write_err(std::io::Error::other(e)))?;
    // Same directory as the target, so the rename cannot cross file systems;
    // the temporary file is removed if anything below fails.
    let mut tmp = tempfile::Builder::new()
        .prefix(".cloud-budget.")
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(write_err)?;
    tmp.write_all(&body).map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;
    tmp.persist(path).map_err(|e| write_err(e.error))?;
    // The rename itself is durable only once the directory is synced.
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_no_temporary_files_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("g.cloud-budget.json");
        assert!(load(&path).expect("missing is fine").is_none());
        for calls in 1..=5 {
            let u = DayUsage {
                day: 19_999,
                calls,
                tokens: u64::from(calls) * 1_000,
            };
            save(&path, u).expect("save");
            assert_eq!(load(&path).expect("load"), Some(u));
        }
        let names: Vec<String> = std::fs::read_dir(path.parent().expect("parent"))
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["g.cloud-budget.json".to_string()]);
    }

    #[test]
    fn corrupt_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.json");
        for body in [
            &b"{\"version\":1,\"utc_day\":1"[..],
            b"\xff\xfe",
            b"{\"version\":2,\"utc_day\":1,\"calls\":1,\"tokens\":1}",
            b"{\"version\":1,\"utc_day\":1,\"calls\":-1,\"tokens\":1}",
        ] {
            std::fs::write(&path, body).expect("write");
            assert!(
                matches!(load(&path), Err(PersistError::Corrupt { .. })),
                "{body:?}"
            );
        }
        std::fs::write(&path, vec![b' '; 100_000]).expect("write");
        assert!(matches!(load(&path), Err(PersistError::Corrupt { .. })));
    }
}
