//! [`VmHandle`]: what other threads — a signal handler, the control socket, an embedding
//! runtime — may do to a VM while it runs, as typed calls with typed answers.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use devices::virtio::block::BlockStats;
use devices::virtio::net::NetStats;
use devices::Notices;
use serde::Serialize;

use crate::device_manager::{DeviceStats, DeviceSummary, Removal};
use crate::exit::{ExitLatch, GuestExit};
use crate::failover::{Cause, FailoverEvent, FailoverEvents};
use crate::passthrough::{removal_text, AddRequest, Passthrough, PlugError, Plugged};
use crate::runner::RunError;
use crate::vcpu::{ExitCounters, PauseGate};

/// A handle on one VM. Cheap to clone; valid (its calls answering [`RunError::Ended`] or
/// an empty device list) after the VM has ended.
#[derive(Clone)]
pub struct VmHandle {
    pub(crate) latch: Arc<ExitLatch>,
    pub(crate) gate: Arc<PauseGate>,
    pub(crate) counters: Arc<ExitCounters>,
    /// The vCPU threads to kick, emptied (under the write lock) before they are joined,
    /// so a kick never targets a reclaimed thread.
    pub(crate) kick: Arc<RwLock<Vec<KickTarget>>>,
    /// Gone once the VM has ended.
    pub(crate) passthrough: Weak<Mutex<Passthrough>>,
    /// The host-device worker's mailbox: device-add and device-remove run there.
    pub(crate) host_worker: Arc<FailoverEvents>,
    pub(crate) notices: Notices,
    pub(crate) cpus: u32,
    pub(crate) memory: u64,
    pub(crate) created: Instant,
}

/// A vCPU thread as a kick target: its pthread id, valid until joined.
pub(crate) struct KickTarget {
    pub(crate) pthread: libc::pthread_t,
    pub(crate) done: Arc<AtomicBool>,
}

// SAFETY: a pthread_t is an opaque id; sending it between threads is what pthread_kill
// expects, and `KickTarget`s are only used under the `kick` lock (see `VmHandle`).
unsafe impl Send for KickTarget {}
// SAFETY: as for Send; the id is only read.
unsafe impl Sync for KickTarget {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Built, vCPUs not started yet.
    Created,
    Running,
    Paused,
    Ended,
}

/// What `info` answers: the VM, its devices and its failover pairs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmInfo {
    pub state: VmState,
    pub cpus: u32,
    pub memory_mib: u64,
    pub uptime_ms: u64,
    pub devices: Vec<DeviceInfo>,
    pub failover: Vec<PairInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    pub id: String,
    /// `virtio-net`, `virtio-blk` or `vfio-pci`.
    pub kind: &'static str,
    /// Where the guest sees it, e.g. `0000:00:03.0`.
    pub guest_pci: String,
    /// A passed-through device's host PCI address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_bdf: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PairInfo {
    pub vf: String,
    pub standby: String,
    pub mac: String,
    /// `held`, `plugged` or `parked (...)`, see [`crate::failover::PairState`].
    pub state: &'static str,
    pub auto: bool,
}

/// What `counters` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmCounters {
    pub resources: Resources,
    pub vm_exits: ExitCounts,
    /// By device id.
    pub devices: BTreeMap<String, DeviceCounters>,
}

/// What the devices hold from KVM, VFIO and the process: a leak shows across cycles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Resources {
    pub msi_gsis: usize,
    pub bar_memory_slots: usize,
    pub dma_mappings: usize,
    pub pci_devices: usize,
    pub open_fds: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExitCounts {
    pub pio: u64,
    pub mmio: u64,
    pub pio_unhandled: u64,
    pub mmio_unhandled: u64,
    pub other: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum DeviceCounters {
    Net(NetStats),
    Block(BlockStats),
    /// The VF's own traffic never passes through Tandem: a VF of a known model has it
    /// read from its statistics registers (since Tandem attached it).
    Passthrough {
        host_bdf: String,
        #[serde(flatten)]
        traffic: Option<crate::device_manager::VfTrafficCounts>,
    },
}

impl VmHandle {
    /// Runs `f` on the VM's devices, or answers `None` once the VM has ended.
    fn with_passthrough<T>(&self, f: impl FnOnce(&mut Passthrough) -> T) -> Option<T> {
        let passthrough = self.passthrough.upgrade()?;
        let mut guard = passthrough.lock().unwrap_or_else(|e| e.into_inner());
        Some(f(&mut guard))
    }

    /// Runs `f` as [`with_passthrough`](Self::with_passthrough) does, but on the VM's
    /// host-device worker, which runs from `Vm::start` to the VM's end: host-device work
    /// happens under that thread's seccomp filter, whichever thread asks for it.
    fn on_host_worker<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Passthrough) -> T + Send + 'static,
    ) -> Result<Option<T>, PlugError> {
        if !self.host_worker.worker_running() {
            if self.passthrough.strong_count() == 0 {
                return Ok(None);
            }
            return Err(PlugError::Conflict(
                "the VM has not started: give its devices in its config, or add them once it runs".into(),
            ));
        }
        match self.post(f).recv() {
            Ok(answer) => Ok(Some(answer)),
            // The job was dropped unrun (the VM ended first) or it panicked.
            Err(_) if !self.host_worker.worker_running() || self.passthrough.strong_count() == 0 => Ok(None),
            Err(_) => Err(PlugError::Failed("the host-device worker failed this request (see the log)".into())),
        }
    }

    /// Hands `f` to the host-device worker; its answer comes on the receiver (which
    /// closes unanswered if the job is dropped unrun or panics).
    fn post<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Passthrough) -> T + Send + 'static,
    ) -> std::sync::mpsc::Receiver<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.host_worker.send(FailoverEvent::Job(Box::new(move |p| {
            let _ = tx.send(f(p));
        })));
        rx
    }

    fn summary(&self) -> Vec<DeviceSummary> {
        let devices = self.with_passthrough(|p| p.devices().clone());
        devices.map_or_else(Vec::new, |d| d.lock().unwrap_or_else(|e| e.into_inner()).summary())
    }

    /// Ends the VM with `reason` (what `wait`/`run` return); a no-op once it has ended.
    pub fn stop(&self, reason: GuestExit) {
        self.latch.set(reason);
    }

    /// An orderly end, as if the guest had powered off.
    pub fn shutdown(&self) {
        self.stop(GuestExit::Shutdown);
    }

    pub fn state(&self) -> VmState {
        if self.latch.is_set() {
            VmState::Ended
        } else if self.gate.is_closed() {
            VmState::Paused
        } else if self.kick.read().unwrap_or_else(|e| e.into_inner()).is_empty() {
            VmState::Created
        } else {
            VmState::Running
        }
    }

    pub fn is_paused(&self) -> bool {
        self.gate.is_closed()
    }

    fn kick_all(&self) -> usize {
        let targets = self.kick.read().unwrap_or_else(|e| e.into_inner());
        let mut live = 0;
        for t in targets.iter().filter(|t| !t.done.load(Acquire)) {
            live += 1;
            // SAFETY: the thread has not been joined (targets are removed first), so its
            // id still names it, finished or not.
            unsafe { libc::pthread_kill(t.pthread, crate::vcpu::kick_signal()) };
        }
        live
    }

    /// Stops every vCPU outside KVM_RUN: no guest instruction runs until `resume`.
    /// Devices keep running (a paused guest's NIC still receives into its queues). A VM
    /// paused before it starts starts paused.
    pub fn pause(&self) -> Result<(), RunError> {
        if self.latch.is_set() {
            return Err(RunError::Ended);
        }
        if self.gate.is_closed() {
            return Err(RunError::AlreadyPaused);
        }
        self.gate.close();
        self.kick_until(|live| self.gate.wait_parked(live, Duration::from_millis(2))).map_err(|live| {
            self.gate.open();
            RunError::PauseTimeout { parked: self.gate.parked(), vcpus: live }
        })
    }

    pub fn resume(&self) -> Result<(), RunError> {
        if !self.gate.is_closed() {
            return Err(RunError::NotPaused);
        }
        self.gate.open();
        Ok(())
    }

    /// Injects an NMI into every vCPU (QEMU's `inject-nmi`). A paused VM gets it when it
    /// resumes.
    pub fn inject_nmi(&self) -> Result<(), RunError> {
        if self.latch.is_set() {
            return Err(RunError::Ended);
        }
        self.gate.request_nmi();
        if self.gate.is_closed() {
            return Ok(());
        }
        self.kick_until(|live| self.gate.wait_nmi(live, Duration::from_millis(2)))
            .map_err(|live| RunError::NmiTimeout { vcpus: live })
    }

    /// Kicks the vCPUs out of KVM_RUN until `acknowledged(live vCPUs)` says all did what
    /// was asked, for 5 s at most (or until the VM ends); `Err` carries the live count.
    /// A kick that lands between two KVM_RUNs is lost, hence the repeats.
    fn kick_until(&self, acknowledged: impl Fn(usize) -> bool) -> Result<(), usize> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let live = self.kick_all();
            if acknowledged(live) {
                return Ok(());
            }
            if Instant::now() >= deadline || self.latch.is_set() {
                return Err(live);
            }
        }
    }

    /// Plugs a device into the running guest (ACPI PCI hot-plug): a new VF or host
    /// device, or a parked failover VF back.
    pub fn add_device(&self, request: AddRequest) -> Result<Plugged, PlugError> {
        let plugged = self.on_host_worker(|p| p.add(request))?.ok_or_else(ended)??;
        self.notices
            .info(format_args!("{}: added ({} at guest PCI 00:{:02x}.0)", plugged.id, plugged.bdf, plugged.slot));
        Ok(plugged)
    }

    /// Takes device `id` out of the running guest (the guest ejects it; after 10 s it is
    /// taken anyway). A failover VF is parked, any other host device goes back to the host.
    pub fn remove_device(&self, id: &str) -> Result<Removal, PlugError> {
        let owned = id.to_string();
        let removal = self.on_host_worker(move |p| p.remove(&owned, Cause::User))?.ok_or_else(ended)??;
        self.notices.info(format_args!("{id}: removed ({})", removal_text(&removal)));
        Ok(removal)
    }

    /// The VM's exit counters, live.
    pub fn exit_counters(&self) -> &ExitCounters {
        &self.counters
    }

    pub fn info(&self) -> VmInfo {
        let devices = self
            .summary()
            .into_iter()
            .map(|d| DeviceInfo {
                kind: d.stats.kind(),
                guest_pci: format!("0000:00:{:02x}.0", d.slot),
                host_bdf: match d.stats {
                    DeviceStats::Passthrough { bdf, .. } => Some(bdf),
                    _ => None,
                },
                id: d.id,
            })
            .collect();
        let pairs = |p: &mut Passthrough| {
            p.pairs()
                .iter()
                .map(|p| PairInfo {
                    vf: p.vf.clone(),
                    standby: p.net.clone(),
                    mac: devices::virtio::net::format_mac(&p.mac),
                    state: p.state.name(),
                    auto: p.auto,
                })
                .collect()
        };
        let failover = self.with_passthrough(pairs).unwrap_or_default();
        VmInfo {
            state: self.state(),
            cpus: self.cpus,
            memory_mib: self.memory >> 20,
            uptime_ms: self.created.elapsed().as_millis() as u64,
            devices,
            failover,
        }
    }

    /// Has the host-device worker read the VFs' traffic registers (VFIO region reads,
    /// which only its seccomp filter allows). A worker busy with an unplug's eject wait
    /// answers later: the totals it read last are the answer then.
    fn refresh_vf_traffic(&self) {
        if !self.host_worker.worker_running() {
            return;
        }
        let _ = self.post(|p| p.sample_vf_traffic()).recv_timeout(std::time::Duration::from_millis(500));
    }

    pub fn counters(&self) -> VmCounters {
        let c = &self.counters;
        let summary = self.summary();
        if summary.iter().any(|d| matches!(&d.stats, DeviceStats::Passthrough { traffic: Some(_), .. })) {
            self.refresh_vf_traffic();
        }
        let devices = summary
            .into_iter()
            .map(|d| {
                let counters = match d.stats {
                    DeviceStats::Net(c) => DeviceCounters::Net(c.snapshot()),
                    DeviceStats::Block(c) => DeviceCounters::Block(c.snapshot()),
                    DeviceStats::Passthrough { bdf, traffic } => {
                        DeviceCounters::Passthrough { host_bdf: bdf, traffic: traffic.map(|t| t.totals()) }
                    }
                };
                (d.id, counters)
            })
            .collect();
        let devices_held = self.with_passthrough(|p| p.devices().clone());
        let r = devices_held.map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).resources()).unwrap_or_default();
        VmCounters {
            resources: Resources {
                msi_gsis: r.msi_gsis,
                bar_memory_slots: r.bar_memory_slots,
                dma_mappings: r.dma_mappings,
                pci_devices: r.pci_devices,
                open_fds: open_fds(),
            },
            vm_exits: ExitCounts {
                pio: c.pio.load(Relaxed),
                mmio: c.mmio.load(Relaxed),
                pio_unhandled: c.pio_unhandled.load(Relaxed),
                mmio_unhandled: c.mmio_unhandled.load(Relaxed),
                other: c.other.load(Relaxed),
            },
            devices,
        }
    }

    pub fn notices(&self) -> &Notices {
        &self.notices
    }
}

fn ended() -> PlugError {
    PlugError::Conflict("the VM has ended".into())
}

/// File descriptors this process has open: a leak shows across hot-plug cycles.
fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}
