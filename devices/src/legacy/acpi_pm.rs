//! The ACPI hardware-reduced sleep control/status and reset register.
//!
//! A hardware-reduced FADT points SLEEP_CONTROL_REG, SLEEP_STATUS_REG and RESET_REG at
//! this one byte port. Linux powers off by writing `SLP_TYP << 2 | SLP_EN` with the S5
//! sleep type from the DSDT's `\_S5_` package, and resets by writing RESET_VALUE.

use super::{PowerEvent, PowerSink};
use crate::bus::BusDevice;

pub struct AcpiPmControl {
    sink: PowerSink,
}

impl AcpiPmControl {
    /// The `\_S5_` sleep type the DSDT must advertise for power-off to reach us.
    pub const S5_SLEEP_TYPE: u8 = 5;
    /// The value the FADT's RESET_REG tells the guest to write.
    pub const RESET_VALUE: u8 = 1;
    const SLP_EN: u8 = 1 << 5;

    pub fn new(sink: PowerSink) -> Self {
        Self { sink }
    }

    /// Decodes a byte written to the register.
    pub fn decode(value: u8) -> Option<PowerEvent> {
        if value == Self::RESET_VALUE {
            return Some(PowerEvent::Reset);
        }
        let sleep_type = (value >> 2) & 0x7;
        (value & Self::SLP_EN != 0 && sleep_type == Self::S5_SLEEP_TYPE).then_some(PowerEvent::PowerOff)
    }
}

impl BusDevice for AcpiPmControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // SLEEP_STATUS: never "woken" (WAK_STS clear); the guest only polls it after S3.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&value)) = (offset, data.first()) else { return };
        // S1-S4 are not offered in the DSDT; a guest that asks anyway keeps running.
        if let Some(event) = Self::decode(value) {
            (self.sink)(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn decodes_s5_and_reset_only() {
        assert_eq!(AcpiPmControl::decode((5 << 2) | (1 << 5)), Some(PowerEvent::PowerOff));
        assert_eq!(AcpiPmControl::decode(5 << 2), None, "SLP_EN missing");
        assert_eq!(AcpiPmControl::decode((3 << 2) | (1 << 5)), None, "S3 is not offered");
        assert_eq!(AcpiPmControl::decode(1), Some(PowerEvent::Reset));
        assert_eq!(AcpiPmControl::decode(0), None);
    }

    #[test]
    fn writes_signal_the_matching_event() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut dev = AcpiPmControl::new(Arc::new(move |e| s.lock().unwrap().push(e)));
        dev.write(0, &[0x34]);
        dev.write(0, &[0x0c]);
        dev.write(0, &[1]);
        dev.write(1, &[1]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![PowerEvent::PowerOff, PowerEvent::Reset],
            "only offset 0 is the register"
        );
    }
}
