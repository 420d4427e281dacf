//! The snapshot state of a virtio-blk device.
//!
//! Plain data (`schema::snapshot::BlockState`, part of the versioned state
//! file): the negotiated features, each queue's addresses and ring
//! indices, whether the device was activated, the pending interrupt bits,
//! and where its disk's overlay lives. Guest
//! memory and the disk itself are not part of it: the restorer maps the
//! memory snapshot and reopens the overlay (`CowDisk::open` on the recorded
//! paths) and passes both to [`Block::restore`]. Everything here is
//! validated on restore as if it came from the guest (it came from a file).

use schema::snapshot::{bytes_path, path_bytes};

use super::cow::CowPaths;
use super::device::{Block, BlockCounters};
use super::{BlockBackend, NUM_QUEUES, SECTOR_SIZE};
use crate::devices::virtio::IrqType;
use crate::devices::virtio::persist::{queue_snapshot, restore_queues};
use crate::vstate::memory::GuestMemoryMmap;

/// A virtio-blk device's state (a `schema::snapshot` type: part of the
/// versioned state file).
pub use schema::snapshot::{BlockState, DiskPaths};

impl From<&CowPaths> for DiskPaths {
    fn from(p: &CowPaths) -> Self {
        DiskPaths {
            base: path_bytes(&p.base),
            overlay: path_bytes(&p.overlay),
            map: path_bytes(&p.map),
        }
    }
}

impl CowPaths {
    /// The paths a snapshot recorded.
    pub fn from_state(p: &DiskPaths) -> Self {
        CowPaths {
            base: bytes_path(&p.base),
            overlay: bytes_path(&p.overlay),
            map: bytes_path(&p.map),
        }
    }
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
            queues: self
                .queues
                .iter()
                .map(|q| queue_snapshot(q.state()))
                .collect(),
            overlay: self.backend.cow_paths().map(DiskPaths::from),
        }
    }

    /// Make the disk durable for a snapshot: a copy-on-write disk syncs
    /// its overlay and writes its cluster map, so the overlay on disk is
    /// exactly what the snapshotted guest wrote.
    pub fn flush_for_snapshot(&mut self) -> std::io::Result<()> {
        self.backend.flush()
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
        restore_queues(&mut dev.queues, &state.queues, &mem, state.activated)
            .map_err(|(index, reason)| PersistError::Queue { index, reason })?;
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
