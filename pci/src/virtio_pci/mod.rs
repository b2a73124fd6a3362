//! The modern virtio-pci transport (virtio 1.x, non-transitional): a [`PciDevice`]
//! over any [`VirtioDevice`].
//!
//! Everything lives in BAR 0 (see `layout`): the common, ISR, device and notify
//! structures and the MSI-X table and PBA. The device raises interrupts through
//! [`VirtioInterrupt`], implemented over MSI-X; the driver's queue notifications arrive
//! on one eventfd per queue, which the VMM registers as KVM ioeventfds
//! ([`PciDevice::ioeventfds`]) and which a notify write arriving as an MMIO exit
//! signals too. When the driver sets DRIVER_OK the transport builds the queues,
//! activates the device and hands its worker to the VMM's event loop through
//! [`WorkerHost`]; a reset takes the worker back.

mod common_cfg;
mod interrupt;
mod layout;
#[cfg(test)]
mod tests;

use std::any::Any;
use std::io;
use std::sync::{Arc, Mutex};

use devices::virtio::{
    ActivateError, ActivatedQueue, GuestMemory, VirtioDevice, VirtioInterrupt, VirtioInterruptType, Worker,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_ADMIN_VQ,
    VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_NOTIF_CONFIG_DATA, VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET, VIRTIO_F_SR_IOV,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{self, BarChange, BarKind, BarSpec, ConfigError, PciConfiguration, PciHeader};
use crate::device::{BarIoEvent, PciDevice};
use crate::interrupt::MsiVectors;
use crate::msix::{self, Msix, MsixError};
use common_cfg::{CommonConfig, CommonWrite, QueueRegisters};
use interrupt::VirtioPciInterrupt;
pub use interrupt::VIRTIO_MSI_NO_VECTOR;
use layout::*;

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Non-transitional devices should have revision 1 or higher.
const VIRTIO_PCI_REVISION: u8 = 1;
/// Non-transitional devices should have a subsystem device ID of 0x40 or higher.
const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
/// Device types with a modern PCI device ID (0x1040 + type stays below 0x1080).
const MAX_DEVICE_TYPE: u32 = 0x3f;
const VIRTIO_TYPE_NET: u32 = 1;
const VIRTIO_TYPE_BLOCK: u32 = 2;

const STATUS_FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const STATUS_DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
const STATUS_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;

/// Transport features this transport does not implement, hidden from the driver
/// whatever the device offers.
const UNSUPPORTED_TRANSPORT_FEATURES: u64 = 1 << VIRTIO_F_RING_PACKED
    | 1 << VIRTIO_F_SR_IOV
    | 1 << VIRTIO_F_NOTIFICATION_DATA
    | 1 << VIRTIO_F_NOTIF_CONFIG_DATA
    | 1 << VIRTIO_F_RING_RESET
    | 1 << VIRTIO_F_ADMIN_VQ;

/// Identifies a worker the [`WorkerHost`] runs.
pub type WorkerId = u64;

/// The VMM's device event loop, as the transport sees it.
pub trait WorkerHost: Send + Sync {
    /// Runs `worker` until `stop`.
    fn start(&self, worker: Worker) -> io::Result<WorkerId>;

    /// Removes the worker and drops it before returning: the device resets right
    /// after. Called with the transport's lock held (from a vCPU's register write, or
    /// from hot-unplug), so the worker must never need that lock; and it may be called
    /// on the event loop's own thread, which then must not wait for itself.
    fn stop(&self, id: WorkerId);

    /// The driver's DRIVER_OK failed; the device now shows DEVICE_NEEDS_RESET. For the
    /// VMM to report why (the guest only sees that it failed).
    fn activation_failed(&self, error: &VirtioPciError) {
        let _ = error;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("virtio device type {0} has no modern virtio-pci device ID (types 1 to 63 do)")]
    DeviceType(u32),
    #[error("the device has {0} queues; the virtio-pci transport takes 1 to {MAX_QUEUES}")]
    QueueCount(usize),
    #[error("queue {queue}: maximum size {max} is not a power of two from 1 to 32768")]
    QueueMaxSize { queue: usize, max: u16 },
    #[error("cannot create an eventfd for queue {queue}'s notifications: {source}")]
    EventFd {
        queue: usize,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Msix(#[from] MsixError),
    #[error("queue {queue}: the driver's setup is invalid: {source}")]
    QueueSetup {
        queue: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error(
        "queue {queue}: its rings (size {}, descriptors at {:#x}, driver area {:#x}, device area {:#x}) \
         are not all in guest RAM",
        regs.size, regs.desc, regs.driver, regs.device
    )]
    QueueOutsideRam { queue: u16, regs: QueueRegisters },
    #[error("the device refused to start: {0}")]
    Activate(#[source] ActivateError),
    #[error("cannot start the device's worker: {0}")]
    StartWorker(#[source] io::Error),
}

/// How many MSI-X vectors a device needs: one per queue and one for config changes.
/// The VMM creates the device's `MsiVectors` with this many.
pub fn msix_vector_count(device: &dyn VirtioDevice) -> u16 {
    u16::try_from(device.queue_max_sizes().len() + 1).unwrap_or(u16::MAX)
}

pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    common: CommonConfig,
    interrupt: Arc<VirtioPciInterrupt>,
    msix: Arc<Mutex<Msix>>,
    msix_cap: usize,
    pci_cfg_cap: usize,
    layout: BarLayout,
    notify: Vec<EventFd>,
    mem: GuestMemory,
    workers: Arc<dyn WorkerHost>,
    worker: Option<WorkerId>,
}

/// Where in BAR 0 an access lands, with its offset inside that structure.
enum Region {
    Common(u64),
    Isr(u64),
    Device(u64),
    Notify(u64),
    MsixTable(u64),
    MsixPba(u64),
}

fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        VIRTIO_TYPE_NET => (0x02, 0x00),   // network: Ethernet
        VIRTIO_TYPE_BLOCK => (0x01, 0x80), // mass storage: other
        _ => (0xff, 0x00),                 // unclassified
    }
}

impl VirtioPciDevice {
    /// Wraps `device`. `vectors` must hold [`msix_vector_count`] vectors; `mem` is the
    /// guest RAM the queues live in.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        vectors: Arc<dyn MsiVectors>,
        workers: Arc<dyn WorkerHost>,
    ) -> Result<Self, VirtioPciError> {
        let device_type = device.device_type();
        if device_type == 0 || device_type > MAX_DEVICE_TYPE {
            return Err(VirtioPciError::DeviceType(device_type));
        }
        let max_sizes = device.queue_max_sizes().to_vec();
        if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::QueueCount(max_sizes.len()));
        }
        for (queue, &max) in max_sizes.iter().enumerate() {
            Queue::new(max).map_err(|_| VirtioPciError::QueueMaxSize { queue, max })?;
        }
        let vector_count = msix_vector_count(device.as_ref());
        let layout = BarLayout::new(vector_count);

        let (config, pci_cfg_cap, msix_cap) = pci_config(device_type, max_sizes.len(), vector_count, &layout)?;

        let msix = Arc::new(Mutex::new(Msix::new(vector_count, vectors)?));
        let notify = (0..max_sizes.len())
            .map(|queue| EventFd::new(EFD_NONBLOCK).map_err(|source| VirtioPciError::EventFd { queue, source }))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config,
            device,
            common: CommonConfig::new(&max_sizes),
            interrupt: Arc::new(VirtioPciInterrupt::new(max_sizes.len(), msix.clone())),
            msix,
            msix_cap,
            pci_cfg_cap,
            layout,
            notify,
            mem,
            workers,
            worker: None,
        })
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The device_status register (for diagnostics).
    pub fn status(&self) -> u8 {
        self.common.status()
    }

    fn lock_msix(&self) -> std::sync::MutexGuard<'_, Msix> {
        self.msix.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn offered_features(&self) -> u64 {
        self.device.features() & !UNSUPPORTED_TRANSPORT_FEATURES
    }

    fn region(&self, offset: u64) -> Option<Region> {
        let inside = |start: u64, len: u64| offset.checked_sub(start).filter(|&o| o < len);
        let page = 0x1000;
        if let Some(o) = inside(COMMON_CFG_OFFSET, page) {
            Some(Region::Common(o))
        } else if let Some(o) = inside(ISR_OFFSET, page) {
            Some(Region::Isr(o))
        } else if let Some(o) = inside(DEVICE_CFG_OFFSET, DEVICE_CFG_LEN) {
            Some(Region::Device(o))
        } else if let Some(o) = inside(NOTIFY_OFFSET, page) {
            Some(Region::Notify(o))
        } else if let Some(o) = inside(MSIX_TABLE_OFFSET, self.layout.table_region_len) {
            Some(Region::MsixTable(o))
        } else {
            inside(self.layout.pba_offset, self.layout.pba_region_len).map(Region::MsixPba)
        }
    }

    fn read_bar0(&mut self, offset: u64, data: &mut [u8]) {
        match self.region(offset) {
            Some(Region::Common(o)) => self.common.read(o, data, self.offered_features(), &self.interrupt),
            Some(Region::Isr(0)) if data.len() == 1 => data.fill(self.interrupt.take_isr()),
            Some(Region::Isr(_) | Region::Notify(_)) => data.fill(0),
            Some(Region::Device(o)) => self.device.read_config(o, data),
            Some(Region::MsixTable(o)) => self.lock_msix().read_table(o, data),
            Some(Region::MsixPba(o)) => self.lock_msix().read_pba(o, data),
            None => data.fill(0xff),
        }
    }

    fn write_bar0(&mut self, offset: u64, data: &[u8]) {
        match self.region(offset) {
            Some(Region::Common(o)) => {
                if let CommonWrite::Status(value) = self.common.write(o, data, self.offered_features(), &self.interrupt)
                {
                    self.write_status(value);
                }
            }
            Some(Region::Device(o)) => self.device.write_config(o, data),
            Some(Region::Notify(o)) => self.notify_queue(o),
            Some(Region::MsixTable(o)) => self.lock_msix().write_table(o, data),
            Some(Region::MsixPba(o)) => self.lock_msix().write_pba(o, data),
            Some(Region::Isr(_)) | None => {}
        }
    }

    /// A notify write that reached us as an MMIO exit rather than through KVM.
    fn notify_queue(&self, offset: u64) {
        if offset & (u64::from(NOTIFY_OFF_MULTIPLIER) - 1) != 0 {
            return;
        }
        let queue = offset / u64::from(NOTIFY_OFF_MULTIPLIER);
        if let Some(eventfd) = usize::try_from(queue).ok().and_then(|q| self.notify.get(q)) {
            // Fails only if the counter would overflow, and then it is signalled anyway.
            let _ = eventfd.write(1);
        }
    }

    /// The driver wrote `value` to device_status (virtio 1.2, 2.1 and 3.1.1).
    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.common.status();
        // The driver only ever adds bits; a write that drops one is invalid. Ignore it.
        let driver_bits = old & !STATUS_NEEDS_RESET;
        if value & driver_bits != driver_bits {
            return;
        }
        let mut new = (value & !STATUS_NEEDS_RESET) | (old & STATUS_NEEDS_RESET);
        let added = new & !old;
        if added & STATUS_FEATURES_OK != 0 && !self.accept_features() {
            // The driver reads the status back and gives up on the device.
            new &= !STATUS_FEATURES_OK;
        }
        if added & STATUS_DRIVER_OK != 0 {
            if new & STATUS_FEATURES_OK == 0 || new & STATUS_NEEDS_RESET != 0 {
                new &= !STATUS_DRIVER_OK;
            } else {
                match self.activate() {
                    Ok(id) => self.worker = Some(id),
                    Err(error) => {
                        new |= STATUS_NEEDS_RESET;
                        self.common.set_status(new);
                        self.workers.activation_failed(&error);
                        // The spec asks for a config change notification so the driver
                        // notices; if it cannot be delivered the status still shows it.
                        let _ = self.interrupt.trigger(VirtioInterruptType::Config);
                    }
                }
            }
        }
        self.common.set_status(new);
    }

    /// FEATURES_OK: a modern device works only with VERSION_1 accepted.
    fn accept_features(&mut self) -> bool {
        let acked = self.common.driver_features();
        if acked & (1 << VIRTIO_F_VERSION_1) == 0 {
            return false;
        }
        self.device.set_acked_features(acked);
        true
    }

    /// DRIVER_OK: builds the enabled queues and starts the device.
    fn activate(&mut self) -> Result<WorkerId, VirtioPciError> {
        let event_idx = self.common.driver_features() & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::new();
        for (index, (regs, notify)) in self.common.queues().iter().zip(&self.notify).enumerate() {
            if !regs.enabled {
                continue;
            }
            // At most MAX_QUEUES queues.
            let index = index as u16;
            let queue = build_queue(index, regs, event_idx, &self.mem)?;
            let notify =
                notify.try_clone().map_err(|source| VirtioPciError::EventFd { queue: index.into(), source })?;
            queues.push(ActivatedQueue { index, queue, notify });
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let worker = self.device.activate(self.mem.clone(), interrupt, queues).map_err(VirtioPciError::Activate)?;
        self.workers.start(worker).map_err(VirtioPciError::StartWorker)
    }

    /// Virtio reset: the worker goes first, then the device and every register.
    fn reset(&mut self) {
        if let Some(id) = self.worker.take() {
            self.workers.stop(id);
        }
        self.device.reset();
        self.common.reset();
        self.interrupt.reset();
        for eventfd in &self.notify {
            // Drop stale notifications; EAGAIN just means there were none.
            let _ = eventfd.read();
        }
    }

    /// The PCI configuration access window's target: (offset in BAR 0, length), if the
    /// driver programmed a valid one.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let offset = u64::from(self.config.read_u32(cap + CAP_OFFSET));
        let len: usize = match self.config.read_u32(cap + CAP_LENGTH) {
            1 => 1,
            2 => 2,
            4 => 4,
            _ => return None,
        };
        let aligned = offset & (len as u64 - 1) == 0;
        let fits = offset.checked_add(len as u64).is_some_and(|end| end <= self.layout.size);
        (self.config.read_u8(cap + CAP_BAR) == VIRTIO_BAR && aligned && fits).then_some((offset, len))
    }

    fn touches_pci_cfg_data(&self, offset: u64, len: usize) -> bool {
        config::ranges_overlap(offset, len as u64, (self.pci_cfg_cap + PCI_CFG_DATA) as u64, 4)
    }
}

/// The function's config space: header, BAR 0 and the capabilities pointing into it.
/// Returns it with the offsets of the PCI config access and MSI-X capabilities.
fn pci_config(
    device_type: u32,
    queues: usize,
    vector_count: u16,
    layout: &BarLayout,
) -> Result<(PciConfiguration, usize, usize), VirtioPciError> {
    let (class, subclass) = class_of(device_type);
    let mut config = PciConfiguration::new(&PciHeader {
        vendor_id: VIRTIO_PCI_VENDOR_ID,
        device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type as u16,
        revision_id: VIRTIO_PCI_REVISION,
        class,
        subclass,
        prog_if: 0,
        subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
        subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        // No INTx: interrupts are MSI-X only.
        interrupt_pin: 0,
    });
    config.add_bar(BarSpec { index: VIRTIO_BAR, size: layout.size, kind: BarKind::Memory64, prefetchable: false })?;
    let notify_len = queues as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
    let caps = [
        capability(CAP_COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_LEN, &[]),
        capability(CAP_NOTIFY_CFG, NOTIFY_OFFSET, notify_len, &NOTIFY_OFF_MULTIPLIER.to_le_bytes()),
        capability(CAP_ISR_CFG, ISR_OFFSET, ISR_LEN, &[]),
        capability(CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN, &[]),
    ];
    for (body, writable) in &caps {
        config.add_capability(VENDOR_SPECIFIC_CAP_ID, body, writable)?;
    }
    let (body, writable) = pci_cfg_capability();
    let pci_cfg_cap = config.add_capability(VENDOR_SPECIFIC_CAP_ID, &body, &writable)?;
    let (body, writable) = msix::capability_body(vector_count, &layout.msix())?;
    let msix_cap = config.add_capability(msix::MSIX_CAPABILITY_ID, &body, &writable)?;

    Ok((config, pci_cfg_cap, msix_cap))
}

/// A `Queue` from what the driver set up, checked against guest RAM.
fn build_queue(index: u16, regs: &QueueRegisters, event_idx: bool, mem: &GuestMemory) -> Result<Queue, VirtioPciError> {
    let setup = |source| VirtioPciError::QueueSetup { queue: index, source };
    let mut queue = Queue::new(regs.max_size).map_err(setup)?;
    queue.try_set_size(regs.size).map_err(setup)?;
    queue.try_set_desc_table_address(GuestAddress(regs.desc)).map_err(setup)?;
    queue.try_set_avail_ring_address(GuestAddress(regs.driver)).map_err(setup)?;
    queue.try_set_used_ring_address(GuestAddress(regs.device)).map_err(setup)?;
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    if !queue.is_valid(mem) {
        return Err(VirtioPciError::QueueOutsideRam { queue: index, regs: *regs });
    }
    Ok(queue)
}

impl PciDevice for VirtioPciDevice {
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        if self.touches_pci_cfg_data(offset, data.len()) {
            if let Some((bar_offset, len)) = self.pci_cfg_window() {
                let mut window = [0; 4];
                let window = &mut window[..len];
                self.read_bar0(bar_offset, window);
                self.config.set_bytes(self.pci_cfg_cap + PCI_CFG_DATA, window);
            }
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> Vec<BarChange> {
        let changes = self.config.write(offset, data);
        let control = self.msix_cap + msix::MSIX_CONTROL_OFFSET;
        if config::ranges_overlap(offset, data.len() as u64, control as u64, 2) {
            let value = self.config.read_u16(control);
            self.lock_msix().set_control(value);
        }
        if self.touches_pci_cfg_data(offset, data.len()) {
            if let Some((bar_offset, len)) = self.pci_cfg_window() {
                let mut window = [0; 4];
                self.config.read((self.pci_cfg_cap + PCI_CFG_DATA) as u64, &mut window);
                self.write_bar0(bar_offset, &window[..len]);
            }
        }
        changes
    }

    fn bars(&self) -> Vec<BarSpec> {
        self.config.bars()
    }

    fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), ConfigError> {
        self.config.set_bar_address(index, addr)
    }

    fn bar_address(&self, index: u8) -> Option<u64> {
        self.config.bar_address(index)
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar == VIRTIO_BAR {
            self.read_bar0(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == VIRTIO_BAR {
            self.write_bar0(offset, data);
        }
    }

    fn ioeventfds(&self) -> Vec<BarIoEvent<'_>> {
        (0u64..)
            .zip(&self.notify)
            .map(|(queue, eventfd)| BarIoEvent {
                bar: VIRTIO_BAR,
                offset: NOTIFY_OFFSET + queue * u64::from(NOTIFY_OFF_MULTIPLIER),
                eventfd,
            })
            .collect()
    }

    fn detach(&mut self) {
        self.reset();
    }

    fn as_any(&mut self) -> &mut dyn Any {
        self
    }
}
