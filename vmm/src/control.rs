//! The running VM as the control socket sees it: [`api::VmControl`] over a [`VmStopper`]
//! and the VM's device list.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Map, Value};

use crate::api::{ApiError, VmControl};
use crate::device_manager::{DeviceStats, DeviceSummary};
use crate::exit::GuestExit;
use crate::failover::Cause;
use crate::passthrough::{removal_text, AddRequest, Passthrough, PlugError};
use crate::runner::{RunError, VmStopper};
use crate::sriov::{DeviceSpec, VfSpec};
use crate::VmConfig;

pub struct Control {
    vm: VmStopper,
    passthrough: Arc<Mutex<Passthrough>>,
    cpus: u32,
    memory: u64,
    started: Instant,
}

impl Control {
    pub fn new(vm: VmStopper, passthrough: Arc<Mutex<Passthrough>>, config: &VmConfig) -> Self {
        Self { vm, passthrough, cpus: config.cpus, memory: config.memory, started: Instant::now() }
    }

    fn passthrough(&self) -> std::sync::MutexGuard<'_, Passthrough> {
        self.passthrough.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn summary(&self) -> Vec<DeviceSummary> {
        let devices = self.passthrough().devices().clone();
        let summary = devices.lock().unwrap_or_else(|e| e.into_inner()).summary();
        summary
    }
}

fn plug_error(e: PlugError) -> ApiError {
    match e {
        PlugError::NotFound(m) => ApiError::NotFound(m),
        PlugError::Conflict(m) => ApiError::Conflict(m),
        PlugError::BadRequest(m) => ApiError::BadRequest(m),
        PlugError::Failed(m) => ApiError::Internal(m),
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
        let failover: Vec<Value> = self
            .passthrough()
            .pairs()
            .iter()
            .map(|p| json!({ "vf": p.vf, "standby": p.net, "mac": devices::virtio::net::format_mac(&p.mac), "state": p.state.name(), "auto": p.auto }))
            .collect();
        json!({
            "state": if self.vm.is_paused() { "paused" } else { "running" },
            "cpus": self.cpus,
            "memory_mib": self.memory >> 20,
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "devices": devices,
            "failover": failover,
        })
    }

    fn counters(&self) -> Value {
        use std::sync::atomic::Ordering::Relaxed;
        let c = self.vm.counters();
        let mut devices = Map::new();
        for d in &self.summary() {
            devices.insert(d.id.clone(), device_counters(&d.stats));
        }
        let r = {
            let devices = self.passthrough().devices().clone();
            let r = devices.lock().unwrap_or_else(|e| e.into_inner()).resources();
            r
        };
        json!({
            "resources": {
                "msi_gsis": r.msi_gsis, "bar_memory_slots": r.bar_memory_slots, "dma_mappings": r.dma_mappings,
                "pci_devices": r.pci_devices, "open_fds": open_fds(),
            },
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

    fn nmi(&self) -> Result<(), ApiError> {
        self.vm.inject_nmi().map_err(run_error)
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        self.vm.stop(GuestExit::Shutdown);
        Ok(())
    }

    fn device_remove(&self, id: &str) -> Result<(), ApiError> {
        let removal = self.passthrough().remove(id, Cause::User).map_err(plug_error)?;
        eprintln!("tandem: {id}: removed ({})", removal_text(&removal));
        Ok(())
    }

    fn device_add(&self, request: &Value) -> Result<Value, ApiError> {
        let field = |k: &str| request.get(k).and_then(Value::as_str);
        let bad = |e: crate::config::ConfigError| ApiError::BadRequest(e.to_string());
        let add = if let Some(spec) = field("vf") {
            AddRequest::Vf(VfSpec::parse(spec, 0).map_err(bad)?)
        } else if let Some(spec) = field("device") {
            AddRequest::Device(DeviceSpec::parse(spec, 0).map_err(bad)?)
        } else if let Some(id) = field("id") {
            AddRequest::Parked(id.to_string())
        } else {
            return Err(ApiError::BadRequest("device-add needs one of vf, device or id".into()));
        };
        let plugged = self.passthrough().add(add).map_err(plug_error)?;
        eprintln!("tandem: {}: added ({} at guest PCI 00:{:02x}.0)", plugged.id, plugged.bdf, plugged.slot);
        Ok(json!({ "id": plugged.id, "host_bdf": plugged.bdf, "guest_pci": format!("0000:00:{:02x}.0", plugged.slot) }))
    }
}

/// File descriptors this process has open: a leak shows across hot-plug cycles.
fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}
