//! Guest interrupt lines the VMM hands out: GSI numbers and KVM's GSI routing table.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so every commit rewrites the legacy
//! entries that KVM installs by default (GSI 0-15 to the 8259s, 0-23 to the IOAPIC)
//! before the MSI routes. MSI/MSI-X vectors get GSIs from 24 up; a route changes only
//! when the guest reprograms or unmasks a vector, so the table is rebuilt rarely.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip, kvm_irq_routing_msi,
    KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vm_allocator::IdAllocator;
use vmm_sys_util::eventfd::EventFd;

/// GSIs wired to the in-kernel IOAPIC's 24 pins.
pub const IOAPIC_PINS: u32 = 24;
/// How many GSIs Tandem hands out for MSI/MSI-X: enough for 32 devices with 32 vectors.
pub const MAX_MSI_GSIS: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("all {MAX_MSI_GSIS} MSI interrupt lines are in use; remove a device or give it fewer queues")]
    Exhausted,
    #[error("cannot create an irqfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("GSI {0} was not handed out by this VM")]
    UnknownGsi(u32),
    #[error("KVM rejected the GSI routing table ({routes} routes): {source}")]
    Routing {
        routes: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// An MSI message as the guest programs it: where the write goes and what it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiRoute {
    pub addr: u64,
    pub data: u32,
}

struct State {
    gsis: IdAllocator,
    /// Active MSI routes by GSI; a GSI with no route is allocated but silent.
    routes: BTreeMap<u32, MsiRoute>,
}

/// The VM's GSI allocator and routing table, shared by every device that routes MSIs.
pub struct GsiRouting {
    vm: Arc<VmFd>,
    state: Mutex<State>,
}

impl GsiRouting {
    pub fn new(vm: Arc<VmFd>) -> Self {
        // The range is a constant well inside u32: IdAllocator::new cannot fail on it.
        let gsis = IdAllocator::new(IOAPIC_PINS, IOAPIC_PINS + MAX_MSI_GSIS - 1)
            .unwrap_or_else(|_| unreachable!("constant, non-empty GSI range"));
        Self { vm, state: Mutex::new(State { gsis, routes: BTreeMap::new() }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn allocate(&self) -> Result<u32, InterruptError> {
        self.state().gsis.allocate_id().map_err(|_| InterruptError::Exhausted)
    }

    /// Returns `gsi` to the pool, dropping its route.
    pub fn release(&self, gsi: u32) -> Result<(), InterruptError> {
        let mut st = self.state();
        st.gsis.free_id(gsi).map_err(|_| InterruptError::UnknownGsi(gsi))?;
        if st.routes.remove(&gsi).is_some() {
            self.commit(&st)?;
        }
        Ok(())
    }

    /// Routes `gsi` to `route` (or removes its route with `None`); no-op when unchanged.
    pub fn set_route(&self, gsi: u32, route: Option<MsiRoute>) -> Result<(), InterruptError> {
        let mut st = self.state();
        if !st.gsis.is_allocated(gsi) {
            return Err(InterruptError::UnknownGsi(gsi));
        }
        let changed = match route {
            Some(r) => st.routes.insert(gsi, r) != Some(r),
            None => st.routes.remove(&gsi).is_some(),
        };
        if changed {
            self.commit(&st)?;
        }
        Ok(())
    }

    /// How many GSIs are handed out now (for leak checks and counters).
    pub fn allocated(&self) -> usize {
        let st = self.state();
        (IOAPIC_PINS..IOAPIC_PINS + MAX_MSI_GSIS).filter(|g| st.gsis.is_allocated(*g)).count()
    }

    fn commit(&self, st: &State) -> Result<(), InterruptError> {
        let entries = routing_entries(&st.routes);
        let routes = entries.len();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| InterruptError::Routing { routes, source: kvm_ioctls::Error::new(libc::E2BIG) })?;
        self.vm.set_gsi_routing(&table).map_err(|source| InterruptError::Routing { routes, source })
    }
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 { irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin } },
        ..Default::default()
    }
}

/// KVM's default legacy routing (as kvm_setup_default_irq_routing builds it) plus the
/// MSI routes.
fn routing_entries(routes: &BTreeMap<u32, MsiRoute>) -> Vec<kvm_irq_routing_entry> {
    let mut entries = Vec::with_capacity(16 + IOAPIC_PINS as usize + routes.len());
    for gsi in 0..16 {
        // GSI 2 is the slave PIC's cascade: not an input anything can raise.
        if gsi == 2 {
            continue;
        }
        let (chip, pin) = if gsi < 8 { (KVM_IRQCHIP_PIC_MASTER, gsi) } else { (KVM_IRQCHIP_PIC_SLAVE, gsi - 8) };
        entries.push(irqchip(gsi, chip, pin));
    }
    for gsi in 0..IOAPIC_PINS {
        entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (&gsi, r) in routes {
        entries.push(kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            u: kvm_irq_routing_entry__bindgen_ty_1 {
                msi: kvm_irq_routing_msi {
                    address_lo: r.addr as u32,
                    address_hi: (r.addr >> 32) as u32,
                    data: r.data,
                    ..Default::default()
                },
            },
            ..Default::default()
        });
    }
    entries
}

/// The MSI/MSI-X vectors of one device as KVM routes: a GSI and an irqfd per vector.
///
/// An enabled, unmasked vector has its route installed and its irqfd registered, so a
/// write to the irqfd (by a device worker, or by VFIO for a passthrough device) reaches
/// the guest without the VMM. Masking deregisters the irqfd but leaves its counter
/// alone: signals latched while masked are delivered by KVM when `unmask` registers it
/// again (KVM polls an irqfd once on registration).
pub struct KvmMsiVectors {
    vm: Arc<VmFd>,
    routing: Arc<GsiRouting>,
    vectors: Vec<Vector>,
    /// Routing changes KVM refused; the guest then sees a silent vector.
    failures: AtomicU64,
}

struct Vector {
    gsi: u32,
    irqfd: EventFd,
    /// Whether `irqfd` is registered with KVM now; the lock orders (de)registrations.
    registered: Mutex<bool>,
}

impl KvmMsiVectors {
    pub fn new(vm: Arc<VmFd>, routing: Arc<GsiRouting>, count: u16) -> Result<Self, InterruptError> {
        let mut vectors = Vec::with_capacity(usize::from(count));
        let fail = |vectors: &Vec<Vector>, e| {
            for v in vectors {
                let _ = routing.release(v.gsi);
            }
            e
        };
        for _ in 0..count {
            let gsi = routing.allocate().map_err(|e| fail(&vectors, e))?;
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| {
                let _ = routing.release(gsi);
                fail(&vectors, InterruptError::EventFd(e))
            })?;
            vectors.push(Vector { gsi, irqfd, registered: Mutex::new(false) });
        }
        Ok(Self { vm, routing, vectors, failures: AtomicU64::new(0) })
    }

    /// Routing changes KVM refused so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    fn note<E>(&self, r: Result<(), E>) {
        if r.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn set_registered(&self, v: &Vector, want: bool) {
        let mut registered = v.registered.lock().unwrap_or_else(|e| e.into_inner());
        if *registered == want {
            return;
        }
        let r = if want { self.vm.register_irqfd(&v.irqfd, v.gsi) } else { self.vm.unregister_irqfd(&v.irqfd, v.gsi) };
        if r.is_ok() {
            *registered = want;
        }
        self.note(r);
    }
}

/// A passthrough device's INTx: a KVM irqfd on an IOAPIC input (level-triggered) with a
/// resample eventfd, which KVM signals when the guest EOIs the line so that VFIO unmasks
/// the device's interrupt (VFIO masks it on every assertion, as a level line must be).
pub struct KvmIntxLine {
    vm: Arc<VmFd>,
    gsi: u32,
    trigger: EventFd,
    resample: EventFd,
}

impl KvmIntxLine {
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> Result<Self, InterruptError> {
        let trigger = EventFd::new(libc::EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
        let resample = EventFd::new(libc::EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
        vm.register_irqfd_with_resample(&trigger, &resample, gsi)
            .map_err(|source| InterruptError::Routing { routes: 1, source })?;
        Ok(Self { vm, gsi, trigger, resample })
    }
}

impl Drop for KvmIntxLine {
    fn drop(&mut self) {
        // KVM lowers the line as it drops the irqfd; nothing to do if it is already gone.
        let _ = self.vm.unregister_irqfd(&self.trigger, self.gsi);
    }
}

impl pci::IntxLine for KvmIntxLine {
    fn trigger(&self) -> &EventFd {
        &self.trigger
    }

    fn resample(&self) -> &EventFd {
        &self.resample
    }
}

impl pci::MsiVectors for KvmMsiVectors {
    fn enable(&self, vector: u16, msg: pci::MsiMessage) {
        if let Some(v) = self.vectors.get(usize::from(vector)) {
            self.note(self.routing.set_route(v.gsi, Some(MsiRoute { addr: msg.addr, data: msg.data })));
            self.set_registered(v, true);
        }
    }

    fn disable(&self, vector: u16) {
        if let Some(v) = self.vectors.get(usize::from(vector)) {
            self.set_registered(v, false);
            self.note(self.routing.set_route(v.gsi, None));
            // A disabled vector has no pending state: drop what was latched while masked.
            let _ = v.irqfd.read();
        }
    }

    fn mask(&self, vector: u16) {
        if let Some(v) = self.vectors.get(usize::from(vector)) {
            self.set_registered(v, false);
        }
    }

    fn unmask(&self, vector: u16) {
        if let Some(v) = self.vectors.get(usize::from(vector)) {
            self.set_registered(v, true);
        }
    }

    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        match self.vectors.get(usize::from(vector)) {
            Some(v) => v.irqfd.write(1),
            None => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no MSI vector {vector}"))),
        }
    }

    fn notifier(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(vector)).map(|v| &v.irqfd)
    }
}

impl Drop for KvmMsiVectors {
    fn drop(&mut self) {
        for v in &self.vectors {
            self.set_registered(v, false);
            let _ = self.routing.release(v.gsi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_keeps_legacy_routes_and_adds_msis() {
        let mut routes = BTreeMap::new();
        routes.insert(24, MsiRoute { addr: 0xfee0_0000, data: 0x41 });
        let e = routing_entries(&routes);
        assert_eq!(e.len(), 15 + 24 + 1);
        // GSI 2 (the cascade) reaches the IOAPIC only, never a PIC.
        let gsi2_chips: Vec<u32> = e
            .iter()
            .filter(|x| x.gsi == 2 && x.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            // SAFETY: irqchip entries carry the irqchip member.
            .map(|x| unsafe { x.u.irqchip.irqchip })
            .collect();
        assert_eq!(gsi2_chips, vec![KVM_IRQCHIP_IOAPIC]);
        let msi = e.last().unwrap();
        assert_eq!((msi.gsi, msi.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: MSI entries carry the msi member.
        let m = unsafe { msi.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_0000, 0, 0x41));
    }

    #[test]
    fn gsis_are_handed_out_routed_and_released_against_real_kvm() {
        let kvm = crate::vm::KvmVm::open_kvm().expect("this test needs /dev/kvm (root on a KVM host)");
        let vm = crate::vm::KvmVm::new(kvm, &[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let routing = GsiRouting::new(vm.fd_arc());
        let a = routing.allocate().unwrap();
        let b = routing.allocate().unwrap();
        assert_eq!((a, b), (24, 25));
        routing.set_route(a, Some(MsiRoute { addr: 0xfee0_0000, data: 0x30 })).unwrap();
        routing.set_route(a, Some(MsiRoute { addr: 0xfee0_0000, data: 0x30 })).unwrap();
        routing.set_route(b, None).unwrap();
        assert_eq!(routing.allocated(), 2);
        routing.release(a).unwrap();
        assert!(matches!(routing.release(a), Err(InterruptError::UnknownGsi(24))));
        assert!(matches!(routing.set_route(99, None), Err(InterruptError::UnknownGsi(99))));
        assert_eq!(routing.allocated(), 1);
        assert_eq!(routing.allocate().unwrap(), 24, "freed GSIs are reused");
    }
}
