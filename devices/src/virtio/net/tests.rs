//! The device and its worker together, on a real event loop: datagram socketpairs
//! stand in for the tap queues, except in the last test, which uses a real tap.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use event_manager::{EventManager, EventSet, SubscriberId, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::test_util::*;
use super::worker::NetWorker;
use super::*;
use crate::virtio::{ActivateError, ActivatedQueue, GuestMemory, VirtioDevice, VirtioInterruptType};

const W: u16 = VRING_DESC_F_WRITE as u16;

const fn bit(b: u32) -> u64 {
    1 << b
}

const V1: u64 = bit(VIRTIO_F_VERSION_1);
const MRG: u64 = bit(VIRTIO_NET_F_MRG_RXBUF);
const MQ: u64 = bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ);

/// A device, guest RAM, the driver's queues and an event loop running the worker.
struct Rig {
    mem: &'static GuestMemory,
    net: Net,
    /// The host ends of the socketpairs, one per queue pair.
    hosts: Vec<UnixDatagram>,
    irq: Arc<RecordingInterrupt>,
    em: EventManager<NetWorker>,
    id: Option<SubscriberId>,
    queues: Vec<DriverQueue<'static>>,
    kicks: Vec<EventFd>,
    next_ring: u64,
}

fn rig(pairs: usize) -> Rig {
    // Leaked so that driver queues can borrow it for the whole test.
    let mem: &'static GuestMemory = Box::leak(Box::new(guest_memory()));
    let (backends, hosts): (Vec<_>, Vec<_>) = (0..pairs)
        .map(|_| {
            let (tap, host) = datagram_pair();
            (Box::new(FdBackend::new(tap.into())) as Box<dyn NetBackend>, host)
        })
        .unzip();
    let net = Net::with_backends("test", Some([2, 0, 0, 0, 0, 9]), backends).unwrap();
    Rig {
        mem,
        net,
        hosts,
        irq: Arc::new(RecordingInterrupt::default()),
        em: EventManager::new().unwrap(),
        id: None,
        queues: Vec::new(),
        kicks: Vec::new(),
        next_ring: 0,
    }
}

impl Rig {
    /// Negotiates `features` and activates with `count` fresh queues.
    fn activate(&mut self, features: u64, count: u16) -> Result<(), ActivateError> {
        self.net.set_acked_features(features);
        self.queues.clear();
        self.kicks.clear();
        let mut activated = Vec::new();
        for index in 0..count {
            let dq = mock_queue(self.mem, self.next_ring);
            self.next_ring += 1;
            let notify = EventFd::new(EFD_NONBLOCK).unwrap();
            self.kicks.push(notify.try_clone().unwrap());
            activated.push(ActivatedQueue { index, queue: dq.create_queue().unwrap(), notify });
            self.queues.push(dq);
        }
        let worker = self.net.activate_worker(self.mem.clone(), self.irq.clone(), activated)?;
        self.id = Some(self.em.add_subscriber(worker));
        Ok(())
    }

    /// The driver notifies queue `q`.
    fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    /// Runs the event loop until it has nothing to do; fails if it never gets there
    /// (a busy loop).
    fn settle(&mut self) {
        for _ in 0..200 {
            if self.em.run_with_timeout(10).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never went idle");
    }

    fn worker(&mut self) -> &mut NetWorker {
        self.em.subscriber_mut(self.id.unwrap()).unwrap()
    }

    /// The VMM's side of a driver reset: remove and drop the worker, reset the device.
    fn reset(&mut self) {
        let worker = self.em.remove_subscriber(self.id.take().unwrap()).unwrap();
        drop(worker);
        self.net.reset();
    }

    fn queue_interrupts(&self) -> Vec<u16> {
        self.irq
            .take()
            .into_iter()
            .filter_map(|k| match k {
                VirtioInterruptType::Queue(q) => Some(q),
                VirtioInterruptType::Config => None,
            })
            .collect()
    }
}

#[test]
fn features_queues_and_config_space() {
    let one = rig(1);
    let f = one.net.features();
    for b in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_RING_F_EVENT_IDX,
        virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC,
    ] {
        assert!(f & bit(b) != 0, "feature bit {b} not offered");
    }
    assert_eq!(f & MQ, 0);
    assert_eq!(f & bit(VIRTIO_NET_F_MTU), 0);
    assert_eq!(one.net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(one.net.device_type(), 1);

    let mut two = rig(2);
    assert_eq!(two.net.features() & MQ, MQ);
    assert_eq!(two.net.queue_max_sizes().len(), 5);
    two.net.set_acked_features(u64::MAX);
    two.net.write_config(0, &[0xff; 10]); // ignored

    let read = |off: u64, len: usize| {
        let mut d = vec![0xaau8; len];
        two.net.read_config(off, &mut d);
        d
    };
    assert_eq!(read(0, 6), [2, 0, 0, 0, 0, 9]);
    assert_eq!(read(6, 2), [1, 0]); // LINK_UP
    assert_eq!(read(8, 2), [2, 0]); // max_virtqueue_pairs
    assert_eq!(read(5, 4), [9, 1, 0, 2]); // any offset and width
    assert_eq!(read(10, 4), [0; 4]); // mtu etc.: not offered, zero
    assert_eq!(read(u64::MAX, 8), [0; 8]);
}

#[test]
fn standby_is_offered_only_when_asked_and_tracks_the_driver() {
    let mut plain = rig(1);
    assert_eq!(plain.net.features() & bit(VIRTIO_NET_F_STANDBY), 0, "offered without standby=on");
    let mut net = rig(1);
    net.net.offer_standby();
    assert_ne!(net.net.features() & bit(VIRTIO_NET_F_STANDBY), 0);
    let acked = net.net.standby_negotiated();
    net.net.set_acked_features(net.net.features() & !bit(VIRTIO_NET_F_STANDBY));
    assert!(!acked.load(std::sync::atomic::Ordering::Acquire), "a driver without net_failover");
    net.net.set_acked_features(net.net.features());
    assert!(acked.load(std::sync::atomic::Ordering::Acquire));
    net.net.reset();
    assert!(!acked.load(std::sync::atomic::Ordering::Acquire), "a reset forgets it");
    // Acking a bit that was not offered does not count.
    plain.net.set_acked_features(u64::MAX);
    assert!(!plain.net.standby_negotiated().load(std::sync::atomic::Ordering::Acquire));
}

#[test]
fn the_standby_listener_hears_of_a_started_driver_that_acked_standby_only() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let heard = Arc::new(AtomicUsize::new(0));
    let listener = |r: &mut Rig| {
        let h = heard.clone();
        r.net.set_standby_listener(Arc::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        }));
    };
    let mut without = rig(1);
    without.net.offer_standby();
    listener(&mut without);
    without.activate(V1, 2).unwrap();
    assert_eq!(heard.load(Ordering::SeqCst), 0, "a driver without STANDBY must not see the VF");
    let mut with = rig(1);
    with.net.offer_standby();
    listener(&mut with);
    with.activate(V1 | bit(VIRTIO_NET_F_STANDBY), 2).unwrap();
    assert_eq!(heard.load(Ordering::SeqCst), 1);
    let mut not_offered = rig(1);
    listener(&mut not_offered);
    not_offered.activate(V1 | bit(VIRTIO_NET_F_STANDBY), 2).unwrap();
    assert_eq!(heard.load(Ordering::SeqCst), 1, "acking a bit never offered does not count");
}

#[test]
fn invalid_configurations_are_refused() {
    let backends = || vec![Box::new(FdBackend::new(datagram_pair().0.into())) as Box<dyn NetBackend>];
    let e = Net::with_backends("t", Some([1, 2, 3, 4, 5, 6]), backends()).unwrap_err();
    assert!(e.to_string().contains("not a unicast"), "{e}");
    let e = Net::with_backends("t", Some([0; 6]), backends()).unwrap_err();
    assert!(matches!(e, NetError::InvalidMac(_)), "{e}");
    let e = Net::with_backends("t", None, Vec::new()).unwrap_err();
    assert!(matches!(e, NetError::InvalidQueuePairs(0)), "{e}");

    // A generated MAC is unicast and locally administered.
    let a = Net::with_backends("t", None, backends()).unwrap().mac();
    let b = Net::with_backends("t", None, backends()).unwrap().mac();
    assert_eq!(a[0], 0x02);
    assert_ne!(a, b);
}

#[test]
fn activation_checks_features_and_queues() {
    let mut r = rig(1);
    let e = r.activate(MRG, 2).unwrap_err();
    assert!(e.to_string().contains("VERSION_1"), "{e}");
    let e = r.activate(V1, 1).unwrap_err();
    assert!(matches!(e, ActivateError::QueueCount { expected: 2, got: 1 }), "{e}");

    let mut r = rig(2);
    // MQ without the control queue it depends on (the transport masks bits, not rules).
    let e = r.activate(V1 | bit(VIRTIO_NET_F_MQ), 5).unwrap_err();
    assert!(e.to_string().contains("CTRL_VQ"), "{e}");
}

#[test]
fn link_changes_raise_a_config_interrupt_while_active() {
    let mut r = rig(1);
    let link = r.net.link();
    link.set_up(false).unwrap(); // no driver yet: just the status
    assert!(r.irq.take().is_empty());
    let mut status = [0u8; 2];
    r.net.read_config(6, &mut status);
    assert_eq!(status, [0, 0]);

    r.activate(V1, 2).unwrap();
    r.net.set_link(true).unwrap();
    r.net.set_link(true).unwrap(); // no change, no interrupt
    assert_eq!(r.irq.take(), vec![VirtioInterruptType::Config]);
    r.net.read_config(6, &mut status);
    assert_eq!(status, [1, 0]);

    r.reset();
    link.set_up(false).unwrap();
    assert!(r.irq.take().is_empty(), "no interrupt for a reset device");
}

#[test]
fn reception_stops_watching_the_tap_without_buffers() {
    let mut r = rig(1);
    r.activate(V1 | MRG, 2).unwrap();
    r.settle();
    assert_eq!(r.worker().tap_interest(0), Some(EventSet::IN));

    // Frames arrive, but the driver has posted no buffer: the tap stops being
    // watched, and the loop goes idle although the tap stays readable.
    r.hosts[0].send(&host_frame(100, 1)).unwrap();
    r.hosts[0].send(&host_frame(200, 2)).unwrap();
    r.settle();
    assert_eq!(r.worker().tap_interest(0), Some(EventSet::empty()));
    assert_eq!(r.em.run_with_timeout(50).unwrap(), 0);
    assert!(r.net.counters().snapshot().rx_no_buffers >= 1);

    // The driver posts buffers and notifies: both frames come in, one interrupt.
    r.queues[0].add_desc_chains(&[desc(BUF, 4096, W, 0), desc(BUF + 0x1000, 4096, W, 0)], 0).unwrap();
    r.kick(0);
    r.settle();
    assert_eq!(used(&r.queues[0]), vec![(0, 112), (1, 212)]);
    assert_eq!(r.queue_interrupts(), vec![0]);
    let mut got = vec![0u8; 212];
    r.mem.read_slice(&mut got, GuestAddress(BUF + 0x1000)).unwrap();
    assert_eq!(got[12..], host_frame(200, 2)[12..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    // Out of buffers again.
    assert_eq!(r.worker().tap_interest(0), Some(EventSet::empty()));
    let s = r.net.counters().snapshot();
    assert_eq!((s.rx_packets, s.rx_bytes), (2, 300));
}

#[test]
fn a_full_tap_is_waited_for_with_epollout() {
    let mut r = rig(1);
    r.activate(V1, 2).unwrap();
    r.settle();
    const FRAMES: u16 = 100; // 400 KiB: more than the socket buffers
    let chains: Vec<_> = (0..FRAMES).map(|_| desc(BUF, 4096, 0, 0)).collect();
    r.queues[1].add_desc_chains(&chains, 0).unwrap();
    r.kick(1);
    r.settle(); // idle: waiting for EPOLLOUT does not spin
    assert_eq!(r.worker().tap_interest(0), Some(EventSet::IN | EventSet::OUT));
    assert!(used(&r.queues[1]).len() < usize::from(FRAMES));
    assert_eq!(r.net.counters().snapshot().tx_tap_full, 1);

    // The host reads: room again, transmission resumes by itself, nothing is lost.
    let mut received = 0;
    for _ in 0..100 {
        while recv(&r.hosts[0]).is_some() {
            received += 1;
        }
        if received == usize::from(FRAMES) {
            break;
        }
        r.settle();
    }
    assert_eq!(received, usize::from(FRAMES));
    assert_eq!(used(&r.queues[1]).len(), usize::from(FRAMES));
    assert_eq!(r.worker().tap_interest(0), Some(EventSet::IN));
    let s = r.net.counters().snapshot();
    assert_eq!((s.tx_packets, s.tx_dropped), (u64::from(FRAMES), 0));
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_does_not_want() {
    let mut r = rig(1);
    r.activate(V1 | bit(VIRTIO_RING_F_EVENT_IDX), 2).unwrap();
    r.settle();
    r.queues[1].set_used_event(4); // interrupt when used index passes 4
    let frame = |i: u64| desc(BUF + i * 0x100, 64, 0, 0);
    r.queues[1].add_desc_chains(&[frame(0), frame(1), frame(2)], 0).unwrap();
    r.kick(1);
    r.settle();
    assert_eq!(used(&r.queues[1]).len(), 3);
    assert!(r.queue_interrupts().is_empty());
    r.queues[1].add_desc_chains(&[frame(3), frame(4), frame(5)], 3).unwrap();
    r.kick(1);
    r.settle();
    assert_eq!(used(&r.queues[1]).len(), 6);
    assert_eq!(r.queue_interrupts(), vec![1]);
}

#[test]
fn the_device_works_again_after_a_reset() {
    let mut r = rig(1);
    for round in 0..3u8 {
        r.activate(V1 | MRG, 2).unwrap();
        r.settle();
        r.queues[1].add_desc_chains(&[desc(BUF, 60, 0, 0)], 0).unwrap();
        r.kick(1);
        r.queues[0].add_desc_chains(&[desc(BUF + 0x1000, 2048, W, 0)], 0).unwrap();
        r.kick(0);
        r.hosts[0].send(&host_frame(50, round)).unwrap();
        r.settle();
        assert_eq!(recv(&r.hosts[0]).map(|f| f.len()), Some(60), "round {round}");
        assert_eq!(used(&r.queues[0]), vec![(0, 62)], "round {round}");
        r.reset();
    }
}

#[test]
fn the_control_queue_switches_queue_pairs() {
    let mut r = rig(2);
    r.activate(V1 | MRG | MQ, 5).unwrap();
    r.settle();
    assert_eq!(r.worker().tap_interest(0), Some(EventSet::IN));
    assert_eq!(r.worker().tap_interest(1), None, "only the first pair until VQ_PAIRS_SET");

    let ctrl = 4;
    let command = |r: &mut Rig, slot: u16, bytes: &[u8]| -> u8 {
        let at = BUF + 0x10_0000 + u64::from(slot) * 0x100;
        r.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        r.mem.write_obj(0xffu8, GuestAddress(at + 0x80)).unwrap();
        r.queues[ctrl]
            .add_desc_chains(&[desc(at, bytes.len() as u32, NEXT, slot + 1), desc(at + 0x80, 1, W, 0)], slot)
            .unwrap();
        r.kick(ctrl);
        r.settle();
        r.mem.read_obj(GuestAddress(at + 0x80)).unwrap()
    };
    let pairs_set = |n: u16| {
        let [lo, hi] = n.to_le_bytes();
        [VIRTIO_NET_CTRL_MQ as u8, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8, lo, hi]
    };

    assert_eq!(command(&mut r, 0, &pairs_set(2)), VIRTIO_NET_OK as u8);
    assert_eq!(r.worker().tap_interest(1), Some(EventSet::IN));
    assert!(r.queue_interrupts().contains(&4));

    // The second pair receives into queue 2 and interrupts on it.
    r.queues[2].add_desc_chains(&[desc(BUF, 2048, W, 0)], 0).unwrap();
    r.kick(2);
    r.hosts[1].send(&host_frame(80, 7)).unwrap();
    r.settle();
    assert_eq!(used(&r.queues[2]), vec![(0, 92)]);
    assert_eq!(r.queue_interrupts(), vec![2]);

    // Back to one pair: the second tap queue is no longer watched.
    assert_eq!(command(&mut r, 2, &pairs_set(1)), VIRTIO_NET_OK as u8);
    assert_eq!(r.worker().tap_interest(1), None);
    assert_eq!(command(&mut r, 4, &pairs_set(3)), VIRTIO_NET_ERR as u8);
    assert_eq!(command(&mut r, 6, &pairs_set(0)), VIRTIO_NET_ERR as u8);
    assert_eq!(command(&mut r, 8, &[VIRTIO_NET_CTRL_RX as u8, 0, 1]), VIRTIO_NET_OK as u8);
    assert_eq!(command(&mut r, 10, &[VIRTIO_NET_CTRL_VLAN as u8, 0, 1, 0]), VIRTIO_NET_ERR as u8);
}

/// A real tap: frames cross between the guest's queues and the host's stack. Needs
/// root (or CAP_NET_ADMIN) and /dev/net/tun, and fails — loudly — without them.
#[test]
fn frames_cross_a_real_tap() {
    use super::tap::tests::{exists, unique_name};

    let name = unique_name();
    let config =
        NetConfig { tap: name.clone(), mac: Some([2, 0, 0, 0xab, 0xcd, 0xef]), queue_pairs: 1, standby: false };
    let net = Net::new(&config)
        .unwrap_or_else(|e| panic!("this test creates a tap and needs /dev/net/tun and root or CAP_NET_ADMIN: {e}"));
    assert_eq!(net.tap().map(|t| t.existed), Some(false));
    // Keep the host quiet on this interface (router solicitations and the like).
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let host = packet::bound_socket(&name);

    let mut r = rig(1);
    r.net = net;
    r.activate(V1 | MRG | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_CSUM), 2).unwrap();
    r.settle();

    // Guest to host: a broadcast frame of an experimental ethertype.
    let mut frame = vec![0u8; VNET_HDR_LEN];
    frame.extend([0xff; 6]);
    frame.extend([2, 0, 0, 0xab, 0xcd, 0xef]);
    frame.extend([0x88, 0xb5]);
    frame.extend((0..100u8).map(|i| i ^ 0x5a));
    r.mem.write_slice(&frame, GuestAddress(BUF)).unwrap();
    r.queues[1].add_desc_chains(&[desc(BUF, frame.len() as u32, 0, 0)], 0).unwrap();
    r.kick(1);
    r.settle();
    assert_eq!(packet::recv_ethertype(&host, 0x88b5), frame[VNET_HDR_LEN..]);

    // Host to guest.
    let mut reply = vec![2, 0, 0, 0xab, 0xcd, 0xef, 2, 0, 0, 0, 0, 1, 0x88, 0xb5];
    reply.extend((0..64u8).rev());
    r.queues[0].add_desc_chains(&[desc(BUF + 0x1000, 4096, W, 0), desc(BUF + 0x2000, 4096, W, 0)], 0).unwrap();
    r.kick(0);
    r.settle();
    packet::send(&host, &reply);
    r.settle();
    let delivered = used(&r.queues[0])
        .into_iter()
        .map(|(id, len)| {
            let mut buf = vec![0u8; len as usize];
            r.mem.read_slice(&mut buf, GuestAddress(BUF + 0x1000 * (u64::from(id) + 1))).unwrap();
            buf
        })
        .find(|f| f.len() > VNET_HDR_LEN + 14 && f[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == [0x88, 0xb5]);
    assert_eq!(delivered.expect("the frame reached the guest")[VNET_HDR_LEN..], reply[..]);

    r.reset();
    drop(r);
    assert!(!exists(&name), "the tap Tandem created outlived the device");
}

/// Just enough of an AF_PACKET socket to play the host's network on a tap.
mod packet {
    use std::ffi::CString;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    pub(super) fn bound_socket(ifname: &str) -> File {
        let name = CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated string, read only.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {ifname}");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: no pointers involved.
        let fd = unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto.into())
        };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `sll` is a valid sockaddr_ll of `len` bytes, read only.
        let ret = unsafe { libc::bind(fd.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), len) };
        assert_eq!(ret, 0, "bind: {}", std::io::Error::last_os_error());
        File::from(fd)
    }

    pub(super) fn send(sock: &File, frame: &[u8]) {
        let mut sock = sock;
        assert_eq!(sock.write(frame).unwrap(), frame.len());
    }

    /// The next frame of `ethertype` seen on the interface, within a second.
    pub(super) fn recv_ethertype(sock: &File, ethertype: u16) -> Vec<u8> {
        let mut sock = sock;
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            match sock.read(&mut buf) {
                Ok(n) if n >= 14 && buf[12..14] == ethertype.to_be_bytes() => return buf[..n].to_vec(),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("packet socket: {e}"),
            }
        }
        panic!("no frame of ethertype {ethertype:#06x} on the tap");
    }
}
