//! The config space a passthrough function shows the guest: a shadow
//! [`PciConfiguration`] seeded from the device, with some bytes passed through.
//!
//! Each byte of the standard 256 is either *emulated* (the shadow answers, under its
//! masks) or *live* (read from and written to the device through VFIO):
//! - emulated: the header (identity from the device; header type without the
//!   multifunction bit; the interrupt pin 0 until the VMM wires the device's INTx,
//!   then the device's; the interrupt line the guest's scratch byte), the BARs
//!   (sizes from VFIO's region sizes, kind and prefetch from the device's BAR low
//!   bits), the expansion ROM (absent: reads 0 whatever the device has), every
//!   capability header (the list is relinked), the MSI and MSI-X capabilities (Tandem
//!   emulates them and enables the vectors through VFIO), and all hidden bytes (0);
//! - live: the bodies of the other capabilities kept (power management, PCI Express,
//!   vendor-specific), except the PCI Express type and link registers (below);
//! - both: the command register is emulated (so BAR decoding follows it) and every
//!   write is mirrored to the device; the status error bits are read live and
//!   write-1-to-clear writes go to the device.
//!
//! Only capabilities on an allow-list stay in the list; the others are unlinked and
//! read 0. The extended space (0x100 on) is hidden whole: dword 0x100 reads 0, the
//! empty list (AER, ARI, SR-IOV and the like belong to the host).
//!
//! Tandem puts devices on the root bus with no root port above them, so a PCI
//! Express endpoint is shown as a root-complex integrated endpoint, without link
//! registers (as QEMU does on pcie.0): there is no link for the guest to manage.
//!
//! MSI-X table and PBA offsets stay where the device has them; a table that does not
//! start on a page boundary costs traps for its page's other registers, nothing else.

use std::ops::Range;

use crate::config::{
    access_range, overlay, ranges_overlap, BarChange, BarKind, BarSpec, ConfigError, PciConfiguration, PciHeader, BAR0,
    CAPABILITIES_POINTER, CLASS_CODE, COMMAND, DEVICE_ID, HEADER_TYPE, INTERRUPT_PIN, NUM_BARS, REVISION_ID, STATUS,
    STATUS_CAP_LIST, STATUS_WRITE_1_TO_CLEAR, SUBSYSTEM_ID, SUBSYSTEM_VENDOR_ID, VENDOR_ID,
};
use crate::msi::{
    MAX_MSI_VECTORS, MSI_ADDRESS_HI_OFFSET, MSI_ADDRESS_LO_OFFSET, MSI_CAPABILITY_ID, MSI_CAPABILITY_LEN,
    MSI_CONTROL_OFFSET, MSI_DATA_OFFSET, MSI_MASK_OFFSET,
};
use crate::msix::{MsixLayout, MSIX_CAPABILITY_ID, MSIX_CAPABILITY_LEN, MSIX_CONTROL_OFFSET};

use super::ops::{VfioDeviceOps, VfioOpsError, CONFIG_REGION};

/// Capabilities live in the first 256 bytes; the rest is the extended space.
const STANDARD_SPACE: usize = 256;
const FIRST_CAPABILITY: usize = 0x40;
const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;
const HEADER_TYPE_MASK: u8 = 0x7f;
/// Minimum grant and maximum latency: read-only information, copied.
const MIN_GNT: usize = 0x3e;
/// 66 MHz capable, fast back-to-back capable, DEVSEL timing: read-only, copied.
const STATUS_INFO_BITS: u16 = 0x06a0;
/// Status bit 3: the function is asserting INTx.
const STATUS_INTERRUPT: u16 = 0x0008;

const PM_CAPABILITY_ID: u8 = 0x01;
const VENDOR_CAPABILITY_ID: u8 = 0x09;
const PCIE_CAPABILITY_ID: u8 = 0x10;
/// The capabilities a guest sees; everything else is hidden.
const ALLOWED_CAPABILITIES: [u8; 5] =
    [PM_CAPABILITY_ID, MSI_CAPABILITY_ID, VENDOR_CAPABILITY_ID, PCIE_CAPABILITY_ID, MSIX_CAPABILITY_ID];
const PM_CAPABILITY_LEN: usize = 8;
/// PCI Express capability lengths for an endpoint with a link, versions 1 and 2.
const PCIE_CAPABILITY_LEN_V1: usize = 20;
const PCIE_CAPABILITY_LEN_V2: usize = 60;
/// The PCI Express capabilities register: version in bits 3:0, device type in 7:4.
const PCIE_FLAGS_OFFSET: usize = 2;
const PCIE_VERSION_MASK: u16 = 0xf;
const PCIE_TYPE_MASK: u16 = 0xf0;
const PCIE_TYPE_ENDPOINT: u16 = 0x00;
const PCIE_TYPE_LEGACY_ENDPOINT: u16 = 0x10;
const PCIE_TYPE_RC_INTEGRATED: u16 = 0x90;
/// Link capabilities/control/status, and link capabilities 2/control 2/status 2.
const PCIE_LINK_REGISTERS: [Range<usize>; 2] = [0x0c..0x14, 0x2c..0x34];

const MSI_CONTROL_ENABLE: u16 = 1 << 0;
const MSI_CONTROL_CAPABLE_SHIFT: u16 = 1;
const MSI_CONTROL_ENABLED_MASK: u16 = 0x7 << 4;
const MSI_CONTROL_64BIT: u16 = 1 << 7;
const MSI_CONTROL_PER_VECTOR_MASKING: u16 = 1 << 8;
/// The bits of MSI control the device describes itself with.
const MSI_CONTROL_INFO: u16 = 0x7 << MSI_CONTROL_CAPABLE_SHIFT | MSI_CONTROL_64BIT | MSI_CONTROL_PER_VECTOR_MASKING;
const MSIX_CONTROL_TABLE_SIZE: u16 = 0x07ff;
const MSIX_CONTROL_WRITABLE: u16 = 0xc000;
const MSIX_TABLE_OFFSET: usize = 4;
const MSIX_PBA_OFFSET: usize = 8;
const MSIX_BIR_MASK: u32 = 0x7;

#[derive(Debug, thiserror::Error)]
pub enum VfioConfigError {
    #[error("the device's config region is {0} bytes; a PCI function has at least 256")]
    ConfigSize(u64),
    #[error("cannot read the device's config space: {0}")]
    Read(#[source] VfioOpsError),
    #[error("header type {0:#04x}: only type 0 functions (endpoints) can be passed through")]
    HeaderType(u8),
    #[error("BAR {index} ({size:#x} bytes per VFIO): {source}")]
    Bar {
        index: u8,
        size: u64,
        #[source]
        source: ConfigError,
    },
    #[error("capability {id:#04x} at {offset:#x} is cut short by the next one or the end of the space")]
    CapabilityOverlap { id: u8, offset: usize },
    #[error("the MSI-X {what} ({len:#x} bytes at {offset:#x} in BAR {bar}) is not inside a memory BAR of the device")]
    MsixLocation { what: &'static str, bar: u8, offset: u64, len: u64 },
    #[error("the MSI capability offers {0} vectors; MSI allows 1 to 32")]
    MsiVectors(u16),
}

/// The MSI-X capability as the device has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCapability {
    pub offset: usize,
    pub table_size: u16,
    pub layout: MsixLayout,
}

/// The MSI capability as the device has it: where its registers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiCapability {
    pub offset: usize,
    pub capable: u16,
    len: usize,
    data: usize,
    /// Per-vector mask register, if the device has per-vector masking.
    mask: Option<usize>,
    address_hi: Option<usize>,
}

impl MsiCapability {
    fn new(offset: usize, control: u16) -> Result<Self, VfioConfigError> {
        let capable = 1u16 << ((control >> MSI_CONTROL_CAPABLE_SHIFT) & 0x7);
        if capable > MAX_MSI_VECTORS {
            return Err(VfioConfigError::MsiVectors(capable));
        }
        let is64 = control & MSI_CONTROL_64BIT != 0;
        let address_hi = is64.then_some(8);
        let data = if is64 { 12 } else { 8 };
        let pvm = control & MSI_CONTROL_PER_VECTOR_MASKING != 0;
        // Data is 16 bits, then 2 reserved bytes before the mask and pending bits.
        let mask = pvm.then_some(data + 4);
        let len = if pvm { data + 12 } else { data + 2 };
        Ok(Self { offset, capable, len, data, mask, address_hi })
    }
}

/// What a guest config write asks of the rest of the device.
#[derive(Debug, Default)]
pub struct ConfigWrite {
    /// BARs whose decoding moved (see `crate::config`).
    pub bars: Vec<BarChange>,
    /// The MSI-X message control word, if the write touched it.
    pub msix_control: Option<u16>,
    /// The MSI capability in the layout `Msi::update` takes, if the write touched it.
    pub msi: Option<[u8; MSI_CAPABILITY_LEN]>,
    /// The command register as the guest left it, if the write touched it.
    pub command: Option<u16>,
    /// The first device access that failed.
    pub error: Option<VfioOpsError>,
}

/// The guest's view of a passthrough function's config space.
pub struct VfioConfig {
    shadow: PciConfiguration,
    /// Bytes of the standard space read from and written to the device.
    live: [bool; STANDARD_SPACE],
    msix: Option<MsixCapability>,
    msi: Option<MsiCapability>,
    /// The device's interrupt pin (1 to 4: INTA# to INTD#), if it has one.
    intx_pin: Option<u8>,
}

fn u16_at(dev: &[u8], offset: usize) -> u16 {
    dev.get(offset..offset + 2).map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(dev: &[u8], offset: usize) -> u32 {
    dev.get(offset..offset + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The capability list as the device links it: (offset, ID), in list order. A list
/// that loops or points into the header ends there.
fn device_capabilities(dev: &[u8; STANDARD_SPACE]) -> Vec<(usize, u8)> {
    let mut caps = Vec::new();
    if u16_at(dev, STATUS) & STATUS_CAP_LIST == 0 {
        return caps;
    }
    let mut seen = [false; STANDARD_SPACE / 4];
    let mut next = usize::from(dev[CAPABILITIES_POINTER] & !0x3);
    while next >= FIRST_CAPABILITY && !seen[next / 4] {
        seen[next / 4] = true;
        caps.push((next, dev[next]));
        next = usize::from(dev[next + 1] & !0x3);
    }
    caps
}

impl VfioConfig {
    /// Reads the device's config space and builds the guest's view of it.
    pub fn new(ops: &dyn VfioDeviceOps) -> Result<Self, VfioConfigError> {
        let size = ops.region(CONFIG_REGION).map_or(0, |r| r.size);
        if size < STANDARD_SPACE as u64 {
            return Err(VfioConfigError::ConfigSize(size));
        }
        let mut dev = [0u8; STANDARD_SPACE];
        ops.read_region(CONFIG_REGION, 0, &mut dev).map_err(VfioConfigError::Read)?;
        let header_type = dev[HEADER_TYPE];
        if header_type & HEADER_TYPE_MASK != 0 {
            return Err(VfioConfigError::HeaderType(header_type));
        }
        let mut shadow = PciConfiguration::new(&PciHeader {
            vendor_id: u16_at(&dev, VENDOR_ID),
            device_id: u16_at(&dev, DEVICE_ID),
            revision_id: dev[REVISION_ID],
            class: dev[CLASS_CODE + 2],
            subclass: dev[CLASS_CODE + 1],
            prog_if: dev[CLASS_CODE],
            subsystem_vendor_id: u16_at(&dev, SUBSYSTEM_VENDOR_ID),
            subsystem_id: u16_at(&dev, SUBSYSTEM_ID),
            // Until the VMM wires INTx (`show_interrupt_pin`), drivers see none and use
            // MSI or MSI-X.
            interrupt_pin: 0,
        });
        // The guest sees one function in this slot, whatever the host's slot holds.
        shadow.set_u8(HEADER_TYPE, header_type & !HEADER_TYPE_MULTIFUNCTION);
        shadow.set_u16(STATUS, u16_at(&dev, STATUS) & STATUS_INFO_BITS);
        shadow.set_bytes(MIN_GNT, &dev[MIN_GNT..MIN_GNT + 2]);
        add_bars(&mut shadow, ops, &dev)?;

        // vfio-pci shows pin 0 for a function whose INTx it does not offer; anything
        // above 4 is no pin either.
        let intx_pin = Some(dev[INTERRUPT_PIN]).filter(|pin| (1..=4).contains(pin));
        let mut config = Self { shadow, live: [false; STANDARD_SPACE], msix: None, msi: None, intx_pin };
        config.add_capabilities(&dev)?;
        config.check_msix_location()?;
        Ok(config)
    }

    /// Relinks the allowed capabilities and sets each one's policy.
    fn add_capabilities(&mut self, dev: &[u8; STANDARD_SPACE]) -> Result<(), VfioConfigError> {
        let caps = device_capabilities(dev);
        let mut starts: Vec<usize> = caps.iter().map(|c| c.0).collect();
        starts.sort_unstable();
        // How far a capability can reach: up to the next one in the space, or its end.
        let room = |offset: usize| starts.iter().find(|&&s| s > offset).map_or(STANDARD_SPACE, |&s| s) - offset;
        let kept: Vec<(usize, u8)> = caps.into_iter().filter(|(_, id)| ALLOWED_CAPABILITIES.contains(id)).collect();

        // Offsets are below 256: they fit in the byte-wide pointers.
        self.shadow.set_u8(CAPABILITIES_POINTER, kept.first().map_or(0, |c| c.0 as u8));
        for (i, &(offset, id)) in kept.iter().enumerate() {
            let next = kept.get(i + 1).map_or(0, |c| c.0 as u8);
            self.shadow.set_bytes(offset, &[id, next]);
            let room = room(offset);
            match id {
                MSIX_CAPABILITY_ID => self.add_msix(dev, offset, room)?,
                MSI_CAPABILITY_ID => self.add_msi(dev, offset, room)?,
                PCIE_CAPABILITY_ID => self.add_pcie(dev, offset, room),
                PM_CAPABILITY_ID => self.set_live(offset + 2..offset + PM_CAPABILITY_LEN.min(room), true),
                // VENDOR_CAPABILITY_ID: its third byte is its length.
                _ => self.set_live(offset + 2..offset + usize::from(dev[offset + 2]).min(room), true),
            }
        }
        if !kept.is_empty() {
            self.shadow.set_status_bits(STATUS_CAP_LIST);
        }
        Ok(())
    }

    /// Marks `range` live (passed through) or emulated; an empty range marks nothing.
    fn set_live(&mut self, range: Range<usize>, live: bool) {
        for byte in self.live.iter_mut().take(range.end).skip(range.start) {
            *byte = live;
        }
    }

    fn add_msix(&mut self, dev: &[u8; STANDARD_SPACE], offset: usize, room: usize) -> Result<(), VfioConfigError> {
        if room < MSIX_CAPABILITY_LEN {
            return Err(VfioConfigError::CapabilityOverlap { id: MSIX_CAPABILITY_ID, offset });
        }
        let control = u16_at(dev, offset + MSIX_CONTROL_OFFSET) & MSIX_CONTROL_TABLE_SIZE;
        let table = u32_at(dev, offset + MSIX_TABLE_OFFSET);
        let pba = u32_at(dev, offset + MSIX_PBA_OFFSET);
        self.shadow.set_u16(offset + MSIX_CONTROL_OFFSET, control);
        self.shadow.set_writable(offset + MSIX_CONTROL_OFFSET, &MSIX_CONTROL_WRITABLE.to_le_bytes());
        self.shadow.set_u32(offset + MSIX_TABLE_OFFSET, table);
        self.shadow.set_u32(offset + MSIX_PBA_OFFSET, pba);
        let layout = MsixLayout {
            table_bar: (table & MSIX_BIR_MASK) as u8,
            table_offset: table & !MSIX_BIR_MASK,
            pba_bar: (pba & MSIX_BIR_MASK) as u8,
            pba_offset: pba & !MSIX_BIR_MASK,
        };
        self.msix = Some(MsixCapability { offset, table_size: control + 1, layout });
        Ok(())
    }

    fn add_msi(&mut self, dev: &[u8; STANDARD_SPACE], offset: usize, room: usize) -> Result<(), VfioConfigError> {
        let control = u16_at(dev, offset + MSI_CONTROL_OFFSET) & MSI_CONTROL_INFO;
        let msi = MsiCapability::new(offset, control)?;
        if room < msi.len {
            return Err(VfioConfigError::CapabilityOverlap { id: MSI_CAPABILITY_ID, offset });
        }
        // Off, nothing programmed: the state after reset, whatever the device showed.
        self.shadow.set_u16(offset + MSI_CONTROL_OFFSET, control);
        let writable_control = MSI_CONTROL_ENABLE | MSI_CONTROL_ENABLED_MASK;
        self.shadow.set_writable(offset + MSI_CONTROL_OFFSET, &writable_control.to_le_bytes());
        self.shadow.set_writable(offset + MSI_ADDRESS_LO_OFFSET, &0xffff_fffcu32.to_le_bytes());
        if let Some(hi) = msi.address_hi {
            self.shadow.set_writable(offset + hi, &u32::MAX.to_le_bytes());
        }
        self.shadow.set_writable(offset + msi.data, &0xffffu16.to_le_bytes());
        if let Some(mask) = msi.mask {
            let bits = u32::MAX >> (32 - u32::from(msi.capable));
            self.shadow.set_writable(offset + mask, &bits.to_le_bytes());
        }
        self.msi = Some(msi);
        Ok(())
    }

    fn add_pcie(&mut self, dev: &[u8; STANDARD_SPACE], offset: usize, room: usize) {
        let flags = u16_at(dev, offset + PCIE_FLAGS_OFFSET);
        let len = if flags & PCIE_VERSION_MASK >= 2 { PCIE_CAPABILITY_LEN_V2 } else { PCIE_CAPABILITY_LEN_V1 };
        let len = len.min(room);
        self.set_live(offset + 2..offset + len, true);
        let device_type = flags & PCIE_TYPE_MASK;
        if device_type != PCIE_TYPE_ENDPOINT && device_type != PCIE_TYPE_LEGACY_ENDPOINT {
            return;
        }
        let flags_at = offset + PCIE_FLAGS_OFFSET;
        self.set_live(flags_at..flags_at + 2, false);
        self.shadow.set_u16(flags_at, (flags & !PCIE_TYPE_MASK) | PCIE_TYPE_RC_INTEGRATED);
        for regs in PCIE_LINK_REGISTERS {
            // They read 0: the shadow holds nothing there.
            self.set_live(offset + regs.start..offset + regs.end.min(len), false);
        }
    }

    /// The table and PBA must lie inside memory BARs the guest sees, or the guest's
    /// accesses to them would never reach the emulation.
    fn check_msix_location(&self) -> Result<(), VfioConfigError> {
        let Some(msix) = &self.msix else { return Ok(()) };
        let l = &msix.layout;
        let table_len = crate::msix::table_len(msix.table_size);
        let pba_len = crate::msix::pba_len(msix.table_size);
        for (what, bar, offset, len) in
            [("table", l.table_bar, l.table_offset, table_len), ("PBA", l.pba_bar, l.pba_offset, pba_len)]
        {
            let offset = u64::from(offset);
            let fits = self.shadow.bar_spec(bar).is_some_and(|spec| {
                spec.kind != BarKind::Io && offset.checked_add(len).is_some_and(|end| end <= spec.size)
            });
            if !fits {
                return Err(VfioConfigError::MsixLocation { what, bar, offset, len });
            }
        }
        Ok(())
    }

    pub fn msix(&self) -> Option<MsixCapability> {
        self.msix
    }

    pub fn msi(&self) -> Option<MsiCapability> {
        self.msi
    }

    /// The device's interrupt pin, 1 to 4, if it has one.
    pub fn intx_pin(&self) -> Option<u8> {
        self.intx_pin
    }

    /// Shows the guest the device's interrupt pin: its INTx is wired.
    pub fn show_interrupt_pin(&mut self) {
        if let Some(pin) = self.intx_pin {
            self.shadow.set_u8(INTERRUPT_PIN, pin);
        }
    }

    pub fn bars(&self) -> Vec<BarSpec> {
        self.shadow.bars()
    }

    pub fn bar_address(&self, index: u8) -> Option<u64> {
        self.shadow.bar_address(index)
    }

    /// Programs a BAR as firmware would (see `PciConfiguration::set_bar_address`); the
    /// caller then mirrors the command register with [`push_command`](Self::push_command).
    pub fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), ConfigError> {
        self.shadow.set_bar_address(index, addr)
    }

    /// Writes the guest's command register to the device: memory and I/O decoding
    /// and bus mastering follow the guest (vfio-pci refuses BAR accesses and faults
    /// the BAR mappings while the device's memory decoding is off).
    pub fn push_command(&self, ops: &dyn VfioDeviceOps) -> Result<(), VfioOpsError> {
        ops.write_region(CONFIG_REGION, COMMAND as u64, &self.shadow.command().to_le_bytes())
    }

    /// The live bytes of an access covering `range`, as runs of adjacent bytes.
    fn live_runs(&self, range: Range<usize>) -> Vec<Range<usize>> {
        let mut runs: Vec<Range<usize>> = Vec::new();
        for i in range.filter(|&i| self.live.get(i).copied().unwrap_or(false)) {
            match runs.last_mut() {
                Some(run) if run.end == i => run.end += 1,
                _ => runs.push(i..i + 1),
            }
        }
        runs
    }

    /// A guest read. Bytes the device failed to give read all-ones; the first
    /// failure is returned for the caller to report.
    pub fn read(&self, ops: &dyn VfioDeviceOps, offset: u64, data: &mut [u8]) -> Result<(), VfioOpsError> {
        self.shadow.read(offset, data);
        let Some(range) = access_range(offset, data.len()) else { return Ok(()) };
        let mut result = Ok(());
        for run in self.live_runs(range.clone()) {
            let Some(buf) = data.get_mut(run.start - range.start..run.end - range.start) else { continue };
            if let Err(e) = ops.read_region(CONFIG_REGION, run.start as u64, buf) {
                buf.fill(0xff);
                result = result.and(Err(e));
            }
        }
        if ranges_overlap(offset, data.len() as u64, STATUS as u64, 2) {
            let mut live = [0; 2];
            match ops.read_region(CONFIG_REGION, STATUS as u64, &mut live) {
                Ok(()) => {
                    // The error bits and INTx's Interrupt Status are the device's own: a
                    // shared-line handler (pci_check_and_mask_intx) reads the latter.
                    let live_bits = STATUS_WRITE_1_TO_CLEAR | STATUS_INTERRUPT;
                    let errors = u16::from_le_bytes(live) & live_bits;
                    let status = self.shadow.status() & !live_bits | errors;
                    overlay(offset, data, STATUS as u64, &status.to_le_bytes());
                }
                Err(e) => result = result.and(Err(e)),
            }
        }
        result
    }

    /// A guest write: the shadow takes it under its masks, live bytes go to the device.
    pub fn write(&mut self, ops: &dyn VfioDeviceOps, offset: u64, data: &[u8]) -> ConfigWrite {
        let mut out = ConfigWrite::default();
        let Some(range) = access_range(offset, data.len()) else { return out };
        let mut note = |r: Result<(), VfioOpsError>| {
            if let Err(e) = r {
                out.error.get_or_insert(e);
            }
        };
        let bars = self.shadow.write(offset, data);
        let mut command = None;
        for run in self.live_runs(range.clone()) {
            if let Some(bytes) = data.get(run.start - range.start..run.end - range.start) {
                note(ops.write_region(CONFIG_REGION, run.start as u64, bytes));
            }
        }
        let len = data.len() as u64;
        if ranges_overlap(offset, len, COMMAND as u64, 2) {
            note(self.push_command(ops));
            command = Some(self.shadow.command());
        }
        if ranges_overlap(offset, len, STATUS as u64, 2) {
            // Only the error bits the guest writes 1 to, so the device clears just those.
            let mut written = [0; 2];
            for (i, &byte) in range.clone().zip(data) {
                if let Some(slot) = i.checked_sub(STATUS).and_then(|k| written.get_mut(k)) {
                    *slot = byte;
                }
            }
            let clear = u16::from_le_bytes(written) & STATUS_WRITE_1_TO_CLEAR;
            if clear != 0 {
                note(ops.write_region(CONFIG_REGION, STATUS as u64, &clear.to_le_bytes()));
            }
        }
        out.bars = bars;
        out.command = command;
        if let Some(msix) = self.msix {
            let control = msix.offset + MSIX_CONTROL_OFFSET;
            if ranges_overlap(offset, len, control as u64, 2) {
                out.msix_control = Some(self.shadow.read_u16(control));
            }
        }
        if let Some(msi) = self.msi {
            if ranges_overlap(offset, len, msi.offset as u64, msi.len as u64) {
                out.msi = Some(self.msi_registers(&msi));
            }
        }
        out
    }

    /// The MSI registers in the layout `Msi::update` takes, whatever the device's.
    fn msi_registers(&self, msi: &MsiCapability) -> [u8; MSI_CAPABILITY_LEN] {
        let mut regs = [0; MSI_CAPABILITY_LEN];
        let at = msi.offset;
        let mut put = |to: usize, bytes: &[u8]| {
            if let Some(dst) = regs.get_mut(to..to + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        };
        put(MSI_CONTROL_OFFSET, &self.shadow.read_u16(at + MSI_CONTROL_OFFSET).to_le_bytes());
        put(MSI_ADDRESS_LO_OFFSET, &self.shadow.read_u32(at + MSI_ADDRESS_LO_OFFSET).to_le_bytes());
        if let Some(hi) = msi.address_hi {
            put(MSI_ADDRESS_HI_OFFSET, &self.shadow.read_u32(at + hi).to_le_bytes());
        }
        put(MSI_DATA_OFFSET, &self.shadow.read_u16(at + msi.data).to_le_bytes());
        if let Some(mask) = msi.mask {
            put(MSI_MASK_OFFSET, &self.shadow.read_u32(at + mask).to_le_bytes());
        }
        regs
    }
}

/// Registers the device's memory BARs: sizes from VFIO, kind and prefetch from the BAR's
/// low bits (which vfio-pci shows even for a VF, whose own BAR registers read 0).
fn add_bars(
    shadow: &mut PciConfiguration,
    ops: &dyn VfioDeviceOps,
    dev: &[u8; STANDARD_SPACE],
) -> Result<(), VfioConfigError> {
    let mut index = 0;
    while index < NUM_BARS {
        let low = u32_at(dev, BAR0 + 4 * index);
        let kind = if low & 0x1 != 0 {
            BarKind::Io
        } else if low & 0x6 == 0x4 {
            BarKind::Memory64
        } else {
            BarKind::Memory32
        };
        // At most NUM_BARS - 1.
        let bar = index as u8;
        let size = ops.region(u32::from(bar)).map_or(0, |r| r.size);
        // I/O BARs are not offered to the guest (the BAR reads 0): Tandem's guests have no
        // I/O window, and the drivers of devices that carry one (igb, e1000e) use MMIO.
        if size != 0 && kind != BarKind::Io {
            let spec = BarSpec { index: bar, size, kind, prefetchable: low & 0x8 != 0 };
            shadow.add_bar(spec).map_err(|source| VfioConfigError::Bar { index: bar, size, source })?;
        }
        index += if kind == BarKind::Memory64 { 2 } else { 1 };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::fake::{FakeVfio, MSIX_CAP};
    use super::*;

    #[test]
    fn a_looping_or_stray_capability_list_ends() {
        let mut dev = [0u8; STANDARD_SPACE];
        dev[STATUS] = STATUS_CAP_LIST as u8;
        dev[CAPABILITIES_POINTER] = 0x43;
        dev[0x40] = 0x05;
        dev[0x41] = 0x80;
        dev[0x80] = 0x11;
        dev[0x81] = 0x42;
        assert_eq!(device_capabilities(&dev), vec![(0x40, 0x05), (0x80, 0x11)]);
        dev[0x81] = 0x20;
        assert_eq!(device_capabilities(&dev).len(), 2, "pointers into the header end the list");
        dev[STATUS] = 0;
        assert!(device_capabilities(&dev).is_empty());
    }

    #[test]
    fn msi_layouts_follow_the_control_bits() {
        let pvm64 = MsiCapability::new(0x50, MSI_CONTROL_64BIT | MSI_CONTROL_PER_VECTOR_MASKING | 5 << 1).unwrap();
        assert_eq!(
            (pvm64.capable, pvm64.len, pvm64.data, pvm64.mask, pvm64.address_hi),
            (32, 24, 12, Some(16), Some(8))
        );
        let pvm32 = MsiCapability::new(0x50, MSI_CONTROL_PER_VECTOR_MASKING).unwrap();
        assert_eq!((pvm32.capable, pvm32.len, pvm32.data, pvm32.mask, pvm32.address_hi), (1, 20, 8, Some(12), None));
        let plain64 = MsiCapability::new(0x50, MSI_CONTROL_64BIT | 1 << 1).unwrap();
        assert_eq!((plain64.capable, plain64.len, plain64.mask), (2, 14, None));
        assert!(matches!(MsiCapability::new(0x50, 6 << 1), Err(VfioConfigError::MsiVectors(64))));
    }

    #[test]
    fn msi_with_masking_translates_every_register() {
        let fake = FakeVfio::igbvf();
        fake.set_config(MSIX_CAP + 1, &[0x50]);
        // 64-bit, per-vector masking, 2 vectors.
        fake.set_config(0x50, &[0x05, 0xa0, 0x82, 0x01]);
        let mut config = VfioConfig::new(&fake).unwrap();
        config.write(&fake, 0x54, &0xfee0_1000u32.to_le_bytes());
        config.write(&fake, 0x58, &0x1u32.to_le_bytes());
        config.write(&fake, 0x5c, &0xffff_0041u32.to_le_bytes());
        let write = config.write(&fake, 0x60, &u32::MAX.to_le_bytes());
        let mut regs = [0u8; MSI_CAPABILITY_LEN];
        regs[2..4].copy_from_slice(&0x0182u16.to_le_bytes());
        regs[4..8].copy_from_slice(&0xfee0_1000u32.to_le_bytes());
        regs[8..12].copy_from_slice(&1u32.to_le_bytes());
        regs[12..14].copy_from_slice(&0x41u16.to_le_bytes());
        regs[16..20].copy_from_slice(&0b11u32.to_le_bytes());
        assert_eq!(write.msi, Some(regs));
        assert!(write.msix_control.is_none() && write.bars.is_empty() && write.error.is_none());
        // The pending bits are read-only; the device never saw any of this.
        config.write(&fake, 0x64, &u32::MAX.to_le_bytes());
        let mut pending = [0; 4];
        config.read(&fake, 0x64, &mut pending).unwrap();
        assert_eq!(pending, [0; 4]);
        assert!(fake.take_calls().is_empty());
    }

    #[test]
    fn a_truncated_msix_capability_is_refused() {
        let fake = FakeVfio::igbvf();
        fake.set_config(0x34, &[0xf8]);
        fake.set_config(0xf8, &[0x11, 0x00, 0x02, 0x00, 0x03, 0x00, 0x00, 0x00]);
        assert!(matches!(
            VfioConfig::new(&fake),
            Err(VfioConfigError::CapabilityOverlap { id: MSIX_CAPABILITY_ID, offset: 0xf8 })
        ));
    }
}
