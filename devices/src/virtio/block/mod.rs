//! virtio-blk: a disk backed by a host regular file or block device.
//!
//! - [`Block`] (device.rs) is the [`VirtioDevice`](super::VirtioDevice): features,
//!   configuration space, activation and reset.
//! - disk.rs opens and probes the backing file and moves bytes between it and guest
//!   memory (preadv/pwritev straight into guest RAM, an aligned bounce buffer under
//!   O_DIRECT when the guest's buffers are not aligned).
//! - sg.rs is a guest scatter-gather list; request.rs turns a descriptor chain into a
//!   validated request, rejecting malformed chains; execute.rs carries requests out.
//! - worker.rs is the event-loop half: it drains the queue on each notification, has
//!   the requests executed synchronously and signals the driver once per drain.
//!
//! All I/O is synchronous on the VMM's event loop thread: no extra threads, no polling.

mod device;
mod disk;
mod execute;
mod request;
mod sg;
mod worker;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

pub use device::Block;

/// Bytes per virtio-blk sector: the protocol's unit, whatever the backing's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the serial returned by VIRTIO_BLK_T_GET_ID.
pub const ID_BYTES: usize = 20;
/// Size of the one request queue offered to the driver.
pub const QUEUE_SIZE: u16 = 256;

/// What to attach as a virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// A regular file (raw image) or a block device.
    pub path: PathBuf,
    /// Open read-only and offer VIRTIO_BLK_F_RO: the guest cannot write.
    pub readonly: bool,
    /// Open with O_DIRECT, bypassing the host page cache.
    pub direct: bool,
    /// Serial number returned by VIRTIO_BLK_T_GET_ID (printable ASCII, at most 20 bytes;
    /// empty gives an all-NUL serial).
    pub id: String,
}

/// Why a disk cannot be attached. Each message names the file and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk image {path:?} does not exist: check the path, or create an image (e.g. `truncate -s 1G <file>`)")]
    NotFound { path: PathBuf },
    #[error(
        "no permission to open disk image {path:?} {}: fix its permissions{}",
        if *.readonly { "for reading" } else { "for reading and writing" },
        if *.readonly { "" } else { " or attach it read-only" }
    )]
    PermissionDenied { path: PathBuf, readonly: bool },
    #[error("disk image {path:?} is on a read-only file system: attach it read-only")]
    ReadOnlyFileSystem { path: PathBuf },
    #[error(
        "disk image {path:?} is a {kind}, not a regular file or a block device: give an image file or a block device"
    )]
    NotADisk { path: PathBuf, kind: &'static str },
    #[error("disk image {path:?} is empty: give it a size (e.g. `truncate -s 1G <file>`)")]
    Empty { path: PathBuf },
    #[error("disk image {path:?} is {size} bytes, not a multiple of 512: pad it (e.g. `truncate -s %512 <file>`)")]
    SizeNotAligned { path: PathBuf, size: u64 },
    #[error(
        "disk image {path:?} is in use by another process (it holds a lock on it): stop that process or attach a copy"
    )]
    Locked { path: PathBuf },
    #[error("disk image {path:?} cannot be opened with O_DIRECT (its file system does not support it): attach it without `direct`")]
    DirectUnsupported { path: PathBuf },
    #[error("disk serial {id:?} is {len} bytes; virtio-blk serials are at most 20 bytes: shorten it")]
    IdTooLong { id: String, len: usize },
    #[error("disk serial {id:?} must be printable ASCII")]
    IdNotAscii { id: String },
    #[error("cannot open disk image {path:?}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Running totals for one disk, readable at any time through [`Block::counters`].
/// Updated with relaxed atomics: each value is exact, a set of them is not a snapshot
/// of one instant.
#[derive(Debug, Default)]
pub struct BlockCounters {
    requests: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    errors: AtomicU64,
    unsupported: AtomicU64,
    malformed: AtomicU64,
    interrupts: AtomicU64,
}

/// A copy of [`BlockCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BlockStats {
    /// Descriptor chains taken from the queue (malformed ones included).
    pub requests: u64,
    /// Bytes read from the disk into the guest.
    pub read_bytes: u64,
    /// Bytes written from the guest to the disk.
    pub write_bytes: u64,
    /// Completed VIRTIO_BLK_T_FLUSH requests.
    pub flushes: u64,
    /// Completed DISCARD and WRITE_ZEROES requests.
    pub discards: u64,
    /// Requests completed with VIRTIO_BLK_S_IOERR, plus chains returned without a status.
    pub errors: u64,
    /// Requests completed with VIRTIO_BLK_S_UNSUPP.
    pub unsupported: u64,
    /// Of `errors`, those caused by a malformed request rather than the host disk.
    pub malformed: u64,
    /// Used-buffer interrupts raised.
    pub interrupts: u64,
}

impl BlockCounters {
    pub fn snapshot(&self) -> BlockStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockStats {
            requests: get(&self.requests),
            read_bytes: get(&self.read_bytes),
            write_bytes: get(&self.write_bytes),
            flushes: get(&self.flushes),
            discards: get(&self.discards),
            errors: get(&self.errors),
            unsupported: get(&self.unsupported),
            malformed: get(&self.malformed),
            interrupts: get(&self.interrupts),
        }
    }

    /// Adds `n` to `counter`; returns the new value.
    fn add(counter: &AtomicU64, n: u64) -> u64 {
        counter.fetch_add(n, Ordering::Relaxed).wrapping_add(n)
    }
}

/// Whether the `n`th occurrence of a guest- or host-caused error should be logged: the
/// first few, then at powers of two, so a misbehaving guest cannot flood the VMM's log.
fn should_log(n: u64) -> bool {
    n <= 8 || n.is_power_of_two()
}
