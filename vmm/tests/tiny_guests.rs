//! Tiny test guests on real KVM: hand-assembled machine code placed in guest
//! memory and entered in 64-bit long mode by the VMM's own set-up code.
//!
//! Each guest runs twice: entered at CPL0 (as a kernel is) and at CPL3
//! (user segments, user pages, IOPL 3). On a plain KVM host both run
//! natively. On nested-PVM hosts (this project's dev/CI machines) guest
//! kernel mode is emulated instruction by instruction; the CPL0 variants
//! still pass there as long as the emulator knows every instruction used,
//! which is why the payloads stick to mov/out/in/inc/jmp. Where a CPL0 run
//! stops with KVM_EXIT_INTERNAL_ERROR the test says so (`SKIP`) and the CPL3
//! run still has to pass.
//!
//! Without /dev/kvm every test prints `SKIP <test>: <reason>` and passes.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Asm, CODE, EXIT_PORT, ExitPort, MEM, Sink, kvm_or_skip};
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::x86_64::regs::EntryMode;
use vmm::builder::{Machine, MachineConfig};
use vmm::devices::BusDevice;
use vmm::vstate::exit::ExitReason;
use vmm::vstate::vcpu::{Vcpu, VcpuError};

/// An MMIO address inside the 1 GiB the boot page tables map, but past the
/// end of guest RAM, so accesses exit to the VMM.
const TEST_MMIO: u64 = 0x2000_0000;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Records MMIO writes.
#[derive(Default)]
struct MmioRecorder {
    writes: Vec<(u64, Vec<u8>)>,
}
impl BusDevice for MmioRecorder {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

/// Tests in this file run one at a time: the leak test measures the
/// process's descriptors and RSS, which a concurrent test's VM would move.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Guest {
    machine: Machine,
    sink: Sink,
    mmio: Arc<Mutex<MmioRecorder>>,
    start: Instant,
}

fn build(kvm: &Kvm, code: &[u8]) -> Guest {
    let start = Instant::now();
    let sink = Sink::default();
    let mut machine =
        Machine::new(kvm, MachineConfig::new(1, MEM), Box::new(sink.clone())).expect("machine");
    let exit = machine.exit.clone();
    machine
        .pio_bus
        .insert(Arc::new(Mutex::new(ExitPort::new(exit))), EXIT_PORT, 1)
        .expect("exit port");
    let mmio = Arc::new(Mutex::new(MmioRecorder::default()));
    machine
        .mmio_bus
        .insert(mmio.clone(), TEST_MMIO, 0x1000)
        .expect("mmio device");
    machine
        .memory
        .write_slice(code, GuestAddress(CODE))
        .expect("payload");
    Guest {
        machine,
        sink,
        mmio,
        start,
    }
}

fn vcpu(guest: &Guest, mode: EntryMode) -> Vcpu {
    let mut v = guest
        .machine
        .create_vcpus(GuestAddress(CODE), mode)
        .expect("vcpus");
    v.remove(0)
}

/// Run a guest to its end; `Err` carries the VMM's error.
fn run(guest: &Guest, mode: EntryMode) -> Result<ExitReason, VcpuError> {
    let handle = vcpu(guest, mode).start().expect("start");
    handle.wait(TIMEOUT).map(|(r, _)| r)
}

/// Run `body` for each entry mode. A CPL0 run that KVM cannot emulate (PVM)
/// is reported and skipped; a CPL3 run must pass.
fn both_modes(test: &str, body: impl Fn(EntryMode) -> Result<(), VcpuError>) {
    for mode in [EntryMode::Kernel, EntryMode::User] {
        match body(mode) {
            Ok(()) => eprintln!("{test} [{mode:?}]: ok"),
            Err(e @ VcpuError::InternalError { .. }) if mode == EntryMode::Kernel => {
                eprintln!("SKIP {test} [{mode:?}]: KVM cannot run guest kernel mode here: {e}")
            }
            Err(e) => panic!("{test} [{mode:?}]: {e}"),
        }
    }
}

#[test]
fn first_instruction_writes_to_serial() {
    let _serial = serial();
    let Some(kvm) = kvm_or_skip("first_instruction_writes_to_serial") else {
        return;
    };
    both_modes("first_instruction_writes_to_serial", |mode| {
        let code = Asm::default().print(b"!").exit(0).0;
        let guest = build(&kvm, &code);
        let reason = run(&guest, mode)?;
        assert_eq!(reason, ExitReason::Device(0));
        assert_eq!(guest.sink.text(), b"!");
        let first = guest.sink.first.lock().expect("sink").expect("a byte");
        eprintln!(
            "  VM set-up to first guest instruction (first serial byte) [{mode:?}]: {:?}",
            first - guest.start
        );
        Ok(())
    });
}

#[test]
fn guest_prints_ok_through_the_16550() {
    let _serial = serial();
    let Some(kvm) = kvm_or_skip("guest_prints_ok_through_the_16550") else {
        return;
    };
    both_modes("guest_prints_ok_through_the_16550", |mode| {
        let code = Asm::default().print(b"OK\n").exit(7).0;
        let guest = build(&kvm, &code);
        assert_eq!(run(&guest, mode)?, ExitReason::Device(7));
        assert_eq!(guest.sink.text(), b"OK\n");
        Ok(())
    });
}

#[test]
fn i8042_reset_ends_the_run_loop() {
    let _serial = serial();
    let Some(kvm) = kvm_or_skip("i8042_reset_ends_the_run_loop") else {
        return;
    };
    both_modes("i8042_reset_ends_the_run_loop", |mode| {
        let code = Asm::default().mov_al(0xfe).out_imm_al(0x64).hang().0;
        let guest = build(&kvm, &code);
        assert_eq!(run(&guest, mode)?, ExitReason::Reset);
        Ok(())
    });
}

#[test]
fn mmio_write_reaches_the_bus_device() {
    let _serial = serial();
    let Some(kvm) = kvm_or_skip("mmio_write_reaches_the_bus_device") else {
        return;
    };
    both_modes("mmio_write_reaches_the_bus_device", |mode| {
        let code = Asm::default()
            .mov_rax(TEST_MMIO + 0x10)
            .store32_rax(0xdead_beef)
            .exit(1)
            .0;
        let guest = build(&kvm, &code);
        assert_eq!(run(&guest, mode)?, ExitReason::Device(1));
        let writes = guest.mmio.lock().expect("mmio").writes.clone();
        assert_eq!(writes, vec![(0x10, 0xdead_beefu32.to_le_bytes().to_vec())]);
        Ok(())
    });
}

#[test]
fn busy_guest_pauses_resumes_and_stops() {
    let _serial = serial();
    let Some(kvm) = kvm_or_skip("busy_guest_pauses_resumes_and_stops") else {
        return;
    };
    both_modes("busy_guest_pauses_resumes_and_stops", |mode| {
        let code = Asm::default().spin_counting().0;
        let guest = build(&kvm, &code);
        let handle = vcpu(&guest, mode).start()?;
        std::thread::sleep(Duration::from_millis(50));
        if handle.is_finished() {
            return handle.wait(TIMEOUT).map(|_| panic!("busy guest exited"));
        }
        let bound = Duration::from_secs(1);
        let t = Instant::now();
        handle.pause(bound)?;
        let paused_in = t.elapsed();
        handle.resume(bound)?;
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        let (reason, vcpu) = handle.stop(bound)?;
        let stopped_in = t.elapsed();
        assert_eq!(reason, ExitReason::Stopped);
        let rcx = vcpu.fd().get_regs().expect("regs").rcx;
        eprintln!(
            "  [{mode:?}] paused in {paused_in:?}, stopped in {stopped_in:?}, loop count {rcx}"
        );
        assert!(rcx > 0, "the guest ran");
        Ok(())
    });
}

/// A guest-kernel instruction that cannot complete ends the run loop with
/// an error or an exit reason — never a hang. On plain KVM, `xsave` with
/// CR4.OSXSAVE clear raises #UD, and with no IDT that becomes a triple
/// fault; on nested PVM the instruction emulator stops with
/// KVM_EXIT_INTERNAL_ERROR (as it does on a real kernel's FPU set-up).
#[test]
fn unrunnable_kernel_instruction_is_reported_not_hung() {
    let _serial = serial();
    let Some(kvm) = kvm_or_skip("unrunnable_kernel_instruction_is_reported_not_hung") else {
        return;
    };
    // mov rax, CODE+0x1000; xsave [rax]; then report success (should not happen)
    let mut code = Asm::default().mov_rax(CODE + 0x1000).0;
    code.extend_from_slice(&[0x0f, 0xae, 0x20]);
    let code = Asm(code).exit(9).0;
    let guest = build(&kvm, &code);
    let t = Instant::now();
    match run(&guest, EntryMode::Kernel) {
        Ok(ExitReason::TripleFault) => eprintln!(
            "  xsave at CPL0: triple fault (native KVM) in {:?}",
            t.elapsed()
        ),
        Err(e @ VcpuError::InternalError { .. }) => {
            eprintln!(
                "  xsave at CPL0: {e} (emulated kernel mode) in {:?}",
                t.elapsed()
            )
        }
        other => panic!("xsave at CPL0 ended with {other:?}"),
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// 50 create/run/destroy cycles leave no file descriptors or memory behind.
#[test]
fn create_destroy_cycles_leak_nothing() {
    let _serial = serial();
    let Some(kvm) = kvm_or_skip("create_destroy_cycles_leak_nothing") else {
        return;
    };
    let code = Asm::default().print(b"x").exit(0).0;
    let cycle = || {
        let guest = build(&kvm, &code);
        assert_eq!(
            run(&guest, EntryMode::User).expect("run"),
            ExitReason::Device(0)
        );
    };
    // Warm up (signal handler, allocator arenas, thread stacks).
    for _ in 0..5 {
        cycle();
    }
    let (fds, rss) = (open_fds(), rss_kib());
    let t = Instant::now();
    for _ in 0..50 {
        cycle();
    }
    let per_cycle = t.elapsed() / 50;
    let (fds_after, rss_after) = (open_fds(), rss_kib());
    eprintln!(
        "  50 cycles: {per_cycle:?} each; fds {fds} -> {fds_after}; RSS {rss} -> {rss_after} KiB"
    );
    // Allow a little slack (the runner's own threads); a leak would be
    // >= 50.
    assert!(fds_after <= fds + 20, "fd leak: {fds} -> {fds_after}");
    assert!(
        rss_after <= rss + 8 * 1024,
        "memory leak: {rss} -> {rss_after} KiB"
    );
}

/// Extend the boot page tables (which map the first GiB) with the fourth
/// GiB, where the virtio-mmio windows are: PDPT entry 3 → a page
/// directory of 2 MiB pages at [`GAP_PD`]. Call after the vCPU is
/// configured (that writes the boot tables).
fn map_the_mmio_gap(mem: &vmm::vstate::memory::GuestMemoryMmap, mode: EntryMode) {
    const GAP_PD: u64 = 0x40_0000;
    let user = if mode == EntryMode::User { 1 << 2 } else { 0 };
    for i in 0..512u64 {
        let page = (3u64 << 30) + (i << 21);
        mem.write_obj(page | 0x83 | user, GuestAddress(GAP_PD + i * 8))
            .expect("gap page directory");
    }
    mem.write_obj(
        GAP_PD | 0x3 | user,
        GuestAddress(vmm::arch::x86_64::layout::PDPTE_START + 3 * 8),
    )
    .expect("PDPT entry");
}

/// A virtio device that only records which queues were notified, and on
/// which thread.
struct NotifyRecorder {
    queues: Vec<virtio_queue::Queue>,
    queue_evts: Vec<vmm_sys_util::eventfd::EventFd>,
    irq: vmm::devices::virtio::IrqTrigger,
    activated: bool,
    notified: Vec<(u32, Option<String>)>,
}

impl vmm::devices::virtio::VirtioDevice for NotifyRecorder {
    fn device_type(&self) -> u32 {
        42
    }
    fn avail_features(&self) -> u64 {
        1 << 32
    }
    fn acked_features(&self) -> u64 {
        1 << 32
    }
    fn set_acked_features(&mut self, _: u64) {}
    fn queues(&self) -> &[virtio_queue::Queue] {
        &self.queues
    }
    fn queues_mut(&mut self) -> &mut [virtio_queue::Queue] {
        &mut self.queues
    }
    fn interrupt(&self) -> &vmm::devices::virtio::IrqTrigger {
        &self.irq
    }
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(
        &mut self,
        _: vmm::vstate::memory::GuestMemoryMmap,
    ) -> Result<(), vmm::devices::virtio::ActivateError> {
        Ok(())
    }
    /// Set by hand: the guest below notifies without a driver's set-up.
    fn is_activated(&self) -> bool {
        self.activated
    }
    fn reset(&mut self) {}
    fn queue_events(&self) -> &[vmm_sys_util::eventfd::EventFd] {
        &self.queue_evts
    }
    fn queue_notify(&mut self, index: u32) {
        let thread = std::thread::current().name().map(str::to_owned);
        self.notified.push((index, thread));
    }
}

#[test]
fn queue_notify_is_served_by_the_event_loop_through_an_ioeventfd() {
    let _serial = serial();
    let Some(kvm) = kvm_or_skip("queue_notify_is_served_by_the_event_loop_through_an_ioeventfd")
    else {
        return;
    };
    both_modes(
        "queue_notify_is_served_by_the_event_loop_through_an_ioeventfd",
        |mode| {
            let dev = Arc::new(Mutex::new(NotifyRecorder {
                queues: (0..2)
                    .map(|_| <virtio_queue::Queue as virtio_queue::QueueT>::new(16).expect("queue"))
                    .collect(),
                queue_evts: vmm::devices::virtio::new_queue_events(2).expect("eventfds"),
                irq: vmm::devices::virtio::IrqTrigger::new().expect("irq"),
                activated: false,
                notified: Vec::new(),
            }));
            // The guest writes QueueNotify = 1 (a queue: KVM signals its
            // ioeventfd, no exit), then 7 (no such queue: exits, and the
            // transport ignores it), then ends.
            let mut guest = build(&kvm, &[]);
            let slot = guest
                .machine
                .add_virtio_mmio_device(dev.clone())
                .expect("device");
            let notify = slot.base + vmm::devices::virtio::mmio::regs::QUEUE_NOTIFY;
            let code = Asm::default()
                .mov_rax(notify)
                .store32_rax(1)
                .store32_rax(7)
                .exit(3)
                .0;
            guest
                .machine
                .memory
                .write_slice(&code, GuestAddress(CODE))
                .expect("payload");
            let devices = guest.machine.event_loop().expect("event loop");
            dev.lock().expect("dev").activated = true;
            let running = devices.start().expect("start");
            let v = vcpu(&guest, mode);
            map_the_mmio_gap(&guest.machine.memory, mode);
            let reason = v
                .start()
                .and_then(|handle| handle.wait(TIMEOUT).map(|(r, _)| r));
            let deadline = Instant::now() + TIMEOUT;
            while dev.lock().expect("dev").notified.is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            running.stop();
            assert_eq!(reason?, ExitReason::Device(3));
            let notified = dev.lock().expect("dev").notified.clone();
            assert_eq!(
                notified,
                vec![(1, Some("vmm-devices".to_owned()))],
                "queue 1, once, on the event loop's thread"
            );
            Ok(())
        },
    );
}
