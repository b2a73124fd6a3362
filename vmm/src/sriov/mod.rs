//! Host-side lifecycle of the devices a guest gets whole: SR-IOV VFs (`--vf`) and any PCI
//! device (`--device`). No KVM or VFIO calls here: a lease moves a device to vfio-pci (creating
//! VFs and setting their MAC, VLAN and flags on the PF first, for a VF) and puts everything back
//! when released, dropped, or — after a SIGKILL — found stale by [`cleanup`].
//!
//! ```no_run
//! # use vmm::sriov::{Host, VfLease, VfSpec};
//! let host = Host::system();
//! let spec = VfSpec::parse("pf=eth0,index=0,mac=02:00:00:00:00:01,create=on", 0)?;
//! let vf = VfLease::acquire(&spec, &host)?;
//! // ... open vf.sysfs_path() with VFIO, run the guest, close VFIO ...
//! vf.release()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Every change is journaled under [`Host::runtime_dir`] before it is made (see [`state`]).

pub mod bridge;
mod lease;
pub mod linkwatch;
pub mod netlink;
mod restore;
pub mod spec;
pub mod state;
pub mod sysfs;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;

pub use lease::{DeviceLease, HeldDevice, VfLease};
pub use netlink::{NetlinkError, RtNetlink, VfConfig, VfNetlink};
pub use restore::{cleanup, CleanupReport};
pub use spec::{DeviceSpec, VfSpec};
pub use state::JournalError;
pub use sysfs::{Sysfs, SysfsError};

/// Every host device one VM holds. Dropping it restores them (each lease's `Drop`); it must
/// outlive the VM's VFIO devices, container and KVM VFIO device.
#[derive(Debug, Default)]
pub struct Leases {
    pub vfs: Vec<VfLease>,
    pub devices: Vec<DeviceLease>,
}

impl Leases {
    /// Takes every `--vf` and `--device` of a VM; on failure, those already taken are put back.
    pub fn acquire(vfs: &[VfSpec], devices: &[DeviceSpec], host: &Host) -> Result<Self, SriovError> {
        let mut leases = Leases { vfs: VfLease::acquire_all(vfs, host)?, devices: Vec::new() };
        for spec in devices {
            leases.devices.push(DeviceLease::acquire(spec, host)?);
        }
        Ok(leases)
    }

    pub fn is_empty(&self) -> bool {
        self.vfs.is_empty() && self.devices.is_empty()
    }

    /// (id, sysfs directory) of every leased device, VFs first.
    pub fn passthrough(&self) -> Vec<(&str, &std::path::Path)> {
        let vfs = self.vfs.iter().map(|l| (l.id(), l.sysfs_path()));
        vfs.chain(self.devices.iter().map(|l| (l.id(), l.sysfs_path()))).collect()
    }

    /// Puts back the device leased as `id` (it must be closed already); None if there
    /// is no such lease.
    pub fn release(&mut self, id: &str) -> Option<Result<Vec<String>, SriovError>> {
        if let Some(i) = self.vfs.iter().position(|l| l.id() == id) {
            return Some(self.vfs.remove(i).release());
        }
        let i = self.devices.iter().position(|l| l.id() == id)?;
        Some(self.devices.remove(i).release())
    }

    /// What acquiring found worth telling (a PF whose link is down, ...).
    pub fn warnings(&self) -> Vec<String> {
        self.vfs.iter().flat_map(|l| l.warnings().iter().map(move |w| format!("{}: {w}", l.id()))).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SriovError {
    #[error("{dev}: {source}")]
    Sysfs {
        dev: String,
        #[source]
        source: SysfsError,
    },
    #[error("{dev}: on {pf}: {source}")]
    Netlink {
        dev: String,
        pf: String,
        #[source]
        source: NetlinkError,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{dev}: {pf} ({pf_bdf}) has no SR-IOV capability: give the PF of an SR-IOV NIC")]
    NotSriov { dev: String, pf: String, pf_bdf: String },
    #[error(
        "{dev}: {pf} supports {total} VFs (sriov_totalvfs), so there is no VF {index}: use an index below {total}"
    )]
    NoSuchIndex { dev: String, pf: String, index: u32, total: u32 },
    #[error(
        "{dev}: {pf} has {numvfs} VFs, so there is no VF {index}: add create=on to --vf, or create them with \
         `echo {} > /sys/class/net/{pf}/device/sriov_numvfs`",
        index + 1
    )]
    TooFewVfs { dev: String, pf: String, index: u32, numvfs: u32 },
    #[error(
        "{dev}: {pf} already has {numvfs} VFs and VF {index} needs {}: Tandem does not resize a PF whose VFs may \
         be in use; use an index below {numvfs}, or set sriov_numvfs to 0 and then to {} yourself",
        index + 1, index + 1
    )]
    WontResize { dev: String, pf: String, index: u32, numvfs: u32 },
    #[error("{dev}: sriov_numvfs says VF {index} exists but {pf} has no virtfn{index} link")]
    MissingVf { dev: String, pf: String, index: u32 },
    #[error("{dev}: {bdf} is in use by tandem pid {pid} (journal {journal}): stop that VM first")]
    InUse { dev: String, bdf: String, pid: u32, journal: PathBuf },
    #[error(
        "could not put {dev} back fully: {}; {journal} stays so that `tandem cleanup` can finish once that is fixed",
        failures.join("; ")
    )]
    Restore { dev: String, journal: PathBuf, failures: Vec<String> },
    #[error(
        "{dev}: its PF did not report the VF's settings when it was leased, so Tandem cannot change its MAC and \
         put it back; use a PF whose driver reports VF settings (`ip link show PF` lists `vf N`)"
    )]
    NoVfSettings { dev: String },
    #[error("{error}; putting things back failed as well: {restore}")]
    AndRestore { error: Box<SriovError>, restore: Box<SriovError> },
}

/// Where leases take and put back devices: the host's sysfs, the PF-side VF settings, and the
/// directory of restore journals.
#[derive(Clone)]
pub struct Host {
    pub sysfs: Sysfs,
    pub netlink: Arc<dyn VfNetlink>,
    pub runtime_dir: PathBuf,
    /// Hears what could not be put back when nobody is left to return an error to.
    pub notices: devices::Notices,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("sysfs", &self.sysfs).field("runtime_dir", &self.runtime_dir).finish()
    }
}

impl Host {
    /// This machine: sysfs at `/`, rtnetlink, and [`default_runtime_dir`].
    pub fn system() -> Self {
        Self {
            sysfs: Sysfs::new("/"),
            netlink: Arc::new(RtNetlink),
            runtime_dir: default_runtime_dir(),
            notices: devices::Notices::discard(),
        }
    }

    pub fn with_notices(self, notices: devices::Notices) -> Self {
        Self { notices, ..self }
    }
}

/// `/run/tandem/vf` for root, which is who can lease devices; `$XDG_RUNTIME_DIR/tandem/vf` for
/// anyone else. Root ignores `XDG_RUNTIME_DIR` so that `tandem cleanup` finds the journals
/// however root's environment was set up.
pub fn default_runtime_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !root && !dir.is_empty() => PathBuf::from(dir).join("tandem/vf"),
        _ => PathBuf::from("/run/tandem/vf"),
    }
}
