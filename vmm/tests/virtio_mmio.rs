//! virtio-mmio devices on a real KVM machine: slots from the MMIO gap,
//! irqfds registered, the transport answering on the MMIO bus, and the
//! command-line fragments Linux needs. (Without /dev/kvm: `SKIP`.)

use std::io;
use std::sync::{Arc, Mutex};

use kvm_ioctls::Kvm;
use vmm::arch::x86_64::layout;
use vmm::builder::{Machine, MachineConfig};
use vmm::devices::virtio::block::{Block, MemBackend};
use vmm::devices::virtio::mmio::{MMIO_MAGIC_VALUE, MMIO_SLOT_LEN, regs};

#[test]
fn block_devices_get_slots_irqfds_and_cmdline_fragments() {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!(
                "SKIP block_devices_get_slots_irqfds_and_cmdline_fragments: cannot open /dev/kvm ({e})"
            );
            return;
        }
    };
    let mut machine =
        Machine::new(&kvm, MachineConfig::new(1, 8 << 20), Box::new(io::sink())).expect("machine");
    let mut fragments = Vec::new();
    for i in 0..2u64 {
        let disk = MemBackend(vec![0; 1 << 20]);
        let block = Block::new("disk", Box::new(disk), i == 1).expect("block");
        let slot = machine
            .add_virtio_mmio_device(Arc::new(Mutex::new(block)))
            .expect("add device");
        assert_eq!(slot.base, layout::MMIO_MEM_START + i * MMIO_SLOT_LEN);
        let mut magic = [0u8; 4];
        assert!(
            machine
                .mmio_bus
                .read(slot.base + regs::MAGIC_VALUE, &mut magic)
        );
        assert_eq!(u32::from_le_bytes(magic), MMIO_MAGIC_VALUE);
        let mut id = [0u8; 4];
        assert!(machine.mmio_bus.read(slot.base + regs::DEVICE_ID, &mut id));
        assert_eq!(u32::from_le_bytes(id), 2, "virtio-blk");
        let mut cap = [0u8; 8];
        assert!(machine.mmio_bus.read(slot.base + regs::CONFIG, &mut cap));
        assert_eq!(u64::from_le_bytes(cap), 2048, "sectors");
        fragments.push(slot.cmdline_fragment());
    }
    assert_eq!(
        fragments,
        [
            "virtio_mmio.device=4K@0xd0000000:5",
            "virtio_mmio.device=4K@0xd0001000:6"
        ]
    );
}
