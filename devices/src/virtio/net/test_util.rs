//! Shared pieces of the virtio-net unit tests: guest RAM, mock queues, a datagram
//! socketpair standing in for the tap, an interrupt that records what it was asked.

use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::{MockError, MockSplitQueue};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::virtio::{GuestMemory, VirtioInterrupt, VirtioInterruptType};

pub(crate) const MEM_SIZE: u64 = 0x40_0000;
/// Where tests put frame buffers: above every mock queue.
pub(crate) const BUF: u64 = 0x10_0000;
/// Queue size of the mock queues.
pub(crate) const QSIZE: u16 = 256;
pub(crate) const NEXT: u16 = VRING_DESC_F_NEXT as u16;

pub(crate) fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// The driver side of a queue: virtio-queue's `MockSplitQueue` writes the descriptor
/// table and the available ring; the used ring is ours.
///
/// MockSplitQueue (virtio-queue 0.18) places its used ring right after the available
/// ring's *entry count* rather than its byte size, so for a queue of N entries the used
/// ring overlaps available entries N/2.. and `used_event`. Tests that fill a whole ring
/// or use EVENT_IDX would read garbage; a used ring of our own, further away, avoids it.
pub(crate) struct DriverQueue<'a> {
    vq: MockSplitQueue<'a, GuestMemory>,
    mem: &'a GuestMemory,
    used_addr: GuestAddress,
}

impl DriverQueue<'_> {
    /// Same as `MockSplitQueue::add_desc_chains`: `descs` go in the table from index
    /// `offset`; each one not preceded by a NEXT descriptor starts an available chain.
    pub(crate) fn add_desc_chains(&self, descs: &[RawDescriptor], offset: u16) -> Result<(), MockError> {
        self.vq.add_desc_chains(descs, offset)
    }

    pub(crate) fn create_queue(&self) -> Result<Queue, virtio_queue::Error> {
        let mut q = Queue::new(QSIZE)?;
        q.set_size(QSIZE);
        q.set_ready(true);
        q.try_set_desc_table_address(self.vq.desc_table_addr())?;
        q.try_set_avail_ring_address(self.vq.avail_addr())?;
        q.try_set_used_ring_address(self.used_addr)?;
        Ok(q)
    }

    /// (id, len) of every used-ring entry so far (at most one lap of the ring).
    pub(crate) fn used(&self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(self.used_addr.unchecked_add(2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = self.used_addr.unchecked_add(4 + 8 * u64::from(i % QSIZE));
                let e: VirtqUsedElem = self.mem.read_obj(at).unwrap();
                (e.id(), e.len())
            })
            .collect()
    }

    /// Sets the available ring's `used_event` (EVENT_IDX): interrupt once the used
    /// index passes `v`.
    pub(crate) fn set_used_event(&self, v: u16) {
        let at = self.vq.avail_addr().unchecked_add(4 + 2 * u64::from(QSIZE));
        self.mem.write_obj(v, at).unwrap();
    }
}

/// Driver queue number `n`: its rings within `n` * 64 KiB + 64 KiB.
pub(crate) fn mock_queue(mem: &GuestMemory, n: u64) -> DriverQueue<'_> {
    let base = GuestAddress(n * 0x1_0000);
    DriverQueue { vq: MockSplitQueue::create(mem, base, QSIZE), mem, used_addr: base.unchecked_add(0x8000) }
}

pub(crate) fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// (id, len) of every used-ring entry so far.
pub(crate) fn used(vq: &DriverQueue<'_>) -> Vec<(u32, u32)> {
    vq.used()
}

/// A non-blocking datagram socketpair: the first end plays the tap queue, the second
/// the host network behind it.
pub(crate) fn datagram_pair() -> (UnixDatagram, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (a, b)
}

/// The next datagram, or None if there is none.
pub(crate) fn recv(sock: &UnixDatagram) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256 * 1024];
    match sock.recv(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            Some(buf)
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("recv: {e}"),
    }
}

/// A frame as the host side delivers it: a 12-byte header with DATA_VALID set and
/// garbage in `num_buffers` (a tap leaves it untouched), then `len` bytes of a
/// recognisable pattern.
pub(crate) fn host_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; super::VNET_HDR_LEN];
    f[0] = virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_DATA_VALID as u8;
    f[10] = 0xee;
    f[11] = 0xee;
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

#[derive(Default)]
pub(crate) struct RecordingInterrupt(pub(crate) Mutex<Vec<VirtioInterruptType>>);

impl RecordingInterrupt {
    pub(crate) fn take(&self) -> Vec<VirtioInterruptType> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        self.0.lock().unwrap().push(kind);
        Ok(())
    }
}
