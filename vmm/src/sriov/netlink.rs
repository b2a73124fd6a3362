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
        exchange(msg, 0, |source| NetlinkError::Refused { what, vf, source })
    }

    fn set(&self, what: &'static str, pf_ifindex: u32, vf: u32, info: VfInfo) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.index = pf_ifindex;
        link.attributes.push(LinkAttribute::VfInfoList(vec![LinkVfInfo(vec![info])]));
        self.request(what, vf, RouteNetlinkMessage::SetLink(link)).map(drop)
    }
}

/// Sends one rtnetlink request with `NLM_F_REQUEST | NLM_F_ACK | flags` on a fresh socket and
/// collects its replies up to the kernel's ACK or, for a dump, its end. `refused` words the
/// kernel's errno, because only the caller knows what the request was for and what to advise.
pub(super) fn exchange<E: From<NetlinkError>>(
    msg: RouteNetlinkMessage,
    flags: u16,
    refused: impl FnOnce(io::Error) -> E,
) -> Result<Vec<RouteNetlinkMessage>, E> {
    let io_err = |what: &'static str| move |source| NetlinkError::Io { what, source };
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
    socket.bind_auto().map_err(NetlinkError::Socket)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(NetlinkError::Socket)?;

    const SEQ: u32 = 1;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
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
            return Err(NetlinkError::BadReply("the kernel closed the socket without an answer".into()).into());
        }
        let mut off = 0;
        while off < data.len() {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..])
                .map_err(|e| NetlinkError::BadReply(e.to_string()))?;
            let len = reply.header.length as usize;
            if len == 0 {
                return Err(NetlinkError::BadReply("a message of length 0".into()).into());
            }
            off += len;
            if reply.header.sequence_number != SEQ {
                continue;
            }
            match reply.payload {
                NetlinkPayload::Error(e) if e.code.is_none() => return Ok(replies),
                NetlinkPayload::Error(e) => return Err(refused(e.to_io())),
                // A dump that failed part-way says so in its end marker.
                NetlinkPayload::Done(d) if d.code < 0 => return Err(refused(io::Error::from_raw_os_error(-d.code))),
                NetlinkPayload::Done(_) => return Ok(replies),
                NetlinkPayload::InnerMessage(m) => replies.push(m),
                _ => {}
            }
        }
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

/// Private network namespaces for the tests that make and break real links.
#[cfg(test)]
pub(super) mod testns {
    use std::error::Error;
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
    use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
    use netlink_packet_route::RouteNetlinkMessage;

    use super::{exchange, NetlinkError};

    pub type Outcome = Result<(), Box<dyn Error>>;

    /// Runs `body` in a forked child that has its own network namespace, so that its links can
    /// neither disturb the host nor be seen by other tests, and vanish with the child. In a
    /// test thread, `unshare(CLONE_NEWNET)` would stay with a thread the harness reuses for
    /// other tests, and a threaded process cannot get a private mount namespace at all. Panics
    /// with the child's failure, a missing root included: these tests must never pass unrun.
    pub fn run(body: fn() -> Outcome) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            panic!("pipe2: {}", std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the child makes syscalls and allocates (glibc keeps malloc usable across fork),
        // never returns into the test harness, and leaves through _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            panic!("fork: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            drop(rx);
            let outcome = std::panic::catch_unwind(|| in_child(body)).unwrap_or_else(|p| {
                let text =
                    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
                Err(format!("panicked: {}", text.unwrap_or_default()))
            });
            let status = i32::from(outcome.is_err());
            let _ = std::fs::File::from(tx).write_all(outcome.err().unwrap_or_default().as_bytes());
            // SAFETY: ends the child without running the parent's exit handlers and destructors.
            unsafe { libc::_exit(status) }
        }
        drop(tx);
        let report = read_with_deadline(rx, Duration::from_secs(30));
        let mut status = 0;
        if report.is_err() {
            // SAFETY: pid is our own child, which has not been reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // SAFETY: reaps our own child; status is a valid out-pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let report = report.unwrap_or_else(|e| panic!("the network-namespace child: {e}"));
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "in the private network namespace: {}",
            if report.is_empty() { format!("the child died (wait status {status:#x})") } else { report }
        );
    }

    /// A failure in the child, a panic included, fails the test with the child's words.
    #[test]
    #[should_panic(expected = "in the private network namespace: panicked: the body's own words")]
    fn a_failing_child_fails_the_test() {
        run(|| panic!("the body's own words"));
    }

    fn in_child(body: fn() -> Outcome) -> Result<(), String> {
        // SAFETY: unshare has no memory-safety preconditions; this process is single-threaded.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNET): {}: this test makes its links in a private network namespace, which \
                 needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN): run the tests as root",
                std::io::Error::last_os_error()
            ));
        }
        body().map_err(|e| e.to_string())
    }

    /// Gives the child its own mount namespace with a sysfs of its network namespace on /sys,
    /// for code that reads `/sys/class/net`; nothing of it propagates to the host's mounts.
    pub fn private_sysfs() -> Result<(), std::io::Error> {
        let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
        // SAFETY: unshare has no memory-safety preconditions; the child is single-threaded.
        check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
        // SAFETY: the paths and file system type are NUL-terminated literals; null data is allowed.
        check(unsafe {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        })?;
        // SAFETY: as above.
        check(unsafe { libc::mount(c"sysfs".as_ptr(), c"/sys".as_ptr(), c"sysfs".as_ptr(), 0, std::ptr::null()) })
    }

    fn read_with_deadline(rx: OwnedFd, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut file = std::fs::File::from(rx);
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("did not finish in {timeout:?}"));
            }
            let mut pfd = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll: {e}"));
            }
            let mut chunk = [0u8; 4096];
            match file.read(&mut chunk) {
                Ok(0) => return Ok(String::from_utf8_lossy(&out).into_owned()),
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// Polls `check` until it says Some, or fails after `timeout`: carrier changes reach the
    /// bridge and the link notifications through the kernel's deferred linkwatch work.
    pub fn wait_for<T>(
        timeout: Duration,
        mut check: impl FnMut() -> Result<Option<T>, Box<dyn Error>>,
    ) -> Result<T, Box<dyn Error>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = check()? {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(format!("timed out after {timeout:?}").into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn change(what: &'static str, msg: RouteNetlinkMessage, flags: u16) -> Result<(), NetlinkError> {
        exchange(msg, flags, |source| NetlinkError::Io { what, source }).map(drop)
    }

    pub fn ifindex(name: &str) -> Result<u32, NetlinkError> {
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::IfName(name.into()));
        let replies = exchange(RouteNetlinkMessage::GetLink(link), 0, |source| NetlinkError::Io {
            what: "looking up a link",
            source,
        })?;
        replies
            .iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })
            .ok_or_else(|| NetlinkError::BadReply(format!("no link {name}")))
    }

    fn add(name: &str, info: Vec<LinkInfo>) -> Result<u32, NetlinkError> {
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::IfName(name.into()));
        link.attributes.push(LinkAttribute::LinkInfo(info));
        change("creating a test link", RouteNetlinkMessage::NewLink(link), NLM_F_CREATE | NLM_F_EXCL)?;
        ifindex(name)
    }

    pub fn add_bridge(name: &str) -> Result<u32, NetlinkError> {
        add(name, vec![LinkInfo::Kind(InfoKind::Bridge)])
    }

    /// A veth pair: (name's ifindex, peer's ifindex).
    pub fn add_veth(name: &str, peer: &str) -> Result<(u32, u32), NetlinkError> {
        let mut peer_link = LinkMessage::default();
        peer_link.attributes.push(LinkAttribute::IfName(peer.into()));
        let info = vec![LinkInfo::Kind(InfoKind::Veth), LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_link)))];
        Ok((add(name, info)?, ifindex(peer)?))
    }

    pub fn set_master(port: u32, bridge: u32) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.index = port;
        link.attributes.push(LinkAttribute::Controller(bridge));
        change("enslaving a test link", RouteNetlinkMessage::SetLink(link), 0)
    }

    pub fn set_up(ifindex: u32, up: bool) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.index = ifindex;
        link.header.flags = if up { LinkFlags::Up } else { LinkFlags::empty() };
        link.header.change_mask = LinkFlags::Up;
        change("setting a test link up or down", RouteNetlinkMessage::SetLink(link), 0)
    }

    pub fn del_link(ifindex: u32) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.index = ifindex;
        change("deleting a test link", RouteNetlinkMessage::DelLink(link), 0)
    }
}
