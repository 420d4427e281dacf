//! Snapshot state shared by every virtio device: its queues.

use virtio_queue::{Queue, QueueState, QueueT};

use crate::vstate::memory::GuestMemoryMmap;

/// One split queue (the fields of `virtio_queue::QueueState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
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
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        Self {
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
        let restored = Queue::try_from(QueueState::from(*s)).map_err(|e| (index, e.to_string()))?;
        if activated && !restored.is_valid(mem) {
            return Err((index, "not in guest memory".into()));
        }
        *q = restored;
    }
    Ok(())
}
