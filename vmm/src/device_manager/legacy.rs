//! The fixed-address PC devices: COM1, i8042, CMOS RTC, the ACPI power register and pvpanic.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::legacy::{AcpiPmControl, Cmos, EventFdTrigger, PvPanic, SerialDevice, I8042};

use super::{DeviceError, DeviceManager};
use crate::vm::KvmVm;

const COM1_PORT: u64 = boot::layout::COM1_PORT as u64;
const COM1_GSI: u32 = boot::layout::COM1_IRQ;

// The ACPI tables promise what the power register decodes.
const _: () = assert!(AcpiPmControl::S5_SLEEP_TYPE == boot::layout::ACPI_S5_SLEEP_TYPE);
const _: () = assert!(AcpiPmControl::RESET_VALUE == boot::layout::ACPI_RESET_VALUE);

impl DeviceManager {
    /// Adds COM1 (output to `serial_out`), the i8042 and CMOS, the ACPI sleep/reset
    /// register at `acpi_pm_port` (the port the FADT names) and pvpanic (the DSDT's).
    pub fn add_legacy_devices(
        &mut self,
        vm: &KvmVm,
        serial_out: Box<dyn Write + Send>,
        acpi_pm_port: u16,
    ) -> Result<(), DeviceError> {
        let irq = Self::new_eventfd("the COM1 interrupt")?;
        vm.register_irqfd(&irq, COM1_GSI)?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(EventFdTrigger(irq), serial_out)));
        self.place_pio("COM1", COM1_PORT, 8, serial.clone())?;
        self.serial = Some(serial);

        let i8042 = I8042::new(self.power.clone());
        self.place_pio("the i8042", I8042::PORT_BASE, I8042::PORT_LEN, Arc::new(Mutex::new(i8042)))?;
        self.place_pio("the CMOS RTC", Cmos::PORT_BASE, Cmos::PORT_LEN, Arc::new(Mutex::new(Cmos::new())))?;

        let pm = AcpiPmControl::new(self.power.clone());
        self.place_pio("the ACPI power register", u64::from(acpi_pm_port), 1, Arc::new(Mutex::new(pm)))?;
        let pvpanic = Arc::new(Mutex::new(PvPanic::new(self.power.clone())));
        self.place_pio("pvpanic", u64::from(boot::layout::PVPANIC_PORT), PvPanic::PORT_LEN, pvpanic)?;
        Ok(())
    }
}
