//! The guest's physical address map: where boot data lives, where RAM is, and where
//! the holes for MMIO are.
//!
//! Everything below 1 MiB is boot data written by this crate; the kernel goes at
//! 1 MiB and up. RAM that would overlap the 32-bit MMIO hole (3 GiB..4 GiB) is moved
//! above 4 GiB instead, so a guest with more than 3 GiB has two RAM regions.

use vm_memory::GuestAddress;

/// The boot GDT (null, code, data, TSS: 4 × 8 bytes). Below 0x7c00 nothing of the
/// real-mode world is used, so the area after the BIOS data area is free.
pub const BOOT_GDT_START: u64 = 0x500;
/// The (empty) boot IDT, right after the GDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux `boot_params` ("zero page"); RSI points here at the 64-bit entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial RSP/RBP: the top of the page after the zero page (16-byte aligned, with a
/// little room above as the x86-64 ABI likes).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: one PML4, one PDPT and one page directory of 2 MiB
/// pages, which maps the first 1 GiB.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;

/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room for the command line, NUL included. This is x86 Linux's `COMMAND_LINE_SIZE`:
/// the kernel copies exactly this many bytes from `cmd_line_ptr` and cuts anything
/// longer, so accepting more would silently lose the tail of the command line.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// The extended BIOS data area: the last KiB of base memory. Linux scans it for the
/// MP floating pointer, so the MP table goes here.
pub const EBDA_START: u64 = 0x9fc00;
/// End of base memory (start of the legacy VGA window).
pub const EBDA_END: u64 = 0xa0000;
pub const MPTABLE_START: u64 = EBDA_START;

/// RSDP and all ACPI tables live in [ACPI_START, HIMEM_START), the legacy BIOS area
/// where Linux also scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
/// The x86 reset vector, F000:FFF0: the last 16 bytes of the legacy area. Linux jumps
/// here to reboot on this platform; see `reset_vector`. The ACPI tables end below it.
pub const RESET_VECTOR: u64 = 0xffff0;
/// First byte above the legacy area; the kernel is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole: 3 GiB..4 GiB holds no RAM. The PCI work places a 32-bit BAR
/// window and ECAM here, next to the IOAPIC and LAPIC.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;

/// 32-bit memory BARs are allocated from [PCI_MMIO32_START, PCI_MMIO32_END): the lower
/// half of the hole, below ECAM and the fixed devices.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO32_END: u64 = PCI_ECAM_START;
/// ECAM (MMCONFIG) for PCI segment 0, bus 0 only: 32 devices x 8 functions x 4 KiB.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// The I/O port window routed to PCI (no device uses I/O BARs today; the window is
/// described so that one could, and kept clear of the legacy ports below 0x1000).
pub const PCI_IO_START: u16 = 0xc000;
pub const PCI_IO_END: u16 = 0xffff;
/// Size of the 64-bit BAR window that starts at `MemoryLayout::mmio64_start`.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;

pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// KVM_SET_TSS_ADDR wants three free pages below 4 GiB that the guest never uses; the
/// identity-map page (KVM_SET_IDENTITY_MAP_ADDR) sits in the page just below. Both
/// are at the top of the MMIO hole, away from where BARs are placed, and the E820
/// map reserves them so the guest does not put anything there either.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// End of what KVM uses at [KVM_IDENTITY_MAP_ADDR, KVM_PRIVATE_END).
pub const KVM_PRIVATE_END: u64 = KVM_TSS_ADDR + 3 * 0x1000;

/// The I/O port of the ACPI sleep control, sleep status and reset registers (one
/// byte, all three at the same port; see `acpi` for the values written to it).
pub const ACPI_SLEEP_PORT: u16 = 0x600;
/// Written to ACPI_SLEEP_PORT to reset the machine. Bit 0 is reserved in both the
/// sleep control and sleep status registers, so it cannot be confused with them.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// The `\_S5_` sleep type in the DSDT (soft off).
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;

/// The PCI hot-plug controller's registers (`devices::hotplug`): four 32-bit I/O ports
/// that the DSDT's slot objects and GED read and write when hot-plug is enabled (see
/// `acpi::hotplug`). Port I/O rather than MMIO because each access is then a plain
/// exit, with no instruction to decode, nested or not. Right after ACPI_SLEEP_PORT,
/// among the platform's own ports and below the PCI I/O window.
pub const PCI_HOTPLUG_PORT: u16 = 0x610;
pub const PCI_HOTPLUG_PORT_LEN: u16 = 0x10;
/// The interrupt of the DSDT's Generic Event Device (GED), which carries hot-plug
/// events: ISA IRQ 5, an edge, active high. On a hardware-reduced platform an ISA IRQ
/// is used only by what the DSDT describes, and nothing else here uses 5 (PIT 0,
/// COM1 4, RTC 8; PCI INTx is on 16 to 23 and the VMM's MSIs from IOAPIC_PINS up).
pub const GED_GSI: u32 = 5;

/// The first serial port, described in the DSDT so Linux routes its IRQ.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// The pvpanic port (`devices::legacy::PvPanic`, ACPI `QEMU0001` in the DSDT): QEMU's
/// port, so guests and tools that know pvpanic find it where they expect it.
pub const PVPANIC_PORT: u16 = 0x505;
/// The CMOS RTC, described in the DSDT for the same reason.
pub const RTC_PORT: u16 = 0x70;
pub const RTC_IRQ: u32 = 8;

/// The IOAPIC pin the PIT (ISA IRQ 0) arrives on. KVM's default GSI routing (no
/// KVM_SET_GSI_ROUTING) sends GSI n to IOAPIC pin n, so the in-kernel PIT lands on
/// pin 0, not on pin 2 as on real chipsets. The MP table and the MADT both describe
/// this pin; if the VMM ever installs QEMU-style routing (GSI 0 → pin 2), change it
/// here and both tables follow.
pub const PIT_IOAPIC_PIN: u8 = 0;

/// The input pins of KVM's in-kernel IOAPIC (`KVM_IOAPIC_NUM_PINS`): GSIs 0 to 23.
/// The MADT gives the IOAPIC GSI base 0; the guest reads the pin count from the
/// IOAPIC's version register, so no table repeats it.
pub const IOAPIC_PINS: u32 = 24;
/// The legacy interrupts (INTx) of PCI bus 0 arrive on the eight IOAPIC inputs above
/// the 16 ISA IRQs, [PCI_INTX_GSI_BASE, PCI_INTX_GSI_BASE + PCI_INTX_GSIS). Nothing
/// else is wired there: ISA devices use 0 to 15, and the VMM hands MSIs GSIs from
/// IOAPIC_PINS up.
pub const PCI_INTX_GSI_BASE: u32 = 16;
pub const PCI_INTX_GSIS: u32 = 8;
const _: () = assert!(PCI_INTX_GSI_BASE >= 16 && PCI_INTX_GSI_BASE + PCI_INTX_GSIS <= IOAPIC_PINS);

/// The GSI (the IOAPIC input, with KVM's identity routing of GSIs 0 to 23) that
/// interrupt pin `pin` (1 to 4: INTA# to INTD#) of the device in `slot` of bus 0 is
/// wired to. The DSDT's `_PRT` describes exactly this map (see `acpi`), and the VMM
/// connects a device's INTx irqfd to the same GSI.
///
/// The swizzle is a PCI-to-PCI bridge's, spread over eight lines instead of four:
/// `slot + pin - 1`, modulo 8. INTA# of eight neighbouring slots (the pin nearly every
/// single-function device uses) lands on eight different GSIs, and the pins of one
/// device on four. More devices than lines share them, which level-triggered INTx
/// allows.
///
/// Total, so a bad value can never panic: `slot` is taken modulo 32 and `pin - 1`
/// modulo 4 (pin 0, "no INTx", maps like INTD#; callers only ask for a pin the device
/// has).
pub const fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    let slot = (slot & 0x1f) as u32;
    let pin_index = (pin.wrapping_sub(1) & 0x3) as u32;
    PCI_INTX_GSI_BASE + (slot + pin_index) % PCI_INTX_GSIS
}

/// Page size used for alignment checks.
pub const PAGE_SIZE: u64 = 0x1000;
/// The smallest guest this layout accepts. The boot data needs only the first MiB, but
/// a Linux kernel decompresses to 16 MiB and up, so anything smaller cannot boot Linux
/// and is almost certainly a unit mistake (e.g. `--memory 512` meaning MiB).
pub const MIN_RAM_BYTES: u64 = 16 << 20;
/// The largest guest this layout accepts (1 TiB). Far above what the tests use, and
/// low enough that RAM plus the hole stays well inside a 40-bit guest physical
/// address space (QEMU's TCG `-cpu max` reports 40 bits).
pub const MAX_RAM_BYTES: u64 = 1 << 40;
/// 64-bit MMIO space starts at a 1 GiB boundary above RAM, so it can be mapped with
/// large pages and BARs of up to 1 GiB fit naturally aligned.
const MMIO64_ALIGN: u64 = 1 << 30;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("guest memory size is 0; give the guest memory, e.g. --memory 512M")]
    Zero,
    #[error(
        "guest memory of {bytes} bytes is less than the minimum of {} MiB a Linux guest needs; \
         use a larger --memory",
        MIN_RAM_BYTES >> 20
    )]
    TooSmall { bytes: u64 },
    #[error(
        "guest memory of {} GiB is more than the {} GiB this VMM supports; use a smaller --memory",
        bytes >> 30,
        MAX_RAM_BYTES >> 30
    )]
    TooLarge { bytes: u64 },
    #[error(
        "guest memory of {bytes} bytes is not a whole number of 4 KiB pages; \
         use a size in MiB, e.g. --memory 512M"
    )]
    NotPageMultiple { bytes: u64 },
}

/// Where guest RAM is, for a given amount of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLayout {
    ram_bytes: u64,
}

impl MemoryLayout {
    /// Lays out `ram_bytes` of RAM. Sizes that are not a multiple of 4 KiB are rejected
    /// rather than rounded: KVM memory slots are page-granular, and silently giving the
    /// guest a different amount than asked for hides a mistake.
    pub fn new(ram_bytes: u64) -> Result<Self, LayoutError> {
        if ram_bytes == 0 {
            return Err(LayoutError::Zero);
        }
        if ram_bytes < MIN_RAM_BYTES {
            return Err(LayoutError::TooSmall { bytes: ram_bytes });
        }
        if ram_bytes > MAX_RAM_BYTES {
            return Err(LayoutError::TooLarge { bytes: ram_bytes });
        }
        if !ram_bytes.is_multiple_of(PAGE_SIZE) {
            return Err(LayoutError::NotPageMultiple { bytes: ram_bytes });
        }
        Ok(Self { ram_bytes })
    }

    /// Total guest RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    /// End (exclusive) of the RAM that starts at 0: at most MMIO_HOLE_START.
    pub fn low_ram_end(&self) -> u64 {
        self.ram_bytes.min(MMIO_HOLE_START)
    }

    /// End (exclusive) of the RAM above 4 GiB, if the guest has more RAM than fits
    /// below the hole.
    pub fn high_ram_end(&self) -> Option<u64> {
        let high = self.ram_bytes.checked_sub(MMIO_HOLE_START).filter(|&b| b > 0)?;
        // Cannot overflow: ram_bytes <= MAX_RAM_BYTES.
        Some(MMIO_HOLE_END + high)
    }

    /// The guest RAM regions as (start, size), for KVM memory slots and mmap.
    pub fn ram_regions(&self) -> Vec<(GuestAddress, usize)> {
        let mut regions = vec![(GuestAddress(0), to_usize(self.low_ram_end()))];
        if let Some(end) = self.high_ram_end() {
            regions.push((GuestAddress(MMIO_HOLE_END), to_usize(end - MMIO_HOLE_END)));
        }
        regions
    }

    /// First address of the 64-bit MMIO space: above all RAM and above 4 GiB, aligned
    /// to 1 GiB.
    pub fn mmio64_start(&self) -> u64 {
        let top = self.high_ram_end().unwrap_or(MMIO_HOLE_END);
        top.div_ceil(MMIO64_ALIGN) * MMIO64_ALIGN
    }

    /// End (exclusive) of the 64-bit BAR window.
    pub fn mmio64_end(&self) -> u64 {
        self.mmio64_start() + PCI_MMIO64_SIZE
    }
}

// The fixed devices and KVM's private pages are inside the MMIO hole, clear of each
// other, and below 4 GiB (the MADT and MP table hold 32-bit addresses).
const _: () = assert!(IOAPIC_ADDR >= MMIO_HOLE_START && LAPIC_ADDR < MMIO_HOLE_END);
const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_ADDR);
// Everything the layout can place ends below 2^42, the smallest physical address width
// of x86-64 hosts Tandem targets once RAM nears MAX_RAM_BYTES (small guests stay far
// below TCG's 40 bits).
const _: () = assert!(MMIO_HOLE_END + MAX_RAM_BYTES + MMIO64_ALIGN + PCI_MMIO64_SIZE <= 1 << 42);
const _: () = assert!(KVM_IDENTITY_MAP_ADDR >= LAPIC_ADDR + PAGE_SIZE);
const _: () = assert!(KVM_PRIVATE_END <= MMIO_HOLE_END);
// The hot-plug registers sit between the sleep port and the PCI I/O window.
const _: () = assert!(PCI_HOTPLUG_PORT > ACPI_SLEEP_PORT && PCI_HOTPLUG_PORT + PCI_HOTPLUG_PORT_LEN <= PCI_IO_START);

/// Sizes here are at most MAX_RAM_BYTES, which fits a 64-bit host's usize; this crate
/// only builds for x86_64.
fn to_usize(bytes: u64) -> usize {
    const _: () = assert!(MAX_RAM_BYTES <= usize::MAX as u64);
    bytes as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn boot_data_does_not_overlap() {
        // [start, end) of each fixed structure, in address order.
        let areas = [
            (BOOT_GDT_START, BOOT_IDT_START),
            (BOOT_IDT_START, BOOT_IDT_START + 8),
            (ZERO_PAGE_START, ZERO_PAGE_START + PAGE_SIZE),
            (ZERO_PAGE_START + PAGE_SIZE, BOOT_STACK_POINTER + 0x10),
            (PML4_START, PDPTE_START),
            (PDPTE_START, PDE_START),
            (PDE_START, PDE_START + PAGE_SIZE),
            (CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE as u64),
            (EBDA_START, EBDA_END),
            (ACPI_START, RESET_VECTOR),
            (RESET_VECTOR, HIMEM_START),
        ];
        for pair in areas.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{pair:x?} overlap");
        }
    }

    #[test]
    fn pci_intx_gsis_are_ioapic_inputs_16_to_23_spread_over_neighbours() {
        assert_eq!(pci_intx_gsi(1, 1), 17);
        assert_eq!(pci_intx_gsi(1, 4), 20);
        assert_eq!(pci_intx_gsi(7, 2), 16);
        assert_eq!(pci_intx_gsi(31, 4), 18);
        let mut uses = [0u32; PCI_INTX_GSIS as usize];
        for slot in 1..32u8 {
            let pins: Vec<u32> = (1..=4).map(|pin| pci_intx_gsi(slot, pin)).collect();
            for &gsi in &pins {
                assert!((16..IOAPIC_PINS).contains(&gsi), "slot {slot}: GSI {gsi}");
                uses[(gsi - PCI_INTX_GSI_BASE) as usize] += 1;
            }
            let mut distinct = pins.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), 4, "the pins of slot {slot} share no line");
        }
        // 124 slot/pin pairs over 8 lines: 15 or 16 each.
        assert!(uses.iter().all(|&n| n == 15 || n == 16), "{uses:?}");
        // INTA# of eight neighbouring slots: eight different lines.
        let mut inta: Vec<u32> = (9..17).map(|slot| pci_intx_gsi(slot, 1)).collect();
        inta.sort_unstable();
        inta.dedup();
        assert_eq!(inta.len(), 8);
        // Out-of-range input wraps instead of panicking.
        assert_eq!(pci_intx_gsi(33, 1), pci_intx_gsi(1, 1));
        assert_eq!(pci_intx_gsi(1, 0), pci_intx_gsi(1, 4));
        assert_eq!(pci_intx_gsi(255, 255), pci_intx_gsi(31, 3));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(MemoryLayout::new(0), Err(LayoutError::Zero));
        assert_eq!(MemoryLayout::new(512), Err(LayoutError::TooSmall { bytes: 512 }));
        assert!(matches!(MemoryLayout::new(MIN_RAM_BYTES - PAGE_SIZE), Err(LayoutError::TooSmall { .. })));
        assert!(matches!(MemoryLayout::new(MAX_RAM_BYTES + PAGE_SIZE), Err(LayoutError::TooLarge { .. })));
        assert_eq!(MemoryLayout::new(256 * MIB + 1), Err(LayoutError::NotPageMultiple { bytes: 256 * MIB + 1 }));
        let msg = MemoryLayout::new(512).unwrap_err().to_string();
        assert!(msg.contains("16 MiB") && msg.contains("--memory"), "{msg}");
    }

    #[test]
    fn small_guest_has_one_region() {
        let l = MemoryLayout::new(256 * MIB).unwrap();
        assert_eq!(l.ram_regions(), vec![(GuestAddress(0), (256 * MIB) as usize)]);
        assert_eq!(l.low_ram_end(), 256 * MIB);
        assert_eq!(l.high_ram_end(), None);
        assert_eq!(l.mmio64_start(), 4 * GIB);
    }

    #[test]
    fn exactly_3g_fills_low_ram_only() {
        let l = MemoryLayout::new(3 * GIB).unwrap();
        assert_eq!(l.ram_regions().len(), 1);
        assert_eq!(l.low_ram_end(), MMIO_HOLE_START);
        assert_eq!(l.high_ram_end(), None);
    }

    #[test]
    fn large_guest_is_split_around_the_hole() {
        let l = MemoryLayout::new(5 * GIB).unwrap();
        assert_eq!(
            l.ram_regions(),
            vec![(GuestAddress(0), (3 * GIB) as usize), (GuestAddress(4 * GIB), (2 * GIB) as usize)]
        );
        assert_eq!(l.high_ram_end(), Some(6 * GIB));
        assert_eq!(l.mmio64_start(), 6 * GIB);
        let total: usize = l.ram_regions().iter().map(|r| r.1).sum();
        assert_eq!(total as u64, l.ram_bytes());

        let odd = MemoryLayout::new(3 * GIB + 4 * MIB).unwrap();
        assert_eq!(odd.mmio64_start(), 5 * GIB, "rounded up to 1 GiB");
    }
}
