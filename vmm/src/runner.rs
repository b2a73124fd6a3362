//! A started VM: its vCPU threads, and the wait for the guest (or the host) to end it.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::device_manager::DeviceManager;
use crate::exit::{ExitLatch, GuestExit};
use crate::sriov::Leases;
use crate::terminal::StdinPump;
use crate::vcpu::{install_kick_handler, ExitCounters, Vcpu, VcpuHandle};
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
}

/// Lets another thread (a signal handler thread, an API server) stop a running VM.
#[derive(Clone)]
pub struct VmStopper(Arc<ExitLatch>);

impl VmStopper {
    pub fn stop(&self, reason: GuestExit) {
        self.0.set(reason);
    }
}

pub struct RunningVm {
    // Field order is drop order: threads are stopped in `wait`/`drop` before the VM
    // (and the guest memory they run on) goes away.
    vcpus: Vec<VcpuHandle>,
    stdin: Option<StdinPump>,
    latch: Arc<ExitLatch>,
    counters: Arc<ExitCounters>,
    /// `None` once leaked, with the VM: see `halt_vcpus`.
    devices: Option<DeviceManager>,
    /// `None` once leaked: see `halt_vcpus`.
    vm: Option<Vm>,
    /// Host devices passed through, restored once the devices and the VM (which hold
    /// them open through VFIO) are gone.
    leases: Option<Leases>,
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
            devices: Some(devices),
            vm: Some(vm),
            leases: Some(leases),
        };
        install_kick_handler().map_err(RunError::Signals)?;
        for vcpu in vcpus {
            let id = vcpu.id();
            let handle = VcpuHandle::spawn(vcpu, buses.clone(), running.counters.clone(), running.latch.clone())
                .map_err(|source| RunError::SpawnVcpu { id, source })?;
            running.vcpus.push(handle);
        }
        Ok(running)
    }

    pub fn stopper(&self) -> VmStopper {
        VmStopper(self.latch.clone())
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
