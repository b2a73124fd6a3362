//! An in-memory VFIO device for the tests: an igbvf (Intel 82576 VF) as vfio-pci
//! shows one, recording what the device model asks of it.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::mapping::HostMapping;
use super::ops::*;

pub const IGBVF_VENDOR: u16 = 0x8086;
pub const IGBVF_DEVICE: u16 = 0x10ca;
pub const MSIX_CAP: usize = 0x70;
pub const PCIE_CAP: usize = 0xa0;
pub const BAR_SIZE: u64 = 0x4000;
/// Values the fake's PCI Express capability holds, to tell live reads from shadow ones.
pub const PCIE_DEVCAP: u32 = 0x1000_8cc2;
pub const PCIE_LINKCAP: u32 = 0x0043_7c12;

/// What the device model asked of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Reset,
    EnableIrqs { index: u32, fds: Vec<RawFd> },
    SetIrqUnmask { index: u32, fd: RawFd },
    DisableIrqs(u32),
    Write { index: u32, offset: u64, data: Vec<u8> },
    Map { index: u32, offset: u64, len: u64 },
}

pub struct Region {
    pub info: RegionInfo,
    pub bytes: Vec<u8>,
}

pub struct State {
    pub regions: BTreeMap<u32, Region>,
    pub irqs: BTreeMap<u32, IrqInfo>,
    pub calls: Vec<Call>,
    pub reset: ResetOutcome,
    /// Every region access fails with EIO.
    pub broken: bool,
    /// The interrupt index VFIO has on, as vfio-pci keeps one at a time.
    pub active_irq: Option<u32>,
}

/// A handle on the fake: the device model owns one, the test keeps a clone.
#[derive(Clone)]
pub struct FakeVfio(Arc<Mutex<State>>);

pub(super) fn region(size: u64, mmap: bool) -> Region {
    let info = RegionInfo { size, readable: true, writable: true, mmap, ..Default::default() };
    Region { info, bytes: vec![0; size as usize] }
}

impl FakeVfio {
    /// BAR 0: 16 KiB, 64-bit prefetchable registers, mmappable. BAR 3: 16 KiB, 64-bit
    /// prefetchable, the MSI-X table (3 vectors) at 0 and PBA at 0x2000, mmappable with
    /// MSIX_MAPPABLE (a host with interrupt remapping). MSI-X capability at 0x70, PCI
    /// Express at 0xa0, AER and ARI in the extended space. No INTx, no MSI.
    pub fn igbvf() -> Self {
        let mut config = region(4096, false);
        let c = &mut config.bytes;
        let mut put = |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
        put(0x00, &IGBVF_VENDOR.to_le_bytes());
        put(0x02, &IGBVF_DEVICE.to_le_bytes());
        // Status: capability list, fast back-to-back capable.
        put(0x06, &0x0090u16.to_le_bytes());
        // Revision 1, class 02 (network) 00 (Ethernet).
        put(0x08, &[0x01, 0x00, 0x00, 0x02]);
        // Multifunction, as the host's slot may be.
        put(0x0e, &[0x80]);
        put(0x10, &0x0000_000cu32.to_le_bytes());
        put(0x1c, &0x0000_000cu32.to_le_bytes());
        put(0x2c, &[0x86, 0x80, 0x01, 0xa0]);
        put(0x34, &[MSIX_CAP as u8]);
        // MSI-X: table size 3 (encoded N-1), table at BAR 3 + 0, PBA at BAR 3 + 0x2000.
        put(MSIX_CAP, &[0x11, PCIE_CAP as u8, 0x02, 0x00]);
        put(MSIX_CAP + 4, &0x0000_0003u32.to_le_bytes());
        put(MSIX_CAP + 8, &0x0000_2003u32.to_le_bytes());
        // PCI Express v2, endpoint; device capabilities with FLR; a x4 link.
        put(PCIE_CAP, &[0x10, 0x00, 0x02, 0x00]);
        put(PCIE_CAP + 4, &PCIE_DEVCAP.to_le_bytes());
        put(PCIE_CAP + 8, &0x0000_2810u32.to_le_bytes());
        put(PCIE_CAP + 0x0c, &PCIE_LINKCAP.to_le_bytes());
        put(PCIE_CAP + 0x10, &0x1041_0000u32.to_le_bytes());
        // AER (version 1) then ARI.
        put(0x100, &0x1501_0001u32.to_le_bytes());
        put(0x150, &0x0001_000eu32.to_le_bytes());

        let mut bar3 = region(BAR_SIZE, true);
        bar3.info.msix_mappable = true;
        let regions = BTreeMap::from([(0, region(BAR_SIZE, true)), (3, bar3), (CONFIG_REGION, config)]);
        let irq = |count| IrqInfo { count, noresize: false };
        let irqs = BTreeMap::from([
            (INTX_IRQ, irq(0)),
            (MSI_IRQ, irq(0)),
            (MSIX_IRQ, irq(3)),
            (ERR_IRQ, irq(1)),
            (REQ_IRQ, irq(1)),
        ]);
        Self(Arc::new(Mutex::new(State {
            regions,
            irqs,
            calls: Vec::new(),
            reset: ResetOutcome::Reset,
            broken: false,
            active_irq: None,
        })))
    }

    /// Gives the function INTx on `pin` (1 to 4), as vfio-pci shows a device whose
    /// host IRQ is set up: the pin in config space and one INTx vector.
    pub fn with_intx(self, pin: u8) -> Self {
        self.set_config(0x3d, &[pin]);
        self.state().irqs.insert(INTX_IRQ, IrqInfo { count: 1, noresize: false });
        self
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    /// The calls since the last `take_calls`.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.state().calls)
    }

    /// Changes the device's config space behind the device model's back.
    pub fn set_config(&self, offset: usize, bytes: &[u8]) {
        let mut st = self.state();
        let config = &mut st.regions.get_mut(&CONFIG_REGION).unwrap().bytes;
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    pub fn config_u16(&self, offset: usize) -> u16 {
        let st = self.state();
        let config = &st.regions[&CONFIG_REGION].bytes;
        u16::from_le_bytes([config[offset], config[offset + 1]])
    }

    pub fn region_bytes(&self, index: u32, offset: usize, len: usize) -> Vec<u8> {
        self.state().regions[&index].bytes[offset..offset + len].to_vec()
    }

    fn access(
        &self,
        index: u32,
        access: Access,
        offset: u64,
        len: usize,
    ) -> Result<MutexGuard<'_, State>, VfioOpsError> {
        let st = self.state();
        let region = st.regions.get(&index).ok_or(VfioOpsError::NoRegion(index))?;
        check_range(index, access, offset, len as u64, region.info.size)?;
        if st.broken {
            let source = std::io::Error::from_raw_os_error(libc::EIO);
            return Err(VfioOpsError::Io { index, access, offset, len: len as u64, source });
        }
        Ok(st)
    }
}

impl VfioDeviceOps for FakeVfio {
    fn region(&self, index: u32) -> Option<RegionInfo> {
        self.state().regions.get(&index).map(|r| r.info.clone())
    }

    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioOpsError> {
        let st = self.access(index, Access::Read, offset, data.len())?;
        let start = offset as usize;
        data.copy_from_slice(&st.regions[&index].bytes[start..start + data.len()]);
        Ok(())
    }

    fn write_region(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioOpsError> {
        let mut st = self.access(index, Access::Write, offset, data.len())?;
        st.calls.push(Call::Write { index, offset, data: data.to_vec() });
        let bytes = &mut st.regions.get_mut(&index).unwrap().bytes;
        for (i, &value) in (offset as usize..).zip(data) {
            match (index, i) {
                // Identity and class are read-only; status error bits clear on 1.
                (CONFIG_REGION, 0x00..=0x03 | 0x08..=0x0b) => {}
                (CONFIG_REGION, 0x06..=0x07) => bytes[i] &= !(value & 0xf900u16.to_le_bytes()[i - 6]),
                _ => bytes[i] = value,
            }
        }
        Ok(())
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        self.state().irqs.get(&index).copied()
    }

    fn enable_irqs(&self, index: u32, eventfds: &[&EventFd]) -> Result<(), VfioOpsError> {
        let mut st = self.state();
        let count = st.irqs.get(&index).map_or(0, |i| i.count);
        if eventfds.is_empty() || eventfds.len() > count as usize {
            return Err(VfioOpsError::IrqCount { index, count, requested: eventfds.len() });
        }
        // vfio-pci refuses a second interrupt type while one is on (the error and
        // request interrupts are not interrupt types: they go with any).
        let exclusive = matches!(index, INTX_IRQ | MSI_IRQ | MSIX_IRQ);
        if exclusive && st.active_irq.is_some_and(|active| active != index) {
            return Err(VfioOpsError::SetIrqs { index, source: std::io::Error::from_raw_os_error(libc::EINVAL) });
        }
        if exclusive {
            st.active_irq = Some(index);
        }
        st.calls.push(Call::EnableIrqs { index, fds: eventfds.iter().map(|e| e.as_raw_fd()).collect() });
        Ok(())
    }

    fn set_irq_unmask(&self, index: u32, eventfd: &EventFd) -> Result<(), VfioOpsError> {
        let mut st = self.state();
        // Only INTx has an unmask action, and only while it is on.
        if index != INTX_IRQ || st.active_irq != Some(INTX_IRQ) {
            return Err(VfioOpsError::SetIrqs { index, source: std::io::Error::from_raw_os_error(libc::EINVAL) });
        }
        st.calls.push(Call::SetIrqUnmask { index, fd: eventfd.as_raw_fd() });
        Ok(())
    }

    fn disable_irqs(&self, index: u32) -> Result<(), VfioOpsError> {
        let mut st = self.state();
        if st.active_irq == Some(index) {
            st.active_irq = None;
        }
        st.calls.push(Call::DisableIrqs(index));
        Ok(())
    }

    fn reset(&self) -> Result<ResetOutcome, VfioOpsError> {
        let mut st = self.state();
        st.calls.push(Call::Reset);
        Ok(st.reset)
    }

    fn map_area(&self, index: u32, offset: u64, len: u64) -> Result<HostMapping, VfioOpsError> {
        let mut st = self.state();
        let region = st.regions.get(&index).ok_or(VfioOpsError::NoRegion(index))?;
        if !region.info.mmap {
            return Err(VfioOpsError::NotPermitted { index, access: Access::Mmap });
        }
        check_range(index, Access::Mmap, offset, len, region.info.size)?;
        if len == 0 || !offset.is_multiple_of(4096) || !len.is_multiple_of(4096) {
            return Err(VfioOpsError::Unaligned { index, offset, len });
        }
        st.calls.push(Call::Map { index, offset, len });
        let source = |source| VfioOpsError::Io { index, access: Access::Mmap, offset, len, source };
        HostMapping::anonymous(len as usize).map_err(source)
    }
}
