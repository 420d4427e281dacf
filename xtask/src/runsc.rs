//! The runsc (gVisor) that tests and `cargo xtask up` run sandboxes with.
//!
//! Debian 12's runsc (2022-12) answers coreutils' `statx` with EINVAL, so
//! `ls` and `stat` fail on every path in every sandbox; Debian 13's
//! (2024-07) runs them. Both are one static binary without dependencies, so
//! we fetch Debian 13's package itself (pinned by SHA-256) from the Debian
//! archive, unpack `usr/bin/runsc` into the cache and point the node at it
//! with `SANDMESH_RUNSC`. Nothing is installed on the host. `SANDMESH_RUNSC`
//! set by the caller wins: that is how to try another runsc.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::cache::Cache;
use crate::run;

/// The variable the node (and the gvisor runtime's tests) read.
pub const RUNSC_ENV: &str = "SANDMESH_RUNSC";

/// Debian 13 (trixie)'s runsc package, amd64.
const DEB_URL: &str = "http://deb.debian.org/debian/pool/main/g/golang-gvisor-gvisor/runsc_0.0~20240729.0-4+b7_amd64.deb";
const DEB_SHA256: &str = "3c25a5130dfac2f71237d5baad56ac86a255de87a0400f11b36a555156dc325a";

/// Make every process xtask starts from here on (cargo test, the node, the
/// SDK suites, benchmarks) use the pinned runsc: set `SANDMESH_RUNSC` to it,
/// downloading it into the cache on first use. Kept as is where the caller
/// set `SANDMESH_RUNSC`; left unset where no pinned build exists for this
/// machine (not x86_64), so the node takes runsc from `PATH`.
pub fn provide(cache: &Cache) -> Result<()> {
    if let Some(path) = std::env::var_os(RUNSC_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{RUNSC_ENV}={} is not a file", path.display());
        }
        println!("runsc: {} (from {RUNSC_ENV})", path.display());
        return Ok(());
    }
    if std::env::consts::ARCH != "x86_64" {
        println!(
            "runsc: from PATH (no pinned build for {})",
            std::env::consts::ARCH
        );
        return Ok(());
    }
    let entry = cache.get_or_build("runsc", &DEB_SHA256[..16], false, fetch)?;
    let runsc = entry.dir.join("runsc");
    // SAFETY: xtask is single-threaded; nothing reads the environment
    // concurrently.
    unsafe { std::env::set_var(RUNSC_ENV, &runsc) };
    println!("runsc: {}", runsc.display());
    Ok(())
}

/// Download the package into `dir`, check it, keep only `runsc`.
fn fetch(dir: &Path) -> Result<()> {
    let deb = dir.join("runsc.deb");
    println!("downloading {DEB_URL}");
    run::status(
        Command::new("curl")
            .args(["--fail", "--silent", "--show-error", "--location"])
            .args(["--retry", "3", "--output"])
            .arg(&deb)
            .arg(DEB_URL),
    )
    .with_context(|| {
        format!(
            "downloading runsc from the Debian archive failed; if the package was replaced \
             there, update DEB_URL and DEB_SHA256 in xtask/src/runsc.rs, or set {RUNSC_ENV} \
             to a runsc of 2024 or later"
        )
    })?;
    let bytes = std::fs::read(&deb).with_context(|| format!("reading {}", deb.display()))?;
    let got = hex::encode(Sha256::digest(&bytes));
    if got != DEB_SHA256 {
        bail!("{DEB_URL} has SHA-256 {got}, expected {DEB_SHA256}: refusing to run it");
    }
    let unpacked = dir.join("deb");
    run::status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    std::fs::rename(unpacked.join("usr/bin/runsc"), dir.join("runsc"))
        .context("the package holds no usr/bin/runsc")?;
    std::fs::remove_dir_all(&unpacked)?;
    std::fs::remove_file(&deb)?;
    let version = run::output(Command::new(dir.join("runsc")).arg("--version"))?;
    println!("runsc: {}", version.lines().next().unwrap_or("?"));
    Ok(())
}
