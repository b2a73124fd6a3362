//! AML for ACPI PCI hot-plug of bus 0, driven by Linux's acpiphp with no guest changes.
//!
//! What it adds to the DSDT, in ASL terms:
//!
//! ```text
//! Scope (\_SB.PCI0) {                        // inside Device (PCI0)
//!     OperationRegion (PHPR, SystemIO, port, 0x10)
//!     Field (PHPR, DWordAcc, NoLock, WriteAsZeros) { PCIU, 32, PCID, 32, PCIP, 32, PCEJ, 32 }
//!     Method (PCNT, 0, Serialized) {         // one pass over the pending events
//!         Local0 = PCIU; Local1 = PCID       // each read once: reading clears them
//!         If (Local0 & (1 << 1)) { Notify (S01, 1) }  ... for slots 1 to 31
//!         If (Local1 & (1 << 1)) { Notify (S01, 3) }  ... for slots 1 to 31
//!     }
//!     Device (S01) {                         // ... to S1F
//!         Name (_ADR, 0x00010000)            // slot 1, function 0
//!         Name (_SUN, 1)
//!         Method (_STA) { If (PCIP & (1 << 1)) { Return (0x0F) } Return (0) }
//!         Method (_EJ0, 1) { PCEJ = 1 }
//!     }
//! }
//! Device (\_SB.GED_) {
//!     Name (_HID, "ACPI0013")
//!     Name (_UID, 0)
//!     Name (_CRS, ResourceTemplate () { Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi } })
//!     Method (_EVT, 1) { \_SB.PCI0.PCNT () }
//! }
//! ```
//! and the register ports among the motherboard resources (PNP0C02), so that Linux
//! reserves them.
//!
//! How Linux (6.1) uses it. acpiphp walks the children of PCI0 that have `_ADR`; a slot
//! object with `_EJ0` becomes a hot-plug slot (`/sys/bus/pci/slots/<_SUN>`), and the
//! slot object's Notify handler is acpiphp's. `Notify(Snn, 1)`, device check, makes it
//! rescan the slot and, when a function appeared, enable every slot whose status is
//! present: a device that answers config cycles is bound. `Notify(Snn, 3)`, eject
//! request, makes it unbind and remove the slot's functions and then evaluate `_EJ0`.
//! The GED driver (evged, built into every kernel with ACPI) requests the interrupt in
//! `_CRS` and runs `_EVT` from a thread once per interrupt; on a hardware-reduced
//! platform (our FADT) it is the only way a device can raise an ACPI event. Its `_CRS`
//! must hold interrupts and nothing else: evged fails the device on any other resource.
//! An edge suits an irqfd (a pulse per event, no resample) and needs no acknowledge.
//!
//! `_STA` tells acpiphp what the controller's `PCIP` says: 0x0F (present, enabled,
//! shown, functioning) or 0. acpiphp treats a slot whose status is not exactly 0x0F as
//! empty and removes its functions whenever it re-checks the bus (on any slot's device
//! check), so "present" must be exactly 0x0F; when `_STA` says 0 it reads the slot's
//! vendor ID instead, so a cold-plugged device the VMM forgot to mark present is still
//! kept. Returning 0 for empty slots also keeps the ACPI core from binding them.
//!
//! No `_OSC`: without one Linux keeps native PCIe hot-plug (pciehp) off for this root,
//! which is what we want; acpiphp on a root bus does not consult `_OSC` at all.
//!
//! The register layout is `devices::hotplug`'s, repeated here because neither crate
//! depends on the other; the VMM, which sees both, asserts that they agree.

use acpi_tables::aml::{
    And, Device, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local, Method, MethodCall,
    Name, Notify, OpRegion, OpRegionSpace, Path, ResourceTemplate, Return, Store, IO, ZERO,
};
use acpi_tables::Aml;

use super::bytes;
use crate::layout::{
    ACPI_SLEEP_PORT, COM1_IRQ, COM1_PORT, GED_GSI, PCI_HOTPLUG_PORT, PCI_HOTPLUG_PORT_LEN, PCI_IO_START,
    PIT_IOAPIC_PIN, RTC_IRQ, RTC_PORT,
};

/// `PCIU`: slots whose device arrived (bit n = slot n); reading clears it.
pub const REG_SLOTS_UP: u16 = 0x0;
/// `PCID`: slots whose device the VMM asks the guest to release; reading clears it.
pub const REG_SLOTS_DOWN: u16 = 0x4;
/// `PCIP`: slots that hold a device.
pub const REG_SLOTS_PRESENT: u16 = 0x8;
/// `PCEJ`: a slot's `_EJ0` writes the slot number here.
pub const REG_EJECT: u16 = 0xc;
/// The registers' span.
pub const REGISTERS_LEN: u16 = 0x10;
const _: () = assert!(REGISTERS_LEN == PCI_HOTPLUG_PORT_LEN);

/// Slots that get hot-plug objects: every device slot of bus 0 but the host bridge's.
const SLOTS: std::ops::RangeInclusive<u8> = 1..=31;
/// Notify values (ACPI 6.5, 5.6.6): device check and eject request.
const NOTIFY_DEVICE_CHECK: u8 = 1;
const NOTIFY_EJECT_REQUEST: u8 = 3;
/// `_STA` of an occupied slot: present, enabled, shown in the UI, functioning.
const STA_PRESENT: u8 = 0x0f;
/// Fixed port ranges (start, length) the register block must stay clear of.
const FIXED_PORTS: [(u16, u16); 4] = [(RTC_PORT, 2), (COM1_PORT, 8), (ACPI_SLEEP_PORT, 1), (0xcf8, 8)];

/// Where the hot-plug AML finds the controller: the first of its I/O ports, and the
/// GSI its GED interrupt arrives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHotplugAml {
    pub port: u16,
    pub gsi: u32,
}

impl Default for PciHotplugAml {
    /// The layout's choice: `layout::PCI_HOTPLUG_PORT` and `layout::GED_GSI`.
    fn default() -> Self {
        Self { port: PCI_HOTPLUG_PORT, gsi: GED_GSI }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HotplugAmlError {
    #[error(
        "the PCI hot-plug registers at I/O port {0:#x} must be 4-byte aligned, below the PCI I/O window at \
         {PCI_IO_START:#x} and clear of the RTC, COM1, the ACPI sleep port and 0xcf8"
    )]
    Port(u16),
    #[error(
        "the GED interrupt must be an unused ISA IRQ (1 to 15 but 2, {COM1_IRQ} and {RTC_IRQ}, edge-triggered); \
         GSI {0} is not"
    )]
    Gsi(u32),
}

impl PciHotplugAml {
    pub(super) fn validate(&self) -> Result<(), HotplugAmlError> {
        let start = u32::from(self.port);
        let end = start + u32::from(REGISTERS_LEN);
        let overlaps = |&(s, len): &(u16, u16)| start < u32::from(s) + u32::from(len) && u32::from(s) < end;
        if !self.port.is_multiple_of(4) || end > u32::from(PCI_IO_START) || FIXED_PORTS.iter().any(overlaps) {
            return Err(HotplugAmlError::Port(self.port));
        }
        // The GED's interrupt is an exclusive edge: it cannot share the level-triggered
        // PCI INTx lines (16 and up) or an ISA line a described device uses, and GSI 2
        // is the PIC cascade.
        let taken = [u32::from(PIT_IOAPIC_PIN), 2, COM1_IRQ, RTC_IRQ];
        if self.gsi >= 16 || taken.contains(&self.gsi) {
            return Err(HotplugAmlError::Gsi(self.gsi));
        }
        Ok(())
    }

    /// The objects that go inside `Device (PCI0)`: the register fields, `PCNT` and
    /// the slot devices.
    pub(super) fn pci0_objects(&self) -> Vec<u8> {
        let len = u32::from(REGISTERS_LEN);
        let region = OpRegion::new(Path::new("PHPR"), OpRegionSpace::SystemIO, &self.port, &len);
        let field = Field32::new(&["PCIU", "PCID", "PCIP", "PCEJ"]);
        let mut out = bytes(&region);
        field.0.to_aml_bytes(&mut out);
        pcnt().to_aml_bytes(&mut out);
        for slot in SLOTS {
            out.extend(slot_device(slot));
        }
        out
    }

    /// `Device (GED_)`, for `\_SB`.
    pub(super) fn ged(&self) -> Vec<u8> {
        let hid = Name::new(Path::new("_HID"), &"ACPI0013");
        let uid = Name::new(Path::new("_UID"), &ZERO);
        // Consumer, edge, active high, exclusive.
        let irq = Interrupt::new(true, true, false, false, self.gsi);
        let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&irq]));
        let pcnt = MethodCall::new(Path::new("\\_SB_.PCI0.PCNT"), vec![]);
        let evt = Method::new(Path::new("_EVT"), 1, false, vec![&pcnt]);
        bytes(&Device::new(Path::new("GED_"), vec![&hid, &uid, &crs, &evt]))
    }

    /// The register ports, as a motherboard resource.
    pub(super) fn reserved_ports(&self) -> IO {
        // REGISTERS_LEN is 16: it fits the descriptor's byte-wide length.
        IO::new(self.port, self.port, 1, REGISTERS_LEN as u8)
    }
}

/// A `Field` of consecutive 32-bit, DWord-accessed registers. Full-width fields make
/// every access one 32-bit port access: no read-modify-write that could consume the
/// read-to-clear registers.
struct Field32(acpi_tables::aml::Field);

impl Field32 {
    fn new(names: &[&str]) -> Self {
        let fields = names.iter().map(|n| FieldEntry::Named(name_seg(n), 32)).collect();
        Self(acpi_tables::aml::Field::new(
            Path::new("PHPR"),
            FieldAccessType::DWord,
            FieldLockRule::NoLock,
            FieldUpdateRule::WriteAsZeroes,
            fields,
        ))
    }
}

/// A four-character AML name as bytes; names here are constants of the right length.
fn name_seg(name: &str) -> [u8; 4] {
    let mut seg = [b'_'; 4];
    for (s, b) in seg.iter_mut().zip(name.bytes()) {
        *s = b;
    }
    seg
}

/// The name of the slot object for `slot`: S01 to S1F, padded to four characters.
fn slot_name(slot: u8) -> String {
    format!("S{slot:02X}_")
}

/// The slot's bit in PCIU, PCID and PCIP.
fn slot_mask(slot: u8) -> u32 {
    1 << slot
}

/// `Method (PCNT, 0, Serialized)`: reads PCIU and PCID once each, then sends a device
/// check to every slot that got a device and an eject request to every slot asked to
/// give one back. Arrivals go first, so a slot that had both in one pass (plugged and
/// at once unplugged) sees them in the order they happened.
fn pcnt() -> RawMethod {
    let (up, down) = (Local(0), Local(1));
    let mut body = Vec::new();
    Store::new(&up, &Path::new("PCIU")).to_aml_bytes(&mut body);
    Store::new(&down, &Path::new("PCID")).to_aml_bytes(&mut body);
    for (pending, event) in [(&up, NOTIFY_DEVICE_CHECK), (&down, NOTIFY_EJECT_REQUEST)] {
        for slot in SLOTS {
            let mask = slot_mask(slot);
            let test = And::new(&ZERO, pending, &mask);
            let target = Path::new(&slot_name(slot));
            let notify = Notify::new(&target, &event);
            If::new(&test, vec![&notify]).to_aml_bytes(&mut body);
        }
    }
    RawMethod { name: "PCNT", args: 0, serialized: true, body }
}

/// `Device (Snn)`: the slot's address, number, status and eject method.
fn slot_device(slot: u8) -> Vec<u8> {
    let adr = Name::new(Path::new("_ADR"), &(u32::from(slot) << 16));
    let sun = Name::new(Path::new("_SUN"), &slot);

    let mask = slot_mask(slot);
    let pcip = Path::new("PCIP");
    let occupied = And::new(&ZERO, &pcip, &mask);
    let ret_present = Return::new(&STA_PRESENT);
    let if_present = If::new(&occupied, vec![&ret_present]);
    let ret_absent = Return::new(&ZERO);
    let sta = Method::new(Path::new("_STA"), 0, false, vec![&if_present, &ret_absent]);

    let pcej = Path::new("PCEJ");
    let eject = Store::new(&pcej, &slot);
    let ej0 = Method::new(Path::new("_EJ0"), 1, false, vec![&eject]);

    bytes(&Device::new(Path::new(&slot_name(slot)), vec![&adr, &sun, &sta, &ej0]))
}

/// A method whose body is already serialized (`Method` wants borrowed children, and
/// PCNT's 62 `If`s are easier built as bytes).
struct RawMethod {
    name: &'static str,
    args: u8,
    serialized: bool,
    body: Vec<u8>,
}

impl Aml for RawMethod {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let body = super::RawAml(self.body.clone());
        Method::new(Path::new(self.name), self.args, self.serialized, vec![&body]).to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn default_is_the_layout_and_valid() {
        let h = PciHotplugAml::default();
        assert_eq!((h.port, h.gsi), (0x610, 5));
        assert_eq!(h.validate(), Ok(()));
    }

    #[test]
    fn rejects_ports_and_gsis_that_collide() {
        for port in [0x612, 0x5f8, 0xcf0, 0x3f0, 0x70, 0xbff8, 0xfff0] {
            let h = PciHotplugAml { port, ..Default::default() };
            assert_eq!(h.validate(), Err(HotplugAmlError::Port(port)), "{port:#x}");
        }
        for port in [0x0, 0x620, 0xae00, 0xbff0] {
            assert_eq!(PciHotplugAml { port, ..Default::default() }.validate(), Ok(()), "{port:#x}");
        }
        for gsi in [0, 2, 4, 8, 16, 23, 24, u32::MAX] {
            let h = PciHotplugAml { gsi, ..Default::default() };
            assert_eq!(h.validate(), Err(HotplugAmlError::Gsi(gsi)), "{gsi}");
        }
        for gsi in [1, 3, 5, 7, 9, 15] {
            assert_eq!(PciHotplugAml { gsi, ..Default::default() }.validate(), Ok(()), "{gsi}");
        }
    }

    #[test]
    fn slot_objects_have_adr_sun_sta_and_ej0() {
        let s = slot_device(0x1f);
        assert_eq!(&s[..2], &[0x5b, 0x82], "a Device");
        let name = find(&s, b"S1F_").unwrap();
        // Name (_ADR, 0x001F0000) as a DWordConst; Name (_SUN, 0x1F) as a ByteConst.
        assert_eq!(&s[name + 4..name + 14], &[0x08, b'_', b'A', b'D', b'R', 0x0c, 0x00, 0x00, 0x1f, 0x00]);
        assert_eq!(&s[name + 14..name + 21], &[0x08, b'_', b'S', b'U', b'N', 0x0a, 0x1f]);
        // _STA: And (PCIP, 1 << 31, Zero) in an If that returns 0x0F; else Return (Zero).
        let sta = find(&s, b"_STA").unwrap();
        assert_eq!(s[sta + 4], 0, "no arguments");
        let test = [0x7b, b'P', b'C', b'I', b'P', 0x0c, 0x00, 0x00, 0x00, 0x80, 0x00];
        assert!(find(&s[sta..], &test).is_some());
        assert!(find(&s[sta..], &[0xa4, 0x0a, 0x0f]).is_some() && find(&s[sta..], &[0xa4, 0x00]).is_some());
        // _EJ0 takes one argument and stores the slot number to PCEJ.
        let ej0 = find(&s, b"_EJ0").unwrap();
        assert_eq!(&s[ej0 + 4..], &[0x01, 0x70, 0x0a, 0x1f, b'P', b'C', b'E', b'J']);
        assert_eq!(slot_name(1), "S01_");
        assert!(find(&slot_device(1), &[0x70, 0x01, b'P', b'C', b'E', b'J']).is_some(), "Store (One, PCEJ)");
    }

    #[test]
    fn pcnt_reads_each_register_once_and_notifies_every_slot() {
        let mut m = Vec::new();
        pcnt().to_aml_bytes(&mut m);
        assert_eq!(m[0], 0x14, "a Method");
        let flags = find(&m, b"PCNT").unwrap() + 4;
        assert_eq!(m[flags], 0x08, "serialized, no arguments");
        assert_eq!(
            &m[flags + 1..flags + 13],
            &[0x70, b'P', b'C', b'I', b'U', 0x60, 0x70, b'P', b'C', b'I', b'D', 0x61]
        );
        let count = |needle: &[u8]| m.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(count(b"PCIU") + count(b"PCID"), 2, "each read once");
        for slot in SLOTS {
            let name = slot_name(slot);
            let mut check = vec![0x86];
            check.extend_from_slice(name.as_bytes());
            check.push(0x01);
            let mut eject = vec![0x86];
            eject.extend_from_slice(name.as_bytes());
            eject.extend_from_slice(&[0x0a, 0x03]);
            let (c, e) = (find(&m, &check), find(&m, &eject));
            assert!(c.is_some() && e.is_some(), "{name}");
            assert!(c < e);
        }
        // Arrivals are all handled before removals.
        assert!(find(&m, b"\x86S1F_\x01") < find(&m, b"\x86S01_\x0a\x03"));
        // The test of slot 1's arrival: And (Local0, 2, Zero).
        assert!(find(&m, &[0xa0, 0x0c, 0x7b, 0x60, 0x0a, 0x02, 0x00, 0x86, b'S', b'0', b'1', b'_', 0x01]).is_some());
    }

    #[test]
    fn ged_is_acpi0013_with_an_edge_interrupt_and_evt() {
        let g = PciHotplugAml { port: 0x610, gsi: 9 }.ged();
        assert!(find(&g, b"GED_").is_some());
        assert!(find(&g, b"\x08_HID\x0dACPI0013\x00").is_some());
        // Extended IRQ: consumer | edge, one interrupt, GSI 9. Nothing else in _CRS.
        let crs = find(&g, b"_CRS").unwrap();
        let irq = [0x89, 0x06, 0x00, 0x03, 0x01, 0x09, 0x00, 0x00, 0x00, 0x79];
        assert_eq!(find(&g[crs..], &irq), Some(8), "Name, Buffer, len, size, then the descriptor");
        let evt = find(&g, b"_EVT").unwrap();
        assert_eq!(g[evt + 4], 0x01, "one argument, not serialized");
        assert_eq!(&g[evt + 5..], b"\\/\x03_SB_PCI0PCNT");
    }

    #[test]
    fn registers_are_32_bit_fields_at_the_port() {
        let o = PciHotplugAml { port: 0x620, gsi: 5 }.pci0_objects();
        // OperationRegion (PHPR, SystemIO, 0x620, 0x10).
        assert_eq!(&o[..11], &[0x5b, 0x80, b'P', b'H', b'P', b'R', 0x01, 0x0b, 0x20, 0x06, 0x0a]);
        assert_eq!(o[11], 0x10);
        // Field (PHPR, DWordAcc, NoLock, WriteAsZeros) { PCIU, 32, PCID, 32, PCIP, 32, PCEJ, 32 }
        let mut field = vec![0x5b, 0x81, 0x1a, b'P', b'H', b'P', b'R', 0x43];
        for name in [b"PCIU", b"PCID", b"PCIP", b"PCEJ"] {
            field.extend_from_slice(name);
            field.push(32);
        }
        assert_eq!(&o[12..12 + field.len()], &field[..]);
        // The fields' order is the register offsets'.
        let offsets = [REG_SLOTS_UP, REG_SLOTS_DOWN, REG_SLOTS_PRESENT, REG_EJECT];
        assert!(offsets.iter().enumerate().all(|(i, &o)| o == 4 * i as u16));
        for slot in SLOTS {
            assert!(find(&o, slot_name(slot).as_bytes()).is_some());
        }
        assert_eq!(bytes(&PciHotplugAml::default().reserved_ports()), [0x47, 1, 0x10, 6, 0x10, 6, 1, 16]);
    }
}
