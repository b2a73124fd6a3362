//! What a queue pair's worker needs from the host side of the NIC: a non-blocking fd
//! carrying one frame (virtio-net header first) per read or write, that it can wait on
//! with epoll — a tap queue in production, a datagram socket in tests — and a few tap
//! controls. The `readv`/`writev` on that fd live here, at the FFI edge.

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use super::chain::Segment;

/// The host side of one queue pair.
///
/// The fd must be non-blocking and keep frame boundaries: each `readv` returns one
/// frame, each `writev` sends one (a tap, a `SOCK_DGRAM` or `SOCK_SEQPACKET` socket).
pub trait NetBackend: AsFd + Send {
    /// Another handle on the same queue (a dup'ed fd): each activation's worker owns
    /// its own, so the device keeps the queue open across driver resets.
    fn duplicate(&self) -> io::Result<Box<dyn NetBackend>>;

    /// Which offloads the guest takes on receive (`TUN_F_*` bits), i.e. what the host
    /// side may hand over unsegmented or without a checksum.
    fn set_offload(&self, tun_flags: u32) -> io::Result<()>;

    /// Attaches (`true`) or detaches this queue: the guest uses fewer queue pairs than
    /// the device has, and the host must not steer frames to the queues it ignores.
    fn set_queue_enabled(&self, enabled: bool) -> io::Result<()>;
}

/// Any frame-preserving fd as a backend, e.g. one end of a `UnixDatagram::pair()`.
/// It has no offloads to set and a single queue.
#[derive(Debug)]
pub struct FdBackend(OwnedFd);

impl FdBackend {
    /// `fd` must already be non-blocking.
    pub fn new(fd: OwnedFd) -> Self {
        Self(fd)
    }
}

impl AsFd for FdBackend {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl NetBackend for FdBackend {
    fn duplicate(&self) -> io::Result<Box<dyn NetBackend>> {
        Ok(Box::new(FdBackend(self.0.try_clone()?)))
    }

    fn set_offload(&self, _tun_flags: u32) -> io::Result<()> {
        Ok(())
    }

    fn set_queue_enabled(&self, _enabled: bool) -> io::Result<()> {
        Ok(())
    }
}

/// An I/O vector for one `readv`/`writev`, built only from guest segments that
/// [`parse`](super::chain::parse) validated and from host buffers borrowed for `'a`, so
/// every entry is memory this process may hand to the kernel.
pub(super) struct IoVecs<'a> {
    iov: Vec<libc::iovec>,
    _host: PhantomData<&'a mut [u8]>,
}

impl<'a> IoVecs<'a> {
    pub(super) fn new() -> Self {
        Self { iov: Vec::new(), _host: PhantomData }
    }

    pub(super) fn push_segments(&mut self, segs: &[Segment]) {
        for s in segs {
            self.iov.push(libc::iovec { iov_base: s.host() as *mut libc::c_void, iov_len: s.len() });
        }
    }

    pub(super) fn push_host(&mut self, buf: &'a mut [u8]) {
        self.iov.push(libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() });
    }

    pub(super) fn len(&self) -> usize {
        self.iov.len()
    }

    fn count(&self) -> io::Result<libc::c_int> {
        libc::c_int::try_from(self.iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }
}

/// Reads one frame into `iov`. When the frame did not fit, the excess is lost and the
/// length returned is the frame's (a tap) or what fitted (a datagram socket): callers
/// treat a result that fills `iov` as a frame too large to deliver.
pub(super) fn readv(fd: BorrowedFd<'_>, iov: &mut IoVecs<'_>) -> io::Result<usize> {
    let count = iov.count()?;
    // SAFETY: every iovec describes memory mapped in this process for at least the
    // duration of the call — validated guest RAM (see `Segment`) or a host buffer
    // mutably borrowed by `iov` — and the kernel writes only within those ranges. Guest
    // RAM may change under us (the guest runs concurrently); that is the virtio
    // contract for buffers the driver handed to the device, and nothing in this
    // process holds a reference into them.
    let n = unsafe { libc::readv(fd.as_raw_fd(), iov.iov.as_ptr(), count) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Sends the frame `iov` describes as one write.
pub(super) fn writev(fd: BorrowedFd<'_>, iov: &IoVecs<'_>) -> io::Result<usize> {
    let count = iov.count()?;
    // SAFETY: as for `readv`; here the kernel only reads those ranges.
    let n = unsafe { libc::writev(fd.as_raw_fd(), iov.iov.as_ptr(), count) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
