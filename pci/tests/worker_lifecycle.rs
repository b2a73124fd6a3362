//! The virtio-pci transport hands a started device's worker to the VMM's event loop and
//! takes it back on reset, before the device resets. Needs `event-manager` as a
//! dev-dependency of tandem-pci (a `Worker` is an event-manager subscriber).

use std::sync::{Arc, Mutex};

use devices::virtio::{ActivateError, ActivatedQueue, GuestMemory, VirtioDevice, VirtioInterrupt, Worker};
use event_manager::{EventOps, Events, MutEventSubscriber};
use pci::interrupt::{MsiMessage, MsiVectors};
use pci::virtio_pci::{msix_vector_count, VirtioPciDevice, WorkerHost, WorkerId};
use pci::PciDevice;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

type Log = Arc<Mutex<Vec<String>>>;

struct IdleWorker;

impl MutEventSubscriber for IdleWorker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
    fn init(&mut self, _ops: &mut EventOps) {}
}

struct Device {
    log: Log,
}

impl VirtioDevice for Device {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn features(&self) -> u64 {
        1 << 32
    }
    fn set_acked_features(&mut self, _features: u64) {}
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        _mem: GuestMemory,
        _interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<Worker, ActivateError> {
        self.log.lock().unwrap().push(format!("activate {} queue(s)", queues.len()));
        Ok(Box::new(IdleWorker))
    }
    fn reset(&mut self) {
        self.log.lock().unwrap().push("device reset".into());
    }
}

struct Host {
    log: Log,
}

impl WorkerHost for Host {
    fn start(&self, _worker: Worker) -> std::io::Result<WorkerId> {
        self.log.lock().unwrap().push("start".into());
        Ok(7)
    }
    fn stop(&self, id: WorkerId) {
        self.log.lock().unwrap().push(format!("stop {id}"));
    }
}

struct NoVectors;

impl MsiVectors for NoVectors {
    fn enable(&self, _vector: u16, _msg: MsiMessage) {}
    fn disable(&self, _vector: u16) {}
    fn mask(&self, _vector: u16) {}
    fn unmask(&self, _vector: u16) {}
    fn trigger(&self, _vector: u16) -> std::io::Result<()> {
        Ok(())
    }
    fn notifier(&self, _vector: u16) -> Option<&EventFd> {
        None
    }
}

fn write(dev: &mut VirtioPciDevice, offset: u64, value: u64, len: usize) {
    dev.write_bar(0, offset, &value.to_le_bytes()[..len]);
}

#[test]
fn worker_runs_from_driver_ok_until_reset() {
    let log = Log::default();
    let device = Box::new(Device { log: log.clone() });
    assert_eq!(msix_vector_count(device.as_ref()), 2);
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let host = Arc::new(Host { log: log.clone() });
    let mut dev = VirtioPciDevice::new(device, mem, Arc::new(NoVectors), host).unwrap();

    write(&mut dev, 0x14, 1 | 2, 1);
    write(&mut dev, 0x08, 1, 4);
    write(&mut dev, 0x0c, 1, 4);
    write(&mut dev, 0x14, 1 | 2 | 8, 1);
    write(&mut dev, 0x18, 16, 2);
    write(&mut dev, 0x20, 0x1_0000, 8);
    write(&mut dev, 0x28, 0x1_1000, 8);
    write(&mut dev, 0x30, 0x1_2000, 8);
    write(&mut dev, 0x1c, 1, 2);
    write(&mut dev, 0x14, 1 | 2 | 8 | 4, 1);
    assert_eq!(dev.status(), 1 | 2 | 8 | 4);

    write(&mut dev, 0x14, 0, 1);
    assert_eq!(dev.status(), 0);
    // A second reset has no worker to stop.
    dev.detach();
    assert_eq!(*log.lock().unwrap(), ["activate 1 queue(s)", "start", "stop 7", "device reset", "device reset"]);
}
