//! Device-model tests: the guest driver played by hand (rings and packets
//! laid out in guest memory, registers driven as Linux does), the host by
//! real unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::connection::{CONN_BUF_ALLOC, Connection};
use super::packet::*;
use super::persist::VsockState;
use super::unix::muxer::parse_connect;
use super::{EVQ, RXQ, TXQ, Vsock};
use crate::devices::BusDevice;
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::mmio::{MmioTransport, regs};
use crate::devices::virtio::test_utils::{F_NEXT, F_WRITE, GuestQueue, MmioDriver, test_memory};
use crate::vstate::memory::GuestMemoryMmap;

const QSIZE: u16 = 16;
const RX: (u64, u64, u64) = (0x1000, 0x2000, 0x3000);
const TX: (u64, u64, u64) = (0x4000, 0x5000, 0x6000);
const EV: (u64, u64, u64) = (0x7000, 0x8000, 0x9000);
const RXBUF: u64 = 0x1_0000; // 16 x 4 KiB
const TXBUF: u64 = 0x4_0000; // 8 x (header page + 64 KiB data)
const EVBUF: u64 = 0xf_0000;
const GUEST_CID: u64 = 3;
const FEATURES: u64 = 1 << 32;

/// A unique socket path in a fresh directory.
fn socket_path() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "smvsock-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join("v.sock")
}

fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
    PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: 2,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..PacketHeader::default()
    }
}

struct Harness {
    mem: &'static GuestMemoryMmap,
    t: MmioTransport,
    dev: Arc<Mutex<Vsock>>,
    uds: PathBuf,
    rx: GuestQueue<'static>,
    tx: GuestQueue<'static>,
    ev: GuestQueue<'static>,
    rx_slot: u16,
    rx_seen: u16,
    tx_slot: u16,
}

impl Harness {
    fn new() -> Self {
        let uds = socket_path();
        let dev = Vsock::new(GUEST_CID, &uds).expect("vsock");
        Self::with_device(dev, uds, Box::leak(Box::new(test_memory())), true)
    }

    fn with_device(dev: Vsock, uds: PathBuf, mem: &'static GuestMemoryMmap, up: bool) -> Self {
        let dev = Arc::new(Mutex::new(dev));
        let t = MmioTransport::new(mem.clone(), dev.clone());
        let q = |(d, a, u): (u64, u64, u64)| {
            if up {
                GuestQueue::new(mem, d, a, u, QSIZE)
            } else {
                // Restored: the rings are already in memory.
                let mut g = GuestQueue::new(&*Box::leak(Box::new(test_memory())), d, a, u, QSIZE);
                g.mem = mem;
                g
            }
        };
        let (rx, tx, ev) = (q(RX), q(TX), q(EV));
        let mut h = Self {
            mem,
            t,
            dev,
            uds,
            rx,
            tx,
            ev,
            rx_slot: 0,
            rx_seen: 0,
            tx_slot: 0,
        };
        if up {
            let layouts = [h.rx.layout(), h.tx.layout(), h.ev.layout()];
            MmioDriver::new(&mut h.t)
                .bring_up(FEATURES, &layouts)
                .expect("bring-up");
        }
        h
    }

    /// QueueNotify, then what the event loop does when the queue's
    /// ioeventfd fires.
    fn notify(&mut self, q: usize) {
        self.t.write(regs::QUEUE_NOTIFY, &(q as u32).to_le_bytes());
        crate::event_loop::dispatch_queue_events(&mut *self.dev.lock().unwrap());
    }

    /// What the event loop does for the host side: wait until the
    /// muxer's epoll says there is work, then run a pass. A test whose
    /// host work never made the epoll readable fails on what the guest
    /// did not receive.
    fn poll(&mut self) {
        if self.host_ready(500) {
            self.dev.lock().unwrap().handle_host_events();
        }
    }

    /// Whether the muxer's epoll descriptor becomes readable within `ms`.
    fn host_ready(&self, ms: i32) -> bool {
        let fd = self
            .dev
            .lock()
            .unwrap()
            .host_event_fd()
            .expect("vsock has host events");
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        n == 1 && pfd.revents & libc::POLLIN != 0
    }

    /// Post `n` 4 KiB RX buffers.
    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let i = self.rx_slot % QSIZE;
            self.rx
                .set_desc(i, RXBUF + u64::from(i) * 0x1000, 0x1000, F_WRITE, 0);
            self.rx.publish(i);
            self.rx_slot += 1;
        }
        self.notify(RXQ);
    }

    /// Packets the device put on the RX ring since the last call.
    fn read_rx(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen != self.rx.used_idx() {
            let (id, len) = self.rx.used_elem(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            assert!(len as usize >= HDR_SIZE, "used length {len}");
            let addr = RXBUF + u64::from(id) * 0x1000;
            let mut raw = [0u8; HDR_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = PacketHeader::from_bytes(&raw);
            assert_eq!(hdr.len as usize, len as usize - HDR_SIZE);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(addr + HDR_SIZE as u64))
                .unwrap();
            out.push((hdr, data));
        }
        out
    }

    /// Send a packet as Linux does: header and payload in two descriptors.
    fn send(&mut self, hdr: PacketHeader, data: &[u8]) {
        let mut hdr = hdr;
        hdr.len = data.len() as u32;
        let slot = self.tx_slot % 8;
        self.tx_slot += 1;
        let base = TXBUF + u64::from(slot) * 0x1_1000;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(base))
            .unwrap();
        self.mem
            .write_slice(data, GuestAddress(base + 0x1000))
            .unwrap();
        let d = slot * 2;
        if data.is_empty() {
            self.tx.set_desc(d, base, HDR_SIZE as u32, 0, 0);
        } else {
            self.tx.set_desc(d, base, HDR_SIZE as u32, F_NEXT, d + 1);
            self.tx
                .set_desc(d + 1, base + 0x1000, data.len() as u32, 0, 0);
        }
        self.send_raw(d);
    }

    fn send_raw(&mut self, head: u16) {
        self.tx.publish(head);
        self.notify(TXQ);
    }

    /// Host connects with `CONNECT <port>`; the guest answers RESPONSE
    /// with `buf_alloc`. Returns the host stream and the host port.
    fn host_connect(&mut self, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(&self.uds).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.post_rx(4);
        self.poll();
        let pkts = self.read_rx();
        assert_eq!(pkts.len(), 1, "{pkts:?}");
        let (req, _) = pkts[0];
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!((req.src_cid, req.dst_cid), (2, GUEST_CID));
        assert_eq!(req.dst_port, port);
        assert!(req.src_port >= 1 << 30);
        assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
        let local = req.src_port;
        let mut resp = guest_hdr(OP_RESPONSE, port, local);
        resp.buf_alloc = buf_alloc;
        self.send(resp, &[]);
        let want = format!("OK {local}\n");
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).expect("OK line");
        assert_eq!(String::from_utf8_lossy(&got), want);
        (s, local)
    }

    fn conns(&self) -> usize {
        self.dev.lock().unwrap().muxer().connection_count()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(dir) = self.uds.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn header_roundtrip_and_connect_line() {
    let h = guest_hdr(OP_RW, 7, 9);
    assert_eq!(PacketHeader::from_bytes(&h.to_bytes()), h);
    assert_eq!(parse_connect(b"CONNECT 49983"), Some(49983));
    assert_eq!(parse_connect(b"CONNECT 49983\r"), Some(49983));
    for bad in [
        &b"CONNECT"[..],
        b"CONNECT ",
        b"CONNECT -1",
        b"CONNECT 99999999999",
        b"connect 1",
        b"CONNECT 1 2",
    ] {
        assert_eq!(parse_connect(bad), None, "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn config_space_is_the_guest_cid() {
    let mut h = Harness::new();
    let mut d = MmioDriver::new(&mut h.t);
    assert_eq!(d.read(regs::DEVICE_ID), 19);
    assert_eq!(d.read(0x100), GUEST_CID as u32);
    assert_eq!(d.read(0x104), 0);
}

#[test]
fn busy_socket_path_is_an_error() {
    let h = Harness::new();
    let err = Vsock::new(GUEST_CID, &h.uds).expect_err("in use");
    assert!(err.to_string().contains("v.sock"), "{err}");
    assert!(Vsock::new(2, &socket_path()).is_err(), "CID 2 is the host");
}

#[test]
fn host_connect_data_both_ways_and_guest_rst() {
    let mut h = Harness::new();
    let (mut s, local) = h.host_connect(49983, 64 * 1024);
    assert_eq!(h.conns(), 1);

    // Host to guest.
    s.write_all(b"hello").unwrap();
    h.poll();
    let pkts = h.read_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RW);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (local, 49983));
    assert_eq!(pkts[0].1, b"hello");

    // Guest to host.
    h.send(guest_hdr(OP_RW, 49983, local), b"world");
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"world");
    let counts = h
        .dev
        .lock()
        .unwrap()
        .muxer()
        .connection(local, 49983)
        .unwrap()
        .counts();
    assert_eq!(counts, (5, 5));

    // A CREDIT_REQUEST is answered with our fwd_cnt.
    h.send(guest_hdr(OP_CREDIT_REQUEST, 49983, local), &[]);
    let pkts = h.read_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_CREDIT_UPDATE);
    assert_eq!(
        (pkts[0].0.buf_alloc, pkts[0].0.fwd_cnt),
        (CONN_BUF_ALLOC, 5)
    );

    // Guest RST closes the host stream.
    h.send(guest_hdr(OP_RST, 49983, local), &[]);
    assert_eq!(h.conns(), 0);
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn host_data_respects_guest_credit() {
    let mut h = Harness::new();
    let (mut s, local) = h.host_connect(5000, 16);
    s.write_all(b"hello").unwrap();
    h.poll();
    assert_eq!(h.read_rx()[0].1, b"hello");
    s.write_all(b"abcdefghijklmnopqrst").unwrap();
    h.post_rx(4);
    h.poll();
    h.poll();
    let data: Vec<u8> = h.read_rx().into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(data, b"abcdefghijk", "only 16 bytes of credit");
    // The guest consumed everything: 16 more bytes of credit.
    let mut cu = guest_hdr(OP_CREDIT_UPDATE, 5000, local);
    cu.buf_alloc = 16;
    cu.fwd_cnt = 16;
    h.send(cu, &[]);
    h.poll();
    let data: Vec<u8> = h.read_rx().into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(data, b"lmnopqrst");
}

#[test]
fn guest_shutdown_closes_the_host_stream() {
    let mut h = Harness::new();
    let (mut s, local) = h.host_connect(80, 4096);
    let mut sd = guest_hdr(OP_SHUTDOWN, 80, local);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.send(sd, &[]);
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    assert_eq!(h.conns(), 0);
    let pkts = h.read_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
}

#[test]
fn guest_half_shutdown_shuts_host_writes_only() {
    let mut h = Harness::new();
    let (mut s, local) = h.host_connect(81, 4096);
    h.send(guest_hdr(OP_RW, 81, local), b"last");
    let mut sd = guest_hdr(OP_SHUTDOWN, 81, local);
    sd.flags = SHUTDOWN_SEND;
    h.send(sd, &[]);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"last");
    // The host can still send.
    s.write_all(b"reply").unwrap();
    h.poll();
    assert_eq!(h.read_rx()[0].1, b"reply");
}

#[test]
fn host_close_sends_shutdown_then_guest_rst_ends_it() {
    let mut h = Harness::new();
    let (s, local) = h.host_connect(82, 4096);
    drop(s);
    h.poll();
    let pkts = h.read_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_SHUTDOWN);
    assert_eq!(pkts[0].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    h.send(guest_hdr(OP_RST, 82, local), &[]);
    assert_eq!(h.conns(), 0);
}

#[test]
fn guest_rst_to_a_connect_request_closes_the_host() {
    let mut h = Harness::new();
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"CONNECT 9\n").unwrap();
    h.post_rx(2);
    h.poll();
    let req = h.read_rx()[0].0;
    h.send(guest_hdr(OP_RST, 9, req.src_port), &[]);
    let mut rest = Vec::new();
    assert_eq!(
        s.read_to_end(&mut rest).unwrap(),
        0,
        "closed with nothing written"
    );
}

#[test]
fn bad_connect_lines_are_closed_without_a_request() {
    let mut h = Harness::new();
    h.post_rx(4);
    let mut streams = Vec::new();
    for line in [&b"HELLO\n"[..], b"CONNECT abc\n", &[b'9'; 64][..]] {
        let mut s = UnixStream::connect(&h.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(line).unwrap();
        streams.push(s);
    }
    h.poll();
    assert!(h.read_rx().is_empty());
    for mut s in streams {
        // Closed: EOF, or a reset where the line was not read to its end.
        let mut rest = Vec::new();
        assert!(matches!(s.read_to_end(&mut rest), Ok(0) | Err(_)));
    }
    assert_eq!(h.dev.lock().unwrap().muxer().counters.bad_handshake, 3);
}

#[test]
fn guest_initiated_connection_to_a_listening_socket() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(format!("{}_5000", h.uds.display())).unwrap();
    h.post_rx(4);
    h.send(guest_hdr(OP_REQUEST, 1234, 5000), &[]);
    let pkts = h.read_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RESPONSE);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (5000, 1234));
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    h.send(guest_hdr(OP_RW, 1234, 5000), b"ping");
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    s.write_all(b"pong").unwrap();
    h.poll();
    assert_eq!(h.read_rx()[0].1, b"pong");

    // No listener on 5001: RST.
    h.send(guest_hdr(OP_REQUEST, 1235, 5001), &[]);
    let pkts = h.read_rx();
    assert_eq!(pkts[0].0.op, OP_RST);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (5001, 1235));
}

#[test]
fn malformed_packets_are_dropped_or_reset() {
    let mut h = Harness::new();
    h.post_rx(8);
    let malformed = |h: &Harness| h.dev.lock().unwrap().counters.malformed;

    // Short header.
    h.tx.set_desc(0, TXBUF, 20, 0, 0);
    h.send_raw(0);
    assert_eq!(malformed(&h), 1);
    // len beyond the chain.
    let mut hdr = guest_hdr(OP_RW, 1, 2);
    hdr.len = 1000;
    h.mem
        .write_slice(&hdr.to_bytes(), GuestAddress(TXBUF))
        .unwrap();
    h.tx.set_desc(0, TXBUF, HDR_SIZE as u32 + 10, 0, 0);
    h.send_raw(0);
    assert_eq!(malformed(&h), 2);
    // len beyond 64 KiB even though the chain is that long.
    hdr.len = MAX_PKT_BUF_SIZE + 1;
    h.mem
        .write_slice(&hdr.to_bytes(), GuestAddress(TXBUF))
        .unwrap();
    h.tx.set_desc(0, TXBUF, HDR_SIZE as u32 + MAX_PKT_BUF_SIZE + 1, 0, 0);
    h.send_raw(0);
    assert_eq!(malformed(&h), 3);
    // A device-writable TX descriptor, and one outside guest memory.
    h.tx.set_desc(0, TXBUF, 64, F_WRITE, 0);
    h.send_raw(0);
    h.tx.set_desc(0, 0xffff_0000, 64, 0, 0);
    h.send_raw(0);
    h.tx.set_desc(0, u64::MAX - 8, 64, 0, 0);
    h.send_raw(0);
    assert_eq!(malformed(&h), 6);
    // A head index beyond the queue.
    h.send_raw(QSIZE + 3);
    assert!(h.read_rx().is_empty(), "malformed chains get no answer");

    // Wrong source or destination CID: dropped silently.
    let mut bad = guest_hdr(OP_REQUEST, 1, 2);
    bad.src_cid = 4;
    h.send(bad, &[]);
    let mut bad = guest_hdr(OP_REQUEST, 1, 2);
    bad.dst_cid = 7;
    h.send(bad, &[]);
    assert_eq!(h.dev.lock().unwrap().muxer().counters.bad_cid, 2);
    assert!(h.read_rx().is_empty());

    // Unknown op, unknown type, data without a connection: RST.
    h.send(guest_hdr(99, 10, 11), &[]);
    let mut dgram = guest_hdr(OP_REQUEST, 12, 13);
    dgram.type_ = 2;
    h.send(dgram, &[]);
    h.send(guest_hdr(OP_RW, 14, 15), b"xx");
    let pkts = h.read_rx();
    assert_eq!(pkts.len(), 3);
    assert!(pkts.iter().all(|(p, _)| p.op == OP_RST));
    assert_eq!(
        pkts.iter()
            .map(|(p, _)| (p.src_port, p.dst_port))
            .collect::<Vec<_>>(),
        [(11, 10), (13, 12), (15, 14)]
    );
    // And an RST for nothing gets no answer.
    h.send(guest_hdr(OP_RST, 16, 17), &[]);
    assert!(h.read_rx().is_empty());
}

#[test]
fn protocol_violations_on_a_connection_reset_it() {
    let mut h = Harness::new();
    let (mut s, local) = h.host_connect(90, 4096);
    // A second REQUEST on a live connection.
    h.send(guest_hdr(OP_REQUEST, 90, local), &[]);
    let pkts = h.read_rx();
    assert_eq!(pkts[0].0.op, OP_RST);
    assert_eq!(h.conns(), 0);
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn rx_buffers_too_small_or_read_only_are_returned_empty() {
    let mut h = Harness::new();
    h.rx.set_desc(0, RXBUF, 20, F_WRITE, 0);
    h.rx.publish(0);
    h.rx.set_desc(1, RXBUF, 4096, 0, 0);
    h.rx.publish(1);
    h.send(guest_hdr(OP_RW, 1, 2), b"x"); // queues an RST
    assert_eq!(h.rx.used_idx(), 2);
    assert_eq!(h.rx.used_elem(0), (0, 0));
    assert_eq!(h.rx.used_elem(1), (1, 0));
    assert_eq!(h.dev.lock().unwrap().counters.malformed, 2);
    // The RST still waits for a good buffer.
    h.rx_slot = 2;
    h.rx_seen = 2;
    h.post_rx(1);
    assert_eq!(h.read_rx()[0].0.op, OP_RST);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let (a, _b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let mut c = Connection::new_peer(a, 1, 2);
    let chunk = vec![7u8; 64 * 1024];
    for _ in 0..CONN_BUF_ALLOC / (64 * 1024) {
        c.recv_rw(&chunk).expect("within credit");
    }
    assert!(c.recv_rw(&[1]).is_err(), "one byte past the credit");
}

#[test]
fn device_reset_drops_connections() {
    let mut h = Harness::new();
    let (mut s, _) = h.host_connect(91, 4096);
    MmioDriver::new(&mut h.t).write(regs::STATUS, 0);
    assert_eq!(h.conns(), 0);
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn snapshot_restore_resets_connections_and_sends_transport_reset() {
    let mut h = Harness::new();
    let (mut s, _) = h.host_connect(92, 4096);
    let state: VsockState = h.dev.lock().unwrap().save();
    let transport_state = h.t.save();
    let json = serde_json::to_string(&state).unwrap();
    let state: VsockState = serde_json::from_str(&json).unwrap();
    assert!(state.activated);
    let (mem, uds) = (h.mem, h.uds.clone());
    // The old process goes away: its sockets close, its socket file too.
    drop(h);
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    assert!(!uds.exists());
    std::fs::create_dir_all(uds.parent().unwrap()).unwrap();

    let restored = Vsock::restore(&state, &uds, mem.clone()).expect("restore");
    assert!(restored.is_activated());
    assert_eq!(restored.muxer().connection_count(), 0);
    let dev = Arc::new(Mutex::new(restored));
    let mut t = MmioTransport::restore(mem.clone(), dev.clone(), &transport_state);
    // The driver posts an event buffer: it receives TRANSPORT_RESET.
    let mut ev = GuestQueue::new(
        &*Box::leak(Box::new(test_memory())),
        EV.0,
        EV.1,
        EV.2,
        QSIZE,
    );
    ev.mem = mem;
    ev.set_desc(0, EVBUF, 8, F_WRITE, 0);
    mem.write_obj(0xffff_ffffu32, GuestAddress(EVBUF)).unwrap();
    ev.publish(0);
    t.write(regs::QUEUE_NOTIFY, &(EVQ as u32).to_le_bytes());
    crate::event_loop::dispatch_queue_events(&mut *dev.lock().unwrap());
    assert_eq!(ev.used_idx(), 1);
    assert_eq!(ev.used_elem(0), (0, 4));
    let id: u32 = mem.read_obj(GuestAddress(EVBUF)).unwrap();
    assert_eq!(id, super::EVENT_TRANSPORT_RESET);
    // The restored device accepts new host connections.
    assert!(UnixStream::connect(&uds).is_ok());

    // A snapshot with the wrong number of queues is refused.
    let mut bad = state.clone();
    bad.queues.pop();
    drop(dev);
    drop(t);
    assert!(Vsock::restore(&bad, &socket_path(), mem.clone()).is_err());
    let _ = std::fs::remove_dir_all(uds.parent().unwrap());
}

#[test]
fn the_muxer_wakes_the_loop_exactly_when_the_host_side_has_work() {
    let mut h = Harness::new();
    h.dev.lock().unwrap().process();
    assert!(!h.host_ready(0), "idle: nothing to do");
    let (mut s, local) = h.host_connect(6000, 8);
    assert!(!h.host_ready(0), "established, nothing sent");

    // The guest has credit for 8 bytes; the host sends 16.
    s.write_all(b"0123456789abcdef").unwrap();
    h.poll();
    let pkts = h.read_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].1, b"01234567");
    // 8 bytes wait in the socket, but the guest has no credit: the
    // stream is not watched, so the loop does not spin on it.
    assert!(!h.host_ready(50), "no credit: not woken");

    // The guest consumed them: the rest flows.
    let mut cu = guest_hdr(OP_CREDIT_UPDATE, 6000, local);
    cu.buf_alloc = 8;
    cu.fwd_cnt = 8;
    h.send(cu, &[]);
    let pkts = h.read_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].1, b"89abcdef");

    // The host hangs up while the guest has no credit: not woken...
    assert!(!h.host_ready(0));
    drop(s);
    assert!(!h.host_ready(50), "a hang-up without credit does not spin");
    // ...and seen once the guest has room again.
    cu.fwd_cnt = 16;
    h.send(cu, &[]);
    let pkts = h.read_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].0.op, OP_SHUTDOWN);

    // A host connection that has not sent its line yet wakes the loop
    // once, then waits.
    let _pending = UnixStream::connect(&h.uds).unwrap();
    assert!(h.host_ready(1000), "a new connection");
    h.dev.lock().unwrap().process();
    assert!(!h.host_ready(50), "waiting for its CONNECT line");
    assert_eq!(h.dev.lock().unwrap().muxer().counters.epoll_errors, 0);
}
