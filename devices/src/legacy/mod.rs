//! The PC legacy devices a Linux guest expects at fixed ports.

mod acpi_pm;
mod cmos;
mod i8042;
mod pvpanic;
mod serial;

pub use acpi_pm::AcpiPmControl;
pub use cmos::Cmos;
pub use i8042::I8042;
pub use pvpanic::PvPanic;
pub use serial::SerialDevice;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Where devices report a guest's request to power off or reset, or its report that it
/// panicked. It is a callback, not an eventfd, so that the VMM can stop the requesting
/// vCPU before it runs another guest instruction: a guest that goes on past its reset
/// request wanders into real-mode BIOS paths this VMM does not provide.
pub type PowerSink = Arc<dyn Fn(PowerEvent) + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    PowerOff,
    Reset,
    /// The guest kernel panicked (pvpanic); it reboots or hangs next.
    Panic,
}

/// Lets vm-superio devices raise an interrupt or an event through an eventfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}
