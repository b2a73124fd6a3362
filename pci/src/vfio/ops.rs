//! The narrow seam between the VFIO PCI device model and the host's VFIO device:
//! everything `VfioPciDevice` needs from the kernel, as a trait it is tested through
//! (`host` implements it over vfio-ioctls, the tests over an in-memory fake).
//!
//! Every operation reports failure as a value: a caller in the middle of a guest
//! register access decides what the guest sees, and keeps the error for the VMM.

use std::io;

use vmm_sys_util::eventfd::EventFd;

use super::mapping::HostMapping;

/// VFIO's fixed region indices for a PCI device (`VFIO_PCI_*_REGION_INDEX`): BARs 0 to
/// 5 are regions 0 to 5.
pub const ROM_REGION: u32 = 6;
pub const CONFIG_REGION: u32 = 7;

/// VFIO's fixed interrupt indices for a PCI device (`VFIO_PCI_*_IRQ_INDEX`).
pub const INTX_IRQ: u32 = 0;
pub const MSI_IRQ: u32 = 1;
pub const MSIX_IRQ: u32 = 2;
pub const ERR_IRQ: u32 = 3;
pub const REQ_IRQ: u32 = 4;

/// A piece of a region the host lets us mmap: `offset` and `len` bytes into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionArea {
    pub offset: u64,
    pub len: u64,
}

/// What the host says about one region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionInfo {
    pub size: u64,
    pub readable: bool,
    pub writable: bool,
    /// The region (or the parts `sparse` lists) can be mmapped.
    pub mmap: bool,
    /// With the sparse-mmap capability only these areas can be mmapped (possibly none);
    /// `None` means the whole region can, if `mmap` is set.
    pub sparse: Option<Vec<RegionArea>>,
    /// The MSI-X table and PBA in this region can be mmapped too (the host's interrupt
    /// remapping makes device writes to them harmless). The guest's table must still
    /// be emulated, so the device model traps them regardless.
    pub msix_mappable: bool,
}

impl RegionInfo {
    /// The areas mmap may cover, before the device model takes out what it traps.
    pub fn mappable_areas(&self) -> Vec<RegionArea> {
        if !self.mmap {
            return Vec::new();
        }
        match &self.sparse {
            Some(areas) => areas.clone(),
            None => vec![RegionArea { offset: 0, len: self.size }],
        }
    }
}

/// What the host says about one interrupt index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// How many vectors the index has (0: the device has none of that kind).
    pub count: u32,
    /// The vector count is fixed once enabled: growing it means disable and re-enable.
    pub noresize: bool,
}

/// Whether a device reset was carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetOutcome {
    /// The host reset the function (FLR or another method it picked).
    Reset,
    /// The host offers no reset method for this device (VFIO_DEVICE_RESET said EINVAL).
    NotOffered,
}

/// Which way a region access went, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Mmap,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Mmap => "mmap",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VfioOpsError {
    #[error("VFIO region {0} does not exist")]
    NoRegion(u32),
    #[error("VFIO region {index} does not allow {access}")]
    NotPermitted { index: u32, access: Access },
    #[error("{access} of {len} bytes at {offset:#x} is outside VFIO region {index} ({size:#x} bytes)")]
    OutOfRange { index: u32, access: Access, offset: u64, len: u64, size: u64 },
    #[error("mmap of {len:#x} bytes at {offset:#x} in VFIO region {index} is not page-aligned")]
    Unaligned { index: u32, offset: u64, len: u64 },
    #[error("{access} of {len} bytes at {offset:#x} in VFIO region {index}: {source}")]
    Io {
        index: u32,
        access: Access,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("short {access} at {offset:#x} in VFIO region {index}: {done} of {len} bytes")]
    Short { index: u32, access: Access, offset: u64, done: usize, len: usize },
    #[error("VFIO interrupt index {index} has {count} vectors, {requested} were asked for")]
    IrqCount { index: u32, count: u32, requested: usize },
    #[error("VFIO_DEVICE_SET_IRQS on interrupt index {index}: {source}")]
    SetIrqs {
        index: u32,
        #[source]
        source: io::Error,
    },
    #[error("VFIO_DEVICE_RESET: {0}")]
    Reset(#[source] io::Error),
}

/// One VFIO PCI device as the device model uses it. Region and interrupt indices are
/// VFIO's (see the constants above); offsets are inside the region.
pub trait VfioDeviceOps: Send {
    /// The region `index`, or `None` if the device has no such region.
    fn region(&self, index: u32) -> Option<RegionInfo>;

    /// Reads `data.len()` bytes at `offset` in region `index`, all or nothing.
    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioOpsError>;

    /// Writes `data` at `offset` in region `index`, all or nothing.
    fn write_region(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioOpsError>;

    /// The interrupt index `index`, or `None` if the host does not report it.
    fn irq_info(&self, index: u32) -> Option<IrqInfo>;

    /// Has vectors `0..eventfds.len()` of interrupt index `index` signal those eventfds
    /// (which also turns the device's MSI or MSI-X on). For [`INTX_IRQ`], one eventfd:
    /// VFIO signals it and masks the line on each interrupt, until an unmask (see
    /// [`set_irq_unmask`](Self::set_irq_unmask)). VFIO has one index on at a time:
    /// INTx must be off to turn MSI or MSI-X on, and the other way round.
    fn enable_irqs(&self, index: u32, eventfds: &[&EventFd]) -> Result<(), VfioOpsError>;

    /// Has VFIO unmask the (enabled) interrupt index `index` whenever `eventfd` is
    /// signalled, for [`INTX_IRQ`] only: with KVM's resample eventfd here, the line
    /// unmasks when the guest has serviced it. Turning the index off drops this too.
    fn set_irq_unmask(&self, index: u32, eventfd: &EventFd) -> Result<(), VfioOpsError>;

    /// Turns every vector of interrupt index `index` off.
    fn disable_irqs(&self, index: u32) -> Result<(), VfioOpsError>;

    /// Resets the function, if the host offers a way to.
    fn reset(&self) -> Result<ResetOutcome, VfioOpsError>;

    /// Maps `len` bytes at `offset` in region `index` into this process, shared with
    /// the device (reads and writes reach its registers). `offset` and `len` must be
    /// page-aligned and inside one of [`RegionInfo::mappable_areas`].
    fn map_area(&self, index: u32, offset: u64, len: u64) -> Result<HostMapping, VfioOpsError>;
}

/// Checks an access of `len` bytes at `offset` against a region of `size` bytes.
pub(crate) fn check_range(index: u32, access: Access, offset: u64, len: u64, size: u64) -> Result<(), VfioOpsError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(VfioOpsError::OutOfRange { index, access, offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappable_areas_follow_mmap_flag_and_sparse_list() {
        let mut r = RegionInfo { size: 0x4000, readable: true, writable: true, ..Default::default() };
        assert!(r.mappable_areas().is_empty());
        r.mmap = true;
        assert_eq!(r.mappable_areas(), vec![RegionArea { offset: 0, len: 0x4000 }]);
        r.sparse = Some(vec![]);
        assert!(r.mappable_areas().is_empty());
        r.sparse = Some(vec![RegionArea { offset: 0x1000, len: 0x3000 }]);
        assert_eq!(r.mappable_areas(), vec![RegionArea { offset: 0x1000, len: 0x3000 }]);
    }

    #[test]
    fn range_checks_never_overflow() {
        assert!(check_range(0, Access::Read, 0, 4, 4).is_ok());
        assert!(check_range(0, Access::Read, 1, 4, 4).is_err());
        assert!(check_range(0, Access::Read, u64::MAX, 2, u64::MAX).is_err());
        assert!(check_range(0, Access::Read, 4, 0, 4).is_ok());
    }
}
