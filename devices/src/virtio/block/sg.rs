//! A scatter-gather list over guest memory: the buffers of one request, already
//! bounds-checked against guest RAM, that can be copied from/to or handed to preadv.

use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::VolatileSlice;

/// A piece of guest RAM. `GuestMemory` has no dirty bitmap (`()`), so writing through a
/// slice's pointer needs no dirty-page bookkeeping.
pub(crate) type GuestSlice<'a> = VolatileSlice<'a, ()>;

/// Guest buffers in the order the driver chained them.
#[derive(Default)]
pub(crate) struct GuestSg<'a> {
    slices: Vec<GuestSlice<'a>>,
    len: usize,
}

impl<'a> GuestSg<'a> {
    pub(crate) fn push(&mut self, slice: GuestSlice<'a>) {
        if !slice.is_empty() {
            // Cannot overflow: a descriptor chain is at most 4 GiB (virtio-queue stops
            // iterating beyond that) and usize is 64 bits on every host we build for.
            self.len = self.len.saturating_add(slice.len());
            self.slices.push(slice);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Splits off everything from byte `at` on (empty when `at >= len`).
    pub(crate) fn split_off(&mut self, at: usize) -> GuestSg<'a> {
        let mut tail = GuestSg::default();
        let mut pos = 0;
        let mut keep = Vec::new();
        for slice in self.slices.drain(..) {
            let end = pos + slice.len();
            if end <= at {
                keep.push(slice);
            } else if pos >= at {
                tail.push(slice);
            } else {
                // `at - pos` is strictly inside the slice, so the split cannot fail.
                match slice.split_at(at - pos) {
                    Ok((head, rest)) => {
                        keep.push(head);
                        tail.push(rest);
                    }
                    Err(_) => keep.push(slice),
                }
            }
            pos = end;
        }
        self.len = keep.iter().map(|s| s.len()).sum();
        self.slices = keep;
        tail
    }

    /// Calls `f` with each piece of the list covering bytes `pos..pos + len` (clamped to
    /// the list), in order, and the offset of that piece within the range.
    fn for_each_piece(&self, pos: usize, len: usize, mut f: impl FnMut(usize, GuestSlice<'a>)) {
        let mut skip = pos;
        let mut left = len;
        let mut done = 0;
        for slice in &self.slices {
            if left == 0 {
                break;
            }
            if skip >= slice.len() {
                skip -= slice.len();
                continue;
            }
            let n = (slice.len() - skip).min(left);
            // In bounds: skip < slice.len() and n <= slice.len() - skip.
            if let Ok(piece) = slice.subslice(skip, n) {
                f(done, piece);
            }
            skip = 0;
            left -= n;
            done += n;
        }
    }

    /// Copies bytes `pos..` of the guest buffers into `dst`; returns how many were copied.
    pub(crate) fn read_at(&self, pos: usize, dst: &mut [u8]) -> usize {
        let mut copied = 0;
        self.for_each_piece(pos, dst.len(), |off, piece| copied += piece.copy_to(&mut dst[off..]));
        copied
    }

    /// Copies `src` into the guest buffers from byte `pos` on; returns how many were copied.
    pub(crate) fn write_at(&self, pos: usize, src: &[u8]) -> usize {
        let mut copied = 0;
        self.for_each_piece(pos, src.len(), |off, piece| {
            let n = piece.len().min(src.len() - off);
            piece.copy_from(&src[off..off + n]);
            copied += n;
        });
        copied
    }

    /// Whether every buffer starts at a host address and has a length that are multiples
    /// of `align` (what O_DIRECT needs to use them directly).
    pub(crate) fn is_aligned(&self, align: usize) -> bool {
        self.slices
            .iter()
            .all(|s| (s.ptr_guard().as_ptr() as usize).is_multiple_of(align) && s.len().is_multiple_of(align))
    }

    /// iovecs for the bytes from `pos` on, at most `max` of them, and the guards that keep
    /// their pointers valid: the caller must keep the guards alive while it uses the iovecs.
    pub(crate) fn iovecs(&self, pos: usize, max: usize) -> (Vec<libc::iovec>, Vec<PtrGuardMut>) {
        let mut iovecs = Vec::new();
        let mut guards = Vec::new();
        self.for_each_piece(pos, self.len.saturating_sub(pos), |_, piece| {
            if iovecs.len() < max {
                let guard = piece.ptr_guard_mut();
                iovecs.push(libc::iovec { iov_base: guard.as_ptr().cast(), iov_len: piece.len() });
                guards.push(guard);
            }
        });
        (iovecs, guards)
    }
}
