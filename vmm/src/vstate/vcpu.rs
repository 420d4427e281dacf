//! vCPUs: creation, boot configuration, and the run loop.
//!
//! Each vCPU runs on its own thread ([`Vcpu::start`]) in a loop around
//! `KVM_RUN`. Port-IO and MMIO exits are dispatched to the [`Bus`]es; exits
//! that end the guest (reset, triple fault, power-off) end the loop with an
//! [`ExitReason`]; anything KVM could not handle (internal error, failed
//! entry) ends it with a [`VcpuError`] that says what happened — on nested
//! PVM hosts, where guest kernel mode is emulated, `KVM_EXIT_INTERNAL_ERROR`
//! is the expected way a kernel stops, and it must be reported, not hung on.
//!
//! Pausing and stopping from another thread work as in Firecracker: the
//! controller records the request, then sends the vCPU thread a real-time
//! signal. The signal interrupts a running `KVM_RUN` (EINTR), and its
//! handler also sets `kvm_run.immediate_exit`, so a signal that lands just
//! *before* the thread enters `KVM_RUN` is not lost: the next entry returns
//! EINTR at once. The loop then looks at the request.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, Msrs,
    kvm_lapic_state, kvm_run,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestAddress;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use schema::snapshot::VcpuState;

use super::exit::{ExitReason, ExitRequest};
use super::memory::GuestMemoryMmap;
use super::persist;
use super::vm::Vm;
use crate::arch::x86_64::cpuid::{self, VcpuTopology};
use crate::arch::x86_64::regs::{self, EntryMode};
use crate::arch::x86_64::{mptable, msr};
use crate::devices::Bus;

/// Offset from SIGRTMIN of the signal that kicks vCPU threads.
pub const VCPU_RTSIG_OFFSET: i32 = 0;

/// Errors creating, configuring or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU index {index} is out of range for {count} vCPUs (max {max})")]
    BadIndex { index: u8, count: u8, max: u8 },
    #[error("KVM_CREATE_VCPU failed: {0}")]
    Create(kvm_ioctls::Error),
    #[error("cannot build CPUID for vCPU {0}: {1}")]
    Cpuid(u8, String),
    #[error("KVM_SET_CPUID2 failed: {0}")]
    SetCpuid(kvm_ioctls::Error),
    #[error("KVM_SET_MSRS failed: {0}")]
    SetMsrs(kvm_ioctls::Error),
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs; MSR {failed:#x} was refused")]
    MsrRefused {
        set: usize,
        wanted: usize,
        failed: u32,
    },
    #[error("KVM_{0} failed: {1}")]
    Registers(&'static str, kvm_ioctls::Error),
    #[error("cannot write boot structures for vCPU: {0}")]
    Boot(#[from] regs::RegsError),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("cannot spawn the vCPU thread: {0}")]
    Spawn(std::io::Error),
    #[error("KVM_RUN failed: {0}")]
    Run(kvm_ioctls::Error),
    #[error(
        "KVM_EXIT_INTERNAL_ERROR (suberror {suberror}: {}) at rip {rip:#x}, data {data:x?}",
        internal_error_name(*.suberror)
    )]
    InternalError {
        suberror: u32,
        data: Vec<u64>,
        rip: u64,
    },
    #[error("KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on cpu {cpu}")]
    FailEntry { reason: u64, cpu: u32 },
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    #[error("the vCPU did not answer a {0} request within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("the vCPU thread has already exited")]
    AlreadyExited,
    #[error("the vCPU must be paused to save its state")]
    NotPaused,
    #[error("vCPU state: {0}")]
    Persist(#[from] super::persist::PersistError),
    #[error("the vCPU thread panicked")]
    Panicked,
}

/// Human name of a `KVM_INTERNAL_ERROR_*` suberror.
pub fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "cannot deliver an event",
        kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
        _ => "unknown",
    }
}

/// How a vCPU enters the guest.
#[derive(Debug, Clone, Copy)]
pub struct BootConfig {
    /// First instruction (the kernel's ELF entry point).
    pub entry: GuestAddress,
    /// CPL of the first instruction ([`EntryMode::Kernel`] for a kernel).
    pub mode: EntryMode,
}

/// What the run loop is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

/// A state save asked of a paused vCPU thread, and its answer.
#[derive(Debug)]
enum SaveSlot {
    Idle,
    /// Save, with these MSRs.
    Requested(Vec<u32>),
    Done(Box<Result<VcpuState, VcpuError>>),
}

#[derive(Debug)]
struct ControlState {
    request: Request,
    paused: bool,
    finished: bool,
    save: SaveSlot,
}

/// Shared between a vCPU thread and its [`VcpuHandle`].
#[derive(Debug)]
struct Control {
    state: Mutex<ControlState>,
    cv: Condvar,
    /// Mirrors `state.request != Run`, read before every `KVM_RUN` so a
    /// request made before the thread first entered the guest (when no
    /// `kvm_run` was registered for the signal handler yet) is not missed.
    pending: AtomicBool,
}

impl Control {
    fn new() -> Self {
        Self {
            state: Mutex::new(ControlState {
                request: Request::Run,
                paused: false,
                finished: false,
                save: SaveSlot::Idle,
            }),
            cv: Condvar::new(),
            pending: AtomicBool::new(false),
        }
    }

    /// Record `request` (with the state lock held by the caller).
    fn set_request(&self, st: &mut ControlState, request: Request) {
        st.request = request;
        self.pending
            .store(request != Request::Run, Ordering::Release);
        self.cv.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler. Const-initialised
    /// and without a destructor, so reading it is async-signal-safe.
    static TLS_KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TLS_KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by
            // the run loop and cleared before the VcpuFd is dropped.
            unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
        }
    });
}

fn install_kick_handler() -> Result<(), VcpuError> {
    // Installed once per process; the outcome is remembered for later vCPUs.
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(SIGRTMIN() + VCPU_RTSIG_OFFSET, handle_kick))
        .map_err(VcpuError::Signal)
}

/// A vCPU not yet running.
#[derive(Debug)]
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio_bus: Bus,
    mmio_bus: Bus,
    exit: Arc<ExitRequest>,
}

impl Vcpu {
    /// Create vCPU `index` of `vm`, dispatching its exits to the buses.
    pub fn new(
        vm: &Vm,
        index: u8,
        pio_bus: Bus,
        mmio_bus: Bus,
        exit: Arc<ExitRequest>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(VcpuError::Create)?;
        Ok(Self {
            index,
            fd,
            pio_bus,
            mmio_bus,
            exit,
        })
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Give the vCPU its CPUID, boot MSRs, LAPIC wiring, and long-mode
    /// registers entering at `boot.entry`.
    ///
    /// Every vCPU gets the same registers (as in Firecracker); with the
    /// in-kernel LAPIC only vCPU 0 runs them: the others wait in
    /// wait-for-SIPI until the guest kernel starts them.
    pub fn configure(
        &self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        cpu_count: u8,
        boot: BootConfig,
    ) -> Result<(), VcpuError> {
        if cpu_count == 0 || cpu_count > mptable::MAX_SUPPORTED_CPUS || self.index >= cpu_count {
            return Err(VcpuError::BadIndex {
                index: self.index,
                count: cpu_count,
                max: mptable::MAX_SUPPORTED_CPUS,
            });
        }
        self.set_cpuid(vm.supported_cpuid(), cpu_count)?;
        self.set_boot_msrs()?;
        self.set_lint()?;

        let sregs = self
            .fd
            .get_sregs()
            .map_err(|e| VcpuError::Registers("GET_SREGS", e))?;
        let sregs = regs::long_mode_sregs(mem, sregs, boot.mode)?;
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| VcpuError::Registers("SET_SREGS", e))?;
        self.fd
            .set_regs(&regs::boot_regs(boot.entry, boot.mode))
            .map_err(|e| VcpuError::Registers("SET_REGS", e))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(|e| VcpuError::Registers("SET_FPU", e))
    }

    fn set_cpuid(&self, supported: &CpuId, cpu_count: u8) -> Result<(), VcpuError> {
        let mut cpuid = supported.clone();
        cpuid::filter_cpuid(
            cpuid.as_mut_slice(),
            VcpuTopology {
                cpu_index: self.index,
                cpu_count,
            },
        );
        self.fd.set_cpuid2(&cpuid).map_err(VcpuError::SetCpuid)
    }

    fn set_boot_msrs(&self) -> Result<(), VcpuError> {
        let entries = msr::boot_msr_entries();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|e| VcpuError::Cpuid(self.index, format!("MSR list: {e:?}")))?;
        let set = self.fd.set_msrs(&msrs).map_err(VcpuError::SetMsrs)?;
        if set != entries.len() {
            // KVM stops at the first MSR it refuses.
            let failed = entries.get(set).map_or(0, |e| e.index);
            return Err(VcpuError::MsrRefused {
                set,
                wanted: entries.len(),
                failed,
            });
        }
        Ok(())
    }

    /// Wire LINT0 to ExtINT (the PIC) and LINT1 to NMI, as the MP table says.
    fn set_lint(&self) -> Result<(), VcpuError> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const APIC_MODE_NMI: u32 = 0x4;
        const APIC_MODE_EXTINT: u32 = 0x7;
        fn get(l: &kvm_lapic_state, off: usize) -> u32 {
            let b = &l.regs[off..off + 4];
            u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
        }
        fn set(l: &mut kvm_lapic_state, off: usize, v: u32) {
            for (i, byte) in v.to_le_bytes().iter().enumerate() {
                l.regs[off + i] = *byte as libc::c_char;
            }
        }
        fn with_mode(reg: u32, mode: u32) -> u32 {
            (reg & !0x700) | (mode << 8)
        }
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| VcpuError::Registers("GET_LAPIC", e))?;
        let lvt0 = get(&lapic, APIC_LVT0);
        set(&mut lapic, APIC_LVT0, with_mode(lvt0, APIC_MODE_EXTINT));
        let lvt1 = get(&lapic, APIC_LVT1);
        set(&mut lapic, APIC_LVT1, with_mode(lvt1, APIC_MODE_NMI));
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| VcpuError::Registers("SET_LAPIC", e))
    }

    /// Run on the calling thread until the guest stops or [`Control`] asks
    /// to stop. Used by [`Vcpu::start`]'s thread; callable directly by code
    /// that owns no handle (then nothing can pause it).
    pub fn run(&mut self) -> Result<ExitReason, VcpuError> {
        self.run_with(&Control::new())
    }

    fn run_with(&mut self, control: &Control) -> Result<ExitReason, VcpuError> {
        TLS_KVM_RUN.with(|c| c.set(self.fd.get_kvm_run() as *mut kvm_run));
        let result = self.run_loop(control);
        TLS_KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        result
    }

    fn run_loop(&mut self, control: &Control) -> Result<ExitReason, VcpuError> {
        loop {
            // The request is stored before the kick is sent, and the kick
            // sets immediate_exit once the TLS pointer is in place, so
            // either this check or KVM_RUN's EINTR sees every request.
            if control.pending.load(Ordering::Acquire)
                && let Some(reason) = self.handle_request(control)
            {
                return Ok(reason);
            }
            // What to do after this exit, decided while the exit borrows fd.
            enum Next {
                Continue,
                Exit(ExitReason),
                InternalError,
                Kicked,
            }
            let next = match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => {
                        self.pio_bus.read(u64::from(port), data);
                        Next::Continue
                    }
                    VcpuExit::IoOut(port, data) => {
                        self.pio_bus.write(u64::from(port), data);
                        Next::Continue
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        self.mmio_bus.read(addr, data);
                        Next::Continue
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        self.mmio_bus.write(addr, data);
                        Next::Continue
                    }
                    VcpuExit::Hlt => Next::Exit(ExitReason::Halted),
                    VcpuExit::Shutdown => Next::Exit(ExitReason::TripleFault),
                    VcpuExit::SystemEvent(kind, data) => match kind {
                        KVM_SYSTEM_EVENT_RESET => Next::Exit(ExitReason::Reset),
                        KVM_SYSTEM_EVENT_SHUTDOWN => Next::Exit(ExitReason::Poweroff),
                        KVM_SYSTEM_EVENT_CRASH => Next::Exit(ExitReason::Crash),
                        other => {
                            return Err(VcpuError::UnexpectedExit(format!(
                                "KVM_EXIT_SYSTEM_EVENT type {other}, data {data:x?}"
                            )));
                        }
                    },
                    VcpuExit::InternalError => Next::InternalError,
                    VcpuExit::FailEntry(reason, cpu) => {
                        return Err(VcpuError::FailEntry { reason, cpu });
                    }
                    // A signal arrived while KVM was about to exit anyway.
                    VcpuExit::Intr => Next::Kicked,
                    // Interrupt window and TPR exits are only requested by
                    // user-space irqchips; EOI exits by split irqchips.
                    other => return Err(VcpuError::UnexpectedExit(format!("{other:?}"))),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Kicked,
                Err(e) => return Err(VcpuError::Run(e)),
            };
            match next {
                Next::Continue => {}
                Next::Exit(reason) => return Ok(reason),
                Next::InternalError => return Err(self.internal_error()),
                Next::Kicked => {
                    self.fd.set_kvm_immediate_exit(0);
                    if let Some(reason) = self.handle_request(control) {
                        return Ok(reason);
                    }
                }
            }
            if let Some(reason) = self.exit.pending() {
                return Ok(reason);
            }
        }
    }

    /// Look at what the controller asked; park while paused. Returns the
    /// exit reason if the loop must end.
    fn handle_request(&mut self, control: &Control) -> Option<ExitReason> {
        let mut st = control.lock();
        loop {
            match st.request {
                Request::Run => {
                    if st.paused {
                        st.paused = false;
                        control.cv.notify_all();
                    }
                    return None;
                }
                Request::Stop => return Some(ExitReason::Stopped),
                Request::Pause => {
                    if !st.paused {
                        st.paused = true;
                        control.cv.notify_all();
                    }
                    // Snapshots read the vCPU's state here, on its own
                    // thread, while it is parked.
                    if let SaveSlot::Requested(msrs) = &st.save {
                        let msrs = msrs.clone();
                        st.save = SaveSlot::Done(Box::new(self.save_state(&msrs)));
                        control.cv.notify_all();
                        continue;
                    }
                    st = control.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// Save this vCPU's KVM state (it must not be running: parked by a
    /// pause, stopped, or never started), with the MSRs in `msrs`
    /// ([`Vm::msrs_to_save`]).
    ///
    /// An IO or MMIO exit is only complete once KVM is entered again (KVM
    /// writes an `in`'s data to the register and moves RIP past the
    /// instruction then), so first enter with `immediate_exit` set: KVM
    /// completes the instruction and returns EINTR without running guest
    /// code. A string instruction may exit again; those exits are served.
    pub fn save_state(&mut self, msrs: &[u32]) -> Result<VcpuState, VcpuError> {
        self.complete_pending_exit()?;
        Ok(persist::save_vcpu(&self.fd, self.index, msrs)?)
    }

    fn complete_pending_exit(&mut self) -> Result<(), VcpuError> {
        const MAX_EXITS: usize = 64;
        for _ in 0..MAX_EXITS {
            self.fd.set_kvm_immediate_exit(1);
            let exit = match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => {
                    self.fd.set_kvm_immediate_exit(0);
                    return Err(VcpuError::Run(e));
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.pio_bus.read(u64::from(port), data);
                    Some(())
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pio_bus.write(u64::from(port), data);
                    Some(())
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.mmio_bus.read(addr, data);
                    Some(())
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio_bus.write(addr, data);
                    Some(())
                }
                Ok(VcpuExit::Intr) => None,
                Ok(other) => {
                    let what = format!("{other:?} while completing an exit for a snapshot");
                    self.fd.set_kvm_immediate_exit(0);
                    return Err(VcpuError::UnexpectedExit(what));
                }
            };
            self.fd.set_kvm_immediate_exit(0);
            if exit.is_none() {
                return Ok(());
            }
        }
        Err(VcpuError::UnexpectedExit(format!(
            "more than {MAX_EXITS} exits while completing an instruction for a snapshot"
        )))
    }

    /// Put a freshly created vCPU (never run, not configured) into a saved
    /// state instead of [`Vcpu::configure`]'s boot state.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        Ok(persist::restore_vcpu(&self.fd, state)?)
    }

    fn internal_error(&mut self) -> VcpuError {
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal`
        // is the active member of the exit union.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let rip = self.fd.get_regs().map_or(u64::MAX, |r| r.rip);
        VcpuError::InternalError {
            suberror: internal.suberror,
            data: internal.data[..n].to_vec(),
            rip,
        }
    }

    /// Run on a new thread named `vcpu<index>`.
    pub fn start(mut self) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let control = Arc::new(Control::new());
        let thread_control = Arc::clone(&control);
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || {
                let result = self.run_with(&thread_control);
                let mut st = thread_control.lock();
                st.finished = true;
                thread_control.cv.notify_all();
                drop(st);
                (result, self)
            })
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle { thread, control })
    }
}

/// Controls a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    thread: JoinHandle<(Result<ExitReason, VcpuError>, Vcpu)>,
    control: Arc<Control>,
}

/// How often a request is re-signalled while waiting for the vCPU to
/// acknowledge it (the first signal is enough; this is insurance).
const KICK_INTERVAL: Duration = Duration::from_millis(5);

impl VcpuHandle {
    fn kick(&self) {
        // The thread is joined only by `stop`/`join`, which consume self,
        // so its pthread handle is valid here. A failure means the thread is
        // gone, which the callers detect through `finished`.
        let _ = self.thread.kill(SIGRTMIN() + VCPU_RTSIG_OFFSET);
    }

    /// Set `request` and kick until `done(state)` holds or `timeout` passes.
    fn request_and_wait(
        &self,
        request: Request,
        what: &'static str,
        timeout: Duration,
        done: impl Fn(&ControlState) -> bool,
    ) -> Result<(), VcpuError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.control.lock();
        self.control.set_request(&mut st, request);
        loop {
            if done(&st) {
                return Ok(());
            }
            if st.finished {
                return Err(VcpuError::AlreadyExited);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VcpuError::Timeout(what, timeout));
            }
            drop(st);
            self.kick();
            st = self.control.lock();
            let wait = KICK_INTERVAL.min(deadline - now);
            st = self
                .control
                .cv
                .wait_timeout(st, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Stop running guest code; returns once the vCPU is parked.
    pub fn pause(&self, timeout: Duration) -> Result<(), VcpuError> {
        self.request_and_wait(Request::Pause, "pause", timeout, |s| s.paused)
    }

    /// Save the state of a paused vCPU (see [`Vcpu::save_state`]); the
    /// vCPU thread does it and stays parked.
    pub fn save_state(&self, msrs: &[u32], timeout: Duration) -> Result<VcpuState, VcpuError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.control.lock();
        if !st.paused || st.request != Request::Pause {
            return Err(VcpuError::NotPaused);
        }
        st.save = SaveSlot::Requested(msrs.to_vec());
        self.control.cv.notify_all();
        loop {
            if matches!(st.save, SaveSlot::Done(_))
                && let SaveSlot::Done(r) = std::mem::replace(&mut st.save, SaveSlot::Idle)
            {
                return *r;
            }
            if st.finished {
                return Err(VcpuError::AlreadyExited);
            }
            let now = Instant::now();
            if now >= deadline {
                st.save = SaveSlot::Idle;
                return Err(VcpuError::Timeout("save state", timeout));
            }
            st = self
                .control
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Let a paused vCPU run again.
    pub fn resume(&self, timeout: Duration) -> Result<(), VcpuError> {
        let st = self.control.lock();
        if !st.paused {
            return Ok(());
        }
        drop(st);
        self.request_and_wait(Request::Run, "resume", timeout, |s| !s.paused)
    }

    /// Whether the vCPU thread has returned (guest exit, error or stop).
    pub fn is_finished(&self) -> bool {
        self.control.lock().finished
    }

    /// Stop the vCPU (running or paused) and return how its loop ended: the
    /// guest's own exit if it came first, else [`ExitReason::Stopped`].
    pub fn stop(self, timeout: Duration) -> Result<(ExitReason, Vcpu), VcpuError> {
        match self.request_and_wait(Request::Stop, "stop", timeout, |s| s.finished) {
            Ok(()) | Err(VcpuError::AlreadyExited) => self.join(),
            Err(e) => Err(e),
        }
    }

    /// Wait up to `timeout` for the guest to end the loop by itself; if it
    /// does not, stop it and return [`VcpuError::Timeout`]. Never hangs on a
    /// guest that spins.
    pub fn wait(self, timeout: Duration) -> Result<(ExitReason, Vcpu), VcpuError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.control.lock();
        while !st.finished {
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                // Best effort: the error reported is the timeout.
                let _ = self.stop(Duration::from_secs(5));
                return Err(VcpuError::Timeout("exit", timeout));
            }
            st = self
                .control
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        drop(st);
        self.join()
    }

    fn join(self) -> Result<(ExitReason, Vcpu), VcpuError> {
        match self.thread.join() {
            Ok((Ok(reason), vcpu)) => Ok((reason, vcpu)),
            Ok((Err(e), _)) => Err(e),
            Err(_) => Err(VcpuError::Panicked),
        }
    }
}
