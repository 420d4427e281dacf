//! The i8042 keyboard controller, reduced to its reset line.
//!
//! Linux with `reboot=k` reboots by writing command 0xFE (pulse the CPU
//! reset line) to port 0x64. A microVM has no reset: the guest asking for
//! one means it is done, so the command posts [`ExitReason::Reset`] on the
//! VM's [`ExitRequest`] and the vCPU run loop returns. The register model is
//! vm-superio's `I8042Device` (ports 0x60..=0x64): every read returns 0, so
//! Linux's i8042 driver finds no keyboard and gives up quietly (pass
//! `i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd` to skip the probe).

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::devices::BusDevice;
use crate::vstate::exit::{ExitReason, ExitRequest};

/// The controller's base port (data register).
pub const I8042_PORT: u64 = 0x60;
/// Ports 0x60..=0x64 (data, command/status at 0x64).
pub const I8042_PORT_LEN: u64 = 5;

/// Turns the reset command into a VM exit request.
#[derive(Debug)]
pub struct ResetTrigger(Arc<ExitRequest>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::Reset);
        Ok(())
    }
}

/// The i8042 on the port-IO bus.
#[derive(Debug)]
pub struct I8042 {
    device: I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitRequest>) -> Self {
        Self {
            device: I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.device.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // The trigger cannot fail (`Infallible`).
            let _ = self.device.write(off, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_a_reset_exit() {
        let exit = Arc::new(ExitRequest::new().expect("exit"));
        let mut dev = I8042::new(exit.clone());
        // Other commands and the data port do nothing.
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xaa]);
        assert_eq!(exit.pending(), None);
        dev.write(4, &[0xfe]);
        assert_eq!(exit.pending(), Some(ExitReason::Reset));
    }

    #[test]
    fn reads_are_zero() {
        let exit = Arc::new(ExitRequest::new().expect("exit"));
        let mut dev = I8042::new(exit);
        let mut d = [0xaau8; 2];
        dev.read(4, &mut d);
        assert_eq!(d, [0, 0]);
    }
}
