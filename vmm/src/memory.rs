//! Guest RAM: anonymous host mappings aligned so that transparent huge pages can back
//! guest-physical 2 MiB pages one for one.
//!
//! A plain `mmap` returns a 4 KiB-aligned address (kernels before 6.7 do not align large
//! anonymous mappings), and then no 2 MiB guest page lines up with a 2 MiB host page:
//! THP cannot back the guest and KVM maps it with 4 KiB pages. Under nested paging every
//! one of those is a nested fault and a TLB entry more, which measurably slows a guest
//! (QEMU aligns its RAM blocks for the same reason).

use std::ptr::null_mut;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestRegionMmap};

use crate::vm::GuestMemory;

const HUGE_PAGE: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot reserve {mib} MiB of host address space for guest RAM: {source}; the host may be out of memory or address space (check ulimit -v)")]
    Reserve {
        mib: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("guest RAM region at {addr:#x} (+{size:#x}) is invalid: {reason}")]
    Region { addr: u64, size: usize, reason: String },
}

/// Host mappings this VM owns; unmapped on drop, after `GuestMemory` no longer points in.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory; ownership moves between threads with the VM.
unsafe impl Send for Mapping {}
// SAFETY: `Mapping` is never used to access memory, only to unmap it on drop.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the range this value mapped; nothing refers to it any more
        // (the owner drops `GuestMemory` and the VM fd first).
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// The RAM of one VM.
pub struct GuestRam {
    memory: GuestMemory,
    _mappings: Vec<Mapping>,
}

impl GuestRam {
    pub fn new(regions: &[(GuestAddress, usize)]) -> Result<Self, MemoryError> {
        let mut mappings = Vec::with_capacity(regions.len());
        let mut guest_regions = Vec::with_capacity(regions.len());
        for &(addr, size) in regions {
            let mapping = map_aligned(size)?;
            advise_huge_pages(&mapping);
            let bad = |reason: String| MemoryError::Region { addr: addr.0, size, reason };
            // SAFETY: `mapping` is a live read-write mapping of exactly `size` bytes that
            // outlives the region (both are owned by the returned GuestRam).
            let region = unsafe { MmapRegionBuilder::new(size).with_raw_mmap_pointer(mapping.ptr.cast()) }
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            guest_regions.push(GuestRegionMmap::new(region, addr).ok_or_else(|| bad("address overflow".into()))?);
            mappings.push(mapping);
        }
        let memory = GuestMemory::from_regions(guest_regions).map_err(|e| MemoryError::Region {
            addr: 0,
            size: 0,
            reason: e.to_string(),
        })?;
        Ok(Self { memory, _mappings: mappings })
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }
}

/// Maps `size` bytes at a 2 MiB-aligned address: over-reserve by 2 MiB, keep the aligned
/// middle, give the ragged ends back.
fn map_aligned(size: usize) -> Result<Mapping, MemoryError> {
    let reserve = size + HUGE_PAGE;
    let err = |source| MemoryError::Reserve { mib: reserve >> 20, source };
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
    let base = unsafe {
        libc::mmap(
            null_mut(),
            reserve,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(err(std::io::Error::last_os_error()));
    }
    let start = base as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = reserve - head - size;
    // SAFETY: both ranges lie inside the reservation just made and are not used.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
    }
    Ok(Mapping { ptr: aligned as *mut libc::c_void, len: size })
}

/// Asks for transparent huge pages (hosts whose THP mode is "madvise" give them only on
/// request). Advice only: failure changes nothing but speed.
fn advise_huge_pages(mapping: &Mapping) {
    // SAFETY: MADV_HUGEPAGE on a range we own changes no contents.
    unsafe { libc::madvise(mapping.ptr, mapping.len, libc::MADV_HUGEPAGE) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn regions_are_huge_page_aligned_and_usable() {
        let ram = GuestRam::new(&[(GuestAddress(0), 4 << 20), (GuestAddress(1 << 32), 6 << 20)]).unwrap();
        for region in ram.memory().iter() {
            assert_eq!(region.as_ptr() as usize % HUGE_PAGE, 0);
        }
        ram.memory().write_obj(0xabcd_u32, GuestAddress((1 << 32) + (6 << 20) - 4)).unwrap();
        assert_eq!(ram.memory().read_obj::<u32>(GuestAddress((1 << 32) + (6 << 20) - 4)).unwrap(), 0xabcd);
        assert!(ram.memory().read_obj::<u32>(GuestAddress(4 << 20)).is_err(), "the hole is not RAM");
    }
}
