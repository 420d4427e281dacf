//! The base root filesystem: Debian bookworm (debootstrap) with envd.
//!
//! Built in two cached layers so that an envd change costs seconds, not a
//! new debootstrap:
//! - `rootfs-base`: the Debian tree from `vmm/guest/rootfs/` (package list,
//!   `setup.sh`), keyed by that recipe;
//! - `rootfs`: the base tree plus envd and the init script, kept as a
//!   directory tree (the gvisor runtime) and packed as a sparse ext4 image
//!   with `mkfs.ext4 -d` (the microvm runtime; no loop mount needed).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cache::{Cache, KeyHasher};
use crate::envd::Envd;
use crate::{deps, run};

pub const DEFAULT_IMAGE_SIZE: &str = "2G";
const SUITE: &str = "bookworm";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Packages on top of debootstrap's `minbase` (what E2B's base image users expect).
const PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "python3",
    // `python` as a command, as E2B's base image has it.
    "python-is-python3",
    // `pip install` in sandboxes and template steps (`pip_install`).
    "python3-pip",
    "ca-certificates",
    "curl",
    "git",
    "sudo",
    "procps",
    "iproute2",
    "tini",
    "less",
];
/// Bump when the steps below change in a way that changes the output.
const BASE_RECIPE_VERSION: &str = "2";
const RECIPE_VERSION: &str = "2";

pub struct Base {
    pub tree: PathBuf,
    pub key: String,
}

pub struct Rootfs {
    pub tree: PathBuf,
    pub image: PathBuf,
    pub key: String,
}

fn recipe_dir(root: &Path) -> PathBuf {
    root.join("vmm/guest/rootfs")
}

pub fn build_base(cache: &Cache, root: &Path, force: bool) -> Result<Base> {
    let setup = recipe_dir(root).join("setup.sh");
    let key = KeyHasher::new("rootfs-base")
        .text("recipe", BASE_RECIPE_VERSION)
        .text("suite", SUITE)
        .text("packages", &PACKAGES.join(","))
        .file(root, &setup)?
        .finish();
    let logs = cache.root().join("logs");
    std::fs::create_dir_all(&logs)?;
    let log = logs.join(format!("rootfs-base-{key}.log"));
    let entry = cache.get_or_build("rootfs-base", &key, force, |out| {
        if !deps::is_root() {
            bail!("debootstrap needs root (it chroots and sets file owners); run `sudo cargo xtask guest` once");
        }
        let tree = out.join("tree");
        let mirror = std::env::var("SANDMESH_DEBIAN_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.into());
        run::with_progress(
            Command::new("debootstrap")
                .args(["--variant=minbase", &format!("--include={}", PACKAGES.join(","))])
                .arg(SUITE)
                .arg(&tree)
                .arg(&mirror)
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "debootstrap",
            &log,
            |l| l.starts_with("I: Unpacking") || l.starts_with("I: Configuring") || l.starts_with("I: Retrieving"),
        )?;
        std::fs::copy(&setup, tree.join("tmp/setup.sh"))?;
        run::output(
            Command::new("chroot")
                .arg(&tree)
                .args(["/bin/sh", "/tmp/setup.sh"])
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        )
        .context("configuring the root filesystem (vmm/guest/rootfs/setup.sh)")?;
        std::fs::remove_file(tree.join("tmp/setup.sh"))?;
        Ok(())
    })?;
    Ok(Base {
        tree: entry.dir.join("tree"),
        key: entry.key,
    })
}

pub fn build(
    cache: &Cache,
    root: &Path,
    base: &Base,
    envd: &Envd,
    image_size: &str,
    force: bool,
) -> Result<Rootfs> {
    let init = recipe_dir(root).join("sandmesh-init");
    let scripts = guest_scripts(root);
    let mut hasher = KeyHasher::new("rootfs");
    hasher
        .text("recipe", RECIPE_VERSION)
        .text("base", &base.key)
        .text("envd", &envd.key)
        .text("image-size", image_size)
        .file(root, &init)?;
    for (from, _) in &scripts {
        hasher.file(root, from)?;
    }
    let key = hasher.finish();
    let entry = cache.get_or_build("rootfs", &key, force, |out| {
        let tree = out.join("tree");
        run::status(
            Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(&base.tree)
                .arg(&tree),
        )?;
        install(&envd.binary, &tree.join("usr/local/bin/envd"), 0o755)?;
        install(
            &envd.interpreter,
            &tree.join("usr/local/bin/sandmesh-interpreter"),
            0o755,
        )?;
        install(&init, &tree.join("usr/local/sbin/sandmesh-init"), 0o755)?;
        for (from, to) in &scripts {
            install(from, &tree.join(to), 0o755)?;
        }
        // Names this build (random: two builds of the same inputs are not
        // byte-identical): a node shares a template snapshot through the
        // object store only with nodes whose root has the same id.
        let mut id = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut id))
            .context("reading /dev/urandom")?;
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(tree.join("etc/sandmesh-build-id"), format!("{id}\n"))
            .context("writing etc/sandmesh-build-id")?;
        let image = out.join("rootfs.ext4");
        println!("  packing {} ext4 image", image_size);
        run::output(
            Command::new("mkfs.ext4")
                .args([
                    "-q",
                    "-F",
                    "-L",
                    "sandmesh-root",
                    "-E",
                    "root_owner=0:0",
                    "-d",
                ])
                .arg(&tree)
                .arg(&image)
                .arg(image_size)
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        )
        .context("packing the root filesystem image")?;
        Ok(())
    })?;
    Ok(Rootfs {
        tree: entry.dir.join("tree"),
        image: entry.dir.join("rootfs.ext4"),
        key: entry.key,
    })
}

/// The gvisor runtime's guest side, beside envd: its init script (what the
/// OCI bundle starts under tini), and `sudo` for a runsc that runs no
/// setuid program — the root daemon `sandmesh-sudod` and the `sudo` in
/// `/usr/local/bin` (ahead of `/usr/bin` in PATH) that asks it, falling
/// back to `/usr/bin/sudo` wherever setuid works; and `poweroff` (also as
/// `halt`, `reboot`, `shutdown`), which resets a microVM so its VMM ends
/// with status 0 (see the script). (source, path in tree)
fn guest_scripts(root: &Path) -> [(PathBuf, &'static str); 7] {
    let dir = recipe_dir(root);
    let poweroff = dir.join("sandmesh-poweroff");
    [
        (
            dir.join("sandmesh-gvisor-init"),
            "usr/local/sbin/sandmesh-gvisor-init",
        ),
        (dir.join("sandmesh-sudod"), "usr/local/sbin/sandmesh-sudod"),
        (dir.join("sandmesh-sudo"), "usr/local/bin/sudo"),
        (poweroff.clone(), "usr/local/sbin/poweroff"),
        (poweroff.clone(), "usr/local/sbin/halt"),
        (poweroff.clone(), "usr/local/sbin/reboot"),
        (poweroff, "usr/local/sbin/shutdown"),
    ]
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}
