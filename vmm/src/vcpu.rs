//! vCPUs: their boot state, and the thread that runs each one and dispatches its exits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestAddress;

use crate::exit::{ExitLatch, GuestExit};
use crate::seccomp::ThreadKind;
use crate::vm::KvmVm;
use devices::Bus;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {id}: {source}")]
    Create {
        id: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot set {what} of vCPU {id}: {source}")]
    Set {
        id: u32,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {set} of the {wanted} boot MSRs of vCPU {id}")]
    PartialMsrs { id: u32, set: usize, wanted: usize },
    #[error("cannot build vCPU {id}'s boot MSR list: {reason}")]
    Msrs { id: u32, reason: String },
}

/// Exit counts across all vCPUs, for `info`/`counters` and for tests.
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub pio: AtomicU64,
    pub mmio: AtomicU64,
    /// Port accesses no device decodes: reads return all-ones, writes are dropped.
    pub pio_unhandled: AtomicU64,
    /// MMIO accesses no device decodes: reads return all-ones, writes are dropped.
    pub mmio_unhandled: AtomicU64,
    /// Exits of kinds Tandem does not expect from a guest, ignored.
    pub other: AtomicU64,
}

/// The buses vCPU exits are dispatched to.
#[derive(Default)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
}

/// What every vCPU thread of a VM shares.
#[derive(Clone)]
pub struct VcpuShared {
    pub buses: Arc<Buses>,
    pub counters: Arc<ExitCounters>,
    pub latch: Arc<ExitLatch>,
    pub gate: Arc<PauseGate>,
    pub notices: devices::Notices,
    pub seccomp: crate::seccomp::SeccompFilters,
}

impl Vcpu {
    pub fn new(vm: &KvmVm, id: u32) -> Result<Self, VcpuError> {
        let fd = vm.fd().create_vcpu(u64::from(id)).map_err(|source| VcpuError::Create { id, source })?;
        Ok(Self { id, fd })
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    fn set<T>(&self, what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuError> {
        r.map_err(|source| VcpuError::Set { id: self.id, what, source })
    }

    /// CPUID, MSRs, FPU and LAPIC as Linux expects them on any vCPU of a `count`-vCPU VM.
    pub fn configure_cpu(&self, supported: &CpuId, count: u32) -> Result<(), VcpuError> {
        let mut cpuid = supported.clone();
        let topology = boot::cpuid::CpuTopology { cpu_index: self.id as u8, cpu_count: count as u8 };
        boot::cpuid::patch_cpuid(cpuid.as_mut_slice(), topology);
        self.set("CPUID", self.fd.set_cpuid2(&cpuid))?;

        let entries = boot::regs::boot_msrs();
        let msrs = kvm_bindings::Msrs::from_entries(&entries)
            .map_err(|e| VcpuError::Msrs { id: self.id, reason: format!("{e:?}") })?;
        let set = self.set("MSRs", self.fd.set_msrs(&msrs))?;
        if set != entries.len() {
            return Err(VcpuError::PartialMsrs { id: self.id, set, wanted: entries.len() });
        }
        self.set("FPU", self.fd.set_fpu(&boot::regs::boot_fpu()))?;

        let mut lapic = self.set("LAPIC (read)", self.fd.get_lapic())?;
        boot::regs::set_lint(&mut lapic);
        self.set("LAPIC", self.fd.set_lapic(&lapic))?;
        Ok(())
    }

    /// Enters the Linux 64-bit boot protocol at `entry`: long mode with the identity
    /// page tables and GDT `boot::regs` wrote into guest memory.
    pub fn set_long_mode_entry(&self, entry: GuestAddress) -> Result<(), VcpuError> {
        let mut sregs = self.set("special registers (read)", self.fd.get_sregs())?;
        boot::regs::long_mode_sregs(&mut sregs);
        self.set("special registers", self.fd.set_sregs(&sregs))?;
        self.set("registers", self.fd.set_regs(&boot::regs::boot_regs(entry)))
    }

    /// Starts in flat real mode at `entry` (tiny test guests).
    pub fn set_real_mode_entry(&self, entry: GuestAddress) -> Result<(), VcpuError> {
        let mut sregs = self.set("special registers (read)", self.fd.get_sregs())?;
        boot::regs::real_mode_sregs(&mut sregs);
        self.set("special registers", self.fd.set_sregs(&sregs))?;
        let regs = kvm_bindings::kvm_regs { rip: entry.0, rflags: 0x2, rsp: 0x8000, ..Default::default() };
        self.set("registers", self.fd.set_regs(&regs))
    }

    /// Runs the vCPU until the VM stops, dispatching exits. The latch is checked
    /// whenever KVM_RUN returns, which a signal to this thread forces (see
    /// `VcpuHandle::kick`).
    pub fn run(mut self, vm: &VcpuShared) {
        let VcpuShared { buses, counters, latch, gate, notices, .. } = vm;
        let id = self.id;
        let mut nmis_seen = 0;
        while !latch.is_set() {
            let nmi_due = gate.between_runs(latch, &mut nmis_seen);
            if latch.is_set() {
                break;
            }
            if nmi_due {
                if let Err(e) = self.fd.nmi() {
                    notices.warn(format_args!("vCPU {id}: cannot inject the NMI: {e}"));
                }
            }
            let outcome = match self.fd.run() {
                Ok(exit) => dispatch(id, exit, buses, counters),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                Err(e) => Some(GuestExit::VcpuFailed { vcpu: id, reason: format!("KVM_RUN failed: {e}") }),
            };
            if let Some(reason) = outcome {
                latch.set(reason);
                break;
            }
        }
    }
}

/// Handles one exit; returns why the VM must stop, if it must.
fn dispatch(id: u32, exit: VcpuExit<'_>, buses: &Buses, counters: &ExitCounters) -> Option<GuestExit> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            counters.pio.fetch_add(1, Ordering::Relaxed);
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
                counters.pio_unhandled.fetch_add(1, Ordering::Relaxed);
            }
        }
        VcpuExit::IoOut(port, data) => {
            counters.pio.fetch_add(1, Ordering::Relaxed);
            if !buses.pio.write(u64::from(port), data) {
                counters.pio_unhandled.fetch_add(1, Ordering::Relaxed);
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            counters.mmio.fetch_add(1, Ordering::Relaxed);
            if !buses.mmio.read(addr, data) {
                data.fill(0xff);
                counters.mmio_unhandled.fetch_add(1, Ordering::Relaxed);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            counters.mmio.fetch_add(1, Ordering::Relaxed);
            if !buses.mmio.write(addr, data) {
                counters.mmio_unhandled.fetch_add(1, Ordering::Relaxed);
            }
        }
        VcpuExit::Shutdown => return Some(GuestExit::TripleFault { vcpu: id }),
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => GuestExit::PowerOff,
                KVM_SYSTEM_EVENT_RESET => GuestExit::Reset,
                KVM_SYSTEM_EVENT_CRASH => {
                    GuestExit::VcpuFailed { vcpu: id, reason: "the guest reported a crash".into() }
                }
                other => GuestExit::VcpuFailed { vcpu: id, reason: format!("unknown system event {other}") },
            })
        }
        VcpuExit::FailEntry(hw_reason, cpu) => {
            return Some(GuestExit::VcpuFailed {
                vcpu: id,
                reason: format!("KVM could not enter the guest (hardware reason {hw_reason:#x}, host CPU {cpu})"),
            })
        }
        VcpuExit::InternalError => {
            return Some(GuestExit::VcpuFailed {
                vcpu: id,
                reason: "KVM internal error (often an instruction KVM cannot emulate)".into(),
            })
        }
        // With the in-kernel irqchip HLT never reaches us; the rest carry no work for an
        // x86 VMM without those features enabled. Counted, then the vCPU resumes.
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen | VcpuExit::Debug(_) => {}
        _ => {
            counters.other.fetch_add(1, Ordering::Relaxed);
        }
    }
    None
}

/// Holds vCPU threads outside KVM_RUN while the VM is paused, and hands them what they
/// must do between two KVM_RUNs (inject an NMI). A vCPU passes it at the top of its
/// loop; the pauser kicks it out of KVM_RUN and waits until all have parked, so that
/// "paused" means no guest instruction runs.
#[derive(Default)]
pub struct PauseGate {
    state: std::sync::Mutex<GateState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    parked: usize,
    /// NMIs asked for so far; each vCPU injects when its own count is behind.
    nmis: u64,
    /// vCPUs that injected the latest NMI.
    nmi_acks: usize,
}

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks while paused; then says whether an NMI is due (`nmis_seen` is the vCPU's
    /// own count, brought up to date).
    fn between_runs(&self, latch: &ExitLatch, nmis_seen: &mut u64) -> bool {
        let mut st = self.lock();
        if st.paused {
            st.parked += 1;
            self.changed.notify_all();
            while st.paused && !latch.is_set() {
                st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.parked -= 1;
        }
        if *nmis_seen == st.nmis {
            return false;
        }
        *nmis_seen = st.nmis;
        st.nmi_acks += 1;
        self.changed.notify_all();
        true
    }

    /// Asks every vCPU for an NMI; they inject it at their next pass (see `wait_nmi`).
    pub fn request_nmi(&self) {
        let mut st = self.lock();
        st.nmis += 1;
        st.nmi_acks = 0;
    }

    /// Waits up to `timeout` for `count` vCPUs to inject the latest NMI.
    pub fn wait_nmi(&self, count: usize, timeout: std::time::Duration) -> bool {
        self.wait_for(timeout, |st| (st.nmi_acks >= count).then_some(true))
    }

    /// Waits up to `timeout` until `outcome` of the state is decided (`Some`); false if
    /// it never is.
    fn wait_for(&self, timeout: std::time::Duration, outcome: impl Fn(&GateState) -> Option<bool>) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if let Some(done) = outcome(&st) {
                return done;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            st = self.changed.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Asks vCPUs to park; they do at their next pass through the loop (see `parked`).
    pub fn close(&self) {
        self.lock().paused = true;
    }

    /// Releases parked vCPUs (also what stopping the VM does, so none stays parked).
    pub fn open(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().paused
    }

    /// How many vCPUs are parked now.
    pub fn parked(&self) -> usize {
        self.lock().parked
    }

    /// Waits up to `timeout` for `count` vCPUs to park; returns whether they did.
    pub fn wait_parked(&self, count: usize, timeout: std::time::Duration) -> bool {
        self.wait_for(timeout, |st| {
            if st.parked >= count {
                Some(true)
            } else if !st.paused {
                Some(false)
            } else {
                None
            }
        })
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    pub id: u32,
    pub thread: std::thread::JoinHandle<()>,
    /// Set by the thread as it ends (before it can be joined).
    pub done: Arc<std::sync::atomic::AtomicBool>,
}

/// The signal used to knock vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler that makes the kick signal interrupt KVM_RUN instead of
/// killing the process. Idempotent.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl VcpuHandle {
    pub fn spawn(vcpu: Vcpu, vm: VcpuShared) -> std::io::Result<Self> {
        let id = vcpu.id();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let filters = vm.seccomp.clone();
        let thread = crate::seccomp::spawn(&format!("vcpu{id}"), &filters, ThreadKind::Vcpu, move || {
            vcpu.run(&vm);
            flag.store(true, std::sync::atomic::Ordering::Release);
        })?;
        Ok(Self { id, thread, done })
    }

    /// The thread's pthread id, for kicks from other threads (valid until joined).
    pub fn pthread(&self) -> libc::pthread_t {
        use std::os::unix::thread::JoinHandleExt;
        self.thread.as_pthread_t()
    }

    /// Interrupts KVM_RUN on this vCPU's thread so it sees the stop flag.
    pub fn kick(&self) {
        use std::os::unix::thread::JoinHandleExt;
        if !self.thread.is_finished() {
            // SAFETY: the pthread id comes from a JoinHandle we own and have not joined,
            // so the thread (finished or not) has not been reclaimed.
            unsafe { libc::pthread_kill(self.thread.as_pthread_t(), kick_signal()) };
        }
    }
}
