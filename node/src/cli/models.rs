//! `models list`, `models pull` and `models rm`, and resolving model arguments for other
//! commands (fetching catalog models on first use).

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;
use swarm_node::models::{self, Catalog, PullOptions, PullOutcome, ResolvedModel};

use super::ModelArgs;

pub(super) fn list(args: &ModelArgs, as_json: bool) -> anyhow::Result<ExitCode> {
    let cat = Catalog::load(args.catalog.as_deref())?;
    let home = models::home_dir();
    let rows: Vec<serde_json::Value> = cat
        .models
        .iter()
        .map(|m| {
            let installed = m.is_installed(&home);
            json!({
                "id": m.id,
                "name": m.name,
                "arch": m.arch,
                "quant": m.quant,
                "role": m.role,
                "licence": m.licence,
                "size": m.size,
                "installed": installed,
                "path": if installed { Some(m.install_path(&home).display().to_string()) } else { None },
            })
        })
        .collect();
    if as_json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("cache: {}", models::catalog::models_dir(&home).display());
    println!(
        "{:<20} {:<9} {:<7} {:<7} {:>9}  INSTALLED",
        "ID", "ROLE", "ARCH", "QUANT", "SIZE"
    );
    for (m, r) in cat.models.iter().zip(rows.iter()) {
        let size = m
            .size
            .map(|s| format!("{:.0} MB", s as f64 / 1e6))
            .unwrap_or_else(|| "-".into());
        let role = serde_json::to_value(&m.role)?.as_str().unwrap_or("").to_string();
        let inst = match r["path"].as_str() {
            Some(p) => format!("yes  {p}"),
            None => "no".to_string(),
        };
        println!(
            "{:<20} {:<9} {:<7} {:<7} {:>9}  {}",
            m.id, role, m.arch, m.quant, size, inst
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn pull(args: &ModelArgs, ids: &[String]) -> anyhow::Result<ExitCode> {
    let cat = Catalog::load(args.catalog.as_deref())?;
    let home = models::home_dir();
    let ids: Vec<String> = if ids.iter().any(|i| i == "all") {
        cat.models.iter().map(|m| m.id.clone()).collect()
    } else {
        ids.to_vec()
    };
    // Check every id first: a typo should not fail after minutes of downloading.
    let entries = ids.iter().map(|id| cat.get(id)).collect::<Result<Vec<_>, _>>()?;
    let opts = PullOptions {
        progress: std::io::stderr().is_terminal(),
        ..PullOptions::default()
    };
    for e in entries {
        let t0 = std::time::Instant::now();
        match models::pull(e, &home, &opts).with_context(|| format!("pulling `{}`", e.id))? {
            PullOutcome::AlreadyInstalled(p) => println!("{}: already installed at {}", e.id, p.display()),
            PullOutcome::Installed {
                path,
                downloaded_bytes,
            } => println!(
                "{}: installed at {} ({:.1} MB in {:.1} s, sha256 verified)",
                e.id,
                path.display(),
                downloaded_bytes as f64 / 1e6,
                t0.elapsed().as_secs_f64()
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn rm(args: &ModelArgs, ids: &[String]) -> anyhow::Result<ExitCode> {
    let cat = Catalog::load(args.catalog.as_deref())?;
    let home = models::home_dir();
    let all = ids.iter().any(|i| i == "all");
    // Check every id first, as pull does: a typo deletes nothing.
    let entries = if all {
        cat.models.iter().collect::<Vec<_>>()
    } else {
        ids.iter().map(|id| cat.get(id)).collect::<Result<Vec<_>, _>>()?
    };
    let mut freed = 0u64;
    for e in entries {
        match e.remove(&home).with_context(|| format!("removing `{}`", e.id))? {
            Some(bytes) => {
                freed += bytes;
                println!("{}: removed ({:.1} MB)", e.id, bytes as f64 / 1e6);
            }
            None if !all => println!("{}: not installed", e.id),
            None => {}
        }
    }
    println!(
        "freed {:.1} MB in {}",
        freed as f64 / 1e6,
        models::catalog::models_dir(&home).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Resolve a model argument; a catalog model not yet installed is fetched now.
pub(super) fn ensure(args: &ModelArgs, spec: &str) -> anyhow::Result<ResolvedModel> {
    let cat = Catalog::load(args.catalog.as_deref())?;
    let opts = PullOptions {
        progress: std::io::stderr().is_terminal(),
        ..PullOptions::default()
    };
    models::ensure(&cat, &models::home_dir(), spec, &opts).with_context(|| format!("model `{spec}`"))
}
