//! [`VmConfig`] as a JSON document with the command line's shape: one key per flag, each
//! device the string its flag takes. The CLI, a config file (`--config`) and the control
//! socket (`GET /api/v1/config`, `device-add`) go through the same parsers and checks.
//!
//! ```json
//! { "kernel": "/boot/vmlinuz", "initramfs": "initrd.gz", "cpus": 2, "memory": "1G",
//!   "net": ["tap=tap0,id=net0,standby=on"], "vf": ["pf=eth0,index=0,failover=net0"] }
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{parse_memory, ConfigError, DiskConfig, NetConfig, SerialConfig, VmConfig};
use crate::sriov::{DeviceSpec, VfSpec};
use devices::virtio::net::format_mac;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigDocument {
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "one")]
    pub cpus: u32,
    /// As `--memory`: `512M`, or `size=2G,hugepages=on`.
    #[serde(default = "default_memory")]
    pub memory: String,
    /// As `--serial`: `stdio`, `off` or `file=PATH`.
    #[serde(default = "stdio")]
    pub serial: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vf: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device: Vec<String>,
    /// As `--seccomp`: `on`, `log` or `off`.
    #[serde(default = "on_str")]
    pub seccomp: String,
}

fn default_cmdline() -> String {
    VmConfig::DEFAULT_CMDLINE.to_string()
}
fn one() -> u32 {
    1
}
fn default_memory() -> String {
    "512M".to_string()
}
fn stdio() -> String {
    "stdio".to_string()
}
fn on_str() -> String {
    "on".to_string()
}

impl ConfigDocument {
    /// A document with only the kernel set; everything else at the CLI's defaults.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initramfs: None,
            cmdline: default_cmdline(),
            cpus: 1,
            memory: default_memory(),
            serial: stdio(),
            net: Vec::new(),
            disk: Vec::new(),
            vf: Vec::new(),
            device: Vec::new(),
            seccomp: on_str(),
        }
    }

    /// Parses a JSON document; the error says where it went wrong.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|e| ConfigError::Document(e.to_string()))
    }

    pub fn to_json(&self) -> String {
        // A struct of strings and numbers always serializes.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

impl TryFrom<ConfigDocument> for VmConfig {
    type Error = ConfigError;

    /// The flags' parsers, in order (a device without id= is named by its position),
    /// then [`VmConfig::validate`].
    fn try_from(doc: ConfigDocument) -> Result<Self, ConfigError> {
        fn each<T>(
            values: &[String],
            parse: impl Fn(&str, usize) -> Result<T, ConfigError>,
        ) -> Result<Vec<T>, ConfigError> {
            values.iter().enumerate().map(|(i, v)| parse(v, i)).collect()
        }
        let (memory, hugepages) = parse_memory(&doc.memory)?;
        let config = VmConfig {
            kernel: doc.kernel,
            initramfs: doc.initramfs,
            cmdline: doc.cmdline,
            cpus: doc.cpus,
            memory,
            hugepages,
            serial: doc.serial.parse()?,
            nets: each(&doc.net, NetConfig::parse)?,
            disks: each(&doc.disk, DiskConfig::parse)?,
            vfs: each(&doc.vf, VfSpec::parse)?,
            devices: each(&doc.device, DeviceSpec::parse)?,
            seccomp: doc
                .seccomp
                .parse()
                .map_err(|e: crate::seccomp::SeccompError| ConfigError::Seccomp(e.to_string()))?,
        };
        config.validate()?;
        Ok(config)
    }
}

impl From<&VmConfig> for ConfigDocument {
    fn from(c: &VmConfig) -> Self {
        let memory = if c.hugepages { format!("size={},hugepages=on", c.memory) } else { c.memory.to_string() };
        Self {
            kernel: c.kernel.clone(),
            initramfs: c.initramfs.clone(),
            cmdline: c.cmdline.clone(),
            cpus: c.cpus,
            memory,
            serial: match &c.serial {
                SerialConfig::Stdio => "stdio".into(),
                SerialConfig::Off => "off".into(),
                SerialConfig::File(p) => format!("file={}", p.display()),
            },
            net: c.nets.iter().map(net_spec).collect(),
            disk: c.disks.iter().map(disk_spec).collect(),
            vf: c.vfs.iter().map(vf_spec).collect(),
            device: c.devices.iter().map(|d| format!("path={},id={}", d.path.display(), d.id)).collect(),
            seccomp: c.seccomp.to_string(),
        }
    }
}

impl Serialize for VmConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ConfigDocument::from(self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for VmConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        VmConfig::try_from(ConfigDocument::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

fn on(key: &str, value: bool) -> String {
    format!(",{key}={}", if value { "on" } else { "off" })
}

fn net_spec(n: &NetConfig) -> String {
    let mut s = format!("tap={},id={},queues={}", n.tap, n.id, n.queues);
    if let Some(mac) = &n.mac {
        s += &format!(",mac={}", format_mac(mac));
    }
    if n.standby {
        s += &on("standby", true);
    }
    s
}

fn disk_spec(d: &DiskConfig) -> String {
    let mut s = format!("path={},id={}", d.path.display(), d.id);
    if d.readonly {
        s += &on("readonly", true);
    }
    if d.direct {
        s += &on("direct", true);
    }
    s
}

fn vf_spec(v: &VfSpec) -> String {
    let mut s = format!("pf={},index={},id={}", v.pf, v.index, v.id);
    if let Some(mac) = &v.mac {
        s += &format!(",mac={}", format_mac(mac));
    }
    if let Some(vlan) = v.vlan {
        s += &format!(",vlan={vlan}");
    }
    if let Some(x) = v.spoofchk {
        s += &on("spoofchk", x);
    }
    if let Some(x) = v.trust {
        s += &on("trust", x);
    }
    if v.create {
        s += &on("create", true);
    }
    if let Some(net) = &v.failover {
        s += &format!(",failover={net}");
    }
    if let Some(x) = v.auto {
        s += &on("auto", x);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> ConfigDocument {
        ConfigDocument {
            kernel: "/boot/vmlinuz".into(),
            initramfs: Some("initrd.gz".into()),
            cmdline: "console=ttyS0 quiet".into(),
            cpus: 2,
            memory: "size=2G,hugepages=on".into(),
            serial: "file=/tmp/guest.log".into(),
            net: vec!["tap=tap0,id=net0,mac=02:00:00:00:00:01,standby=on".into(), "tap=tap1".into()],
            disk: vec!["path=disk.img,readonly=on".into()],
            vf: vec!["pf=eth0,index=3,vlan=100,spoofchk=off,trust=on,failover=net0,auto=off".into()],
            device: vec!["path=/sys/bus/pci/devices/0000:01:00.1".into()],
            seccomp: "log".into(),
        }
    }

    #[test]
    fn a_config_survives_the_trip_through_json_and_back() {
        let config = VmConfig::try_from(full()).unwrap();
        let json = serde_json::to_string(&config).unwrap();
        let back: VmConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
        assert_eq!(back.nets[1].id, "net1", "unnamed devices are named by position, as on the command line");
        assert_eq!(back.memory, 2 << 30);
        assert!(back.hugepages);
    }

    #[test]
    fn only_the_kernel_is_required_and_the_rest_takes_the_cli_defaults() {
        let config: VmConfig = serde_json::from_str(r#"{"kernel": "/boot/vmlinuz"}"#).unwrap();
        assert_eq!(config, VmConfig::new("/boot/vmlinuz"));
    }

    #[test]
    fn a_bad_document_is_refused_saying_what_is_wrong() {
        let unknown = ConfigDocument::from_json(r#"{"kernel": "k", "cpu": 2}"#).unwrap_err().to_string();
        assert!(unknown.contains("unknown field `cpu`") && unknown.contains("cpus"), "{unknown}");
        let missing = ConfigDocument::from_json(r#"{"cpus": 2}"#).unwrap_err().to_string();
        assert!(missing.contains("missing field `kernel`"), "{missing}");
        let bad_net = VmConfig::try_from(ConfigDocument { net: vec!["tap=".into()], ..ConfigDocument::new("k") });
        assert!(bad_net.unwrap_err().to_string().contains("--net"));
        let zero = VmConfig::try_from(ConfigDocument { cpus: 0, ..ConfigDocument::new("k") });
        assert_eq!(zero.unwrap_err(), ConfigError::ZeroCpus);
        let dup = ConfigDocument {
            net: vec!["tap=a,id=x".into()],
            disk: vec!["path=d,id=x".into()],
            ..ConfigDocument::new("k")
        };
        assert_eq!(VmConfig::try_from(dup).unwrap_err(), ConfigError::DuplicateId("x".into()));
    }
}
