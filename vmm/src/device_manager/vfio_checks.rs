//! What the host must offer before a device is passed through, checked up front so the
//! user reads what is missing and how to fix it rather than a bare errno from VFIO.
//!
//! Every check reads files under a root directory (`/` in production) so the tests can
//! hand it a fake tree.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostCheckError {
    #[error(
        "{bdf} has no IOMMU group ({path} is missing): VFIO needs an IOMMU. Enable VT-d/AMD-Vi in the firmware \
         and boot the host with intel_iommu=on (Intel) or amd_iommu=on (AMD)"
    )]
    NoIommu { bdf: String, path: PathBuf },
    #[error(
        "this host has no IOMMU (/sys/class/iommu is empty): VFIO needs one to confine a passed-through \
         device's DMA. Enable VT-d/AMD-Vi in the firmware and boot the host with intel_iommu=on (Intel) or \
         amd_iommu=on (AMD)"
    )]
    NoIommuAtAll,
    #[error(
        "the host's IOMMU does not remap interrupts{why}. Without interrupt remapping a passed-through device can \
         forge MSI writes and raise arbitrary interrupts on the host, so VFIO refuses it. Either enable interrupt \
         remapping (firmware, and no intremap=off on the host command line), or accept the risk with \
         `echo 1 > /sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts` \
         (or `options vfio_iommu_type1 allow_unsafe_interrupts=1` in /etc/modprobe.d)"
    )]
    NoInterruptRemapping { why: String },
    #[error(
        "passing a device through pins all {need_mib} MiB of guest RAM, but this process may lock only {limit_mib} \
         MiB (RLIMIT_MEMLOCK). Raise it (`ulimit -l {need_kib}`, systemd LimitMEMLOCK=, or \
         /etc/security/limits.conf), or run with CAP_IPC_LOCK"
    )]
    MemlockShort { need_mib: u64, limit_mib: u64, need_kib: u64 },
}

/// Whether device interrupts are safe to hand to a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptRemapping {
    /// The IOMMU remaps interrupts: a device can only raise the vectors it was given.
    Active,
    /// No remapping, but the admin set vfio_iommu_type1's allow_unsafe_interrupts.
    UnsafeAllowed,
}

/// Host files, relative to a root directory.
#[derive(Debug, Clone)]
pub struct HostFiles {
    root: PathBuf,
}

impl Default for HostFiles {
    fn default() -> Self {
        Self { root: PathBuf::from("/") }
    }
}

impl HostFiles {
    #[cfg(test)]
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    fn read(&self, p: &str) -> Option<String> {
        std::fs::read_to_string(self.path(p)).ok()
    }

    /// The device's IOMMU group must exist: no group, no IOMMU in front of it.
    pub fn check_iommu(&self, bdf: &str) -> Result<(), HostCheckError> {
        let path = self.path(&format!("sys/bus/pci/devices/{bdf}/iommu_group"));
        match path.exists() {
            true => Ok(()),
            false => Err(HostCheckError::NoIommu { bdf: bdf.to_string(), path }),
        }
    }

    /// Remapping is on when the kernel's MSI/IO-APIC irq chips go through it: their
    /// names in /proc/interrupts start with "IR-" (IR-PCI-MSI, IR-IO-APIC, ...).
    fn remapping_active(&self) -> bool {
        self.read("proc/interrupts").is_some_and(|t| t.split_whitespace().any(|w| w.starts_with("IR-")))
    }

    fn unsafe_interrupts_allowed(&self) -> bool {
        self.read("sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts")
            .is_some_and(|v| matches!(v.trim(), "Y" | "y" | "1"))
    }

    /// Some IOMMU is registered (`/sys/class/iommu/dmar0`, `ivhd0`, ...).
    pub fn check_iommu_present(&self) -> Result<(), HostCheckError> {
        let present = std::fs::read_dir(self.path("sys/class/iommu")).is_ok_and(|mut d| d.next().is_some());
        if present {
            Ok(())
        } else {
            Err(HostCheckError::NoIommuAtAll)
        }
    }

    pub fn check_interrupt_remapping(&self) -> Result<InterruptRemapping, HostCheckError> {
        if self.remapping_active() {
            return Ok(InterruptRemapping::Active);
        }
        if self.unsafe_interrupts_allowed() {
            return Ok(InterruptRemapping::UnsafeAllowed);
        }
        let cmdline = self.read("proc/cmdline").unwrap_or_default();
        let off = cmdline.split_whitespace().find(|w| {
            matches!(*w, "intremap=off" | "intel_iommu=off" | "amd_iommu=off" | "iommu=off" | "amd_iommu_intr=off")
                || w.starts_with("intremap=no")
        });
        let why = match off {
            Some(w) => format!(" (the host kernel was booted with {w})"),
            None => String::new(),
        };
        Err(HostCheckError::NoInterruptRemapping { why })
    }

    /// CAP_IPC_LOCK (bit 14 of CapEff) lifts RLIMIT_MEMLOCK for VFIO's pinning.
    fn has_ipc_lock(&self) -> bool {
        let status = self.read("proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << 14) != 0)
    }

    /// Pinning `need` bytes of guest RAM for DMA must fit the process's locked-memory limit.
    pub fn check_memlock(&self, need: u64, limit: Option<u64>) -> Result<(), HostCheckError> {
        if self.has_ipc_lock() {
            return Ok(());
        }
        match limit {
            Some(limit) if limit < need => Err(HostCheckError::MemlockShort {
                need_mib: need.div_ceil(1 << 20),
                limit_mib: limit >> 20,
                need_kib: need.div_ceil(1024),
            }),
            _ => Ok(()),
        }
    }
}

/// The checks that need no device: interrupt remapping and the locked-memory limit for
/// `ram` bytes of guest RAM. Run before any host device is touched.
pub fn check_passthrough_host(ram: u64) -> Result<InterruptRemapping, HostCheckError> {
    let host = HostFiles::default();
    host.check_iommu_present()?;
    let ir = host.check_interrupt_remapping()?;
    host.check_memlock(ram, memlock_limit())?;
    Ok(ir)
}

/// This process's RLIMIT_MEMLOCK soft limit in bytes; None when unlimited.
pub fn memlock_limit() -> Option<u64> {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } != 0 || rl.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(rl.rlim_cur)
}

/// The PCI address (BDF) a sysfs device path names.
pub fn bdf_of(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tree(PathBuf);
    impl Tree {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("tandem-hostcheck-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Tree(p)
        }
        fn file(&self, rel: &str, text: &str) -> &Self {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
            self
        }
        fn host(&self) -> HostFiles {
            HostFiles::at(&self.0)
        }
    }
    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const IRQS_IR: &str = "  0:  12  IR-IO-APIC    2-edge      timer\n 24:  3  IR-PCI-MSI-0000:00:02.0    0-edge  x\n";
    const IRQS_PLAIN: &str = "  0:  12  IO-APIC    2-edge      timer\n 24:  3  PCI-MSI-0000:00:02.0    0-edge  x\n";

    #[test]
    fn remapping_is_seen_in_the_irq_chip_names() {
        let t = Tree::new("ir");
        t.file("proc/interrupts", IRQS_IR);
        assert_eq!(t.host().check_interrupt_remapping(), Ok(InterruptRemapping::Active));
    }

    #[test]
    fn no_remapping_is_refused_with_the_way_out() {
        let t = Tree::new("noir");
        t.file("proc/interrupts", IRQS_PLAIN).file("proc/cmdline", "console=ttyS0 intremap=off quiet\n");
        let e = t.host().check_interrupt_remapping().unwrap_err();
        let msg = e.to_string();
        for want in ["intremap=off", "allow_unsafe_interrupts", "forge MSI"] {
            assert!(msg.contains(want), "{want:?} missing from: {msg}");
        }
        t.file("sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts", "N\n");
        assert!(t.host().check_interrupt_remapping().is_err());
        t.file("sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts", "Y\n");
        assert_eq!(t.host().check_interrupt_remapping(), Ok(InterruptRemapping::UnsafeAllowed));
    }

    #[test]
    fn a_host_without_iommu_is_refused() {
        let t = Tree::new("noiommu");
        assert_eq!(t.host().check_iommu_present(), Err(HostCheckError::NoIommuAtAll));
        t.file("sys/class/iommu/dmar0/intel-iommu/version", "1:0\n");
        assert_eq!(t.host().check_iommu_present(), Ok(()));
    }

    #[test]
    fn a_device_without_iommu_group_is_refused() {
        let t = Tree::new("iommu");
        let e = t.host().check_iommu("0000:01:10.0").unwrap_err();
        assert!(e.to_string().contains("intel_iommu=on"), "{e}");
        t.file("sys/bus/pci/devices/0000:01:10.0/iommu_group", "");
        assert_eq!(t.host().check_iommu("0000:01:10.0"), Ok(()));
    }

    #[test]
    fn memlock_shortfall_says_how_much() {
        let t = Tree::new("memlock");
        t.file("proc/self/status", "Name:\ttandem\nCapEff:\t0000000000000000\n");
        let e = t.host().check_memlock(1 << 30, Some(64 << 20)).unwrap_err();
        assert_eq!(e, HostCheckError::MemlockShort { need_mib: 1024, limit_mib: 64, need_kib: 1 << 20 });
        assert!(e.to_string().contains("ulimit -l 1048576"), "{e}");
        assert_eq!(t.host().check_memlock(1 << 30, None), Ok(()), "unlimited");
        // CAP_IPC_LOCK lifts the limit.
        t.file("proc/self/status", "CapEff:\t0000000000004000\n");
        assert_eq!(t.host().check_memlock(1 << 30, Some(0)), Ok(()));
    }
}
