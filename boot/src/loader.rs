//! Loads the kernel (ELF vmlinux or bzImage), the initramfs and the command line into
//! guest memory.
//!
//! The kernel is entered at its 64-bit entry point in long mode (Linux 64-bit boot
//! protocol), so for a bzImage only the protected-mode part is loaded (at 1 MiB) and
//! the real-mode setup code is skipped; its setup header is kept for `boot_params`.

use std::io::{self, Read, Seek, SeekFrom};

use linux_loader::bootparam::{setup_header, XLF_KERNEL_64};
use linux_loader::cmdline::{Cmdline, Error as CmdlineError};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, Error as KernelLoaderError, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, ReadVolatile};

use crate::layout::{MemoryLayout, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PAGE_SIZE};

/// The 64-bit entry point of a bzImage is this far into its protected-mode code
/// (`startup_64` in arch/x86/boot/compressed/head_64.S).
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Boot protocol 2.12 introduced `xloadflags` and with it XLF_KERNEL_64.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;
/// "HdrS" at offset 0x202 marks a bzImage setup header.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: [u8; 4] = *b"HdrS";

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot read the file: {0}")]
    Read(#[source] io::Error),
    #[error(
        "not a Linux kernel: expected an ELF vmlinux (\"\\x7fELF\" at offset 0) or a bzImage \
         (\"HdrS\" at offset 0x202) and found neither"
    )]
    NotAKernel,
    #[error("ELF file is not an x86-64 vmlinux (ELF class {class}, machine {machine}); use a 64-bit x86 kernel")]
    WrongElf { class: u8, machine: u16 },
    #[error("cannot load the ELF vmlinux: {0}")]
    Elf(#[source] KernelLoaderError),
    #[error("cannot load the bzImage: {0}")]
    BzImage(#[source] KernelLoaderError),
    #[error(
        "the bzImage has no 64-bit entry point (boot protocol {:x}.{:02x}, xloadflags {xloadflags:#x}); \
         use an x86_64 kernel with boot protocol 2.12 or newer",
        version >> 8,
        version & 0xff
    )]
    No64BitEntry { version: u16, xloadflags: u16 },
    #[error(
        "the kernel occupies guest memory up to {} MiB once decompressed, more than the guest has \
         below the 32-bit MMIO hole; give the guest more memory with --memory",
        end.div_ceil(1 << 20)
    )]
    KernelTooBig { end: u64 },
    #[error("the bzImage setup header is corrupt: its load address and init_size overflow; use an intact kernel")]
    CorruptSetupHeader,
    #[error("the initramfs is empty; give a cpio archive or leave the initramfs out")]
    EmptyInitramfs,
    #[error(
        "initramfs of {} MiB does not fit in the {} MiB of guest RAM between the kernel's end \
         ({} MiB) and {} MiB; give the guest more memory with --memory",
        size.div_ceil(1 << 20),
        (limit.saturating_sub(*kernel_end)) >> 20,
        kernel_end >> 20,
        limit >> 20
    )]
    InitramfsTooBig { size: u64, kernel_end: u64, limit: u64 },
    #[error("cannot read the initramfs into guest memory: {0}")]
    InitramfsRead(#[source] GuestMemoryError),
    #[error(
        "the kernel command line is {len} bytes, more than the {max} bytes Linux accepts on x86; \
         shorten it"
    )]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the kernel command line must be printable ASCII: {0}")]
    CmdlineInvalid(#[source] CmdlineError),
    #[error("cannot write the command line into guest memory at {CMDLINE_START:#x}: {0}")]
    CmdlineWrite(#[source] KernelLoaderError),
}

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelImage {
    /// The 64-bit entry point (RIP at boot).
    pub entry: GuestAddress,
    /// The bzImage setup header, to be copied into `boot_params`; None for an ELF.
    pub setup_header: Option<setup_header>,
    /// End (exclusive) of the memory the kernel occupies. For a bzImage this is the
    /// end of the area it decompresses into, not of the compressed file.
    pub end: GuestAddress,
}

/// Where the initramfs was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdRegion {
    pub addr: GuestAddress,
    pub size: u64,
}

enum Format {
    Elf,
    BzImage,
}

/// Loads an ELF vmlinux (at its physical addresses) or a bzImage (at 1 MiB) into
/// `mem`. Errors do not name the file; the caller adds its path.
pub fn load_kernel<M, F>(mem: &M, kernel: &mut F) -> Result<KernelImage, LoaderError>
where
    M: GuestMemoryBackend,
    F: Read + Seek + ReadVolatile,
{
    match detect(kernel)? {
        Format::Elf => load_elf(mem, kernel),
        Format::BzImage => load_bzimage(mem, kernel),
    }
}

fn detect<F: Read + Seek>(file: &mut F) -> Result<Format, LoaderError> {
    let mut ident = [0u8; 20];
    if read_at(file, 0, &mut ident)? && ident[..4] == ELF_MAGIC {
        let class = ident[4];
        let machine = u16::from_le_bytes([ident[18], ident[19]]);
        if class != ELFCLASS64 || machine != EM_X86_64 {
            return Err(LoaderError::WrongElf { class, machine });
        }
        return Ok(Format::Elf);
    }
    let mut magic = [0u8; 4];
    if read_at(file, BZIMAGE_MAGIC_OFFSET, &mut magic)? && magic == BZIMAGE_MAGIC {
        return Ok(Format::BzImage);
    }
    Err(LoaderError::NotAKernel)
}

/// Fills `buf` from `offset`; false if the file is too short.
fn read_at<F: Read + Seek>(file: &mut F, offset: u64, buf: &mut [u8]) -> Result<bool, LoaderError> {
    file.seek(SeekFrom::Start(offset)).map_err(LoaderError::Read)?;
    match file.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(LoaderError::Read(e)),
    }
}

fn load_elf<M, F>(mem: &M, kernel: &mut F) -> Result<KernelImage, LoaderError>
where
    M: GuestMemoryBackend,
    F: Read + Seek + ReadVolatile,
{
    // Asking for the entry to be at or above 1 MiB keeps the kernel off the boot data.
    let loaded = Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(LoaderError::Elf)?;
    Ok(KernelImage { entry: loaded.kernel_load, setup_header: None, end: GuestAddress(loaded.kernel_end) })
}

fn load_bzimage<M, F>(mem: &M, kernel: &mut F) -> Result<KernelImage, LoaderError>
where
    M: GuestMemoryBackend,
    F: Read + Seek + ReadVolatile,
{
    let load = GuestAddress(HIMEM_START);
    let loaded = BzImage::load(mem, Some(load), kernel, Some(load)).map_err(LoaderError::BzImage)?;
    // BzImage::load always returns the header it parsed.
    let hdr = loaded.setup_header.ok_or(LoaderError::NotAKernel)?;
    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    if version < MIN_BOOT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoaderError::No64BitEntry { version, xloadflags });
    }
    let end = decompressed_end(&hdr, HIMEM_START).ok_or(LoaderError::CorruptSetupHeader)?.max(loaded.kernel_end);
    if !fits(mem, HIMEM_START, end) {
        return Err(LoaderError::KernelTooBig { end });
    }
    Ok(KernelImage {
        entry: GuestAddress(HIMEM_START + BZIMAGE_64BIT_ENTRY_OFFSET),
        setup_header: Some(hdr),
        end: GuestAddress(end),
    })
}

/// End of the buffer the bzImage decompresses into, computed the way its 64-bit
/// entry code does: a relocatable kernel rounds its load address up to
/// `kernel_alignment` but never goes below `pref_address` (LOAD_PHYSICAL_ADDR); a
/// fixed one always uses `pref_address`. The buffer is `init_size` long. None if the
/// header's numbers overflow.
fn decompressed_end(hdr: &setup_header, load: u64) -> Option<u64> {
    let (align, pref, init_size) = (u64::from(hdr.kernel_alignment).max(1), hdr.pref_address, hdr.init_size);
    let base = if hdr.relocatable_kernel != 0 { load.checked_next_multiple_of(align)?.max(pref) } else { pref };
    base.checked_add(u64::from(init_size))
}

/// Whether guest RAM covers [start, end).
fn fits<M: GuestMemoryBackend>(mem: &M, start: u64, end: u64) -> bool {
    let Some(len) = end.checked_sub(start).and_then(|l| usize::try_from(l).ok()) else {
        return false;
    };
    mem.check_range(GuestAddress(start), len)
}

/// Loads the initramfs page-aligned as high as possible in low RAM: below the MMIO
/// hole, below the kernel's `initrd_addr_max`, and above the kernel. High, so that the
/// kernel's own early allocations (which start low) never run into it.
pub fn load_initramfs<M, F>(
    mem: &M,
    layout: &MemoryLayout,
    initrd: &mut F,
    kernel: &KernelImage,
) -> Result<InitrdRegion, LoaderError>
where
    M: GuestMemoryBackend,
    F: Read + Seek + ReadVolatile,
{
    let size = initrd.seek(SeekFrom::End(0)).map_err(LoaderError::Read)?;
    initrd.rewind().map_err(LoaderError::Read)?;
    if size == 0 {
        return Err(LoaderError::EmptyInitramfs);
    }
    let mut limit = layout.low_ram_end();
    if let Some(hdr) = &kernel.setup_header {
        // The highest address the initramfs may occupy, inclusive.
        let max = u64::from(hdr.initrd_addr_max);
        if max != 0 {
            limit = limit.min(max + 1);
        }
    }
    let kernel_end = kernel.end.0.next_multiple_of(PAGE_SIZE);
    let too_big = LoaderError::InitramfsTooBig { size, kernel_end, limit };
    let addr = match limit.checked_sub(size) {
        Some(top) => top - top % PAGE_SIZE,
        None => return Err(too_big),
    };
    if addr < kernel_end {
        return Err(too_big);
    }
    // size <= limit <= 3 GiB, so this cannot fail on a 64-bit host.
    let len = usize::try_from(size).map_err(|_| too_big)?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, len).map_err(LoaderError::InitramfsRead)?;
    Ok(InitrdRegion { addr: GuestAddress(addr), size })
}

/// Writes `cmdline`, NUL-terminated, at CMDLINE_START. Leading and trailing
/// whitespace is dropped. Returns the length written, without the NUL.
pub fn load_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &str) -> Result<usize, LoaderError> {
    let max = CMDLINE_MAX_SIZE - 1;
    let too_long = || LoaderError::CmdlineTooLong { len: cmdline.trim().len(), max };
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(LoaderError::CmdlineInvalid)?;
    cl.insert_str(cmdline).map_err(|e| match e {
        CmdlineError::TooLarge => too_long(),
        e => LoaderError::CmdlineInvalid(e),
    })?;
    let len = cl.as_cstring().map_err(LoaderError::CmdlineInvalid)?.as_bytes().len();
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(LoaderError::CmdlineWrite)?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MemoryLayout;
    use std::io::Cursor;

    type Mem = vm_memory::GuestMemoryMmap<()>;
    const MIB: u64 = 1 << 20;

    fn mem(bytes: u64) -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), bytes as usize)]).unwrap()
    }

    /// A minimal x86-64 ELF with one PT_LOAD segment of `payload` at `paddr`.
    pub(crate) fn fake_elf(entry: u64, paddr: u64, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 0x100];
        f[..4].copy_from_slice(&ELF_MAGIC);
        f[4] = ELFCLASS64;
        f[5] = 1; // little endian
        f[6] = 1; // ELF version
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = &mut f[64..120];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[8..16].copy_from_slice(&0x100u64.to_le_bytes()); // p_offset
        ph[16..24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
        ph[24..32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
        ph[32..40].copy_from_slice(&(payload.len() as u64).to_le_bytes()); // p_filesz
        ph[40..48].copy_from_slice(&(payload.len() as u64 + 0x1000).to_le_bytes()); // p_memsz
        f.extend_from_slice(payload);
        f
    }

    /// A minimal bzImage: one setup sector after the boot sector, then `payload`.
    pub(crate) fn fake_bzimage(version: u16, xloadflags: u16, init_size: u32, payload: &[u8]) -> Vec<u8> {
        let hdr = setup_header {
            setup_sects: 1,
            boot_flag: 0xaa55,
            header: u32::from_le_bytes(BZIMAGE_MAGIC),
            version,
            loadflags: linux_loader::bootparam::LOADED_HIGH,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags,
            cmdline_size: 2047,
            pref_address: 0x100_0000,
            init_size,
            ..Default::default()
        };
        let mut f = vec![0u8; 1024];
        f[0x1f1..0x1f1 + std::mem::size_of::<setup_header>()].copy_from_slice(vm_memory::ByteValued::as_slice(&hdr));
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn loads_an_elf_at_its_physical_address() {
        let m = mem(32 * MIB);
        let image = fake_elf(0x100_0000, 0x100_0000, b"kernel!");
        let k = load_kernel(&m, &mut Cursor::new(image)).unwrap();
        assert_eq!(k.entry, GuestAddress(0x100_0000));
        assert_eq!(k.setup_header, None);
        assert_eq!(k.end, GuestAddress(0x100_0000 + 7 + 0x1000));
        let mut buf = [0u8; 7];
        m.read_slice(&mut buf, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(&buf, b"kernel!");
    }

    #[test]
    fn rejects_an_elf_entry_below_1m_and_a_32bit_elf() {
        let m = mem(32 * MIB);
        let low = fake_elf(0x8000, 0x8000, b"x");
        assert!(matches!(load_kernel(&m, &mut Cursor::new(low)), Err(LoaderError::Elf(_))));
        let mut elf32 = fake_elf(0x100_0000, 0x100_0000, b"x");
        elf32[4] = 1;
        assert!(matches!(load_kernel(&m, &mut Cursor::new(elf32)), Err(LoaderError::WrongElf { class: 1, .. })));
    }

    #[test]
    fn loads_a_bzimage_at_1m_with_the_64bit_entry() {
        let m = mem(32 * MIB);
        let image = fake_bzimage(0x020f, XLF_KERNEL_64, 4 * MIB as u32, b"compressed");
        let k = load_kernel(&m, &mut Cursor::new(image)).unwrap();
        assert_eq!(k.entry, GuestAddress(0x10_0200));
        let hdr = k.setup_header.unwrap();
        assert_eq!({ hdr.header }, u32::from_le_bytes(*b"HdrS"));
        // Decompressed at max(align_up(1 MiB, 2 MiB), 16 MiB) = 16 MiB, 4 MiB long.
        assert_eq!(k.end, GuestAddress(20 * MIB));
        let mut buf = [0u8; 10];
        m.read_slice(&mut buf, GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(&buf, b"compressed");
    }

    #[test]
    fn rejects_a_bzimage_without_64bit_entry_or_room() {
        let m = mem(32 * MIB);
        let old = fake_bzimage(0x020a, 0, MIB as u32, b"x");
        let e = load_kernel(&m, &mut Cursor::new(old)).unwrap_err();
        assert!(matches!(e, LoaderError::No64BitEntry { version: 0x020a, .. }), "{e}");
        assert!(e.to_string().contains("2.0a"), "{e}");

        let huge = fake_bzimage(0x020f, XLF_KERNEL_64, 64 * MIB as u32, b"x");
        let e = load_kernel(&m, &mut Cursor::new(huge)).unwrap_err();
        assert!(matches!(e, LoaderError::KernelTooBig { end } if end == 80 * MIB), "{e}");
        assert!(e.to_string().contains("80 MiB") && e.to_string().contains("--memory"), "{e}");
    }

    #[test]
    fn rejects_what_is_not_a_kernel() {
        let m = mem(32 * MIB);
        for junk in [Vec::new(), b"hello".to_vec(), vec![0u8; 4096]] {
            let e = load_kernel(&m, &mut Cursor::new(junk)).unwrap_err();
            assert!(matches!(e, LoaderError::NotAKernel));
            assert!(e.to_string().contains("ELF vmlinux") && e.to_string().contains("bzImage"));
        }
    }

    fn kernel(end: u64, initrd_addr_max: Option<u32>) -> KernelImage {
        KernelImage {
            entry: GuestAddress(HIMEM_START),
            setup_header: initrd_addr_max.map(|m| setup_header { initrd_addr_max: m, ..Default::default() }),
            end: GuestAddress(end),
        }
    }

    #[test]
    fn initramfs_goes_page_aligned_to_the_top_of_low_ram() {
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let m = mem(64 * MIB);
        let data = vec![0x5a; 5000];
        let r = load_initramfs(&m, &layout, &mut Cursor::new(data), &kernel(20 * MIB, None)).unwrap();
        assert_eq!(r.size, 5000);
        assert_eq!(r.addr, GuestAddress(64 * MIB - 0x2000));
        assert_eq!(m.read_obj::<u8>(GuestAddress(64 * MIB - 0x2000 + 4999)).unwrap(), 0x5a);
    }

    #[test]
    fn initramfs_respects_initrd_addr_max() {
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let m = mem(64 * MIB);
        let k = kernel(20 * MIB, Some((32 * MIB - 1) as u32));
        let r = load_initramfs(&m, &layout, &mut Cursor::new(vec![1u8; 4096]), &k).unwrap();
        assert_eq!(r.addr, GuestAddress(32 * MIB - 4096));
    }

    #[test]
    fn initramfs_that_does_not_fit_says_so() {
        let layout = MemoryLayout::new(32 * MIB).unwrap();
        let m = mem(32 * MIB);
        let e = load_initramfs(&m, &layout, &mut Cursor::new(vec![0u8; (13 * MIB) as usize]), &kernel(20 * MIB, None))
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("13 MiB") && msg.contains("12 MiB") && msg.contains("--memory"), "{msg}");
        let e = load_initramfs(&m, &layout, &mut Cursor::new(vec![0u8; (40 * MIB) as usize]), &kernel(20 * MIB, None))
            .unwrap_err();
        assert!(matches!(e, LoaderError::InitramfsTooBig { .. }));
        let e = load_initramfs(&m, &layout, &mut Cursor::new(Vec::new()), &kernel(20 * MIB, None)).unwrap_err();
        assert!(matches!(e, LoaderError::EmptyInitramfs));
    }

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let m = mem(32 * MIB);
        let len = load_cmdline(&m, "  console=ttyS0 quiet ").unwrap();
        assert_eq!(len, "console=ttyS0 quiet".len());
        let mut buf = [0xffu8; 20];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0 quiet\0");
    }

    #[test]
    fn cmdline_limits() {
        let m = mem(32 * MIB);
        assert!(load_cmdline(&m, &"a".repeat(CMDLINE_MAX_SIZE - 1)).is_ok());
        let e = load_cmdline(&m, &"a".repeat(CMDLINE_MAX_SIZE)).unwrap_err();
        assert!(matches!(e, LoaderError::CmdlineTooLong { len: 2048, max: 2047 }), "{e}");
        let e = load_cmdline(&m, "root=/dev/vda\u{7}").unwrap_err();
        assert!(matches!(e, LoaderError::CmdlineInvalid(_)), "{e}");
        assert_eq!(load_cmdline(&m, "").unwrap(), 0);
    }
}
