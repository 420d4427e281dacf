//! System packages the tasks need, installed with apt when we are root.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// A Debian package and the program or file that shows it is present.
pub struct Package {
    pub name: &'static str,
    /// Why we need it, shown when it is missing.
    pub why: &'static str,
}

pub const fn pkg(name: &'static str, why: &'static str) -> Package {
    Package { name, why }
}

/// Everything `cargo xtask guest` needs to build the kernel and root filesystem.
pub const GUEST_BUILD: &[Package] = &[
    pkg("linux-source-6.1", "guest kernel source"),
    pkg("build-essential", "gcc and make for the kernel"),
    pkg("flex", "kernel build"),
    pkg("bison", "kernel build"),
    pkg("bc", "kernel build"),
    pkg("libelf-dev", "kernel build (objtool)"),
    pkg("libssl-dev", "kernel build (certificate tools)"),
    pkg("xz-utils", "unpacking the kernel source"),
    pkg("debootstrap", "the Debian root filesystem"),
    pkg(
        "e2fsprogs",
        "mkfs.ext4 -d, e2fsck and debugfs for the rootfs image",
    ),
];

/// Extra packages the test suites use.
pub const TEST: &[Package] = &[
    pkg("python3-venv", "the E2B SDK compatibility suites"),
    pkg(
        "runsc",
        "the gvisor sandbox runtime (gVisor), used where KVM cannot run a guest kernel",
    ),
    pkg(
        "curl",
        "fetching the pinned runsc (Debian 13's; see xtask/src/runsc.rs)",
    ),
    pkg(
        "iproute2",
        "network namespaces and veth pairs of gvisor sandboxes",
    ),
    pkg(
        "docker-registry",
        "the loopback registry images are pulled from (actors/tests/oci_registry.rs)",
    ),
    pkg(
        "skopeo",
        "pushing the test image to that registry (actors/tests/oci_registry.rs)",
    ),
];

/// Make sure every package is installed: install the missing ones with apt
/// when running as root, otherwise fail with the exact command to run.
pub fn ensure(packages: &[Package]) -> Result<()> {
    let missing: Vec<&Package> = packages.iter().filter(|p| !installed(p.name)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    for p in &missing {
        println!("missing package {} ({})", p.name, p.why);
    }
    let line = format!(
        "apt-get install -y --no-install-recommends {}",
        names.join(" ")
    );
    if !is_root() {
        bail!("missing system packages; install them with:\n  sudo apt-get update && sudo {line}");
    }
    println!("installing: {}", names.join(" "));
    let update = Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get update (is this a Debian/Ubuntu machine?)")?;
    if !update.success() {
        bail!("apt-get update failed; fix the package sources and retry, or run: {line}");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&names)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install")?;
    if !status.success() {
        bail!("apt-get install failed; run it by hand to see why: {line}");
    }
    let still: Vec<&str> = names.iter().copied().filter(|n| !installed(n)).collect();
    if !still.is_empty() {
        bail!(
            "apt-get reported success but these are still missing: {}",
            still.join(" ")
        );
    }
    Ok(())
}

fn installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
        .unwrap_or(false)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The installed version of a Debian package (part of cache keys).
pub fn version(name: &str) -> Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", name])
        .output()
        .with_context(|| format!("querying the version of {name}"))?;
    if !out.status.success() {
        bail!("package {name} is not installed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
