//! Swarm admission: who may join a keyed swarm.
//!
//! Trust model. libp2p's pre-shared-key transport (pnet) does not work over QUIC
//! (rust-libp2p #3275), so membership is checked by the application instead. A swarm is
//! named by the public half of an ed25519 **swarm key** ([`SwarmId`]); its holder issues
//! **certificates** that bind one libp2p peer id to the swarm, with a role and an expiry.
//! A node presents its certificate after connecting; the peer id in it is the one the QUIC
//! TLS handshake has already authenticated, so a certificate is useless to anyone but the
//! peer it names. The **join token** only tells a node which swarm to trust and where to dial:
//! it is not a secret and grants nothing. The key holder can withdraw certificates with a
//! signed, versioned **revocation list**; a higher version replaces a lower one.
//!
//! Everything here is pure: no IO, no clock (callers pass `now_ms`, Unix milliseconds), no
//! randomness (callers pass a 32-byte seed). Everything that arrives from users or peers is
//! size-checked before it is decoded.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Cursor;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::limits::{is_team, MAX_ADDRS, MAX_ADDR_LEN, MAX_PEER_ID_LEN, MAX_TEAMS};

/// Text prefix of a join token.
pub const TOKEN_PREFIX: &str = "slmswarm1:";
/// Text prefix of a certificate.
pub const CERT_PREFIX: &str = "slmcert1:";
/// Text prefix of a revocation list.
pub const REVOCATIONS_PREFIX: &str = "slmrevoke1:";
/// Text prefix of a swarm (secret) key file.
pub const KEY_PREFIX: &str = "slmswarmkey1:";

/// Clock disagreement tolerated between the issuer, the holder and the verifier.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Most bootstrap addresses a join token may carry.
pub const MAX_BOOTSTRAP: usize = MAX_ADDRS;
/// Largest encoded join token (CBOR bytes).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Largest encoded certificate (CBOR bytes); a real one is about 200.
pub const MAX_CERT_BYTES: usize = 1024;
/// Most entries in a revocation list.
pub const MAX_REVOKED: usize = 1024;
/// Largest encoded revocation list (CBOR bytes): [`MAX_REVOKED`] peer ids fit.
pub const MAX_REVOCATIONS_BYTES: usize = 160 * 1024;

// Domain separation: a signature over one kind of object can never pass for another.
const CERT_DOMAIN: &str = "slm-swarm/cert/1";
const CERT_TEAMS_DOMAIN: &str = "slm-swarm/cert-teams/1";
const REVOCATIONS_DOMAIN: &str = "slm-swarm/revocations/1";
const FORMAT_VERSION: u8 = 1;

/// Why a token, certificate or revocation list was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AdmissionError {
    #[error("{what} is {len} bytes long, limit {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("not a {what}: expected text starting with `{prefix}`{hint}")]
    WrongPrefix {
        what: &'static str,
        prefix: &'static str,
        /// What the text looks like instead, if recognisable (", this is a …").
        hint: String,
    },
    #[error("{what} is not valid base64url (was it cut off or wrapped when copied?): {reason}")]
    Base64 { what: &'static str, reason: String },
    #[error("{what} is malformed: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{what} has format version {got}; this build reads version {FORMAT_VERSION}")]
    Version { what: &'static str, got: u8 },
    #[error("{0} is not a valid swarm id")]
    BadSwarmId(String),
    #[error("issued by another swarm ({got}), this node trusts {expected}")]
    WrongSwarm { expected: SwarmId, got: SwarmId },
    #[error("{0} signature does not verify (tampered, or not signed by this swarm's key)")]
    BadSignature(&'static str),
    #[error("certificate is for peer {cert_peer}, presented by {presented}")]
    PeerMismatch { cert_peer: String, presented: String },
    #[error("certificate expired at {expires_ms} (now {now_ms}); ask the swarm owner for a new one")]
    Expired { expires_ms: u64, now_ms: u64 },
    #[error("certificate is valid only from {issued_ms} (now {now_ms}); check this machine's clock")]
    NotYetValid { issued_ms: u64, now_ms: u64 },
    #[error("certificate serial {0} is revoked")]
    RevokedSerial(u64),
    #[error("peer {0} is revoked")]
    RevokedPeer(String),
}

type Result<T, E = AdmissionError> = std::result::Result<T, E>;

// ---- keys ---------------------------------------------------------------------------------

/// The swarm's identity: the ed25519 public key of its [`SwarmKey`]. Printed as 43 characters
/// of base64url; always a valid curve point (checked on construction and decoding).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SwarmId([u8; 32]);

impl SwarmId {
    /// The id for these public-key bytes, if they are a usable ed25519 key.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self> {
        let vk = VerifyingKey::from_bytes(&bytes).map_err(|_| AdmissionError::BadSwarmId(b64(&bytes)))?;
        // A small-order key would let anyone forge "signatures" that verify.
        if vk.is_weak() {
            return Err(AdmissionError::BadSwarmId(b64(&bytes)));
        }
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn verifying_key(&self) -> Result<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| AdmissionError::BadSwarmId(self.to_string()))
    }

    fn verify(&self, what: &'static str, msg: &[u8], sig: &[u8; 64]) -> Result<()> {
        self.verifying_key()?
            // Strict: rejects malleable signatures, so one list or certificate has one signature.
            .verify_strict(msg, &Signature::from_bytes(sig))
            .map_err(|_| AdmissionError::BadSignature(what))
    }
}

impl fmt::Display for SwarmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&b64(&self.0))
    }
}

impl fmt::Debug for SwarmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SwarmId({self})")
    }
}

impl FromStr for SwarmId {
    type Err = AdmissionError;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let bad = || AdmissionError::BadSwarmId(s.chars().take(64).collect());
        if s.len() > 64 {
            return Err(bad());
        }
        let bytes = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
        Self::from_bytes(bytes.try_into().map_err(|_| bad())?)
    }
}

impl Serialize for SwarmId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for SwarmId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let bytes = Fixed::<32>::deserialize(d)?.0;
        Self::from_bytes(bytes).map_err(serde::de::Error::custom)
    }
}

/// The swarm's secret key: whoever holds it decides who is a member. Never leaves the
/// owner's machine; `Debug` does not print it and it is wiped from memory on drop.
#[derive(Clone)]
pub struct SwarmKey(SigningKey);

impl SwarmKey {
    /// The key for a 32-byte secret seed. Give it 32 bytes from a CSPRNG to make a new key.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    /// The secret seed (for storage; handle with care).
    pub fn to_seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn id(&self) -> SwarmId {
        // A key derived from a seed is never small-order, so no check is needed here.
        SwarmId(self.0.verifying_key().to_bytes())
    }

    /// The key file's text form: `slmswarmkey1:` + base64url of the seed.
    pub fn to_text(&self) -> String {
        format!("{KEY_PREFIX}{}", b64(&self.0.to_bytes()))
    }

    /// Reads [`SwarmKey::to_text`] output (surrounding whitespace ignored).
    pub fn from_text(text: &str) -> Result<Self> {
        let bytes = unwrap_text(text, "swarm key", KEY_PREFIX, 64)?;
        let seed: [u8; 32] = bytes.try_into().map_err(|v: Vec<u8>| AdmissionError::Malformed {
            what: "swarm key",
            reason: format!("{} bytes, expected 32", v.len()),
        })?;
        Ok(Self::from_seed(seed))
    }

    /// Issues a certificate admitting `peer` (a libp2p peer id in text form) with `role`,
    /// valid from `issued_ms` until `expires_ms`.
    pub fn invite(
        &self,
        peer: &str,
        role: Role,
        issued_ms: u64,
        expires_ms: u64,
        serial: u64,
    ) -> Result<Certificate> {
        self.invite_to_teams(peer, role, issued_ms, expires_ms, serial, Vec::new())
    }

    /// As [`SwarmKey::invite`], admitting the peer to `teams` as well.
    pub fn invite_to_teams(
        &self,
        peer: &str,
        role: Role,
        issued_ms: u64,
        expires_ms: u64,
        serial: u64,
        teams: Vec<String>,
    ) -> Result<Certificate> {
        check_peer("certificate peer", peer)?;
        check_teams(&teams)?;
        if expires_ms <= issued_ms {
            return Err(AdmissionError::Malformed {
                what: "certificate",
                reason: format!("expires ({expires_ms}) before it is issued ({issued_ms})"),
            });
        }
        let mut cert = Certificate {
            swarm: self.id(),
            peer: peer.to_string(),
            role,
            issued_ms,
            expires_ms,
            serial,
            sig: [0; 64],
            teams,
        };
        cert.sig = self.0.sign(&cert.signed_bytes()).to_bytes();
        Ok(cert)
    }

    /// Signs a revocation list with version `serial` (must exceed the one it replaces).
    pub fn sign_revocations(
        &self,
        serial: u64,
        revoked: Vec<Revoked>,
        issued_ms: u64,
    ) -> Result<Revocations> {
        let mut list = Revocations {
            swarm: self.id(),
            serial,
            issued_ms,
            revoked,
            sig: [0; 64],
        };
        list.check()?;
        list.sig = self.0.sign(&list.signed_bytes()).to_bytes();
        Ok(list)
    }
}

impl fmt::Debug for SwarmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SwarmKey({}, secret hidden)", self.id())
    }
}

// ---- certificates -------------------------------------------------------------------------

/// What a member may do. Both are members; only `Cloud` may stand for gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Member,
    Cloud,
}

impl Role {
    /// May this peer be elected gateway (it calls the cloud for the swarm)?
    pub fn may_be_gateway(self) -> bool {
        self == Role::Cloud
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Cloud => "cloud",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = AdmissionError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "member" => Ok(Role::Member),
            "cloud" => Ok(Role::Cloud),
            other => Err(AdmissionError::Malformed {
                what: "role",
                reason: format!(
                    "`{}`: expected `member` or `cloud`",
                    other.chars().take(32).collect::<String>()
                ),
            }),
        }
    }
}

/// Membership certificate: the swarm key's statement that `peer` is a member with `role`
/// between `issued_ms` and `expires_ms`. `serial` names it in revocation lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub swarm: SwarmId,
    pub peer: String,
    pub role: Role,
    pub issued_ms: u64,
    pub expires_ms: u64,
    pub serial: u64,
    #[serde(with = "fixed_bytes")]
    pub sig: [u8; 64],
    /// Teams the swarm owner admits this peer to (a keyed swarm's peers serve
    /// only these). Signed; absent on certificates without teams, whose
    /// signed bytes stay those of certificates issued before teams existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub teams: Vec<String>,
}

impl Certificate {
    /// What the signature covers: a fixed-shape CBOR array of the fields after a domain tag.
    /// Built from the decoded fields, never from received bytes, so there is exactly one
    /// encoding per certificate.
    fn signed_bytes(&self) -> Vec<u8> {
        if self.teams.is_empty() {
            return cbor(&(
                CERT_DOMAIN,
                self.swarm,
                &self.peer,
                self.role,
                self.issued_ms,
                self.expires_ms,
                self.serial,
            ));
        }
        // Its own domain tag: a certificate with teams can never verify as one without.
        cbor(&(
            CERT_TEAMS_DOMAIN,
            self.swarm,
            &self.peer,
            self.role,
            self.issued_ms,
            self.expires_ms,
            self.serial,
            &self.teams,
        ))
    }

    fn check(&self) -> Result<()> {
        check_peer("certificate peer", &self.peer)?;
        check_teams(&self.teams)
    }

    /// CBOR wire form (for a handshake message).
    pub fn to_bytes(&self) -> Vec<u8> {
        cbor(&Versioned {
            v: FORMAT_VERSION,
            body: self,
        })
    }

    /// Decodes [`Certificate::to_bytes`] output; size-checked first. The signature is not
    /// checked here: that is [`Admission::verify`]'s job.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let c: Self = decode_versioned("certificate", bytes, MAX_CERT_BYTES)?;
        c.check()?;
        Ok(c)
    }

    /// Text form for files and copy-paste: `slmcert1:` + base64url of the CBOR.
    pub fn to_text(&self) -> String {
        format!("{CERT_PREFIX}{}", b64(&self.to_bytes()))
    }

    /// Reads [`Certificate::to_text`] output (surrounding whitespace ignored).
    pub fn from_text(text: &str) -> Result<Self> {
        Self::from_bytes(&unwrap_text(text, "certificate", CERT_PREFIX, MAX_CERT_BYTES)?)
    }
}

impl FromStr for Certificate {
    type Err = AdmissionError;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_text(s)
    }
}

// ---- join tokens --------------------------------------------------------------------------

/// What a new node needs to join: the swarm to trust and where to dial first. Not secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub swarm: SwarmId,
    /// Multiaddrs (text) of nodes to dial first; may be empty on a LAN with mDNS.
    pub bootstrap: Vec<String>,
}

impl JoinToken {
    /// A token, refusing more than [`MAX_BOOTSTRAP`] addresses or any longer than `MAX_ADDR_LEN`.
    pub fn new(swarm: SwarmId, bootstrap: Vec<String>) -> Result<Self> {
        let t = Self { swarm, bootstrap };
        t.check()?;
        Ok(t)
    }

    fn check(&self) -> Result<()> {
        if self.bootstrap.len() > MAX_BOOTSTRAP {
            return Err(AdmissionError::TooLong {
                what: "bootstrap list",
                len: self.bootstrap.len(),
                max: MAX_BOOTSTRAP,
            });
        }
        for a in &self.bootstrap {
            if a.len() > MAX_ADDR_LEN {
                return Err(AdmissionError::TooLong {
                    what: "bootstrap address",
                    len: a.len(),
                    max: MAX_ADDR_LEN,
                });
            }
            if a.is_empty() {
                return Err(AdmissionError::Malformed {
                    what: "join token",
                    reason: "empty bootstrap address".into(),
                });
            }
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        cbor(&Versioned {
            v: FORMAT_VERSION,
            body: self,
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let t: Self = decode_versioned("join token", bytes, MAX_TOKEN_BYTES)?;
        t.check()?;
        Ok(t)
    }

    /// One copy-pasteable line: `slmswarm1:` + base64url of the CBOR.
    pub fn to_text(&self) -> String {
        format!("{TOKEN_PREFIX}{}", b64(&self.to_bytes()))
    }

    pub fn from_text(text: &str) -> Result<Self> {
        Self::from_bytes(&unwrap_text(text, "join token", TOKEN_PREFIX, MAX_TOKEN_BYTES)?)
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl FromStr for JoinToken {
    type Err = AdmissionError;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_text(s)
    }
}

// ---- revocation -----------------------------------------------------------------------------

/// One withdrawn admission: a single certificate, or every certificate of a peer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Revoked {
    Serial(u64),
    Peer(String),
}

impl fmt::Display for Revoked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Revoked::Serial(s) => write!(f, "serial {s}"),
            Revoked::Peer(p) => write!(f, "peer {p}"),
        }
    }
}

/// The swarm key's complete list of revocations; `serial` is the list's version, and a list
/// replaces another only with a higher one (so an old list replayed by anyone is ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    pub swarm: SwarmId,
    pub serial: u64,
    pub issued_ms: u64,
    pub revoked: Vec<Revoked>,
    #[serde(with = "fixed_bytes")]
    pub sig: [u8; 64],
}

impl Revocations {
    fn signed_bytes(&self) -> Vec<u8> {
        cbor(&(
            REVOCATIONS_DOMAIN,
            self.swarm,
            self.serial,
            self.issued_ms,
            &self.revoked,
        ))
    }

    fn check(&self) -> Result<()> {
        if self.revoked.len() > MAX_REVOKED {
            return Err(AdmissionError::TooLong {
                what: "revocation list",
                len: self.revoked.len(),
                max: MAX_REVOKED,
            });
        }
        for r in &self.revoked {
            if let Revoked::Peer(p) = r {
                check_peer("revoked peer", p)?;
            }
        }
        Ok(())
    }

    /// Checks this list was signed by `swarm`'s key.
    pub fn verify(&self, swarm: &SwarmId) -> Result<()> {
        if self.swarm != *swarm {
            return Err(AdmissionError::WrongSwarm {
                expected: *swarm,
                got: self.swarm,
            });
        }
        swarm.verify("revocation list", &self.signed_bytes(), &self.sig)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        cbor(&Versioned {
            v: FORMAT_VERSION,
            body: self,
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let r: Self = decode_versioned("revocation list", bytes, MAX_REVOCATIONS_BYTES)?;
        r.check()?;
        Ok(r)
    }

    /// Text form: `slmrevoke1:` + base64url of the CBOR.
    pub fn to_text(&self) -> String {
        format!("{REVOCATIONS_PREFIX}{}", b64(&self.to_bytes()))
    }

    pub fn from_text(text: &str) -> Result<Self> {
        Self::from_bytes(&unwrap_text(
            text,
            "revocation list",
            REVOCATIONS_PREFIX,
            MAX_REVOCATIONS_BYTES,
        )?)
    }
}

// ---- the verifier -------------------------------------------------------------------------

/// A node's admission state for one swarm: which key it trusts and what is revoked.
#[derive(Debug, Clone)]
pub struct Admission {
    swarm: SwarmId,
    list: Option<Revocations>,
    serials: BTreeSet<u64>,
    peers: BTreeSet<String>,
}

impl Admission {
    pub fn new(swarm: SwarmId) -> Self {
        Self {
            swarm,
            list: None,
            serials: BTreeSet::new(),
            peers: BTreeSet::new(),
        }
    }

    pub fn swarm(&self) -> SwarmId {
        self.swarm
    }

    /// The revocation list in force, to pass on to peers that have an older one.
    pub fn revocations(&self) -> Option<&Revocations> {
        self.list.as_ref()
    }

    /// The version of the list in force (0 = none).
    pub fn revocations_serial(&self) -> u64 {
        self.list.as_ref().map_or(0, |l| l.serial)
    }

    /// Admits `cert` if it was issued by this swarm to `presented_by_peer` (the peer id the
    /// transport authenticated), is within its validity window (± [`MAX_CLOCK_SKEW_MS`]),
    /// and is not revoked. Returns the role it grants.
    pub fn verify(&self, cert: &Certificate, presented_by_peer: &str, now_ms: u64) -> Result<Role> {
        if cert.swarm != self.swarm {
            return Err(AdmissionError::WrongSwarm {
                expected: self.swarm,
                got: cert.swarm,
            });
        }
        cert.check()?;
        self.swarm
            .verify("certificate", &cert.signed_bytes(), &cert.sig)?;
        if cert.peer != presented_by_peer {
            return Err(AdmissionError::PeerMismatch {
                cert_peer: cert.peer.clone(),
                presented: presented_by_peer.chars().take(MAX_PEER_ID_LEN).collect(),
            });
        }
        if now_ms.saturating_add(MAX_CLOCK_SKEW_MS) < cert.issued_ms {
            return Err(AdmissionError::NotYetValid {
                issued_ms: cert.issued_ms,
                now_ms,
            });
        }
        if now_ms >= cert.expires_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(AdmissionError::Expired {
                expires_ms: cert.expires_ms,
                now_ms,
            });
        }
        if self.serials.contains(&cert.serial) {
            return Err(AdmissionError::RevokedSerial(cert.serial));
        }
        if self.peers.contains(&cert.peer) {
            return Err(AdmissionError::RevokedPeer(cert.peer.clone()));
        }
        Ok(cert.role)
    }

    /// Is this peer revoked outright (whatever certificate it shows)? For dropping peers
    /// admitted before a new list arrived; certificates revoked by serial need [`Admission::verify`].
    pub fn is_peer_revoked(&self, peer: &str) -> bool {
        self.peers.contains(peer)
    }

    /// Adopts `list` if it is signed by this swarm's key and newer than the one in force.
    /// `Ok(true)`: adopted (re-check admitted peers, pass it on); `Ok(false)`: not newer, ignored.
    pub fn apply_revocations(&mut self, list: Revocations) -> Result<bool> {
        list.check()?;
        list.verify(&self.swarm)?;
        if list.serial <= self.revocations_serial() {
            return Ok(false);
        }
        self.serials.clear();
        self.peers.clear();
        for r in &list.revoked {
            match r {
                Revoked::Serial(s) => {
                    self.serials.insert(*s);
                }
                Revoked::Peer(p) => {
                    self.peers.insert(p.clone());
                }
            }
        }
        self.list = Some(list);
        Ok(true)
    }
}

// ---- helpers ------------------------------------------------------------------------------

#[derive(Serialize)]
struct Versioned<'a, T> {
    v: u8,
    body: &'a T,
}

// Decoded in two steps so that a future format reports a version mismatch, not a shape error.
#[derive(Deserialize)]
struct RawVersioned {
    v: u64,
    body: ciborium::Value,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn cbor<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    // Writing plain structs of strings, integers and byte strings into a Vec cannot fail.
    if let Err(e) = ciborium::into_writer(v, &mut out) {
        unreachable!("CBOR encoding into memory failed: {e}");
    }
    out
}

fn check_teams(teams: &[String]) -> Result<()> {
    if teams.len() > MAX_TEAMS {
        return Err(AdmissionError::Malformed {
            what: "certificate teams",
            reason: format!("{} teams, at most {MAX_TEAMS}", teams.len()),
        });
    }
    if let Some(t) = teams.iter().find(|t| !is_team(t)) {
        return Err(AdmissionError::Malformed {
            what: "certificate teams",
            reason: format!("`{t}` is not 1-32 of [A-Za-z0-9_-]"),
        });
    }
    Ok(())
}

fn check_peer(what: &'static str, peer: &str) -> Result<()> {
    if peer.is_empty() {
        return Err(AdmissionError::Malformed {
            what,
            reason: "empty peer id".into(),
        });
    }
    if peer.len() > MAX_PEER_ID_LEN {
        return Err(AdmissionError::TooLong {
            what,
            len: peer.len(),
            max: MAX_PEER_ID_LEN,
        });
    }
    Ok(())
}

/// Strips `prefix` and base64url-decodes, refusing oversize text before decoding anything.
fn unwrap_text(text: &str, what: &'static str, prefix: &'static str, max_bytes: usize) -> Result<Vec<u8>> {
    let text = text.trim();
    // base64 grows 4/3; the prefix is short. Checked before any work so huge input costs nothing.
    let max_chars = prefix.len() + max_bytes.div_ceil(3) * 4;
    if text.len() > max_chars {
        return Err(AdmissionError::TooLong {
            what,
            len: text.len(),
            max: max_chars,
        });
    }
    let Some(body) = text.strip_prefix(prefix) else {
        let hint = [
            (TOKEN_PREFIX, "join token"),
            (CERT_PREFIX, "certificate"),
            (REVOCATIONS_PREFIX, "revocation list"),
            (KEY_PREFIX, "swarm key"),
        ]
        .iter()
        .find(|(p, _)| text.starts_with(p))
        .map(|(_, name)| format!(", but this is a {name}"))
        .unwrap_or_default();
        return Err(AdmissionError::WrongPrefix { what, prefix, hint });
    };
    URL_SAFE_NO_PAD.decode(body).map_err(|e| AdmissionError::Base64 {
        what,
        reason: e.to_string(),
    })
}

fn decode_versioned<T: DeserializeOwned>(what: &'static str, bytes: &[u8], max: usize) -> Result<T> {
    if bytes.len() > max {
        return Err(AdmissionError::TooLong {
            what,
            len: bytes.len(),
            max,
        });
    }
    let malformed = |reason: String| AdmissionError::Malformed { what, reason };
    let mut cursor = Cursor::new(bytes);
    let raw: RawVersioned = ciborium::from_reader(&mut cursor).map_err(|e| malformed(e.to_string()))?;
    let consumed = usize::try_from(cursor.position()).unwrap_or(usize::MAX);
    if consumed < bytes.len() {
        return Err(malformed(format!("{} trailing bytes", bytes.len() - consumed)));
    }
    if raw.v != u64::from(FORMAT_VERSION) {
        return Err(AdmissionError::Version {
            what,
            got: u8::try_from(raw.v).unwrap_or(u8::MAX),
        });
    }
    raw.body.deserialized().map_err(|e| malformed(e.to_string()))
}

/// A fixed-length CBOR byte string.
struct Fixed<const N: usize>([u8; N]);

impl<'de, const N: usize> Deserialize<'de> for Fixed<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<const N: usize>;
        impl<const N: usize> serde::de::Visitor<'_> for V<N> {
            type Value = Fixed<N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a byte string of length {N}")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<Fixed<N>, E> {
                <[u8; N]>::try_from(v)
                    .map(Fixed)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> std::result::Result<Fixed<N>, E> {
                self.visit_bytes(&v)
            }
        }
        d.deserialize_bytes(V::<N>)
    }
}

mod fixed_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
        Ok(super::Fixed::<N>::deserialize(d)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;
    const DAY: u64 = 86_400_000;
    const ALICE: &str = "12D3KooWAliceAliceAliceAliceAliceAliceAliceAliceAlice";
    const BOB: &str = "12D3KooWBobBobBobBobBobBobBobBobBobBobBobBobBobBobBob";

    fn key(n: u8) -> SwarmKey {
        SwarmKey::from_seed([n; 32])
    }

    fn cert(k: &SwarmKey, peer: &str, serial: u64) -> Certificate {
        k.invite(peer, Role::Member, NOW, NOW + 30 * DAY, serial)
            .expect("invite")
    }

    #[test]
    fn teams_are_signed_and_a_certificate_without_them_signs_as_before() {
        let k = key(1);
        let adm = Admission::new(k.id());
        let plain = cert(&k, ALICE, 1);
        // Same bytes as before teams existed: the tuple without them, the old tag.
        let old = cbor(&(
            CERT_DOMAIN,
            plain.swarm,
            &plain.peer,
            plain.role,
            plain.issued_ms,
            plain.expires_ms,
            plain.serial,
        ));
        assert_eq!(plain.signed_bytes(), old);
        let teamed = k
            .invite_to_teams(ALICE, Role::Member, NOW, NOW + DAY, 2, vec!["legal".into()])
            .expect("invite");
        assert!(adm.verify(&teamed, ALICE, NOW).is_ok());
        let back = Certificate::from_bytes(&teamed.to_bytes()).expect("round trip");
        assert_eq!(back.teams, vec!["legal".to_string()]);
        let mut stripped = teamed.clone();
        stripped.teams.clear();
        assert!(adm.verify(&stripped, ALICE, NOW).is_err(), "teams removed");
        assert!(k
            .invite_to_teams(ALICE, Role::Member, NOW, NOW + DAY, 3, vec!["no spaces".into()])
            .is_err());
    }

    #[test]
    fn valid_certificate_is_admitted_with_its_role() {
        let k = key(1);
        let adm = Admission::new(k.id());
        assert_eq!(
            adm.verify(&cert(&k, ALICE, 1), ALICE, NOW + DAY),
            Ok(Role::Member)
        );
        let c = k.invite(BOB, Role::Cloud, NOW, NOW + DAY, 2).expect("invite");
        assert_eq!(adm.verify(&c, BOB, NOW), Ok(Role::Cloud));
        assert!(Role::Cloud.may_be_gateway() && !Role::Member.may_be_gateway());
    }

    #[test]
    fn certificate_text_round_trips_and_still_verifies() {
        let k = key(1);
        let c = cert(&k, ALICE, 7);
        let text = c.to_text();
        assert!(text.starts_with(CERT_PREFIX));
        // A file's trailing newline and indentation are fine.
        let back = Certificate::from_text(&format!("  {text}\n")).expect("parse");
        assert_eq!(back, c);
        assert_eq!(Admission::new(k.id()).verify(&back, ALICE, NOW), Ok(Role::Member));
        assert!(
            c.to_bytes().len() < MAX_CERT_BYTES / 2,
            "{} bytes",
            c.to_bytes().len()
        );
    }

    #[test]
    fn certificate_for_another_peer_is_refused() {
        let k = key(1);
        let err = Admission::new(k.id()).verify(&cert(&k, ALICE, 1), BOB, NOW);
        assert!(matches!(err, Err(AdmissionError::PeerMismatch { .. })), "{err:?}");
    }

    #[test]
    fn expired_and_future_certificates_are_refused_beyond_the_skew() {
        let k = key(1);
        let adm = Admission::new(k.id());
        let c = cert(&k, ALICE, 1);
        let end = c.expires_ms;
        assert_eq!(
            adm.verify(&c, ALICE, end + MAX_CLOCK_SKEW_MS - 1),
            Ok(Role::Member)
        );
        assert!(matches!(
            adm.verify(&c, ALICE, end + MAX_CLOCK_SKEW_MS),
            Err(AdmissionError::Expired { .. })
        ));
        assert!(matches!(
            adm.verify(&c, ALICE, end + 365 * DAY),
            Err(AdmissionError::Expired { .. })
        ));
        assert_eq!(adm.verify(&c, ALICE, NOW - MAX_CLOCK_SKEW_MS), Ok(Role::Member));
        assert!(matches!(
            adm.verify(&c, ALICE, NOW - MAX_CLOCK_SKEW_MS - 1),
            Err(AdmissionError::NotYetValid { .. })
        ));
        // Extreme clocks must not overflow.
        assert!(adm.verify(&c, ALICE, u64::MAX).is_err());
        assert!(adm.verify(&c, ALICE, 0).is_err());
    }

    #[test]
    fn certificate_from_another_swarm_is_refused() {
        let ours = key(1);
        let theirs = key(2);
        let adm = Admission::new(ours.id());
        let err = adm.verify(&cert(&theirs, ALICE, 1), ALICE, NOW);
        assert!(matches!(err, Err(AdmissionError::WrongSwarm { .. })), "{err:?}");
        // Signed by another key but claiming our swarm: the signature gives it away.
        let mut forged = cert(&theirs, ALICE, 1);
        forged.swarm = ours.id();
        assert_eq!(
            adm.verify(&forged, ALICE, NOW),
            Err(AdmissionError::BadSignature("certificate"))
        );
    }

    #[test]
    fn tampering_with_any_field_breaks_the_signature() {
        let k = key(1);
        let adm = Admission::new(k.id());
        let good = k.invite(ALICE, Role::Member, NOW, NOW + DAY, 5).expect("invite");
        type Tamper = fn(&mut Certificate);
        let tampers: [(&str, Tamper); 6] = [
            ("peer", |c| c.peer = BOB.into()),
            ("role", |c| c.role = Role::Cloud),
            ("issued", |c| c.issued_ms -= 1),
            ("expires", |c| c.expires_ms += 365 * DAY),
            ("serial", |c| c.serial += 1),
            ("sig", |c| c.sig[10] ^= 1),
        ];
        for (field, tamper) in tampers {
            let mut c = good.clone();
            tamper(&mut c);
            // Verify as the peer the (possibly changed) certificate names, so only the
            // signature can catch it.
            let peer = c.peer.clone();
            assert_eq!(
                adm.verify(&c, &peer, NOW),
                Err(AdmissionError::BadSignature("certificate")),
                "tampered {field}"
            );
            // And the same after a trip through the text form.
            let back = Certificate::from_text(&c.to_text()).expect("parse");
            assert!(
                adm.verify(&back, &peer, NOW).is_err(),
                "tampered {field} via text"
            );
        }
        assert_eq!(adm.verify(&good, ALICE, NOW), Ok(Role::Member));
    }

    #[test]
    fn garbage_and_truncated_text_is_refused_with_a_reason() {
        let k = key(1);
        let token = JoinToken::new(k.id(), vec!["/ip4/192.0.2.1/udp/4001/quic-v1".into()]).expect("token");
        let text = token.to_text();
        assert_eq!(JoinToken::from_text(&text).expect("parse"), token);
        for cut in [
            text.len() - 1,
            text.len() - 5,
            text.len() / 2,
            TOKEN_PREFIX.len() + 3,
        ] {
            assert!(JoinToken::from_text(&text[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(
            JoinToken::from_text(""),
            Err(AdmissionError::WrongPrefix { .. })
        ));
        assert!(matches!(
            JoinToken::from_text("hello"),
            Err(AdmissionError::WrongPrefix { .. })
        ));
        assert!(matches!(
            JoinToken::from_text("slmswarm1:!!!not base64!!!"),
            Err(AdmissionError::Base64 { .. })
        ));
        assert!(matches!(
            JoinToken::from_text(&format!("{TOKEN_PREFIX}{}", b64(b"not cbor at all"))),
            Err(AdmissionError::Malformed { .. })
        ));
        // Valid CBOR, wrong version.
        let v2 = cbor(&Versioned { v: 2, body: &token });
        assert!(matches!(
            JoinToken::from_text(&format!("{TOKEN_PREFIX}{}", b64(&v2))),
            Err(AdmissionError::Version { got: 2, .. })
        ));
        // Trailing bytes after a valid token.
        let mut extra = token.to_bytes();
        extra.push(0);
        assert!(matches!(
            JoinToken::from_bytes(&extra),
            Err(AdmissionError::Malformed { .. })
        ));
        // A certificate pasted where a token belongs says so.
        let err = JoinToken::from_text(&cert(&k, ALICE, 1).to_text()).expect_err("wrong kind");
        assert!(err.to_string().contains("this is a certificate"), "{err}");
        let err = Certificate::from_text(&text).expect_err("wrong kind");
        assert!(err.to_string().contains("this is a join token"), "{err}");
        // Garbage swarm ids.
        assert!("nonsense".parse::<SwarmId>().is_err());
        assert_eq!(k.id().to_string().parse::<SwarmId>(), Ok(k.id()));
        // Not a curve point / small order: refused as ids, even inside a token.
        assert!(SwarmId::from_bytes([0; 32]).is_err());
        let mut bad = token.to_bytes();
        let pos = bad
            .windows(32)
            .position(|w| w == k.id().as_bytes())
            .expect("id in token");
        bad[pos..pos + 32].copy_from_slice(&[0; 32]);
        assert!(JoinToken::from_bytes(&bad).is_err());
    }

    #[test]
    fn size_caps_are_enforced() {
        let k = key(1);
        let addr = |n: usize| format!("/dns4/{}/udp/4001/quic-v1", "a".repeat(n));
        assert!(JoinToken::new(k.id(), vec![addr(10); MAX_BOOTSTRAP]).is_ok());
        assert!(matches!(
            JoinToken::new(k.id(), vec![addr(10); MAX_BOOTSTRAP + 1]),
            Err(AdmissionError::TooLong {
                what: "bootstrap list",
                ..
            })
        ));
        assert!(matches!(
            JoinToken::new(k.id(), vec![addr(MAX_ADDR_LEN)]),
            Err(AdmissionError::TooLong {
                what: "bootstrap address",
                ..
            })
        ));
        // Largest legal token round-trips through text.
        let big = JoinToken::new(k.id(), vec!["x".repeat(MAX_ADDR_LEN); MAX_BOOTSTRAP]).expect("max token");
        assert_eq!(JoinToken::from_text(&big.to_text()).expect("parse"), big);
        // Built around the constructor, an oversize token is still refused on decode.
        let over = JoinToken {
            swarm: k.id(),
            bootstrap: vec!["x".repeat(MAX_ADDR_LEN + 1)],
        };
        assert!(JoinToken::from_text(&over.to_text()).is_err());
        let many = JoinToken {
            swarm: k.id(),
            bootstrap: vec!["x".into(); MAX_BOOTSTRAP + 1],
        };
        assert!(JoinToken::from_bytes(&many.to_bytes()).is_err());
        // Huge input is refused by length before decoding.
        let huge = format!("{TOKEN_PREFIX}{}", "A".repeat(1 << 20));
        assert!(matches!(
            JoinToken::from_text(&huge),
            Err(AdmissionError::TooLong { .. })
        ));
        assert!(matches!(
            Certificate::from_bytes(&vec![0; MAX_CERT_BYTES + 1]),
            Err(AdmissionError::TooLong { .. })
        ));
        // Peer ids are bounded in certificates and revocation lists.
        assert!(k
            .invite(&"p".repeat(MAX_PEER_ID_LEN + 1), Role::Member, NOW, NOW + DAY, 1)
            .is_err());
        assert!(k.invite("", Role::Member, NOW, NOW + DAY, 1).is_err());
        assert!(k.invite(ALICE, Role::Member, NOW, NOW, 1).is_err());
        let mut long = cert(&k, ALICE, 1);
        long.peer = "p".repeat(MAX_PEER_ID_LEN + 1);
        assert!(Certificate::from_bytes(&long.to_bytes()).is_err());
        assert!(k
            .sign_revocations(1, vec![Revoked::Serial(1); MAX_REVOKED + 1], NOW)
            .is_err());
        // The largest legal revocation list fits its byte cap.
        let full = k
            .sign_revocations(
                1,
                vec![Revoked::Peer("p".repeat(MAX_PEER_ID_LEN)); MAX_REVOKED],
                NOW,
            )
            .expect("full list");
        assert_eq!(Revocations::from_text(&full.to_text()).expect("parse"), full);
    }

    #[test]
    fn revoked_serial_or_peer_is_refused() {
        let k = key(1);
        let mut adm = Admission::new(k.id());
        let a = cert(&k, ALICE, 1);
        let b = cert(&k, BOB, 2);
        let list = k
            .sign_revocations(1, vec![Revoked::Serial(1)], NOW)
            .expect("sign");
        assert_eq!(adm.apply_revocations(list), Ok(true));
        assert_eq!(adm.verify(&a, ALICE, NOW), Err(AdmissionError::RevokedSerial(1)));
        assert_eq!(adm.verify(&b, BOB, NOW), Ok(Role::Member));
        // Revoking a peer covers every certificate it holds, including new ones.
        let list = k
            .sign_revocations(2, vec![Revoked::Serial(1), Revoked::Peer(BOB.into())], NOW)
            .expect("sign");
        let list = Revocations::from_text(&list.to_text()).expect("text round trip");
        assert_eq!(adm.apply_revocations(list), Ok(true));
        assert_eq!(
            adm.verify(&b, BOB, NOW),
            Err(AdmissionError::RevokedPeer(BOB.into()))
        );
        assert!(adm.verify(&cert(&k, BOB, 3), BOB, NOW).is_err());
        assert!(adm.is_peer_revoked(BOB) && !adm.is_peer_revoked(ALICE));
        // A list that no longer names a serial re-admits it (lists are complete, not deltas).
        let list = k.sign_revocations(3, vec![], NOW).expect("sign");
        assert_eq!(adm.apply_revocations(list), Ok(true));
        assert_eq!(adm.verify(&a, ALICE, NOW), Ok(Role::Member));
    }

    #[test]
    fn only_newer_properly_signed_lists_replace_the_current_one() {
        let k = key(1);
        let mut adm = Admission::new(k.id());
        let v5 = k
            .sign_revocations(5, vec![Revoked::Serial(1)], NOW)
            .expect("sign");
        let v4 = k.sign_revocations(4, vec![], NOW).expect("sign");
        let v5b = k.sign_revocations(5, vec![], NOW).expect("sign");
        assert_eq!(adm.apply_revocations(v5.clone()), Ok(true));
        assert_eq!(adm.apply_revocations(v4), Ok(false));
        assert_eq!(adm.apply_revocations(v5b), Ok(false));
        assert_eq!(adm.apply_revocations(v5.clone()), Ok(false));
        assert_eq!(adm.revocations(), Some(&v5));
        assert_eq!(
            adm.verify(&cert(&k, ALICE, 1), ALICE, NOW),
            Err(AdmissionError::RevokedSerial(1))
        );
        // Someone else's key, or a forged version bump: refused, and the list stays.
        let other = key(2).sign_revocations(9, vec![], NOW).expect("sign");
        assert!(matches!(
            adm.apply_revocations(other),
            Err(AdmissionError::WrongSwarm { .. })
        ));
        let mut bumped = v5.clone();
        bumped.serial = 6;
        bumped.revoked.clear();
        assert_eq!(
            adm.apply_revocations(bumped),
            Err(AdmissionError::BadSignature("revocation list"))
        );
        let mut relabelled = key(2).sign_revocations(9, vec![], NOW).expect("sign");
        relabelled.swarm = k.id();
        assert_eq!(
            adm.apply_revocations(relabelled),
            Err(AdmissionError::BadSignature("revocation list"))
        );
        assert_eq!(adm.revocations_serial(), 5);
    }

    #[test]
    fn a_certificate_signature_is_not_a_revocation_signature() {
        // Same key, and the domain tags keep the two kinds of signed object apart.
        let k = key(1);
        let c = cert(&k, ALICE, 1);
        let mut list = k.sign_revocations(1, vec![], NOW).expect("sign");
        list.sig = c.sig;
        assert!(list.verify(&k.id()).is_err());
    }

    #[test]
    fn swarm_key_text_round_trips_and_hides_its_secret() {
        let k = key(3);
        let back = SwarmKey::from_text(&format!("{}\n", k.to_text())).expect("parse");
        assert_eq!(back.id(), k.id());
        assert_eq!(back.to_seed(), k.to_seed());
        assert!(!format!("{k:?}").contains(&b64(&k.to_seed())));
        assert!(SwarmKey::from_text(&k.id().to_string()).is_err());
        assert!(SwarmKey::from_text(&format!("{KEY_PREFIX}{}", b64(&[1; 31]))).is_err());
    }

    #[test]
    fn role_parses_from_its_name_only() {
        assert_eq!("cloud".parse::<Role>(), Ok(Role::Cloud));
        assert_eq!("member".parse::<Role>(), Ok(Role::Member));
        assert!("admin".parse::<Role>().is_err());
    }
}
