//! Checks of the guest artifacts `cargo xtask guest` built: the kernel can
//! be booted by direct entry and has every required option, and the root
//! filesystem (tree and ext4 image) is a sound E2B-like base template.

use std::path::Path;
use std::process::Command;

use schema::guest::GuestArtifacts;
use vmm::guest_kernel::{REQUIRED_FRAGMENT, check_elf, embedded_config, missing_required};

fn tool(name: &str) -> Command {
    let mut cmd = Command::new(name);
    cmd.env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    cmd
}

#[test]
fn kernel_is_a_bootable_elf_with_the_required_options() {
    let Some(a) = GuestArtifacts::for_test("kernel_is_a_bootable_elf_with_the_required_options")
    else {
        return;
    };
    let image = std::fs::read(&a.kernel).unwrap();
    let elf = check_elf(&image).expect("vmlinux is a bootable x86-64 ELF");
    assert_ne!(elf.entry, 0);
    // The options are read from the image itself, not from a side file.
    let embedded = embedded_config(&image).expect("vmlinux embeds its config");
    let missing = missing_required(REQUIRED_FRAGMENT, &embedded);
    assert!(
        missing.is_empty(),
        "kernel lacks required options: {missing:#?}"
    );
    let side = std::fs::read_to_string(&a.kernel_config).unwrap();
    assert_eq!(
        side, embedded,
        "the cached config disagrees with the one inside vmlinux"
    );
}

/// `debugfs -R <request> image`: read the image without mounting it.
fn debugfs(image: &Path, request: &str) -> String {
    let out = tool("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debugfs {request}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn rootfs_image_is_clean_ext4_with_envd_python_and_user() {
    let Some(a) = GuestArtifacts::for_test("rootfs_image_is_clean_ext4_with_envd_python_and_user")
    else {
        return;
    };
    let fsck = tool("e2fsck")
        .args(["-n", "-f"])
        .arg(&a.rootfs_image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -n found problems:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    // Sparse: the image occupies far less disk than its size.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&a.rootfs_image).unwrap();
    assert!(meta.blocks() * 512 < meta.len(), "the image is not sparse");

    let envd = debugfs(&a.rootfs_image, "stat /usr/local/bin/envd");
    assert!(envd.contains("Type: regular"), "{envd}");
    assert!(
        envd.contains("Mode:  0755") || envd.contains("Mode:  00755"),
        "{envd}"
    );
    assert!(
        debugfs(&a.rootfs_image, "stat /usr/local/sbin/sandmesh-init").contains("Type: regular")
    );
    let python = debugfs(&a.rootfs_image, "stat /usr/bin/python3");
    assert!(
        python.contains("Type: symlink") || python.contains("Type: regular"),
        "{python}"
    );
    let passwd = debugfs(&a.rootfs_image, "cat /etc/passwd");
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("user:x:1000:1000:") && l.ends_with(":/home/user:/bin/bash")),
        "no user `user` (1000, /home/user, bash) in /etc/passwd:\n{passwd}"
    );
    let home = debugfs(&a.rootfs_image, "stat /home/user");
    assert!(
        home.contains("User:  1000") && home.contains("Group:  1000"),
        "{home}"
    );
    let sudoers = debugfs(&a.rootfs_image, "cat /etc/sudoers.d/user");
    assert_eq!(sudoers.trim(), "user ALL=(ALL:ALL) NOPASSWD: ALL");
}

#[test]
fn rootfs_tree_matches_the_image_contract() {
    let Some(a) = GuestArtifacts::for_test("rootfs_tree_matches_the_image_contract") else {
        return;
    };
    let t = &a.rootfs_dir;
    for path in [
        "usr/local/bin/envd",
        "usr/local/sbin/sandmesh-init",
        "usr/bin/tini",
        "usr/bin/sudo",
    ] {
        assert!(
            t.join(path).is_file(),
            "{path} missing from the rootfs tree"
        );
    }
    // python3 runs from the tree (same architecture as the host).
    let out = Command::new("chroot")
        .arg(t)
        .args(["/usr/bin/python3", "-c", "import ssl, json; print('ok')"])
        .output();
    match out {
        Ok(out) if out.status.success() => {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok")
        }
        Ok(out) => panic!(
            "python3 in the rootfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("cannot run chroot: {e}"),
    }
}
