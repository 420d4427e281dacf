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
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{
    MmioSlot, MmioSlotAllocator, MmioTransport, SharedVirtioDevice, SlotError,
};
use crate::devices::virtio::vsock::Vsock;
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

/// A virtio device as the snapshot code sees it: its concrete type, for
/// saving its state.
#[derive(Clone)]
pub enum PersistentDevice {
    Block(Arc<Mutex<Block>>),
    Vsock(Arc<Mutex<Vsock>>),
    /// A device without snapshot support: a VM holding one cannot be
    /// snapshotted (refused, never half-saved).
    Other,
}

/// A virtio device on the MMIO bus.
#[derive(Clone)]
pub struct VirtioEntry {
    pub slot: MmioSlot,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub device: PersistentDevice,
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
    /// The virtio devices in slot order (for snapshots).
    pub virtio: Vec<VirtioEntry>,
    /// The snapshot this VM's dirty-page log is relative to: the one it was
    /// restored from or last snapshotted to. A diff snapshot needs one.
    pub snapshot_base: Mutex<Option<schema::snapshot::BaseRef>>,
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
        Self::with_memory(kvm, config, memory, console, None)
    }

    /// [`Machine::new`] over guest memory the caller mapped (a snapshot's),
    /// with the serial port in `serial_state` when given.
    pub fn with_memory(
        kvm: &Kvm,
        config: MachineConfig,
        memory: GuestMemoryMmap,
        console: serial::SerialOut,
        serial_state: Option<&schema::snapshot::SerialState>,
    ) -> Result<Self, BuildError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(BuildError::VcpuCount(config.vcpus));
        }
        if config.mem_size < MIN_MEM_SIZE || !config.mem_size.is_multiple_of(4096) {
            return Err(BuildError::MemSize(config.mem_size));
        }
        let regions = layout::arch_memory_regions(config.mem_size);
        let vm = Vm::new(kvm)?;
        vm.register_memory(&memory, config.track_dirty_pages)?;
        vm.setup_irqchip()?;

        let exit = Arc::new(ExitRequest::new().map_err(BuildError::Device)?);
        let serial = match serial_state {
            None => SerialDevice::new(console),
            Some(state) => SerialDevice::from_state(state, console),
        }
        .map_err(BuildError::Device)?;
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
            virtio: Vec::new(),
            snapshot_base: Mutex::new(None),
        })
    }

    /// Put a virtio device on the MMIO bus behind a virtio-mmio transport:
    /// a window and IRQ from the MMIO gap, its interrupt registered as an
    /// irqfd and each queue's notification as an ioeventfd (served by
    /// [`Machine::event_loop`]). The slot's [`MmioSlot::cmdline_fragment`] must go on the
    /// kernel command line for Linux to find the device. Devices must be
    /// added before [`Machine::create_vcpus`] (which clones the bus).
    ///
    /// A device added this way cannot be snapshotted; use
    /// [`Machine::add_block_device`] / [`Machine::add_vsock_device`].
    pub fn add_virtio_mmio_device(
        &mut self,
        device: SharedVirtioDevice,
    ) -> Result<MmioSlot, BuildError> {
        self.add_virtio(device, PersistentDevice::Other, None)
    }

    /// Add a virtio-blk device (see [`Machine::add_virtio_mmio_device`]).
    pub fn add_block_device(&mut self, block: Arc<Mutex<Block>>) -> Result<MmioSlot, BuildError> {
        self.add_virtio(block.clone(), PersistentDevice::Block(block), None)
    }

    /// Add a virtio-vsock device (see [`Machine::add_virtio_mmio_device`]).
    pub fn add_vsock_device(&mut self, vsock: Arc<Mutex<Vsock>>) -> Result<MmioSlot, BuildError> {
        self.add_virtio(vsock.clone(), PersistentDevice::Vsock(vsock), None)
    }

    /// Put `device` on the next slot, behind a new transport or a restored
    /// one (`transport_state`).
    pub(crate) fn add_virtio(
        &mut self,
        device: SharedVirtioDevice,
        persistent: PersistentDevice,
        transport_state: Option<&schema::snapshot::MmioTransportState>,
    ) -> Result<MmioSlot, BuildError> {
        let slot = self.mmio_slots.allocate()?;
        {
            let d = device.lock().unwrap_or_else(|e| e.into_inner());
            self.vm.register_irqfd(d.interrupt().event_fd(), slot.irq)?;
            // QueueNotify writes go to the event loop, not to a vCPU exit.
            let notify = slot.base + crate::devices::virtio::mmio::regs::QUEUE_NOTIFY;
            for (index, evt) in d.queue_events().iter().enumerate() {
                self.vm.register_ioevent(evt, notify, index as u32)?;
            }
        }
        let transport = match transport_state {
            None => MmioTransport::new(self.memory.clone(), device),
            Some(state) => MmioTransport::restore(self.memory.clone(), device, state),
        };
        let transport = Arc::new(Mutex::new(transport));
        self.mmio_bus
            .insert(transport.clone(), slot.base, slot.len)?;
        self.virtio.push(VirtioEntry {
            slot,
            transport,
            device: persistent,
        });
        Ok(slot)
    }

    /// The device event loop for this machine's virtio devices (see
    /// [`crate::event_loop`]); it must run for any device to do work.
    pub fn event_loop(
        &self,
    ) -> Result<crate::event_loop::EventLoop, crate::event_loop::EventLoopError> {
        crate::event_loop::EventLoop::new(self.virtio.iter().map(|e| {
            e.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .device()
                .clone()
        }))
    }

    /// Load a vmlinux and write the zero page, command line and MP table.
    pub fn load_kernel(&self, image: &[u8], cmdline: &Cmdline) -> Result<LoadedKernel, BuildError> {
        let kernel = loader::load_kernel(&self.memory, image)?;
        boot_params::write_boot_params(&self.memory, &self.regions, cmdline)?;
        mptable::setup_mptable(&self.memory, self.config.vcpus)?;
        Ok(kernel)
    }

    /// Create every vCPU in a saved state (instead of a boot state): the
    /// restore counterpart of [`Machine::create_vcpus`].
    pub fn create_vcpus_from(
        &self,
        states: &[schema::snapshot::VcpuState],
    ) -> Result<Vec<Vcpu>, BuildError> {
        if states.len() != usize::from(self.config.vcpus) {
            return Err(BuildError::VcpuCount(states.len().min(255) as u8));
        }
        states
            .iter()
            .enumerate()
            .map(|(i, state)| {
                let index = i as u8;
                if state.index != index {
                    return Err(BuildError::VcpuCount(state.index));
                }
                let vcpu = Vcpu::new(
                    &self.vm,
                    index,
                    self.pio_bus.clone(),
                    self.mmio_bus.clone(),
                    self.exit.clone(),
                )?;
                vcpu.restore_state(state)?;
                Ok(vcpu)
            })
            .collect()
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
