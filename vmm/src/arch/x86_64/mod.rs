//! x86-64 direct kernel entry, as Firecracker does it: no firmware, no
//! real-mode setup code. The VMM builds page tables, a GDT, the zero page
//! (`boot_params`) and an MP table, and starts the boot vCPU in long mode at
//! the kernel's ELF entry point with RSI pointing at the zero page.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
