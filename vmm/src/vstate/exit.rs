//! Why a VM stops running, and how devices ask for it.
//!
//! A vCPU thread returns an [`ExitReason`] when the guest can no longer be
//! run (reset, triple fault, power-off) or when the VMM stopped it. Devices
//! that end the VM (the i8042 reset line, a test's exit port) do not return
//! anything through the bus: they post the reason on the VM's shared
//! [`ExitRequest`], which the vCPU run loop checks after every IO/MMIO exit
//! and which the VMM's event loop can poll through its `EventFd`.

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Why a vCPU stopped running the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 command 0xFE, or
    /// `KVM_SYSTEM_EVENT_RESET`). Linux `reboot` with `reboot=k` ends here;
    /// a microVM treats it as "the guest is done".
    Reset,
    /// The guest powered off (`KVM_SYSTEM_EVENT_SHUTDOWN`).
    Poweroff,
    /// The guest crashed (`KVM_SYSTEM_EVENT_CRASH`).
    Crash,
    /// Triple fault (`KVM_EXIT_SHUTDOWN`): the vCPU cannot continue.
    TripleFault,
    /// `hlt` with interrupts handled in user space (no in-kernel irqchip).
    Halted,
    /// The VMM stopped the vCPU.
    Stopped,
    /// A device ended the VM with this status (e.g. a test exit port).
    Device(u32),
}

/// A VM-wide "stop with this reason" flag that devices set.
#[derive(Debug)]
pub struct ExitRequest {
    pending: AtomicBool,
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitRequest {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            pending: AtomicBool::new(false),
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Post `reason`. The first request wins: a guest that resets and then
    /// keeps writing cannot change why it stopped.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
            self.pending.store(true, Ordering::Release);
            // The counter saturates only after 2^64-2 writes; a failed write
            // (EAGAIN) would mean the event is already signalled.
            let _ = self.evt.write(1);
        }
    }

    /// The posted reason, if any (cheap when none is: one atomic load).
    pub fn pending(&self) -> Option<ExitReason> {
        if !self.pending.load(Ordering::Acquire) {
            return None;
        }
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Readable once a reason has been posted (for the VMM's epoll loop).
    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins_and_signals_the_eventfd() {
        let r = ExitRequest::new().expect("exit request");
        assert_eq!(r.pending(), None);
        assert!(r.event_fd().read().is_err(), "not signalled yet");
        r.request(ExitReason::Reset);
        r.request(ExitReason::Device(3));
        assert_eq!(r.pending(), Some(ExitReason::Reset));
        assert_eq!(r.event_fd().read().expect("signalled"), 1);
    }
}
