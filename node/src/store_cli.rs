//! `sandmesh store`: what an operator needs to see in, and do to, the
//! object store the nodes publish snapshots to (the store itself, not a
//! node: it works with every node down).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use actors::objects::{Claim, SnapshotStore, StoreUrl};
use anyhow::{Context, Result};

/// The store a node on `data_dir` uses when given `url` (its default
/// otherwise), opened with credentials from the environment.
pub fn open(url: Option<StoreUrl>, data_dir: &Path) -> Result<SnapshotStore> {
    let url = url.unwrap_or_else(|| StoreUrl::Local {
        dir: std::path::absolute(data_dir.join("objects"))
            .unwrap_or_else(|_| data_dir.join("objects")),
    });
    SnapshotStore::open(&url, &Default::default()).context("opening the object store")
}

/// One line per snapshot: paused sandboxes (with who holds them, from the
/// claims) and user snapshots, with their size and age.
pub async fn list(store: &SnapshotStore) -> Result<String> {
    let mut out = String::new();
    let claims: Vec<Claim> = store.claims().await.context("listing claims")?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    writeln!(
        out,
        "{:<44} {:<9} {:<24} {:>10} {:>8}",
        "SNAPSHOT", "KIND", "SANDBOX (STATE ON NODE)", "SIZE", "AGE"
    )?;
    let mut listed = 0;
    for name in store.list("").await.context("listing snapshots")? {
        let manifest = match store.manifest(&name).await {
            Ok(m) => m,
            Err(e) => {
                writeln!(out, "{name:<44} unreadable: {e}")?;
                continue;
            }
        };
        let bytes = manifest.total_size();
        let sandbox = manifest.metadata.sandbox_id.clone().unwrap_or_default();
        let holder = claims
            .iter()
            .find(|c| c.sandbox_id == sandbox && c.snapshot.as_deref() == Some(name.as_str()))
            .map_or(String::new(), |c| format!(" (paused on {})", c.node));
        let age = Duration::from_millis(now_ms.saturating_sub(manifest.created_unix_ms));
        writeln!(
            out,
            "{name:<44} {:<9} {:<24} {:>10} {:>8}",
            manifest.metadata.kind,
            format!("{sandbox}{holder}"),
            human_bytes(bytes),
            human_age(age)
        )?;
        listed += 1;
    }
    let running: Vec<&Claim> = claims
        .iter()
        .filter(|c| c.state == actors::objects::ClaimState::Running)
        .collect();
    writeln!(
        out,
        "{listed} snapshot(s); {} sandbox(es) recorded running: {}",
        running.len(),
        running
            .iter()
            .map(|c| format!("{} on {}", c.sandbox_id, c.node))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    Ok(out)
}

/// Delete the chunks no snapshot refers to, older than `grace`.
pub async fn gc(store: &SnapshotStore, grace: Duration) -> Result<String> {
    let stats = store.gc(grace).await.context("garbage collection")?;
    Ok(format!(
        "{} manifest(s), {} chunk(s): {} referenced, {} kept (younger than {} s), {} deleted ({})",
        stats.manifests,
        stats.chunks,
        stats.referenced,
        stats.young,
        grace.as_secs(),
        stats.deleted,
        human_bytes(stats.deleted_bytes)
    ))
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn human_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_age(Duration::from_secs(59)), "59s");
        assert_eq!(human_age(Duration::from_secs(7200)), "2h");
        assert_eq!(human_age(Duration::from_secs(3 * 86_400)), "3d");
    }
}
