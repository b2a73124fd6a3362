//! The i8042 keyboard controller, kept for one job: its CPU-reset command is how a
//! guest reboot (`reboot=k`, or Linux's fallback chain) reaches the VMM.

use vm_superio::I8042Device;

use super::{PowerEvent, PowerSink};
use crate::bus::BusDevice;

/// Turns vm-superio's reset trigger into a power event.
struct ResetLine(PowerSink);

impl vm_superio::Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)(PowerEvent::Reset);
        Ok(())
    }
}

/// Covers ports 0x60..=0x64: data at offset 0, command/status at offset 4.
pub struct I8042 {
    inner: I8042Device<ResetLine>,
}

impl I8042 {
    pub const PORT_BASE: u64 = 0x60;
    pub const PORT_LEN: u64 = 5;

    /// `sink` hears `PowerEvent::Reset` when the guest asks the controller to reset the CPU.
    pub fn new(sink: PowerSink) -> Self {
        Self { inner: I8042Device::new(ResetLine(sink)) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let (Ok(reg), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.inner.read(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(reg), Some(&value)) = (u8::try_from(offset), data.first()) {
            let Ok(()) = self.inner.write(reg, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reset_command_signals() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut dev = I8042::new(Arc::new(move |e| s.lock().unwrap().push(e)));
        dev.write(0, &[0xfe]);
        assert!(seen.lock().unwrap().is_empty(), "a data-port write is not a reset");
        dev.write(4, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![PowerEvent::Reset]);
        let mut status = [0xaau8];
        dev.read(4, &mut status);
        assert_eq!(status[0] & 0x2, 0, "input buffer never full, so reboot does not wait");
    }
}
