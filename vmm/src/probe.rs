//! Can this host's KVM run a guest kernel? The question behind
//! `--runtime auto`.
//!
//! Opening `/dev/kvm` is not enough: nested PVM hosts (`kvm_pvm`, such as
//! our development machines) run guest *user* mode natively but emulate
//! guest *kernel* mode one instruction at a time, thousands of times slower,
//! and a Linux kernel never finishes booting there. So the probe runs the
//! same two-instruction loop (`inc rcx; jmp`) for a fixed time at CPL0 and at
//! CPL3 in a tiny VM and compares how far each got. On plain KVM both run at
//! hardware speed; under emulation CPL0 falls behind by orders of magnitude.
//! The whole probe is bounded (a few hundred ms): it never hangs.

use std::io;
use std::time::Duration;

use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::regs::EntryMode;
use crate::builder::{Machine, MachineConfig};

/// How long each loop runs.
const SPIN_TIME: Duration = Duration::from_millis(50);
/// CPL0 must reach at least this fraction of the CPL3 rate to count as native.
const NATIVE_RATIO: u64 = 10;
/// Where the loop is placed in guest memory.
const LOOP_ADDR: u64 = 0x10_0000;

/// The verdict, with the measurement and a sentence a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmProbe {
    /// KVM runs guest kernel mode at native speed: the microvm runtime can work.
    pub native: bool,
    /// Loop iterations in [`SPIN_TIME`] at CPL0 and CPL3 (0 if not measured).
    pub cpl0_iterations: u64,
    pub cpl3_iterations: u64,
    pub reason: String,
}

/// Probe `/dev/kvm` (see the module docs).
pub fn probe_kvm() -> KvmProbe {
    let unavailable = |reason: String| KvmProbe {
        native: false,
        cpl0_iterations: 0,
        cpl3_iterations: 0,
        reason,
    };
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            return unavailable(format!(
                "cannot open /dev/kvm ({e}): enable virtualization (VT-x/AMD-V, or nested virtualization on a cloud VM) and load kvm_intel or kvm_amd"
            ));
        }
    };
    let rates = spin_iterations(&kvm, EntryMode::Kernel)
        .and_then(|cpl0| Ok((cpl0, spin_iterations(&kvm, EntryMode::User)?)));
    let (cpl0, cpl3) = match rates {
        Ok(r) => r,
        Err(e) => return unavailable(format!("a tiny KVM guest failed to run: {e}")),
    };
    let native = cpl3 > 0 && cpl0.saturating_mul(NATIVE_RATIO) >= cpl3;
    let reason = if native {
        format!(
            "KVM runs guest kernel mode natively ({cpl0} kernel-mode vs {cpl3} user-mode loop iterations in {} ms)",
            SPIN_TIME.as_millis()
        )
    } else {
        format!(
            "KVM emulates guest kernel mode (nested PVM?): {cpl0} kernel-mode vs {cpl3} user-mode loop iterations in {} ms, so a Linux guest cannot boot here",
            SPIN_TIME.as_millis()
        )
    };
    KvmProbe {
        native,
        cpl0_iterations: cpl0,
        cpl3_iterations: cpl3,
        reason,
    }
}

/// Iterations of `inc rcx; jmp $-5` in [`SPIN_TIME`] at the given privilege level.
fn spin_iterations(kvm: &Kvm, mode: EntryMode) -> Result<u64, String> {
    let machine = Machine::new(kvm, MachineConfig::new(1, 8 << 20), Box::new(io::sink()))
        .map_err(|e| e.to_string())?;
    machine
        .memory
        .write_slice(&[0x48, 0xff, 0xc1, 0xeb, 0xfb], GuestAddress(LOOP_ADDR))
        .map_err(|e| e.to_string())?;
    let mut vcpus = machine
        .create_vcpus(GuestAddress(LOOP_ADDR), mode)
        .map_err(|e| e.to_string())?;
    let vcpu = vcpus.pop().ok_or("no vCPU was created")?;
    let handle = vcpu.start().map_err(|e| e.to_string())?;
    std::thread::sleep(SPIN_TIME);
    let (_, vcpu) = handle
        .stop(Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    Ok(vcpu.fd().get_regs().map_err(|e| e.to_string())?.rcx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_a_verdict_with_a_reason_quickly() {
        let started = std::time::Instant::now();
        let probe = probe_kvm();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the probe took {:?}",
            started.elapsed()
        );
        assert!(!probe.reason.is_empty());
        eprintln!("kvm probe: native={} ({})", probe.native, probe.reason);
        if std::path::Path::new("/dev/kvm").exists() {
            assert!(probe.cpl3_iterations > 0, "{probe:?}");
        } else {
            assert!(!probe.native);
            assert!(probe.reason.contains("/dev/kvm"));
        }
    }
}
