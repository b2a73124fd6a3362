//! `VfioPciDevice` as the guest and the VMM see it, over the fake igbvf.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::fake::{Call, FakeVfio, BAR_SIZE, IGBVF_DEVICE, IGBVF_VENDOR, MSIX_CAP, PCIE_CAP, PCIE_DEVCAP};
use super::*;
use crate::config::{BarKind, COMMAND, COMMAND_MEMORY_SPACE, STATUS_CAP_LIST};
use crate::interrupt::testing::{Call::*, EventFdLine, RecordingVectors};
use crate::interrupt::{IntxLine, MsiMessage};

fn attach(fake: &FakeVfio, vectors: u16) -> (VfioPciDevice, Arc<RecordingVectors>) {
    let v = Arc::new(RecordingVectors::with_notifiers(vectors));
    let dev = VfioPciDevice::new(Box::new(fake.clone()), v.clone()).unwrap();
    fake.take_calls();
    (dev, v)
}

fn igbvf() -> (VfioPciDevice, FakeVfio, Arc<RecordingVectors>) {
    let fake = FakeVfio::igbvf();
    let (dev, v) = attach(&fake, 3);
    (dev, fake, v)
}

fn read(dev: &mut VfioPciDevice, offset: usize, len: usize) -> u64 {
    let mut b = [0; 8];
    dev.read_config(offset as u64, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn read32(dev: &mut VfioPciDevice, offset: usize) -> u32 {
    read(dev, offset, 4) as u32
}

fn write(dev: &mut VfioPciDevice, offset: usize, value: u64, len: usize) -> Vec<BarChange> {
    dev.write_config(offset as u64, &value.to_le_bytes()[..len])
}

/// The capability list as the guest walks it.
fn guest_capabilities(dev: &mut VfioPciDevice) -> Vec<(usize, u8)> {
    let mut caps = Vec::new();
    let mut next = read(dev, 0x34, 1) as usize;
    while next != 0 && caps.len() < 48 {
        caps.push((next, read(dev, next, 1) as u8));
        next = read(dev, next + 1, 1) as usize;
    }
    caps
}

fn bar32(dev: &mut VfioPciDevice, bar: u8, offset: u64) -> u32 {
    let mut b = [0; 4];
    dev.read_bar(bar, offset, &mut b);
    u32::from_le_bytes(b)
}

fn msg(n: u32) -> MsiMessage {
    MsiMessage { addr: 0xfee0_0000 + u64::from(n) * 0x1000, data: 0x40 + n }
}

fn program_vector(dev: &mut VfioPciDevice, vector: u64, m: MsiMessage, masked: bool) {
    let at = vector * 16;
    dev.write_bar(3, at, &m.addr.to_le_bytes());
    dev.write_bar(3, at + 8, &m.data.to_le_bytes());
    dev.write_bar(3, at + 12, &u32::from(masked).to_le_bytes());
}

#[test]
fn attach_resets_maps_and_turns_decoding_off() {
    let fake = FakeVfio::igbvf();
    assert_eq!(vector_count(&fake), 3);
    let v = Arc::new(RecordingVectors::with_notifiers(3));
    let dev = VfioPciDevice::new(Box::new(fake.clone()), v).unwrap();
    assert_eq!(dev.reset_outcome(), ResetOutcome::Reset);
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Reset,
            Call::Map { index: 0, offset: 0, len: BAR_SIZE },
            Call::Map { index: 3, offset: 0x1000, len: 0x1000 },
            Call::Map { index: 3, offset: 0x3000, len: 0x1000 },
            Call::Write { index: CONFIG_REGION, offset: 4, data: vec![0, 0] },
        ]
    );
    let bars = dev.bars();
    assert_eq!(bars.len(), 2);
    for (spec, index) in bars.iter().zip([0, 3]) {
        assert_eq!((spec.index, spec.size, spec.kind, spec.prefetchable), (index, BAR_SIZE, BarKind::Memory64, true));
    }
}

#[test]
fn header_shows_the_device_as_a_single_function_without_intx() {
    let (mut dev, _, _) = igbvf();
    assert_eq!(read32(&mut dev, 0), u32::from(IGBVF_DEVICE) << 16 | u32::from(IGBVF_VENDOR));
    assert_eq!(read32(&mut dev, 0x08), 0x0200_0001);
    assert_eq!(read(&mut dev, 0x0e, 1), 0, "multifunction bit masked");
    assert_eq!(read(&mut dev, 0x3d, 1), 0, "no interrupt pin");
    assert_eq!(read32(&mut dev, 0x2c), 0xa001_8086);
    // Capability list, fast back-to-back copied; nothing else.
    assert_eq!(read(&mut dev, 0x06, 2), u64::from(STATUS_CAP_LIST | 0x80));
    // Identity stays read-only; the interrupt line is the guest's scratch byte.
    write(&mut dev, 0, 0xffff_ffff, 4);
    write(&mut dev, 0x3c, 0x0b, 1);
    assert_eq!(read32(&mut dev, 0) as u16, IGBVF_VENDOR);
    assert_eq!(read(&mut dev, 0x3c, 1), 0x0b);
}

#[test]
fn only_allowed_capabilities_stay_linked() {
    let fake = FakeVfio::igbvf();
    // 0x34 -> VPD 0x60 -> MSI-X 0x70 -> PM 0x50 -> PCIe 0xa0 -> SATA 0xc0.
    fake.set_config(0x34, &[0x60]);
    fake.set_config(0x60, &[0x03, 0x70, 0xaa, 0xbb]);
    fake.set_config(MSIX_CAP + 1, &[0x50]);
    fake.set_config(0x50, &[0x01, PCIE_CAP as u8, 0x03, 0x00, 0x08, 0x00]);
    fake.set_config(PCIE_CAP + 1, &[0xc0]);
    fake.set_config(0xc0, &[0x12, 0x00, 0x10, 0x00]);
    let (mut dev, _) = attach(&fake, 3);
    assert_eq!(guest_capabilities(&mut dev), vec![(0x70, 0x11), (0x50, 0x01), (0xa0, 0x10)]);
    assert_eq!(read32(&mut dev, 0x60), 0, "hidden capabilities read 0");
    assert_eq!(read32(&mut dev, 0xc0), 0);
    // The extended space is hidden whole: an empty list at 0x100.
    assert_eq!(read32(&mut dev, 0x100), 0);
    assert_eq!(read32(&mut dev, 0x150), 0);
    write(&mut dev, 0x100, 0xffff_ffff, 4);
    assert_eq!(read32(&mut dev, 0x100), 0);
    assert!(fake.take_calls().is_empty(), "writes to hidden bytes never reach the device");

    // Power management is passed through: PMCSR reads and writes the device.
    assert_eq!(read(&mut dev, 0x52, 2), 0x0003);
    write(&mut dev, 0x54, 0x0003, 2);
    assert_eq!(fake.take_calls(), vec![Call::Write { index: CONFIG_REGION, offset: 0x54, data: vec![3, 0] }]);
    assert_eq!(fake.config_u16(0x54), 3);
    assert_eq!(read(&mut dev, 0x54, 2), 3);
}

#[test]
fn pcie_capability_is_live_as_a_root_complex_integrated_endpoint() {
    let (mut dev, fake, _) = igbvf();
    // Version 2, type 9 (was 0: endpoint); next pointer relinked.
    assert_eq!(read32(&mut dev, PCIE_CAP), 0x0092_0010);
    assert_eq!(read32(&mut dev, PCIE_CAP + 4), PCIE_DEVCAP);
    fake.set_config(PCIE_CAP + 4, &0x1000_0001u32.to_le_bytes());
    assert_eq!(read32(&mut dev, PCIE_CAP + 4), 0x1000_0001, "read live");
    // No link: link capabilities, control and status read 0 and ignore writes.
    assert_eq!(read32(&mut dev, PCIE_CAP + 0x0c), 0);
    assert_eq!(read32(&mut dev, PCIE_CAP + 0x10), 0);
    write(&mut dev, PCIE_CAP + 0x10, 0x0040, 2);
    assert!(fake.take_calls().is_empty());
    // Device control goes to the device; a write spanning the flags and device
    // capabilities reaches only the live bytes.
    write(&mut dev, PCIE_CAP + 8, 0x2830, 2);
    write(&mut dev, PCIE_CAP, u64::MAX, 8);
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Write { index: CONFIG_REGION, offset: PCIE_CAP as u64 + 8, data: vec![0x30, 0x28] },
            Call::Write { index: CONFIG_REGION, offset: PCIE_CAP as u64 + 4, data: vec![0xff; 4] },
        ]
    );
    assert_eq!(fake.config_u16(PCIE_CAP + 8), 0x2830);
}

#[test]
fn bars_size_like_hardware_and_rom_is_absent() {
    let (mut dev, fake, _) = igbvf();
    for reg in 0..6 {
        write(&mut dev, 0x10 + 4 * reg, 0xffff_ffff, 4);
    }
    let regs: Vec<u32> = (0..6).map(|reg| read32(&mut dev, 0x10 + 4 * reg)).collect();
    assert_eq!(regs, vec![0xffff_c00c, 0xffff_ffff, 0, 0xffff_c00c, 0xffff_ffff, 0]);
    write(&mut dev, 0x30, 0xffff_ffff, 4);
    assert_eq!(read32(&mut dev, 0x30), 0, "no expansion ROM");
    // The device's own BAR registers are the host's business.
    assert!(fake.take_calls().is_empty());
}

#[test]
fn moving_a_bar_reports_changes_and_keeps_its_mappings() {
    let (mut dev, fake, _) = igbvf();
    dev.set_bar_address(0, 0x1_0000_0000).unwrap();
    dev.set_bar_address(3, 0x1_0000_4000).unwrap();
    assert_eq!(fake.config_u16(COMMAND) & COMMAND_MEMORY_SPACE, COMMAND_MEMORY_SPACE, "decoding mirrored");
    assert_eq!(dev.bar_address(0), Some(0x1_0000_0000));
    let areas = dev.mmap_areas(0);
    assert_eq!(areas.len(), 1);
    assert_eq!((areas[0].offset, areas[0].mapping.len()), (0, BAR_SIZE as usize));
    let bar3: Vec<_> = dev.mmap_areas(3).iter().map(|a| (a.offset, a.mapping.len())).collect();
    assert_eq!(bar3, vec![(0x1000, 0x1000), (0x3000, 0x1000)], "table and PBA pages trapped");
    assert!(dev.mmap_areas(1).is_empty() && dev.mmap_areas(7).is_empty());

    let change = |index, old, new| BarChange { index, kind: BarKind::Memory64, size: BAR_SIZE, old, new };
    assert_eq!(
        write(&mut dev, COMMAND, 0, 2),
        vec![change(0, Some(0x1_0000_0000), None), change(3, Some(0x1_0000_4000), None)]
    );
    assert_eq!(fake.config_u16(COMMAND), 0);
    assert!(write(&mut dev, 0x10, 0x8000_0000, 4).is_empty());
    assert!(write(&mut dev, 0x14, 0, 4).is_empty());
    assert_eq!(
        write(&mut dev, COMMAND, u64::from(COMMAND_MEMORY_SPACE), 2),
        vec![change(0, None, Some(0x8000_0000)), change(3, None, Some(0x1_0000_4000))]
    );
    // A move with decoding on, low half first (the mapper moves the memory slots).
    assert_eq!(write(&mut dev, 0x10, 0x9000_0000, 4), vec![change(0, Some(0x8000_0000), Some(0x9000_0000))]);
    let after = dev.mmap_areas(0);
    assert!(Arc::ptr_eq(&areas[0].mapping, &after[0].mapping), "the same host mapping moves");
}

#[test]
fn command_is_mirrored_and_status_errors_are_live() {
    let (mut dev, fake, _) = igbvf();
    write(&mut dev, COMMAND, 0x0406, 2);
    assert_eq!(fake.take_calls(), vec![Call::Write { index: CONFIG_REGION, offset: 4, data: vec![0x06, 0x04] }]);
    assert_eq!(read(&mut dev, COMMAND, 2), 0x0406);
    // Only the bits the command register has reach the device.
    write(&mut dev, COMMAND, 0xffff, 2);
    assert_eq!(fake.config_u16(COMMAND), 0x0547);

    // Received master abort, raised by the device.
    fake.set_config(0x06, &(0x2000u16 | 0x90).to_le_bytes());
    assert_eq!(read(&mut dev, 0x06, 2), 0x2000 | 0x90);
    fake.take_calls();
    // Clearing it with a dword write to command and status.
    write(&mut dev, COMMAND, 0x2000_0006, 4);
    let calls = fake.take_calls();
    assert!(calls.contains(&Call::Write { index: CONFIG_REGION, offset: 6, data: vec![0x00, 0x20] }));
    assert_eq!(read(&mut dev, 0x06, 2), 0x90);

    // Interrupt Status (bit 3) follows the device: a shared INTx handler reads it.
    fake.set_config(0x06, &(0x0008u16 | 0x90).to_le_bytes());
    assert_eq!(read(&mut dev, 0x06, 2) & 0x0008, 0x0008);
    fake.set_config(0x06, &0x90u16.to_le_bytes());
    assert_eq!(read(&mut dev, 0x06, 2) & 0x0008, 0);
}

#[test]
fn msix_enable_hands_the_vectors_irqfds_to_vfio() {
    let (mut dev, fake, v) = igbvf();
    let control = MSIX_CAP + 2;
    assert_eq!(read(&mut dev, control, 2), 2, "table size 3");
    assert_eq!(read32(&mut dev, MSIX_CAP + 4), 3, "table in BAR 3 at 0");
    assert_eq!(read32(&mut dev, MSIX_CAP + 8), 0x2003, "PBA in BAR 3 at 0x2000");
    program_vector(&mut dev, 0, msg(0), false);
    program_vector(&mut dev, 2, msg(2), true);
    assert_eq!(v.take(), vec![]);

    write(&mut dev, control, 0x8000, 2);
    let fds: Vec<_> = (0..3).map(|i| v.notifier(i).unwrap().as_raw_fd()).collect();
    assert_eq!(fake.take_calls(), vec![Call::EnableIrqs { index: MSIX_IRQ, fds }]);
    assert_eq!(v.take(), vec![Enable(0, msg(0))]);
    assert_eq!(read(&mut dev, control, 2), 0x8002);

    // Masking and unmasking stay in KVM: no VFIO call.
    dev.write_bar(3, 2 * 16 + 12, &0u32.to_le_bytes());
    write(&mut dev, control, 0xc000, 2);
    write(&mut dev, control, 0x8000, 2);
    assert_eq!(v.take(), vec![Enable(2, msg(2)), Mask(0), Mask(2), Unmask(0), Unmask(2)]);
    assert!(fake.take_calls().is_empty());
    // A new message for a live vector is a route update only.
    program_vector(&mut dev, 0, msg(5), false);
    assert_eq!(v.take(), vec![Enable(0, MsiMessage { addr: msg(5).addr, data: msg(0).data }), Enable(0, msg(5))]);

    write(&mut dev, control, 0, 2);
    assert_eq!(fake.take_calls(), vec![Call::DisableIrqs(MSIX_IRQ)]);
    assert_eq!(v.take(), vec![Disable(0), Disable(2)]);
    write(&mut dev, control, 0, 2);
    assert!(fake.take_calls().is_empty());
}

#[test]
fn msix_table_and_pba_are_emulated_the_rest_reaches_the_device() {
    let (mut dev, fake, _) = igbvf();
    assert_eq!(bar32(&mut dev, 3, 12), 1, "entries come out of reset masked");
    program_vector(&mut dev, 1, msg(1), true);
    assert_eq!(bar32(&mut dev, 3, 16), 0xfee0_1000);
    assert_eq!(bar32(&mut dev, 3, 24), 0x41);
    assert_eq!(bar32(&mut dev, 3, 0x2000), 0);
    dev.write_bar(3, 0x2000, &[0xff; 8]);
    assert!(fake.take_calls().is_empty(), "table and PBA writes stay in the emulation");

    // Past the table, in the trapped pages: the device's region.
    fake.state().regions.get_mut(&3).unwrap().bytes[0x30] = 0x5a;
    assert_eq!(bar32(&mut dev, 3, 0x30), 0x5a);
    dev.write_bar(3, 0x2010, &7u32.to_le_bytes());
    dev.write_bar(0, 0x100, &9u32.to_le_bytes());
    assert_eq!(
        fake.take_calls(),
        vec![
            Call::Write { index: 3, offset: 0x2010, data: vec![7, 0, 0, 0] },
            Call::Write { index: 0, offset: 0x100, data: vec![9, 0, 0, 0] },
        ]
    );
    assert_eq!(fake.region_bytes(0, 0x100, 4), vec![9, 0, 0, 0]);
    assert_eq!(bar32(&mut dev, 0, 0x100), 9);
}

#[test]
fn sparse_areas_and_unmappable_bars() {
    let fake = FakeVfio::igbvf();
    {
        let mut st = fake.state();
        // An older host: no MSIX_MAPPABLE, the table page left out of a sparse list.
        let bar3 = &mut st.regions.get_mut(&3).unwrap().info;
        bar3.msix_mappable = false;
        bar3.sparse = Some(vec![RegionArea { offset: 0x1000, len: 0x3000 }]);
        st.regions.get_mut(&0).unwrap().info.mmap = false;
    }
    let (dev, _) = attach(&fake, 3);
    assert!(dev.mmap_areas(0).is_empty());
    let bar3: Vec<_> = dev.mmap_areas(3).iter().map(|a| (a.offset, a.mapping.len())).collect();
    assert_eq!(bar3, vec![(0x1000, 0x1000), (0x3000, 0x1000)]);
}

/// igbvf with an MSI capability at 0x50: 32-bit, no per-vector masking, 4 vectors.
fn with_msi() -> FakeVfio {
    let fake = FakeVfio::igbvf();
    fake.set_config(MSIX_CAP + 1, &[0x50]);
    fake.set_config(0x50, &[0x05, PCIE_CAP as u8, 0x04, 0x00]);
    fake.state().irqs.get_mut(&MSI_IRQ).unwrap().count = 4;
    fake
}

#[test]
fn msi_is_emulated_in_the_devices_layout() {
    let fake = with_msi();
    assert_eq!(vector_count(&fake), 4);
    let (mut dev, v) = attach(&fake, 4);
    assert_eq!(guest_capabilities(&mut dev), vec![(0x70, 0x11), (0x50, 0x05), (0xa0, 0x10)]);
    assert_eq!(read(&mut dev, 0x52, 2), 0x0004, "4 vectors capable, 32-bit, no masking");
    write(&mut dev, 0x54, 0xfee0_0003, 4);
    write(&mut dev, 0x58, 0x4041, 2);
    assert_eq!(read32(&mut dev, 0x54), 0xfee0_0000);
    assert_eq!(v.take(), vec![]);

    // Enable with 4 vectors (MME 2).
    write(&mut dev, 0x52, 0x0021, 2);
    let fds: Vec<_> = (0..4).map(|i| v.notifier(i).unwrap().as_raw_fd()).collect();
    assert_eq!(fake.take_calls(), vec![Call::EnableIrqs { index: MSI_IRQ, fds: fds.clone() }]);
    let m = |data| MsiMessage { addr: 0xfee0_0000, data };
    assert_eq!(v.take(), vec![Enable(0, m(0x4040)), Enable(1, m(0x4041)), Enable(2, m(0x4042)), Enable(3, m(0x4043))]);

    // Down to 2 vectors: VFIO cannot resize, so off and on again.
    write(&mut dev, 0x52, 0x0011, 2);
    assert_eq!(
        fake.take_calls(),
        vec![Call::DisableIrqs(MSI_IRQ), Call::EnableIrqs { index: MSI_IRQ, fds: fds[..2].to_vec() }]
    );
    write(&mut dev, 0x52, 0, 2);
    assert_eq!(fake.take_calls(), vec![Call::DisableIrqs(MSI_IRQ)]);
}

#[test]
fn detach_turns_interrupts_off_and_resets_once() {
    let (mut dev, fake, v) = igbvf();
    program_vector(&mut dev, 1, msg(1), false);
    write(&mut dev, MSIX_CAP + 2, 0x8000, 2);
    fake.take_calls();
    v.take();
    dev.detach();
    assert_eq!(fake.take_calls(), vec![Call::DisableIrqs(MSIX_IRQ), Call::Reset]);
    assert_eq!(v.take(), vec![Disable(1)]);
    dev.detach();
    drop(dev);
    assert!(fake.take_calls().is_empty());

    // Dropped without detach (an error path): the same clean-up.
    let (mut dev, fake, _) = igbvf();
    write(&mut dev, MSIX_CAP + 2, 0x8000, 2);
    fake.take_calls();
    drop(dev);
    assert_eq!(fake.take_calls(), vec![Call::DisableIrqs(MSIX_IRQ), Call::Reset]);
}

#[test]
fn device_failures_are_kept_for_the_vmm() {
    let (mut dev, fake, v) = igbvf();
    fake.state().broken = true;
    assert_eq!(read32(&mut dev, PCIE_CAP + 4), 0xffff_ffff);
    assert_eq!(read32(&mut dev, 0), u32::from(IGBVF_DEVICE) << 16 | u32::from(IGBVF_VENDOR), "shadow still answers");
    assert_eq!(bar32(&mut dev, 0, 0), 0xffff_ffff);
    dev.write_bar(0, 0, &[1, 2, 3, 4]);
    assert_eq!(dev.failures(), 3);
    assert!(matches!(dev.take_last_error(), Some(VfioError::BarAccess { bar: 0, offset: 0, .. })));
    assert!(dev.take_last_error().is_none());
    // VFIO refusing the vectors leaves MSI-X on for the guest, silent, and reported.
    fake.state().broken = false;
    fake.state().irqs.get_mut(&MSIX_IRQ).unwrap().count = 0;
    write(&mut dev, MSIX_CAP + 2, 0x8000, 2);
    assert!(matches!(
        dev.take_last_error(),
        Some(VfioError::Irq(IrqError::Vfio(VfioOpsError::IrqCount { index: MSIX_IRQ, count: 0, requested: 3 })))
    ));
    assert_eq!(read(&mut dev, MSIX_CAP + 2, 2), 0x8002);
    drop(dev);
    // A VMM with too few vectors is reported, not a panic.
    let fake = FakeVfio::igbvf();
    let (mut dev, _) = attach(&fake, 2);
    write(&mut dev, MSIX_CAP + 2, 0x8000, 2);
    assert!(matches!(dev.take_last_error(), Some(VfioError::Irq(IrqError::NoNotifier { vector: 2 }))));
    assert!(fake.take_calls().is_empty());
    drop(v);
}

#[test]
fn attach_refuses_what_it_cannot_pass_through() {
    let v = || Arc::new(RecordingVectors::with_notifiers(3));
    let fail = |fake: &FakeVfio| VfioPciDevice::new(Box::new(fake.clone()), v()).err().unwrap();

    let fake = FakeVfio::igbvf();
    fake.set_config(0x0e, &[0x01]);
    assert!(matches!(fail(&fake), VfioError::Config(VfioConfigError::HeaderType(0x01))));

    let fake = FakeVfio::igbvf();
    fake.state().regions.get_mut(&CONFIG_REGION).unwrap().info.size = 64;
    assert!(matches!(fail(&fake), VfioError::Config(VfioConfigError::ConfigSize(64))));

    let fake = FakeVfio::igbvf();
    fake.set_config(MSIX_CAP + 4, &0x0000_0002u32.to_le_bytes());
    assert!(matches!(fail(&fake), VfioError::Config(VfioConfigError::MsixLocation { what: "table", bar: 2, .. })));

    let fake = FakeVfio::igbvf();
    fake.set_config(MSIX_CAP + 8, &0x0000_4003u32.to_le_bytes());
    assert!(matches!(fail(&fake), VfioError::Config(VfioConfigError::MsixLocation { what: "PBA", .. })));

    let fake = FakeVfio::igbvf();
    fake.state().regions.get_mut(&0).unwrap().info.size = 0x3000;
    assert!(matches!(fail(&fake), VfioError::Config(VfioConfigError::Bar { index: 0, size: 0x3000, .. })));

    let fake = FakeVfio::igbvf();
    fake.state().broken = true;
    assert!(matches!(fail(&fake), VfioError::Config(VfioConfigError::Read(_))));

    let fake = FakeVfio::igbvf();
    fake.state().reset = ResetOutcome::NotOffered;
    let dev = VfioPciDevice::new(Box::new(fake.clone()), v()).unwrap();
    assert_eq!(dev.reset_outcome(), ResetOutcome::NotOffered);
}

/// A small deterministic generator for the hostile-input test.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 16
    }
}

#[test]
fn hostile_guest_accesses_never_panic() {
    // MSI, MSI-X and INTx all wired, so every interrupt path sees the noise.
    let fake = with_msi().with_intx(1);
    let (mut dev, _, _line) = attach_with_line(&fake, 4);
    let offsets: [u64; 25] = [
        0,
        1,
        2,
        3,
        5,
        0x0e,
        0x10,
        0x13,
        0x33,
        0x3f,
        0x52,
        0x5f,
        0x72,
        0x7b,
        0xa2,
        0xfd,
        0xff,
        0x100,
        0xffc,
        0xffd,
        0xfff,
        0x1000,
        0x1001,
        u64::MAX - 3,
        u64::MAX,
    ];
    let widths = [0, 1, 2, 3, 4, 5, 7, 8, 9, 16];
    for &offset in &offsets {
        for &len in &widths {
            let mut buf = vec![0; len];
            dev.read_config(offset, &mut buf);
            dev.write_config(offset, &vec![0xff; len]);
            dev.write_config(offset, &vec![0; len]);
        }
    }
    for bar in [0, 1, 2, 3, 4, 5, 6, 200, 255] {
        for offset in [0, 3, 0x2c, 0x2f, 0x1ffc, 0x2004, 0x2007, 0x3fff, 0x4000, u64::MAX - 1, u64::MAX] {
            for &len in &widths {
                let mut buf = vec![0; len];
                dev.read_bar(bar, offset, &mut buf);
                dev.write_bar(bar, offset, &vec![0xa5; len]);
            }
        }
    }
    let mut rng = Lcg(4);
    for _ in 0..20_000 {
        let len = widths[(rng.next() % widths.len() as u64) as usize];
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let offset = rng.next() % 0x1100;
        match rng.next() % 4 {
            0 => dev.read_config(offset, &mut vec![0; len]),
            1 => drop(dev.write_config(offset, &data)),
            2 => dev.read_bar((rng.next() % 7) as u8, offset * 4, &mut vec![0; len]),
            _ => dev.write_bar((rng.next() % 7) as u8, offset * 4, &data),
        }
    }
    assert_eq!(read32(&mut dev, 0) as u16, IGBVF_VENDOR);
    // Whatever the noise left on, a guest that turns MSI, MSI-X and Interrupt Disable
    // off gets INTx back, with VFIO agreeing.
    write(&mut dev, MSIX_CAP + 2, 0, 2);
    write(&mut dev, 0x52, 0, 2);
    write(&mut dev, COMMAND, 0, 2);
    assert!(dev.intx_enabled());
    assert_eq!(fake.state().active_irq, Some(INTX_IRQ));
    fake.take_calls();
}

/// Attaches `fake` and wires its INTx to a fresh line; the calls so far are taken.
fn attach_with_line(fake: &FakeVfio, vectors: u16) -> (VfioPciDevice, Arc<RecordingVectors>, Arc<EventFdLine>) {
    let (mut dev, v) = attach(fake, vectors);
    let line = Arc::new(EventFdLine::new());
    assert!(dev.set_intx(line.clone()).unwrap());
    fake.take_calls();
    (dev, v, line)
}

/// What turning INTx on asks of VFIO: the trigger, then the unmask eventfd.
fn intx_on(line: &EventFdLine) -> Vec<Call> {
    vec![
        Call::EnableIrqs { index: INTX_IRQ, fds: vec![line.trigger().as_raw_fd()] },
        Call::SetIrqUnmask { index: INTX_IRQ, fd: line.resample().as_raw_fd() },
    ]
}

#[test]
fn intx_pin_shows_and_intx_turns_on_once_the_line_is_wired() {
    let fake = FakeVfio::igbvf().with_intx(2);
    let (mut dev, _) = attach(&fake, 3);
    assert_eq!(dev.intx_pin(), Some(2));
    assert_eq!(read(&mut dev, 0x3d, 1), 0, "no pin until the VMM wires one");
    assert!(!dev.intx_enabled());

    let line = Arc::new(EventFdLine::new());
    assert!(dev.set_intx(line.clone()).unwrap());
    assert_eq!(fake.take_calls(), intx_on(&line));
    assert!(dev.intx_enabled());
    assert_eq!(read(&mut dev, 0x3d, 1), 2, "INTB#");
    // The pin is read-only; the line is the guest's own byte, never the device's.
    write(&mut dev, 0x3c, 0x0213, 2);
    assert_eq!(read(&mut dev, 0x3c, 2), 0x0213);
    assert!(fake.take_calls().is_empty());
    assert_eq!(fake.config_u16(0x3c) & 0xff, 0);

    // A new line replaces the old one in VFIO.
    let other = Arc::new(EventFdLine::new());
    assert!(dev.set_intx(other.clone()).unwrap());
    let mut expected = vec![Call::DisableIrqs(INTX_IRQ)];
    expected.extend(intx_on(&other));
    assert_eq!(fake.take_calls(), expected);
}

#[test]
fn msix_takes_over_from_intx_and_hands_it_back() {
    let fake = FakeVfio::igbvf().with_intx(1);
    let (mut dev, v, line) = attach_with_line(&fake, 3);
    let control = MSIX_CAP + 2;
    write(&mut dev, control, 0x8000, 2);
    let fds: Vec<_> = (0..3).map(|i| v.notifier(i).unwrap().as_raw_fd()).collect();
    assert_eq!(
        fake.take_calls(),
        vec![Call::DisableIrqs(INTX_IRQ), Call::EnableIrqs { index: MSIX_IRQ, fds }],
        "INTx off before VFIO takes MSI-X"
    );
    assert!(!dev.intx_enabled());
    // Function mask and unmask change nothing for INTx.
    write(&mut dev, control, 0xc000, 2);
    write(&mut dev, control, 0x8000, 2);
    assert!(fake.take_calls().is_empty());

    write(&mut dev, control, 0, 2);
    let mut expected = vec![Call::DisableIrqs(MSIX_IRQ)];
    expected.extend(intx_on(&line));
    assert_eq!(fake.take_calls(), expected, "INTx back after MSI-X is off");
    assert!(dev.intx_enabled());
    assert_eq!(dev.failures(), 0);
}

#[test]
fn msi_takes_over_from_intx_and_hands_it_back() {
    let fake = with_msi().with_intx(1);
    let (mut dev, v, line) = attach_with_line(&fake, 4);
    write(&mut dev, 0x54, 0xfee0_0000, 4);
    write(&mut dev, 0x52, 0x0001, 2);
    let fd0 = v.notifier(0).unwrap().as_raw_fd();
    assert_eq!(
        fake.take_calls(),
        vec![Call::DisableIrqs(INTX_IRQ), Call::EnableIrqs { index: MSI_IRQ, fds: vec![fd0] }]
    );
    write(&mut dev, 0x52, 0, 2);
    let mut expected = vec![Call::DisableIrqs(MSI_IRQ)];
    expected.extend(intx_on(&line));
    assert_eq!(fake.take_calls(), expected);
    assert_eq!(dev.failures(), 0);
}

#[test]
fn interrupt_disable_in_the_command_register_turns_intx_off() {
    let fake = FakeVfio::igbvf().with_intx(1);
    let (mut dev, _, line) = attach_with_line(&fake, 3);
    let command = |data: &[u8]| Call::Write { index: CONFIG_REGION, offset: COMMAND as u64, data: data.to_vec() };
    write(&mut dev, COMMAND, 0x0406, 2);
    assert_eq!(fake.take_calls(), vec![command(&[0x06, 0x04]), Call::DisableIrqs(INTX_IRQ)]);
    assert!(!dev.intx_enabled());
    // MSI-X on and off while INTx is disabled: it stays off.
    write(&mut dev, MSIX_CAP + 2, 0x8000, 2);
    write(&mut dev, MSIX_CAP + 2, 0, 2);
    assert!(!fake.take_calls().iter().any(|c| matches!(c, Call::EnableIrqs { index: INTX_IRQ, .. })));

    write(&mut dev, COMMAND, 0x0006, 2);
    let mut expected = vec![command(&[0x06, 0x00])];
    expected.extend(intx_on(&line));
    assert_eq!(fake.take_calls(), expected);
    // A command write that leaves the bit alone touches only the command register.
    write(&mut dev, COMMAND, 0x0002, 2);
    assert_eq!(fake.take_calls(), vec![command(&[0x02, 0x00])]);
    assert!(dev.intx_enabled());
}

#[test]
fn detach_turns_intx_off_for_good() {
    let fake = FakeVfio::igbvf().with_intx(1);
    let (mut dev, _, line) = attach_with_line(&fake, 3);
    dev.detach();
    assert_eq!(fake.take_calls(), vec![Call::DisableIrqs(INTX_IRQ), Call::Reset]);
    assert!(!dev.intx_enabled());
    assert!(!dev.set_intx(line).unwrap(), "a detached device takes no line");
    // A late MSI-X enable (a write racing the removal) reaches VFIO no more.
    write(&mut dev, MSIX_CAP + 2, 0x8000, 2);
    drop(dev);
    assert!(fake.take_calls().is_empty());

    // Dropped while MSI-X had INTx off: only MSI-X is left to turn off.
    let fake = FakeVfio::igbvf().with_intx(1);
    let (mut dev, _, _) = attach_with_line(&fake, 3);
    write(&mut dev, MSIX_CAP + 2, 0x8000, 2);
    fake.take_calls();
    drop(dev);
    assert_eq!(fake.take_calls(), vec![Call::DisableIrqs(MSIX_IRQ), Call::Reset]);
}

#[test]
fn a_device_without_intx_never_touches_it() {
    let never = |calls: &[Call]| {
        !calls.iter().any(|c| {
            matches!(
                c,
                Call::EnableIrqs { index: INTX_IRQ, .. } | Call::SetIrqUnmask { .. } | Call::DisableIrqs(INTX_IRQ)
            )
        })
    };
    // Pin 0 (a VF), a pin VFIO does not offer INTx for, and a pin out of range.
    for fake in [
        FakeVfio::igbvf(),
        {
            let f = FakeVfio::igbvf();
            f.set_config(0x3d, &[1]);
            f
        },
        FakeVfio::igbvf().with_intx(5),
    ] {
        let (mut dev, _) = attach(&fake, 3);
        assert_eq!(dev.intx_pin(), None);
        assert!(!dev.set_intx(Arc::new(EventFdLine::new())).unwrap());
        assert_eq!(read(&mut dev, 0x3d, 1), 0);
        write(&mut dev, COMMAND, 0x0406, 2);
        write(&mut dev, MSIX_CAP + 2, 0x8000, 2);
        write(&mut dev, MSIX_CAP + 2, 0, 2);
        write(&mut dev, COMMAND, 0x0006, 2);
        dev.detach();
        let calls = fake.take_calls();
        assert!(never(&calls), "{calls:?}");
        assert!(!dev.intx_enabled());
        assert_eq!(dev.failures(), 0);
    }
}

#[test]
fn vfio_refusing_intx_is_reported_and_retried() {
    let fake = FakeVfio::igbvf().with_intx(1);
    let (mut dev, _) = attach(&fake, 3);
    fake.state().irqs.get_mut(&INTX_IRQ).unwrap().count = 0;
    let line = Arc::new(EventFdLine::new());
    assert!(matches!(
        dev.set_intx(line.clone()),
        Err(VfioError::Irq(IrqError::Vfio(VfioOpsError::IrqCount { index: INTX_IRQ, count: 0, requested: 1 })))
    ));
    assert!(!dev.intx_enabled());
    assert_eq!(read(&mut dev, 0x3d, 1), 1, "the line is wired, only off");
    fake.take_calls();
    // The guest's next command write tries again.
    fake.state().irqs.get_mut(&INTX_IRQ).unwrap().count = 1;
    write(&mut dev, COMMAND, 0x0002, 2);
    let calls = fake.take_calls();
    assert_eq!(calls[1..], intx_on(&line)[..]);
    assert!(dev.intx_enabled());
}

#[test]
fn an_io_bar_is_not_offered_to_the_guest() {
    // BAR 2 of the host device is a 32-byte I/O BAR (as on igb and e1000e PFs).
    let fake = FakeVfio::igbvf();
    fake.set_config(0x18, &0x0000_0001u32.to_le_bytes());
    fake.state().regions.insert(2, super::fake::region(32, false));
    let (mut dev, _) = attach(&fake, 3);
    assert!(dev.bars().iter().all(|b| b.index != 2), "{:?}", dev.bars());
    write(&mut dev, 0x18, 0xffff_ffff, 4);
    assert_eq!(read32(&mut dev, 0x18), 0, "the I/O BAR reads as absent, sizing included");
}

#[test]
fn the_request_interrupt_goes_to_its_eventfd_alongside_msix() {
    let (mut dev, fake, _) = igbvf();
    let request = EventFd::new(0).unwrap();
    assert!(dev.set_request_notifier(&request).unwrap());
    assert_eq!(fake.take_calls(), vec![Call::EnableIrqs { index: REQ_IRQ, fds: vec![request.as_raw_fd()] }]);
    // MSI-X still goes on: the request interrupt is not an interrupt type of its own.
    program_vector(&mut dev, 0, msg(1), false);
    write(&mut dev, MSIX_CAP + 2, 0x8002, 2);
    assert!(fake.take_calls().iter().any(|c| matches!(c, Call::EnableIrqs { index: MSIX_IRQ, .. })));

    let without = FakeVfio::igbvf();
    without.state().irqs.remove(&REQ_IRQ);
    let (dev, _) = attach(&without, 3);
    assert!(!dev.set_request_notifier(&request).unwrap(), "a device without it offers none");
}
