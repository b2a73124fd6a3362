//! The PCI hot-plug controller: the registers behind the DSDT's slot objects and its
//! Generic Event Device (GED), through which the guest's ACPI PCI hot-plug driver
//! (Linux's acpiphp) learns that a device arrived in, or is asked to leave, a slot of
//! bus 0, and through which it says that it let a device go.
//!
//! Four 32-bit registers, bit or value `n` meaning slot `n` (1 to 31; slot 0 is the
//! host bridge and never changes):
//!
//! | offset | name | access | meaning |
//! |---|---|---|---|
//! | 0x0 | `PCIU` | read, clears | slots whose device arrived since the last read |
//! | 0x4 | `PCID` | read, clears | slots whose device the VMM asks the guest to release |
//! | 0x8 | `PCIP` | read | slots that hold a device (each slot's `_STA`) |
//! | 0xc | `PCEJ` | write | the guest released the device in the slot written (`_EJ0`) |
//!
//! The AML (`boot::acpi::hotplug`) repeats these offsets; the VMM asserts that the two
//! agree.
//!
//! The flow:
//! - plug: the VMM puts the device on the PCI bus, then calls [`request_plug`]: its
//!   `PCIP` and `PCIU` bits are set and the GED interrupt fires. The GED's `_EVT`
//!   reads `PCIU` and `PCID` once each and sends `Notify(Snn, 1)` (device check) for
//!   each `PCIU` bit, then `Notify(Snn, 3)` (eject request) for each `PCID` bit.
//!   acpiphp answers a device check by rescanning the slot.
//! - unplug: [`request_unplug`] sets the `PCID` bit and fires the interrupt. acpiphp
//!   answers the eject request by unbinding and removing the device, then evaluates
//!   the slot's `_EJ0`, which writes the slot number to `PCEJ`. The controller clears
//!   the slot and hands the slot number to the VMM's [`EjectSink`]; only then may the
//!   VMM take the device away (unmap BARs and DMA, drop irqfds, reset it).
//! - a guest that never ejects: the VMM gives up after its timeout, removes the device
//!   anyway and calls [`force_remove`] so that a stale request cannot eject whatever
//!   is plugged into the slot next.
//!
//! The guest may also eject on its own (`echo 0 > /sys/bus/pci/slots/N/power` makes
//! acpiphp evaluate `_EJ0`); that reaches the sink in the same way, as a release the
//! VMM did not ask for.
//!
//! `PCIU` and `PCID` clear when read, as QEMU's and Cloud Hypervisor's do: `_EVT` reads
//! each exactly once into a local, so an event raised while `_EVT` runs is either in
//! what it read or left for the next interrupt, which the new event raises. The
//! interrupt is an edge (one pulse per event, an irqfd without resample): Linux's GED
//! driver runs `_EVT` once per edge and nothing needs acknowledging.
//!
//! [`request_plug`]: PciHotplugController::request_plug
//! [`request_unplug`]: PciHotplugController::request_unplug
//! [`force_remove`]: PciHotplugController::force_remove

use std::sync::Arc;

use crate::bus::BusDevice;

/// `PCIU`: slots whose device arrived; reading clears it.
pub const REG_SLOTS_UP: u64 = 0x0;
/// `PCID`: slots whose device the VMM wants back; reading clears it.
pub const REG_SLOTS_DOWN: u64 = 0x4;
/// `PCIP`: slots that hold a device.
pub const REG_SLOTS_PRESENT: u64 = 0x8;
/// `PCEJ`: the guest writes a slot number here from the slot's `_EJ0`.
pub const REG_EJECT: u64 = 0xc;
/// Bytes of I/O space the registers take.
pub const REGISTERS_LEN: u64 = 0x10;
/// Each register is exactly this wide; other accesses are not decoded.
const REG_WIDTH: usize = 4;

/// Slots of bus 0 that can be hot-plugged: all but the host bridge's.
pub const SLOTS: std::ops::RangeInclusive<u8> = 1..=31;

/// Raises the GED interrupt: one edge per call. The VMM wraps an irqfd's eventfd
/// (`write(1)`) on the GSI the DSDT's GED names.
pub type HotplugInterrupt = Arc<dyn Fn() + Send + Sync>;

/// Told the slot whose device the guest released (its `_EJ0` ran). It runs on the vCPU
/// thread that wrote `PCEJ`, with the controller locked, so it must not lock the
/// controller or do the slow part of the removal itself: it should hand the slot to
/// the VMM's event loop (a channel plus an eventfd) and return.
pub type EjectSink = Arc<dyn Fn(u8) + Send + Sync>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HotplugError {
    #[error("PCI slot {0} cannot be hot-plugged: only slots 1 to 31 of bus 0 can (slot 0 is the host bridge)")]
    InvalidSlot(u8),
    #[error("PCI slot {0} already holds a device")]
    Occupied(u8),
    #[error("PCI slot {0} holds no device to remove")]
    Empty(u8),
}

/// The hot-plug register block; place it on the port I/O bus at the address the DSDT
/// names (`boot::layout::PCI_HOTPLUG_PORT`, `REGISTERS_LEN` bytes).
pub struct PciHotplugController {
    /// `PCIU`: arrivals the guest has not read yet.
    up: u32,
    /// `PCID`: removal requests the guest has not read yet.
    down: u32,
    /// `PCIP`: occupied slots.
    present: u32,
    interrupt: HotplugInterrupt,
    on_eject: EjectSink,
}

impl PciHotplugController {
    pub fn new(interrupt: HotplugInterrupt, on_eject: EjectSink) -> Self {
        Self { up: 0, down: 0, present: 0, interrupt, on_eject }
    }

    /// Marks a slot occupied without telling the guest, for devices in place before it
    /// boots: it finds them by scanning the bus, and their `_STA` must agree (and
    /// their `_EJ0` must be honoured should it eject one).
    pub fn set_present(&mut self, slot: u8) -> Result<(), HotplugError> {
        let bit = slot_bit(slot)?;
        self.present |= bit;
        Ok(())
    }

    /// Announces a device the VMM has just put in `slot` (it must already answer config
    /// cycles: the guest rescans the slot as soon as it handles the interrupt).
    pub fn request_plug(&mut self, slot: u8) -> Result<(), HotplugError> {
        let bit = slot_bit(slot)?;
        if self.present & bit != 0 {
            return Err(HotplugError::Occupied(slot));
        }
        self.present |= bit;
        self.up |= bit;
        // An empty slot has no removal pending (eject and force_remove clear it), but
        // make sure a stale one can never eject the new device.
        self.down &= !bit;
        (self.interrupt)();
        Ok(())
    }

    /// Asks the guest to release the device in `slot`. The answer is a later `PCEJ`
    /// write reaching the eject sink, or nothing: the VMM times out and calls
    /// `force_remove`. Asking again for a slot already asked about raises the
    /// interrupt again, which is how a retry looks.
    pub fn request_unplug(&mut self, slot: u8) -> Result<(), HotplugError> {
        let bit = slot_bit(slot)?;
        if self.present & bit == 0 {
            return Err(HotplugError::Empty(slot));
        }
        // An arrival the guest has not read yet need not be announced at all: it gets
        // the eject request alone, which acpiphp honours for a slot it never enabled.
        self.up &= !bit;
        self.down |= bit;
        (self.interrupt)();
        Ok(())
    }

    /// Forgets the device in `slot` after the VMM removed it without the guest's
    /// `_EJ0` (timeout, or a device that vanished from the host). Pending events for
    /// the slot are dropped; the eject sink is not called.
    pub fn force_remove(&mut self, slot: u8) -> Result<(), HotplugError> {
        let bit = slot_bit(slot)?;
        self.clear(bit);
        Ok(())
    }

    /// Whether `slot` holds a device, as the guest's `_STA` sees it.
    pub fn is_present(&self, slot: u8) -> bool {
        slot_bit(slot).is_ok_and(|bit| self.present & bit != 0)
    }

    fn clear(&mut self, bit: u32) {
        self.present &= !bit;
        self.up &= !bit;
        self.down &= !bit;
    }

    /// A `PCEJ` write: the guest released the device in `value`, a slot number.
    /// Anything but an occupied hot-pluggable slot is ignored, so a guest cannot make
    /// the VMM tear down a slot twice or one it never filled.
    fn eject(&mut self, value: u32) {
        let Ok(slot) = u8::try_from(value) else { return };
        let Ok(bit) = slot_bit(slot) else { return };
        if self.present & bit == 0 {
            return;
        }
        self.clear(bit);
        (self.on_eject)(slot);
    }
}

/// The register bit of `slot`, if it is a hot-pluggable slot.
fn slot_bit(slot: u8) -> Result<u32, HotplugError> {
    if SLOTS.contains(&slot) {
        Ok(1 << slot)
    } else {
        Err(HotplugError::InvalidSlot(slot))
    }
}

impl BusDevice for PciHotplugController {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Only whole registers are decoded: a partial read of PCIU or PCID would
        // otherwise clear bits the guest never saw. The AML's fields are DWordAcc.
        let value = match (offset, data.len()) {
            (REG_SLOTS_UP, REG_WIDTH) => std::mem::take(&mut self.up),
            (REG_SLOTS_DOWN, REG_WIDTH) => std::mem::take(&mut self.down),
            (REG_SLOTS_PRESENT, REG_WIDTH) => self.present,
            (REG_EJECT, REG_WIDTH) => 0,
            _ => {
                data.fill(0xff);
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // PCEJ is the only writable register; writes anywhere else, or of another
        // width, do nothing.
        if offset != REG_EJECT {
            return;
        }
        let Ok(bytes) = <[u8; REG_WIDTH]>::try_from(data) else { return };
        self.eject(u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    struct Fixture {
        dev: PciHotplugController,
        interrupts: Arc<AtomicUsize>,
        ejected: Arc<Mutex<Vec<u8>>>,
    }

    fn fixture() -> Fixture {
        let interrupts = Arc::new(AtomicUsize::new(0));
        let ejected = Arc::new(Mutex::new(Vec::new()));
        let (i, e) = (interrupts.clone(), ejected.clone());
        let dev = PciHotplugController::new(
            Arc::new(move || {
                i.fetch_add(1, Ordering::SeqCst);
            }),
            Arc::new(move |slot| e.lock().unwrap().push(slot)),
        );
        Fixture { dev, interrupts, ejected }
    }

    impl Fixture {
        fn read(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.dev.read(offset, &mut b);
            u32::from_le_bytes(b)
        }
        fn eject(&mut self, slot: u32) {
            self.dev.write(REG_EJECT, &slot.to_le_bytes());
        }
        fn interrupts(&self) -> usize {
            self.interrupts.load(Ordering::SeqCst)
        }
        fn ejected(&self) -> Vec<u8> {
            self.ejected.lock().unwrap().clone()
        }
    }

    #[test]
    fn plug_sets_up_and_present_and_interrupts_once() {
        let mut f = fixture();
        f.dev.request_plug(3).unwrap();
        assert_eq!(f.interrupts(), 1);
        assert_eq!(f.read(REG_SLOTS_PRESENT), 1 << 3);
        assert_eq!(f.read(REG_SLOTS_UP), 1 << 3);
        assert_eq!(f.read(REG_SLOTS_UP), 0, "reading PCIU acknowledges it");
        assert_eq!(f.read(REG_SLOTS_DOWN), 0);
        assert_eq!(f.read(REG_SLOTS_PRESENT), 1 << 3, "PCIP is not cleared by reads");
        assert!(f.dev.is_present(3) && !f.dev.is_present(4));
        assert_eq!(f.dev.request_plug(3), Err(HotplugError::Occupied(3)));
        assert_eq!(f.interrupts(), 1, "a refused request raises nothing");
    }

    #[test]
    fn arrivals_accumulate_until_read() {
        let mut f = fixture();
        f.dev.request_plug(1).unwrap();
        f.dev.request_plug(31).unwrap();
        assert_eq!(f.interrupts(), 2);
        assert_eq!(f.read(REG_SLOTS_UP), (1 << 1) | (1 << 31));
        f.dev.request_plug(7).unwrap();
        assert_eq!(f.read(REG_SLOTS_UP), 1 << 7, "only what arrived after the last read");
    }

    #[test]
    fn unplug_then_eject_reports_the_slot_and_empties_it() {
        let mut f = fixture();
        f.dev.request_plug(5).unwrap();
        f.read(REG_SLOTS_UP);
        f.dev.request_unplug(5).unwrap();
        assert_eq!(f.interrupts(), 2);
        assert_eq!(f.read(REG_SLOTS_DOWN), 1 << 5);
        assert_eq!(f.read(REG_SLOTS_DOWN), 0, "reading PCID acknowledges it");
        assert!(f.ejected().is_empty(), "nothing is released before _EJ0");
        f.eject(5);
        assert_eq!(f.ejected(), vec![5]);
        assert_eq!(f.read(REG_SLOTS_PRESENT), 0);
        f.eject(5);
        assert_eq!(f.ejected(), vec![5], "a second eject of the now empty slot is ignored");
        assert_eq!(f.dev.request_unplug(5), Err(HotplugError::Empty(5)));
        f.dev.request_plug(5).unwrap();
        assert_eq!(f.read(REG_SLOTS_UP), 1 << 5, "the slot can be filled again");
    }

    #[test]
    fn unplug_before_the_guest_saw_the_arrival_only_asks_for_the_eject() {
        let mut f = fixture();
        f.dev.request_plug(9).unwrap();
        f.dev.request_unplug(9).unwrap();
        assert_eq!((f.read(REG_SLOTS_UP), f.read(REG_SLOTS_DOWN)), (0, 1 << 9));
        let retry_before = f.interrupts();
        f.dev.request_unplug(9).unwrap();
        assert_eq!(f.interrupts(), retry_before + 1, "a retried request interrupts again");
        assert_eq!(f.read(REG_SLOTS_DOWN), 1 << 9);
    }

    #[test]
    fn guest_initiated_eject_of_a_present_slot_is_reported() {
        let mut f = fixture();
        f.dev.set_present(2).unwrap();
        assert_eq!(f.interrupts(), 0, "cold-plugged devices raise nothing");
        assert_eq!(f.read(REG_SLOTS_PRESENT), 1 << 2);
        f.eject(2);
        assert_eq!(f.ejected(), vec![2]);
    }

    #[test]
    fn force_remove_drops_pending_events() {
        let mut f = fixture();
        f.dev.request_plug(4).unwrap();
        f.read(REG_SLOTS_UP);
        f.dev.request_unplug(4).unwrap();
        f.dev.force_remove(4).unwrap();
        assert_eq!((f.read(REG_SLOTS_PRESENT), f.read(REG_SLOTS_DOWN)), (0, 0));
        f.eject(4);
        assert!(f.ejected().is_empty(), "a late _EJ0 after a forced removal is ignored");
        f.dev.request_plug(4).unwrap();
        assert_eq!((f.read(REG_SLOTS_UP), f.read(REG_SLOTS_DOWN)), (1 << 4, 0), "no stale eject request");
    }

    #[test]
    fn invalid_slots_are_refused() {
        let mut f = fixture();
        for slot in [0u8, 32, 255] {
            assert_eq!(f.dev.request_plug(slot), Err(HotplugError::InvalidSlot(slot)));
            assert_eq!(f.dev.request_unplug(slot), Err(HotplugError::InvalidSlot(slot)));
            assert_eq!(f.dev.set_present(slot), Err(HotplugError::InvalidSlot(slot)));
            assert_eq!(f.dev.force_remove(slot), Err(HotplugError::InvalidSlot(slot)));
            assert!(!f.dev.is_present(slot));
        }
        assert_eq!(f.interrupts(), 0);
        assert!(f.dev.request_plug(0).unwrap_err().to_string().contains("1 to 31"));
    }

    #[test]
    fn bad_guest_accesses_are_ignored() {
        let mut f = fixture();
        f.dev.request_plug(6).unwrap();
        f.dev.request_unplug(6).unwrap();
        // Ejects of slots out of range, empty, or as a bitmask instead of a number.
        for value in [0u32, 7, 32, 1 << 6, u32::MAX, 6 << 8] {
            f.eject(value);
        }
        // Eject-looking writes at the wrong width or offset.
        f.dev.write(REG_EJECT, &[6]);
        f.dev.write(REG_EJECT, &[6, 0]);
        f.dev.write(REG_EJECT, &[6, 0, 0, 0, 0, 0, 0, 0]);
        f.dev.write(REG_EJECT, &[]);
        for offset in [REG_SLOTS_UP, REG_SLOTS_DOWN, REG_SLOTS_PRESENT, 0xd, 0x10, u64::MAX] {
            f.dev.write(offset, &6u32.to_le_bytes());
        }
        assert!(f.ejected().is_empty());
        assert!(f.dev.is_present(6));
        // Partial or misplaced reads read as all-ones and consume nothing.
        for (offset, width) in [(REG_SLOTS_DOWN, 1), (REG_SLOTS_DOWN, 2), (REG_SLOTS_DOWN, 8), (0x5, 4), (0x10, 4)] {
            let mut b = vec![0u8; width];
            f.dev.read(offset, &mut b);
            assert!(b.iter().all(|&x| x == 0xff), "{offset:#x}/{width}");
        }
        f.dev.read(u64::MAX, &mut []);
        assert_eq!(f.read(REG_SLOTS_DOWN), 1 << 6, "the request survived");
        assert_eq!(f.read(REG_EJECT), 0);
        f.eject(6);
        assert_eq!(f.ejected(), vec![6]);
    }

    #[test]
    fn works_behind_the_bus() {
        let f = fixture();
        let interrupts = f.interrupts.clone();
        let dev = Arc::new(Mutex::new(f.dev));
        let bus = crate::Bus::new();
        bus.insert(0x610, REGISTERS_LEN, dev.clone()).unwrap();
        dev.lock().unwrap().request_plug(8).unwrap();
        assert_eq!(interrupts.load(Ordering::SeqCst), 1);
        let mut b = [0u8; 4];
        assert!(bus.read(0x610 + REG_SLOTS_UP, &mut b));
        assert_eq!(u32::from_le_bytes(b), 1 << 8);
        assert!(bus.read(0x610 + REG_SLOTS_PRESENT, &mut b));
        assert_eq!(u32::from_le_bytes(b), 1 << 8);
        assert!(!bus.read(0x610 + 0xe, &mut b), "runs past the block: not decoded");
    }
}
