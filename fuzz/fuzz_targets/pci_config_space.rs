#![no_main]
//! Config space as the guest reaches it (0xcf8 or ECAM: any offset, any width), on the
//! two kinds of function Tandem shows: an emulated one (`PciConfiguration` with BARs and
//! MSI, MSI-X and vendor capabilities, the MSI and MSI-X state behind them, as a device
//! model wires them), and a passthrough one (`VfioPciDevice` over the in-memory fake
//! VFIO device, whose own config space, BARs and interrupts the input also shapes).
//!
//! Checked: no panic; identity and the capability list read back as built whatever is
//! written; reads outside the space are all-ones; BAR sizing returns the size mask and
//! restoring the address restores the decoding; reported BAR changes are exactly the
//! moves, to addresses a BAR can have; MSI and MSI-X routing follows the protocol.

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use pci::config::{self, BarKind, BarSpec, PciConfiguration, PciHeader, BAR0};
use pci::msi::{self, Msi, MSI_CAPABILITY_ID, MSI_CAPABILITY_LEN};
use pci::msix::{self, Msix, MsixLayout, MSIX_CAPABILITY_ID, MSIX_CONTROL_OFFSET};
use pci::vfio::fake::{FakeVfio, Region};
use pci::vfio::{vector_count, IrqInfo, RegionArea, RegionInfo, VfioPciDevice, INTX_IRQ, MSIX_IRQ, MSI_IRQ};
use pci::{IntxLine, PciDevice};
use tandem_fuzz::bars::{check_changes, decoded};
use tandem_fuzz::vectors::ModelVectors;
use tandem_fuzz::Input;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// An offset in the standard space mostly, in the extended one or beyond sometimes.
fn offset(input: &mut Input) -> u64 {
    match input.u8() % 8 {
        0..=5 => u64::from(input.u8()),
        6 => input.below(4096 + 16),
        _ => input.u64(),
    }
}

/// An emulated function and what sits behind its capabilities.
struct Emulated {
    config: PciConfiguration,
    header: PciHeader,
    /// (offset, id, next) of each capability as added.
    caps: Vec<(usize, u8, u8)>,
    msi: Option<(usize, Msi)>,
    msix: Option<(usize, Msix)>,
}

fn emulated(input: &mut Input) -> Emulated {
    let header = PciHeader {
        vendor_id: input.u16(),
        device_id: input.u16(),
        revision_id: input.u8(),
        class: input.u8(),
        subclass: input.u8(),
        prog_if: input.u8(),
        subsystem_vendor_id: input.u16(),
        subsystem_id: input.u16(),
        interrupt_pin: input.u8() % 6,
    };
    let mut config = PciConfiguration::new(&header);
    for _ in 0..input.u8() % 5 {
        let kind = [BarKind::Io, BarKind::Memory32, BarKind::Memory64][input.below(3) as usize];
        let size = if input.u8() < 0xf0 { 1u64 << (input.u8() % 40) } else { input.u64() };
        let spec = BarSpec { index: input.u8() % 7, size, kind, prefetchable: input.bool() };
        let _ = config.add_bar(spec);
    }
    let (mut msi_state, mut msix_state) = (None, None);
    for _ in 0..input.u8() % 4 {
        match input.u8() % 3 {
            0 => {
                let vectors = 1u16 << (input.u8() % 7);
                let Ok((body, writable)) = msi::capability_body(vectors) else { continue };
                let Ok(at) = config.add_capability(MSI_CAPABILITY_ID, &body, &writable) else { continue };
                let Ok(m) = Msi::new(vectors, Arc::new(ModelVectors::new(vectors, false, true))) else { continue };
                msi_state.get_or_insert((at, m));
            }
            1 => {
                let size = input.u16() % 2050;
                let layout =
                    MsixLayout { table_bar: input.u8() % 7, table_offset: input.u32(), pba_bar: 0, pba_offset: 0x800 };
                let Ok((body, writable)) = msix::capability_body(size, &layout) else { continue };
                let Ok(at) = config.add_capability(MSIX_CAPABILITY_ID, &body, &writable) else { continue };
                let Ok(m) = Msix::new(size, Arc::new(ModelVectors::new(size, false, true))) else { continue };
                msix_state.get_or_insert((at, m));
            }
            _ => {
                let len = usize::from(input.u8() % 40);
                let body = input.value(len);
                let writable = input.value(len);
                let _ = config.add_capability(0x09, &body, &writable);
            }
        }
    }
    let mut caps = Vec::new();
    let mut next = usize::from(config.read_u8(config::CAPABILITIES_POINTER));
    while next != 0 && caps.len() < 64 {
        let (id, after) = (config.read_u8(next), config.read_u8(next + 1));
        caps.push((next, id, after));
        next = usize::from(after);
    }
    Emulated { config, header, caps, msi: msi_state, msix: msix_state }
}

impl Emulated {
    fn check_identity(&self) {
        let c = &self.config;
        let h = &self.header;
        assert_eq!((c.read_u16(config::VENDOR_ID), c.read_u16(config::DEVICE_ID)), (h.vendor_id, h.device_id));
        assert_eq!(
            c.read_u32(config::REVISION_ID),
            u32::from_le_bytes([h.revision_id, h.prog_if, h.subclass, h.class])
        );
        assert_eq!(c.read_u16(config::SUBSYSTEM_ID), h.subsystem_id);
        assert_eq!(c.read_u8(config::INTERRUPT_PIN), h.interrupt_pin);
        for &(at, id, next) in &self.caps {
            assert_eq!((c.read_u8(at), c.read_u8(at + 1)), (id, next), "capability header at {at:#x}");
        }
        let first = self.caps.first().map_or(0, |c| c.0 as u8);
        assert_eq!(c.read_u8(config::CAPABILITIES_POINTER), first);
    }

    fn write(&mut self, at: u64, data: &[u8]) {
        let specs = self.config.bars();
        let before = decoded(&specs, |i| self.config.bar_address(i));
        let changes = self.config.write(at, data);
        let after = decoded(&specs, |i| self.config.bar_address(i));
        check_changes(&specs, &before, &after, &changes);
        let len = data.len() as u64;
        if let Some((cap, msi)) = &mut self.msi {
            if config::ranges_overlap(at, len, *cap as u64, MSI_CAPABILITY_LEN as u64) {
                let mut regs = [0u8; MSI_CAPABILITY_LEN];
                for (i, chunk) in regs.chunks_mut(8).enumerate() {
                    self.config.read((*cap + 8 * i) as u64, chunk);
                }
                msi.update(&regs);
            }
        }
        if let Some((cap, msix)) = &mut self.msix {
            let control = *cap + MSIX_CONTROL_OFFSET;
            if config::ranges_overlap(at, len, control as u64, 2) {
                msix.set_control(self.config.read_u16(control));
            }
        }
    }

    /// Linux's BAR sizing: save, write all-ones, read the mask, restore.
    fn size_bar(&mut self, spec: BarSpec) {
        let reg = (BAR0 + 4 * usize::from(spec.index)) as u64;
        let was = self.config.bar_address(spec.index);
        let regs = if spec.kind == BarKind::Memory64 { 2 } else { 1 };
        let saved: Vec<u32> = (0..regs).map(|r| self.config.read_u32(reg as usize + 4 * r)).collect();
        for r in 0..regs {
            self.write(reg + 4 * r as u64, &[0xff; 4]);
        }
        let mask = !(spec.size - 1);
        let (low_mask, flags) = match spec.kind {
            BarKind::Io => (mask as u32 & !0x3, 0x1),
            BarKind::Memory32 => (mask as u32 & !0xf, u32::from(spec.prefetchable) << 3),
            BarKind::Memory64 => (mask as u32 & !0xf, 0x4 | u32::from(spec.prefetchable) << 3),
        };
        assert_eq!(self.config.read_u32(reg as usize), low_mask | flags, "sizing BAR {}", spec.index);
        if regs == 2 {
            assert_eq!(self.config.read_u32(reg as usize + 4), (mask >> 32) as u32, "sizing BAR {}", spec.index);
        }
        for (r, v) in saved.iter().enumerate() {
            self.write(reg + 4 * r as u64, &v.to_le_bytes());
        }
        assert_eq!(self.config.bar_address(spec.index), was, "BAR {} after sizing and restoring", spec.index);
    }

    fn run(mut self, input: &mut Input) {
        while !input.is_empty() {
            match input.u8() % 10 {
                0..=3 => {
                    let (at, width) = (offset(input), input.width());
                    let value = input.value(width);
                    self.write(at, &value);
                }
                4 | 5 => {
                    let (at, width) = (offset(input), input.width());
                    let mut buf = vec![0u8; width];
                    self.config.read(at, &mut buf);
                    if config::access_range(at, width).is_none() {
                        assert!(buf.iter().all(|&b| b == 0xff), "read at {at:#x}/{width} outside the space");
                    }
                }
                6 => {
                    let specs = self.config.bars();
                    if !specs.is_empty() {
                        let spec = specs[input.below(specs.len() as u64) as usize];
                        self.size_bar(spec);
                    }
                }
                7 => {
                    let (index, addr) = (input.u8() % 7, input.u64() & !0xfff);
                    if self.config.set_bar_address(index, addr).is_ok() {
                        assert_eq!(self.config.bar_address(index), Some(addr), "BAR {index} programmed");
                    }
                }
                8 => {
                    let vector = u16::from(input.u8());
                    if let Some((_, msi)) = &mut self.msi {
                        let _ = msi.trigger(vector % 34);
                    }
                    if let Some((_, msix)) = &mut self.msix {
                        let _ = msix.trigger(vector);
                    }
                }
                _ => {
                    let (at, width) = (input.u16() as u64, input.width());
                    let value = input.value(width);
                    if let Some((_, msix)) = &mut self.msix {
                        msix.write_table(at, &value);
                    }
                }
            }
            self.check_identity();
        }
    }
}

struct Line(EventFd, EventFd);

impl IntxLine for Line {
    fn trigger(&self) -> &EventFd {
        &self.0
    }
    fn resample(&self) -> &EventFd {
        &self.1
    }
}

/// Whether the device's own capability list (as VfioConfig walks it) has both MSI and
/// MSI-X: their emulations then share one vector set, which a guest enabling both can
/// drive out of step (a guest must not; it only confuses its own interrupts).
fn has_msi_and_msix(dev: &[u8]) -> bool {
    let (mut msi, mut msix) = (false, false);
    if dev[config::STATUS] & 0x10 != 0 {
        let mut seen = [false; 64];
        let mut next = usize::from(dev[config::CAPABILITIES_POINTER] & !3);
        while next >= 0x40 && !seen[next / 4] {
            seen[next / 4] = true;
            msi |= dev[next] == MSI_CAPABILITY_ID;
            msix |= dev[next] == MSIX_CAPABILITY_ID;
            next = usize::from(dev[next + 1] & !3);
        }
    }
    msi && msix
}

const REGION_SIZES: [u64; 8] = [0x1000, 0x2000, 0x4000, 0x8000, 0x1_0000, 0x1800, 0x100, 0];

fn fake(input: &mut Input) -> FakeVfio {
    let mut fake = FakeVfio::igbvf();
    if input.u8() < 0x40 {
        fake = fake.with_intx(input.u8() % 6);
    }
    for _ in 0..input.u8() % 6 {
        let at = usize::from(input.u8());
        let len = usize::from(input.u8() % 16).min(256 - at);
        let bytes = input.bytes(len).to_vec();
        fake.set_config(at, &bytes);
    }
    let mut st = fake.state();
    for index in [INTX_IRQ, MSI_IRQ, MSIX_IRQ] {
        if input.u8() < 0x40 {
            st.irqs.insert(index, IrqInfo { count: u32::from(input.u8() % 40), noresize: input.bool() });
        }
    }
    for _ in 0..input.u8() % 3 {
        let index = u32::from(input.u8() % 6);
        let size = REGION_SIZES[input.below(REGION_SIZES.len() as u64) as usize];
        let flags = input.u8();
        let sparse = (flags & 8 != 0).then(|| {
            let n = input.u8() % 3;
            (0..n).map(|_| RegionArea { offset: u64::from(input.u16()), len: u64::from(input.u16()) }).collect()
        });
        let info = RegionInfo {
            size,
            readable: true,
            writable: true,
            mmap: flags & 1 != 0,
            sparse,
            msix_mappable: flags & 2 != 0,
        };
        st.regions.insert(index, Region { info, bytes: vec![0; size as usize] });
    }
    drop(st);
    fake
}

fn passthrough(input: &mut Input) {
    let fake = fake(input);
    let dev_config = fake.region_bytes(pci::vfio::CONFIG_REGION, 0, 256);
    let count = vector_count(&fake);
    let vectors = Arc::new(ModelVectors::new(count, true, !has_msi_and_msix(&dev_config)));
    let Ok(mut dev) = VfioPciDevice::new(Box::new(fake.clone()), vectors) else { return };
    let identity = u32::from_le_bytes([dev_config[0], dev_config[1], dev_config[2], dev_config[3]]);
    let specs = dev.bars();
    while !input.is_empty() {
        match input.u8() % 12 {
            0..=3 => {
                let (at, width) = (offset(input), input.width());
                let value = input.value(width);
                let before = decoded(&specs, |i| dev.bar_address(i));
                let changes = dev.write_config(at, &value);
                let after = decoded(&specs, |i| dev.bar_address(i));
                check_changes(&specs, &before, &after, &changes);
            }
            4 | 5 => {
                let (at, width) = (offset(input), input.width());
                let mut buf = vec![0u8; width];
                dev.read_config(at, &mut buf);
            }
            6 | 7 => {
                let (bar, at, width) = (input.u8() % 7, u64::from(input.u16()), input.width());
                if input.bool() {
                    let value = input.value(width);
                    dev.write_bar(bar, at, &value);
                } else {
                    let mut buf = vec![0u8; width];
                    dev.read_bar(bar, at, &mut buf);
                }
            }
            8 => {
                let (index, addr) = (input.u8() % 7, input.u64() & !0xfff);
                let _ = dev.set_bar_address(index, addr);
            }
            9 => {
                let line =
                    Line(EventFd::new(EFD_NONBLOCK).expect("eventfd"), EventFd::new(EFD_NONBLOCK).expect("eventfd"));
                let _ = dev.set_intx(Arc::new(line));
            }
            10 => {
                let broken = input.bool();
                fake.state().broken = broken;
            }
            _ => {
                if input.bool() {
                    dev.detach();
                } else {
                    let _ = dev.set_request_notifier(&EventFd::new(EFD_NONBLOCK).expect("eventfd"));
                }
            }
        }
        let mut id = [0u8; 4];
        dev.read_config(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), identity, "the identity changed");
        let mut ext = [0u8; 4];
        dev.read_config(0x100, &mut ext);
        assert_eq!(ext, [0; 4], "the extended space is hidden");
        for spec in &specs {
            for area in dev.mmap_areas(spec.index) {
                let end = area.offset + area.mapping.len() as u64;
                assert!(
                    area.offset % 4096 == 0 && end <= spec.size,
                    "BAR {} maps {:#x}..{end:#x}",
                    spec.index,
                    area.offset
                );
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    if input.bool() {
        emulated(&mut input).run(&mut input);
    } else {
        passthrough(&mut input);
    }
});
