//! Snapshots and `--restore` of a jailed `sandmesh vmm`: the real binary,
//! a tiny guest, the seccomp filter on.
//!
//! The guest (a tiny ELF the VMM boots as a kernel) prints `S`, spins for
//! 2^33 TSC cycles, prints `D` and asks the i8042 for a reset. It is
//! snapshotted mid-spin by a jailed VMM (which must survive it: a call
//! the filter lacks would kill it with SIGSYS), restored by a new jailed
//! VMM — which prints only `D`, so it went on from the snapshot rather
//! than starting over — after a diff snapshot taken in that jail, and the
//! diff is restored in a third jail. Needs root and `/dev/kvm`; without
//! them the test prints `SKIP <test>: <reason>` and passes.

mod tiny_elf;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tiny_elf::tiny_elf;

use schema::vmm::{Request, Response, SnapshotKind, VmState, call};

const UID: u32 = 64133;
const GID: u32 = 64134;
/// How long the guest waits, in TSC cycles (seconds at any TSC rate of a
/// few GHz; a time rather than a count of iterations, because a guest
/// kernel runs at very different speeds on a native and a nested host).
const WAIT_TSC: u64 = 1 << 33;

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!("jailing needs root (running as uid {euid})"));
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("cannot open /dev/kvm ({e})"));
    }
    None
}

/// Print "S\n", spin until the TSC has advanced by [`WAIT_TSC`] (the
/// deadline lives in `rbx`, part of the vCPU state a snapshot saves; KVM
/// restores the guest's TSC), print "D\n", reset.
fn guest_code() -> Vec<u8> {
    let mut c = vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'S', 0xee, // mov al, 'S'; out dx, al
        0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
        0x0f, 0x31, // rdtsc
        0x48, 0xc1, 0xe2, 0x20, // shl rdx, 32
        0x48, 0x09, 0xd0, // or rax, rdx
        0x48, 0xbb, // mov rbx, imm64
    ];
    c.extend_from_slice(&WAIT_TSC.to_le_bytes());
    c.extend_from_slice(&[
        0x48, 0x01, 0xc3, // add rbx, rax
        0x0f, 0x31, // spin: rdtsc
        0x48, 0xc1, 0xe2, 0x20, // shl rdx, 32
        0x48, 0x09, 0xd0, // or rax, rdx
        0x48, 0x39, 0xd8, // cmp rax, rbx
        0x72, 0xf2, // jb spin
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'D', 0xee, // mov al, 'D'; out dx, al
        0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
        0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
        0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt; jmp $-3
    ]);
    c
}

struct Scratch(PathBuf);
impl Scratch {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("smjailsnap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("vmlinux"), tiny_elf(&guest_code())).unwrap();
        std::fs::write(
            d.join("rootfs.ext4"),
            vmm::guest_rootfs::stand_in_image(1 << 20),
        )
        .unwrap();
        Self(d)
    }
    fn p(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running jailed VMM (its supervisor is our child).
struct Jailed {
    supervisor: Child,
    jail: PathBuf,
    console: PathBuf,
}

impl Jailed {
    /// `sandmesh vmm` jailed in `<scratch>/<vm>`, with `args` (boot or
    /// restore) and the overlay `<scratch>/<vm>.overlay`.
    fn start(s: &Scratch, vm: &str, args: &[&str]) -> Self {
        let jail = s.p(vm);
        let console = s.p(&format!("{vm}.console"));
        let supervisor = Command::new(env!("CARGO_BIN_EXE_sandmesh"))
            .arg("vmm")
            .args(args)
            .arg("--overlay")
            .arg(s.p(&format!("{vm}.overlay")))
            .args(["--vsock-uds", "v.sock", "--control", "c.sock"])
            .arg("--console-log")
            .arg(&console)
            .arg("--jail-dir")
            .arg(&jail)
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .arg("--no-cgroup")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run sandmesh vmm");
        let mut j = Self {
            supervisor,
            jail,
            console,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !j.root().join("c.sock").exists() {
            if let Some(st) = j.supervisor.try_wait().unwrap() {
                panic!("sandmesh vmm ended early: {st:?}");
            }
            assert!(Instant::now() < deadline, "no control socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        j
    }
    fn root(&self) -> PathBuf {
        self.jail.join("root")
    }
    fn call(&self, req: Request) -> Response {
        let mut s = UnixStream::connect(self.root().join("c.sock")).expect("control socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        call(&mut s, req).expect("control call")
    }
    fn state(&self) -> VmState {
        match self.call(Request::GetState) {
            Response::State { state, .. } => state,
            other => panic!("{other:?}"),
        }
    }
    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
    /// Snapshot into `dir` (a path inside the jail), left paused.
    fn snapshot(&self, dir: &str, kind: SnapshotKind) -> u64 {
        match self.call(Request::Snapshot {
            dir: dir.into(),
            kind,
            resume: false,
        }) {
            Response::Snapshot {
                paused,
                dirty_pages,
                ..
            } => {
                assert!(paused);
                dirty_pages
            }
            other => panic!("snapshot into {dir}: {other:?}"),
        }
    }
    fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.supervisor.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "sandmesh vmm did not exit; console: {}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Jailed {
    fn drop(&mut self) {
        // The supervisor forwards SIGTERM, and the VMM dies with it.
        if self.supervisor.try_wait().ok().flatten().is_none() {
            // SAFETY: our child.
            unsafe { libc::kill(self.supervisor.id() as i32, libc::SIGTERM) };
            let _ = self.supervisor.wait();
        }
    }
}

/// Hard-link every file of `from` into a new `to`: a snapshot taken inside
/// a jail goes with the jail directory when the VMM ends.
fn link_out(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::hard_link(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn copy_overlay(s: &Scratch, from: &str, to: &str) {
    for ext in ["overlay", "overlay.map"] {
        let src = s.p(&format!("{from}.{ext}"));
        if src.exists() {
            std::fs::copy(&src, s.p(&format!("{to}.{ext}"))).unwrap();
        }
    }
}

fn snapshot_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn jailed_vmm_snapshots_and_restores_jailed() {
    const TEST: &str = "jailed_vmm_snapshots_and_restores_jailed";
    if let Some(reason) = skip_reason() {
        return eprintln!("SKIP {TEST}: {reason}");
    }
    let s = Scratch::new("chain");
    let pid = std::process::id();
    let (a, b, c) = (format!("a{pid}"), format!("b{pid}"), format!("c{pid}"));
    let kernel = s.p("vmlinux").display().to_string();
    let rootfs = s.p("rootfs.ext4").display().to_string();

    // 1. A jailed VMM boots the guest and takes a full snapshot into its
    //    jail mid-spin.
    let mut vm_a = Jailed::start(
        &s,
        &a,
        &[
            "--kernel",
            &kernel,
            "--rootfs",
            &rootfs,
            "--memory-mib",
            "128",
            "--vcpus",
            "1",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !vm_a.console().contains('S') {
        assert!(Instant::now() < deadline, "the guest never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    vm_a.snapshot("/snap", SnapshotKind::Full);
    let in_jail = vm_a.root().join("snap");
    let first = snapshot_files(&in_jail);
    assert!(first.iter().any(|f| f == "state"), "{first:?}");
    // A second one replaces it (the writer reads the old state back and
    // removes the old memory file).
    vm_a.snapshot("/snap", SnapshotKind::Full);
    let files = snapshot_files(&in_jail);
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files.iter().any(|f| f == "state"), "{files:?}");
    assert!(files.iter().any(|f| f.starts_with("memory-")), "{files:?}");
    assert_ne!(files, first, "a new memory file");
    // Still alive under the filter (a missing call would have been SIGSYS).
    assert_eq!(vm_a.state(), VmState::Paused);
    assert!(!vm_a.console().contains('D'), "snapshotted after the spin");
    link_out(&in_jail, &s.p("snap"));
    assert_eq!(vm_a.call(Request::Shutdown), Response::Ok);
    let st = vm_a.wait(30);
    assert!(st.success(), "{st:?}");
    assert!(!vm_a.jail.exists(), "jail removed");

    // 2. A new jailed VMM restores it, takes a diff snapshot in its jail,
    //    and runs the spin to its end.
    copy_overlay(&s, &a, &b);
    let snap = s.p("snap").display().to_string();
    let started = Instant::now();
    let mut vm_b = Jailed::start(&s, &b, &["--restore", &snap, "--rootfs", &rootfs]);
    assert_eq!(vm_b.state(), VmState::Running);
    let dirty = vm_b.snapshot("/diff", SnapshotKind::Diff);
    eprintln!("  diff snapshot of the restored jailed guest: {dirty} dirty pages");
    let in_jail = vm_b.root().join("diff");
    let files = snapshot_files(&in_jail);
    assert!(files.iter().any(|f| f == "state"), "{files:?}");
    assert_eq!(vm_b.state(), VmState::Paused);
    link_out(&in_jail, &s.p("diff"));
    assert_eq!(vm_b.call(Request::Resume), Response::Ok);
    let st = vm_b.wait(300);
    eprintln!(
        "  restored jailed guest finished its spin {:?} after the restore started",
        started.elapsed()
    );
    assert!(st.success(), "{st:?}");
    let console = vm_b.console();
    assert_eq!(
        console, "D\n",
        "the restored guest went on mid-spin (no second S)"
    );
    assert!(!vm_b.jail.exists(), "jail removed");

    // 3. The diff, whose base the jail recorded as /snapshots/<name>, is
    //    found beside it and restored in a third jail.
    copy_overlay(&s, &b, &c);
    let diff = s.p("diff").display().to_string();
    let started = Instant::now();
    let mut vm_c = Jailed::start(&s, &c, &["--restore", &diff, "--rootfs", &rootfs]);
    let st = vm_c.wait(300);
    eprintln!(
        "  the diff restored jailed finished {:?} after the restore started",
        started.elapsed()
    );
    assert!(st.success(), "{st:?}");
    assert_eq!(vm_c.console(), "D\n");
}

#[test]
fn jailed_restore_needs_an_overlay_copy() {
    const TEST: &str = "jailed_restore_needs_an_overlay_copy";
    if let Some(reason) = skip_reason() {
        return eprintln!("SKIP {TEST}: {reason}");
    }
    let s = Scratch::new("noov");
    std::fs::create_dir(s.p("snap")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sandmesh"))
        .arg("vmm")
        .arg("--restore")
        .arg(s.p("snap"))
        .args(["--vsock-uds", "v.sock", "--control", "c.sock"])
        .arg("--console-log")
        .arg(s.p("console"))
        .arg("--jail-dir")
        .arg(s.p("jail"))
        .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("needs --overlay"), "{err}");
    assert!(!s.p("jail").exists() && !s.p("console").exists());
}
