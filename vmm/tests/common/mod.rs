//! The tiny-guest harness shared by the KVM tests: a console sink, the
//! isa-debug-exit port, a few-instruction assembler, and the summing guest
//! the snapshot tests interrupt mid-computation.
#![allow(dead_code)]

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::BusDevice;
use vmm::vstate::exit::{ExitReason, ExitRequest};
use vmm::vstate::memory::GuestMemoryMmap;

/// Where payloads are placed and entered (above the boot structures).
pub const CODE: u64 = 0x10_0000;
/// The summing guest's progress record (a different 2 MiB page from the
/// code): `[DATA]` = i, `[DATA+8]` = sum kept in memory, `[DATA+16]` =
/// sum kept in a register, stored at the end.
pub const DATA: u64 = 0x30_0000;
/// The test exit port (as QEMU's isa-debug-exit): `out 0xf4, al` ends the
/// VM with `ExitReason::Device(al)`.
pub const EXIT_PORT: u64 = 0xf4;
pub const MEM: u64 = 8 << 20;

pub fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            eprintln!("SKIP {test}: cannot open /dev/kvm ({e})");
            None
        }
    }
}

/// A console sink that remembers when its first byte arrived.
#[derive(Clone, Default)]
pub struct Sink {
    pub bytes: Arc<Mutex<Vec<u8>>>,
    pub first: Arc<Mutex<Option<Instant>>>,
}
impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut first = self.first.lock().expect("sink");
        first.get_or_insert_with(Instant::now);
        self.bytes.lock().expect("sink").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
impl Sink {
    pub fn text(&self) -> Vec<u8> {
        self.bytes.lock().expect("sink").clone()
    }
}

/// isa-debug-exit; remembers when it was first written.
pub struct ExitPort {
    pub exit: Arc<ExitRequest>,
    pub first: Arc<Mutex<Option<Instant>>>,
}
impl ExitPort {
    pub fn new(exit: Arc<ExitRequest>) -> Self {
        Self {
            exit,
            first: Arc::default(),
        }
    }
}
impl BusDevice for ExitPort {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, data: &[u8]) {
        self.first
            .lock()
            .expect("exit port")
            .get_or_insert_with(Instant::now);
        let code = data.first().copied().unwrap_or(0);
        self.exit.request(ExitReason::Device(u32::from(code)));
    }
}

/// A tiny assembler for the few instructions the payloads use.
#[derive(Default)]
pub struct Asm(pub Vec<u8>);
impl Asm {
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    pub fn mov_dx(self, v: u16) -> Self {
        self.raw(&[0x66, 0xba]).raw(&v.to_le_bytes())
    }
    pub fn mov_al(self, v: u8) -> Self {
        self.raw(&[0xb0, v])
    }
    pub fn out_dx_al(self) -> Self {
        self.raw(&[0xee])
    }
    pub fn out_imm_al(self, port: u8) -> Self {
        self.raw(&[0xe6, port])
    }
    pub fn mov_rax(self, v: u64) -> Self {
        self.raw(&[0x48, 0xb8]).raw(&v.to_le_bytes())
    }
    /// mov dword [rax], imm32
    pub fn store32_rax(self, v: u32) -> Self {
        self.raw(&[0xc7, 0x00]).raw(&v.to_le_bytes())
    }
    /// inc rcx; jmp back to the inc (a busy loop counting in rcx)
    pub fn spin_counting(self) -> Self {
        self.raw(&[0x48, 0xff, 0xc1, 0xeb, 0xfb])
    }
    /// jmp $
    pub fn hang(self) -> Self {
        self.raw(&[0xeb, 0xfe])
    }
    pub fn print(mut self, s: &[u8]) -> Self {
        self = self.mov_dx(0x3f8);
        for b in s {
            self = self.mov_al(*b).out_dx_al();
        }
        self
    }
    pub fn exit(self, code: u8) -> Self {
        self.mov_al(code).out_imm_al(EXIT_PORT as u8).hang()
    }
}

/// A guest that sums 1..=n with its progress in registers (rcx = i, rdx =
/// sum) and in memory (`[DATA]` = i, `[DATA+8]` += i each step), then
/// stores rdx at `[DATA+16]`, checks it against the memory sum, prints
/// "=" on the serial port and exits with 0 (or 1 if the two sums differ).
/// Interrupted anywhere and resumed from a snapshot, it must still finish
/// with exactly n(n+1)/2 in both.
pub fn summing_guest(n: u64) -> Vec<u8> {
    let mut a = Asm::default()
        .raw(&[0x48, 0xbb])
        .raw(&DATA.to_le_bytes()) // mov rbx, DATA
        .raw(&[0x31, 0xc9]) // xor ecx, ecx
        .raw(&[0x31, 0xd2]) // xor edx, edx
        .raw(&[0x49, 0xb8])
        .raw(&n.to_le_bytes()) // mov r8, n
        // loop:
        .raw(&[0x48, 0xff, 0xc1]) // inc rcx
        .raw(&[0x48, 0x01, 0xca]) // add rdx, rcx
        .raw(&[0x48, 0x89, 0x0b]) // mov [rbx], rcx
        .raw(&[0x48, 0x01, 0x4b, 0x08]) // add [rbx+8], rcx
        .raw(&[0x4c, 0x39, 0xc1]) // cmp rcx, r8
        .raw(&[0x75, 0xee]) // jne loop (-18)
        .raw(&[0x48, 0x89, 0x53, 0x10]) // mov [rbx+16], rdx
        .raw(&[0x48, 0x3b, 0x53, 0x08]) // cmp rdx, [rbx+8]
        .raw(&[0x75, 0x0d]); // jne bad (past print: 7 bytes, exit(0): 6)
    a = a.print(b"=").exit(0);
    a.exit(1).0
}

/// n(n+1)/2 as the guest computes it (wrapping).
pub fn expected_sum(n: u64) -> u64 {
    (u128::from(n) * u128::from(n + 1) / 2) as u64
}

/// The summing guest's progress record: (i, memory sum, register sum).
pub fn progress(mem: &GuestMemoryMmap) -> (u64, u64, u64) {
    let read = |off| mem.read_obj::<u64>(GuestAddress(DATA + off)).expect("data");
    (read(0), read(8), read(16))
}
