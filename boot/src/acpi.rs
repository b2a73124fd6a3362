//! ACPI tables: RSDP → XSDT → {FADT → DSDT, MADT, MCFG}, all in [ACPI_START, RESET_VECTOR).
//!
//! The DSDT describes PCI segment 0 as a PCI Express root (PNP0A08) whose config space
//! is the ECAM window in the MCFG, with its bus, I/O and memory windows in `_CRS`; the
//! ECAM window is also claimed as a motherboard resource (PNP0C02), which is what Linux
//! checks before it trusts MCFG. Its `_PRT` tells the guest which GSI each slot's
//! INTA# to INTD# is wired to (`layout::pci_intx_gsi`); the guest has no other way to
//! learn PCI legacy interrupt routing.
//!
//! The platform is *hardware-reduced* ACPI: no PM1 blocks, no SCI, no GPEs, no
//! FACS. Power-off and reset go through one byte-wide I/O register at
//! ACPI_SLEEP_PORT, named in the FADT as the sleep control, sleep status and reset
//! register.
//!
//! What hardware-reduced mode means for a Linux guest (arch/x86/kernel/acpi/boot.c):
//! it replaces the 8259 with a null PIC and skips the PIT/HPET timer set-up (the LAPIC
//! timer is used), and ISA IRQs are no longer identity-mapped to IOAPIC pins up
//! front: a legacy device only gets its interrupt if it is described in the DSDT.
//! So the DSDT describes COM1 and the CMOS RTC with their IRQs. Reduced mode also
//! makes Linux reboot via EFI and, with no EFI, via the BIOS reset vector instead of
//! the FADT reset register, so `write_acpi_tables` puts a reset stub at the reset
//! vector (see `reset_vector`).
//!
//! With `AcpiOptions::pci_hotplug` set, the DSDT also describes ACPI PCI hot-plug of
//! bus 0's slots and the Generic Event Device that signals it (see `hotplug`).

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, PackageBuilder,
    Path, ResourceTemplate, Scope, IO, ZERO,
};
use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::layout::{
    pci_intx_gsi, MemoryLayout, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_PORT, ACPI_START, COM1_IRQ, COM1_PORT,
    IOAPIC_ADDR, LAPIC_ADDR, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_IO_END, PCI_IO_START, PCI_MMIO32_END, PCI_MMIO32_START,
    PIT_IOAPIC_PIN, PVPANIC_PORT, RESET_VECTOR, RTC_IRQ, RTC_PORT,
};
use crate::reset_vector::{write_reset_vector, ResetVectorError};

pub mod hotplug;

pub use hotplug::{HotplugAmlError, PciHotplugAml};

/// Sleep control register: SLP_EN, bit 5.
pub const SLP_EN: u8 = 1 << 5;
/// Sleep control register: SLP_TYP, bits 4:2.
pub const SLP_TYP_SHIFT: u8 = 2;
pub const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;
/// What Linux writes to the sleep control register to power off (0x34).
pub const SLEEP_CONTROL_S5: u8 = (ACPI_S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN;
/// Sleep status register: WAK_STS, bit 7. Linux writes it (to clear it) just before
/// writing the sleep control register, to the same port here. The device that decodes
/// these writes is `devices::legacy::AcpiPmControl`.
pub const SLEEP_STATUS_WAK_STS: u8 = 1 << 7;

const OEM_ID: [u8; 6] = *b"TANDEM";
const OEM_TABLE_ID: [u8; 8] = *b"TANDEMVM";
const OEM_REVISION: u32 = 1;
/// DSDT revision 2 or more means 64-bit AML integers.
const DSDT_REVISION: u8 = 6;
/// MADT revision of ACPI 6.3+ (the FADT says 6.5).
const MADT_REVISION: u8 = 5;
const TABLE_ALIGN: u64 = 16;
const SDT_HEADER_LEN: u32 = 36;

/// IA-PC boot architecture flags (FADT offset 109).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;

/// MADT flags: PCAT_COMPAT, KVM's in-kernel irqchip does have the dual 8259.
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LAPIC_ENABLED: u32 = 1;
/// The NMI entry applies to all processors.
const ALL_PROCESSORS: u8 = 0xff;
/// Polarity and trigger conforming to the bus (ISA: edge, active high).
const INTI_CONFORMING: u16 = 0;
/// APIC ID 0xff means "invalid" to Linux, and the IOAPIC takes ID `num_cpus`.
pub const MAX_CPUS: u8 = 254;
/// Device slots of PCI bus 0 that get `_PRT` entries: all but the host bridge's (0).
const PCI_DEVICE_SLOTS: std::ops::RangeInclusive<u8> = 1..=31;
/// `_PRT` pins are 0 to 3 for INTA# to INTD# (config space says 1 to 4).
const PCI_INTX_PINS: std::ops::Range<u8> = 0..4;
/// A `_PRT` address: the device in the high word, 0xFFFF for "any function".
const PRT_ANY_FUNCTION: u32 = 0xffff;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need at least one vCPU")]
    NoCpus,
    #[error("{0} vCPUs is more than the {MAX_CPUS} the MADT can give xAPIC IDs; use fewer vCPUs")]
    TooManyCpus(u8),
    #[error(
        "the ACPI tables need {needed} bytes, more than the {} between {ACPI_START:#x} and {RESET_VECTOR:#x}",
        RESET_VECTOR - ACPI_START
    )]
    TooBig { needed: u64 },
    #[error("cannot write the ACPI {table} at {addr:#x}: {source}; guest RAM must cover the first MiB")]
    Write { table: &'static str, addr: u64, source: GuestMemoryError },
    #[error(transparent)]
    ResetVector(#[from] ResetVectorError),
    #[error(transparent)]
    Hotplug(#[from] HotplugAmlError),
}

/// What the tables describe beyond the fixed platform. The default is the platform
/// alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AcpiOptions {
    /// ACPI PCI hot-plug: slot objects under PCI0 and a GED that reaches the
    /// `devices::hotplug::PciHotplugController` at `port`, interrupting on `gsi`.
    /// `Some(PciHotplugAml::default())` uses the layout's port and GSI.
    pub pci_hotplug: Option<PciHotplugAml>,
}

/// Builds and writes all ACPI tables for `num_cpus` vCPUs (APIC IDs 0..num_cpus, the
/// IOAPIC gets ID `num_cpus` like in the MP table), and the reset-vector stub that a
/// hardware-reduced platform needs for Linux's reboot to work. Returns the RSDP's
/// address for `boot_params.acpi_rsdp_addr`; it is also at ACPI_START, where Linux
/// scans.
pub fn write_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    layout: &MemoryLayout,
    num_cpus: u8,
) -> Result<GuestAddress, AcpiError> {
    write_acpi_tables_with(mem, layout, num_cpus, &AcpiOptions::default())
}

/// `write_acpi_tables` with the optional parts in `options`.
pub fn write_acpi_tables_with<M: GuestMemoryBackend>(
    mem: &M,
    layout: &MemoryLayout,
    num_cpus: u8,
    options: &AcpiOptions,
) -> Result<GuestAddress, AcpiError> {
    let tables = build_tables(layout, num_cpus, options)?;
    for (table, addr, bytes) in &tables.placed {
        mem.write_slice(bytes, GuestAddress(*addr)).map_err(|source| AcpiError::Write {
            table,
            addr: *addr,
            source,
        })?;
    }
    write_reset_vector(mem)?;
    Ok(GuestAddress(tables.rsdp))
}

struct Tables {
    rsdp: u64,
    /// (name, address, bytes) of each table, RSDP first.
    placed: Vec<(&'static str, u64, Vec<u8>)>,
}

/// Hands out 16-byte-aligned addresses from ACPI_START up.
struct Placer {
    next: u64,
}

impl Placer {
    fn place(&mut self, len: usize) -> u64 {
        let at = self.next;
        self.next = (at + len as u64).next_multiple_of(TABLE_ALIGN);
        at
    }
}

fn build_tables(layout: &MemoryLayout, num_cpus: u8, options: &AcpiOptions) -> Result<Tables, AcpiError> {
    if num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(AcpiError::TooManyCpus(num_cpus));
    }
    if let Some(hotplug) = &options.pci_hotplug {
        hotplug.validate()?;
    }
    let dsdt = dsdt(layout, options.pci_hotplug.as_ref());
    let madt = madt(num_cpus);
    let mcfg = mcfg();
    // The XSDT lists the FADT, the MADT and the MCFG; the DSDT hangs off the FADT.
    let xsdt_len = (SDT_HEADER_LEN + 3 * 8) as usize;

    let mut placer = Placer { next: ACPI_START };
    let rsdp_addr = placer.place(Rsdp::len());
    let xsdt_addr = placer.place(xsdt_len);
    let fadt_addr = placer.place(FADT::len());
    let madt_addr = placer.place(madt.len());
    let mcfg_addr = placer.place(mcfg.len());
    let dsdt_addr = placer.place(dsdt.len());
    if placer.next > RESET_VECTOR {
        return Err(AcpiError::TooBig { needed: placer.next - ACPI_START });
    }

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let placed = vec![
        ("RSDP", rsdp_addr, bytes(&Rsdp::new(OEM_ID, xsdt_addr))),
        ("XSDT", xsdt_addr, bytes(&xsdt)),
        ("FADT", fadt_addr, bytes(&fadt(dsdt_addr))),
        ("MADT", madt_addr, madt),
        ("MCFG", mcfg_addr, mcfg),
        ("DSDT", dsdt_addr, dsdt),
    ];
    Ok(Tables { rsdp: rsdp_addr, placed })
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// The sleep/reset register: one byte of system I/O.
fn sleep_port_gas() -> GAS {
    GAS::new(GasSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(ACPI_SLEEP_PORT))
}

/// FADT 6.5, hardware-reduced.
///
/// Flags: HW_REDUCED_ACPI; RESET_REG_SUP so Linux's ACPI reboot writes
/// ACPI_RESET_VALUE to the reset register (its first reboot method on x86);
/// PWR_BUTTON and SLP_BUTTON, meaning "no fixed-feature buttons", so Linux does not
/// register button devices for fixed events a reduced platform cannot raise; WBINVD,
/// which the spec requires of every x86 platform.
///
/// IA-PC boot architecture: VGA not present (Linux will not poke the VGA ports), CMOS
/// RTC *not* flagged absent (Linux registers the RTC, emulated at 0x70/0x71),
/// LEGACY_DEVICES clear (no PnP BIOS to probe), and 8042 *not* flagged present. The
/// 8042 flag only decides whether Linux's i8042 driver probes the ports when the DSDT
/// describes no PS/2 device; the keyboard-controller reboot (`reboot=k`, and the
/// fallback after the ACPI reset) writes 0xfe to port 0x64 regardless. Set, the probe
/// cost 2 s of boot against an i8042 that only implements reset ("Can't read CTR"), and
/// could not have worked anyway: on a reduced platform IRQ 1 is unrouted without a DSDT
/// entry. Clear, Linux says "PNP: No PS/2 controller found" and moves on.
fn fadt(dsdt_addr: u64) -> FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::Wbinvd)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .flag(Flags::HwReducedAcpi);
    fadt.iapc_boot_arch = IAPC_VGA_NOT_PRESENT.into();
    fadt.reset_reg = sleep_port_gas();
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = sleep_port_gas();
    fadt.sleep_status_reg = sleep_port_gas();
    fadt.finalize()
}

/// MADT: the LAPIC address, one enabled Local APIC per vCPU, the IOAPIC with GSI base
/// 0, the PIT override if its pin is not 0 (see layout::PIT_IOAPIC_PIN: with KVM's
/// default routing it is 0 and no override is written, ISA IRQ n is GSI n), and NMI
/// on LINT1 for all processors.
fn madt(num_cpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", SDT_HEADER_LEN + 8, MADT_REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for cpu in 0..num_cpus {
        // Processor UID = APIC ID = vCPU index.
        let [f0, f1, f2, f3] = MADT_LAPIC_ENABLED.to_le_bytes();
        madt.append_slice(&[MADT_LOCAL_APIC, 8, cpu, cpu, f0, f1, f2, f3]);
    }
    let ioapic_id = num_cpus;
    let mut ioapic = vec![MADT_IO_APIC, 12, ioapic_id, 0];
    ioapic.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    madt.append_slice(&ioapic);
    if PIT_IOAPIC_PIN != 0 {
        let mut iso = vec![MADT_INTERRUPT_OVERRIDE, 10, 0 /* ISA */, 0 /* IRQ 0 */];
        iso.extend_from_slice(&u32::from(PIT_IOAPIC_PIN).to_le_bytes());
        iso.extend_from_slice(&INTI_CONFORMING.to_le_bytes());
        madt.append_slice(&iso);
    }
    let [f0, f1] = INTI_CONFORMING.to_le_bytes();
    madt.append_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, f0, f1, 1 /* LINT1 */]);
    madt.as_slice().to_vec()
}

/// MCFG: the ECAM window of segment 0, bus 0.
fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, 0);
    bytes(&mcfg)
}

/// DSDT: COM1 and the RTC (so their IRQs are routed on a reduced platform, see the
/// module comment), the PCI root bridge and the motherboard resources, and `\_S5_` for
/// power-off. Linux evaluates `\_S5_` to get SLP_TYP and then writes
/// `SLP_TYP << 2 | SLP_EN` to the sleep control register. With `hotplug`, the slot
/// objects go into PCI0, the GED into `\_SB`, and the registers' ports into the
/// motherboard resources.
fn dsdt(layout: &MemoryLayout, hotplug: Option<&PciHotplugAml>) -> Vec<u8> {
    let com1 = RawAml(isa_device("COM1", "PNP0501", Some(1), COM1_PORT, 8, COM1_IRQ));
    let rtc = RawAml(isa_device("RTC_", "PNP0B00", None, RTC_PORT, 2, RTC_IRQ));
    let pvpanic = RawAml(pvpanic());
    let pci = RawAml(pci_root(layout, hotplug));
    let motherboard = RawAml(motherboard_resources(hotplug));
    let mut devices: Vec<&dyn Aml> = vec![&com1, &rtc, &pvpanic, &pci, &motherboard];
    let ged = hotplug.map(|h| RawAml(h.ged()));
    if let Some(ged) = &ged {
        devices.push(ged);
    }
    let sb = Scope::new(Path::new("\\_SB_"), devices);
    // {SLP_TYPa, SLP_TYPb, reserved, reserved}; there is no "b" register.
    let s5 = Name::new(Path::new("_S5_"), &Package::new(vec![&ACPI_S5_SLEEP_TYPE, &0u8, &0u8, &0u8]));

    let mut aml = bytes(&sb);
    s5.to_aml_bytes(&mut aml);
    let mut dsdt = Sdt::new(*b"DSDT", SDT_HEADER_LEN, DSDT_REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&aml);
    dsdt.as_slice().to_vec()
}

/// The PCI Express root bridge of segment 0: bus 0 only, config through ECAM (MCFG)
/// and the legacy 0xcf8 ports, and the three windows BARs are allocated from; with
/// `hotplug`, the hot-plug registers and slot objects too.
fn pci_root(layout: &MemoryLayout, hotplug: Option<&PciHotplugAml>) -> Vec<u8> {
    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let hid = Name::new(Path::new("_HID"), &hid);
    let cid = Name::new(Path::new("_CID"), &cid);
    let adr = Name::new(Path::new("_ADR"), &0u8);
    let seg = Name::new(Path::new("_SEG"), &0u8);
    let uid = Name::new(Path::new("_UID"), &0u8);
    let bbn = Name::new(Path::new("_BBN"), &0u8);

    let buses = AddressSpace::<u16>::new_bus_number(0, 0);
    let cf8 = IO::new(0xcf8, 0xcf8, 1, 8);
    let io = AddressSpace::<u16>::new_io(PCI_IO_START, PCI_IO_END, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_END - 1) as u32,
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        layout.mmio64_start(),
        layout.mmio64_end() - 1,
        None,
    );
    let crs = ResourceTemplate::new(vec![&buses, &cf8, &io, &mmio32, &mmio64]);
    let crs = Name::new(Path::new("_CRS"), &crs);
    let prt = Name::new(Path::new("_PRT"), &pci_routing_table());
    let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &prt];
    let slots = hotplug.map(|h| RawAml(h.pci0_objects()));
    if let Some(slots) = &slots {
        children.push(slots);
    }
    bytes(&Device::new(Path::new("PCI0"), children))
}

/// `_PRT`: for each device slot of bus 0 and each pin INTA# to INTD#, the GSI
/// `layout::pci_intx_gsi` wires it to, as `Package { Address, Pin, Source, SourceIndex }`
/// with Source 0, which makes SourceIndex a GSI. GSI entries need no link devices
/// (`_PRS`/`_SRS` that nothing here could reprogram), and Linux configures them
/// level-triggered, active-low: the level part is what a VFIO device's resample irqfd
/// needs; the polarity is ignored by KVM's IOAPIC, which takes the irqfd's
/// assertion as the line's. Every slot is listed, used or not, so a device plugged
/// later is routed too.
fn pci_routing_table() -> PackageBuilder {
    let mut prt = PackageBuilder::new();
    for slot in PCI_DEVICE_SLOTS {
        for pin in PCI_INTX_PINS {
            let address = u32::from(slot) << 16 | PRT_ANY_FUNCTION;
            let gsi = pci_intx_gsi(slot, pin + 1);
            prt.add_element(&Package::new(vec![&address, &pin, &ZERO, &gsi]));
        }
    }
    prt
}

/// Resources the platform itself decodes: the ECAM window. Linux uses MCFG only when
/// the window is claimed here ("not reserved in ACPI motherboard resources" otherwise).
/// With `hotplug`, also the hot-plug registers, so that Linux reserves their ports.
fn motherboard_resources(hotplug: Option<&PciHotplugAml>) -> Vec<u8> {
    let hid = EISAName::new("PNP0C02");
    let hid = Name::new(Path::new("_HID"), &hid);
    let uid = Name::new(Path::new("_UID"), &0u8);
    let ecam = Memory32Fixed::new(false, PCI_ECAM_START as u32, PCI_ECAM_SIZE as u32);
    let ports = hotplug.map(|h| h.reserved_ports());
    let mut resources: Vec<&dyn Aml> = vec![&ecam];
    if let Some(ports) = &ports {
        resources.push(ports);
    }
    let crs = ResourceTemplate::new(resources);
    let crs = Name::new(Path::new("_CRS"), &crs);
    bytes(&Device::new(Path::new("MBRS"), vec![&hid, &uid, &crs]))
}

/// AML for an ISA device with a PnP ID, an I/O range and an edge-triggered,
/// active-high interrupt.
fn isa_device(name: &str, hid: &str, uid: Option<u8>, port: u16, ports: u8, irq: u32) -> Vec<u8> {
    let io = IO::new(port, port, 1, ports);
    let interrupt = Interrupt::new(true, true, false, false, irq);
    let crs = ResourceTemplate::new(vec![&io, &interrupt]);
    let hid = EISAName::new(hid);
    let hid = Name::new(Path::new("_HID"), &hid);
    let crs = Name::new(Path::new("_CRS"), &crs);
    let uid = uid.map(|u| Name::new(Path::new("_UID"), &u));
    let mut children: Vec<&dyn Aml> = vec![&hid];
    if let Some(uid) = &uid {
        children.push(uid);
    }
    children.push(&crs);
    bytes(&Device::new(Path::new(name), children))
}

/// The pvpanic port, under the ID Linux's pvpanic driver binds to (a string: QEMU's
/// vendor prefix is not an EISA one).
fn pvpanic() -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &"QEMU0001");
    let io = IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let crs = ResourceTemplate::new(vec![&io]);
    let crs = Name::new(Path::new("_CRS"), &crs);
    bytes(&Device::new(Path::new("PEVT"), vec![&hid, &crs]))
}

/// Already-serialized AML, to nest it in another object.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// Reads a table (header length at offset 4) from guest memory.
    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let mut header = [0u8; 8];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        let mut t = vec![0u8; u32_at(&header, 4) as usize];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(&t[..4]));
        t
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn layout() -> MemoryLayout {
        MemoryLayout::new(5 << 30).unwrap()
    }

    #[test]
    fn pointer_chain_and_checksums() {
        let mem = mem();
        let rsdp_addr = write_acpi_tables(&mem, &layout(), 4).unwrap();
        assert_eq!(rsdp_addr, GuestAddress(ACPI_START));
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, rsdp_addr).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(&rsdp), 0, "extended checksum");
        assert_eq!(rsdp[15], 2, "revision 2: use the XSDT");

        let xsdt = read_table(&mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(xsdt.len(), 36 + 24);
        let fadt = read_table(&mem, u64_at(&xsdt, 36));
        let madt = read_table(&mem, u64_at(&xsdt, 44));
        let mcfg = read_table(&mem, u64_at(&xsdt, 52));
        assert_eq!((&fadt[..4], &madt[..4], &mcfg[..4]), (&b"FACP"[..], &b"APIC"[..], &b"MCFG"[..]));
        // One allocation entry after the 8 reserved bytes: base, segment 0, buses 0..=0.
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!((u64_at(&mcfg, 44), &mcfg[52..56]), (PCI_ECAM_START, &[0, 0, 0, 0][..]));
        let dsdt = read_table(&mem, u64_at(&fadt, 140)); // X_DSDT
        assert_eq!(&dsdt[..4], b"DSDT");
        let end = u64_at(&fadt, 140) + dsdt.len() as u64;
        assert!(end <= RESET_VECTOR);
        let mut stub = [0u8; 9];
        mem.read_slice(&mut stub, GuestAddress(RESET_VECTOR)).unwrap();
        assert_eq!(stub, crate::reset_vector::reset_stub(), "reset stub written too");
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let fadt = bytes(&fadt(0xe1000));
        assert_eq!(fadt.len(), 276);
        assert_eq!((fadt[8], fadt[131]), (6, 5), "FADT 6.5");
        let flags = u32_at(&fadt, 112);
        for bit in [20, 10, 4, 5, 0] {
            assert_ne!(flags & (1 << bit), 0, "flag bit {bit}");
        }
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), 0b100, "no VGA; RTC present; no 8042 probe");
        // GAS: system I/O, 8 bits, offset 0, byte access, address.
        let gas = [1, 8, 0, 1, 0x00, 0x06, 0, 0, 0, 0, 0, 0];
        assert_eq!(fadt[116..128], gas, "RESET_REG");
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        assert_eq!(fadt[244..256], gas, "SLEEP_CONTROL_REG");
        assert_eq!(fadt[256..268], gas, "SLEEP_STATUS_REG");
        assert_eq!(u64_at(&fadt, 140), 0xe1000);
    }

    /// (type, bytes) of each MADT entry.
    fn madt_entries(madt: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let len = madt[at + 1] as usize;
            out.push((madt[at], &madt[at..at + len]));
            at += len;
        }
        out
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        for cpus in [1u8, 2, 64, MAX_CPUS] {
            let madt = madt(cpus);
            assert_eq!(sum(&madt), 0);
            assert_eq!(u32_at(&madt, 4) as usize, madt.len());
            assert_eq!(u32_at(&madt, 36) as u64, LAPIC_ADDR);
            let entries = madt_entries(&madt);
            let lapics: Vec<_> = entries.iter().filter(|e| e.0 == MADT_LOCAL_APIC).collect();
            assert_eq!(lapics.len(), cpus as usize);
            for (i, (_, e)) in lapics.iter().enumerate() {
                assert_eq!((e[2], e[3], u32_at(e, 4)), (i as u8, i as u8, 1), "UID, APIC ID, enabled");
            }
            let ioapics: Vec<_> = entries.iter().filter(|e| e.0 == MADT_IO_APIC).collect();
            assert_eq!(ioapics.len(), 1);
            let io = ioapics[0].1;
            assert_eq!((io[2], u32_at(io, 4) as u64, u32_at(io, 8)), (cpus, IOAPIC_ADDR, 0));
            let nmi = entries.iter().find(|e| e.0 == MADT_LOCAL_APIC_NMI).unwrap().1;
            assert_eq!((nmi[2], nmi[5]), (0xff, 1), "all processors, LINT1");
            let overrides = entries.iter().filter(|e| e.0 == MADT_INTERRUPT_OVERRIDE).count();
            assert_eq!(overrides, usize::from(PIT_IOAPIC_PIN != 0));
        }
    }

    #[test]
    fn dsdt_has_s5_com1_rtc_pvpanic_and_the_pci_root() {
        let layout = layout();
        let dsdt = dsdt(&layout, None);
        assert_eq!(sum(&dsdt), 0);
        let find = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        // NameOp "_S5_" PackageOp len=6 count=4 BytePrefix 5 Zero Zero Zero
        assert!(find(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0x00, 0x00, 0x00]));
        assert!(find(b"COM1") && find(b"RTC_") && find(b"_SB_"));
        // EISAID("PNP0B00") = 0x000bd041 as a DWordConst.
        assert!(find(&[0x0c, 0x41, 0xd0, 0x0b, 0x00]));
        // IO descriptor for 0x70..0x71 and an extended IRQ descriptor for IRQ 8.
        assert!(find(&[0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02]));
        assert!(find(&[0x89, 0x06, 0x00, 0x03, 0x01, 0x08, 0x00, 0x00, 0x00]));
        // pvpanic: "QEMU0001" as a string _HID, and its one port at 0x505.
        assert!(find(b"PEVT") && find(b"\x0dQEMU0001\x00"));
        assert!(find(&[0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01]));
        // PNP0A08 (PCI Express root) and PNP0C02 (motherboard resources) as EISA ids.
        assert!(find(&[0x0c, 0x41, 0xd0, 0x0a, 0x08]) && find(&[0x0c, 0x41, 0xd0, 0x0c, 0x02]));
        // Memory32Fixed over the ECAM window: 0x86, len 9, read-only, base, size.
        let mut ecam = vec![0x86, 0x09, 0x00, 0x00];
        ecam.extend_from_slice(&(PCI_ECAM_START as u32).to_le_bytes());
        ecam.extend_from_slice(&(PCI_ECAM_SIZE as u32).to_le_bytes());
        assert!(find(&ecam));
        // The 64-bit window's bounds, as the QWordMemory descriptor's min and max.
        let mut qword = layout.mmio64_start().to_le_bytes().to_vec();
        qword.extend_from_slice(&(layout.mmio64_end() - 1).to_le_bytes());
        assert!(find(&qword));
    }

    /// Reads an AML PkgLength at `at`: (length, bytes it took).
    fn pkg_length(b: &[u8], at: usize) -> (usize, usize) {
        let lead = b[at];
        let follow = usize::from(lead >> 6);
        if follow == 0 {
            return (usize::from(lead & 0x3f), 1);
        }
        let mut len = usize::from(lead & 0x0f);
        for i in 0..follow {
            len |= usize::from(b[at + 1 + i]) << (4 + 8 * i);
        }
        (len, 1 + follow)
    }

    /// Reads an AML integer constant at `at`: (value, bytes it took).
    fn integer(b: &[u8], at: usize) -> (u64, usize) {
        match b[at] {
            0x00 => (0, 1),
            0x01 => (1, 1),
            0x0a => (u64::from(b[at + 1]), 2),
            0x0b => (u64::from(u16::from_le_bytes([b[at + 1], b[at + 2]])), 3),
            0x0c => (u64::from(u32_at(b, at + 1)), 5),
            op => panic!("not an integer constant: {op:#04x} at {at}"),
        }
    }

    /// The `_PRT` package of a DSDT as (address, pin, source, source index) entries.
    fn prt_entries(dsdt: &[u8]) -> Vec<(u64, u64, u64, u64)> {
        let name = [0x08, b'_', b'P', b'R', b'T', 0x12];
        let at = dsdt.windows(name.len()).position(|w| w == name).expect("a _PRT") + name.len();
        let (len, took) = pkg_length(dsdt, at);
        let end = at + len;
        let count = usize::from(dsdt[at + took]);
        let mut next = at + took + 1;
        let mut entries = Vec::new();
        while next < end {
            assert_eq!(dsdt[next], 0x12, "each entry is a package");
            let (len, took) = pkg_length(dsdt, next + 1);
            let entry_end = next + 1 + len;
            assert_eq!(dsdt[next + 1 + took], 4, "of four elements");
            let mut at = next + 2 + took;
            let mut fields = [0u64; 4];
            for field in &mut fields {
                let (value, took) = integer(dsdt, at);
                *field = value;
                at += took;
            }
            assert_eq!(at, entry_end);
            entries.push((fields[0], fields[1], fields[2], fields[3]));
            next = entry_end;
        }
        assert_eq!(next, end);
        assert_eq!(entries.len(), count, "the package's element count");
        entries
    }

    #[test]
    fn prt_routes_every_slot_and_pin_to_its_gsi() {
        let dsdt = dsdt(&layout(), None);
        let entries = prt_entries(&dsdt);
        assert_eq!(entries.len(), 31 * 4);
        for (i, &(address, pin, source, gsi)) in entries.iter().enumerate() {
            let slot = (i / 4 + 1) as u8;
            assert_eq!(address, u64::from(slot) << 16 | 0xffff, "entry {i}");
            assert_eq!(pin, (i % 4) as u64);
            assert_eq!(source, 0, "a GSI, no link device");
            assert_eq!(gsi, u64::from(pci_intx_gsi(slot, pin as u8 + 1)));
            assert!((16..24).contains(&gsi));
        }
        // 00:01 INTA# on GSI 17, 00:07 INTB# on 16, 00:1f INTD# on 18.
        assert!(entries.contains(&(0x1_ffff, 0, 0, 17)));
        assert!(entries.contains(&(0x7_ffff, 1, 0, 16)));
        assert!(entries.contains(&(0x1f_ffff, 3, 0, 18)));
        // Under PCI0: the device's PkgLength covers the _PRT.
        let pci0 = dsdt.windows(4).position(|w| w == b"PCI0").unwrap();
        let prt = dsdt.windows(4).position(|w| w == b"_PRT").unwrap();
        // DeviceOp is ExtOpPrefix 0x5b 0x82, then the PkgLength, then the name.
        let device = dsdt[..pci0].windows(2).rposition(|w| w == [0x5b, 0x82]).unwrap();
        let (len, _) = pkg_length(&dsdt, device + 2);
        assert!(pci0 < prt && prt < device + 2 + len);
    }

    #[test]
    fn the_ioapic_has_the_inputs_the_prt_names() {
        // The MADT's one IOAPIC starts at GSI 0; KVM's has IOAPIC_PINS inputs.
        let madt = madt(1);
        let io = madt_entries(&madt).into_iter().find(|e| e.0 == MADT_IO_APIC).unwrap().1;
        assert_eq!(u32_at(io, 8), 0);
        let top = prt_entries(&dsdt(&layout(), None)).iter().map(|e| e.3).max().unwrap();
        assert!(top < u64::from(crate::layout::IOAPIC_PINS));
    }

    fn with_hotplug() -> AcpiOptions {
        AcpiOptions { pci_hotplug: Some(PciHotplugAml::default()) }
    }

    /// [start, end) of the body of the named object (Device, or Scope with
    /// `scope`) whose NameSeg is `name`.
    fn object_span(aml: &[u8], name: &[u8; 4], scope: bool) -> (usize, usize) {
        let at = aml.windows(4).position(|w| w == name).unwrap_or_else(|| panic!("{name:?}"));
        let opener: &[u8] = if scope { &[0x10] } else { &[0x5b, 0x82] };
        let op = aml[..at].windows(opener.len()).rposition(|w| w == opener).unwrap() + opener.len();
        let (len, _) = pkg_length(aml, op);
        (at, op + len)
    }

    #[test]
    fn default_tables_have_no_hotplug_objects() {
        let dsdt = dsdt(&layout(), None);
        for name in [&b"GED_"[..], b"ACPI0013", b"PHPR", b"PCNT", b"PCIU", b"S01_", b"S1F_", b"_EJ0", b"_SUN", b"_EVT"]
        {
            assert!(!dsdt.windows(name.len()).any(|w| w == name), "{}", String::from_utf8_lossy(name));
        }
        // write_acpi_tables is write_acpi_tables_with the default options.
        let (a, b) = (mem(), mem());
        write_acpi_tables(&a, &layout(), 2).unwrap();
        write_acpi_tables_with(&b, &layout(), 2, &AcpiOptions::default()).unwrap();
        let (mut ta, mut tb) = (vec![0u8; 0x20000], vec![0u8; 0x20000]);
        a.read_slice(&mut ta, GuestAddress(ACPI_START)).unwrap();
        b.read_slice(&mut tb, GuestAddress(ACPI_START)).unwrap();
        assert!(ta == tb);
    }

    #[test]
    fn hotplug_dsdt_puts_slots_in_pci0_and_the_ged_in_sb() {
        let layout = layout();
        let plain = dsdt(&layout, None);
        let dsdt = dsdt(&layout, Some(&PciHotplugAml::default()));
        assert_eq!(sum(&dsdt), 0);
        assert!(dsdt.len() > plain.len() + 31 * 40);
        let find = |needle: &[u8]| dsdt.windows(needle.len()).position(|w| w == needle);
        let (pci0, pci0_end) = object_span(&dsdt, b"PCI0", false);
        for slot in 1..=31u8 {
            let name = format!("S{slot:02X}_");
            let at = find(name.as_bytes()).unwrap();
            assert!(pci0 < at && at < pci0_end, "{name} inside PCI0");
        }
        let region = find(b"PHPR").unwrap();
        assert!(pci0 < region && region < pci0_end);
        // _PRT is still there, intact.
        assert_eq!(prt_entries(&dsdt), prt_entries(&plain));
        // The GED is a sibling of PCI0 in \_SB, not inside it.
        let (sb, sb_end) = object_span(&dsdt, b"_SB_", true);
        let (ged, ged_end) = object_span(&dsdt, b"GED_", false);
        assert!(sb < ged && ged_end <= sb_end && ged > pci0_end);
        assert!(find(b"ACPI0013").is_some_and(|at| ged < at && at < ged_end));
        // The motherboard resources reserve the register ports: IO (Decode16, 0x610, 0x610, 1, 16).
        let (mbrs, mbrs_end) = object_span(&dsdt, b"MBRS", false);
        let io = find(&[0x47, 0x01, 0x10, 0x06, 0x10, 0x06, 0x01, 0x10]).unwrap();
        assert!(mbrs < io && io < mbrs_end);
    }

    #[test]
    fn hotplug_options_are_validated() {
        let bad = AcpiOptions { pci_hotplug: Some(PciHotplugAml { gsi: COM1_IRQ, ..Default::default() }) };
        assert!(matches!(
            build_tables(&layout(), 1, &bad),
            Err(AcpiError::Hotplug(HotplugAmlError::Gsi(g))) if g == COM1_IRQ
        ));
        let bad = AcpiOptions { pci_hotplug: Some(PciHotplugAml { port: ACPI_SLEEP_PORT, ..Default::default() }) };
        assert!(matches!(build_tables(&layout(), 1, &bad), Err(AcpiError::Hotplug(HotplugAmlError::Port(_)))));
        let mem = mem();
        assert_eq!(write_acpi_tables_with(&mem, &layout(), 1, &with_hotplug()).unwrap(), GuestAddress(ACPI_START));
    }

    #[test]
    fn cpu_limits_and_size() {
        let layout = layout();
        assert!(matches!(build_tables(&layout, 0, &AcpiOptions::default()), Err(AcpiError::NoCpus)));
        assert!(matches!(build_tables(&layout, 255, &AcpiOptions::default()), Err(AcpiError::TooManyCpus(255))));
        let t = build_tables(&layout, MAX_CPUS, &with_hotplug()).unwrap();
        let (_, addr, bytes) = t.placed.last().unwrap();
        assert!(addr + bytes.len() as u64 <= RESET_VECTOR);
        let mut last_end = 0;
        for (name, addr, bytes) in &t.placed {
            assert!(*addr >= last_end && addr % 16 == 0, "{name} placed after the previous table, aligned");
            last_end = addr + bytes.len() as u64;
        }
    }
}
