//! The running VM as the control socket sees it: [`api::VmControl`] over a [`VmStopper`]
//! and the VM's device list.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::api::{ApiError, VmControl};
use crate::device_manager::{DeviceManager, DeviceStats, DeviceSummary, Removal};
use crate::exit::GuestExit;
use crate::runner::{RunError, VmStopper};
use crate::sriov::Leases;
use crate::VmConfig;

/// How long the guest gets to give a device back before Tandem takes it anyway.
const EJECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Control {
    vm: VmStopper,
    devices: Arc<Mutex<DeviceManager>>,
    leases: Arc<Mutex<Leases>>,
    cpus: u32,
    memory: u64,
    started: Instant,
}

impl Control {
    pub fn new(
        vm: VmStopper,
        devices: Arc<Mutex<DeviceManager>>,
        leases: Arc<Mutex<Leases>>,
        config: &VmConfig,
    ) -> Self {
        Self { vm, devices, leases, cpus: config.cpus, memory: config.memory, started: Instant::now() }
    }

    fn summary(&self) -> Vec<DeviceSummary> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner()).summary()
    }

    fn check_device(&self, id: &str) -> Result<(), ApiError> {
        let devices = self.summary();
        if devices.iter().any(|d| d.id == id) {
            return Ok(());
        }
        let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
        Err(ApiError::NotFound(format!("no device {id:?}; the VM has: {}", ids.join(", "))))
    }
}

fn run_error(e: RunError) -> ApiError {
    match e {
        RunError::AlreadyPaused | RunError::NotPaused | RunError::Ended => ApiError::Conflict(e.to_string()),
        other => ApiError::Internal(other.to_string()),
    }
}

fn device_counters(stats: &DeviceStats) -> Value {
    match stats {
        DeviceStats::Net(c) => {
            let s = c.snapshot();
            json!({
                "rx_packets": s.rx_packets, "rx_bytes": s.rx_bytes, "rx_dropped": s.rx_dropped,
                "tx_packets": s.tx_packets, "tx_bytes": s.tx_bytes, "tx_dropped": s.tx_dropped,
                "rx_no_buffers": s.rx_no_buffers, "tx_tap_full": s.tx_tap_full,
            })
        }
        DeviceStats::Block(c) => {
            let s = c.snapshot();
            json!({
                "requests": s.requests, "read_bytes": s.read_bytes, "write_bytes": s.write_bytes,
                "flushes": s.flushes, "discards": s.discards, "errors": s.errors,
            })
        }
        // The VF's own traffic never passes through Tandem; the PF reports it.
        DeviceStats::Passthrough { bdf } => json!({ "host_bdf": bdf }),
    }
}

impl VmControl for Control {
    fn info(&self) -> Value {
        let devices: Vec<Value> = self
            .summary()
            .iter()
            .map(|d| {
                let mut v =
                    json!({ "id": d.id, "kind": d.stats.kind(), "guest_pci": format!("0000:00:{:02x}.0", d.slot) });
                if let DeviceStats::Passthrough { bdf } = &d.stats {
                    v["host_bdf"] = json!(bdf);
                }
                v
            })
            .collect();
        json!({
            "state": if self.vm.is_paused() { "paused" } else { "running" },
            "cpus": self.cpus,
            "memory_mib": self.memory >> 20,
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "devices": devices,
        })
    }

    fn counters(&self) -> Value {
        use std::sync::atomic::Ordering::Relaxed;
        let c = self.vm.counters();
        let mut devices = Map::new();
        for d in &self.summary() {
            devices.insert(d.id.clone(), device_counters(&d.stats));
        }
        json!({
            "vm_exits": {
                "pio": c.pio.load(Relaxed), "mmio": c.mmio.load(Relaxed),
                "pio_unhandled": c.pio_unhandled.load(Relaxed), "mmio_unhandled": c.mmio_unhandled.load(Relaxed),
                "other": c.other.load(Relaxed),
            },
            "devices": devices,
        })
    }

    fn pause(&self) -> Result<(), ApiError> {
        self.vm.pause().map_err(run_error)
    }

    fn resume(&self) -> Result<(), ApiError> {
        self.vm.resume().map_err(run_error)
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        self.vm.stop(GuestExit::Shutdown);
        Ok(())
    }

    fn device_remove(&self, id: &str) -> Result<(), ApiError> {
        self.check_device(id)?;
        let removed = self.devices.lock().unwrap_or_else(|e| e.into_inner()).remove_pci_device(id, EJECT_TIMEOUT);
        let (removal, stats) = removed.map_err(|e| ApiError::Internal(format!("removing {id}: {e}")))?;
        match removal {
            Removal::Ejected { waited } => {
                eprintln!("tandem: {id}: removed (the guest gave it back in {} ms)", waited.as_millis())
            }
            Removal::Forced { waited } => eprintln!(
                "tandem: warning: {id}: the guest did not give it back within {} ms; removed anyway",
                waited.as_millis()
            ),
        }
        if let DeviceStats::Passthrough { .. } = stats {
            // The device is closed (VFIO released it): the host gets it back now.
            let released = self.leases.lock().unwrap_or_else(|e| e.into_inner()).release(id);
            match released {
                Some(Ok(warnings)) => warnings.iter().for_each(|w| eprintln!("tandem: warning: {id}: {w}")),
                Some(Err(e)) => {
                    return Err(ApiError::Internal(format!(
                        "{id} left the guest, but restoring it on the host failed: {e}; run `tandem cleanup`"
                    )))
                }
                None => {}
            }
        }
        Ok(())
    }

    fn device_add(&self, _request: &Value) -> Result<Value, ApiError> {
        Err(ApiError::Conflict(
            "this build of Tandem has no PCI hot-plug yet: give the device at start (--vf or --device)".into(),
        ))
    }
}
