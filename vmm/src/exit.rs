//! How a running VM ends: the first reason reported wins and wakes the waiter.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::legacy::{PowerEvent, PowerSink};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the guest stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register or i8042). Tandem does not
    /// reboot a guest in place: the VMM ends, and whoever started it decides.
    Reset,
    /// A vCPU hit a triple fault (KVM_EXIT_SHUTDOWN): the guest crashed hard.
    TripleFault { vcpu: u32 },
    /// The host asked the VMM to stop (signal number).
    Stopped { signal: i32 },
    /// Stopped through the control socket's `shutdown`: an orderly end the host chose.
    Shutdown,
    /// A vCPU could not continue: a KVM error or an exit the guest cannot recover from.
    VcpuFailed { vcpu: u32, reason: String },
}

impl GuestExit {
    /// Whether this is the guest ending by its own, orderly choice.
    pub fn is_clean(&self) -> bool {
        matches!(self, Self::PowerOff | Self::Reset | Self::Shutdown)
    }
}

impl std::fmt::Display for GuestExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PowerOff => write!(f, "the guest powered off"),
            Self::Reset => write!(f, "the guest rebooted"),
            Self::TripleFault { vcpu } => {
                write!(f, "vCPU {vcpu} triple-faulted (the guest kernel crashed before it could report why)")
            }
            Self::Stopped { signal } => write!(f, "stopped by signal {signal}"),
            Self::Shutdown => write!(f, "shut down through the control socket"),
            Self::VcpuFailed { vcpu, reason } => write!(f, "vCPU {vcpu} failed: {reason}"),
        }
    }
}

/// Set once, by whichever thread sees the end first; read by the thread waiting on
/// `event()`. vCPUs check `is_set` after every exit, so the vCPU that asked for a
/// power-off or reset never re-enters the guest.
pub struct ExitLatch {
    evt: EventFd,
    reason: Mutex<Option<GuestExit>>,
    set: AtomicBool,
}

impl ExitLatch {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { evt: EventFd::new(EFD_NONBLOCK)?, reason: Mutex::new(None), set: AtomicBool::new(false) })
    }

    /// Records `reason` unless another was recorded first, then wakes the waiter.
    pub fn set(&self, reason: GuestExit) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.set.store(true, Ordering::Release);
        drop(r);
        // An eventfd write fails only when its counter would overflow: it is set anyway.
        let _ = self.evt.write(1);
    }

    pub fn get(&self) -> Option<GuestExit> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    pub fn event(&self) -> &EventFd {
        &self.evt
    }

    /// The callback devices use to end the VM on the guest's request.
    pub fn power_sink(self: &Arc<Self>) -> PowerSink {
        let latch = self.clone();
        Arc::new(move |event| {
            latch.set(match event {
                PowerEvent::PowerOff => GuestExit::PowerOff,
                PowerEvent::Reset => GuestExit::Reset,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let l = ExitLatch::new().unwrap();
        assert_eq!(l.get(), None);
        assert!(!l.is_set());
        l.set(GuestExit::PowerOff);
        assert!(l.is_set());
        l.set(GuestExit::TripleFault { vcpu: 1 });
        assert_eq!(l.get(), Some(GuestExit::PowerOff));
        assert!(l.event().read().unwrap() >= 1);
    }
}
