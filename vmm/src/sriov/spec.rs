//! `--vf` and `--device` values: which host device to lease and how to set it up, checked
//! before anything on the host is touched.

use std::path::PathBuf;

use crate::config::{parse_mac, ConfigError, DeviceFlag};

use super::sysfs::is_bdf;

/// A VF of an SR-IOV NIC, named by its PF's netdev and its VF index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfSpec {
    pub id: String,
    /// The PF's network interface, e.g. `eth0`.
    pub pf: String,
    /// The VF number on that PF (`virtfnN`).
    pub index: u32,
    /// The VF's MAC, set on the PF (the guest cannot change it unless trusted).
    pub mac: Option<[u8; 6]>,
    /// The port VLAN the PF tags the VF's traffic with; 0 clears it.
    pub vlan: Option<u16>,
    pub spoofchk: Option<bool>,
    pub trust: Option<bool>,
    /// Create the PF's VFs when it has none.
    pub create: bool,
    /// The id of the `--net ...,standby=on` NIC this VF is the primary of (failover).
    pub failover: Option<String>,
    /// `auto=on|off`: a failover VF leaves the guest when its PF loses its link and comes
    /// back with it. None means the default, on for a pair.
    pub auto: Option<bool>,
}

/// Any PCI device handed to the guest whole, named by its sysfs directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub id: String,
    /// As given, e.g. `/sys/bus/pci/devices/0000:01:00.1`.
    pub path: PathBuf,
    /// The device's PCI address, the last component of `path`.
    pub bdf: String,
}

/// Interface names the kernel accepts (IFNAMSIZ - 1 bytes, no `/` or whitespace), which also
/// keeps them from walking out of `/sys/class/net`.
fn is_ifname(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s != "."
        && s != ".."
        && !s.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control())
}

impl VfSpec {
    const EXAMPLE: &'static str =
        "pf=eth0,index=0,mac=02:00:00:00:00:01,vlan=100,spoofchk=on,trust=off,create=on,id=vf0";

    /// Parses `pf=IFNAME,index=N[,mac=MAC][,vlan=ID][,spoofchk=on|off][,trust=on|off][,create=on][,id=ID]`;
    /// `position` names it `vfN` without id.
    pub fn parse(value: &str, position: usize) -> Result<Self, ConfigError> {
        let flag = DeviceFlag { flag: "vf", example: Self::EXAMPLE, value };
        let bad = |reason: String| flag.error(reason);
        let mut vf = VfSpec {
            id: format!("vf{position}"),
            pf: String::new(),
            index: 0,
            mac: None,
            vlan: None,
            spoofchk: None,
            trust: None,
            create: false,
            failover: None,
            auto: None,
        };
        let mut have_index = false;
        for (k, v) in flag.pairs()? {
            match k {
                "pf" if is_ifname(v) => vf.pf = v.to_string(),
                "pf" => {
                    return Err(bad(format!(
                        "pf={v:?} is not a network interface name (1 to 15 characters, no / or :)"
                    )))
                }
                "index" => {
                    let n: u16 = v.parse().map_err(|_| bad(format!("index={v:?} must be a VF number, 0 to 65535")))?;
                    vf.index = n.into();
                    have_index = true;
                }
                "mac" => {
                    let mac =
                        parse_mac(v).ok_or_else(|| bad(format!("mac={v:?} is not a MAC like 02:00:00:00:00:01")))?;
                    // The PF drivers refuse these with a bare EINVAL; say why here instead.
                    if mac[0] & 1 != 0 || mac == [0; 6] {
                        return Err(bad(format!(
                            "mac={v} is a multicast or all-zero address; a VF needs a unicast one"
                        )));
                    }
                    vf.mac = Some(mac);
                }
                "vlan" => {
                    vf.vlan = Some(
                        v.parse()
                            .ok()
                            .filter(|id| *id <= 4094)
                            .ok_or_else(|| bad(format!("vlan={v:?} must be a VLAN id, 1 to 4094 (0 clears it)")))?,
                    )
                }
                "spoofchk" => vf.spoofchk = Some(flag.on_off(k, v)?),
                "trust" => vf.trust = Some(flag.on_off(k, v)?),
                "create" => vf.create = flag.on_off(k, v)?,
                "failover" if !v.is_empty() => vf.failover = Some(v.to_string()),
                "auto" => vf.auto = Some(flag.on_off(k, v)?),
                "id" if !v.is_empty() => vf.id = v.to_string(),
                _ => {
                    return Err(bad(format!(
                        "unknown key {k:?} (pf, index, mac, vlan, spoofchk, trust, create, failover, auto, id)"
                    )))
                }
            }
        }
        if vf.pf.is_empty() {
            return Err(bad("pf=IFNAME (the PF's network interface) is required".into()));
        }
        if !have_index {
            return Err(bad("index=N (which VF of the PF) is required".into()));
        }
        if vf.auto.is_some() && vf.failover.is_none() {
            return Err(bad("auto= follows the PF's link for a failover pair only: add failover=NET_ID".into()));
        }
        Ok(vf)
    }

    /// Whether this failover VF follows its PF's link.
    pub fn auto_failover(&self) -> bool {
        self.failover.is_some() && self.auto.unwrap_or(true)
    }

    /// Whether any PF-side setting is asked for; without one, netlink is not needed at all.
    pub fn wants_netlink(&self) -> bool {
        self.mac.is_some() || self.vlan.is_some() || self.spoofchk.is_some() || self.trust.is_some()
    }
}

impl DeviceSpec {
    const EXAMPLE: &'static str = "path=/sys/bus/pci/devices/0000:01:00.1,id=dev0";

    /// Parses `path=/sys/bus/pci/devices/BDF[,id=ID]`; `position` names it `devN` without id.
    pub fn parse(value: &str, position: usize) -> Result<Self, ConfigError> {
        let flag = DeviceFlag { flag: "device", example: Self::EXAMPLE, value };
        let bad = |reason: String| flag.error(reason);
        let mut dev = DeviceSpec { id: format!("dev{position}"), path: PathBuf::new(), bdf: String::new() };
        for (k, v) in flag.pairs()? {
            match k {
                "path" => dev.path = PathBuf::from(v),
                "id" if !v.is_empty() => dev.id = v.to_string(),
                _ => return Err(bad(format!("unknown key {k:?} (path, id)"))),
            }
        }
        if dev.path.as_os_str().is_empty() {
            return Err(bad("path=/sys/bus/pci/devices/BDF is required".into()));
        }
        let bdf = dev.path.file_name().and_then(|n| n.to_str()).filter(|n| is_bdf(n));
        match bdf {
            Some(bdf) if dev.path.starts_with("/sys") => dev.bdf = bdf.to_string(),
            _ => {
                return Err(bad(format!(
                    "path={} is not a PCI device's sysfs directory (/sys/bus/pci/devices/DDDD:BB:DD.F)",
                    dev.path.display()
                )))
            }
        }
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vf_flags() {
        let vf = VfSpec::parse(
            "pf=eth0,index=3,mac=02:aa:bb:cc:dd:ee,vlan=100,spoofchk=off,trust=on,create=on,id=x,failover=n0",
            0,
        )
        .unwrap();
        assert_eq!(
            vf,
            VfSpec {
                id: "x".into(),
                pf: "eth0".into(),
                index: 3,
                mac: Some([2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]),
                vlan: Some(100),
                spoofchk: Some(false),
                trust: Some(true),
                create: true,
                failover: Some("n0".into()),
                auto: None,
            }
        );
        assert!(vf.wants_netlink());
        assert!(vf.auto_failover(), "a pair follows its PF's link by default");
        assert!(!VfSpec::parse("pf=eth0,index=0,failover=n0,auto=off", 0).unwrap().auto_failover());
        assert!(!VfSpec::parse("pf=eth0,index=0", 0).unwrap().auto_failover());
        let e = VfSpec::parse("pf=eth0,index=0,auto=on", 0).unwrap_err().to_string();
        assert!(e.contains("failover pair only"), "{e}");
        let plain = VfSpec::parse("pf=enp1s0f0,index=0", 2).unwrap();
        assert_eq!((plain.id.as_str(), plain.create, plain.wants_netlink()), ("vf2", false, false));
        assert_eq!(VfSpec::parse("pf=e,index=0,vlan=0", 0).unwrap().vlan, Some(0));
    }

    #[test]
    fn bad_vf_flags() {
        for (bad, why) in [
            ("", "not key=value"),
            ("index=0", "pf=IFNAME"),
            ("pf=eth0", "index=N"),
            ("pf=eth0,index=-1", "VF number"),
            ("pf=eth0,index=65536", "VF number"),
            ("pf=../../etc,index=0", "interface name"),
            ("pf=eth0:1,index=0", "interface name"),
            ("pf=averyveryverylongname,index=0", "interface name"),
            ("pf=eth0,index=0,mac=01:00:5e:00:00:01", "unicast"),
            ("pf=eth0,index=0,mac=00:00:00:00:00:00", "unicast"),
            ("pf=eth0,index=0,mac=02:00", "not a MAC"),
            ("pf=eth0,index=0,vlan=4095", "VLAN id"),
            ("pf=eth0,index=0,spoofchk=yes", "on or off"),
            ("pf=eth0,index=0,create=1", "on or off"),
            ("pf=eth0,index=0,speed=10", "unknown key"),
            ("pf=eth0,index=0,index=1", "twice"),
        ] {
            let e = VfSpec::parse(bad, 0).unwrap_err().to_string();
            assert!(e.starts_with("--vf ") && e.contains(why) && e.contains("e.g. --vf pf="), "{bad}: {e}");
        }
    }

    #[test]
    fn device_flags() {
        let d = DeviceSpec::parse("path=/sys/bus/pci/devices/0000:01:00.1,id=nic", 0).unwrap();
        assert_eq!((d.id.as_str(), d.bdf.as_str()), ("nic", "0000:01:00.1"));
        assert_eq!(DeviceSpec::parse("path=/sys/bus/pci/devices/0000:01:00.1/", 4).unwrap().id, "dev4");
        for bad in [
            "",
            "id=x",
            "path=0000:01:00.1",
            "path=/tmp/0000:01:00.1",
            "path=/sys/bus/pci/devices/eth0",
            "path=/sys/bus/pci/devices/0000:01:00.9",
            "path=/sys/bus/pci/devices/0000:01:00.1,rom=off",
        ] {
            let e = DeviceSpec::parse(bad, 0).unwrap_err().to_string();
            assert!(e.starts_with("--device ") && e.contains("e.g."), "{bad}: {e}");
        }
    }
}
