//! `cargo xtask nested`: run a command on an L1 Linux host whose KVM runs
//! guest kernels, inside QEMU's software emulation.
//!
//! This machine's `/dev/kvm` emulates guest kernel mode (nested PVM) and
//! cannot boot Linux; QEMU's TCG with `-cpu max` gives its guest a CPU with
//! SVM and nested paging, so `kvm_amd` loads there and our VMM boots Linux
//! as an L2 guest (../shared/nested-svm.md has the measurements).
//!
//! L1 is Debian's own kernel package (downloaded with apt, never installed)
//! and a busybox initramfs with the modules L1 needs (`L1_MODULES` and what
//! they depend on). Its root filesystem is this host's, shared read-only
//! over 9p with a tmpfs overlay on top: every binary, test and artifact of
//! the checkout is there at the same path, and nothing L1 writes reaches
//! the host, except the run directory (a second, writable 9p share at the
//! same path on both sides) that carries the command, its working directory
//! and its exit status. The scripts are `xtask/nested/init` (initramfs) and
//! `xtask/nested/stage2` (PID 1 on the host's root).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cache::{Cache, KeyHasher};
use crate::deps::{self, Package, pkg};
use crate::run;

/// What building and running L1 needs.
pub const PACKAGES: &[Package] = &[
    pkg(
        "qemu-system-x86",
        "the L1 host with nested SVM (cargo xtask nested)",
    ),
    pkg("busybox-static", "the L1 host's initramfs"),
    pkg("cpio", "packing the L1 host's initramfs"),
];

/// Modules L1 loads at boot, in this order (their dependencies first,
/// from the package's own `modules.dep`), with parameters: the 9p shares,
/// the overlay root, KVM with nested SVM, and what the VMM's jail and
/// devices use.
const L1_MODULES: &[(&str, &str)] = &[
    ("virtio_pci", ""),
    ("9pnet_virtio", ""),
    ("9p", ""),
    ("overlay", ""),
    // TCG emulates SVM's virtual GIF; KVM uses it unless told not to.
    ("kvm_amd", "vgif=0"),
    ("tun", ""),
    ("veth", ""),
];

/// L1's CPU: everything TCG emulates, SVM with nested paging included.
pub const L1_CPU: &str = "max";

const INIT: &str = include_str!("../nested/init");
const STAGE2: &str = include_str!("../nested/stage2");

/// A built L1: its kernel and initramfs.
pub struct L1 {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The Debian kernel package and version L1 boots.
    pub kernel_version: String,
}

/// Debian's current kernel package (`linux-image-<abi>-amd64`) and version.
fn kernel_package() -> Result<(String, String)> {
    let deps = run::output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))
        .context("asking apt for Debian's kernel package (is this Debian or Ubuntu?)")?;
    let package = deps
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .context("apt knows no linux-image-amd64 (run apt-get update)")?;
    let show =
        run::output(Command::new("apt-cache").args(["show", "--no-all-versions", &package]))?;
    let version = show
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .with_context(|| format!("apt shows no version of {package}"))?
        .to_owned();
    Ok((package, version))
}

/// Build (or find in the cache) the L1 kernel and initramfs.
pub fn build(cache: &Cache, force: bool) -> Result<L1> {
    deps::ensure(PACKAGES)?;
    let (package, version) = kernel_package()?;
    let busybox = deps::version("busybox-static")?;
    let mut key = KeyHasher::new("l1");
    key.text("kernel", &format!("{package} {version}"))
        .text("busybox", &busybox)
        .text("modules", &modules_file())
        .text("init", INIT)
        .text("stage2", STAGE2);
    let entry = cache.get_or_build("l1", &key.finish(), force, |dir| build_into(dir, &package))?;
    Ok(L1 {
        kernel: entry.dir.join("vmlinuz"),
        initramfs: entry.dir.join("initramfs.cpio"),
        kernel_version: format!("{package} {version}"),
    })
}

/// `qemu-system-x86_64 --version`'s number.
pub fn qemu_version() -> Result<String> {
    let out = run::output(Command::new("qemu-system-x86_64").arg("--version"))?;
    out.split_whitespace()
        .nth(3)
        .map(str::to_owned)
        .context("qemu-system-x86_64 --version says no version")
}

fn build_into(dir: &Path, package: &str) -> Result<()> {
    println!("downloading {package} (the L1 kernel; nothing is installed)");
    run::output(
        Command::new("apt-get")
            .current_dir(dir)
            .args(["download", package]),
    )?;
    let deb = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let unpacked = dir.join("pkg");
    run::status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let modules_root = unpacked.join("lib/modules");
    let release = std::fs::read_dir(&modules_root)?
        .flatten()
        .next()
        .context("the kernel package holds no lib/modules/<release>")?
        .file_name()
        .to_string_lossy()
        .into_owned();
    let vmlinuz = unpacked.join(format!("boot/vmlinuz-{release}"));
    std::fs::copy(&vmlinuz, dir.join("vmlinuz"))
        .with_context(|| format!("copying {}", vmlinuz.display()))?;
    // Debian's package ships no modules.dep: make it (busybox's depmod).
    run::status(
        Command::new("busybox")
            .args(["depmod", "-b"])
            .arg(&unpacked)
            .arg(&release),
    )?;

    let ir = dir.join("initramfs");
    for d in [
        "bin", "dev", "proc", "sys", "etc", "lower", "upper", "newroot",
    ] {
        std::fs::create_dir_all(ir.join(d))?;
    }
    std::fs::copy("/bin/busybox", ir.join("bin/busybox")).context("copying /bin/busybox")?;
    write_exec(&ir.join("init"), INIT)?;
    write_exec(&ir.join("etc/l1-stage2"), STAGE2)?;
    std::fs::write(ir.join("etc/l1-modules"), modules_file())?;
    let src = modules_root.join(&release);
    let dst = ir.join("lib/modules").join(&release);
    let names: Vec<&str> = L1_MODULES.iter().map(|(m, _)| *m).collect();
    for file in module_closure(&src, &names)? {
        let to = dst.join(&file);
        std::fs::create_dir_all(to.parent().context("module path")?)?;
        std::fs::copy(src.join(&file), &to)?;
    }
    for f in [
        "modules.dep",
        "modules.alias",
        "modules.symbols",
        "modules.builtin",
    ] {
        std::fs::copy(src.join(f), dst.join(f))?;
    }
    run::status(
        Command::new("sh")
            .current_dir(&ir)
            .args(["-c", "find . | cpio -o -H newc --quiet > ../initramfs.cpio"]),
    )?;
    for d in [&ir, &unpacked] {
        std::fs::remove_dir_all(d)?;
    }
    std::fs::remove_file(&deb)?;
    Ok(())
}

/// `/etc/l1-modules`: a module and its parameters per line.
fn modules_file() -> String {
    L1_MODULES
        .iter()
        .map(|(m, p)| format!("{m} {p}\n"))
        .collect()
}

fn write_exec(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The module files (relative to `dir`) of `names` and everything they
/// depend on, from `dir/modules.dep`.
fn module_closure(dir: &Path, names: &[&str]) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(dir.join("modules.dep"))?;
    let deps: std::collections::HashMap<&str, Vec<&str>> = text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m.trim(), d.split_whitespace().collect()))
        .collect();
    let file_of = |name: &str| {
        deps.keys().copied().find(|path| {
            let stem = Path::new(path)
                .file_stem()
                .map(|s| s.to_string_lossy().replace('-', "_"));
            stem.as_deref() == Some(&name.replace('-', "_"))
        })
    };
    let mut out: Vec<String> = Vec::new();
    let mut stack: Vec<&str> = Vec::new();
    for name in names {
        stack.push(file_of(name).with_context(|| format!("the L1 kernel has no module {name}"))?);
    }
    while let Some(file) = stack.pop() {
        if out.iter().any(|f| f == file) {
            continue;
        }
        out.push(file.to_owned());
        stack.extend(deps.get(file).into_iter().flatten());
    }
    Ok(out)
}

/// How to run one command in L1.
pub struct RunSpec<'a> {
    /// A shell script (run by `/bin/sh` in L1).
    pub script: &'a str,
    pub cwd: &'a Path,
    pub timeout: Duration,
    /// Where the run directory goes (created; must be on this host's root).
    pub run_dir: &'a Path,
    /// vCPUs and MiB of memory of L1. One: with two, L1's own kernel
    /// locked up now and then (a vCPU thread and `kvm-pit` stuck on both
    /// CPUs; guests triple-faulting) — TCG's multi-threaded emulation of
    /// nested SVM is not sound with L2 memory touched from two L1 CPUs at
    /// once (the VMM's device thread beside its vCPU, or two guest vCPUs).
    /// On one, with `vgif=0` and guests that need no PIT (TSC-deadline
    /// offered), 20 boots in a row pass (ARCHITECTURE.md, "The L1 host").
    pub cpus: u32,
    pub memory_mib: u32,
}

/// How a command in L1 ended.
#[derive(Debug, Clone, Copy)]
pub struct Ran {
    /// The command's exit status.
    pub code: i32,
    /// How often L1 was found stalled (idle and silent for a window) and
    /// poked.
    pub stalls: u32,
}

/// Boot L1, run `spec.script` there, stream the console (prefixed `l1| `)
/// and return the script's exit status. QEMU is killed at the time limit.
pub fn run_in(l1: &L1, spec: &RunSpec<'_>) -> Result<Ran> {
    let run_dir = spec.run_dir;
    if run_dir.exists() {
        std::fs::remove_dir_all(run_dir)?;
    }
    std::fs::create_dir_all(run_dir)?;
    let run_dir = run_dir.canonicalize()?;
    let mut script = String::from(
        "export HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
    );
    script.push_str(spec.script);
    std::fs::write(run_dir.join("cmd.sh"), script)?;
    std::fs::write(run_dir.join("cwd"), spec.cwd.display().to_string())?;
    let console = run_dir.join("console.log");
    let run_arg = run_dir.display().to_string();
    if run_arg.contains([' ', ',', '"']) {
        bail!("the run directory {run_arg} must hold no space, comma or quote");
    }

    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", L1_CPU, "-nographic", "-no-reboot"])
        .args([
            "-smp",
            &spec.cpus.to_string(),
            "-m",
            &spec.memory_mib.to_string(),
        ])
        .arg("-kernel")
        .arg(&l1.kernel)
        .arg("-initrd")
        .arg(&l1.initramfs)
        .args([
            "-append",
            // A periodic tick (`highres=off nohz=off`: the local APIC
            // timer reloads itself) so a timer interrupt the emulation
            // loses costs one tick; with the default one-shot timer the
            // kernel waits for that interrupt for ever (see
            // `GIVE_UP_AFTER_POKES`).
            &format!("console=ttyS0 quiet panic=-1 highres=off nohz=off sandmesh.run={run_arg}"),
        ])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .args([
            "-virtfs",
            &format!("local,path={run_arg},mount_tag=out,security_model=none"),
        ])
        // QEMU's monitor, for looking into (or poking) a stuck L1.
        .args([
            "-monitor",
            &format!("unix:{run_arg}/monitor.sock,server=on,wait=off"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<()>();
    let mut log = std::fs::File::create(&console)?;
    let out = child.stdout.take().context("qemu stdout")?;
    let err = child.stderr.take().context("qemu stderr")?;
    let err_thread = std::thread::spawn(move || {
        BufReader::new(err)
            .lines()
            .map_while(|l| l.ok())
            .collect::<Vec<_>>()
    });
    let out_thread = std::thread::spawn(move || {
        for line in BufReader::new(out).split(b'\n').map_while(|l| l.ok()) {
            let text = String::from_utf8_lossy(&line);
            // The firmware's screen-clearing escapes are noise in a CI log.
            let text = text.trim_end_matches('\r');
            let _ = writeln!(log, "{text}");
            if !text.contains('\x1b') && !text.trim().is_empty() {
                println!("l1| {text}");
            }
        }
        let _ = tx.send(());
    });
    let mut stall = StallWatch::new(child.id(), &console, run_dir.join("monitor.sock"));
    let ended = loop {
        if child.try_wait()?.is_some() {
            break Ended::Exited;
        }
        if started.elapsed() > spec.timeout {
            let _ = child.kill();
            let _ = child.wait();
            break Ended::TimedOut;
        }
        stall.check();
        if stall.unanswered >= GIVE_UP_AFTER_POKES {
            let _ = child.kill();
            let _ = child.wait();
            break Ended::AsleepForGood;
        }
        let _ = rx.recv_timeout(Duration::from_millis(200));
    };
    if stall.pokes > 0 {
        println!(
            "L1 was idle and silent for {STALL_WINDOW:?} {} time(s) and woken with a key press",
            stall.pokes
        );
    }
    let _ = out_thread.join();
    let qemu_errors = err_thread.join().unwrap_or_default();
    match ended {
        Ended::Exited => {}
        // A stalled L1 is the emulator's failure, not a verdict on the
        // command: the caller may run it again on a fresh L1.
        Ended::AsleepForGood => {
            println!(
                "L1 stayed asleep through {GIVE_UP_AFTER_POKES} key presses in a row and was \
                 killed after {:.0}s; its console is {}",
                started.elapsed().as_secs_f64(),
                console.display()
            );
            return Ok(Ran {
                code: STALLED,
                stalls: stall.pokes,
            });
        }
        Ended::TimedOut if stall.pokes > 0 => {
            println!(
                "L1 ran past its limit of {:?} after stalling and was killed; its console is {}",
                spec.timeout,
                console.display()
            );
            return Ok(Ran {
                code: STALLED,
                stalls: stall.pokes,
            });
        }
        Ended::TimedOut => bail!(
            "L1 ran past its limit of {:?} and was killed; its console is {}",
            spec.timeout,
            console.display()
        ),
    }
    let status = std::fs::read_to_string(run_dir.join("status")).map_err(|_| {
        anyhow::anyhow!(
            "L1 ended without the command's exit status (it did not boot or the command \
             crashed it); console: {}; qemu: {}",
            console.display(),
            qemu_errors.join(" / ")
        )
    })?;
    let code: i32 = status
        .trim()
        .parse()
        .with_context(|| format!("reading the exit status {status:?}"))?;
    println!(
        "l1: exit status {code} after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(Ran {
        code,
        stalls: stall.pokes,
    })
}

/// How a run of L1 ended.
enum Ended {
    /// QEMU exited: L1 powered off (the command's status is in the run
    /// directory, or L1 crashed).
    Exited,
    TimedOut,
    /// Poked [`GIVE_UP_AFTER_POKES`] times in a row without a sign of life.
    AsleepForGood,
}

/// The exit status [`Ran`] reports for an L1 killed because it stalled.
pub const STALLED: i32 = -2;

/// Key presses in a row, each after a silent and idle [`STALL_WINDOW`],
/// after which L1 is given up for dead. A CI run (2026-12-07) poked an L1
/// 27 times over 20 minutes and it never woke: its local APIC timer was
/// one-shot, expired (count 0) and unmasked, so the kernel waited for a
/// timer interrupt the emulation had lost, and no other interrupt makes it
/// reprogram the timer. Waiting longer only delays the rerun.
const GIVE_UP_AFTER_POKES: u32 = 4;

/// Under this share of a CPU (in %) QEMU counts as idle. An L1 at work
/// keeps its one TCG vCPU near 100 %; an idle one costs about 12 % with
/// the periodic tick it boots with (it was under 2 % with a tickless
/// kernel, and a CI run, 2026-12-07, hung with everything in L1 blocked
/// for 10 minutes at 12 % unnoticed).
const IDLE_CPU_PERCENT: u64 = 30;

/// How long L1 may be both silent (no console output) and idle (QEMU under
/// [`IDLE_CPU_PERCENT`] of a CPU) before it is poked.
const STALL_WINDOW: Duration = Duration::from_secs(45);

/// Wakes an L1 that went to sleep for good. Under TCG, L1 (one vCPU) was
/// seen to stop with QEMU idle and its console silent — a CPU halted
/// waiting for an interrupt that never came (a wakeup lost by the
/// emulation of nested SVM; with two L1 vCPUs the same runs locked up
/// instead). Any interrupt ends such a halt, so when a window passes with
/// no console output and QEMU under [`IDLE_CPU_PERCENT`] of a CPU, a key
/// press goes to L1's keyboard through QEMU's monitor (IRQ 1; nothing
/// reads the keyboard) and the run says so at the end. An L1 that stays
/// so through [`GIVE_UP_AFTER_POKES`] presses is given up for dead.
struct StallWatch {
    qemu_pid: u32,
    console: PathBuf,
    monitor: PathBuf,
    since: Instant,
    console_len: u64,
    cpu_ticks: u64,
    pokes: u32,
    /// Pokes since L1 last printed or used the CPU.
    unanswered: u32,
}

impl StallWatch {
    fn new(qemu_pid: u32, console: &Path, monitor: PathBuf) -> Self {
        Self {
            qemu_pid,
            console: console.to_owned(),
            monitor,
            since: Instant::now(),
            console_len: 0,
            cpu_ticks: cpu_ticks(qemu_pid),
            pokes: 0,
            unanswered: 0,
        }
    }

    fn check(&mut self) {
        if self.since.elapsed() < STALL_WINDOW {
            return;
        }
        let len = std::fs::metadata(&self.console).map_or(0, |m| m.len());
        let ticks = cpu_ticks(self.qemu_pid);
        // USER_HZ is 100: IDLE_CPU_PERCENT of the window.
        let idle = ticks.saturating_sub(self.cpu_ticks) < STALL_WINDOW.as_secs() * IDLE_CPU_PERCENT;
        if len == self.console_len && idle {
            println!(
                "L1 silent and idle for {STALL_WINDOW:?}: waking it with a key press (a wakeup lost under TCG?)"
            );
            // What L1's CPU was doing, for the record: halted or not, and
            // its local APIC timer (armed? for when?).
            let state = monitor_query(&self.monitor, &["info registers", "info lapic"]);
            let record = self
                .console
                .with_file_name(format!("stall-{}.txt", self.pokes + 1));
            let _ = std::fs::write(&record, &state);
            for line in state.lines().filter(|l| {
                ["RIP=", "HLT=", "timer", "LVTT", "Timer"]
                    .iter()
                    .any(|k| l.contains(k))
            }) {
                println!("  l1 cpu: {}", line.trim());
            }
            let poke = std::os::unix::net::UnixStream::connect(&self.monitor)
                .and_then(|mut m| m.write_all(b"sendkey ret\n"));
            if let Err(e) = poke {
                println!("  (cannot reach QEMU's monitor: {e})");
            }
            self.pokes += 1;
            self.unanswered += 1;
        } else {
            self.unanswered = 0;
        }
        self.since = Instant::now();
        self.console_len = len;
        self.cpu_ticks = ticks;
    }
}

/// Ask QEMU's human monitor each of `commands`; what it answered (the
/// banner and prompts included), or why it could not be asked.
fn monitor_query(monitor: &Path, commands: &[&str]) -> String {
    use std::io::Read;
    let mut m = match std::os::unix::net::UnixStream::connect(monitor) {
        Ok(m) => m,
        Err(e) => return format!("(cannot reach QEMU's monitor: {e})"),
    };
    let _ = m.set_read_timeout(Some(Duration::from_millis(500)));
    for cmd in commands {
        let _ = m.write_all(format!("{cmd}\n").as_bytes());
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match m.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // The read timeout: the monitor has said all it will.
            Err(_) if !out.is_empty() => break,
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&out).replace('\r', "")
}

/// User plus system CPU time of `pid` in clock ticks (0 if unreadable).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ")".
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}
