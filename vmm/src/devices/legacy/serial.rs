//! The 16550A UART at COM1 (ports 0x3f8..0x400, IRQ 4): the guest console.
//!
//! The register model is vm-superio's `Serial`; this wrapper puts it on the
//! port-IO bus, sends its output to any `Write` (the console log file, or a
//! test's sink) and raises its interrupt through an `EventFd` that the VMM
//! registers as an irqfd for GSI 4, so the in-kernel IO-APIC delivers it
//! without a trip through user space.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;

/// COM1's base port.
pub const COM1_PORT: u64 = 0x3f8;
/// The UART decodes 8 ports.
pub const COM1_PORT_LEN: u64 = 8;
/// COM1's ISA IRQ (and IO-APIC pin, GSI).
pub const COM1_GSI: u32 = 4;

/// An `EventFd` as a vm-superio interrupt line.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the console goes.
pub type SerialOut = Box<dyn Write + Send>;

/// The UART on the bus.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, SerialOut>,
    /// Output or interrupt errors seen (the guest is never stopped for a
    /// full disk or a closed console; the count is for metrics).
    errors: u64,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART writing to `out`, interrupting through a new `EventFd`.
    pub fn new(out: SerialOut) -> io::Result<Self> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        Ok(Self {
            serial: Serial::new(EventFdTrigger::new(evt), out),
            errors: 0,
        })
    }

    /// A UART in a snapshot's `state` (registers and receive FIFO) writing
    /// to `out`. A pending interrupt is raised again. The state came from
    /// a file: vm-superio refuses a FIFO longer than the UART's.
    pub fn from_state(state: &schema::snapshot::SerialState, out: SerialOut) -> io::Result<Self> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial =
            Serial::from_state(&state, EventFdTrigger::new(evt), NoEvents, out).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("serial state: {e:?}"))
            })?;
        Ok(Self { serial, errors: 0 })
    }

    /// The state to snapshot.
    pub fn save(&self) -> schema::snapshot::SerialState {
        let s = self.serial.state();
        schema::snapshot::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// The interrupt line, to register as an irqfd for [`COM1_GSI`].
    pub fn interrupt_evt(&self) -> &EventFd {
        self.serial.interrupt_evt().event_fd()
    }

    /// Queue bytes for the guest to read (console input). Returns how many
    /// fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(_) => {
                self.errors += 1;
                0
            }
        }
    }

    /// Output or interrupt errors so far.
    pub fn errors(&self) -> u64 {
        self.errors
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART's registers are bytes; wider accesses read 0xff beyond.
        data.fill(0xff);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset))
            && self.serial.write(off, value).is_err()
        {
            self.errors += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A cloneable sink the test can read back.
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

    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;

    #[test]
    fn data_register_writes_reach_the_sink() {
        let sink = Sink::default();
        let mut s = SerialDevice::new(Box::new(sink.clone())).expect("serial");
        for b in b"OK\n" {
            s.write(THR, &[*b]);
        }
        assert_eq!(sink.0.lock().expect("sink").as_slice(), b"OK\n");
        // Line status: transmitter empty (THRE | TEMT).
        let mut lsr = [0u8];
        s.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn thr_empty_interrupt_fires_the_eventfd() {
        let mut s = SerialDevice::new(Box::new(io::sink())).expect("serial");
        s.write(IER, &[0x02]); // enable THR-empty interrupt
        s.write(THR, b"x");
        assert!(s.interrupt_evt().read().expect("irq") >= 1);
        let mut iir = [0u8];
        s.read(IIR, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02, "THR empty pending");
    }

    #[test]
    fn input_is_readable_from_the_data_register() {
        let mut s = SerialDevice::new(Box::new(io::sink())).expect("serial");
        assert_eq!(s.enqueue_input(b"hi"), 2);
        let mut lsr = [0u8];
        s.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 0x01, 1, "data ready");
        let mut d = [0u8];
        s.read(THR, &mut d);
        assert_eq!(d[0], b'h');
    }

    #[test]
    fn state_roundtrips_registers_and_fifo_and_rejects_an_oversized_fifo() {
        let mut s = SerialDevice::new(Box::new(io::sink())).expect("serial");
        s.write(3, &[0x80]); // DLAB
        s.write(0, &[0x0c]); // divisor low
        s.write(3, &[0x03]); // 8N1, DLAB off
        s.write(7, &[0x5a]); // scratch
        s.write(IER, &[0x01]); // RX data interrupt
        assert_eq!(s.enqueue_input(b"ab"), 2);
        let state = s.save();
        assert_eq!((state.baud_divisor_low, state.scratch), (0x0c, 0x5a));
        assert_eq!(state.in_buffer, b"ab");
        let mut r = SerialDevice::from_state(&state, Box::new(io::sink())).expect("restore");
        assert_eq!(r.save(), state);
        assert!(r.interrupt_evt().read().expect("pending irq raised again") >= 1);
        let mut d = [0u8];
        r.read(THR, &mut d);
        assert_eq!(d[0], b'a');
        let mut big = state.clone();
        big.in_buffer = vec![0; 4096];
        assert!(SerialDevice::from_state(&big, Box::new(io::sink())).is_err());
    }

    #[test]
    fn garbage_offsets_and_widths_do_not_panic() {
        let mut s = SerialDevice::new(Box::new(io::sink())).expect("serial");
        let mut wide = [0u8; 4];
        s.read(u64::MAX, &mut wide);
        s.read(7, &mut wide);
        s.write(u64::MAX, &[1]);
        s.write(3, &[]);
        let mut empty: [u8; 0] = [];
        s.read(0, &mut empty);
    }
}
