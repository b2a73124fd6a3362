//! Interrupts of a passthrough function: MSI-X and MSI emulated for the guest, and
//! the device's vectors handed to VFIO.
//!
//! The guest programs the emulated capability and table ([`Msix`], [`Msi`]), which
//! route each vector through the VMM's [`MsiVectors`] (a KVM irqfd plus GSI route per
//! vector). VFIO gets those very irqfds: the host's interrupt handler signals
//! `notifier(v)` and KVM injects, with no VMM thread in the path. Masking stays in
//! KVM (`MsiVectors::mask` unregisters the irqfd, which latches the signal until
//! unmask), so a mask or unmask is never a VFIO call. VFIO is only told when the
//! function is turned on or off, or (MSI) its vector count changes:
//! - MSI-X enable 0 to 1: enable the whole table; 1 to 0: disable;
//! - MSI: enable with the count the guest enabled; a new count is a disable and an
//!   enable (the host cannot resize MSI in place).
//!
//! The emulated PBA shows only what the emulation recorded; the device's own pending
//! bits are the host's. INTx is not offered yet: the function shows interrupt pin 0
//! (VFs have no INTx anyway); a device that needs it would take a trigger irqfd plus
//! a resample eventfd (VMM side) through `enable_irqs(INTX_IRQ, ..)`.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::MsiVectors;
use crate::msi::{Msi, MsiError};
use crate::msix::{Msix, MsixError};

use super::ops::{VfioDeviceOps, VfioOpsError, MSIX_IRQ, MSI_IRQ};

#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("vector {vector} has no eventfd to give VFIO: the VMM created fewer vectors than the device has")]
    NoNotifier { vector: u16 },
    #[error(transparent)]
    Vfio(#[from] VfioOpsError),
    #[error(transparent)]
    Msix(#[from] MsixError),
    #[error(transparent)]
    Msi(#[from] MsiError),
}

/// One VFIO interrupt index and how many of its vectors VFIO has enabled.
struct Index {
    index: u32,
    /// What VFIO offers for this index.
    available: u16,
    enabled: u16,
}

pub struct Interrupts {
    vectors: Arc<dyn MsiVectors>,
    msix: Option<Msix>,
    msi: Option<Msi>,
    msix_index: Index,
    msi_index: Index,
}

impl Interrupts {
    /// Emulation for an MSI-X table of `msix_table_size` vectors and an MSI capability
    /// of `msi_capable` vectors (either may be absent), delivered through `vectors`.
    pub fn new(
        ops: &dyn VfioDeviceOps,
        vectors: Arc<dyn MsiVectors>,
        msix_table_size: Option<u16>,
        msi_capable: Option<u16>,
    ) -> Result<Self, IrqError> {
        let available = |index| ops.irq_info(index).map_or(0, |i| u16::try_from(i.count).unwrap_or(u16::MAX));
        let msix = msix_table_size.map(|n| Msix::new(n, vectors.clone())).transpose()?;
        let msi = msi_capable.map(|n| Msi::new(n, vectors.clone())).transpose()?;
        Ok(Self {
            vectors,
            msix,
            msi,
            msix_index: Index { index: MSIX_IRQ, available: available(MSIX_IRQ), enabled: 0 },
            msi_index: Index { index: MSI_IRQ, available: available(MSI_IRQ), enabled: 0 },
        })
    }

    /// The guest wrote the MSI-X message control word (`control`, after the masks).
    pub fn msix_control(&mut self, ops: &dyn VfioDeviceOps, control: u16) -> Result<(), IrqError> {
        let Some(msix) = &mut self.msix else { return Ok(()) };
        msix.set_control(control);
        let want = if msix.is_enabled() { msix.table_size() } else { 0 };
        sync(ops, self.vectors.as_ref(), &mut self.msix_index, want)
    }

    /// The guest wrote the MSI capability; `regs` as `Msi::update` takes them.
    pub fn msi_update(&mut self, ops: &dyn VfioDeviceOps, regs: &[u8]) -> Result<(), IrqError> {
        let Some(msi) = &mut self.msi else { return Ok(()) };
        msi.update(regs);
        let want = msi.enabled_vectors();
        sync(ops, self.vectors.as_ref(), &mut self.msi_index, want)
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        match &self.msix {
            Some(msix) => msix.read_table(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if let Some(msix) = &mut self.msix {
            msix.write_table(offset, data);
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        match &self.msix {
            Some(msix) => msix.read_pba(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Everything off: routes dropped, VFIO's vectors disabled (the device is being
    /// detached or reset). Returns the first failure; it still turns off what it can.
    pub fn shutdown(&mut self, ops: &dyn VfioDeviceOps) -> Result<(), IrqError> {
        if let Some(msix) = &mut self.msix {
            msix.reset();
        }
        if let Some(msi) = &mut self.msi {
            msi.reset();
        }
        let msix = sync(ops, self.vectors.as_ref(), &mut self.msix_index, 0);
        let msi = sync(ops, self.vectors.as_ref(), &mut self.msi_index, 0);
        msix.and(msi)
    }
}

/// Brings VFIO's vector count for `index` to `want` (capped by what VFIO offers).
fn sync(ops: &dyn VfioDeviceOps, vectors: &dyn MsiVectors, index: &mut Index, want: u16) -> Result<(), IrqError> {
    let want = want.min(index.available);
    if want == index.enabled {
        return Ok(());
    }
    if index.enabled != 0 {
        // Whatever VFIO says, the guest turned these off: do not try again.
        index.enabled = 0;
        ops.disable_irqs(index.index)?;
    }
    if want != 0 {
        let eventfds = (0..want)
            .map(|vector| vectors.notifier(vector).ok_or(IrqError::NoNotifier { vector }))
            .collect::<Result<Vec<&EventFd>, _>>()?;
        ops.enable_irqs(index.index, &eventfds)?;
        index.enabled = want;
    }
    Ok(())
}
