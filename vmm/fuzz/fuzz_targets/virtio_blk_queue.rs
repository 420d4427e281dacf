//! A malicious guest against virtio-blk: guest memory, the queue's layout
//! and its indices all come from the input, and the device serves every
//! chain the guest offers. It must neither panic, nor hang, nor touch
//! memory outside the guest's (the disk is a 64 KiB in-memory one).
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::block::MemBackend;
use vmm::devices::virtio::block::device::{BlockCounters, DiskContext, process_queue};
use vmm::vstate::memory::GuestMemoryMmap;

/// Guest memory: small, so that random addresses often land in it.
const MEM: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let (head, body) = data.split_at(16);
    let word = |i: usize| u64::from(u16::from_le_bytes([head[i], head[i + 1]]));
    // Queue size: a power of two up to 64 (a transport accepts up to 256; smaller keeps runs fast).
    let size = 1u16 << (head[0] % 7);
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let _ = mem.write_slice(&body[..body.len().min(MEM)], GuestAddress(0));
    let Ok(mut queue) = Queue::new(size) else {
        return;
    };
    queue.set_size(size);
    // Addresses anywhere in (or just past) guest memory, any alignment the
    // guest chooses: the queue and the device must cope.
    queue.set_desc_table_address(Some((word(2) * 2) as u32), Some(0));
    queue.set_avail_ring_address(Some((word(4) * 2) as u32), Some(0));
    queue.set_used_ring_address(Some((word(6) * 2) as u32), Some(0));
    queue.set_next_avail(u16::from_le_bytes([head[8], head[9]]));
    queue.set_ready(true);
    let mut backend = MemBackend(vec![0u8; 64 << 10]);
    let id = [b'f'; 20];
    let mut counters = BlockCounters::default();
    let mut disk = DiskContext {
        backend: &mut backend,
        id: &id,
        read_only: head[10] & 1 == 1,
        counters: &mut counters,
    };
    // Twice: the second pass sees the used ring the first one wrote.
    for _ in 0..2 {
        let _ = process_queue(&mem, &mut queue, &mut disk);
    }
});
