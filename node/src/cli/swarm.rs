//! `swarm`: the owner's admission tools (init, invite, revoke, token) and `peer-id`, which a
//! node operator runs to learn what to send the owner for an invitation.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand, ValueEnum};
use libp2p::{Multiaddr, PeerId};
use rand::TryRngCore as _;
use serde_json::json;
use swarm_node::admission::SwarmDir;
use swarm_node::models;
use swarm_node::node::load_or_create_key;
use swarm_protocol::admission::{Revoked, Role};

use super::duration::parse_duration_ms;
use super::node::StartArgs;

/// Keyed swarms: only nodes holding a certificate signed by the swarm key may join.
///
/// The owner runs `init` once, then `invite` for each node's peer id (which the node's
/// operator learns with `peer-id`). Nodes get the join token and their certificate.
#[derive(Subcommand, Debug)]
pub(crate) enum SwarmCmd {
    /// Create a swarm key in a directory and print the join token.
    ///
    /// The key (DIR/swarm.key, mode 0600) is the swarm's root of trust: keep it on this
    /// machine. The join token only names the swarm and where to dial; it grants nothing.
    Init(InitArgs),
    /// Issue a membership certificate for a node's peer id.
    ///
    /// The node's operator learns its peer id with `slm-swarm swarm peer-id`. The
    /// certificate works only for that peer id, so it may travel over any channel.
    Invite(InviteArgs),
    /// Revoke a certificate (by serial) or a peer (all its certificates), and print the
    /// updated signed revocation list.
    Revoke(RevokeArgs),
    /// Print the swarm's join token, optionally replacing its bootstrap addresses.
    Token(TokenArgs),
    /// Print this node's peer id (creating its identity key if it has none yet), to send
    /// to the swarm owner for `swarm invite`.
    PeerId(PeerIdArgs),
}

/// The swarm owner's key directory.
#[derive(Args, Debug, Clone)]
pub(crate) struct DirArgs {
    /// Directory holding the swarm key, serial counter, issued log and revocation list.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct InitArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// Address new nodes dial first, put in the join token (repeatable), e.g.
    /// /ip4/192.0.2.7/udp/4001/quic-v1/p2p/12D3Koo…; not needed on a LAN with mDNS.
    #[arg(long, value_name = "ADDR")]
    pub bootstrap: Vec<String>,
    /// Replace an existing swarm key; every certificate it issued stops working.
    #[arg(long)]
    pub force: bool,
    /// Print JSON: {"join_token", "key_file", "swarm_id", "dir"}.
    #[arg(long)]
    pub json: bool,
}

/// Role granted by a certificate.
#[derive(ValueEnum, Clone, Copy, Debug, Default)]
pub(crate) enum RoleArg {
    /// A full member: gossips, votes, answers queries.
    #[default]
    Member,
    /// A member that may also be elected gateway and call the cloud for the swarm.
    Cloud,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Member => Role::Member,
            RoleArg::Cloud => Role::Cloud,
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct InviteArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// The node's libp2p peer id (its operator runs `slm-swarm swarm peer-id`).
    #[arg(long, value_name = "PEER_ID")]
    pub peer: String,
    /// Role to grant.
    #[arg(long, value_enum, default_value_t)]
    pub role: RoleArg,
    /// How long the certificate is valid: a number with a unit (30d, 12h, 90m, 45s, 500ms),
    /// or a bare number of milliseconds.
    #[arg(long, value_name = "DURATION", default_value = "365d", value_parser = parse_duration_ms)]
    pub valid_for: u64,
    /// Admit the peer to this team (repeatable): in a keyed swarm a node
    /// serves only the teams of `[teams] serve` its certificate names.
    #[arg(long = "team", value_name = "TEAM")]
    pub teams: Vec<String>,
    /// Write the certificate to this file (mode 0600) instead of printing it.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Print JSON: {"certificate", "serial", "peer", "role", "expires_ms", "swarm_id", "teams"}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("what").required(true).multiple(true).args(["peer", "serial"]))]
pub(crate) struct RevokeArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// Revoke every certificate of this peer id (repeatable).
    #[arg(long, value_name = "PEER_ID")]
    pub peer: Vec<String>,
    /// Revoke the certificate with this serial (repeatable; see DIR/issued.jsonl).
    #[arg(long, value_name = "N")]
    pub serial: Vec<u64>,
    /// Print JSON: {"revocations", "version", "revoked", "changed"}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct TokenArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// Replace the token's bootstrap addresses with these (repeatable).
    #[arg(long, value_name = "ADDR")]
    pub bootstrap: Vec<String>,
    /// Print JSON: {"join_token", "swarm_id", "key_file", "bootstrap", "revocations_version", "last_serial"}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct PeerIdArgs {
    /// Node configuration file, to find its identity as `start` does.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Node name (the default identity file is named after it), as given to `start --name`.
    #[arg(long)]
    pub name: Option<String>,
    /// Identity key file, as given to `start --identity`.
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// Print JSON: {"peer_id", "identity"}.
    #[arg(long)]
    pub json: bool,
}

pub(super) fn run(cmd: SwarmCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        SwarmCmd::Init(a) => init(a),
        SwarmCmd::Invite(a) => invite(a),
        SwarmCmd::Revoke(a) => revoke(a),
        SwarmCmd::Token(a) => token(a),
        SwarmCmd::PeerId(a) => peer_id(a),
    }
}

fn now_ms() -> anyhow::Result<u64> {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    Ok(u64::try_from(d.as_millis())?)
}

fn check_bootstrap(addrs: &[String]) -> anyhow::Result<()> {
    for a in addrs {
        Multiaddr::from_str(a).with_context(|| {
            format!("--bootstrap `{a}` is not a multiaddr; expected e.g. /ip4/192.0.2.7/udp/4001/quic-v1/p2p/12D3Koo…")
        })?;
    }
    Ok(())
}

fn check_peer(p: &str) -> anyhow::Result<()> {
    PeerId::from_str(p.trim()).map_err(|e| {
        anyhow!(
            "`{p}` is not a libp2p peer id ({e}); the node's operator prints it with `slm-swarm swarm peer-id` \
             (it starts with 12D3Koo)"
        )
    })?;
    Ok(())
}

fn open_dir(dir: &Path) -> anyhow::Result<SwarmDir> {
    Ok(SwarmDir::open(dir)?)
}

fn init(a: InitArgs) -> anyhow::Result<ExitCode> {
    check_bootstrap(&a.bootstrap)?;
    let mut seed = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut seed)
        .context("cannot read the operating system's random source")?;
    let dir = &a.dir.dir;
    let (sd, token) = SwarmDir::init(dir, seed, a.bootstrap, a.force)?;
    let key_file = sd.key_path();
    if a.json {
        println!(
            "{}",
            json!({
                "join_token": token.to_text(),
                "key_file": key_file.display().to_string(),
                "swarm_id": sd.id().to_string(),
                "dir": dir.display().to_string(),
            })
        );
    } else {
        eprintln!("swarm id: {}", sd.id());
        eprintln!(
            "key file: {} (secret: whoever holds it decides who joins)",
            key_file.display()
        );
        eprintln!("join token (give it to every node; it grants nothing by itself):");
        println!("{token}");
        eprintln!(
            "next: each node's operator runs `slm-swarm swarm peer-id`; then here: \
             `slm-swarm swarm invite --dir {} --peer PEER_ID`",
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn invite(a: InviteArgs) -> anyhow::Result<ExitCode> {
    check_peer(&a.peer)?;
    let sd = open_dir(&a.dir.dir)?;
    let cert = sd.invite_to_teams(
        a.peer.trim(),
        a.role.into(),
        now_ms()?,
        a.valid_for,
        a.teams.clone(),
    )?;
    let text = cert.to_text();
    if let Some(out) = &a.out {
        write_new_private(out, &format!("{text}\n"))?;
    }
    if a.json {
        let mut v = json!({
            "certificate": text,
            "serial": cert.serial,
            "peer": cert.peer,
            "role": cert.role.as_str(),
            "teams": cert.teams,
            "issued_ms": cert.issued_ms,
            "expires_ms": cert.expires_ms,
            "swarm_id": cert.swarm.to_string(),
        });
        if let Some(out) = &a.out {
            v["file"] = json!(out.display().to_string());
        }
        println!("{v}");
    } else {
        match &a.out {
            Some(out) => eprintln!("wrote certificate {} to {}", cert.serial, out.display()),
            None => println!("{text}"),
        }
        eprintln!(
            "certificate {} admits {} as {} for {}; the node starts with the join token and this certificate",
            cert.serial,
            cert.peer,
            cert.role,
            human_duration(a.valid_for)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn revoke(a: RevokeArgs) -> anyhow::Result<ExitCode> {
    for p in &a.peer {
        check_peer(p)?;
    }
    let sd = open_dir(&a.dir.dir)?;
    let entries: Vec<Revoked> = a
        .serial
        .iter()
        .map(|s| Revoked::Serial(*s))
        .chain(a.peer.iter().map(|p| Revoked::Peer(p.trim().to_string())))
        .collect();
    let (list, changed) = sd.revoke(entries, now_ms()?)?;
    if a.json {
        println!(
            "{}",
            json!({
                "revocations": list.to_text(),
                "version": list.serial,
                "revoked": list.revoked.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
                "changed": changed,
                "swarm_id": list.swarm.to_string(),
            })
        );
    } else {
        println!("{}", list.to_text());
        if changed {
            eprintln!(
                "revocation list version {} ({} entries) stored in {}",
                list.serial,
                list.revoked.len(),
                sd.dir().display()
            );
        } else {
            eprintln!("already revoked; list unchanged (version {})", list.serial);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn token(a: TokenArgs) -> anyhow::Result<ExitCode> {
    let sd = open_dir(&a.dir.dir)?;
    let token = if a.bootstrap.is_empty() {
        sd.join_token()?
    } else {
        check_bootstrap(&a.bootstrap)?;
        sd.set_bootstrap(a.bootstrap)?
    };
    if a.json {
        println!(
            "{}",
            json!({
                "join_token": token.to_text(),
                "swarm_id": sd.id().to_string(),
                "key_file": sd.key_path().display().to_string(),
                "bootstrap": token.bootstrap,
                "revocations_version": sd.revocations()?.map_or(0, |l| l.serial),
                "last_serial": sd.last_serial()?,
            })
        );
    } else {
        println!("{token}");
    }
    Ok(ExitCode::SUCCESS)
}

fn peer_id(a: PeerIdArgs) -> anyhow::Result<ExitCode> {
    // The same resolution as `start` (config file, then --name/--identity), so both agree.
    let start = StartArgs {
        config: a.config,
        name: a.name,
        identity: a.identity,
        ..Default::default()
    };
    let cfg = start.config()?;
    let path = cfg.identity_path(&models::home_dir());
    let existed = path.exists();
    let key = load_or_create_key(&path)?;
    let peer = key.public().to_peer_id();
    if a.json {
        println!(
            "{}",
            json!({"peer_id": peer.to_string(), "identity": path.display().to_string(), "created": !existed})
        );
    } else {
        println!("{peer}");
        if !existed {
            eprintln!("created identity {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a new file with mode 0600, refusing to replace one (a certificate is not secret,
/// but overwriting another node's by a typo would be confusing).
fn write_new_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).with_context(|| {
        if path.exists() {
            format!(
                "{} exists; choose another --out or remove it first",
                path.display()
            )
        } else {
            format!("cannot create {}", path.display())
        }
    })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn human_duration(ms: u64) -> String {
    const DAY: u64 = 86_400_000;
    match ms {
        m if m % DAY == 0 => format!("{} days", m / DAY),
        m if m % 3_600_000 == 0 => format!("{} hours", m / 3_600_000),
        m if m % 1_000 == 0 => format!("{} s", m / 1_000),
        m => format!("{m} ms"),
    }
}
