//! The KVM VM: memory slots, the in-kernel interrupt controllers and timer,
//! and irqfds.
//!
//! The VMM uses KVM's in-kernel irqchip (PIC + IO-APIC + per-vCPU local
//! APICs) and PIT, as Firecracker does: interrupts from devices go through
//! irqfds straight into the IO-APIC, and a `hlt`ing vCPU sleeps in the
//! kernel until its next interrupt rather than exiting to user space.

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestMemoryMmap;
use crate::arch::x86_64::layout;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM lacks a capability the VMM needs: {0}")]
    MissingCapability(&'static str),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("guest memory needs {needed} KVM memory slots, KVM offers {max}")]
    TooManyMemorySlots { needed: usize, max: usize },
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} failed: {source}")]
    SetMemoryRegion {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_IDENTITY_MAP_ADDR failed: {0}")]
    SetIdentityMap(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    SetTssAddress(kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed: {0}")]
    CreateIrqchip(kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed: {0}")]
    CreatePit(kvm_ioctls::Error),
    #[error("KVM_GET_MSR_INDEX_LIST failed: {0}")]
    MsrIndexList(kvm_ioctls::Error),
    #[error("KVM_GET_DIRTY_LOG for slot {slot} failed: {source}")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IRQFD for GSI {gsi} failed: {source}")]
    RegisterIrqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("KVM_IOEVENTFD at {addr:#x} (value {value}) failed: {source}")]
    RegisterIoevent {
        addr: u64,
        value: u32,
        source: kvm_ioctls::Error,
    },
}

/// Capabilities without which the VMM cannot work at all.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

/// A KVM VM and what was learnt about the host when creating it.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    supported_cpuid: CpuId,
    max_memslots: usize,
    /// The MSRs a snapshot saves (from KVM_GET_MSR_INDEX_LIST).
    msrs_to_save: Vec<u32>,
    /// Whether the memory slots log dirty pages.
    track_dirty: std::sync::atomic::AtomicBool,
}

impl Vm {
    /// Check the host's KVM and create an empty VM.
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        for &(cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        let mut supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::SupportedCpuid)?;
        if kvm.check_extension(Cap::TscDeadlineTimer) {
            crate::arch::x86_64::cpuid::offer_tsc_deadline(supported_cpuid.as_mut_slice());
        }
        let max_memslots = kvm.get_nr_memslots();
        let msr_index_list = kvm.get_msr_index_list().map_err(VmError::MsrIndexList)?;
        let msrs_to_save = super::persist::msrs_to_save(msr_index_list.as_slice());
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        Ok(Self {
            fd,
            supported_cpuid,
            max_memslots,
            msrs_to_save,
            track_dirty: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// `KVM_GET_SUPPORTED_CPUID` of this host, unfiltered.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// The MSRs a vCPU snapshot saves, TSC first.
    pub fn msrs_to_save(&self) -> &[u32] {
        &self.msrs_to_save
    }

    /// Whether KVM logs guest writes to memory (diff snapshots possible).
    pub fn tracks_dirty_pages(&self) -> bool {
        self.track_dirty.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The pages the guest wrote since the last call, one bitmap per slot
    /// (bit i = page i of the region), and clear KVM's log. Only
    /// meaningful with dirty tracking on.
    pub fn take_dirty_log(&self, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, VmError> {
        mem.iter()
            .enumerate()
            .map(|(slot, region)| {
                let slot = slot as u32;
                self.fd
                    .get_dirty_log(slot, region.len() as usize)
                    .map_err(|source| VmError::DirtyLog { slot, source })
            })
            .collect()
    }

    /// Register every region of `mem` as a KVM memory slot (slot i = region
    /// i). With `track_dirty`, KVM logs guest writes for diff snapshots.
    pub fn register_memory(&self, mem: &GuestMemoryMmap, track_dirty: bool) -> Result<(), VmError> {
        if mem.num_regions() > self.max_memslots {
            return Err(VmError::TooManyMemorySlots {
                needed: mem.num_regions(),
                max: self.max_memslots,
            });
        }
        let flags = if track_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let region_def = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the mapping is owned by `mem`, which the caller keeps
            // alive for as long as the VM (the `Vm` never outlives the
            // `Machine` holding both); slots never overlap because regions
            // of a GuestMemoryMmap never do.
            unsafe { self.fd.set_user_memory_region(region_def) }
                .map_err(|source| VmError::SetMemoryRegion { slot, source })?;
        }
        self.track_dirty
            .store(track_dirty, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Create the in-kernel irqchip and PIT. Must come before any vCPU is
    /// created (KVM requires the identity map address to be set first, and
    /// vCPUs created before the irqchip get no local APIC).
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::SetIdentityMap)?;
        self.fd
            .set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(VmError::SetTssAddress)?;
        self.fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        // The PC speaker port (0x61) is handled by KVM as a dummy so the
        // guest's PIT calibration does not exit to user space.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(VmError::CreatePit)
    }

    /// Deliver writes to `evt` as an edge on `gsi` of the in-kernel IO-APIC.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::RegisterIrqfd { gsi, source })
    }

    /// Have KVM complete a guest's 4-byte write of `value` to the MMIO
    /// address `addr` by signalling `evt`, without exiting to the VMM
    /// (virtio QueueNotify; `value` is the queue index).
    pub fn register_ioevent(&self, evt: &EventFd, addr: u64, value: u32) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), value)
            .map_err(|source| VmError::RegisterIoevent {
                addr,
                value,
                source,
            })
    }
}
