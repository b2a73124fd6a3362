//! The virtio-net device: what it offers, its configuration space, link control, and
//! activation into a [`NetWorker`].

use std::fmt;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;

use super::backend::NetBackend;
use super::counters::NetCounters;
use super::rx::Rx;
use super::tap::{Tap, TapInfo};
use super::worker::{NetWorker, Pair, QueueSlot};
use super::{format_mac, NetConfig, NetError, CTRL_QUEUE_SIZE, MAX_QUEUE_PAIRS, QUEUE_SIZE};
use crate::notice::{DeviceNotices, Notices};
use crate::virtio::{
    ActivateError, ActivatedQueue, GuestMemory, VirtioDevice, VirtioInterrupt, VirtioInterruptType, Worker,
};

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Offered whatever the queue count: the 12-byte header of VERSION_1, checksum and
/// TCP segmentation offload both ways (the tap does the work on the host side),
/// mergeable receive buffers, MAC and link status, EVENT_IDX and indirect descriptors.
const BASE_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC);
/// With more than one queue pair: the control queue, to choose how many are used.
const MQ_FEATURES: u64 = bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_MQ);

/// Bytes of `struct virtio_net_config` this device gives meaning to: `mac[6]`,
/// status (le16), max_virtqueue_pairs (le16). `mtu` and later fields read as zero
/// (their features are not offered).
const CONFIG_LEN: usize = 10;

/// The offloads the tap may hand the guest, from what the driver accepted.
fn tun_offload(acked: u64) -> u32 {
    let has = |b: u32| acked & bit(b) != 0;
    let mut flags = 0;
    // The kernel refuses TSO without checksum offload, as the spec ties GUEST_TSO* to
    // GUEST_CSUM; a driver breaking that rule gets neither.
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

/// A random unicast, locally administered MAC: 02:xx:xx:xx:xx:xx with 40 random bits
/// (the 0x02 first byte sets the locally-administered bit and clears the multicast
/// one, so it cannot collide with a vendor-assigned address such as QEMU's 52:54:00).
pub fn random_mac() -> io::Result<[u8; 6]> {
    let mut mac = [0x02, 0, 0, 0, 0, 0];
    fill_random(&mut mac[1..])?;
    Ok(mac)
}

/// getrandom(2), or /dev/urandom on kernels without it.
fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which we borrow
    // mutably for the call.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n >= 0 && n as usize == buf.len() {
        return Ok(());
    }
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

fn check_mac(mac: [u8; 6]) -> Result<[u8; 6], NetError> {
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(NetError::InvalidMac(format_mac(&mac)));
    }
    Ok(mac)
}

/// The link status the driver sees, changeable while the VM runs.
#[derive(Clone)]
pub struct NetLink(Arc<LinkShared>);

struct LinkShared {
    up: AtomicBool,
    /// The active driver's interrupt, for the configuration-change notification.
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
}

impl NetLink {
    fn new() -> Self {
        Self(Arc::new(LinkShared { up: AtomicBool::new(true), interrupt: Mutex::new(None) }))
    }

    pub fn is_up(&self) -> bool {
        self.0.up.load(Ordering::SeqCst)
    }

    /// Sets the link status (VIRTIO_NET_S_LINK_UP) and, if it changed while a driver
    /// runs, tells it with a configuration-change interrupt. Frames keep flowing
    /// either way: this is what the guest is told, as when a cable is pulled on a
    /// real NIC whose driver then stops using it.
    /// `Err` when the driver could not be told; the status has changed all the same.
    pub fn set_up(&self, up: bool) -> io::Result<()> {
        let interrupt = self.0.interrupt.lock().unwrap_or_else(|e| e.into_inner());
        if self.0.up.swap(up, Ordering::SeqCst) != up {
            if let Some(irq) = interrupt.as_ref() {
                irq.trigger(VirtioInterruptType::Config)?;
            }
        }
        Ok(())
    }

    fn set_interrupt(&self, interrupt: Option<Arc<dyn VirtioInterrupt>>) {
        *self.0.interrupt.lock().unwrap_or_else(|e| e.into_inner()) = interrupt;
    }
}

impl fmt::Debug for NetLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetLink").field("up", &self.is_up()).finish()
    }
}

/// A virtio-net device.
pub struct Net {
    log: DeviceNotices,
    mac: [u8; 6],
    /// One per queue pair; each activation's worker gets duplicates.
    backends: Vec<Box<dyn NetBackend>>,
    tap: Option<TapInfo>,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    link: NetLink,
    counters: Arc<NetCounters>,
    /// The driver acked VIRTIO_NET_F_STANDBY (readable from other threads).
    standby_acked: Arc<AtomicBool>,
    /// Told each time a driver that acked STANDBY brings the device up.
    standby_listener: Option<StandbyListener>,
}

/// Called (on the vCPU thread that set DRIVER_OK, with the device locked: hand the news
/// on and return) when the guest's driver has negotiated VIRTIO_NET_F_STANDBY and
/// started the device: its failover master exists, so the paired VF may be shown to it.
pub type StandbyListener = Arc<dyn Fn() + Send + Sync>;

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("name", &self.log.name())
            .field("mac", &format_mac(&self.mac))
            .field("queue_pairs", &self.backends.len())
            .field("tap", &self.tap)
            .field("acked_features", &format_args!("{:#x}", self.acked_features))
            .field("link", &self.link)
            .finish()
    }
}

impl Net {
    /// A NIC on the tap `config.tap`, opened (or created) now so that permission and
    /// naming problems surface when the VM is built, not when the guest boots.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        check_queue_pairs(usize::from(config.queue_pairs))?;
        let mac = match config.mac {
            Some(mac) => check_mac(mac)?,
            None => random_mac().map_err(NetError::Random)?,
        };
        let (info, queues) = Tap::open(&config.tap, config.queue_pairs)?.into_queues();
        let backends = queues.into_iter().map(|q| Box::new(q) as Box<dyn NetBackend>).collect();
        let mut net = Self::build(info.name.clone(), mac, backends);
        net.tap = Some(info);
        if config.standby {
            net.offer_standby();
        }
        Ok(net)
    }

    /// A NIC whose host side is any [`NetBackend`] — one per queue pair — e.g. a
    /// datagram socketpair in tests. `label` names it in logs.
    pub fn with_backends(
        label: &str,
        mac: Option<[u8; 6]>,
        backends: Vec<Box<dyn NetBackend>>,
    ) -> Result<Self, NetError> {
        check_queue_pairs(backends.len())?;
        let mac = match mac {
            Some(mac) => check_mac(mac)?,
            None => random_mac().map_err(NetError::Random)?,
        };
        Ok(Self::build(label.to_string(), mac, backends))
    }

    /// Where the device's warnings go (dropped until this is called).
    pub fn set_notices(&mut self, notices: Notices) {
        self.log = DeviceNotices::new(self.log.name(), notices);
    }

    fn build(label: String, mac: [u8; 6], backends: Vec<Box<dyn NetBackend>>) -> Self {
        let pairs = backends.len();
        let mut avail_features = BASE_FEATURES;
        let mut queue_sizes = vec![QUEUE_SIZE; 2 * pairs];
        if pairs > 1 {
            avail_features |= MQ_FEATURES;
            queue_sizes.push(CTRL_QUEUE_SIZE);
        }
        Self {
            log: DeviceNotices::new(format!("virtio-net {label}"), Notices::discard()),
            mac,
            backends,
            tap: None,
            avail_features,
            acked_features: 0,
            queue_sizes,
            link: NetLink::new(),
            counters: Arc::new(NetCounters::default()),
            standby_acked: Arc::new(AtomicBool::new(false)),
            standby_listener: None,
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Offers VIRTIO_NET_F_STANDBY (see [`NetConfig::standby`]).
    pub fn offer_standby(&mut self) {
        self.avail_features |= bit(VIRTIO_NET_F_STANDBY);
    }

    /// Sets who hears of a driver that negotiated STANDBY (see [`StandbyListener`]).
    pub fn set_standby_listener(&mut self, listener: StandbyListener) {
        self.standby_listener = Some(listener);
    }

    /// Whether the driver accepted VIRTIO_NET_F_STANDBY: it will pair this NIC with a VF
    /// of the same MAC, so the VF may be shown to it (a guest without net_failover would
    /// see two unrelated NICs with one MAC).
    pub fn standby_negotiated(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.standby_acked)
    }

    pub fn queue_pairs(&self) -> u16 {
        // check_queue_pairs() bounds it by MAX_QUEUE_PAIRS.
        self.backends.len() as u16
    }

    /// The tap and how it was found (None for [`Net::with_backends`]).
    pub fn tap(&self) -> Option<&TapInfo> {
        self.tap.as_ref()
    }

    /// The device's counters, readable from any thread while the VM runs.
    pub fn counters(&self) -> Arc<NetCounters> {
        Arc::clone(&self.counters)
    }

    /// A handle to change the link status later from any thread.
    pub fn link(&self) -> NetLink {
        self.link.clone()
    }

    /// Same as `self.link().set_up(up)`.
    pub fn set_link(&self, up: bool) -> io::Result<()> {
        self.link.set_up(up)
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut cfg = [0u8; CONFIG_LEN];
        cfg[..6].copy_from_slice(&self.mac);
        let status = if self.link.is_up() { VIRTIO_NET_S_LINK_UP as u16 } else { 0 };
        cfg[6..8].copy_from_slice(&status.to_le_bytes());
        cfg[8..10].copy_from_slice(&self.queue_pairs().to_le_bytes());
        cfg
    }

    pub(super) fn activate_worker(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<NetWorker, ActivateError> {
        let acked = self.acked_features;
        let has = |b: u32| acked & bit(b) != 0;
        let features_error = |reason: &str| ActivateError::Features { features: acked, reason: reason.to_string() };
        if !has(VIRTIO_F_VERSION_1) {
            return Err(features_error(
                "VIRTIO_F_VERSION_1 is required (only the 12-byte virtio_net_hdr_v1 is spoken)",
            ));
        }
        if has(VIRTIO_NET_F_MQ) && !has(VIRTIO_NET_F_CTRL_VQ) {
            return Err(features_error("VIRTIO_NET_F_MQ needs VIRTIO_NET_F_CTRL_VQ"));
        }
        // Queue layout (spec 5.1.2): rx0, tx0, ... rx(N-1), tx(N-1), then the control
        // queue, where N is 1 unless MQ was negotiated.
        let pairs = if has(VIRTIO_NET_F_MQ) { self.backends.len() } else { 1 };
        let queue_count = 2 * pairs + usize::from(has(VIRTIO_NET_F_CTRL_VQ));
        let got = queues.len();
        let event_idx = has(VIRTIO_RING_F_EVENT_IDX);
        let mut slots: Vec<Option<QueueSlot>> = (0..queue_count).map(|_| None).collect();
        for q in queues {
            // Queues past the negotiated layout have no use; dropping them is harmless.
            if let Some(slot) = slots.get_mut(usize::from(q.index)) {
                let mut queue = q.queue;
                queue.set_event_idx(event_idx);
                *slot = Some(QueueSlot::new(q.index, queue, q.notify));
            }
        }
        if slots[0].is_none() || slots[1].is_none() {
            return Err(ActivateError::QueueCount { expected: queue_count, got });
        }

        // The first pair only, until the driver asks for more (spec 5.1.6.5.5). The
        // other tap queues are detached so the host does not steer frames to them.
        for (i, backend) in self.backends.iter().enumerate() {
            backend.set_queue_enabled(i == 0).map_err(ActivateError::Backend)?;
        }
        self.backends[0].set_offload(tun_offload(acked)).map_err(ActivateError::Backend)?;

        let (mergeable, guest_csum) = (has(VIRTIO_NET_F_MRG_RXBUF), has(VIRTIO_NET_F_GUEST_CSUM));
        let ctrl = if has(VIRTIO_NET_F_CTRL_VQ) { slots.pop().flatten() } else { None };
        let mut slots = slots.into_iter();
        let mut worker_pairs = Vec::with_capacity(pairs);
        for (i, backend) in self.backends[..pairs].iter().enumerate() {
            let (rx, tx) = (slots.next().flatten(), slots.next().flatten());
            let backend = backend.duplicate().map_err(ActivateError::Backend)?;
            worker_pairs.push(Pair::new(rx, tx, backend, Rx::new(mergeable, guest_csum), i == 0));
        }

        self.link.set_interrupt(Some(Arc::clone(&interrupt)));
        if has(VIRTIO_NET_F_STANDBY) {
            if let Some(listener) = &self.standby_listener {
                listener();
            }
        }
        Ok(NetWorker::new(self.log.clone(), mem, interrupt, Arc::clone(&self.counters), worker_pairs, ctrl))
    }
}

fn check_queue_pairs(n: usize) -> Result<(), NetError> {
    if n == 0 || n > usize::from(MAX_QUEUE_PAIRS) {
        return Err(NetError::InvalidQueuePairs(n));
    }
    Ok(())
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
        self.standby_acked.store(self.acked_features & bit(VIRTIO_NET_F_STANDBY) != 0, Ordering::Release);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only for a VERSION_1 driver: only legacy drivers wrote
        // `mac`, and the MAC is changed through the control queue (CTRL_MAC_ADDR,
        // not offered). Ignored.
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<Worker, ActivateError> {
        Ok(Box::new(self.activate_worker(mem, interrupt, queues)?))
    }

    fn reset(&mut self) {
        // The worker, with its duplicated fds, is gone; ours keep the tap (and its
        // queues) alive for the next activation.
        self.acked_features = 0;
        self.standby_acked.store(false, Ordering::Release);
        self.link.set_interrupt(None);
    }
}
