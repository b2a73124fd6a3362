//! How a virtio device's interrupts become MSI-X messages: the vector the driver
//! assigned to the configuration change and to each queue, the ISR, and the
//! [`VirtioInterrupt`] the device's worker raises them through.
//!
//! A device announces a configuration change by raising the config interrupt, so that
//! is also where config_generation moves: a driver that reads the generation around
//! a multi-field config read sees it change if the device signalled in between.
//!
//! The worker runs on the VMM's event loop while vCPUs write the vector registers, so
//! the assignments are atomics and the MSI-X state sits behind its own lock: raising
//! an interrupt never takes the transport's lock.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use devices::virtio::{VirtioInterrupt, VirtioInterruptType};

use crate::msix::Msix;

/// The driver assigned no vector (or one the table does not have).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
const ISR_QUEUE: u8 = 1 << 0;
const ISR_CONFIG: u8 = 1 << 1;

pub struct VirtioPciInterrupt {
    table_size: u16,
    config_vector: AtomicU16,
    config_generation: AtomicU8,
    queue_vectors: Vec<AtomicU16>,
    isr: AtomicU8,
    msix: Arc<Mutex<Msix>>,
}

impl VirtioPciInterrupt {
    pub fn new(queues: usize, msix: Arc<Mutex<Msix>>) -> Self {
        let table_size = msix.lock().unwrap_or_else(|e| e.into_inner()).table_size();
        Self {
            table_size,
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            config_generation: AtomicU8::new(0),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR)).collect(),
            isr: AtomicU8::new(0),
            msix,
        }
    }

    fn lock_msix(&self) -> std::sync::MutexGuard<'_, Msix> {
        // Each MSI-X operation leaves the table consistent, so a poisoned lock is usable.
        self.msix.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the vector registers read back after the driver wrote `vector`: the spec
    /// has the device answer NO_VECTOR for a vector it cannot use.
    fn accepted(&self, vector: u16) -> u16 {
        if vector < self.table_size {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    pub fn set_config_vector(&self, vector: u16) {
        self.config_vector.store(self.accepted(vector), Ordering::Release);
    }

    /// The vector of queue `queue`; NO_VECTOR for a queue that does not exist.
    pub fn queue_vector(&self, queue: u16) -> u16 {
        self.queue_vectors.get(usize::from(queue)).map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    pub fn set_queue_vector(&self, queue: u16, vector: u16) {
        let accepted = self.accepted(vector);
        if let Some(v) = self.queue_vectors.get(usize::from(queue)) {
            v.store(accepted, Ordering::Release);
        }
    }

    pub fn config_generation(&self) -> u8 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Reading the ISR returns its bits and clears them.
    pub fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::AcqRel)
    }

    /// Virtio reset: no vector assignments, ISR clear. MSI-X itself is PCI state and
    /// survives a virtio reset.
    pub fn reset(&self) {
        self.config_vector.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for v in &self.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
        self.isr.store(0, Ordering::Release);
    }
}

impl VirtioInterrupt for VirtioPciInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        let (vector, isr) = match kind {
            VirtioInterruptType::Config => {
                self.config_generation.fetch_add(1, Ordering::AcqRel);
                (self.config_vector(), ISR_CONFIG)
            }
            VirtioInterruptType::Queue(q) if usize::from(q) < self.queue_vectors.len() => {
                (self.queue_vector(q), ISR_QUEUE)
            }
            VirtioInterruptType::Queue(q) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("queue {q} does not exist (the device has {})", self.queue_vectors.len()),
                ))
            }
        };
        // The ISR is only how a driver without MSI-X tells interrupts apart; setting
        // it always costs nothing and keeps a polling driver working.
        self.isr.fetch_or(isr, Ordering::AcqRel);
        if vector == VIRTIO_MSI_NO_VECTOR {
            return Ok(());
        }
        self.lock_msix().trigger(vector).map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::testing::{Call, RecordingVectors};

    #[test]
    fn routes_config_and_queue_interrupts_to_their_vectors() {
        let v = Arc::new(RecordingVectors::default());
        let msix = Arc::new(Mutex::new(Msix::new(3, v.clone()).unwrap()));
        let irq = VirtioPciInterrupt::new(2, msix.clone());
        irq.set_config_vector(0);
        irq.set_queue_vector(1, 2);
        irq.set_queue_vector(0, 3);
        irq.set_queue_vector(7, 1);
        assert_eq!((irq.config_vector(), irq.queue_vector(0), irq.queue_vector(1)), (0, VIRTIO_MSI_NO_VECTOR, 2));
        assert_eq!(irq.queue_vector(7), VIRTIO_MSI_NO_VECTOR);

        {
            let mut m = msix.lock().unwrap();
            m.set_control(1 << 15);
            for vector in [0u64, 2] {
                m.write_table(vector * 16, &0xfee0_0000u64.to_le_bytes());
                m.write_table(vector * 16 + 12, &0u32.to_le_bytes());
            }
        }
        v.take();
        irq.trigger(VirtioInterruptType::Queue(1)).unwrap();
        irq.trigger(VirtioInterruptType::Queue(0)).unwrap();
        irq.trigger(VirtioInterruptType::Config).unwrap();
        assert!(irq.trigger(VirtioInterruptType::Queue(2)).is_err());
        assert_eq!(v.take(), vec![Call::Trigger(2), Call::Trigger(0)]);
        assert_eq!(irq.take_isr(), ISR_QUEUE | ISR_CONFIG);
        assert_eq!(irq.take_isr(), 0);
        assert_eq!(irq.config_generation(), 1);
        irq.reset();
        assert_eq!(irq.config_vector(), VIRTIO_MSI_NO_VECTOR);
    }
}
