//! Benchmark: restoring a tiny guest from a snapshot, for `cargo xtask
//! bench` (JSON lines on stdout, the format `xtask/src/bench.rs` reads).
//!
//! The guest (CPL3, 128 MiB of memory, as DESIGN.md's snapshot budgets
//! assume) loops on `out 0xf5, al`. It is snapshotted once, mid-loop; each
//! sample then restores it in this process — state file read and checked,
//! memory mapped copy-on-write from the snapshot, a fresh KVM VM with its
//! irqchip, PIT and clock state, the vCPU's state — and resumes it, and
//! measures from the start of the restore to the guest's first exit (its
//! first `out` after resuming): "restore to first guest instruction".
//! The same is measured from a fresh process: this example re-executed
//! with `--child DIR`, from just before the spawn to the child's first
//! guest exit (CLOCK_MONOTONIC in both). Snapshot creation (full and diff)
//! is measured too.
//!
//! Without /dev/kvm it prints nothing on stdout and says why on stderr.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::x86_64::regs::EntryMode;
use vmm::builder::{Machine, MachineConfig};
use vmm::devices::BusDevice;
use vmm::snapshot::{self, RestoreOptions, SnapshotKind, SnapshotOptions};
use vmm::vstate::exit::{ExitReason, ExitRequest};

const SAMPLES: usize = 20;
const MEM: u64 = 128 << 20;
const CODE: u64 = 0x10_0000;
const TICK_PORT: u16 = 0xf5;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Records the first write and, if `stop`, ends the VM there.
struct Tick {
    exit: Arc<ExitRequest>,
    first: Arc<Mutex<Option<Instant>>>,
    stop: bool,
}
impl BusDevice for Tick {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, _: &[u8]) {
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert_with(Instant::now);
        if self.stop {
            self.exit.request(ExitReason::Device(0));
        }
    }
}

fn add_tick(machine: &mut Machine, stop: bool) -> Result<Arc<Mutex<Option<Instant>>>, String> {
    let first = Arc::new(Mutex::new(None));
    let tick = Tick {
        exit: machine.exit.clone(),
        first: first.clone(),
        stop,
    };
    machine
        .pio_bus
        .insert(Arc::new(Mutex::new(tick)), u64::from(TICK_PORT), 1)
        .map_err(|e| e.to_string())?;
    Ok(first)
}

fn json(name: &str, samples: &[Duration]) {
    let ns: Vec<String> = samples.iter().map(|d| d.as_nanos().to_string()).collect();
    println!(
        r#"{{"name":"{name}","runtime":"microvm","samples_ns":[{}]}}"#,
        ns.join(",")
    );
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

/// CLOCK_MONOTONIC in nanoseconds (comparable across processes).
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// `--child DIR`: restore DIR, run to the first guest exit, print when it
/// happened.
fn child(kvm: &Kvm, dir: &Path) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut r = snapshot::restore(
        kvm,
        dir,
        Box::new(std::io::sink()),
        &RestoreOptions::default(),
    )
    .map_err(|x| e(&x))?;
    let first = add_tick(&mut r.machine, true)?;
    let vcpus = r.create_vcpus().map_err(|x| e(&x))?;
    let mut handles = vcpus
        .into_iter()
        .map(|v| v.start())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|x| e(&x))?;
    handles.remove(0).wait(TIMEOUT).map_err(|x| e(&x))?;
    let at = first.lock().map_err(|x| e(&x))?.ok_or("no first exit")?;
    let ago = at.elapsed().as_nanos() as u64;
    println!("CHILD first_exit_mono_ns={}", mono_ns() - ago);
    use vm_memory::GuestMemoryBackend;
    if let Ok(host) = r.machine.memory.get_host_address(GuestAddress(0)) {
        println!("CHILD rss_overhead_kib={}", rss_overhead_kib(host as u64));
    }
    Ok(())
}

/// This process's resident memory minus the resident part of the guest
/// memory mapping that starts at `guest_start` (what the VMM costs beyond
/// the memory its guest touched), in KiB.
fn rss_overhead_kib(guest_start: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let (mut total, mut guest, mut in_guest) = (0u64, 0u64, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, _)) = first.split_once('-')
            && let Ok(lo) = u64::from_str_radix(lo, 16)
        {
            in_guest = lo == guest_start;
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            total += kib;
            if in_guest {
                guest += kib;
            }
        }
    }
    total - guest
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("bench_restore: skipped, cannot open /dev/kvm: {e}");
            return;
        }
    };
    if let [_, flag, dir] = args.as_slice()
        && flag == "--child"
    {
        if let Err(e) = child(&kvm, Path::new(dir)) {
            eprintln!("bench_restore --child: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = run(&kvm) {
        eprintln!("bench_restore: {e}");
        std::process::exit(1);
    }
}

fn run(kvm: &Kvm) -> Result<(), String> {
    let root = std::env::temp_dir().join(format!("sandmesh-bench-restore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let result = bench(kvm, &root);
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn bench(kvm: &Kvm, root: &Path) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    // The source VM: out 0xf5, al; jmp back.
    let mut config = MachineConfig::new(1, MEM);
    config.track_dirty_pages = true;
    let mut machine = Machine::new(kvm, config, Box::new(std::io::sink())).map_err(|x| e(&x))?;
    let ticked = add_tick(&mut machine, false)?;
    machine
        .memory
        .write_slice(&[0xe6, TICK_PORT as u8, 0xeb, 0xfc], GuestAddress(CODE))
        .map_err(|x| e(&x))?;
    let vcpus = machine
        .create_vcpus(GuestAddress(CODE), EntryMode::User)
        .map_err(|x| e(&x))?;
    let machine = Arc::new(machine);
    let handles = vcpus
        .into_iter()
        .map(|v| v.start())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|x| e(&x))?;
    let ctrl = vmm::control::VmController::new(handles, MEM >> 20, machine.exit.clone())
        .with_machine(machine.clone());
    let deadline = Instant::now() + TIMEOUT;
    while ticked.lock().map_err(|x| e(&x))?.is_none() {
        if Instant::now() > deadline {
            return Err("the source guest never ran".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }

    let base = root.join("base");
    let mut full = Vec::new();
    for _ in 0..SAMPLES {
        let (info, _) = ctrl
            .snapshot(&base, SnapshotKind::Full, true, &SnapshotOptions::default())
            .map_err(|x| e(&x))?;
        full.push(info.duration);
    }
    ctrl.shutdown();
    ctrl.run_until_exit().map_err(|x| e(&x))?;

    let mut restore_to_first_exit = Vec::new();
    let mut load_only = Vec::new();
    let mut diff = Vec::new();
    for i in 0..SAMPLES {
        let t0 = Instant::now();
        let mut r = snapshot::restore(
            kvm,
            &base,
            Box::new(std::io::sink()),
            &RestoreOptions::default(),
        )
        .map_err(|x| e(&x))?;
        let first = add_tick(&mut r.machine, i != 0)?;
        let vcpus = r.create_vcpus().map_err(|x| e(&x))?;
        load_only.push(t0.elapsed());
        let mut handles = vcpus
            .into_iter()
            .map(|v| v.start())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|x| e(&x))?;
        if i == 0 {
            // The first restored VM also measures a diff snapshot.
            let machine = Arc::new(r.machine);
            let ctrl = vmm::control::VmController::new(handles, MEM >> 20, machine.exit.clone())
                .with_machine(machine.clone());
            // Its first exit is the sample; the diffs come after it.
            let deadline = Instant::now() + TIMEOUT;
            while first.lock().map_err(|x| e(&x))?.is_none() {
                if Instant::now() > deadline {
                    return Err("the restored guest never ran".into());
                }
                std::thread::yield_now();
            }
            for j in 0..SAMPLES {
                let (info, _) = ctrl
                    .snapshot(
                        &root.join(format!("diff{}", j % 2)),
                        SnapshotKind::Diff,
                        true,
                        &SnapshotOptions::default(),
                    )
                    .map_err(|x| e(&x))?;
                diff.push(info.duration);
            }
            let at = first.lock().map_err(|x| e(&x))?.ok_or("no first exit")?;
            restore_to_first_exit.push(at - t0);
            ctrl.shutdown();
            ctrl.run_until_exit().map_err(|x| e(&x))?;
            continue;
        }
        let handle = handles.remove(0);
        let (reason, _) = handle.wait(TIMEOUT).map_err(|x| e(&x))?;
        if reason != ExitReason::Device(0) {
            return Err(format!("restored guest ended with {reason:?}"));
        }
        let at = first.lock().map_err(|x| e(&x))?.ok_or("no first exit")?;
        restore_to_first_exit.push(at - t0);
    }
    // Cold: a new machine from nothing to its first guest instruction.
    let mut cold = Vec::new();
    for _ in 0..SAMPLES {
        let t0 = Instant::now();
        let mut m = Machine::new(kvm, MachineConfig::new(1, MEM), Box::new(std::io::sink()))
            .map_err(|x| e(&x))?;
        let first = add_tick(&mut m, true)?;
        m.memory
            .write_slice(&[0xe6, TICK_PORT as u8, 0xeb, 0xfc], GuestAddress(CODE))
            .map_err(|x| e(&x))?;
        let mut handles = m
            .create_vcpus(GuestAddress(CODE), EntryMode::User)
            .map_err(|x| e(&x))?
            .into_iter()
            .map(|v| v.start())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|x| e(&x))?;
        handles.remove(0).wait(TIMEOUT).map_err(|x| e(&x))?;
        let at = first.lock().map_err(|x| e(&x))?.ok_or("no first exit")?;
        cold.push(at - t0);
    }
    // From a fresh process.
    let exe = std::env::current_exe().map_err(|x| e(&x))?;
    let mut spawned = Vec::new();
    let mut overhead_kib = Vec::new();
    for _ in 0..SAMPLES {
        let t0 = mono_ns();
        let out = std::process::Command::new(&exe)
            .arg("--child")
            .arg(&base)
            .output()
            .map_err(|x| e(&x))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let at: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("CHILD first_exit_mono_ns="))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                format!(
                    "child failed: {}{}",
                    text,
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        spawned.push(Duration::from_nanos(at.saturating_sub(t0)));
        if let Some(kib) = text
            .lines()
            .find_map(|l| l.strip_prefix("CHILD rss_overhead_kib="))
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            overhead_kib.push(kib);
        }
    }
    json(
        "vmm cold start: machine set-up to first guest instruction (tiny guest, 128 MiB, in process)",
        &cold,
    );
    if !overhead_kib.is_empty() {
        overhead_kib.sort();
        println!(
            r#"{{"name":"vmm process RSS minus guest-touched memory (restored tiny guest)","runtime":"microvm","value":"{:.1} MiB (median of {})"}}"#,
            overhead_kib[overhead_kib.len() / 2] as f64 / 1024.0,
            overhead_kib.len()
        );
    }
    json("vmm restore tiny guest", &restore_to_first_exit);
    json(
        "vmm restore tiny guest, fresh process spawn to first guest exit",
        &spawned,
    );
    json(
        "vmm restore tiny guest, load only (until vCPUs ready)",
        &load_only,
    );
    json("vmm snapshot create, 128 MiB tiny guest, full", &full);
    json("vmm snapshot create, 128 MiB tiny guest, diff", &diff);
    eprintln!(
        "bench_restore: restore to first guest exit median {:?} (from a process spawn {:?}); load {:?}; full snapshot {:?}; diff snapshot {:?}",
        median(&restore_to_first_exit),
        median(&spawned),
        median(&load_only),
        median(&full),
        median(&diff)
    );
    Ok(())
}
