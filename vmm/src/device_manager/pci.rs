//! The PCI root bus: config access (0xcf8 ports and ECAM), BAR address allocation,
//! mapping BARs and their ioeventfds where the guest has them decoded, and adding
//! devices with MSI-X vectors routed through KVM.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use boot::layout::{MemoryLayout, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_END, PCI_MMIO32_START};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use pci::{BarChange, BarKind, BarMapper, BarRegion, MmapArea, PciConfigIo, PciConfigMmio, PciRoot, SharedPciDevice};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use super::DeviceError;
use crate::vcpu::Buses;
use crate::vm::DeviceMemorySlots;

/// What the guest did to a BAR that could not be honoured; counted, since the guest
/// sees only a BAR that does not answer.
#[derive(Default)]
pub struct BarMapFailures(std::sync::atomic::AtomicU64);

/// Moves BAR regions on the buses, KVM ioeventfds, and the memory slots of
/// passthrough BARs as the guest (re)programs BARs.
struct KvmBarMapper {
    buses: Arc<Buses>,
    vm: Arc<VmFd>,
    failures: Arc<BarMapFailures>,
    slots: DeviceMemorySlots,
    /// Memory slots mapped now, by guest-physical address, with the host mapping each
    /// one points into (kept alive while the slot exists).
    mapped: Mutex<BTreeMap<u64, (u32, MmapArea)>>,
}

impl KvmBarMapper {
    fn fail(&self) {
        self.failures.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn bus(&self, kind: BarKind) -> &devices::Bus {
        match kind {
            BarKind::Io => &self.buses.pio,
            BarKind::Memory32 | BarKind::Memory64 => &self.buses.mmio,
        }
    }

    fn ioevent_addr(kind: BarKind, addr: u64) -> IoEventAddress {
        match kind {
            BarKind::Io => IoEventAddress::Pio(addr),
            BarKind::Memory32 | BarKind::Memory64 => IoEventAddress::Mmio(addr),
        }
    }

    /// Maps (or unmaps) BAR `index` of `device` at `base`.
    fn map(&self, device: &SharedPciDevice, index: u8, kind: BarKind, size: u64, base: u64, on: bool) {
        let dev = device.lock().unwrap_or_else(|e| e.into_inner());
        for ev in dev.ioeventfds().into_iter().filter(|e| e.bar == index) {
            let addr = Self::ioevent_addr(kind, base + ev.offset);
            let r = if on {
                self.vm.register_ioevent(ev.eventfd, &addr, NoDatamatch)
            } else {
                self.vm.unregister_ioevent(ev.eventfd, &addr, NoDatamatch)
            };
            if r.is_err() {
                self.fail();
            }
        }
        let areas = if on { dev.mmap_areas(index) } else { Vec::new() };
        drop(dev);
        if on {
            self.map_areas(base, areas);
        } else {
            self.unmap_areas(base, size);
        }
        let r = if on {
            self.bus(kind).insert(base, size, Arc::new(Mutex::new(BarRegion::new(device.clone(), index)))).map(drop)
        } else {
            self.bus(kind).remove(base).map(drop)
        };
        if r.is_err() {
            self.fail();
        }
    }
}

impl KvmBarMapper {
    /// Memory slots over the BAR's host-backed parts: guest accesses there go to the
    /// device without an exit. The rest of the BAR stays on the bus (trapped).
    fn map_areas(&self, base: u64, areas: Vec<MmapArea>) {
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        for area in areas.into_iter().filter(|a| a.mapping.is_writable() && !a.mapping.is_empty()) {
            let gpa = base + area.offset;
            // SAFETY: the slot points into `area.mapping`, which `mapped` keeps alive
            // until `unmap_areas` deletes the slot (or the VM is torn down, vCPUs stopped).
            match unsafe { self.slots.map(gpa, area.mapping.len() as u64, area.mapping.as_ptr()) } {
                Ok(slot) => {
                    mapped.insert(gpa, (slot, area));
                }
                Err(_) => self.fail(),
            }
        }
    }

    fn unmap_areas(&self, base: u64, size: u64) {
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<u64> = mapped.range(base..base.saturating_add(size)).map(|(gpa, _)| *gpa).collect();
        for gpa in gone {
            let Some(&(slot, _)) = mapped.get(&gpa) else { continue };
            if self.slots.unmap(slot).is_ok() {
                mapped.remove(&gpa);
            } else {
                // KVM still maps it: keep the host mapping alive with the slot (leaked
                // rather than freed under the guest).
                self.fail();
            }
        }
    }
}

impl BarMapper for KvmBarMapper {
    fn bar_changed(&self, _slot: u8, device: &SharedPciDevice, change: &BarChange) {
        if let Some(old) = change.old {
            self.map(device, change.index, change.kind, change.size, old, false);
        }
        if let Some(new) = change.new {
            self.map(device, change.index, change.kind, change.size, new, true);
        }
    }
}

/// Segment 0 with its config-space accessors and BAR windows.
pub struct PciSegment {
    root: Arc<PciRoot>,
    mapper: Arc<KvmBarMapper>,
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    /// The BAR address ranges handed out, by slot, to give back when a device leaves.
    allocated: BTreeMap<u8, Vec<(BarKind, RangeInclusive)>>,
}

impl PciSegment {
    /// Creates the root bus and puts its config accessors on the buses.
    pub fn new(
        buses: &Arc<Buses>,
        vm: Arc<VmFd>,
        slots: DeviceMemorySlots,
        layout: &MemoryLayout,
    ) -> Result<Self, DeviceError> {
        let failures = Arc::new(BarMapFailures::default());
        let mapped = Mutex::new(BTreeMap::new());
        let mapper = Arc::new(KvmBarMapper { buses: buses.clone(), vm, failures, slots, mapped });
        let root = Arc::new(PciRoot::new(mapper.clone()));
        let place = |what, source| DeviceError::Bus { what, source };
        buses
            .pio
            .insert(0xcf8, 8, Arc::new(Mutex::new(PciConfigIo::new(root.clone()))))
            .map_err(|e| place("the PCI config ports", e))?;
        buses
            .mmio
            .insert(PCI_ECAM_START, PCI_ECAM_SIZE, Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))))
            .map_err(|e| place("the PCI ECAM window", e))?;
        let window = |base: u64, end: u64| {
            AddressAllocator::new(base, end - base)
                .map_err(|e| DeviceError::Window(format!("{base:#x}..{end:#x}: {e}")))
        };
        Ok(Self {
            root,
            mapper,
            mmio32: window(PCI_MMIO32_START, PCI_MMIO32_END)?,
            mmio64: window(layout.mmio64_start(), layout.mmio64_end())?,
            allocated: BTreeMap::new(),
        })
    }

    /// Puts `device` in a free slot, gives its BARs addresses and maps them.
    pub fn add(&mut self, device: SharedPciDevice) -> Result<u8, DeviceError> {
        let bars = device.lock().unwrap_or_else(|e| e.into_inner()).bars();
        let mut placed = Vec::with_capacity(bars.len());
        for bar in &bars {
            let window = match bar.kind {
                BarKind::Memory64 => &mut self.mmio64,
                BarKind::Memory32 => &mut self.mmio32,
                BarKind::Io => return Err(DeviceError::Window("I/O BARs are not supported yet".into())),
            };
            // BARs are naturally aligned; at least a page, so each can be mapped alone.
            let size = bar.size.max(4096);
            let range = window
                .allocate(size, size, AllocPolicy::FirstMatch)
                .map_err(|e| DeviceError::Window(format!("no room for a BAR of {size:#x} bytes: {e}")))?;
            device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_bar_address(bar.index, range.start())
                .map_err(|e| DeviceError::Window(format!("BAR {}: {e}", bar.index)))?;
            placed.push((bar.index, bar.kind, bar.size, range));
        }
        let slot = match self.root.add_device(device.clone()) {
            Ok(slot) => slot,
            Err(e) => {
                for (_, kind, _, range) in &placed {
                    self.free(*kind, range);
                }
                return Err(DeviceError::Pci(e));
            }
        };
        for (index, kind, size, range) in &placed {
            self.mapper.map(&device, *index, *kind, *size, range.start(), true);
        }
        self.allocated.insert(slot, placed.into_iter().map(|(_, kind, _, range)| (kind, range)).collect());
        Ok(slot)
    }

    fn free(&mut self, kind: BarKind, range: &RangeInclusive) {
        let window = if kind == BarKind::Memory64 { &mut self.mmio64 } else { &mut self.mmio32 };
        let _ = window.free(range);
    }

    /// Takes the device in `slot` off the bus: its BARs are unmapped (memory slots and
    /// bus regions) before it is detached (a passthrough device is reset then, and must
    /// not be reachable through a memory slot while it resets), and their addresses go
    /// back to the windows.
    pub fn remove(&mut self, slot: u8) -> Result<SharedPciDevice, DeviceError> {
        let device = self.root.device(slot).ok_or(DeviceError::Pci(pci::PciBusError::EmptySlot(slot)))?;
        let decoded: Vec<(u8, BarKind, u64, u64)> = {
            let dev = device.lock().unwrap_or_else(|e| e.into_inner());
            dev.bars().iter().filter_map(|b| dev.bar_address(b.index).map(|a| (b.index, b.kind, b.size, a))).collect()
        };
        for (index, kind, size, addr) in decoded {
            self.mapper.map(&device, index, kind, size, addr, false);
        }
        let device = self.root.remove_device(slot).map_err(DeviceError::Pci)?;
        for (kind, range) in self.allocated.remove(&slot).unwrap_or_default() {
            self.free(kind, &range);
        }
        Ok(device)
    }

    /// KVM memory slots mapped over BARs now.
    pub fn memory_slots(&self) -> usize {
        self.mapper.mapped.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// BAR or ioeventfd changes that could not be applied (see `BarMapFailures`).
    pub fn map_failures(&self) -> u64 {
        self.mapper.failures.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}
