//! The microVM snapshot state file: what `sandmesh vmm` writes when it
//! snapshots a VM and reads back when it restores one.
//!
//! A snapshot is a directory holding a **state file** ([`STATE_FILE`]) and
//! one **memory file** whose name the state records. The state file is a
//! small fixed header followed by an rkyv archive of [`SnapshotState`]:
//!
//! ```text
//! 0   8  magic  b"SMVMSNAP"
//! 8   4  format version, u32 LE  (FORMAT_VERSION)
//! 12  4  flags, u32 LE (0; anything else is refused)
//! 16  8  body length, u64 LE
//! 24 32  SHA-256 of the body
//! 56 ..  body: rkyv archive of SnapshotState
//! ```
//!
//! rkyv archives are not self-describing and have no schema evolution, so
//! the header is what keeps an old or foreign file from being misread: the
//! magic and version are checked before anything else, the length and
//! digest catch truncation and corruption, and the body is then validated
//! by bytecheck (`rkyv::from_bytes`, never unchecked access) from an
//! aligned copy. Any change to a type below changes the archive layout and
//! **must** bump [`FORMAT_VERSION`].
//!
//! KVM's own structures (segment registers, LAPIC page, XSAVE area, irqchip
//! state...) are kept as opaque byte blobs of their exact `kvm_bindings`
//! layout ([`KvmBlob`]), as Firecracker serialises them; the VMM checks
//! each blob's size against the structure it restores into. Devices' state
//! is plain typed data, validated by each device on restore as if the guest
//! had written it.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Name of the state file inside a snapshot directory. It is written last
/// (temp name, fsync, rename): a directory without it holds no snapshot.
pub const STATE_FILE: &str = "state";
/// The first bytes of every state file.
pub const MAGIC: [u8; 8] = *b"SMVMSNAP";
/// The version of the state format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Size of the fixed header before the rkyv body.
pub const HEADER_LEN: usize = 56;
/// Largest state body accepted (the state of 16 vCPUs and a handful of
/// devices is a few hundred KiB; anything far larger is not ours).
pub const MAX_BODY_LEN: u64 = 64 << 20;
/// Most layers (a full snapshot plus diffs over it) a restore will follow.
pub const MAX_DIFF_CHAIN: usize = 32;

/// An opaque copy of a `kvm_bindings` structure, byte for byte.
pub type KvmBlob = Vec<u8>;

/// SHA-256 digest of a state file; what a diff snapshot names its base by.
pub type StateDigest = [u8; 32];

/// Everything needed to rebuild a microVM, except the contents of its
/// memory (in the memory file).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SnapshotState {
    /// Random id of this snapshot: two snapshots never share a state file
    /// digest, even of identical VMs.
    pub id: [u8; 16],
    /// Wall-clock time of the snapshot (milliseconds since the epoch).
    pub created_unix_ms: u64,
    pub machine: MachineShape,
    pub memory: MemorySnapshot,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStates,
}

/// The VM's shape: vCPUs and guest RAM layout.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MachineShape {
    pub vcpus: u8,
    pub mem_size: u64,
    /// Guest RAM regions in guest-physical order; the memory file lays
    /// them out back to back (region `i` at the sum of the sizes before it).
    pub regions: Vec<MemoryRegion>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MemoryRegion {
    pub guest_addr: u64,
    pub size: u64,
}

/// The memory file of this snapshot.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MemorySnapshot {
    /// File name inside the snapshot directory (never a path: a state file
    /// cannot point the VMM at an arbitrary file).
    pub file: String,
    /// Length of the memory file: the sum of the region sizes.
    pub len: u64,
    pub kind: MemoryKind,
}

/// Whether the memory file holds all of guest memory or only what changed.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum MemoryKind {
    /// Every page (all-zero pages may be holes of a sparse file).
    Full,
    /// Only `dirty` (byte ranges of the memory layout, page aligned, sorted,
    /// disjoint) are valid, at the same offsets as in a full file; every
    /// other page is the base snapshot's.
    Diff {
        base: BaseRef,
        dirty: Vec<PageRange>,
    },
}

/// Which snapshot a diff applies to.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct BaseRef {
    /// The base snapshot's directory (absolute; raw bytes of the path).
    pub dir: Vec<u8>,
    /// SHA-256 of the base's state file. A base directory whose state file
    /// has another digest (overwritten, or a different snapshot) is refused.
    pub state_sha256: StateDigest,
}

impl BaseRef {
    pub fn dir_path(&self) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        PathBuf::from(std::ffi::OsStr::from_bytes(&self.dir))
    }
}

/// A byte range of the memory layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PageRange {
    pub offset: u64,
    pub len: u64,
}

/// VM-wide KVM state: the in-kernel irqchip, PIT and clock.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct VmState {
    /// `kvm_irqchip` for chip 0 (PIC master), 1 (PIC slave), 2 (IO-APIC).
    pub irqchips: Vec<KvmBlob>,
    /// `kvm_pit_state2`.
    pub pit: KvmBlob,
    /// `kvm_clock_data` (flags cleared).
    pub clock: KvmBlob,
}

/// One vCPU's KVM state. FPU/SSE state is inside the XSAVE area.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct VcpuState {
    pub index: u8,
    /// `kvm_cpuid_entry2` entries, concatenated.
    pub cpuid: KvmBlob,
    /// MSRs KVM reported readable (`KVM_GET_MSR_INDEX_LIST`), TSC first.
    pub msrs: Vec<MsrEntry>,
    pub regs: KvmBlob,
    pub sregs: KvmBlob,
    pub xsave: KvmBlob,
    pub xcrs: KvmBlob,
    pub debug_regs: KvmBlob,
    pub lapic: KvmBlob,
    pub mp_state: KvmBlob,
    pub vcpu_events: KvmBlob,
    /// The guest TSC frequency, where KVM reports it.
    pub tsc_khz: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

/// Device state. The i8042 has none (it is only a reset line).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DeviceStates {
    pub serial: SerialState,
    /// virtio-mmio devices in slot order.
    pub virtio: Vec<VirtioMmioState>,
}

/// The 16550A's registers and receive FIFO (vm-superio's `SerialState`).
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// One virtio device on its virtio-mmio window.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct VirtioMmioState {
    pub base: u64,
    pub irq: u32,
    pub transport: MmioTransportState,
    pub device: VirtioDeviceState,
}

#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum VirtioDeviceState {
    Block(BlockState),
    Vsock(VsockState),
}

/// The virtio-mmio transport's registers (the device's own state is apart).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct MmioTransportState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
}

/// One split virtqueue (the fields of `virtio_queue::QueueState`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

/// Where a copy-on-write disk lives (paths as raw bytes: rkyv has no
/// `PathBuf`, and a path need not be UTF-8).
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct DiskPaths {
    pub base: Vec<u8>,
    pub overlay: Vec<u8>,
    /// The overlay's cluster map, written atomically at every flush (and
    /// so at every snapshot).
    pub map: Vec<u8>,
}

/// A virtio-blk device's state.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct BlockState {
    pub id: Vec<u8>,
    pub read_only: bool,
    /// Capacity in sectors when saved; the restored disk must match.
    pub capacity: u64,
    pub avail_features: u64,
    pub acked_features: u64,
    pub activated: bool,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
    /// The overlay and its map, for a copy-on-write disk.
    pub overlay: Option<DiskPaths>,
}

/// A virtio-vsock device's state. Connections are not part of it (their
/// host ends belong to the old process).
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct VsockState {
    pub guest_cid: u64,
    /// The host unix socket path (raw bytes).
    pub uds_path: Vec<u8>,
    pub avail_features: u64,
    pub acked_features: u64,
    pub activated: bool,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
}

/// A path as the raw bytes the state file keeps.
pub fn path_bytes(p: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes().to_vec()
}

/// The path back from [`path_bytes`].
pub fn bytes_path(b: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(b))
}

/// Why a state file was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error(
        "snapshot state file is {len} bytes, shorter than its {HEADER_LEN}-byte header (truncated?)"
    )]
    TooShort { len: usize },
    #[error("not a sandmesh snapshot state file (bad magic {found:02x?})")]
    BadMagic { found: [u8; 8] },
    #[error(
        "snapshot state format version {found} is not supported (this VMM reads version {FORMAT_VERSION}); take a new snapshot"
    )]
    Version { found: u32 },
    #[error("snapshot state file has unknown flags {0:#x}")]
    Flags(u32),
    #[error(
        "snapshot state body is {actual} bytes but the header says {header} (truncated or appended to)"
    )]
    Length { header: u64, actual: u64 },
    #[error("snapshot state body does not match its SHA-256 digest (corrupted)")]
    Digest,
    #[error("snapshot state file is larger than any state file ({MAX_BODY_LEN} bytes of body)")]
    TooLarge,
    #[error("snapshot state body is invalid: {0}")]
    Invalid(String),
    #[error("cannot encode snapshot state: {0}")]
    Encode(String),
}

/// Encode `state` as a complete state file (header + body).
pub fn encode_state(state: &SnapshotState) -> Result<Vec<u8>, StateFileError> {
    let body = rkyv::to_bytes::<rkyv::rancor::Error>(state)
        .map_err(|e| StateFileError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    Ok(out)
}

/// Check a state file's header, digest and archive, and decode it.
pub fn decode_state(bytes: &[u8]) -> Result<SnapshotState, StateFileError> {
    if bytes.len() < HEADER_LEN {
        // Say "bad magic" rather than "too short" for a short foreign file.
        if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] != MAGIC {
            let mut found = [0u8; 8];
            found.copy_from_slice(&bytes[..8]);
            return Err(StateFileError::BadMagic { found });
        }
        return Err(StateFileError::TooShort { len: bytes.len() });
    }
    let (header, body) = bytes.split_at(HEADER_LEN);
    let field = |r: std::ops::Range<usize>| &header[r];
    let mut magic = [0u8; 8];
    magic.copy_from_slice(field(0..8));
    if magic != MAGIC {
        return Err(StateFileError::BadMagic { found: magic });
    }
    let u32_at = |o: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(field(o..o + 4));
        u32::from_le_bytes(b)
    };
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(StateFileError::Version { found: version });
    }
    let flags = u32_at(12);
    if flags != 0 {
        return Err(StateFileError::Flags(flags));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(field(16..24));
    let header_len = u64::from_le_bytes(len);
    if header_len != body.len() as u64 || header_len > MAX_BODY_LEN {
        return Err(StateFileError::Length {
            header: header_len,
            actual: body.len() as u64,
        });
    }
    if Sha256::digest(body).as_slice() != field(24..56) {
        return Err(StateFileError::Digest);
    }
    // rkyv validation needs the archive aligned; the body sits at offset 56
    // of whatever buffer the caller read, so copy it.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    rkyv::from_bytes::<SnapshotState, rkyv::rancor::Error>(&aligned)
        .map_err(|e| StateFileError::Invalid(e.to_string()))
}

/// SHA-256 of a whole state file, as a [`BaseRef`] records it.
pub fn state_digest(state_file: &[u8]) -> StateDigest {
    Sha256::digest(state_file).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotState {
        SnapshotState {
            id: [7; 16],
            created_unix_ms: 1,
            machine: MachineShape {
                vcpus: 1,
                mem_size: 8 << 20,
                regions: vec![MemoryRegion {
                    guest_addr: 0,
                    size: 8 << 20,
                }],
            },
            memory: MemorySnapshot {
                file: "memory-0707".into(),
                len: 8 << 20,
                kind: MemoryKind::Diff {
                    base: BaseRef {
                        dir: b"/snap/base".to_vec(),
                        state_sha256: [1; 32],
                    },
                    dirty: vec![PageRange {
                        offset: 4096,
                        len: 8192,
                    }],
                },
            },
            vm: VmState {
                irqchips: vec![vec![1; 520], vec![2; 520], vec![3; 520]],
                pit: vec![4; 112],
                clock: vec![5; 48],
            },
            vcpus: vec![VcpuState {
                index: 0,
                cpuid: vec![0; 80],
                msrs: vec![MsrEntry {
                    index: 0x10,
                    data: 12345,
                }],
                regs: vec![9; 144],
                sregs: vec![8; 312],
                xsave: vec![0; 4096],
                xcrs: vec![0; 392],
                debug_regs: vec![0; 128],
                lapic: vec![0; 1024],
                mp_state: vec![0; 4],
                vcpu_events: vec![0; 64],
                tsc_khz: Some(2_000_000),
            }],
            devices: DeviceStates {
                serial: SerialState {
                    in_buffer: b"abc".to_vec(),
                    ..SerialState::default()
                },
                virtio: vec![VirtioMmioState {
                    base: 0xd000_0000,
                    irq: 5,
                    transport: MmioTransportState {
                        device_features_sel: 1,
                        driver_features_sel: 0,
                        driver_features: 1 << 32,
                        queue_sel: 0,
                        status: 0xf,
                        config_generation: 0,
                    },
                    device: VirtioDeviceState::Vsock(VsockState {
                        guest_cid: 3,
                        uds_path: b"/run/v.sock".to_vec(),
                        avail_features: 1 << 32,
                        acked_features: 1 << 32,
                        activated: true,
                        interrupt_status: 0,
                        queues: vec![],
                    }),
                }],
            },
        }
    }

    #[test]
    fn state_file_roundtrips() {
        let s = sample();
        let file = encode_state(&s).expect("encode");
        assert_eq!(&file[..8], b"SMVMSNAP");
        assert_eq!(decode_state(&file).expect("decode"), s);
        assert_eq!(state_digest(&file), state_digest(&file));
    }

    #[test]
    fn truncated_corrupted_old_and_foreign_files_are_refused() {
        let file = encode_state(&sample()).expect("encode");
        for cut in [0, 7, 20, HEADER_LEN, file.len() - 1] {
            let err = decode_state(&file[..cut]).expect_err("truncated");
            assert!(
                matches!(
                    err,
                    StateFileError::TooShort { .. } | StateFileError::Length { .. }
                ),
                "cut {cut}: {err}"
            );
        }
        let mut flipped = file.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x40;
        assert!(matches!(
            decode_state(&flipped),
            Err(StateFileError::Digest)
        ));
        let mut old = file.clone();
        old[8..12].copy_from_slice(&0u32.to_le_bytes());
        let err = decode_state(&old).expect_err("old");
        assert!(matches!(err, StateFileError::Version { found: 0 }), "{err}");
        assert!(
            err.to_string().contains("version 0 is not supported"),
            "{err}"
        );
        let mut foreign = file.clone();
        foreign[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
        assert!(matches!(
            decode_state(&foreign),
            Err(StateFileError::BadMagic { .. })
        ));
        let mut flags = file.clone();
        flags[12] = 1;
        assert!(matches!(
            decode_state(&flags),
            Err(StateFileError::Flags(1))
        ));
    }

    #[test]
    fn a_body_with_a_valid_digest_but_garbage_archive_is_invalid_not_misread() {
        // A correct header over bytes that are not a SnapshotState archive
        // (what a buggy or hostile writer could produce).
        let body = vec![0xffu8; 256];
        let mut file = Vec::new();
        file.extend_from_slice(&MAGIC);
        file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        file.extend_from_slice(&0u32.to_le_bytes());
        file.extend_from_slice(&(body.len() as u64).to_le_bytes());
        file.extend_from_slice(&Sha256::digest(&body));
        file.extend_from_slice(&body);
        assert!(matches!(
            decode_state(&file),
            Err(StateFileError::Invalid(_))
        ));
    }
}
