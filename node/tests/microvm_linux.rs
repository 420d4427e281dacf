//! Linux in our own VMM: `sandmesh vmm` (jailed) boots the built guest
//! kernel and root image to envd, runs commands through envd over vsock,
//! and ends with status 0 when the guest powers off — many times in a row,
//! none may hang. The first guest also connects out to a host socket
//! through the jail (guest-initiated vsock).
//!
//! Runs where KVM runs guest kernels natively: bare metal, clouds with
//! nested virtualisation, and the L1 host of `cargo xtask nested` (QEMU's
//! software emulation with nested SVM), where `cargo xtask test` runs it
//! with `SANDMESH_REQUIRE_NATIVE_KVM=1` so that it cannot skip. Elsewhere
//! (this project's nested-PVM machines) it prints why it skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::envd;
use schema::guest::GuestArtifacts;

/// Set where the tests must find KVM native (the nested runner does).
const REQUIRE_NATIVE_ENV: &str = "SANDMESH_REQUIRE_NATIVE_KVM";
/// Boots in a row (`SANDMESH_LINUX_BOOTS` overrides).
const BOOTS: u32 = 20;
/// vCPUs of each guest: the runtime's default (`SANDMESH_TEST_VCPUS`
/// overrides; the emulated L1 host sets 1, see ARCHITECTURE.md).
const VCPUS: u32 = 2;
/// One boot's limit to envd's health, and to the VMM's exit on power-off.
const BOOT_LIMIT: Duration = Duration::from_secs(180);
const EXIT_LIMIT: Duration = Duration::from_secs(60);

fn setup(test: &str) -> Option<GuestArtifacts> {
    let artifacts = GuestArtifacts::for_test(test)?;
    let required = std::env::var_os(REQUIRE_NATIVE_ENV).is_some();
    let probe = vmm::probe::probe_kvm();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !probe.native || !root {
        let why = if root {
            probe.reason
        } else {
            "needs root (jailed VMMs)".into()
        };
        assert!(!required, "{test}: {REQUIRE_NATIVE_ENV} is set but {why}");
        eprintln!("SKIP {test}: {why}");
        return None;
    }
    Some(artifacts)
}

/// Each thread of process `pid`: its name, scheduler state and, where
/// readable (root), its kernel stack. For a guest that stops making
/// progress this tells a halted vCPU (`kvm_vcpu_halt`/`kvm_vcpu_block`:
/// the guest waits for an interrupt) from a VMM blocked on itself
/// (`futex_wait` in the vCPU or device thread).
fn thread_report(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "(the process is gone)".into();
    };
    for task in tasks.flatten() {
        let path = task.path();
        let read = |name: &str| std::fs::read_to_string(path.join(name)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?");
        let stack = read("stack");
        let stack: Vec<&str> = stack
            .lines()
            .map(|l| l.split_whitespace().nth(1).unwrap_or(l))
            .take(8)
            .collect();
        out += &format!(
            "{} {} [{}] {}\n",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            state,
            stack.join(" < ")
        );
    }
    out
}

/// A jailed `sandmesh vmm` booting the guest, and where its files are.
struct Vm {
    child: Child,
    dir: PathBuf,
}

impl Vm {
    fn boot(artifacts: &GuestArtifacts, dir: &Path, vcpus: u32) -> Vm {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sandmesh"))
            .arg("vmm")
            .arg("--kernel")
            .arg(&artifacts.kernel)
            .arg("--rootfs")
            .arg(&artifacts.rootfs_image)
            .args(["--vsock-uds", "v.sock", "--control", "c.sock"])
            .arg("--console-log")
            .arg(dir.join("console.log"))
            .arg("--jail-dir")
            .arg(dir.join("jail"))
            .args(["--uid", "65534", "--gid", "65534", "--memory-mib", "512"])
            .arg("--vcpus")
            .arg(vcpus.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("vmm.log")).unwrap())
            .spawn()
            .expect("spawn sandmesh vmm");
        Vm {
            child,
            dir: dir.to_owned(),
        }
    }

    /// A stream to `port` in the guest, through the VMM's hybrid vsock.
    async fn connect(&self, port: u16) -> std::io::Result<tokio::net::UnixStream> {
        let mut s = tokio::net::UnixStream::connect(self.dir.join("jail/root/v.sock")).await?;
        actors::runtime::microvm::vsock_handshake(&mut s, port).await?;
        Ok(s)
    }

    /// The console's and the VMM's last lines, for failure messages.
    fn logs(&self) -> String {
        let tail = |name: &str| {
            let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        format!(
            "console:\n{}\nvmm log:\n{}\nvmm threads:\n{}",
            tail("console.log"),
            tail("vmm.log"),
            thread_report(self.child.id())
        )
    }

    /// Wait for envd's `/health` (204); how long it took from `since`.
    async fn wait_ready(&mut self, since: Instant) -> Duration {
        loop {
            if let Ok(s) = self.connect(schema::envd::ENVD_PORT).await
                && let Ok(status) =
                    tokio::time::timeout(Duration::from_secs(20), envd::health(s)).await
                && status.starts_with("HTTP/1.1 204")
            {
                return since.elapsed();
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("the VMM ended ({st}) before envd answered\n{}", self.logs());
            }
            assert!(
                since.elapsed() < BOOT_LIMIT,
                "envd did not answer within {BOOT_LIMIT:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait for the VMM to end on its own; its status.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if t0.elapsed() > EXIT_LIMIT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the VMM did not end within {EXIT_LIMIT:?} of the guest's power-off\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A guest-initiated vsock connection: the guest connects to host port
/// 5000, which the jailed VMM (running as the jail's uid, in its own root)
/// splices to the unix socket `v.sock_5000` beside its `v.sock` — a
/// socket the host creates in the jail root and lets the jail's uid
/// connect to.
async fn guest_connects_out_through_the_jail(vm: &Vm) {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    let path = vm.dir.join("jail/root/v.sock_5000");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let host = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut got = [0u8; 20];
        s.read_exact(&mut got).unwrap();
        s.write_all(b"hello from the host\n").unwrap();
        got
    });
    let s = vm.connect(schema::envd::ENVD_PORT).await.unwrap();
    let code = "import socket\n\
                s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n\
                s.connect((2, 5000))\n\
                s.sendall(b'hello from the guest')\n\
                print(s.makefile().readline(), end='')\n";
    let ran = envd::run(s, "user", "python3", &["-c", code]).await;
    assert_eq!(ran.exit_code, 0, "{}\n{}", ran.stderr, vm.logs());
    assert_eq!(ran.stdout, "hello from the host\n");
    assert_eq!(&host.join().unwrap(), b"hello from the guest");
}

#[tokio::test(flavor = "multi_thread")]
async fn linux_boots_to_envd_runs_commands_and_powers_off_many_times() {
    let test = "linux_boots_to_envd_runs_commands_and_powers_off_many_times";
    let Some(artifacts) = setup(test) else {
        return;
    };
    let boots: u32 = std::env::var("SANDMESH_LINUX_BOOTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(BOOTS);
    let vcpus: u32 = std::env::var("SANDMESH_TEST_VCPUS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(VCPUS);
    let base = std::env::temp_dir().join(format!("smh-linux-{}", std::process::id()));
    let mut ready_times = Vec::new();
    for n in 0..boots {
        let dir = base.join(format!("boot{n}"));
        let t0 = Instant::now();
        let mut vm = Vm::boot(&artifacts, &dir, vcpus);
        let ready = vm.wait_ready(t0).await;
        ready_times.push(ready);

        let s = vm.connect(schema::envd::ENVD_PORT).await.unwrap();
        let ran = envd::run(s, "user", "/bin/sh", &["-c", "id -un; cat /proc/version"]).await;
        assert_eq!(ran.exit_code, 0, "{}\n{}", ran.stderr, vm.logs());
        assert!(
            ran.stdout.starts_with("user\nLinux version"),
            "{}",
            ran.stdout
        );

        if n == 0 {
            guest_connects_out_through_the_jail(&vm).await;
        }

        // `poweroff` ends the guest, so its call never answers: send it and
        // let the stream go.
        let mut s = vm.connect(schema::envd::ENVD_PORT).await.unwrap();
        envd::send_start(&mut s, "root", "/usr/local/sbin/poweroff", &[]).await;
        let status = vm.wait_exit();
        drop(s);
        assert!(
            status.success(),
            "the VMM ended with {status} on power-off\n{}",
            vm.logs()
        );
        assert!(
            !dir.join("jail").exists(),
            "the jail directory was left behind"
        );
        eprintln!(
            "boot {n}: envd healthy after {ready:?}, powered off after {:?}",
            t0.elapsed()
        );
    }
    ready_times.sort();
    eprintln!(
        "{boots} boots: boot-to-envd median {:?}, max {:?}",
        ready_times[ready_times.len() / 2],
        ready_times[ready_times.len() - 1]
    );
    let _ = std::fs::remove_dir_all(&base);
}
