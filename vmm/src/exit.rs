//! How a running VM ends: the first reason reported wins and wakes the waiter.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// The guest kernel said through pvpanic that it panicked (its console says why).
    Panicked,
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
            Self::Panicked => write!(f, "the guest kernel panicked (its console above says why)"),
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
///
/// A guest that says it panicked is not stopped there: it goes on to print why (its
/// console may hold the message back until after it told us) and then reboots, or
/// hangs with `panic=0`. Whatever ends it next, or [`PANIC_GRACE`] later the waiter,
/// ends it as [`GuestExit::Panicked`].
pub struct ExitLatch {
    evt: EventFd,
    reason: Mutex<Option<GuestExit>>,
    set: AtomicBool,
    panicked_at: Mutex<Option<Instant>>,
}

/// How long a guest that said it panicked may run on to print why.
pub const PANIC_GRACE: Duration = Duration::from_secs(2);

impl ExitLatch {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            reason: Mutex::new(None),
            set: AtomicBool::new(false),
            panicked_at: Mutex::new(None),
        })
    }

    /// The guest said it panicked: wakes the waiter, which gives it [`PANIC_GRACE`].
    pub fn note_panic(&self) {
        self.panicked_at.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(Instant::now);
        let _ = self.evt.write(1);
    }

    /// When the waiter ends a guest that panicked and has not ended itself.
    pub fn panic_deadline(&self) -> Option<Instant> {
        self.panicked_at.lock().unwrap_or_else(|e| e.into_inner()).map(|at| at + PANIC_GRACE)
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

    /// Why the VM ended, once it has. The host's own stop stays the reason after a
    /// panic; anything the guest did after one (its reboot, a fault) was the panic's.
    pub fn get(&self) -> Option<GuestExit> {
        let reason = self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        let by_host = matches!(reason, GuestExit::Stopped { .. } | GuestExit::Shutdown);
        Some(if !by_host && self.panic_deadline().is_some() { GuestExit::Panicked } else { reason })
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
        Arc::new(move |event| match event {
            PowerEvent::PowerOff => latch.set(GuestExit::PowerOff),
            PowerEvent::Reset => latch.set(GuestExit::Reset),
            PowerEvent::Panic => latch.note_panic(),
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

    #[test]
    fn a_panic_is_the_reason_for_what_the_guest_does_next_but_not_for_the_hosts_stop() {
        let l = Arc::new(ExitLatch::new().unwrap());
        (l.power_sink())(PowerEvent::Panic);
        assert!(!l.is_set(), "the guest runs on to print why");
        assert!(l.event().read().unwrap() >= 1, "the waiter is woken to time the grace");
        let deadline = l.panic_deadline().unwrap();
        assert!(deadline > Instant::now() && deadline <= Instant::now() + PANIC_GRACE);
        (l.power_sink())(PowerEvent::Reset);
        assert_eq!(l.get(), Some(GuestExit::Panicked));

        let host = ExitLatch::new().unwrap();
        host.note_panic();
        host.set(GuestExit::Stopped { signal: 15 });
        assert_eq!(host.get(), Some(GuestExit::Stopped { signal: 15 }));
    }
}
