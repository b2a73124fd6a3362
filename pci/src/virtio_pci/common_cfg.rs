//! The common configuration structure (virtio 1.2, 4.1.4.3): feature negotiation,
//! device status, and the per-queue setup registers.
//!
//! Each field is reached with its natural width, and 64-bit fields also as two
//! DWORDs (the spec allows drivers either); other accesses read zero and write
//! nothing. Writes to device_status are returned to the transport, which owns the
//! status state machine (it has the device and the worker to act on).

use super::interrupt::VirtioPciInterrupt;

const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// FEATURES_OK in device_status: feature bits are frozen from then on.
const STATUS_FEATURES_OK: u8 = 8;

/// What the driver set up for one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRegisters {
    pub max_size: u16,
    pub size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueRegisters {
    fn new(max_size: u16) -> Self {
        Self { max_size, size: max_size, enabled: false, desc: 0, driver: 0, device: 0 }
    }
}

/// What a write asks of the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommonWrite {
    Done,
    /// The driver wrote this value to device_status.
    Status(u8),
}

pub struct CommonConfig {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<QueueRegisters>,
}

/// DWORD `select` of a 64-bit feature set; there are only two.
fn feature_word(features: u64, select: u32) -> u32 {
    match select {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

impl CommonConfig {
    pub fn new(queue_max_sizes: &[u16]) -> Self {
        Self {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues: queue_max_sizes.iter().map(|&max| QueueRegisters::new(max)).collect(),
        }
    }

    /// Every register back to its reset value.
    pub fn reset(&mut self) {
        *self =
            Self { queues: self.queues.iter().map(|q| QueueRegisters::new(q.max_size)).collect(), ..Self::new(&[]) };
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    pub fn set_status(&mut self, status: u8) {
        self.status = status;
    }

    /// The features the driver wrote (already limited to what was offered).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub fn queues(&self) -> &[QueueRegisters] {
        &self.queues
    }

    fn selected(&self) -> Option<&QueueRegisters> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn num_queues(&self) -> u16 {
        // The transport refuses devices with more queues than the notify page holds.
        self.queues.len() as u16
    }

    /// A read of `data.len()` bytes at `offset`; `offered` is the device's feature set.
    pub fn read(&self, offset: u64, data: &mut [u8], offered: u64, irq: &VirtioPciInterrupt) {
        let queue = self.selected();
        let address = |field: fn(&QueueRegisters) -> u64| queue.map_or(0, field);
        let value: u64 = match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select.into(),
            (DEVICE_FEATURE, 4) => feature_word(offered, self.device_feature_select).into(),
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select.into(),
            (DRIVER_FEATURE, 4) => feature_word(self.driver_features, self.driver_feature_select).into(),
            (CONFIG_MSIX_VECTOR, 2) => irq.config_vector().into(),
            (NUM_QUEUES, 2) => self.num_queues().into(),
            (DEVICE_STATUS, 1) => self.status.into(),
            (CONFIG_GENERATION, 1) => irq.config_generation().into(),
            (QUEUE_SELECT, 2) => self.queue_select.into(),
            (QUEUE_SIZE, 2) => queue.map_or(0, |q| q.size).into(),
            (QUEUE_MSIX_VECTOR, 2) => irq.queue_vector(self.queue_select).into(),
            (QUEUE_ENABLE, 2) => queue.map_or(0, |q| u64::from(q.enabled)),
            // Queue n notifies at n × the multiplier.
            (QUEUE_NOTIFY_OFF, 2) => queue.map_or(0, |_| self.queue_select.into()),
            (QUEUE_DESC, 8) => address(|q| q.desc),
            (QUEUE_DRIVER, 8) => address(|q| q.driver),
            (QUEUE_DEVICE, 8) => address(|q| q.device),
            (o, 4) if (QUEUE_DESC..QUEUE_DEVICE + 8).contains(&o) && o & 0x3 == 0 => {
                let full = match o & !0x7 {
                    QUEUE_DESC => address(|q| q.desc),
                    QUEUE_DRIVER => address(|q| q.driver),
                    _ => address(|q| q.device),
                };
                if o & 0x4 == 0 {
                    full & 0xffff_ffff
                } else {
                    full >> 32
                }
            }
            _ => 0,
        };
        match value.to_le_bytes().get(..data.len()) {
            Some(bytes) => data.copy_from_slice(bytes),
            None => data.fill(0),
        }
    }

    /// A write of `data` at `offset`; `offered` is the device's feature set.
    pub fn write(&mut self, offset: u64, data: &[u8], offered: u64, irq: &VirtioPciInterrupt) -> CommonWrite {
        let mut bytes = [0; 8];
        let Some(dst) = bytes.get_mut(..data.len()) else {
            return CommonWrite::Done;
        };
        dst.copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let features_frozen = self.status & STATUS_FEATURES_OK != 0;
        let select = self.queue_select;
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (DRIVER_FEATURE, 4) if !features_frozen => {
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return CommonWrite::Done,
                };
                let word = (value & 0xffff_ffff) << shift;
                let kept = self.driver_features & !(0xffff_ffff << shift);
                // The driver can only accept what was offered.
                self.driver_features = kept | (word & offered);
            }
            (CONFIG_MSIX_VECTOR, 2) => irq.set_config_vector(value as u16),
            (DEVICE_STATUS, 1) => return CommonWrite::Status(value as u8),
            (QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (QUEUE_MSIX_VECTOR, 2) => irq.set_queue_vector(select, value as u16),
            (QUEUE_SIZE | QUEUE_ENABLE | QUEUE_DESC..=0x37, _) => self.write_queue(offset, data.len(), value),
            _ => {}
        }
        CommonWrite::Done
    }

    /// Writes to the selected queue's setup registers, which freeze once it is enabled.
    fn write_queue(&mut self, offset: u64, len: usize, value: u64) {
        let Some(queue) = self.queues.get_mut(usize::from(self.queue_select)) else { return };
        if queue.enabled {
            return;
        }
        match (offset, len) {
            (QUEUE_SIZE, 2) => queue.size = value as u16,
            // Only 1 enables; the driver must not write 0 (a queue is disabled by reset).
            (QUEUE_ENABLE, 2) => queue.enabled |= value == 1,
            (o, 8) if o & 0x7 == 0 => {
                if let Some(field) = address_field(queue, o) {
                    *field = value;
                }
            }
            (o, 4) if o & 0x3 == 0 => {
                if let Some(field) = address_field(queue, o & !0x7) {
                    *field = if o & 0x4 == 0 {
                        (*field & !0xffff_ffff) | (value & 0xffff_ffff)
                    } else {
                        (*field & 0xffff_ffff) | (value << 32)
                    };
                }
            }
            _ => {}
        }
    }
}

fn address_field(queue: &mut QueueRegisters, field: u64) -> Option<&mut u64> {
    match field {
        QUEUE_DESC => Some(&mut queue.desc),
        QUEUE_DRIVER => Some(&mut queue.driver),
        QUEUE_DEVICE => Some(&mut queue.device),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::interrupt::testing::RecordingVectors;
    use crate::msix::Msix;
    use crate::virtio_pci::interrupt::VIRTIO_MSI_NO_VECTOR;

    const OFFERED: u64 = 1 << 32 | 1 << 5 | 1;

    fn setup() -> (CommonConfig, VirtioPciInterrupt) {
        let msix = Msix::new(3, Arc::new(RecordingVectors::default())).unwrap();
        (CommonConfig::new(&[256, 64]), VirtioPciInterrupt::new(2, Arc::new(Mutex::new(msix))))
    }

    fn read(c: &CommonConfig, irq: &VirtioPciInterrupt, offset: u64, len: usize) -> u64 {
        let mut b = [0; 8];
        c.read(offset, &mut b[..len], OFFERED, irq);
        u64::from_le_bytes(b)
    }

    fn write(c: &mut CommonConfig, irq: &VirtioPciInterrupt, offset: u64, len: usize, value: u64) -> CommonWrite {
        c.write(offset, &value.to_le_bytes()[..len], OFFERED, irq)
    }

    #[test]
    fn features_are_selected_by_dword_and_limited_to_the_offer() {
        let (mut c, irq) = setup();
        assert_eq!(read(&c, &irq, DEVICE_FEATURE, 4), 0x21);
        write(&mut c, &irq, DEVICE_FEATURE_SELECT, 4, 1);
        assert_eq!(read(&c, &irq, DEVICE_FEATURE, 4), 1);
        write(&mut c, &irq, DEVICE_FEATURE_SELECT, 4, 2);
        assert_eq!(read(&c, &irq, DEVICE_FEATURE, 4), 0);

        write(&mut c, &irq, DRIVER_FEATURE, 4, 0xffff_ffff);
        write(&mut c, &irq, DRIVER_FEATURE_SELECT, 4, 1);
        write(&mut c, &irq, DRIVER_FEATURE, 4, 0xffff_ffff);
        write(&mut c, &irq, DRIVER_FEATURE_SELECT, 4, 7);
        write(&mut c, &irq, DRIVER_FEATURE, 4, 0xffff_ffff);
        assert_eq!(c.driver_features(), OFFERED);
        assert_eq!(read(&c, &irq, DRIVER_FEATURE, 4), 0);

        c.set_status(STATUS_FEATURES_OK);
        write(&mut c, &irq, DRIVER_FEATURE_SELECT, 4, 0);
        write(&mut c, &irq, DRIVER_FEATURE, 4, 0);
        assert_eq!(c.driver_features(), OFFERED, "features freeze at FEATURES_OK");
    }

    #[test]
    fn queue_registers_follow_queue_select() {
        let (mut c, irq) = setup();
        assert_eq!(read(&c, &irq, NUM_QUEUES, 2), 2);
        assert_eq!(read(&c, &irq, QUEUE_SIZE, 2), 256);
        write(&mut c, &irq, QUEUE_SELECT, 2, 1);
        assert_eq!((read(&c, &irq, QUEUE_SIZE, 2), read(&c, &irq, QUEUE_NOTIFY_OFF, 2)), (64, 1));
        write(&mut c, &irq, QUEUE_SIZE, 2, 32);
        write(&mut c, &irq, QUEUE_DESC, 4, 0x1000);
        write(&mut c, &irq, QUEUE_DESC + 4, 4, 0x2);
        write(&mut c, &irq, QUEUE_DRIVER, 8, 0x3_0000_2000);
        write(&mut c, &irq, QUEUE_DEVICE + 4, 4, 0x4);
        write(&mut c, &irq, QUEUE_MSIX_VECTOR, 2, 2);
        assert_eq!(read(&c, &irq, QUEUE_DESC, 8), 0x2_0000_1000);
        assert_eq!(read(&c, &irq, QUEUE_DRIVER + 4, 4), 3);
        assert_eq!(read(&c, &irq, QUEUE_DEVICE, 8), 0x4_0000_0000);
        assert_eq!(read(&c, &irq, QUEUE_MSIX_VECTOR, 2), 2);
        write(&mut c, &irq, QUEUE_ENABLE, 2, 1);
        write(&mut c, &irq, QUEUE_SIZE, 2, 16);
        write(&mut c, &irq, QUEUE_DESC, 8, 0);
        write(&mut c, &irq, QUEUE_ENABLE, 2, 0);
        let q = c.queues()[1];
        assert_eq!((q.size, q.enabled, q.desc, q.driver), (32, true, 0x2_0000_1000, 0x3_0000_2000));
        assert!(!c.queues()[0].enabled);

        // A queue that does not exist reads zero and takes no writes.
        write(&mut c, &irq, QUEUE_SELECT, 2, 9);
        write(&mut c, &irq, QUEUE_SIZE, 2, 8);
        write(&mut c, &irq, QUEUE_MSIX_VECTOR, 2, 0);
        assert_eq!(read(&c, &irq, QUEUE_SIZE, 2), 0);
        assert_eq!(read(&c, &irq, QUEUE_MSIX_VECTOR, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        assert_eq!(read(&c, &irq, QUEUE_DESC, 8), 0);
    }

    #[test]
    fn vectors_beyond_the_table_read_back_no_vector() {
        let (mut c, irq) = setup();
        write(&mut c, &irq, CONFIG_MSIX_VECTOR, 2, 2);
        assert_eq!(read(&c, &irq, CONFIG_MSIX_VECTOR, 2), 2);
        write(&mut c, &irq, CONFIG_MSIX_VECTOR, 2, 3);
        assert_eq!(read(&c, &irq, CONFIG_MSIX_VECTOR, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    }

    #[test]
    fn status_writes_go_to_the_transport_and_reset_restores_defaults() {
        let (mut c, irq) = setup();
        assert_eq!(write(&mut c, &irq, DEVICE_STATUS, 1, 3), CommonWrite::Status(3));
        assert_eq!(write(&mut c, &irq, DEVICE_STATUS, 2, 3), CommonWrite::Done);
        c.set_status(3);
        write(&mut c, &irq, QUEUE_SIZE, 2, 16);
        write(&mut c, &irq, QUEUE_ENABLE, 2, 1);
        write(&mut c, &irq, QUEUE_SELECT, 2, 1);
        c.reset();
        assert_eq!(c.status(), 0);
        assert_eq!(read(&c, &irq, QUEUE_SELECT, 2), 0);
        assert_eq!(c.queues()[0], QueueRegisters::new(256));
    }

    #[test]
    fn odd_accesses_read_zero_and_write_nothing() {
        let (mut c, irq) = setup();
        for (offset, len) in [(0x04, 2), (0x05, 4), (0x12, 4), (0x14, 2), (0x22, 4), (0x24, 8), (0x38, 4), (0xfff, 1)] {
            assert_eq!(read(&c, &irq, offset, len), 0, "read at {offset:#x}+{len}");
            assert_eq!(write(&mut c, &irq, offset, len, u64::MAX), CommonWrite::Done);
        }
        let mut wide = [0xaa; 16];
        c.read(0, &mut wide, OFFERED, &irq);
        assert_eq!(wide, [0; 16]);
        assert_eq!(c.write(0x14, &[1; 16], OFFERED, &irq), CommonWrite::Done);
        c.read(u64::MAX, &mut wide[..4], OFFERED, &irq);
        assert_eq!(c.queues()[0], QueueRegisters::new(256));
        assert_eq!(read(&c, &irq, QUEUE_DESC, 8), 0);
    }
}
