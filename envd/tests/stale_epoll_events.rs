//! envd's reactor survives what gVisor's restore does to epoll.
//!
//! After `runsc restore`, gVisor marks every saved epoll interest ready,
//! deleted ones included, so the first `epoll_wait` returns events carrying
//! the `data` of registrations removed before the checkpoint. tokio reads
//! that `data` as a pointer to a freed registration; envd crashed or hung
//! on resume (issue 14). The patched mio (envd/vendor/mio/PATCHES.md)
//! drops events whose token is not registered. These tests plant such an
//! event the way the restored sentry presents it — an interest in the
//! reactor's epoll instance that mio never registered — and check it never
//! reaches the program, while genuine events still do.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

/// A pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 succeeded, so both are open descriptors we now own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Put `fd` into epoll instance `ep` with `data`, behind mio's back: what a
/// resurrected interest looks like from the program's side.
fn plant(ep: RawFd, fd: RawFd, data: u64) {
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLHUP) as u32,
        u64: data,
    };
    // SAFETY: both descriptors are open and `event` outlives the call.
    let rc = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut event) };
    assert_eq!(rc, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
}

fn tokens(poll: &mut Poll) -> Vec<Token> {
    let mut events = Events::with_capacity(16);
    poll.poll(&mut events, Some(Duration::from_millis(100)))
        .expect("poll");
    events.iter().map(|e| e.token()).collect()
}

#[test]
fn an_event_for_a_token_never_registered_is_dropped() {
    let mut poll = Poll::new().expect("poll");
    let (stale_read, stale_write) = pipe();
    // A pipe whose writer is gone reports EPOLLHUP forever, like the pipes
    // of exited commands did after a restore.
    drop(stale_write);
    plant(poll.as_raw_fd(), stale_read.as_raw_fd(), 0xdead_beef);

    let (live_read, mut live_write) = {
        let (r, w) = pipe();
        (r, std::fs::File::from(w))
    };
    poll.registry()
        .register(
            &mut SourceFd(&live_read.as_raw_fd()),
            Token(7),
            Interest::READABLE,
        )
        .expect("register");
    live_write.write_all(b"x").expect("write");

    assert_eq!(tokens(&mut poll), vec![Token(7)]);
}

#[test]
fn an_event_for_a_deregistered_token_is_dropped_and_a_reused_token_still_works() {
    let mut poll = Poll::new().expect("poll");
    let (old_read, old_write) = pipe();
    poll.registry()
        .register(
            &mut SourceFd(&old_read.as_raw_fd()),
            Token(1),
            Interest::READABLE,
        )
        .expect("register");
    poll.registry()
        .deregister(&mut SourceFd(&old_read.as_raw_fd()))
        .expect("deregister");
    drop(old_write);
    // The deleted interest comes back, as after a restore.
    plant(poll.as_raw_fd(), old_read.as_raw_fd(), 1);
    assert_eq!(
        tokens(&mut poll),
        Vec::<Token>::new(),
        "a stale event got through"
    );

    // tokio reuses addresses: a new registration may get the old token.
    // Then the stale event is a spurious wake-up of a live registration,
    // which is harmless and must not be filtered.
    let (new_read, mut new_write) = {
        let (r, w) = pipe();
        (r, std::fs::File::from(w))
    };
    poll.registry()
        .register(
            &mut SourceFd(&new_read.as_raw_fd()),
            Token(1),
            Interest::READABLE,
        )
        .expect("register");
    new_write.write_all(b"x").expect("write");
    let got = tokens(&mut poll);
    assert!(
        !got.is_empty() && got.iter().all(|t| *t == Token(1)),
        "{got:?}"
    );
}

#[test]
fn a_reregistered_fd_reports_under_its_new_token_only() {
    let mut poll = Poll::new().expect("poll");
    let (read, write) = pipe();
    let mut write = std::fs::File::from(write);
    let fd = read.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&fd), Token(3), Interest::READABLE)
        .expect("register");
    poll.registry()
        .reregister(&mut SourceFd(&fd), Token(4), Interest::READABLE)
        .expect("reregister");
    // Token 3 is gone: an interest carrying it is stale.
    let (stale_read, stale_write) = pipe();
    drop(stale_write);
    plant(poll.as_raw_fd(), stale_read.as_raw_fd(), 3);
    write.write_all(b"x").expect("write");
    assert_eq!(tokens(&mut poll), vec![Token(4)]);
}
