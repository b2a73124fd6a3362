//! The device model: opening images, features, configuration space, activation, reset,
//! and when the driver is interrupted.

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_OK,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_USED_F_NO_NOTIFY};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::block::BlockError;
use crate::virtio::ActivateError;

const OK: u8 = VIRTIO_BLK_S_OK as u8;

fn open(path: &std::path::Path, readonly: bool) -> Result<Block, BlockError> {
    Block::new(BlockConfig { path: path.to_owned(), readonly, direct: false, id: String::new() })
}

#[test]
fn refuses_unusable_images_with_clear_errors() {
    let missing = std::path::Path::new("/tmp/tandem-blk-test-does-not-exist");
    let e = open(missing, false).unwrap_err();
    assert!(matches!(e, BlockError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("does-not-exist"), "{e}");

    let dir = std::env::temp_dir();
    let e = open(&dir, false).unwrap_err();
    assert!(matches!(e, BlockError::NotADisk { kind: "directory", .. }), "{e}");
    let e = open(std::path::Path::new("/dev/null"), true).unwrap_err();
    assert!(matches!(e, BlockError::NotADisk { kind: "character device", .. }), "{e}");

    let odd = TempFile::new_with_prefix("/tmp/tandem-blk-test-").unwrap();
    odd.as_file().set_len(1000).unwrap();
    let e = open(odd.as_path(), false).unwrap_err();
    assert!(matches!(e, BlockError::SizeNotAligned { size: 1000, .. }), "{e}");
    assert!(e.to_string().contains("truncate"), "{e}");

    let empty = TempFile::new_with_prefix("/tmp/tandem-blk-test-").unwrap();
    assert!(matches!(open(empty.as_path(), false), Err(BlockError::Empty { .. })));
}

#[test]
fn one_writer_per_image() {
    let img = image(8);
    let first = open(img.as_path(), false).unwrap();
    assert!(matches!(open(img.as_path(), false), Err(BlockError::Locked { .. })));
    assert!(matches!(open(img.as_path(), true), Err(BlockError::Locked { .. })));
    drop(first);
    let reader = open(img.as_path(), true).unwrap();
    assert!(open(img.as_path(), true).is_ok(), "readers share");
    assert!(matches!(open(img.as_path(), false), Err(BlockError::Locked { .. })));
    drop(reader);
}

#[test]
fn features_and_config_space() {
    let h = Harness::new();
    let b = &h.block;
    assert_eq!(b.device_type(), VIRTIO_ID_BLOCK);
    assert_eq!(b.queue_max_sizes(), &[256]);
    let f = b.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
    ] {
        assert_ne!(f & 1 << bit, 0, "feature {bit}");
    }
    assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);

    let read = |offset: u64, len: usize| {
        let mut buf = vec![0xffu8; len];
        b.read_config(offset, &mut buf);
        buf
    };
    assert_eq!(read(0, 8), 64u64.to_le_bytes());
    assert_eq!(read(12, 4), 254u32.to_le_bytes());
    assert_eq!(read(20, 4), 512u32.to_le_bytes());
    // Any offset and width, including past the end and overflowing offsets.
    assert_eq!(read(0, 1), [64]);
    assert_eq!(read(1, 3), [0, 0, 0]);
    assert_eq!(read(95, 4), [0, 0, 0, 0]);
    assert_eq!(read(4096, 2), [0, 0]);
    assert_eq!(read(u64::MAX, 8), [0; 8]);
    assert_eq!(read(0, 0), Vec::<u8>::new());
    if f & 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_DISCARD != 0 {
        assert_eq!(read(36, 4), (1u32 << 21).to_le_bytes(), "max_discard_sectors");
        assert_eq!(read(40, 4), 32u32.to_le_bytes(), "max_discard_seg");
        assert_eq!(read(56, 1), [1], "write_zeroes_may_unmap");
    }
    // Writes are ignored.
    let before = read(0, 96);
    let mut b2 = Harness::new().block;
    b2.write_config(0, &[1, 2, 3, 4, 5, 6, 7, 8]);
    b2.write_config(32, &[1]);
    b2.write_config(u64::MAX, &[1]);
    let mut after = vec![0u8; 96];
    b2.read_config(0, &mut after);
    assert_eq!(before, after);
}

#[test]
fn acked_features_are_masked_and_reset_clears_them() {
    let img = image(8);
    let mut b = open(img.as_path(), false).unwrap();
    b.set_acked_features(u64::MAX);
    assert_eq!(b.acked_features(), b.features());
    b.reset();
    assert_eq!(b.acked_features(), 0);
}

#[test]
fn activation_checks_queues_and_version() {
    let h = Harness::new();
    let mut block = open(image(8).as_path(), false).unwrap();
    let queue = || {
        let q: Queue = h.vq.create_queue().unwrap();
        ActivatedQueue { index: 0, queue: q, notify: EventFd::new(EFD_NONBLOCK).unwrap() }
    };
    block.set_acked_features(block.features() & !(1 << VIRTIO_F_VERSION_1));
    assert!(matches!(block.activate(h.mem.clone(), h.irq.clone(), vec![queue()]), Err(ActivateError::Features { .. })));
    block.set_acked_features(block.features());
    assert!(matches!(
        block.activate(h.mem.clone(), h.irq.clone(), vec![queue(), queue()]),
        Err(ActivateError::QueueCount { expected: 1, got: 2 })
    ));
    assert!(matches!(block.activate(h.mem.clone(), h.irq.clone(), vec![]), Err(ActivateError::QueueCount { .. })));
    assert!(block.activate(h.mem.clone(), h.irq.clone(), vec![queue()]).is_ok());
}

/// After a reset the device can be negotiated and activated again on fresh queues.
#[test]
fn reset_and_reactivate() {
    let mut h = Harness::new();
    let (status, _) = h.one(|h| h.write_req(0, 3, &[0x33; 512]));
    assert_eq!(status, OK);
    h.block.reset();
    let Harness { block, worker, image, .. } = h;
    drop(worker);
    let features = block.features();
    let mut h = Harness::with(image, block, features);
    let (status, _) = h.one(|h| h.read_req(0, 3, 512));
    assert_eq!(status, OK);
    assert_eq!(h.data(0, 512), [0x33; 512]);
    assert_eq!(h.stats().requests, 2, "counters survive resets");
}

fn used_event_addr(h: &Harness) -> GuestAddress {
    GuestAddress(h.vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE))
}

fn avail_event(h: &Harness) -> u16 {
    h.mem.read_obj(GuestAddress(h.vq.used_addr().0 + 4 + 8 * u64::from(QSIZE))).unwrap()
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut h = Harness::new();
    assert_ne!(h.block.acked_features() & 1 << VIRTIO_RING_F_EVENT_IDX, 0);
    // used_event = 0: interrupt when the used index moves past 0.
    h.mem.write_obj(0u16, used_event_addr(&h)).unwrap();
    h.read_req(0, 1, 512);
    h.run();
    assert_eq!((h.used_idx(), h.irq.count()), (1, 1));
    assert_eq!(avail_event(&h), 1, "the device asks to be kicked for the next request");

    // Still used_event = 0: the driver does not want to hear about entry 1.
    h.read_req(0, 1, 512);
    h.run();
    assert_eq!((h.used_idx(), h.irq.count()), (2, 1));

    // used_event = 3: two requests in one drain cross it; one interrupt for both.
    h.mem.write_obj(3u16, used_event_addr(&h)).unwrap();
    h.read_req(0, 1, 512);
    h.read_req(1, 2, 512);
    h.run();
    assert_eq!((h.used_idx(), h.irq.count()), (4, 2));
    assert_eq!(avail_event(&h), 4);
    assert_eq!(h.stats().interrupts, 2);

    // A notification with nothing to do raises nothing.
    h.run();
    assert_eq!(h.irq.count(), 2);
}

#[test]
fn without_event_idx_one_interrupt_per_drain() {
    let img = image(16);
    let block = open(img.as_path(), false).unwrap();
    let acked = block.features() & !(1 << VIRTIO_RING_F_EVENT_IDX);
    let mut h = Harness::with(img, block, acked);
    for slot in 0..3 {
        h.read_req(slot, slot, 512);
    }
    h.run();
    assert_eq!((h.used_idx(), h.irq.count()), (3, 1));
    let used_flags: u16 = h.mem.read_obj(h.vq.used_addr()).unwrap();
    assert_eq!(used_flags & VRING_USED_F_NO_NOTIFY as u16, 0, "notifications are re-enabled after the drain");
    h.run();
    assert_eq!(h.irq.count(), 1);
}

/// The worker as the VMM runs it: registered with an event manager, woken by the queue's
/// eventfd.
#[test]
fn worker_runs_from_the_event_loop() {
    let mut h = Harness::new();
    let mut block = open(image(8).as_path(), false).unwrap();
    block.set_acked_features(block.features());
    let notify = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = notify.try_clone().unwrap();
    let queue: Queue = h.vq.create_queue().unwrap();
    let worker =
        block.activate(h.mem.clone(), h.irq.clone(), vec![ActivatedQueue { index: 0, queue, notify }]).unwrap();

    let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().unwrap();
    em.add_subscriber(worker);
    assert_eq!(em.run_with_timeout(0).unwrap(), 0, "nothing happens before a kick");

    let head = h.read_req(0, 2, 512);
    kick.write(1).unwrap();
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.used(0), (u32::from(head), 513));
    assert_eq!(h.status(0), OK);
    assert_eq!(h.data(0, 512), [2u8; 512]);
    assert_eq!(h.irq.count(), 1);
    // The kick was consumed: no further wake-ups.
    assert_eq!(em.run_with_timeout(0).unwrap(), 0);
}
