//! Passthrough devices through VFIO: the VM's one KVM VFIO device and type-1 container,
//! guest RAM mapped for the devices' DMA (IOVA = guest-physical address), and each
//! device put on the PCI bus as a [`pci::VfioPciDevice`].
//!
//! Host prerequisites (an IOMMU group, interrupt remapping, the locked-memory limit)
//! are checked before VFIO is touched, so failures name what is missing instead of
//! surfacing as a bare errno from deep inside the container setup.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use devices::Notices;
use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use pci::vfio::{vector_count, HostVfioDevice};
use pci::VfioPciDevice;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioOps};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::driver_watch::{DriverReady, WatchedVectors};
use super::vfio_checks::{bdf_of, memlock_limit, HostCheckError, HostFiles, InterruptRemapping};
use super::{DeviceError, DeviceManager, DeviceStats, PciDeviceEntry, VfTraffic};
use crate::interrupt::{KvmIntxLine, KvmMsiVectors};
use crate::vm::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum VfioHostError {
    #[error(transparent)]
    Host(#[from] HostCheckError),
    #[error("cannot create the KVM VFIO device: {0}; the host kernel needs CONFIG_KVM_VFIO")]
    KvmDevice(#[source] kvm_ioctls::Error),
    #[error("cannot open the VFIO container: {0}; load vfio-pci (`modprobe vfio-pci`)")]
    Container(#[source] vfio_ioctls::VfioError),
    #[error("{bdf}: {reason}")]
    Device { bdf: String, reason: String },
    #[error("cannot map guest RAM at {gpa:#x} (+{mib} MiB) for device DMA: {source}{hint}")]
    DmaMap {
        gpa: u64,
        mib: u64,
        hint: &'static str,
        #[source]
        source: vfio_ioctls::VfioError,
    },
}

/// How long mapping guest RAM for DMA took (the pinning of every page).
#[derive(Debug, Clone, Copy, Default)]
pub struct DmaMapStats {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl DmaMapStats {
    pub fn gib_per_s(&self) -> f64 {
        (self.bytes as f64 / f64::from(1u32 << 30)) / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The VM's VFIO state: created with the first passthrough device.
pub(super) struct VfioHost {
    container: Arc<VfioContainer>,
    memory: GuestMemory,
    /// Guest RAM regions mapped for DMA, as (IOVA, size).
    mapped: Vec<(u64, u64)>,
    stats: DmaMapStats,
    interrupts: InterruptRemapping,
    /// Every device opened, to tell when the last has closed: a closed device's group
    /// leaves the container, and with the last group the kernel drops the IOMMU and
    /// every DMA mapping in it.
    opened: Vec<Weak<VfioDevice>>,
    notices: Notices,
}

impl VfioHost {
    /// The KVM VFIO device and the container live as long as the VM.
    fn new(
        vm: &VmFd,
        memory: GuestMemory,
        interrupts: InterruptRemapping,
        notices: Notices,
    ) -> Result<Self, VfioHostError> {
        let mut create = kvm_create_device { type_: kvm_device_type_KVM_DEV_TYPE_VFIO, fd: 0, flags: 0 };
        let kvm_device = vm.create_device(&mut create).map_err(VfioHostError::KvmDevice)?;
        let container = VfioContainer::new(Some(Arc::new(VfioDeviceFd::new_from_kvm(kvm_device))))
            .map_err(VfioHostError::Container)?;
        Ok(Self {
            container: Arc::new(container),
            memory,
            mapped: Vec::new(),
            stats: DmaMapStats::default(),
            interrupts,
            opened: Vec::new(),
            notices,
        })
    }

    /// Opens the device (its group joins the container; the first group also selects
    /// the type-1 IOMMU) and maps guest RAM for DMA if no open device has it mapped.
    /// A device closes when it leaves the bus: the kernel's release then resets it and
    /// the next open starts it from the state it had on the host.
    fn open(&mut self, sysfs: &Path) -> Result<Arc<VfioDevice>, VfioHostError> {
        self.forget_closed();
        let bdf = bdf_of(sysfs);
        let ops: Arc<dyn VfioOps> = self.container.clone();
        let device = VfioDevice::new(sysfs, ops, false)
            .map_err(|e| VfioHostError::Device { reason: explain_open_error(&e, sysfs), bdf: bdf.clone() })?;
        let device = Arc::new(device);
        self.opened.push(Arc::downgrade(&device));
        if self.mapped.is_empty() {
            self.stats = DmaMapStats::default();
            if let Err(e) = self.map_guest_ram() {
                self.unmap_guest_ram();
                return Err(e);
            }
        }
        Ok(device)
    }

    /// Drops the closed devices; with none open the container has no IOMMU any more,
    /// and so no mappings.
    fn forget_closed(&mut self) {
        self.opened.retain(|d| d.strong_count() > 0);
        if self.opened.is_empty() {
            self.mapped.clear();
        }
    }

    /// Unmaps what `map_guest_ram` mapped; a region the IOMMU would not unmap stays
    /// listed (and pinned), so that it is never mapped twice.
    fn unmap_guest_ram(&mut self) {
        let (container, notices) = (&self.container, &self.notices);
        self.mapped.retain(|&(iova, len)| {
            match container.vfio_dma_unmap(iova, usize::try_from(len).unwrap_or(usize::MAX)) {
                Ok(()) => false,
                Err(e) => {
                    notices.warn(format_args!("cannot unmap guest RAM at {iova:#x} from the IOMMU: {e}"));
                    true
                }
            }
        });
    }

    /// Guest RAM regions mapped for DMA now.
    pub(super) fn dma_mappings(&self) -> usize {
        if self.opened.iter().any(|d| d.strong_count() > 0) {
            self.mapped.len()
        } else {
            0
        }
    }

    /// One MAP_DMA per RAM region (at most two: below the PCI hole and above 4 GiB);
    /// the kernel pins the pages in batches within each call.
    fn map_guest_ram(&mut self) -> Result<(), VfioHostError> {
        let start = Instant::now();
        let regions: Vec<(u64, u64, *mut u8)> =
            self.memory.iter().map(|r| (r.start_addr().0, r.len(), r.as_ptr())).collect();
        for (gpa, len, host) in regions {
            let size = usize::try_from(len).unwrap_or(usize::MAX);
            // SAFETY: `host..host+len` is guest RAM, mapped for as long as the VM exists;
            // the container (and with it the DMA mapping) is dropped before the RAM
            // (DeviceManager before Vm), and Drop unmaps it first.
            let mapped = unsafe { self.container.vfio_dma_map(gpa, size, host) };
            mapped.map_err(|source| VfioHostError::DmaMap {
                gpa,
                mib: len >> 20,
                hint: if is_errno(&source, libc::ENOMEM) {
                    " (ENOMEM: usually the locked-memory limit; raise `ulimit -l` or run with CAP_IPC_LOCK)"
                } else {
                    ""
                },
                source,
            })?;
            self.mapped.push((gpa, len));
            self.stats.bytes += len;
        }
        self.stats.elapsed = start.elapsed();
        Ok(())
    }
}

impl Drop for VfioHost {
    fn drop(&mut self) {
        // Best effort: closing the container releases the mappings anyway.
        self.forget_closed();
        self.unmap_guest_ram();
    }
}

fn is_errno(e: &vfio_ioctls::VfioError, errno: i32) -> bool {
    match e {
        vfio_ioctls::VfioError::IommuDmaMap(s) | vfio_ioctls::VfioError::ContainerSetIOMMU(s) => s.errno() == errno,
        vfio_ioctls::VfioError::OpenGroup(io, _) => io.raw_os_error() == Some(errno),
        _ => false,
    }
}

/// vfio-ioctls' errors say which step failed, not why; add what sysfs can tell.
fn explain_open_error(e: &vfio_ioctls::VfioError, sysfs: &Path) -> String {
    use vfio_ioctls::VfioError as E;
    let group = std::fs::read_link(sysfs.join("iommu_group"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "?".into());
    match e {
        E::OpenGroup(io, _) if io.raw_os_error() == Some(libc::EBUSY) => {
            format!("IOMMU group {group} is already in use by another process (another VMM?)")
        }
        E::OpenGroup(io, _) if io.raw_os_error() == Some(libc::ENOENT) => {
            format!("/dev/vfio/{group} does not exist: bind the device to vfio-pci first")
        }
        E::GroupViable => {
            let others = group_members_on_host_drivers(sysfs);
            format!(
                "IOMMU group {group} is not viable: every device in it must be bound to vfio-pci or have no driver; \
                 now bound elsewhere: {}",
                if others.is_empty() {
                    "none found (check /sys/kernel/iommu_groups)".into()
                } else {
                    others.join(", ")
                }
            )
        }
        E::ContainerSetIOMMU(s) | E::SetDeviceAttr(s) if s.errno() == libc::EPERM => {
            HostCheckError::NoInterruptRemapping { why: String::new() }.to_string()
        }
        E::GroupSetContainer => format!(
            "cannot add IOMMU group {group} to the VM's container (without interrupt remapping, a second group is \
             refused unless allow_unsafe_interrupts is set): {e}"
        ),
        other => format!("VFIO refused the device: {other}"),
    }
}

/// Devices sharing `sysfs`'s IOMMU group that a host driver other than vfio-pci holds,
/// as "BDF (bound to DRIVER)".
pub(super) fn group_members_on_host_drivers(sysfs: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(sysfs.join("iommu_group/devices")) else { return Vec::new() };
    let me = bdf_of(sysfs);
    let mut out: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let bdf = e.file_name().to_string_lossy().into_owned();
            let driver = std::fs::read_link(e.path().join("driver")).ok()?;
            let driver = driver.file_name()?.to_string_lossy().into_owned();
            (bdf != me && !matches!(driver.as_str(), "vfio-pci" | "pci-stub" | "pcieport"))
                .then(|| format!("{bdf} (bound to {driver})"))
        })
        .collect();
    out.sort();
    out
}

/// What attaching a passthrough device did, for the user and the benchmarks.
#[derive(Debug, Clone)]
pub struct PassthroughReport {
    pub id: String,
    pub bdf: String,
    pub slot: u8,
    pub interrupts: InterruptRemapping,
    /// Set for the device that mapped guest RAM (the first one open).
    pub dma: Option<DmaMapStats>,
    pub attach: Duration,
    /// Signalled when the host wants the device back (see `VfioPciDevice::set_request_notifier`).
    pub request: Option<Arc<EventFd>>,
}

impl DeviceManager {
    /// Puts the host PCI device at `sysfs` (/sys/bus/pci/devices/BDF, bound to vfio-pci)
    /// on the guest's PCI bus; `ready` is called (on a vCPU thread: it must only hand
    /// the news on) when the guest's driver first enables one of its MSI/MSI-X vectors.
    /// A device added while the guest runs still has to be [`announce`](Self::announce)d.
    pub fn add_passthrough(
        &mut self,
        id: &str,
        sysfs: &Path,
        ready: Option<DriverReady>,
    ) -> Result<PassthroughReport, DeviceError> {
        let start = Instant::now();
        let bdf = bdf_of(sysfs);
        let fail = |e: VfioHostError| DeviceError::Backend { id: id.to_string(), reason: e.to_string() };
        let pci = self.pci.as_mut().ok_or(DeviceError::NoPci)?;
        if pci.vfio.is_none() {
            let host = HostFiles::default();
            host.check_iommu(&bdf).map_err(|e| fail(e.into()))?;
            let interrupts = host.check_interrupt_remapping().map_err(|e| fail(e.into()))?;
            let ram: u64 = pci.memory.iter().map(|r| r.len()).sum();
            host.check_memlock(ram, memlock_limit()).map_err(|e| fail(e.into()))?;
            let notices = self.notices.clone();
            pci.vfio = Some(VfioHost::new(&pci.vm, pci.memory.clone(), interrupts, notices).map_err(fail)?);
        }
        let Some(vfio) = pci.vfio.as_mut() else { return Err(DeviceError::NoPci) };
        let maps_ram = vfio.dma_mappings() == 0;
        let device = vfio.open(sysfs).map_err(fail)?;
        let (interrupts, dma) = (vfio.interrupts, maps_ram.then_some(vfio.stats));
        // On failure the device is dropped (closed) on the way out.
        let Placed { slot, shared, request, vectors } =
            Self::place_passthrough(pci, id, &bdf, device, ready, &self.notices)?;
        let stats = DeviceStats::Passthrough { bdf: bdf.clone(), traffic: VfTraffic::new(&shared) };
        let entry = PciDeviceEntry {
            id: id.to_string(),
            slot,
            device: shared,
            stats,
            request: request.clone(),
            vectors: Some(vectors),
        };
        self.pci_devices.push(entry);
        Ok(PassthroughReport { id: id.to_string(), bdf, slot, interrupts, dma, attach: start.elapsed(), request })
    }

    /// Opens the host device at `sysfs` once and closes it again, before the guest runs,
    /// for a device that is hot-plugged later (a failover VF): whatever keeps it from
    /// working through VFIO fails the start, not the first plug.
    pub fn prepare_passthrough(&mut self, id: &str, sysfs: &Path) -> Result<(), DeviceError> {
        let report = self.add_passthrough(id, sysfs, None)?;
        if let Some(index) = self.pci_devices.iter().position(|e| e.id == id && e.slot == report.slot) {
            self.take_off_bus(index)?;
        }
        Ok(())
    }

    /// Wraps an open VFIO device as a PCI device with its interrupts and puts it on the
    /// bus; on failure nothing of it is left (the device is closed).
    fn place_passthrough(
        pci: &mut super::PciState,
        id: &str,
        bdf: &str,
        device: Arc<VfioDevice>,
        ready: Option<DriverReady>,
        notices: &Notices,
    ) -> Result<Placed, DeviceError> {
        let fail = |reason: String| DeviceError::Backend { id: id.to_string(), reason: format!("{bdf}: {reason}") };
        let ops = HostVfioDevice::new(device);
        let inner = KvmMsiVectors::new(pci.vm.clone(), pci.routing.clone(), vector_count(&ops))?;
        let watched = Arc::new(WatchedVectors::new(Box::new(inner), ready));
        let vectors: Arc<dyn pci::MsiVectors> = watched.clone();
        let dev = VfioPciDevice::new(Box::new(ops), vectors).map_err(|e| fail(e.to_string()))?;
        // Without it the host's unbind or VF removal waits for the VM to end; not fatal.
        let request = EventFd::new(EFD_NONBLOCK).map_err(|e| fail(format!("eventfd: {e}")))?;
        let request = match dev.set_request_notifier(&request) {
            Ok(true) => Some(Arc::new(request)),
            Ok(false) => None,
            Err(e) => {
                notices.warn(format_args!("{id}: {bdf}: {e}"));
                None
            }
        };
        let intx_pin = dev.intx_pin();
        let typed = Arc::new(Mutex::new(dev));
        let shared: pci::SharedPciDevice = typed.clone();
        let slot = pci.segment.add(shared.clone())?;
        if let Some(pin) = intx_pin {
            // The DSDT's _PRT routes this slot and pin to this IOAPIC input (boot::layout).
            let line = match KvmIntxLine::new(pci.vm.clone(), boot::layout::pci_intx_gsi(slot, pin)) {
                Ok(line) => Arc::new(line),
                Err(e) => {
                    let _ = pci.segment.remove(slot);
                    return Err(e.into());
                }
            };
            if let Err(e) = typed.lock().unwrap_or_else(|e| e.into_inner()).set_intx(line) {
                // The line stays wired; the guest's next command or MSI write retries it.
                notices.warn(format_args!("{id}: {bdf}: cannot enable INTx yet: {e}"));
            }
        }
        Ok(Placed { slot, shared, request, vectors: watched })
    }
}

/// A passthrough device on the bus, as `place_passthrough` left it.
struct Placed {
    slot: u8,
    shared: pci::SharedPciDevice,
    request: Option<Arc<EventFd>>,
    vectors: Arc<WatchedVectors>,
}

/// The sysfs directory of a PCI address.
pub fn pci_sysfs_path(bdf: &str) -> PathBuf {
    Path::new("/sys/bus/pci/devices").join(bdf)
}
