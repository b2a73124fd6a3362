//! A fake host for the lifecycle tests: a sysfs tree in a temporary directory, a "kernel" that
//! plays out the writes real sysfs acts on (bind, unbind, drivers_probe, sriov_numvfs), a PF's
//! VF settings in a map, and a switch that makes the process "die" at any step.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::netlink::{NetlinkError, VfConfig, VfNetlink};
use super::sysfs::{Sysfs, SysfsWriter};
use super::Host;

/// Counts host-changing operations and kills the "process" at a chosen one: that operation
/// and every later one fails, as nothing runs after a SIGKILL.
#[derive(Default)]
pub(crate) struct Gate {
    ops: AtomicUsize,
    /// (operation number, whether it still takes effect before the death).
    kill: Mutex<Option<(usize, bool)>>,
    dead: AtomicBool,
}

impl Gate {
    fn died() -> io::Error {
        io::Error::new(io::ErrorKind::Interrupted, "killed (test)")
    }

    /// Before an operation: Err if dead or dying now without doing it.
    fn before(&self) -> io::Result<usize> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(Self::died());
        }
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        if *self.kill.lock().unwrap() == Some((n, false)) {
            self.dead.store(true, Ordering::SeqCst);
            return Err(Self::died());
        }
        Ok(n)
    }

    /// After operation `n` took effect: Err if the death comes right after it.
    fn after(&self, n: usize) -> io::Result<()> {
        if *self.kill.lock().unwrap() == Some((n, true)) {
            self.dead.store(true, Ordering::SeqCst);
            return Err(Self::died());
        }
        Ok(())
    }

    pub(crate) fn kill_at(&self, op: usize, after_effect: bool) {
        *self.kill.lock().unwrap() = Some((op, after_effect));
    }

    /// A new process: nothing dies any more.
    pub(crate) fn revive(&self) {
        *self.kill.lock().unwrap() = None;
        self.dead.store(false, Ordering::SeqCst);
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }
}

/// A PF's VF settings per (ifindex, vf).
pub(crate) struct FakeNetlink {
    pub(crate) vfs: Mutex<HashMap<(u32, u32), VfConfig>>,
    /// Sets of this attribute fail with this errno.
    pub(crate) refuse: Mutex<Option<(&'static str, i32)>>,
    /// Reading a VF's settings fails with this errno (a PF driver without `ndo_get_vf_config`).
    pub(crate) refuse_read: Mutex<Option<i32>>,
    gate: Arc<Gate>,
}

impl FakeNetlink {
    pub(crate) fn get(&self, pf: u32, vf: u32) -> Option<VfConfig> {
        self.vfs.lock().unwrap().get(&(pf, vf)).copied()
    }

    fn update(&self, attr: &'static str, pf: u32, vf: u32, f: impl FnOnce(&mut VfConfig)) -> Result<(), NetlinkError> {
        let io = |source| NetlinkError::Io { what: "send", source };
        let n = self.gate.before().map_err(io)?;
        if let Some((refused, errno)) = *self.refuse.lock().unwrap() {
            if refused == attr {
                return Err(NetlinkError::Refused { what: attr, vf, source: io::Error::from_raw_os_error(errno) });
            }
        }
        let mut vfs = self.vfs.lock().unwrap();
        let einval = NetlinkError::Refused { what: attr, vf, source: io::Error::from_raw_os_error(libc::EINVAL) };
        f(vfs.get_mut(&(pf, vf)).ok_or(einval)?);
        self.gate.after(n).map_err(io)
    }
}

impl VfNetlink for FakeNetlink {
    fn vf_config(&self, pf: u32, vf: u32) -> Result<VfConfig, NetlinkError> {
        if let Some(errno) = *self.refuse_read.lock().unwrap() {
            let source = io::Error::from_raw_os_error(errno);
            return Err(NetlinkError::Refused { what: "reading the settings", vf, source });
        }
        self.get(pf, vf).ok_or(NetlinkError::NoVfInfo { vf })
    }
    fn set_mac(&self, pf: u32, vf: u32, mac: [u8; 6]) -> Result<(), NetlinkError> {
        self.update("mac", pf, vf, |c| c.mac = mac)
    }
    fn set_vlan(&self, pf: u32, vf: u32, vlan: u16, qos: u32) -> Result<(), NetlinkError> {
        self.update("vlan", pf, vf, |c| (c.vlan, c.qos) = (vlan, qos))
    }
    fn set_spoofchk(&self, pf: u32, vf: u32, on: bool) -> Result<(), NetlinkError> {
        self.update("spoofchk", pf, vf, |c| c.spoofchk = on)
    }
    fn set_trust(&self, pf: u32, vf: u32, on: bool) -> Result<(), NetlinkError> {
        self.update("trust", pf, vf, |c| c.trust = on)
    }
}

/// What the fake kernel knows about a device beyond its files.
#[derive(Clone)]
struct DeviceInfo {
    /// The driver whose id table matches it.
    native: String,
    group: u32,
    /// The PF of a VF.
    physfn: Option<String>,
}

/// A fresh VF: no admin MAC, spoof checking on, not trusted (igb's defaults).
pub(crate) const FRESH_VF: VfConfig = VfConfig { mac: [0; 6], vlan: 0, qos: 0, spoofchk: true, trust: false };

pub(crate) struct FakeKernel {
    root: PathBuf,
    devices: Mutex<HashMap<String, DeviceInfo>>,
    /// PF address → ifindex, for the VF settings of VFs it creates.
    pfs: Mutex<HashMap<String, u32>>,
    netlink: Arc<FakeNetlink>,
    gate: Arc<Gate>,
    /// vfio-pci never creates the group node (a broken udev, say).
    pub(crate) no_vfio_nodes: AtomicBool,
    /// Every kernel-side write, as `path <- value`.
    pub(crate) log: Mutex<Vec<String>>,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl FakeKernel {
    fn dev_dir(&self, bdf: &str) -> PathBuf {
        self.root.join("sys/devices/pci0000:00").join(bdf)
    }

    fn read(&self, path: PathBuf) -> String {
        std::fs::read_to_string(path).unwrap_or_default().trim_end().to_string()
    }

    fn driver_of(&self, bdf: &str) -> Option<String> {
        let link = std::fs::read_link(self.dev_dir(bdf).join("driver")).ok()?;
        Some(link.file_name()?.to_string_lossy().into_owned())
    }

    fn add_device(&self, bdf: &str, info: DeviceInfo, bridge: bool) {
        let dir = self.dev_dir(bdf);
        std::fs::create_dir_all(&dir).unwrap();
        let mut config = vec![0u8; 64];
        config[0x0e] = u8::from(bridge);
        std::fs::write(dir.join("config"), config).unwrap();
        std::fs::write(dir.join("driver_override"), "(null)\n").unwrap();
        symlink(&dir, self.root.join("sys/bus/pci/devices").join(bdf)).unwrap();
        let group = self.root.join("sys/kernel/iommu_groups").join(info.group.to_string());
        std::fs::create_dir_all(group.join("devices")).unwrap();
        symlink(&group, dir.join("iommu_group")).unwrap();
        symlink(&dir, group.join("devices").join(bdf)).unwrap();
        if let Some(pf) = &info.physfn {
            symlink(self.dev_dir(pf), dir.join("physfn")).unwrap();
        }
        self.devices.lock().unwrap().insert(bdf.to_string(), info);
    }

    fn remove_device(&self, bdf: &str) {
        let Some(info) = self.devices.lock().unwrap().remove(bdf) else { return };
        if self.driver_of(bdf).as_deref() == Some("vfio-pci") {
            let _ = std::fs::remove_file(self.root.join("dev/vfio").join(info.group.to_string()));
        }
        std::fs::remove_dir_all(self.dev_dir(bdf)).unwrap();
        std::fs::remove_file(self.root.join("sys/bus/pci/devices").join(bdf)).unwrap();
        let group = self.root.join("sys/kernel/iommu_groups").join(info.group.to_string());
        std::fs::remove_file(group.join("devices").join(bdf)).unwrap();
        if std::fs::read_dir(group.join("devices")).unwrap().next().is_none() {
            std::fs::remove_dir_all(group).unwrap();
        }
    }

    /// The kernel's `pci_device_can_probe`: a VF of a PF with autoprobe off only binds to the
    /// driver it is pinned to.
    fn can_probe(&self, info: &DeviceInfo, driver_override: &str) -> bool {
        let autoprobe = |pf: &str| self.read(self.dev_dir(pf).join("sriov_drivers_autoprobe")) == "1";
        info.physfn.as_deref().is_none_or(autoprobe) || driver_override != "(null)"
    }

    fn attach(&self, bdf: &str, driver: &str) -> io::Result<()> {
        let dir = self.root.join("sys/bus/pci/drivers").join(driver);
        if !dir.exists() {
            return Err(errno(libc::ENOENT));
        }
        symlink(&dir, self.dev_dir(bdf).join("driver"))?;
        let group = self.devices.lock().unwrap()[bdf].group;
        if driver == "vfio-pci" && !self.no_vfio_nodes.load(Ordering::SeqCst) {
            std::fs::write(self.root.join("dev/vfio").join(group.to_string()), "")?;
        }
        Ok(())
    }

    /// `bind` with `driver`, or `drivers_probe` with `None`.
    fn probe(&self, bdf: &str, driver: Option<&str>) -> io::Result<()> {
        let info = self.devices.lock().unwrap().get(bdf).cloned().ok_or(errno(libc::ENODEV))?;
        if self.driver_of(bdf).is_some() {
            return if driver.is_some() { Err(errno(libc::EBUSY)) } else { Ok(()) };
        }
        let pinned = self.read(self.dev_dir(bdf).join("driver_override"));
        let matching = if pinned != "(null)" { pinned.clone() } else { info.native.clone() };
        match driver {
            Some(d) if d != matching || !self.can_probe(&info, &pinned) => Err(errno(libc::ENODEV)),
            _ if !self.can_probe(&info, &pinned) => Ok(()),
            _ => self.attach(bdf, &matching),
        }
    }

    fn unbind(&self, bdf: &str) -> io::Result<()> {
        let driver = self.driver_of(bdf).ok_or(errno(libc::ENODEV))?;
        std::fs::remove_file(self.dev_dir(bdf).join("driver"))?;
        if driver == "vfio-pci" {
            let group = self.devices.lock().unwrap()[bdf].group;
            let _ = std::fs::remove_file(self.root.join("dev/vfio").join(group.to_string()));
        }
        Ok(())
    }

    pub(crate) fn vf_bdf(pf: &str, i: u32) -> String {
        format!("{}:10.{i}", &pf[..7])
    }

    fn set_numvfs(&self, pf: &str, value: &str) -> io::Result<()> {
        let n: u32 = value.trim().parse().map_err(|_| errno(libc::EINVAL))?;
        let dir = self.dev_dir(pf);
        let current: u32 = self.read(dir.join("sriov_numvfs")).parse().unwrap();
        let total: u32 = self.read(dir.join("sriov_totalvfs")).parse().unwrap();
        if n > total {
            return Err(errno(libc::ERANGE));
        }
        if current != 0 && n != 0 {
            return Err(errno(libc::EBUSY));
        }
        let ifindex = self.pfs.lock().unwrap()[pf];
        for i in 0..current {
            let vf = Self::vf_bdf(pf, i);
            self.remove_device(&vf);
            std::fs::remove_file(dir.join(format!("virtfn{i}")))?;
            self.netlink.vfs.lock().unwrap().remove(&(ifindex, i));
        }
        for i in 0..n {
            let vf = Self::vf_bdf(pf, i);
            let info = DeviceInfo { native: "igbvf".into(), group: 100 + i, physfn: Some(pf.to_string()) };
            self.add_device(&vf, info, false);
            symlink(self.dev_dir(&vf), dir.join(format!("virtfn{i}")))?;
            self.netlink.vfs.lock().unwrap().insert((ifindex, i), FRESH_VF);
            self.probe(&vf, None)?;
        }
        std::fs::write(dir.join("sriov_numvfs"), format!("{n}\n"))
    }

    fn act(&self, rel: &Path, value: &str) -> io::Result<()> {
        let parts: Vec<&str> = rel.iter().map(|p| p.to_str().unwrap()).collect();
        match parts.as_slice() {
            ["sys", "bus", "pci", "drivers_probe"] => self.probe(value, None),
            ["sys", "bus", "pci", "drivers", driver, "bind"] => self.probe(value, Some(driver)),
            ["sys", "bus", "pci", "devices", bdf, "driver", "unbind"] if *bdf == value => self.unbind(value),
            ["sys", "bus", "pci", "devices", bdf, "sriov_numvfs"] => self.set_numvfs(bdf, value),
            ["sys", "bus", "pci", "devices", bdf, "driver_override"] => {
                let v = if value.trim().is_empty() { "(null)" } else { value.trim() };
                std::fs::write(self.dev_dir(bdf).join("driver_override"), format!("{v}\n"))
            }
            ["sys", "bus", "pci", "devices", bdf, "sriov_drivers_autoprobe"] => {
                std::fs::write(self.dev_dir(bdf).join("sriov_drivers_autoprobe"), format!("{}\n", value.trim()))
            }
            _ => panic!("the fake kernel does not know {}", rel.display()),
        }
    }
}

impl SysfsWriter for FakeKernel {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let n = self.gate.before()?;
        let rel = path.strip_prefix(&self.root).expect("writes stay under the root");
        self.act(rel, value)?;
        self.log.lock().unwrap().push(format!("{} <- {}", rel.display(), value.trim()));
        self.gate.after(n)
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A temporary host, deleted on drop.
pub(crate) struct FakeHost {
    dir: PathBuf,
    pub(crate) root: PathBuf,
    pub(crate) runtime: PathBuf,
    pub(crate) kernel: Arc<FakeKernel>,
    pub(crate) netlink: Arc<FakeNetlink>,
    pub(crate) gate: Arc<Gate>,
}

impl FakeHost {
    pub(crate) fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("tandem-sriov-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        for d in ["sys/bus/pci/devices", "sys/class/net", "sys/kernel/iommu_groups", "dev/vfio"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for driver in ["igb", "igbvf", "vfio-pci", "pci-stub", "e1000e", "snd_hda_intel", "shpchp"] {
            std::fs::create_dir_all(root.join("sys/bus/pci/drivers").join(driver)).unwrap();
        }
        std::fs::write(root.join("sys/bus/pci/drivers_probe"), "").unwrap();
        let gate = Arc::new(Gate::default());
        let netlink = Arc::new(FakeNetlink {
            vfs: Mutex::default(),
            refuse: Mutex::default(),
            refuse_read: Mutex::default(),
            gate: gate.clone(),
        });
        let kernel = Arc::new(FakeKernel {
            root: root.clone(),
            devices: Mutex::default(),
            pfs: Mutex::default(),
            netlink: netlink.clone(),
            gate: gate.clone(),
            no_vfio_nodes: AtomicBool::new(false),
            log: Mutex::default(),
        });
        Self { runtime: dir.join("run/tandem/vf"), dir, root, kernel, netlink, gate }
    }

    pub(crate) fn host(&self) -> Host {
        let writer: Arc<dyn SysfsWriter> = self.kernel.clone();
        Host {
            sysfs: Sysfs::with_writer(&self.root, writer).with_vfio_timeout(Duration::from_millis(50)),
            netlink: self.netlink.clone(),
            runtime_dir: self.runtime.clone(),
            notices: devices::Notices::discard(),
        }
    }

    /// An SR-IOV PF on igb with `numvfs` VFs already there (bound to igbvf if `autoprobe`).
    pub(crate) fn add_pf(&self, ifname: &str, bdf: &str, ifindex: u32, total: u32, numvfs: u32, autoprobe: bool) {
        let info = DeviceInfo { native: "igb".into(), group: 1, physfn: None };
        self.kernel.add_device(bdf, info, false);
        let dir = self.kernel.dev_dir(bdf);
        std::fs::write(dir.join("sriov_totalvfs"), format!("{total}\n")).unwrap();
        std::fs::write(dir.join("sriov_numvfs"), "0\n").unwrap();
        std::fs::write(dir.join("sriov_drivers_autoprobe"), format!("{}\n", u8::from(autoprobe))).unwrap();
        self.kernel.attach(bdf, "igb").unwrap();
        let net = self.root.join("sys/class/net").join(ifname);
        std::fs::create_dir_all(&net).unwrap();
        symlink(&dir, net.join("device")).unwrap();
        std::fs::write(net.join("ifindex"), format!("{ifindex}\n")).unwrap();
        std::fs::write(net.join("flags"), "0x1003\n").unwrap();
        self.kernel.pfs.lock().unwrap().insert(bdf.to_string(), ifindex);
        self.kernel.set_numvfs(bdf, &numvfs.to_string()).unwrap();
    }

    /// A network interface on a device that is not an SR-IOV PF.
    pub(crate) fn add_netdev(&self, ifname: &str, bdf: &str, ifindex: u32) {
        let net = self.root.join("sys/class/net").join(ifname);
        std::fs::create_dir_all(&net).unwrap();
        symlink(self.kernel.dev_dir(bdf), net.join("device")).unwrap();
        std::fs::write(net.join("ifindex"), format!("{ifindex}\n")).unwrap();
    }

    /// A plain PCI device in `group`, bound to `driver` when given.
    pub(crate) fn add_device(&self, bdf: &str, group: u32, native: &str, bound: bool, bridge: bool) {
        let info = DeviceInfo { native: native.into(), group, physfn: None };
        self.kernel.add_device(bdf, info, bridge);
        if bound {
            self.kernel.attach(bdf, native).unwrap();
        }
    }

    pub(crate) fn vf_settings(&self, ifindex: u32, vf: u32) -> VfConfig {
        self.netlink.get(ifindex, vf).expect("the VF exists")
    }

    pub(crate) fn set_vf_settings(&self, ifindex: u32, vf: u32, config: VfConfig) {
        self.netlink.vfs.lock().unwrap().insert((ifindex, vf), config);
    }

    /// Every file, link and directory of the tree and the VF settings, in a comparable form.
    pub(crate) fn snapshot(&self) -> String {
        fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                if meta.file_type().is_symlink() {
                    out.insert(rel, format!("-> {}", std::fs::read_link(&path).unwrap().display()));
                } else if meta.is_dir() {
                    out.insert(rel.clone(), "/".into());
                    walk(&path, root, out);
                } else {
                    out.insert(rel, String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned());
                }
            }
        }
        let mut files = BTreeMap::new();
        walk(&self.root, &self.root, &mut files);
        let netlink: BTreeMap<_, _> = self.netlink.vfs.lock().unwrap().clone().into_iter().collect();
        let mut out: String = files.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
        out += &format!("{netlink:?}\n");
        out
    }

    /// The journal files left in the runtime directory.
    pub(crate) fn journals(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.runtime) else { return Vec::new() };
        let mut names: Vec<String> = entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.retain(|n| n.ends_with(".state"));
        names.sort();
        names
    }

    /// Makes every journal look like its tandem died: the owner's start time no longer matches.
    pub(crate) fn orphan_journals(&self) {
        for name in self.journals() {
            let path = self.runtime.join(name);
            let text = std::fs::read_to_string(&path).unwrap();
            let text: String = text
                .lines()
                .map(|l| if l.starts_with("owner_start=") { "owner_start=1".to_string() } else { l.to_string() })
                .map(|l| l + "\n")
                .collect();
            std::fs::write(&path, text).unwrap();
        }
    }

    pub(crate) fn driver(&self, bdf: &str) -> Option<String> {
        self.kernel.driver_of(bdf)
    }

    pub(crate) fn read(&self, rel: &str) -> String {
        self.kernel.read(self.root.join(rel))
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
