//! The disk layer and guest scatter-gather lists on their own.

use std::os::unix::fs::MetadataExt;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{config, file_bytes, image};
use crate::virtio::block::disk::{AlignedBuf, Disk};
use crate::virtio::block::sg::GuestSg;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

fn sg<'a>(mem: &'a GuestMemoryMmap, pieces: &[(u64, usize)]) -> GuestSg<'a> {
    let mut sg = GuestSg::default();
    for &(addr, len) in pieces {
        for slice in mem.get_slices(GuestAddress(addr), len) {
            sg.push(slice.unwrap());
        }
    }
    sg
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8).collect()
}

#[test]
fn aligned_buffers_are_aligned() {
    for align in [512, 4096] {
        let mut buf = AlignedBuf::new(3 * align, align);
        let slice = buf.as_mut_slice();
        assert_eq!(slice.len(), 3 * align);
        assert_eq!(slice.as_ptr() as usize % align, 0);
    }
}

#[test]
fn scatter_gather_copies_and_splits() {
    let mem = mem();
    let data = pattern(300, 1);
    mem.write_slice(&data[..100], GuestAddress(0x1000)).unwrap();
    mem.write_slice(&data[100..], GuestAddress(0x3003)).unwrap();
    let mut list = sg(&mem, &[(0x1000, 100), (0x2000, 0), (0x3003, 200)]);
    assert_eq!(list.len(), 300);
    let mut out = vec![0u8; 300];
    assert_eq!(list.read_at(0, &mut out), 300);
    assert_eq!(out, data);
    let mut out = vec![0u8; 50];
    assert_eq!(list.read_at(80, &mut out), 50);
    assert_eq!(out, data[80..130]);
    assert_eq!(list.read_at(290, &mut out), 10, "clamped at the end");
    assert_eq!(list.read_at(1000, &mut out), 0);

    let tail = list.split_off(120);
    assert_eq!((list.len(), tail.len()), (120, 180));
    let mut out = vec![0u8; 180];
    assert_eq!(tail.read_at(0, &mut out), 180);
    assert_eq!(out, data[120..]);
    assert_eq!(tail.write_at(170, &[0xee; 20]), 10);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3003 + 199)).unwrap(), 0xee);
    assert!(list.split_off(500).is_empty());

    assert!(sg(&mem, &[(0x1000, 512), (0x3000, 1024)]).is_aligned(512));
    assert!(!sg(&mem, &[(0x1000, 512), (0x3200, 100)]).is_aligned(512));
    assert!(!sg(&mem, &[(0x1001, 512)]).is_aligned(512));
}

/// More pieces than one preadv/pwritev takes: the transfer goes in several calls.
#[test]
fn many_small_buffers() {
    let img = image(4096); // 2 MiB
    let disk = Disk::open(&config(&img)).unwrap();
    let mem = mem();
    let pieces: Vec<(u64, usize)> = (0..1500).map(|i| (0x10_0000 + i * 1024, 512)).collect();
    let data = pattern(1500 * 512, 7);
    let list = sg(&mem, &pieces);
    for (i, &(addr, len)) in pieces.iter().enumerate() {
        mem.write_slice(&data[i * 512..][..len], GuestAddress(addr)).unwrap();
    }
    disk.write(4096, &list, &mut None).unwrap();
    assert_eq!(file_bytes(&img, 4096, data.len()), data);

    for &(addr, len) in &pieces {
        mem.write_slice(&vec![0; len], GuestAddress(addr)).unwrap();
    }
    disk.read(4096, &list, &mut None).unwrap();
    let mut out = vec![0u8; data.len()];
    assert_eq!(list.read_at(0, &mut out), data.len());
    assert_eq!(out, data);
}

/// The O_DIRECT bounce path, over several bounce chunks and unaligned pieces.
#[test]
fn bounce_buffer_round_trip() {
    let img = image(8192); // 4 MiB
    let mut disk = Disk::open(&config(&img)).unwrap();
    disk.force_alignment(4096);
    let mem = mem();
    let len = (1 << 20) * 2 + 8192;
    let pieces = [(0x10_0001, 1000), (0x10_1000, len - 1000 - 24), (0x40_0007, 24)];
    let data = pattern(len, 3);
    let list = sg(&mem, &pieces);
    assert!(!list.is_aligned(4096));
    assert_eq!(list.write_at(0, &data), len);
    let mut bounce = None;
    disk.write(8192, &list, &mut bounce).unwrap();
    assert!(bounce.is_some(), "the bounce buffer was used and is kept");
    assert_eq!(file_bytes(&img, 8192, len), data);

    let other = sg(&mem, &[(0x60_0003, len)]);
    disk.read(8192, &other, &mut bounce).unwrap();
    let mut out = vec![0u8; len];
    other.read_at(0, &mut out);
    assert_eq!(out, data);
}

#[test]
fn reads_past_the_end_of_a_shrunk_file_fail() {
    let img = image(16);
    let disk = Disk::open(&config(&img)).unwrap();
    img.as_file().set_len(4 * 512).unwrap();
    let mem = mem();
    let list = sg(&mem, &[(0x1000, 1024)]);
    let e = disk.read(3 * 512, &list, &mut None).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
}

#[test]
fn write_zeroes_without_zero_range_keeps_blocks_allocated() {
    let img = image(256);
    let disk = Disk::open(&config(&img)).unwrap();
    if !disk.can_punch() {
        panic!("this test needs hole punching (fallocate PUNCH_HOLE) in the temp dir; run it on ext4/xfs/btrfs (set TMPDIR)");
    }
    img.as_file().sync_all().unwrap();
    let blocks = || img.as_file().metadata().unwrap().blocks();
    let full = blocks();

    disk.discard(64 * 512, 64 * 512).unwrap();
    assert_eq!(file_bytes(&img, 64 * 512, 64 * 512), vec![0; 64 * 512]);
    assert!(blocks() < full, "discard deallocates");

    disk.forget_zero_range();
    disk.write_zeroes(128 * 512, 64 * 512, false).unwrap();
    assert_eq!(file_bytes(&img, 128 * 512, 64 * 512), vec![0; 64 * 512]);
    assert_eq!(file_bytes(&img, 63 * 512, 512), [63u8; 512]);
    assert_eq!(file_bytes(&img, 192 * 512, 512), [192u8; 512]);
    let after_discard = full - 64 * 512 / 512;
    assert!(blocks() >= after_discard, "write zeroes without unmap leaves the range allocated");
}
