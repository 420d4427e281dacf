//! Snapshots of a microVM: create (full or diff) and restore.
//!
//! A snapshot is a directory (see `schema::snapshot` for the state file):
//!
//! - `memory-<id>`: guest memory, the regions back to back. A **full**
//!   snapshot writes every non-zero page (the file is sparse). A **diff**
//!   snapshot writes only the pages dirtied since the VM's base snapshot
//!   (the one it was restored from or last snapshotted to) — KVM's dirty
//!   log for guest writes (`KVM_MEM_LOG_DIRTY_PAGES`), the memory bitmap
//!   for the VMM's own writes — at their offsets in a sparse file of the
//!   full size; the state names its base by directory and state digest.
//! - `state`: the header + rkyv state, written **last**.
//!
//! Crash safety: every file is written under a temporary name, fsynced,
//! and renamed into place, and the directory fsynced; the memory file has
//! a name unique to the snapshot, so a new snapshot never touches the
//! memory file the current `state` refers to. A writer killed at any point
//! leaves either the previous snapshot (old `state`, old memory file) or
//! the new one — never a `state` that refers to a half-written file. The
//! previous memory file is removed only after the new `state` is in place.
//!
//! Restore maps the memory file `MAP_PRIVATE` ([`MemoryBacking::PrivateFile`]):
//! pages are read from the page cache on first touch, shared by every VM
//! restored from the same file, and copied only when a VM writes them. A
//! diff is restored by mapping its base chain and then mapping the diff's
//! dirty ranges over it, `MAP_FIXED`, from the diff file — still lazy and
//! shared. The VM is then rebuilt in a fresh KVM VM: memory slots (with
//! dirty logging, so the restored VM can take a diff), irqchip, PIT and
//! clock state, devices, and vCPUs in their saved state.
//!
//! A diff names its base by the path its VMM saw; a base missing there is
//! looked for beside the diff under the same directory name, so a chain
//! written by a jailed VMM (which sees jail paths) and moved out as
//! sibling directories restores, jailed or not.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvm_ioctls::Kvm;
use schema::snapshot::{
    self as format, BaseRef, DeviceStates, MachineShape, MemoryKind, MemoryRegion, MemorySnapshot,
    PageRange, SnapshotState, StateDigest, StateFileError, VcpuState, VirtioDeviceState,
    VirtioMmioState,
};
pub use schema::vmm::SnapshotKind;

use crate::builder::{BuildError, Machine, MachineConfig, PersistentDevice};
use crate::devices::legacy::serial::SerialOut;
use crate::devices::virtio::block::{Block, CowDisk, CowPaths};
use crate::devices::virtio::vsock::Vsock;
use crate::vstate::memory::{self, MemoryBacking, MemoryFileError};
use crate::vstate::persist::{self, PersistError};
use crate::vstate::vm::VmError;

/// Errors creating or restoring a snapshot. Each says which file or part
/// of the state is at fault.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot directory {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    State {
        path: PathBuf,
        source: StateFileError,
    },
    #[error(
        "a diff snapshot needs a base: this VM was neither restored from a snapshot nor snapshotted since it started (or its last snapshot failed); take a full snapshot"
    )]
    NoBase,
    #[error("a diff snapshot cannot be written into its own base's directory {}", .0.display())]
    DiffIntoBase(PathBuf),
    #[error("this VM does not log dirty pages, so it cannot take a diff snapshot")]
    NoDirtyLog,
    #[error("virtio device in slot {0:#x} does not support snapshots")]
    UnsupportedDevice(u64),
    #[error("device {what}: {reason}")]
    Device { what: String, reason: String },
    #[error("the snapshot's memory file name {0:?} is not a plain file name")]
    BadMemoryName(String),
    #[error("memory file {} is {got} bytes; the snapshot's memory is {want} bytes (truncated?)", path.display())]
    MemoryLength { path: PathBuf, got: u64, want: u64 },
    #[error(
        "the snapshot's memory layout {got:?} is not the one this VMM builds for {mem_size} bytes ({want:?})"
    )]
    Layout {
        mem_size: u64,
        got: Vec<(u64, u64)>,
        want: Vec<(u64, u64)>,
    },
    #[error("the base of {} is {}, whose state file has changed (digest mismatch): the diff no longer applies", diff.display(), base.display())]
    BaseChanged { diff: PathBuf, base: PathBuf },
    #[error("the base snapshot {} has a different machine shape than its diff", .0.display())]
    BaseShape(PathBuf),
    #[error(
        "diff chain longer than {} snapshots (a loop?)",
        format::MAX_DIFF_CHAIN
    )]
    ChainTooLong,
    #[error("the snapshot has {vcpus} vCPUs and {states} vCPU states")]
    VcpuCount { vcpus: u8, states: usize },
    #[error("snapshot write stopped on request after the memory file (test hook)")]
    Interrupted,
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
    #[error(transparent)]
    Kvm(#[from] PersistError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Build(#[from] BuildError),
}

fn dir_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Dir {
        path: path.to_owned(),
        source,
    }
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::File {
        path: path.to_owned(),
        source,
    }
}

/// Most ranges of one diff mapped over its base one by one; a diff with
/// more (scattered pages) is read into memory instead. Each mapping is a
/// VMA and `vm.max_map_count` (65530 by default) bounds them per process.
pub const MAX_OVERLAY_MAPPINGS: usize = 4096;

/// How to write a snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// Test hook: stop (as if killed) after the memory file is in place and
    /// before the state file is written.
    #[doc(hidden)]
    pub stop_after_memory: bool,
}

/// What a snapshot wrote.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub dir: PathBuf,
    pub kind: SnapshotKind,
    pub memory_file: PathBuf,
    /// Pages in a diff's memory file (0 for a full snapshot).
    pub dirty_pages: u64,
    /// Bytes of the memory layout the snapshot covers.
    pub memory_bytes: u64,
    pub state_digest: StateDigest,
    pub duration: Duration,
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // getrandom(2) cannot fail for 16 bytes once the pool is initialised;
    // fall back to time and pid if it does.
    // SAFETY: `id` is a valid 16-byte buffer.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        id.copy_from_slice(&(t ^ (u128::from(std::process::id()) << 96)).to_le_bytes());
    }
    id
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Write `bytes` to `dir/name` crash-safely: temp file, fsync, rename.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), SnapshotError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut f = File::create(&tmp).map_err(file_err(&tmp))?;
    f.write_all(bytes).map_err(file_err(&tmp))?;
    f.sync_all().map_err(file_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(file_err(&path))?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(dir_err(dir))
}

/// Read and check `dir/state`; returns it with its digest.
pub fn load_state(dir: &Path) -> Result<(SnapshotState, StateDigest), SnapshotError> {
    use std::io::Read;
    let path = dir.join(format::STATE_FILE);
    let file = File::open(&path).map_err(file_err(&path))?;
    // Read at most one byte more than a state file may be, so a huge (or
    // endless) file is refused without reading it all.
    let limit = format::HEADER_LEN as u64 + format::MAX_BODY_LEN;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(file_err(&path))?;
    if bytes.len() as u64 > limit {
        return Err(SnapshotError::State {
            path,
            source: StateFileError::TooLarge,
        });
    }
    let state = format::decode_state(&bytes).map_err(|source| SnapshotError::State {
        path: path.clone(),
        source,
    })?;
    Ok((state, format::state_digest(&bytes)))
}

/// A virtio device held still for the length of a snapshot.
enum DeviceGuard<'a> {
    Block(MutexGuard<'a, Block>),
    Vsock(MutexGuard<'a, Vsock>),
}

/// Lock every virtio device, in slot order. Paused vCPUs no longer drive
/// the devices, but host-side threads (the vsock poller) still would:
/// holding the locks until the memory file is written keeps a device from
/// writing guest memory (a used ring, received data) after its state was
/// saved — the snapshot is of one instant.
fn lock_devices(machine: &Machine) -> Result<Vec<DeviceGuard<'_>>, SnapshotError> {
    machine
        .virtio
        .iter()
        .map(|entry| match &entry.device {
            PersistentDevice::Block(b) => Ok(DeviceGuard::Block(
                b.lock().unwrap_or_else(|e| e.into_inner()),
            )),
            PersistentDevice::Vsock(v) => Ok(DeviceGuard::Vsock(
                v.lock().unwrap_or_else(|e| e.into_inner()),
            )),
            PersistentDevice::Other => Err(SnapshotError::UnsupportedDevice(entry.slot.base)),
        })
        .collect()
}

/// Save the devices' state (vCPUs paused, devices locked). Block devices
/// are flushed first.
fn save_devices(
    machine: &Machine,
    guards: &mut [DeviceGuard<'_>],
) -> Result<DeviceStates, SnapshotError> {
    let serial = machine
        .serial
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .save();
    let mut virtio = Vec::with_capacity(machine.virtio.len());
    for (entry, guard) in machine.virtio.iter().zip(guards.iter_mut()) {
        let device = match guard {
            DeviceGuard::Block(b) => {
                b.flush_for_snapshot().map_err(|e| SnapshotError::Device {
                    what: format!("virtio-blk at {:#x}", entry.slot.base),
                    reason: format!("cannot flush the disk: {e}"),
                })?;
                VirtioDeviceState::Block(b.save())
            }
            DeviceGuard::Vsock(v) => VirtioDeviceState::Vsock(v.save()),
        };
        // The transport only reads its own registers here (it locks the
        // device only when a vCPU writes one, and the vCPUs are paused).
        let transport = entry
            .transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save();
        virtio.push(VirtioMmioState {
            base: entry.slot.base,
            irq: entry.slot.irq,
            transport,
            device,
        });
    }
    Ok(DeviceStates { serial, virtio })
}

/// Snapshot `machine`, whose vCPUs are paused and whose vCPU states are
/// `vcpus` (from [`crate::vstate::vcpu::VcpuHandle::save_state`]), into
/// `dir` (created if missing; a previous snapshot there is replaced only
/// once the new one is complete).
///
/// Either kind resets dirty tracking, so the VM's next diff is relative to
/// this snapshot. If the write fails after that, the VM has no base any
/// more (the next snapshot must be full) — a diff never silently misses
/// pages.
pub fn create_snapshot(
    machine: &Machine,
    vcpus: Vec<VcpuState>,
    dir: &Path,
    kind: SnapshotKind,
    options: &SnapshotOptions,
) -> Result<SnapshotInfo, SnapshotError> {
    let started = Instant::now();
    if vcpus.len() != usize::from(machine.config.vcpus) {
        return Err(SnapshotError::VcpuCount {
            vcpus: machine.config.vcpus,
            states: vcpus.len(),
        });
    }
    std::fs::create_dir_all(dir).map_err(dir_err(dir))?;
    let dir = dir.canonicalize().map_err(dir_err(dir))?;
    let base = machine
        .snapshot_base
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if kind == SnapshotKind::Diff {
        let base = base.as_ref().ok_or(SnapshotError::NoBase)?;
        if !machine.vm.tracks_dirty_pages() {
            return Err(SnapshotError::NoDirtyLog);
        }
        if base.dir_path() == dir {
            return Err(SnapshotError::DiffIntoBase(dir));
        }
    }
    // Everything that can fail without side effects comes first.
    let mut guards = lock_devices(machine)?;
    let vm = persist::save_vm(machine.vm.fd())?;
    let devices = save_devices(machine, &mut guards)?;

    let result = write_snapshot(machine, vcpus, vm, devices, &dir, kind, base, options);
    drop(guards);
    let mut slot = machine
        .snapshot_base
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    match result {
        Ok(mut info) => {
            *slot = Some(BaseRef {
                dir: format::path_bytes(&dir),
                state_sha256: info.state_digest,
            });
            info.duration = started.elapsed();
            Ok(info)
        }
        Err(e) => {
            *slot = None;
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn write_snapshot(
    machine: &Machine,
    vcpus: Vec<VcpuState>,
    vm: format::VmState,
    devices: DeviceStates,
    dir: &Path,
    kind: SnapshotKind,
    base: Option<BaseRef>,
    options: &SnapshotOptions,
) -> Result<SnapshotInfo, SnapshotError> {
    let previous_memory = load_state(dir).ok().map(|(s, _)| s.memory.file);
    // Leftovers of a writer that was killed: temporary files, and memory
    // files no state refers to (a VM restored from an older one keeps its
    // mapping after the unlink).
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let orphan = name.starts_with("memory-") && previous_memory.as_deref() != Some(&*name);
            if orphan || (name.starts_with('.') && name.ends_with(".tmp")) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    // Pages written since the base: the guest's (KVM) and the VMM's own.
    let mem = &machine.memory;
    let tracked = machine.vm.tracks_dirty_pages();
    let kvm_dirty = if tracked {
        machine.vm.take_dirty_log(mem)?
    } else {
        Vec::new()
    };
    let mut dirty = memory::take_vmm_dirty(mem);
    for (d, k) in dirty.iter_mut().zip(&kvm_dirty) {
        for (a, b) in d.iter_mut().zip(k) {
            *a |= *b;
        }
    }
    let total = memory::layout_len(mem);
    let id = random_id();
    let memory_name = format!("memory-{}", hex(&id));
    let tmp = dir.join(format!(".{memory_name}.tmp"));
    let memory_path = dir.join(&memory_name);
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(file_err(&tmp))?;
    let (memory_kind, dirty_pages) = match kind {
        SnapshotKind::Full => {
            memory::write_full(mem, &file)?;
            (MemoryKind::Full, 0)
        }
        SnapshotKind::Diff => {
            let ranges = memory::bitmaps_to_ranges(mem, &dirty);
            file.set_len(total).map_err(file_err(&tmp))?;
            memory::write_ranges(mem, &file, &ranges, false)?;
            let pages = ranges.iter().map(|r| r.len / memory::PAGE_SIZE).sum();
            // Checked above: a diff has a base.
            let base = base.ok_or(SnapshotError::NoBase)?;
            (
                MemoryKind::Diff {
                    base,
                    dirty: ranges,
                },
                pages,
            )
        }
    };
    file.sync_all().map_err(file_err(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, &memory_path).map_err(file_err(&memory_path))?;
    sync_dir(dir)?;
    if options.stop_after_memory {
        return Err(SnapshotError::Interrupted);
    }

    let state = SnapshotState {
        id,
        created_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        machine: MachineShape {
            vcpus: machine.config.vcpus,
            mem_size: machine.config.mem_size,
            regions: machine
                .regions
                .iter()
                .map(|&(guest_addr, size)| MemoryRegion { guest_addr, size })
                .collect(),
        },
        memory: MemorySnapshot {
            file: memory_name,
            len: total,
            kind: memory_kind,
        },
        vm,
        vcpus,
        devices,
    };
    let bytes = format::encode_state(&state).map_err(|source| SnapshotError::State {
        path: dir.join(format::STATE_FILE),
        source,
    })?;
    write_atomic(dir, format::STATE_FILE, &bytes)?;
    sync_dir(dir)?;
    if let Some(old) = previous_memory
        && old != state.memory.file
        && is_plain_name(&old)
    {
        let _ = std::fs::remove_file(dir.join(old));
    }
    Ok(SnapshotInfo {
        dir: dir.to_owned(),
        kind,
        memory_file: memory_path,
        dirty_pages,
        memory_bytes: total,
        state_digest: format::state_digest(&bytes),
        duration: Duration::ZERO,
    })
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// One snapshot of a chain: its directory, state and open memory file.
struct Layer {
    dir: PathBuf,
    state: SnapshotState,
    file: File,
}

fn open_memory(dir: &Path, state: &SnapshotState) -> Result<File, SnapshotError> {
    if !is_plain_name(&state.memory.file) {
        return Err(SnapshotError::BadMemoryName(state.memory.file.clone()));
    }
    let path = dir.join(&state.memory.file);
    let file = File::open(&path).map_err(file_err(&path))?;
    let got = file.metadata().map_err(file_err(&path))?.len();
    if got != state.memory.len {
        return Err(SnapshotError::MemoryLength {
            path,
            got,
            want: state.memory.len,
        });
    }
    Ok(file)
}

/// Where the base a diff in `diff_dir` recorded as `recorded` is now: at
/// the recorded path if a snapshot is there, else beside the diff under
/// the same directory name. A snapshot written by a jailed VMM records
/// its base by a path inside that jail (`/snap`), which means nothing
/// outside it: a chain moved out of the jail as sibling directories (and
/// a chain mounted into a restoring jail, `/snapshots/<name>`) is found
/// by name. The base's state digest is checked either way.
fn locate_base(diff_dir: &Path, recorded: &Path) -> PathBuf {
    if recorded.join(format::STATE_FILE).is_file() {
        return recorded.to_owned();
    }
    match (diff_dir.parent(), recorded.file_name()) {
        (Some(parent), Some(name)) if parent.join(name).join(format::STATE_FILE).is_file() => {
            parent.join(name)
        }
        _ => recorded.to_owned(),
    }
}

/// The directories of the snapshot chain ending in `dir`, from the full
/// snapshot at the bottom to `dir`, each checked as a restore checks it
/// (state digests, shapes, memory file lengths).
pub fn chain_dirs(dir: &Path) -> Result<Vec<PathBuf>, SnapshotError> {
    let dir = dir.canonicalize().map_err(dir_err(dir))?;
    let (top, _) = load_state(&dir)?;
    Ok(load_chain(&dir, top)?.into_iter().map(|l| l.dir).collect())
}

/// The chain from the full snapshot at the bottom to `dir` at the top.
fn load_chain(dir: &Path, top: SnapshotState) -> Result<Vec<Layer>, SnapshotError> {
    let mut chain = Vec::new();
    let mut dir = dir.to_owned();
    let mut state = top;
    loop {
        if chain.len() >= format::MAX_DIFF_CHAIN {
            return Err(SnapshotError::ChainTooLong);
        }
        let file = open_memory(&dir, &state)?;
        let next = match &state.memory.kind {
            MemoryKind::Full => None,
            MemoryKind::Diff { base, .. } => Some(base.clone()),
        };
        let shape = state.machine.clone();
        chain.push(Layer {
            dir: dir.clone(),
            state,
            file,
        });
        let Some(base) = next else { break };
        let base_dir = locate_base(&dir, &base.dir_path());
        let (base_state, digest) = load_state(&base_dir)?;
        if digest != base.state_sha256 {
            return Err(SnapshotError::BaseChanged {
                diff: dir,
                base: base_dir,
            });
        }
        if base_state.machine != shape {
            return Err(SnapshotError::BaseShape(base_dir));
        }
        dir = base_dir;
        state = base_state;
    }
    chain.reverse();
    Ok(chain)
}

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Log dirty pages so the restored VM can take diff snapshots.
    pub track_dirty_pages: bool,
    /// Listen for vsock connections here instead of the saved path.
    pub vsock_uds: Option<PathBuf>,
    /// The root disk's overlay for this VM (a copy of the snapshot's, so
    /// VMs restored from one snapshot do not share one overlay), instead of
    /// the saved path.
    pub block_overlay: Option<PathBuf>,
    /// The root disk's base image, instead of the saved path (a jailed
    /// restore finds it at `/rootfs`).
    pub block_base: Option<PathBuf>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            track_dirty_pages: true,
            vsock_uds: None,
            block_overlay: None,
            block_base: None,
        }
    }
}

/// A VM rebuilt from a snapshot, vCPUs not yet created: the caller may add
/// devices that are not part of snapshots (a test's exit port) first, then
/// calls [`Restored::create_vcpus`].
pub struct Restored {
    pub machine: Machine,
    pub state: SnapshotState,
    /// The restored vsock device, for the host-socket poller.
    pub vsock: Option<Arc<Mutex<Vsock>>>,
}

impl Restored {
    /// The vCPUs in their saved state, ready to start.
    pub fn create_vcpus(&self) -> Result<Vec<crate::vstate::vcpu::Vcpu>, SnapshotError> {
        Ok(self.machine.create_vcpus_from(&self.state.vcpus)?)
    }
}

/// Rebuild the VM snapshotted in `dir`. Nothing runs yet.
pub fn restore(
    kvm: &Kvm,
    dir: &Path,
    console: SerialOut,
    options: &RestoreOptions,
) -> Result<Restored, SnapshotError> {
    let dir = dir.canonicalize().map_err(dir_err(dir))?;
    let (top, digest) = load_state(&dir)?;
    let shape = top.machine.clone();
    if top.vcpus.len() != usize::from(shape.vcpus) {
        return Err(SnapshotError::VcpuCount {
            vcpus: shape.vcpus,
            states: top.vcpus.len(),
        });
    }
    let want = crate::arch::x86_64::layout::arch_memory_regions(shape.mem_size);
    let got: Vec<(u64, u64)> = shape
        .regions
        .iter()
        .map(|r| (r.guest_addr, r.size))
        .collect();
    if got != want || top.memory.len != want.iter().map(|r| r.1).sum::<u64>() {
        return Err(SnapshotError::Layout {
            mem_size: shape.mem_size,
            got,
            want,
        });
    }
    let chain = load_chain(&dir, top)?;
    let (bottom, diffs) = chain.split_first().ok_or(SnapshotError::ChainTooLong)?;
    let backing = MemoryBacking::PrivateFile {
        file: Arc::new(bottom.file.try_clone().map_err(file_err(&bottom.dir))?),
        offset: 0,
    };
    let mem = memory::create_guest_memory(&want, &backing)?;
    for layer in diffs {
        if let MemoryKind::Diff { dirty, .. } = &layer.state.memory.kind {
            check_ranges(dirty, layer.state.memory.len)?;
            if dirty.len() <= MAX_OVERLAY_MAPPINGS {
                memory::overlay_file_ranges(&mem, &layer.file, dirty)?;
            } else {
                memory::copy_file_ranges(&mem, &layer.file, dirty)?;
            }
        }
    }
    // Copied pages went through vm-memory and were marked as the VMM's
    // writes; they are the snapshot's, not changes since it.
    let _ = memory::take_vmm_dirty(&mem);
    let state = chain
        .into_iter()
        .next_back()
        .map(|l| l.state)
        .ok_or(SnapshotError::ChainTooLong)?;

    let mut config = MachineConfig::new(shape.vcpus, shape.mem_size);
    config.backing = backing;
    config.track_dirty_pages = options.track_dirty_pages;
    let mut machine = Machine::with_memory(kvm, config, mem, console, Some(&state.devices.serial))?;
    persist::restore_vm(machine.vm.fd(), &state.vm)?;
    let mut vsock_dev = None;
    for saved in &state.devices.virtio {
        let what = |kind: &str| format!("{kind} at {:#x}", saved.base);
        let dev_err = |what: String| {
            move |e: &dyn std::fmt::Display| SnapshotError::Device {
                what,
                reason: e.to_string(),
            }
        };
        let (shared, persistent): (crate::devices::virtio::mmio::SharedVirtioDevice, _) =
            match &saved.device {
                VirtioDeviceState::Block(b) => {
                    let paths = b.overlay.as_ref().ok_or_else(|| SnapshotError::Device {
                        what: what("virtio-blk"),
                        reason: "only copy-on-write disks can be restored".into(),
                    })?;
                    let saved = CowPaths::from_state(paths);
                    let paths = match (&options.block_base, &options.block_overlay) {
                        (None, None) => saved,
                        (base, overlay) => CowPaths::new(
                            base.clone().unwrap_or(saved.base),
                            overlay.clone().unwrap_or(saved.overlay),
                        ),
                    };
                    let disk = CowDisk::open(paths).map_err(|e| dev_err(what("virtio-blk"))(&e))?;
                    let block = Block::restore(b, Box::new(disk), machine.memory.clone())
                        .map_err(|e| dev_err(what("virtio-blk"))(&e))?;
                    let block = Arc::new(Mutex::new(block));
                    (block.clone(), PersistentDevice::Block(block))
                }
                VirtioDeviceState::Vsock(v) => {
                    let uds = options
                        .vsock_uds
                        .clone()
                        .unwrap_or_else(|| format::bytes_path(&v.uds_path));
                    let vsock = Vsock::restore(v, &uds, machine.memory.clone())
                        .map_err(|e| dev_err(what("virtio-vsock"))(&e))?;
                    let vsock = Arc::new(Mutex::new(vsock));
                    vsock_dev = Some(vsock.clone());
                    (vsock.clone(), PersistentDevice::Vsock(vsock))
                }
            };
        let slot = machine.add_virtio(shared, persistent, Some(&saved.transport))?;
        if (slot.base, slot.irq) != (saved.base, saved.irq) {
            return Err(SnapshotError::Device {
                what: what("virtio device"),
                reason: format!(
                    "restored into slot {:#x} irq {}, saved in irq {}",
                    slot.base, slot.irq, saved.irq
                ),
            });
        }
    }
    *machine
        .snapshot_base
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(BaseRef {
        dir: format::path_bytes(&dir),
        state_sha256: digest,
    });
    Ok(Restored {
        machine,
        state,
        vsock: vsock_dev,
    })
}

fn check_ranges(ranges: &[PageRange], len: u64) -> Result<(), SnapshotError> {
    let mut end = 0;
    for r in ranges {
        let bad = || {
            SnapshotError::MemoryFile(MemoryFileError::BadRange {
                offset: r.offset,
                len: r.len,
            })
        };
        let stop = r.offset.checked_add(r.len).ok_or_else(bad)?;
        if r.offset < end || stop > len || r.len == 0 {
            return Err(bad());
        }
        end = stop;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A base is taken at its recorded path when a snapshot is there, else
    /// beside the diff under the same name (a jailed VMM records jail
    /// paths such as `/snap`), else left as recorded (to fail by name).
    #[test]
    fn a_missing_base_is_found_beside_its_diff() {
        let root = std::env::temp_dir().join(format!("smsnap-locate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["moved/snap", "moved/diff", "there/base"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
            std::fs::write(root.join(d).join(format::STATE_FILE), b"x").unwrap();
        }
        let diff = root.join("moved/diff");
        assert_eq!(
            locate_base(&diff, Path::new("/snap")),
            root.join("moved/snap")
        );
        let there = root.join("there/base");
        assert_eq!(locate_base(&diff, &there), there);
        let gone = Path::new("/nonexistent-smsnap/other");
        assert_eq!(locate_base(&diff, gone), gone);
        let _ = std::fs::remove_dir_all(&root);
    }
}
