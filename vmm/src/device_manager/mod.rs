//! The device manager owns device creation, the buses and the guest interrupt lines
//! devices use. Nothing else creates devices or picks their addresses.

mod legacy;

use std::sync::{Arc, Mutex};

use devices::legacy::{PowerSink, SerialDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vcpu::Buses;
use crate::vm::VmError;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd for {what}: {source}")]
    EventFd {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot place {what}: {source}")]
    Bus {
        what: &'static str,
        #[source]
        source: devices::BusError,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
}

pub struct DeviceManager {
    buses: Arc<Buses>,
    /// Where devices report the guest's power-off and reset requests.
    power: PowerSink,
    serial: Option<Arc<Mutex<SerialDevice>>>,
}

impl DeviceManager {
    pub fn new(power: PowerSink) -> Self {
        Self { buses: Arc::new(Buses::default()), power, serial: None }
    }

    pub fn buses(&self) -> &Arc<Buses> {
        &self.buses
    }

    /// COM1, if it was created, for feeding it host input.
    pub fn serial(&self) -> Option<&Arc<Mutex<SerialDevice>>> {
        self.serial.as_ref()
    }

    fn new_eventfd(what: &'static str) -> Result<EventFd, DeviceError> {
        EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::EventFd { what, source })
    }

    fn place_pio(
        &self,
        what: &'static str,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn devices::BusDevice>>,
    ) -> Result<(), DeviceError> {
        self.buses.pio.insert(base, len, dev).map_err(|source| DeviceError::Bus { what, source })
    }
}
