//! PCI segment 0, bus 0: 32 device slots with the host bridge at 00:00.0, and the two
//! ways the guest reaches their config space: the legacy 0xCF8/0xCFC port pair
//! ([`PciConfigIo`]) and the ECAM window ([`PciConfigMmio`]).
//!
//! BAR moves reach the VMM through [`BarMapper`], not as return values: config writes
//! arrive through `BusDevice::write`, which returns nothing, so the root calls the
//! mapper itself. It does so after releasing the device's lock (the mapper may lock the
//! device, e.g. to read its ioeventfds) and while holding the root's config-write lock,
//! so the mapper sees every device's changes in the order the guest made them and
//! never races a hot-plug. Devices are single-function; functions 1 to 7 are absent.

use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use devices::BusDevice;

use crate::config::BarChange;
use crate::device::{lock_device, SharedPciDevice};
use crate::host_bridge::HostBridge;

pub const PCI_SLOTS: u8 = 32;
/// The slot of the host bridge.
pub const HOST_BRIDGE_SLOT: u8 = 0;
/// CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at 0xcfc..=0xcff.
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// ECAM bytes per bus: 32 devices × 8 functions × 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Bus, device, function and DWORD register number; bits 30:24 and 1:0 are reserved.
const CONFIG_ADDRESS_MASK: u32 = 0x00ff_fffc;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciBusError {
    #[error("PCI slot {0} does not exist: bus 0 has slots 0 to 31")]
    InvalidSlot(u8),
    #[error("PCI slot 0 holds the host bridge; devices go in slots 1 to 31")]
    HostBridgeSlot,
    #[error("PCI slot {0} is already taken")]
    SlotTaken(u8),
    #[error("PCI slot {0} is empty")]
    EmptySlot(u8),
    #[error("all 31 device slots of PCI bus 0 are taken")]
    NoFreeSlot,
}

/// What the VMM does when the guest moves a BAR: move the BAR's
/// [`BarRegion`](crate::device::BarRegion) on the MMIO or PIO bus and the device's ioeventfds in
/// that BAR (and for passthrough, the memory slot mapping the BAR).
pub trait BarMapper: Send + Sync {
    /// BAR `change.index` of the device in `slot` is now decoded at `change.new`
    /// instead of `change.old` (either may be `None`: not decoded).
    ///
    /// Called with no device lock held and with the root's config-write lock held:
    /// the implementation may lock `device`, but must not make config accesses or
    /// add or remove devices. It reports its own failures (e.g. the guest placed the
    /// BAR over another device) and must tolerate a later `old` it never mapped.
    fn bar_changed(&self, slot: u8, device: &SharedPciDevice, change: &BarChange);
}

/// The root bus of segment 0.
pub struct PciRoot {
    slots: RwLock<[Option<SharedPciDevice>; PCI_SLOTS as usize]>,
    /// Serialises config writes with the mapper calls they cause, and with hot-plug.
    config_writes: Mutex<()>,
    mapper: Arc<dyn BarMapper>,
}

impl PciRoot {
    /// A bus with only the host bridge on it.
    pub fn new(mapper: Arc<dyn BarMapper>) -> Self {
        let mut slots: [Option<SharedPciDevice>; PCI_SLOTS as usize] = std::array::from_fn(|_| None);
        slots[usize::from(HOST_BRIDGE_SLOT)] = Some(Arc::new(Mutex::new(HostBridge::new())));
        Self { slots: RwLock::new(slots), config_writes: Mutex::new(()), mapper }
    }

    fn write_lock(&self) -> MutexGuard<'_, ()> {
        // The guard protects no data; a panic while it was held left nothing half-done.
        self.config_writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slots_read(&self) -> std::sync::RwLockReadGuard<'_, [Option<SharedPciDevice>; PCI_SLOTS as usize]> {
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    fn slots_write(&self) -> std::sync::RwLockWriteGuard<'_, [Option<SharedPciDevice>; PCI_SLOTS as usize]> {
        self.slots.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Plugs `device` into the lowest free slot and returns the slot. The caller
    /// programs its BARs before (see `PciDevice::set_bar_address`) and maps them.
    pub fn add_device(&self, device: SharedPciDevice) -> Result<u8, PciBusError> {
        let _writes = self.write_lock();
        let mut slots = self.slots_write();
        let (slot, entry) =
            slots.iter_mut().enumerate().skip(1).find(|(_, s)| s.is_none()).ok_or(PciBusError::NoFreeSlot)?;
        *entry = Some(device);
        // Below PCI_SLOTS, so it fits.
        Ok(slot as u8)
    }

    /// Plugs `device` into `slot`.
    pub fn add_device_at(&self, slot: u8, device: SharedPciDevice) -> Result<(), PciBusError> {
        if slot == HOST_BRIDGE_SLOT {
            return Err(PciBusError::HostBridgeSlot);
        }
        let _writes = self.write_lock();
        let mut slots = self.slots_write();
        let entry = slots.get_mut(usize::from(slot)).ok_or(PciBusError::InvalidSlot(slot))?;
        if entry.is_some() {
            return Err(PciBusError::SlotTaken(slot));
        }
        *entry = Some(device);
        Ok(())
    }

    /// Unplugs the device in `slot` and detaches it (its background work stops).
    /// The caller then unmaps the BARs it still decodes (`PciDevice::bar_address`).
    pub fn remove_device(&self, slot: u8) -> Result<SharedPciDevice, PciBusError> {
        if slot == HOST_BRIDGE_SLOT {
            return Err(PciBusError::HostBridgeSlot);
        }
        let device = {
            let _writes = self.write_lock();
            let mut slots = self.slots_write();
            let entry = slots.get_mut(usize::from(slot)).ok_or(PciBusError::InvalidSlot(slot))?;
            entry.take().ok_or(PciBusError::EmptySlot(slot))?
        };
        lock_device(&device).detach();
        Ok(device)
    }

    /// The device in `slot`, if any.
    pub fn device(&self, slot: u8) -> Option<SharedPciDevice> {
        self.slots_read().get(usize::from(slot)).cloned().flatten()
    }

    /// Bit n set: slot n holds a device (the host bridge included), for ACPI hot-plug.
    pub fn occupied_slots(&self) -> u32 {
        self.slots_read().iter().enumerate().filter(|(_, s)| s.is_some()).fold(0, |bits, (i, _)| bits | 1 << i)
    }

    fn function(&self, bus: u8, device: u8, function: u8) -> Option<SharedPciDevice> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.device(device)
    }

    /// A config read of bus/device/function at `offset`; absent functions read all-ones.
    pub fn read_config(&self, bus: u8, device: u8, function: u8, offset: u64, data: &mut [u8]) {
        match self.function(bus, device, function) {
            Some(dev) => lock_device(&dev).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A config write; BAR changes it causes go to the mapper before this returns.
    pub fn write_config(&self, bus: u8, device: u8, function: u8, offset: u64, data: &[u8]) {
        let _writes = self.write_lock();
        let Some(dev) = self.function(bus, device, function) else { return };
        let changes = lock_device(&dev).write_config(offset, data);
        for change in &changes {
            self.mapper.bar_changed(device, &dev, change);
        }
    }
}

/// The legacy configuration mechanism #1: a BusDevice for ports 0xcf8..=0xcff.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    config_address: u32,
}

impl PciConfigIo {
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root, config_address: 0 }
    }

    /// Where a CONFIG_DATA access at byte `port_offset` (0..4) of `len` bytes goes,
    /// if CONFIG_ADDRESS enables one and the access stays inside the DWORD.
    fn target(&self, port_offset: u64, len: usize) -> Option<(u8, u8, u8, u64)> {
        if self.config_address & CONFIG_ADDRESS_ENABLE == 0 || port_offset + len as u64 > 4 {
            return None;
        }
        let a = self.config_address;
        let (bus, device, function) = ((a >> 16) as u8, ((a >> 11) & 0x1f) as u8, ((a >> 8) & 0x7) as u8);
        Some((bus, device, function, u64::from(a & 0xfc) + port_offset))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            // Only a DWORD access to 0xcf8 is CONFIG_ADDRESS; narrower ones are other
            // chipset ports (0xcf9 is the reset control), which are not there.
            0 if data.len() == 4 => data.copy_from_slice(&self.config_address.to_le_bytes()),
            4..=7 => match self.target(offset - 4, data.len()) {
                Some((bus, device, function, reg)) => self.root.read_config(bus, device, function, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                    self.config_address = u32::from_le_bytes(bytes) & (CONFIG_ADDRESS_ENABLE | CONFIG_ADDRESS_MASK);
                }
            }
            4..=7 => {
                if let Some((bus, device, function, reg)) = self.target(offset - 4, data.len()) {
                    self.root.write_config(bus, device, function, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// The ECAM (MMCONFIG) window: a BusDevice for an MMIO range whose offset encodes
/// bus (bits 27:20), device (19:15), function (14:12) and register (11:0). Insert it
/// with `ECAM_BUS_SIZE` per bus the ACPI MCFG table declares; only bus 0 is populated.
pub struct PciConfigMmio {
    root: Arc<PciRoot>,
}

impl PciConfigMmio {
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root }
    }

    fn target(offset: u64) -> Option<(u8, u8, u8, u64)> {
        let bus = u8::try_from(offset >> 20).ok()?;
        Some((bus, ((offset >> 15) & 0x1f) as u8, ((offset >> 12) & 0x7) as u8, offset & 0xfff))
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::target(offset) {
            Some((bus, device, function, reg)) => self.root.read_config(bus, device, function, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bus, device, function, reg)) = Self::target(offset) {
            self.root.write_config(bus, device, function, reg, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::any::Any;

    use super::*;
    use crate::config::{BarKind, BarSpec, ConfigError, PciConfiguration, PciHeader, COMMAND, COMMAND_MEMORY_SPACE};
    use crate::device::PciDevice;

    struct TestDevice {
        config: PciConfiguration,
        detached: bool,
    }

    impl TestDevice {
        fn shared(device_id: u16) -> SharedPciDevice {
            let header = PciHeader {
                vendor_id: 0x1234,
                device_id,
                revision_id: 0,
                class: 0xff,
                subclass: 0,
                prog_if: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
                interrupt_pin: 0,
            };
            let mut config = PciConfiguration::new(&header);
            config.add_bar(BarSpec { index: 0, size: 0x1000, kind: BarKind::Memory32, prefetchable: false }).unwrap();
            config.set_bar_address(0, 0xc000_0000).unwrap();
            Arc::new(Mutex::new(Self { config, detached: false }))
        }
    }

    impl PciDevice for TestDevice {
        fn read_config(&mut self, offset: u64, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) -> Vec<BarChange> {
            self.config.write(offset, data)
        }
        fn bars(&self) -> Vec<BarSpec> {
            self.config.bars()
        }
        fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), ConfigError> {
            self.config.set_bar_address(index, addr)
        }
        fn bar_address(&self, index: u8) -> Option<u64> {
            self.config.bar_address(index)
        }
        fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
        fn detach(&mut self) {
            self.detached = true;
        }
        fn as_any(&mut self) -> &mut dyn Any {
            self
        }
    }

    #[derive(Default)]
    struct RecordingMapper {
        changes: Mutex<Vec<(u8, BarChange)>>,
    }

    impl BarMapper for RecordingMapper {
        fn bar_changed(&self, slot: u8, device: &SharedPciDevice, change: &BarChange) {
            // The device must not be locked while the mapper runs.
            assert!(device.try_lock().is_ok());
            self.changes.lock().unwrap().push((slot, *change));
        }
    }

    fn root() -> (Arc<PciRoot>, Arc<RecordingMapper>) {
        let mapper = Arc::new(RecordingMapper::default());
        (Arc::new(PciRoot::new(mapper.clone())), mapper)
    }

    fn cf8(device: u8, reg: u32) -> [u8; 4] {
        (CONFIG_ADDRESS_ENABLE | u32::from(device) << 11 | reg).to_le_bytes()
    }

    fn ecam(device: u8, function: u8, reg: u64) -> u64 {
        u64::from(device) << 15 | u64::from(function) << 12 | reg
    }

    #[test]
    fn host_bridge_is_at_slot_zero() {
        let (root, _) = root();
        let mut mmio = PciConfigMmio::new(root);
        let mut d = [0; 4];
        mmio.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        mmio.read(8, &mut d);
        assert_eq!(u32::from_le_bytes(d) >> 8, 0x06_00_00);
    }

    #[test]
    fn cf8_and_ecam_reach_the_same_config_space() {
        let (root, _) = root();
        let slot = root.add_device(TestDevice::shared(0x5678)).unwrap();
        assert_eq!(slot, 1);
        let mut io = PciConfigIo::new(root.clone());
        let mut mmio = PciConfigMmio::new(root);

        io.write(0, &cf8(slot, 0x3c));
        io.write(4, &[11]);
        let mut b = [0; 1];
        mmio.read(ecam(slot, 0, 0x3c), &mut b);
        assert_eq!(b, [11]);

        mmio.write(ecam(slot, 0, 0x0c), &[0x10]);
        io.write(0, &cf8(slot, 0x0c));
        let mut d = [0; 4];
        io.read(4, &mut d);
        assert_eq!(d[0], 0x10);
        // Byte and word accesses through 0xcfd..0xcff reach the right bytes.
        io.write(0, &cf8(slot, 0x00));
        let mut w = [0; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x5678);
        io.read(7, &mut b);
        assert_eq!(b, [0x56]);
        // CONFIG_ADDRESS reads back without its reserved bits.
        io.write(0, &(0xffff_ffffu32).to_le_bytes());
        io.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x80ff_fffc);
    }

    #[test]
    fn absent_functions_read_all_ones() {
        let (root, _) = root();
        root.add_device(TestDevice::shared(1)).unwrap();
        let mut io = PciConfigIo::new(root.clone());
        let mut mmio = PciConfigMmio::new(root);
        let mut d = [0; 4];
        for offset in [ecam(2, 0, 0), ecam(1, 1, 0), 1 << 20, ecam(1, 0, 0xffe), u64::MAX - 3] {
            mmio.read(offset, &mut d);
            assert_eq!(d, [0xff; 4], "ECAM offset {offset:#x}");
            mmio.write(offset, &d);
        }
        for address in [cf8(2, 0), cf8(1, 1 << 8), cf8(1, 1 << 16), [0, 0x08, 0, 0]] {
            io.write(0, &address);
            io.read(4, &mut d);
            assert_eq!(d, [0xff; 4], "CONFIG_ADDRESS {:#x}", u32::from_le_bytes(address));
        }
        // Narrow accesses to CONFIG_ADDRESS and DWORDs crossing CONFIG_DATA do nothing.
        io.write(0, &cf8(1, 0));
        io.write(1, &[0]);
        io.write(0, &[0]);
        io.read(4, &mut d);
        assert_eq!(d, [0x34, 0x12, 1, 0]);
        io.read(5, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut b = [0; 1];
        io.read(1, &mut b);
        assert_eq!(b, [0xff]);
    }

    #[test]
    fn bar_moves_reach_the_mapper() {
        let (root, mapper) = root();
        let slot = root.add_device(TestDevice::shared(1)).unwrap();
        let mut mmio = PciConfigMmio::new(root);
        mmio.write(ecam(slot, 0, 0x10), &0xd000_0000u32.to_le_bytes());
        mmio.write(ecam(slot, 0, COMMAND as u64), &[0]);
        mmio.write(ecam(slot, 0, COMMAND as u64), &[COMMAND_MEMORY_SPACE as u8]);
        let change = |old, new| (slot, BarChange { index: 0, kind: BarKind::Memory32, size: 0x1000, old, new });
        assert_eq!(
            *mapper.changes.lock().unwrap(),
            vec![
                change(Some(0xc000_0000), Some(0xd000_0000)),
                change(Some(0xd000_0000), None),
                change(None, Some(0xd000_0000))
            ]
        );
    }

    #[test]
    fn hot_plug_slots() {
        let (root, _) = root();
        assert_eq!(root.add_device_at(0, TestDevice::shared(1)), Err(PciBusError::HostBridgeSlot));
        assert_eq!(root.add_device_at(32, TestDevice::shared(1)), Err(PciBusError::InvalidSlot(32)));
        root.add_device_at(2, TestDevice::shared(2)).unwrap();
        assert_eq!(root.add_device_at(2, TestDevice::shared(2)), Err(PciBusError::SlotTaken(2)));
        assert_eq!(root.add_device(TestDevice::shared(1)), Ok(1));
        assert_eq!(root.add_device(TestDevice::shared(3)), Ok(3));
        assert_eq!(root.occupied_slots(), 0b1111);

        let removed = root.remove_device(2).unwrap();
        assert!(removed.lock().unwrap().as_any().downcast_mut::<TestDevice>().unwrap().detached);
        assert_eq!(root.remove_device(2).err(), Some(PciBusError::EmptySlot(2)));
        assert_eq!(root.remove_device(0).err(), Some(PciBusError::HostBridgeSlot));
        assert_eq!(root.remove_device(40).err(), Some(PciBusError::InvalidSlot(40)));
        let mut d = [0; 2];
        root.read_config(0, 2, 0, 0, &mut d);
        assert_eq!(d, [0xff; 2]);
        assert_eq!(root.add_device(TestDevice::shared(4)), Ok(2));
        for _ in 4..32 {
            root.add_device(TestDevice::shared(5)).unwrap();
        }
        assert_eq!(root.add_device(TestDevice::shared(6)), Err(PciBusError::NoFreeSlot));
        assert_eq!(root.occupied_slots(), u32::MAX);
    }
}
