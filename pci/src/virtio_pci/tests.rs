//! The transport driven the way a driver drives it, against a fake device, fake MSI
//! vectors and a fake event loop.
//!
//! The fake device cannot hand back a worker (a `Worker` is an event-manager
//! subscriber and this crate does not depend on event-manager), so it records what it
//! was activated with and then refuses: that exercises queue building, activation and
//! the DEVICE_NEEDS_RESET path, but not `WorkerHost::start`/`stop`.

use std::sync::{Arc, Mutex};

use devices::virtio::{ActivateError, ActivatedQueue, GuestMemory, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use super::*;
use crate::config::{CAPABILITIES_POINTER, COMMAND, COMMAND_MEMORY_SPACE};
use crate::interrupt::testing::{Call, RecordingVectors};

const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const FEATURES_OK: u8 = STATUS_FEATURES_OK;
const DRIVER_OK: u8 = STATUS_DRIVER_OK;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const PACKED: u64 = 1 << VIRTIO_F_RING_PACKED;
const DEVICE_FEATURE_BIT: u64 = 1 << 5;
const RAM_SIZE: u64 = 0x10_0000;

// Common configuration offsets, as a driver knows them.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// What a queue was activated with: index, size, desc, driver, device, event_idx.
type QueueSeen = (u16, u16, u64, u64, u64, bool);

#[derive(Default)]
struct FakeState {
    acked: Option<u64>,
    activations: Vec<Vec<QueueSeen>>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    resets: usize,
    config: [u8; 8],
}

struct FakeDevice {
    device_type: u32,
    features: u64,
    max_sizes: Vec<u16>,
    state: Arc<Mutex<FakeState>>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn set_acked_features(&mut self, features: u64) {
        self.state.lock().unwrap().acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let state = self.state.lock().unwrap();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset).ok().and_then(|o| state.config.get(o + i)).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut state = self.state.lock().unwrap();
        for (i, &b) in data.iter().enumerate() {
            if let Some(dst) = usize::try_from(offset).ok().and_then(|o| state.config.get_mut(o + i)) {
                *dst = b;
            }
        }
    }
    fn activate(
        &mut self,
        _mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<Worker, ActivateError> {
        let seen = queues
            .iter()
            .map(|q| {
                let queue = &q.queue;
                (
                    q.index,
                    queue.size(),
                    queue.desc_table(),
                    queue.avail_ring(),
                    queue.used_ring(),
                    queue.event_idx_enabled(),
                )
            })
            .collect();
        let mut state = self.state.lock().unwrap();
        state.activations.push(seen);
        state.interrupt = Some(interrupt);
        Err(ActivateError::Backend(io::Error::other("the fake device has no backend")))
    }
    fn reset(&mut self) {
        let mut state = self.state.lock().unwrap();
        state.resets += 1;
        state.acked = None;
    }
}

#[derive(Default)]
struct FakeHost {
    failures: Mutex<Vec<String>>,
}

impl WorkerHost for FakeHost {
    fn start(&self, _worker: Worker) -> io::Result<WorkerId> {
        Ok(1)
    }
    fn stop(&self, _id: WorkerId) {}
    fn activation_failed(&self, error: &VirtioPciError) {
        self.failures.lock().unwrap().push(error.to_string());
    }
}

struct Bed {
    dev: VirtioPciDevice,
    state: Arc<Mutex<FakeState>>,
    host: Arc<FakeHost>,
    vectors: Arc<RecordingVectors>,
}

fn fake(device_type: u32, features: u64, max_sizes: &[u16]) -> (Box<dyn VirtioDevice>, Arc<Mutex<FakeState>>) {
    let state = Arc::new(Mutex::new(FakeState::default()));
    let device = FakeDevice { device_type, features, max_sizes: max_sizes.to_vec(), state: state.clone() };
    (Box::new(device), state)
}

fn ram() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)]).unwrap()
}

fn try_bed(device_type: u32, max_sizes: &[u16]) -> Result<Bed, VirtioPciError> {
    let (device, state) = fake(device_type, VERSION_1 | EVENT_IDX | PACKED | DEVICE_FEATURE_BIT, max_sizes);
    let host = Arc::new(FakeHost::default());
    let vectors = Arc::new(RecordingVectors::default());
    let dev = VirtioPciDevice::new(device, ram(), vectors.clone(), host.clone())?;
    Ok(Bed { dev, state, host, vectors })
}

fn bed() -> Bed {
    try_bed(VIRTIO_TYPE_NET, &[256, 64]).unwrap()
}

impl Bed {
    fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0; 8];
        self.dev.read_bar(0, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn write(&mut self, offset: u64, len: usize, value: u64) {
        self.dev.write_bar(0, offset, &value.to_le_bytes()[..len]);
    }

    fn status(&mut self) -> u8 {
        self.read(DEVICE_STATUS, 1) as u8
    }

    fn set_status(&mut self, status: u8) {
        self.write(DEVICE_STATUS, 1, status.into());
    }

    fn config_u32(&mut self, offset: usize) -> u32 {
        let mut b = [0; 4];
        self.dev.read_config(offset as u64, &mut b);
        u32::from_le_bytes(b)
    }

    fn negotiate(&mut self, features: u64) {
        self.set_status(ACKNOWLEDGE);
        self.set_status(ACKNOWLEDGE | DRIVER);
        for select in 0..2 {
            self.write(DRIVER_FEATURE_SELECT, 4, select);
            self.write(DRIVER_FEATURE, 4, (features >> (32 * select)) & 0xffff_ffff);
        }
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    /// Sets up queue `queue` of `size` entries with its rings at `base`.
    fn setup_queue(&mut self, queue: u16, size: u16, base: u64) {
        self.write(QUEUE_SELECT, 2, queue.into());
        self.write(QUEUE_SIZE, 2, size.into());
        self.write(QUEUE_DESC, 4, base & 0xffff_ffff);
        self.write(QUEUE_DESC + 4, 4, base >> 32);
        self.write(QUEUE_DRIVER, 8, base + 0x1000);
        self.write(QUEUE_DEVICE, 8, base + 0x2000);
        self.write(QUEUE_ENABLE, 2, 1);
    }

    /// Turns MSI-X on through config space and programs `vector` unmasked.
    fn enable_msix_vector(&mut self, vector: u64) {
        let control = (self.dev.msix_cap + msix::MSIX_CONTROL_OFFSET) as u64;
        self.dev.write_config(control, &(1u16 << 15).to_le_bytes());
        let entry = MSIX_TABLE_OFFSET + 16 * vector;
        self.write(entry, 8, 0xfee0_0000);
        self.write(entry + 8, 4, 0x40 + vector);
        self.write(entry + 12, 4, 0);
    }

    fn failures(&self) -> Vec<String> {
        self.host.failures.lock().unwrap().clone()
    }
}

/// (capability ID, cfg_type, BAR, offset, length) of each capability in chain order.
fn capabilities(b: &mut Bed) -> Vec<(u8, u8, u8, u32, u32)> {
    let mut caps = Vec::new();
    let mut next = b.config_u32(CAPABILITIES_POINTER) as usize & 0xff;
    while next != 0 && caps.len() < 48 {
        let head = b.config_u32(next);
        let (id, cfg_type, bar) = (head as u8, (head >> 24) as u8, b.config_u32(next + 4) as u8);
        caps.push((id, cfg_type, bar, b.config_u32(next + 8), b.config_u32(next + 12)));
        next = (head >> 8) as usize & 0xff;
    }
    caps
}

#[test]
fn presents_a_modern_virtio_pci_function() {
    let mut b = bed();
    assert_eq!(b.config_u32(0x00), 0x1041_1af4);
    assert_eq!(b.config_u32(0x08), 0x0200_0001);
    assert_eq!(b.config_u32(0x2c), 0x1100_1af4);
    assert_eq!(b.config_u32(0x3c) >> 8 & 0xff, 0, "no INTx pin");
    assert_eq!(b.dev.bars(), vec![BarSpec { index: 0, size: 0x8000, kind: BarKind::Memory64, prefetchable: false }]);
    let caps = capabilities(&mut b);
    let vendor = VENDOR_SPECIFIC_CAP_ID;
    assert_eq!(
        caps[..5].to_vec(),
        vec![
            (vendor, CAP_COMMON_CFG, 0, 0x0000, 0x38),
            (vendor, CAP_NOTIFY_CFG, 0, 0x3000, 8),
            (vendor, CAP_ISR_CFG, 0, 0x1000, 1),
            (vendor, CAP_DEVICE_CFG, 0, 0x2000, 0x1000),
            (vendor, CAP_PCI_CFG, 0, 0, 0),
        ]
    );
    // Notify multiplier after the notify capability; MSI-X: 3 vectors, table and PBA in BAR 0.
    assert_eq!(b.config_u32(0x40 + 16 + 16), NOTIFY_OFF_MULTIPLIER);
    let msix_cap = b.dev.msix_cap;
    assert_eq!(caps[5].0, msix::MSIX_CAPABILITY_ID);
    assert_eq!(b.config_u32(msix_cap) >> 16, 2);
    assert_eq!((b.config_u32(msix_cap + 4), b.config_u32(msix_cap + 8)), (0x4000, 0x5000));
    assert_eq!(caps.len(), 6);
}

#[test]
fn rejects_devices_it_cannot_present() {
    assert!(matches!(try_bed(0, &[8]), Err(VirtioPciError::DeviceType(0))));
    assert!(matches!(try_bed(64, &[8]), Err(VirtioPciError::DeviceType(64))));
    assert!(matches!(try_bed(2, &[]), Err(VirtioPciError::QueueCount(0))));
    assert!(matches!(try_bed(2, &[8; 1025]), Err(VirtioPciError::QueueCount(1025))));
    assert!(matches!(try_bed(2, &[8, 12]), Err(VirtioPciError::QueueMaxSize { queue: 1, max: 12 })));
    let b = try_bed(2, &[8; 1024]).unwrap();
    assert_eq!(b.dev.bars()[0].size, 0x10000);
    assert_eq!(b.dev.ioeventfds().len(), 1024);
}

#[test]
fn negotiates_features_within_the_offer() {
    let mut b = bed();
    assert_eq!(b.read(DEVICE_FEATURE, 4), EVENT_IDX | DEVICE_FEATURE_BIT);
    b.write(DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(b.read(DEVICE_FEATURE, 4), 1, "VERSION_1 offered, RING_PACKED hidden");
    b.negotiate(u64::MAX);
    assert_eq!(b.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(b.state.lock().unwrap().acked, Some(VERSION_1 | EVENT_IDX | DEVICE_FEATURE_BIT));
}

#[test]
fn refuses_features_ok_without_version_1() {
    let mut b = bed();
    b.negotiate(EVENT_IDX);
    assert_eq!(b.status(), ACKNOWLEDGE | DRIVER);
    assert_eq!(b.state.lock().unwrap().acked, None);
}

#[test]
fn status_writes_that_clear_bits_or_skip_steps_are_ignored() {
    let mut b = bed();
    b.negotiate(VERSION_1);
    b.set_status(ACKNOWLEDGE);
    assert_eq!(b.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    let mut b = bed();
    b.set_status(ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert_eq!(b.status(), ACKNOWLEDGE | DRIVER, "DRIVER_OK needs FEATURES_OK");
    assert!(b.state.lock().unwrap().activations.is_empty());
}

#[test]
fn activation_gets_the_enabled_queues_and_failure_needs_reset() {
    let mut b = bed();
    b.negotiate(VERSION_1 | EVENT_IDX);
    b.enable_msix_vector(2);
    b.write(CONFIG_MSIX_VECTOR, 2, 2);
    b.setup_queue(1, 32, 0x1_0000);
    b.write(QUEUE_MSIX_VECTOR, 2, 0);
    b.vectors.take();
    b.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);

    let state = b.state.lock().unwrap();
    assert_eq!(state.activations, vec![vec![(1, 32, 0x1_0000, 0x1_1000, 0x1_2000, true)]]);
    drop(state);
    assert_eq!(b.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | STATUS_NEEDS_RESET);
    assert_eq!(
        b.failures(),
        vec!["the device refused to start: cannot set up the device's backend: the fake device has no backend"]
    );
    assert_eq!(b.vectors.take(), vec![Call::Trigger(2)], "config change interrupt");
    // Once the device needs a reset, DRIVER_OK does not try again.
    b.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | STATUS_NEEDS_RESET);
    assert_eq!(b.state.lock().unwrap().activations.len(), 1);
}

#[test]
fn invalid_queues_fail_activation_before_the_device() {
    for (size, base, error) in
        [(32, RAM_SIZE - 0x1000, "are not all in guest RAM"), (24, 0x1_0000, "invalid: "), (512, 0x1_0000, "invalid: ")]
    {
        let mut b = bed();
        b.negotiate(VERSION_1);
        b.setup_queue(0, size, base);
        b.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(b.state.lock().unwrap().activations.is_empty());
        assert_eq!(b.status() & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
        assert!(b.failures()[0].contains(error), "{:?}", b.failures());
    }
    // A misaligned descriptor table is refused too.
    let mut b = bed();
    b.negotiate(VERSION_1);
    b.setup_queue(0, 16, 0x1_0008);
    b.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(b.failures()[0].starts_with("queue 0: the driver's setup is invalid"), "{:?}", b.failures());
}

#[test]
fn reset_returns_to_defaults_and_keeps_msix() {
    let mut b = bed();
    b.negotiate(VERSION_1);
    b.enable_msix_vector(0);
    b.write(CONFIG_MSIX_VECTOR, 2, 0);
    b.setup_queue(0, 16, 0x1_0000);
    b.write(QUEUE_MSIX_VECTOR, 2, 1);
    b.dev.write_bar(0, NOTIFY_OFFSET, &[0, 0]);
    b.set_status(0);
    assert_eq!(b.status(), 0);
    let state = b.state.lock().unwrap();
    assert_eq!((state.resets, state.acked), (1, None));
    drop(state);
    assert_eq!(b.read(CONFIG_MSIX_VECTOR, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    b.write(QUEUE_SELECT, 2, 0);
    assert_eq!((b.read(QUEUE_SIZE, 2), b.read(QUEUE_ENABLE, 2), b.read(QUEUE_DESC, 8)), (256, 0, 0));
    assert_eq!(b.read(QUEUE_MSIX_VECTOR, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    assert!(b.dev.notify[0].read().is_err(), "stale notification drained");
    assert!(b.dev.lock_msix().is_enabled());
}

#[test]
fn notify_writes_signal_the_queue_eventfd() {
    let mut b = bed();
    let events: Vec<(u8, u64)> = b.dev.ioeventfds().iter().map(|e| (e.bar, e.offset)).collect();
    assert_eq!(events, vec![(0, NOTIFY_OFFSET), (0, NOTIFY_OFFSET + 4)]);
    b.write(NOTIFY_OFFSET + 4, 2, 1);
    assert_eq!(b.dev.notify[1].read().unwrap(), 1);
    assert!(b.dev.notify[0].read().is_err());
    for offset in [NOTIFY_OFFSET + 2, NOTIFY_OFFSET + 8, NOTIFY_OFFSET + 0xffc] {
        b.write(offset, 2, 0);
    }
    assert!(b.dev.notify.iter().all(|e| e.read().is_err()));
    assert_eq!(b.read(NOTIFY_OFFSET, 4), 0);
}

#[test]
fn device_config_isr_and_queue_interrupts() {
    let mut b = bed();
    b.write(DEVICE_CFG_OFFSET + 2, 2, 0xbeef);
    assert_eq!(b.read(DEVICE_CFG_OFFSET, 4), 0xbeef_0000);
    assert_eq!(b.read(DEVICE_CFG_OFFSET + 0xffc, 4), 0);

    b.negotiate(VERSION_1);
    b.enable_msix_vector(1);
    b.setup_queue(0, 16, 0x1_0000);
    b.write(QUEUE_MSIX_VECTOR, 2, 1);
    b.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    b.read(ISR_OFFSET, 1);
    b.vectors.take();
    let irq = b.state.lock().unwrap().interrupt.clone().unwrap();
    irq.trigger(VirtioInterruptType::Queue(0)).unwrap();
    irq.trigger(VirtioInterruptType::Queue(1)).unwrap();
    assert!(irq.trigger(VirtioInterruptType::Queue(2)).is_err());
    assert_eq!(b.vectors.take(), vec![Call::Trigger(1)], "queue 1 has no vector");
    assert_eq!(b.read(ISR_OFFSET, 2), 0, "ISR is a byte");
    assert_eq!(b.read(ISR_OFFSET, 1), 1);
    assert_eq!(b.read(ISR_OFFSET, 1), 0, "reading clears it");
}

#[test]
fn msix_table_is_reachable_and_masking_pends() {
    let mut b = bed();
    b.enable_msix_vector(0);
    assert_eq!(b.vectors.take(), vec![Call::Enable(0, crate::interrupt::MsiMessage { addr: 0xfee0_0000, data: 0x40 })]);
    assert_eq!(b.read(MSIX_TABLE_OFFSET + 8, 4), 0x40);
    b.write(MSIX_TABLE_OFFSET + 12, 4, 1);
    b.dev.interrupt.set_config_vector(0);
    b.dev.interrupt.trigger(VirtioInterruptType::Config).unwrap();
    assert_eq!(b.read(0x5000, 8), 1, "pending in the PBA");
    b.write(MSIX_TABLE_OFFSET + 12, 4, 0);
    assert_eq!(b.vectors.take(), vec![Call::Mask(0), Call::Unmask(0), Call::Trigger(0)]);
    assert_eq!(b.read(0x5000, 8), 0);
}

#[test]
fn pci_cfg_window_reaches_bar0() {
    let mut b = bed();
    let cap = b.dev.pci_cfg_cap;
    b.dev.write_config((cap + CAP_OFFSET) as u64, &(NUM_QUEUES as u32).to_le_bytes());
    b.dev.write_config((cap + CAP_LENGTH) as u64, &2u32.to_le_bytes());
    assert_eq!(b.config_u32(cap + PCI_CFG_DATA) & 0xffff, 2);
    b.dev.write_config((cap + CAP_OFFSET) as u64, &(QUEUE_SELECT as u32).to_le_bytes());
    b.dev.write_config((cap + PCI_CFG_DATA) as u64, &1u32.to_le_bytes());
    assert_eq!(b.read(QUEUE_SELECT, 2), 1);
    // A misaligned or oversized window does nothing.
    b.dev.write_config((cap + CAP_OFFSET) as u64, &(QUEUE_SELECT as u32 + 1).to_le_bytes());
    b.dev.write_config((cap + PCI_CFG_DATA) as u64, &0u32.to_le_bytes());
    b.dev.write_config((cap + CAP_OFFSET) as u64, &0xffff_fffeu32.to_le_bytes());
    b.dev.write_config((cap + PCI_CFG_DATA) as u64, &0u32.to_le_bytes());
    assert_eq!(b.read(QUEUE_SELECT, 2), 1);
}

#[test]
fn bar_programming_and_decoding() {
    let mut b = bed();
    b.dev.set_bar_address(0, 0x1_0000_0000).unwrap();
    assert_eq!(b.dev.bar_address(0), Some(0x1_0000_0000));
    let changes = b.dev.write_config(COMMAND as u64, &[0]);
    assert_eq!(changes.len(), 1);
    assert_eq!(b.dev.write_config(COMMAND as u64, &[COMMAND_MEMORY_SPACE as u8])[0].new, Some(0x1_0000_0000));
    let mut data = [0; 4];
    b.dev.read_bar(1, 0, &mut data);
    assert_eq!(data, [0xff; 4]);
    b.dev.write_bar(2, 0, &data);
    b.dev.detach();
    assert_eq!(b.state.lock().unwrap().resets, 1);
}

/// A deterministic stream of pseudo-random numbers (an LCG is plenty for this).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 17
    }
}

#[test]
fn hostile_accesses_do_not_panic() {
    let mut b = bed();
    let mut rng = Lcg(7);
    let widths = [0usize, 1, 2, 3, 4, 8, 16];
    let interesting = [0u64, 1, 2, 4, 0xffff, 0xffff_ffff, u64::MAX];
    for _ in 0..50_000 {
        let r = rng.next();
        let width = widths[(r % widths.len() as u64) as usize];
        let offset = match r % 5 {
            0 => rng.next() % 0x8000,
            1 => rng.next() % 0x40,
            2 => rng.next() % 0x1000 + NOTIFY_OFFSET - 0x1000,
            3 => rng.next(),
            _ => u64::MAX - rng.next() % 16,
        };
        let value = interesting[(rng.next() % interesting.len() as u64) as usize].wrapping_add(rng.next() % 3);
        let mut data = value.to_le_bytes().repeat(2);
        data.truncate(width);
        match rng.next() % 4 {
            0 => b.dev.write_bar((r >> 8) as u8 % 3, offset, &data),
            1 => b.dev.read_bar((r >> 8) as u8 % 3, offset, &mut data),
            2 => {
                b.dev.write_config(offset % 0x1100, &data);
            }
            _ => b.dev.read_config(offset % 0x1100, &mut data),
        }
    }
    // Whatever happened, a reset brings the function back to a sane state.
    b.set_status(0);
    assert_eq!(b.status(), 0);
    assert_eq!(b.read(NUM_QUEUES, 2), 2);
}
