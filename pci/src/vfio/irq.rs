//! Interrupts of a passthrough function: MSI-X and MSI emulated for the guest, the
//! device's vectors handed to VFIO, and INTx passed through.
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
//! bits are the host's.
//!
//! INTx (for a function with an interrupt pin, once the VMM gave it an [`IntxLine`];
//! VFs have none) goes straight from VFIO to KVM too: VFIO signals the line's irqfd
//! and masks the host IRQ, KVM holds the GSI asserted until the guest's EOI and then
//! signals the resample eventfd, on which VFIO unmasks (`set_irq_unmask`). VFIO has
//! INTx on exactly while the guest may use it: neither MSI nor MSI-X is enabled (the
//! PCI rule; VFIO also takes one interrupt type at a time, so INTx goes off before
//! either is turned on and comes back after both are off) and Interrupt Disable in
//! the command register is clear.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::{IntxLine, MsiVectors};
use crate::msi::{Msi, MsiError};
use crate::msix::{Msix, MsixError};

use super::ops::{VfioDeviceOps, VfioOpsError, INTX_IRQ, MSIX_IRQ, MSI_IRQ};

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

/// The function's INTx as the VMM wired it.
struct Intx {
    line: Arc<dyn IntxLine>,
    /// VFIO signals the line (and unmasks on its resample eventfd).
    enabled: bool,
}

pub struct Interrupts {
    vectors: Arc<dyn MsiVectors>,
    msix: Option<Msix>,
    msi: Option<Msi>,
    msix_index: Index,
    msi_index: Index,
    intx: Option<Intx>,
    /// The guest set Interrupt Disable in the command register.
    intx_disabled: bool,
    /// Shut down: nothing is turned on again.
    closed: bool,
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
            intx: None,
            intx_disabled: false,
            closed: false,
        })
    }

    /// Delivers the function's INTx on `line` from now on (replacing any earlier
    /// line), and turns it on in VFIO if the guest may use it now. Only for a function
    /// whose INTx VFIO offers.
    pub fn set_intx_line(&mut self, ops: &dyn VfioDeviceOps, line: Arc<dyn IntxLine>) -> Result<(), IrqError> {
        // The old line's eventfds must not stay with VFIO.
        let off = match self.intx.take() {
            Some(Intx { enabled: true, .. }) => ops.disable_irqs(INTX_IRQ).map_err(IrqError::from),
            _ => Ok(()),
        };
        self.intx = Some(Intx { line, enabled: false });
        off.and(self.sync_intx(ops))
    }

    /// Whether VFIO signals the INTx line now.
    pub fn intx_enabled(&self) -> bool {
        self.intx.as_ref().is_some_and(|i| i.enabled)
    }

    /// The guest wrote the command register; `disabled` is its Interrupt Disable bit.
    pub fn set_intx_disabled(&mut self, ops: &dyn VfioDeviceOps, disabled: bool) -> Result<(), IrqError> {
        self.intx_disabled = disabled;
        self.sync_intx(ops)
    }

    /// The guest wrote the MSI-X message control word (`control`, after the masks).
    pub fn msix_control(&mut self, ops: &dyn VfioDeviceOps, control: u16) -> Result<(), IrqError> {
        // After shutdown the device is off the bus; a late write changes nothing.
        if self.closed {
            return Ok(());
        }
        let Some(msix) = &mut self.msix else { return Ok(()) };
        msix.set_control(control);
        let want = if msix.is_enabled() { msix.table_size() } else { 0 };
        // INTx off before MSI-X goes on, back on after it went off (see the module).
        let intx_off = self.sync_intx(ops);
        let msix = sync(ops, self.vectors.as_ref(), &mut self.msix_index, want);
        let intx_on = self.sync_intx(ops);
        intx_off.and(msix).and(intx_on)
    }

    /// The guest wrote the MSI capability; `regs` as `Msi::update` takes them.
    pub fn msi_update(&mut self, ops: &dyn VfioDeviceOps, regs: &[u8]) -> Result<(), IrqError> {
        if self.closed {
            return Ok(());
        }
        let Some(msi) = &mut self.msi else { return Ok(()) };
        msi.update(regs);
        let want = msi.enabled_vectors();
        let intx_off = self.sync_intx(ops);
        let msi = sync(ops, self.vectors.as_ref(), &mut self.msi_index, want);
        let intx_on = self.sync_intx(ops);
        intx_off.and(msi).and(intx_on)
    }

    /// Whether INTx may be on: the guest has neither MSI nor MSI-X enabled (and VFIO
    /// neither on), Interrupt Disable is clear, and the device is not shut down.
    fn intx_wanted(&self) -> bool {
        let msix_on = self.msix.as_ref().is_some_and(Msix::is_enabled) || self.msix_index.enabled != 0;
        let msi_on = self.msi.as_ref().is_some_and(|m| m.enabled_vectors() != 0) || self.msi_index.enabled != 0;
        !self.closed && !self.intx_disabled && !msix_on && !msi_on
    }

    /// Brings VFIO's INTx to what [`intx_wanted`](Self::intx_wanted) says.
    fn sync_intx(&mut self, ops: &dyn VfioDeviceOps) -> Result<(), IrqError> {
        let wanted = self.intx_wanted();
        let Some(intx) = &mut self.intx else { return Ok(()) };
        if intx.enabled == wanted {
            return Ok(());
        }
        if !wanted {
            // Whatever VFIO says, the line is no longer the guest's: do not try again.
            intx.enabled = false;
            return ops.disable_irqs(INTX_IRQ).map_err(IrqError::from);
        }
        ops.enable_irqs(INTX_IRQ, &[intx.line.trigger()])?;
        if let Err(e) = ops.set_irq_unmask(INTX_IRQ, intx.line.resample()) {
            // Without it the line would stay masked after its first interrupt: a dead
            // line that looks alive. Off instead, and reported; the next change retries.
            let _ = ops.disable_irqs(INTX_IRQ);
            return Err(e.into());
        }
        intx.enabled = true;
        Ok(())
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

    /// Everything off for good: routes dropped, VFIO's vectors and INTx disabled (the
    /// device is being detached). Returns the first failure; it still turns off what
    /// it can.
    pub fn shutdown(&mut self, ops: &dyn VfioDeviceOps) -> Result<(), IrqError> {
        self.closed = true;
        if let Some(msix) = &mut self.msix {
            msix.reset();
        }
        if let Some(msi) = &mut self.msi {
            msi.reset();
        }
        let msix = sync(ops, self.vectors.as_ref(), &mut self.msix_index, 0);
        let msi = sync(ops, self.vectors.as_ref(), &mut self.msi_index, 0);
        let intx = self.sync_intx(ops);
        msix.and(msi).and(intx)
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
