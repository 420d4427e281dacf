//! Legacy PC devices: the COM1 16550 UART and the i8042 reset line.

pub mod i8042;
pub mod serial;

pub use i8042::I8042;
pub use serial::{EventFdTrigger, SerialDevice};
