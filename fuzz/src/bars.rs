//! What every PCI device's config writes must keep true of its BARs, whatever the guest
//! wrote: the reported changes are exactly the moves, and a decoded BAR is somewhere a
//! BAR of its kind and size can be.

use pci::config::{BarChange, BarKind, BarSpec};

/// Where each BAR in `specs` is decoded, by `address`.
pub fn decoded(specs: &[BarSpec], address: impl Fn(u8) -> Option<u64>) -> Vec<Option<u64>> {
    specs.iter().map(|s| address(s.index)).collect()
}

/// Checks one config write's `changes` against the decoding `before` and `after` it.
pub fn check_changes(specs: &[BarSpec], before: &[Option<u64>], after: &[Option<u64>], changes: &[BarChange]) {
    for (i, spec) in specs.iter().enumerate() {
        let reported: Vec<&BarChange> = changes.iter().filter(|c| c.index == spec.index).collect();
        if before[i] == after[i] {
            assert!(reported.is_empty(), "BAR {} did not move but was reported: {reported:?}", spec.index);
        } else {
            assert_eq!(reported.len(), 1, "BAR {} moved {:?} -> {:?}: {changes:?}", spec.index, before[i], after[i]);
            let c = reported[0];
            assert_eq!((c.old, c.new, c.kind, c.size), (before[i], after[i], spec.kind, spec.size), "{c:?}");
        }
        if let Some(addr) = after[i] {
            let limit = match spec.kind {
                BarKind::Io => 1 << 16,
                BarKind::Memory32 => 1 << 32,
                BarKind::Memory64 => u64::MAX,
            };
            let fits = addr.checked_add(spec.size).is_some_and(|end| end <= limit);
            assert!(addr != 0 && addr % spec.size == 0 && fits, "BAR {} decoded at {addr:#x}: {spec:?}", spec.index);
        }
    }
    for c in changes {
        assert!(specs.iter().any(|s| s.index == c.index), "a change of an unregistered BAR: {c:?}");
    }
}
