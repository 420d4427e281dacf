//! The network of a gvisor sandbox: two network namespaces joined by a veth
//! pair, with the same addresses for every sandbox.
//!
//! ```text
//!  netns smh-<id>-h (host side)          netns smh-<id> (sandbox side)
//!  veth0 10.0.2.1/30 02:00:0a:00:02:01 ── eth0 10.0.2.2/30 02:00:0a:00:02:02
//!  the node's sockets to the guest        runsc --network=sandbox: gVisor's
//!  are created here                       netstack takes eth0 over
//! ```
//!
//! Neither namespace has a route to the root namespace, so a sandbox reaches
//! neither the host's loopback nor the host's addresses nor another
//! sandbox. Every sandbox has the same addresses and MACs, so a checkpoint
//! restores under any id. The node reaches a guest port by creating its
//! socket in the host-side namespace (a short-lived thread joins it,
//! creates the socket and exits; a socket keeps its namespace).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpSocket;

use super::runsc::{tool, tool_with_input};
use crate::runtime::{Result, RuntimeError, SandboxId};

/// The guest's address (gVisor's eth0).
pub const GUEST_ADDR: [u8; 4] = [10, 0, 2, 2];
/// The host side of the veth pair.
pub const HOST_ADDR: [u8; 4] = [10, 0, 2, 1];
const GUEST_MAC: &str = "02:00:0a:00:02:02";
const HOST_MAC: &str = "02:00:0a:00:02:01";
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The names of a sandbox's two namespaces.
#[derive(Debug, Clone)]
pub struct NetnsPair {
    /// Where the sandbox runs (`smh-<id>`).
    pub guest: String,
    /// Where the node's sockets live (`smh-<id>-h`).
    pub host: String,
}

impl NetnsPair {
    pub fn of(id: &SandboxId) -> Self {
        Self {
            guest: format!("smh-{id}"),
            host: format!("smh-{id}-h"),
        }
    }

    pub fn guest_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.guest)
    }

    pub fn host_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.host)
    }

    /// Create both namespaces and the veth pair. On error, whatever was made
    /// is left for [`NetnsPair::delete`] (the caller's clean-up).
    pub fn create(&self) -> Result<()> {
        if self.guest_path().exists() || self.host_path().exists() {
            return Err(RuntimeError::Command {
                command: "ip netns add".into(),
                detail: format!(
                    "network namespace {} or {} already exists",
                    self.guest, self.host
                ),
            });
        }
        tool("ip", &["netns", "add", &self.guest], IP_TIMEOUT)?;
        tool("ip", &["netns", "add", &self.host], IP_TIMEOUT)?;
        let host_side = format!(
            "link add veth0 address {HOST_MAC} type veth peer name eth0 address {GUEST_MAC} netns {guest}\n\
             addr add 10.0.2.1/30 dev veth0\n\
             link set lo up\n\
             link set veth0 up\n",
            guest = self.guest
        );
        tool_with_input("ip", &["-n", &self.host, "-batch", "-"], &host_side)?;
        let guest_side = "addr add 10.0.2.2/30 dev eth0\nlink set lo up\nlink set eth0 up\n";
        tool_with_input("ip", &["-n", &self.guest, "-batch", "-"], guest_side)?;
        Ok(())
    }

    /// Delete both namespaces (which destroys the veth pair). Idempotent.
    pub fn delete(&self) -> Result<()> {
        let mut left = Vec::new();
        for name in [&self.guest, &self.host] {
            let path = Path::new(NETNS_DIR).join(name);
            if !path.exists() {
                continue;
            }
            if let Err(e) = tool("ip", &["netns", "delete", name], IP_TIMEOUT) {
                // A stale file (not a mount) after a crash: remove it.
                let _ = unmount_detach(&path);
                if std::fs::remove_file(&path).is_err() {
                    left.push(format!("network namespace {name} ({e})"));
                }
            }
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(RuntimeError::Command {
                command: "ip netns delete".into(),
                detail: left.join(", "),
            })
        }
    }

    pub fn exists(&self) -> bool {
        self.guest_path().exists() || self.host_path().exists()
    }
}

fn unmount_detach(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: umount2 on a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// How a socket into the guest ends when it is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnClose {
    /// `SO_LINGER` 0: closing resets the connection (gVisor of 2022-12
    /// cannot checkpoint a sandbox with a TCP connection in any state but
    /// closed, TIME_WAIT included, and a reset leaves none).
    Reset,
    /// An ordinary close, for a caller that shuts the connection down
    /// itself (FIN first) and waits for the guest's FIN.
    Graceful,
}

/// A TCP socket created inside the network namespace at `netns`.
pub async fn socket_in(netns: &Path, on_close: OnClose) -> std::io::Result<TcpSocket> {
    let netns = netns.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-socket".into())
        .spawn(move || {
            let _ = tx.send(socket_in_blocking(&netns, on_close));
        })?;
    rx.await
        .map_err(|_| std::io::Error::other("the namespace thread died"))?
}

/// A TCP listener bound to `addr` inside the network namespace at `netns`.
pub async fn listener_in(
    netns: &Path,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpListener> {
    let netns = netns.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-listener".into())
        .spawn(move || {
            let bound = (|| {
                use std::os::fd::AsRawFd;
                let ns = std::fs::File::open(&netns)?;
                // SAFETY: setns on a valid namespace fd, affecting only
                // this thread, which ends right after.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })();
            let _ = tx.send(bound);
        })?;
    let listener = rx
        .await
        .map_err(|_| std::io::Error::other("the namespace thread died"))??;
    tokio::net::TcpListener::from_std(listener)
}

/// Runs on a thread of its own, which dies right after: joining a network
/// namespace changes the calling thread for good.
fn socket_in_blocking(netns: &Path, on_close: OnClose) -> std::io::Result<TcpSocket> {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(netns)?;
    // SAFETY: setns on a valid namespace fd, affecting only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let socket = TcpSocket::new_v4()?;
    if on_close == OnClose::Reset {
        socket.set_zero_linger()?;
    }
    socket.set_nodelay(true)?;
    Ok(socket)
}
