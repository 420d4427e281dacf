//! envd for the guest: a statically linked (glibc `crt-static`) release build.
//!
//! Static linking keeps the binary independent of the guest's C library, so
//! the same envd runs in any root filesystem. The cache key is the source of
//! the workspace crates envd is built from, the resolved versions of its
//! dependencies (not the whole lock file: other crates' dependencies do not
//! matter) and the compiler, so a new clone with unchanged sources reuses
//! the cached binary without compiling anything.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::cache::{Cache, KeyHasher};
use crate::run;

/// Crates whose sources make up envd (envd depends on no other workspace crate).
const SOURCE_DIRS: &[&str] = &["envd", "schema"];
const TARGET: &str = "x86_64-unknown-linux-gnu";

pub struct Envd {
    pub binary: PathBuf,
    /// `sandmesh-interpreter`, the code interpreter (same package).
    pub interpreter: PathBuf,
    pub key: String,
}

pub fn build(cache: &Cache, root: &Path, force: bool) -> Result<Envd> {
    let rustc = run::output(Command::new("rustc").arg("-V"))?;
    let mut key = KeyHasher::new("envd");
    key.text("rustc", rustc.trim()).text("target", TARGET);
    key.text("dependencies", &dependency_closure(root)?);
    key.file(root, &root.join("Cargo.toml"))?;
    for dir in SOURCE_DIRS {
        key.tree(root, &root.join(dir))?;
    }
    let key = key.finish();
    let entry = cache.get_or_build("envd", &key, force, |out| {
        // Shared by every checkout (a new clone reuses the compiled
        // dependencies); cargo's own fingerprints keep it correct.
        let target_dir = cache.root().join("target-guest");
        let remap = format!("--remap-path-prefix={}=/sandmesh", root.display());
        run::cargo(
            root,
            &[
                "build",
                "--release",
                "--locked",
                "--package",
                "envd",
                "--target",
                TARGET,
            ],
            &[
                (
                    "CARGO_TARGET_DIR",
                    target_dir.to_string_lossy().into_owned(),
                ),
                (
                    "RUSTFLAGS",
                    format!("-C target-feature=+crt-static {remap}"),
                ),
                ("CARGO_PROFILE_RELEASE_STRIP", "symbols".into()),
                ("CARGO_PROFILE_RELEASE_DEBUG", "0".into()),
            ],
        )?;
        for name in ["envd", "sandmesh-interpreter"] {
            let built = target_dir.join(TARGET).join("release").join(name);
            let file = run::output(Command::new("file").arg(&built)).unwrap_or_default();
            if !file.is_empty()
                && !file.contains("statically linked")
                && !file.contains("static-pie")
            {
                anyhow::bail!("{name} is not statically linked: {file}");
            }
            std::fs::copy(&built, out.join(name))
                .with_context(|| format!("copying {}", built.display()))?;
        }
        Ok(())
    })?;
    Ok(Envd {
        binary: entry.dir.join("envd"),
        interpreter: entry.dir.join("sandmesh-interpreter"),
        key: entry.key,
    })
}

/// The resolved packages envd is built from (`cargo tree`), one per line,
/// sorted, with this checkout's path removed so every clone agrees.
fn dependency_closure(root: &Path) -> Result<String> {
    let tree = run::output(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root)
            .args([
                "tree",
                "--package",
                "envd",
                "--edges",
                "normal,build",
                "--prefix",
                "none",
            ])
            .args(["--target", TARGET]),
    )?;
    let root_text = root.display().to_string();
    let mut lines: Vec<String> = tree
        .lines()
        .map(|l| l.trim_end_matches(" (*)").replace(&root_text, ""))
        .collect();
    lines.sort();
    lines.dedup();
    Ok(lines.join("\n"))
}
