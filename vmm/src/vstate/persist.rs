//! Saving and restoring the KVM state of a VM and its vCPUs.
//!
//! The state types are `schema::snapshot::{VmState, VcpuState}` (the
//! versioned state file); this module is the behaviour: which ioctls, in
//! which order. KVM structures travel as byte blobs of their exact
//! `kvm_bindings` layout (zerocopy views, as kvm-bindings' own serde
//! support does); a blob of the wrong size is refused, never padded.
//!
//! The orders follow KVM's rules, as Firecracker does:
//! - save: complete any half-done IO exit first (see
//!   [`crate::vstate::vcpu::Vcpu::save_state`]), then MP state, registers,
//!   XSAVE (which holds the FPU/SSE state), XCRs, debug registers, LAPIC,
//!   CPUID, MSRs (TSC included, from the list KVM reports), vCPU events;
//! - restore: CPUID, MP state, registers, special registers, XSAVE, XCRs,
//!   debug registers, LAPIC, then MSRs (TSC before TSC_DEADLINE, both after
//!   the LAPIC whose timer they program), then vCPU events (pending
//!   exceptions and interrupts, last, so nothing above clears them);
//! - VM: PIT, clock, then the three irqchips (PIC master, PIC slave,
//!   IO-APIC), before any vCPU is restored.

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, Msrs, kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip,
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use schema::snapshot::{KvmBlob, MsrEntry, VcpuState, VmState};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::arch::x86_64::msr::MSR_IA32_TSC;

/// TSC_DEADLINE programs the LAPIC timer against the TSC: restored last.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The x2APIC register window: covered by the LAPIC state, and unreadable
/// as MSRs unless the guest switched to x2APIC mode.
const X2APIC_MSRS: std::ops::Range<u32> = 0x800..0xc00;
/// Machine-check global control: listed by some hosts, refused by KVM.
const MSR_IA32_MCG_CTL: u32 = 0x17b;
/// MSRs per KVM_GET_MSRS / KVM_SET_MSRS call.
const MSR_CHUNK: usize = 64;

/// Errors saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("KVM_{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("snapshot field `{field}` is {got} bytes; KVM's structure is {want} bytes")]
    BlobSize {
        field: &'static str,
        got: usize,
        want: usize,
    },
    #[error(
        "snapshot CPUID has {0} bytes, not a whole number of at most {KVM_MAX_CPUID_ENTRIES} entries"
    )]
    Cpuid(usize),
    #[error("cannot build the MSR list: {0}")]
    MsrList(String),
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs; MSR {failed:#x} was refused")]
    MsrRefused {
        set: usize,
        wanted: usize,
        failed: u32,
    },
    #[error("snapshot has {0} irqchip states; a VM has 3 (PIC master, PIC slave, IO-APIC)")]
    IrqchipCount(usize),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    move |e| PersistError::Kvm(what, e)
}

fn blob<T: IntoBytes + Immutable>(v: &T) -> KvmBlob {
    v.as_bytes().to_vec()
}

fn unblob<T: FromBytes>(field: &'static str, b: &[u8]) -> Result<T, PersistError> {
    T::read_from_bytes(b).map_err(|_| PersistError::BlobSize {
        field,
        got: b.len(),
        want: std::mem::size_of::<T>(),
    })
}

/// The MSRs to save, from `KVM_GET_MSR_INDEX_LIST` (every MSR KVM can
/// save and restore on this host, as Firecracker uses): TSC first,
/// TSC_DEADLINE last, the x2APIC window and MCG_CTL left out.
pub fn msrs_to_save(index_list: &[u32]) -> Vec<u32> {
    let mut list: Vec<u32> = index_list
        .iter()
        .copied()
        .filter(|i| !X2APIC_MSRS.contains(i) && *i != MSR_IA32_MCG_CTL)
        .collect();
    list.sort_by_key(|&i| match i {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    list.dedup();
    list
}

/// Read `indices`. An MSR KVM lists but refuses to read on this vCPU
/// (KVM_GET_MSRS stops at the first) is left out: it keeps its reset value
/// on restore, as it had it here.
fn get_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<MsrEntry>, PersistError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| PersistError::MsrList(format!("{e:?}")))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("GET_MSRS"))?;
        out.extend(
            msrs.as_slice()[..read.min(chunk.len())]
                .iter()
                .map(|e| MsrEntry {
                    index: e.index,
                    data: e.data,
                }),
        );
        // Skip the one that stopped KVM (if any) and go on after it.
        let consumed = (read + 1).min(chunk.len());
        rest = &rest[consumed..];
    }
    Ok(out)
}

fn set_msrs(fd: &VcpuFd, entries: &[MsrEntry]) -> Result<(), PersistError> {
    for chunk in entries.chunks(MSR_CHUNK) {
        let kvm_entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|e| kvm_msr_entry {
                index: e.index,
                data: e.data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&kvm_entries)
            .map_err(|e| PersistError::MsrList(format!("{e:?}")))?;
        let set = fd.set_msrs(&msrs).map_err(kvm("SET_MSRS"))?;
        if set != chunk.len() {
            return Err(PersistError::MsrRefused {
                set,
                wanted: chunk.len(),
                failed: chunk.get(set).map_or(0, |e| e.index),
            });
        }
    }
    Ok(())
}

/// Save a paused vCPU's state (its last exit already completed).
pub fn save_vcpu(fd: &VcpuFd, index: u8, msr_list: &[u32]) -> Result<VcpuState, PersistError> {
    let mp_state = fd.get_mp_state().map_err(kvm("GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm("GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm("GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(kvm("GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(kvm("GET_XCRS"))?;
    let debug_regs = fd.get_debug_regs().map_err(kvm("GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm("GET_LAPIC"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("GET_CPUID2"))?;
    let cpuid_bytes = cpuid
        .as_slice()
        .iter()
        .flat_map(|e| e.as_bytes().iter().copied())
        .collect();
    let msrs = get_msrs(fd, msr_list)?;
    let vcpu_events = fd.get_vcpu_events().map_err(kvm("GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        index,
        cpuid: cpuid_bytes,
        msrs,
        regs: blob(&regs),
        sregs: blob(&sregs),
        xsave: blob(&xsave),
        xcrs: blob(&xcrs),
        debug_regs: blob(&debug_regs),
        lapic: blob(&lapic),
        mp_state: blob(&mp_state),
        vcpu_events: blob(&vcpu_events),
        tsc_khz,
    })
}

/// Restore a freshly created vCPU (never run) to `state`. Every blob is
/// size-checked before the first ioctl, so a bad state changes nothing.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), PersistError> {
    let entry = std::mem::size_of::<kvm_cpuid_entry2>();
    if !state.cpuid.len().is_multiple_of(entry) || state.cpuid.len() / entry > KVM_MAX_CPUID_ENTRIES
    {
        return Err(PersistError::Cpuid(state.cpuid.len()));
    }
    let entries = state
        .cpuid
        .chunks_exact(entry)
        .map(|c| unblob::<kvm_cpuid_entry2>("cpuid", c))
        .collect::<Result<Vec<_>, _>>()?;
    let cpuid =
        CpuId::from_entries(&entries).map_err(|_| PersistError::Cpuid(state.cpuid.len()))?;
    let mp_state: kvm_mp_state = unblob("mp_state", &state.mp_state)?;
    let regs: kvm_regs = unblob("regs", &state.regs)?;
    let sregs: kvm_sregs = unblob("sregs", &state.sregs)?;
    let xsave: kvm_xsave = unblob("xsave", &state.xsave)?;
    let xcrs: kvm_xcrs = unblob("xcrs", &state.xcrs)?;
    let debug_regs: kvm_debugregs = unblob("debug_regs", &state.debug_regs)?;
    let lapic: kvm_lapic_state = unblob("lapic", &state.lapic)?;
    let vcpu_events: kvm_vcpu_events = unblob("vcpu_events", &state.vcpu_events)?;

    if let Some(khz) = state.tsc_khz
        && fd.get_tsc_khz().ok() != Some(khz)
    {
        // The guest calibrated against this frequency; KVM scales the TSC
        // where the host's differs (and says so if it cannot).
        fd.set_tsc_khz(khz).map_err(kvm("SET_TSC_KHZ"))?;
    }
    fd.set_cpuid2(&cpuid).map_err(kvm("SET_CPUID2"))?;
    fd.set_mp_state(mp_state).map_err(kvm("SET_MP_STATE"))?;
    fd.set_regs(&regs).map_err(kvm("SET_REGS"))?;
    fd.set_sregs(&sregs).map_err(kvm("SET_SREGS"))?;
    // SAFETY: `xsave` is a whole `kvm_xsave` (4 KiB, its size checked by
    // unblob), which is what KVM_SET_XSAVE reads.
    unsafe { fd.set_xsave(&xsave) }.map_err(kvm("SET_XSAVE"))?;
    fd.set_xcrs(&xcrs).map_err(kvm("SET_XCRS"))?;
    fd.set_debug_regs(&debug_regs)
        .map_err(kvm("SET_DEBUGREGS"))?;
    fd.set_lapic(&lapic).map_err(kvm("SET_LAPIC"))?;
    set_msrs(fd, &state.msrs)?;
    fd.set_vcpu_events(&vcpu_events)
        .map_err(kvm("SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Save the VM's irqchips, PIT and clock (vCPUs paused).
pub fn save_vm(fd: &VmFd) -> Result<VmState, PersistError> {
    let mut irqchips = Vec::with_capacity(3);
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        fd.get_irqchip(&mut chip).map_err(kvm("GET_IRQCHIP"))?;
        irqchips.push(blob(&chip));
    }
    let pit = fd.get_pit2().map_err(kvm("GET_PIT2"))?;
    let mut clock = fd.get_clock().map_err(kvm("GET_CLOCK"))?;
    // Restore the clock's value as it was, not adjusted by wall time
    // (KVM_CLOCK_REALTIME) or tied to this host's TSC.
    clock.flags = 0;
    Ok(VmState {
        irqchips,
        pit: blob(&pit),
        clock: blob(&clock),
    })
}

/// Restore a fresh VM (irqchip and PIT created, no vCPU yet) to `state`.
pub fn restore_vm(fd: &VmFd, state: &VmState) -> Result<(), PersistError> {
    if state.irqchips.len() != 3 {
        return Err(PersistError::IrqchipCount(state.irqchips.len()));
    }
    let chips = state
        .irqchips
        .iter()
        .map(|b| unblob::<kvm_irqchip>("irqchip", b))
        .collect::<Result<Vec<_>, _>>()?;
    let pit: kvm_pit_state2 = unblob("pit", &state.pit)?;
    let mut clock: kvm_clock_data = unblob("clock", &state.clock)?;
    clock.flags = 0;
    for (chip, want) in chips.iter().zip([
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ]) {
        if chip.chip_id != want {
            return Err(PersistError::IrqchipCount(state.irqchips.len()));
        }
    }
    fd.set_pit2(&pit).map_err(kvm("SET_PIT2"))?;
    fd.set_clock(&clock).map_err(kvm("SET_CLOCK"))?;
    for chip in &chips {
        fd.set_irqchip(chip).map_err(kvm("SET_IRQCHIP"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_list_puts_tsc_first_and_deadline_last_and_drops_x2apic() {
        let list = msrs_to_save(&[
            0x174,
            MSR_IA32_TSC_DEADLINE,
            0x802,
            MSR_IA32_TSC,
            0x17b,
            0x174,
        ]);
        assert_eq!(list, vec![MSR_IA32_TSC, 0x174, MSR_IA32_TSC_DEADLINE]);
    }

    #[test]
    fn blobs_of_the_wrong_size_are_refused() {
        let regs = kvm_regs {
            rip: 0x1234,
            ..Default::default()
        };
        let b = blob(&regs);
        assert_eq!(b.len(), std::mem::size_of::<kvm_regs>());
        assert_eq!(unblob::<kvm_regs>("regs", &b).expect("regs").rip, 0x1234);
        let err = unblob::<kvm_regs>("regs", &b[1..]).expect_err("short");
        assert!(err.to_string().contains("`regs`"), "{err}");
        let state = VmState {
            irqchips: vec![],
            pit: vec![],
            clock: vec![],
        };
        let kvm = kvm_ioctls::Kvm::new();
        if let Ok(kvm) = kvm
            && let Ok(vm) = kvm.create_vm()
        {
            assert!(matches!(
                restore_vm(&vm, &state),
                Err(PersistError::IrqchipCount(0))
            ));
        }
    }
}
