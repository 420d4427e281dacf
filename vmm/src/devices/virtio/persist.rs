//! Snapshot state shared by every virtio device: its queues. The state
//! types live in `schema::snapshot` (the versioned state file format).

use virtio_queue::{Queue, QueueState, QueueT};

use crate::vstate::memory::GuestMemoryMmap;

pub use schema::snapshot::QueueSnapshot;

/// A queue's state as the snapshot keeps it.
pub fn queue_snapshot(s: QueueState) -> QueueSnapshot {
    QueueSnapshot {
        max_size: s.max_size,
        size: s.size,
        ready: s.ready,
        desc_table: s.desc_table,
        avail_ring: s.avail_ring,
        used_ring: s.used_ring,
        next_avail: s.next_avail,
        next_used: s.next_used,
        event_idx_enabled: s.event_idx_enabled,
    }
}

fn queue_state(s: &QueueSnapshot) -> QueueState {
    QueueState {
        max_size: s.max_size,
        size: s.size,
        ready: s.ready,
        desc_table: s.desc_table,
        avail_ring: s.avail_ring,
        used_ring: s.used_ring,
        next_avail: s.next_avail,
        next_used: s.next_used,
        event_idx_enabled: s.event_idx_enabled,
    }
}

/// Rebuild `queues` from their snapshots. A snapshot is validated as if the
/// guest had written it (it came from a file): `virtio_queue` checks sizes
/// and alignment, and an activated device's rings must lie in guest memory.
/// On error, the index of the bad queue and why.
pub fn restore_queues(
    queues: &mut [Queue],
    saved: &[QueueSnapshot],
    mem: &GuestMemoryMmap,
    activated: bool,
) -> Result<(), (usize, String)> {
    for (index, (q, s)) in queues.iter_mut().zip(saved).enumerate() {
        let restored = Queue::try_from(queue_state(s)).map_err(|e| (index, e.to_string()))?;
        if activated && !restored.is_valid(mem) {
            return Err((index, "not in guest memory".into()));
        }
        *q = restored;
    }
    Ok(())
}
