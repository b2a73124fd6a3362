//! The Linux `boot_params` ("zero page") and the E820 memory map in it.

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE, LOADED_HIGH};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::layout::{
    MemoryLayout, ACPI_START, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_END, EBDA_START, HIMEM_START,
    KVM_IDENTITY_MAP_ADDR, KVM_PRIVATE_END, MMIO_HOLE_END, PCI_ECAM_SIZE, PCI_ECAM_START, ZERO_PAGE_START,
};
use crate::loader::{InitrdRegion, KernelImage};

/// `type_of_loader` for a boot loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = u32::from_le_bytes(*b"HdrS");
/// What an x86_64 kernel asks for by default (CONFIG_PHYSICAL_ALIGN).
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// Boot protocol 2.06 made `cmdline_size` the kernel's limit on the command line.
const CMDLINE_SIZE_PROTOCOL: u16 = 0x0206;

#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error("the kernel command line is {len} bytes but this kernel accepts at most {max}; shorten it")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the memory map has {0} entries, more than the {E820_MAX_ENTRIES_ZEROPAGE} boot_params holds")]
    TooManyE820Entries(usize),
    #[error("cannot write boot_params at {ZERO_PAGE_START:#x}: {0}")]
    Write(#[source] GuestMemoryError),
}

/// E820 range types Linux knows; only the two used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

impl E820Entry {
    fn new(start: u64, end: u64, kind: E820Kind) -> Self {
        Self { addr: start, size: end - start, kind }
    }
}

/// The guest's memory map, in address order.
///
/// The ACPI area [ACPI_START, HIMEM_START) is `Reserved`, not `ACPI` (type 3): that
/// window is the legacy BIOS area, which real firmware reports as reserved, and type 3
/// would tell the OS it may reuse the memory once it has read the tables, which it
/// must not (the AML is evaluated at run time). Linux finds the tables through
/// `acpi_rsdp_addr` either way. The VGA/option-ROM window [0xa0000, 0xe0000) is left
/// out, a gap like on real machines. The pages KVM uses for its TSS and identity map
/// are reserved so the guest never places a BAR on them.
pub fn build_e820(layout: &MemoryLayout) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry::new(0, EBDA_START, E820Kind::Ram),
        E820Entry::new(EBDA_START, EBDA_END, E820Kind::Reserved),
        E820Entry::new(ACPI_START, HIMEM_START, E820Kind::Reserved),
        E820Entry::new(HIMEM_START, layout.low_ram_end(), E820Kind::Ram),
        // Linux accepts an MCFG region only if firmware reserved it (here and in the
        // DSDT's motherboard resources); otherwise it falls back to port I/O config.
        E820Entry::new(PCI_ECAM_START, PCI_ECAM_START + PCI_ECAM_SIZE, E820Kind::Reserved),
        E820Entry::new(KVM_IDENTITY_MAP_ADDR, KVM_PRIVATE_END, E820Kind::Reserved),
    ];
    if let Some(end) = layout.high_ram_end() {
        map.push(E820Entry::new(MMIO_HOLE_END, end, E820Kind::Ram));
    }
    map
}

/// The setup header an ELF vmlinux gets, having none of its own: just the magic
/// numbers and the alignment the kernel's startup code checks.
fn default_header() -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG_MAGIC,
        header: HDRS_MAGIC,
        kernel_alignment: DEFAULT_KERNEL_ALIGNMENT,
        ..Default::default()
    }
}

/// Builds `boot_params` and writes it at ZERO_PAGE_START.
///
/// `cmdline_len` is the length of the command line at CMDLINE_START without its NUL.
/// It is checked against the kernel's own limit when the kernel states one.
pub fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    layout: &MemoryLayout,
    kernel: &KernelImage,
    cmdline_len: usize,
    initrd: Option<InitrdRegion>,
    rsdp: Option<GuestAddress>,
) -> Result<(), ParamsError> {
    let params = build_boot_params(layout, kernel, cmdline_len, initrd, rsdp)?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START)).map_err(ParamsError::Write)
}

fn build_boot_params(
    layout: &MemoryLayout,
    kernel: &KernelImage,
    cmdline_len: usize,
    initrd: Option<InitrdRegion>,
    rsdp: Option<GuestAddress>,
) -> Result<boot_params, ParamsError> {
    let mut params = boot_params::default();
    let mut hdr = kernel.setup_header.unwrap_or_else(default_header);

    let max = cmdline_limit(&hdr);
    if cmdline_len > max {
        return Err(ParamsError::CmdlineTooLong { len: cmdline_len, max });
    }
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    // The protected-mode kernel is at 1 MiB, not 0x10000.
    hdr.loadflags |= LOADED_HIGH;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    // cmdline_len <= max, which came from a u32 or is CMDLINE_MAX_SIZE.
    hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        let (lo, hi) = split(initrd.addr.0);
        hdr.ramdisk_image = lo;
        params.ext_ramdisk_image = hi;
        let (lo, hi) = split(initrd.size);
        hdr.ramdisk_size = lo;
        params.ext_ramdisk_size = hi;
    }
    params.hdr = hdr;
    if let Some(rsdp) = rsdp {
        params.acpi_rsdp_addr = rsdp.0;
    }

    let map = build_e820(layout);
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(ParamsError::TooManyE820Entries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind as u32 };
    }
    params.e820_entries = map.len() as u8; // <= 128
    Ok(params)
}

/// The longest command line (without NUL) the kernel accepts.
fn cmdline_limit(hdr: &setup_header) -> usize {
    let (version, size) = (hdr.version, hdr.cmdline_size);
    let ours = CMDLINE_MAX_SIZE - 1;
    if version >= CMDLINE_SIZE_PROTOCOL && size != 0 {
        usize::try_from(size).map_or(ours, |s| s.min(ours))
    } else {
        ours
    }
}

/// Low and high 32 bits, for boot_params' split 64-bit fields.
fn split(v: u64) -> (u32, u32) {
    (v as u32, (v >> 32) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn elf_kernel() -> KernelImage {
        KernelImage { entry: GuestAddress(0x100_0000), setup_header: None, end: GuestAddress(0x200_0000) }
    }

    #[test]
    fn e820_small_guest() {
        let map = build_e820(&MemoryLayout::new(256 * MIB).unwrap());
        assert_eq!(map.len(), 6);
        assert_eq!(map[0], E820Entry { addr: 0, size: 0x9fc00, kind: E820Kind::Ram });
        assert_eq!(map[1], E820Entry { addr: 0x9fc00, size: 0x400, kind: E820Kind::Reserved });
        assert_eq!(map[2], E820Entry { addr: 0xe0000, size: 0x20000, kind: E820Kind::Reserved });
        assert_eq!(map[3], E820Entry { addr: MIB, size: 255 * MIB, kind: E820Kind::Ram });
        assert_eq!(map[4], E820Entry { addr: PCI_ECAM_START, size: PCI_ECAM_SIZE, kind: E820Kind::Reserved });
        assert_eq!(map[5].kind, E820Kind::Reserved);
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr, "sorted, no overlap: {pair:x?}");
        }
    }

    #[test]
    fn e820_large_guest_has_ram_above_4g() {
        let map = build_e820(&MemoryLayout::new(5 * GIB).unwrap());
        assert_eq!(map[3], E820Entry { addr: MIB, size: 3 * GIB - MIB, kind: E820Kind::Ram });
        assert_eq!(map.last(), Some(&E820Entry { addr: 4 * GIB, size: 2 * GIB, kind: E820Kind::Ram }));
        let ram: u64 = map.iter().filter(|e| e.kind == E820Kind::Ram).map(|e| e.size).sum();
        assert_eq!(ram, 5 * GIB - (HIMEM_START - EBDA_START), "all RAM but the legacy area");
    }

    #[test]
    fn elf_kernel_gets_a_default_header() {
        let layout = MemoryLayout::new(256 * MIB).unwrap();
        let initrd = InitrdRegion { addr: GuestAddress(200 * MIB), size: 3 * MIB };
        let p = build_boot_params(&layout, &elf_kernel(), 12, Some(initrd), Some(GuestAddress(ACPI_START))).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.kernel_alignment }, 0x0100_0000);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!(hdr.loadflags & LOADED_HIGH, LOADED_HIGH);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 12);
        assert_eq!({ hdr.ramdisk_image }, (200 * MIB) as u32);
        assert_eq!({ hdr.ramdisk_size }, (3 * MIB) as u32);
        assert_eq!({ p.ext_ramdisk_image }, 0);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 6);
        let first = p.e820_table[0];
        assert_eq!(({ first.addr }, { first.size }, { first.r#type }), (0, 0x9fc00, 1));
    }

    #[test]
    fn bzimage_header_is_kept_and_its_cmdline_limit_applies() {
        let layout = MemoryLayout::new(256 * MIB).unwrap();
        let hdr = setup_header {
            version: 0x020f,
            cmdline_size: 100,
            init_size: 0x1234_5000,
            header: HDRS_MAGIC,
            ..Default::default()
        };
        let kernel = KernelImage { setup_header: Some(hdr), ..elf_kernel() };
        let p = build_boot_params(&layout, &kernel, 100, None, None).unwrap();
        assert_eq!({ p.hdr.init_size }, 0x1234_5000, "the kernel's header reaches boot_params");
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert_eq!({ p.acpi_rsdp_addr }, 0);
        let e = build_boot_params(&layout, &kernel, 101, None, None).unwrap_err();
        assert!(matches!(e, ParamsError::CmdlineTooLong { len: 101, max: 100 }), "{e}");
    }

    #[test]
    fn writes_the_zero_page() {
        let layout = MemoryLayout::new(16 * MIB).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (16 * MIB) as usize)]).unwrap();
        write_boot_params(&mem, &layout, &elf_kernel(), 0, None, None).unwrap();
        let magic: u16 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1fe)).unwrap();
        assert_eq!(magic, 0xaa55);
        let entries: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8)).unwrap();
        assert_eq!(entries, 6);
    }
}
