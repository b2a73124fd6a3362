//! An owned mmap of device memory (part of a BAR), unmapped when the last owner drops
//! it. The VMM registers it as a KVM memory slot, so guest accesses to that part of
//! the BAR reach the device without a VM exit; it keeps an `Arc` of the mapping for
//! as long as the slot exists, so the host range can never be reused under the guest.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// `len` bytes of host address space mapped at `addr`.
#[derive(Debug)]
pub struct HostMapping {
    addr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory owned by this value: no Rust reference
// into it is ever created (it is only handed out as an address), so moving or sharing
// the owner between threads cannot create a data race in Rust's sense.
unsafe impl Send for HostMapping {}
// SAFETY: see `Send`; `&HostMapping` only exposes the address, length and flags.
unsafe impl Sync for HostMapping {}

impl HostMapping {
    /// Maps `len` bytes of `fd` at file offset `offset`, shared (stores reach the
    /// file's owner, here the device), readable and, if `writable`, writable.
    pub fn map_shared(fd: BorrowedFd<'_>, offset: u64, len: usize, writable: bool) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        Self::mmap(len, prot, libc::MAP_SHARED, fd.as_raw_fd(), offset, writable)
    }

    /// Anonymous memory, for tests standing in for a device.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn anonymous(len: usize) -> io::Result<Self> {
        Self::mmap(len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0, true)
    }

    fn mmap(len: usize, prot: i32, flags: i32, fd: i32, offset: libc::off_t, writable: bool) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh mapping at an address the kernel picks (no MAP_FIXED), so no
        // existing memory is touched; the result is checked before use.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(addr.cast::<u8>()).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        Ok(Self { addr, len, writable })
    }

    /// The host address the mapping starts at (page-aligned): KVM's `userspace_addr`.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether stores are allowed; a read-only mapping needs a read-only memory slot.
    pub fn is_writable(&self) -> bool {
        self.writable
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: `addr..addr+len` is the mapping this value created and owns; nothing
        // references it any more (the last owner is going away). A failure could only
        // mean the range is already gone, which leaves nothing to undo.
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;

    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    #[test]
    fn maps_a_file_shared_and_unmaps_on_drop() {
        let file = TempFile::new().unwrap().into_file();
        (&file).write_all(&[0x5a; 8192]).unwrap();
        let m = HostMapping::map_shared(file.as_fd(), 4096, 4096, false).unwrap();
        assert_eq!((m.len(), m.is_empty(), m.is_writable()), (4096, false, false));
        assert_eq!(m.as_ptr() as usize % 4096, 0);
        // SAFETY: the mapping is live and 4096 bytes long; a volatile read of one byte.
        assert_eq!(unsafe { m.as_ptr().read_volatile() }, 0x5a);
        drop(m);
        assert!(HostMapping::map_shared(file.as_fd(), 1, 4096, false).is_err(), "unaligned offset");
        assert!(HostMapping::map_shared(file.as_fd(), 0, 0, false).is_err());
        assert!(HostMapping::map_shared(file.as_fd(), u64::MAX, 4096, false).is_err());
        let anon = HostMapping::anonymous(4096).unwrap();
        assert!(anon.is_writable());
    }
}
