//! Assembles a VM from a `VmConfig`, one step after the other.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use boot::layout::MemoryLayout;

use crate::config::{ConfigError, SerialConfig, VmConfig};
use crate::device_manager::{
    check_passthrough_host, DeviceError, DeviceManager, InterruptRemapping, PassthroughReport,
};
use crate::exit::ExitLatch;
use crate::failover::{FailoverEvent, FailoverEvents, FailoverPair};
use crate::memory::RamBacking;
use crate::passthrough::NicInfo;
use crate::runner::{FailoverSetup, Vm, VmParts};
use crate::seccomp::SeccompFilters;
use crate::sriov::{Host, Leases};
use crate::vcpu::{Vcpu, VcpuError};
use crate::vm::{KvmVm, VmError};
use devices::virtio::net::StandbyListener;
use devices::Notices;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{cpus} vCPUs is more than this host's KVM allows ({max}); use --cpus {max} or fewer")]
    TooManyCpusForKvm { cpus: u32, max: usize },
    #[error("{asked} MiB of guest memory is more than this host has ({host} MiB); use a smaller --memory")]
    TooMuchMemory { asked: u64, host: u64 },
    #[error("{0}")]
    Layout(#[from] boot::layout::LayoutError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot open {what} {path}: {source}; check the path")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path}: {source}")]
    Kernel {
        path: PathBuf,
        #[source]
        source: boot::loader::LoaderError,
    },
    #[error("initramfs {path}: {source}")]
    Initramfs {
        path: PathBuf,
        #[source]
        source: boot::loader::LoaderError,
    },
    #[error("kernel command line: {0}")]
    Cmdline(#[source] boot::loader::LoaderError),
    #[error("cannot write {what} into guest memory: {reason}")]
    BootData { what: &'static str, reason: String },
    #[error("cannot open the serial output file {path}: {source}")]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the VM's exit event: {0}")]
    ExitEvent(#[source] std::io::Error),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot read the CPUID KVM supports: {0}")]
    Cpuid(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Sriov(#[from] crate::sriov::SriovError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// Builds the VM `config` describes, its vCPUs not started; `notices` hears what
/// happens to it from here on.
pub(crate) fn build(config: &VmConfig, notices: Notices) -> Result<Vm, BuildError> {
    config.validate()?;
    // A failover pair shares one MAC: settle it before either device is made.
    let mut resolved = config.clone();
    let mut no_random = None;
    resolved.resolve_failover_macs(|| {
        devices::virtio::net::random_mac().unwrap_or_else(|e| {
            no_random = Some(e);
            [0; 6]
        })
    });
    if let Some(e) = no_random {
        return Err(BuildError::BootData { what: "a random MAC for a failover pair", reason: e.to_string() });
    }
    let config = &resolved;
    // User mistakes first: a wrong path should not be reported as a KVM problem.
    let mut kernel_file = open("kernel", &config.kernel)?;
    let mut initrd_file = config.initramfs.as_deref().map(|p| open("initramfs", p)).transpose()?;
    let seccomp = SeccompFilters::new(config.seccomp)?;
    let kvm = KvmVm::open_kvm()?;
    check_host_limits(&kvm, config)?;
    if !config.vfs.is_empty() || !config.devices.is_empty() {
        // What would make VFIO refuse every device, before any is taken from the host.
        check_passthrough_host(config.memory).map_err(DeviceError::from)?;
    }
    // Before the VM exists: dropped last on any failure below, so the host devices go
    // back only after the VFIO objects holding them are closed.
    let host = Host::system().with_notices(notices.clone());
    let leases = Leases::acquire(&config.vfs, &config.devices, &host)?;
    for warning in leases.warnings() {
        notices.warn(warning);
    }

    let layout = MemoryLayout::new(config.memory)?;
    let backing = if config.hugepages { RamBacking::HugePages } else { RamBacking::Anonymous };
    let vm = KvmVm::with_backing(kvm, &layout.ram_regions(), backing)?;
    let mem = vm.memory();

    let kernel = boot::loader::load_kernel(mem, &mut kernel_file)
        .map_err(|source| BuildError::Kernel { path: config.kernel.clone(), source })?;
    let initrd = match (&mut initrd_file, &config.initramfs) {
        (Some(file), Some(path)) => Some(
            boot::loader::load_initramfs(mem, &layout, file, &kernel)
                .map_err(|source| BuildError::Initramfs { path: path.clone(), source })?,
        ),
        _ => None,
    };
    boot::loader::load_cmdline(mem, &config.cmdline).map_err(BuildError::Cmdline)?;

    let cpus = config.cpus as u8; // validated: at most VmConfig::MAX_CPUS
    boot_data("page tables and GDT", boot::regs::write_gdt_and_page_tables(mem))?;
    // Linux reads the MP table only without ACPI (acpi=off); it fits 40 vCPUs in the
    // EBDA, and larger guests rely on the MADT alone.
    if cpus <= boot::mptable::MAX_CPUS {
        boot_data("the MP table", boot::mptable::write_mptable(mem, cpus))?;
    }
    // PCI hot-plug is always described: the control socket can take devices away.
    let acpi = boot::acpi::AcpiOptions { pci_hotplug: Some(boot::acpi::hotplug::PciHotplugAml::default()) };
    let rsdp = boot_data("the ACPI tables", boot::acpi::write_acpi_tables_with(mem, &layout, cpus, &acpi))?;
    boot_data(
        "the boot parameters",
        boot::params::write_boot_params(mem, &layout, &kernel, config.cmdline.len(), initrd, Some(rsdp)),
    )?;

    let latch = Arc::new(ExitLatch::new().map_err(BuildError::ExitEvent)?);
    let mut devices = DeviceManager::new(latch.power_sink(), notices.clone());
    devices.set_seccomp(seccomp.clone());
    devices.add_legacy_devices(&vm, serial_output(&config.serial)?, boot::layout::ACPI_SLEEP_PORT)?;
    devices.enable_pci(&vm, &layout)?;
    devices.enable_pci_hotplug(&vm)?;
    for disk in &config.disks {
        devices.add_disk(disk)?;
    }
    let (events, events_rx) = FailoverEvents::new().map_err(BuildError::ExitEvent)?;
    for nic in &config.nets {
        let standby = nic.standby.then(|| {
            let (events, id) = (events.clone(), nic.id.clone());
            Arc::new(move || events.send(FailoverEvent::Standby(id.clone()))) as StandbyListener
        });
        devices.add_net(nic, standby)?;
    }
    let pairs = failover_pairs(config, &leases)?;
    for (id, sysfs) in leases.passthrough() {
        // A failover VF waits for the guest to negotiate STANDBY (see `failover`).
        if pairs.iter().any(|p| p.vf == id) {
            devices.prepare_passthrough(id, sysfs)?;
        } else {
            let report = devices.add_passthrough(id, sysfs, None)?;
            notices.info(passthrough_text(&report));
            if let Some(fd) = report.request {
                events.send(FailoverEvent::WatchRequest(id.to_string(), fd));
            }
        }
    }
    devices.mark_present();

    let mut supported = vm.kvm().get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(BuildError::Cpuid)?;
    // KVM emulates the TSC-deadline timer with its in-kernel LAPIC but leaves the CPUID
    // bit to the VMM; without it Linux falls back to the slower periodic LAPIC timer.
    if vm.kvm().check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        boot::cpuid::enable_tsc_deadline(supported.as_mut_slice());
    }
    let mut vcpus = Vec::with_capacity(config.cpus as usize);
    for id in 0..config.cpus {
        let vcpu = Vcpu::new(&vm, id)?;
        vcpu.configure_cpu(&supported, config.cpus)?;
        vcpu.set_long_mode_entry(kernel.entry)?;
        vcpus.push(vcpu);
    }

    let nics = config
        .nets
        .iter()
        .map(|n| NicInfo { id: n.id.clone(), tap: n.tap.clone(), mac: n.mac, standby: n.standby })
        .collect();
    let failover = FailoverSetup { pairs, nics, events, events_rx };
    let stdin_to_serial = config.serial == SerialConfig::Stdio;
    let (cpus, memory) = (config.cpus, config.memory);
    let parts = VmParts { vm, devices, vcpus, latch, leases, failover, stdin_to_serial, host, cpus, memory, seccomp };
    Ok(Vm::from_parts(parts))
}

/// The failover pairs of `config`, their VFs leased (MAC set) and now parked: the MAC
/// is cleared on the PF until the guest takes the VF.
fn failover_pairs(config: &VmConfig, leases: &Leases) -> Result<Vec<FailoverPair>, BuildError> {
    let mut pairs = Vec::new();
    for spec in &config.vfs {
        let Some(net) = &spec.failover else { continue };
        let (Some(nic), Some(mac)) = (config.nets.iter().find(|n| &n.id == net), spec.mac) else { continue };
        if let Some(lease) = leases.vfs.iter().find(|l| l.id() == spec.id) {
            lease.set_mac([0; 6])?;
        }
        pairs.push(FailoverPair::new(&spec.id, net, &nic.tap, &spec.pf, mac, spec.auto_failover()));
    }
    Ok(pairs)
}

/// Where a passthrough device went, whether its interrupts are remapped, and how long
/// pinning guest RAM took (once per VM).
fn passthrough_text(r: &PassthroughReport) -> String {
    let ir = match r.interrupts {
        InterruptRemapping::Active => "interrupt remapping active",
        InterruptRemapping::UnsafeAllowed => {
            "WARNING: interrupt remapping is OFF (allowed by vfio_iommu_type1 allow_unsafe_interrupts): the device \
             can forge MSIs"
        }
    };
    let dma = r.dma.map_or(String::new(), |d| {
        format!(
            "; guest RAM mapped for DMA: {} MiB in {:.1} ms ({:.2} GiB/s)",
            d.bytes >> 20,
            d.elapsed.as_secs_f64() * 1e3,
            d.gib_per_s()
        )
    });
    format!(
        "{}: {} at guest PCI 00:{:02x}.0, attached in {:.1} ms; {ir}{dma}",
        r.id,
        r.bdf,
        r.slot,
        r.attach.as_secs_f64() * 1e3
    )
}

fn open(what: &'static str, path: &Path) -> Result<File, BuildError> {
    File::open(path).map_err(|source| BuildError::Open { what, path: path.to_path_buf(), source })
}

fn boot_data<T, E: std::fmt::Display>(what: &'static str, r: Result<T, E>) -> Result<T, BuildError> {
    r.map_err(|e| BuildError::BootData { what, reason: e.to_string() })
}

fn serial_output(serial: &SerialConfig) -> Result<Box<dyn Write + Send>, BuildError> {
    Ok(match serial {
        SerialConfig::Stdio => Box::new(std::io::stdout()),
        SerialConfig::Off => Box::new(std::io::sink()),
        SerialConfig::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BuildError::SerialFile { path: path.clone(), source })?,
        ),
    })
}

fn check_host_limits(kvm: &kvm_ioctls::Kvm, config: &VmConfig) -> Result<(), BuildError> {
    let max = kvm.get_max_vcpus();
    if config.cpus as usize > max {
        return Err(BuildError::TooManyCpusForKvm { cpus: config.cpus, max });
    }
    if let Some(host) = host_memory_bytes() {
        if config.memory > host {
            return Err(BuildError::TooMuchMemory { asked: config.memory >> 20, host: host >> 20 });
        }
    }
    Ok(())
}

/// MemTotal from /proc/meminfo. Guest RAM is mapped lazily, so a guest may be given
/// more than is free, but never more than exists.
fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
