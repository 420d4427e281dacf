//! Firecracker's "hybrid vsock" host side: guest stream connections
//! spliced to unix sockets, every socket non-blocking.
//!
//! - Host-initiated: a host process connects to the listening socket at
//!   `uds_path` and writes `CONNECT <port>\n` (at most
//!   [`MAX_CONNECT_LINE`] bytes, read one byte at a time so no data after
//!   the line is consumed). The muxer picks a host port (from 2^30 up),
//!   sends the guest an OP_REQUEST to `<port>`, and on the guest's
//!   OP_RESPONSE writes `OK <host_port>\n` to the host; from then on the
//!   stream is spliced. A guest RST instead closes the host stream. A bad
//!   line closes it with nothing written.
//! - Guest-initiated: an OP_REQUEST to host port `P` connects to the unix
//!   socket `<uds_path>_<P>`; OP_RESPONSE if it accepts, OP_RST if not.
//!
//! The muxer owns an epoll set of its sockets — the listener, streams
//! still sending their CONNECT line, and each connection's stream for the
//! events it can act on now ([`Connection::wanted_events`], refreshed by
//! [`VsockMuxer::update_interest`] after every pass) — whose descriptor
//! ([`VsockMuxer::epoll_fd`]) the VMM's event loop watches: it is
//! readable exactly when a pass would find work, so an idle muxer costs
//! nothing and a busy one is served at once.
//!
//! Packets to the guest wait here until the device has an RX buffer:
//! control packets (REQUEST, RESPONSE, RST) in a bounded queue, data and
//! credit updates in their connection. The device stops taking TX packets
//! while the control queue is full, so a guest that never supplies RX
//! buffers cannot make the VMM grow memory without bound.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::super::HOST_CID;
use super::super::connection::{ConnState, Connection};
use super::super::packet::{
    OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
    PacketHeader, TYPE_STREAM,
};

/// Longest `CONNECT <port>\n` line accepted.
pub const MAX_CONNECT_LINE: usize = 32;
/// Most connections (established or being set up) at a time.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host connections that have not yet sent their CONNECT line.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Control packets queued for the guest before TX processing pauses.
pub const MAX_PENDING_RX: usize = 512;
/// First host port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// `(host port, guest port)`.
type ConnKey = (u32, u32);

/// Counters (for metrics and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MuxerCounters {
    /// Packets dropped for a wrong source or destination CID.
    pub bad_cid: u64,
    /// RSTs sent to the guest.
    pub rst_sent: u64,
    /// Host connections closed for a bad CONNECT line.
    pub bad_handshake: u64,
    /// epoll_ctl calls that failed (the socket is then served only when
    /// something else wakes the muxer).
    pub epoll_errors: u64,
}

#[derive(Debug)]
pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// The sockets' epoll set (see the module doc).
    epoll: Epoll,
    handshakes: Vec<(UnixStream, Vec<u8>)>,
    conns: HashMap<ConnKey, Connection>,
    control: VecDeque<PacketHeader>,
    next_local_port: u32,
    pub counters: MuxerCounters,
}

impl VsockMuxer {
    /// Listen at `uds_path`; the path must not exist (a socket path in use
    /// is an error, not something to take over).
    pub fn new(guest_cid: u64, uds_path: &Path) -> io::Result<Self> {
        let listener = crate::uds::listen(uds_path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on vsock socket {}: {e}", uds_path.display()),
            )
        })?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let fd = listener.as_raw_fd();
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, fd as u64),
        )?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            handshakes: Vec::new(),
            conns: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            counters: MuxerCounters::default(),
        })
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Readable when [`VsockMuxer::poll_host`] has work (see the module
    /// doc).
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Bring the epoll set in line with what each connection can act on
    /// now. Call after every pass over TX, the host sockets and RX (a
    /// closed stream left the set by itself).
    pub fn update_interest(&mut self) {
        for conn in self.conns.values_mut() {
            let want = conn.wanted_events();
            if want == conn.watched {
                continue;
            }
            let fd = conn.stream.as_raw_fd();
            let op = if conn.watched.is_empty() {
                ControlOperation::Add
            } else if want.is_empty() {
                ControlOperation::Delete
            } else {
                ControlOperation::Modify
            };
            match self.epoll.ctl(op, fd, EpollEvent::new(want, fd as u64)) {
                Ok(()) => conn.watched = want,
                Err(_) => self.counters.epoll_errors += 1,
            }
        }
    }

    fn unwatch(&mut self, fd: RawFd) {
        if self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            .is_err()
        {
            self.counters.epoll_errors += 1;
        }
    }

    /// Live connections (any state).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether the device should stop taking TX packets for now.
    pub fn rx_backlogged(&self) -> bool {
        self.control.len() >= MAX_PENDING_RX
    }

    /// Drop every connection (their host streams close) and every queued
    /// packet: device reset and snapshot restore.
    pub fn reset(&mut self) {
        self.conns.clear();
        self.handshakes.clear();
        self.control.clear();
    }

    fn header(&self, local_port: u32, peer_port: u32, op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: local_port,
            dst_port: peer_port,
            type_: TYPE_STREAM,
            op,
            ..PacketHeader::default()
        }
    }

    fn send_rst(&mut self, local_port: u32, peer_port: u32) {
        self.counters.rst_sent += 1;
        let h = self.header(local_port, peer_port, OP_RST);
        self.control.push_back(h);
    }

    /// Remove a connection and tell the guest.
    fn kill(&mut self, key: ConnKey) {
        if self.conns.remove(&key).is_some() {
            self.send_rst(key.0, key.1);
        }
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|&(l, _)| l == p) {
                return p;
            }
        }
    }

    /// A packet the guest sent (already parsed and length-checked).
    pub fn recv_from_guest(&mut self, hdr: &PacketHeader, data: &[u8]) {
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.guest_cid {
            self.counters.bad_cid += 1;
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            self.conns.remove(&key);
            if hdr.op != OP_RST {
                self.send_rst(key.0, key.1);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(hdr),
                OP_RST => {}
                _ => self.send_rst(key.0, key.1),
            }
            return;
        };
        conn.update_peer_credit(hdr);
        match (hdr.op, conn.state) {
            (OP_RESPONSE, ConnState::LocalInit) => {
                if conn.establish_local().is_err() {
                    self.kill(key);
                }
            }
            (OP_RST, _) => {
                self.conns.remove(&key);
            }
            (OP_SHUTDOWN, ConnState::Established) => {
                conn.recv_shutdown(hdr.flags);
                let gone = conn.flush_to_host().is_err();
                if gone || conn.guest_fully_shut() {
                    // Both directions closed: the connection is over; the
                    // RST is the guest's confirmation.
                    self.kill(key);
                }
            }
            (OP_RW, ConnState::Established) => {
                if conn.recv_rw(data).is_err() || conn.flush_to_host().is_err() {
                    self.kill(key);
                }
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, ConnState::Established) => conn.want_credit_update(),
            // REQUEST on a live connection, RESPONSE when not waiting for
            // one, data before the handshake, unknown ops.
            _ => self.kill(key),
        }
    }

    fn guest_connect(&mut self, hdr: &PacketHeader) {
        let (local, peer) = (hdr.dst_port, hdr.src_port);
        if self.conns.len() >= MAX_CONNECTIONS {
            return self.send_rst(local, peer);
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{local}"));
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => return self.send_rst(local, peer),
        };
        let mut conn = Connection::new_peer(stream, local, peer);
        conn.update_peer_credit(hdr);
        let resp = conn.header(self.guest_cid, OP_RESPONSE, 0);
        self.conns.insert((local, peer), conn);
        self.control.push_back(resp);
    }

    /// Accept host connections, read CONNECT lines, move data between the
    /// host streams and the connections' buffers. Never blocks.
    pub fn poll_host(&mut self) {
        self.accept();
        self.read_handshakes();
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if conn.flush_to_host().is_err() || conn.fill_from_host().is_err() {
                self.kill(key);
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.handshakes.len() >= MAX_PENDING_HANDSHAKES
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue; // dropped: closed
                    }
                    let fd = stream.as_raw_fd();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, fd as u64),
                        )
                        .is_err()
                    {
                        // Unwatched, its line would only be read when
                        // something else wakes the muxer: refuse it.
                        self.counters.epoll_errors += 1;
                        continue;
                    }
                    self.handshakes.push((stream, Vec::new()));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    fn read_handshakes(&mut self) {
        let mut i = 0;
        while i < self.handshakes.len() {
            let (stream, line) = &mut self.handshakes[i];
            let outcome = loop {
                let mut b = [0u8; 1];
                match stream.read(&mut b) {
                    Ok(0) => break Some(None),
                    Ok(_) if b[0] == b'\n' => break Some(parse_connect(line)),
                    Ok(_) if line.len() >= MAX_CONNECT_LINE => break Some(None),
                    Ok(_) => line.push(b[0]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                    Err(_) => break Some(None),
                }
            };
            match outcome {
                None => i += 1,
                Some(result) => {
                    let (stream, _) = self.handshakes.swap_remove(i);
                    // A connection's stream is watched for what it wants
                    // (update_interest), from nothing.
                    self.unwatch(stream.as_raw_fd());
                    match result {
                        Some(port) if self.conns.len() < MAX_CONNECTIONS => {
                            let local = self.alloc_local_port();
                            let mut conn = Connection::new_local(stream, local, port);
                            let req = conn.header(self.guest_cid, OP_REQUEST, 0);
                            self.conns.insert((local, port), conn);
                            self.control.push_back(req);
                        }
                        _ => self.counters.bad_handshake += 1,
                    }
                }
            }
        }
    }

    /// Whether [`VsockMuxer::next_rx`] has a packet.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || self.conns.values().any(Connection::has_rx)
    }

    /// The next packet for the guest, with at most `max_data` payload
    /// bytes: queued control packets first, then connection traffic.
    pub fn next_rx(&mut self, max_data: u32) -> Option<(PacketHeader, Vec<u8>)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, Vec::new()));
        }
        let guest_cid = self.guest_cid;
        self.conns
            .values_mut()
            .filter(|c| c.has_rx())
            .find_map(|c| c.take_rx(guest_cid, max_data))
    }

    /// The connection between `local_port` and `peer_port` (tests).
    pub fn connection(&self, local_port: u32, peer_port: u32) -> Option<&Connection> {
        self.conns.get(&(local_port, peer_port))
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        // Leave nothing behind: the socket file is ours.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// `CONNECT <port>` (the newline already stripped) → the port.
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    let port = s.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}
