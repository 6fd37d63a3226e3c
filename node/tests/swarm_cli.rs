//! `slm-swarm swarm …` as a user runs it: the built binary, JSON shapes, and certificates
//! that the protocol's `Admission` accepts for the invited peer only.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use libp2p::identity::Keypair;
use serde_json::Value;
use swarm_protocol::admission::{Admission, AdmissionError, Certificate, JoinToken, Revocations, Role};

fn slm(args: &[&str], home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slm-swarm"))
        .args(args)
        // Keep `peer-id` and friends away from the real home.
        .env("SLM_SWARM_HOME", home)
        .env_remove("RUST_LOG")
        .output()
        .expect("run slm-swarm")
}

fn ok_json(args: &[&str], home: &Path) -> Value {
    let out = slm(args, home);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn fails(args: &[&str], home: &Path) -> String {
    let out = slm(args, home);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn new_peer() -> String {
    Keypair::generate_ed25519().public().to_peer_id().to_string()
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms")
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("no string `{k}` in {v}"))
}

#[test]
fn init_prints_a_join_token_and_refuses_to_overwrite_the_key() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("owner");
    let d = dir.to_str().expect("utf8");
    let addr = "/ip4/192.0.2.7/udp/4001/quic-v1";
    let v = ok_json(
        &["swarm", "init", "--dir", d, "--bootstrap", addr, "--json"],
        tmp.path(),
    );
    let token = JoinToken::from_text(s(&v, "join_token")).expect("token parses");
    assert_eq!(token.bootstrap, vec![addr.to_string()]);
    assert_eq!(s(&v, "swarm_id"), token.swarm.to_string());
    let key_file = Path::new(s(&v, "key_file"));
    assert_eq!(key_file, dir.join("swarm.key"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(key_file)
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "key file mode {mode:o}");
    }
    let before = std::fs::read(key_file).expect("read key");

    let err = fails(&["swarm", "init", "--dir", d], tmp.path());
    assert!(err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read(key_file).expect("read key"),
        before,
        "key was overwritten"
    );

    // `token` reprints the same token; --force makes a new swarm.
    let t = ok_json(&["swarm", "token", "--dir", d, "--json"], tmp.path());
    assert_eq!(s(&t, "join_token"), s(&v, "join_token"));
    let v2 = ok_json(&["swarm", "init", "--dir", d, "--force", "--json"], tmp.path());
    assert_ne!(s(&v2, "swarm_id"), s(&v, "swarm_id"));

    let err = fails(
        &["swarm", "init", "--dir", d, "--bootstrap", "not-an-addr"],
        tmp.path(),
    );
    assert!(err.contains("multiaddr"), "{err}");
}

#[test]
fn invited_certificate_admits_that_peer_only() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path().join("owner");
    let d = d.to_str().expect("utf8");
    let init = ok_json(&["swarm", "init", "--dir", d, "--json"], tmp.path());
    let token = JoinToken::from_text(s(&init, "join_token")).expect("token");

    let peer = new_peer();
    let v = ok_json(
        &[
            "swarm",
            "invite",
            "--dir",
            d,
            "--peer",
            &peer,
            "--role",
            "cloud",
            "--valid-for",
            "30d",
            "--json",
        ],
        tmp.path(),
    );
    let cert = Certificate::from_text(s(&v, "certificate")).expect("certificate parses");
    assert_eq!(v["serial"].as_u64(), Some(cert.serial));
    let adm = Admission::new(token.swarm);
    let now = now_ms();
    assert_eq!(adm.verify(&cert, &peer, now), Ok(Role::Cloud));
    assert!(matches!(
        adm.verify(&cert, &new_peer(), now),
        Err(AdmissionError::PeerMismatch { .. })
    ));
    // 30 days, give or take the test's own runtime.
    assert!(adm.verify(&cert, &peer, now + 31 * 86_400_000).is_err());
    // Another swarm does not accept it.
    let other = tmp.path().join("other");
    let o = ok_json(
        &["swarm", "init", "--dir", other.to_str().expect("utf8"), "--json"],
        tmp.path(),
    );
    let other_swarm = JoinToken::from_text(s(&o, "join_token")).expect("token").swarm;
    assert!(Admission::new(other_swarm).verify(&cert, &peer, now).is_err());

    // Default role is member; serials rise; --out writes the text form.
    let out = tmp.path().join("node.cert");
    let v2 = ok_json(
        &[
            "swarm",
            "invite",
            "--dir",
            d,
            "--peer",
            &peer,
            "--out",
            out.to_str().expect("utf8"),
            "--json",
        ],
        tmp.path(),
    );
    let from_file = swarm_node::admission::read_certificate(&out).expect("certificate file");
    assert_eq!(from_file.to_text(), s(&v2, "certificate"));
    assert_eq!(from_file.serial, cert.serial + 1);
    assert_eq!(adm.verify(&from_file, &peer, now), Ok(Role::Member));

    // Revoking the first serial: the list verifies, and refuses that certificate only.
    let r = ok_json(
        &[
            "swarm",
            "revoke",
            "--dir",
            d,
            "--serial",
            &cert.serial.to_string(),
            "--json",
        ],
        tmp.path(),
    );
    let list = Revocations::from_text(s(&r, "revocations")).expect("list parses");
    let mut adm = adm;
    assert_eq!(adm.apply_revocations(list), Ok(true));
    assert_eq!(
        adm.verify(&cert, &peer, now),
        Err(AdmissionError::RevokedSerial(cert.serial))
    );
    assert_eq!(adm.verify(&from_file, &peer, now), Ok(Role::Member));
    let r2 = ok_json(
        &["swarm", "revoke", "--dir", d, "--peer", &peer, "--json"],
        tmp.path(),
    );
    assert_eq!(r2["version"].as_u64(), Some(2));
    let list2 = Revocations::from_text(s(&r2, "revocations")).expect("list parses");
    assert_eq!(adm.apply_revocations(list2), Ok(true));
    assert!(adm.verify(&from_file, &peer, now).is_err());
}

#[test]
fn mistakes_get_errors_that_say_what_to_do() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path().join("owner");
    let d = d.to_str().expect("utf8");
    let peer = new_peer();
    let err = fails(&["swarm", "invite", "--dir", d, "--peer", &peer], tmp.path());
    assert!(err.contains("slm-swarm swarm init"), "{err}");
    ok_json(&["swarm", "init", "--dir", d, "--json"], tmp.path());
    let err = fails(
        &["swarm", "invite", "--dir", d, "--peer", "not-a-peer"],
        tmp.path(),
    );
    assert!(err.contains("slm-swarm swarm peer-id"), "{err}");
    let err = fails(
        &[
            "swarm",
            "invite",
            "--dir",
            d,
            "--peer",
            &peer,
            "--valid-for",
            "3 weeks",
        ],
        tmp.path(),
    );
    assert!(err.contains("unit") || err.contains("number"), "{err}");
    let err = fails(
        &["swarm", "invite", "--dir", d, "--peer", &peer, "--role", "admin"],
        tmp.path(),
    );
    assert!(err.contains("member") && err.contains("cloud"), "{err}");
    let err = fails(&["swarm", "revoke", "--dir", d], tmp.path());
    assert!(err.contains("--peer") || err.contains("--serial"), "{err}");
}

#[test]
fn peer_id_is_the_identity_the_node_will_use() {
    let tmp = tempfile::tempdir().expect("tmp");
    let id = tmp.path().join("identity-n1.key");
    let idp = id.to_str().expect("utf8");
    let v = ok_json(&["swarm", "peer-id", "--identity", idp, "--json"], tmp.path());
    assert_eq!(v["created"], Value::Bool(true));
    let peer = s(&v, "peer_id").to_string();
    let key = Keypair::from_protobuf_encoding(&std::fs::read(&id).expect("identity")).expect("key");
    assert_eq!(key.public().to_peer_id().to_string(), peer);
    let again = ok_json(&["swarm", "peer-id", "--identity", idp, "--json"], tmp.path());
    assert_eq!(s(&again, "peer_id"), peer);
    assert_eq!(again["created"], Value::Bool(false));
    // Without --identity: the default file in SLM_SWARM_HOME named after --name, as `start` uses.
    let by_name = ok_json(&["swarm", "peer-id", "--name", "n2", "--json"], tmp.path());
    assert_eq!(
        Path::new(s(&by_name, "identity")),
        tmp.path().join("identity-n2.key")
    );
}
