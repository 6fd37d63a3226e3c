//! Admission files: the swarm owner's key directory, and the token and certificate files a
//! node reads. The checks themselves are pure and live in `swarm_protocol::admission`.
//!
//! A key directory holds:
//! - `swarm.key` — the secret swarm key (mode 0600); whoever holds it decides who joins;
//! - `join-token` — the current join token (public);
//! - `serial` — the last certificate serial issued;
//! - `issued.jsonl` — one line per certificate issued, to find a serial to revoke;
//! - `revocations` — the current signed revocation list, if any.
//!
//! Every file is replaced atomically (temporary file, fsync, rename), and invites and
//! revocations hold a lock on the directory so two at once cannot reuse a serial or
//! lose a revocation.

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use swarm_protocol::admission::{
    AdmissionError, Certificate, JoinToken, Revocations, Revoked, Role, SwarmId, SwarmKey, CERT_PREFIX,
    TOKEN_PREFIX,
};
use thiserror::Error;

pub const KEY_FILE: &str = "swarm.key";
pub const TOKEN_FILE: &str = "join-token";
pub const SERIAL_FILE: &str = "serial";
pub const ISSUED_FILE: &str = "issued.jsonl";
pub const REVOCATIONS_FILE: &str = "revocations";
const LOCK_FILE: &str = ".lock";

/// Largest admission text file read (a full revocation list in base64 fits).
const MAX_FILE_BYTES: u64 = 256 * 1024;

#[derive(Debug, Error)]
pub enum AdmitFileError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    Parse { path: PathBuf, source: AdmissionError },
    #[error("{} is {len} bytes, more than any admission file ({MAX_FILE_BYTES}); is it the right file?", path.display())]
    TooLarge { path: PathBuf, len: u64 },
    #[error("no swarm key in {}: create one with `slm-swarm swarm init --dir {}`", dir.display(), dir.display())]
    NoKey { dir: PathBuf },
    #[error(
        "{} already holds the key of swarm {id}; pass --force to replace it (every certificate it issued stops working)",
        path.display()
    )]
    KeyExists { path: PathBuf, id: SwarmId },
    #[error("{} was signed by another key than {}; move it away and revoke again", path.display(), key_path.display())]
    ForeignRevocations { path: PathBuf, key_path: PathBuf },
    #[error("certificate serials are exhausted")]
    SerialsExhausted,
    #[error(transparent)]
    Admission(#[from] AdmissionError),
}

type Result<T, E = AdmitFileError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AdmitFileError + '_ {
    move |source| AdmitFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One line of `issued.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    pub serial: u64,
    pub peer: String,
    pub role: Role,
    pub issued_ms: u64,
    pub expires_ms: u64,
}

/// The swarm owner's key directory, with its key loaded.
#[derive(Debug)]
pub struct SwarmDir {
    dir: PathBuf,
    key: SwarmKey,
}

impl SwarmDir {
    /// Creates `dir` (mode 0700 when new) with a swarm key made from `seed` (32 bytes from a
    /// CSPRNG) and a join token naming `bootstrap`. Refuses to replace an existing key unless
    /// `force`; replacing one also drops the old key's revocation list.
    pub fn init(
        dir: &Path,
        seed: [u8; 32],
        bootstrap: Vec<String>,
        force: bool,
    ) -> Result<(Self, JoinToken)> {
        create_private_dir(dir)?;
        let _lock = lock_dir(dir)?;
        let key_path = dir.join(KEY_FILE);
        if !force && key_path.exists() {
            let old = Self::open(dir)?;
            return Err(AdmitFileError::KeyExists {
                path: key_path,
                id: old.id(),
            });
        }
        let key = SwarmKey::from_seed(seed);
        let token = JoinToken::new(key.id(), bootstrap)?;
        write_atomic(&key_path, format!("{}\n", key.to_text()).as_bytes(), !force)?;
        write_atomic(&dir.join(TOKEN_FILE), format!("{token}\n").as_bytes(), false)?;
        // Signed by the old key: no node of the new swarm would accept it.
        let rev = dir.join(REVOCATIONS_FILE);
        if rev.exists() {
            fs::remove_file(&rev).map_err(io_err(&rev))?;
        }
        Ok((
            Self {
                dir: dir.to_path_buf(),
                key,
            },
            token,
        ))
    }

    /// Opens an existing key directory.
    pub fn open(dir: &Path) -> Result<Self> {
        let key_path = dir.join(KEY_FILE);
        if !key_path.exists() {
            return Err(AdmitFileError::NoKey {
                dir: dir.to_path_buf(),
            });
        }
        let key = SwarmKey::from_text(&read_text(&key_path)?).map_err(|source| AdmitFileError::Parse {
            path: key_path.clone(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            key,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn key(&self) -> &SwarmKey {
        &self.key
    }

    pub fn id(&self) -> SwarmId {
        self.key.id()
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    /// The stored join token (one without bootstrap addresses if the file is missing).
    pub fn join_token(&self) -> Result<JoinToken> {
        let path = self.dir.join(TOKEN_FILE);
        if !path.exists() {
            return Ok(JoinToken::new(self.id(), Vec::new())?);
        }
        let token = read_join_token(&path)?;
        if token.swarm != self.id() {
            // A stale token from a replaced key: the key is the truth.
            return Ok(JoinToken::new(self.id(), token.bootstrap)?);
        }
        Ok(token)
    }

    /// Replaces the stored join token's bootstrap addresses.
    pub fn set_bootstrap(&self, bootstrap: Vec<String>) -> Result<JoinToken> {
        let token = JoinToken::new(self.id(), bootstrap)?;
        let _lock = lock_dir(&self.dir)?;
        write_atomic(&self.dir.join(TOKEN_FILE), format!("{token}\n").as_bytes(), false)?;
        Ok(token)
    }

    /// The last certificate serial issued (0: none yet).
    pub fn last_serial(&self) -> Result<u64> {
        let path = self.dir.join(SERIAL_FILE);
        if !path.exists() {
            return Ok(0);
        }
        let text = read_text(&path)?;
        text.trim().parse().map_err(|_| AdmitFileError::Parse {
            path,
            source: AdmissionError::Malformed {
                what: "serial counter",
                reason: format!(
                    "`{}` is not a number",
                    text.trim().chars().take(24).collect::<String>()
                ),
            },
        })
    }

    /// Issues a certificate for `peer` with the next serial, valid from `now_ms` for
    /// `valid_for_ms`, and records it in `issued.jsonl`.
    pub fn invite(&self, peer: &str, role: Role, now_ms: u64, valid_for_ms: u64) -> Result<Certificate> {
        self.invite_to_teams(peer, role, now_ms, valid_for_ms, Vec::new())
    }

    /// As [`SwarmDir::invite`], admitting the peer to `teams` as well.
    pub fn invite_to_teams(
        &self,
        peer: &str,
        role: Role,
        now_ms: u64,
        valid_for_ms: u64,
        teams: Vec<String>,
    ) -> Result<Certificate> {
        let _lock = lock_dir(&self.dir)?;
        let serial = self
            .last_serial()?
            .checked_add(1)
            .ok_or(AdmitFileError::SerialsExhausted)?;
        let cert = self.key.invite_to_teams(
            peer,
            role,
            now_ms,
            now_ms.saturating_add(valid_for_ms),
            serial,
            teams,
        )?;
        // The counter moves first: a crash after it wastes a serial, never reuses one.
        write_atomic(
            &self.dir.join(SERIAL_FILE),
            format!("{serial}\n").as_bytes(),
            false,
        )?;
        let record = IssuedRecord {
            serial,
            peer: cert.peer.clone(),
            role,
            issued_ms: cert.issued_ms,
            expires_ms: cert.expires_ms,
        };
        let line = serde_json::to_string(&record).map_err(|e| AdmitFileError::Io {
            path: self.dir.join(ISSUED_FILE),
            source: std::io::Error::other(e),
        })?;
        append_line(&self.dir.join(ISSUED_FILE), &line)?;
        Ok(cert)
    }

    /// The stored revocation list, checked against this directory's key.
    pub fn revocations(&self) -> Result<Option<Revocations>> {
        let path = self.dir.join(REVOCATIONS_FILE);
        let Some(list) = read_revocations(&path)? else {
            return Ok(None);
        };
        if list.verify(&self.id()).is_err() {
            return Err(AdmitFileError::ForeignRevocations {
                path,
                key_path: self.key_path(),
            });
        }
        Ok(Some(list))
    }

    /// Adds `entries` to the revocation list, signs it with the next version and stores it.
    /// Returns the list in force and whether anything new was added (if not, the stored list
    /// is returned unchanged, so repeating a revocation does not churn versions).
    pub fn revoke(&self, entries: Vec<Revoked>, now_ms: u64) -> Result<(Revocations, bool)> {
        let _lock = lock_dir(&self.dir)?;
        let current = self.revocations()?;
        let mut revoked = current.as_ref().map(|l| l.revoked.clone()).unwrap_or_default();
        let before = revoked.len();
        for e in entries {
            if !revoked.contains(&e) {
                revoked.push(e);
            }
        }
        if let Some(list) = current.as_ref().filter(|_| revoked.len() == before) {
            return Ok((list.clone(), false));
        }
        let version = current.as_ref().map_or(0, |l| l.serial).saturating_add(1);
        let list = self.key.sign_revocations(version, revoked, now_ms)?;
        write_atomic(
            &self.dir.join(REVOCATIONS_FILE),
            format!("{}\n", list.to_text()).as_bytes(),
            false,
        )?;
        Ok((list, true))
    }

    /// Every certificate issued so far, oldest first (lines that do not parse are skipped:
    /// the log is informational only).
    pub fn issued(&self) -> Result<Vec<IssuedRecord>> {
        let path = self.dir.join(ISSUED_FILE);
        if !path.exists() {
            return Ok(Vec::new());
        }
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

/// Reads a certificate file (`slm-swarm swarm invite --out FILE`).
pub fn read_certificate(path: &Path) -> Result<Certificate> {
    Certificate::from_text(&read_text(path)?).map_err(|source| AdmitFileError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a join token file.
pub fn read_join_token(path: &Path) -> Result<JoinToken> {
    JoinToken::from_text(&read_text(path)?).map_err(|source| AdmitFileError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// A `--join` argument: the token itself, or the path of a file holding it.
pub fn join_token_arg(arg: &str) -> Result<JoinToken> {
    let arg = arg.trim();
    if arg.starts_with(TOKEN_PREFIX) || arg.starts_with(CERT_PREFIX) || !Path::new(arg).exists() {
        // Parsed as text so a mistyped token gets the parser's explanation, not "no such file".
        return Ok(JoinToken::from_text(arg)?);
    }
    read_join_token(Path::new(arg))
}

/// Reads a revocation list file; `None` if there is no file.
pub fn read_revocations(path: &Path) -> Result<Option<Revocations>> {
    if !path.exists() {
        return Ok(None);
    }
    Revocations::from_text(&read_text(path)?)
        .map(Some)
        .map_err(|source| AdmitFileError::Parse {
            path: path.to_path_buf(),
            source,
        })
}

/// Reads a small text file, refusing large ones before reading them.
fn read_text(path: &Path) -> Result<String> {
    let len = fs::metadata(path).map_err(io_err(path))?.len();
    if len > MAX_FILE_BYTES {
        return Err(AdmitFileError::TooLarge {
            path: path.to_path_buf(),
            len,
        });
    }
    fs::read_to_string(path).map_err(io_err(path))
}

fn create_private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(io_err(dir))
}

/// Exclusive lock on the directory for a read-modify-write; released on drop.
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    f.lock().map_err(io_err(&path))?;
    Ok(f)
}

/// Writes `bytes` to `path` all-or-nothing, mode 0600. With `no_clobber`, fails if `path`
/// exists (checked atomically by the final link, not by an earlier look).
fn write_atomic(path: &Path, bytes: &[u8], no_clobber: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // tempfile creates its files 0600 on Unix.
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    tmp.write_all(bytes).map_err(io_err(path))?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    if no_clobber {
        tmp.persist_noclobber(path).map_err(|e| io_err(path)(e.error))?;
    } else {
        tmp.persist(path).map_err(|e| io_err(path)(e.error))?;
    }
    // Make the rename itself durable.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(format!("{line}\n").as_bytes())
        .map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarm_protocol::admission::Admission;

    const NOW: u64 = 1_700_000_000_000;
    const PEER: &str = "12D3KooWPeerPeerPeerPeerPeerPeerPeerPeerPeerPeerPeer";

    #[test]
    fn init_refuses_to_replace_a_key_without_force() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("swarm");
        let (d, token) = SwarmDir::init(&dir, [1; 32], vec![], false).expect("init");
        assert_eq!(token.swarm, d.id());
        let err = SwarmDir::init(&dir, [2; 32], vec![], false).expect_err("exists");
        assert!(matches!(err, AdmitFileError::KeyExists { .. }), "{err}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(SwarmDir::open(&dir).expect("open").id(), d.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join(KEY_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (d2, _) = SwarmDir::init(&dir, [2; 32], vec![], true).expect("force");
        assert_ne!(d2.id(), d.id());
        assert_eq!(SwarmDir::open(&dir).expect("open").id(), d2.id());
        // No stray temporary files.
        let names: Vec<_> = fs::read_dir(&dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with(".tmp-")), "{names:?}");
    }

    #[test]
    fn open_without_a_key_says_how_to_make_one() {
        let tmp = tempfile::tempdir().expect("tmp");
        let err = SwarmDir::open(tmp.path()).expect_err("no key");
        assert!(err.to_string().contains("slm-swarm swarm init"), "{err}");
    }

    #[test]
    fn invites_take_increasing_serials_and_verify() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (d, _) = SwarmDir::init(tmp.path(), [1; 32], vec![], false).expect("init");
        let a = d.invite(PEER, Role::Member, NOW, 1000).expect("invite");
        let b = d.invite(PEER, Role::Cloud, NOW, 1000).expect("invite");
        assert_eq!((a.serial, b.serial), (1, 2));
        assert_eq!(d.last_serial().expect("serial"), 2);
        assert_eq!(d.issued().expect("log").len(), 2);
        let path = tmp.path().join("c.cert");
        fs::write(&path, format!("{}\n", b.to_text())).expect("write");
        let back = read_certificate(&path).expect("read");
        assert_eq!(Admission::new(d.id()).verify(&back, PEER, NOW), Ok(Role::Cloud));
    }

    #[test]
    fn revocations_accumulate_with_rising_versions() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (d, _) = SwarmDir::init(tmp.path(), [1; 32], vec![], false).expect("init");
        let (l1, new1) = d.revoke(vec![Revoked::Serial(3)], NOW).expect("revoke");
        let (l2, new2) = d.revoke(vec![Revoked::Peer(PEER.into())], NOW).expect("revoke");
        let (l3, new3) = d.revoke(vec![Revoked::Serial(3)], NOW).expect("revoke again");
        assert!(new1 && new2 && !new3);
        assert_eq!((l1.serial, l2.serial, l3.serial), (1, 2, 2));
        assert_eq!(l2.revoked, vec![Revoked::Serial(3), Revoked::Peer(PEER.into())]);
        let mut adm = Admission::new(d.id());
        assert_eq!(
            adm.apply_revocations(d.revocations().expect("read").expect("some")),
            Ok(true)
        );
        assert!(adm.is_peer_revoked(PEER));
    }

    #[test]
    fn join_token_arg_takes_text_or_a_file() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (d, token) = SwarmDir::init(
            tmp.path(),
            [1; 32],
            vec!["/ip4/10.0.0.1/udp/1/quic-v1".into()],
            false,
        )
        .expect("init");
        assert_eq!(join_token_arg(&token.to_text()).expect("text"), token);
        let file = tmp.path().join(TOKEN_FILE);
        assert_eq!(join_token_arg(&file.display().to_string()).expect("file"), token);
        assert_eq!(d.join_token().expect("stored"), token);
        assert!(join_token_arg("slmswarm1:garbage").is_err());
        assert!(join_token_arg("/no/such/file").is_err());
    }
}
