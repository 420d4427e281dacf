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
/// forwards signals to envd.
pub const ENTRYPOINT: [&str; 5] = [
    "/usr/bin/tini",
    "-s",
    "--",
    "/usr/local/bin/envd",
    "--no-vsock",
];

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

/// The OCI runtime configuration of sandbox `id`.
pub fn config(id: &SandboxId, limits: Limits) -> Value {
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
        );
        assert_eq!(c["linux"]["namespaces"][1]["path"], "/run/netns/smh-abc");
        assert_eq!(c["linux"]["cgroupsPath"], "/sandmesh/abc");
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 256 << 20);
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 300_000);
        assert_eq!(c["process"]["args"][3], "/usr/local/bin/envd");
        assert_eq!(c["root"]["path"], "rootfs");
    }
}
