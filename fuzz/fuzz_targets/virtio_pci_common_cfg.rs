#![no_main]
//! The virtio-pci transport as a hostile driver programs it: reads and writes of any
//! width anywhere in BAR 0 (common configuration, ISR, device configuration, notify,
//! MSI-X table and PBA) and in config space (including the PCI configuration access
//! window), around a real virtio-net device whose workers a fake event loop holds.
//!
//! Checked: no panic; one worker at a time, started only by DRIVER_OK and stopped (by
//! its own id) before the device resets; DRIVER_OK without NEEDS_RESET reads back set
//! exactly while a worker runs, and DRIVER_OK never without FEATURES_OK; a reset reads back status 0; the offered
//! features always include VERSION_1 and never what the transport cannot do; the queue
//! count and identity read back unchanged; BAR changes are exactly the moves; MSI-X
//! routing follows the protocol.

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use devices::virtio::net::{FdBackend, Net, NetBackend};
use devices::virtio::{VirtioDevice, Worker};
use libfuzzer_sys::fuzz_target;
use pci::virtio_pci::{msix_vector_count, VirtioPciDevice, VirtioPciError, WorkerHost, WorkerId};
use pci::PciDevice;
use tandem_fuzz::bars::{check_changes, decoded};
use tandem_fuzz::driver::guest_memory;
use tandem_fuzz::vectors::ModelVectors;
use tandem_fuzz::Input;
use virtio_bindings::virtio_config::{VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1};

const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const FEATURES_OK: u8 = 8;
const DRIVER_OK: u8 = 4;
const NEEDS_RESET: u8 = 0x40;

/// The VMM's event loop, as far as the transport can tell: holds the workers it is
/// given and checks it is given them one at a time.
#[derive(Default)]
struct Host {
    live: Mutex<Option<(WorkerId, Worker)>>,
    next: Mutex<WorkerId>,
}

impl WorkerHost for Host {
    fn start(&self, worker: Worker) -> std::io::Result<WorkerId> {
        let mut live = self.live.lock().unwrap();
        assert!(live.is_none(), "a second worker started while worker {:?} runs", live.as_ref().map(|l| l.0));
        let mut next = self.next.lock().unwrap();
        *next += 1;
        *live = Some((*next, worker));
        Ok(*next)
    }

    fn stop(&self, id: WorkerId) {
        let mut live = self.live.lock().unwrap();
        assert_eq!(live.as_ref().map(|l| l.0), Some(id), "stop of a worker that is not the running one");
        *live = None;
    }

    fn activation_failed(&self, _error: &VirtioPciError) {}
}

impl Host {
    fn running(&self) -> bool {
        self.live.lock().unwrap().is_some()
    }
}

/// A BAR 0 offset: mostly inside one of its structures, sometimes anywhere.
fn bar_offset(input: &mut Input) -> u64 {
    let within = u64::from(input.u8());
    match input.u8() % 8 {
        0..=2 => within % 0x40,
        3 => 0x1000 + within % 4,
        4 => 0x2000 + within % 16,
        5 => 0x3000 + within % 32,
        6 => 0x4000 + u64::from(input.u16()) % 0x2000,
        _ => input.u64(),
    }
}

struct Rig {
    dev: VirtioPciDevice,
    host: Arc<Host>,
    queues: u16,
    identity: u32,
}

impl Rig {
    fn new(input: &mut Input) -> Self {
        let pairs = 1 + input.below(3) as usize;
        let backends: Vec<Box<dyn NetBackend>> = (0..pairs)
            .map(|_| {
                let (tap, _host) = UnixDatagram::pair().expect("socketpair");
                tap.set_nonblocking(true).expect("nonblocking");
                Box::new(FdBackend::new(tap.into())) as Box<dyn NetBackend>
            })
            .collect();
        let mut net = Net::with_backends("fuzz", Some([2, 0, 0, 0, 0, 1]), backends).expect("net device");
        if input.bool() {
            net.offer_standby();
        }
        let queues = net.queue_max_sizes().len() as u16;
        let count = msix_vector_count(&net);
        let vectors = Arc::new(ModelVectors::new(count, false, true));
        let host = Arc::new(Host::default());
        let dev = VirtioPciDevice::new(Box::new(net), guest_memory(), vectors, host.clone()).expect("transport");
        let mut rig = Self { dev, host, queues, identity: 0 };
        rig.identity = rig.config_u32(0);
        rig
    }

    fn config_u32(&mut self, at: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read_config(at, &mut b);
        u32::from_le_bytes(b)
    }

    fn bar(&mut self, at: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read_bar(0, at, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn write_config(&mut self, at: u64, data: &[u8]) {
        let specs = self.dev.bars();
        let before = decoded(&specs, |i| self.dev.bar_address(i));
        let changes = self.dev.write_config(at, data);
        let after = decoded(&specs, |i| self.dev.bar_address(i));
        check_changes(&specs, &before, &after, &changes);
    }

    /// A well-formed step of driver initialisation through BAR 0, for the fuzzer to
    /// start from: a status bit, a feature word, or one queue's set-up.
    fn driver_step(&mut self, input: &mut Input) {
        let w = |rig: &mut Self, at: u64, v: u64, len: usize| rig.dev.write_bar(0, at, &v.to_le_bytes()[..len]);
        match input.u8() % 4 {
            0 => {
                let status = self.bar(DEVICE_STATUS, 1) as u8 | [1, 2, FEATURES_OK, DRIVER_OK][input.below(4) as usize];
                w(self, DEVICE_STATUS, u64::from(status), 1);
            }
            1 => {
                let select = u64::from(input.u8() % 3);
                w(self, 0x08, select, 4);
                w(self, 0x0c, u64::from(input.u32()) | if select == 1 { 1 } else { 0 }, 4);
            }
            2 => {
                let q = u64::from(input.u8()) % (u64::from(self.queues) + 1);
                let base = q * 0x2000;
                w(self, 0x16, q, 2);
                w(self, 0x18, 1 << (input.u8() % 10), 2);
                w(self, 0x1a, u64::from(input.u8() % 8), 2);
                w(self, 0x20, base, 8);
                w(self, 0x28, base + 0x1000, 8);
                w(self, 0x30, base + 0x1400, 8);
                w(self, 0x1c, 1, 2);
            }
            _ => {
                // MSI-X on, one vector programmed, unmasked and given to the config.
                if let Some(cap) = self.capability(0x11) {
                    self.write_config(cap + 2, &0x8000u16.to_le_bytes());
                }
                let v = u64::from(input.u8() % 8);
                self.dev.write_bar(0, 0x4000 + 16 * v, &0xfee0_0000u64.to_le_bytes());
                self.dev.write_bar(0, 0x4000 + 16 * v + 12, &0u32.to_le_bytes());
                w(self, 0x10, v, 2);
            }
        }
    }

    /// The offset of the first capability with `id`, walking the list as a driver does.
    fn capability(&mut self, id: u8) -> Option<u64> {
        let mut next = u64::from(self.config_u32(0x34) as u8);
        for _ in 0..48 {
            if next == 0 {
                return None;
            }
            let header = self.config_u32(next);
            if header as u8 == id {
                return Some(next);
            }
            next = u64::from((header >> 8) as u8);
        }
        None
    }

    fn check(&mut self) {
        let status = self.bar(DEVICE_STATUS, 1) as u8;
        let running = self.host.running();
        // A failed activation keeps the driver's DRIVER_OK and adds NEEDS_RESET.
        let started = status & DRIVER_OK != 0 && status & NEEDS_RESET == 0;
        assert_eq!(started, running, "status {status:#x}, worker running: {running}");
        assert!(status & DRIVER_OK == 0 || status & FEATURES_OK != 0, "DRIVER_OK without FEATURES_OK: {status:#x}");
        assert_eq!(self.bar(NUM_QUEUES, 2), u64::from(self.queues));
        let select = self.bar(DEVICE_FEATURE_SELECT, 4);
        let mut offered = 0u64;
        for word in 0..2u64 {
            self.dev.write_bar(0, DEVICE_FEATURE_SELECT, &(word as u32).to_le_bytes());
            offered |= self.bar(DEVICE_FEATURE, 4) << (32 * word);
        }
        self.dev.write_bar(0, DEVICE_FEATURE_SELECT, &(select as u32).to_le_bytes());
        assert!(offered & 1 << VIRTIO_F_VERSION_1 != 0, "VERSION_1 not offered: {offered:#x}");
        assert!(offered & 1 << VIRTIO_F_RING_PACKED == 0, "packed rings offered: {offered:#x}");
        assert_eq!(self.config_u32(0), self.identity, "the identity changed");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut rig = Rig::new(&mut input);
    if input.bool() {
        // As firmware leaves it: BAR 0 placed and decoded, bus mastering on.
        let _ = rig.dev.set_bar_address(0, 0xe000_0000);
    }
    while !input.is_empty() {
        match input.u8() % 10 {
            0..=2 => {
                let (at, width) = (bar_offset(&mut input), input.width());
                let value = input.value(width);
                rig.dev.write_bar(0, at, &value);
                if at == DEVICE_STATUS && value == [0] {
                    assert_eq!(rig.bar(DEVICE_STATUS, 1), 0, "a reset left status set");
                    assert!(!rig.host.running(), "a reset left the worker running");
                }
            }
            3 | 4 => {
                let (at, width) = (bar_offset(&mut input), input.width());
                let mut buf = vec![0u8; width];
                rig.dev.read_bar(0, at, &mut buf);
            }
            5 => {
                let (at, width) = (u64::from(input.u8()), input.width());
                let value = input.value(width);
                rig.write_config(at, &value);
            }
            6 => {
                let (at, width) = (u64::from(input.u8()), input.width());
                let mut buf = vec![0u8; width];
                rig.dev.read_config(at, &mut buf);
            }
            7 => {
                let (bar, at, width) = (input.u8() % 7, bar_offset(&mut input), input.width());
                let value = input.value(width);
                rig.dev.write_bar(bar, at, &value);
                let mut buf = vec![0u8; width];
                rig.dev.read_bar(bar, at, &mut buf);
            }
            8 => rig.driver_step(&mut input),
            _ => {
                if input.u8() < 0x20 {
                    rig.dev.detach();
                } else {
                    rig.driver_step(&mut input);
                }
            }
        }
        rig.check();
    }
});
