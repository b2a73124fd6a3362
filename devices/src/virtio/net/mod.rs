//! virtio-net: a NIC whose host side is a Linux tap interface.
//!
//! - [`Net`] (device.rs) is the [`VirtioDevice`](super::VirtioDevice): features, the
//!   configuration space (MAC, link status, queue pairs), link control, activation.
//! - tap.rs opens and configures the tap (`/dev/net/tun`): vnet header, offloads,
//!   multi-queue, link up. backend.rs is what the worker needs from it — an fd it can
//!   `readv`/`writev` and wait on, plus a few tap controls — so that unit tests can put
//!   a datagram socketpair in its place.
//! - chain.rs turns a descriptor chain into host segments and rejects malformed ones;
//!   tx.rs, rx.rs and ctrl.rs process the transmit, receive and control queues.
//! - worker.rs is the event-loop half: it waits on the queue notifications and on each
//!   queue pair's tap fd, and signals the driver once per drain.
//!
//! Frames move between guest RAM and the tap with `readv`/`writev` straight on the
//! guest's buffers; the only copies are a received frame larger than the buffers the
//! driver had posted when it was read (the rest is parked in a host buffer until more
//! arrive) and the 2-byte `num_buffers` field.
//!
//! Everything runs on the VMM's one event loop thread: no extra threads, no polling.

mod backend;
mod chain;
mod counters;
mod ctrl;
mod device;
mod rx;
mod tap;
mod tx;
mod worker;

#[cfg(test)]
mod test_util;
#[cfg(test)]
mod tests;

pub use backend::{FdBackend, NetBackend};
pub use counters::{NetCounters, NetStats};
pub use device::{random_mac, Net, NetLink, StandbyListener};
pub use tap::{Tap, TapError, TapInfo, TapQueue};

/// Size of each receive and transmit queue offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the control queue (one command in flight is what drivers use).
pub const CTRL_QUEUE_SIZE: u16 = 64;
/// The most queue pairs a device may have: the tun driver's limit on queues per tap.
pub const MAX_QUEUE_PAIRS: u16 = 256;

/// `struct virtio_net_hdr_v1`: with VIRTIO_F_VERSION_1 every frame, in both
/// directions, starts with this 12-byte header (it includes `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` (le16) in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// The largest Ethernet frame either side may send: 64 KiB of GSO payload (the TSO
/// limit) plus a 14-byte Ethernet header.
pub const MAX_FRAME_LEN: usize = 65_536 + 14;

const _: () = assert!(std::mem::size_of::<virtio_bindings::virtio_net::virtio_net_hdr_v1>() == VNET_HDR_LEN);

/// What to attach as a virtio-net NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The host tap interface: opened if it exists (a persistent tap, say, with its
    /// bridge already set up), otherwise created for as long as the device lives.
    pub tap: String,
    /// The guest's MAC address; `None` picks a random locally administered one.
    pub mac: Option<[u8; 6]>,
    /// Receive/transmit queue pairs, 1 to [`MAX_QUEUE_PAIRS`]; more than one offers
    /// VIRTIO_NET_F_MQ and opens one tap queue per pair.
    pub queue_pairs: u16,
    /// Offer VIRTIO_NET_F_STANDBY: the NIC is the standby of a passthrough VF with the
    /// same MAC, and the guest (Linux's net_failover) pairs the two under one master.
    pub standby: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("MAC address {0} is not a unicast address (the low bit of its first byte is set, or it is all zeros)")]
    InvalidMac(String),
    #[error("virtio-net needs 1 to {MAX_QUEUE_PAIRS} queue pairs, not {0}")]
    InvalidQueuePairs(usize),
    #[error("cannot draw a random MAC address: {0}")]
    Random(#[source] std::io::Error),
}

/// Formats a MAC address the usual way (`02:1a:...`).
pub fn format_mac(mac: &[u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}
