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

/// What backs guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RamBacking {
    /// Anonymous memory, 2 MiB-aligned with transparent huge pages requested.
    #[default]
    Anonymous,
    /// Reserved 2 MiB hugetlbfs pages (`--memory ...,hugepages=on`): never swapped or
    /// split, and pinned for DMA (VFIO) one huge page at a time, which is what makes
    /// mapping a large guest for a passthrough device fast.
    HugePages,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest RAM of {mib} MiB needs {pages} free 2 MiB huge pages, but the host has {free} free ({path}); reserve more with `echo N > /proc/sys/vm/nr_hugepages` or drop hugepages=on")]
    HugePagesShort { mib: usize, pages: usize, free: String, path: &'static str },
    #[error("with hugepages=on the guest RAM region at {addr:#x} of {size:#x} bytes is not a multiple of 2 MiB; give --memory in whole 2 MiB units")]
    HugePageSize { addr: u64, size: usize },
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
    pub fn new(regions: &[(GuestAddress, usize)], backing: RamBacking) -> Result<Self, MemoryError> {
        let mut mappings = Vec::with_capacity(regions.len());
        let mut guest_regions = Vec::with_capacity(regions.len());
        if backing == RamBacking::HugePages {
            if let Some(&(addr, size)) = regions.iter().find(|(_, size)| size % HUGE_PAGE != 0) {
                return Err(MemoryError::HugePageSize { addr: addr.0, size });
            }
        }
        for &(addr, size) in regions {
            let mapping = match backing {
                RamBacking::Anonymous => {
                    let m = map_aligned(size)?;
                    advise_huge_pages(&m);
                    m
                }
                RamBacking::HugePages => map_huge(size, regions)?,
            };
            let bad = |reason: String| MemoryError::Region { addr: addr.0, size, reason };
            // SAFETY: `mapping` is a live read-write mapping of exactly `size` bytes that
            // outlives the region (both are owned by the returned GuestRam).
            let region = unsafe { MmapRegionBuilder::new(size).with_raw_mmap_pointer(mapping.ptr.cast()) }
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(backing.mmap_flags())
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

impl RamBacking {
    /// The flags guest RAM of this kind is mapped with.
    fn mmap_flags(self) -> libc::c_int {
        match self {
            RamBacking::Anonymous => libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            RamBacking::HugePages => libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_HUGETLB,
        }
    }
}

/// A fresh read-write anonymous mapping of `len` bytes with `flags`.
fn mmap_anonymous(len: usize, flags: libc::c_int) -> std::io::Result<*mut libc::c_void> {
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
    let ptr = unsafe { libc::mmap(null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ptr)
}

/// Maps `size` bytes at a 2 MiB-aligned address: over-reserve by 2 MiB, keep the aligned
/// middle, give the ragged ends back.
fn map_aligned(size: usize) -> Result<Mapping, MemoryError> {
    let reserve = size + HUGE_PAGE;
    let base = mmap_anonymous(reserve, RamBacking::Anonymous.mmap_flags())
        .map_err(|source| MemoryError::Reserve { mib: reserve >> 20, source })?;
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

const FREE_HUGE_PAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

/// Maps `size` bytes of 2 MiB hugetlbfs pages. Without MAP_NORESERVE the kernel
/// reserves every page now, so a short pool fails here rather than as a SIGBUS when
/// the guest first touches a page. `all` is every region, for the error message.
fn map_huge(size: usize, all: &[(GuestAddress, usize)]) -> Result<Mapping, MemoryError> {
    let ptr = mmap_anonymous(size, RamBacking::HugePages.mmap_flags()).map_err(|source| {
        let total: usize = all.iter().map(|(_, s)| s).sum();
        match source.raw_os_error() {
            Some(libc::ENOMEM) | Some(libc::EINVAL) => MemoryError::HugePagesShort {
                mib: total >> 20,
                pages: total / HUGE_PAGE,
                free: std::fs::read_to_string(FREE_HUGE_PAGES).map_or("none".into(), |s| s.trim().to_string()),
                path: FREE_HUGE_PAGES,
            },
            _ => MemoryError::Reserve { mib: size >> 20, source },
        }
    })?;
    Ok(Mapping { ptr, len: size })
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
        let regions = [(GuestAddress(0), 4 << 20), (GuestAddress(1 << 32), 6 << 20)];
        let ram = GuestRam::new(&regions, RamBacking::Anonymous).unwrap();
        for region in ram.memory().iter() {
            assert_eq!(region.as_ptr() as usize % HUGE_PAGE, 0);
        }
        ram.memory().write_obj(0xabcd_u32, GuestAddress((1 << 32) + (6 << 20) - 4)).unwrap();
        assert_eq!(ram.memory().read_obj::<u32>(GuestAddress((1 << 32) + (6 << 20) - 4)).unwrap(), 0xabcd);
        assert!(ram.memory().read_obj::<u32>(GuestAddress(4 << 20)).is_err(), "the hole is not RAM");
    }

    #[test]
    fn huge_pages_need_whole_pages_and_say_what_is_missing() {
        let odd = [(GuestAddress(0), (4 << 20) + 4096)];
        let e = GuestRam::new(&odd, RamBacking::HugePages).err().expect("a region of 4 MiB + 4 KiB");
        assert!(matches!(e, MemoryError::HugePageSize { .. }), "{e}");
        // More huge pages than any test host reserves: refused with the pool named.
        let huge = [(GuestAddress(0), 1 << 40)];
        let e = GuestRam::new(&huge, RamBacking::HugePages).err().expect("1 TiB of huge pages");
        let msg = e.to_string();
        assert!(msg.contains("nr_hugepages") && msg.contains("524288"), "{msg}");
    }
}
