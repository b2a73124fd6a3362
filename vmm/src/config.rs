//! `VmConfig`: the one description of a VM that the CLI, the library and the control
//! socket all build (as JSON: [`crate::config_document`]).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("memory size {0:?} is not a size: use a number with an optional K, M, G or T suffix, e.g. 512M or 5G")]
    BadSize(String),
    #[error("memory size 0: give the guest memory, e.g. --memory 512M")]
    ZeroMemory,
    #[error("0 vCPUs: a guest needs at least one, e.g. --cpus 1")]
    ZeroCpus,
    #[error("{cpus} vCPUs is more than Tandem supports ({max}); use --cpus {max} or fewer")]
    TooManyCpus { cpus: u32, max: u32 },
    #[error("--serial {0:?} is not understood: use stdio, off or file=PATH")]
    BadSerial(String),
    #[error("--{flag} {value:?}: {reason}; e.g. --{flag} {example}")]
    BadDevice { flag: &'static str, value: String, reason: String, example: &'static str },
    #[error("two devices have the id {0:?}: give each --net/--disk/--vf/--device its own id=")]
    DuplicateId(String),
    #[error("--vf {vf}: {reason}; e.g. --net tap=tap0,id=net0,standby=on --vf pf=eth0,index=0,failover=net0")]
    Failover { vf: String, reason: String },
    #[error("{0}")]
    Seccomp(String),
    #[error("the VM's JSON configuration: {0}; see `tandem --help` for what each key takes")]
    Document(String),
    #[error("--memory {value:?}: {reason}; e.g. --memory 2G or --memory size=2G,hugepages=on")]
    BadMemory { value: String, reason: String },
}

/// Where the guest's COM1 output goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// Output to stdout, input from stdin (raw mode when stdin is a terminal).
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// The UART exists but its output is discarded.
    Off,
}

impl std::str::FromStr for SerialConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "off" => Ok(Self::Off),
            _ => match s.strip_prefix("file=") {
                Some(path) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
                _ => Err(ConfigError::BadSerial(s.to_string())),
            },
        }
    }
}

/// A virtio-net NIC on a host tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub id: String,
    /// The tap's name; created (and removed on exit) when it does not exist.
    pub tap: String,
    /// The guest's MAC; a locally administered one is generated when absent.
    pub mac: Option<[u8; 6]>,
    /// Queue pairs (multiqueue when > 1).
    pub queues: u16,
    /// Offer VIRTIO_NET_F_STANDBY: the standby of a VF given `--vf ...,failover=<this id>`.
    pub standby: bool,
}

/// A virtio-blk disk on a raw image file or block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub id: String,
    pub path: PathBuf,
    pub readonly: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    pub direct: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Back guest RAM with reserved 2 MiB huge pages (hugetlbfs).
    pub hugepages: bool,
    pub serial: SerialConfig,
    pub nets: Vec<NetConfig>,
    pub disks: Vec<DiskConfig>,
    /// SR-IOV VFs to lease from their PF and pass through.
    pub vfs: Vec<crate::sriov::VfSpec>,
    /// Host PCI devices to pass through whole.
    pub devices: Vec<crate::sriov::DeviceSpec>,
    /// What each VMM thread may ask of the kernel (see [`crate::seccomp`]).
    pub seccomp: crate::seccomp::SeccompMode,
}

impl VmConfig {
    /// The kernel command line used when none is given: the console on COM1, and a
    /// panic that reboots at once so a dead guest ends the VMM instead of hanging.
    pub const DEFAULT_CMDLINE: &'static str = "console=ttyS0 panic=-1";
    /// The MP table and MADT describe APIC ids in one byte, 0xff being broadcast.
    pub const MAX_CPUS: u32 = 254;

    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initramfs: None,
            cmdline: Self::DEFAULT_CMDLINE.to_string(),
            cpus: 1,
            memory: 512 << 20,
            hugepages: false,
            serial: SerialConfig::default(),
            nets: Vec::new(),
            disks: Vec::new(),
            vfs: Vec::new(),
            devices: Vec::new(),
            seccomp: Default::default(),
        }
    }

    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 {
            return Err(ConfigError::ZeroCpus);
        }
        if self.cpus > Self::MAX_CPUS {
            return Err(ConfigError::TooManyCpus { cpus: self.cpus, max: Self::MAX_CPUS });
        }
        if self.memory == 0 {
            return Err(ConfigError::ZeroMemory);
        }
        let mut ids = std::collections::HashSet::new();
        let ids_in_order = self.nets.iter().map(|n| &n.id).chain(self.disks.iter().map(|d| &d.id));
        let ids_in_order = ids_in_order.chain(self.vfs.iter().map(|v| &v.id)).chain(self.devices.iter().map(|d| &d.id));
        for id in ids_in_order {
            if !ids.insert(id) {
                return Err(ConfigError::DuplicateId(id.clone()));
            }
        }
        self.validate_failover()
    }

    /// Each `failover=` names a `--net` with `standby=on` that no other VF claims, and a
    /// MAC given on both sides is the same one (the guest pairs them by MAC).
    fn validate_failover(&self) -> Result<(), ConfigError> {
        let mut paired = std::collections::HashSet::new();
        for vf in &self.vfs {
            let Some(net_id) = &vf.failover else { continue };
            let bad = |reason: String| ConfigError::Failover { vf: vf.id.clone(), reason };
            let Some(nic) = self.nets.iter().find(|n| &n.id == net_id) else {
                return Err(bad(format!("failover={net_id}: no --net has id={net_id}")));
            };
            if !nic.standby {
                return Err(bad(format!("failover={net_id}: give that NIC standby=on")));
            }
            if !paired.insert(net_id) {
                return Err(bad(format!("failover={net_id}: another VF is already paired with it")));
            }
            if let (Some(a), Some(b)) = (vf.mac, nic.mac) {
                if a != b {
                    return Err(bad(format!("its mac differs from {net_id}'s: a failover pair shares one MAC")));
                }
            }
        }
        Ok(())
    }

    /// Gives each failover pair one MAC: the NIC's, else the VF's, else a random one.
    /// Run after `validate`.
    pub fn resolve_failover_macs(&mut self, mut random: impl FnMut() -> [u8; 6]) {
        for vf in &mut self.vfs {
            let Some(net_id) = &vf.failover else { continue };
            let Some(nic) = self.nets.iter_mut().find(|n| &n.id == net_id) else { continue };
            let mac = nic.mac.or(vf.mac).unwrap_or_else(&mut random);
            nic.mac = Some(mac);
            vf.mac = Some(mac);
        }
    }
}

/// One `--net`/`--disk`/`--vf`/`--device` value being parsed, for errors that quote it with an example.
pub(crate) struct DeviceFlag<'a> {
    pub(crate) flag: &'static str,
    pub(crate) example: &'static str,
    pub(crate) value: &'a str,
}

impl<'a> DeviceFlag<'a> {
    pub(crate) fn error(&self, reason: String) -> ConfigError {
        ConfigError::BadDevice { flag: self.flag, value: self.value.to_string(), reason, example: self.example }
    }

    /// `key=value` pairs in order, e.g. `tap=tap0,mac=02:00:00:00:00:01`.
    pub(crate) fn pairs(&self) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
        let mut out: Vec<(&str, &str)> = Vec::new();
        for item in self.value.split(',') {
            let (k, v) = item.split_once('=').ok_or_else(|| self.error(format!("{item:?} is not key=value")))?;
            if out.iter().any(|(seen, _)| *seen == k) {
                return Err(self.error(format!("{k} is given twice")));
            }
            out.push((k, v));
        }
        Ok(out)
    }

    pub(crate) fn on_off(&self, key: &str, v: &str) -> Result<bool, ConfigError> {
        match v {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(self.error(format!("{key}={v:?} must be on or off"))),
        }
    }
}

pub(crate) fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl NetConfig {
    const EXAMPLE: &'static str = "tap=tap0,mac=02:00:00:00:00:01,id=net0,queues=1,standby=on";

    /// Parses `tap=NAME[,mac=MAC][,id=ID][,queues=N][,standby=on]`; `index` names it `netN` without id.
    pub fn parse(value: &str, index: usize) -> Result<Self, ConfigError> {
        let flag = DeviceFlag { flag: "net", example: Self::EXAMPLE, value };
        let bad = |reason: String| flag.error(reason);
        let mut net = NetConfig { id: format!("net{index}"), tap: String::new(), mac: None, queues: 1, standby: false };
        for (k, v) in flag.pairs()? {
            match k {
                "tap" => net.tap = v.to_string(),
                "mac" => {
                    net.mac = Some(
                        parse_mac(v).ok_or_else(|| bad(format!("mac={v:?} is not a MAC like 02:00:00:00:00:01")))?,
                    )
                }
                "id" if !v.is_empty() => net.id = v.to_string(),
                "queues" => {
                    net.queues = v
                        .parse()
                        .ok()
                        .filter(|q| (1..=16).contains(q))
                        .ok_or_else(|| bad(format!("queues={v:?} must be 1 to 16")))?
                }
                "standby" => net.standby = flag.on_off(k, v)?,
                _ => return Err(bad(format!("unknown key {k:?} (tap, mac, id, queues, standby)"))),
            }
        }
        if net.tap.is_empty() {
            return Err(bad("tap=NAME is required".into()));
        }
        Ok(net)
    }
}

impl DiskConfig {
    const EXAMPLE: &'static str = "path=disk.img,readonly=on,id=disk0";

    /// Parses `path=PATH[,readonly=on][,direct=on][,id=ID]`; `index` names it `diskN`.
    pub fn parse(value: &str, index: usize) -> Result<Self, ConfigError> {
        let flag = DeviceFlag { flag: "disk", example: Self::EXAMPLE, value };
        let bad = |reason: String| flag.error(reason);
        let mut disk = DiskConfig { id: format!("disk{index}"), path: PathBuf::new(), readonly: false, direct: false };
        for (k, v) in flag.pairs()? {
            match k {
                "path" => disk.path = PathBuf::from(v),
                "readonly" => disk.readonly = flag.on_off(k, v)?,
                "direct" => disk.direct = flag.on_off(k, v)?,
                "id" if !v.is_empty() => disk.id = v.to_string(),
                _ => return Err(bad(format!("unknown key {k:?} (path, readonly, direct, id)"))),
            }
        }
        if disk.path.as_os_str().is_empty() {
            return Err(bad("path=PATH is required".into()));
        }
        Ok(disk)
    }
}

/// Parses `--memory`: a size (`2G`), or `size=SIZE[,hugepages=on]`. Returns the bytes
/// and whether huge pages back them.
pub fn parse_memory(value: &str) -> Result<(u64, bool), ConfigError> {
    if !value.contains('=') {
        return Ok((parse_size(value)?, false));
    }
    let bad = |reason: String| ConfigError::BadMemory { value: value.to_string(), reason };
    let (mut size, mut huge) = (None, false);
    for item in value.split(',') {
        match item.split_once('=') {
            Some(("size", v)) => size = Some(parse_size(v).map_err(|e| bad(e.to_string()))?),
            Some(("hugepages", "on")) => huge = true,
            Some(("hugepages", "off")) => huge = false,
            Some(("hugepages", v)) => return Err(bad(format!("hugepages={v:?} must be on or off"))),
            _ => return Err(bad(format!("{item:?} is not size=SIZE or hugepages=on|off"))),
        }
    }
    let size = size.ok_or_else(|| bad("size=SIZE is required".into()))?;
    if huge && size % (2 << 20) != 0 {
        return Err(bad("with hugepages=on the size must be a multiple of 2 MiB".into()));
    }
    Ok((size, huge))
}

/// Parses `512M`, `5G`, `1048576`, `64k` (binary units) into bytes.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("5G"), Ok(5 << 30));
        assert_eq!(parse_size("5g"), Ok(5 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in ["", "M", "12Q", "-1G", "1.5G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn memory_flag() {
        assert_eq!(parse_memory("1G"), Ok((1 << 30, false)));
        assert_eq!(parse_memory("size=1G,hugepages=on"), Ok((1 << 30, true)));
        assert_eq!(parse_memory("hugepages=off,size=3M"), Ok((3 << 20, false)));
        for bad in ["size=3M,hugepages=on", "hugepages=on", "size=1G,hugepages=yes", "size=x", "sz=1G"] {
            let e = parse_memory(bad).unwrap_err().to_string();
            assert!(e.contains("--memory") && e.contains("e.g."), "{bad}: {e}");
        }
    }

    #[test]
    fn serial() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!("off".parse(), Ok(SerialConfig::Off));
        assert_eq!("file=/tmp/x".parse(), Ok(SerialConfig::File("/tmp/x".into())));
        assert!("file=".parse::<SerialConfig>().is_err());
        assert!("tty".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn net_flags() {
        let n = NetConfig::parse("tap=tap0,mac=02:aa:bb:cc:dd:ee,id=lan,queues=2,standby=on", 0).unwrap();
        assert_eq!(
            n,
            NetConfig {
                id: "lan".into(),
                tap: "tap0".into(),
                mac: Some([2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]),
                queues: 2,
                standby: true
            }
        );
        assert!(!NetConfig::parse("tap=t", 0).unwrap().standby);
        assert_eq!(NetConfig::parse("tap=t", 3).unwrap().id, "net3");
        for bad in [
            "",
            "tap",
            "mac=02:00:00:00:00:01",
            "tap=t,mac=zz",
            "tap=t,mac=02:00:00:00:00",
            "tap=t,queues=0",
            "tap=t,queues=99",
            "tap=t,color=red",
            "tap=a,tap=b",
        ] {
            let e = NetConfig::parse(bad, 0).unwrap_err().to_string();
            assert!(e.contains("--net") && e.contains("e.g."), "{bad}: {e}");
        }
    }

    #[test]
    fn disk_flags() {
        let d = DiskConfig::parse("path=/x.img,readonly=on,id=root", 0).unwrap();
        assert_eq!(d, DiskConfig { id: "root".into(), path: "/x.img".into(), readonly: true, direct: false });
        assert_eq!(DiskConfig::parse("path=/x,direct=on", 1).unwrap().id, "disk1");
        for bad in ["", "readonly=on", "path=/x,readonly=yes", "path=/x,size=1G"] {
            assert!(DiskConfig::parse(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn failover_pairs_are_checked_and_share_a_mac() {
        let vf = |v: &str| crate::sriov::VfSpec::parse(v, 0).unwrap();
        let mut c = VmConfig::new("/k");
        c.nets.push(NetConfig::parse("tap=t0,id=n0,standby=on", 0).unwrap());
        c.vfs.push(vf("pf=eth0,index=0,failover=n0"));
        assert_eq!(c.validate(), Ok(()));
        c.resolve_failover_macs(|| [2, 9, 9, 9, 9, 9]);
        assert_eq!((c.nets[0].mac, c.vfs[0].mac), (Some([2, 9, 9, 9, 9, 9]), Some([2, 9, 9, 9, 9, 9])));

        let refused = |nets: &[&str], vfs: &[&str], why: &str| {
            let mut c = VmConfig::new("/k");
            c.nets = nets.iter().enumerate().map(|(i, n)| NetConfig::parse(n, i).unwrap()).collect();
            c.vfs = vfs.iter().map(|v| vf(v)).collect();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("e.g."), "{nets:?} {vfs:?}: {e}");
        };
        refused(&["tap=t0,id=n0"], &["pf=eth0,index=0,failover=n0"], "standby=on");
        refused(&["tap=t0,id=n0,standby=on"], &["pf=eth0,index=0,failover=nx"], "no --net has id=nx");
        refused(
            &["tap=t0,id=n0,standby=on"],
            &["pf=eth0,index=0,failover=n0,id=a", "pf=eth0,index=1,failover=n0,id=b"],
            "already paired",
        );
        refused(
            &["tap=t0,id=n0,standby=on,mac=02:00:00:00:00:01"],
            &["pf=eth0,index=0,failover=n0,mac=02:00:00:00:00:02"],
            "shares one MAC",
        );
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let mut c = VmConfig::new("/k");
        c.nets.push(NetConfig::parse("tap=a,id=x", 0).unwrap());
        c.disks.push(DiskConfig::parse("path=/d,id=x", 0).unwrap());
        assert_eq!(c.validate(), Err(ConfigError::DuplicateId("x".into())));
    }

    #[test]
    fn validation() {
        let mut c = VmConfig::new("/k");
        assert_eq!(c.validate(), Ok(()));
        c.cpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::ZeroCpus));
        c.cpus = 255;
        assert!(matches!(c.validate(), Err(ConfigError::TooManyCpus { .. })));
        c.cpus = 2;
        c.memory = 0;
        assert_eq!(c.validate(), Err(ConfigError::ZeroMemory));
    }
}
