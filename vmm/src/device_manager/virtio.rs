//! Virtio devices on the PCI bus: virtio-blk on image files and virtio-net on taps,
//! each behind the virtio-pci transport with MSI-X vectors routed through KVM.

use std::sync::{Arc, Mutex};

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::net::{self, Net};
use devices::virtio::VirtioDevice;
use pci::virtio_pci::msix_vector_count;
use pci::VirtioPciDevice;

use super::{DeviceError, DeviceManager, DeviceStats, PciDeviceEntry};
use crate::config::{DiskConfig, NetConfig};
use crate::interrupt::KvmMsiVectors;

impl DeviceManager {
    pub fn add_disk(&mut self, disk: &DiskConfig) -> Result<u8, DeviceError> {
        let config =
            BlockConfig { path: disk.path.clone(), readonly: disk.readonly, direct: disk.direct, id: disk.id.clone() };
        let mut block =
            Block::new(config).map_err(|e| DeviceError::Backend { id: disk.id.clone(), reason: e.to_string() })?;
        block.set_notices(self.notices.clone());
        let stats = DeviceStats::Block(block.counters());
        self.add_virtio(&disk.id, Box::new(block), stats)
    }

    /// `standby` hears of the guest negotiating STANDBY (for a failover standby).
    pub fn add_net(&mut self, nic: &NetConfig, standby: Option<net::StandbyListener>) -> Result<u8, DeviceError> {
        let config =
            net::NetConfig { tap: nic.tap.clone(), mac: nic.mac, queue_pairs: nic.queues, standby: nic.standby };
        let mut dev =
            Net::new(&config).map_err(|e| DeviceError::Backend { id: nic.id.clone(), reason: e.to_string() })?;
        dev.set_notices(self.notices.clone());
        if let Some(listener) = standby {
            dev.set_standby_listener(listener);
        }
        let stats = DeviceStats::Net(dev.counters());
        self.add_virtio(&nic.id, Box::new(dev), stats)
    }

    fn add_virtio(&mut self, id: &str, device: Box<dyn VirtioDevice>, stats: DeviceStats) -> Result<u8, DeviceError> {
        let pci = self.pci.as_mut().ok_or(DeviceError::NoPci)?;
        let vectors = Arc::new(KvmMsiVectors::new(pci.vm.clone(), pci.routing.clone(), msix_vector_count(&*device))?);
        let transport = VirtioPciDevice::new(device, pci.memory.clone(), vectors, pci.event_loop.clone())
            .map_err(|e| DeviceError::Backend { id: id.to_string(), reason: e.to_string() })?;
        let shared: pci::SharedPciDevice = Arc::new(Mutex::new(transport));
        let slot = pci.segment.add(shared.clone())?;
        self.pci_devices.push(PciDeviceEntry {
            id: id.to_string(),
            slot,
            device: shared,
            stats,
            request: None,
            vectors: None,
        });
        Ok(slot)
    }
}
