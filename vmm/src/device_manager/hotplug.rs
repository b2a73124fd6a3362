//! ACPI PCI hot-unplug: the guest is asked to give a device back (a GED interrupt and a
//! slot's eject request, which Linux's acpiphp handles), and once it has (its `_EJ0`
//! reaches the controller) the device leaves the bus and the VMM releases it.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::hotplug::PciHotplugController;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceError, DeviceManager, DeviceStats};
use crate::vm::KvmVm;

/// How a removal ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// The guest ejected the device; `stopped`: when its driver began turning the
    /// device's interrupts off (after it stopped the device), if it used MSI/MSI-X.
    Ejected { waited: Duration, stopped: Option<Duration> },
    /// The guest did not answer within the timeout; the device was taken anyway.
    Forced { waited: Duration },
}

/// What the guest did with a slot, as the vCPU threads see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotEvent {
    /// Its `_EJ0` ran: the guest has let go of the device.
    Ejected(u8),
    /// The driver of the device being removed from it masked or turned off an interrupt.
    DriverStopping(u8),
}

/// The controller on the port bus, its GED line, and what the guest did with slots.
pub(super) struct Hotplug {
    controller: Arc<Mutex<PciHotplugController>>,
    events: Mutex<Receiver<SlotEvent>>,
    /// For the device watches a removal arms.
    sender: Mutex<Sender<SlotEvent>>,
    /// Keeps the GED irqfd's eventfd open (KVM holds the registration).
    _ged: Arc<EventFd>,
}

impl DeviceManager {
    /// Puts the hot-plug controller on the port bus and wires its GED interrupt; the
    /// DSDT must describe it (`boot::acpi::AcpiOptions::pci_hotplug`).
    pub fn enable_pci_hotplug(&mut self, vm: &KvmVm) -> Result<(), DeviceError> {
        let ged = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::EventFd { what: "GED", source })?);
        vm.register_irqfd(&ged, boot::layout::GED_GSI)?;
        let (sender, rx) = channel();
        let tx = Mutex::new(sender.clone());
        let raise = ged.clone();
        let controller = PciHotplugController::new(
            Arc::new(move || {
                let _ = raise.write(1);
            }),
            // Runs on a vCPU thread with the controller locked: only hand the slot over.
            Arc::new(move |slot| {
                let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(SlotEvent::Ejected(slot));
            }),
        );
        let controller = Arc::new(Mutex::new(controller));
        self.place_pio(
            "the PCI hot-plug controller",
            u64::from(boot::layout::PCI_HOTPLUG_PORT),
            devices::hotplug::REGISTERS_LEN,
            controller.clone(),
        )?;
        self.hotplug = Some(Hotplug { controller, events: Mutex::new(rx), sender: Mutex::new(sender), _ged: ged });
        Ok(())
    }

    /// Marks the devices on the bus now as present (cold-plugged: no event).
    pub fn mark_present(&self) {
        if let Some(h) = &self.hotplug {
            let mut c = h.controller.lock().unwrap_or_else(|e| e.into_inner());
            for e in &self.pci_devices {
                let _ = c.set_present(e.slot);
            }
        }
    }

    /// Announces the device just put in `slot` to the guest (a hot-plug): it rescans
    /// the slot and probes the device.
    pub fn announce(&self, id: &str, slot: u8) -> Result<(), DeviceError> {
        let hotplug = self.hotplug.as_ref().ok_or(DeviceError::NoHotplug)?;
        let mut c = hotplug.controller.lock().unwrap_or_else(|e| e.into_inner());
        c.request_plug(slot)
            .map_err(|e| DeviceError::Backend { id: id.to_string(), reason: format!("slot {slot}: {e}") })
    }

    /// Asks the guest to give device `id` back, waits up to `timeout` for its eject,
    /// then takes it off the bus (BARs unmapped, interrupts off, reset, released).
    /// `let_go` runs once, with the device still open, as soon as the guest no longer
    /// uses it: when its driver begins turning the device's interrupts off (it stopped
    /// the device first), or else at the eject or the timeout. Returns how it ended and
    /// what the device was.
    pub fn remove_pci_device(
        &mut self,
        id: &str,
        timeout: Duration,
        let_go: impl FnOnce(),
    ) -> Result<(Removal, DeviceStats), DeviceError> {
        let index = self
            .pci_devices
            .iter()
            .position(|e| e.id == id)
            .ok_or_else(|| DeviceError::Backend { id: id.to_string(), reason: "no such device".into() })?;
        let slot = self.pci_devices[index].slot;
        let vectors = self.pci_devices[index].vectors.clone();
        let hotplug = self.hotplug.as_ref().ok_or(DeviceError::NoHotplug)?;
        let start = Instant::now();
        let events = hotplug.events.lock().unwrap_or_else(|e| e.into_inner());
        // An eject nobody waited for (the guest let a device go on its own) must not be
        // taken for the answer to this request.
        while let Ok(stale) = events.try_recv() {
            if let SlotEvent::Ejected(stale) = stale {
                self.notices
                    .warn(format_args!("the guest ejected slot {stale} unasked; it stays on the bus until removed"));
            }
        }
        if let Some(v) = &vectors {
            let sender = hotplug.sender.lock().unwrap_or_else(|e| e.into_inner()).clone();
            v.arm_stopping(Box::new(move || {
                let _ = sender.send(SlotEvent::DriverStopping(slot));
            }));
        }
        let requested = hotplug.controller.lock().unwrap_or_else(|e| e.into_inner()).request_unplug(slot);
        if let Err(e) = requested {
            vectors.iter().for_each(|v| v.disarm_stopping());
            return Err(DeviceError::Backend { id: id.to_string(), reason: format!("slot {slot}: {e}") });
        }
        let mut let_go = Some(let_go);
        let mut stopped = None;
        let was_ejected = loop {
            let left = timeout.saturating_sub(start.elapsed());
            match events.recv_timeout(left) {
                Ok(SlotEvent::Ejected(s)) if s == slot => break true,
                Ok(SlotEvent::DriverStopping(s)) if s == slot => {
                    stopped = Some(start.elapsed());
                    if let Some(f) = let_go.take() {
                        f();
                    }
                }
                Ok(_) => continue, // another slot's late eject: nothing waits for it now
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break false,
            }
        };
        drop(events);
        vectors.iter().for_each(|v| v.disarm_stopping());
        let waited = start.elapsed();
        if !was_ejected {
            let _ = self
                .hotplug
                .as_ref()
                .map(|h| h.controller.lock().unwrap_or_else(|e| e.into_inner()).force_remove(slot));
        }
        if let Some(f) = let_go.take() {
            f();
        }
        let stats = self.take_off_bus(index)?;
        let removal = if was_ejected { Removal::Ejected { waited, stopped } } else { Removal::Forced { waited } };
        Ok((removal, stats))
    }

    /// Takes a device the guest was never told about off the bus again (a hot-plug
    /// that failed half-way).
    pub fn discard_pci_device(&mut self, id: &str) {
        if let Some(index) = self.pci_devices.iter().position(|e| e.id == id) {
            let slot = self.pci_devices[index].slot;
            if let Some(h) = &self.hotplug {
                let _ = h.controller.lock().unwrap_or_else(|e| e.into_inner()).force_remove(slot);
            }
            let _ = self.take_off_bus(index);
        }
    }

    /// Unmaps, detaches and drops device `index` of `pci_devices`.
    pub(super) fn take_off_bus(&mut self, index: usize) -> Result<DeviceStats, DeviceError> {
        let pci = self.pci.as_mut().ok_or(DeviceError::NoPci)?;
        let device = pci.segment.remove(self.pci_devices[index].slot)?;
        let entry = self.pci_devices.remove(index);
        drop(device);
        drop(entry.device);
        Ok(entry.stats)
    }
}
