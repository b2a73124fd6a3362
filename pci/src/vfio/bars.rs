//! The BARs of a passthrough function: which parts the guest reaches directly through
//! host mappings (KVM memory slots), and where the trapped rest goes.
//!
//! A BAR's mappable parts are the areas the host allows (sparse-mmap areas, or the
//! whole region with the MMAP flag), shrunk to whole pages, minus the pages holding
//! the MSI-X table and PBA: those stay trapped even when the host says MSIX_MAPPABLE,
//! because the guest's table is emulated (the device's own table is programmed by the
//! host for VFIO's eventfds). Trapped accesses to the table and PBA go to the MSI-X
//! emulation; every other trapped access (the rest of those pages, BARs that cannot be
//! mapped, accesses arriving before the VMM added the memory slots) goes to the device
//! through region reads and writes.

use std::sync::Arc;

use crate::config::{BarKind, BarSpec, NUM_BARS};
use crate::device::MmapArea;
use crate::msix::{self, MsixLayout};

use super::ops::{RegionArea, VfioDeviceOps, VfioOpsError};

/// Memory slots are page-granular (x86-64 host pages).
pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BarsError {
    #[error("cannot map BAR {bar} bytes {offset:#x}..{end:#x} of the device: {source}", end = offset.saturating_add(*len))]
    Map {
        bar: u8,
        offset: u64,
        len: u64,
        #[source]
        source: VfioOpsError,
    },
}

/// Where an access inside a BAR goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarTarget {
    /// The MSI-X table, at this offset inside it.
    MsixTable(u64),
    /// The MSI-X PBA, at this offset inside it.
    MsixPba(u64),
    /// The device's region for that BAR, at the BAR offset.
    Device,
    /// Not a BAR of this device.
    Absent,
}

/// The MSI-X table and PBA as BAR-relative byte ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixRanges {
    pub table_bar: u8,
    pub table: RegionArea,
    pub pba_bar: u8,
    pub pba: RegionArea,
}

impl MsixRanges {
    pub fn new(table_size: u16, layout: &MsixLayout) -> Self {
        Self {
            table_bar: layout.table_bar,
            table: RegionArea { offset: u64::from(layout.table_offset), len: msix::table_len(table_size) },
            pba_bar: layout.pba_bar,
            pba: RegionArea { offset: u64::from(layout.pba_offset), len: msix::pba_len(table_size) },
        }
    }

    /// The ranges inside BAR `bar`.
    fn in_bar(&self, bar: u8) -> impl Iterator<Item = RegionArea> + '_ {
        [(self.table_bar, self.table), (self.pba_bar, self.pba)]
            .into_iter()
            .filter(move |(b, _)| *b == bar)
            .map(|x| x.1)
    }
}

fn inside(offset: u64, area: &RegionArea) -> Option<u64> {
    offset.checked_sub(area.offset).filter(|&o| o < area.len)
}

/// The page-aligned areas of a BAR of `bar_size` bytes to map: `allowed` (what the
/// host lets us mmap) clipped to the BAR and to whole pages, minus `trapped` rounded
/// out to whole pages. Sorted by offset.
pub fn mmap_areas(allowed: &[RegionArea], bar_size: u64, trapped: &[RegionArea], page: u64) -> Vec<RegionArea> {
    let down = |x: u64| x - x % page;
    let up = |x: u64| x.checked_add(page - 1).map_or(down(u64::MAX), down);
    let mut pieces: Vec<(u64, u64)> = allowed
        .iter()
        .map(|a| (up(a.offset), down(a.offset.saturating_add(a.len).min(bar_size))))
        .filter(|(start, end)| start < end)
        .collect();
    for hole in trapped.iter().filter(|t| t.len > 0) {
        let (hole_start, hole_end) = (down(hole.offset), up(hole.offset.saturating_add(hole.len)));
        pieces = pieces
            .into_iter()
            .flat_map(|(start, end)| {
                let before = (start, end.min(hole_start));
                let after = (start.max(hole_end), end);
                [before, after].into_iter().filter(|(s, e)| s < e)
            })
            .collect();
    }
    pieces.sort_unstable();
    pieces.into_iter().map(|(start, end)| RegionArea { offset: start, len: end - start }).collect()
}

/// The BARs of one passthrough function and their host mappings.
pub struct Bars {
    sizes: [Option<u64>; NUM_BARS],
    msix: Option<MsixRanges>,
    mapped: [Vec<MmapArea>; NUM_BARS],
}

impl Bars {
    /// Maps the mappable parts of each memory BAR in `specs`.
    pub fn new(ops: &dyn VfioDeviceOps, specs: &[BarSpec], msix: Option<MsixRanges>) -> Result<Self, BarsError> {
        let mut bars = Self { sizes: [None; NUM_BARS], msix, mapped: Default::default() };
        for spec in specs {
            let i = usize::from(spec.index);
            let Some(size) = bars.sizes.get_mut(i) else { continue };
            *size = Some(spec.size);
            if spec.kind == BarKind::Io {
                continue;
            }
            let Some(region) = ops.region(u32::from(spec.index)) else { continue };
            let trapped: Vec<RegionArea> = msix.iter().flat_map(|m| m.in_bar(spec.index).collect::<Vec<_>>()).collect();
            let areas = mmap_areas(&region.mappable_areas(), spec.size, &trapped, PAGE_SIZE);
            let mut mapped = Vec::with_capacity(areas.len());
            for area in areas {
                let mapping = ops
                    .map_area(u32::from(spec.index), area.offset, area.len)
                    .map_err(|source| BarsError::Map { bar: spec.index, offset: area.offset, len: area.len, source })?;
                mapped.push(MmapArea { offset: area.offset, mapping: Arc::new(mapping) });
            }
            if let Some(slot) = bars.mapped.get_mut(i) {
                *slot = mapped;
            }
        }
        Ok(bars)
    }

    /// Where an access at `offset` inside BAR `bar` goes (by its first byte; the MSI-X
    /// emulation and the region access check the rest).
    pub fn route(&self, bar: u8, offset: u64) -> BarTarget {
        let Some(size) = self.sizes.get(usize::from(bar)).copied().flatten() else {
            return BarTarget::Absent;
        };
        if offset >= size {
            return BarTarget::Absent;
        }
        if let Some(m) = &self.msix {
            if let Some(o) = inside(offset, &m.table).filter(|_| m.table_bar == bar) {
                return BarTarget::MsixTable(o);
            }
            if let Some(o) = inside(offset, &m.pba).filter(|_| m.pba_bar == bar) {
                return BarTarget::MsixPba(o);
            }
        }
        BarTarget::Device
    }

    /// The host mappings of BAR `bar`, for the VMM's memory slots.
    pub fn mmap_areas(&self, bar: u8) -> Vec<MmapArea> {
        self.mapped.get(usize::from(bar)).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(offset: u64, len: u64) -> RegionArea {
        RegionArea { offset, len }
    }

    #[test]
    fn whole_region_minus_table_and_pba_pages() {
        // igbvf's BAR 3: table at 0 (3 entries), PBA at 0x2000.
        let igbvf = MsixRanges::new(3, &MsixLayout { table_bar: 3, table_offset: 0, pba_bar: 3, pba_offset: 0x2000 });
        let trapped: Vec<_> = igbvf.in_bar(3).collect();
        assert_eq!(trapped, vec![area(0, 48), area(0x2000, 8)]);
        assert_eq!(
            mmap_areas(&[area(0, 0x4000)], 0x4000, &trapped, PAGE_SIZE),
            vec![area(0x1000, 0x1000), area(0x3000, 0x1000)]
        );
        assert_eq!(igbvf.in_bar(0).count(), 0);
        assert_eq!(mmap_areas(&[area(0, 0x4000)], 0x4000, &[], PAGE_SIZE), vec![area(0, 0x4000)]);
    }

    #[test]
    fn sparse_areas_are_honoured_and_clipped() {
        // The host already left out the table page; the PBA page still goes.
        let sparse = [area(0x1000, 0x7000), area(0x9000, 0x1000)];
        let trapped = [area(0x800, 0x40), area(0x4ff8, 0x10)];
        assert_eq!(
            mmap_areas(&sparse, 0x10000, &trapped, PAGE_SIZE),
            vec![area(0x1000, 0x3000), area(0x6000, 0x2000), area(0x9000, 0x1000)]
        );
        // Areas beyond the BAR, unaligned or smaller than a page shrink or vanish.
        assert_eq!(mmap_areas(&[area(0x800, 0x2000)], 0x2000, &[], PAGE_SIZE), vec![area(0x1000, 0x1000)]);
        assert_eq!(mmap_areas(&[area(0, 0x100)], 0x100, &[], PAGE_SIZE), vec![]);
        assert_eq!(mmap_areas(&[area(u64::MAX - 0x10, 0x100)], u64::MAX, &[], PAGE_SIZE), vec![]);
        assert_eq!(mmap_areas(&[area(0, 0x4000)], 0x4000, &[area(u64::MAX - 4, 8)], PAGE_SIZE), vec![area(0, 0x4000)]);
        // A table covering everything leaves nothing.
        assert_eq!(mmap_areas(&[area(0, 0x2000)], 0x2000, &[area(0, 0x2000)], PAGE_SIZE), vec![]);
    }

    #[test]
    fn routes_table_pba_and_the_rest() {
        let msix = MsixRanges::new(3, &MsixLayout { table_bar: 3, table_offset: 0, pba_bar: 3, pba_offset: 0x2000 });
        let mut bars = Bars { sizes: [None; NUM_BARS], msix: Some(msix), mapped: Default::default() };
        bars.sizes[0] = Some(0x4000);
        bars.sizes[3] = Some(0x4000);
        assert_eq!(bars.route(3, 0x10), BarTarget::MsixTable(0x10));
        assert_eq!(bars.route(3, 0x2c), BarTarget::MsixTable(0x2c));
        assert_eq!(bars.route(3, 0x30), BarTarget::Device);
        assert_eq!(bars.route(3, 0x2004), BarTarget::MsixPba(4));
        assert_eq!(bars.route(3, 0x2008), BarTarget::Device);
        assert_eq!(bars.route(0, 0x10), BarTarget::Device);
        assert_eq!(bars.route(0, 0x4000), BarTarget::Absent);
        assert_eq!(bars.route(1, 0), BarTarget::Absent);
        assert_eq!(bars.route(200, u64::MAX), BarTarget::Absent);
        assert!(bars.mmap_areas(0).is_empty() && bars.mmap_areas(9).is_empty());
    }
}
