//! A started VM: its vCPU threads, and the wait for the guest (or the host) to end it.

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::device_manager::DeviceManager;
use crate::exit::{ExitLatch, GuestExit};
use crate::failover::{FailoverEvent, FailoverEvents, FailoverPair, FailoverWorker, Switch};
use crate::passthrough::{NicInfo, Passthrough};
use crate::sriov::Leases;
use crate::terminal::StdinPump;
use crate::vcpu::{install_kick_handler, ExitCounters, PauseGate, Vcpu, VcpuHandle};
use crate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot set up vCPU signalling: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot start a thread for vCPU {id}: {source}")]
    SpawnVcpu {
        id: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for the guest failed: {0}")]
    Wait(#[source] std::io::Error),
    #[error("{0} vCPU thread(s) did not stop within 10 s of being asked to; the VM was leaked")]
    StuckVcpus(usize),
    #[error("the VM has ended")]
    Ended,
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("only {parked} of {vcpus} vCPUs stopped within 5 s; the VM keeps running")]
    PauseTimeout { parked: usize, vcpus: usize },
    #[error("not all of the {vcpus} vCPUs took the NMI within 5 s; the VM keeps running")]
    NmiTimeout { vcpus: usize },
    #[error("cannot start the failover worker: {0}")]
    Failover(#[source] std::io::Error),
}

/// What the failover worker starts with (see [`crate::failover`]).
pub struct FailoverSetup {
    pub pairs: Vec<FailoverPair>,
    pub nics: Vec<NicInfo>,
    pub events: Arc<FailoverEvents>,
    pub events_rx: std::sync::mpsc::Receiver<FailoverEvent>,
}

impl FailoverSetup {
    /// No pairs yet: a VM whose NICs and VFs are added later, if ever.
    pub fn empty() -> std::io::Result<Self> {
        let (events, events_rx) = FailoverEvents::new()?;
        Ok(Self { pairs: Vec::new(), nics: Vec::new(), events, events_rx })
    }
}

/// What other threads (the signal thread, the API server) may do to a running VM:
/// stop it, pause and resume its vCPUs, read its counters. Cheap to clone.
#[derive(Clone)]
pub struct VmStopper {
    latch: Arc<ExitLatch>,
    gate: Arc<PauseGate>,
    counters: Arc<ExitCounters>,
    /// The vCPU threads to kick, emptied (under the write lock) before they are joined,
    /// so a kick never targets a reclaimed thread.
    kick: Arc<RwLock<Vec<KickTarget>>>,
}

/// A vCPU thread as a kick target: its pthread id, valid until joined.
struct KickTarget {
    pthread: libc::pthread_t,
    done: Arc<std::sync::atomic::AtomicBool>,
}

// SAFETY: a pthread_t is an opaque id; sending it between threads is what pthread_kill
// expects, and `KickTarget`s are only used under the `kick` lock (see `VmStopper`).
unsafe impl Send for KickTarget {}
// SAFETY: as for Send; the id is only read.
unsafe impl Sync for KickTarget {}

impl VmStopper {
    pub fn stop(&self, reason: GuestExit) {
        self.latch.set(reason);
    }

    fn kick_all(&self) -> usize {
        let targets = self.kick.read().unwrap_or_else(|e| e.into_inner());
        let mut live = 0;
        for t in targets.iter().filter(|t| !t.done.load(std::sync::atomic::Ordering::Acquire)) {
            live += 1;
            // SAFETY: the thread has not been joined (targets are removed first), so its
            // id still names it, finished or not.
            unsafe { libc::pthread_kill(t.pthread, crate::vcpu::kick_signal()) };
        }
        live
    }

    /// Stops every vCPU outside KVM_RUN: no guest instruction runs until `resume`.
    /// Devices keep running (a paused guest's NIC still receives into its queues).
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

    /// Injects an NMI into every vCPU. A paused VM gets it when it resumes.
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

    pub fn resume(&self) -> Result<(), RunError> {
        if !self.gate.is_closed() {
            return Err(RunError::NotPaused);
        }
        self.gate.open();
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        self.gate.is_closed()
    }

    pub fn counters(&self) -> &ExitCounters {
        &self.counters
    }
}

pub struct RunningVm {
    // Field order is drop order: threads are stopped in `wait`/`drop` before the VM
    // (and the guest memory they run on) goes away.
    /// The control socket; stopped first in `halt_vcpus`, which drops its references to
    /// the devices and leases, so that they go below in order.
    api: Option<crate::api::ApiServer>,
    /// Acts on failover events; stopped right after the socket, for the same reason.
    failover: Option<FailoverWorker>,
    /// Plugs and unplugs host devices; shares the devices and leases below.
    passthrough: Option<Arc<Mutex<Passthrough>>>,
    vcpus: Vec<VcpuHandle>,
    stdin: Option<StdinPump>,
    latch: Arc<ExitLatch>,
    counters: Arc<ExitCounters>,
    gate: Arc<PauseGate>,
    kick: Arc<RwLock<Vec<KickTarget>>>,
    /// `None` once leaked, with the VM: see `halt_vcpus`. Shared with the control
    /// socket, which removes devices.
    devices: Option<Arc<Mutex<DeviceManager>>>,
    /// `None` once leaked: see `halt_vcpus`.
    vm: Option<Vm>,
    /// Host devices passed through, restored once the devices and the VM (which hold
    /// them open through VFIO) are gone.
    leases: Option<Arc<Mutex<Leases>>>,
}

impl RunningVm {
    /// Starts one thread per vCPU. `stdin` feeds host input to the serial console;
    /// `latch` is the one the devices' power sink reports to.
    pub fn start(
        vm: Vm,
        devices: DeviceManager,
        vcpus: Vec<Vcpu>,
        stdin: Option<StdinPump>,
        latch: Arc<ExitLatch>,
        leases: Leases,
        failover: FailoverSetup,
    ) -> Result<Self, RunError> {
        let counters = Arc::new(ExitCounters::default());
        // Built before anything can fail, so that an error drops the parts in this
        // struct's order: the leases after the devices and the VM holding them open.
        let buses = devices.buses().clone();
        let mut running = Self {
            vcpus: Vec::new(),
            stdin,
            latch,
            counters,
            gate: Arc::new(PauseGate::default()),
            kick: Arc::new(RwLock::new(Vec::new())),
            api: None,
            failover: None,
            passthrough: None,
            devices: Some(Arc::new(Mutex::new(devices))),
            vm: Some(vm),
            leases: Some(Arc::new(Mutex::new(leases))),
        };
        if let (Some(devices), Some(leases)) = (&running.devices, &running.leases) {
            let host = crate::sriov::Host::system();
            // The PFs the auto pairs follow, by ifindex.
            let pfs = failover
                .pairs
                .iter()
                .filter(|p| p.auto)
                .filter_map(|p| host.sysfs.ifindex(&p.pf).ok().map(|i| (i, p.pf.clone())))
                .collect();
            let switch = Switch::new(Arc::new(crate::sriov::RtNetlink), "/");
            let passthrough = Arc::new(Mutex::new(Passthrough::new(
                devices.clone(),
                leases.clone(),
                failover.pairs,
                failover.nics,
                switch,
                failover.events.clone(),
            )));
            running.failover = Some(
                FailoverWorker::spawn(passthrough.clone(), failover.events, failover.events_rx, pfs)
                    .map_err(RunError::Failover)?,
            );
            running.passthrough = Some(passthrough);
        }
        install_kick_handler().map_err(RunError::Signals)?;
        for vcpu in vcpus {
            let id = vcpu.id();
            let handle = VcpuHandle::spawn(
                vcpu,
                buses.clone(),
                running.counters.clone(),
                running.latch.clone(),
                running.gate.clone(),
            )
            .map_err(|source| RunError::SpawnVcpu { id, source })?;
            running
                .kick
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .push(KickTarget { pthread: handle.pthread(), done: handle.done.clone() });
            running.vcpus.push(handle);
        }
        Ok(running)
    }

    /// Plugs and unplugs host devices while the VM runs (what `device-add` and
    /// `device-remove` use).
    pub fn passthrough(&self) -> Option<Arc<Mutex<Passthrough>>> {
        self.passthrough.clone()
    }

    /// The devices on the guest's PCI bus with their counters.
    pub fn device_summary(&self) -> Vec<crate::device_manager::DeviceSummary> {
        self.devices.as_ref().map_or_else(Vec::new, |d| d.lock().unwrap_or_else(|e| e.into_inner()).summary())
    }

    /// Serves the control socket at `path` until the VM ends.
    pub fn serve_api(
        &mut self,
        path: &std::path::Path,
        config: &crate::VmConfig,
    ) -> Result<(), crate::api::ServerError> {
        let Some(passthrough) = &self.passthrough else { return Ok(()) };
        let control = crate::control::Control::new(self.stopper(), passthrough.clone(), config);
        self.api = Some(crate::api::ApiServer::start(path, Arc::new(control))?);
        Ok(())
    }

    pub fn stopper(&self) -> VmStopper {
        VmStopper {
            latch: self.latch.clone(),
            gate: self.gate.clone(),
            counters: self.counters.clone(),
            kick: self.kick.clone(),
        }
    }

    pub fn counters(&self) -> Arc<ExitCounters> {
        self.counters.clone()
    }

    /// Blocks until the guest powers off, resets, crashes, or a `VmStopper` is used,
    /// then stops every vCPU and returns why.
    pub fn wait(mut self) -> Result<GuestExit, RunError> {
        let reason = self.wait_for_reason()?;
        match self.halt_vcpus() {
            0 => Ok(reason),
            stuck => Err(RunError::StuckVcpus(stuck)),
        }
    }

    fn wait_for_reason(&self) -> Result<GuestExit, RunError> {
        let mut fd = libc::pollfd { fd: self.latch.event().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        loop {
            if let Some(reason) = self.latch.get() {
                return Ok(reason);
            }
            // SAFETY: `fd` is a valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut fd, 1, -1) } < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(RunError::Wait(err));
                }
            }
        }
    }

    /// Stops all vCPU threads and joins them. A vCPU blocked in the kernel (a halted
    /// guest CPU) is kicked with a signal until its thread ends.
    fn halt_vcpus(&mut self) -> usize {
        // Dropped without `wait`: the embedder gave up on the VM.
        self.latch.set(GuestExit::Stopped { signal: 0 });
        // No request may reach the devices from here on (and the server's references to
        // them go, so they are dropped in this struct's order).
        drop(self.api.take());
        drop(self.failover.take());
        drop(self.passthrough.take());
        // Parked vCPUs wait on the gate, not in KVM: let them see the latch.
        self.gate.open();
        // No kick through a VmStopper from here on: the threads are about to be joined.
        self.kick.write().unwrap_or_else(|e| e.into_inner()).clear();
        if let Some(pump) = self.stdin.take() {
            pump.stop();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stuck = 0;
        for handle in self.vcpus.drain(..) {
            while !handle.thread.is_finished() && Instant::now() < deadline {
                handle.kick();
                std::thread::sleep(Duration::from_millis(1));
            }
            if handle.thread.is_finished() {
                // A vCPU thread that panicked has already reported nothing useful; the
                // VM is going away either way.
                let _ = handle.thread.join();
            } else {
                // A thread that never left KVM_RUN still uses guest memory: leak the VM
                // rather than unmap memory under it, and the devices with it (their BAR
                // mappings back KVM memory slots the vCPU may still reach). Passthrough
                // devices then stay open, so restoring them would block: their journals
                // stay for `tandem cleanup` once this process is gone.
                std::mem::forget(self.vm.take());
                std::mem::forget(self.devices.take());
                std::mem::forget(self.leases.take());
                stuck += 1;
            }
        }
        stuck
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.halt_vcpus();
    }
}
