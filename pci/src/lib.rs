//! The guest PCI topology: config space, BARs, MSI/MSI-X, the root bus with its
//! config access mechanisms, the virtio-pci transport and VFIO passthrough.
//!
//! Nothing here talks to KVM. The VMM implements these traits and this crate calls
//! them when the guest changes something that needs KVM or the event loop:
//! - [`interrupt::MsiVectors`]: MSI/MSI-X vector routing (GSI routes, irqfds), called
//!   only on changes;
//! - [`interrupt::IntxLine`]: a passthrough device's INTx, an irqfd and its resample
//!   eventfd on a level-triggered GSI, which VFIO signals directly;
//! - [`bus::BarMapper`]: a BAR now decoded elsewhere (or no longer, or again): move its
//!   [`device::BarRegion`] on the MMIO/PIO bus, its ioeventfds, its memory slot;
//! - [`virtio_pci::WorkerHost`]: run or stop a virtio device's worker.
//!
//! A passthrough device reaches the host's VFIO device through
//! [`vfio::VfioDeviceOps`], implemented here over vfio-ioctls
//! ([`vfio::HostVfioDevice`]: regions, interrupts, reset, BAR mmaps; no KVM calls) and
//! by an in-memory fake in the tests.
//!
//! Lock order, outermost first: the root's config-write lock, a device's lock, its
//! MSI-X state; `MsiVectors`, `BarMapper` and `WorkerHost` implementations must not
//! take locks that lead back up this chain (see each trait).

pub mod bus;
pub mod config;
pub mod device;
pub mod host_bridge;
pub mod interrupt;
pub mod msi;
pub mod msix;
pub mod vfio;
pub mod virtio_pci;

pub use bus::{BarMapper, PciBusError, PciConfigIo, PciConfigMmio, PciRoot};
pub use config::{BarChange, BarKind, BarSpec, ConfigError, PciConfiguration, PciHeader};
pub use device::{BarIoEvent, BarRegion, MmapArea, PciDevice, SharedPciDevice};
pub use interrupt::{IntxLine, MsiMessage, MsiVectors};
pub use vfio::{HostMapping, HostVfioDevice, VfioDeviceOps, VfioError, VfioPciDevice};
pub use virtio_pci::{VirtioPciDevice, VirtioPciError, WorkerHost, WorkerId};
