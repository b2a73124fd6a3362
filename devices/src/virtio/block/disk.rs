//! The backing file: opening and probing it, and positioned I/O between it and guest
//! memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::sg::GuestSg;
use super::{BlockConfig, BlockError, SECTOR_SIZE};

/// Bounce buffer size under O_DIRECT: large requests are moved in chunks of this size.
const BOUNCE_CHUNK: usize = 1 << 20;
/// Memory alignment of bounce buffers: a page satisfies every O_DIRECT implementation.
const BOUNCE_ALIGN: usize = 4096;
/// Most iovecs one preadv/pwritev takes (Linux UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// A heap buffer whose usable part starts at an `align`ed address, built from a plain
/// over-allocated Vec so that no raw allocation is needed.
pub(crate) struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize, align: usize) -> Self {
        let storage = vec![0u8; len + align];
        let addr = storage.as_ptr() as usize;
        let start = (align - addr % align) % align;
        Self { storage, start, len }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// An open disk image.
pub(crate) struct Disk {
    file: File,
    /// Size in bytes, a multiple of [`SECTOR_SIZE`], fixed at open time.
    size: u64,
    readonly: bool,
    /// Under O_DIRECT, the alignment file offsets, lengths and buffers must have.
    direct_align: Option<usize>,
    /// Whether FALLOC_FL_PUNCH_HOLE works on this file (probed at open).
    can_punch: bool,
    /// Cleared the first time the file system refuses FALLOC_FL_ZERO_RANGE.
    zero_range: AtomicBool,
    /// The file system's preferred I/O size (st_blksize), a hint for discard granularity.
    io_block: u64,
}

impl Disk {
    /// Opens and checks `config.path`. See [`BlockError`] for what is refused.
    pub(crate) fn open(config: &BlockConfig) -> Result<Self, BlockError> {
        let path = config.path.as_path();
        let open_error = |source: io::Error| match source.kind() {
            io::ErrorKind::NotFound => BlockError::NotFound { path: path.to_owned() },
            io::ErrorKind::PermissionDenied => {
                BlockError::PermissionDenied { path: path.to_owned(), readonly: config.readonly }
            }
            _ if source.raw_os_error() == Some(libc::EROFS) => BlockError::ReadOnlyFileSystem { path: path.to_owned() },
            _ if config.direct && source.raw_os_error() == Some(libc::EINVAL) => {
                BlockError::DirectUnsupported { path: path.to_owned() }
            }
            _ => BlockError::Open { path: path.to_owned(), source },
        };

        // Check the type before opening: opening a FIFO would block, a directory fails
        // with a confusing error.
        let meta = std::fs::metadata(path).map_err(open_error)?;
        check_type(path, &meta.file_type())?;

        let mut options = OpenOptions::new();
        options.read(true).write(!config.readonly);
        if config.direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let mut file = options.open(path).map_err(open_error)?;
        // The path may have been replaced between the two looks.
        let meta = file.metadata().map_err(open_error)?;
        check_type(path, &meta.file_type())?;
        lock(&file, path, config.readonly)?;

        // Works for block devices too, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0)).map_err(open_error)?;
        if size == 0 {
            return Err(BlockError::Empty { path: path.to_owned() });
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::SizeNotAligned { path: path.to_owned(), size });
        }

        let direct_align = match config.direct {
            true => {
                Some(probe_direct_align(&file).ok_or_else(|| BlockError::DirectUnsupported { path: path.to_owned() })?)
            }
            false => None,
        };
        let can_punch = meta.file_type().is_file() && !config.readonly && probe_punch_hole(&file, size);
        let io_block = std::os::unix::fs::MetadataExt::blksize(&meta).clamp(SECTOR_SIZE, 1 << 20);

        Ok(Self {
            file,
            size,
            readonly: config.readonly,
            direct_align,
            can_punch,
            zero_range: AtomicBool::new(true),
            io_block,
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn readonly(&self) -> bool {
        self.readonly
    }

    pub(crate) fn can_punch(&self) -> bool {
        self.can_punch
    }

    pub(crate) fn io_block(&self) -> u64 {
        self.io_block
    }

    /// The block size the guest should use: 512 unless O_DIRECT needs larger aligned
    /// I/O. (Larger values are not offered otherwise: they change the guest's logical
    /// sector size, and with it how an existing partition table is read.)
    pub(crate) fn block_size(&self) -> u32 {
        self.direct_align.map_or(SECTOR_SIZE as u32, |a| u32::try_from(a).unwrap_or(u32::MAX))
    }

    /// Reads `bufs.len()` bytes at `offset` into guest memory. `bounce` holds the O_DIRECT
    /// bounce buffer between calls (allocated on first use).
    pub(crate) fn read(&self, offset: u64, bufs: &GuestSg, bounce: &mut Option<AlignedBuf>) -> io::Result<()> {
        match self.bounce_needed(bufs) {
            false => self.transfer(offset, bufs, Dir::Read),
            true => {
                let buf = bounce.get_or_insert_with(|| AlignedBuf::new(BOUNCE_CHUNK, BOUNCE_ALIGN)).as_mut_slice();
                let mut done = 0;
                while done < bufs.len() {
                    let n = buf.len().min(bufs.len() - done);
                    self.file.read_exact_at(&mut buf[..n], file_offset(offset, done)?)?;
                    bufs.write_at(done, &buf[..n]);
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Writes the guest's `bufs` to the disk at `offset`.
    pub(crate) fn write(&self, offset: u64, bufs: &GuestSg, bounce: &mut Option<AlignedBuf>) -> io::Result<()> {
        if self.readonly {
            // The file is open read-only anyway; fail before touching it.
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        match self.bounce_needed(bufs) {
            false => self.transfer(offset, bufs, Dir::Write),
            true => {
                let buf = bounce.get_or_insert_with(|| AlignedBuf::new(BOUNCE_CHUNK, BOUNCE_ALIGN)).as_mut_slice();
                let mut done = 0;
                while done < bufs.len() {
                    let n = buf.len().min(bufs.len() - done);
                    bufs.read_at(done, &mut buf[..n]);
                    self.file.write_all_at(&buf[..n], file_offset(offset, done)?)?;
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Makes completed writes durable.
    pub(crate) fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `len` bytes at `offset`; they read back as zeroes.
    pub(crate) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    /// Zeroes `len` bytes at `offset`, deallocating them only if `unmap` allows it.
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            return self.discard(offset, len);
        }
        if self.zero_range.load(Ordering::Relaxed) {
            match self.fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
                Err(e) if is_unsupported(&e) => self.zero_range.store(false, Ordering::Relaxed),
                other => return other,
            }
        }
        // No ZERO_RANGE here (e.g. tmpfs): punch, then allocate the range again, since
        // the driver asked for the blocks to stay allocated.
        self.discard(offset, len)?;
        match self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len) {
            Err(e) if is_unsupported(&e) => Ok(()),
            other => other,
        }
    }

    fn bounce_needed(&self, bufs: &GuestSg) -> bool {
        self.direct_align.is_some_and(|align| !bufs.is_aligned(align))
    }

    /// preadv/pwritev straight between the file and guest memory, resuming after short
    /// transfers and EINTR.
    fn transfer(&self, offset: u64, bufs: &GuestSg, dir: Dir) -> io::Result<()> {
        let mut done = 0;
        while done < bufs.len() {
            let (iovecs, _guards) = bufs.iovecs(done, IOV_MAX);
            let pos = libc::off_t::try_from(file_offset(offset, done)?).map_err(|_| io::ErrorKind::InvalidInput)?;
            // iovecs.len() <= IOV_MAX, so it fits a c_int.
            let count = iovecs.len() as libc::c_int;
            let fd = self.file.as_raw_fd();
            let n = match dir {
                // SAFETY: each iovec covers a VolatileSlice of guest RAM that GuestSg checked
                // against the memory map; `_guards` keep those pointers valid for the call.
                // The kernel writes at most iov_len bytes to each.
                Dir::Read => unsafe { libc::preadv(fd, iovecs.as_ptr(), count, pos) },
                // SAFETY: as above; the kernel only reads from the buffers.
                Dir::Write => unsafe { libc::pwritev(fd, iovecs.as_ptr(), count, pos) },
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => {
                    // Reads: the file shrank under us. Writes: the kernel made no progress.
                    return Err(match dir {
                        Dir::Read => io::ErrorKind::UnexpectedEof.into(),
                        Dir::Write => io::ErrorKind::WriteZero.into(),
                    });
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        fallocate(&self.file, mode, offset, len)
    }
}

#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

fn file_offset(offset: u64, done: usize) -> io::Result<u64> {
    offset.checked_add(done as u64).ok_or_else(|| io::ErrorKind::InvalidInput.into())
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS))
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    loop {
        // SAFETY: fallocate only reads its integer arguments; `file` is an open descriptor.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn check_type(path: &Path, ft: &std::fs::FileType) -> Result<(), BlockError> {
    let kind = if ft.is_file() || ft.is_block_device() {
        return Ok(());
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else {
        "special file"
    };
    Err(BlockError::NotADisk { path: path.to_owned(), kind })
}

/// Takes an advisory lock so that two VMMs (or a VMM and a well-behaved tool) do not
/// use one image at once: exclusive for read-write, shared for read-only.
fn lock(file: &File, path: &Path, readonly: bool) -> Result<(), BlockError> {
    let op = if readonly { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: flock only takes an open descriptor and an integer.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Err(BlockError::Locked { path: path.to_owned() }),
        // Some file systems (old NFS setups) have no locks: run unlocked rather than refuse.
        _ => Ok(()),
    }
}

/// Finds the offset/length alignment O_DIRECT needs on `file` by trying aligned reads of
/// growing size at offset 0 (harmless, and works for files and block devices alike).
/// None: O_DIRECT reads fail at every alignment up to a page.
fn probe_direct_align(file: &File) -> Option<usize> {
    let mut buf = AlignedBuf::new(BOUNCE_ALIGN, BOUNCE_ALIGN);
    [512, 1024, 2048, 4096].into_iter().find(|&align| file.read_at(&mut buf.as_mut_slice()[..align], 0).is_ok())
}

/// Whether the file system can punch holes in `file`: punches one sector just past its
/// end with KEEP_SIZE, which changes nothing (there is no data there and the size is
/// kept) but fails with EOPNOTSUPP where punching is not implemented. (A zero-length
/// probe would not do: fallocate rejects len 0 with EINVAL before looking at the mode.)
fn probe_punch_hole(file: &File, size: u64) -> bool {
    fallocate(file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, size, SECTOR_SIZE).is_ok()
}

#[cfg(test)]
impl Disk {
    /// Makes the disk behave as if O_DIRECT needed `align`, so the bounce path can be
    /// exercised on any file system.
    pub(crate) fn force_alignment(&mut self, align: usize) {
        self.direct_align = Some(align);
    }

    /// Makes the disk behave as if the file system had no FALLOC_FL_ZERO_RANGE.
    pub(crate) fn forget_zero_range(&self) {
        self.zero_range.store(false, Ordering::Relaxed);
    }
}
