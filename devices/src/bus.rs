//! A typed address space (port I/O or MMIO) mapping ranges to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reached by reads and writes at an offset inside its bus range.
///
/// `data.len()` is the access width (1, 2, 4 or 8 bytes for CPU accesses). A read
/// must fill all of `data`; what a device does not implement reads as all-ones,
/// as on real hardware with nothing decoding the address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around the address space")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps the device already at {other_base:#x}+{other_len:#x}")]
    Overlap { base: u64, len: u64, other_base: u64, other_len: u64 },
    #[error("no device starts at bus address {0:#x}")]
    NotFound(u64),
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// Devices keyed by their base address. The map sits behind a `RwLock` because
/// hot-plug changes it while vCPUs are dispatching through it.
#[derive(Default)]
pub struct Bus {
    entries: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => return Err(BusError::InvalidRange { base, len }),
        };
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        // Only the last range starting below `end` can overlap [base, end).
        if let Some((&other_base, other)) = entries.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap { base, len, other_base, other_len: other.len });
            }
        }
        entries.insert(base, Entry { len, device });
        Ok(())
    }

    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.remove(&base).map(|e| e.device).ok_or(BusError::NotFound(base))
    }

    /// Removes every device. Devices can refer back to the bus that holds them (a PCI
    /// root's BAR mapper does), so a VM being torn down clears its buses to break
    /// those cycles.
    pub fn clear(&self) {
        self.entries.write().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The device covering `addr` and the offset of `addr` inside its range.
    fn resolve(&self, addr: u64, width: usize) -> Option<(SharedDevice, u64)> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let (&base, entry) = entries.range(..=addr).next_back()?;
        let offset = addr - base;
        // An access that starts inside a device but runs past its end is not decoded.
        if offset.checked_add(width as u64)? > entry.len {
            return None;
        }
        Some((entry.device.clone(), offset))
    }

    /// Dispatches a read; returns false when no device decodes the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(&device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device decodes the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(&device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned by a panic elsewhere is still in a defined state
/// (each access is a single register operation), so keep serving it.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Scratch {
        last_write: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Scratch::default()));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(0x3f8, b"x"));
        assert_eq!(dev.lock().unwrap().last_write, vec![(0, vec![b'x'])]);
        assert!(!bus.read(0x3f7, &mut b));
        assert!(!bus.read(0x400, &mut b));
    }

    #[test]
    fn access_past_the_end_is_not_decoded() {
        let bus = Bus::new();
        bus.insert(0x100, 4, Arc::new(Mutex::new(Scratch::default()))).unwrap();
        let mut b = [0u8; 4];
        assert!(bus.read(0x100, &mut b));
        assert!(!bus.read(0x102, &mut b));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let bus = Bus::new();
        let d = || Arc::new(Mutex::new(Scratch::default())) as SharedDevice;
        bus.insert(0x100, 0x10, d()).unwrap();
        assert!(matches!(bus.insert(0x108, 0x10, d()), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(0xf8, 0x10, d()), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(0x0, 0, d()), Err(BusError::InvalidRange { .. })));
        assert!(matches!(bus.insert(u64::MAX, 2, d()), Err(BusError::InvalidRange { .. })));
        bus.insert(0x110, 0x10, d()).unwrap();
        bus.insert(0xf0, 0x10, d()).unwrap();
        bus.remove(0x100).unwrap();
        assert_eq!(bus.remove(0x100).err(), Some(BusError::NotFound(0x100)));
        bus.insert(0x108, 0x8, d()).unwrap();
    }
}
