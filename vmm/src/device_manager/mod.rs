//! The device manager owns device creation, the buses and the guest interrupt lines
//! devices use. Nothing else creates devices or picks their addresses.

mod driver_watch;
mod hotplug;
mod legacy;
mod pci;
mod vf_traffic;
mod vfio;
mod vfio_checks;
mod virtio;

pub use driver_watch::{DriverReady, DriverStopping};
pub use hotplug::Removal;
pub use vf_traffic::{VfTraffic, VfTrafficCounts};
pub use vfio::{pci_sysfs_path, DmaMapStats, PassthroughReport, VfioHostError};
pub use vfio_checks::{check_passthrough_host, HostCheckError, InterruptRemapping};

use devices::Notices;
use std::sync::{Arc, Mutex};

use boot::layout::MemoryLayout;
use devices::legacy::{PowerSink, SerialDevice};
use devices::virtio::GuestMemory;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::pci::PciSegment;
use crate::event_loop::{DeviceEventLoop, EventLoopError};
use crate::interrupt::{GsiRouting, InterruptError};
use crate::vcpu::Buses;
use crate::vm::{KvmVm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd for {what}: {source}")]
    EventFd {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot place {what}: {source}")]
    Bus {
        what: &'static str,
        #[source]
        source: devices::BusError,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Interrupt(#[from] InterruptError),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error("PCI bus: {0}")]
    Pci(#[source] ::pci::PciBusError),
    #[error("PCI address window {0}")]
    Window(String),
    #[error("device {id}: {reason}")]
    Backend { id: String, reason: String },
    #[error("PCI devices need the PCI bus, which this VM was built without")]
    NoPci,
    #[error("this VM has no PCI hot-plug controller, so devices cannot leave it while it runs")]
    NoHotplug,
    #[error(transparent)]
    HostCheck(#[from] HostCheckError),
}

// The hot-plug controller (devices) and the AML that drives it (boot) describe one
// register block; neither crate depends on the other, so the VMM checks they agree.
const _: () = {
    use boot::acpi::hotplug as aml;
    use devices::hotplug as dev;
    assert!(dev::REGISTERS_LEN == aml::REGISTERS_LEN as u64);
    assert!(dev::REGISTERS_LEN == boot::layout::PCI_HOTPLUG_PORT_LEN as u64);
    assert!(dev::REG_SLOTS_UP == aml::REG_SLOTS_UP as u64 && dev::REG_SLOTS_DOWN == aml::REG_SLOTS_DOWN as u64);
    assert!(dev::REG_SLOTS_PRESENT == aml::REG_SLOTS_PRESENT as u64 && dev::REG_EJECT == aml::REG_EJECT as u64);
};

/// What PCI devices share: the segment, MSI routing, the worker loop, guest memory.
struct PciState {
    // Field order is drop order: the devices' BAR slots and the segment go before the
    // VFIO container, whose DMA mappings point into `memory` (and DeviceManager's Drop
    // has detached, i.e. reset, the devices before either).
    segment: PciSegment,
    vm: Arc<VmFd>,
    routing: Arc<GsiRouting>,
    event_loop: Arc<DeviceEventLoop>,
    memory: GuestMemory,
    /// Created with the first passthrough device; lives as long as the VM.
    vfio: Option<vfio::VfioHost>,
}

/// A device on the PCI bus, by the id the user gave it.
pub struct PciDeviceEntry {
    pub id: String,
    pub slot: u8,
    pub device: ::pci::SharedPciDevice,
    pub stats: DeviceStats,
    /// A passthrough device's VFIO request interrupt (the host wants it back), shared
    /// with whoever watches it; dropped with the entry, which tells the watcher to stop.
    pub request: Option<Arc<vmm_sys_util::eventfd::EventFd>>,
    /// A passthrough device's MSI vectors, which report when its guest driver stops.
    vectors: Option<Arc<driver_watch::WatchedVectors>>,
}

/// Where a device's counters are, for `info` and `counters` (the API).
#[derive(Clone)]
pub enum DeviceStats {
    Net(Arc<devices::virtio::net::NetCounters>),
    Block(Arc<devices::virtio::block::BlockCounters>),
    /// A host device passed through with VFIO, by its PCI address; a VF of a known
    /// model has its traffic counted (see `vf_traffic`).
    Passthrough {
        bdf: String,
        traffic: Option<Arc<VfTraffic>>,
    },
}

impl DeviceStats {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Net(_) => "virtio-net",
            Self::Block(_) => "virtio-blk",
            Self::Passthrough { .. } => "vfio-pci",
        }
    }
}

/// Counts of what the devices hold from KVM and VFIO.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceCounts {
    /// GSIs allocated for MSI/MSI-X vectors.
    pub msi_gsis: usize,
    /// KVM memory slots over passthrough BARs.
    pub bar_memory_slots: usize,
    /// Guest RAM regions mapped in the VFIO container for DMA.
    pub dma_mappings: usize,
    pub pci_devices: usize,
}

/// One device as the API lists it.
#[derive(Clone)]
pub struct DeviceSummary {
    pub id: String,
    pub slot: u8,
    pub stats: DeviceStats,
}

pub struct DeviceManager {
    buses: Arc<Buses>,
    /// Where devices report the guest's power-off and reset requests.
    power: PowerSink,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    pci: Option<PciState>,
    pci_devices: Vec<PciDeviceEntry>,
    hotplug: Option<hotplug::Hotplug>,
    notices: Notices,
    seccomp: crate::seccomp::SeccompFilters,
}

impl DeviceManager {
    /// `notices` hears what goes wrong in the devices while the guest runs.
    pub fn new(power: PowerSink, notices: Notices) -> Self {
        Self {
            buses: Arc::new(Buses::default()),
            power,
            notices,
            seccomp: Default::default(),
            serial: None,
            pci: None,
            pci_devices: Vec::new(),
            hotplug: None,
        }
    }

    /// The filter the device event loop (started by `enable_pci`) runs under.
    pub fn set_seccomp(&mut self, filters: crate::seccomp::SeccompFilters) {
        self.seccomp = filters;
    }

    /// Creates the PCI root bus (config ports, ECAM, BAR windows), the MSI routing
    /// table and the device event loop.
    pub fn enable_pci(&mut self, vm: &KvmVm, layout: &MemoryLayout) -> Result<(), DeviceError> {
        let segment = PciSegment::new(&self.buses, vm.fd_arc(), vm.device_slots()?, layout)?;
        self.pci = Some(PciState {
            segment,
            vm: vm.fd_arc(),
            routing: Arc::new(GsiRouting::new(vm.fd_arc())),
            event_loop: Arc::new(DeviceEventLoop::start(&self.seccomp)?),
            memory: vm.memory().clone(),
            vfio: None,
        });
        Ok(())
    }

    /// The devices on the PCI bus.
    pub fn pci_devices(&self) -> &[PciDeviceEntry] {
        &self.pci_devices
    }

    /// Whether a passthrough device has traffic counters to keep up to date.
    pub fn has_vf_traffic(&self) -> bool {
        self.pci_devices.iter().any(|e| matches!(&e.stats, DeviceStats::Passthrough { traffic: Some(_), .. }))
    }

    /// Brings every passthrough device's traffic counters up to date.
    pub fn sample_vf_traffic(&self) {
        for e in &self.pci_devices {
            if let DeviceStats::Passthrough { traffic: Some(t), .. } = &e.stats {
                t.sample();
            }
        }
    }

    /// The devices on the PCI bus, for another thread to report on.
    pub fn summary(&self) -> Vec<DeviceSummary> {
        let entry = |e: &PciDeviceEntry| DeviceSummary { id: e.id.clone(), slot: e.slot, stats: e.stats.clone() };
        self.pci_devices.iter().map(entry).collect()
    }

    /// What the devices hold now, for spotting leaks across hot-plug cycles.
    pub fn resources(&self) -> ResourceCounts {
        let Some(pci) = &self.pci else { return ResourceCounts::default() };
        ResourceCounts {
            msi_gsis: pci.routing.allocated(),
            bar_memory_slots: pci.segment.memory_slots(),
            dma_mappings: pci.vfio.as_ref().map_or(0, |v| v.dma_mappings()),
            pci_devices: self.pci_devices.len(),
        }
    }

    /// BAR moves the guest asked for that could not be applied (overlaps, KVM refusals).
    pub fn bar_map_failures(&self) -> u64 {
        self.pci.as_ref().map_or(0, |p| p.segment.map_failures())
    }

    pub fn buses(&self) -> &Arc<Buses> {
        &self.buses
    }

    /// COM1, if it was created, for feeding it host input.
    pub fn serial(&self) -> Option<&Arc<Mutex<SerialDevice>>> {
        self.serial.as_ref()
    }

    fn new_eventfd(what: &'static str) -> Result<EventFd, DeviceError> {
        EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::EventFd { what, source })
    }

    fn place_pio(
        &self,
        what: &'static str,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn devices::BusDevice>>,
    ) -> Result<(), DeviceError> {
        self.buses.pio.insert(base, len, dev).map_err(|source| DeviceError::Bus { what, source })
    }
}

impl Drop for DeviceManager {
    /// Runs after the vCPUs are stopped and before guest memory is unmapped (see
    /// `RunningVm`): stop every device worker, then clear the buses, whose devices can
    /// refer back to them (BAR mapper, config accessors) and would otherwise be leaked
    /// with the worker loop they hold.
    fn drop(&mut self) {
        // Quiesce every device first, while the worker loop still runs (a virtio device
        // removes its workers through it): a passthrough device is reset, which ends its
        // DMA and interrupts before the VFIO container unmaps guest RAM from the IOMMU.
        for entry in &self.pci_devices {
            entry.device.lock().unwrap_or_else(|e| e.into_inner()).detach();
        }
        if let Some(pci) = &self.pci {
            pci.event_loop.shutdown();
        }
        self.buses.pio.clear();
        self.buses.mmio.clear();
    }
}
