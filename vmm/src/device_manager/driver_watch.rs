//! What the guest's driver of a passed-through device is doing, read from how it uses
//! the device's MSI/MSI-X vectors: the VMM cannot see the device's own registers (they
//! are mapped straight into the guest), but every vector change traps.

use std::sync::{Arc, Mutex};

use pci::{MsiMessage, MsiVectors};
use vmm_sys_util::eventfd::EventFd;

/// Tells the VMM once when the guest's driver first turns one of the device's
/// interrupts on: for a NIC, the moment it is ready to receive.
pub type DriverReady = Arc<dyn Fn() + Send + Sync>;

/// Tells the VMM once when the guest's driver, during an unplug, masks or turns off one
/// of the device's interrupts. Drivers free their interrupts after they have stopped
/// the device, so for a NIC this is the moment it no longer receives — well before the
/// guest's `_EJ0`, which waits for the whole PCI teardown.
pub type DriverStopping = Box<dyn FnOnce() + Send>;

/// MSI vectors that report what the guest's driver does with them: [`DriverReady`] on
/// the first vector it enables, and, once armed, [`DriverStopping`] on the first it
/// masks or turns off. Both run on a vCPU thread: they must only hand the news on.
pub(super) struct WatchedVectors {
    inner: Box<dyn MsiVectors>,
    ready: Mutex<Option<DriverReady>>,
    stopping: Mutex<Option<DriverStopping>>,
}

impl WatchedVectors {
    pub(super) fn new(inner: Box<dyn MsiVectors>, ready: Option<DriverReady>) -> Self {
        Self { inner, ready: Mutex::new(ready), stopping: Mutex::new(None) }
    }

    /// Calls `stopping` the next time the guest masks or turns off a vector.
    pub(super) fn arm_stopping(&self, stopping: DriverStopping) {
        *self.stopping.lock().unwrap_or_else(|e| e.into_inner()) = Some(stopping);
    }

    pub(super) fn disarm_stopping(&self) {
        self.stopping.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn ready(&self) {
        let ready = self.ready.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(ready) = ready {
            ready();
        }
    }

    fn stopping(&self) {
        let stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(stopping) = stopping {
            stopping();
        }
    }
}

impl MsiVectors for WatchedVectors {
    fn enable(&self, vector: u16, msg: MsiMessage) {
        self.inner.enable(vector, msg);
        self.ready();
    }
    fn disable(&self, vector: u16) {
        self.inner.disable(vector);
        self.stopping();
    }
    fn mask(&self, vector: u16) {
        self.inner.mask(vector);
        self.stopping();
    }
    fn unmask(&self, vector: u16) {
        self.inner.unmask(vector);
        self.ready();
    }
    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        self.inner.trigger(vector)
    }
    fn notifier(&self, vector: u16) -> Option<&EventFd> {
        self.inner.notifier(vector)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct NoVectors;

    impl MsiVectors for NoVectors {
        fn enable(&self, _: u16, _: MsiMessage) {}
        fn disable(&self, _: u16) {}
        fn mask(&self, _: u16) {}
        fn unmask(&self, _: u16) {}
        fn trigger(&self, _: u16) -> std::io::Result<()> {
            Ok(())
        }
        fn notifier(&self, _: u16) -> Option<&EventFd> {
            None
        }
    }

    fn counter() -> (Arc<AtomicUsize>, impl Fn() -> usize) {
        let n = Arc::new(AtomicUsize::new(0));
        let read = n.clone();
        (n, move || read.load(Ordering::SeqCst))
    }

    #[test]
    fn ready_fires_once_on_the_first_vector_turned_on() {
        let (n, count) = counter();
        let v = WatchedVectors::new(
            Box::new(NoVectors),
            Some(Arc::new(move || {
                n.fetch_add(1, Ordering::SeqCst);
            })),
        );
        v.mask(0);
        assert_eq!(count(), 0, "a mask is not a driver turning interrupts on");
        v.enable(0, MsiMessage { addr: 0xfee0_0000, data: 0x31 });
        v.unmask(1);
        v.enable(2, MsiMessage { addr: 0xfee0_0000, data: 0x32 });
        assert_eq!(count(), 1);
    }

    #[test]
    fn stopping_fires_only_while_armed_and_once() {
        let v = WatchedVectors::new(Box::new(NoVectors), None);
        v.mask(0); // a driver masking a vector in normal operation: nobody asked
        let (n, count) = counter();
        let arm = |v: &WatchedVectors| {
            let n = n.clone();
            v.arm_stopping(Box::new(move || {
                n.fetch_add(1, Ordering::SeqCst);
            }))
        };
        arm(&v);
        v.unmask(0);
        assert_eq!(count(), 0, "unmasking is not stopping");
        v.mask(0);
        v.mask(1);
        v.disable(0);
        assert_eq!(count(), 1);
        arm(&v);
        v.disable(2);
        assert_eq!(count(), 2, "turning MSI-X off counts too");
        arm(&v);
        v.disarm_stopping();
        v.mask(0);
        assert_eq!(count(), 2, "a removal that ended disarms it");
    }
}
