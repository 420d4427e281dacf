//! One stream connection between a guest port and a host unix socket, and
//! its credit accounting.
//!
//! virtio-vsock flow control is by credit: each side advertises the buffer
//! it has for the connection (`buf_alloc`) and how many bytes it has
//! consumed (`fwd_cnt`, free-running, wrapping); a sender may have at most
//! `buf_alloc - (tx_cnt - fwd_cnt)` bytes in flight. Every packet we send
//! carries our current values.
//!
//! - Guest → host: we advertise [`CONN_BUF_ALLOC`] bytes. OP_RW payloads
//!   go into `to_host` and are written to the stream as it accepts them;
//!   `fwd_cnt` counts what was written. A guest that sends more than its
//!   credit is hostile or broken: the connection is reset. A CREDIT_UPDATE
//!   is sent when a quarter of the buffer was forwarded since the guest
//!   last heard our `fwd_cnt`, or when the guest asks (CREDIT_REQUEST).
//! - Host → guest: we read from the stream only as much as the guest's
//!   credit allows (its `buf_alloc` minus what is in flight), at most one
//!   packet's worth ahead, so the host is back-pressured by the guest.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::HOST_CID;
use super::packet::{
    MAX_PKT_BUF_SIZE, OP_CREDIT_UPDATE, OP_RW, OP_SHUTDOWN, PacketHeader, SHUTDOWN_RCV,
    SHUTDOWN_SEND, TYPE_STREAM,
};

/// The receive buffer we advertise to the guest for each connection.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Forwarded bytes after which the guest is told our new `fwd_cnt`.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: the REQUEST went to the guest, no RESPONSE yet.
    LocalInit,
    /// Data flows both ways.
    Established,
}

/// The guest violated the protocol on this connection: reset it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditViolation;

#[derive(Debug)]
pub struct Connection {
    pub stream: UnixStream,
    pub state: ConnState,
    /// The host-side port (`dst_port` of the guest's packets).
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
    /// Bytes for the host stream: a handshake reply, then guest data.
    to_host: VecDeque<u8>,
    /// How many bytes at the front of `to_host` are our own (the `OK`
    /// line), not guest data: they do not count in `fwd_cnt`.
    handshake_left: usize,
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Read from the host, not yet given to the guest.
    from_host: Vec<u8>,
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_update_wanted: bool,
    /// The host stream reached end-of-file.
    host_eof: bool,
    /// We told the guest (SHUTDOWN) that the host is done.
    shutdown_sent: bool,
    /// The guest will send no more data.
    guest_shut_send: bool,
    /// The guest will receive no more data.
    guest_shut_rcv: bool,
    host_write_shut: bool,
    /// What the muxer's epoll watches on `stream` now (empty: not in the
    /// set). See [`Connection::wanted_events`].
    pub(crate) watched: EventSet,
}

impl Connection {
    fn new(stream: UnixStream, state: ConnState, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            to_host: VecDeque::new(),
            handshake_left: 0,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            from_host: Vec::new(),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_update_wanted: false,
            host_eof: false,
            shutdown_sent: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_write_shut: false,
            watched: EventSet::empty(),
        }
    }

    /// A host-initiated connection, waiting for the guest's RESPONSE.
    pub fn new_local(stream: UnixStream, local_port: u32, peer_port: u32) -> Self {
        Self::new(stream, ConnState::LocalInit, local_port, peer_port)
    }

    /// A guest-initiated connection, established once the host socket
    /// accepted it.
    pub fn new_peer(stream: UnixStream, local_port: u32, peer_port: u32) -> Self {
        Self::new(stream, ConnState::Established, local_port, peer_port)
    }

    /// A header from us to the guest on this connection, carrying our
    /// current credit.
    pub fn header(&mut self, guest_cid: u64, op: u16, flags: u32) -> PacketHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Record the guest's credit from any packet it sent.
    pub fn update_peer_credit(&mut self, hdr: &PacketHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes the guest can still take.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The guest's RESPONSE arrived: reply `OK <local_port>` to the host.
    pub fn establish_local(&mut self) -> io::Result<()> {
        self.state = ConnState::Established;
        let line = format!("OK {}\n", self.local_port);
        self.handshake_left = line.len();
        for (i, b) in line.bytes().enumerate() {
            self.to_host.insert(i, b);
        }
        self.flush_to_host()
    }

    /// OP_RW from the guest.
    pub fn recv_rw(&mut self, data: &[u8]) -> Result<(), CreditViolation> {
        let buffered = (self.to_host.len() - self.handshake_left) as u64;
        let free = u64::from(CONN_BUF_ALLOC).saturating_sub(buffered);
        if self.guest_shut_send || data.len() as u64 > free {
            return Err(CreditViolation);
        }
        self.to_host.extend(data);
        self.rx_cnt += Wrapping(data.len() as u32);
        Ok(())
    }

    /// The guest sent SHUTDOWN with `flags`.
    pub fn recv_shutdown(&mut self, flags: u32) {
        self.guest_shut_send |= flags & SHUTDOWN_SEND != 0;
        self.guest_shut_rcv |= flags & SHUTDOWN_RCV != 0;
        if self.guest_shut_rcv {
            self.from_host.clear();
        }
    }

    /// Both directions are shut by the guest.
    pub fn guest_fully_shut(&self) -> bool {
        self.guest_shut_send && self.guest_shut_rcv
    }

    pub fn want_credit_update(&mut self) {
        self.credit_update_wanted = true;
    }

    /// Write what the stream accepts. `Err` means the host side is gone.
    pub fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    let ours = n.min(self.handshake_left);
                    self.handshake_left -= ours;
                    self.fwd_cnt += Wrapping((n - ours) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.credit_update_wanted = true;
        }
        if self.to_host.is_empty() && self.guest_shut_send && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Read from the host what the guest's credit allows. `Err` means the
    /// host side failed.
    pub fn fill_from_host(&mut self) -> io::Result<()> {
        if self.state != ConnState::Established || self.host_eof || self.guest_shut_rcv {
            return Ok(());
        }
        let room = (self.peer_free() as usize)
            .min(MAX_PKT_BUF_SIZE as usize)
            .saturating_sub(self.from_host.len());
        if room == 0 {
            return Ok(());
        }
        let start = self.from_host.len();
        self.from_host.resize(start + room, 0);
        let r = loop {
            match self.stream.read(&mut self.from_host[start..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r,
            }
        };
        match r {
            Ok(0) => {
                self.from_host.truncate(start);
                self.host_eof = true;
                Ok(())
            }
            Ok(n) => {
                self.from_host.truncate(start + n);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.from_host.truncate(start);
                Ok(())
            }
            Err(e) => {
                self.from_host.truncate(start);
                Err(e)
            }
        }
    }

    /// The host stream's events worth waking for: readable while the
    /// guest has credit and the buffer room, writable while guest bytes
    /// wait for the host. Empty otherwise — the stream then leaves the
    /// epoll set, so a peer that hung up (EPOLLHUP is reported whatever
    /// the interest) cannot make the loop spin while the guest is slow;
    /// the hang-up is read when the guest has room again.
    pub fn wanted_events(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.wants_host_data() {
            events |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            events |= EventSet::OUT;
        }
        events
    }

    /// [`Connection::fill_from_host`] would read something.
    fn wants_host_data(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && !self.guest_shut_rcv
            && (self.peer_free() as usize).min(MAX_PKT_BUF_SIZE as usize) > self.from_host.len()
    }

    /// Whether [`Connection::take_rx`] has something for the guest.
    pub fn has_rx(&self) -> bool {
        if self.state != ConnState::Established {
            return false;
        }
        !self.from_host.is_empty()
            || self.credit_update_wanted
            || (self.host_eof && !self.shutdown_sent)
    }

    /// The next packet for the guest on this connection, with at most
    /// `max_data` payload bytes: data, else a credit update, else the
    /// SHUTDOWN that says the host closed its end.
    pub fn take_rx(&mut self, guest_cid: u64, max_data: u32) -> Option<(PacketHeader, Vec<u8>)> {
        if self.state != ConnState::Established {
            return None;
        }
        if !self.from_host.is_empty() && max_data > 0 {
            let n = self.from_host.len().min(max_data as usize);
            let data: Vec<u8> = self.from_host.drain(..n).collect();
            self.tx_cnt += Wrapping(n as u32);
            self.credit_update_wanted = false;
            return Some((self.header(guest_cid, OP_RW, 0), data));
        }
        if self.credit_update_wanted {
            self.credit_update_wanted = false;
            return Some((self.header(guest_cid, OP_CREDIT_UPDATE, 0), Vec::new()));
        }
        if self.host_eof && self.from_host.is_empty() && !self.shutdown_sent {
            self.shutdown_sent = true;
            return Some((
                self.header(guest_cid, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND),
                Vec::new(),
            ));
        }
        None
    }

    /// Guest bytes received and forwarded (for tests and metrics).
    pub fn counts(&self) -> (u32, u32) {
        (self.rx_cnt.0, self.fwd_cnt.0)
    }
}
