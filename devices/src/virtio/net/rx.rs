//! The receive queue: frames read from the tap land straight in the driver's
//! device-writable buffers with one `readv`.
//!
//! Chains popped from the ring are *held* until a frame fills them. The `readv` offers
//! the held chains (all of them with VIRTIO_NET_F_MRG_RXBUF, the first one without)
//! followed by a host spill buffer large enough for any frame, so a read never
//! truncates:
//! - the frame fits the held chains: no copy; the chains it filled go to the used ring
//!   and `num_buffers` (in the first one's header) says how many;
//! - it spills, with MRG_RXBUF: the chains it filled are kept, the rest is copied from
//!   the spill buffer into further chains — waiting for the driver to post them if
//!   needed (the tap is not read meanwhile, so order is kept);
//! - it spills, without MRG_RXBUF: one chain must hold the whole frame, so it is
//!   dropped and counted, and the chain stays held for the next frame.

use std::collections::VecDeque;
use std::io;
use std::os::fd::BorrowedFd;

use virtio_queue::{Error as QueueError, Queue, QueueOwnedT, QueueT};

use super::backend::{readv, IoVecs};
use super::chain::{parse, return_chain, write_at, Malformed, Segment, MAX_SEGMENTS};
use super::counters::NetCounters;
use super::{MAX_FRAME_LEN, NUM_BUFFERS_OFFSET, VNET_HDR_LEN};
use crate::notice::DeviceNotices;
use crate::virtio::GuestMemory;

/// With MRG_RXBUF, chains are gathered until they can hold the largest frame, so that
/// even a 64 KiB GSO frame usually lands without a copy.
const GATHER_TARGET: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// The spill buffer: larger than any valid frame, so that a read which fills it is
/// known to be oversized (possibly truncated) rather than delivered cut short.
const SPILL_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN + 4096;

/// A receive chain popped from the ring, waiting for (or partly holding) a frame.
#[derive(Debug)]
struct RxChain {
    head: u16,
    segs: Vec<Segment>,
    capacity: usize,
    /// Bytes of the current frame in this chain.
    filled: usize,
}

/// A frame whose head is in the first `chains` held chains and whose remaining
/// `spill[pos..end]` waits for more chains.
#[derive(Debug, Clone, Copy)]
struct Partial {
    chains: usize,
    frame_len: usize,
    pos: usize,
    end: usize,
}

/// Why reception stopped.
#[derive(Debug)]
pub(super) enum RxStop {
    /// The tap has no frame (EAGAIN): wait for EPOLLIN.
    TapEmpty,
    /// The driver has posted no buffer (notifications are on): stop reading the tap
    /// until the driver notifies the queue.
    NoBuffers,
    /// `budget` frames were read; the tap may have more (a level-triggered EPOLLIN
    /// brings us back after the event loop's other work).
    Budget,
    /// The tap returned an unexpected error: stop reading it until the next notification.
    Backend(io::Error),
    /// The queue is unusable until the driver resets the device.
    Broken(QueueError),
}

#[derive(Debug)]
pub(super) struct RxOutcome {
    pub(super) stop: RxStop,
    pub(super) completed: usize,
}

enum Flow {
    Continue,
    Stop(RxStop),
}

/// The receive state of one queue pair.
#[derive(Debug)]
pub(super) struct Rx {
    mergeable: bool,
    /// VIRTIO_NET_F_GUEST_CSUM was negotiated. Without it the header's `flags` must be
    /// zero (spec 5.1.6.4.1), but a tap may still set DATA_VALID: we clear it.
    guest_csum: bool,
    held: VecDeque<RxChain>,
    partial: Option<Partial>,
    spill: Box<[u8]>,
}

impl Rx {
    pub(super) fn new(mergeable: bool, guest_csum: bool) -> Self {
        let spill = vec![0u8; SPILL_LEN].into_boxed_slice();
        Self { mergeable, guest_csum, held: VecDeque::new(), partial: None, spill }
    }

    /// Moves frames from `tap` to the driver, up to `budget` reads.
    pub(super) fn process(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        tap: BorrowedFd<'_>,
        counters: &NetCounters,
        budget: usize,
        log: &DeviceNotices,
    ) -> RxOutcome {
        let mut completed = 0;
        let mut reads = 0;
        let mut retried = false;
        let stop = loop {
            let have_buffers = match self.fill(mem, queue, counters, log, &mut completed) {
                Ok(popped) => {
                    if popped {
                        retried = false;
                    }
                    self.partial.is_none() && !self.held.is_empty()
                }
                Err(e) => break RxStop::Broken(e),
            };
            if !have_buffers {
                // Out of buffers (or a spilled frame still waiting for some): ask the
                // driver to notify when it posts more, then check for a race with it.
                match queue.enable_notification(mem) {
                    // One more round if buffers raced in; if that finds none although
                    // the ring says otherwise, the ring is unreadable: stop, don't spin.
                    Ok(true) if !retried => {
                        retried = true;
                        continue;
                    }
                    Ok(_) => {
                        counters.add_rx_no_buffers();
                        break RxStop::NoBuffers;
                    }
                    Err(e) => break RxStop::Broken(e),
                }
            }
            if reads >= budget {
                break RxStop::Budget;
            }
            reads += 1;
            match self.read_frame(mem, queue, tap, counters, log, &mut completed) {
                Flow::Continue => {}
                Flow::Stop(stop) => break stop,
            }
        };
        RxOutcome { stop, completed }
    }

    /// Pops chains until there are enough to read into, and finishes a spilled frame
    /// if chains allow. Returns whether any chain was popped.
    fn fill(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        counters: &NetCounters,
        log: &DeviceNotices,
        completed: &mut usize,
    ) -> Result<bool, QueueError> {
        let mut popped = false;
        loop {
            if let Some(p) = self.partial {
                if self.held.len() > p.chains {
                    self.continue_spill(mem, queue, counters, completed)?;
                    continue;
                }
            } else if self.enough_held() {
                return Ok(popped);
            }
            if !self.pop_chain(mem, queue, counters, log, completed)? {
                return Ok(popped);
            }
            popped = true;
        }
    }

    fn enough_held(&self) -> bool {
        if !self.mergeable {
            return !self.held.is_empty();
        }
        let capacity: usize = self.held.iter().map(|c| c.capacity).sum();
        let segments: usize = self.held.iter().map(|c| c.segs.len()).sum();
        capacity >= GATHER_TARGET || segments >= MAX_SEGMENTS - 1
    }

    /// Pops the next valid chain into `held`, returning malformed ones empty. Returns
    /// false when the ring is empty.
    fn pop_chain(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        counters: &NetCounters,
        log: &DeviceNotices,
        completed: &mut usize,
    ) -> Result<bool, QueueError> {
        loop {
            let Some(chain) = queue.iter(mem)?.next() else { return Ok(false) };
            let head = chain.head_index();
            let parsed = parse(mem, chain, u32::MAX as usize).and_then(|p| {
                if p.readable_descs > 0 {
                    Err(Malformed::Direction)
                } else if p.writable_len < VNET_HDR_LEN {
                    // Even a merged buffer must hold a whole header (spec 5.1.6.3.1).
                    Err(Malformed::TooShort)
                } else if p.writable.len() > MAX_SEGMENTS - 1 {
                    // One iovec is the spill buffer's.
                    Err(Malformed::TooManySegments)
                } else {
                    Ok(p)
                }
            });
            match parsed {
                Ok(p) => {
                    self.held.push_back(RxChain { head, segs: p.writable, capacity: p.writable_len, filled: 0 });
                    return Ok(true);
                }
                Err(m) => {
                    let n = counters.add_malformed();
                    log.recurring(n, format_args!("receive chain {head} rejected: {m}"));
                    *completed += usize::from(return_chain(mem, queue, head, 0)?);
                }
            }
        }
    }

    /// Copies the spilled part of the pending frame into the next held chain, and
    /// completes the frame when nothing is left.
    fn continue_spill(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        counters: &NetCounters,
        completed: &mut usize,
    ) -> Result<(), QueueError> {
        let Some(mut p) = self.partial else { return Ok(()) };
        if let Some(chain) = self.held.get_mut(p.chains) {
            let take = chain.capacity.min(p.end - p.pos);
            // Cannot fall short: parse() validated the chain's memory.
            write_at(mem, &chain.segs, 0, &self.spill[p.pos..p.pos + take]);
            chain.filled = take;
            p.chains += 1;
            p.pos += take;
        }
        if p.pos == p.end {
            self.partial = None;
            self.complete(mem, queue, p.chains, p.frame_len, counters, completed)?;
        } else {
            self.partial = Some(p);
        }
        Ok(())
    }

    /// Reads one frame into the held chains (and the spill buffer).
    fn read_frame(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        tap: BorrowedFd<'_>,
        counters: &NetCounters,
        log: &DeviceNotices,
        completed: &mut usize,
    ) -> Flow {
        let mut iov = IoVecs::new();
        let mut offered = 0;
        let mut guest_capacity = 0;
        for chain in &self.held {
            if iov.len() + chain.segs.len() > MAX_SEGMENTS - 1 {
                break;
            }
            iov.push_segments(&chain.segs);
            guest_capacity += chain.capacity;
            offered += 1;
            if !self.mergeable {
                break;
            }
        }
        let spill_len = self.spill.len();
        iov.push_host(&mut self.spill);
        let n = match readv(tap, &mut iov) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flow::Stop(RxStop::TapEmpty),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Flow::Continue,
            Err(e) => return Flow::Stop(RxStop::Backend(e)),
        };
        if n < VNET_HDR_LEN || n >= guest_capacity + spill_len {
            let n_drop = counters.add_rx_dropped();
            log.recurring(n_drop, format_args!("dropped a received frame of {n} bytes: no valid frame has that size"));
            return Flow::Continue;
        }
        if n > guest_capacity {
            if !self.mergeable {
                let n_drop = counters.add_rx_dropped();
                log.recurring(
                    n_drop,
                    format_args!(
                        "dropped a received frame of {n} bytes: the driver's buffer holds {guest_capacity} and \
                         VIRTIO_NET_F_MRG_RXBUF is off"
                    ),
                );
                return Flow::Continue;
            }
            for chain in self.held.iter_mut().take(offered) {
                chain.filled = chain.capacity;
            }
            self.partial = Some(Partial { chains: offered, frame_len: n, pos: 0, end: n - guest_capacity });
            return Flow::Continue;
        }
        let mut left = n;
        let mut chains = 0;
        for chain in self.held.iter_mut() {
            chain.filled = left.min(chain.capacity);
            left -= chain.filled;
            chains += 1;
            if left == 0 {
                break;
            }
        }
        match self.complete(mem, queue, chains, n, counters, completed) {
            Ok(()) => Flow::Continue,
            Err(e) => Flow::Stop(RxStop::Broken(e)),
        }
    }

    /// Hands the first `chains` held chains, holding one frame of `frame_len` bytes, to
    /// the driver.
    fn complete(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        chains: usize,
        frame_len: usize,
        counters: &NetCounters,
        completed: &mut usize,
    ) -> Result<(), QueueError> {
        if let Some(first) = self.held.front() {
            // `chains` is at most the queue size, so it fits. Written before the chains
            // are made used, so the driver never sees a stale count.
            let num_buffers = u16::try_from(chains).unwrap_or(u16::MAX);
            write_at(mem, &first.segs, NUM_BUFFERS_OFFSET, &num_buffers.to_le_bytes());
            if !self.guest_csum {
                write_at(mem, &first.segs, 0, &[0]);
            }
        }
        for _ in 0..chains {
            let Some(chain) = self.held.pop_front() else { break };
            // filled <= capacity <= u32::MAX (parse() bounds a chain's length).
            let len = u32::try_from(chain.filled).unwrap_or(u32::MAX);
            *completed += usize::from(return_chain(mem, queue, chain.head, len)?);
        }
        counters.count_rx(frame_len - VNET_HDR_LEN);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixDatagram;

    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::net::test_util::*;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    struct Bed {
        mem: GuestMemory,
        counters: NetCounters,
        tap: UnixDatagram,
        host: UnixDatagram,
    }

    fn bed() -> Bed {
        let (tap, host) = datagram_pair();
        Bed { mem: guest_memory(), counters: NetCounters::default(), tap, host }
    }

    fn read_guest(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn num_buffers(mem: &GuestMemory, addr: u64) -> u16 {
        u16::from_le_bytes(read_guest(mem, addr + 10, 2).try_into().unwrap())
    }

    #[test]
    fn a_frame_fills_one_chain_without_mrg_rxbuf() {
        let b = bed();
        let vq = mock_queue(&b.mem, 0);
        let mut q: Queue = vq.create_queue().unwrap();
        // A header descriptor then a data descriptor, as Linux's big-packet mode posts.
        vq.add_desc_chains(&[desc(BUF, 12, W | NEXT, 1), desc(BUF + 0x1000, 2000, W, 0)], 0).unwrap();
        let frame = host_frame(1500, 3);
        b.host.send(&frame).unwrap();

        // Without GUEST_CSUM, the header's flags (DATA_VALID from the tap) are cleared.
        let mut rx = Rx::new(false, false);
        let out = rx.process(&b.mem, &mut q, b.tap.as_fd(), &b.counters, 64, &DeviceNotices::default());
        assert!(matches!(out.stop, RxStop::NoBuffers), "{out:?}");
        assert_eq!(out.completed, 1);
        assert_eq!(used(&vq), vec![(0, 1512)]);
        assert_eq!(num_buffers(&b.mem, BUF), 1);
        assert_eq!(read_guest(&b.mem, BUF, 1), [0]);
        assert_eq!(read_guest(&b.mem, BUF + 1, 9), frame[1..10]);
        assert_eq!(read_guest(&b.mem, BUF + 0x1000, 1500), frame[12..]);
        let s = b.counters.snapshot();
        assert_eq!((s.rx_packets, s.rx_bytes, s.rx_no_buffers), (1, 1500, 1));
    }

    #[test]
    fn a_frame_too_big_for_the_chain_is_dropped_without_mrg_rxbuf() {
        let b = bed();
        let vq = mock_queue(&b.mem, 0);
        let mut q: Queue = vq.create_queue().unwrap();
        vq.add_desc_chains(&[desc(BUF, 1000, W, 0)], 0).unwrap();
        b.host.send(&host_frame(1500, 1)).unwrap();
        b.host.send(&host_frame(100, 2)).unwrap();

        let mut rx = Rx::new(false, true);
        let out = rx.process(&b.mem, &mut q, b.tap.as_fd(), &b.counters, 64, &DeviceNotices::default());
        assert!(matches!(out.stop, RxStop::NoBuffers), "{out:?}");
        // The big frame is dropped; the chain then takes the small one.
        assert_eq!(used(&vq), vec![(0, 112)]);
        assert_eq!(read_guest(&b.mem, BUF + 12, 100), host_frame(100, 2)[12..]);
        let s = b.counters.snapshot();
        assert_eq!((s.rx_dropped, s.rx_packets), (1, 1));
    }

    #[test]
    fn merged_buffers_carry_num_buffers() {
        let b = bed();
        let vq = mock_queue(&b.mem, 0);
        let mut q: Queue = vq.create_queue().unwrap();
        // Four 1 KiB buffers, like Linux's mergeable mode (one descriptor each).
        let chains: Vec<_> = (0..4).map(|i| desc(BUF + i * 0x1000, 1024, W, 0)).collect();
        vq.add_desc_chains(&chains, 0).unwrap();
        let big = host_frame(2500, 9); // 2512 bytes: three buffers
        let small = host_frame(60, 4); // 72 bytes: the fourth
        b.host.send(&big).unwrap();
        b.host.send(&small).unwrap();

        let mut rx = Rx::new(true, true);
        let out = rx.process(&b.mem, &mut q, b.tap.as_fd(), &b.counters, 64, &DeviceNotices::default());
        assert!(matches!(out.stop, RxStop::NoBuffers), "{out:?}");
        assert_eq!(used(&vq), vec![(0, 1024), (1, 1024), (2, 464), (3, 72)]);
        assert_eq!(num_buffers(&b.mem, BUF), 3);
        assert_eq!(num_buffers(&b.mem, BUF + 0x3000), 1);
        assert_eq!(read_guest(&b.mem, BUF, 10), big[..10], "GUEST_CSUM: the tap's flags stand");
        let mut got = read_guest(&b.mem, BUF, 1024);
        got.extend(read_guest(&b.mem, BUF + 0x1000, 1024));
        got.extend(read_guest(&b.mem, BUF + 0x2000, 464));
        assert_eq!(got[12..], big[12..]);
        assert_eq!(read_guest(&b.mem, BUF + 0x3000 + 12, 60), small[12..]);
        let s = b.counters.snapshot();
        assert_eq!((s.rx_packets, s.rx_bytes), (2, 2560));
    }

    #[test]
    fn a_spilled_frame_waits_for_more_buffers() {
        let b = bed();
        let vq = mock_queue(&b.mem, 0);
        let mut q: Queue = vq.create_queue().unwrap();
        vq.add_desc_chains(&[desc(BUF, 1024, W, 0)], 0).unwrap();
        let big = host_frame(3000, 5); // 3012 bytes
        let next = host_frame(40, 6);
        b.host.send(&big).unwrap();
        b.host.send(&next).unwrap();

        let mut rx = Rx::new(true, true);
        let out = rx.process(&b.mem, &mut q, b.tap.as_fd(), &b.counters, 64, &DeviceNotices::default());
        assert!(matches!(out.stop, RxStop::NoBuffers) && out.completed == 0, "{out:?}");
        assert!(used(&vq).is_empty(), "nothing is used before the whole frame is in");

        // The driver posts three more buffers: the rest of the frame is copied in, then
        // the next frame (which waited in the tap) takes the last one.
        vq.add_desc_chains(&[desc(BUF + 0x1000, 1024, W, 0), desc(BUF + 0x2000, 1024, W, 0)], 1).unwrap();
        vq.add_desc_chains(&[desc(BUF + 0x3000, 1024, W, 0)], 3).unwrap();
        let out = rx.process(&b.mem, &mut q, b.tap.as_fd(), &b.counters, 64, &DeviceNotices::default());
        assert!(matches!(out.stop, RxStop::NoBuffers), "{out:?}");
        assert_eq!(used(&vq), vec![(0, 1024), (1, 1024), (2, 964), (3, 52)]);
        assert_eq!(num_buffers(&b.mem, BUF), 3);
        let mut got = read_guest(&b.mem, BUF, 1024);
        got.extend(read_guest(&b.mem, BUF + 0x1000, 1024));
        got.extend(read_guest(&b.mem, BUF + 0x2000, 964));
        assert_eq!(got[12..], big[12..]);
        assert_eq!(read_guest(&b.mem, BUF + 0x3000 + 12, 40), next[12..]);
    }

    #[test]
    fn an_empty_tap_and_malformed_chains() {
        let b = bed();
        let vq = mock_queue(&b.mem, 0);
        let mut q: Queue = vq.create_queue().unwrap();
        vq.add_desc_chains(
            &[
                desc(BUF, 100, 0, 0),          // device-readable
                desc(BUF, 11, W, 0),           // shorter than a header
                desc(MEM_SIZE - 8, 100, W, 0), // outside RAM
                desc(BUF, 2048, W, 0),         // valid
                desc(BUF, 100, W | NEXT, 300), // next out of range
            ],
            0,
        )
        .unwrap();
        let mut rx = Rx::new(true, true);
        let out = rx.process(&b.mem, &mut q, b.tap.as_fd(), &b.counters, 64, &DeviceNotices::default());
        assert!(matches!(out.stop, RxStop::TapEmpty), "{out:?}");
        assert_eq!(used(&vq), vec![(0, 0), (1, 0), (2, 0), (4, 0)]);
        assert_eq!(b.counters.snapshot().malformed_chains, 4);

        // The valid chain is held for the next frame.
        let frame = host_frame(64, 8);
        b.host.send(&frame).unwrap();
        let out = rx.process(&b.mem, &mut q, b.tap.as_fd(), &b.counters, 64, &DeviceNotices::default());
        assert!(matches!(out.stop, RxStop::NoBuffers), "{out:?}");
        assert_eq!(used(&vq)[4], (3, 76));
    }
}
