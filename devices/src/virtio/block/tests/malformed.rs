//! Malformed chains: each is refused with IOERR when there is a status byte to say so,
//! or returned untouched (used length 0) when there is not, and the device carries on.

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};

use super::*;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;

/// Runs `build` and checks the outcome, then checks that the image is unchanged and that
/// a good request still goes through afterwards.
fn check(expect: (u8, u32), build: impl FnOnce(&mut Harness) -> u16) -> Harness {
    let mut h = Harness::new();
    let (status, len) = h.one(build);
    assert_eq!((status, len), expect);
    assert_eq!(file_bytes(&h.image, 0, 64 * 512), (0..64u8).flat_map(|i| [i; 512]).collect::<Vec<_>>());
    let stats = h.stats();
    assert_eq!((stats.errors, stats.malformed), (1, 1));
    h.read_req(1, 7, 512);
    h.run();
    assert_eq!(h.status(1), OK, "the device must carry on after a malformed chain");
    assert_eq!(h.data(1, 512), [7u8; 512]);
    h
}

const REJECTED: (u8, u32) = (IOERR, 1);
/// Status byte untouched, nothing reported written.
const DROPPED: (u8, u32) = (UNTOUCHED, 0);

fn hdr(h: &Harness, kind: u32, sector: u64) {
    h.prepare(0, kind, sector);
}

#[test]
fn header_too_short() {
    check(REJECTED, |h| {
        hdr(h, VIRTIO_BLK_T_IN, 0);
        h.add_chain(&[(hdr_addr(0), 8, false), (data_addr(0), 512, true), (status_addr(0), 1, true)])
    });
}

#[test]
fn no_readable_header_at_all() {
    check(REJECTED, |h| h.add_chain(&[(data_addr(0), 512, true), (status_addr(0), 1, true)]));
}

#[test]
fn read_with_device_readable_data() {
    check(REJECTED, |h| {
        hdr(h, VIRTIO_BLK_T_IN, 0);
        h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(0), 512, false), (status_addr(0), 1, true)])
    });
}

#[test]
fn write_with_device_writable_data() {
    let h = check(REJECTED, |h| {
        hdr(h, VIRTIO_BLK_T_OUT, 0);
        h.mem.write_slice(&[0x77; 512], GuestAddress(data_addr(0))).unwrap();
        h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(0), 512, true), (status_addr(0), 1, true)])
    });
    assert_eq!(h.data(0, 512), [0x77; 512], "the guest buffer must not be written either");
}

#[test]
fn readable_after_writable() {
    check(REJECTED, |h| {
        hdr(h, VIRTIO_BLK_T_OUT, 0);
        h.add_chain(&[
            (hdr_addr(0), 16, false),
            (data_addr(0), 512, true),
            (data_addr(0) + 512, 512, false),
            (status_addr(0), 1, true),
        ])
    });
}

#[test]
fn status_not_writable() {
    check(DROPPED, |h| {
        hdr(h, VIRTIO_BLK_T_IN, 0);
        h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(0), 512, true), (status_addr(0), 1, false)])
    });
}

#[test]
fn status_missing() {
    check(DROPPED, |h| {
        hdr(h, VIRTIO_BLK_T_OUT, 0);
        h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(0), 512, false)])
    });
}

#[test]
fn status_empty() {
    check(DROPPED, |h| {
        hdr(h, VIRTIO_BLK_T_IN, 0);
        h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(0), 512, true), (status_addr(0), 0, true)])
    });
}

#[test]
fn status_outside_guest_memory() {
    check(DROPPED, |h| {
        hdr(h, VIRTIO_BLK_T_IN, 0);
        h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(0), 512, true), (MEM_SIZE, 1, true)])
    });
    check(DROPPED, |h| {
        hdr(h, VIRTIO_BLK_T_IN, 0);
        h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(0), 512, true), (u64::MAX, 1, true)])
    });
}

#[test]
fn data_outside_guest_memory() {
    // Straddling the end of RAM, far beyond it, and wrapping the address space.
    for addr in [MEM_SIZE - 256, 1 << 40, u64::MAX - 100] {
        check(REJECTED, |h| {
            hdr(h, VIRTIO_BLK_T_IN, 0);
            h.add_chain(&[(hdr_addr(0), 16, false), (addr, 512, true), (status_addr(0), 1, true)])
        });
        check(REJECTED, |h| {
            hdr(h, VIRTIO_BLK_T_OUT, 0);
            h.add_chain(&[(hdr_addr(0), 16, false), (addr, 512, false), (status_addr(0), 1, true)])
        });
    }
}

#[test]
fn header_outside_guest_memory() {
    check(REJECTED, |h| h.add_chain(&[(MEM_SIZE + 0x1000, 16, false), (status_addr(0), 1, true)]));
}

#[test]
fn length_not_a_multiple_of_512() {
    for len in [1, 511, 513, 1000] {
        check(REJECTED, |h| h.read_req(0, 0, len));
        check(REJECTED, |h| h.write_req(0, 0, &vec![9; len as usize]));
    }
}

#[test]
fn zero_length_data() {
    check(REJECTED, |h| {
        hdr(h, VIRTIO_BLK_T_IN, 0);
        h.add_chain(&[(hdr_addr(0), 16, false), (status_addr(0), 1, true)])
    });
    check(REJECTED, |h| {
        hdr(h, VIRTIO_BLK_T_OUT, 0);
        h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(0), 0, false), (status_addr(0), 1, true)])
    });
}

#[test]
fn descriptor_loop() {
    check(DROPPED, |h| {
        hdr(h, VIRTIO_BLK_T_IN, 0);
        // 0 -> 1 -> 2 -> 1 -> ...
        let head = h.store_descs(
            &[
                Descriptor::new(hdr_addr(0), 16, N, 1),
                Descriptor::new(data_addr(0), 512, W | N, 2),
                Descriptor::new(status_addr(0), 1, W | N, 1),
            ],
            false,
        );
        h.publish(head);
        head
    });
}

#[test]
fn next_index_out_of_range() {
    check(DROPPED, |h| {
        hdr(h, VIRTIO_BLK_T_IN, 0);
        let head = h.store_descs(
            &[Descriptor::new(hdr_addr(0), 16, N, 1), Descriptor::new(status_addr(0), 1, W | N, QSIZE + 3)],
            false,
        );
        h.publish(head);
        head
    });
}

#[test]
fn chain_longer_than_4_gib() {
    check(DROPPED, |h| {
        hdr(h, VIRTIO_BLK_T_IN, 0);
        h.add_chain(&[(hdr_addr(0), 16, false), (0, u32::MAX - 8, true), (0, 512, true), (status_addr(0), 1, true)])
    });
}

/// An available-ring entry naming a descriptor beyond the queue cannot even be returned;
/// the device skips it and serves the next one.
#[test]
fn available_head_out_of_range() {
    let mut h = Harness::new();
    h.publish(QSIZE + 5);
    h.read_req(1, 9, 512);
    h.run();
    assert_eq!(h.used_idx(), 1);
    assert_eq!(h.status(1), OK);
    assert_eq!(h.data(1, 512), [9u8; 512]);
    assert_eq!(h.stats().errors, 1);
    assert_eq!(h.irq.count(), 1);
}

/// A driver claiming more available entries than the queue holds has corrupted it: the
/// device stops using the queue (until reset) instead of spinning or crashing.
#[test]
fn available_index_beyond_queue_size() {
    let mut h = Harness::new();
    h.vq.avail().idx().store(QSIZE + 1);
    h.run();
    assert_eq!(h.used_idx(), 0);
    assert_eq!(h.irq.count(), 0);
    h.vq.avail().idx().store(0);
    h.read_req(0, 1, 512);
    h.run();
    assert_eq!(h.used_idx(), 0, "a broken queue stays ignored until reset");
}

fn indirect_table(h: &Harness, table: u64, descs: &[Descriptor]) {
    for (i, d) in descs.iter().enumerate() {
        h.mem.write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64)).unwrap();
    }
}

#[test]
fn indirect_descriptors_work() {
    let mut h = Harness::new();
    let table = 0x6_0000;
    let (status, len) = h.one(|h| {
        hdr(h, VIRTIO_BLK_T_IN, 0);
        h.write_header(hdr_addr(0), VIRTIO_BLK_T_IN, 12);
        indirect_table(
            h,
            table,
            &[
                Descriptor::new(hdr_addr(0), 16, N, 1),
                Descriptor::new(data_addr(0), 1024, W | N, 2),
                Descriptor::new(status_addr(0), 1, W, 0),
            ],
        );
        let head = h.store_descs(&[Descriptor::new(table, 48, VRING_DESC_F_INDIRECT as u16, 0)], false);
        h.publish(head);
        head
    });
    assert_eq!((status, len), (OK, 1025));
    assert_eq!(h.data(0, 1024), [[12u8; 512], [13u8; 512]].concat());
}

#[test]
fn bad_indirect_tables() {
    let table = 0x6_0000;
    let good = [Descriptor::new(hdr_addr(0), 16, N, 1), Descriptor::new(status_addr(0), 1, W, 0)];
    // (table address, table length in bytes, contents)
    let nested = [Descriptor::new(table, 32, VRING_DESC_F_INDIRECT as u16, 0)];
    let cases: [(u64, u32, &[Descriptor]); 4] = [
        (table, 20, &good),           // not a whole number of descriptors
        (table, 0, &good),            // empty
        (MEM_SIZE + 0x1000, 32, &[]), // outside guest memory
        (table + 0x100, 16, &nested), // an indirect descriptor inside an indirect table
    ];
    for (addr, len, contents) in cases {
        check(DROPPED, |h| {
            hdr(h, VIRTIO_BLK_T_IN, 0);
            indirect_table(h, table, &good);
            indirect_table(h, table + 0x100, contents);
            let head = h.store_descs(&[Descriptor::new(addr, len, VRING_DESC_F_INDIRECT as u16, 0)], false);
            h.publish(head);
            head
        });
    }
}
