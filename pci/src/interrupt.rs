//! How message-signalled interrupts leave a PCI device: the [`MsiVectors`] the VMM
//! implements over KVM GSI routes and irqfds.
//!
//! The MSI and MSI-X emulation (`msi`, `msix`) own the guest-visible registers and
//! call into `MsiVectors` only when something that matters for routing changed, so
//! the VMM rewrites KVM's routing table only then. A vector moves through these
//! states, each transition reported once:
//!
//! ```text
//!   disabled        --enable(msg)-->  live
//!   live            --mask-->         masked
//!   masked          --unmask-->       live    (same message)
//!   live or masked  --enable(msg')--> live    (new message)
//!   live or masked  --disable-->      disabled
//! ```
//!
//! A vector is first enabled when the guest first lets it fire (function enabled,
//! vector unmasked), so vectors a driver never uses cost no route.
//!
//! A device's legacy interrupt (INTx) leaves it through an [`IntxLine`]: two eventfds
//! the VMM wires to a level-triggered GSI.

use vmm_sys_util::eventfd::EventFd;

/// What a device writes to signal one interrupt: a DWORD `data` at `addr`. On x86 the
/// address selects the destination APIC(s) and the data the vector and delivery mode.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// The interrupt vectors of one device, `0..count` for the count the VMM created them
/// with (the MSI-X table size, or the MSI multiple-message capability).
///
/// The routing calls (`enable`, `disable`, `mask`, `unmask`) happen in the middle of a
/// guest register write, where the device can only carry on whatever happens, so they
/// return nothing: an implementation reports its own failures (logs them), and the
/// guest sees a vector that does not fire. Calls for a vector index the VMM did not
/// create must be ignored. They are made with the device's locks held (a vCPU is in
/// the middle of its register write, or a worker is raising an interrupt), so an
/// implementation must never lock a PCI device.
pub trait MsiVectors: Send + Sync {
    /// Vector `vector` is in use and unmasked: route it to `msg`. Also called when a
    /// live or masked vector gets a new message (which unmasks it, if it was masked).
    fn enable(&self, vector: u16, msg: MsiMessage);

    /// Vector `vector` is no longer in use (MSI or MSI-X was turned off). Signals
    /// latched while it was masked are dropped.
    fn disable(&self, vector: u16);

    /// The guest masked an enabled vector: its route stays, but it must not deliver.
    /// A device calling [`trigger`](Self::trigger) never triggers a masked vector (it
    /// records the pending bit itself); this matters to whoever signals
    /// [`notifier`](Self::notifier) directly (a VFIO device, a worker), whose signals
    /// the implementation must latch and deliver on `unmask`.
    fn mask(&self, vector: u16);

    /// The guest unmasked a masked vector with its message unchanged.
    fn unmask(&self, vector: u16);

    /// Delivers one interrupt on `vector` (writes its irqfd).
    fn trigger(&self, vector: u16) -> std::io::Result<()>;

    /// The eventfd whose signal delivers `vector` inside KVM (its irqfd), for sources
    /// that can signal it without going through the device model.
    fn notifier(&self, vector: u16) -> Option<&EventFd>;
}

/// The legacy interrupt line (INTx) of one device, as the VMM wires it: a KVM irqfd
/// with a resample eventfd (`KVM_IRQFD_FLAG_RESAMPLE`) on the GSI the platform routes
/// the device's slot and pin to (`boot::layout::pci_intx_gsi`, described to the guest
/// by the DSDT's `_PRT`).
///
/// INTx is level-triggered: a signal on [`trigger`](Self::trigger) asserts the GSI,
/// and it stays asserted until the guest's EOI, when KVM deasserts it and signals
/// [`resample`](Self::resample). A source that keeps its line masked until then (VFIO
/// masks a device's INTx on each interrupt) unmasks on that signal, and asserts again
/// if the device still does. The device model only hands the two eventfds on; it
/// never reads or writes them.
pub trait IntxLine: Send + Sync {
    /// Signalled to assert the line (the irqfd).
    fn trigger(&self) -> &EventFd;

    /// Signalled by KVM when the guest has serviced the line (the irqfd's resamplefd).
    fn resample(&self) -> &EventFd;
}

/// What the VMM was last told about one vector; see the module documentation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VectorRoute {
    #[default]
    Disabled,
    Live(MsiMessage),
    Masked(MsiMessage),
}

impl VectorRoute {
    /// Moves to the state the registers now describe and tells `vectors` about the
    /// change, if any. `function_enabled` is the MSI/MSI-X enable bit, `masked` the
    /// vector's effective mask (its own or the function's), `msg` its message now.
    pub(crate) fn sync(
        &mut self,
        vector: u16,
        function_enabled: bool,
        masked: bool,
        msg: MsiMessage,
        vectors: &dyn MsiVectors,
    ) {
        let next = match (*self, function_enabled, masked) {
            (_, false, _) => Self::Disabled,
            // A vector the guest never unmasked needs no route yet.
            (Self::Disabled, true, true) => Self::Disabled,
            // Masked vectors keep the message they were routed with; a message written
            // while masked takes effect on unmask, as the guest expects.
            (Self::Live(routed) | Self::Masked(routed), true, true) => Self::Masked(routed),
            (_, true, false) => Self::Live(msg),
        };
        if next == *self {
            return;
        }
        match next {
            Self::Disabled => vectors.disable(vector),
            // Only a live vector becomes masked (a disabled one stays disabled).
            Self::Masked(_) => vectors.mask(vector),
            Self::Live(new) if *self == Self::Masked(new) => vectors.unmask(vector),
            Self::Live(new) => vectors.enable(vector, new),
        }
        *self = next;
    }

    /// Whether a trigger would be delivered now.
    pub(crate) fn is_live(&self) -> bool {
        matches!(self, Self::Live(_))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{Call, RecordingVectors};
    use super::*;

    #[test]
    fn reports_each_transition_once() {
        let v = RecordingVectors::default();
        let m1 = MsiMessage { addr: 0xfee0_0000, data: 0x41 };
        let m2 = MsiMessage { addr: 0xfee0_1000, data: 0x42 };
        let mut r = VectorRoute::default();
        r.sync(3, true, true, m1, &v);
        r.sync(3, false, false, m1, &v);
        assert_eq!(v.take(), vec![]);
        r.sync(3, true, false, m1, &v);
        r.sync(3, true, false, m1, &v);
        assert!(r.is_live());
        r.sync(3, true, true, m2, &v);
        assert!(!r.is_live());
        r.sync(3, true, false, m1, &v);
        r.sync(3, true, true, m1, &v);
        r.sync(3, true, false, m2, &v);
        r.sync(3, true, false, m1, &v);
        r.sync(3, false, false, m1, &v);
        use Call::*;
        assert_eq!(
            v.take(),
            vec![Enable(3, m1), Mask(3), Unmask(3), Mask(3), Enable(3, m2), Enable(3, m1), Disable(3)]
        );
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A recording `MsiVectors` for the tests of the modules that report to it.

    use std::sync::Mutex;

    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Call {
        Enable(u16, MsiMessage),
        Disable(u16),
        Mask(u16),
        Unmask(u16),
        Trigger(u16),
    }

    #[derive(Default)]
    pub struct RecordingVectors {
        calls: Mutex<Vec<Call>>,
        notifiers: Vec<EventFd>,
    }

    impl RecordingVectors {
        /// With an eventfd per vector, for devices that hand them on (VFIO).
        pub fn with_notifiers(count: u16) -> Self {
            let notifiers = (0..count).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect();
            Self { calls: Mutex::default(), notifiers }
        }

        /// The calls since the last `take`.
        pub fn take(&self) -> Vec<Call> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }

        fn push(&self, call: Call) {
            self.calls.lock().unwrap().push(call);
        }
    }

    /// An `IntxLine` over two plain eventfds.
    pub struct EventFdLine {
        trigger: EventFd,
        resample: EventFd,
    }

    impl EventFdLine {
        pub fn new() -> Self {
            let fd = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
            Self { trigger: fd(), resample: fd() }
        }
    }

    impl IntxLine for EventFdLine {
        fn trigger(&self) -> &EventFd {
            &self.trigger
        }
        fn resample(&self) -> &EventFd {
            &self.resample
        }
    }

    impl MsiVectors for RecordingVectors {
        fn enable(&self, vector: u16, msg: MsiMessage) {
            self.push(Call::Enable(vector, msg));
        }
        fn disable(&self, vector: u16) {
            self.push(Call::Disable(vector));
        }
        fn mask(&self, vector: u16) {
            self.push(Call::Mask(vector));
        }
        fn unmask(&self, vector: u16) {
            self.push(Call::Unmask(vector));
        }
        fn trigger(&self, vector: u16) -> std::io::Result<()> {
            self.push(Call::Trigger(vector));
            Ok(())
        }
        fn notifier(&self, vector: u16) -> Option<&EventFd> {
            self.notifiers.get(usize::from(vector))
        }
    }
}
