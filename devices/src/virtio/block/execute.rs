//! Executing parsed requests on the disk.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;

use super::disk::{AlignedBuf, Disk};
use super::request::{parse, ParseError, Request, RequestType, SEGMENT_LEN};
use super::{should_log, BlockCounters, ID_BYTES, SECTOR_SIZE};
use crate::notice::DeviceNotices;
use crate::virtio::GuestMemory;

/// Most segments in one DISCARD or WRITE_ZEROES request (config max_*_seg).
pub(crate) const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Most sectors in one DISCARD or WRITE_ZEROES segment (config max_*_sectors): 1 GiB,
/// so that one request holds up the event loop for a bounded time.
pub(crate) const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// What the driver negotiated that changes how requests are served.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Negotiated {
    pub(crate) flush: bool,
    pub(crate) discard: bool,
    pub(crate) write_zeroes: bool,
}

/// Everything needed to serve requests, apart from the queue and guest memory.
pub(crate) struct Executor {
    pub(crate) disk: Arc<Disk>,
    pub(crate) counters: Arc<BlockCounters>,
    pub(crate) id: [u8; ID_BYTES],
    pub(crate) negotiated: Negotiated,
    pub(crate) log: DeviceNotices,
    /// O_DIRECT bounce buffer, allocated on first use and kept.
    pub(crate) bounce: Option<AlignedBuf>,
}

/// How one request ended: the status byte and the data bytes written to the guest.
struct Outcome {
    status: u32,
    written: usize,
}

impl Outcome {
    fn ok(written: usize) -> Self {
        Self { status: VIRTIO_BLK_S_OK, written }
    }
    fn ioerr() -> Self {
        Self { status: VIRTIO_BLK_S_IOERR, written: 0 }
    }
    fn unsupp() -> Self {
        Self { status: VIRTIO_BLK_S_UNSUPP, written: 0 }
    }
}

impl Executor {
    /// Logs a guest- or host-caused error before it is counted, rate-limited by the
    /// error count.
    pub(crate) fn log_error(&self, what: std::fmt::Arguments) {
        let n = self.counters.errors.load(Ordering::Relaxed).wrapping_add(1);
        if should_log(n) {
            self.log.warn(format_args!("{what} (error {n})"));
        }
    }

    /// Executes one chain and writes its status; returns the used length (bytes written
    /// to the guest: data and status).
    pub(crate) fn handle_chain(&mut self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
        BlockCounters::add(&self.counters.requests, 1);
        let request = match parse(mem, chain) {
            Ok(request) => request,
            Err(e) => {
                self.log_error(format_args!("refusing a malformed request: {}", e.reason()));
                BlockCounters::add(&self.counters.malformed, 1);
                BlockCounters::add(&self.counters.errors, 1);
                return match e {
                    ParseError::Reject { status, .. } => {
                        status.copy_from(&[VIRTIO_BLK_S_IOERR as u8]);
                        1
                    }
                    ParseError::Drop(_) => 0,
                };
            }
        };
        let outcome = self.execute(&request);
        // Status values are the small constants above.
        request.status.copy_from(&[outcome.status as u8]);
        match outcome.status {
            VIRTIO_BLK_S_IOERR => BlockCounters::add(&self.counters.errors, 1),
            VIRTIO_BLK_S_UNSUPP => BlockCounters::add(&self.counters.unsupported, 1),
            _ => 0,
        };
        // At most the 4 GiB a chain can hold, less header and status, so this fits.
        u32::try_from(outcome.written.saturating_add(1)).unwrap_or(u32::MAX)
    }

    /// The byte offset of `len` bytes at `sector`, if they lie within the disk.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        (offset.checked_add(len)? <= self.disk.size()).then_some(offset)
    }

    fn io_error(&self, kind: RequestType, sector: u64, e: io::Error) -> Outcome {
        self.log_error(format_args!("{kind:?} at sector {sector} failed: {e}"));
        Outcome::ioerr()
    }

    fn out_of_range(&self, kind: RequestType, sector: u64, len: u64) -> Outcome {
        let capacity = self.disk.size() / SECTOR_SIZE;
        self.log_error(format_args!(
            "{kind:?} of {len} bytes at sector {sector} is beyond the disk's {capacity} sectors"
        ));
        BlockCounters::add(&self.counters.malformed, 1);
        Outcome::ioerr()
    }

    fn execute(&mut self, req: &Request) -> Outcome {
        let len = req.data.len();
        match req.kind {
            RequestType::In => {
                let Some(offset) = self.range(req.sector, len as u64) else {
                    return self.out_of_range(req.kind, req.sector, len as u64);
                };
                match self.disk.read(offset, &req.data, &mut self.bounce) {
                    Ok(()) => {
                        BlockCounters::add(&self.counters.read_bytes, len as u64);
                        Outcome::ok(len)
                    }
                    Err(e) => self.io_error(req.kind, req.sector, e),
                }
            }
            RequestType::Out => {
                // Checked here as well as by the file's O_RDONLY: the spec wants IOERR
                // and no write at all.
                if self.disk.readonly() {
                    return Outcome::ioerr();
                }
                let Some(offset) = self.range(req.sector, len as u64) else {
                    return self.out_of_range(req.kind, req.sector, len as u64);
                };
                match self.disk.write(offset, &req.data, &mut self.bounce).and_then(|()| self.write_through()) {
                    Ok(()) => {
                        BlockCounters::add(&self.counters.write_bytes, len as u64);
                        Outcome::ok(0)
                    }
                    Err(e) => self.io_error(req.kind, req.sector, e),
                }
            }
            RequestType::Flush => match self.disk.flush() {
                Ok(()) => {
                    BlockCounters::add(&self.counters.flushes, 1);
                    Outcome::ok(0)
                }
                Err(e) => self.io_error(req.kind, req.sector, e),
            },
            // NUL-padded; a buffer shorter than 20 bytes gets what fits.
            RequestType::GetId => Outcome::ok(req.data.write_at(0, &self.id)),
            RequestType::Discard | RequestType::WriteZeroes => self.discard(req),
            RequestType::Unsupported(_) => Outcome::unsupp(),
        }
    }

    /// Without a negotiated FLUSH the driver assumes a write-through cache: every write
    /// must be durable when it completes (virtio 1.2, 5.2.6.2).
    fn write_through(&self) -> io::Result<()> {
        match self.negotiated.flush {
            true => Ok(()),
            false => self.disk.flush(),
        }
    }

    /// DISCARD and WRITE_ZEROES: every segment is checked before any is executed.
    fn discard(&mut self, req: &Request) -> Outcome {
        let zeroes = req.kind == RequestType::WriteZeroes;
        let negotiated = if zeroes { self.negotiated.write_zeroes } else { self.negotiated.discard };
        if !negotiated {
            return Outcome::unsupp();
        }
        if self.disk.readonly() {
            return Outcome::ioerr();
        }
        let count = req.data.len() / SEGMENT_LEN;
        if count > MAX_DISCARD_SEGMENTS as usize {
            self.log_error(format_args!("{:?} with {count} segments; at most {MAX_DISCARD_SEGMENTS}", req.kind));
            return Outcome::ioerr();
        }
        let mut ranges = Vec::with_capacity(count);
        for i in 0..count {
            let mut raw = [0u8; SEGMENT_LEN];
            req.data.read_at(i * SEGMENT_LEN, &mut raw);
            let [s @ .., n0, n1, n2, n3, f0, f1, f2, f3] = raw;
            let sector = u64::from_le_bytes(s);
            let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
            let flags = u32::from_le_bytes([f0, f1, f2, f3]);
            // Unknown flags, and unmap on a discard, must be refused as unsupported.
            let allowed = if zeroes { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP } else { 0 };
            if flags & !allowed != 0 {
                return Outcome::unsupp();
            }
            if sectors > MAX_DISCARD_SECTORS {
                self.log_error(format_args!("{:?} of {sectors} sectors; at most {MAX_DISCARD_SECTORS}", req.kind));
                return Outcome::ioerr();
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let Some(offset) = self.range(sector, len) else {
                return self.out_of_range(req.kind, sector, len);
            };
            ranges.push((offset, len, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0));
        }
        for (offset, len, unmap) in ranges {
            if len == 0 {
                continue;
            }
            let done = match zeroes {
                true => self.disk.write_zeroes(offset, len, unmap),
                false => self.disk.discard(offset, len),
            };
            if let Err(e) = done {
                return self.io_error(req.kind, offset / SECTOR_SIZE, e);
            }
        }
        if let Err(e) = self.write_through() {
            return self.io_error(req.kind, req.sector, e);
        }
        BlockCounters::add(&self.counters.discards, 1);
        Outcome::ok(0)
    }
}
