//! Seccomp filters, one per kind of VMM thread, each allowing only the system calls that
//! kind makes. A thread installs its own filter before it touches anything the guest
//! controls: a vCPU before its first KVM_RUN, the device loop before its first event, the
//! control threads before their first request.
//!
//! With `on`, any other call kills the whole process (SIGSYS): a VMM that makes a call it
//! never makes is compromised or broken, and must not go on. The kernel logs the thread and
//! the call (`dmesg | grep type=1326`); `tandem cleanup` gives back its host devices, as
//! after SIGKILL. With `log`, such calls are allowed and logged, to find what a new code
//! path needs. Threads without file access get EACCES for opening one instead (see REFUSED).

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

#[derive(Debug, thiserror::Error)]
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
    /// The device event loop: virtio queues, taps, disk images.
    Devices,
    /// The control socket and the failover worker: hot-plug, host devices, netlink.
    Control,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vcpu, ThreadKind::Devices, ThreadKind::Control];

    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vCPU",
            Self::Devices => "device",
            Self::Control => "control",
        }
    }

    /// Only control threads open files by name; the others get EACCES (see REFUSED).
    fn opens_files(self) -> bool {
        self == Self::Control
    }

    /// The system calls this kind of thread makes.
    pub fn allowed(self) -> Vec<i64> {
        let mut calls = COMMON.to_vec();
        match self {
            Self::Vcpu => calls.extend_from_slice(DEVICE_SETUP),
            Self::Devices => calls.extend_from_slice(DEVICES),
            Self::Control => calls.extend(DEVICE_SETUP.iter().chain(CONTROL)),
        }
        calls.sort_unstable();
        calls.dedup();
        calls
    }
}

/// What every thread does through Rust's std and glibc: memory, locks, time, signals
/// (the vCPU kick), eventfds, and ending the thread.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// What placing and programming devices takes — MSI routes, irqfds and ioeventfds, VFIO
/// config space and interrupts, BAR mappings, queue activation: the guest's register
/// writes on a vCPU, hot-plug on a control thread.
const DEVICE_SETUP: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_eventfd2,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_epoll_ctl,
];

/// Queue work: taps (vectored reads and writes, queue attach), disk images (positioned
/// I/O, flush, hole punching), and the event loop itself.
const DEVICES: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// Requests on the socket, and what else plugging and unplugging host devices takes:
/// sysfs and the restore journals (files, links, locks), rtnetlink.
const CONTROL: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_connect,
    libc::SYS_getsockname,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_openat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_lseek,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdirat,
    libc::SYS_mkdir,
    libc::SYS_linkat,
    libc::SYS_link,
    libc::SYS_geteuid,
    libc::SYS_getuid,
    libc::SYS_prlimit64,
    libc::SYS_getrlimit,
    libc::SYS_rmdir,
    libc::SYS_unlink,
    libc::SYS_rename,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_fsync,
    libc::SYS_flock,
    libc::SYS_kill,
];

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
}

struct Programs {
    /// One per kind, in `ThreadKind::ALL` order.
    allow: [BpfProgram; 3],
    /// Layered with `allow` for the kinds without file access, whose `allow` passes
    /// REFUSED: the kernel takes the strictest answer of a thread's filters, EACCES.
    refuse: BpfProgram,
}

impl SeccompFilters {
    pub fn new(mode: SeccompMode) -> Result<Self, SeccompError> {
        let mismatch = match mode {
            SeccompMode::Off => return Ok(Self::default()),
            SeccompMode::Log => SeccompAction::Log,
            SeccompMode::On => SeccompAction::KillProcess,
        };
        let build = |kind: ThreadKind| {
            let mut calls = kind.allowed();
            // REFUSED passes here so that `refuse`'s EACCES, not this mismatch, answers it.
            if !kind.opens_files() {
                calls.extend_from_slice(REFUSED);
            }
            compile(kind.name(), calls, mismatch.clone(), SeccompAction::Allow)
        };
        let allow = [build(ThreadKind::Vcpu)?, build(ThreadKind::Devices)?, build(ThreadKind::Control)?];
        let refuse =
            compile("refused-call", REFUSED.to_vec(), SeccompAction::Allow, SeccompAction::Errno(libc::EACCES as u32))?;
        Ok(Self { programs: Some(Arc::new(Programs { allow, refuse })) })
    }

    /// Filters the calling thread (and any it starts) from now on; a no-op with `off`.
    pub fn install(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let Some(programs) = &self.programs else { return Ok(()) };
        let index = ThreadKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        let fail = |e: seccompiler::Error| SeccompError::Install { kind: kind.name(), reason: e.to_string() };
        // First: once `allow` is in, installing another filter is a call it refuses.
        if !kind.opens_files() {
            seccompiler::apply_filter(&programs.refuse).map_err(fail)?;
        }
        seccompiler::apply_filter(&programs.allow[index]).map_err(fail)
    }

    pub fn is_on(&self) -> bool {
        self.programs.is_some()
    }
}

/// A filter answering `calls` with `on_match` and every other call with `mismatch`.
fn compile(
    what: &'static str,
    calls: Vec<i64>,
    mismatch: SeccompAction,
    on_match: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let fail = |reason: String| SeccompError::Build { kind: what, reason };
    let rules: BTreeMap<i64, Vec<SeccompRule>> = calls.into_iter().map(|nr| (nr, vec![])).collect();
    let filter = SeccompFilter::new(rules, mismatch, on_match, TargetArch::x86_64).map_err(|e| fail(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| fail(e.to_string()))
}

/// Starts thread `name` filtered as `kind`; returns once the filter is in place (or with
/// why it could not be), so nothing runs in the thread unfiltered.
pub fn spawn(
    name: &str,
    filters: &SeccompFilters,
    kind: ThreadKind,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let filters = filters.clone();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || {
        let installed = filters.install(kind);
        let ok = installed.is_ok();
        let _ = tx.send(installed);
        // A thread that could not be filtered drops what it was given, unused.
        if ok {
            f();
        }
    })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
        Err(_) => Err(std::io::Error::other(format!("thread {name} ended before installing its seccomp filter"))),
    }
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
        }
        // Only the control threads reach files and sockets by name.
        for kind in [ThreadKind::Vcpu, ThreadKind::Devices] {
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
    fn off_installs_nothing() {
        let filters = SeccompFilters::new(SeccompMode::Off).unwrap();
        assert!(!filters.is_on());
        filters.install(ThreadKind::Vcpu).unwrap();
        // Still unfiltered: a call no kind allows goes through.
        assert!(std::fs::metadata("/").is_ok());
    }
}
