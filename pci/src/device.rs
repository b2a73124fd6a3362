//! What a device on the PCI bus is: its config space and the BARs it decodes.

use std::any::Any;
use std::sync::{Arc, Mutex};

use devices::BusDevice;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{BarChange, BarSpec, ConfigError};
use crate::vfio::HostMapping;

/// An eventfd KVM should signal on any guest write (of any width) at `offset` inside
/// BAR `bar`, wherever that BAR is decoded (see [`PciDevice::ioeventfds`]).
pub struct BarIoEvent<'a> {
    pub bar: u8,
    pub offset: u64,
    pub eventfd: &'a EventFd,
}

/// Part of a BAR backed by host memory (a passthrough device's registers, mmapped):
/// the VMM maps `mapping` into the guest as a memory slot at the BAR's decoded address
/// plus `offset`, so accesses there never exit. `offset` and the mapping's length are
/// page multiples. The VMM keeps this `Arc` while the slot exists, and moves the slot
/// on every [`BarChange`] of the BAR (none while the BAR is not decoded).
#[derive(Debug, Clone)]
pub struct MmapArea {
    pub offset: u64,
    pub mapping: Arc<HostMapping>,
}

/// One PCI function. All offsets and data come from the guest: implementations must
/// treat any offset and any width as possible and never panic on them.
pub trait PciDevice: Send {
    /// A config space read at `offset` (0..4096); `data.len()` is the width.
    /// `&mut self` because some registers have read side effects.
    fn read_config(&mut self, offset: u64, data: &mut [u8]);

    /// A config space write. Returns the BARs whose decoding the write changed, for the
    /// device manager to move (see `config` for what "decoded" means).
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Vec<BarChange>;

    /// The BARs this device asks for; the device manager allocates their addresses.
    fn bars(&self) -> Vec<BarSpec>;

    /// Programs BAR `index` at `addr` and enables decoding of its kind, as firmware
    /// does. Produces no [`BarChange`]: afterwards `bar_address` tells what to map.
    fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), ConfigError>;

    /// Where BAR `index` is decoded now, if anywhere.
    fn bar_address(&self, index: u8) -> Option<u64>;

    /// A read at `offset` inside BAR `bar`.
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]);

    /// A write at `offset` inside BAR `bar`.
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]);

    /// Writes the VMM should turn into KVM ioeventfds: a guest write at a BAR's decoded
    /// address plus `offset` then signals the eventfd without a vCPU exit. The device
    /// handles the same write arriving as an exit too (before the VMM registered the
    /// ioeventfd, or after a move). Empty for most devices.
    fn ioeventfds(&self) -> Vec<BarIoEvent<'_>> {
        Vec::new()
    }

    /// The parts of BAR `bar` the VMM should map straight into the guest, wherever
    /// the BAR is decoded; accesses to the rest still arrive through `read_bar` and
    /// `write_bar`. Empty for emulated devices.
    fn mmap_areas(&self, bar: u8) -> Vec<MmapArea> {
        let _ = bar;
        Vec::new()
    }

    /// The device was taken off the bus: stop background work (virtio workers, ...).
    fn detach(&mut self) {}

    /// For the device manager to reach the concrete type (VFIO region mapping, ...).
    fn as_any(&mut self) -> &mut dyn Any;
}

/// A PCI device as shared between the bus, its BAR regions and the device manager.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Locks a device. A device whose lock was poisoned by a panic elsewhere is still in
/// a defined state (each access is one register operation), so keep serving it.
pub(crate) fn lock_device(device: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

/// One BAR of a device as a [`BusDevice`]: what the device manager inserts on the
/// MMIO (or PIO) bus at the BAR's decoded address, and moves when the BAR moves.
pub struct BarRegion {
    device: SharedPciDevice,
    bar: u8,
}

impl BarRegion {
    pub fn new(device: SharedPciDevice, bar: u8) -> Self {
        Self { device, bar }
    }

    pub fn bar(&self) -> u8 {
        self.bar
    }
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock_device(&self.device).read_bar(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock_device(&self.device).write_bar(self.bar, offset, data);
    }
}
