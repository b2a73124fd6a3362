//! The configuration space of one PCI function: the type 0 header, its BARs and the
//! capability list.
//!
//! Every byte of the 4 KiB space has a value, a writable mask and a write-1-to-clear
//! mask, so a guest write is one rule applied byte by byte: read-only bits keep their
//! value, writable bits take the written one, RW1C bits clear where a 1 is written.
//! The BAR sizing protocol falls out of the masks: the address bits below a BAR's size
//! are read-only zero, so writing all-ones reads back the size mask. BAR
//! registration, programming and decoding are in the `bar` submodule.

mod bar;

use std::ops::Range;

use bar::Bar;
pub use bar::{BarChange, BarKind, BarSpec};

/// Bytes of configuration space per function (PCI Express extended space included).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Conventional PCI capabilities must live in the first 256 bytes.
const STANDARD_SPACE_SIZE: usize = 256;
/// The widest access a CPU makes (ECAM reached with a 64-bit move).
const MAX_ACCESS_WIDTH: usize = 8;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
pub const CLASS_CODE: usize = 0x09;
pub const CACHE_LINE_SIZE: usize = 0x0c;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const EXPANSION_ROM: usize = 0x30;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;
/// Capabilities are placed from here on, right after the type 0 header.
const FIRST_CAPABILITY: usize = 0x40;

pub const NUM_BARS: usize = 6;

pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_PARITY_ERROR_RESPONSE: u16 = 1 << 6;
const COMMAND_SERR: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const COMMAND_WRITABLE: u16 = COMMAND_IO_SPACE
    | COMMAND_MEMORY_SPACE
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_ERROR_RESPONSE
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;

pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Master data parity error, signaled/received target abort, received master abort,
/// signaled system error, detected parity error: the error bits software clears by
/// writing 1.
pub const STATUS_WRITE_1_TO_CLEAR: u16 = 0xf900;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR index {0} is out of range (a type 0 header has BARs 0 to 5)")]
    BarIndex(u8),
    #[error("a 64-bit BAR needs two registers; BAR {0} is the last one")]
    Bar64AtEnd(u8),
    #[error("BAR {index} of {size:#x} bytes is not a power of two between {min:#x} and {max:#x} bytes")]
    BarSize { index: u8, size: u64, min: u64, max: u64 },
    #[error("BAR register {0} is already used by another BAR")]
    BarInUse(u8),
    #[error("BAR {0} was never registered")]
    BarNotRegistered(u8),
    #[error("address {addr:#x} for BAR {index} is not aligned to its size {size:#x}")]
    BarAlignment { index: u8, addr: u64, size: u64 },
    #[error(
        "address {addr:#x} for BAR {index} ({size:#x} bytes) is zero, beyond what the BAR can hold, or sets all of \
         its address bits (the sizing pattern, never decoded)"
    )]
    BarAddress { index: u8, addr: u64, size: u64 },
    #[error("capability {id:#04x} of {len} bytes does not fit in the 256-byte standard configuration space")]
    CapabilitySpace { id: u8, len: usize },
    #[error("capability {id:#04x}: writable mask has {mask_len} bytes for a body of {body_len}")]
    CapabilityMask { id: u8, body_len: usize, mask_len: usize },
}

/// The identity a function presents in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// 0 for no INTx pin, 1..=4 for INTA#..INTD#.
    pub interrupt_pin: u8,
}

/// The config space of one function. See the module documentation for the rules.
pub struct PciConfiguration {
    bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    writable: Box<[u8; CONFIG_SPACE_SIZE]>,
    write_1_to_clear: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: [Option<Bar>; NUM_BARS],
    /// Register indices taken by the upper half of a 64-bit BAR.
    bar_upper_halves: [bool; NUM_BARS],
    last_capability: Option<usize>,
    next_capability: usize,
}

/// The byte range an access of `len` bytes at `offset` covers, if it is one a CPU can
/// make and lies inside the config space.
pub fn access_range(offset: u64, len: usize) -> Option<Range<usize>> {
    if len == 0 || len > MAX_ACCESS_WIDTH {
        return None;
    }
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(len)?;
    (end <= CONFIG_SPACE_SIZE).then_some(start..end)
}

/// Whether `[a, a + a_len)` and `[b, b + b_len)` share a byte.
pub fn ranges_overlap(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// Copies into `data` (a read of `data.len()` bytes at `read_offset`) the bytes of
/// `field` (a register at `field_offset`) that the read covers: for registers whose
/// live value is kept outside the config space, such as MSI pending bits.
pub fn overlay(read_offset: u64, data: &mut [u8], field_offset: u64, field: &[u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        let Some(at) = read_offset.checked_add(i as u64) else { return };
        if let Some(&b) = at.checked_sub(field_offset).and_then(|k| field.get(usize::try_from(k).ok()?)) {
            *byte = b;
        }
    }
}

impl PciConfiguration {
    pub fn new(header: &PciHeader) -> Self {
        let mut config = Self {
            bytes: Box::new([0; CONFIG_SPACE_SIZE]),
            writable: Box::new([0; CONFIG_SPACE_SIZE]),
            write_1_to_clear: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: [None; NUM_BARS],
            bar_upper_halves: [false; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        config.set_u16(VENDOR_ID, header.vendor_id);
        config.set_u16(DEVICE_ID, header.device_id);
        config.set_u8(REVISION_ID, header.revision_id);
        config.set_u8(CLASS_CODE, header.prog_if);
        config.set_u8(CLASS_CODE + 1, header.subclass);
        config.set_u8(CLASS_CODE + 2, header.class);
        config.set_u16(SUBSYSTEM_VENDOR_ID, header.subsystem_vendor_id);
        config.set_u16(SUBSYSTEM_ID, header.subsystem_id);
        config.set_u8(INTERRUPT_PIN, header.interrupt_pin);
        config.set_writable(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        config.set_write_1_to_clear(STATUS, &STATUS_WRITE_1_TO_CLEAR.to_le_bytes());
        // Software stores its cache line size and the IRQ it routed; neither changes
        // how an emulated device behaves.
        config.set_writable(CACHE_LINE_SIZE, &[0xff]);
        config.set_writable(INTERRUPT_LINE, &[0xff]);
        config
    }

    /// A guest read. Accesses outside the space, or wider than a CPU makes, read all-ones.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        match access_range(offset, data.len()).and_then(|r| self.bytes.get(r)) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0xff),
        }
    }

    /// A guest write, under the writable and RW1C masks. Returns how the write moved
    /// BARs (usually nothing). Accesses outside the space are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Vec<BarChange> {
        let Some(range) = access_range(offset, data.len()) else {
            return Vec::new();
        };
        for (i, &value) in range.clone().zip(data) {
            if let (Some(byte), Some(&writable), Some(&w1c)) =
                (self.bytes.get_mut(i), self.writable.get(i), self.write_1_to_clear.get(i))
            {
                *byte = ((*byte & !writable) | (value & writable)) & !(value & w1c);
            }
        }
        let touches_decoding = ranges_overlap(offset, data.len() as u64, COMMAND as u64, 2)
            || ranges_overlap(offset, data.len() as u64, BAR0 as u64, 4 * NUM_BARS as u64);
        if touches_decoding {
            self.update_decoding()
        } else {
            Vec::new()
        }
    }

    pub fn read_u8(&self, offset: usize) -> u8 {
        self.bytes.get(offset).copied().unwrap_or(0xff)
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0; 2];
        self.read(offset as u64, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0; 4];
        self.read(offset as u64, &mut b);
        u32::from_le_bytes(b)
    }

    /// A device-side store: sets bytes regardless of the guest's masks (status bits,
    /// registers the device updates). Bytes outside the space are dropped.
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        if let Some(dst) = offset.checked_add(data.len()).and_then(|end| self.bytes.get_mut(offset..end)) {
            dst.copy_from_slice(data);
        }
    }

    pub fn set_u8(&mut self, offset: usize, value: u8) {
        self.set_bytes(offset, &[value]);
    }

    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Sets which bits of the bytes at `offset` the guest may write.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        if let Some(dst) = offset.checked_add(mask.len()).and_then(|end| self.writable.get_mut(offset..end)) {
            dst.copy_from_slice(mask);
        }
    }

    fn set_write_1_to_clear(&mut self, offset: usize, mask: &[u8]) {
        if let Some(dst) = offset.checked_add(mask.len()).and_then(|end| self.write_1_to_clear.get_mut(offset..end)) {
            dst.copy_from_slice(mask);
        }
    }

    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    pub fn status(&self) -> u16 {
        self.read_u16(STATUS)
    }

    /// Raises status bits (error bits the guest later clears by writing 1).
    pub fn set_status_bits(&mut self, bits: u16) {
        let status = self.status() | bits;
        self.set_u16(STATUS, status);
    }

    /// Appends a capability: `id`, then the next pointer (filled in here), then `body`
    /// with `writable` as its guest-writable mask. Returns the capability's offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> Result<usize, ConfigError> {
        if writable.len() != body.len() {
            return Err(ConfigError::CapabilityMask { id, body_len: body.len(), mask_len: writable.len() });
        }
        let offset = self.next_capability;
        let len = 2 + body.len();
        let end = offset + len;
        if end > STANDARD_SPACE_SIZE {
            return Err(ConfigError::CapabilitySpace { id, len });
        }
        self.set_bytes(offset, &[id, 0]);
        self.set_bytes(offset + 2, body);
        self.set_writable(offset + 2, writable);
        // Offsets fit in a byte: they are below STANDARD_SPACE_SIZE.
        match self.last_capability {
            Some(last) => self.set_u8(last + 1, offset as u8),
            None => self.set_u8(CAPABILITIES_POINTER, offset as u8),
        }
        self.set_status_bits(STATUS_CAP_LIST);
        self.last_capability = Some(offset);
        // The next capability starts dword-aligned (the pointer's low bits are reserved).
        self.next_capability = (end + 3) & !3;
        Ok(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            revision_id: 1,
            class: 0x02,
            subclass: 0x00,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            interrupt_pin: 0,
        }
    }

    fn write_u32(c: &mut PciConfiguration, offset: usize, v: u32) -> Vec<BarChange> {
        c.write(offset as u64, &v.to_le_bytes())
    }

    #[test]
    fn header_fields_are_read_only() {
        let mut c = PciConfiguration::new(&header());
        assert_eq!(c.read_u32(VENDOR_ID), 0x1041_1af4);
        assert_eq!(c.read_u32(REVISION_ID), 0x0200_0001);
        write_u32(&mut c, VENDOR_ID, 0xdead_beef);
        c.write(REVISION_ID as u64, &[0x55]);
        c.write(SUBSYSTEM_ID as u64, &[0, 0]);
        assert_eq!(c.read_u32(VENDOR_ID), 0x1041_1af4);
        assert_eq!(c.read_u8(REVISION_ID), 1);
        assert_eq!(c.read_u16(SUBSYSTEM_ID), 0x1100);
    }

    #[test]
    fn command_keeps_only_writable_bits() {
        let mut c = PciConfiguration::new(&header());
        c.write(COMMAND as u64, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), COMMAND_WRITABLE);
        c.write(COMMAND as u64, &[0]);
        assert_eq!(c.command(), COMMAND_WRITABLE & 0xff00);
    }

    #[test]
    fn status_error_bits_clear_on_write_one() {
        let mut c = PciConfiguration::new(&header());
        c.add_capability(0x09, &[0, 0], &[0, 0]).unwrap();
        c.set_status_bits(0x8000 | 0x1000);
        // Writing zeroes changes nothing; writing 1 clears only that bit; CAP_LIST stays.
        c.write(STATUS as u64, &[0, 0]);
        assert_eq!(c.status(), 0x9000 | STATUS_CAP_LIST);
        c.write(STATUS as u64, &0x1010u16.to_le_bytes());
        assert_eq!(c.status(), 0x8000 | STATUS_CAP_LIST);
        // A 32-bit write of the command dword with status all-ones clears all errors.
        write_u32(&mut c, COMMAND, 0xffff_0000);
        assert_eq!(c.status(), STATUS_CAP_LIST);
        assert_eq!(c.command(), 0);
    }

    #[test]
    fn interrupt_line_writable_pin_not() {
        let mut c = PciConfiguration::new(&PciHeader { interrupt_pin: 1, ..header() });
        c.write(INTERRUPT_LINE as u64, &[10, 4]);
        assert_eq!(c.read_u8(INTERRUPT_LINE), 10);
        assert_eq!(c.read_u8(INTERRUPT_PIN), 1);
    }

    #[test]
    fn absent_rom_reads_zero() {
        let mut c = PciConfiguration::new(&header());
        write_u32(&mut c, EXPANSION_ROM, 0xffff_ffff);
        assert_eq!(c.read_u32(EXPANSION_ROM), 0);
    }

    #[test]
    fn capability_chain_walks() {
        let mut c = PciConfiguration::new(&header());
        assert_eq!(c.status() & STATUS_CAP_LIST, 0);
        let a = c.add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        let b = c.add_capability(0x09, &[7], &[0]).unwrap();
        let d = c.add_capability(0x05, &[0; 22], &[0; 22]).unwrap();
        assert_eq!(c.status() & STATUS_CAP_LIST, STATUS_CAP_LIST);
        let mut walked = Vec::new();
        let mut next = usize::from(c.read_u8(CAPABILITIES_POINTER));
        while next != 0 {
            walked.push((next, c.read_u8(next)));
            next = usize::from(c.read_u8(next + 1));
        }
        assert_eq!(walked, vec![(a, 0x11), (b, 0x09), (d, 0x05)]);
        assert_eq!((a, b % 4, d % 4), (0x40, 0, 0));
        // Only the writable body byte takes a write; the header never does.
        c.write(a as u64, &[0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(c.read_u32(a), u32::from_le_bytes([0x11, b as u8, 0xcc, 2]));
        assert!(matches!(c.add_capability(0x10, &[0; 200], &[0; 200]), Err(ConfigError::CapabilitySpace { .. })));
        assert!(matches!(c.add_capability(0x10, &[0; 2], &[0; 1]), Err(ConfigError::CapabilityMask { .. })));
    }

    #[test]
    fn overlay_copies_the_covered_bytes() {
        let mut data = [0u8; 4];
        overlay(0x50, &mut data, 0x52, &[1, 2, 3, 4]);
        assert_eq!(data, [0, 0, 1, 2]);
        overlay(0x55, &mut data, 0x52, &[1, 2, 3, 4]);
        assert_eq!(data, [4, 0, 1, 2]);
        overlay(u64::MAX - 1, &mut data, 0, &[9; 4]);
        assert_eq!(data, [4, 0, 1, 2]);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let mut c = PciConfiguration::new(&header());
        let mut four = [0u8; 4];
        c.read(4094, &mut four);
        assert_eq!(four, [0xff; 4]);
        c.read(u64::MAX, &mut four);
        assert_eq!(four, [0xff; 4]);
        let mut wide = [0u8; 16];
        c.read(0, &mut wide);
        assert_eq!(wide, [0xff; 16]);
        c.read(0, &mut []);
        assert!(c.write(4094, &[0xff; 4]).is_empty());
        assert!(c.write(u64::MAX - 1, &[0xff; 4]).is_empty());
        assert!(c.write(COMMAND as u64, &[0xff; 16]).is_empty());
        assert!(c.write(0, &[]).is_empty());
        assert_eq!(c.command(), 0);
        // An unaligned access inside the space is served byte by byte.
        c.read(1, &mut four);
        assert_eq!(four, [0x1a, 0x41, 0x10, 0x00]);
        assert_eq!(c.read_u32(4095), 0xffff_ffff);
        c.set_bytes(4095, &[1, 2]);
        c.set_writable(usize::MAX, &[1]);
    }
}
