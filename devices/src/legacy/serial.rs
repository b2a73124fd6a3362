//! COM1: a 16550 UART (vm-superio) whose output goes to a host writer.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::bus::BusDevice;

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    lost_output: u64,
}

impl SerialDevice {
    /// `interrupt` is signalled whenever the UART raises its interrupt line; the VMM
    /// routes it to the guest's IRQ 4 with an irqfd.
    pub fn new(interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self { uart: Serial::new(interrupt, out), lost_output: 0 }
    }

    /// Queues host input for the guest; returns how many bytes fitted in the receive FIFO.
    ///
    /// Nothing is taken until the guest has enabled the received-data interrupt: before
    /// its driver opens the port, bytes would land in a FIFO the driver clears on start-up,
    /// so input typed (or piped) during boot would be lost instead of delayed.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        const IER_RX_DATA: u8 = 0x01;
        if self.uart.state().interrupt_enable & IER_RX_DATA == 0 {
            return 0;
        }
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        // Only fails when the FIFO is full, which `room` already rules out.
        self.uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or_default()
    }

    /// Bytes the guest sent that could not be written to the host side.
    pub fn lost_output(&self) -> u64 {
        self.lost_output
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte registers only; wider accesses read the register then ones.
        data.fill(0xff);
        if let (Ok(reg), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            if reg < 8 {
                *first = self.uart.read(reg);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(reg), Some(&value)) = (u8::try_from(offset), data.first()) {
            // A host writer that fails (closed pipe, full disk) must not stop the guest.
            if reg < 8 && self.uart.write(reg, value).is_err() {
                self.lost_output += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    fn serial() -> (SerialDevice, Sink, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let dev = SerialDevice::new(EventFdTrigger(irq.try_clone().unwrap()), Box::new(sink.clone()));
        (dev, sink, irq)
    }

    #[test]
    fn transmit_reaches_writer_and_lsr_reports_empty() {
        let (mut dev, sink, _irq) = serial();
        for b in b"hi\n" {
            dev.write(THR, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        let mut lsr = [0u8];
        dev.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "THR empty and transmitter idle");
    }

    #[test]
    fn input_raises_interrupt_when_enabled_and_reads_back() {
        let (mut dev, _sink, irq) = serial();
        dev.write(IER, &[0x01]); // received-data-available interrupt
        assert_eq!(dev.enqueue_input(b"ok"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        dev.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        dev.read(THR, &mut b);
        assert_eq!(b[0], b'o');
    }

    #[test]
    fn input_waits_until_the_guest_driver_listens() {
        let (mut dev, _sink, _irq) = serial();
        assert_eq!(dev.enqueue_input(b"early"), 0);
        dev.write(IER, &[0x01]);
        assert_eq!(dev.enqueue_input(b"early"), 5);
    }

    #[test]
    fn fifo_overflow_is_refused_not_panicking() {
        let (mut dev, _sink, _irq) = serial();
        dev.write(IER, &[0x01]);
        let big = vec![b'a'; 4096];
        let n = dev.enqueue_input(&big);
        assert!(n > 0 && n < big.len());
        assert_eq!(dev.enqueue_input(&big), 0);
    }

    #[test]
    fn out_of_range_and_wide_accesses_are_harmless() {
        let (mut dev, sink, _irq) = serial();
        let mut wide = [0u8; 4];
        dev.read(LSR, &mut wide);
        assert_eq!(&wide[1..], &[0xff; 3]);
        dev.write(300, &[1]);
        dev.write(THR, &[]);
        assert!(sink.0.lock().unwrap().is_empty());
    }
}
