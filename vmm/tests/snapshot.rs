//! Snapshots on real KVM: a CPL3 tiny guest summing 1..=N (progress in
//! registers and in memory) is snapshotted mid-computation and restored —
//! in a new process, 20 times from one file, from a diff over its base —
//! and must finish with exactly N(N+1)/2. Bad snapshots (truncated,
//! corrupted, old format, half-written) are refused with a clear error.
//!
//! The guests run at CPL3: on nested-PVM hosts (this project's machines)
//! guest kernel mode is emulated and may stop with KVM_EXIT_INTERNAL_ERROR,
//! user mode runs natively. Without /dev/kvm every test prints `SKIP`.
//!
//! Restores "in a new process" re-run this test binary on one of the
//! `helper_*` tests (which do nothing unless [`HELPER_DIR`] is set).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::x86_64::regs::EntryMode;
use vmm::builder::{Machine, MachineConfig};
use vmm::control::{ControlError, VmController};
use vmm::snapshot::{self, RestoreOptions, Restored, SnapshotError, SnapshotKind, SnapshotOptions};
use vmm::vstate::exit::ExitReason;
use vmm::vstate::vcpu::VcpuError;

/// Iterations of the summing guest: long enough (hundreds of ms) to be
/// interrupted mid-way, short enough for 20 restored copies on 2 cores.
const N: u64 = 200_000_000;
const TIMEOUT: Duration = Duration::from_secs(60);
const HELPER_DIR: &str = "SANDMESH_SNAPSHOT_HELPER_DIR";
const HELPER_I: &str = "SANDMESH_SNAPSHOT_HELPER_I";

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("smsnap-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A running VM with its controller.
struct Running {
    ctrl: Arc<VmController>,
    machine: Arc<Machine>,
}

impl Running {
    /// Let the guest run to its exit; returns why it ended.
    fn finish(&self) -> ExitReason {
        let _ = self.ctrl.resume();
        let deadline = Instant::now() + TIMEOUT;
        while self.machine.exit.pending().is_none() {
            assert!(Instant::now() < deadline, "guest did not finish");
            std::thread::sleep(Duration::from_millis(5));
        }
        self.ctrl.run_until_exit().expect("run")
    }

    fn stop(self) {
        self.ctrl.shutdown();
        let _ = self.ctrl.run_until_exit();
    }

    /// Pause and snapshot; the VM stays paused.
    fn snapshot(
        &self,
        dir: &Path,
        kind: SnapshotKind,
        options: &SnapshotOptions,
    ) -> Result<snapshot::SnapshotInfo, ControlError> {
        self.ctrl
            .snapshot(dir, kind, false, options)
            .map(|(info, paused)| {
                assert!(paused);
                info
            })
    }
}

fn start(machine: Machine, vcpus: Vec<vmm::vstate::vcpu::Vcpu>) -> Running {
    let handles = vcpus
        .into_iter()
        .map(|v| v.start().expect("start"))
        .collect();
    let machine = Arc::new(machine);
    let ctrl = Arc::new(
        VmController::new(handles, MEM >> 20, machine.exit.clone()).with_machine(machine.clone()),
    );
    Running { ctrl, machine }
}

/// Boot the summing guest (dirty logging on) and start it.
fn boot(kvm: &Kvm, n: u64) -> (Running, Sink) {
    let sink = Sink::default();
    let mut config = MachineConfig::new(1, MEM);
    config.track_dirty_pages = true;
    let mut machine = Machine::new(kvm, config, Box::new(sink.clone())).expect("machine");
    let exit = machine.exit.clone();
    machine
        .pio_bus
        .insert(Arc::new(Mutex::new(ExitPort::new(exit))), EXIT_PORT, 1)
        .expect("exit port");
    machine
        .memory
        .write_slice(&summing_guest(n), GuestAddress(CODE))
        .expect("payload");
    let vcpus = machine
        .create_vcpus(GuestAddress(CODE), EntryMode::User)
        .expect("vcpus");
    (start(machine, vcpus), sink)
}

/// Restore `dir` (in this process) with the test's exit port, not started.
fn restore(kvm: &Kvm, dir: &Path) -> Result<(Restored, Sink), SnapshotError> {
    let sink = Sink::default();
    let mut r = snapshot::restore(kvm, dir, Box::new(sink.clone()), &RestoreOptions::default())?;
    let exit = r.machine.exit.clone();
    r.machine
        .pio_bus
        .insert(Arc::new(Mutex::new(ExitPort::new(exit))), EXIT_PORT, 1)
        .expect("exit port");
    Ok((r, sink))
}

fn restore_and_start(kvm: &Kvm, dir: &Path) -> (Running, Sink) {
    let (r, sink) = restore(kvm, dir).expect("restore");
    let vcpus = r.create_vcpus().expect("vcpus");
    (start(r.machine, vcpus), sink)
}

/// Boot, run ~`after`, snapshot (full) into `dir`; returns the paused VM
/// and the guest's progress i at the snapshot.
fn snapshot_mid_run(kvm: &Kvm, n: u64, after: Duration, dir: &Path) -> (Running, u64) {
    let (vm, _) = boot(kvm, n);
    std::thread::sleep(after);
    // On a loaded machine the vCPU thread may not have run yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    while progress(&vm.machine.memory).0 == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        vm.machine.exit.pending().is_none(),
        "guest ended too early: {:?} at {:?}",
        vm.machine.exit.pending(),
        progress(&vm.machine.memory)
    );
    vm.snapshot(dir, SnapshotKind::Full, &SnapshotOptions::default())
        .expect("snapshot");
    let (i, _, _) = progress(&vm.machine.memory);
    assert!(i > 0 && i < n, "snapshot mid-computation: i = {i} of {n}");
    (vm, i)
}

fn assert_finished_correctly(vm: &Running, sink: &Sink, n: u64) {
    assert_eq!(
        vm.finish(),
        ExitReason::Device(0),
        "the guest's two sums agree"
    );
    let (i, mem_sum, reg_sum) = progress(&vm.machine.memory);
    assert_eq!((i, mem_sum, reg_sum), (n, expected_sum(n), expected_sum(n)));
    assert_eq!(sink.text(), b"=", "serial output after restore");
}

/// Run helper test `name` of this binary in a new process.
fn run_helper(name: &str, dir: &Path, i: u64) -> String {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(HELPER_DIR, dir)
        .env(HELPER_I, i.to_string())
        .output()
        .expect("spawn helper");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "helper {name} failed:\n{text}");
    assert!(
        text.contains("HELPER OK"),
        "helper {name} did not run:\n{text}"
    );
    text
}

fn helper_env() -> Option<(PathBuf, u64)> {
    let dir = std::env::var_os(HELPER_DIR)?;
    let i = std::env::var(HELPER_I).ok()?.parse().ok()?;
    Some((PathBuf::from(dir), i))
}

#[test]
fn snapshot_mid_computation_restores_in_a_new_process() {
    const TEST: &str = "snapshot_mid_computation_restores_in_a_new_process";
    let Some(kvm) = kvm_or_skip(TEST) else { return };
    let dir = temp_dir("mid");
    let t = Instant::now();
    let (vm, i) = snapshot_mid_run(&kvm, N, Duration::from_millis(30), &dir);
    eprintln!(
        "  snapshot at i = {i} of {N} ({:?} after boot)",
        t.elapsed()
    );
    // The snapshotted VM itself carries on unharmed.
    assert_eq!(vm.finish(), ExitReason::Device(0));
    assert_eq!(progress(&vm.machine.memory).1, expected_sum(N));
    let out = run_helper("helper_restore_and_run", &dir, i);
    eprint!("{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// In a new process: restore the snapshot, check the guest resumes where
/// it was, and finishes with the exact sum.
#[test]
fn helper_restore_and_run() {
    let Some((dir, i)) = helper_env() else { return };
    let kvm = Kvm::new().expect("kvm");
    let t = Instant::now();
    let (r, sink) = restore(&kvm, &dir).expect("restore");
    let restored_in = t.elapsed();
    let (at, _, _) = progress(&r.machine.memory);
    assert_eq!(at, i, "memory holds the progress at the snapshot");
    let vcpus = r.create_vcpus().expect("vcpus");
    let vm = start(r.machine, vcpus);
    assert_finished_correctly(&vm, &sink, N);
    println!("HELPER OK: restored at i = {i} in {restored_in:?}, finished with the exact sum");
}

#[test]
fn twenty_restores_share_the_snapshot_pages() {
    const TEST: &str = "twenty_restores_share_the_snapshot_pages";
    let Some(kvm) = kvm_or_skip(TEST) else { return };
    let dir = temp_dir("twenty");
    let (vm, i) = snapshot_mid_run(&kvm, N, Duration::from_millis(20), &dir);
    vm.stop();
    let out = run_helper("helper_restore_twenty", &dir, i);
    eprint!("{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One VMA of /proc/self/smaps: its path and its counters in KiB.
#[derive(Debug, Default)]
struct Vma {
    path: String,
    rss: u64,
    shared_clean: u64,
    private_clean: u64,
    private_dirty: u64,
}

fn smaps_for(path: &Path) -> Vec<Vma> {
    let text = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let want = path.display().to_string();
    let mut out = Vec::new();
    let mut cur: Option<Vma> = None;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let first = parts.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            out.extend(cur.take().filter(|v| v.path == want));
            let path = line.split_whitespace().nth(5).unwrap_or("").to_owned();
            cur = Some(Vma {
                path,
                ..Vma::default()
            });
            continue;
        }
        let Some(v) = cur.as_mut() else { continue };
        let kib: u64 = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0);
        match first {
            "Rss:" => v.rss = kib,
            "Shared_Clean:" => v.shared_clean = kib,
            "Private_Clean:" => v.private_clean = kib,
            "Private_Dirty:" => v.private_dirty = kib,
            _ => {}
        }
    }
    out.extend(cur.take().filter(|v| v.path == want));
    out
}

/// In a new process: 20 VMs restored from one snapshot at once; each must
/// finish correctly, and their memory mappings of the snapshot file must
/// share its pages (clean, mapped by many) rather than copy them.
#[test]
fn helper_restore_twenty() {
    let Some((dir, i)) = helper_env() else { return };
    let kvm = Kvm::new().expect("kvm");
    let (state, _) = snapshot::load_state(&dir).expect("state");
    let memory_file = dir.canonicalize().expect("dir").join(&state.memory.file);
    let mut times = Vec::new();
    let mut vms = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let (r, sink) = restore(&kvm, &dir).expect("restore");
        assert_eq!(progress(&r.machine.memory).0, i);
        let vcpus = r.create_vcpus().expect("vcpus");
        times.push(t.elapsed());
        vms.push((start(r.machine, vcpus), sink));
    }
    for (vm, sink) in &vms {
        assert_finished_correctly(vm, sink, N);
    }
    let vmas = smaps_for(&memory_file);
    for v in &vmas {
        println!(
            "  mapping: Rss {} KiB, Shared_Clean {} KiB, Private_Clean {} KiB, Private_Dirty {} KiB",
            v.rss, v.shared_clean, v.private_clean, v.private_dirty
        );
    }
    assert_eq!(vmas.len(), 20, "one mapping of the memory file per VM");
    for v in &vmas {
        // Written by the guest: its progress page (and at most a few more).
        assert!(v.private_dirty <= 32, "pages copied, not shared: {v:?}");
        // Read by the guest (code, page tables): shared with the others.
        assert!(v.shared_clean >= 8, "no shared page cache pages: {v:?}");
        assert_eq!(v.private_clean, 0, "a page only this VM maps: {v:?}");
    }
    times.sort();
    println!(
        "HELPER OK: 20 restores from one file finished correctly; restore median {:?}, max {:?}",
        times[10], times[19]
    );
}

#[test]
fn diff_snapshot_after_restore_holds_only_dirtied_pages() {
    const TEST: &str = "diff_snapshot_after_restore_holds_only_dirtied_pages";
    let Some(kvm) = kvm_or_skip(TEST) else { return };
    let base = temp_dir("diff-base");
    let diff = temp_dir("diff-top");
    let (vm, i_base) = snapshot_mid_run(&kvm, N, Duration::from_millis(20), &base);
    // A diff needs the VM's base to be another directory.
    let err = vm
        .snapshot(&base, SnapshotKind::Diff, &SnapshotOptions::default())
        .expect_err("diff into its base");
    assert!(
        matches!(err, ControlError::Snapshot(SnapshotError::DiffIntoBase(_))),
        "{err}"
    );
    vm.stop();

    let (vm, _) = restore_and_start(&kvm, &base);
    std::thread::sleep(Duration::from_millis(20));
    let info = vm
        .snapshot(&diff, SnapshotKind::Diff, &SnapshotOptions::default())
        .expect("diff snapshot");
    let (i_diff, _, _) = progress(&vm.machine.memory);
    assert!(i_diff > i_base && i_diff < N, "{i_base} < {i_diff} < {N}");
    vm.stop();
    let used = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).expect("memory file").blocks() * 512
    };
    let (base_state, base_digest) = snapshot::load_state(&base).expect("base state");
    let (diff_state, _) = snapshot::load_state(&diff).expect("diff state");
    let base_used = used(&base.join(&base_state.memory.file));
    let diff_used = used(&info.memory_file);
    eprintln!(
        "  diff: {} dirty pages, {} bytes on disk (base: {} bytes on disk, {} bytes of memory), written in {:?}",
        info.dirty_pages, diff_used, base_used, info.memory_bytes, info.duration
    );
    match &diff_state.memory.kind {
        schema::snapshot::MemoryKind::Diff { base: b, dirty } => {
            assert_eq!(b.state_sha256, base_digest);
            assert_eq!(b.dir_path(), base.canonicalize().expect("base"));
            let pages: u64 = dirty.iter().map(|r| r.len / 4096).sum();
            assert_eq!(pages, info.dirty_pages);
        }
        other => panic!("not a diff: {other:?}"),
    }
    // The guest wrote its progress page since the restore, and nothing
    // else (the code and page tables were only read).
    assert!(
        (1..=4).contains(&info.dirty_pages),
        "dirty pages: {}",
        info.dirty_pages
    );
    assert!(diff_used <= 64 << 10, "diff file uses {diff_used} bytes");

    // Restored over its base, the diff resumes at its own point; a diff of
    // that VM (a chain of three) too.
    let (r, _) = restore(&kvm, &diff).expect("restore diff");
    assert_eq!(progress(&r.machine.memory).0, i_diff);
    let vcpus = r.create_vcpus().expect("vcpus");
    let vm = start(r.machine, vcpus);
    let deadline = Instant::now() + TIMEOUT;
    while progress(&vm.machine.memory).0 == i_diff {
        assert!(Instant::now() < deadline, "restored diff does not run");
        std::thread::sleep(Duration::from_millis(1));
    }
    let diff2 = temp_dir("diff-top2");
    let info2 = vm
        .snapshot(&diff2, SnapshotKind::Diff, &SnapshotOptions::default())
        .expect("diff of a diff");
    let i_diff2 = progress(&vm.machine.memory).0;
    assert!(i_diff2 > i_diff && i_diff2 < N && info2.dirty_pages <= 4);
    vm.stop();
    let (r, sink) = restore(&kvm, &diff2).expect("restore a chain of three");
    assert_eq!(progress(&r.machine.memory).0, i_diff2);
    let vcpus = r.create_vcpus().expect("vcpus");
    assert_finished_correctly(&start(r.machine, vcpus), &sink, N);
    let _ = std::fs::remove_dir_all(&diff2);

    // A base that changed under its diff is refused.
    let (vm, _) = snapshot_mid_run(&kvm, N, Duration::from_millis(5), &base);
    vm.stop();
    let err = restore(&kvm, &diff).err().expect("stale base");
    assert!(matches!(err, SnapshotError::BaseChanged { .. }), "{err}");
    assert!(err.to_string().contains("digest mismatch"), "{err}");
    let _ = std::fs::remove_dir_all(&base);
    let _ = std::fs::remove_dir_all(&diff);
}

#[test]
fn a_cold_booted_vm_cannot_take_a_diff() {
    const TEST: &str = "a_cold_booted_vm_cannot_take_a_diff";
    let Some(kvm) = kvm_or_skip(TEST) else { return };
    let dir = temp_dir("nobase");
    let (vm, _) = boot(&kvm, N);
    let err = vm
        .snapshot(&dir, SnapshotKind::Diff, &SnapshotOptions::default())
        .expect_err("no base");
    assert!(
        matches!(err, ControlError::Snapshot(SnapshotError::NoBase)),
        "{err}"
    );
    vm.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("dir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

#[test]
fn bad_snapshots_are_refused_with_a_clear_error() {
    const TEST: &str = "bad_snapshots_are_refused_with_a_clear_error";
    let Some(kvm) = kvm_or_skip(TEST) else { return };
    let good = temp_dir("good");
    let (vm, _) = snapshot_mid_run(&kvm, N, Duration::from_millis(5), &good);
    vm.stop();
    let bad = temp_dir("bad");
    let state_path = bad.join(schema::snapshot::STATE_FILE);
    let original = std::fs::read(good.join(schema::snapshot::STATE_FILE)).expect("state");
    let (state, _) = snapshot::load_state(&good).expect("state");

    // (what, how the state file's directory is damaged, expected message)
    type Case<'a> = (&'a str, Box<dyn Fn(&Path) + 'a>, &'a str);
    let mut cases: Vec<Case> = vec![
        (
            "truncated state",
            Box::new(|p: &Path| {
                std::fs::write(p, &original[..original.len() / 2]).expect("write");
            }),
            "truncated",
        ),
        (
            "corrupted state",
            Box::new(|p: &Path| {
                let mut b = original.clone();
                let at = b.len() - 100;
                b[at] ^= 0x01;
                std::fs::write(p, b).expect("write");
            }),
            "corrupted",
        ),
        (
            "old format version",
            Box::new(|p: &Path| {
                let mut b = original.clone();
                b[8..12].copy_from_slice(&0u32.to_le_bytes());
                std::fs::write(p, b).expect("write");
            }),
            "format version 0 is not supported",
        ),
        (
            "foreign file",
            Box::new(|p: &Path| std::fs::write(p, b"{\"not\": \"a snapshot\"}").expect("write")),
            "not a sandmesh snapshot",
        ),
        (
            "missing state",
            Box::new(|p: &Path| std::fs::remove_file(p).expect("remove")),
            "No such file",
        ),
    ];
    let memory = state.memory.file.clone();
    cases.push((
        "truncated memory file",
        Box::new(move |p: &Path| {
            let m = p.parent().expect("dir").join(&memory);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(m)
                .expect("memory");
            f.set_len(4096).expect("truncate");
        }),
        "truncated?",
    ));
    for (what, damage, expect) in &cases {
        copy_dir(&good, &bad);
        damage(&state_path);
        let err = restore(&kvm, &bad)
            .err()
            .unwrap_or_else(|| panic!("{what} restored"));
        let msg = err.to_string();
        eprintln!("  {what}: {msg}");
        assert!(msg.contains(expect), "{what}: {msg}");
    }
    // The good one still restores and finishes.
    let (r, sink) = restore(&kvm, &good).expect("good snapshot");
    let vcpus = r.create_vcpus().expect("vcpus");
    assert_finished_correctly(&start(r.machine, vcpus), &sink, N);
    let _ = std::fs::remove_dir_all(&good);
    let _ = std::fs::remove_dir_all(&bad);
}

#[test]
fn killed_snapshot_write_leaves_the_previous_snapshot_restorable() {
    const TEST: &str = "killed_snapshot_write_leaves_the_previous_snapshot_restorable";
    let Some(kvm) = kvm_or_skip(TEST) else { return };
    let dir = temp_dir("killed");
    let (vm, i1) = snapshot_mid_run(&kvm, N, Duration::from_millis(10), &dir);
    let (before, _) = snapshot::load_state(&dir).expect("state");
    vm.ctrl.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(20));
    let hook = SnapshotOptions {
        stop_after_memory: true,
    };
    let err = vm
        .snapshot(&dir, SnapshotKind::Full, &hook)
        .expect_err("stopped");
    assert!(
        matches!(err, ControlError::Snapshot(SnapshotError::Interrupted)),
        "{err}"
    );
    let i2 = progress(&vm.machine.memory).0;
    assert!(i2 > i1);
    // The failed write took the VM's base: a diff now would miss pages.
    let err = vm
        .snapshot(
            &temp_dir("killed-diff"),
            SnapshotKind::Diff,
            &SnapshotOptions::default(),
        )
        .expect_err("no base after a failed snapshot");
    assert!(
        matches!(err, ControlError::Snapshot(SnapshotError::NoBase)),
        "{err}"
    );
    vm.stop();
    let files: Vec<String> = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    eprintln!("  after the killed write: {files:?}");
    assert_eq!(
        files.iter().filter(|f| f.starts_with("memory-")).count(),
        2,
        "the new memory file is there, unreferenced"
    );
    let (after, _) = snapshot::load_state(&dir).expect("the previous state is intact");
    assert_eq!(after, before);
    let (r, sink) = restore(&kvm, &dir).expect("previous snapshot restores");
    assert_eq!(progress(&r.machine.memory).0, i1);
    let vcpus = r.create_vcpus().expect("vcpus");
    assert_finished_correctly(&start(r.machine, vcpus), &sink, N);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(temp_dir("killed-diff"));
}

#[test]
fn virtio_devices_are_saved_and_restored_on_their_slots() {
    use vmm::devices::virtio::block::{Block, CowDisk, CowPaths};
    use vmm::devices::virtio::vsock::Vsock;
    const TEST: &str = "virtio_devices_are_saved_and_restored_on_their_slots";
    let Some(kvm) = kvm_or_skip(TEST) else { return };
    let work = temp_dir("virtio");
    let base_img = work.join("rootfs.img");
    std::fs::write(&base_img, vec![0x5au8; 1 << 20]).expect("base image");
    let paths = CowPaths::new(&base_img, work.join("overlay"));
    let mut config = MachineConfig::new(1, MEM);
    config.track_dirty_pages = true;
    let sink = Sink::default();
    let mut machine = Machine::new(&kvm, config, Box::new(sink.clone())).expect("machine");
    let disk = CowDisk::create(paths.clone()).expect("disk");
    let block = Block::new("root", Box::new(disk), false).expect("block");
    let blk_slot = machine
        .add_block_device(Arc::new(Mutex::new(block)))
        .expect("blk");
    let uds = work.join("v.sock");
    let vsock = Vsock::new(3, &uds).expect("vsock");
    let vsock_slot = machine
        .add_vsock_device(Arc::new(Mutex::new(vsock)))
        .expect("vsock");
    let exit = machine.exit.clone();
    machine
        .pio_bus
        .insert(Arc::new(Mutex::new(ExitPort::new(exit))), EXIT_PORT, 1)
        .expect("exit port");
    machine
        .memory
        .write_slice(&summing_guest(N), GuestAddress(CODE))
        .expect("payload");
    let vcpus = machine
        .create_vcpus(GuestAddress(CODE), EntryMode::User)
        .expect("vcpus");
    let vm = start(machine, vcpus);
    std::thread::sleep(Duration::from_millis(10));
    let snap = work.join("snap");
    vm.snapshot(&snap, SnapshotKind::Full, &SnapshotOptions::default())
        .expect("snapshot");
    let i = progress(&vm.machine.memory).0;
    vm.stop();
    assert!(
        paths.map.exists(),
        "the overlay map was written at the snapshot"
    );

    let (state, _) = snapshot::load_state(&snap).expect("state");
    assert_eq!(state.devices.virtio.len(), 2);
    let options = RestoreOptions {
        vsock_uds: Some(work.join("v2.sock")),
        ..RestoreOptions::default()
    };
    let sink = Sink::default();
    let mut r = snapshot::restore(&kvm, &snap, Box::new(sink.clone()), &options).expect("restore");
    let slots: Vec<(u64, u32)> = r
        .machine
        .virtio
        .iter()
        .map(|e| (e.slot.base, e.slot.irq))
        .collect();
    assert_eq!(
        slots,
        vec![
            (blk_slot.base, blk_slot.irq),
            (vsock_slot.base, vsock_slot.irq)
        ]
    );
    assert!(r.vsock.is_some() && work.join("v2.sock").exists());
    // The transports answer on the MMIO bus with their device ids.
    for (base, id) in [(blk_slot.base, 2u32), (vsock_slot.base, 19)] {
        let mut magic = [0u8; 4];
        assert!(r.machine.mmio_bus.read(base, &mut magic));
        assert_eq!(&magic, b"virt");
        let mut dev = [0u8; 4];
        assert!(r.machine.mmio_bus.read(base + 8, &mut dev));
        assert_eq!(u32::from_le_bytes(dev), id);
    }
    assert_eq!(progress(&r.machine.memory).0, i);
    let exit = r.machine.exit.clone();
    r.machine
        .pio_bus
        .insert(Arc::new(Mutex::new(ExitPort::new(exit))), EXIT_PORT, 1)
        .expect("exit port");
    let vcpus = r.create_vcpus().expect("vcpus");
    assert_finished_correctly(&start(r.machine, vcpus), &sink, N);
    let _ = std::fs::remove_dir_all(&work);
}

/// `sandmesh vmm --restore` (runner::restore) with snapshots over the
/// control socket: the restored VM takes a diff snapshot on request and
/// shuts down on request.
#[test]
fn runner_restores_and_snapshots_over_the_control_socket() {
    use schema::vmm::{Request, Response, VmState, call};
    use std::os::unix::net::UnixStream;
    const TEST: &str = "runner_restores_and_snapshots_over_the_control_socket";
    let Some(kvm) = kvm_or_skip(TEST) else { return };
    let work = temp_dir("runner");
    let base = work.join("base");
    let (vm, i) = snapshot_mid_run(&kvm, N, Duration::from_millis(10), &base);
    vm.stop();
    let cfg = vmm::runner::RestoreConfig {
        snapshot: base.clone(),
        overlay: None,
        rootfs: None,
        vsock_uds: work.join("v.sock"),
        control: work.join("control.sock"),
        console_log: work.join("console.log"),
        jail: None,
    };
    let runner_cfg = cfg.clone();
    let runner = std::thread::spawn(move || vmm::runner::restore(&runner_cfg));
    let deadline = Instant::now() + TIMEOUT;
    let mut s = loop {
        if let Ok(s) = UnixStream::connect(&cfg.control) {
            break s;
        }
        assert!(Instant::now() < deadline, "control socket never appeared");
        std::thread::sleep(Duration::from_millis(5));
    };
    // Relative directories are refused.
    let r = call(
        &mut s,
        Request::Snapshot {
            dir: "relative".into(),
            kind: SnapshotKind::Diff,
            resume: true,
        },
    )
    .expect("call");
    assert!(
        matches!(&r, Response::Error { message } if message.contains("absolute")),
        "{r:?}"
    );
    let diff = work.join("diff");
    let r = call(
        &mut s,
        Request::Snapshot {
            dir: diff.display().to_string(),
            kind: SnapshotKind::Diff,
            resume: false,
        },
    )
    .expect("call");
    let Response::Snapshot {
        dirty_pages,
        paused,
        memory_bytes,
        ..
    } = r
    else {
        panic!("{r:?}")
    };
    // Only what the guest dirtied since the restore: a handful of pages, or
    // none when the snapshot came before the restored guest's first write
    // (seen on a loaded CI host).
    assert!(
        paused && memory_bytes == MEM && dirty_pages <= 4,
        "paused {paused}, memory {memory_bytes}, dirty pages {dirty_pages}"
    );
    match call(&mut s, Request::GetState).expect("state") {
        Response::State { state, .. } => assert_eq!(state, VmState::Paused),
        other => panic!("{other:?}"),
    }
    assert_eq!(call(&mut s, Request::Resume).expect("resume"), Response::Ok);
    // The guest finishes its sum and prints "=" (then spins: no exit port).
    while std::fs::read(&cfg.console_log).unwrap_or_default() != b"=" {
        assert!(Instant::now() < deadline, "restored guest never finished");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        call(&mut s, Request::Shutdown).expect("shutdown"),
        Response::Ok
    );
    let reason = runner.join().expect("runner thread").expect("runner");
    assert_eq!(reason, ExitReason::Stopped);
    // The diff restores over the base and resumes where it was taken.
    let (r, _) = restore(&kvm, &diff).expect("restore diff");
    assert!(progress(&r.machine.memory).0 > i);
    let _ = std::fs::remove_dir_all(&work);
}

/// Snapshot a guest spinning in `mode` (`inc rcx; jmp`), restore it, and
/// check the restored vCPU starts exactly where the old one stopped and
/// keeps running.
fn spin_roundtrip(kvm: &Kvm, mode: EntryMode, dir: &Path) -> Result<(), VcpuError> {
    let mut config = MachineConfig::new(1, MEM);
    config.track_dirty_pages = true;
    let machine = Machine::new(kvm, config, Box::new(std::io::sink())).expect("machine");
    machine
        .memory
        .write_slice(&Asm::default().spin_counting().0, GuestAddress(CODE))
        .expect("payload");
    let mut vcpus = machine
        .create_vcpus(GuestAddress(CODE), mode)
        .expect("vcpus");
    let handle = vcpus.remove(0).start()?;
    std::thread::sleep(Duration::from_millis(20));
    if handle.is_finished() {
        return handle
            .wait(TIMEOUT)
            .map(|r| panic!("spin guest ended: {r:?}"));
    }
    let second = Duration::from_secs(5);
    handle.pause(second)?;
    let state = handle.save_state(machine.vm.msrs_to_save(), second)?;
    snapshot::create_snapshot(
        &machine,
        vec![state],
        dir,
        SnapshotKind::Full,
        &SnapshotOptions::default(),
    )
    .expect("snapshot");
    let (_, old) = handle.stop(second)?;
    let (regs, sregs) = (
        old.fd().get_regs().expect("regs"),
        old.fd().get_sregs().expect("sregs"),
    );
    drop(old);
    drop(machine);

    let (r, _) = restore(kvm, dir).expect("restore");
    let mut vcpus = r.create_vcpus().expect("vcpus");
    let vcpu = vcpus.remove(0);
    let (regs2, sregs2) = (
        vcpu.fd().get_regs().expect("regs"),
        vcpu.fd().get_sregs().expect("sregs"),
    );
    assert_eq!(
        (regs2.rip, regs2.rcx, regs2.rflags, regs2.rsp),
        (regs.rip, regs.rcx, regs.rflags, regs.rsp)
    );
    assert_eq!(
        (sregs2.cs.dpl, sregs2.efer, sregs2.cr3),
        (sregs.cs.dpl, sregs.efer, sregs.cr3)
    );
    let want_dpl = if matches!(mode, EntryMode::User) {
        3
    } else {
        0
    };
    assert_eq!(sregs2.cs.dpl, want_dpl);
    // Runs of 20 ms until it has counted: on a loaded host the vCPU
    // thread may not get the CPU within one.
    let (mut vcpu, deadline) = (vcpu, Instant::now() + TIMEOUT);
    let rcx = loop {
        let handle = vcpu.start()?;
        std::thread::sleep(Duration::from_millis(20));
        let (reason, stopped) = handle.stop(second)?;
        assert_eq!(reason, ExitReason::Stopped);
        let rcx = stopped.fd().get_regs().expect("regs").rcx;
        if rcx > regs.rcx || Instant::now() > deadline {
            break rcx;
        }
        vcpu = stopped;
    };
    assert!(
        rcx > regs.rcx,
        "the restored guest kept counting: {} -> {rcx}",
        regs.rcx
    );
    eprintln!(
        "  [{mode:?}] snapshot at rcx = {}, restored guest counted on to {rcx}",
        regs.rcx
    );
    Ok(())
}

#[test]
fn vcpu_state_survives_a_snapshot_at_cpl0_and_cpl3() {
    const TEST: &str = "vcpu_state_survives_a_snapshot_at_cpl0_and_cpl3";
    let Some(kvm) = kvm_or_skip(TEST) else { return };
    for mode in [EntryMode::Kernel, EntryMode::User] {
        let dir = temp_dir(&format!("spin-{mode:?}"));
        match spin_roundtrip(&kvm, mode, &dir) {
            Ok(()) => eprintln!("{TEST} [{mode:?}]: ok"),
            Err(e @ VcpuError::InternalError { .. }) if matches!(mode, EntryMode::Kernel) => {
                eprintln!("SKIP {TEST} [{mode:?}]: KVM cannot run guest kernel mode here: {e}")
            }
            Err(e) => panic!("{TEST} [{mode:?}]: {e}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
