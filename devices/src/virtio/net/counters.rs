//! Per-device traffic and error counters, shared between the worker (which counts)
//! and the VMM (which reads them at any time, from any thread).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one virtio-net device. The worker updates them with relaxed atomics;
/// [`NetCounters::snapshot`] reads them all (each value is exact, the set is not one
/// instant — good enough for statistics).
#[derive(Debug, Default)]
pub struct NetCounters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    tx_dropped: AtomicU64,
    rx_no_buffers: AtomicU64,
    tx_tap_full: AtomicU64,
    malformed_chains: AtomicU64,
    ctrl_rejected: AtomicU64,
    backend_errors: AtomicU64,
}

/// A copy of [`NetCounters`] at one moment. Bytes count Ethernet frames, without the
/// virtio-net header.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames the guest sent that the tap accepted.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames read from the tap but not delivered: larger than the guest's buffer
    /// (without VIRTIO_NET_F_MRG_RXBUF a frame must fit one chain) or than any valid
    /// frame, or shorter than a virtio-net header.
    pub rx_dropped: u64,
    /// Frames the guest sent that the tap refused (bad header, interface down) or that
    /// could not be sent because the tap is gone.
    pub tx_dropped: u64,
    /// Times reception paused because the driver had posted no receive buffers
    /// (frames then wait in the tap's queue; the kernel drops them if it overflows).
    pub rx_no_buffers: u64,
    /// Times transmission paused because the tap could take no more (EAGAIN); it
    /// resumes when the tap is writable again. Nothing is dropped.
    pub tx_tap_full: u64,
    /// Descriptor chains rejected as malformed on any queue (wrong direction, too short
    /// or too long, outside guest RAM, a broken or looping chain); each is returned to
    /// the driver with length 0 when its head index allows.
    pub malformed_chains: u64,
    /// Control-queue commands answered VIRTIO_NET_ERR.
    pub ctrl_rejected: u64,
    /// Unexpected errors from the tap or the event loop (the details go to stderr).
    pub backend_errors: u64,
}

/// Each `add_*` returns the new total, which the worker uses to rate-limit its logs.
impl NetCounters {
    /// One frame of `bytes` (header excluded) delivered to the guest.
    pub(super) fn count_rx(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    /// One frame of `bytes` (header excluded) sent to the tap.
    pub(super) fn count_tx(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub(super) fn add_rx_dropped(&self) -> u64 {
        self.rx_dropped.fetch_add(1, Ordering::Relaxed) + 1
    }
    pub(super) fn add_tx_dropped(&self) -> u64 {
        self.tx_dropped.fetch_add(1, Ordering::Relaxed) + 1
    }
    pub(super) fn add_rx_no_buffers(&self) -> u64 {
        self.rx_no_buffers.fetch_add(1, Ordering::Relaxed) + 1
    }
    pub(super) fn add_tx_tap_full(&self) -> u64 {
        self.tx_tap_full.fetch_add(1, Ordering::Relaxed) + 1
    }
    pub(super) fn add_malformed(&self) -> u64 {
        self.malformed_chains.fetch_add(1, Ordering::Relaxed) + 1
    }
    pub(super) fn add_ctrl_rejected(&self) -> u64 {
        self.ctrl_rejected.fetch_add(1, Ordering::Relaxed) + 1
    }
    pub(super) fn add_backend_error(&self) -> u64 {
        self.backend_errors.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn snapshot(&self) -> NetStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            rx_dropped: get(&self.rx_dropped),
            tx_dropped: get(&self.tx_dropped),
            rx_no_buffers: get(&self.rx_no_buffers),
            tx_tap_full: get(&self.tx_tap_full),
            malformed_chains: get(&self.malformed_chains),
            ctrl_rejected: get(&self.ctrl_rejected),
            backend_errors: get(&self.backend_errors),
        }
    }
}
