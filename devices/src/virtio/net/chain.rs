//! A descriptor chain as host memory: the checks a device owes a driver it does not
//! trust, done once per chain, before any byte moves.
//!
//! virtio-queue's chain iterator stops quietly on a `next` index out of range, on a
//! loop (it gives up after queue-size descriptors), on an unreadable descriptor or a bad
//! indirect table. We notice because the last descriptor it yielded still had
//! VIRTQ_DESC_F_NEXT set — such a chain is malformed, not short.

use std::fmt;

use virtio_queue::{DescriptorChain, Error as QueueError, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::virtio::GuestMemory;

/// Linux's `IOV_MAX`: the most segments one `readv`/`writev` takes. A chain needing
/// more is rejected (drivers use a handful: Linux at most MAX_SKB_FRAGS + 2).
pub(super) const MAX_SEGMENTS: usize = 1024;

/// A piece of guest RAM a descriptor points at, lying within one memory region.
///
/// Invariant: `host` is the address at which `gpa..gpa+len` is mapped in this process
/// by the [`GuestMemory`] the chain was parsed with. Segments are only made by
/// [`parse`] and live no longer than the worker that owns that memory, which keeps the
/// mapping alive (the VMM drops workers before it unmaps guest RAM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    gpa: GuestAddress,
    host: usize,
    len: usize,
}

impl Segment {
    pub(super) fn len(&self) -> usize {
        self.len
    }
    pub(super) fn host(&self) -> usize {
        self.host
    }
}

/// Why a chain was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Malformed {
    /// A `next` index out of range, a loop, an unreadable descriptor or indirect table.
    Broken,
    /// A device-readable descriptor after a device-writable one, or a descriptor in the
    /// direction this queue does not use.
    Direction,
    /// A buffer that is not (entirely) in guest RAM.
    OutsideMemory,
    /// Too little room for what the queue needs (a virtio-net header, a command).
    TooShort,
    /// More bytes than any valid request of this queue.
    TooLong,
    /// More than [`MAX_SEGMENTS`] pieces.
    TooManySegments,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Malformed::Broken => "broken chain (next index out of range, loop or bad indirect table)",
            Malformed::Direction => "descriptor in the wrong direction",
            Malformed::OutsideMemory => "buffer outside guest RAM",
            Malformed::TooShort => "buffer too short",
            Malformed::TooLong => "buffer too long",
            Malformed::TooManySegments => "too many segments",
        })
    }
}

/// A validated chain: its device-readable part, then its device-writable part.
#[derive(Debug, Default)]
pub(super) struct Parsed {
    pub(super) readable: Vec<Segment>,
    pub(super) writable: Vec<Segment>,
    pub(super) readable_len: usize,
    pub(super) writable_len: usize,
    /// Descriptors of each kind, zero-length ones included.
    pub(super) readable_descs: usize,
    pub(super) writable_descs: usize,
}

/// Walks `chain`, checking every descriptor lies in guest RAM, readable ones come
/// before writable ones, and the total length stays within `max_len`.
pub(super) fn parse(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    max_len: usize,
) -> Result<Parsed, Malformed> {
    let mut parsed = Parsed::default();
    let mut yielded_any = false;
    let mut last_had_next = false;
    for desc in chain {
        yielded_any = true;
        last_had_next = desc.has_next();
        let len = desc.len() as usize;
        let (list, total) = if desc.is_write_only() {
            parsed.writable_descs += 1;
            (&mut parsed.writable, &mut parsed.writable_len)
        } else if parsed.writable_descs > 0 {
            return Err(Malformed::Direction);
        } else {
            parsed.readable_descs += 1;
            (&mut parsed.readable, &mut parsed.readable_len)
        };
        *total += len;
        if parsed.readable_len.saturating_add(parsed.writable_len) > max_len {
            return Err(Malformed::TooLong);
        }
        let mut offset = 0u64;
        for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), len) {
            let slice = slice.map_err(|_| Malformed::OutsideMemory)?;
            let gpa = desc.addr().checked_add(offset).ok_or(Malformed::OutsideMemory)?;
            if list.len() >= MAX_SEGMENTS {
                return Err(Malformed::TooManySegments);
            }
            list.push(Segment { gpa, host: slice.ptr_guard_mut().as_ptr() as usize, len: slice.len() });
            offset += slice.len() as u64;
        }
    }
    if !yielded_any || last_had_next {
        return Err(Malformed::Broken);
    }
    Ok(parsed)
}

/// Puts chain `head` in the used ring with `len` bytes written. Returns whether it was
/// added: a malformed chain whose head index is out of range cannot be returned and is
/// only counted. Any other failure (the used ring is not in guest RAM) is the queue's.
pub(super) fn return_chain(mem: &GuestMemory, queue: &mut Queue, head: u16, len: u32) -> Result<bool, QueueError> {
    match queue.add_used(mem, head, len) {
        Ok(()) => Ok(true),
        Err(QueueError::InvalidDescriptorIndex) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Copies `data` into the buffer `segs` describe, starting `offset` bytes in. Returns
/// how many bytes fitted.
pub(super) fn write_at(mem: &GuestMemory, segs: &[Segment], offset: usize, data: &[u8]) -> usize {
    let mut done = 0;
    for_each_piece(segs, offset, data.len(), |gpa, at, len| {
        let ok = mem.write_slice(&data[at..at + len], gpa).is_ok();
        if ok {
            done += len;
        }
        ok
    });
    done
}

/// Copies from the buffer `segs` describe, starting `offset` bytes in, into `buf`.
/// Returns how many bytes were available.
pub(super) fn read_at(mem: &GuestMemory, segs: &[Segment], offset: usize, buf: &mut [u8]) -> usize {
    let mut done = 0;
    for_each_piece(segs, offset, buf.len(), |gpa, at, len| {
        let ok = mem.read_slice(&mut buf[at..at + len], gpa).is_ok();
        if ok {
            done += len;
        }
        ok
    });
    done
}

/// Calls `f(guest address, offset into the caller's data, length)` for each piece of
/// `segs` covering `offset..offset+count`, until `f` returns false.
fn for_each_piece(
    segs: &[Segment],
    mut offset: usize,
    count: usize,
    mut f: impl FnMut(GuestAddress, usize, usize) -> bool,
) {
    let mut at = 0;
    for seg in segs {
        if at == count {
            break;
        }
        if offset >= seg.len {
            offset -= seg.len;
            continue;
        }
        let len = (seg.len - offset).min(count - at);
        // Cannot overflow: parse() checked gpa..gpa+len lies in guest RAM.
        let gpa = seg.gpa.unchecked_add(offset as u64);
        if !f(gpa, at, len) {
            break;
        }
        at += len;
        offset = 0;
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestAddress;

    use super::*;
    use crate::virtio::net::test_util::{guest_memory, MEM_SIZE};

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    fn parse_chain(mem: &GuestMemory, descs: &[RawDescriptor], max_len: usize) -> Result<Parsed, Malformed> {
        let vq = MockSplitQueue::new(mem, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(mem).unwrap().next().unwrap();
        parse(mem, chain, max_len)
    }

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    #[test]
    fn splits_readable_and_writable() {
        let mem = guest_memory();
        let p = parse_chain(&mem, &[d(0x10_0000, 10, N, 1), d(0x10_1000, 20, N | W, 2), d(0x10_2000, 30, W, 0)], 100)
            .unwrap();
        assert_eq!((p.readable_len, p.writable_len), (10, 50));
        assert_eq!((p.readable.len(), p.writable.len()), (1, 2));
    }

    #[test]
    fn rejects_what_a_driver_must_not_post() {
        let mem = guest_memory();
        // Readable after writable.
        let e = parse_chain(&mem, &[d(0x10_0000, 10, N | W, 1), d(0x10_1000, 10, 0, 0)], 100);
        assert_eq!(e.unwrap_err(), Malformed::Direction);
        // Over the length limit.
        let e = parse_chain(&mem, &[d(0x10_0000, 60, N, 1), d(0x10_1000, 60, 0, 0)], 100);
        assert_eq!(e.unwrap_err(), Malformed::TooLong);
        // Past the end of RAM, and straddling it.
        let e = parse_chain(&mem, &[d(MEM_SIZE, 10, 0, 0)], 100);
        assert_eq!(e.unwrap_err(), Malformed::OutsideMemory);
        let e = parse_chain(&mem, &[d(MEM_SIZE - 4, 10, 0, 0)], 100);
        assert_eq!(e.unwrap_err(), Malformed::OutsideMemory);
        // `next` out of range of a 16-entry table.
        let e = parse_chain(&mem, &[d(0x10_0000, 10, N, 40)], 100);
        assert_eq!(e.unwrap_err(), Malformed::Broken);
        // A loop: 0 -> 1 -> 0.
        let e = parse_chain(&mem, &[d(0x10_0000, 1, N, 1), d(0x10_1000, 1, N, 0)], 100);
        assert_eq!(e.unwrap_err(), Malformed::Broken);
        // An indirect table whose length is not a whole number of descriptors.
        let e = parse_chain(&mem, &[d(0x10_0000, 17, VRING_DESC_F_INDIRECT as u16, 0)], 100);
        assert_eq!(e.unwrap_err(), Malformed::Broken);
    }

    #[test]
    fn copies_across_segments() {
        let mem = guest_memory();
        let p = parse_chain(&mem, &[d(0x10_0000, 3, N | W, 1), d(0x10_1000, 5, W, 0)], 100).unwrap();
        assert_eq!(write_at(&mem, &p.writable, 1, b"abcdefghij"), 7);
        let mut buf = [0u8; 8];
        assert_eq!(read_at(&mem, &p.writable, 0, &mut buf), 8);
        assert_eq!(&buf[1..], b"abcdefg");
        assert_eq!(mem.read_obj::<[u8; 2]>(GuestAddress(0x10_0001)).unwrap(), *b"ab");
        assert_eq!(read_at(&mem, &p.writable, 8, &mut buf), 0);
    }
}
