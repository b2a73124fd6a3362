//! A VF's PF-side settings (MAC, port VLAN, spoof checking, trust), read and set over
//! rtnetlink on the PF, one attribute per request.
//!
//! One attribute per request because the kernel applies a VF list in a fixed order and stops
//! at the first failure without undoing the rest: alone, each error names exactly one setting
//! and the journal knows exactly which ones were changed.

use std::io;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use netlink_packet_route::link::{
    LinkAttribute, LinkExtentMask, LinkMessage, LinkVfInfo, VfInfo, VfInfoMac, VfInfoSpoofCheck, VfInfoTrust,
    VfInfoVlan,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink route socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{what} of VF {vf} failed: {source}{}", advice(source))]
    Refused {
        what: &'static str,
        vf: u32,
        #[source]
        source: io::Error,
    },
    #[error(
        "the PF reports no settings for VF {vf}: its driver cannot report VF settings, or the VF does not exist; \
         leave mac/vlan/spoofchk/trust out of --vf"
    )]
    NoVfInfo { vf: u32 },
    #[error("unreadable netlink reply: {0}")]
    BadReply(String),
}

/// What the common errnos of `ndo_set_vf_*` mean for whoever has to fix them.
fn advice(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => "; the PF driver cannot set this, so leave it out of --vf",
        Some(libc::EPERM) | Some(libc::EACCES) => "; this needs CAP_NET_ADMIN: run tandem as root",
        Some(libc::EINVAL) => "; the PF driver refused the value (check it, and that the VF exists)",
        Some(libc::ENODEV) => "; the PF has gone away",
        Some(libc::EBUSY) | Some(libc::EAGAIN) => "; the PF is busy (resetting?): try again",
        _ => "",
    }
}

/// A VF's settings as the PF reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VfConfig {
    pub mac: [u8; 6],
    /// Port VLAN; 0 is none.
    pub vlan: u16,
    pub qos: u32,
    pub spoofchk: bool,
    pub trust: bool,
}

/// One setting of a [`VfConfig`], the unit of change and of undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VfAttr {
    Mac,
    /// VLAN and QoS travel together.
    Vlan,
    SpoofChk,
    Trust,
}

impl VfAttr {
    /// Every setting, in the order they are set (and undone in reverse).
    pub const ALL: [Self; 4] = [Self::Mac, Self::Vlan, Self::SpoofChk, Self::Trust];

    pub fn name(self) -> &'static str {
        match self {
            Self::Mac => "mac",
            Self::Vlan => "vlan",
            Self::SpoofChk => "spoofchk",
            Self::Trust => "trust",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Sets this attribute of VF `vf` to its value in `to`.
    pub fn apply(self, nl: &dyn VfNetlink, pf_ifindex: u32, vf: u32, to: &VfConfig) -> Result<(), NetlinkError> {
        match self {
            Self::Mac => nl.set_mac(pf_ifindex, vf, to.mac),
            Self::Vlan => nl.set_vlan(pf_ifindex, vf, to.vlan, to.qos),
            Self::SpoofChk => nl.set_spoofchk(pf_ifindex, vf, to.spoofchk),
            Self::Trust => nl.set_trust(pf_ifindex, vf, to.trust),
        }
    }

    pub fn differs(self, a: &VfConfig, b: &VfConfig) -> bool {
        match self {
            Self::Mac => a.mac != b.mac,
            Self::Vlan => (a.vlan, a.qos) != (b.vlan, b.qos),
            Self::SpoofChk => a.spoofchk != b.spoofchk,
            Self::Trust => a.trust != b.trust,
        }
    }
}

/// The PF-side VF settings: rtnetlink on a host, a map in tests.
pub trait VfNetlink: Send + Sync {
    fn vf_config(&self, pf_ifindex: u32, vf: u32) -> Result<VfConfig, NetlinkError>;
    fn set_mac(&self, pf_ifindex: u32, vf: u32, mac: [u8; 6]) -> Result<(), NetlinkError>;
    /// Tags the VF's traffic with `vlan` (0 removes the tag) and priority `qos`.
    fn set_vlan(&self, pf_ifindex: u32, vf: u32, vlan: u16, qos: u32) -> Result<(), NetlinkError>;
    fn set_spoofchk(&self, pf_ifindex: u32, vf: u32, on: bool) -> Result<(), NetlinkError>;
    fn set_trust(&self, pf_ifindex: u32, vf: u32, on: bool) -> Result<(), NetlinkError>;
}

/// rtnetlink through a blocking socket, a fresh one per request: requests are rare, and a
/// private socket can never read another request's reply.
#[derive(Debug, Default)]
pub struct RtNetlink;

impl RtNetlink {
    /// Sends one request and collects its replies up to the kernel's ACK.
    fn request(
        &self,
        what: &'static str,
        vf: u32,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let io_err = |what: &'static str| move |source| NetlinkError::Io { what, source };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(NetlinkError::Socket)?;

        const SEQ: u32 = 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        header.sequence_number = SEQ;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        request.finalize();
        let mut buf = vec![0u8; request.buffer_len()];
        request.serialize(&mut buf);
        socket.send(&buf, 0).map_err(io_err("send"))?;

        let mut replies = Vec::new();
        loop {
            let (data, _) = socket.recv_from_full().map_err(io_err("receive"))?;
            if data.is_empty() {
                return Err(NetlinkError::BadReply("the kernel closed the socket without an answer".into()));
            }
            let mut off = 0;
            while off < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..])
                    .map_err(|e| NetlinkError::BadReply(e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(NetlinkError::BadReply("a message of length 0".into()));
                }
                off += len;
                if reply.header.sequence_number != SEQ {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(replies),
                    NetlinkPayload::Error(e) => return Err(NetlinkError::Refused { what, vf, source: e.to_io() }),
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    _ => {}
                }
            }
        }
    }

    fn set(&self, what: &'static str, pf_ifindex: u32, vf: u32, info: VfInfo) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.index = pf_ifindex;
        link.attributes.push(LinkAttribute::VfInfoList(vec![LinkVfInfo(vec![info])]));
        self.request(what, vf, RouteNetlinkMessage::SetLink(link)).map(drop)
    }
}

/// Picks VF `vf`'s entry out of a PF's `IFLA_VFINFO_LIST`.
fn find_vf(replies: &[RouteNetlinkMessage], vf: u32) -> Result<VfConfig, NetlinkError> {
    let entries = replies.iter().flat_map(|m| match m {
        RouteNetlinkMessage::NewLink(link) => link.attributes.as_slice(),
        _ => &[],
    });
    let lists = entries.filter_map(|a| match a {
        LinkAttribute::VfInfoList(list) => Some(list),
        _ => None,
    });
    let entry = lists
        .flatten()
        .find(|LinkVfInfo(infos)| infos.iter().any(|i| matches!(i, VfInfo::Mac(m) if m.vf_id == vf)))
        .ok_or(NetlinkError::NoVfInfo { vf })?;
    let mut config = VfConfig::default();
    for info in &entry.0 {
        match info {
            VfInfo::Mac(m) => config.mac.copy_from_slice(&m.mac[..6]),
            VfInfo::Vlan(v) => {
                config.vlan = u16::try_from(v.vlan_id)
                    .map_err(|_| NetlinkError::BadReply(format!("VF {vf} has VLAN {}", v.vlan_id)))?;
                config.qos = v.qos;
            }
            VfInfo::SpoofCheck(s) => config.spoofchk = s.enabled,
            VfInfo::Trust(t) => config.trust = t.enabled,
            _ => {}
        }
    }
    Ok(config)
}

impl VfNetlink for RtNetlink {
    fn vf_config(&self, pf_ifindex: u32, vf: u32) -> Result<VfConfig, NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.index = pf_ifindex;
        // The VF list comes only on request (RTEXT_FILTER_VF).
        link.attributes.push(LinkAttribute::ExtMask(vec![LinkExtentMask::Vf]));
        let replies = self.request("reading the settings", vf, RouteNetlinkMessage::GetLink(link))?;
        find_vf(&replies, vf)
    }

    fn set_mac(&self, pf_ifindex: u32, vf: u32, mac: [u8; 6]) -> Result<(), NetlinkError> {
        self.set("setting the MAC", pf_ifindex, vf, VfInfo::Mac(VfInfoMac::new(vf, &mac)))
    }

    fn set_vlan(&self, pf_ifindex: u32, vf: u32, vlan: u16, qos: u32) -> Result<(), NetlinkError> {
        self.set("setting the VLAN", pf_ifindex, vf, VfInfo::Vlan(VfInfoVlan::new(vf, vlan.into(), qos)))
    }

    fn set_spoofchk(&self, pf_ifindex: u32, vf: u32, on: bool) -> Result<(), NetlinkError> {
        self.set("setting spoof checking", pf_ifindex, vf, VfInfo::SpoofCheck(VfInfoSpoofCheck::new(vf, on)))
    }

    fn set_trust(&self, pf_ifindex: u32, vf: u32, on: bool) -> Result<(), NetlinkError> {
        self.set("setting trust", pf_ifindex, vf, VfInfo::Trust(VfInfoTrust::new(vf, on)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lo_ifindex() -> u32 {
        std::fs::read_to_string("/sys/class/net/lo/ifindex").unwrap().trim().parse().unwrap()
    }

    /// The real socket path against `lo`, which has no VFs: the request is built and parsed by
    /// the kernel, and the answers come back as the errors users would see.
    #[test]
    fn rtnetlink_against_loopback() {
        let nl = RtNetlink;
        match nl.vf_config(lo_ifindex(), 0) {
            Err(NetlinkError::NoVfInfo { vf: 0 }) => {}
            other => panic!("lo has no VF list, got {other:?}"),
        }
        let e = nl.set_mac(lo_ifindex(), 0, [2, 0, 0, 0, 0, 1]).unwrap_err();
        let errno = match &e {
            NetlinkError::Refused { source, .. } => source.raw_os_error(),
            other => panic!("expected a refusal, got {other:?}"),
        };
        // EOPNOTSUPP with CAP_NET_ADMIN (lo has no ndo_set_vf_mac), EPERM without.
        assert!(matches!(errno, Some(libc::EOPNOTSUPP) | Some(libc::EPERM)), "{e}");
        assert!(e.to_string().contains("setting the MAC of VF 0 failed") && e.to_string().contains("; "), "{e}");
    }

    #[test]
    fn errors_say_what_to_do() {
        let refused =
            |errno| NetlinkError::Refused { what: "setting trust", vf: 2, source: io::Error::from_raw_os_error(errno) };
        assert!(refused(libc::EOPNOTSUPP).to_string().contains("PF driver cannot set this"));
        assert!(refused(libc::EPERM).to_string().contains("CAP_NET_ADMIN"));
    }

    #[test]
    fn attribute_names_round_trip() {
        for attr in [VfAttr::Mac, VfAttr::Vlan, VfAttr::SpoofChk, VfAttr::Trust] {
            assert_eq!(VfAttr::from_name(attr.name()), Some(attr));
        }
        assert_eq!(VfAttr::from_name("rate"), None);
    }
}
