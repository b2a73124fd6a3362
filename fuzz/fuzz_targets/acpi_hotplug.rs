#![no_main]
//! The ACPI PCI hot-plug registers on the port I/O bus, as the guest's AML (or any guest
//! code) reaches them, interleaved with the VMM's plug, unplug and forced removals.
//!
//! Checked against a model of the four registers: every read returns what the model
//! says (PCIU and PCID clear on a whole-register read, nothing else does; other widths
//! and offsets read all-ones); the eject sink hears exactly the occupied slots the guest
//! ejects; one interrupt per accepted request; the VMM's calls fail exactly when the
//! model says they must.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use boot::layout::{PCI_HOTPLUG_PORT, PCI_HOTPLUG_PORT_LEN};
use devices::hotplug::{
    PciHotplugController, REGISTERS_LEN, REG_EJECT, REG_SLOTS_DOWN, REG_SLOTS_PRESENT, REG_SLOTS_UP,
};
use devices::Bus;
use libfuzzer_sys::fuzz_target;
use tandem_fuzz::Input;

const BASE: u64 = PCI_HOTPLUG_PORT as u64;

#[derive(Default)]
struct Model {
    up: u32,
    down: u32,
    present: u32,
}

fn slot_bit(slot: u8) -> Option<u32> {
    (1..=31).contains(&slot).then(|| 1 << slot)
}

fuzz_target!(|data: &[u8]| {
    assert_eq!(REGISTERS_LEN, u64::from(PCI_HOTPLUG_PORT_LEN), "the DSDT and the device disagree on the block");
    let mut input = Input::new(data);
    let interrupts = Arc::new(AtomicUsize::new(0));
    let ejected = Arc::new(Mutex::new(Vec::new()));
    let (irq, sink) = (interrupts.clone(), ejected.clone());
    let dev = Arc::new(Mutex::new(PciHotplugController::new(
        Arc::new(move || {
            irq.fetch_add(1, Ordering::SeqCst);
        }),
        Arc::new(move |slot| sink.lock().unwrap().push(slot)),
    )));
    let bus = Bus::new();
    bus.insert(BASE, REGISTERS_LEN, dev.clone()).expect("bus");
    let mut m = Model::default();
    let mut expected_irqs = 0;
    let mut expected_ejects = Vec::new();

    while !input.is_empty() {
        let op = input.u8() % 8;
        // Mostly the slots that exist, sometimes 0 and the ones beyond.
        let slot = input.u8() % 40;
        match op {
            0 => {
                let ok = slot_bit(slot).filter(|b| m.present & b == 0);
                assert_eq!(dev.lock().unwrap().request_plug(slot).is_ok(), ok.is_some(), "plug {slot}");
                if let Some(b) = ok {
                    m.present |= b;
                    m.up |= b;
                    m.down &= !b;
                    expected_irqs += 1;
                }
            }
            1 => {
                let ok = slot_bit(slot).filter(|b| m.present & b != 0);
                assert_eq!(dev.lock().unwrap().request_unplug(slot).is_ok(), ok.is_some(), "unplug {slot}");
                if let Some(b) = ok {
                    m.up &= !b;
                    m.down |= b;
                    expected_irqs += 1;
                }
            }
            2 => {
                let ok = slot_bit(slot);
                assert_eq!(dev.lock().unwrap().force_remove(slot).is_ok(), ok.is_some(), "force_remove {slot}");
                if let Some(b) = ok {
                    m.present &= !b;
                    m.up &= !b;
                    m.down &= !b;
                }
            }
            3 => {
                let ok = slot_bit(slot);
                assert_eq!(dev.lock().unwrap().set_present(slot).is_ok(), ok.is_some(), "set_present {slot}");
                if let Some(b) = ok {
                    m.present |= b;
                }
            }
            4 | 5 => {
                // A guest read: an offset in or around the block, any width.
                let offset = u64::from(slot % 20);
                let width = input.width();
                let mut buf = vec![0u8; width];
                let decoded = bus.read(BASE + offset, &mut buf);
                assert_eq!(decoded, offset + width as u64 <= REGISTERS_LEN, "read {offset:#x}/{width}");
                if !decoded {
                    continue;
                }
                let expected = match (offset, width) {
                    (REG_SLOTS_UP, 4) => Some(std::mem::take(&mut m.up)),
                    (REG_SLOTS_DOWN, 4) => Some(std::mem::take(&mut m.down)),
                    (REG_SLOTS_PRESENT, 4) => Some(m.present),
                    (REG_EJECT, 4) => Some(0),
                    _ => None,
                };
                match expected {
                    Some(v) => assert_eq!(buf, v.to_le_bytes(), "read {offset:#x}"),
                    None => assert!(buf.iter().all(|&b| b == 0xff), "undecoded read {offset:#x}/{width}: {buf:?}"),
                }
            }
            _ => {
                // A guest write: mostly PCEJ with a slot number, sometimes anything.
                let offset = if input.u8() < 0xc0 { REG_EJECT } else { u64::from(input.u8() % 20) };
                let width = input.width();
                let value = if input.u8() < 0xc0 { u64::from(slot) } else { input.u64() };
                let bytes: Vec<u8> = (0..width).map(|i| value.to_le_bytes()[i % 8]).collect();
                bus.write(BASE + offset, &bytes);
                // A 4-byte write carries the low 32 bits.
                let target = u8::try_from(value as u32).ok().and_then(slot_bit);
                if let (REG_EJECT, 4, Some(b)) = (offset, width, target) {
                    if m.present & b != 0 {
                        m.present &= !b;
                        m.up &= !b;
                        m.down &= !b;
                        expected_ejects.push(b.trailing_zeros() as u8);
                    }
                }
            }
        }
        assert_eq!(interrupts.load(Ordering::SeqCst), expected_irqs, "one interrupt per accepted request");
        assert_eq!(*ejected.lock().unwrap(), expected_ejects, "ejects reported");
        let d = dev.lock().unwrap();
        for s in 0..=40u8 {
            assert_eq!(d.is_present(s), slot_bit(s).is_some_and(|b| m.present & b != 0), "_STA of slot {s}");
        }
    }
});
