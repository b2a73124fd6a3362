#![no_main]
//! virtio-net as a hostile driver meets it: the real device (`Net` over datagram
//! socketpairs standing in for the tap queues) activated with rings the input writes,
//! its worker run on an event loop as the VMM runs it, frames arriving from the host
//! side while the driver posts, lies about and rewrites its rings, resets and starts
//! again with other features.
//!
//! Checked: no panic; the event loop always goes idle (no busy loop on a level-triggered
//! fd); no more chains used than made available, no used id outside the table, transmit
//! chains used with length 0, control chains with at most the ack byte; every frame sent
//! to the host holds a virtio-net header and at most the largest frame; the MAC reads
//! back whatever the driver wrote to the config space.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use devices::virtio::net::{FdBackend, Net, NetBackend, MAX_FRAME_LEN, VNET_HDR_LEN};
use devices::virtio::{ActivatedQueue, GuestMemory, VirtioDevice, VirtioInterrupt, VirtioInterruptType, Worker};
use event_manager::{EventManager, SubscriberId, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use tandem_fuzz::driver::{guest_memory, poke, DriverQueue};
use tandem_fuzz::Input;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x09];
/// Event-loop passes after which a device that still has events is spinning.
const MAX_ROUNDS: usize = 256;

struct Irq;

impl VirtioInterrupt for Irq {
    fn trigger(&self, _kind: VirtioInterruptType) -> std::io::Result<()> {
        Ok(())
    }
}

struct DriverSide {
    index: u16,
    ring: DriverQueue,
    kick: EventFd,
}

struct Rig {
    mem: GuestMemory,
    net: Net,
    hosts: Vec<UnixDatagram>,
    em: EventManager<Worker>,
    worker: Option<SubscriberId>,
    queues: Vec<DriverSide>,
    /// Queue pairs the driver negotiated, and whether it has a control queue.
    pairs: u16,
    ctrl: bool,
}

fn bit(b: u32) -> u64 {
    1 << b
}

impl Rig {
    fn new(pairs: u16) -> Self {
        let (backends, hosts): (Vec<_>, Vec<_>) = (0..pairs)
            .map(|_| {
                let (tap, host) = UnixDatagram::pair().expect("socketpair");
                tap.set_nonblocking(true).expect("nonblocking");
                host.set_nonblocking(true).expect("nonblocking");
                (Box::new(FdBackend::new(tap.into())) as Box<dyn NetBackend>, host)
            })
            .unzip();
        let net = Net::with_backends("fuzz", Some(MAC), backends).expect("net device");
        let em = EventManager::new().expect("event manager");
        Self { mem: guest_memory(), net, hosts, em, worker: None, queues: Vec::new(), pairs: 0, ctrl: false }
    }

    /// Negotiates features and activates with queues the input sets up, as the driver's
    /// DRIVER_OK makes the transport do.
    fn activate(&mut self, input: &mut Input) {
        let mut features = input.u64();
        if input.u8() < 0xf0 {
            features |= bit(VIRTIO_F_VERSION_1);
        }
        self.net.set_acked_features(features & self.net.features());
        let acked = features & self.net.features();
        let mq = acked & bit(VIRTIO_NET_F_MQ) != 0;
        self.pairs = if mq { self.net.queue_pairs() } else { 1 };
        self.ctrl = acked & bit(VIRTIO_NET_F_CTRL_VQ) != 0;
        let event_idx = acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        self.queues.clear();
        let mut activated = Vec::new();
        // The transport hands over the queues the driver enabled, by their index, whatever
        // the features say the layout is.
        let max_sizes = self.net.queue_max_sizes().to_vec();
        for (index, &max) in (0u16..).zip(&max_sizes) {
            if input.u8() >= 0xe0 {
                continue;
            }
            let size = 1u16 << (input.u8() % 9);
            let ring = DriverQueue::new(&self.mem, index, size);
            let Some(queue) = ring.queue(max, event_idx, &self.mem) else { continue };
            let notify = EventFd::new(EFD_NONBLOCK).expect("eventfd");
            let kick = notify.try_clone().expect("eventfd");
            activated.push(ActivatedQueue { index, queue, notify });
            self.queues.push(DriverSide { index, ring, kick });
        }
        let irq: Arc<dyn VirtioInterrupt> = Arc::new(Irq);
        if let Ok(worker) = self.net.activate(self.mem.clone(), irq, activated) {
            self.worker = Some(self.em.add_subscriber(worker));
        }
    }

    /// The driver resets the device: the VMM drops the worker first.
    fn reset(&mut self) {
        if let Some(id) = self.worker.take() {
            drop(self.em.remove_subscriber(id).expect("worker"));
        }
        self.net.reset();
    }

    /// Runs the event loop until nothing is left to do, then checks what the device did.
    fn settle(&mut self) {
        let idle = (0..MAX_ROUNDS).any(|_| self.em.run_with_timeout(0).expect("event loop") == 0);
        assert!(idle, "the worker still had events after {MAX_ROUNDS} event-loop passes: a busy loop");
        for q in &mut self.queues {
            let used = q.ring.take_used(&self.mem);
            let tx = q.index % 2 == 1 && q.index < 2 * self.pairs;
            let ctrl = self.ctrl && q.index == 2 * self.pairs;
            for (id, len) in used {
                assert!(!tx || len == 0, "transmit chain {id} used with length {len}");
                assert!(!ctrl || len <= 1, "control chain {id} used with length {len}");
            }
        }
    }

    /// Reads what the device sent to the host side.
    fn drain(&self) {
        let mut buf = vec![0u8; 2 * MAX_FRAME_LEN];
        for host in &self.hosts {
            while let Ok(n) = host.recv(&mut buf) {
                assert!((VNET_HDR_LEN..=VNET_HDR_LEN + MAX_FRAME_LEN).contains(&n), "a {n}-byte frame reached the tap");
            }
        }
    }

    /// The host side sends a frame (header included) on one queue pair.
    fn host_send(&self, input: &mut Input) {
        let pair = input.below(self.hosts.len() as u64) as usize;
        let len = match input.u8() % 4 {
            0 | 1 => usize::from(input.u8()),
            2 => usize::from(input.u16()),
            _ => VNET_HDR_LEN + MAX_FRAME_LEN - 0x80 + usize::from(input.u8()) * 16,
        };
        let seed = input.u8();
        let frame: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_add(seed)).collect();
        // A full socket (the device is not reading) refuses it, as a tap drops it.
        let _ = self.hosts[pair].send(&frame);
    }

    fn config(&mut self, input: &mut Input) {
        let offset = u64::from(input.u8() % 16);
        let width = input.width();
        if input.bool() {
            let value = input.value(width);
            self.net.write_config(offset, &value);
        }
        let mut mac = [0u8; 6];
        self.net.read_config(0, &mut mac);
        assert_eq!(mac, MAC, "the MAC changed through the config space");
        let mut data = vec![0u8; width];
        self.net.read_config(offset, &mut data);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut rig = Rig::new(1 + input.below(3) as u16);
    rig.activate(&mut input);
    while !input.is_empty() {
        let op = input.u8();
        match op % 16 {
            ring @ 0..=4 => {
                if !rig.queues.is_empty() {
                    let q = input.below(rig.queues.len() as u64) as usize;
                    rig.queues[q].ring.act(&rig.mem, ring, &mut input);
                }
            }
            5 => poke(&rig.mem, &mut input),
            6 | 7 => {
                if !rig.queues.is_empty() {
                    let q = input.below(rig.queues.len() as u64) as usize;
                    let _ = rig.queues[q].kick.write(1);
                }
            }
            8 | 9 => rig.host_send(&mut input),
            10 | 11 => rig.settle(),
            12 => rig.drain(),
            13 => {
                let _ = rig.net.set_link(input.bool());
            }
            14 => rig.config(&mut input),
            _ => {
                rig.settle();
                rig.reset();
                rig.activate(&mut input);
            }
        }
    }
    rig.settle();
    rig.drain();
});
