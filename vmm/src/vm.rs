//! The KVM VM: its fd, guest RAM and memory slots, the in-kernel irqchip and PIT,
//! and the irqfd/ioeventfd registrations devices use to skip the VMM on hot paths.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{GuestRam, RamBacking};

pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}. Tandem needs KVM: check that the kvm module is loaded and that you may open /dev/kvm (root or the kvm group)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not the stable version 12 this VMM speaks")]
    KvmApiVersion(i32),
    #[error("KVM lacks {0}, which Tandem needs; the host kernel is too old or KVM is restricted")]
    MissingCap(&'static str),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error("KVM refused memory slot {slot} at {gpa:#x} (+{size:#x}): {source}")]
    MemorySlot {
        slot: u32,
        gpa: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM has no memory slot left for device memory; pass fewer devices through")]
    NoMemorySlots,
    #[error("cannot set up the in-kernel {what}: {source}")]
    Irqchip {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register {what} on {at}: {source}")]
    Register {
        what: &'static str,
        at: String,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The guest RAM of a VM with KVM's view of it.
pub struct KvmVm {
    // Drop order: the VM fd (and with it KVM's memory slots) before the RAM it maps.
    kvm: Kvm,
    fd: Arc<VmFd>,
    ram: GuestRam,
}

impl KvmVm {
    /// Addresses KVM needs for its real-mode TSS and identity map on Intel hosts; they
    /// sit just below the BIOS ROM area, inside the 32-bit MMIO hole, away from RAM.
    const TSS_ADDR: usize = 0xfffb_d000;
    const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

    pub fn open_kvm() -> Result<Kvm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let v = kvm.get_api_version();
        if v != 12 {
            return Err(VmError::KvmApiVersion(v));
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
            (kvm_ioctls::Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        Ok(kvm)
    }

    /// Creates the VM with guest RAM over `ram`, an in-kernel PIC/IOAPIC/LAPIC and PIT.
    pub fn new(kvm: Kvm, ram: &[(GuestAddress, usize)]) -> Result<Self, VmError> {
        Self::with_backing(kvm, ram, RamBacking::Anonymous)
    }

    /// [`KvmVm::new`] with RAM backed as `backing` says.
    pub fn with_backing(kvm: Kvm, ram: &[(GuestAddress, usize)], backing: RamBacking) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let vm = Self { kvm, fd: Arc::new(fd), ram: GuestRam::new(ram, backing)? };
        vm.register_memory()?;
        vm.create_irqchip()?;
        Ok(vm)
    }

    fn register_memory(&self) -> Result<(), VmError> {
        for (slot, region) in self.memory().iter().enumerate() {
            let slot = slot as u32;
            let gpa = region.start_addr().raw_value();
            let size = region.len();
            let desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `self.ram`, which outlives the
            // VM fd (both are dropped together, the fd first: field order).
            unsafe { self.fd.set_user_memory_region(desc) }.map_err(|source| VmError::MemorySlot {
                slot,
                gpa,
                size,
                source,
            })?;
        }
        Ok(())
    }

    fn create_irqchip(&self) -> Result<(), VmError> {
        let err = |what| move |source| VmError::Irqchip { what, source };
        self.fd.set_tss_address(Self::TSS_ADDR).map_err(err("TSS"))?;
        self.fd.set_identity_map_address(Self::IDENTITY_MAP_ADDR).map_err(err("identity map"))?;
        self.fd.create_irq_chip().map_err(err("PIC/IOAPIC"))?;
        // A dummy speaker port keeps guests that beep from exiting to us for port 0x61.
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.fd.create_pit2(pit).map_err(err("PIT"))?;
        Ok(())
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The VM fd for objects that outlive a borrow (interrupt routing used from vCPU
    /// threads). They must still not outlive the VM's devices.
    pub fn fd_arc(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    pub fn memory(&self) -> &GuestMemory {
        self.ram.memory()
    }

    /// The memory slots left for device memory (passthrough BARs) after guest RAM.
    pub fn device_slots(&self) -> Result<DeviceMemorySlots, VmError> {
        let first = self.memory().num_regions() as u32;
        let max = self.kvm.get_nr_memslots() as u32;
        DeviceMemorySlots::new(self.fd.clone(), first, max)
    }

    /// Routes `evt` to guest interrupt line `gsi` without a VMM round trip.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(|source| VmError::Register {
            what: "irqfd",
            at: format!("GSI {gsi}"),
            source,
        })
    }

    /// Makes guest writes to port `port` signal `evt` inside KVM, with no vCPU exit.
    pub fn register_pio_ioeventfd(&self, evt: &EventFd, port: u16) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Pio(u64::from(port)), kvm_ioctls::NoDatamatch)
            .map_err(|source| VmError::Register { what: "ioeventfd", at: format!("port {port:#x}"), source })
    }

    /// Makes guest writes to MMIO address `addr` signal `evt` inside KVM.
    pub fn register_mmio_ioeventfd(&self, evt: &EventFd, addr: u64) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), kvm_ioctls::NoDatamatch)
            .map_err(|source| VmError::Register { what: "ioeventfd", at: format!("MMIO {addr:#x}"), source })
    }
}

/// KVM memory slots over host mappings that are not guest RAM: a passthrough device's
/// BARs, mapped so that guest accesses reach the device without a VMM exit.
pub struct DeviceMemorySlots {
    vm: Arc<VmFd>,
    ids: std::sync::Mutex<vm_allocator::IdAllocator>,
}

impl DeviceMemorySlots {
    fn new(vm: Arc<VmFd>, first: u32, max: u32) -> Result<Self, VmError> {
        let ids = vm_allocator::IdAllocator::new(first, max.saturating_sub(1)).map_err(|_| VmError::NoMemorySlots)?;
        Ok(Self { vm, ids: std::sync::Mutex::new(ids) })
    }

    /// Maps `size` bytes of host memory at `host` to guest-physical `gpa`; returns the slot.
    ///
    /// # Safety
    /// `host..host+size` must stay mapped until [`DeviceMemorySlots::unmap`] removes the
    /// slot (or the VM is gone): KVM lets the guest access it directly.
    pub unsafe fn map(&self, gpa: u64, size: u64, host: *mut u8) -> Result<u32, VmError> {
        let slot =
            self.ids.lock().unwrap_or_else(|e| e.into_inner()).allocate_id().map_err(|_| VmError::NoMemorySlots)?;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host as u64,
        };
        // SAFETY: the caller keeps the mapping alive for as long as the slot exists.
        if let Err(source) = unsafe { self.vm.set_user_memory_region(desc) } {
            let _ = self.ids.lock().unwrap_or_else(|e| e.into_inner()).free_id(slot);
            return Err(VmError::MemorySlot { slot, gpa, size, source });
        }
        Ok(slot)
    }

    /// Removes a slot `map` returned; the guest's accesses there exit to the VMM again.
    pub fn unmap(&self, slot: u32) -> Result<(), VmError> {
        let desc =
            kvm_userspace_memory_region { slot, flags: 0, guest_phys_addr: 0, memory_size: 0, userspace_addr: 0 };
        // SAFETY: a zero-sized region deletes the slot; no host memory is referenced.
        unsafe { self.vm.set_user_memory_region(desc) }.map_err(|source| VmError::MemorySlot {
            slot,
            gpa: 0,
            size: 0,
            source,
        })?;
        let _ = self.ids.lock().unwrap_or_else(|e| e.into_inner()).free_id(slot);
        Ok(())
    }
}
