//! The guest kernel (from `cargo xtask guest`) booted by the VMM's direct
//! 64-bit entry — only where KVM runs guest kernel mode natively.
//!
//! The test first measures whether it is in that case: a CPL0 spin loop and
//! a CPL3 spin loop each run for 50 ms; on plain KVM both run at hardware
//! speed, on nested PVM hosts the CPL0 loop is emulated thousands of times
//! slower (and a real kernel stops with KVM_EXIT_INTERNAL_ERROR at SLUB or
//! FPU set-up), so the boot is skipped with that reason printed.
//!
//! Where it runs: no root disk is attached yet (virtio-blk is to come), so
//! the kernel boots until it cannot mount root, panics, and with `panic=1
//! reboot=k` resets through the i8042 — the VMM must return `Reset`, and the
//! console must show the memory map, the MP table's CPUs and every vCPU
//! brought up.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::Kvm;
use linux_loader::cmdline::Cmdline;
use schema::guest::GuestArtifacts;
use vmm::arch::x86_64::regs::EntryMode;
use vmm::builder::{Machine, MachineConfig};
use vmm::vstate::exit::ExitReason;

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);
impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("sink").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn kernel_boots_to_root_mount_panic_and_resets() {
    const TEST: &str = "kernel_boots_to_root_mount_panic_and_resets";
    let probe = vmm::probe::probe_kvm();
    if !probe.native {
        return eprintln!("SKIP {TEST}: {}", probe.reason);
    }
    let kvm = Kvm::new().expect("the probe opened /dev/kvm");
    let Some(artifacts) = GuestArtifacts::for_test(TEST) else {
        return;
    };
    let image = std::fs::read(&artifacts.kernel).expect("read vmlinux");

    let sink = Sink::default();
    let machine = Machine::new(
        &kvm,
        MachineConfig::new(2, 256 << 20),
        Box::new(sink.clone()),
    )
    .expect("machine");
    let mut cmdline = Cmdline::new(2048).expect("cmdline");
    cmdline
        .insert_str(
            "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd",
        )
        .expect("cmdline");
    let kernel = machine.load_kernel(&image, &cmdline).expect("load kernel");
    let vcpus = machine
        .create_vcpus(kernel.entry, EntryMode::Kernel)
        .expect("vcpus");
    let mut handles = vcpus
        .into_iter()
        .map(|v| v.start().expect("start"))
        .collect::<Vec<_>>();
    // The boot vCPU sees the i8042 reset; the other is stopped after it.
    let bsp = handles.remove(0);
    let result = bsp.wait(Duration::from_secs(60));
    for h in handles {
        let _ = h.stop(Duration::from_secs(2));
    }
    let console = String::from_utf8_lossy(&sink.0.lock().expect("sink")).into_owned();
    let (reason, _) = result.unwrap_or_else(|e| panic!("boot failed: {e}\nconsole:\n{console}"));
    assert_eq!(reason, ExitReason::Reset, "console:\n{console}");
    for expected in [
        "Linux version",
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        "MPTABLE: OEM ID: SANDMESH",
        "Hypervisor detected: KVM",
        "Brought up 1 node, 2 CPUs",
        "Kernel panic",
    ] {
        assert!(
            console.contains(expected),
            "missing {expected:?} in console:\n{console}"
        );
    }
}
