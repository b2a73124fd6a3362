//! Where the virtio structures live in BAR 0, and the vendor-specific capabilities
//! that tell the driver so (virtio 1.2, 4.1.4).
//!
//! Each structure gets its own 4 KiB page so a later change (say, mapping the notify
//! page differently) moves no other structure:
//!
//! ```text
//!   0x0000  common configuration
//!   0x1000  ISR status
//!   0x2000  device-specific configuration
//!   0x3000  notifications: queue n at 0x3000 + 4 n
//!   0x4000  MSI-X table, then the PBA on the next page
//! ```

use crate::msix;

pub const VENDOR_SPECIFIC_CAP_ID: u8 = 0x09;
pub const CAP_COMMON_CFG: u8 = 1;
pub const CAP_NOTIFY_CFG: u8 = 2;
pub const CAP_ISR_CFG: u8 = 3;
pub const CAP_DEVICE_CFG: u8 = 4;
pub const CAP_PCI_CFG: u8 = 5;

/// The BAR holding every structure.
pub const VIRTIO_BAR: u8 = 0;
const PAGE: u64 = 0x1000;

pub const COMMON_CFG_OFFSET: u64 = 0;
/// `struct virtio_pci_common_cfg` up to `queue_device` (queue_notify_data and
/// queue_reset belong to features this transport does not offer).
pub const COMMON_CFG_LEN: u64 = 0x38;
pub const ISR_OFFSET: u64 = PAGE;
pub const ISR_LEN: u64 = 1;
pub const DEVICE_CFG_OFFSET: u64 = 2 * PAGE;
pub const DEVICE_CFG_LEN: u64 = PAGE;
pub const NOTIFY_OFFSET: u64 = 3 * PAGE;
/// Each queue notifies at its own DWORD, so each can have its own ioeventfd.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// As many queues as have a notify address in the notify page.
pub const MAX_QUEUES: usize = (PAGE / NOTIFY_OFF_MULTIPLIER as u64) as usize;
pub const MSIX_TABLE_OFFSET: u64 = 4 * PAGE;

/// Bytes from the start of a virtio capability to its fields.
pub const CAP_BAR: usize = 4;
pub const CAP_OFFSET: usize = 8;
pub const CAP_LENGTH: usize = 12;
/// `pci_cfg_data` of the PCI configuration access capability.
pub const PCI_CFG_DATA: usize = 16;

fn round_up_to_page(len: u64) -> u64 {
    len.div_ceil(PAGE) * PAGE
}

/// BAR 0 for a device with `vectors` MSI-X vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarLayout {
    pub pba_offset: u64,
    pub pba_region_len: u64,
    pub table_region_len: u64,
    /// A power of two, as BAR sizes are.
    pub size: u64,
}

impl BarLayout {
    pub fn new(vectors: u16) -> Self {
        let table_region_len = round_up_to_page(msix::table_len(vectors));
        let pba_offset = MSIX_TABLE_OFFSET + table_region_len;
        let pba_region_len = round_up_to_page(msix::pba_len(vectors));
        Self { pba_offset, pba_region_len, table_region_len, size: (pba_offset + pba_region_len).next_power_of_two() }
    }

    pub fn msix(&self) -> msix::MsixLayout {
        // Both offsets are below the 2048-vector maximum's few pages, far below 4 GiB.
        msix::MsixLayout {
            table_bar: VIRTIO_BAR,
            table_offset: MSIX_TABLE_OFFSET as u32,
            pba_bar: VIRTIO_BAR,
            pba_offset: self.pba_offset as u32,
        }
    }
}

/// A `struct virtio_pci_cap` body (after the ID and next pointer), with `extra`
/// appended (the notify multiplier, the PCI config window), and its writable mask.
pub fn capability(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> (Vec<u8>, Vec<u8>) {
    // cap_len counts the whole capability: ID, next, these 14 bytes and `extra`.
    let cap_len = (16 + extra.len()) as u8;
    let mut body = vec![cap_len, cfg_type, VIRTIO_BAR, 0, 0, 0];
    // Offsets and lengths are inside a BAR of a few pages.
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    let writable = vec![0; body.len()];
    (body, writable)
}

/// The PCI configuration access capability: the driver picks BAR, offset and length
/// and reads or writes `pci_cfg_data` to reach the BAR through config space.
pub fn pci_cfg_capability() -> (Vec<u8>, Vec<u8>) {
    let (body, mut writable) = capability(CAP_PCI_CFG, 0, 0, &[0; 4]);
    // Body offsets are capability offsets minus the 2 header bytes.
    for range in [CAP_BAR..CAP_BAR + 1, CAP_OFFSET..CAP_OFFSET + 4, CAP_LENGTH..PCI_CFG_DATA + 4] {
        for i in range {
            if let Some(w) = writable.get_mut(i - 2) {
                *w = 0xff;
            }
        }
    }
    (body, writable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_fits_table_and_pba() {
        let small = BarLayout::new(3);
        assert_eq!((small.pba_offset, small.size), (0x5000, 0x8000));
        let big = BarLayout::new(2048);
        assert_eq!((big.table_region_len, big.pba_offset, big.size), (0x8000, 0xc000, 0x10000));
        assert_eq!(MAX_QUEUES, 1024);
    }

    #[test]
    fn capabilities_are_laid_out_as_virtio_pci_cap() {
        let (body, writable) = capability(CAP_NOTIFY_CFG, NOTIFY_OFFSET, 8, &4u32.to_le_bytes());
        assert_eq!(body, [20, 2, 0, 0, 0, 0, 0x00, 0x30, 0, 0, 8, 0, 0, 0, 4, 0, 0, 0]);
        assert!(writable.iter().all(|&w| w == 0));
        let (body, writable) = pci_cfg_capability();
        assert_eq!(body.len(), 18);
        assert_eq!(
            writable,
            [0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
    }
}
