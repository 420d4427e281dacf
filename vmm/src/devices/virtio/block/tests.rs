//! Device-model tests: guest memory, rings and requests laid out by hand,
//! the device driven through its MMIO registers as Linux drives it.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::BusDevice;
use crate::devices::virtio::block::cow::{CowDisk, CowPaths};
use crate::devices::virtio::block::persist::BlockState;
use crate::devices::virtio::block::{BlockBackend, MemBackend};
use crate::devices::virtio::mmio::{MmioTransport, regs};
use crate::devices::virtio::test_utils::{F_NEXT, GuestQueue, MmioDriver, test_memory};
use crate::devices::virtio::{VIRTIO_MMIO_INT_VRING, VirtioDevice};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const DISK_SECTORS: u64 = 2048;
const FEATURES: u64 = (1 << 32) | (1 << 9);

fn pattern_disk() -> MemBackend {
    MemBackend((0..DISK_SECTORS * 512).map(|i| (i % 251) as u8).collect())
}

struct Harness {
    mem: GuestMemoryMmap,
    t: MmioTransport,
    dev: Arc<Mutex<Block>>,
}

impl Harness {
    fn new(backend: Box<dyn BlockBackend>, read_only: bool) -> Self {
        let mem = test_memory();
        let dev = Arc::new(Mutex::new(
            Block::new("sandmesh-test", backend, read_only).expect("block"),
        ));
        let t = MmioTransport::new(mem.clone(), dev.clone());
        let mut h = Self { mem, t, dev };
        h.bring_up();
        h
    }

    fn bring_up(&mut self) {
        GuestQueue::new(&self.mem, DESC, AVAIL, USED, QSIZE);
        MmioDriver::new(&mut self.t)
            .bring_up(FEATURES, &[(DESC, AVAIL, USED, QSIZE)])
            .expect("bring-up");
    }

    /// QueueNotify, then what the event loop does when the queue's
    /// ioeventfd fires.
    fn notify(&mut self) {
        self.t.write(regs::QUEUE_NOTIFY, &0u32.to_le_bytes());
        self.dispatch();
    }

    fn dispatch(&mut self) {
        crate::event_loop::dispatch_queue_events(&mut *self.dev.lock().expect("dev"));
    }

    fn reg(&mut self, offset: u64) -> u32 {
        MmioDriver::new(&mut self.t).read(offset)
    }

    fn header(&self, ty: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&ty.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(HDR))
            .expect("header");
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS))
            .expect("status");
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).expect("status")
    }

    fn disk(&self) -> Vec<u8> {
        let mut d = self.dev.lock().expect("dev");
        let size = d.backend().size() as usize;
        let mut all = vec![0u8; size];
        d.backend.read_at(0, &mut all).expect("disk");
        all
    }
}

/// Publish `chain` as the next request in `q`, notify, return the used
/// element it produced.
fn submit(h: &mut Harness, q: &mut GuestQueue<'_>, chain: &[(u64, u32, bool)]) -> (u32, u32) {
    let before = q.used_idx();
    let head = q.set_chain(0, chain);
    q.publish(head);
    h.notify();
    assert_eq!(q.used_idx(), before.wrapping_add(1), "one chain used");
    q.used_elem(before)
}

#[test]
fn reads_writes_flush_and_get_id() {
    let mut h = Harness::new(Box::new(pattern_disk()), false);
    // Config space: capacity in sectors, read as two 32-bit halves.
    assert_eq!(h.reg(regs::CONFIG), DISK_SECTORS as u32);
    assert_eq!(h.reg(regs::CONFIG + 4), 0);
    assert_eq!(h.reg(regs::CONFIG + 8), 0, "past our config: zero");
    let mem = h.mem.clone();
    let mut q = GuestQueue::new(&mem, DESC, AVAIL, USED, QSIZE);
    // Simulate a driver that already brought the queue up: re-publish
    // from index 0 over the zeroed rings.
    assert_eq!(q.used_idx(), 0);

    // Write 1 KiB at sector 3, in two data descriptors.
    let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    mem.write_slice(&payload, GuestAddress(DATA))
        .expect("payload");
    h.header(VIRTIO_BLK_T_OUT, 3);
    let used = submit(
        &mut h,
        &mut q,
        &[
            (HDR, 16, false),
            (DATA, 512, false),
            (DATA + 512, 512, false),
            (STATUS, 1, true),
        ],
    );
    assert_eq!(used, (0, 1), "head 0, only the status byte written");
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    let mut want = pattern_disk().0;
    want[3 * 512..5 * 512].copy_from_slice(&payload);
    assert_eq!(h.disk(), want);
    assert_eq!(h.reg(regs::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    assert_eq!(
        h.dev
            .lock()
            .expect("dev")
            .interrupt()
            .event_fd()
            .read()
            .expect("irq"),
        1
    );
    MmioDriver::new(&mut h.t).write(regs::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(h.reg(regs::INTERRUPT_STATUS), 0);

    // Read sectors 2..6 back.
    mem.write_slice(&[0u8; 2048], GuestAddress(DATA))
        .expect("clear");
    h.header(VIRTIO_BLK_T_IN, 2);
    let used = submit(
        &mut h,
        &mut q,
        &[(HDR, 16, false), (DATA, 2048, true), (STATUS, 1, true)],
    );
    assert_eq!(used, (0, 2049));
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    let mut got = vec![0u8; 2048];
    mem.read_slice(&mut got, GuestAddress(DATA)).expect("data");
    assert_eq!(got, want[2 * 512..6 * 512]);

    // The last sector, exactly.
    h.header(VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
    let used = submit(
        &mut h,
        &mut q,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    assert_eq!((used.1, h.status()), (513, VIRTIO_BLK_S_OK as u8));

    // GET_ID.
    h.header(VIRTIO_BLK_T_GET_ID, 0);
    let used = submit(
        &mut h,
        &mut q,
        &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
    );
    assert_eq!((used.1, h.status()), (21, VIRTIO_BLK_S_OK as u8));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
    assert_eq!(&id[..13], b"sandmesh-test");
    assert_eq!(id[13..], [0; 7]);

    // FLUSH.
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    let used = submit(&mut h, &mut q, &[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!((used.1, h.status()), (1, VIRTIO_BLK_S_OK as u8));

    let c = h.dev.lock().expect("dev").counters;
    assert_eq!((c.requests, c.failed, c.malformed), (5, 0, 0));
    assert_eq!((c.read_bytes, c.write_bytes), (2560, 1024));
}

#[test]
fn bad_requests_get_ioerr_and_touch_nothing() {
    let mut h = Harness::new(Box::new(pattern_disk()), false);
    let mem = h.mem.clone();
    let mut q = GuestQueue::new(&mem, DESC, AVAIL, USED, QSIZE);
    let before = h.disk();
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    type Case = (&'static str, u32, u64, Vec<(u64, u32, bool)>, u8);
    let cases: Vec<Case> = vec![
        (
            "past the end",
            VIRTIO_BLK_T_OUT,
            DISK_SECTORS - 1,
            vec![(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)],
            ioerr,
        ),
        (
            "read past the end",
            VIRTIO_BLK_T_IN,
            DISK_SECTORS,
            vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            ioerr,
        ),
        (
            "sector overflows",
            VIRTIO_BLK_T_OUT,
            u64::MAX / 256,
            vec![(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
            ioerr,
        ),
        (
            "partial sector",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(HDR, 16, false), (DATA, 100, false), (STATUS, 1, true)],
            ioerr,
        ),
        (
            "write from a device-writable buffer",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            ioerr,
        ),
        (
            "read into a driver-readable buffer",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
            ioerr,
        ),
        (
            "data outside guest memory",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(HDR, 16, false), (0xff_ff00, 512, false), (STATUS, 1, true)],
            ioerr,
        ),
        (
            "data straddling the end of guest memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                (HDR, 16, false),
                ((1 << 20) - 256, 512, true),
                (STATUS, 1, true),
            ],
            ioerr,
        ),
        (
            "write-only header",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(HDR, 16, true), (DATA, 512, false), (STATUS, 1, true)],
            ioerr,
        ),
        (
            "short header",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(HDR, 8, false), (DATA, 512, false), (STATUS, 1, true)],
            ioerr,
        ),
        (
            "header outside guest memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                (0x7fff_0000, 16, false),
                (DATA, 512, true),
                (STATUS, 1, true),
            ],
            ioerr,
        ),
        (
            "unknown type",
            99,
            0,
            vec![(HDR, 16, false), (STATUS, 1, true)],
            VIRTIO_BLK_S_UNSUPP as u8,
        ),
    ];
    for (name, ty, sector, chain, want) in cases {
        h.header(ty, sector);
        let used = submit(&mut h, &mut q, &chain);
        assert_eq!(used, (0, 1), "{name}: status byte only");
        assert_eq!(h.status(), want, "{name}");
    }
    assert_eq!(h.disk(), before);
    assert_eq!(h.dev.lock().expect("dev").counters.failed, 12);
}

#[test]
fn malformed_chains_are_survived() {
    let mut h = Harness::new(Box::new(pattern_disk()), false);
    let mem = h.mem.clone();
    let mut q = GuestQueue::new(&mem, DESC, AVAIL, USED, QSIZE);
    let before = h.disk();

    // Header only: no status descriptor → used with length 0.
    h.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(submit(&mut h, &mut q, &[(HDR, 16, false)]), (0, 0));
    // Status descriptor not writable.
    assert_eq!(
        submit(
            &mut h,
            &mut q,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, false)]
        ),
        (0, 0)
    );
    // Status byte outside guest memory.
    assert_eq!(
        submit(&mut h, &mut q, &[(HDR, 16, false), (0x7fff_0000, 1, true)]),
        (0, 0)
    );
    // Zero-length status descriptor.
    assert_eq!(
        submit(&mut h, &mut q, &[(HDR, 16, false), (STATUS, 0, true)]),
        (0, 0)
    );
    assert_eq!(h.status(), 0xff, "no status written");

    // A descriptor loop: 0 → 1 → 0 → … (cut at the queue size).
    q.set_desc(0, HDR, 16, F_NEXT, 1);
    q.set_desc(1, DATA, 512, F_NEXT, 0);
    let before_idx = q.used_idx();
    q.publish(0);
    h.notify();
    assert_eq!(q.used_idx(), before_idx.wrapping_add(1));
    assert_eq!(q.used_elem(before_idx), (0, 0));

    // `next` beyond the queue size.
    q.set_desc(0, HDR, 16, F_NEXT, 500);
    let before_idx = q.used_idx();
    q.publish(0);
    h.notify();
    assert_eq!(q.used_elem(before_idx), (0, 0));

    // A head index beyond the queue size: nothing to return, dropped.
    let before_idx = q.used_idx();
    q.publish(QSIZE + 3);
    h.notify();
    assert_eq!(q.used_idx(), before_idx, "cannot be returned");

    // An available index running more than a queue's worth ahead: the
    // queue refuses to iterate; nothing happens.
    let used_before = q.used_idx();
    q.set_avail_idx(q.avail_idx().wrapping_add(QSIZE + 1));
    h.notify();
    assert_eq!(q.used_idx(), used_before);
    // The driver repairs its index; the device serves on.
    q.set_avail_idx(q.avail_idx());

    // A queue notify for a queue that does not exist.
    MmioDriver::new(&mut h.t).write(regs::QUEUE_NOTIFY, 7);
    MmioDriver::new(&mut h.t).write(regs::QUEUE_NOTIFY, u32::MAX);
    h.dispatch();

    assert_eq!(h.disk(), before);
    let c = h.dev.lock().expect("dev").counters;
    assert!(c.malformed >= 7, "{c:?}");

    // After all that, a good request still works.
    h.header(VIRTIO_BLK_T_IN, 0);
    let used = submit(
        &mut h,
        &mut q,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    assert_eq!((used.1, h.status()), (513, VIRTIO_BLK_S_OK as u8));
}

#[test]
fn reset_clears_the_device() {
    let mut h = Harness::new(Box::new(pattern_disk()), false);
    let mem = h.mem.clone();
    let mut q = GuestQueue::new(&mem, DESC, AVAIL, USED, QSIZE);
    h.header(VIRTIO_BLK_T_IN, 0);
    submit(
        &mut h,
        &mut q,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    assert_ne!(h.reg(regs::INTERRUPT_STATUS), 0);

    MmioDriver::new(&mut h.t).write(regs::STATUS, 0);
    assert_eq!(h.reg(regs::STATUS), 0);
    assert_eq!(h.reg(regs::INTERRUPT_STATUS), 0);
    {
        let d = h.dev.lock().expect("dev");
        assert!(!d.is_activated());
        assert_eq!(d.acked_features(), 0);
        let queue = &d.queues()[0];
        assert!(!queue.ready());
        assert_eq!((queue.next_avail(), queue.next_used()), (0, 0));
        assert_eq!(queue.size(), QUEUE_SIZE);
    }
    assert_eq!(h.reg(regs::QUEUE_READY), 0);
    // A notify after reset does nothing.
    q.publish(0);
    h.notify();
    assert_eq!(q.used_idx(), 1);

    // Bring-up again, with fresh rings: served from index 0.
    h.bring_up();
    let mut q = GuestQueue::new(&mem, DESC, AVAIL, USED, QSIZE);
    h.header(VIRTIO_BLK_T_IN, 1);
    let used = submit(
        &mut h,
        &mut q,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    assert_eq!((used.1, h.status()), (513, VIRTIO_BLK_S_OK as u8));
}

#[test]
fn read_only_device_refuses_writes() {
    let mut h = Harness::new(Box::new(pattern_disk()), true);
    assert_ne!(
        h.dev.lock().expect("dev").avail_features() & (1 << VIRTIO_BLK_F_RO),
        0
    );
    let mem = h.mem.clone();
    let mut q = GuestQueue::new(&mem, DESC, AVAIL, USED, QSIZE);
    let before = h.disk();
    h.header(VIRTIO_BLK_T_OUT, 0);
    submit(
        &mut h,
        &mut q,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    assert_eq!(h.status(), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(h.disk(), before);
}

#[test]
fn copy_on_write_disk_behind_the_device() {
    let dir = std::env::temp_dir().join(format!("sandmesh-blk-cow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let base = pattern_disk().0;
    std::fs::write(dir.join("base"), &base).expect("base");
    let paths = CowPaths::new(dir.join("base"), dir.join("overlay"));
    let disk = CowDisk::create(paths.clone()).expect("cow");
    let mut h = Harness::new(Box::new(disk), false);
    let mem = h.mem.clone();
    let mut q = GuestQueue::new(&mem, DESC, AVAIL, USED, QSIZE);
    mem.write_slice(&[0xabu8; 512], GuestAddress(DATA))
        .expect("data");
    h.header(VIRTIO_BLK_T_OUT, 9);
    submit(
        &mut h,
        &mut q,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    h.header(VIRTIO_BLK_T_FLUSH, 0);
    submit(&mut h, &mut q, &[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(h.status(), VIRTIO_BLK_S_OK as u8);
    let mut want = base.clone();
    want[9 * 512..10 * 512].fill(0xab);
    assert_eq!(h.disk(), want);
    assert_eq!(std::fs::read(dir.join("base")).expect("base"), base);

    // Snapshot state: serializable, and a restored device carries on.
    let state: BlockState = h.dev.lock().expect("dev").save();
    assert_eq!(
        state.overlay.as_ref(),
        Some(&crate::devices::virtio::block::persist::DiskPaths::from(
            &paths
        ))
    );
    assert!(state.activated);
    let json = serde_json::to_string(&state).expect("json");
    let state: BlockState = serde_json::from_str(&json).expect("json");
    assert_eq!(state.queues[0].next_avail, 2);
    let reopened = CowDisk::open(paths).expect("reopen");
    let restored = Block::restore(&state, Box::new(reopened), mem.clone()).expect("restore");
    let transport_state = h.t.save();
    let dev = Arc::new(Mutex::new(restored));
    h.dev = dev.clone();
    h.t = MmioTransport::restore(mem.clone(), dev, &transport_state);
    assert_eq!(h.t.save(), transport_state);
    assert_eq!(h.reg(regs::STATUS), 0xf, "ACK|DRIVER|FEATURES_OK|DRIVER_OK");
    h.header(VIRTIO_BLK_T_IN, 9);
    let used = {
        let before = q.used_idx();
        let head = q.set_chain(
            0,
            &[
                (HDR, 16, false),
                (DATA + 4096, 512, true),
                (STATUS, 1, true),
            ],
        );
        q.publish(head);
        h.notify();
        assert_eq!(q.used_idx(), before.wrapping_add(1));
        q.used_elem(before)
    };
    assert_eq!((used.1, h.status()), (513, VIRTIO_BLK_S_OK as u8));
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA + 4096))
        .expect("read");
    assert_eq!(got, [0xab; 512]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn restore_rejects_inconsistent_state() {
    let dev = Block::new("x", Box::new(pattern_disk()), false).expect("block");
    let mem = test_memory();
    let good = dev.save();
    let mut s = good.clone();
    s.capacity += 1;
    assert!(Block::restore(&s, Box::new(pattern_disk()), mem.clone()).is_err());
    let mut s = good.clone();
    s.acked_features = 1 << 40;
    assert!(Block::restore(&s, Box::new(pattern_disk()), mem.clone()).is_err());
    let mut s = good.clone();
    s.queues[0].size = 3;
    assert!(Block::restore(&s, Box::new(pattern_disk()), mem.clone()).is_err());
    let mut s = good.clone();
    s.activated = true;
    s.queues[0].ready = true;
    s.queues[0].used_ring = 0xfff_f000;
    assert!(Block::restore(&s, Box::new(pattern_disk()), mem.clone()).is_err());
    let restored = Block::restore(&good, Box::new(pattern_disk()), mem).expect("restore");
    assert_eq!(restored.save(), good);
}
