//! [`Vm`]: a VM built from its configuration, its vCPU threads, and the wait for the
//! guest (or the host) to end it.

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use devices::Notices;

use crate::device_manager::DeviceManager;
use crate::exit::{ExitLatch, GuestExit};
use crate::failover::{FailoverEvent, FailoverEvents, FailoverPair, FailoverWorker, Switch};
use crate::handle::{KickTarget, VmHandle};
use crate::passthrough::{NicInfo, Passthrough};
use crate::seccomp::SeccompFilters;
use crate::sriov::{Host, Leases};
use crate::terminal::StdinPump;
use crate::vcpu::{install_kick_handler, ExitCounters, PauseGate, Vcpu, VcpuHandle, VcpuShared};
use crate::vm::KvmVm;
use crate::{BuildError, VmConfig};

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
    #[error("the VM's vCPUs have been started already")]
    AlreadyStarted,
    #[error("cannot read stdin for the serial console: {0}")]
    Stdin(#[source] std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
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

/// The parts of a VM, assembled (by [`Vm::new`], or by hand for special guests) before
/// any of its threads starts.
pub struct VmParts {
    pub vm: KvmVm,
    pub devices: DeviceManager,
    pub vcpus: Vec<Vcpu>,
    /// The latch the devices' power sink reports to.
    pub latch: Arc<ExitLatch>,
    pub leases: Leases,
    pub failover: FailoverSetup,
    /// Feed host stdin to the serial console (`--serial stdio`).
    pub stdin_to_serial: bool,
    /// Where the host (PF links, restore journals) is, and where notices go.
    pub host: Host,
    pub cpus: u32,
    pub memory: u64,
    /// The filters each thread installs on itself (see [`crate::seccomp`]).
    pub seccomp: SeccompFilters,
}

/// A VM: built by [`Vm::new`], started by [`start`](Vm::start), ended by the guest or by
/// a [`VmHandle`], and torn down — host devices given back — when [`wait`](Vm::wait)
/// returns or it is dropped.
pub struct Vm {
    // Field order is drop order: threads are stopped in `wait`/`drop` before the VM
    // (and the guest memory they run on) goes away.
    /// The control socket; stopped first in `halt_vcpus`, which drops its references to
    /// the devices and leases, so that they go below in order.
    api: Option<crate::api::ApiServer>,
    /// Acts on failover events; stopped right after the socket, for the same reason.
    failover: Option<FailoverWorker>,
    /// Plugs and unplugs host devices; shares the devices and leases below. Handles
    /// reach it weakly, so one kept after the VM ended keeps no device open.
    passthrough: Option<Arc<Mutex<Passthrough>>>,
    handle: VmHandle,
    vcpus: Vec<VcpuHandle>,
    /// What `start` still has to start.
    pending: Option<Pending>,
    stdin: Option<StdinPump>,
    shared: VcpuShared,
    kick: Arc<RwLock<Vec<KickTarget>>>,
    /// `None` once leaked, with the VM: see `halt_vcpus`. Shared with the handle, which
    /// removes devices.
    devices: Option<Arc<Mutex<DeviceManager>>>,
    /// `None` once leaked: see `halt_vcpus`.
    vm: Option<KvmVm>,
    /// Host devices passed through, restored once the devices and the VM (which hold
    /// them open through VFIO) are gone.
    leases: Option<Arc<Mutex<Leases>>>,
}

struct Pending {
    vcpus: Vec<Vcpu>,
    stdin_to_serial: bool,
    events: Arc<FailoverEvents>,
    events_rx: std::sync::mpsc::Receiver<FailoverEvent>,
    /// The PFs the auto pairs follow, by ifindex.
    pfs: std::collections::HashMap<u32, String>,
}

impl Vm {
    /// Builds the VM `config` describes (guest memory, kernel, devices, vCPUs; host
    /// devices leased), ready to [`start`](Self::start). Its notices are dropped; see
    /// [`with_notices`](Self::with_notices).
    pub fn new(config: &VmConfig) -> Result<Self, BuildError> {
        Self::with_notices(config, Notices::discard())
    }

    /// [`new`](Self::new), telling `notices` what happens to the VM while it lives.
    pub fn with_notices(config: &VmConfig, notices: Notices) -> Result<Self, BuildError> {
        crate::builder::build(config, notices)
    }

    /// A VM from parts assembled by hand; nothing runs until [`start`](Self::start).
    pub fn from_parts(parts: VmParts) -> Self {
        let VmParts { vm, devices, vcpus, latch, leases, failover, stdin_to_serial, host, cpus, memory, seccomp } =
            parts;
        let notices = host.notices.clone();
        let pfs = failover
            .pairs
            .iter()
            .filter(|p| p.auto)
            .filter_map(|p| host.sysfs.ifindex(&p.pf).ok().map(|i| (i, p.pf.clone())))
            .collect();
        let shared = VcpuShared {
            buses: devices.buses().clone(),
            counters: Arc::new(ExitCounters::default()),
            latch,
            gate: Arc::new(PauseGate::default()),
            notices: notices.clone(),
            seccomp,
        };
        let devices = Arc::new(Mutex::new(devices));
        let leases = Arc::new(Mutex::new(leases));
        let switch = Switch::new(Arc::new(crate::sriov::RtNetlink), "/", notices.clone());
        let passthrough = Arc::new(Mutex::new(Passthrough::new(
            devices.clone(),
            leases.clone(),
            failover.pairs,
            failover.nics,
            switch,
            failover.events.clone(),
            host,
        )));
        let kick = Arc::new(RwLock::new(Vec::new()));
        let handle = VmHandle {
            latch: shared.latch.clone(),
            gate: shared.gate.clone(),
            counters: shared.counters.clone(),
            kick: kick.clone(),
            passthrough: Arc::downgrade(&passthrough),
            host_worker: failover.events.clone(),
            notices,
            cpus,
            memory,
            created: Instant::now(),
        };
        let pending = Pending { vcpus, stdin_to_serial, events: failover.events, events_rx: failover.events_rx, pfs };
        Self {
            api: None,
            failover: None,
            passthrough: Some(passthrough),
            handle,
            vcpus: Vec::new(),
            pending: Some(pending),
            stdin: None,
            shared,
            kick,
            devices: Some(devices),
            vm: Some(vm),
            leases: Some(leases),
        }
    }

    /// Steers the VM from any thread: pause, resume, shut down, add and remove devices,
    /// read counters.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// The seccomp filters of this VM's threads, for threads of the embedder's own that
    /// take part (see [`ThreadKind::Main`](crate::seccomp::ThreadKind::Main)).
    pub fn seccomp(&self) -> &SeccompFilters {
        &self.shared.seccomp
    }

    /// Serves the control socket at `path` until the VM ends; the socket file goes
    /// with it.
    pub fn serve_api(&mut self, path: &std::path::Path) -> Result<(), crate::api::ServerError> {
        let control: Arc<dyn crate::api::VmControl> = Arc::new(self.handle());
        self.api = Some(crate::api::ApiServer::start_filtered(path, control, &self.shared.seccomp)?);
        Ok(())
    }

    /// Starts the failover worker and one thread per vCPU: the guest runs.
    pub fn start(&mut self) -> Result<(), RunError> {
        let Pending { vcpus, stdin_to_serial, events, events_rx, pfs } =
            self.pending.take().ok_or(RunError::AlreadyStarted)?;
        // vCPU threads first, so that their filters go in while the others start; the
        // worker takes what the guest posts before it runs from its queue.
        install_kick_handler().map_err(RunError::Signals)?;
        for vcpu in vcpus {
            let id = vcpu.id();
            let thread =
                VcpuHandle::spawn(vcpu, self.shared.clone()).map_err(|source| RunError::SpawnVcpu { id, source })?;
            self.kick
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .push(KickTarget { pthread: thread.pthread(), done: thread.done.clone() });
            self.vcpus.push(thread);
        }
        if let Some(passthrough) = &self.passthrough {
            let worker = FailoverWorker::spawn(passthrough.clone(), events, events_rx, pfs, &self.shared.seccomp);
            self.failover = Some(worker.map_err(RunError::Failover)?);
        }
        if stdin_to_serial {
            let serial =
                self.devices.as_ref().and_then(|d| d.lock().unwrap_or_else(|e| e.into_inner()).serial().cloned());
            if let Some(serial) = serial {
                self.stdin = Some(StdinPump::start(serial, &self.shared.seccomp).map_err(RunError::Stdin)?);
            }
        }
        // Every thread of the VM is started by now; each filtered itself meanwhile.
        self.shared.seccomp.settle()?;
        Ok(())
    }

    /// Starts the VM if it has not been, and blocks until the guest powers off, resets,
    /// crashes, or a [`VmHandle`] ends it; then stops every vCPU, gives the host devices
    /// back, and returns why it ended.
    pub fn wait(mut self) -> Result<GuestExit, RunError> {
        if self.pending.is_some() {
            self.start()?;
        }
        let reason = self.wait_for_reason()?;
        match self.halt_vcpus() {
            0 => Ok(reason),
            stuck => Err(RunError::StuckVcpus(stuck)),
        }
    }

    /// [`start`](Self::start) and [`wait`](Self::wait).
    pub fn run(self) -> Result<GuestExit, RunError> {
        self.wait()
    }

    fn wait_for_reason(&self) -> Result<GuestExit, RunError> {
        let latch = &self.shared.latch;
        let mut fd = libc::pollfd { fd: latch.event().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        loop {
            let deadline = latch.panic_deadline();
            if deadline.is_some() {
                // The panic's wake-up is spent; drained before the look at the reason, so
                // that a reason set after this look wakes the poll below.
                let _ = latch.event().read();
            }
            if let Some(reason) = latch.get() {
                return Ok(reason);
            }
            let timeout_ms = match deadline.map(|at| at.saturating_duration_since(Instant::now())) {
                None => -1,
                Some(left) if left.is_zero() => {
                    latch.set(GuestExit::Panicked);
                    continue;
                }
                Some(left) => i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX),
            };
            // SAFETY: `fd` is a valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut fd, 1, timeout_ms) } < 0 {
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
        self.shared.latch.set(GuestExit::Stopped { signal: 0 });
        // No request may reach the devices from here on (and the server's references to
        // them go, so they are dropped in this struct's order). Handles reach the devices
        // weakly: held elsewhere, they still answer, with the VM ended.
        drop(self.api.take());
        drop(self.failover.take());
        drop(self.passthrough.take());
        drop(self.pending.take());
        // Parked vCPUs wait on the gate, not in KVM: let them see the latch.
        self.shared.gate.open();
        // No kick through a VmHandle from here on: the threads are about to be joined.
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

impl Drop for Vm {
    fn drop(&mut self) {
        self.halt_vcpus();
    }
}
