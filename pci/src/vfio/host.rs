//! [`VfioDeviceOps`] over a real VFIO device opened with vfio-ioctls.
//!
//! vfio-ioctls' own `region_read`/`region_write` only log failures (and can overflow
//! on `addr + len`), its IRQ calls drop the errno and its `reset` ignores the result.
//! So region access is a bounds-checked `pread`/`pwrite` on the device fd, and
//! `VFIO_DEVICE_SET_IRQS` and `VFIO_DEVICE_RESET` are issued here; vfio-ioctls is
//! still what opens the device and reads its region and IRQ tables.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_IRQ_INFO_NORESIZE, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX, VFIO_PCI_ROM_REGION_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE, VFIO_TYPE,
};
use vfio_ioctls::{VfioDevice, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ptr};

use super::bars::PAGE_SIZE;
use super::mapping::HostMapping;
use super::ops::*;

// Our index constants are VFIO's ABI; keep them in step with the bindings.
const _: () = assert!(
    ROM_REGION == VFIO_PCI_ROM_REGION_INDEX
        && CONFIG_REGION == VFIO_PCI_CONFIG_REGION_INDEX
        && INTX_IRQ == VFIO_PCI_INTX_IRQ_INDEX
        && MSI_IRQ == VFIO_PCI_MSI_IRQ_INDEX
        && MSIX_IRQ == VFIO_PCI_MSIX_IRQ_INDEX
        && REQ_IRQ == VFIO_PCI_REQ_IRQ_INDEX
);

vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE as u32, VFIO_BASE + 10);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);

/// `struct vfio_irq_set` without its data: argsz, flags, index, start, count.
const IRQ_SET_HEADER_WORDS: usize = 5;
const _: () = assert!(std::mem::size_of::<vfio_bindings::bindings::vfio::vfio_irq_set>() == IRQ_SET_HEADER_WORDS * 4);

/// A VFIO device opened by the VMM (`VfioDevice::new`), as the device model uses it.
pub struct HostVfioDevice {
    device: Arc<VfioDevice>,
}

impl HostVfioDevice {
    pub fn new(device: Arc<VfioDevice>) -> Self {
        Self { device }
    }

    pub fn device(&self) -> &Arc<VfioDevice> {
        &self.device
    }

    fn fd(&self) -> RawFd {
        self.device.as_raw_fd()
    }

    fn window(&self, index: u32) -> Result<Window, VfioOpsError> {
        // vfio-ioctls answers 0 for an index it has no region for (and logs the size
        // and caps queries), so ask for the flags first: a region with none is unusable.
        let flags = self.device.get_region_flags(index);
        if flags == 0 {
            return Err(VfioOpsError::NoRegion(index));
        }
        Ok(Window {
            index,
            file_offset: self.device.get_region_offset(index),
            size: self.device.get_region_size(index),
            flags,
        })
    }

    fn set_irqs(&self, index: u32, flags: u32, eventfds: &[RawFd]) -> Result<(), VfioOpsError> {
        let set_irqs = |source| VfioOpsError::SetIrqs { index, source };
        let too_many = || set_irqs(io::Error::from_raw_os_error(libc::E2BIG));
        let count = u32::try_from(eventfds.len()).map_err(|_| too_many())?;
        let argsz = u32::try_from((IRQ_SET_HEADER_WORDS + eventfds.len()) * 4).map_err(|_| too_many())?;
        let mut set = Vec::with_capacity(IRQ_SET_HEADER_WORDS + eventfds.len());
        set.extend_from_slice(&[argsz, flags, index, 0, count]);
        // Eventfds are non-negative, so they fit the kernel's __s32 array as u32.
        set.extend(eventfds.iter().map(|&fd| fd as u32));
        // SAFETY: `set` is a `struct vfio_irq_set` (five u32 fields, no padding, checked
        // above) followed by `count` 32-bit fds, `argsz` bytes in all, which is all the
        // kernel reads; it outlives the call, and the fds are borrowed from live
        // EventFds for its duration (the kernel takes its own references).
        let ret = unsafe { ioctl_with_ptr(self.device.as_ref(), VFIO_DEVICE_SET_IRQS(), set.as_ptr()) };
        if ret < 0 {
            return Err(set_irqs(io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Where a region lives in the device fd.
#[derive(Debug, Clone, Copy)]
struct Window {
    index: u32,
    file_offset: u64,
    size: u64,
    flags: u32,
}

impl Window {
    /// The fd offset of an access of `len` bytes at `offset` in the region, if it is
    /// allowed and inside it.
    fn locate(&self, access: Access, offset: u64, len: u64) -> Result<u64, VfioOpsError> {
        let needed = match access {
            Access::Read => VFIO_REGION_INFO_FLAG_READ,
            Access::Write => VFIO_REGION_INFO_FLAG_WRITE,
            Access::Mmap => VFIO_REGION_INFO_FLAG_MMAP,
        };
        if self.flags & needed == 0 {
            return Err(VfioOpsError::NotPermitted { index: self.index, access });
        }
        check_range(self.index, access, offset, len, self.size)?;
        self.file_offset.checked_add(offset).ok_or(VfioOpsError::OutOfRange {
            index: self.index,
            access,
            offset,
            len,
            size: self.size,
        })
    }
}

/// Reads `data.len()` bytes at `offset` in region `w` of device fd `fd`, in one pread.
fn read_at(fd: RawFd, w: &Window, offset: u64, data: &mut [u8]) -> Result<(), VfioOpsError> {
    let len = data.len();
    let at = w.locate(Access::Read, offset, len as u64)?;
    transfer(w, Access::Read, offset, len, at, |pos| {
        // SAFETY: `data` is a live, writable buffer of exactly `len` bytes, and pread
        // writes at most `len` bytes into it.
        unsafe { libc::pread(fd, data.as_mut_ptr().cast(), len, pos) }
    })
}

/// Writes `data` at `offset` in region `w` of device fd `fd`, in one pwrite.
fn write_at(fd: RawFd, w: &Window, offset: u64, data: &[u8]) -> Result<(), VfioOpsError> {
    let len = data.len();
    let at = w.locate(Access::Write, offset, len as u64)?;
    transfer(w, Access::Write, offset, len, at, |pos| {
        // SAFETY: `data` is a live buffer of exactly `len` bytes; pwrite only reads it.
        unsafe { libc::pwrite(fd, data.as_ptr().cast(), len, pos) }
    })
}

/// Runs one pread/pwrite at fd offset `at`, retrying only on EINTR. A short transfer
/// is an error: a device register access is all or nothing.
fn transfer(
    w: &Window,
    access: Access,
    offset: u64,
    len: usize,
    at: u64,
    mut op: impl FnMut(libc::off_t) -> isize,
) -> Result<(), VfioOpsError> {
    if len == 0 {
        return Ok(());
    }
    let io = |source| VfioOpsError::Io { index: w.index, access, offset, len: len as u64, source };
    let pos = libc::off_t::try_from(at).map_err(|_| io(io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
    loop {
        let done = op(pos);
        if done < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io(e));
        }
        // Non-negative, and at most `len`.
        let done = done as usize;
        if done != len {
            return Err(VfioOpsError::Short { index: w.index, access, offset, done, len });
        }
        return Ok(());
    }
}

impl VfioDeviceOps for HostVfioDevice {
    fn region(&self, index: u32) -> Option<RegionInfo> {
        let w = self.window(index).ok()?;
        let mut info = RegionInfo {
            size: w.size,
            readable: w.flags & VFIO_REGION_INFO_FLAG_READ != 0,
            writable: w.flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap: w.flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
            sparse: None,
            msix_mappable: false,
        };
        for cap in self.device.get_region_caps(index) {
            match cap {
                VfioRegionInfoCap::SparseMmap(sparse) => {
                    info.sparse =
                        Some(sparse.areas.iter().map(|a| RegionArea { offset: a.offset, len: a.size }).collect());
                }
                VfioRegionInfoCap::MsixMappable => info.msix_mappable = true,
                _ => {}
            }
        }
        Some(info)
    }

    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioOpsError> {
        read_at(self.fd(), &self.window(index)?, offset, data)
    }

    fn write_region(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioOpsError> {
        write_at(self.fd(), &self.window(index)?, offset, data)
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        self.device
            .get_irq_info(index)
            .map(|irq| IrqInfo { count: irq.count, noresize: irq.flags & VFIO_IRQ_INFO_NORESIZE != 0 })
    }

    fn enable_irqs(&self, index: u32, eventfds: &[&EventFd]) -> Result<(), VfioOpsError> {
        let count = self.irq_info(index).map_or(0, |i| i.count);
        if eventfds.is_empty() || eventfds.len() > count as usize {
            return Err(VfioOpsError::IrqCount { index, count, requested: eventfds.len() });
        }
        let fds: Vec<RawFd> = eventfds.iter().map(|e| e.as_raw_fd()).collect();
        self.set_irqs(index, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, &fds)
    }

    fn set_irq_unmask(&self, index: u32, eventfd: &EventFd) -> Result<(), VfioOpsError> {
        // vfio-pci runs an "unmask" virqfd on the fd: the line unmasks from the kernel,
        // with no VMM thread in the path.
        self.set_irqs(index, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK, &[eventfd.as_raw_fd()])
    }

    fn disable_irqs(&self, index: u32) -> Result<(), VfioOpsError> {
        // DATA_NONE with count 0 tears the whole index down (for INTx, the unmask
        // eventfd with it).
        self.set_irqs(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, &[])
    }

    fn reset(&self) -> Result<ResetOutcome, VfioOpsError> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument and touches no memory of ours.
        let ret = unsafe { ioctl(self.device.as_ref(), VFIO_DEVICE_RESET()) };
        if ret == 0 {
            return Ok(ResetOutcome::Reset);
        }
        let e = io::Error::last_os_error();
        // vfio-pci answers EINVAL when the device has no reset method it trusts.
        if e.raw_os_error() == Some(libc::EINVAL) {
            Ok(ResetOutcome::NotOffered)
        } else {
            Err(VfioOpsError::Reset(e))
        }
    }

    fn map_area(&self, index: u32, offset: u64, len: u64) -> Result<HostMapping, VfioOpsError> {
        let w = self.window(index)?;
        if len == 0 || !offset.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(VfioOpsError::Unaligned { index, offset, len });
        }
        let at = w.locate(Access::Mmap, offset, len)?;
        let io = |source| VfioOpsError::Io { index, access: Access::Mmap, offset, len, source };
        let size = usize::try_from(len).map_err(|_| io(io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
        // SAFETY: the fd belongs to `self.device`, which stays open for this call; the
        // mapping holds its own reference to the device file once created.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd()) };
        HostMapping::map_shared(fd, at, size, w.flags & VFIO_REGION_INFO_FLAG_WRITE != 0).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    const RW: u32 = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;

    /// A file standing in for the device fd: 16 bytes of another region, then region 7.
    fn device_file() -> (std::fs::File, Window) {
        let file = TempFile::new().unwrap().into_file();
        (&file).write_all(&[0xee; 16]).unwrap();
        (&file).write_all(&(0u8..64).collect::<Vec<_>>()).unwrap();
        (file, Window { index: 7, file_offset: 16, size: 64, flags: RW })
    }

    #[test]
    fn reads_and_writes_inside_the_region() {
        let (file, w) = device_file();
        let fd = file.as_raw_fd();
        let mut b = [0; 4];
        read_at(fd, &w, 4, &mut b).unwrap();
        assert_eq!(b, [4, 5, 6, 7]);
        write_at(fd, &w, 62, &[0xaa, 0xbb]).unwrap();
        let mut b = [0; 2];
        read_at(fd, &w, 62, &mut b).unwrap();
        assert_eq!(b, [0xaa, 0xbb]);
        read_at(fd, &w, 64, &mut []).unwrap();
    }

    #[test]
    fn refuses_accesses_outside_the_region_or_its_flags() {
        let (file, w) = device_file();
        let fd = file.as_raw_fd();
        let mut b = [0; 4];
        assert!(matches!(read_at(fd, &w, 61, &mut b), Err(VfioOpsError::OutOfRange { offset: 61, len: 4, .. })));
        assert!(matches!(read_at(fd, &w, u64::MAX - 1, &mut b), Err(VfioOpsError::OutOfRange { .. })));
        assert!(matches!(write_at(fd, &w, 64, &[1]), Err(VfioOpsError::OutOfRange { .. })));
        let ro = Window { flags: VFIO_REGION_INFO_FLAG_READ, ..w };
        assert!(matches!(
            write_at(fd, &ro, 0, &[1]),
            Err(VfioOpsError::NotPermitted { index: 7, access: Access::Write })
        ));
        let huge = Window { file_offset: u64::MAX - 8, ..w };
        assert!(matches!(read_at(fd, &huge, 0, &mut b), Err(VfioOpsError::Io { .. })));
    }

    #[test]
    fn keeps_errno_and_reports_short_transfers() {
        let (file, w) = device_file();
        // The file ends inside the region as declared: a short read.
        let long = Window { size: 128, ..w };
        let mut b = [0; 8];
        assert!(matches!(
            read_at(file.as_raw_fd(), &long, 60, &mut b),
            Err(VfioOpsError::Short { done: 4, len: 8, .. })
        ));
        match read_at(-1, &w, 0, &mut b) {
            Err(VfioOpsError::Io { source, access: Access::Read, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EBADF));
            }
            other => panic!("expected EBADF, got {other:?}"),
        }
    }
}
