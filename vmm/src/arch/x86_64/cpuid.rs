//! Filtering `KVM_GET_SUPPORTED_CPUID` into what each vCPU reports.
//!
//! KVM's supported list is the host's features that KVM can virtualise; the
//! VMM must still fill in the per-vCPU facts (APIC id, how many logical CPUs
//! share a package and a cache) so the guest's topology matches the vCPUs
//! and the MP table, and set the hypervisor bit so the guest uses
//! paravirtual clocks and skips hardware it would otherwise probe for.
//!
//! The topology is the simplest one: one package, one thread per core, one
//! core per vCPU. Leaves are adjusted as Firecracker's "normalize" step
//! does for Intel and AMD (leaves 0x1, 0x4, 0xb, 0x1f; the PMU leaf 0xa is
//! cleared because we do not virtualise performance counters).
//!
//! Note (nested PVM hosts): `KVM_SET_CPUID2` was measured not to hide host
//! features from the guest there; on plain KVM it does.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 0x1 ECX bit 31: running under a hypervisor.
pub const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x1 ECX bit 24: the local APIC timer has a TSC-deadline mode.
pub const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 0x1 EDX bit 28: the package has more than one logical CPU.
pub const EDX_HTT: u32 = 1 << 28;
/// KVM's paravirtual leaves start here ("KVMKVMKVM\0\0\0").
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;

/// What one vCPU's CPUID must say about itself.
#[derive(Debug, Clone, Copy)]
pub struct VcpuTopology {
    /// The vCPU's index, which is also its APIC id.
    pub cpu_index: u8,
    /// Number of vCPUs in the VM.
    pub cpu_count: u8,
}

/// Bits needed to hold `n` distinct ids (ceil(log2(n))).
fn id_bits(n: u8) -> u32 {
    if n <= 1 {
        0
    } else {
        u32::BITS - u32::from(n - 1).leading_zeros()
    }
}

/// Offer the TSC-deadline timer (leaf 0x1). KVM emulates it with its
/// in-kernel local APIC but reports it as a capability
/// (`KVM_CAP_TSC_DEADLINE_TIMER`), not in its supported CPUID, so a VMM
/// sets the bit itself (QEMU and Firecracker do). It matters beyond speed:
/// with TSC-deadline and ARAT (leaf 0x6, which KVM does report) a Linux
/// guest needs no PIT — it stops it at boot and never calibrates against
/// it — so the in-kernel PIT and its timer thread stay idle.
pub fn offer_tsc_deadline(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut().filter(|e| e.function == 0x1) {
        e.ecx |= ECX_TSC_DEADLINE;
    }
}

/// Rewrite `entries` (from `KVM_GET_SUPPORTED_CPUID`) in place for one vCPU.
pub fn filter_cpuid(entries: &mut [kvm_cpuid_entry2], topo: VcpuTopology) {
    let apic_id = u32::from(topo.cpu_index);
    let count = u32::from(topo.cpu_count);
    let core_bits = id_bits(topo.cpu_count);
    let amd = is_amd(entries);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical CPUs per
                // package, EBX[15:8] CLFLUSH line size in 8-byte units.
                e.ebx = (apic_id << 24) | (count << 16) | (8 << 8);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            0x4 => {
                // Deterministic cache parameters (Intel). EAX[25:14]: logical
                // CPUs sharing this cache - 1; EAX[31:26]: cores per package - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = match level {
                    1 | 2 => 0, // one thread per core: L1/L2 are private
                    _ => count - 1,
                };
                e.eax &= 0x3fff;
                if e.eax & 0x1f != 0 {
                    e.eax |= (sharing & 0xfff) << 14;
                    e.eax |= ((count - 1) & 0x3f) << 26;
                }
            }
            0xa => {
                // Architectural PMU: not offered.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (1 thread), level 1 = core.
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0008 if amd => {
                // AMD: ECX[7:0] cores per package - 1, ECX[15:12] APIC id size.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | ((count - 1) & 0xff);
            }
            _ => {}
        }
    }
}

/// Whether leaf 0's vendor is AMD (or Hygon, its licensee): leaf
/// 0x8000_0008 ECX is AMD's core count and reserved on Intel.
fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries.iter().any(|e| {
        let mut vendor = [0u8; 12];
        vendor[0..4].copy_from_slice(&e.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&e.edx.to_le_bytes());
        vendor[8..12].copy_from_slice(&e.ecx.to_le_bytes());
        e.function == 0 && (&vendor == b"AuthenticAMD" || &vendor == b"HygonGenuine")
    })
}

/// Whether the list carries KVM's paravirtual signature leaf (it does on
/// every KVM that supports kvmclock; the guest needs it for kvmclock).
pub fn has_kvm_signature(entries: &[kvm_cpuid_entry2]) -> bool {
    entries.iter().any(|e| {
        e.function == KVM_CPUID_SIGNATURE
            && e.ebx == u32::from_le_bytes(*b"KVMK")
            && e.ecx == u32::from_le_bytes(*b"VMKV")
            && e.edx == u32::from_le_bytes(*b"M\0\0\0")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ..Default::default()
        }
    }

    #[test]
    fn tsc_deadline_is_offered_in_leaf_1_only() {
        let mut e = vec![entry(0x1, 0, 0), entry(0x6, 0, 4)];
        offer_tsc_deadline(&mut e);
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(e[1].ecx, 0);
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut e = vec![entry(1, 0, 0x906ed)];
        e[0].ebx = 0xffff_ffff;
        filter_cpuid(
            &mut e,
            VcpuTopology {
                cpu_index: 3,
                cpu_count: 4,
            },
        );
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[0].eax, 0x906ed, "signature untouched");

        let mut one = vec![entry(1, 0, 0)];
        one[0].edx = EDX_HTT;
        filter_cpuid(
            &mut one,
            VcpuTopology {
                cpu_index: 0,
                cpu_count: 1,
            },
        );
        assert_eq!(one[0].edx & EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_levels() {
        let mut e = vec![entry(0xb, 0, 9), entry(0xb, 1, 9), entry(0xb, 2, 9)];
        filter_cpuid(
            &mut e,
            VcpuTopology {
                cpu_index: 2,
                cpu_count: 3,
            },
        );
        assert_eq!((e[0].eax, e[0].ebx, e[0].ecx, e[0].edx), (0, 1, 0x100, 2));
        assert_eq!((e[1].eax, e[1].ebx, e[1].ecx, e[1].edx), (2, 3, 0x201, 2));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx), (0, 0, 2));
    }

    #[test]
    fn cache_leaf_sharing() {
        // L1d (type 1, level 1) and L3 (type 3, level 3).
        let mut e = vec![
            entry(4, 0, (1 << 5) | 1 | (0x3f << 26)),
            entry(4, 3, (3 << 5) | 3),
        ];
        filter_cpuid(
            &mut e,
            VcpuTopology {
                cpu_index: 0,
                cpu_count: 4,
            },
        );
        assert_eq!((e[0].eax >> 14) & 0xfff, 0);
        assert_eq!(e[0].eax >> 26, 3);
        assert_eq!((e[1].eax >> 14) & 0xfff, 3);
    }

    #[test]
    fn amd_core_count_leaf_only_on_amd() {
        let vendor = |v: &[u8; 12]| {
            let w = |i: usize| u32::from_le_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
            kvm_cpuid_entry2 {
                function: 0,
                ebx: w(0),
                edx: w(4),
                ecx: w(8),
                ..Default::default()
            }
        };
        let topo = VcpuTopology {
            cpu_index: 0,
            cpu_count: 4,
        };
        let mut amd = vec![vendor(b"AuthenticAMD"), entry(0x8000_0008, 0, 0x3030)];
        filter_cpuid(&mut amd, topo);
        assert_eq!(amd[1].ecx, (2 << 12) | 3);
        let mut intel = vec![vendor(b"GenuineIntel"), entry(0x8000_0008, 0, 0x3030)];
        filter_cpuid(&mut intel, topo);
        assert_eq!(intel[1].ecx, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 16, 17].map(id_bits), [0, 1, 2, 2, 3, 4, 5]);
    }

    #[test]
    fn kvm_signature_detected() {
        let mut e = entry(KVM_CPUID_SIGNATURE, 0, 0x4000_0001);
        e.ebx = 0x4b4d_564b;
        e.ecx = 0x564b_4d56;
        e.edx = 0x4d;
        assert!(has_kvm_signature(&[e]));
        assert!(!has_kvm_signature(&[entry(1, 0, 0)]));
    }
}
