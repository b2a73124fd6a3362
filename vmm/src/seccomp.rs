//! Seccomp filters, one per kind of VMM thread, each allowing only the system calls that
//! kind makes. A thread installs its own filter before it touches anything the guest
//! controls: a vCPU before its first KVM_RUN, the device loop before its first event, the
//! API server and the host-device worker before their first request, `tandem`'s main
//! thread once the VM runs.
//!
//! With `on`, any other call kills the whole process (SIGSYS): a VMM that makes a call it
//! never makes is compromised or broken, and must not go on. The kernel logs the thread and
//! the call (`dmesg | grep type=1326`); `tandem cleanup` gives back its host devices, as
//! after SIGKILL. With `log`, such calls are allowed and logged, to find what a new code
//! path needs. Threads without file access get EACCES for opening one instead (see REFUSED).
//! ioctl, the one call whose argument picks the kernel code it reaches, is filtered on that
//! argument too (see IOCTL_TYPES).

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

#[derive(Debug, Clone, thiserror::Error)]
pub enum SeccompError {
    #[error("--seccomp {0:?}: use on, log or off")]
    BadMode(String),
    #[error("cannot build the {kind} seccomp filter: {reason}")]
    Build { kind: &'static str, reason: String },
    #[error(
        "cannot install the {kind} seccomp filter: {reason}; this kernel may lack seccomp \
         (CONFIG_SECCOMP_FILTER): run with --seccomp off to go without"
    )]
    Install { kind: &'static str, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    #[default]
    On,
    Log,
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = SeccompError;
    fn from_str(s: &str) -> Result<Self, SeccompError> {
        match s {
            "on" => Ok(Self::On),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            _ => Err(SeccompError::BadMode(s.to_string())),
        }
    }
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::On => "on",
            Self::Log => "log",
            Self::Off => "off",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs the guest: KVM_RUN and the devices' register handlers.
    Vcpu,
    /// The device event loop (virtio queues, taps, disk images) and the serial input pump.
    Devices,
    /// The control socket's server: requests read, answered, handed on.
    Api,
    /// The host-device worker: hot-plug and unplug of passthrough devices and failover
    /// VFs (sysfs, VFIO, the restore journals, rtnetlink), whoever asked for them.
    HostDevices,
    /// The thread that started the VM, once it runs: it waits for the end, then takes the
    /// VM down (vCPUs and devices stopped, host devices and taps given back, the terminal
    /// restored). `tandem` filters its main thread so; an embedder may do the same.
    Main,
    /// Waits for SIGTERM, SIGINT and SIGHUP (sigwait) and ends the VM.
    Signals,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Vcpu,
        ThreadKind::Devices,
        ThreadKind::Api,
        ThreadKind::HostDevices,
        ThreadKind::Main,
        ThreadKind::Signals,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vCPU",
            Self::Devices => "device",
            Self::Api => "API",
            Self::HostDevices => "host-device",
            Self::Main => "main",
            Self::Signals => "signal",
        }
    }

    /// Only the host-device worker and the main thread open files by name; the others get
    /// EACCES (see REFUSED).
    fn opens_files(self) -> bool {
        matches!(self, Self::HostDevices | Self::Main)
    }

    /// The system calls this kind of thread makes.
    pub fn allowed(self) -> Vec<i64> {
        let mut calls = RUNTIME.to_vec();
        match self {
            Self::Vcpu => calls.extend_from_slice(VCPU),
            Self::Devices => calls.extend_from_slice(DEVICES),
            Self::Api => calls.extend_from_slice(API),
            Self::HostDevices => calls.extend_from_slice(HOST_DEVICES),
            // Taking the VM down undoes what the host-device worker did.
            Self::Main => calls.extend(HOST_DEVICES.iter().chain(MAIN)),
            Self::Signals => calls.push(libc::SYS_rt_sigtimedwait),
        }
        calls.sort_unstable();
        calls.dedup();
        calls
    }

    /// ioctls this kind makes beyond IOCTL_TYPES and IOCTLS: the main thread gives the
    /// terminal its mode back.
    fn more_ioctls(self) -> &'static [libc::c_ulong] {
        match self {
            Self::Main => &[libc::TCGETS, libc::TCSETS],
            _ => &[],
        }
    }
}

// The lists below are what each kind was seen to make (`--seccomp log` through the whole
// test suite, the kernel's rate limit lifted), plus what a path the tests do not take
// needs, each named where it is listed.

/// What every thread does through Rust's std and glibc: memory (glibc's malloc grows and
/// trims a thread's arena with mprotect and madvise), locks and channels (futex;
/// sched_yield when a std channel is contended), the clock where the vDSO cannot read it,
/// eventfd writes and closing fds, and the end of the thread (sigaltstack and
/// rt_sigprocmask tear down what std set up for it). And restart_syscall: a process
/// stopped (SIGSTOP, ^Z, a debugger, a cgroup freezer) and continued resumes each
/// thread's interrupted sleep or poll with a timeout through it, which no test made
/// until bench/boot.sh stopped tandem to read its memory: without it SIGCONT killed it.
const RUNTIME: &[i64] = &[
    libc::SYS_restart_syscall,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
];

/// KVM_RUN and the guest's register accesses: VFIO config space (positioned I/O on the
/// device fd), MSI routes, irqfds and ioeventfds (ioctl), eventfd reads; the return from
/// the kick signal's handler.
const VCPU: &[i64] =
    &[libc::SYS_ioctl, libc::SYS_read, libc::SYS_pread64, libc::SYS_pwrite64, libc::SYS_fcntl, libc::SYS_rt_sigreturn];

/// Queue work: taps (vectored reads and writes, queue attach), disk images (positioned
/// I/O, flush; hole punching for discard, which the bed's loop-device disks never take),
/// the event loop itself, and the serial input pump's poll.
const DEVICES: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_poll,
];

/// The socket: accept, poll, receive, send (std's sockets use recvfrom and sendto), the
/// write timeout and blocking mode; pause and resume (kicking the vCPUs: glibc's
/// pthread_kill is getpid and tgkill), NMIs (a KVM ioctl). device-add and device-remove
/// are handed to the host-device worker.
const API: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_poll,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_getpid,
    libc::SYS_tgkill,
];

/// Plugging and unplugging host devices: sysfs (files, links, directory listings),
/// VFIO (ioctls, config space, BAR mappings, interrupt eventfds), the restore journals
/// (files, hard links, renames, locks, flushes), rtnetlink (link state, the bridge's
/// forwarding entries), the memlock limit; pausing the vCPUs around a device's BARs.
const HOST_DEVICES: &[i64] = &[
    libc::SYS_read,
    libc::SYS_poll,
    libc::SYS_ioctl,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_eventfd2,
    libc::SYS_fcntl,
    libc::SYS_openat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_mkdir,
    libc::SYS_linkat,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_flock,
    libc::SYS_fsync,
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_connect,
    libc::SYS_getsockname,
    libc::SYS_setsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_prlimit64,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
];

/// The main thread's own: sleeping between looks at a stopping VM, and the process's end.
const MAIN: &[i64] = &[libc::SYS_clock_nanosleep, libc::SYS_exit_group];

/// ioctl is the widest call a thread makes: its request number picks any driver's handler.
/// Threads reach only KVM's and VFIO's (whole request types: every KVM_* and VFIO_* call
/// goes to a KVM or VFIO fd) and, by exact number, the tap's calls and non-blocking mode.
/// Not TIOCSTI, nor any other driver's.
const IOCTL_TYPES: &[u8] = &[kvm_bindings::KVMIO as u8, VFIO_TYPE];
/// VFIO's ioctl type, `';'` (linux/vfio.h).
const VFIO_TYPE: u8 = b';';
const IOCTLS: &[libc::c_ulong] = &[
    libc::TUNSETIFF,
    libc::TUNGETIFF,
    libc::TUNSETVNETHDRSZ,
    libc::TUNSETOFFLOAD,
    libc::TUNSETQUEUE,
    libc::SIOCGIFFLAGS as libc::c_ulong,
    libc::SIOCSIFFLAGS as libc::c_ulong,
    libc::FIONBIO,
    libc::FIOCLEX,
];

/// The ioctls of IOCTL_TYPES and IOCTLS, on the request argument (the low 32 bits: the
/// kernel's request is an unsigned int).
fn ioctl_rules(kind: ThreadKind) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let request = |op, value| SeccompCondition::new(1, SeccompCmpArgLen::Dword, op, value);
    let types = IOCTL_TYPES.iter().map(|&t| request(SeccompCmpOp::MaskedEq(0xff00), u64::from(t) << 8));
    let exact = IOCTLS.iter().chain(kind.more_ioctls()).map(|&nr| request(SeccompCmpOp::Eq, u64::from(nr as u32)));
    types.chain(exact).map(|cond| SeccompRule::new(vec![cond?])).collect()
}

/// Calls that threads without file access get an error for instead of being killed.
/// glibc opens files behind a caller's back, once per process, in whichever thread gets
/// there first: `free` reads /proc/sys/vm/overcommit_memory when it first shrinks a
/// thread's heap, `sysconf` reads /sys for the CPU count. Each copes with a failed open,
/// and a failed open gives a compromised thread nothing.
const REFUSED: &[i64] = &[libc::SYS_openat, libc::SYS_open];

/// The compiled filters of one VM, installed by each thread on itself; empty with `off`.
#[derive(Clone, Default)]
pub struct SeccompFilters {
    programs: Option<Arc<Programs>>,
    installs: Arc<Installs>,
}

/// What the threads [`spawn`] started have said about their filters.
#[derive(Default)]
struct Installs {
    state: Mutex<InstallState>,
    changed: Condvar,
}

#[derive(Default)]
struct InstallState {
    /// Started, not yet filtered (or failed).
    pending: usize,
    /// The first thread that could not be filtered, and why.
    failed: Option<SeccompError>,
}

impl Installs {
    fn lock(&self) -> std::sync::MutexGuard<'_, InstallState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin(&self) {
        self.lock().pending += 1;
    }

    fn end(&self, failed: Option<SeccompError>) {
        let mut st = self.lock();
        st.pending = st.pending.saturating_sub(1);
        if st.failed.is_none() {
            st.failed = failed;
        }
        self.changed.notify_all();
    }
}

struct Programs {
    /// One per kind, in `ThreadKind::ALL` order.
    allow: Vec<BpfProgram>,
    /// Layered with `allow` for the kinds without file access, whose `allow` passes
    /// REFUSED: the kernel takes the strictest answer of a thread's filters, EACCES.
    refuse: BpfProgram,
}

impl SeccompFilters {
    pub fn new(mode: SeccompMode) -> Result<Self, SeccompError> {
        match mode {
            SeccompMode::Off => Ok(Self::default()),
            SeccompMode::Log => Self::answering(SeccompAction::Log),
            SeccompMode::On => Self::answering(SeccompAction::KillProcess),
        }
    }

    /// Filters that answer a call outside a kind's list with `mismatch`.
    fn answering(mismatch: SeccompAction) -> Result<Self, SeccompError> {
        let build = |kind: ThreadKind| {
            let mut calls = kind.allowed();
            // REFUSED passes here so that `refuse`'s EACCES, not this mismatch, answers it.
            if !kind.opens_files() {
                calls.extend_from_slice(REFUSED);
            }
            compile(kind.name(), calls, Some(kind), mismatch.clone(), SeccompAction::Allow)
        };
        let allow = ThreadKind::ALL.into_iter().map(build).collect::<Result<_, _>>()?;
        let refused = SeccompAction::Errno(libc::EACCES as u32);
        let refuse = compile("refused-call", REFUSED.to_vec(), None, SeccompAction::Allow, refused)?;
        Ok(Self { programs: Some(Arc::new(Programs { allow, refuse })), installs: Default::default() })
    }

    /// Filters the calling thread (and any it starts) from now on; a no-op with `off`.
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let Some(programs) = &self.programs else { return Ok(()) };
        let Some(allow) = ThreadKind::ALL.iter().position(|k| *k == kind).and_then(|i| programs.allow.get(i)) else {
            return Err(SeccompError::Install { kind: kind.name(), reason: "no filter for it".into() });
        };
        let fail = |e: seccompiler::Error| SeccompError::Install { kind: kind.name(), reason: e.to_string() };
        // First: once `allow` is in, installing another filter is a call it refuses.
        if !kind.opens_files() {
            seccompiler::apply_filter(&programs.refuse).map_err(fail)?;
        }
        seccompiler::apply_filter(allow).map_err(fail)
    }

    pub fn is_on(&self) -> bool {
        self.programs.is_some()
    }

    /// Waits until every thread [`spawn`] started has its filter in, or one could not:
    /// why, then.
    pub fn settle(&self) -> Result<(), SeccompError> {
        let mut st = self.installs.lock();
        while st.pending > 0 {
            st = self.installs.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.failed.clone().map_or(Ok(()), Err)
    }
}

/// A filter answering `calls` with `on_match` and every other call with `mismatch`; for
/// a thread `kind`, an ioctl matches only with a request [`ioctl_rules`] lets through.
fn compile(
    what: &'static str,
    calls: Vec<i64>,
    kind: Option<ThreadKind>,
    mismatch: SeccompAction,
    on_match: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let fail = |reason: String| SeccompError::Build { kind: what, reason };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = calls.into_iter().map(|nr| (nr, vec![])).collect();
    if let (Some(kind), Some(ioctl)) = (kind, rules.get_mut(&libc::SYS_ioctl)) {
        *ioctl = ioctl_rules(kind).map_err(|e| fail(e.to_string()))?;
    }
    let filter = SeccompFilter::new(rules, mismatch, on_match, TargetArch::x86_64).map_err(|e| fail(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| fail(e.to_string()))
}

/// Every thread's stack. Rust's default, 2 MiB, is a huge page's size: a stack that lands
/// 2 MiB-aligned (the first one does, right below the aligned guest RAM) is then backed
/// by one transparent huge page at its first touch, 2 MiB resident for a few KiB used
/// (measured: a third of the VMM's own RSS in the bed). A smaller stack can never hold an
/// aligned huge page; the deepest path (a vCPU's exit through a device) uses a few KiB.
const THREAD_STACK: usize = 1 << 20;

/// Starts thread `name`, which installs the `kind` filter on itself before it runs `f`
/// (one that cannot skips `f`), so nothing runs in it unfiltered. Returns without waiting
/// for that: a kernel's filter set-up costs about 0.1 ms a thread, which then overlaps the
/// VM's start; [`SeccompFilters::settle`] says whether they all went in.
pub fn spawn(
    name: &str,
    filters: &SeccompFilters,
    kind: ThreadKind,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let installs = filters.installs.clone();
    installs.begin();
    let filters = filters.clone();
    let spawned = std::thread::Builder::new().name(name.to_string()).stack_size(THREAD_STACK).spawn(move || {
        let installed = filters.install(kind);
        let ok = installed.is_ok();
        filters.installs.end(installed.err());
        // A thread that could not be filtered drops what it was given, unused.
        if ok {
            f();
        }
    });
    if spawned.is_err() {
        installs.end(None);
    }
    spawned
}

impl std::fmt::Debug for SeccompFilters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_on() { "SeccompFilters(installed per thread)" } else { "SeccompFilters(off)" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_a_bad_one_says_what_to_use() {
        assert_eq!("on".parse::<SeccompMode>().unwrap(), SeccompMode::On);
        assert_eq!("log".parse::<SeccompMode>().unwrap(), SeccompMode::Log);
        assert_eq!("off".parse::<SeccompMode>().unwrap(), SeccompMode::Off);
        assert!("yes".parse::<SeccompMode>().unwrap_err().to_string().contains("on, log or off"));
    }

    #[test]
    fn every_kind_compiles_and_none_may_exec_fork_or_open_what_it_does_not_need() {
        SeccompFilters::new(SeccompMode::On).expect("filters compile");
        for kind in ThreadKind::ALL {
            let allowed = kind.allowed();
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_clone3,
                libc::SYS_ptrace,
            ] {
                assert!(!allowed.contains(&nr), "{} threads may make syscall {nr}", kind.name());
            }
            assert!(allowed.contains(&libc::SYS_restart_syscall), "{} threads die on SIGCONT", kind.name());
        }
        // Only the host-device worker and the main thread reach files and sockets by name.
        for kind in [ThreadKind::Vcpu, ThreadKind::Devices, ThreadKind::Api, ThreadKind::Signals] {
            for nr in [libc::SYS_openat, libc::SYS_socket, libc::SYS_connect, libc::SYS_unlinkat] {
                assert!(!kind.allowed().contains(&nr), "{} threads may make syscall {nr}", kind.name());
            }
        }
    }

    #[test]
    fn a_device_thread_opening_a_file_gets_an_error_not_a_kill() {
        let filters = SeccompFilters::new(SeccompMode::On).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        spawn("refused", &filters, ThreadKind::Devices, move || {
            let opened = std::fs::File::open("/proc/sys/vm/overcommit_memory").map_err(|e| e.raw_os_error());
            // Churn the thread's heap so glibc may trim it (its own lazy open).
            for _ in 0..4 {
                let blocks: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 100 * 1024]).collect();
                drop(blocks);
            }
            let _ = tx.send(opened.err());
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(rx.recv().unwrap(), Some(Some(libc::EACCES)));
    }

    #[test]
    fn ioctls_reach_kvm_vfio_and_the_tap_calls_and_nothing_else() {
        // EPERM instead of a kill, so that the test sees each answer.
        let filters = SeccompFilters::answering(SeccompAction::Errno(libc::EPERM as u32)).unwrap();
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        spawn("ioctls", &filters, ThreadKind::Api, move || {
            use std::os::fd::AsRawFd;
            let call = |request: libc::c_ulong| {
                let mut arg: libc::c_int = 1;
                // SAFETY: each request reads or writes at most an int at `arg`, a live local.
                let ret = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, &mut arg) };
                if ret < 0 {
                    std::io::Error::last_os_error().raw_os_error()
                } else {
                    Some(0)
                }
            };
            let kvm_get_api_version = u64::from(kvm_bindings::KVMIO) << 8;
            let vfio_get_api_version = u64::from(VFIO_TYPE) << 8 | 100;
            let answers = [
                call(libc::FIONBIO),
                call(kvm_get_api_version as libc::c_ulong),
                call(vfio_get_api_version as libc::c_ulong),
                call(libc::TIOCSTI),
                call(libc::FIONREAD),
            ];
            let _ = tx.send(answers);
        })
        .unwrap()
        .join()
        .unwrap();
        let (ok, not_a_tty, refused) = (Some(0), Some(libc::ENOTTY), Some(libc::EPERM));
        // KVM's and VFIO's pass the filter (and the socket says it knows neither).
        assert_eq!(rx.recv().unwrap(), [ok, not_a_tty, not_a_tty, refused, refused]);
    }

    #[test]
    fn settle_waits_for_the_spawned_threads_filters_and_names_one_that_failed() {
        let filters = SeccompFilters::new(SeccompMode::On).unwrap();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let thread = spawn("settled", &filters, ThreadKind::Devices, move || {
            let _ = wait.recv();
        })
        .unwrap();
        // Answers while the thread is still in its body: filtered, not finished.
        filters.settle().unwrap();
        drop(go);
        thread.join().unwrap();

        filters.installs.begin();
        filters.installs.end(Some(SeccompError::Install { kind: "vCPU", reason: "no seccomp here".into() }));
        let e = filters.settle().unwrap_err().to_string();
        assert!(e.contains("vCPU seccomp filter") && e.contains("--seccomp off"), "{e}");
    }

    #[test]
    fn off_installs_nothing() {
        let filters = SeccompFilters::new(SeccompMode::Off).unwrap();
        assert!(!filters.is_on());
        filters.install(ThreadKind::Vcpu).unwrap();
        // Still unfiltered: a call no kind allows goes through.
        assert!(std::fs::metadata("/").is_ok());
    }
}
