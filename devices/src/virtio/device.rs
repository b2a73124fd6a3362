//! The contract between a virtio device and its transport.
//!
//! The transport (virtio-pci) owns the feature negotiation registers, queue set-up and
//! the interrupt vectors; the device owns its configuration space and, once the driver
//! sets DRIVER_OK, hands back a [`Worker`]: an event-manager subscriber that the VMM's
//! one device event loop runs. The worker waits on the queues' notification eventfds
//! (KVM ioeventfds) and on its backend (tap fd, ...), so no thread polls.

use std::sync::Arc;

use event_manager::MutEventSubscriber;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM as devices see it. Devices must not outlive the VM whose RAM it is: the
/// VMM removes every worker from the event loop before it drops the VM.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// What a device signals to the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The device configuration changed (e.g. link status).
    Config,
    /// Queue `n` has used buffers for the driver.
    Queue(u16),
}

/// How a device raises interrupts; implemented by the transport (MSI-X vector routing,
/// masking and pending bits live there).
pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()>;
}

/// A queue the driver enabled, ready to be processed.
pub struct ActivatedQueue {
    pub index: u16,
    pub queue: Queue,
    /// Signalled (by KVM, through an ioeventfd) when the driver notifies this queue.
    pub notify: EventFd,
}

/// The running half of an activated device, driven by the VMM's event loop.
pub type Worker = Box<dyn MutEventSubscriber + Send>;

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver enabled {got} queues; this device needs {expected}")]
    QueueCount { expected: usize, got: usize },
    #[error("the driver accepted features {features:#x} this device cannot work with: {reason}")]
    Features { features: u64, reason: String },
    #[error("cannot set up the device's backend: {0}")]
    Backend(#[source] std::io::Error),
}

/// Copies the part of a device's configuration space at `offset` into `data`; bytes
/// past its end (or offsets that overflow) read as zero, as the contract asks.
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        let at = offset.checked_add(i as u64).and_then(|o| usize::try_from(o).ok());
        *byte = at.and_then(|o| space.get(o)).copied().unwrap_or(0);
    }
}

pub trait VirtioDevice: Send {
    /// The virtio device ID (1 = net, 2 = block, ...).
    fn device_type(&self) -> u32;

    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;

    /// The features the driver accepted (always a subset of `features()`: the transport
    /// masks what the driver writes).
    fn set_acked_features(&mut self, features: u64);

    /// Reads the device-specific configuration space; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration space; writes to read-only fields or
    /// beyond the space are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set DRIVER_OK: start the device. The returned worker processes the
    /// queues and the backend until the VMM removes it from the event loop.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<Worker, ActivateError>;

    /// The driver reset the device. The VMM has already removed and dropped the worker;
    /// the device returns to its pre-negotiation state (acked features cleared).
    fn reset(&mut self);
}
