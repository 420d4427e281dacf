//! The OCI bundle of a gvisor sandbox: `config.json` next to the `rootfs`
//! mountpoint (an overlay of the template root).
//!
//! The configuration depends only on the id (network namespace and cgroup)
//! and the limits, never on the template, so that a checkpoint taken under
//! one id restores under another with the same mounts.

use std::path::Path;

use serde_json::{Value, json};

use super::network::NETNS_DIR;
use crate::runtime::{Limits, SandboxId};

/// The sandbox's init: tini reaps orphans (`-s`: as a subreaper) and
/// forwards signals to `sandmesh-gvisor-init` (`vmm/guest/rootfs/`), which
/// starts `sandmesh-sudod` — runsc 2022-12 runs no setuid program, so
/// `sudo` asks that root daemon instead — and then becomes envd.
pub const ENTRYPOINT: [&str; 5] = ["/usr/bin/tini", "-s", "--", INIT, "--no-vsock"];

/// The guest-side init script of [`ENTRYPOINT`].
pub const INIT: &str = "/usr/local/sbin/sandmesh-gvisor-init";

/// The cgroup (v1 controllers or v2) runsc puts the sandbox in.
pub fn cgroup_path(id: &SandboxId) -> String {
    format!("/sandmesh/{id}")
}

/// Docker's default capability set: what envd needs to start processes as
/// other users, and no more. They are capabilities of the guest kernel
/// (gVisor), not of the host.
const CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Where the sandbox's `/proc/sys/kernel/random/boot_id` comes from: a
/// file of its directory ([`boot_id`]), bind-mounted read-only over the
/// path. gVisor's procfs (runsc 2022-12) has no `kernel/random` at all,
/// and tools read the file to tell a reboot from a resume (systemd's
/// `sd_id128_get_boot`, journald, test suites): it must exist, stay the
/// same across pause/resume of one sandbox and differ between sandboxes.
/// The mount is read through the gofer at every open, so a sandbox
/// restored from a template snapshot (or its own) reads its own file.
pub const BOOT_ID_FILE: &str = "boot_id";

/// The sandbox's boot id: a UUID (version 4 layout, as Linux's) derived
/// from its id, so that a resume — on this node or after a node restart
/// — keeps it without storing anything, and two sandboxes never share one.
pub fn boot_id(id: &SandboxId) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("sandmesh boot_id\0{id}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}\n",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The OCI runtime configuration of sandbox `id`, whose directory (the
/// bundle's, holding [`BOOT_ID_FILE`]) is `dir`.
pub fn config(id: &SandboxId, limits: Limits, dir: &Path) -> Value {
    let netns = Path::new(NETNS_DIR).join(format!("smh-{id}"));
    let memory = limits.memory_mib.saturating_mul(1024 * 1024);
    let period: u64 = 100_000;
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": ENTRYPOINT,
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME=/root",
            ],
            "cwd": "/",
            // Said outright (false is the OCI default): setuid binaries
            // such as `sudo` only work without it. runsc releases that
            // implement setuid honour it; runsc 2022-12 implements no
            // setuid at all and behaves as if it were always set (gVisor
            // issue 212): there `sudo` goes through sandmesh-sudod.
            "noNewPrivileges": false,
            "capabilities": {
                "bounding": CAPABILITIES,
                "effective": CAPABILITIES,
                "permitted": CAPABILITIES,
            },
        },
        "root": { "path": "rootfs", "readonly": false },
        "hostname": "sandbox",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "mode=755"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
              "options": ["nosuid", "noexec", "nodev", "mode=1777"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "nodev", "mode=1777"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] },
            { "destination": "/proc/sys/kernel/random/boot_id", "type": "bind",
              "source": dir.join(BOOT_ID_FILE),
              "options": ["rbind", "ro", "nosuid", "noexec", "nodev"] },
        ],
        "linux": {
            "namespaces": [
                { "type": "pid" },
                { "type": "network", "path": netns },
                { "type": "ipc" },
                { "type": "uts" },
                { "type": "mount" },
            ],
            "cgroupsPath": cgroup_path(id),
            "resources": {
                "memory": { "limit": memory },
                "cpu": {
                    "quota": u64::from(limits.vcpus.max(1)) * period,
                    "period": period,
                },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_the_sandbox_namespace_cgroup_and_limits() {
        let id = SandboxId::new("abc").unwrap();
        let c = config(
            &id,
            Limits {
                vcpus: 3,
                memory_mib: 256,
            },
            Path::new("/data/run/sandboxes/abc"),
        );
        assert_eq!(c["linux"]["namespaces"][1]["path"], "/run/netns/smh-abc");
        assert_eq!(c["linux"]["cgroupsPath"], "/sandmesh/abc");
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 256 << 20);
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 300_000);
        assert_eq!(c["process"]["args"][3], INIT);
        assert_eq!(c["root"]["path"], "rootfs");
        assert_eq!(c["process"]["noNewPrivileges"], false);
        let boot = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/proc/sys/kernel/random/boot_id")
            .unwrap();
        assert_eq!(boot["source"], "/data/run/sandboxes/abc/boot_id");
        assert_eq!(boot["type"], "bind");
    }

    #[test]
    fn boot_ids_are_uuids_of_their_sandbox() {
        let a = boot_id(&SandboxId::new("abc").unwrap());
        assert_eq!(a, boot_id(&SandboxId::new("abc").unwrap()));
        assert_ne!(a, boot_id(&SandboxId::new("abd").unwrap()));
        let a = a.strip_suffix('\n').unwrap();
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(a.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()));
        assert!(parts[2].starts_with('4'), "version 4: {a}");
        assert!(
            matches!(&parts[3][..1], "8" | "9" | "a" | "b"),
            "variant: {a}"
        );
    }
}
