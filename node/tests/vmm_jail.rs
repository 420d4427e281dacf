//! `sandmesh vmm --jail-dir`: the real binary, jailed, inspected from the
//! outside while it runs.
//!
//! The guest is a tiny ELF (`cli; hlt; jmp`) the VMM accepts as a kernel:
//! it halts its vCPU at once, so the VM sits idle (hosts where KVM cannot
//! run a Linux guest kernel — nested PVM — run it too). Needs root and
//! `/dev/kvm`; without them each test prints `SKIP <test>: <reason>` and
//! passes.

mod tiny_elf;

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tiny_elf::tiny_elf;

use schema::vmm::{Request, Response, VmState, call};

const UID: u32 = 64123;
const GID: u32 = 64124;
const VCPUS: u8 = 2;
const MEMORY_MIB: u64 = 128;
/// A descriptor the tests leave open in `sandmesh vmm` (not CLOEXEC).
const LEAKED_FD: i32 = 57;

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

/// `cli; hlt; jmp $-3`: the vCPU halts for good.
const HALT: &[u8] = &[0xfa, 0xf4, 0xeb, 0xfd];
/// Write "J\n" to COM1, then ask the i8042 for a reset.
const SERIAL_THEN_RESET: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'J', 0xee, // mov al, 'J'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
    0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt; jmp $-3
];

/// A scratch directory with a kernel and a base image.
struct Scratch(PathBuf);
impl Scratch {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("smjail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("vmlinux"), tiny_elf(HALT)).unwrap();
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

fn vmm_command(s: &Scratch, vm: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sandmesh"));
    cmd.arg("vmm")
        .args(["--vcpus", &VCPUS.to_string()])
        .args(["--memory-mib", &MEMORY_MIB.to_string()])
        .arg("--kernel")
        .arg(s.p("vmlinux"))
        .arg("--rootfs")
        .arg(s.p("rootfs.ext4"))
        .args(["--vsock-uds", "v.sock", "--control", "c.sock"])
        .arg("--console-log")
        .arg(s.p(&format!("{vm}.console")))
        .arg("--jail-dir")
        .arg(s.p(vm))
        .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .args(extra);
    cmd
}

/// A running jailed VMM: its supervisor (our child) and the VMM itself.
struct Jailed {
    supervisor: Child,
    vmm_pid: u32,
    jail: PathBuf,
}

impl Jailed {
    fn start(s: &Scratch, vm: &str, extra: &[&str]) -> Self {
        let mut cmd = vmm_command(s, vm, extra);
        // Leak a descriptor to the VMM, as a careless caller would.
        let leak = std::fs::File::open(s.p("vmlinux")).unwrap();
        let leak_fd = std::os::fd::AsRawFd::as_raw_fd(&leak);
        // SAFETY: dup2 is async-signal-safe; the child gets fd LEAKED_FD.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::dup2(leak_fd, LEAKED_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let supervisor = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run sandmesh vmm");
        let jail = s.p(vm);
        let mut j = Self {
            supervisor,
            vmm_pid: 0,
            jail,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !j.control().exists() {
            if let Some(st) = j.supervisor.try_wait().unwrap() {
                panic!("sandmesh vmm ended early: {st:?}");
            }
            assert!(Instant::now() < deadline, "no control socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        j.vmm_pid = children(j.supervisor.id())
            .into_iter()
            .next()
            .expect("the jailed VMM");
        j
    }
    fn control(&self) -> PathBuf {
        self.jail.join("root/c.sock")
    }
    fn proc(&self, f: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/{f}", self.vmm_pid))
    }
    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(self.control()).expect("control socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.supervisor.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "sandmesh vmm did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Jailed {
    fn drop(&mut self) {
        if self.vmm_pid != 0 && self.proc("").exists() {
            // SAFETY: our grandchild; it must not outlive a failed test.
            unsafe { libc::kill(self.vmm_pid as i32, libc::SIGKILL) };
        }
        let _ = self.supervisor.kill();
        let _ = self.supervisor.wait();
    }
}

/// Pids whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may contain spaces.
        let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
        if after.split_whitespace().nth(1) == Some(&pid.to_string()) {
            out.push(p);
        }
    }
    out
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in status"))
        .trim()
        .to_owned()
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The directories of the VMM's cgroup, each with the limit files to read
/// and the values they must hold.
fn cgroup_checks(pid: u32, vm: &str) -> Vec<(PathBuf, Vec<(&'static str, String)>)> {
    let limits = vmm::jail::CgroupLimits::for_vm(VCPUS, MEMORY_MIB);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mount_of = |fstype: &str, controller: Option<&str>| {
        mountinfo.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mut post = post.split(' ');
            let ok = post.next()? == fstype
                && controller
                    .is_none_or(|c| post.nth(1).is_some_and(|o| o.split(',').any(|x| x == c)));
            ok.then(|| PathBuf::from(pre.split(' ').nth(4).unwrap()))
        })
    };
    let mut out = Vec::new();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cgroups.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
        if !path.ends_with(&format!("sandmesh-{vm}")) {
            continue;
        }
        let rel = path.trim_start_matches('/');
        let ctrls: Vec<&str> = ctrls.split(',').collect();
        if ctrls == [""] {
            let dir = mount_of("cgroup2", None).unwrap().join(rel);
            out.push((
                dir,
                vec![
                    ("cpu.max", format!("{} 100000", limits.cpu_quota_us)),
                    ("memory.max", limits.memory_bytes.to_string()),
                ],
            ));
        } else if ctrls.contains(&"cpu") {
            let dir = mount_of("cgroup", Some("cpu")).unwrap().join(rel);
            out.push((
                dir,
                vec![
                    ("cpu.cfs_period_us", "100000".into()),
                    ("cpu.cfs_quota_us", limits.cpu_quota_us.to_string()),
                ],
            ));
        } else if ctrls.contains(&"memory") {
            let dir = mount_of("cgroup", Some("memory")).unwrap().join(rel);
            out.push((
                dir,
                vec![("memory.limit_in_bytes", limits.memory_bytes.to_string())],
            ));
        }
    }
    out
}

/// Is any cgroup hierarchy with cpu or memory writable here?
fn cgroups_writable() -> bool {
    [
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup",
    ]
    .iter()
    .any(|d| {
        let probe = Path::new(d).join(format!("smjail-probe-{}", std::process::id()));
        let ok = std::fs::create_dir(&probe).is_ok() && Path::new(d).join("cgroup.procs").exists();
        let _ = std::fs::remove_dir(&probe);
        ok
    })
}

#[test]
fn jailed_vmm_is_confined_controllable_and_cleaned_up() {
    const TEST: &str = "jailed_vmm_is_confined_controllable_and_cleaned_up";
    if let Some(reason) = skip_reason() {
        return eprintln!("SKIP {TEST}: {reason}");
    }
    let s = Scratch::new("confined");
    let (name_a, name_b) = (
        format!("a{}", std::process::id()),
        format!("b{}", std::process::id()),
    );
    let overlay_a = s.p("a.overlay");
    let overlay_arg = overlay_a.display().to_string();
    let mut a = Jailed::start(&s, &name_a, &["--overlay", &overlay_arg]);
    let mut b = Jailed::start(&s, &name_b, &[]);
    assert_ne!(a.vmm_pid, b.vmm_pid);

    // Credentials, capabilities, seccomp, PID 1 of its own PID namespace.
    let status = std::fs::read_to_string(a.proc("status")).unwrap();
    let ids = |key| status_field(&status, key);
    assert_eq!(ids("Uid"), format!("{UID}\t{UID}\t{UID}\t{UID}"));
    assert_eq!(ids("Gid"), format!("{GID}\t{GID}\t{GID}\t{GID}"));
    assert_eq!(ids("Groups"), "");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(ids(cap), "0000000000000000", "{cap}");
    }
    assert_eq!(ids("NoNewPrivs"), "1");
    assert_eq!(ids("Seccomp"), "2", "seccomp filter mode");
    assert!(
        ids("NSpid").ends_with("\t1"),
        "PID 1 of its namespace: {}",
        ids("NSpid")
    );

    // Every thread (vCPUs, control, vsock poller) is filtered and unprivileged.
    let tasks = names(&a.proc("task"));
    assert!(tasks.len() > usize::from(VCPUS), "main + vCPUs: {tasks:?}");
    for tid in &tasks {
        let st = std::fs::read_to_string(a.proc(&format!("task/{tid}/status"))).unwrap();
        assert_eq!(status_field(&st, "Seccomp"), "2", "thread {tid}");
        // Seccomp_filters: since Linux 5.9.
        if st.contains("Seccomp_filters:") {
            assert_eq!(status_field(&st, "Seccomp_filters"), "2", "thread {tid}");
        }
        assert_eq!(
            status_field(&st, "CapEff"),
            "0000000000000000",
            "thread {tid}"
        );
        assert!(
            status_field(&st, "Uid").starts_with(&UID.to_string()),
            "thread {tid}"
        );
    }
    // Nothing inherited reaches the jail.
    assert!(
        !a.proc(&format!("fd/{LEAKED_FD}")).exists(),
        "inherited fd in the jail"
    );
    // Its network namespace has nothing but loopback.
    let net = std::fs::read_to_string(a.proc("net/dev")).unwrap();
    let ifaces: Vec<&str> = net
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, ["lo"], "{net}");

    // Namespaces: all five differ from ours and from the other VM's.
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        let theirs = std::fs::read_link(a.proc(&format!("ns/{ns}"))).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let other = std::fs::read_link(b.proc(&format!("ns/{ns}"))).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace");
        assert_ne!(theirs, other, "{ns} namespace shared between VMs");
    }

    // Its root holds only its own files; no host path, nothing of b.
    let expected: BTreeSet<String> = ["c.sock", "v.sock", "rootfs", "overlay", "overlay.map"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(names(&a.proc("root")), expected);
    assert_eq!(names(&b.proc("root")), expected);
    for host in ["etc", "home", "proc", "tmp", "dev", "usr"] {
        assert!(!a.proc("root").join(host).exists(), "/{host} visible");
    }
    // b's jail by its host path, and a file put in b's root, are not in a.
    std::fs::write(b.jail.join("root/b-secret"), b"b").unwrap();
    let b_jail_rel = b.jail.strip_prefix("/").unwrap().to_owned();
    assert!(!a.proc("root").join(&b_jail_rel).exists());
    assert!(!names(&a.proc("root")).contains("b-secret"));
    assert!(names(&b.proc("root")).contains("b-secret"));
    // The same name in each jail is a different file.
    let ino = |j: &Jailed| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(j.proc("root/c.sock")).unwrap().ino()
    };
    assert_ne!(ino(&a), ino(&b));
    // Its mounts: the jail root, the base image read-only, the overlay.
    let mounts = std::fs::read_to_string(a.proc("mountinfo")).unwrap();
    let points: Vec<&str> = mounts.lines().filter_map(|l| l.split(' ').nth(4)).collect();
    assert_eq!(points, ["/", "/rootfs", "/overlay"], "{mounts}");
    let rootfs = mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/rootfs"))
        .expect("rootfs mount");
    assert!(
        rootfs.split(' ').nth(5).unwrap().starts_with("ro,"),
        "{rootfs}"
    );
    // And they do not show on the host.
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host_mounts.contains(&*s.0.to_string_lossy()),
        "{host_mounts}"
    );

    // Its cgroup and limits.
    let cgroups = cgroup_checks(a.vmm_pid, &name_a);
    if cgroups_writable() {
        assert!(!cgroups.is_empty(), "the VMM is in no sandmesh cgroup");
    } else {
        eprintln!("{TEST}: no writable cgroup hierarchy here: limits not checked");
    }
    for (dir, files) in &cgroups {
        for (file, want) in files {
            let got = std::fs::read_to_string(dir.join(file)).unwrap();
            assert_eq!(got.trim(), want, "{}", dir.join(file).display());
        }
    }
    eprintln!(
        "{TEST}: cgroups {:?}",
        cgroups.iter().map(|c| &c.0).collect::<Vec<_>>()
    );

    // The control socket works through its path in the jail.
    let mut c = a.connect();
    match call(&mut c, Request::GetState).unwrap() {
        Response::State {
            state,
            vcpus,
            memory_mib,
            ..
        } => assert_eq!(
            (state, vcpus, memory_mib),
            (VmState::Running, VCPUS, MEMORY_MIB)
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(call(&mut c, Request::Pause).unwrap(), Response::Ok);
    assert_eq!(call(&mut c, Request::Resume).unwrap(), Response::Ok);
    assert_eq!(call(&mut c, Request::Shutdown).unwrap(), Response::Ok);
    drop(c);
    let st = a.wait();
    assert!(st.success(), "{st:?}");
    // Everything is gone: the VMM, its jail, its cgroup; the overlay and
    // its map stay beside each other.
    assert!(!a.jail.exists(), "jail directory left");
    assert!(!a.proc("").exists(), "VMM still running");
    for (dir, _) in &cgroups {
        assert!(!dir.exists(), "cgroup {} left", dir.display());
    }
    assert!(overlay_a.is_file());
    let map = std::fs::read(s.p("a.overlay.map")).expect("overlay map copied back");
    assert_eq!(&map[..8], b"SMCOWMAP");
    // b was not disturbed.
    let mut c = b.connect();
    assert!(matches!(
        call(&mut c, Request::GetState).unwrap(),
        Response::State { .. }
    ));
    assert_eq!(call(&mut c, Request::Shutdown).unwrap(), Response::Ok);
    assert!(b.wait().success());
    assert!(!b.jail.exists());
}

#[test]
fn guest_io_and_reset_work_under_the_filter() {
    const TEST: &str = "guest_io_and_reset_work_under_the_filter";
    if let Some(reason) = skip_reason() {
        return eprintln!("SKIP {TEST}: {reason}");
    }
    // The vCPU's port-IO exits, the serial console's writes and irqfd, the
    // reset and the whole exit path, all after the filter is on.
    let s = Scratch::new("io");
    std::fs::write(s.p("vmlinux"), tiny_elf(SERIAL_THEN_RESET)).unwrap();
    let name = format!("io{}", std::process::id());
    let out = vmm_command(&s, &name, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let console = std::fs::read_to_string(s.p(&format!("{name}.console"))).unwrap();
    assert_eq!(console, "J\n");
    assert!(!s.p(&name).exists(), "jail directory left");
}

#[test]
fn sigterm_kills_the_jailed_vmm_and_cleans_up() {
    const TEST: &str = "sigterm_kills_the_jailed_vmm_and_cleans_up";
    if let Some(reason) = skip_reason() {
        return eprintln!("SKIP {TEST}: {reason}");
    }
    use std::os::unix::process::ExitStatusExt;
    let s = Scratch::new("term");
    let name = format!("t{}", std::process::id());
    let mut j = Jailed::start(&s, &name, &[]);
    let cgroups = cgroup_checks(j.vmm_pid, &name);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(j.supervisor.id() as i32, libc::SIGTERM) };
    let st = j.wait();
    assert_eq!(st.signal(), Some(libc::SIGTERM), "{st:?}");
    assert!(!j.proc("").exists(), "VMM still running");
    assert!(!j.jail.exists(), "jail directory left");
    for (dir, _) in &cgroups {
        assert!(!dir.exists(), "cgroup {} left", dir.display());
    }
}

#[test]
fn killing_the_supervisor_kills_the_jailed_vmm() {
    const TEST: &str = "killing_the_supervisor_kills_the_jailed_vmm";
    if let Some(reason) = skip_reason() {
        return eprintln!("SKIP {TEST}: {reason}");
    }
    let s = Scratch::new("pdeath");
    let mut j = Jailed::start(&s, &format!("k{}", std::process::id()), &["--no-cgroup"]);
    j.supervisor.kill().unwrap();
    let _ = j.supervisor.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while j.proc("").exists() {
        assert!(Instant::now() < deadline, "the VMM outlived its supervisor");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL leaves the jail directory (the supervisor could not clean
    // up); the next start with that name says so.
    let out = vmm_command(&s, &format!("k{}", std::process::id()), &[])
        .output()
        .unwrap();
    assert_fails(&out, "already exists");
}

/// A VMM killed outright (supervisor and all) leaves its cgroup behind;
/// the next VMM of that name takes the empty cgroup back instead of
/// refusing to start (a sandbox resumed after its VMM was killed).
#[test]
fn a_cgroup_left_by_a_killed_vmm_is_taken_back() {
    const TEST: &str = "a_cgroup_left_by_a_killed_vmm_is_taken_back";
    if let Some(reason) = skip_reason() {
        return eprintln!("SKIP {TEST}: {reason}");
    }
    if !cgroups_writable() {
        return eprintln!("SKIP {TEST}: no writable cgroup hierarchy here");
    }
    let s = Scratch::new("cgleft");
    let name = format!("cg{}", std::process::id());
    let mut j = Jailed::start(&s, &name, &[]);
    let dirs: Vec<PathBuf> = cgroup_checks(j.vmm_pid, &name)
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    assert!(!dirs.is_empty(), "the VMM is in no sandmesh cgroup");
    j.supervisor.kill().unwrap();
    let _ = j.supervisor.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while j.proc("").exists() {
        assert!(Instant::now() < deadline, "the VMM outlived its supervisor");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        dirs.iter().all(|d| d.exists()),
        "no cgroup was left: {dirs:?}"
    );
    // What the runtime's clean-up does: the sandbox directory goes.
    std::fs::remove_dir_all(s.p(&name)).unwrap();
    let mut again = Jailed::start(&s, &name, &[]);
    assert!(again.proc("").exists());
    let after: Vec<PathBuf> = cgroup_checks(again.vmm_pid, &name)
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    assert_eq!(after, dirs, "the same cgroup, taken back");
    again.supervisor.kill().unwrap();
    let _ = again.supervisor.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while again.proc("").exists() {
        assert!(Instant::now() < deadline, "the VMM outlived its supervisor");
        std::thread::sleep(Duration::from_millis(20));
    }
    for d in &dirs {
        let _ = std::fs::remove_dir(d);
    }
}

fn assert_fails(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
}

#[test]
fn bad_jail_arguments_say_what_to_do() {
    const TEST: &str = "bad_jail_arguments_say_what_to_do";
    if let Some(reason) = skip_reason() {
        return eprintln!("SKIP {TEST}: {reason}");
    }
    let s = Scratch::new("badargs");
    let before = names(&s.0);
    let run = |vm: &str, extra: &[&str]| vmm_command(&s, vm, extra).output().unwrap();
    // Root ids.
    let out = Command::new(env!("CARGO_BIN_EXE_sandmesh"))
        .args(["vmm", "--kernel"])
        .arg(s.p("vmlinux"))
        .arg("--rootfs")
        .arg(s.p("rootfs.ext4"))
        .args(["--vsock-uds", "v.sock", "--control", "c.sock"])
        .arg("--console-log")
        .arg(s.p("r.console"))
        .arg("--jail-dir")
        .arg(s.p("r"))
        .args(["--uid", "0", "--gid", "0"])
        .output()
        .unwrap();
    assert_fails(&out, "unprivileged");
    // A socket path instead of a name.
    let sock = s.p("c.sock").display().to_string();
    let mut cmd = vmm_command(&s, "p", &[]);
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let args: Vec<String> = args
        .into_iter()
        .map(|a| if a == "c.sock" { sock.clone() } else { a })
        .collect();
    cmd = Command::new(env!("CARGO_BIN_EXE_sandmesh"));
    cmd.args(&args);
    assert_fails(&cmd.output().unwrap(), "plain file name");
    // A name the jail uses itself.
    let args: Vec<String> = args
        .into_iter()
        .map(|a| if a == sock { "rootfs".into() } else { a })
        .collect();
    assert_fails(
        &Command::new(env!("CARGO_BIN_EXE_sandmesh"))
            .args(&args)
            .output()
            .unwrap(),
        "taken by the jail",
    );
    // --jail-dir without ids, and ids without --jail-dir.
    let out = Command::new(env!("CARGO_BIN_EXE_sandmesh"))
        .args(["vmm", "--kernel", "k", "--rootfs", "r", "--vsock-uds", "v"])
        .args(["--control", "c", "--console-log", "l", "--uid", "5"])
        .output()
        .unwrap();
    assert_fails(&out, "--jail-dir");
    let out = Command::new(env!("CARGO_BIN_EXE_sandmesh"))
        .args(["vmm", "--kernel", "k", "--rootfs", "r", "--vsock-uds", "v"])
        .args(["--control", "c", "--console-log", "l", "--jail-dir"])
        .arg(s.p("noids"))
        .output()
        .unwrap();
    assert_fails(&out, "--jail-dir needs --uid and --gid");
    // The jail directory's parent must exist.
    assert_fails(&run("missing/x", &[]), "parent directory does not exist");
    assert_eq!(names(&s.0), before, "nothing left behind");
    // Not root.
    use std::os::unix::process::CommandExt;
    let mut cmd = vmm_command(&s, "n", &[]);
    cmd.uid(UID).gid(GID);
    match cmd.output() {
        Ok(out) => assert_fails(
            &out,
            &format!("--jail-dir needs root (running as uid {UID})"),
        ),
        Err(e) => {
            eprintln!("{TEST}: cannot run the binary as uid {UID} ({e}): not-root case not checked")
        }
    }
    assert_eq!(names(&s.0), before, "nothing left behind");
}
