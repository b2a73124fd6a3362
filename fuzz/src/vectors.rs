//! An [`MsiVectors`] that holds each vector's route as the VMM would and checks every
//! call against the protocol `pci::interrupt` documents: each transition reported once,
//! `mask` only of a live vector, `unmask` only of a masked one, `trigger` only of a live
//! one. Calls for a vector that was never created are ignored, as the contract asks of
//! implementations (a VFIO device's table may be larger than what VFIO offers).

use std::sync::Mutex;

use pci::{MsiMessage, MsiVectors};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Disabled,
    Live(MsiMessage),
    Masked(MsiMessage),
}

pub struct ModelVectors {
    routes: Mutex<Vec<Route>>,
    triggers: Mutex<Vec<u64>>,
    notifiers: Vec<EventFd>,
    /// Whether protocol violations panic. A VFIO device with both MSI and MSI-X drives
    /// one vector set from two emulations, which a guest enabling both can interleave.
    strict: bool,
}

impl ModelVectors {
    /// `count` vectors, each with an eventfd when `notifiers` (for VFIO devices).
    pub fn new(count: u16, notifiers: bool, strict: bool) -> Self {
        let n = usize::from(count);
        let notifiers =
            if notifiers { (0..n).map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd")).collect() } else { Vec::new() };
        Self { routes: Mutex::new(vec![Route::Disabled; n]), triggers: Mutex::new(vec![0; n]), notifiers, strict }
    }

    pub fn route(&self, vector: u16) -> Option<Route> {
        self.routes.lock().unwrap().get(usize::from(vector)).copied()
    }

    /// Interrupts delivered on `vector` so far.
    pub fn triggers(&self, vector: u16) -> u64 {
        self.triggers.lock().unwrap().get(usize::from(vector)).copied().unwrap_or(0)
    }

    fn check(&self, ok: bool, what: std::fmt::Arguments) {
        if self.strict {
            assert!(ok, "MsiVectors protocol violated: {what}");
        }
    }

    /// Applies a transition to `vector`'s route if the vector exists.
    fn update(&self, vector: u16, f: impl FnOnce(&Self, Route) -> Route) {
        let mut routes = self.routes.lock().unwrap();
        if let Some(route) = routes.get_mut(usize::from(vector)) {
            *route = f(self, *route);
        }
    }
}

impl MsiVectors for ModelVectors {
    fn enable(&self, vector: u16, msg: MsiMessage) {
        self.update(vector, |s, r| {
            s.check(r != Route::Live(msg), format_args!("enable({vector}, {msg:?}) of a vector live with it"));
            Route::Live(msg)
        });
    }

    fn disable(&self, vector: u16) {
        self.update(vector, |s, r| {
            s.check(r != Route::Disabled, format_args!("disable({vector}) of a disabled vector"));
            Route::Disabled
        });
    }

    fn mask(&self, vector: u16) {
        self.update(vector, |s, r| match r {
            Route::Live(m) => Route::Masked(m),
            other => {
                s.check(false, format_args!("mask({vector}) of a vector in state {other:?}"));
                other
            }
        });
    }

    fn unmask(&self, vector: u16) {
        self.update(vector, |s, r| match r {
            Route::Masked(m) => Route::Live(m),
            other => {
                s.check(false, format_args!("unmask({vector}) of a vector in state {other:?}"));
                other
            }
        });
    }

    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        let live = matches!(self.route(vector), Some(Route::Live(_)) | None);
        self.check(live, format_args!("trigger({vector}) of a vector in state {:?}", self.route(vector)));
        if let Some(n) = self.triggers.lock().unwrap().get_mut(usize::from(vector)) {
            *n += 1;
        }
        Ok(())
    }

    fn notifier(&self, vector: u16) -> Option<&EventFd> {
        self.notifiers.get(usize::from(vector))
    }
}
