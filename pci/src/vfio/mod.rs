//! A host PCI function passed through to the guest with VFIO (an SR-IOV VF).
//!
//! [`VfioPciDevice`] is a [`PciDevice`] over [`VfioDeviceOps`]: config space is
//! virtualized (`config`), BARs are mapped straight into the guest where the host
//! allows it and trapped elsewhere (`bars`), MSI-X and MSI are emulated and their
//! vectors handed to VFIO as the VMM's irqfds (`irq`). The VMM opens the device
//! (`HostVfioDevice` over vfio-ioctls), sizes its `MsiVectors` with
//! [`vector_count`], and then, like for any device: `PciSegment::add` places and maps
//! the BARs, and `BarMapper::bar_changed` also moves the memory slots of
//! [`PciDevice::mmap_areas`].
//!
//! A device with INTx ([`VfioPciDevice::intx_pin`]) gets it once its slot is known:
//! the GSI depends on slot and pin (`boot::layout::pci_intx_gsi`, the DSDT's `_PRT`),
//! so after `PciSegment::add` the VMM makes an irqfd with a resample eventfd on that
//! GSI and hands both over with [`VfioPciDevice::set_intx`], before the guest can
//! see the device. Without it the device shows no interrupt pin and its drivers use
//! MSI or MSI-X.
//!
//! Guest register accesses cannot fail, so device errors met there leave the guest
//! with what a dead register shows (all-ones reads, dropped writes) and are kept for
//! the VMM: [`VfioPciDevice::failures`] and [`VfioPciDevice::take_last_error`].

mod bars;
mod config;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fake;
mod host;
mod irq;
mod mapping;
mod ops;
#[cfg(test)]
mod tests;

use std::any::Any;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use bars::{BarsError, PAGE_SIZE};
pub use config::VfioConfigError;
pub use host::HostVfioDevice;
pub use irq::IrqError;
pub use mapping::HostMapping;
pub use ops::*;

use crate::config::{BarChange, BarSpec, ConfigError, COMMAND_INTX_DISABLE};
use crate::device::{MmapArea, PciDevice};
use crate::interrupt::{IntxLine, MsiVectors};
use crate::msix::MAX_MSIX_VECTORS;
use bars::{BarTarget, Bars, MsixRanges};
use config::VfioConfig;
use irq::Interrupts;

#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error("cannot reset the device: {0}")]
    Reset(#[source] VfioOpsError),
    #[error(transparent)]
    Config(#[from] VfioConfigError),
    #[error(transparent)]
    Bars(#[from] BarsError),
    #[error("interrupts: {0}")]
    Irq(#[from] IrqError),
    #[error("cannot mirror the command register to the device: {0}")]
    Command(#[source] VfioOpsError),
    #[error("cannot watch for the host asking for the device back (VFIO's request interrupt): {0}")]
    Request(#[source] VfioOpsError),
    #[error("config space access at {offset:#x}: {source}")]
    ConfigAccess {
        offset: u64,
        #[source]
        source: VfioOpsError,
    },
    #[error("BAR {bar} access at {offset:#x}: {source}")]
    BarAccess {
        bar: u8,
        offset: u64,
        #[source]
        source: VfioOpsError,
    },
}

/// How many MSI/MSI-X vectors the VMM must create for this device (its
/// `MsiVectors`): the larger of what VFIO offers for MSI-X and for MSI.
pub fn vector_count(ops: &dyn VfioDeviceOps) -> u16 {
    let count = |index| ops.irq_info(index).map_or(0, |i| i.count);
    let n = count(MSIX_IRQ).max(count(MSI_IRQ));
    u16::try_from(n).unwrap_or(u16::MAX).min(MAX_MSIX_VECTORS)
}

pub struct VfioPciDevice {
    config: VfioConfig,
    irqs: Interrupts,
    bars: Bars,
    reset: ResetOutcome,
    /// The interrupt pin of an INTx VFIO offers, if the device has one.
    intx_pin: Option<u8>,
    failures: u64,
    last_error: Option<VfioError>,
    detached: bool,
    /// Last, so dropped last: the BARs' mmaps and the interrupts' eventfds hold the device
    /// file open, and only once they are gone does closing it release the device, which
    /// lets its group leave the container and the host driver take it back.
    ops: Box<dyn VfioDeviceOps>,
}

impl VfioPciDevice {
    /// Resets the device, reads its config space and maps its BARs' mappable parts.
    /// `vectors` must hold [`vector_count`] vectors with notifiers (irqfds).
    pub fn new(ops: Box<dyn VfioDeviceOps>, vectors: Arc<dyn MsiVectors>) -> Result<Self, VfioError> {
        // Before anything is read: the guest must find the function as after power-on,
        // not as the host driver left it.
        let reset = ops.reset().map_err(VfioError::Reset)?;
        let config = VfioConfig::new(ops.as_ref())?;
        let msix = config.msix();
        let irqs = Interrupts::new(ops.as_ref(), vectors, msix.map(|m| m.table_size), config.msi().map(|m| m.capable))?;
        let bars = Bars::new(ops.as_ref(), &config.bars(), msix.map(|m| MsixRanges::new(m.table_size, &m.layout)))?;
        // vfio-pci enables decoding when it opens the device; the guest has not yet.
        config.push_command(ops.as_ref()).map_err(VfioError::Command)?;
        let intx_pin = config.intx_pin().filter(|_| ops.irq_info(INTX_IRQ).is_some_and(|i| i.count != 0));
        Ok(Self { config, irqs, bars, reset, intx_pin, failures: 0, last_error: None, detached: false, ops })
    }

    /// The interrupt pin (1 to 4: INTA# to INTD#) the device raises INTx on, if it has
    /// one and VFIO offers it (a VF never does). The VMM wires that pin of the device's
    /// slot and hands it over with [`set_intx`](Self::set_intx).
    pub fn intx_pin(&self) -> Option<u8> {
        self.intx_pin
    }

    /// Delivers the device's INTx on `line` (see [`IntxLine`]; on the GSI of the
    /// device's slot and [`intx_pin`](Self::intx_pin)): config space shows the device's
    /// interrupt pin from now on, and VFIO signals the line whenever the guest may use
    /// INTx (MSI and MSI-X off, Interrupt Disable clear), right away after attach.
    /// Call it before the guest can see the device. Returns whether the line is used:
    /// not for a device without INTx, nor after [`shutdown`](Self::shutdown). A failure
    /// leaves the line wired but off; the guest's next command or MSI/MSI-X write retries.
    pub fn set_intx(&mut self, line: Arc<dyn IntxLine>) -> Result<bool, VfioError> {
        if self.intx_pin.is_none() || self.detached {
            return Ok(false);
        }
        self.config.show_interrupt_pin();
        self.irqs.set_intx_line(self.ops.as_ref(), line)?;
        Ok(true)
    }

    /// Signals `eventfd` when the host wants the device back (VFIO's request interrupt:
    /// an unbind from vfio-pci, or a VF's PF removing its VFs): the host waits until the
    /// VMM closes the device, so the VMM should take it out of the guest then. Returns
    /// whether the device offers that interrupt.
    pub fn set_request_notifier(&self, eventfd: &EventFd) -> Result<bool, VfioError> {
        if self.ops.irq_info(REQ_IRQ).is_none_or(|i| i.count == 0) {
            return Ok(false);
        }
        self.ops.enable_irqs(REQ_IRQ, &[eventfd]).map_err(VfioError::Request)?;
        Ok(true)
    }

    /// Whether VFIO signals the INTx line now.
    pub fn intx_enabled(&self) -> bool {
        self.irqs.intx_enabled()
    }

    /// What the reset on attach did.
    pub fn reset_outcome(&self) -> ResetOutcome {
        self.reset
    }

    /// How many device accesses failed under a guest register access.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// The last such failure, if not taken yet.
    pub fn take_last_error(&mut self) -> Option<VfioError> {
        self.last_error.take()
    }

    fn note(&mut self, error: VfioError) {
        self.failures += 1;
        self.last_error = Some(error);
    }

    /// Turns the device's interrupts off and resets it: for detach (the VMM removes
    /// its memory slots first). Idempotent; returns the first failure.
    pub fn shutdown(&mut self) -> Result<(), VfioError> {
        if self.detached {
            return Ok(());
        }
        self.detached = true;
        let irqs = self.irqs.shutdown(self.ops.as_ref()).map_err(VfioError::from);
        let reset = self.ops.reset().map(drop).map_err(VfioError::Reset);
        irqs.and(reset)
    }
}

impl PciDevice for VfioPciDevice {
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        if let Err(source) = self.config.read(self.ops.as_ref(), offset, data) {
            self.note(VfioError::ConfigAccess { offset, source });
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> Vec<BarChange> {
        let write = self.config.write(self.ops.as_ref(), offset, data);
        if let Some(source) = write.error {
            self.note(VfioError::ConfigAccess { offset, source });
        }
        if let Some(control) = write.msix_control {
            if let Err(e) = self.irqs.msix_control(self.ops.as_ref(), control) {
                self.note(e.into());
            }
        }
        if let Some(regs) = write.msi {
            if let Err(e) = self.irqs.msi_update(self.ops.as_ref(), &regs) {
                self.note(e.into());
            }
        }
        if let Some(command) = write.command {
            if let Err(e) = self.irqs.set_intx_disabled(self.ops.as_ref(), command & COMMAND_INTX_DISABLE != 0) {
                self.note(e.into());
            }
        }
        write.bars
    }

    fn bars(&self) -> Vec<BarSpec> {
        self.config.bars()
    }

    fn set_bar_address(&mut self, index: u8, addr: u64) -> Result<(), ConfigError> {
        self.config.set_bar_address(index, addr)?;
        if let Err(e) = self.config.push_command(self.ops.as_ref()) {
            self.note(VfioError::Command(e));
        }
        Ok(())
    }

    fn bar_address(&self, index: u8) -> Option<u64> {
        self.config.bar_address(index)
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        match self.bars.route(bar, offset) {
            BarTarget::MsixTable(o) => self.irqs.read_table(o, data),
            BarTarget::MsixPba(o) => self.irqs.read_pba(o, data),
            BarTarget::Device => {
                if let Err(source) = self.ops.read_region(u32::from(bar), offset, data) {
                    data.fill(0xff);
                    self.note(VfioError::BarAccess { bar, offset, source });
                }
            }
            BarTarget::Absent => data.fill(0xff),
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        match self.bars.route(bar, offset) {
            BarTarget::MsixTable(o) => self.irqs.write_table(o, data),
            // The PBA is read-only.
            BarTarget::MsixPba(_) | BarTarget::Absent => {}
            BarTarget::Device => {
                if let Err(source) = self.ops.write_region(u32::from(bar), offset, data) {
                    self.note(VfioError::BarAccess { bar, offset, source });
                }
            }
        }
    }

    fn mmap_areas(&self, bar: u8) -> Vec<MmapArea> {
        self.bars.mmap_areas(bar)
    }

    fn detach(&mut self) {
        if let Err(e) = self.shutdown() {
            self.note(e);
        }
    }

    fn as_any(&mut self) -> &mut dyn Any {
        self
    }
}

impl Drop for VfioPciDevice {
    /// A device dropped without `detach` (an error path of the VMM) must not leave the
    /// host signalling irqfds of a VM that is going away.
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
