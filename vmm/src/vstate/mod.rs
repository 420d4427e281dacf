//! KVM state of a microVM: guest memory, the VM (memory slots, irqchip,
//! PIT) and its vCPUs (registers, CPUID, MSRs, and the run loop).

pub mod exit;
pub mod memory;
pub mod persist;
pub mod vcpu;
pub mod vm;
