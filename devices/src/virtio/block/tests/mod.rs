//! Tests for virtio-blk, driven from the driver's side through virtio-queue's
//! MockSplitQueue against a temporary image file.

mod device;
mod disk;
mod io;
mod malformed;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

use super::worker::BlockWorker;
use super::{Block, BlockConfig, BlockStats};
use crate::virtio::{ActivatedQueue, VirtioDevice, VirtioInterrupt, VirtioInterruptType};

pub(super) const MEM_SIZE: u64 = 0x40_0000;
pub(super) const QSIZE: u16 = 16;
/// Sentinel left in a status byte to see whether the device wrote it.
pub(super) const UNTOUCHED: u8 = 0xaa;

/// Counts the queue interrupts the device raises.
#[derive(Default)]
pub(super) struct Irq(AtomicUsize);

impl Irq {
    pub(super) fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for Irq {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        assert_eq!(kind, VirtioInterruptType::Queue(0));
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Buffers of request slot `n`: header, status and up to 64 KiB of data, apart from
/// every other slot's.
pub(super) fn hdr_addr(slot: u64) -> u64 {
    0x1_0000 + slot * 0x100
}
pub(super) fn status_addr(slot: u64) -> u64 {
    0x1_8000 + slot * 0x10
}
pub(super) fn data_addr(slot: u64) -> u64 {
    0x2_0000 + slot * 0x1_0000
}

/// An image of `sectors` sectors whose sector `i` is filled with byte `i`.
pub(super) fn image(sectors: u64) -> TempFile {
    let file = TempFile::new_with_prefix("/tmp/tandem-blk-test-").expect("temp file");
    let data: Vec<u8> = (0..sectors).flat_map(|i| [i as u8; 512]).collect();
    std::os::unix::fs::FileExt::write_all_at(file.as_file(), &data, 0).expect("fill image");
    file
}

pub(super) fn config(image: &TempFile) -> BlockConfig {
    BlockConfig { path: image.as_path().to_owned(), readonly: false, direct: false, id: "tandem-disk-0".into() }
}

pub(super) fn file_bytes(image: &TempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(image.as_file(), &mut buf, offset).expect("read image");
    buf
}

/// A driver's view of one activated virtio-blk device.
pub(super) struct Harness {
    /// Leaked so that the mock queue, which borrows it, can live next to the device.
    pub(super) mem: &'static GuestMemoryMmap,
    pub(super) vq: MockSplitQueue<'static, GuestMemoryMmap>,
    pub(super) block: Block,
    pub(super) worker: BlockWorker,
    pub(super) irq: Arc<Irq>,
    pub(super) image: TempFile,
    next_desc: u16,
}

impl Harness {
    /// A 64-sector disk with every offered feature accepted.
    pub(super) fn new() -> Self {
        let image = image(64);
        let block = Block::new(config(&image)).expect("open image");
        let features = block.features();
        Self::with(image, block, features)
    }

    pub(super) fn with(image: TempFile, mut block: Block, acked: u64) -> Self {
        let mem: &'static GuestMemoryMmap =
            Box::leak(Box::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("mem")));
        let vq = MockSplitQueue::create(mem, GuestAddress(0), QSIZE);
        let queue: Queue = vq.create_queue().expect("queue");
        let notify = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let irq = Arc::new(Irq::default());
        block.set_acked_features(acked);
        let worker = block
            .build_worker(mem.clone(), irq.clone(), vec![ActivatedQueue { index: 0, queue, notify }])
            .expect("activate");
        Self { mem, vq, block, worker, irq, image, next_desc: 0 }
    }

    pub(super) fn stats(&self) -> BlockStats {
        self.block.counters().snapshot()
    }

    /// Stores `descs` at the next free table slots, linking them with NEXT unless
    /// `link` is false (then flags and next are used as given); returns the head index.
    pub(super) fn store_descs(&mut self, descs: &[Descriptor], link: bool) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (head + i as u16) % QSIZE;
            let (mut flags, mut next) = (d.flags(), d.next());
            if link {
                flags &= !(VRING_DESC_F_NEXT as u16);
                next = 0;
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                    next = (index + 1) % QSIZE;
                }
            }
            let raw = RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), flags, next));
            self.vq.desc_table().store(index, raw).expect("store descriptor");
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        head
    }

    /// Makes `head` available to the device.
    pub(super) fn publish(&self, head: u16) {
        let idx = self.vq.avail().idx().load();
        self.vq.avail().ring().ref_at(usize::from(idx % QSIZE)).expect("avail slot").store(head);
        self.vq.avail().idx().store(idx.wrapping_add(1));
    }

    /// Adds and publishes a chain of (address, length, device-writable) buffers.
    pub(super) fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let descs: Vec<_> = bufs.iter().map(|&(addr, len, w)| desc(addr, len, w)).collect();
        let head = self.store_descs(&descs, true);
        self.publish(head);
        head
    }

    pub(super) fn write_header(&self, addr: u64, kind: u32, sector: u64) {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&hdr, GuestAddress(addr)).expect("header");
    }

    /// Prepares slot `slot`: header and a status byte holding [`UNTOUCHED`].
    pub(super) fn prepare(&self, slot: u64, kind: u32, sector: u64) {
        self.write_header(hdr_addr(slot), kind, sector);
        self.mem.write_obj(UNTOUCHED, GuestAddress(status_addr(slot))).expect("status");
    }

    /// A read of `len` bytes at `sector` using slot `slot`'s buffers.
    pub(super) fn read_req(&mut self, slot: u64, sector: u64, len: u32) -> u16 {
        self.prepare(slot, VIRTIO_BLK_T_IN, sector);
        self.add_chain(&[(hdr_addr(slot), 16, false), (data_addr(slot), len, true), (status_addr(slot), 1, true)])
    }

    /// A write of `data` at `sector` using slot `slot`'s buffers.
    pub(super) fn write_req(&mut self, slot: u64, sector: u64, data: &[u8]) -> u16 {
        self.prepare(slot, VIRTIO_BLK_T_OUT, sector);
        self.mem.write_slice(data, GuestAddress(data_addr(slot))).expect("data");
        self.add_chain(&[
            (hdr_addr(slot), 16, false),
            (data_addr(slot), data.len() as u32, false),
            (status_addr(slot), 1, true),
        ])
    }

    pub(super) fn run(&mut self) {
        self.worker.process_queue();
    }

    pub(super) fn status(&self, slot: u64) -> u8 {
        self.mem.read_obj(GuestAddress(status_addr(slot))).expect("status")
    }

    pub(super) fn data(&self, slot: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(data_addr(slot))).expect("data");
        buf
    }

    pub(super) fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    /// The `n`th used element: (head, length).
    pub(super) fn used(&self, n: u16) -> (u32, u32) {
        let elem = self.vq.used().ring().ref_at(usize::from(n % QSIZE)).expect("used slot").load();
        (elem.id(), elem.len())
    }

    /// Runs one chain built by `build` through the device; returns (status, used length).
    pub(super) fn one(&mut self, build: impl FnOnce(&mut Self) -> u16) -> (u8, u32) {
        let before = self.used_idx();
        let head = build(self);
        self.run();
        assert_eq!(self.used_idx(), before.wrapping_add(1), "the chain was not returned");
        let (id, len) = self.used(before);
        assert_eq!(id, u32::from(head));
        (self.status(0), len)
    }
}

pub(super) fn desc(addr: u64, len: u32, writable: bool) -> Descriptor {
    Descriptor::new(addr, len, if writable { VRING_DESC_F_WRITE as u16 } else { 0 }, 0)
}
