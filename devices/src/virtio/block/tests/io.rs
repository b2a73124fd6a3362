//! Well-formed requests: data in and out, flush, GET_ID, discard and write zeroes,
//! O_DIRECT.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::block::{BlockError, ID_BYTES};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn read_returns_disk_contents() {
    let mut h = Harness::new();
    let (status, len) = h.one(|h| h.read_req(0, 3, 1024));
    assert_eq!((status, len), (OK, 1024 + 1));
    assert_eq!(h.data(0, 1024), [[3u8; 512], [4u8; 512]].concat());
    let stats = h.stats();
    assert_eq!((stats.requests, stats.read_bytes, stats.errors), (1, 1024, 0));
}

#[test]
fn write_then_read_round_trip() {
    let mut h = Harness::new();
    let pattern: Vec<u8> = (0..2048u32).map(|i| (i * 7 % 251) as u8).collect();
    let (status, len) = h.one(|h| h.write_req(0, 10, &pattern));
    assert_eq!((status, len), (OK, 1), "a write puts only the status in guest memory");
    assert_eq!(file_bytes(&h.image, 10 * 512, 2048), pattern);
    assert_eq!(file_bytes(&h.image, 9 * 512, 512), [9u8; 512], "neighbours untouched");
    assert_eq!(file_bytes(&h.image, 14 * 512, 512), [14u8; 512], "neighbours untouched");

    let (status, _) = h.one(|h| h.read_req(0, 10, 2048));
    assert_eq!(status, OK);
    assert_eq!(h.data(0, 2048), pattern);
    assert_eq!(h.stats().write_bytes, 2048);
}

/// Data spread over several descriptors of odd sizes and alignments, header split in
/// two: the device must not assume any framing.
#[test]
fn scatter_gather_and_split_header() {
    let mut h = Harness::new();
    h.prepare(0, VIRTIO_BLK_T_OUT, 2);
    let pattern: Vec<u8> = (0..1536u32).map(|i| (i % 253) as u8).collect();
    let pieces = [(0x2_0003u64, 100usize), (0x2_1001, 900), (0x2_3000, 536)];
    let mut at = 0;
    for &(addr, len) in &pieces {
        h.mem.write_slice(&pattern[at..at + len], GuestAddress(addr)).unwrap();
        at += len;
    }
    let (status, _) = h.one(|h| {
        let mut bufs = vec![(hdr_addr(0), 5, false), (hdr_addr(0) + 5, 11, false)];
        bufs.extend(pieces.iter().map(|&(a, l)| (a, l as u32, false)));
        bufs.push((status_addr(0), 1, true));
        h.add_chain(&bufs)
    });
    assert_eq!(status, OK);
    assert_eq!(file_bytes(&h.image, 2 * 512, 1536), pattern);

    // Read it back into three writable pieces, the status sharing the last descriptor.
    h.prepare(0, VIRTIO_BLK_T_IN, 2);
    let (status, len) = h.one(|h| {
        h.add_chain(&[
            (hdr_addr(0), 16, false),
            (0x3_0001, 1000, true),
            (0x3_1000, 536, true),
            (status_addr(0) - 4, 5, true),
        ])
    });
    // The status descriptor's first 4 bytes are data: 1000 + 536 + 4 > 1536, so the data
    // is 1540 bytes, not a whole number of sectors.
    assert_eq!((status, len), (IOERR, 1));
    let (status, len) = h.one(|h| {
        h.add_chain(&[
            (hdr_addr(0), 16, false),
            (0x3_0001, 1000, true),
            (0x3_1000, 532, true),
            (status_addr(0) - 4, 5, true),
        ])
    });
    assert_eq!((status, len), (OK, 1537));
    let mut got = vec![0u8; 1536];
    h.mem.read_slice(&mut got[..1000], GuestAddress(0x3_0001)).unwrap();
    h.mem.read_slice(&mut got[1000..1532], GuestAddress(0x3_1000)).unwrap();
    h.mem.read_slice(&mut got[1532..], GuestAddress(status_addr(0) - 4)).unwrap();
    assert_eq!(got, pattern);
}

#[test]
fn flush_succeeds() {
    let mut h = Harness::new();
    h.prepare(0, VIRTIO_BLK_T_FLUSH, 0);
    let (status, len) = h.one(|h| h.add_chain(&[(hdr_addr(0), 16, false), (status_addr(0), 1, true)]));
    assert_eq!((status, len), (OK, 1));
    assert_eq!(h.stats().flushes, 1);
}

/// Without a negotiated FLUSH the driver expects write-through; writes still work.
#[test]
fn writes_without_flush_feature() {
    let image = image(16);
    let block = Block::new(config(&image)).unwrap();
    let acked = block.features() & !(1 << VIRTIO_BLK_F_FLUSH);
    let mut h = Harness::with(image, block, acked);
    let (status, _) = h.one(|h| h.write_req(0, 1, &[0x5a; 512]));
    assert_eq!(status, OK);
    assert_eq!(file_bytes(&h.image, 512, 512), [0x5a; 512]);
}

#[test]
fn get_id_returns_nul_padded_serial() {
    let mut h = Harness::new();
    h.prepare(0, VIRTIO_BLK_T_GET_ID, 0);
    h.mem.write_slice(&[0xff; ID_BYTES], GuestAddress(data_addr(0))).unwrap();
    let (status, len) = h.one(|h| {
        h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(0), ID_BYTES as u32, true), (status_addr(0), 1, true)])
    });
    assert_eq!((status, len), (OK, ID_BYTES as u32 + 1));
    let mut want = b"tandem-disk-0".to_vec();
    want.resize(ID_BYTES, 0);
    assert_eq!(h.data(0, ID_BYTES), want);

    // A short buffer gets what fits.
    let (status, len) =
        h.one(|h| h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(0), 6, true), (status_addr(0), 1, true)]));
    assert_eq!((status, len), (OK, 7));
}

#[test]
fn id_of_twenty_bytes_has_no_terminator_and_longer_is_refused() {
    let image = image(8);
    let mut cfg = config(&image);
    cfg.id = "ABCDEFGHIJKLMNOPQRST".into();
    let block = Block::new(cfg.clone()).unwrap();
    let features = block.features();
    let mut h = Harness::with(image, block, features);
    h.prepare(0, VIRTIO_BLK_T_GET_ID, 0);
    h.one(|h| h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(0), 32, true), (status_addr(0), 1, true)]));
    assert_eq!(&h.data(0, 20), b"ABCDEFGHIJKLMNOPQRST");

    cfg.id.push('U');
    assert!(matches!(Block::new(cfg.clone()), Err(BlockError::IdTooLong { len: 21, .. })));
    cfg.id = "caf\u{e9}".into();
    assert!(matches!(Block::new(cfg), Err(BlockError::IdNotAscii { .. })));
}

#[test]
fn readonly_disk_refuses_writes() {
    let image = image(16);
    let mut cfg = config(&image);
    cfg.readonly = true;
    let block = Block::new(cfg).unwrap();
    let features = block.features();
    assert_ne!(features & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let mut h = Harness::with(image, block, features);

    let (status, len) = h.one(|h| h.write_req(0, 2, &[0xee; 512]));
    assert_eq!((status, len), (IOERR, 1));
    assert_eq!(file_bytes(&h.image, 2 * 512, 512), [2u8; 512], "the image must not change");
    assert_eq!(h.stats().write_bytes, 0);

    // Reads still work.
    let (status, _) = h.one(|h| h.read_req(0, 2, 512));
    assert_eq!(status, OK);
    assert_eq!(h.data(0, 512), [2u8; 512]);

    // Not offered, so not negotiated: unsupported.
    h.prepare(0, VIRTIO_BLK_T_DISCARD, 0);
    h.mem.write_slice(&segment(0, 1, 0), GuestAddress(data_addr(0))).unwrap();
    let (status, _) =
        h.one(|h| h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(0), 16, false), (status_addr(0), 1, true)]));
    assert_eq!(status, UNSUPP);
}

#[test]
fn out_of_range_is_an_io_error() {
    let mut h = Harness::new(); // 64 sectors
    for (sector, bytes) in [(64, 512), (63, 1024), (u64::MAX / 512 + 1, 512), (u64::MAX, 512), (1 << 60, 4096)] {
        let (status, len) = h.one(|h| h.read_req(0, sector, bytes));
        assert_eq!((status, len), (IOERR, 1), "read at {sector}");
        let (status, _) = h.one(|h| h.write_req(0, sector, &vec![1; bytes as usize]));
        assert_eq!(status, IOERR, "write at {sector}");
    }
    assert_eq!(h.stats().malformed, 10, "all refused by the range check");
    assert_eq!(file_bytes(&h.image, 63 * 512, 512), [63u8; 512]);
    // The last sector is in range.
    let (status, _) = h.one(|h| h.read_req(0, 63, 512));
    assert_eq!(status, OK);
    assert_eq!(h.stats().errors, 10);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mut h = Harness::new();
    for kind in [2, 3, 5, 10, 14, 16, 0xdead_beef] {
        h.prepare(0, kind, 0);
        let (status, len) = h.one(|h| h.add_chain(&[(hdr_addr(0), 16, false), (status_addr(0), 1, true)]));
        assert_eq!((status, len), (UNSUPP, 1), "type {kind}");
    }
    assert_eq!(h.stats().unsupported, 7);
}

pub(super) fn segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&sectors.to_le_bytes());
    seg[12..].copy_from_slice(&flags.to_le_bytes());
    seg
}

fn discard_req(h: &mut Harness, kind: u32, segs: &[[u8; 16]]) -> (u8, u32) {
    h.prepare(0, kind, 0);
    h.mem.write_slice(&segs.concat(), GuestAddress(data_addr(0))).unwrap();
    let len = segs.len() as u32 * 16;
    h.one(|h| h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(0), len, false), (status_addr(0), 1, true)]))
}

#[test]
fn discard_and_write_zeroes() {
    let mut h = Harness::new();
    let features = h.block.features();
    if features & 1 << VIRTIO_BLK_F_DISCARD == 0 {
        panic!("this test needs hole punching (fallocate PUNCH_HOLE) in the temp dir; run it on ext4/xfs/btrfs (set TMPDIR)");
    }
    assert_ne!(features & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
    assert_eq!(discard_req(&mut h, VIRTIO_BLK_T_DISCARD, &[segment(8, 8, 0), segment(32, 1, 0)]), (OK, 1));
    assert_eq!(file_bytes(&h.image, 8 * 512, 8 * 512), vec![0; 8 * 512]);
    assert_eq!(file_bytes(&h.image, 32 * 512, 512), vec![0; 512]);
    assert_eq!(file_bytes(&h.image, 16 * 512, 512), [16u8; 512]);

    for flags in [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP] {
        let (status, _) = discard_req(&mut h, VIRTIO_BLK_T_WRITE_ZEROES, &[segment(40, 3, flags)]);
        assert_eq!(status, OK);
        assert_eq!(file_bytes(&h.image, 40 * 512, 3 * 512), vec![0; 3 * 512]);
        std::os::unix::fs::FileExt::write_all_at(h.image.as_file(), &[7; 1536], 40 * 512).unwrap();
    }
    assert_eq!(h.stats().discards, 3);

    // Discard with unmap, or any unknown flag: unsupported, and nothing happens.
    assert_eq!(
        discard_req(&mut h, VIRTIO_BLK_T_DISCARD, &[segment(1, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]).0,
        UNSUPP
    );
    assert_eq!(discard_req(&mut h, VIRTIO_BLK_T_WRITE_ZEROES, &[segment(1, 1, 2)]).0, UNSUPP);
    assert_eq!(file_bytes(&h.image, 512, 512), [1u8; 512]);
    // Beyond the disk, too many sectors or segments: I/O errors, checked before any
    // segment runs.
    assert_eq!(discard_req(&mut h, VIRTIO_BLK_T_DISCARD, &[segment(1, 1, 0), segment(60, 8, 0)]).0, IOERR);
    assert_eq!(discard_req(&mut h, VIRTIO_BLK_T_DISCARD, &[segment(u64::MAX, 1, 0)]).0, IOERR);
    assert_eq!(discard_req(&mut h, VIRTIO_BLK_T_DISCARD, &[segment(0, u32::MAX, 0)]).0, IOERR);
    assert_eq!(discard_req(&mut h, VIRTIO_BLK_T_DISCARD, &vec![segment(1, 1, 0); 33]).0, IOERR);
    assert_eq!(file_bytes(&h.image, 512, 512), [1u8; 512]);
    // Data that is not whole segments is malformed.
    h.prepare(0, VIRTIO_BLK_T_DISCARD, 0);
    let (status, _) =
        h.one(|h| h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(0), 20, false), (status_addr(0), 1, true)]));
    assert_eq!(status, IOERR);
}

#[test]
fn discard_not_negotiated_is_unsupported() {
    let image = image(16);
    let block = Block::new(config(&image)).unwrap();
    let acked = block.features() & !(1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES);
    let mut h = Harness::with(image, block, acked);
    assert_eq!(discard_req(&mut h, VIRTIO_BLK_T_DISCARD, &[segment(1, 1, 0)]).0, UNSUPP);
    assert_eq!(discard_req(&mut h, VIRTIO_BLK_T_WRITE_ZEROES, &[segment(1, 1, 0)]).0, UNSUPP);
    assert_eq!(file_bytes(&h.image, 512, 512), [1u8; 512]);
}

/// O_DIRECT: page-aligned guest buffers go straight to the file, unaligned ones through
/// the bounce buffer; both must give the same bytes.
#[test]
fn direct_io_aligned_and_unaligned_buffers() {
    let image = image(64);
    let mut cfg = config(&image);
    cfg.direct = true;
    let block = match Block::new(cfg) {
        Ok(block) => block,
        Err(BlockError::DirectUnsupported { .. }) => {
            panic!("this test needs O_DIRECT in the temp dir (tmpfs has none); set TMPDIR to a disk-backed dir")
        }
        Err(e) => panic!("{e}"),
    };
    let features = block.features();
    let mut h = Harness::with(image, block, features);
    assert_eq!(h.block.capacity(), 64);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 249) as u8).collect();

    // Aligned: data_addr(0) is page-aligned in guest and host memory.
    let (status, _) = h.one(|h| h.write_req(0, 8, &pattern));
    assert_eq!(status, OK);
    assert_eq!(file_bytes(&h.image, 8 * 512, 8192), pattern);
    let (status, _) = h.one(|h| h.read_req(0, 8, 8192));
    assert_eq!(status, OK);
    assert_eq!(h.data(0, 8192), pattern);

    // Unaligned guest buffers.
    let reversed: Vec<u8> = pattern.iter().rev().copied().collect();
    h.prepare(0, VIRTIO_BLK_T_OUT, 24);
    h.mem.write_slice(&reversed, GuestAddress(data_addr(0) + 3)).unwrap();
    let (status, _) =
        h.one(|h| h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(0) + 3, 8192, false), (status_addr(0), 1, true)]));
    assert_eq!(status, OK);
    assert_eq!(file_bytes(&h.image, 24 * 512, 8192), reversed);
    h.prepare(0, VIRTIO_BLK_T_IN, 24);
    let (status, _) =
        h.one(|h| h.add_chain(&[(hdr_addr(0), 16, false), (data_addr(1) + 5, 8192, true), (status_addr(0), 1, true)]));
    assert_eq!(status, OK);
    let mut got = vec![0u8; 8192];
    h.mem.read_slice(&mut got, GuestAddress(data_addr(1) + 5)).unwrap();
    assert_eq!(got, reversed);
}

#[test]
fn several_requests_in_one_drain() {
    let mut h = Harness::new();
    h.write_req(0, 1, &[0x11; 512]);
    h.write_req(1, 2, &[0x22; 1024]);
    h.read_req(2, 5, 512);
    h.run();
    assert_eq!(h.used_idx(), 3);
    assert_eq!(h.irq.count(), 1, "one interrupt per drain");
    for slot in 0..3 {
        assert_eq!(h.status(slot), OK);
    }
    assert_eq!(h.data(2, 512), [5u8; 512]);
    assert_eq!(file_bytes(&h.image, 512, 1536), [[0x11; 512], [0x22; 512], [0x22; 512]].concat());
}

/// Host-side failures become I/O errors for the guest; the device keeps going.
#[test]
fn host_io_errors_are_reported_not_fatal() {
    let mut h = Harness::new();
    // Someone shrinks the image under us: reads past its new end fail.
    h.image.as_file().set_len(16 * 512).unwrap();
    let (status, len) = h.one(|h| h.read_req(0, 40, 512));
    assert_eq!((status, len), (IOERR, 1));
    assert_eq!(h.stats().malformed, 0, "a host error, not the guest's fault");
    let (status, _) = h.one(|h| h.read_req(0, 15, 512));
    assert_eq!(status, OK);

    // Deleting the image does not stop an open disk (the inode lives on).
    let path = h.image.as_path().to_owned();
    std::fs::remove_file(&path).unwrap();
    let (status, _) = h.one(|h| h.write_req(0, 2, &[0x42; 512]));
    assert_eq!(status, OK);
    let (status, _) = h.one(|h| h.read_req(0, 2, 512));
    assert_eq!(status, OK);
    assert_eq!(h.data(0, 512), [0x42; 512]);
}
