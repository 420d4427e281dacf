//! `cargo xtask fuzz`: libFuzzer targets of the parsers of untrusted bytes
//! (`envd/fuzz/`: Connect envelopes and messages, `/files` multipart).
//!
//! cargo-fuzz needs the sanitizer flags of a nightly compiler; the stable
//! toolchain accepts them with `RUSTC_BOOTSTRAP=1`, which we set for these
//! builds only. Seeds live in `envd/fuzz/corpus/<target>/`; runs grow a copy
//! in the cache (`target-fuzz/corpus/`) so the checkout stays clean.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::cache::Cache;
use crate::run;

pub const TARGETS: &[&str] = &["connect_envelope", "files_multipart"];

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        println!("installing cargo-fuzz (once)");
        run::status(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            "0.13.2",
        ]))?;
    }
    Ok(())
}

/// Run each of `targets` for `seconds`; fail on the first crash.
pub fn run(cache: &Cache, root: &Path, targets: &[String], seconds: u32) -> Result<()> {
    ensure_cargo_fuzz()?;
    let fuzz_dir = root.join("envd/fuzz");
    // Outside the checkout, shared by every clone: the sanitizer build of
    // the dependencies is the slow part and rarely changes.
    let target_dir = cache.root().join("target-fuzz");
    for t in targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("unknown fuzz target {t:?}; targets: {}", TARGETS.join(", "));
        }
        let corpus = target_dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(target_dir.join("artifacts"))?;
        for seed in std::fs::read_dir(fuzz_dir.join("corpus").join(t))? {
            let seed = seed?;
            std::fs::copy(seed.path(), corpus.join(seed.file_name()))?;
        }
        println!("fuzz {t} for {seconds}s");
        run::status(
            Command::new("cargo")
                .current_dir(&fuzz_dir)
                .env("RUSTC_BOOTSTRAP", "1")
                .env("CARGO_TARGET_DIR", &target_dir)
                .args(["fuzz", "run", "-O", t])
                .arg(&corpus)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg("-print_funcs=0")
                .arg(format!(
                    "-artifact_prefix={}/",
                    target_dir.join("artifacts").display()
                )),
        )?;
    }
    Ok(())
}
