//! The snapshot state of a virtio-blk device.
//!
//! Plain serializable data: the negotiated features, each queue's
//! addresses and ring indices, whether the device was activated, the
//! pending interrupt bits, and where its disk's overlay lives. Guest
//! memory and the disk itself are not part of it: the restorer maps the
//! memory snapshot and reopens the overlay (`CowDisk::open` on the recorded
//! paths) and passes both to [`Block::restore`]. Everything here is
//! validated on restore as if it came from the guest (it came from a file).

use virtio_queue::{Queue, QueueState, QueueT};

use super::cow::CowPaths;
use super::device::{Block, BlockCounters};
use super::{BlockBackend, NUM_QUEUES, SECTOR_SIZE};
use crate::devices::virtio::IrqType;
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

/// A virtio-blk device's state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    pub id: Vec<u8>,
    pub read_only: bool,
    /// Capacity in sectors when saved; the restored disk must match.
    pub capacity: u64,
    pub avail_features: u64,
    pub acked_features: u64,
    pub activated: bool,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
    /// The overlay map reference, for a copy-on-write disk.
    pub overlay: Option<CowPaths>,
}

/// Errors restoring a device.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("the disk has {got} sectors, the snapshot {want}")]
    Capacity { got: u64, want: u64 },
    #[error("the snapshot has {0} queues")]
    QueueCount(usize),
    #[error("queue {index} in the snapshot is invalid: {reason}")]
    Queue { index: usize, reason: String },
    #[error("the snapshot's features {0:#x} are not ones this device offers")]
    Features(u64),
    #[error("the snapshot's device id is longer than 20 bytes")]
    Id,
    #[error("cannot create the device: {0}")]
    Io(#[from] std::io::Error),
}

impl Block {
    /// The state to snapshot (with the vCPUs paused).
    pub fn save(&self) -> BlockState {
        BlockState {
            id: self.id.to_vec(),
            read_only: self.read_only,
            capacity: self.capacity(),
            avail_features: self.avail_features,
            acked_features: self.acked_features,
            activated: self.mem.is_some(),
            interrupt_status: self.irq.status(),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            overlay: self.backend.cow_paths().cloned(),
        }
    }

    /// A device in `state` over `backend` (reopened from `state.overlay`)
    /// and the restored guest memory. A pending interrupt is raised again.
    pub fn restore(
        state: &BlockState,
        backend: Box<dyn BlockBackend>,
        mem: GuestMemoryMmap,
    ) -> Result<Self, PersistError> {
        let got = backend.size() / SECTOR_SIZE;
        if got != state.capacity {
            return Err(PersistError::Capacity {
                got,
                want: state.capacity,
            });
        }
        if state.queues.len() != NUM_QUEUES {
            return Err(PersistError::QueueCount(state.queues.len()));
        }
        if state.id.len() > 20 {
            return Err(PersistError::Id);
        }
        let id = String::from_utf8_lossy(&state.id)
            .trim_end_matches('\0')
            .to_owned();
        let mut dev = Block::new(&id, backend, state.read_only)?;
        dev.id = [0; 20];
        dev.id[..state.id.len()].copy_from_slice(&state.id);
        if state.avail_features != dev.avail_features
            || state.acked_features & !dev.avail_features != 0
        {
            return Err(PersistError::Features(state.acked_features));
        }
        dev.acked_features = state.acked_features;
        for (index, (q, s)) in dev.queues.iter_mut().zip(&state.queues).enumerate() {
            let restored =
                Queue::try_from(QueueState::from(*s)).map_err(|e| PersistError::Queue {
                    index,
                    reason: e.to_string(),
                })?;
            if state.activated && !restored.is_valid(&mem) {
                return Err(PersistError::Queue {
                    index,
                    reason: "not in guest memory".into(),
                });
            }
            *q = restored;
        }
        if state.activated {
            dev.mem = Some(mem);
        }
        dev.counters = BlockCounters::default();
        if state.interrupt_status & crate::devices::virtio::VIRTIO_MMIO_INT_VRING != 0 {
            dev.irq.trigger(IrqType::Vring)?;
        }
        if state.interrupt_status & crate::devices::virtio::VIRTIO_MMIO_INT_CONFIG != 0 {
            dev.irq.trigger(IrqType::Config)?;
        }
        Ok(dev)
    }
}
