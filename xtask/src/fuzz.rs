//! `cargo xtask fuzz`: libFuzzer targets of the parsers of untrusted bytes
//! (`envd/fuzz/`: Connect envelopes and messages, `/files` multipart;
//! `mesh/fuzz/`: mesh frames; `schema/fuzz/`: Dockerfiles of `sandmesh
//! template build`; `vmm/fuzz/`: a malicious guest's virtqueues
//! against virtio-blk).
//!
//! cargo-fuzz needs the sanitizer flags of a nightly compiler; the stable
//! toolchain accepts them with `RUSTC_BOOTSTRAP=1`, which we set for these
//! builds only. Seeds live in `<crate>/fuzz/corpus/<target>/`; runs grow a copy
//! in the cache (`target-fuzz/corpus/`) so the checkout stays clean.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::cache::Cache;
use crate::run;

/// Each target with the cargo-fuzz crate that holds it.
pub const TARGETS: &[(&str, &str)] = &[
    ("connect_envelope", "envd/fuzz"),
    ("files_multipart", "envd/fuzz"),
    ("mesh_frame", "mesh/fuzz"),
    ("dockerfile_parse", "schema/fuzz"),
    ("virtio_blk_queue", "vmm/fuzz"),
];

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
    // Outside the checkout, shared by every clone: the sanitizer build of
    // the dependencies is the slow part and rarely changes.
    let target_dir = cache.root().join("target-fuzz");
    for t in targets {
        let Some((_, dir)) = TARGETS.iter().find(|(name, _)| name == t) else {
            let names: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
            bail!("unknown fuzz target {t:?}; targets: {}", names.join(", "));
        };
        let fuzz_dir = root.join(dir);
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
                // An input that runs this long is a hang (a malicious
                // guest or peer keeping us busy): a finding, reported at
                // once rather than after libFuzzer's 20-minute default.
                .arg("-timeout=10")
                .arg("-print_funcs=0")
                .arg(format!(
                    "-artifact_prefix={}/",
                    target_dir.join("artifacts").display()
                )),
        )?;
    }
    Ok(())
}
