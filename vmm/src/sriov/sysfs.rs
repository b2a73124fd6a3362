//! The host's PCI and SR-IOV state as sysfs shows it, read and written as plain files under a
//! root: `/` in production, a fake tree in tests.
//!
//! Reads go straight to the files. Writes go through [`SysfsWriter`] because some of them are
//! requests to the kernel (bind, unbind, drivers_probe, sriov_numvfs) whose effects a fake
//! tree has to play out itself.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Drivers that may hold other devices of a leased device's IOMMU group: they never DMA on
/// their own (stub drivers, or the port driver of a bridge).
const HARMLESS_DRIVERS: [&str; 3] = ["vfio-pci", "pci-stub", "pcieport"];

#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("no network interface {0:?} on this host: check the name with `ip link`")]
    NoInterface(String),
    #[error("{ifname} is not a PCI device ({path} is missing): give the PF of an SR-IOV NIC, not a virtual interface")]
    NotPci { ifname: String, path: PathBuf },
    #[error("no PCI device {bdf} ({path} is missing): check the address with `lspci -D`")]
    NoDevice { bdf: String, path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds {value:?}, which is not {expected}")]
    Parse { path: PathBuf, value: String, expected: &'static str },
    #[error("cannot write {value:?} to {path}: {source}{}", write_hint(source))]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("{name:?} is not a driver name")]
    BadDriverName { name: String },
    #[error(
        "{bdf} has no IOMMU group ({path} is missing): turn on the IOMMU (VT-d or AMD-Vi in the firmware, \
         intel_iommu=on or amd_iommu=on on the kernel command line)"
    )]
    NoIommuGroup { bdf: String, path: PathBuf },
    #[error(
        "IOMMU group {group} of {bdf} also holds {}: a group goes to the guest whole, so unbind those devices \
         (echo BDF > /sys/bus/pci/devices/BDF/driver/unbind) or bind them to vfio-pci first",
        offenders.join(", ")
    )]
    GroupInUse { group: u32, bdf: String, offenders: Vec<String> },
    #[error("vfio-pci is not loaded ({path} is missing): run `modprobe vfio-pci`")]
    NoVfioPci { path: PathBuf },
    #[error(
        "{bdf} is on {} after drivers_probe, not on vfio-pci: check dmesg for why vfio-pci refused it",
        driver.as_deref().unwrap_or("no driver")
    )]
    NotOnVfio { bdf: String, driver: Option<String> },
    #[error(
        "{path} did not appear within {} ms of binding {bdf} to vfio-pci: check dmesg, and that devtmpfs or udev \
         creates /dev/vfio nodes",
        timeout.as_millis()
    )]
    NoVfioNode { bdf: String, path: PathBuf, timeout: Duration },
}

fn write_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => "; writing sysfs needs root",
        _ => "",
    }
}

/// `DDDD:BB:DD.F` as sysfs spells PCI addresses (lower-case hex; the domain may be longer).
pub fn is_bdf(s: &str) -> bool {
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let mut parts = s.split(':');
    let (Some(domain), Some(bus), Some(rest), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let Some((dev, func)) = rest.split_once('.') else {
        return false;
    };
    domain.len() >= 4
        && hex(domain, domain.len())
        && hex(bus, 2)
        && hex(dev, 2)
        && u8::from_str_radix(dev, 16).is_ok_and(|d| d < 32)
        && matches!(func.as_bytes(), [b'0'..=b'7'])
}

/// A single path component that cannot climb out of the directory it is joined to.
fn is_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/')
}

/// How a write reaches sysfs. The real one writes the file; a test's fake also plays the kernel.
pub trait SysfsWriter: Send + Sync {
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
}

/// Writes the file as it stands: sysfs attributes exist already and take one `write(2)`.
pub struct DirectWriter;

impl SysfsWriter for DirectWriter {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        std::fs::OpenOptions::new().write(true).open(path)?.write_all(value.as_bytes())
    }
}

#[derive(Clone)]
pub struct Sysfs {
    root: PathBuf,
    writer: Arc<dyn SysfsWriter>,
    vfio_timeout: Duration,
}

impl std::fmt::Debug for Sysfs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sysfs").field("root", &self.root).finish_non_exhaustive()
    }
}

impl Sysfs {
    /// vfio-pci creates the group node as it binds (0.06 s in the nested bed); udev may add a
    /// little on busy hosts.
    pub const DEFAULT_VFIO_TIMEOUT: Duration = Duration::from_secs(5);

    /// The host's sysfs and /dev under `root` (`/` outside tests).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_writer(root, Arc::new(DirectWriter))
    }

    pub fn with_writer(root: impl Into<PathBuf>, writer: Arc<dyn SysfsWriter>) -> Self {
        Self { root: root.into(), writer, vfio_timeout: Self::DEFAULT_VFIO_TIMEOUT }
    }

    /// How long to wait for `/dev/vfio/N` after binding.
    pub fn with_vfio_timeout(mut self, timeout: Duration) -> Self {
        self.vfio_timeout = timeout;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The device's sysfs directory, the path VFIO opens it by.
    pub fn device_path(&self, bdf: &str) -> PathBuf {
        self.root.join("sys/bus/pci/devices").join(bdf)
    }

    fn netdev_path(&self, ifname: &str) -> PathBuf {
        self.root.join("sys/class/net").join(ifname)
    }

    fn read(&self, path: &Path) -> Result<String, SysfsError> {
        std::fs::read_to_string(path)
            .map(|s| s.trim_end().to_string())
            .map_err(|source| SysfsError::Read { path: path.to_path_buf(), source })
    }

    fn read_number(&self, path: &Path) -> Result<u32, SysfsError> {
        let value = self.read(path)?;
        value.parse().map_err(|_| SysfsError::Parse { path: path.to_path_buf(), value, expected: "a number" })
    }

    /// The last component of a symlink's target, or `None` when there is no link.
    fn link_name(&self, path: &Path) -> Result<Option<String>, SysfsError> {
        match std::fs::read_link(path) {
            Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SysfsError::Read { path: path.to_path_buf(), source }),
        }
    }

    fn write(&self, path: PathBuf, value: &str) -> Result<(), SysfsError> {
        self.writer.write(&path, value).map_err(|source| SysfsError::Write { path, value: value.to_string(), source })
    }

    /// The PCI address behind a netdev, from its `device` link.
    pub fn netdev_bdf(&self, ifname: &str) -> Result<String, SysfsError> {
        let dir = self.netdev_path(ifname);
        if !dir.exists() {
            return Err(SysfsError::NoInterface(ifname.to_string()));
        }
        let link = dir.join("device");
        match self.link_name(&link)? {
            Some(bdf) if is_bdf(&bdf) => Ok(bdf),
            _ => Err(SysfsError::NotPci { ifname: ifname.to_string(), path: link }),
        }
    }

    pub fn ifindex(&self, ifname: &str) -> Result<u32, SysfsError> {
        self.read_number(&self.netdev_path(ifname).join("ifindex"))
    }

    /// Whether the interface is administratively up (IFF_UP in `flags`). Its operational
    /// state is no guide: creating VFs resets the PF, whose carrier then drops for a while.
    pub fn admin_up(&self, ifname: &str) -> Option<bool> {
        let flags = self.read(&self.netdev_path(ifname).join("flags")).ok()?;
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).ok()?;
        Some(flags & 1 != 0)
    }

    pub fn require_device(&self, bdf: &str) -> Result<PathBuf, SysfsError> {
        let path = self.device_path(bdf);
        if path.exists() {
            Ok(path)
        } else {
            Err(SysfsError::NoDevice { bdf: bdf.to_string(), path })
        }
    }

    /// `sriov_totalvfs`, or `None` when the device has no SR-IOV capability.
    pub fn sriov_totalvfs(&self, pf: &str) -> Result<Option<u32>, SysfsError> {
        let path = self.device_path(pf).join("sriov_totalvfs");
        if !path.exists() {
            return Ok(None);
        }
        self.read_number(&path).map(Some)
    }

    pub fn sriov_numvfs(&self, pf: &str) -> Result<u32, SysfsError> {
        self.read_number(&self.device_path(pf).join("sriov_numvfs"))
    }

    /// Whether new VFs are probed by their host driver as they appear.
    pub fn sriov_autoprobe(&self, pf: &str) -> Result<bool, SysfsError> {
        Ok(self.read_number(&self.device_path(pf).join("sriov_drivers_autoprobe"))? != 0)
    }

    pub fn set_sriov_numvfs(&self, pf: &str, n: u32) -> Result<(), SysfsError> {
        self.write(self.device_path(pf).join("sriov_numvfs"), &n.to_string())
    }

    pub fn set_sriov_autoprobe(&self, pf: &str, on: bool) -> Result<(), SysfsError> {
        self.write(self.device_path(pf).join("sriov_drivers_autoprobe"), if on { "1" } else { "0" })
    }

    /// The address of VF `index` of a PF, or `None` when the PF has no such VF.
    pub fn virtfn(&self, pf: &str, index: u32) -> Result<Option<String>, SysfsError> {
        let link = self.device_path(pf).join(format!("virtfn{index}"));
        match self.link_name(&link)? {
            Some(bdf) if is_bdf(&bdf) => Ok(Some(bdf)),
            Some(other) => Err(SysfsError::Parse { path: link, value: other, expected: "a link to a PCI device" }),
            None => Ok(None),
        }
    }

    /// The addresses of every VF a PF has now (its `virtfnN` links); none when the PF is gone.
    pub fn virtfns(&self, pf: &str) -> Result<Vec<String>, SysfsError> {
        let dir = self.device_path(pf);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(SysfsError::Read { path: dir, source }),
        };
        let mut vfs = Vec::new();
        for entry in entries {
            let name = entry.map_err(|source| SysfsError::Read { path: dir.clone(), source })?.file_name();
            let index = name.to_str().and_then(|n| n.strip_prefix("virtfn")).and_then(|i| i.parse().ok());
            if let Some(bdf) = index.map(|i| self.virtfn(pf, i)).transpose()?.flatten() {
                vfs.push(bdf);
            }
        }
        Ok(vfs)
    }

    /// The address of a VF's PF, or `None` when the device is not a VF (or is gone).
    pub fn physfn(&self, bdf: &str) -> Result<Option<String>, SysfsError> {
        Ok(self.link_name(&self.device_path(bdf).join("physfn"))?.filter(|pf| is_bdf(pf)))
    }

    /// The driver the device is bound to, if any.
    pub fn driver(&self, bdf: &str) -> Result<Option<String>, SysfsError> {
        self.link_name(&self.device_path(bdf).join("driver"))
    }

    /// The driver the device is pinned to, if any; the kernel shows `(null)` for none.
    pub fn driver_override(&self, bdf: &str) -> Result<Option<String>, SysfsError> {
        let value = self.read(&self.device_path(bdf).join("driver_override"))?;
        Ok(Some(value).filter(|v| !v.is_empty() && v != "(null)"))
    }

    /// Pins the device to a driver, or with `None` unpins it (a lone newline clears it).
    pub fn set_driver_override(&self, bdf: &str, driver: Option<&str>) -> Result<(), SysfsError> {
        self.write(self.device_path(bdf).join("driver_override"), driver.unwrap_or("\n"))
    }

    /// Detaches the device from whatever driver holds it; a no-op when it has none.
    pub fn unbind(&self, bdf: &str) -> Result<(), SysfsError> {
        if self.driver(bdf)?.is_none() {
            return Ok(());
        }
        self.write(self.device_path(bdf).join("driver/unbind"), bdf)
    }

    pub fn bind(&self, bdf: &str, driver: &str) -> Result<(), SysfsError> {
        if !is_name(driver) {
            return Err(SysfsError::BadDriverName { name: driver.to_string() });
        }
        self.write(self.root.join("sys/bus/pci/drivers").join(driver).join("bind"), bdf)
    }

    /// Asks the kernel to find the device a driver, honouring its driver_override.
    pub fn probe(&self, bdf: &str) -> Result<(), SysfsError> {
        self.write(self.root.join("sys/bus/pci/drivers_probe"), bdf)
    }

    pub fn require_vfio_pci(&self) -> Result<(), SysfsError> {
        let path = self.root.join("sys/bus/pci/drivers/vfio-pci");
        if path.exists() {
            Ok(())
        } else {
            Err(SysfsError::NoVfioPci { path })
        }
    }

    pub fn iommu_group(&self, bdf: &str) -> Result<u32, SysfsError> {
        let path = self.device_path(bdf).join("iommu_group");
        let Some(name) = self.link_name(&path)? else {
            return Err(SysfsError::NoIommuGroup { bdf: bdf.to_string(), path });
        };
        name.parse().map_err(|_| SysfsError::Parse { path, value: name, expected: "a link to an IOMMU group" })
    }

    /// Bridges share groups with what sits behind them without ever doing DMA themselves
    /// (header type 1 or 2 at config offset 0x0e, low 7 bits).
    fn is_bridge(&self, bdf: &str) -> bool {
        std::fs::read(self.device_path(bdf).join("config")).is_ok_and(|c| c.get(0x0e).is_some_and(|t| t & 0x7f != 0))
    }

    /// Refuses when another device of the group is bound to a driver that could DMA: VFIO would
    /// refuse the group as not viable, without saying which device is at fault.
    pub fn check_group(&self, group: u32, bdf: &str) -> Result<(), SysfsError> {
        let dir = self.root.join("sys/kernel/iommu_groups").join(group.to_string()).join("devices");
        let entries = std::fs::read_dir(&dir).map_err(|source| SysfsError::Read { path: dir.clone(), source })?;
        let mut offenders = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| SysfsError::Read { path: dir.clone(), source })?;
            let other = entry.file_name().to_string_lossy().into_owned();
            if other == bdf || !is_bdf(&other) {
                continue;
            }
            match self.driver(&other)? {
                Some(d) if !HARMLESS_DRIVERS.contains(&d.as_str()) && !self.is_bridge(&other) => {
                    offenders.push(format!("{other} (bound to {d})"))
                }
                _ => {}
            }
        }
        if offenders.is_empty() {
            return Ok(());
        }
        offenders.sort();
        Err(SysfsError::GroupInUse { group, bdf: bdf.to_string(), offenders })
    }

    /// Waits until vfio-pci has the device and its group node exists.
    pub fn wait_vfio_node(&self, group: u32, bdf: &str) -> Result<PathBuf, SysfsError> {
        let node = self.root.join("dev/vfio").join(group.to_string());
        let deadline = Instant::now() + self.vfio_timeout;
        loop {
            if node.exists() {
                return Ok(node);
            }
            if Instant::now() >= deadline {
                return Err(SysfsError::NoVfioNode { bdf: bdf.to_string(), path: node, timeout: self.vfio_timeout });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_syntax() {
        for good in ["0000:01:00.0", "0000:00:1f.7", "10000:e1:00.1"] {
            assert!(is_bdf(good), "{good}");
        }
        for bad in ["", "01:00.0", "0000:01:00", "0000:01:00.8", "0000:01:20.0", "0000:01:00.0/..", "0000:1:00.0"] {
            assert!(!is_bdf(bad), "{bad}");
        }
        assert!(!is_bdf("0000:0A:00.0"), "sysfs spells hex in lower case");
    }

    #[test]
    fn write_errors_say_what_to_do() {
        let e = SysfsError::Write {
            path: "/sys/x".into(),
            value: "1".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        assert!(e.to_string().ends_with("writing sysfs needs root"), "{e}");
    }
}
