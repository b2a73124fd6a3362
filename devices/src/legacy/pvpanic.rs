//! The pvpanic device: one I/O port through which a guest kernel says it panicked.
//!
//! Linux's pvpanic driver binds to the ACPI device `QEMU0001`, reads the port to learn
//! which events the device takes, and writes the panic bit from its panic notifier,
//! before the kernel reboots (`panic=-1`) or hangs. Without it a panic with `panic=-1`
//! looks like a reboot the guest chose, and the VMM would end as if all were well.

use super::{PowerEvent, PowerSink};
use crate::bus::BusDevice;

pub struct PvPanic {
    sink: PowerSink,
}

impl PvPanic {
    pub const PORT_LEN: u64 = 1;
    /// "The guest panicked."
    pub const PANICKED: u8 = 1 << 0;
    /// "The guest will boot its crash kernel": not offered, so a guest with kdump does
    /// not tell us and boots it; the crash kernel's own end is what the VMM sees then.
    pub const CRASH_LOADED: u8 = 1 << 1;

    pub fn new(sink: PowerSink) -> Self {
        Self { sink }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (0, Some(first)) = (offset, data.first_mut()) {
            *first = Self::PANICKED;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Bits the device did not offer mean nothing: a guest writing them is ignored.
        if let (0, Some(&value)) = (offset, data.first()) {
            if value & Self::PANICKED != 0 {
                (self.sink)(PowerEvent::Panic);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn device() -> (PvPanic, Arc<Mutex<Vec<PowerEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (PvPanic::new(Arc::new(move |e| s.lock().unwrap().push(e))), seen)
    }

    #[test]
    fn offers_only_the_panic_event() {
        let (mut dev, _) = device();
        let mut b = [0xaa; 2];
        dev.read(0, &mut b);
        assert_eq!(b, [PvPanic::PANICKED, 0]);
        dev.read(1, &mut b[..1]);
        assert_eq!(b[0], 0);
    }

    #[test]
    fn the_panic_bit_reports_a_panic_and_nothing_else_does() {
        let (mut dev, seen) = device();
        dev.write(0, &[PvPanic::CRASH_LOADED]);
        dev.write(0, &[0]);
        dev.write(1, &[PvPanic::PANICKED]);
        dev.write(0, &[]);
        assert!(seen.lock().unwrap().is_empty());
        dev.write(0, &[PvPanic::PANICKED | PvPanic::CRASH_LOADED]);
        assert_eq!(*seen.lock().unwrap(), vec![PowerEvent::Panic]);
    }
}
