//! The host bridge's forwarding entry for a failover guest's MAC.
//!
//! When failover moves a guest's traffic between its VF and its virtio-net standby, a Linux
//! bridge that the standby's tap is a port of still forwards the guest's MAC to wherever it
//! last saw it, until the guest happens to send a frame the new way; traffic towards the
//! guest is lost meanwhile. Pointing the entry at the right port moves it at once. The entry
//! stays *dynamic*: the bridge re-learns it wherever the guest's frames really show up, and it
//! ages out when nothing refreshes it, so a stale pointer cannot outlive its usefulness.
//!
//! Only Linux bridges: an Open vSwitch port has a `master` (ovs-system) but no `brport`, and
//! its forwarding table is not the kernel bridge's.

use std::path::Path;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::neighbour::{NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::netlink::{exchange, NetlinkError, RtNetlink};

#[derive(Debug, thiserror::Error)]
pub enum FdbError {
    #[error("{what} {mac} on {port} (a port of bridge {bridge}) failed: {source}{}", advice(source, port, bridge))]
    Refused {
        what: &'static str,
        mac: String,
        port: String,
        bridge: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// What the kernel's refusals of an FDB change mean for whoever has to fix them.
fn advice(e: &std::io::Error, port: &str, bridge: &str) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "; this needs CAP_NET_ADMIN (run tandem as root); as root it means {port} cannot learn addresses: \
             it is down or blocked by STP (see `bridge link show dev {port}`)"
        ),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
            format!("; check that {port} is still a port of {bridge} (`bridge link show dev {port}`)")
        }
        Some(libc::ENODEV) => format!("; {port} or {bridge} has gone away"),
        _ => String::new(),
    }
}

/// A network interface that is a port of a Linux bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgePort {
    pub ifname: String,
    pub ifindex: u32,
    pub bridge: String,
    pub bridge_ifindex: u32,
}

/// The bridge `ifname` is a port of, from sysfs under `sysfs_root` (`/` on a host); None when
/// it is not a bridge port, or does not exist.
pub fn bridge_port(sysfs_root: &Path, ifname: &str) -> Option<BridgePort> {
    if ifname.is_empty() || ifname.contains('/') || ifname == "." || ifname == ".." {
        return None;
    }
    let net = sysfs_root.join("sys/class/net");
    let dir = net.join(ifname);
    if !dir.join("brport").is_dir() {
        return None;
    }
    let master = std::fs::read_link(dir.join("master")).ok()?;
    let bridge = master.file_name()?.to_str()?.to_string();
    let ifindex = read_ifindex(&dir)?;
    let bridge_ifindex = read_ifindex(&net.join(&bridge))?;
    Some(BridgePort { ifname: ifname.to_string(), ifindex, bridge, bridge_ifindex })
}

fn read_ifindex(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("ifindex")).ok()?.trim().parse().ok()
}

/// A bridge's forwarding database: rtnetlink on a host, a fake in tests.
pub trait Fdb: Send + Sync {
    /// Makes the bridge forward `mac` to `port` now, as `bridge fdb replace MAC dev PORT master
    /// sticky` does, wherever it had learned it before: the entry ages like a learned one, but
    /// a stray frame from the other path (a guest's last frames on the standby while its VF
    /// comes up) cannot move it.
    fn point(&self, port: &BridgePort, mac: [u8; 6]) -> Result<(), FdbError>;
    /// Drops the bridge's entry for `mac` on `port`, so that it learns afresh; Ok when there is
    /// none (it aged out, or moved to another port).
    fn forget(&self, port: &BridgePort, mac: [u8; 6]) -> Result<(), FdbError>;
}

/// `ndmsg` for the entry of `mac` on `port` in the bridge above it (NTF_MASTER, and `flags`).
/// No VLAN: on a VLAN-filtering bridge the kernel then applies the change to every VLAN of the
/// port.
fn entry(port: &BridgePort, mac: [u8; 6], state: NeighbourState, flags: NeighbourFlags) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = port.ifindex;
    msg.header.flags = NeighbourFlags::Controller | flags;
    msg.header.state = state;
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    msg
}

fn refused(what: &'static str, port: &BridgePort, mac: [u8; 6]) -> impl FnOnce(std::io::Error) -> FdbError {
    let (port, bridge) = (port.ifname.clone(), port.bridge.clone());
    move |source| FdbError::Refused { what, mac: mac_text(mac), port, bridge, source }
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl Fdb for RtNetlink {
    fn point(&self, port: &BridgePort, mac: [u8; 6]) -> Result<(), FdbError> {
        // NUD_REACHABLE, neither NUD_PERMANENT (local) nor NUD_NOARP (static): an entry the
        // bridge refreshes and ages like one it learned; NTF_STICKY: it does not move.
        let msg =
            RouteNetlinkMessage::NewNeighbour(entry(port, mac, NeighbourState::Reachable, NeighbourFlags::Sticky));
        let what = "pointing the bridge's forwarding entry for";
        exchange(msg, NLM_F_CREATE | NLM_F_REPLACE, refused(what, port, mac)).map(drop)
    }

    fn forget(&self, port: &BridgePort, mac: [u8; 6]) -> Result<(), FdbError> {
        let msg = RouteNetlinkMessage::DelNeighbour(entry(port, mac, NeighbourState::None, NeighbourFlags::empty()));
        match exchange(msg, 0, refused("removing the bridge's forwarding entry for", port, mac)) {
            Err(FdbError::Refused { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other.map(drop),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use netlink_packet_core::NLM_F_DUMP;

    use super::super::netlink::testns;
    use super::*;

    /// A fake sysfs of network interfaces, for what reads bridge ports.
    pub(crate) struct TempTree(pub(crate) PathBuf);

    impl TempTree {
        pub(crate) fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("tandem-bridge-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("sys/class/net")).unwrap();
            Self(dir)
        }

        /// An interface like the kernel shows it: a directory with an ifindex, and for a bridge
        /// port a `brport` directory and a `master` link to `../BRIDGE`.
        pub(crate) fn add(&self, name: &str, ifindex: u32, master: Option<&str>, brport: bool) {
            let dir = self.0.join("sys/class/net").join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("ifindex"), format!("{ifindex}\n")).unwrap();
            if let Some(master) = master {
                std::os::unix::fs::symlink(format!("../{master}"), dir.join("master")).unwrap();
            }
            if brport {
                std::fs::create_dir(dir.join("brport")).unwrap();
            }
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn bridge_ports_are_found_in_sysfs() {
        let t = TempTree::new("sysfs");
        t.add("br0", 4, None, false);
        t.add("tap0", 7, Some("br0"), true);
        t.add("eth0", 2, None, false);
        t.add("bond0", 5, None, false);
        t.add("eth1", 3, Some("bond0"), false);
        t.add("vnet0", 8, Some("ovs-system"), false);
        t.add("tap1", 9, Some("br9"), true);

        let port = BridgePort { ifname: "tap0".into(), ifindex: 7, bridge: "br0".into(), bridge_ifindex: 4 };
        assert_eq!(bridge_port(&t.0, "tap0"), Some(port));
        assert_eq!(bridge_port(&t.0, "br0"), None, "a bridge is not its own port");
        assert_eq!(bridge_port(&t.0, "eth0"), None, "no master");
        assert_eq!(bridge_port(&t.0, "eth1"), None, "a bond member is not a bridge port");
        assert_eq!(bridge_port(&t.0, "vnet0"), None, "an Open vSwitch port is not a Linux bridge port");
        assert_eq!(bridge_port(&t.0, "tap1"), None, "its bridge has no ifindex to read");
        assert_eq!(bridge_port(&t.0, "nope"), None);
        assert_eq!(bridge_port(&t.0, "../net/tap0"), None);
        assert_eq!(bridge_port(&t.0, ""), None);
    }

    #[test]
    fn errors_name_the_entry_and_what_to_do() {
        let port = BridgePort { ifname: "tap0".into(), ifindex: 7, bridge: "br0".into(), bridge_ifindex: 4 };
        let e = |errno| {
            refused("pointing the bridge's forwarding entry for", &port, [2, 0, 0, 0, 0, 0xab])(
                std::io::Error::from_raw_os_error(errno),
            )
        };
        let text = e(libc::EPERM).to_string();
        assert!(
            text.starts_with(
                "pointing the bridge's forwarding entry for 02:00:00:00:00:ab on tap0 (a port of bridge br0) failed"
            ),
            "{text}"
        );
        assert!(text.contains("CAP_NET_ADMIN") && text.contains("bridge link show dev tap0"), "{text}");
        assert!(e(libc::EINVAL).to_string().contains("still a port of br0"));
    }

    /// Every entry for `mac` in the namespace's bridges; one per VLAN of its port, if any.
    fn entries(mac: [u8; 6]) -> Result<Vec<NeighbourMessage>, NetlinkError> {
        let mut dump = NeighbourMessage::default();
        dump.header.family = AddressFamily::Bridge;
        let replies = exchange(RouteNetlinkMessage::GetNeighbour(dump), NLM_F_DUMP, |source| NetlinkError::Io {
            what: "dumping the FDB",
            source,
        })?;
        let has_mac = |m: &NeighbourMessage| m.attributes.contains(&NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        Ok(replies
            .into_iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewNeighbour(m) if has_mac(&m) => Some(m),
                _ => None,
            })
            .collect())
    }

    /// The real kernel bridge, in a private network namespace: sysfs finds the ports, `point`
    /// makes a dynamic entry and moves it between ports, `forget` removes it and tolerates
    /// its absence, and a refusal comes back as an error that names the port.
    #[test]
    fn rtnetlink_points_and_forgets_in_a_private_namespace() {
        testns::run(|| {
            testns::private_sysfs().map_err(|e| format!("mounting a private sysfs: {e}"))?;
            let br = testns::add_bridge("tbr0")?;
            let (p0, peer0) = testns::add_veth("tp0", "tp0peer")?;
            let (p1, peer1) = testns::add_veth("tp1", "tp1peer")?;
            for (port, peer) in [(p0, peer0), (p1, peer1)] {
                testns::set_master(port, br)?;
                testns::set_up(peer, true)?;
                testns::set_up(port, true)?;
            }
            testns::set_up(br, true)?;

            let root = Path::new("/");
            let port0 = bridge_port(root, "tp0").ok_or("sysfs does not show tp0 as a port of tbr0")?;
            let want = BridgePort { ifname: "tp0".into(), ifindex: p0, bridge: "tbr0".into(), bridge_ifindex: br };
            assert_eq!(port0, want);
            let port1 = bridge_port(root, "tp1").ok_or("sysfs does not show tp1 as a port of tbr0")?;
            assert_eq!(bridge_port(root, "tbr0"), None);
            assert_eq!(bridge_port(root, "tp0peer"), None);

            let nl = RtNetlink;
            let mac = [2, 0x54, 0, 0x12, 0x34, 0x56];
            // EPERM until a port has carrier and the bridge has made it forwarding, which
            // each port reaches in its own time: tp1 first, then the entry moves to tp0.
            let point_when_forwarding = |port: &BridgePort| {
                testns::wait_for(Duration::from_secs(5), || match nl.point(port, mac) {
                    Err(FdbError::Refused { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => Ok(None),
                    other => other.map(Some).map_err(Into::into),
                })
            };
            point_when_forwarding(&port1)?;
            point_when_forwarding(&port0)?;
            let got = entries(mac)?;
            assert!(!got.is_empty());
            for m in &got {
                assert_eq!(m.header.ifindex, p0, "{got:?}");
                assert_eq!(m.header.state, NeighbourState::Reachable, "dynamic: not permanent, not static (noarp)");
                assert!(m.header.flags.contains(NeighbourFlags::Sticky), "learning must not move it: {got:?}");
                assert!(m.attributes.contains(&NeighbourAttribute::Controller(br)), "{got:?}");
            }
            let ports = |got: Vec<NeighbourMessage>| got.iter().map(|m| m.header.ifindex).collect::<Vec<_>>();

            nl.point(&port0, mac)?;
            nl.point(&port1, mac)?;
            let moved = ports(entries(mac)?);
            assert!(!moved.is_empty() && moved.iter().all(|&p| p == p1), "moved, not copied: {moved:?}");

            nl.forget(&port0, mac)?;
            assert_eq!(ports(entries(mac)?), moved, "forgetting on the other port leaves it be");
            nl.forget(&port1, mac)?;
            assert!(entries(mac)?.is_empty());
            nl.forget(&port1, mac)?;

            let not_a_port =
                BridgePort { ifname: "tp0peer".into(), ifindex: peer0, bridge: "tbr0".into(), bridge_ifindex: br };
            let e = nl.point(&not_a_port, mac).err().ok_or("an entry on a non-port was accepted")?;
            assert!(e.to_string().contains("tp0peer (a port of bridge tbr0) failed"), "{e}");
            Ok(())
        });
    }
}
