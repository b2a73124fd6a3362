//! The base address registers of a type 0 header.
//!
//! A BAR is *decoded* at an address when the command register enables its kind of
//! space and its register holds a usable address (not zero, not the all-ones sizing
//! pattern). A config write that changes where any BAR is decoded returns a
//! [`BarChange`] per affected BAR; the device manager moves the BAR's bus range (and
//! ioeventfds, and for passthrough the memory slot) accordingly. This follows what
//! hardware does: Linux turns decoding off while it sizes BARs and while it rewrites a
//! 64-bit BAR one half at a time, so the half-written address is never decoded.

use super::*;

const BAR_IO_FLAG: u32 = 0x1;
const BAR_MEM_64BIT_FLAG: u32 = 0x4;
const BAR_MEM_PREFETCHABLE_FLAG: u32 = 0x8;

/// I/O BARs are 4 to 256 bytes (PCI Local Bus 3.0, 6.2.5.1); x86 ports are 16-bit.
const IO_BAR_MIN: u64 = 4;
const IO_BAR_MAX: u64 = 256;
const IO_SPACE_END: u64 = 0x1_0000;
const MEM_BAR_MIN: u64 = 16;
const MEM32_BAR_MAX: u64 = 1 << 31;
const MEM64_BAR_MAX: u64 = 1 << 63;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Memory32,
    Memory64,
}

/// A BAR a device asks for; the device manager picks its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    pub index: u8,
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

/// Where a BAR is decoded changed: `old` and `new` are the guest addresses it was and
/// now is decoded at, `None` when it was or is not decoded at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarChange {
    pub index: u8,
    pub kind: BarKind,
    pub size: u64,
    pub old: Option<u64>,
    pub new: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Bar {
    pub(super) spec: BarSpec,
    /// Where the device manager was last told (or told us) the BAR is decoded.
    pub(super) decoded: Option<u64>,
}

impl PciConfiguration {
    /// Registers a BAR. Its address reads as zero and it is not decoded until
    /// [`set_bar_address`](Self::set_bar_address) or the guest programs it.
    pub fn add_bar(&mut self, spec: BarSpec) -> Result<(), ConfigError> {
        let index = usize::from(spec.index);
        if index >= NUM_BARS {
            return Err(ConfigError::BarIndex(spec.index));
        }
        let (min, max) = match spec.kind {
            BarKind::Io => (IO_BAR_MIN, IO_BAR_MAX),
            BarKind::Memory32 => (MEM_BAR_MIN, MEM32_BAR_MAX),
            BarKind::Memory64 => (MEM_BAR_MIN, MEM64_BAR_MAX),
        };
        if !spec.size.is_power_of_two() || spec.size < min || spec.size > max {
            return Err(ConfigError::BarSize { index: spec.index, size: spec.size, min, max });
        }
        let registers = if spec.kind == BarKind::Memory64 { 2 } else { 1 };
        if index + registers > NUM_BARS {
            return Err(ConfigError::Bar64AtEnd(spec.index));
        }
        for r in index..index + registers {
            if self.bars.get(r).is_some_and(Option::is_some) || self.bar_upper_halves.get(r).is_some_and(|&u| u) {
                return Err(ConfigError::BarInUse(r as u8));
            }
        }

        let address_mask = !(spec.size - 1);
        let offset = BAR0 + 4 * index;
        let prefetch = if spec.prefetchable { BAR_MEM_PREFETCHABLE_FLAG } else { 0 };
        let (flags, low_writable) = match spec.kind {
            BarKind::Io => (BAR_IO_FLAG, address_mask as u32 & !0x3),
            BarKind::Memory32 => (prefetch, address_mask as u32 & !0xf),
            BarKind::Memory64 => (BAR_MEM_64BIT_FLAG | prefetch, address_mask as u32 & !0xf),
        };
        self.set_u32(offset, flags);
        self.set_writable(offset, &low_writable.to_le_bytes());
        if spec.kind == BarKind::Memory64 {
            self.set_u32(offset + 4, 0);
            self.set_writable(offset + 4, &((address_mask >> 32) as u32).to_le_bytes());
            if let Some(upper) = self.bar_upper_halves.get_mut(index + 1) {
                *upper = true;
            }
        }
        if let Some(slot) = self.bars.get_mut(index) {
            *slot = Some(Bar { spec, decoded: None });
        }
        Ok(())
    }

    /// The BARs registered, lowest index first.
    pub fn bars(&self) -> Vec<BarSpec> {
        self.bars.iter().flatten().map(|bar| bar.spec).collect()
    }

    pub fn bar_spec(&self, index: u8) -> Option<BarSpec> {
        self.bar(index).map(|bar| bar.spec)
    }

    fn bar(&self, index: u8) -> Option<&Bar> {
        self.bars.get(usize::from(index)).and_then(Option::as_ref)
    }

    /// Programs a BAR as firmware would: writes its address and turns on decoding of
    /// its kind of space. No [`BarChange`] is produced (the caller placed it); after
    /// programming, [`bar_address`](Self::bar_address) tells which BARs to map.
    pub fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), ConfigError> {
        let spec = self.bar_spec(index).ok_or(ConfigError::BarNotRegistered(index))?;
        let size = spec.size;
        if addr & (size - 1) != 0 {
            return Err(ConfigError::BarAlignment { index, addr, size });
        }
        let limit = match spec.kind {
            BarKind::Io => IO_SPACE_END,
            BarKind::Memory32 => 1 << 32,
            BarKind::Memory64 => u64::MAX,
        };
        let offset = BAR0 + 4 * usize::from(index);
        // The top slot of the BAR's window sets every address bit: the registers would
        // hold the sizing pattern, which is never decoded (see `decoded_address`).
        let sizing = self.is_sizing_pattern(offset, addr as u32)
            || (spec.kind == BarKind::Memory64 && self.is_sizing_pattern(offset + 4, (addr >> 32) as u32));
        if addr == 0 || sizing || addr.checked_add(size).is_none_or(|end| end > limit) {
            return Err(ConfigError::BarAddress { index, addr, size });
        }
        let flags = self.read_u32(offset) & if spec.kind == BarKind::Io { 0x3 } else { 0xf };
        self.set_u32(offset, addr as u32 | flags);
        if spec.kind == BarKind::Memory64 {
            self.set_u32(offset + 4, (addr >> 32) as u32);
        }
        let enable = if spec.kind == BarKind::Io { COMMAND_IO_SPACE } else { COMMAND_MEMORY_SPACE };
        let command = self.command() | enable;
        self.set_u16(COMMAND, command);
        // Record the new state without reporting it: the caller maps what it placed.
        self.update_decoding();
        Ok(())
    }

    /// Where BAR `index` is decoded now, if anywhere.
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        self.bar(index).and_then(|bar| bar.decoded)
    }

    /// Where the registers and the command register say BAR `bar` is decoded.
    fn decoded_address(&self, bar: &BarSpec) -> Option<u64> {
        let offset = BAR0 + 4 * usize::from(bar.index);
        let enable = if bar.kind == BarKind::Io { COMMAND_IO_SPACE } else { COMMAND_MEMORY_SPACE };
        if self.command() & enable == 0 {
            return None;
        }
        // A register holding the sizing pattern holds no address: the guest is probing
        // the BAR's size.
        let probing = |reg: usize| self.is_sizing_pattern(reg, self.read_u32(reg));
        let low = self.read_u32(offset);
        let (addr, limit) = match bar.kind {
            BarKind::Io => (u64::from(low & !0x3), IO_SPACE_END),
            BarKind::Memory32 => (u64::from(low & !0xf), 1 << 32),
            BarKind::Memory64 => {
                if probing(offset + 4) {
                    return None;
                }
                (u64::from(self.read_u32(offset + 4)) << 32 | u64::from(low & !0xf), u64::MAX)
            }
        };
        if probing(offset) || addr == 0 || addr.checked_add(bar.size).is_none_or(|end| end > limit) {
            return None;
        }
        Some(addr)
    }

    /// Whether `value` in the BAR register at `offset` sets every writable bit: what
    /// writing all-ones leaves there to be read back as the size.
    fn is_sizing_pattern(&self, offset: usize, value: u32) -> bool {
        let writable = self.writable_u32(offset);
        writable != 0 && value & writable == writable
    }

    fn writable_u32(&self, offset: usize) -> u32 {
        let mut b = [0; 4];
        if let Some(src) = self.writable.get(offset..offset + 4) {
            b.copy_from_slice(src);
        }
        u32::from_le_bytes(b)
    }

    pub(super) fn update_decoding(&mut self) -> Vec<BarChange> {
        let mut changes = Vec::new();
        for i in 0..NUM_BARS {
            let Some(bar) = self.bars.get(i).copied().flatten() else { continue };
            let new = self.decoded_address(&bar.spec);
            if new != bar.decoded {
                let spec = bar.spec;
                changes.push(BarChange { index: spec.index, kind: spec.kind, size: spec.size, old: bar.decoded, new });
                if let Some(Some(slot)) = self.bars.get_mut(i) {
                    slot.decoded = new;
                }
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::header;

    fn write_u32(c: &mut PciConfiguration, offset: usize, v: u32) -> Vec<BarChange> {
        c.write(offset as u64, &v.to_le_bytes())
    }

    #[test]
    fn sizes_32bit_memory_and_io_bars() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(BarSpec { index: 0, size: 0x1000, kind: BarKind::Memory32, prefetchable: false }).unwrap();
        c.add_bar(BarSpec { index: 1, size: 0x20, kind: BarKind::Io, prefetchable: false }).unwrap();
        write_u32(&mut c, BAR0, 0xffff_ffff);
        write_u32(&mut c, BAR0 + 4, 0xffff_ffff);
        assert_eq!(c.read_u32(BAR0), 0xffff_f000);
        assert_eq!(c.read_u32(BAR0 + 4), 0xffff_ffe1);
        write_u32(&mut c, BAR0, 0xc000_0000);
        assert_eq!(c.read_u32(BAR0), 0xc000_0000);
        // Unregistered BARs read zero whatever is written.
        write_u32(&mut c, BAR0 + 8, 0xffff_ffff);
        assert_eq!(c.read_u32(BAR0 + 8), 0);
    }

    #[test]
    fn sizes_64bit_bars() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(BarSpec { index: 0, size: 0x4000, kind: BarKind::Memory64, prefetchable: false }).unwrap();
        c.add_bar(BarSpec { index: 2, size: 8 << 30, kind: BarKind::Memory64, prefetchable: true }).unwrap();
        for reg in 0..4 {
            write_u32(&mut c, BAR0 + 4 * reg, 0xffff_ffff);
        }
        assert_eq!(c.read_u32(BAR0), 0xffff_c004);
        assert_eq!(c.read_u32(BAR0 + 4), 0xffff_ffff);
        assert_eq!(c.read_u32(BAR0 + 8), 0x0000_000c);
        assert_eq!(c.read_u32(BAR0 + 12), 0xffff_fffe);
        assert_eq!(c.bars().len(), 2);
    }

    #[test]
    fn rejects_bad_bars() {
        let mut c = PciConfiguration::new(&header());
        let bar = |index, size, kind| BarSpec { index, size, kind, prefetchable: false };
        assert_eq!(c.add_bar(bar(6, 0x1000, BarKind::Memory32)), Err(ConfigError::BarIndex(6)));
        assert_eq!(c.add_bar(bar(5, 0x1000, BarKind::Memory64)), Err(ConfigError::Bar64AtEnd(5)));
        assert!(matches!(c.add_bar(bar(0, 0x1800, BarKind::Memory32)), Err(ConfigError::BarSize { .. })));
        assert!(matches!(c.add_bar(bar(0, 0x200, BarKind::Io)), Err(ConfigError::BarSize { .. })));
        c.add_bar(bar(0, 0x1000, BarKind::Memory64)).unwrap();
        assert_eq!(c.add_bar(bar(1, 0x1000, BarKind::Memory32)), Err(ConfigError::BarInUse(1)));
        assert_eq!(c.set_bar_address(2, 0x1000), Err(ConfigError::BarNotRegistered(2)));
        assert!(matches!(c.set_bar_address(0, 0x1800), Err(ConfigError::BarAlignment { .. })));
        assert!(matches!(c.set_bar_address(0, 0), Err(ConfigError::BarAddress { .. })));
    }

    #[test]
    fn refuses_addresses_that_read_as_the_sizing_pattern() {
        // Found by fuzzing: the top slot of a BAR's window was accepted but, its
        // registers holding every address bit, never decoded.
        let mut c = PciConfiguration::new(&header());
        c.add_bar(BarSpec { index: 0, size: 0x1000, kind: BarKind::Memory32, prefetchable: false }).unwrap();
        c.add_bar(BarSpec { index: 2, size: 0x800, kind: BarKind::Memory64, prefetchable: false }).unwrap();
        assert!(matches!(c.set_bar_address(0, 0xffff_f000), Err(ConfigError::BarAddress { .. })));
        assert!(matches!(c.set_bar_address(2, 0xffff_ffff_0000_0000), Err(ConfigError::BarAddress { .. })));
        assert!(matches!(c.set_bar_address(2, 0x1_ffff_f800), Err(ConfigError::BarAddress { .. })));
        assert_eq!((c.bar_address(0), c.bar_address(2)), (None, None));
        // One slot lower is an address like any other.
        c.set_bar_address(0, 0xffff_e000).unwrap();
        c.set_bar_address(2, 0xffff_fffe_ffff_f000).unwrap();
        assert_eq!((c.bar_address(0), c.bar_address(2)), (Some(0xffff_e000), Some(0xffff_fffe_ffff_f000)));
    }

    #[test]
    fn reports_bar_moves_and_decoding_changes() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(BarSpec { index: 0, size: 0x4000, kind: BarKind::Memory64, prefetchable: false }).unwrap();
        c.set_bar_address(0, 0x1_0000_0000).unwrap();
        assert_eq!(c.bar_address(0), Some(0x1_0000_0000));
        assert_eq!(c.command() & COMMAND_MEMORY_SPACE, COMMAND_MEMORY_SPACE);
        let change = |old, new| BarChange { index: 0, kind: BarKind::Memory64, size: 0x4000, old, new };

        // Linux's sizing: decoding off, probe, restore, decoding on.
        assert_eq!(c.write(COMMAND as u64, &[0]), vec![change(Some(0x1_0000_0000), None)]);
        for reg in [BAR0, BAR0 + 4] {
            let saved = c.read_u32(reg);
            assert!(write_u32(&mut c, reg, 0xffff_ffff).is_empty());
            assert!(write_u32(&mut c, reg, saved).is_empty());
        }
        let on = COMMAND_MEMORY_SPACE as u8;
        assert_eq!(c.write(COMMAND as u64, &[on]), vec![change(None, Some(0x1_0000_0000))]);

        // A move with decoding on, low half then high half.
        assert_eq!(write_u32(&mut c, BAR0, 0xc000_4000), vec![change(Some(0x1_0000_0000), Some(0x1_c000_4000))]);
        assert_eq!(write_u32(&mut c, BAR0 + 4, 0), vec![change(Some(0x1_c000_4000), Some(0xc000_4000))]);
        // Rewriting the same address is not a move.
        assert!(write_u32(&mut c, BAR0, 0xc000_4000).is_empty());
        // Sizing with decoding left on: the BAR is not decoded while it holds the pattern.
        assert_eq!(write_u32(&mut c, BAR0, 0xffff_ffff), vec![change(Some(0xc000_4000), None)]);
        assert_eq!(write_u32(&mut c, BAR0, 0xc000_4000), vec![change(None, Some(0xc000_4000))]);
        // Writes elsewhere report nothing.
        assert!(c.write(INTERRUPT_LINE as u64, &[5]).is_empty());
    }

    #[test]
    fn io_bar_decoding_follows_io_enable() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(BarSpec { index: 4, size: 0x20, kind: BarKind::Io, prefetchable: false }).unwrap();
        assert!(matches!(c.set_bar_address(4, 0xffe0), Ok(())));
        assert!(matches!(c.set_bar_address(4, 0x1_0000), Err(ConfigError::BarAddress { .. })));
        assert_eq!(c.bar_address(4), Some(0xffe0));
        let changes = c.write(COMMAND as u64, &[COMMAND_MEMORY_SPACE as u8]);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].new, None);
    }
}
