//! Assembling a microVM: guest memory, the KVM VM with its irqchip, the
//! legacy devices on the port-IO bus, the boot structures, and the vCPUs.
//!
//! [`Machine`] is what `sandmesh vmm` (to come) and the tiny-guest tests
//! build on. Its order of operations is the one KVM requires: memory slots
//! and the irqchip before any vCPU, irqfds after the irqchip.

use std::sync::{Arc, Mutex};

use kvm_ioctls::Kvm;
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;

use crate::arch::x86_64::regs::EntryMode;
use crate::arch::x86_64::{boot_params, layout, mptable};
use crate::devices::legacy::{I8042, SerialDevice, i8042, serial};
use crate::devices::virtio::mmio::{
    MmioSlot, MmioSlotAllocator, MmioTransport, SharedVirtioDevice, SlotError,
};
use crate::devices::{Bus, BusError};
use crate::loader::{self, LoadedKernel};
use crate::vstate::exit::ExitRequest;
use crate::vstate::memory::{self, GuestMemoryMmap, MemoryBacking};
use crate::vstate::vcpu::{BootConfig, Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// Most vCPUs a microVM may have.
pub const MAX_VCPUS: u8 = 16;
/// Least guest memory: enough for the boot structures below 1 MiB and the
/// 2 MiB page a tiny guest runs in. (The `sandmesh vmm` CLI asks for at
/// least 128 MiB for a Linux guest.)
pub const MIN_MEM_SIZE: u64 = 4 << 20;

/// The shape of a microVM.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub vcpus: u8,
    pub mem_size: u64,
    pub backing: MemoryBacking,
    /// Have KVM log guest writes (for diff snapshots).
    pub track_dirty_pages: bool,
}

impl MachineConfig {
    pub fn new(vcpus: u8, mem_size: u64) -> Self {
        Self {
            vcpus,
            mem_size,
            backing: MemoryBacking::Anonymous,
            track_dirty_pages: false,
        }
    }
}

/// Errors building a microVM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("a microVM has 1..={MAX_VCPUS} vCPUs, not {0}")]
    VcpuCount(u8),
    #[error("guest memory must be a multiple of 4 KiB and at least {MIN_MEM_SIZE} bytes, not {0}")]
    MemSize(u64),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot create a device: {0}")]
    Device(std::io::Error),
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    MmioSlot(#[from] SlotError),
    #[error(transparent)]
    Kernel(#[from] loader::LoaderError),
    #[error(transparent)]
    BootParams(#[from] boot_params::BootParamsError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
}

/// A microVM's memory, VM, devices and buses; vCPUs are created from it.
pub struct Machine {
    // Field order is drop order: the VM goes before the memory it maps.
    pub vm: Vm,
    pub memory: GuestMemoryMmap,
    /// Guest RAM as `(start, size)`, for the e820 map.
    pub regions: Vec<(u64, u64)>,
    pub config: MachineConfig,
    pub pio_bus: Bus,
    pub mmio_bus: Bus,
    pub exit: Arc<ExitRequest>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Windows and IRQs for virtio-mmio devices.
    pub mmio_slots: MmioSlotAllocator,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("config", &self.config)
            .field("regions", &self.regions)
            .field("pio_bus", &self.pio_bus)
            .field("mmio_bus", &self.mmio_bus)
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// Create memory, the VM with its irqchip and PIT, the serial console
    /// (writing to `console`) and the i8042.
    pub fn new(
        kvm: &Kvm,
        config: MachineConfig,
        console: serial::SerialOut,
    ) -> Result<Self, BuildError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(BuildError::VcpuCount(config.vcpus));
        }
        if config.mem_size < MIN_MEM_SIZE || !config.mem_size.is_multiple_of(4096) {
            return Err(BuildError::MemSize(config.mem_size));
        }
        let regions = layout::arch_memory_regions(config.mem_size);
        let memory = memory::create_guest_memory(&regions, &config.backing)?;
        let vm = Vm::new(kvm)?;
        vm.register_memory(&memory, config.track_dirty_pages)?;
        vm.setup_irqchip()?;

        let exit = Arc::new(ExitRequest::new().map_err(BuildError::Device)?);
        let serial = SerialDevice::new(console).map_err(BuildError::Device)?;
        vm.register_irqfd(serial.interrupt_evt(), serial::COM1_GSI)?;
        let serial = Arc::new(Mutex::new(serial));
        let mut pio_bus = Bus::new();
        pio_bus.insert(serial.clone(), serial::COM1_PORT, serial::COM1_PORT_LEN)?;
        pio_bus.insert(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            i8042::I8042_PORT,
            i8042::I8042_PORT_LEN,
        )?;

        Ok(Self {
            vm,
            memory,
            regions,
            config,
            pio_bus,
            mmio_bus: Bus::new(),
            exit,
            serial,
            mmio_slots: MmioSlotAllocator::new(),
        })
    }

    /// Put a virtio device on the MMIO bus behind a virtio-mmio transport:
    /// a window and IRQ from the MMIO gap, its interrupt registered as an
    /// irqfd. The slot's [`MmioSlot::cmdline_fragment`] must go on the
    /// kernel command line for Linux to find the device. Devices must be
    /// added before [`Machine::create_vcpus`] (which clones the bus).
    pub fn add_virtio_mmio_device(
        &mut self,
        device: SharedVirtioDevice,
    ) -> Result<MmioSlot, BuildError> {
        let slot = self.mmio_slots.allocate()?;
        {
            let d = device.lock().unwrap_or_else(|e| e.into_inner());
            self.vm.register_irqfd(d.interrupt().event_fd(), slot.irq)?;
        }
        let transport = MmioTransport::new(self.memory.clone(), device);
        self.mmio_bus
            .insert(Arc::new(Mutex::new(transport)), slot.base, slot.len)?;
        Ok(slot)
    }

    /// Load a vmlinux and write the zero page, command line and MP table.
    pub fn load_kernel(&self, image: &[u8], cmdline: &Cmdline) -> Result<LoadedKernel, BuildError> {
        let kernel = loader::load_kernel(&self.memory, image)?;
        boot_params::write_boot_params(&self.memory, &self.regions, cmdline)?;
        mptable::setup_mptable(&self.memory, self.config.vcpus)?;
        Ok(kernel)
    }

    /// Create and configure every vCPU to enter at `entry` in `mode`.
    /// The buses are cloned into each vCPU, so devices must be inserted
    /// before this.
    pub fn create_vcpus(
        &self,
        entry: GuestAddress,
        mode: EntryMode,
    ) -> Result<Vec<Vcpu>, BuildError> {
        let boot = BootConfig { entry, mode };
        (0..self.config.vcpus)
            .map(|i| {
                let vcpu = Vcpu::new(
                    &self.vm,
                    i,
                    self.pio_bus.clone(),
                    self.mmio_bus.clone(),
                    self.exit.clone(),
                )?;
                vcpu.configure(&self.vm, &self.memory, self.config.vcpus, boot)?;
                Ok(vcpu)
            })
            .collect()
    }
}
