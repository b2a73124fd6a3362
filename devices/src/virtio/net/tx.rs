//! The transmit queue: each chain is a `virtio_net_hdr_v1` followed by a frame, all in
//! device-readable descriptors, sent to the tap with one `writev` straight from guest
//! RAM (the tap's vnet header is the same 12 bytes, so nothing is rewritten).

use std::io;
use std::os::fd::BorrowedFd;

use virtio_queue::{Error as QueueError, Queue, QueueOwnedT, QueueT};

use super::backend::{writev, IoVecs};
use super::chain::{parse, return_chain, Malformed};
use super::counters::NetCounters;
use super::{MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::notice::DeviceNotices;
use crate::virtio::GuestMemory;

/// Why transmission stopped.
#[derive(Debug)]
pub(super) enum TxStop {
    /// The driver has nothing more to send (notifications are back on).
    Drained,
    /// The tap returned EAGAIN. The chain it refused is back in the available ring
    /// (un-popped); the caller waits for EPOLLOUT. Notifications stay off meanwhile.
    TapFull,
    /// `budget` chains were handled; more may be waiting. The caller reschedules, so
    /// that one busy queue does not starve the event loop's other devices.
    Budget,
    /// The queue itself is unusable (ring outside guest RAM, avail index beyond the
    /// queue size): it stays ignored until the driver resets the device.
    Broken(QueueError),
}

#[derive(Debug)]
pub(super) struct TxOutcome {
    pub(super) stop: TxStop,
    /// Chains put in the used ring (each already reported to `completed_chain`).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) completed: usize,
}

/// Sends what the driver queued, up to `budget` chains. `completed_chain` runs after
/// each chain goes to the used ring: the caller signals the driver there (if it asked
/// to be told, EVENT_IDX), so that it can reuse buffers while later frames are still
/// being sent — each write to the tap also runs the host's receive path, so waiting
/// for the end of a long batch would hold completions back for all of it.
pub(super) fn process_tx(
    mem: &GuestMemory,
    queue: &mut Queue,
    tap: BorrowedFd<'_>,
    counters: &NetCounters,
    budget: usize,
    log: &DeviceNotices,
    completed_chain: &mut dyn FnMut(&mut Queue),
) -> TxOutcome {
    let mut completed = 0;
    let mut attempts = 0;
    let stop = 'outer: loop {
        // With EVENT_IDX this is a no-op: the driver only notifies past avail_event,
        // which enable_notification below moves.
        if let Err(e) = queue.disable_notification(mem) {
            break TxStop::Broken(e);
        }
        let mut popped = 0;
        loop {
            if attempts >= budget {
                break 'outer TxStop::Budget;
            }
            let chain = match queue.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => break 'outer TxStop::Broken(e),
            };
            let Some(chain) = chain else { break };
            popped += 1;
            attempts += 1;
            let head = chain.head_index();
            let parsed = parse(mem, chain, VNET_HDR_LEN + MAX_FRAME_LEN).and_then(|p| {
                if p.writable_descs > 0 {
                    Err(Malformed::Direction)
                } else if p.readable_len < VNET_HDR_LEN {
                    Err(Malformed::TooShort)
                } else {
                    Ok(p)
                }
            });
            let p = match parsed {
                Ok(p) => p,
                Err(m) => {
                    let n = counters.add_malformed();
                    log.recurring(n, format_args!("transmit chain {head} rejected: {m}"));
                    match return_chain(mem, queue, head, 0) {
                        Ok(added) => completed += usize::from(added),
                        Err(e) => break 'outer TxStop::Broken(e),
                    }
                    completed_chain(queue);
                    continue;
                }
            };
            let mut iov = IoVecs::new();
            iov.push_segments(&p.readable);
            match writev(tap, &iov) {
                Ok(_) => counters.count_tx(p.readable_len - VNET_HDR_LEN),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Not consumed: the same chain is first in line when the tap drains.
                    queue.go_to_previous_position();
                    counters.add_tx_tap_full();
                    break 'outer TxStop::TapFull;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    queue.go_to_previous_position();
                    continue;
                }
                Err(e) => {
                    // EINVAL for a header the tap rejects, EIO while the interface is
                    // down, EBADFD once it is gone: the frame cannot be sent, ever.
                    let n = counters.add_tx_dropped();
                    log.recurring(n, format_args!("the tap refused a frame: {e}"));
                }
            }
            // A device-readable-only chain: nothing written, used length 0.
            match return_chain(mem, queue, head, 0) {
                Ok(added) => completed += usize::from(added),
                Err(e) => break 'outer TxStop::Broken(e),
            }
            completed_chain(queue);
        }
        match queue.enable_notification(mem) {
            // More chains raced in while notifications were off: go again. If the last
            // round found none although the ring says otherwise, the ring is lying
            // (unreadable entries); stop rather than spin.
            Ok(true) if popped > 0 => continue,
            Ok(_) => break TxStop::Drained,
            Err(e) => break TxStop::Broken(e),
        }
    };
    TxOutcome { stop, completed }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::net::test_util::*;

    fn run(mem: &GuestMemory, q: &mut Queue, tap: BorrowedFd<'_>, c: &NetCounters) -> TxOutcome {
        process_tx(mem, q, tap, c, 64, &DeviceNotices::default(), &mut |_| {})
    }

    #[test]
    fn a_frame_reaches_the_backend_bytes_exact() {
        let mem = guest_memory();
        let vq = mock_queue(&mem, 0);
        let mut q = vq.create_queue().unwrap();
        let (tap, peer) = datagram_pair();
        let counters = NetCounters::default();

        // Header and frame split across three descriptors, the way Linux posts them.
        let hdr = [0x01u8, 0, 0, 0, 0, 0, 14, 0, 16, 0, 0, 0];
        let frame: Vec<u8> = (0..200u8).collect();
        mem.write_slice(&hdr, GuestAddress(BUF)).unwrap();
        mem.write_slice(&frame[..50], GuestAddress(BUF + 0x1000)).unwrap();
        mem.write_slice(&frame[50..], GuestAddress(BUF + 0x2000)).unwrap();
        vq.add_desc_chains(
            &[desc(BUF, 12, NEXT, 1), desc(BUF + 0x1000, 50, NEXT, 2), desc(BUF + 0x2000, 150, 0, 0)],
            0,
        )
        .unwrap();

        let out = run(&mem, &mut q, tap.as_fd(), &counters);
        assert!(matches!(out.stop, TxStop::Drained), "{out:?}");
        assert_eq!(out.completed, 1);
        let mut expected = hdr.to_vec();
        expected.extend_from_slice(&frame);
        assert_eq!(recv(&peer).unwrap(), expected);
        assert_eq!(used(&vq), vec![(0, 0)]);
        let s = counters.snapshot();
        assert_eq!((s.tx_packets, s.tx_bytes), (1, 200));
    }

    #[test]
    fn malformed_chains_are_returned_empty_and_counted() {
        let mem = guest_memory();
        let vq = mock_queue(&mem, 0);
        let mut q = vq.create_queue().unwrap();
        let (tap, peer) = datagram_pair();
        let counters = NetCounters::default();
        const W: u16 = VRING_DESC_F_WRITE as u16;
        vq.add_desc_chains(
            &[
                // 0: a write-only descriptor.
                desc(BUF, 100, W, 0),
                // 1: shorter than the header.
                desc(BUF, 11, 0, 0),
                // 2: longer than header + 64 KiB frame.
                desc(BUF, (VNET_HDR_LEN + MAX_FRAME_LEN + 1) as u32, 0, 0),
                // 3: outside guest RAM.
                desc(MEM_SIZE - 8, 100, 0, 0),
                // 4: a valid frame among them.
                desc(BUF, 60, 0, 0),
                // 5: next index out of range (the table has 256 entries).
                desc(BUF, 100, VRING_DESC_F_NEXT as u16, 300),
            ],
            0,
        )
        .unwrap();

        let out = run(&mem, &mut q, tap.as_fd(), &counters);
        assert!(matches!(out.stop, TxStop::Drained), "{out:?}");
        assert_eq!(used(&vq), vec![(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0)]);
        assert_eq!(recv(&peer).unwrap().len(), 60);
        assert!(recv(&peer).is_none(), "only the valid frame is sent");
        let s = counters.snapshot();
        assert_eq!((s.malformed_chains, s.tx_packets), (5, 1));
    }

    #[test]
    fn a_full_backend_stops_and_keeps_the_chain() {
        let mem = guest_memory();
        let vq = mock_queue(&mem, 0);
        let mut q = vq.create_queue().unwrap();
        let (tap, peer) = datagram_pair();
        let counters = NetCounters::default();

        // Post more than the socket buffers (1 MiB; its peer reads nothing meanwhile).
        let chains: Vec<_> = (0..QSIZE).map(|_| desc(BUF, 4096, 0, 0)).collect();
        vq.add_desc_chains(&chains, 0).unwrap();
        let out = run(&mem, &mut q, tap.as_fd(), &counters);
        assert!(matches!(out.stop, TxStop::TapFull), "{out:?}");
        let sent = out.completed;
        assert!(sent > 0 && sent < usize::from(QSIZE), "sent {sent}");
        assert_eq!(counters.snapshot().tx_tap_full, 1);
        assert!(recv(&peer).is_some());
        let mut received = 1;

        // Draining the peer makes room; each refused chain goes first, nothing is lost.
        loop {
            while recv(&peer).is_some() {
                received += 1;
            }
            let out = run(&mem, &mut q, tap.as_fd(), &counters);
            match out.stop {
                TxStop::TapFull | TxStop::Budget => continue,
                TxStop::Drained => break,
                _ => panic!("{out:?}"),
            }
        }
        while recv(&peer).is_some() {
            received += 1;
        }
        assert_eq!(received, usize::from(QSIZE));
        let ids: Vec<u32> = used(&vq).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, (0..u32::from(QSIZE)).collect::<Vec<_>>());
        assert_eq!(counters.snapshot().tx_packets, u64::from(QSIZE));
    }

    #[test]
    fn the_budget_bounds_one_call() {
        let mem = guest_memory();
        let vq = mock_queue(&mem, 0);
        let mut q = vq.create_queue().unwrap();
        let (tap, peer) = datagram_pair();
        let counters = NetCounters::default();
        vq.add_desc_chains(&[desc(BUF, 20, 0, 0), desc(BUF, 20, 0, 0), desc(BUF, 20, 0, 0)], 0).unwrap();
        let out = process_tx(&mem, &mut q, tap.as_fd(), &counters, 2, &DeviceNotices::default(), &mut |_| {});
        assert!(matches!(out.stop, TxStop::Budget) && out.completed == 2, "{out:?}");
        let out = process_tx(&mem, &mut q, tap.as_fd(), &counters, 2, &DeviceNotices::default(), &mut |_| {});
        assert!(matches!(out.stop, TxStop::Drained) && out.completed == 1, "{out:?}");
        drop(peer);
    }

    #[test]
    fn each_chain_is_reported_as_it_completes() {
        let mem = guest_memory();
        let vq = mock_queue(&mem, 0);
        let mut q = vq.create_queue().unwrap();
        let (tap, peer) = datagram_pair();
        let counters = NetCounters::default();
        // One malformed chain (write-only) between two good ones: all three complete.
        const W: u16 = VRING_DESC_F_WRITE as u16;
        vq.add_desc_chains(&[desc(BUF, 20, 0, 0), desc(BUF, 20, W, 0), desc(BUF, 20, 0, 0)], 0).unwrap();
        let mut seen = Vec::new();
        let out =
            process_tx(&mem, &mut q, tap.as_fd(), &counters, 64, &DeviceNotices::default(), &mut |q: &mut Queue| {
                seen.push(q.next_used())
            });
        assert!(matches!(out.stop, TxStop::Drained), "{out:?}");
        // The used index had already moved past each chain when the caller heard of it.
        assert_eq!(seen, vec![1, 2, 3]);
        drop(peer);
    }

    #[test]
    fn a_refusing_backend_drops_and_counts() {
        let mem = guest_memory();
        let vq = mock_queue(&mem, 0);
        let mut q = vq.create_queue().unwrap();
        let (tap, peer) = datagram_pair();
        drop(peer); // writes now fail with ECONNREFUSED
        let counters = NetCounters::default();
        vq.add_desc_chains(&[desc(BUF, 20, 0, 0)], 0).unwrap();
        let out = run(&mem, &mut q, tap.as_fd(), &counters);
        assert!(matches!(out.stop, TxStop::Drained), "{out:?}");
        assert_eq!(used(&vq), vec![(0, 0)]);
        assert_eq!(counters.snapshot().tx_dropped, 1);
    }
}
