//! `sandmesh vmm` input validation: every bad invocation is one clear
//! error line, a non-zero exit, and nothing left behind. (A full boot needs
//! KVM running guest kernels natively: see `full_boot_or_skip`.)

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use schema::vmm::{Request, Response, call};

struct Dir(PathBuf);
impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("smcli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
    fn p(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A minimal x86-64 ELF executable header (enough for `check_elf`).
fn fake_elf() -> Vec<u8> {
    let mut e = vec![0u8; 64];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little-endian
    e[6] = 1;
    e[16] = 2; // ET_EXEC
    e[18] = 0x3e; // x86-64
    e[20] = 1;
    e
}

fn sandmesh(args: &[&str], dir: &Dir, overrides: &[(&str, String)]) -> Output {
    let mut base: Vec<(&str, String)> = vec![
        ("--kernel", dir.p("vmlinux").display().to_string()),
        ("--rootfs", dir.p("rootfs.ext4").display().to_string()),
        ("--vsock-uds", dir.p("v.sock").display().to_string()),
        ("--control", dir.p("c.sock").display().to_string()),
        ("--console-log", dir.p("console.log").display().to_string()),
    ];
    for (k, v) in overrides {
        if let Some(e) = base.iter_mut().find(|(bk, _)| bk == k) {
            e.1 = v.clone();
        } else {
            base.push((k, v.clone()));
        }
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandmesh"));
    cmd.arg("vmm");
    for (k, v) in &base {
        cmd.arg(k).arg(v);
    }
    cmd.args(args);
    cmd.output().expect("run sandmesh")
}

fn setup(name: &str) -> Dir {
    let d = Dir::new(name);
    std::fs::write(d.p("vmlinux"), fake_elf()).unwrap();
    std::fs::write(d.p("rootfs.ext4"), vmm::guest_rootfs::stand_in_image(4096)).unwrap();
    d
}

fn assert_fails(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
}

#[test]
fn out_of_range_vcpus_and_memory_name_the_range() {
    let d = setup("range");
    let before = d.entries();
    assert_fails(&sandmesh(&["--vcpus", "17"], &d, &[]), "1..=16");
    assert_fails(&sandmesh(&["--vcpus", "0"], &d, &[]), "1..=16");
    assert_fails(&sandmesh(&["--memory-mib", "64"], &d, &[]), "128..=32768");
    assert_fails(
        &sandmesh(&["--memory-mib", "40000"], &d, &[]),
        "128..=32768",
    );
    assert_eq!(d.entries(), before, "nothing left behind");
}

#[test]
fn missing_files_name_the_path() {
    let d = setup("missing");
    let before = d.entries();
    let nokernel = d.p("nope-vmlinux").display().to_string();
    assert_fails(
        &sandmesh(&[], &d, &[("--kernel", nokernel.clone())]),
        &nokernel,
    );
    let norootfs = d.p("nope.ext4").display().to_string();
    assert_fails(
        &sandmesh(&[], &d, &[("--rootfs", norootfs.clone())]),
        &norootfs,
    );
    // A directory is not a disk.
    let dir = d.0.display().to_string();
    assert_fails(
        &sandmesh(&[], &d, &[("--rootfs", dir)]),
        "not a regular file",
    );
    assert_eq!(d.entries(), before, "nothing left behind");
}

#[test]
fn a_root_disk_that_is_not_ours_is_refused_by_name() {
    let d = setup("foreign");
    std::fs::write(d.p("zeros.img"), vec![0u8; 1 << 16]).unwrap();
    let before = d.entries();
    assert_fails(
        &sandmesh(
            &[],
            &d,
            &[("--rootfs", d.p("zeros.img").display().to_string())],
        ),
        "not an ext4 filesystem",
    );
    // An ext4 image of someone else's (another label).
    let mut img = vmm::guest_rootfs::stand_in_image(1 << 16);
    img[1024 + 0x78..1024 + 0x78 + 16].copy_from_slice(b"cloudimg-rootfs\0");
    std::fs::write(d.p("cloud.img"), img).unwrap();
    let out = sandmesh(
        &[],
        &d,
        &[("--rootfs", d.p("cloud.img").display().to_string())],
    );
    assert_fails(&out, "\"cloudimg-rootfs\"");
    assert_fails(&out, "not a sandmesh guest image");
    assert_eq!(d.entries().len(), before.len() + 1, "nothing left behind");
}

#[test]
fn non_elf_kernel_is_refused() {
    let d = setup("notelf");
    let mut bz = vec![0u8; 4096];
    bz[..2].copy_from_slice(b"MZ");
    std::fs::write(d.p("vmlinux"), bz).unwrap();
    let before = d.entries();
    let out = sandmesh(&[], &d, &[]);
    assert_fails(&out, "vmlinux");
    assert_fails(&out, "not an ELF file");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1,
        "one error line"
    );
    assert_eq!(d.entries(), before);
}

#[test]
fn socket_path_in_use_is_refused() {
    let d = setup("inuse");
    let _l = std::os::unix::net::UnixListener::bind(d.p("v.sock")).unwrap();
    assert_fails(&sandmesh(&[], &d, &[]), "v.sock");
    // The same path for both sockets.
    let d2 = setup("inuse2");
    let same = d2.p("v.sock").display().to_string();
    assert_fails(
        &sandmesh(
            &[],
            &d2,
            &[("--control", same.clone()), ("--vsock-uds", same)],
        ),
        "v.sock",
    );
    assert_eq!(d2.entries(), ["rootfs.ext4", "vmlinux"]);
}

#[test]
fn full_boot_or_skip() {
    const TEST: &str = "full_boot_or_skip";
    let probe = vmm::probe::probe_kvm();
    eprintln!("{TEST}: {}", probe.reason);
    if !probe.native {
        return eprintln!("SKIP {TEST}: {}", probe.reason);
    }
    let Some(artifacts) = schema::guest::GuestArtifacts::for_test(TEST) else {
        return;
    };
    let d = Dir::new("boot");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandmesh"))
        .args(["vmm", "--vcpus", "2", "--memory-mib", "256"])
        .arg("--kernel")
        .arg(&artifacts.kernel)
        .arg("--rootfs")
        .arg(&artifacts.rootfs_image)
        .arg("--overlay")
        .arg(d.p("overlay"))
        .arg("--vsock-uds")
        .arg(d.p("v.sock"))
        .arg("--control")
        .arg(d.p("c.sock"))
        .arg("--console-log")
        .arg(d.p("console.log"))
        .spawn()
        .expect("run");
    // Wait for the init to start, then shut down over the control socket.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut console = String::new();
    while Instant::now() < deadline {
        console = std::fs::read_to_string(d.p("console.log")).unwrap_or_default();
        if console.contains("sandmesh-init") || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if child.try_wait().unwrap().is_none() {
        let mut s = UnixStream::connect(d.p("c.sock")).expect("control");
        match call(&mut s, Request::GetState).expect("state") {
            Response::State {
                vcpus, memory_mib, ..
            } => assert_eq!((vcpus, memory_mib), (2, 256)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            call(&mut s, Request::Shutdown).expect("shutdown"),
            Response::Ok
        );
    }
    let status = child.wait().expect("wait");
    assert!(console.contains("Linux version"), "console: {console}");
    assert!(console.contains("sandmesh-init"), "console: {console}");
    assert!(status.success(), "{status:?}");
    assert!(
        !d.p("v.sock").exists() && !d.p("c.sock").exists(),
        "sockets removed"
    );
}

#[test]
fn restore_conflicts_with_boot_flags_and_needs_a_snapshot() {
    let d = setup("restore-flags");
    let snap = d.p("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let out = sandmesh(&["--restore", &snap.display().to_string()], &d, &[]);
    assert_fails(&out, "cannot be used with");
    let out = Command::new(env!("CARGO_BIN_EXE_sandmesh"))
        .arg("vmm")
        .arg("--restore")
        .arg(&snap)
        .arg("--vsock-uds")
        .arg(d.p("v.sock"))
        .arg("--control")
        .arg(d.p("c.sock"))
        .arg("--console-log")
        .arg(d.p("console.log"))
        .output()
        .unwrap();
    assert_fails(&out, "snap/state: No such file");
    assert_eq!(
        d.entries(),
        ["rootfs.ext4", "snap", "vmlinux"],
        "nothing left behind"
    );
}

/// A tiny CPL3 guest (`inc rcx; jmp`) snapshotted with the VMM library
/// runs again under `sandmesh vmm --restore`, answers on its control
/// socket, takes a diff snapshot on request, and shuts down.
#[test]
fn restore_runs_a_snapshotted_guest() {
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};
    use vmm::arch::x86_64::regs::EntryMode;
    use vmm::builder::{Machine, MachineConfig};
    use vmm::control::VmController;
    use vmm::snapshot::{SnapshotKind, SnapshotOptions};
    const TEST: &str = "restore_runs_a_snapshotted_guest";
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(k) => k,
        Err(e) => return eprintln!("SKIP {TEST}: cannot open /dev/kvm ({e})"),
    };
    let d = Dir::new("restore");
    let snap = d.p("snap");
    {
        let machine = Machine::new(
            &kvm,
            MachineConfig::new(1, 8 << 20),
            Box::new(std::io::sink()),
        )
        .unwrap();
        machine
            .memory
            .write_slice(&[0x48, 0xff, 0xc1, 0xeb, 0xfb], GuestAddress(0x10_0000))
            .unwrap();
        let vcpus = machine
            .create_vcpus(GuestAddress(0x10_0000), EntryMode::User)
            .unwrap();
        let handles = vcpus.into_iter().map(|v| v.start().unwrap()).collect();
        let machine = Arc::new(machine);
        let ctrl = VmController::new(handles, 8, machine.exit.clone()).with_machine(machine);
        std::thread::sleep(Duration::from_millis(10));
        ctrl.snapshot(
            &snap,
            SnapshotKind::Full,
            false,
            &SnapshotOptions::default(),
        )
        .unwrap();
        ctrl.shutdown();
        ctrl.run_until_exit().unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandmesh"))
        .arg("vmm")
        .arg("--restore")
        .arg(&snap)
        .arg("--vsock-uds")
        .arg(d.p("v.sock"))
        .arg("--control")
        .arg(d.p("c.sock"))
        .arg("--console-log")
        .arg(d.p("console.log"))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        if let Ok(s) = UnixStream::connect(d.p("c.sock")) {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no control socket");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    match call(&mut s, Request::GetState).unwrap() {
        Response::State {
            state,
            vcpus,
            memory_mib,
            ..
        } => assert_eq!(
            (state, vcpus, memory_mib),
            (schema::vmm::VmState::Running, 1, 8)
        ),
        other => panic!("{other:?}"),
    }
    let diff = d.p("diff");
    match call(
        &mut s,
        Request::Snapshot {
            dir: diff.display().to_string(),
            kind: schema::vmm::SnapshotKind::Diff,
            resume: true,
        },
    )
    .unwrap()
    {
        Response::Snapshot {
            paused,
            dirty_pages,
            ..
        } => {
            assert!(!paused);
            eprintln!("  diff snapshot of the restored guest: {dirty_pages} dirty pages");
        }
        other => panic!("{other:?}"),
    }
    assert!(diff.join("state").exists());
    assert_eq!(call(&mut s, Request::Shutdown).unwrap(), Response::Ok);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!d.p("c.sock").exists(), "control socket removed at exit");
}
