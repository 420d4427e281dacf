//! The guest kernel: Debian's `linux-source-6.1` with our config fragment.
//!
//! `make allnoconfig`, then `vmm/guest/kernel.config` merged over it, then
//! `make olddefconfig`; the result is checked for every `# required` symbol
//! of the fragment *before* the long compile, so a fragment whose options
//! lost a dependency fails in seconds with the list of what is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cache::{Cache, KeyHasher};
use crate::{deps, run};

const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// Bump when the build steps below change in a way that changes the output.
const RECIPE_VERSION: &str = "1";

pub struct Kernel {
    pub vmlinux: PathBuf,
    pub config: PathBuf,
    pub key: String,
}

pub fn fragment_path(root: &Path) -> PathBuf {
    root.join("vmm/guest/kernel.config")
}

pub fn build(cache: &Cache, root: &Path, force: bool) -> Result<Kernel> {
    let fragment = fragment_path(root);
    let key = KeyHasher::new("kernel")
        .text("recipe", RECIPE_VERSION)
        .text("source", &deps::version(SOURCE_PACKAGE)?)
        .file(root, &fragment)?
        .finish();
    let logs = cache.root().join("logs");
    std::fs::create_dir_all(&logs)?;
    let log = logs.join(format!("kernel-{key}.log"));
    let entry = cache.get_or_build("kernel", &key, force, |out| compile(&fragment, out, &log))?;
    Ok(Kernel {
        vmlinux: entry.dir.join("vmlinux"),
        config: entry.dir.join("config"),
        key: entry.key,
    })
}

fn compile(fragment: &Path, out: &Path, log: &Path) -> Result<()> {
    let work = out.join("src");
    std::fs::create_dir_all(&work)?;
    println!("  unpacking {SOURCE_TARBALL}");
    run::status(
        Command::new("tar")
            .args(["-xJf", SOURCE_TARBALL, "--strip-components=1", "-C"])
            .arg(&work),
    )?;
    let make = |args: &[&str]| {
        let mut cmd = Command::new("make");
        cmd.current_dir(&work)
            .arg("ARCH=x86_64")
            .args(args)
            // Reproducible build metadata: the output depends on the inputs only.
            .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01")
            .env("KBUILD_BUILD_USER", "sandmesh")
            .env("KBUILD_BUILD_HOST", "sandmesh")
            .env("KBUILD_BUILD_VERSION", "1");
        cmd
    };
    run::output(&mut make(&["allnoconfig"]))?;
    run::output(
        Command::new("scripts/kconfig/merge_config.sh")
            .current_dir(&work)
            .env("ARCH", "x86_64")
            .args(["-m", ".config"])
            .arg(fragment),
    )?;
    run::output(&mut make(&["olddefconfig"]))?;
    let config_text = std::fs::read_to_string(work.join(".config"))?;
    let fragment_text = std::fs::read_to_string(fragment)?;
    let missing = vmm::guest_kernel::missing_required(&fragment_text, &config_text);
    if !missing.is_empty() {
        bail!(
            "the kernel config lost required options (a dependency is probably not enabled in {}):\n  {}",
            fragment.display(),
            missing.join("\n  ")
        );
    }

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    run::with_progress(
        &mut make(&[&format!("-j{jobs}"), "vmlinux"]),
        "kernel",
        log,
        |line| {
            let l = line.trim_start();
            l.starts_with("CC ")
                || l.starts_with("AS ")
                || l.starts_with("LD ")
                || l.starts_with("AR ")
        },
    )?;
    std::fs::rename(work.join("vmlinux"), out.join("vmlinux"))?;
    std::fs::rename(work.join(".config"), out.join("config"))?;
    std::fs::remove_dir_all(&work).context("removing the kernel build tree")?;
    Ok(())
}
