//! The host bridge at 00:00.0: a header-only function that tells the guest the root
//! bus is there. Its windows and bus range are described in ACPI (_CRS of the PCI
//! root), not in its config space.

use std::any::Any;

use crate::config::{BarChange, BarSpec, ConfigError, PciConfiguration, PciHeader};
use crate::device::PciDevice;

/// Intel's vendor ID with the device ID Cloud Hypervisor's host bridge also uses:
/// Linux guests treat it as a plain host bridge there, with no chipset driver bound.
/// Real chipset IDs would be a risk: Linux binds AGP/EDAC drivers to some of them.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;
const CLASS_BRIDGE: u8 = 0x06;
const SUBCLASS_HOST_BRIDGE: u8 = 0x00;

pub struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    pub fn new() -> Self {
        let header = PciHeader {
            vendor_id: HOST_BRIDGE_VENDOR_ID,
            device_id: HOST_BRIDGE_DEVICE_ID,
            revision_id: 0,
            class: CLASS_BRIDGE,
            subclass: SUBCLASS_HOST_BRIDGE,
            prog_if: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            interrupt_pin: 0,
        };
        Self { config: PciConfiguration::new(&header) }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> Vec<BarChange> {
        self.config.write(offset, data)
    }

    fn bars(&self) -> Vec<BarSpec> {
        Vec::new()
    }

    fn set_bar_address(&mut self, index: u8, _addr: u64) -> Result<(), ConfigError> {
        Err(ConfigError::BarNotRegistered(index))
    }

    fn bar_address(&self, _index: u8) -> Option<u64> {
        None
    }

    fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}

    fn as_any(&mut self) -> &mut dyn Any {
        self
    }
}
