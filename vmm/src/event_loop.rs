//! The VMM's device thread: one epoll loop (rust-vmm's `event-manager`, as
//! Firecracker runs) that serves every virtio device.
//!
//! Why a thread of its own: a vCPU that wrote QueueNotify should go back
//! into the guest at once, not wait while the device reads a disk or
//! splices a socket. KVM signals each queue's `EventFd` (an ioeventfd
//! registered by [`crate::builder::Machine`], datamatch = the queue index)
//! without even leaving the guest, and this loop does the work. The same
//! loop waits on each device's host-side descriptor
//! ([`VirtioDevice::host_event_fd`]: the vsock muxer's epoll), so nothing
//! polls on a timer: an idle microVM costs no host CPU.
//!
//! Invariants:
//! - The loop locks one device at a time and never a transport, so it can
//!   run beside a snapshot (which locks every device, then reads the
//!   transports) without a lock-order cycle; a snapshot holds the device
//!   locks while it writes guest memory, so the loop cannot touch a device
//!   whose state was already saved.
//! - A notification is consumed before it is served, so one that arrives
//!   during the service fires again; none is lost. A device that is not
//!   activated ignores notifications (the driver has not set DRIVER_OK).
//! - When the loop starts it serves every queue of every activated device
//!   once ("kick"): a restored VM may have been snapshotted between the
//!   guest's notify and the loop's service, and that request must not
//!   wait for ever.
//! - Everything that needs a system call the jail's seccomp filter does not
//!   allow (`epoll_create1`) happens in [`EventLoop::new`], which runs
//!   before the filter goes on; the thread itself only waits (`epoll_wait`),
//!   reads eventfds and does the devices' I/O.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::mmio::SharedVirtioDevice;

/// Event data of a device's host-side descriptor (queue events use their
/// queue index, which is far below).
const HOST_EVENT: u32 = u32::MAX;

/// Serve the notifications pending on `device`'s queues: each signalled
/// queue `EventFd` is read (cleared) and, if the device is activated, the
/// queue is served. Returns how many queues were signalled. The event loop
/// calls this; device-model tests call it after a QueueNotify write, as
/// the loop would.
pub fn dispatch_queue_events(device: &mut dyn VirtioDevice) -> usize {
    let mut signalled = Vec::new();
    for (i, evt) in device.queue_events().iter().enumerate() {
        // A non-blocking eventfd reads EAGAIN when it was not signalled.
        if evt.read().is_ok() {
            signalled.push(i as u32);
        }
    }
    if device.is_activated() {
        for &i in &signalled {
            device.queue_notify(i);
        }
    }
    signalled.len()
}

/// One virtio device on the loop.
struct DeviceSubscriber {
    device: SharedVirtioDevice,
}

impl DeviceSubscriber {
    fn lock(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MutEventSubscriber for DeviceSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        let device = self.device.clone();
        let mut dev = device.lock().unwrap_or_else(|e| e.into_inner());
        for (i, evt) in dev.queue_events().iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                eprintln!("error: cannot watch virtio queue {i}: {e:?}");
            }
        }
        if let Some(fd) = dev.host_event_fd()
            && let Err(e) = ops.add(Events::with_data_raw(fd, HOST_EVENT, EventSet::IN))
        {
            eprintln!("error: cannot watch a virtio device's host sockets: {e:?}");
        }
        // The kick: serve what a restored guest may have queued.
        if dev.is_activated() {
            let queues = dev.queue_events().len() as u32;
            for i in 0..queues {
                dev.queue_notify(i);
            }
            dev.handle_host_event();
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut dev = self.lock();
        if events.data() == HOST_EVENT {
            dev.handle_host_event();
        } else {
            dispatch_queue_events(&mut *dev);
        }
    }
}

/// Ends the loop: its `EventFd` is signalled by [`EventLoop::stop`].
struct StopSubscriber {
    evt: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            eprintln!("error: cannot watch the event loop's stop signal: {e:?}");
        }
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::Release);
    }
}

/// Errors setting the loop up.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create the device event loop: {0:?}")]
    Manager(event_manager::Error),
    #[error("cannot create the device event loop: {0}")]
    Io(#[from] io::Error),
}

type Manager = EventManager<Box<dyn MutEventSubscriber + Send>>;

/// The device event loop, set up and not yet running.
pub struct EventLoop {
    manager: Manager,
    stop: EventFd,
    stopped: Arc<AtomicBool>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("stop", &self.stop.as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl EventLoop {
    /// An epoll loop watching `devices`' queue and host events (and doing
    /// the start-up kick of activated devices). Call before the seccomp
    /// filter goes on.
    pub fn new(
        devices: impl IntoIterator<Item = SharedVirtioDevice>,
    ) -> Result<Self, EventLoopError> {
        let mut manager = Manager::new().map_err(EventLoopError::Manager)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stopped = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Box::new(StopSubscriber {
            evt: stop.try_clone()?,
            stopped: stopped.clone(),
        }));
        for device in devices {
            manager.add_subscriber(Box::new(DeviceSubscriber { device }));
        }
        Ok(Self {
            manager,
            stop,
            stopped,
        })
    }

    /// Run the loop on its own thread until [`RunningEventLoop::stop`].
    pub fn start(self) -> io::Result<RunningEventLoop> {
        let Self {
            mut manager,
            stop,
            stopped,
        } = self;
        let thread = std::thread::Builder::new()
            .name("vmm-devices".into())
            .spawn(move || {
                while !stopped.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        // epoll_wait itself failed (EINTR is not an error
                        // here): nothing can be served any more.
                        eprintln!("error: the device event loop failed: {e:?}");
                        break;
                    }
                }
            })?;
        Ok(RunningEventLoop {
            stop,
            thread: Some(thread),
        })
    }
}

/// The loop's thread; stopped (and joined) on [`RunningEventLoop::stop`]
/// or drop.
#[derive(Debug)]
pub struct RunningEventLoop {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl RunningEventLoop {
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = thread.join();
        }
    }
}

impl Drop for RunningEventLoop {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::devices::virtio::test_utils::DummyDevice;

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn notifications_reach_an_activated_device_on_the_loop_thread() {
        let dev = Arc::new(Mutex::new(DummyDevice::new(2)));
        let shared: SharedVirtioDevice = dev.clone();
        let running = EventLoop::new([shared])
            .expect("loop")
            .start()
            .expect("start");
        // Not activated: consumed and ignored.
        dev.lock().unwrap().queue_evts[1].write(1).unwrap();
        wait_for("the eventfd to be read", || {
            dev.lock().unwrap().queue_evts[1].read().is_err()
        });
        assert!(dev.lock().unwrap().notified.is_empty());
        // (Activated by hand: its queues were never set up by a driver.)
        dev.lock().unwrap().activated = true;
        dev.lock().unwrap().queue_evts[1].write(1).unwrap();
        wait_for("queue 1", || dev.lock().unwrap().notified == [1]);
        dev.lock().unwrap().queue_evts[0].write(3).unwrap();
        wait_for("queue 0", || dev.lock().unwrap().notified == [1, 0]);
        running.stop();
    }

    #[test]
    fn an_activated_device_is_kicked_when_the_loop_starts() {
        let dev = Arc::new(Mutex::new(DummyDevice::new(3)));
        dev.lock().unwrap().activated = true;
        let shared: SharedVirtioDevice = dev.clone();
        let ev = EventLoop::new([shared]).expect("loop");
        assert_eq!(dev.lock().unwrap().notified, vec![0, 1, 2]);
        drop(ev.start().expect("start"));
    }

    #[test]
    fn dispatch_reads_each_signalled_queue_once() {
        let mut dev = DummyDevice::new(2);
        assert_eq!(dispatch_queue_events(&mut dev), 0);
        dev.queue_evts[0].write(5).unwrap();
        assert_eq!(dispatch_queue_events(&mut dev), 1);
        assert!(dev.notified.is_empty(), "not activated");
        dev.activated = true;
        dev.queue_evts[0].write(1).unwrap();
        dev.queue_evts[1].write(1).unwrap();
        assert_eq!(dispatch_queue_events(&mut dev), 2);
        assert_eq!(dev.notified, vec![0, 1]);
        assert_eq!(dispatch_queue_events(&mut dev), 0);
    }
}
