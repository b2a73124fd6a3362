//! Link state of host network interfaces, as the kernel announces it over rtnetlink.
//!
//! A VF is only worth keeping in the guest while its PF's link is up: with the link down the
//! guest's net_failover would keep sending into a dead VF instead of its virtio-net standby.
//! The VMM polls [`LinkWatch`] next to its other event sources, unplugs the VF when the PF
//! goes down and plugs it back when it comes up; [`link_state`] gives the state to start from.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use netlink_packet_core::{NetlinkBuffer, NlaBuffer, NlasIterator, ParseableParametrized, NLM_F_DUMP};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkHeader, LinkMessage, State};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::netlink::{exchange, NetlinkError};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(
        "no network interface has index {ifindex} any more: it was removed (unplugged, or its driver unbound); \
         see `ip link`"
    )]
    NoSuchLink { ifindex: u32 },
    #[error("reading the state of network interface {ifindex} failed: {source}")]
    Refused {
        ifindex: u32,
        #[source]
        source: io::Error,
    },
    #[error("listing the network interfaces failed: {0}")]
    ListRefused(#[source] io::Error),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// What one link notification (or query) says about one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEvent {
    pub ifindex: u32,
    pub name: Option<String>,
    /// Usable: administratively up, with carrier, and (when the driver reports it) an
    /// operational state of up or unknown.
    pub up: bool,
    /// The interface is gone (RTM_DELLINK, or missing after dropped notifications); `up` is
    /// then false.
    pub removed: bool,
}

/// Room for bursts of notifications (a PF with many VFs announces each of them) so that the
/// kernel rarely has to drop any; it caps this at `net.core.rmem_max`.
const RECEIVE_BUFFER: i32 = 1 << 20;

/// `sizeof(struct ifinfomsg)`, where a link message's attributes start.
const IFINFOMSG_LEN: usize = 16;

/// A nonblocking rtnetlink socket subscribed to link notifications (`RTNLGRP_LINK`).
#[derive(Debug)]
pub struct LinkWatch {
    socket: Socket,
    /// The interfaces that exist as far as this watch knows, to tell which of them vanished
    /// while notifications were being dropped.
    known: HashSet<u32>,
    /// How often the kernel dropped notifications.
    resyncs: u32,
}

impl LinkWatch {
    pub fn open() -> Result<Self, LinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind(&SocketAddr::new(0, libc::RTMGRP_LINK as u32)).map_err(NetlinkError::Socket)?;
        socket.set_non_blocking(true).map_err(NetlinkError::Socket)?;
        socket.set_rx_buf_sz(RECEIVE_BUFFER).map_err(NetlinkError::Socket)?;
        // Listed after subscribing, so that no interface can appear unseen in between.
        let known = all_links()?.iter().map(|e| e.ifindex).collect();
        Ok(Self { socket, known, resyncs: 0 })
    }

    /// Every notification queued so far, oldest first; empty when there is none. Several
    /// events for one interface may come in one call: the last one is its current state.
    /// When the kernel had to drop notifications (its buffer for this socket overflowed), the
    /// events since the last call are replaced by the current state of every interface, and
    /// a removal for each known one that has vanished: the caller never has to resynchronise.
    pub fn read_events(&mut self) -> Result<Vec<LinkEvent>, LinkError> {
        let mut events = Vec::new();
        loop {
            let (data, from) = match self.socket.recv_from_full() {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(events),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    events = self.resync()?;
                    continue;
                }
                Err(source) => return Err(NetlinkError::Io { what: "receive link events", source }.into()),
            };
            // Only the kernel speaks for the links; anything else on the group is not news.
            if from.port_number() != 0 {
                continue;
            }
            let first = events.len();
            parse_datagram(&data, &mut events)?;
            for e in &events[first..] {
                match e.removed {
                    true => self.known.remove(&e.ifindex),
                    false => self.known.insert(e.ifindex),
                };
            }
        }
    }

    /// After dropped notifications: what is still queued is older than the state listed now,
    /// so it is thrown away first; what arrives after the listing is newer again.
    fn resync(&mut self) -> Result<Vec<LinkEvent>, LinkError> {
        self.resyncs += 1;
        loop {
            match self.socket.recv_from_full() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted || e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(source) => return Err(NetlinkError::Io { what: "receive link events", source }.into()),
            }
        }
        let now = all_links()?;
        let exists: HashSet<u32> = now.iter().map(|e| e.ifindex).collect();
        let mut gone: Vec<u32> = self.known.difference(&exists).copied().collect();
        gone.sort_unstable();
        self.known = exists;
        let removed = gone.into_iter().map(|ifindex| LinkEvent { ifindex, name: None, up: false, removed: true });
        Ok(removed.chain(now).collect())
    }
}

impl AsRawFd for LinkWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// The current state of interface `ifindex`; [`LinkError::NoSuchLink`] when it is gone.
pub fn link_state(ifindex: u32) -> Result<LinkEvent, LinkError> {
    let mut link = LinkMessage::default();
    link.header.index = ifindex;
    let replies = exchange(RouteNetlinkMessage::GetLink(link), 0, |source| match source.raw_os_error() {
        Some(libc::ENODEV) => LinkError::NoSuchLink { ifindex },
        _ => LinkError::Refused { ifindex, source },
    })?;
    let found = replies.iter().find_map(|m| match m {
        RouteNetlinkMessage::NewLink(link) if link.header.index == ifindex => event(link, false),
        _ => None,
    });
    found.ok_or_else(|| NetlinkError::BadReply(format!("the kernel answered no state for interface {ifindex}")).into())
}

fn all_links() -> Result<Vec<LinkEvent>, LinkError> {
    let replies = exchange(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP, LinkError::ListRefused)?;
    Ok(replies
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => event(link, false),
            _ => None,
        })
        .collect())
}

/// The event a link message describes; None for those that are not about the interface
/// itself: a bridge announces its ports' STP state as AF_BRIDGE link messages, and the
/// AF_BRIDGE RTM_DELLINK of a port leaving its bridge does not mean the port is gone.
fn event(link: &LinkMessage, removed: bool) -> Option<LinkEvent> {
    if link.header.interface_family != AddressFamily::Unspec {
        return None;
    }
    let mut name = None;
    let mut oper = None;
    for attr in &link.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::OperState(s) => oper = Some(*s),
            _ => {}
        }
    }
    let flags = link.header.flags;
    let oper_ok = matches!(oper, None | Some(State::Up) | Some(State::Unknown));
    let up = !removed && flags.contains(LinkFlags::Up | LinkFlags::Running) && oper_ok;
    Some(LinkEvent { ifindex: link.header.index, name, up, removed })
}

/// The link events in one datagram from the kernel. An attribute this crate cannot parse
/// is skipped rather than losing the event: the header alone says up or down.
fn parse_datagram(data: &[u8], events: &mut Vec<LinkEvent>) -> Result<(), NetlinkError> {
    let mut off = 0;
    while off < data.len() {
        let msg = NetlinkBuffer::new_checked(&data[off..])
            .map_err(|e| NetlinkError::BadReply(format!("a link notification: {e}")))?;
        let len = msg.length() as usize;
        let removed = match msg.message_type() {
            libc::RTM_NEWLINK => false,
            libc::RTM_DELLINK => true,
            _ => {
                off += len.next_multiple_of(4);
                continue;
            }
        };
        let payload = msg.payload();
        let header = LinkHeader::parse(payload).map_err(|e| NetlinkError::BadReply(format!("a link header: {e}")))?;
        let mut link = LinkMessage::default();
        let family = header.interface_family;
        link.header = header;
        for nla in NlasIterator::new(&payload[IFINFOMSG_LEN.min(payload.len())..]) {
            let Ok(nla): Result<NlaBuffer<&[u8]>, _> = nla else { break };
            if let Ok(attr) = LinkAttribute::parse_with_param(&nla, family) {
                link.attributes.push(attr);
            }
        }
        events.extend(event(&link, removed));
        off += len.next_multiple_of(4);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};

    use super::super::netlink::testns;
    use super::*;

    fn link(index: u32, flags: LinkFlags, oper: Option<State>) -> LinkMessage {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = flags;
        link.attributes.push(LinkAttribute::IfName(format!("eth{index}")));
        link.attributes.extend(oper.map(LinkAttribute::OperState));
        link
    }

    fn up(flags: LinkFlags, oper: Option<State>) -> bool {
        event(&link(3, flags, oper), false).map(|e| e.up).unwrap_or_else(|| panic!("no event"))
    }

    #[test]
    fn up_means_up_with_carrier_and_operational() {
        let ok = LinkFlags::Up | LinkFlags::Running | LinkFlags::LowerUp;
        assert!(up(ok, Some(State::Up)));
        assert!(up(ok, Some(State::Unknown)), "drivers that do not report it (lo, tun) say unknown");
        assert!(up(ok, None));
        assert!(!up(LinkFlags::Up, Some(State::Up)), "no carrier");
        assert!(!up(LinkFlags::Running, None), "administratively down");
        assert!(!up(ok, Some(State::Down)));
        assert!(!up(ok, Some(State::LowerLayerDown)));
        assert!(!up(ok, Some(State::Dormant)), "e.g. 802.1X not yet authenticated");
        assert!(!up(ok, Some(State::NotPresent)));

        let e = event(&link(3, ok, Some(State::Up)), false).unwrap();
        assert_eq!(e, LinkEvent { ifindex: 3, name: Some("eth3".into()), up: true, removed: false });
        let gone = event(&link(3, ok, Some(State::Up)), true).unwrap();
        assert_eq!(gone, LinkEvent { ifindex: 3, name: Some("eth3".into()), up: false, removed: true });
    }

    #[test]
    fn bridge_port_notifications_are_not_link_events() {
        let mut port = link(5, LinkFlags::Up | LinkFlags::Running, Some(State::Up));
        port.header.interface_family = AddressFamily::Bridge;
        assert_eq!(event(&port, true), None, "a port leaving its bridge is not removed");
        assert_eq!(event(&port, false), None);
    }

    fn datagram(messages: Vec<RouteNetlinkMessage>) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            let mut msg = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(m));
            msg.finalize();
            let mut buf = vec![0; msg.buffer_len()];
            msg.serialize(&mut buf);
            out.extend(buf);
        }
        out
    }

    #[test]
    fn datagrams_are_parsed_and_bad_attributes_skipped() {
        let ok = LinkFlags::Up | LinkFlags::Running;
        let mut data = datagram(vec![
            RouteNetlinkMessage::NewLink(link(2, ok, Some(State::Up))),
            RouteNetlinkMessage::DelLink(link(4, LinkFlags::empty(), None)),
            RouteNetlinkMessage::NewLink(link(6, ok, None)),
        ]);
        // Make the last message's IFLA_IFNAME unparseable (no NUL, invalid UTF-8): the event
        // must still come, without the name.
        let at = data.len() - 8;
        data[at..].copy_from_slice(&[8, 0, 3, 0, 0xff, 0xfe, 0xfd, 0xfc]);
        let mut events = Vec::new();
        parse_datagram(&data, &mut events).unwrap();
        let ends = |e: &LinkEvent| (e.ifindex, e.up, e.removed);
        assert_eq!(events.iter().map(ends).collect::<Vec<_>>(), [(2, true, false), (4, false, true), (6, true, false)]);
        assert_eq!(events[0].name.as_deref(), Some("eth2"));
        assert_eq!(events[2].name, None);

        assert!(matches!(parse_datagram(&data[..10], &mut events), Err(NetlinkError::BadReply(_))));
    }

    #[test]
    fn loopback_state_and_an_idle_watch() {
        let lo = link_state(1).unwrap();
        assert_eq!((lo.ifindex, lo.name.as_deref(), lo.removed), (1, Some("lo"), false));
        assert!(matches!(link_state(u32::MAX >> 1), Err(LinkError::NoSuchLink { .. })));
        let mut watch = LinkWatch::open().unwrap();
        assert!(watch.as_raw_fd() >= 0);
        watch.read_events().unwrap();
    }

    /// The next event for `ifindex` that `want` accepts, waiting for it: carrier changes come
    /// through the kernel's deferred linkwatch work.
    fn wait_event(
        watch: &mut LinkWatch,
        ifindex: u32,
        want: impl Fn(&LinkEvent) -> bool,
    ) -> Result<LinkEvent, Box<dyn std::error::Error>> {
        let mut seen = Vec::new();
        let found = testns::wait_for(Duration::from_secs(5), || {
            for e in watch.read_events()? {
                if e.ifindex == ifindex && want(&e) {
                    return Ok(Some(e));
                }
                seen.push(e);
            }
            Ok(None)
        });
        found.map_err(|e| format!("{e}; saw only {seen:?}").into())
    }

    /// A veth pair in a private network namespace: one end goes up without carrier, gets
    /// carrier when its peer comes up, loses it when the peer goes down, and is removed.
    #[test]
    fn a_veth_is_watched_through_up_down_and_removal() {
        testns::run(|| {
            let mut watch = LinkWatch::open()?;
            let (a, b) = testns::add_veth("lw0", "lw1")?;
            let created = wait_event(&mut watch, a, |_| true)?;
            assert_eq!((created.name.as_deref(), created.up), (Some("lw0"), false));
            assert!(!link_state(a)?.up);

            testns::set_up(a, true)?;
            let no_carrier = wait_event(&mut watch, a, |_| true)?;
            assert!(!no_carrier.up, "up without its peer has no carrier: {no_carrier:?}");

            testns::set_up(b, true)?;
            wait_event(&mut watch, a, |e| e.up)?;
            assert!(link_state(a)?.up);

            testns::set_up(b, false)?;
            wait_event(&mut watch, a, |e| !e.up)?;
            assert!(!link_state(a)?.up);

            testns::del_link(a)?;
            let gone = wait_event(&mut watch, a, |e| e.removed)?;
            assert_eq!((gone.name.as_deref(), gone.up), (Some("lw0"), false));
            match link_state(a) {
                Err(LinkError::NoSuchLink { ifindex }) if ifindex == a => Ok(()),
                other => Err(format!("a removed link: {other:?}").into()),
            }
        });
    }

    /// Dropped notifications, forced by a tiny socket buffer: the watch answers with the state
    /// of every link as it is now, and the removal of one that vanished meanwhile.
    #[test]
    fn dropped_notifications_are_replaced_by_the_current_state() {
        testns::run(|| {
            let (a, b) = testns::add_veth("ov0", "ov1")?;
            let (c, d) = testns::add_veth("ov2", "ov3")?;
            let mut watch = LinkWatch::open()?;
            let tiny: libc::c_int = 1;
            // SAFETY: SO_RCVBUF with a valid int option on the watch's own socket.
            let rc = unsafe {
                libc::setsockopt(
                    watch.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    (&tiny as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(format!("SO_RCVBUF: {}", io::Error::last_os_error()).into());
            }
            for _ in 0..10 {
                for i in [a, b, c, d] {
                    testns::set_up(i, true)?;
                    testns::set_up(i, false)?;
                }
            }
            testns::set_up(a, true)?;
            testns::set_up(b, true)?;
            testns::del_link(c)?;
            // The veth pair gets its carrier through deferred work: wait for it to show.
            let mut last = std::collections::HashMap::new();
            testns::wait_for(Duration::from_secs(5), || {
                for e in watch.read_events()? {
                    last.insert(e.ifindex, e);
                }
                Ok(last.get(&a).filter(|e| e.up).map(drop))
            })?;
            if watch.resyncs == 0 {
                return Err("the kernel dropped no notifications: the test did not test anything".into());
            }
            for gone in [c, d] {
                let e = last.get(&gone).ok_or(format!("no news of the removed {gone}: {last:?}"))?;
                if !e.removed {
                    return Err(format!("{gone} was removed, the watch says {e:?}").into());
                }
            }
            assert!(last[&b].up && !last[&b].removed, "{last:?}");
            assert!(!watch.known.contains(&c) && watch.known.contains(&a));
            Ok(())
        });
    }
}
