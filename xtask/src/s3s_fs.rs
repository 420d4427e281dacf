//! The S3 server that the snapshot store's integration test
//! (`actors/tests/object_store_s3.rs`) runs against: s3s-fs, S3 over a
//! local directory, from crates.io.
//!
//! Why s3s-fs: it is Rust, so it installs with the cargo we already have
//! (no Python or Node in the test path), it persists to a directory, so the
//! test can kill it and restart it on the same data, and it implements what
//! object_store's S3 client uses (signed path-style requests, HEAD, GET,
//! PUT, multipart, list v2, delete). 0.14.1 is pinned: 0.17 needs a newer
//! rustc than ours. `cargo install` compiles it (about 2.5 minutes of wall
//! time on a 2-core machine, once per cache) into the cache, keyed by
//! version; its cargo target directory stays in the cache until the install
//! succeeds, so a failed one resumes. `SANDMESH_S3S_FS` set by the caller
//! wins.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cache::{Cache, KeyHasher};
use crate::run;

/// The variable the integration test reads.
pub const S3S_FS_ENV: &str = "SANDMESH_S3S_FS";

/// The pinned version (0.17 needs rustc 1.96).
const VERSION: &str = "0.14.1";

/// The s3s-fs binary: `SANDMESH_S3S_FS` if set, else the cached install,
/// built on first use.
pub fn provide(cache: &Cache) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(S3S_FS_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{S3S_FS_ENV}={} is not a file", path.display());
        }
        println!("s3s-fs: {} (from {S3S_FS_ENV})", path.display());
        return Ok(path);
    }
    let key = KeyHasher::new("s3s-fs")
        .text("version", VERSION)
        .text("features", "binary")
        .finish();
    let entry = cache.get_or_build("s3s-fs", &key, false, |dir| install(cache, &key, dir))?;
    let bin = entry.dir.join("bin/s3s-fs");
    if !bin.is_file() {
        bail!(
            "the cache entry {} has no bin/s3s-fs; remove it to reinstall",
            entry.dir.display()
        );
    }
    println!("s3s-fs: {}", bin.display());
    Ok(bin)
}

/// `cargo install s3s-fs` into `dir` (`dir/bin/s3s-fs`).
fn install(cache: &Cache, key: &str, dir: &Path) -> Result<()> {
    let logs = cache.root().join("logs");
    std::fs::create_dir_all(&logs)?;
    let log = logs.join(format!("s3s-fs-{key}.log"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["install", "s3s-fs", "--version", VERSION])
        .args(["--features", "binary", "--locked", "--root"])
        .arg(dir)
        .env("CARGO_TARGET_DIR", cache.root().join("target-s3s-fs"));
    run::with_progress(&mut cmd, "s3s-fs", &log, |line| {
        line.trim_start().starts_with("Compiling")
    })
    .context("installing s3s-fs from crates.io (set SANDMESH_S3S_FS to use another binary)")?;
    let version = run::output(Command::new(dir.join("bin/s3s-fs")).arg("--version"))?;
    println!("s3s-fs: {}", version.trim());
    // cargo's install bookkeeping is not needed to run it, and the build
    // tree (about 400 MB) only served to resume a failed install.
    for extra in [".crates.toml", ".crates2.json"] {
        let _ = std::fs::remove_file(dir.join(extra));
    }
    let _ = std::fs::remove_dir_all(cache.root().join("target-s3s-fs"));
    Ok(())
}
