//! Boot-time CPU state: the GDT, IDT and identity page tables in guest memory, and the
//! register, FPU, MSR and LAPIC values a vCPU starts with.
//!
//! Linux's 64-bit boot protocol wants long mode with paging on, an identity mapping of
//! the kernel, boot_params and command line, flat 64-bit code and data segments, and
//! RSI pointing at boot_params. Interrupts are off and there is no usable IDT: an
//! exception before the kernel installs its own is a triple fault, which KVM reports
//! as a shutdown, rather than a silent hang.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START, ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;
const PAGE_TABLE_ENTRIES: u64 = 512;
const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Bit 1 of RFLAGS is reserved and always 1; everything else, interrupts included, off.
const RFLAGS_RESERVED: u64 = 0x2;
/// x87 control word after FNINIT: all exceptions masked, 64-bit precision.
const FPU_CONTROL_WORD: u16 = 0x37f;
/// MXCSR at reset: all SSE exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// MISC_ENABLE bit 0: fast string operations, which firmware normally turns on and
/// which Linux relies on for `rep movs/stos` performance (ERMS/FSRM checks).
const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;

/// LAPIC register offsets in `kvm_lapic_state::regs`.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_DELIVERY_MODE_MASK: u32 = 0x7 << 8;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error(
        "cannot write the boot {what} at {addr:#x} into guest memory: {source}; guest RAM must cover the first MiB"
    )]
    Write { what: &'static str, addr: u64, source: GuestMemoryError },
    #[error("cannot pack {count} MSR entries for KVM_SET_MSRS: {reason}")]
    Msrs { count: usize, reason: String },
}

/// One 8-byte GDT descriptor for a flat segment or the boot TSS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GdtEntry {
    pub base: u32,
    /// 20-bit limit, in bytes or (with G set) in 4 KiB units.
    pub limit: u32,
    /// Access byte: P, DPL, S and type.
    pub access: u8,
    /// Flags nibble: G (bit 3), D/B (bit 2), L (bit 1), AVL (bit 0).
    pub flags: u8,
}

impl GdtEntry {
    /// 64-bit code: present, DPL 0, execute/read, accessed; G and L set.
    pub const CODE64: Self = Self { base: 0, limit: 0xfffff, access: 0x9b, flags: 0xa };
    /// Flat data: present, DPL 0, read/write, accessed; G and D/B set.
    pub const DATA: Self = Self { base: 0, limit: 0xfffff, access: 0x93, flags: 0xc };
    /// A busy 64-bit TSS of the architectural 104 bytes. Only cached in TR for KVM's
    /// entry checks (VMX requires a usable busy TSS in long mode); Linux loads its own.
    pub const TSS64: Self = Self { base: 0, limit: 0x67, access: 0x8b, flags: 0x0 };

    /// The descriptor as the CPU reads it from the GDT.
    pub fn to_u64(self) -> u64 {
        let base = u64::from(self.base);
        let limit = u64::from(self.limit & 0xfffff);
        (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (u64::from(self.access) << 40)
            | ((limit >> 16) << 48)
            | (u64::from(self.flags & 0xf) << 52)
            | ((base >> 24) << 56)
    }

    /// Decodes a descriptor read from a GDT.
    pub fn from_u64(raw: u64) -> Self {
        Self {
            base: (((raw >> 16) & 0xff_ffff) | ((raw >> 56) << 24)) as u32,
            limit: ((raw & 0xffff) | (((raw >> 48) & 0xf) << 16)) as u32,
            access: (raw >> 40) as u8,
            flags: ((raw >> 52) & 0xf) as u8,
        }
    }

    /// The segment register contents after loading this descriptor with `selector`.
    /// KVM wants the limit in bytes, so a page-granular limit is scaled.
    pub fn to_kvm_segment(self, selector: u16) -> kvm_segment {
        let g = (self.flags >> 3) & 1;
        let limit = self.limit & 0xfffff;
        let present = self.access >> 7;
        kvm_segment {
            base: u64::from(self.base),
            limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
            selector,
            type_: self.access & 0xf,
            present,
            dpl: (self.access >> 5) & 0x3,
            db: (self.flags >> 2) & 1,
            s: (self.access >> 4) & 1,
            l: (self.flags >> 1) & 1,
            g,
            avl: self.flags & 1,
            unusable: u8::from(present == 0),
            padding: 0,
        }
    }
}

/// The boot GDT, indexed by selector / 8.
const BOOT_GDT: [GdtEntry; 4] =
    [GdtEntry { base: 0, limit: 0, access: 0, flags: 0 }, GdtEntry::CODE64, GdtEntry::DATA, GdtEntry::TSS64];
pub const CODE_SELECTOR: u16 = 1 << 3;
pub const DATA_SELECTOR: u16 = 2 << 3;
pub const TSS_SELECTOR: u16 = 3 << 3;
/// One empty 8-byte slot: no vector is valid.
const BOOT_IDT_LIMIT: u16 = 7;

/// Writes the GDT, an empty IDT and page tables that identity-map the first 1 GiB with
/// 2 MiB pages. 1 GiB covers all the kernel's entry code touches before it builds its
/// own tables: itself, boot_params and the command line (the initramfs, which may lie
/// higher, is read only later).
pub fn write_gdt_and_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), RegsError> {
    let gdt: Vec<u8> = BOOT_GDT.iter().flat_map(|e| e.to_u64().to_le_bytes()).collect();
    write(mem, "GDT", BOOT_GDT_START, &gdt)?;
    write(mem, "IDT", BOOT_IDT_START, &0u64.to_le_bytes())?;

    let mut pml4 = [0u64; PAGE_TABLE_ENTRIES as usize];
    pml4[0] = PDPTE_START | PTE_PRESENT | PTE_WRITABLE;
    let mut pdpt = [0u64; PAGE_TABLE_ENTRIES as usize];
    pdpt[0] = PDE_START | PTE_PRESENT | PTE_WRITABLE;
    let mut pd = [0u64; PAGE_TABLE_ENTRIES as usize];
    for (i, entry) in (0u64..).zip(pd.iter_mut()) {
        *entry = (i * HUGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE;
    }
    write(mem, "PML4", PML4_START, &table_bytes(&pml4))?;
    write(mem, "PDPT", PDPTE_START, &table_bytes(&pdpt))?;
    write(mem, "page directory", PDE_START, &table_bytes(&pd))
}

fn table_bytes(table: &[u64]) -> Vec<u8> {
    table.iter().flat_map(|e| e.to_le_bytes()).collect()
}

fn write<M: GuestMemoryBackend>(mem: &M, what: &'static str, addr: u64, bytes: &[u8]) -> Result<(), RegsError> {
    mem.write_slice(bytes, GuestAddress(addr)).map_err(|source| RegsError::Write { what, addr, source })
}

/// Sets up long mode with the tables `write_gdt_and_page_tables` wrote. CR0 is set
/// outright rather than ORed into the reset value: reset has CD and NW set, and on
/// AMD (NPT honours guest CR0.CD) the kernel would run uncached until it rewrote CR0.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let data = GdtEntry::DATA.to_kvm_segment(DATA_SELECTOR);
    sregs.cs = GdtEntry::CODE64.to_kvm_segment(CODE_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = GdtEntry::TSS64.to_kvm_segment(TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = BOOT_IDT_LIMIT;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// Flat real mode for tiny test guests: CS base and selector 0 (instead of the reset
/// vector's 0xffff0000/0xf000), so code at a low address runs with IP = address.
pub fn real_mode_sregs(sregs: &mut kvm_sregs) {
    for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
        seg.base = 0;
        seg.selector = 0;
    }
    sregs.cr0 &= !(X86_CR0_PE | X86_CR0_PG);
}

/// General registers at the 64-bit entry: RSI → boot_params, a small stack below the
/// page tables, interrupts off.
pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rip: entry.0,
        rsi: ZERO_PAGE_START,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    }
}

/// The FPU state FNINIT and reset would leave, which firmware normally hands over.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: FPU_CONTROL_WORD, mxcsr: MXCSR_DEFAULT, ..Default::default() }
}

/// MSRs every vCPU starts with: the syscall/sysenter MSRs cleared (Linux programs
/// them), TSC 0 on all vCPUs so they start in sync, fast strings on.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect()
}

/// `entries` as the FAM structure KVM_SET_MSRS takes.
pub fn pack_msrs(entries: &[kvm_msr_entry]) -> Result<Msrs, RegsError> {
    Msrs::from_entries(entries).map_err(|e| RegsError::Msrs { count: entries.len(), reason: format!("{e:?}") })
}

/// Wires the LAPIC's local interrupt pins like a PC: LINT0 takes the 8259's output
/// (ExtINT), LINT1 is NMI. The mask bits KVM set at reset are left alone.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    set_delivery_mode(lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_delivery_mode(lapic, APIC_LVT1, APIC_MODE_NMI);
}

fn set_delivery_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let value = (apic_reg(lapic, reg) & !APIC_DELIVERY_MODE_MASK) | (mode << 8);
    for (dst, b) in lapic.regs[reg..reg + 4].iter_mut().zip(value.to_le_bytes()) {
        *dst = b as std::os::raw::c_char;
    }
}

/// A 32-bit LAPIC register (little-endian in the 1 KiB register page).
pub fn apic_reg(lapic: &kvm_lapic_state, reg: usize) -> u32 {
    let mut b = [0u8; 4];
    for (dst, src) in b.iter_mut().zip(&lapic.regs[reg..reg + 4]) {
        *dst = *src as u8;
    }
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn gdt_entries_encode_like_the_classic_constants() {
        // The usual hand-written encodings of flat 64-bit code / data descriptors.
        assert_eq!(GdtEntry::CODE64.to_u64(), 0x00af_9b00_0000_ffff);
        assert_eq!(GdtEntry::DATA.to_u64(), 0x00cf_9300_0000_ffff);
        let e = GdtEntry { base: 0x1234_5678, limit: 0xabcde, access: 0x8b, flags: 0x5 };
        assert_eq!(GdtEntry::from_u64(e.to_u64()), e);
    }

    #[test]
    fn segments_decode_from_descriptors() {
        let cs = GdtEntry::CODE64.to_kvm_segment(CODE_SELECTOR);
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 0x8));
        assert_eq!((cs.type_, cs.present, cs.dpl, cs.s, cs.l, cs.db, cs.g, cs.unusable), (0xb, 1, 0, 1, 1, 0, 1, 0));
        let ds = GdtEntry::DATA.to_kvm_segment(DATA_SELECTOR);
        assert_eq!((ds.type_, ds.s, ds.l, ds.db, ds.g), (0x3, 1, 0, 1, 1));
        let tr = GdtEntry::TSS64.to_kvm_segment(TSS_SELECTOR);
        assert_eq!((tr.type_, tr.s, tr.limit, tr.g, tr.present), (0xb, 0, 0x67, 0, 1));
        let null = BOOT_GDT[0].to_kvm_segment(0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn tables_land_in_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_gdt_and_page_tables(&mem).unwrap();
        for (i, e) in BOOT_GDT.iter().enumerate() {
            let raw: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8 * i as u64)).unwrap();
            assert_eq!(raw, e.to_u64());
        }
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PML4_START)).unwrap(), 0xa003);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PDPTE_START)).unwrap(), 0xb003);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PDE_START)).unwrap(), 0x83);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PDE_START + 8)).unwrap(), 0x20_0083);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83, "the last 2 MiB page below 1 GiB");
    }

    #[test]
    fn writing_tables_without_low_memory_fails_cleanly() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(1 << 20), 1 << 20)]).unwrap();
        let e = write_gdt_and_page_tables(&mem).unwrap_err();
        assert!(e.to_string().contains("GDT"), "{e}");
    }

    #[test]
    fn long_mode_sregs_point_at_the_tables() {
        let mut s = kvm_sregs { cr0: 0x6000_0010, ..Default::default() };
        long_mode_sregs(&mut s);
        assert_eq!(s.cr0, 0x8000_0011, "PE|ET|PG, CD and NW cleared");
        assert_eq!((s.cr3, s.cr4, s.efer), (PML4_START, 0x20, 0x500));
        assert_eq!((s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit), (0x500, 31, 0x520, 7));
        assert_eq!((s.cs.selector, s.ss.selector, s.tr.selector), (0x8, 0x10, 0x18));
        assert_eq!(s.cs.l, 1);
    }

    #[test]
    fn real_mode_sregs_flatten_cs() {
        let mut s = kvm_sregs { cr0: 0x6000_0011, ..Default::default() };
        s.cs.base = 0xffff_0000;
        s.cs.selector = 0xf000;
        real_mode_sregs(&mut s);
        assert_eq!((s.cs.base, s.cs.selector), (0, 0));
        assert_eq!(s.cr0 & X86_CR0_PE, 0);
    }

    #[test]
    fn regs_fpu_and_msrs() {
        let r = boot_regs(GuestAddress(0x100_0200));
        assert_eq!((r.rip, r.rsi, r.rsp, r.rbp, r.rflags), (0x100_0200, 0x7000, 0x8ff0, 0x8ff0, 2));
        let f = boot_fpu();
        assert_eq!((f.fcw, f.mxcsr), (0x37f, 0x1f80));
        let msrs = boot_msrs();
        assert_eq!(msrs.len(), 10);
        let misc = msrs.iter().find(|m| m.index == MSR_IA32_MISC_ENABLE).unwrap();
        assert_eq!(misc.data, 1);
        let packed = pack_msrs(&msrs).unwrap();
        assert_eq!(packed.as_slice().len(), 10);
    }

    #[test]
    fn lint_pins_get_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        // Masked, fixed delivery, vector 0x30 — the mask and vector must survive.
        for reg in [APIC_LVT0, APIC_LVT1] {
            for (dst, b) in lapic.regs[reg..reg + 4].iter_mut().zip(0x0001_0030u32.to_le_bytes()) {
                *dst = b as std::os::raw::c_char;
            }
        }
        set_lint(&mut lapic);
        assert_eq!(apic_reg(&lapic, APIC_LVT0), 0x0001_0730);
        assert_eq!(apic_reg(&lapic, APIC_LVT1), 0x0001_0430);
    }
}
