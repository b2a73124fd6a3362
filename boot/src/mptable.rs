//! The Intel MultiProcessor Specification 1.4 table.
//!
//! Linux uses the ACPI MADT when ACPI is on; the MP table is what it falls back to
//! with `acpi=off` (or a kernel without ACPI), so it describes the same machine: one
//! processor per vCPU, an ISA bus, KVM's IOAPIC with the 16 ISA IRQs on its pins, and
//! LINT0/LINT1 wired as ExtINT/NMI.
//!
//! The floating pointer sits at the start of the EBDA (Linux scans the last KiB of
//! base memory for it) and the configuration table follows it; both must fit in the
//! EBDA, which bounds the number of vCPUs (see `MAX_CPUS`).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::layout::{EBDA_END, IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_START, PIT_IOAPIC_PIN};

const FLOATING_POINTER_SIZE: usize = 16;
const CONFIG_HEADER_SIZE: usize = 44;
const PROCESSOR_ENTRY_SIZE: usize = 20;
/// Bus, IOAPIC, I/O interrupt and local interrupt entries are all 8 bytes.
const SMALL_ENTRY_SIZE: usize = 8;
const ISA_IRQS: u8 = 16;
/// Everything but the processor entries: bus, IOAPIC, up to 16 ISA IRQs, 2 LINTs.
const FIXED_SIZE: usize = FLOATING_POINTER_SIZE + CONFIG_HEADER_SIZE + SMALL_ENTRY_SIZE * (2 + ISA_IRQS as usize + 2);

/// The most vCPUs whose MP table fits in the EBDA (40). The MADT has no such limit;
/// with more vCPUs, skip the MP table (Linux only needs it with `acpi=off`).
pub const MAX_CPUS: u8 = {
    let n = ((EBDA_END - MPTABLE_START) as usize - FIXED_SIZE) / PROCESSOR_ENTRY_SIZE;
    assert!(n < 255);
    n as u8
};

const SPEC_REV_1_4: u8 = 4;
const OEM_ID: &[u8; 8] = b"TANDEM  ";
const PRODUCT_ID: &[u8; 12] = b"TANDEM VMM  ";

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// KVM's LAPIC reports version 0x14 (integrated APIC).
const APIC_VERSION: u8 = 0x14;
/// KVM's IOAPIC reports version 0x11.
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
const IOAPIC_ENABLED: u8 = 1 << 0;
/// Family 6, model and stepping 0: a generic P6-class CPU. Linux only prints it.
const CPU_SIGNATURE: u32 = 6 << 8;
/// CPUID.1:EDX bits FPU (0) and APIC (9), the ones the spec says this field mirrors.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const BUS_TYPE_ISA: &[u8; 6] = b"ISA   ";
const ISA_BUS_ID: u8 = 0;

/// Interrupt types for I/O and local interrupt entries.
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// Polarity and trigger "conforming to the bus": edge, active high for ISA.
const INT_FLAGS_CONFORMING: u16 = 0;
/// A local interrupt entry for every LAPIC.
const ALL_LAPICS: u8 = 0xff;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("an MP table needs at least one vCPU")]
    NoCpus,
    #[error(
        "{0} vCPUs do not fit in the MP table, which has room for {MAX_CPUS} in the EBDA; \
         use at most {MAX_CPUS} vCPUs or boot without an MP table (ACPI describes any number)"
    )]
    TooManyCpus(u8),
    #[error("cannot write the MP table at {MPTABLE_START:#x}: {0}; guest RAM must cover the first MiB")]
    Write(#[source] GuestMemoryError),
}

/// Writes the MP floating pointer and configuration table for `num_cpus` vCPUs with
/// APIC IDs 0..num_cpus; the IOAPIC gets ID `num_cpus`, the next free one.
pub fn write_mptable<M: GuestMemoryBackend>(mem: &M, num_cpus: u8) -> Result<(), MpTableError> {
    let table = build(num_cpus)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START)).map_err(MpTableError::Write)
}

/// Which IOAPIC pin each ISA IRQ is on: identity, except that IRQ 0 (the PIT) goes
/// to PIT_IOAPIC_PIN; if that is not pin 0, the ISA IRQ normally on that pin (2, the
/// cascade, which no device uses) is dropped.
fn isa_irq_pins() -> impl Iterator<Item = (u8, u8)> {
    (0..ISA_IRQS)
        .filter(|&irq| irq == 0 || irq != PIT_IOAPIC_PIN)
        .map(|irq| (irq, if irq == 0 { PIT_IOAPIC_PIN } else { irq }))
}

fn build(num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 {
        return Err(MpTableError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;

    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(BUS_TYPE_ISA);
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    let mut count = u16::from(num_cpus) + 2;
    for (irq, pin) in isa_irq_pins() {
        entries.extend_from_slice(&interrupt_entry(ENTRY_IO_INTERRUPT, INT_VECTORED, irq, ioapic_id, pin));
        count += 1;
    }
    entries.extend_from_slice(&interrupt_entry(ENTRY_LOCAL_INTERRUPT, INT_EXTINT, 0, ALL_LAPICS, 0));
    entries.extend_from_slice(&interrupt_entry(ENTRY_LOCAL_INTERRUPT, INT_NMI, 0, ALL_LAPICS, 1));
    count += 2;

    let table_len = CONFIG_HEADER_SIZE + entries.len();
    let mut table = Vec::with_capacity(FLOATING_POINTER_SIZE + table_len);

    // Floating pointer: feature byte 1 = 0 (a configuration table follows), feature
    // byte 2 = 0 (virtual-wire mode: there is no IMCR to switch the PIC away).
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&((MPTABLE_START as usize + FLOATING_POINTER_SIZE) as u32).to_le_bytes());
    table.extend_from_slice(&[1, SPEC_REV_1_4, 0, 0, 0, 0, 0, 0]);
    table[10] = checksum(&table[..FLOATING_POINTER_SIZE]);

    let header_at = table.len();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.extend_from_slice(&[SPEC_REV_1_4, 0]);
    table.extend_from_slice(OEM_ID);
    table.extend_from_slice(PRODUCT_ID);
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // no extended table
    table.extend_from_slice(&entries);
    table[header_at + 7] = checksum(&table[header_at..]);
    Ok(table)
}

fn interrupt_entry(kind: u8, int_type: u8, src_irq: u8, dst_apic: u8, dst_pin: u8) -> [u8; 8] {
    let [f0, f1] = INT_FLAGS_CONFORMING.to_le_bytes();
    [kind, int_type, f0, f1, ISA_BUS_ID, src_irq, dst_apic, dst_pin]
}

/// The byte that makes `bytes` (with it, in place of a zero) sum to 0.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_sub(*b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    #[test]
    fn checksums_and_pointers() {
        for cpus in [1, 2, 8, MAX_CPUS] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            assert_eq!(u32_at(&t, 4) as u64, MPTABLE_START + 16);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            assert_eq!(u16_at(table, 4) as usize, table.len());
            assert_eq!(sum(table), 0, "configuration table checksum");
            assert_eq!(u32_at(table, 36) as u64, LAPIC_ADDR);
            assert!(MPTABLE_START + t.len() as u64 <= EBDA_END);
        }
    }

    /// The entries of a table, as (type, bytes).
    fn entries(t: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut at = 16 + CONFIG_HEADER_SIZE;
        while at < t.len() {
            let len = if t[at] == ENTRY_PROCESSOR { PROCESSOR_ENTRY_SIZE } else { SMALL_ENTRY_SIZE };
            out.push(&t[at..at + len]);
            at += len;
        }
        out
    }

    #[test]
    fn entries_describe_the_machine() {
        let t = build(3).unwrap();
        let e = entries(&t);
        assert_eq!(e.len(), u16_at(&t, 16 + 34) as usize, "entry count matches");
        let cpus: Vec<_> = e.iter().filter(|x| x[0] == ENTRY_PROCESSOR).collect();
        assert_eq!(cpus.len(), 3);
        assert_eq!(cpus[0][1..4], [0, 0x14, 3], "BSP: APIC 0, enabled + bootstrap");
        assert_eq!(cpus[2][1..4], [2, 0x14, 1], "AP: enabled");
        let ioapic = e.iter().find(|x| x[0] == ENTRY_IOAPIC).unwrap();
        assert_eq!(ioapic[1..4], [3, 0x11, 1]);
        assert_eq!(u32_at(ioapic, 4) as u64, IOAPIC_ADDR);
        let irqs: Vec<_> = e.iter().filter(|x| x[0] == ENTRY_IO_INTERRUPT).map(|x| (x[5], x[6], x[7])).collect();
        assert_eq!(irqs.len(), 16);
        assert!(irqs.iter().all(|&(irq, apic, pin)| apic == 3 && pin == irq), "identity on KVM's routing");
        let lints: Vec<_> = e.iter().filter(|x| x[0] == ENTRY_LOCAL_INTERRUPT).map(|x| (x[1], x[6], x[7])).collect();
        assert_eq!(lints, vec![(INT_EXTINT, 0xff, 0), (INT_NMI, 0xff, 1)]);
        // Spec: entries sorted by type.
        assert!(e.windows(2).all(|w| w[0][0] <= w[1][0]));
    }

    #[test]
    fn cpu_count_limits() {
        assert_eq!(MAX_CPUS, 40);
        assert!(matches!(build(0), Err(MpTableError::NoCpus)));
        let e = build(MAX_CPUS + 1).unwrap_err();
        assert!(matches!(e, MpTableError::TooManyCpus(41)));
        assert!(e.to_string().contains("at most 40"), "{e}");
        assert_eq!(build(MAX_CPUS).unwrap().len() as u64, EBDA_END - MPTABLE_START - 4);
    }

    #[test]
    fn writes_into_the_ebda() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_mptable(&mem, 2).unwrap();
        let mut magic = [0u8; 4];
        mem.read_slice(&mut magic, GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(&magic, b"_MP_");
        mem.read_slice(&mut magic, GuestAddress(MPTABLE_START + 16)).unwrap();
        assert_eq!(&magic, b"PCMP");
    }
}
